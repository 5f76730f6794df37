"""The checkout type-checks as it is: ``mypy`` from a fresh clone, no installed wheel needed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_mypy_is_clean_on_the_package_from_the_checkout() -> None:
    """eldercare/<folder> symlinks make the package-dir mapping visible to static tools."""
    command = [sys.executable, "-m", "mypy", "--no-incremental"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "Success" in done.stdout


def test_the_symlinked_tree_points_at_the_top_level_folders() -> None:
    for folder in ("gateway", "devices", "alerts", "api", "simulators", "deploy"):
        link = ROOT / "eldercare" / folder
        assert link.is_symlink() and link.resolve() == (ROOT / folder).resolve()

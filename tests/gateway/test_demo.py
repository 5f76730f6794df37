"""`eldercare demo` as a newcomer runs it: embedded database, our broker, live counts."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ELDERCARE = str(Path(sys.executable).with_name("eldercare"))

pytestmark = pytest.mark.slow


def run_demo(data_dir: Path, seconds: int) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ELDERCARE_")}
    env.update({"ELDERCARE_DATA_DIR": str(data_dir), "ELDERCARE_METRICS_PORT": "0", "COLUMNS": "120"})
    done = subprocess.run(
        [ELDERCARE, "demo", "--duration", str(seconds), "--rate", "20"],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        cwd=data_dir.parent,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    return done.stdout


def stored(output: str) -> int:
    return max(int(n) for n in re.findall(r"messages \(dedup receipts\)\s*│\s*(\d+)", output))


def test_demo_runs_on_embedded_services_and_a_second_run_reuses_the_data(tmp_path: Path) -> None:
    data_dir = tmp_path / "demo-data"
    first = run_demo(data_dir, 6)
    assert str(data_dir) in first
    assert stored(first) > 0, first
    assert "observations" in first and "stopped" in first
    second = run_demo(data_dir, 4)
    assert "0 new migration(s)" in second
    assert stored(second) > stored(first)
    assert not (data_dir / "demo.json").exists(), "the running-demo marker must go at exit"

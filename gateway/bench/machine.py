"""The machine and the code the figures were measured on (CPU, versions, git commit)."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
from pathlib import Path

import psutil
import psycopg

from eldercare.gateway.bench.broker import mosquitto_version


def machine_info(db_url: str | None = None) -> dict[str, str]:
    """The machine the figures were measured on."""
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    info = {
        "cpus": str(os.cpu_count()),
        "cpu_model": model,
        "ram_gib": f"{psutil.virtual_memory().total / 2**30:.1f}",
        "os": platform.platform(),
        "python": platform.python_version(),
        "paho_mqtt": _version("paho-mqtt"),
        "psycopg": _version("psycopg"),
        "mosquitto": mosquitto_version(),
        "load_average": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "code": code_version(),
    }
    if db_url:
        with contextlib.suppress(psycopg.Error), psycopg.connect(db_url) as conn:
            row = conn.execute("SELECT current_setting('server_version')").fetchone()
            info["postgresql"] = str(row[0]) if row else "?"
            flav = conn.execute("SELECT value FROM store_info WHERE key = 'flavour'").fetchone()
            info["store_flavour"] = str(flav[0]) if flav else "?"
    return info


def code_version() -> str:
    """The git commit of the code measured (``+changes`` when the work tree differs)."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return "?"
    if head.returncode:
        return "?"
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"

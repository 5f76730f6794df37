"""Reading the dead letters back: what was rejected, why, and how often (the CLI's view)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import psycopg


@dataclass(frozen=True, slots=True)
class DeadLetterFilter:
    """Which dead letters: received since ``after``, optionally of one device or reason."""

    after: datetime
    device_id: str | None = None
    reason: str | None = None

    def params(self) -> dict[str, object]:
        return {"after": self.after, "d": self.device_id, "r": self.reason}


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One stored rejection (the payload is on the first row of its message only)."""

    received_at: datetime
    device_id: str | None
    msg_id: str | None
    reason: str
    detail: str
    item_count: int
    payload: bytes | None


_WHERE = (
    "received_at >= %(after)s AND (%(d)s::text IS NULL OR device_id = %(d)s)"
    " AND (%(r)s::text IS NULL OR reason = %(r)s)"
)


def counts_by_reason(conn: psycopg.Connection, which: DeadLetterFilter) -> list[tuple[str, int, int]]:
    """(reason, items, messages) of the matching dead letters, most items first."""
    rows = conn.execute(
        f"SELECT reason, sum(item_count), count(*) FROM dead_letters WHERE {_WHERE}"
        " GROUP BY reason ORDER BY 2 DESC",
        which.params(),
    ).fetchall()
    return [(r, int(items), int(msgs)) for r, items, msgs in rows]


def recent(conn: psycopg.Connection, which: DeadLetterFilter, limit: int) -> list[DeadLetter]:
    """The newest matching dead letters, newest first."""
    rows = conn.execute(
        "SELECT received_at, device_id, msg_id, reason, detail, item_count, payload"
        f" FROM dead_letters WHERE {_WHERE} ORDER BY received_at DESC, id DESC LIMIT %(n)s",
        {**which.params(), "n": limit},
    ).fetchall()
    return [DeadLetter(*row) for row in rows]

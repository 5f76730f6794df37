"""Durable timers in the store: schedule, cancel, claim and mark, in the caller's transaction.

A timer is a row of ``timers`` (migration 0008): a ``kind`` (what fires, the handler's name),
a ``key`` (which one: an elder id, an alert id), a due time and a JSON payload. At most one
timer per (kind, key) is pending (neither fired nor cancelled). Every function here takes the
caller's cursor, so a rule can schedule or cancel a timer in the transaction that stores the
event causing it: a fall and its 60 s timer commit together or not at all.

Firing (``eldercare.alerts.timers.TimerRunner``): ``claim_due`` locks due rows with
``FOR UPDATE SKIP LOCKED``, ``mark_fired`` marks each one and its handler writes through the
same transaction; one commit. A runner that dies mid-handler releases its row locks with its
connection, and the next runner claims the rows again: nothing is lost, nothing commits twice.
A ``cancel`` racing a firing waits for the row lock and then finds the timer fired (False).

Announcements: runners sleep until the earliest due time they know of, but never longer than
``MAX_SLEEP`` (their safety sweep). A timer due later than a sweep away is found by the next
sweep in time; one due sooner is announced with ``NOTIFY eldercare_timers`` (payload: its kind),
sent by PostgreSQL when the scheduling transaction commits (never for one rolled back). The
rule lives here, in ``schedule``, rather than in a trigger, because its threshold is derived
from the runners' ``MAX_SLEEP``, a Python constant: one number in one place, and ``schedule``
is the only way timers are written.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

import psycopg
from psycopg.rows import class_row
from psycopg.types.json import Jsonb

#: The LISTEN/NOTIFY channel runners are woken on; the payload is the timer's kind.
CHANNEL = "eldercare_timers"
#: The longest a runner sleeps without looking at the table (its safety sweep).
MAX_SLEEP = timedelta(seconds=5)
#: ``schedule`` announces a timer due sooner than this. A runner may sleep up to MAX_SLEEP from
#: a look taken just before the scheduling transaction commits; the second MAX_SLEEP is margin
#: for what that transaction still does between ``schedule`` and its commit.
ANNOUNCE_WITHIN = 2 * MAX_SLEEP

#: What ``schedule`` does when the (kind, key) already has a pending timer: ``keep`` leaves it
#: as it is (a second fall within the minute does not restart the fall's minute); ``replace``
#: gives it the new due time and payload and clears its failed tries (a retry re-armed).
IfPending = Literal["keep", "replace"]

_PENDING = "fired_at IS NULL AND cancelled_at IS NULL"

_SCHEDULE = {
    # DO UPDATE (not DO NOTHING) in both cases, so RETURNING gives the pending row's id either way.
    "keep": "payload = timers.payload",
    "replace": (
        "due_at = EXCLUDED.due_at, run_at = EXCLUDED.run_at, payload = EXCLUDED.payload,"
        " attempts = 0, last_error = NULL"
    ),
}


@dataclass(frozen=True, slots=True)
class Timer:
    """A claimed timer, as its handler sees it."""

    id: int
    kind: str
    key: str
    due_at: datetime
    payload: dict[str, Any]
    created_at: datetime
    #: Tries that failed before this one (0 on the first).
    attempts: int


def schedule(
    cur: psycopg.Cursor[Any],
    kind: str,
    key: str,
    due_at: datetime,
    payload: Mapping[str, Any] | None = None,
    *,
    if_pending: IfPending,
) -> int:
    """Schedule the timer (kind, key) for ``due_at``; return the id of the pending timer.

    ``if_pending`` says what happens to one already pending (see ``IfPending``). A timer
    that has fired or been cancelled is history: scheduling the same (kind, key) again makes
    a new one. A runner firing the pending one right now holds its row lock: this waits for
    it and then schedules a new timer.
    """
    if due_at.tzinfo is None:
        raise ValueError("due_at must be timezone-aware")
    if if_pending not in _SCHEDULE:
        raise ValueError(f"if_pending must be 'keep' or 'replace', got {if_pending!r}")
    cur.execute(
        "WITH t AS ("
        " INSERT INTO timers (kind, key, due_at, run_at, payload)"
        " VALUES (%(kind)s, %(key)s, %(due)s, %(due)s, %(payload)s)"
        f" ON CONFLICT (kind, key) WHERE {_PENDING} DO UPDATE SET {_SCHEDULE[if_pending]}"
        " RETURNING id, run_at)"
        # clock_timestamp, not now(): the transaction may have begun long before this statement.
        " SELECT id, CASE WHEN run_at < clock_timestamp() + %(within)s"
        " THEN pg_notify(%(channel)s, %(kind)s)::text END FROM t",
        {
            "kind": kind,
            "key": key,
            "due": due_at,
            "payload": Jsonb(dict(payload or {})),
            "within": ANNOUNCE_WITHIN,
            "channel": CHANNEL,
        },
    )
    row = cur.fetchone()
    assert row is not None
    return int(row[0])


def cancel(cur: psycopg.Cursor[Any], kind: str, key: str, now: datetime | None = None) -> bool:
    """Cancel the pending timer (kind, key): True if one was cancelled, False if none was pending.

    False also when a runner fired it first (this waits for a firing in progress to commit).
    ``now`` is recorded as ``cancelled_at`` (default: the transaction's time).
    """
    cur.execute(
        f"UPDATE timers SET cancelled_at = COALESCE(%s, now()) WHERE kind = %s AND key = %s AND {_PENDING}"
        " RETURNING id",  # a row, not rowcount: also right in pipeline mode
        (now, kind, key),
    )
    return cur.fetchone() is not None


def claim_due(
    cur: psycopg.Cursor[Any], now: datetime, limit: int, kinds: Collection[str] | None = None
) -> list[Timer]:
    """Lock and return up to ``limit`` pending timers due by ``now``, earliest first.

    Rows another transaction holds (a runner firing them, a rule cancelling them) are skipped.
    ``kinds``: only timers of these kinds (None: any kind). The locks last until the
    transaction ends; ``mark_fired`` before it commits.
    """
    kind_filter = "" if kinds is None else " AND kind = ANY(%(kinds)s)"
    with cur.connection.cursor(row_factory=class_row(Timer)) as claim:
        claim.execute(
            "SELECT id, kind, key, due_at, payload, created_at, attempts FROM timers"
            f" WHERE {_PENDING} AND run_at <= %(now)s{kind_filter}"
            " ORDER BY run_at LIMIT %(limit)s FOR UPDATE SKIP LOCKED",
            {"now": now, "limit": limit, "kinds": list(kinds or ())},
        )
        return claim.fetchall()


def mark_fired(cur: psycopg.Cursor[Any], ids: Collection[int], now: datetime) -> int:
    """Mark claimed timers fired at ``now``; return how many were marked."""
    if not ids:
        return 0
    cur.execute(
        f"UPDATE timers SET fired_at = %s WHERE id = ANY(%s) AND {_PENDING}",
        (now, list(ids)),
    )
    return cur.rowcount


def mark_failed(cur: psycopg.Cursor[Any], timer_id: int, error: str, retry_at: datetime) -> None:
    """Record a failed try of a claimed timer: one more attempt, the error, no retry before ``retry_at``."""
    cur.execute(
        "UPDATE timers SET attempts = attempts + 1, last_error = %s, run_at = %s"
        f" WHERE id = %s AND {_PENDING}",
        (error, retry_at, timer_id),
    )


def next_due(conn: psycopg.Connection[Any], kinds: Collection[str] | None = None) -> datetime | None:
    """When the earliest pending timer (of ``kinds``; None: any) may next be taken, or None."""
    kind_filter = "" if kinds is None else " AND kind = ANY(%s)"
    params = () if kinds is None else (list(kinds),)
    row = conn.execute(f"SELECT min(run_at) FROM timers WHERE {_PENDING}{kind_filter}", params).fetchone()
    return None if row is None else row[0]


def overdue_kinds(conn: psycopg.Connection[Any], before: datetime, excluding: Collection[str]) -> list[str]:
    """Kinds, other than ``excluding``, that have a pending timer due before ``before``."""
    rows = conn.execute(
        f"SELECT DISTINCT kind FROM timers WHERE {_PENDING} AND run_at < %s AND kind <> ALL(%s)"
        " ORDER BY kind",
        (before, list(excluding)),
    ).fetchall()
    return [r[0] for r in rows]


def delete_finished(cur: psycopg.Cursor[Any], before: datetime) -> int:
    """Delete timers fired or cancelled before ``before`` (retention); return how many."""
    cur.execute("DELETE FROM timers WHERE COALESCE(fired_at, cancelled_at) < %s", (before,))
    return cur.rowcount

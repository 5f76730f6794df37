"""Dedup receipts by day: which day a message's receipt belongs to, and its daily partitions.

``message_receipts`` holds one row per stored message, keyed ``(device_id, msg_id, day)`` and
range-partitioned by ``day`` (one partition a day, ``message_receipts_pYYYYMMDD``, plus a
DEFAULT one as a safety net). Retention drops whole partitions, never ``DELETE``s, and a
receipt is checked and inserted with one probe of one day's index: the cost of both follows
the day's volume, not the 31 days kept.

Why the day comes from the message, not from its reception. A unique index on a partitioned
table must contain the partition key, so the day has to be part of the dedup key, and a
redelivery must land on the same day as the first copy, however much later it comes. The
day is therefore the UTC day of the latest time the message itself carries (the ``ts`` of
its readings, events and statuses): the same in every copy of it. The latest, not the
earliest, because a later copy may have lost its oldest readings to the buffer horizon
(``too_old``) but keeps its newest. A message with no time of its own (a command ack or
status without ``ts``, or whose every ``ts`` was ahead of the gateway's clock and replaced by
the receive time) gets the day of its reception, and its key is looked up in every partition
before it is inserted (a few extra index probes, for rare messages).

The dedup window follows: a message is recognised as a redelivery as long as its latest
``ts`` is inside the buffer horizon plus one day (``retention_start``), which is what the
partitions keep. Anything older is rejected as ``too_old`` as a whole, so it cannot be
stored twice. The window is in the message's own time, so it holds however long the
redelivery took (broker session, device buffer). What it does not catch: a message whose
clock was more than the skew tolerance ahead at its first delivery and no longer is at a
later one (its newest ``ts`` then changes day); such readings are flagged ``clock_skew``.

Partitions are created ahead (``DAYS_AHEAD``) and dropped by the maintenance job; the
migration creates the current window's, so a fresh store needs no maintenance run first.
Rows that found no partition (the job did not run for days) wait in the DEFAULT partition
and are moved into their day's partition when it is created.
"""

from __future__ import annotations

import logging
import re
from datetime import UTC, date, datetime, timedelta

import psycopg
from psycopg import sql

from eldercare.devices.records import CLOCK_SKEW, Interpretation

log = logging.getLogger(__name__)

TABLE = "message_receipts"
DEFAULT_PARTITION = "message_receipts_default"
#: Daily partitions created ahead of today (a ``ts`` may be up to the skew tolerance ahead).
DAYS_AHEAD = 3
#: pg_advisory_xact_lock key of partition changes ("eldrcpts" in ASCII).
RECEIPTS_LOCK_KEY = 0x656C_6472_6370_7473
#: How long dropping a partition may wait for its lock (it queues writers behind it).
DROP_LOCK_TIMEOUT = "2s"
_PARTITION_NAME = re.compile(r"^message_receipts_p(?P<day>\d{8})$")


def receipt_day(interp: Interpretation, received_at: datetime) -> date | None:
    """The UTC day of the latest time the message carries, or None if it carries none.

    Times equal to ``received_at`` are the gateway's stamp (no ``ts``, or a ``ts`` ahead of
    the clock replaced by it), not the message's own, and so are clock-skewed ones.
    """
    latest: datetime | None = None
    for items in (interp.readings, interp.events):
        for item in items:
            t = item.time
            if (latest is None or t > latest) and t != received_at and CLOCK_SKEW not in item.flags:
                latest = t
    for st in interp.statuses:
        t = st.time
        if (latest is None or t > latest) and t != received_at:
            latest = t
    return None if latest is None else latest.astimezone(UTC).date()


def retention_start(now: datetime, buffer_horizon_days: int) -> date:
    """The oldest day whose receipts are kept at ``now``: the buffer horizon plus one day."""
    return (now.astimezone(UTC) - timedelta(days=buffer_horizon_days + 1)).date()


def partition_name(day: date) -> str:
    """The name of the receipts partition of ``day``."""
    return f"{TABLE}_p{day:%Y%m%d}"


def partitions(conn: psycopg.Connection) -> dict[str, date]:
    """The daily receipts partitions (by name) and the day each holds."""
    rows = conn.execute(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " WHERE i.inhparent = to_regclass(%s)",
        (TABLE,),
    ).fetchall()
    out = {}
    for (name,) in rows:
        m = _PARTITION_NAME.match(name)
        if m:
            out[name] = datetime.strptime(m["day"], "%Y%m%d").date()
    return out


def create_partitions(
    conn: psycopg.Connection, now: datetime, *, buffer_horizon_days: int = 30, days_ahead: int = DAYS_AHEAD
) -> tuple[list[str], int]:
    """Create the missing daily partitions of the window around ``now``; (names, rows moved).

    One transaction per day, so each holds the DEFAULT partition locked only for its own
    day: rows of that day already there are moved into the new table before it is attached.
    ``conn`` must be idle (not in a transaction), like the maintenance job's.
    """
    _aware(now)
    first = retention_start(now, buffer_horizon_days)
    last = now.astimezone(UTC).date() + timedelta(days=days_ahead)
    created: list[str] = []
    moved = 0
    with conn.transaction():  # not an implicit one left open: each day commits on its own
        existing = set(partitions(conn).values())
    day = first
    while day <= last:
        if day not in existing:
            with conn.transaction():
                _lock(conn)
                if day not in partitions(conn).values():
                    moved += _create_partition(conn, day)
                    created.append(partition_name(day))
        day += timedelta(days=1)
    if created:
        log.info("receipt partitions created", extra={"count": len(created), "rows_moved": moved})
    return created, moved


def drop_expired(conn: psycopg.Connection, now: datetime, *, buffer_horizon_days: int = 30) -> list[str]:
    """Drop the partitions of days before the window (``retention_start``); return their names.

    Each drop is its own short transaction with a lock timeout: dropping a partition locks
    the parent table, so it waits for the batch in flight and holds the next one back for
    the moment the drop takes. A drop that times out is left for the next run. Rows of old
    days in the DEFAULT partition are the maintenance job's ``delete_old_rows``.
    """
    _aware(now)
    keep_from = retention_start(now, buffer_horizon_days)
    dropped: list[str] = []
    with conn.transaction():  # not an implicit one left open: each drop commits on its own
        expired = sorted((day, name) for name, day in partitions(conn).items() if day < keep_from)
    for _, name in expired:
        try:
            with conn.transaction():
                _lock(conn)
                conn.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(DROP_LOCK_TIMEOUT)))
                conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(name)))
            dropped.append(name)
        except psycopg.errors.LockNotAvailable:
            log.warning("receipt partition drop postponed: its table is busy", extra={"partition": name})
    if dropped:
        log.info("receipt partitions dropped", extra={"count": len(dropped)})
    return dropped


def _create_partition(conn: psycopg.Connection, day: date) -> int:
    """Create and attach ``day``'s partition, moving its rows out of DEFAULT; return rows moved."""
    default = sql.Identifier(DEFAULT_PARTITION)
    ident = sql.Identifier(partition_name(day))
    # ATTACH takes this lock on DEFAULT anyway (to check it holds no rows of the day); taken
    # up front, no writer can route a row of the day into DEFAULT meanwhile.
    conn.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(default))
    conn.execute(
        sql.SQL("CREATE TABLE {} (LIKE {} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)").format(
            ident, sql.Identifier(TABLE)
        )
    )
    moved = conn.execute(
        sql.SQL(
            "WITH moved AS (DELETE FROM {} WHERE day = %s RETURNING *) INSERT INTO {} SELECT * FROM moved"
        ).format(default, ident),
        (day,),
    ).rowcount
    conn.execute(
        sql.SQL("ALTER TABLE {} ATTACH PARTITION {} FOR VALUES FROM ({}) TO ({})").format(
            sql.Identifier(TABLE), ident, sql.Literal(day), sql.Literal(day + timedelta(days=1))
        )
    )
    return moved


def _lock(conn: psycopg.Connection) -> None:
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (RECEIPTS_LOCK_KEY,))


def _aware(now: datetime) -> None:
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")

"""The store maintenance job: partitions, retention, rollup refresh, dedup and dead-letter cleanup.

Idempotent and safe to run from several processes at once: each step holds a transaction-level
advisory lock, so concurrent runs queue behind each other and find nothing left to do.
``now`` is injected; nothing here reads the clock except the default for ``now``.

Plain PostgreSQL path:
- weekly partitions (Monday 00:00 UTC) of ``observations`` and ``device_events`` from
  ``now - buffer_horizon_days`` to ``now + weeks_ahead`` weeks; rows already in the DEFAULT
  partition for a week being created are moved into it in the same transaction;
- partitions wholly older than the retention period are dropped, together with the rollup
  buckets, dirty marks and DEFAULT-partition rows before the oldest kept week;
- rollups of the (elder, metric, hour) marks in ``rollup_dirty_hours`` are recomputed (see
  ``refresh_rollups``).
TimescaleDB path: policies do partitions, compression, retention and aggregates; this job only
keeps the retention policies in line with the settings and resumes refresh policies that a
crashed ``timescale.refresh_aggregates`` left paused.
Both paths: daily partitions of ``message_receipts`` are created ahead and dropped once past
the buffer horizon + 1 day (see ``receipts``); ``dead_letters`` older than their retention
are deleted.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import psycopg
from psycopg import sql

from eldercare.gateway.store import receipts
from eldercare.gateway.store.flavour import recorded_flavour
from eldercare.gateway.store.timescale import AGGREGATES, resume_refresh_policies

log = logging.getLogger(__name__)

#: pg_advisory_xact_lock key of the maintenance steps ("eldermnt" in ASCII).
MAINTENANCE_LOCK_KEY = 0x656C_6465_726D_6E74

PARTITIONED_TABLES = ("observations", "device_events")
#: Tables on plain PostgreSQL, continuous aggregates on TimescaleDB: the same names.
ROLLUP_TABLES = AGGREGATES
#: TimescaleDB: continuous aggregates are refreshed 35 days back; keep them at least that long.
CAGG_MIN_RETENTION_DAYS = 36
#: date_bin origin of every bucket: UTC-aligned.
BUCKET_ORIGIN = datetime(2000, 1, 1, tzinfo=UTC)
_MONDAY = datetime(2000, 1, 3, tzinfo=UTC)  # weeks start on Monday, 00:00 UTC
_WEEK = timedelta(days=7)
_PARTITION_NAME = re.compile(r"^(?P<table>[a-z_]+)_p(?P<day>\d{8})$")


@dataclass(slots=True)
class MaintenanceReport:
    """What one maintenance run did."""

    flavour: str | None
    partitions_created: list[str] = field(default_factory=list)
    rows_moved: int = 0
    partitions_dropped: list[str] = field(default_factory=list)
    expired_rows_deleted: int = 0
    hours_refreshed: int = 0
    receipts_deleted: int = 0
    receipt_partitions_dropped: list[str] = field(default_factory=list)
    dead_letters_deleted: int = 0
    retention_policies_set: list[str] = field(default_factory=list)
    refresh_policies_resumed: list[int] = field(default_factory=list)


def run_maintenance(
    conn: psycopg.Connection | str,
    *,
    now: datetime | None = None,
    retention_observations_days: int = 730,
    retention_dead_letters_days: int = 90,
    buffer_horizon_days: int = 30,
    weeks_ahead: int = 8,
) -> MaintenanceReport:
    """Run every maintenance step once for the store's flavour; return what was done.

    ``conn`` is a conninfo string or an idle connection (it is used for several transactions).
    The day counts mirror the settings ``retention_observations_days``,
    ``retention_dead_letters_days`` and ``buffer_horizon_days``.
    """
    now = now or datetime.now(UTC)
    _aware(now)
    if isinstance(conn, str):
        with psycopg.connect(conn) as own:
            return run_maintenance(
                own,
                now=now,
                retention_observations_days=retention_observations_days,
                retention_dead_letters_days=retention_dead_letters_days,
                buffer_horizon_days=buffer_horizon_days,
                weeks_ahead=weeks_ahead,
            )
    _idle(conn)
    with conn.transaction():
        flavour = recorded_flavour(conn)
    report = MaintenanceReport(flavour=flavour)
    if flavour == "plain":
        created, moved = create_partitions(
            conn, now, buffer_horizon_days=buffer_horizon_days, weeks_ahead=weeks_ahead
        )
        report.partitions_created, report.rows_moved = created, moved
        report.partitions_dropped, report.expired_rows_deleted = drop_expired_partitions(
            conn, now, retention_days=retention_observations_days
        )
        report.hours_refreshed = refresh_rollups(conn)
    elif flavour == "timescale":
        report.retention_policies_set = sync_retention_policies(
            conn, retention_days=retention_observations_days
        )
        report.refresh_policies_resumed = resume_refresh_policies(conn)
    receipts.create_partitions(conn, now, buffer_horizon_days=buffer_horizon_days)
    report.receipt_partitions_dropped = receipts.drop_expired(
        conn, now, buffer_horizon_days=buffer_horizon_days
    )
    report.receipts_deleted, report.dead_letters_deleted = delete_old_rows(
        conn,
        now,
        buffer_horizon_days=buffer_horizon_days,
        retention_dead_letters_days=retention_dead_letters_days,
    )
    did_something = any(
        (
            report.partitions_created,
            report.partitions_dropped,
            report.hours_refreshed,
            report.receipts_deleted,
            report.receipt_partitions_dropped,
            report.dead_letters_deleted,
            report.retention_policies_set,
        )
    )
    # Runs every few minutes: an INFO line only when it changed something.
    log.log(
        logging.INFO if did_something else logging.DEBUG,
        "store maintenance done",
        extra={
            "flavour": flavour,
            "partitions_created": len(report.partitions_created),
            "rows_moved": report.rows_moved,
            "partitions_dropped": len(report.partitions_dropped),
            "hours_refreshed": report.hours_refreshed,
            "receipts_deleted": report.receipts_deleted,
            "dead_letters_deleted": report.dead_letters_deleted,
        },
    )
    return report


def week_start(t: datetime) -> datetime:
    """The Monday 00:00 UTC that starts the week holding ``t``."""
    return t - ((t - _MONDAY) % _WEEK)


def partition_name(table: str, start: datetime) -> str:
    """The name of ``table``'s partition for the week starting at ``start``."""
    return f"{table}_p{start.astimezone(UTC):%Y%m%d}"


def create_partitions(
    conn: psycopg.Connection,
    now: datetime,
    *,
    buffer_horizon_days: int = 30,
    weeks_ahead: int = 8,
) -> tuple[list[str], int]:
    """Create the missing weekly partitions around ``now``; return (names created, rows moved).

    A week whose rows already sit in the DEFAULT partition gets a table filled with those rows
    and then attached, all in one transaction that holds the DEFAULT partition locked, so no
    writer can slip a row for that week into it meanwhile.
    """
    _aware(now)
    first = week_start(now - timedelta(days=buffer_horizon_days))
    last = week_start(now + weeks_ahead * _WEEK)
    weeks = []
    w = first
    while w <= last:
        weeks.append(w)
        w += _WEEK
    created: list[str] = []
    moved = 0
    with conn.transaction():
        _lock(conn)
        for table in PARTITIONED_TABLES:
            if not _exists(conn, f"{table}_default"):
                continue
            existing = set(_partitions(conn, table))
            missing = [w for w in weeks if partition_name(table, w) not in existing]
            if not missing:
                continue
            default = sql.Identifier(f"{table}_default")
            # Writers routing rows to DEFAULT wait for this transaction; the lock is the one
            # ATTACH PARTITION would take on DEFAULT anyway, taken up front.
            conn.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(default))
            for start in missing:
                end = start + _WEEK
                name = partition_name(table, start)
                ident = sql.Identifier(name)
                conn.execute(
                    sql.SQL("CREATE TABLE {} (LIKE {} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)").format(
                        ident, sql.Identifier(table)
                    )
                )
                cur = conn.execute(
                    sql.SQL(
                        "WITH moved AS (DELETE FROM {} WHERE time >= %s AND time < %s RETURNING *)"
                        " INSERT INTO {} SELECT * FROM moved"
                    ).format(default, ident),
                    (start, end),
                )
                moved += cur.rowcount
                # DDL takes no parameters: the bounds go in as literals.
                conn.execute(
                    sql.SQL("ALTER TABLE {} ATTACH PARTITION {} FOR VALUES FROM ({}) TO ({})").format(
                        sql.Identifier(table), ident, sql.Literal(start), sql.Literal(end)
                    )
                )
                created.append(name)
    if created:
        log.info("partitions created", extra={"count": len(created), "rows_moved": moved})
    return created, moved


def drop_expired_partitions(
    conn: psycopg.Connection, now: datetime, *, retention_days: int = 730
) -> tuple[list[str], int]:
    """Drop partitions wholly older than ``now - retention_days``; return (dropped, rows deleted).

    Everything before the oldest kept week goes at once, so raw rows and rollups keep covering
    the same period: rollup buckets, dirty marks and stray DEFAULT-partition rows before it are
    deleted too (the row count returned covers those).
    """
    _aware(now)
    cutoff = now - timedelta(days=retention_days)
    keep_from = week_start(cutoff)  # the oldest week that still has rows inside retention
    dropped: list[str] = []
    deleted = 0
    with conn.transaction():
        _lock(conn)
        for table in PARTITIONED_TABLES:
            for name, start in _partitions(conn, table).items():
                if start + _WEEK <= cutoff:
                    conn.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(name)))
                    dropped.append(name)
            cur = conn.execute(
                sql.SQL("DELETE FROM {} WHERE time < %s").format(sql.Identifier(f"{table}_default")),
                (keep_from,),
            )
            deleted += cur.rowcount
        for rollup in ROLLUP_TABLES:
            cur = conn.execute(
                sql.SQL("DELETE FROM {} WHERE bucket < %s").format(sql.Identifier(rollup)),
                (keep_from,),
            )
            deleted += cur.rowcount
        for marks in ("rollup_dirty_hours", "rollup_pending_hours"):
            conn.execute(
                sql.SQL("DELETE FROM {} WHERE hour < %s").format(sql.Identifier(marks)),
                (keep_from,),
            )
    if dropped:
        log.info("expired partitions dropped", extra={"count": len(dropped)})
    return dropped, deleted


def refresh_rollups(conn: psycopg.Connection) -> int:
    """Recompute the 1m/1h/1d rollups of every marked (elder, metric, hour); return how many.

    The cost follows what changed: the raw rows of the marked hours of those elders and
    metrics, read through the (elder_id, metric, time) index, and the rollup rows above them.

    Why two steps. The trigger on ``observations`` marks an hour with ``INSERT .. ON CONFLICT
    DO NOTHING`` in the transaction holding the rows; DO NOTHING takes no row lock, so a plain
    "delete the mark, recompute" could delete a mark whose writer has not committed yet, and the
    rows of that writer would never reach the rollups. So:
    1. claim: a short transaction takes ``SHARE`` on ``rollup_dirty_hours`` (waits for every
       writer that has inserted a mark to commit, and holds new marks back for a moment), then
       moves all marks to ``rollup_pending_hours``. A writer whose mark arrives after this
       commits marks its hour again, so it is recomputed by a later run.
    2. recompute: one transaction per run rebuilds each pending hour (1m from raw rows, 1h from
       1m), then each day holding one (1d from 1h: exact, as min/max/sum/count compose), and
       deletes the pending marks.
    Series queries read marked hours in either table from raw rows, so answers are exact at
    every moment; a crash between the steps leaves the hours pending, not lost.
    """
    with conn.transaction():
        _lock(conn)
        conn.execute("LOCK TABLE rollup_dirty_hours IN SHARE MODE")
        conn.execute(
            "WITH claimed AS (DELETE FROM rollup_dirty_hours RETURNING elder_id, metric, hour)"
            " INSERT INTO rollup_pending_hours (elder_id, metric, hour)"
            " SELECT elder_id, metric, hour FROM claimed ON CONFLICT DO NOTHING"
        )
        # The day marks of the 0002 schema, which the ingest writer may still write: the
        # trigger's hour marks cover the same rows.
        conn.execute("DELETE FROM rollup_dirty")
    with conn.transaction():
        _lock(conn)
        row = conn.execute("SELECT count(*), min(hour), max(hour) FROM rollup_pending_hours").fetchone()
        assert row is not None
        count, first, last = row
        if count:
            _recompute_hours(conn, first, last + timedelta(hours=1))
            conn.execute("DELETE FROM rollup_pending_hours")
    if count:
        log.info("rollups refreshed", extra={"hours": count})
    return int(count)


def sync_retention_policies(conn: psycopg.Connection, *, retention_days: int = 730) -> list[str]:
    """TimescaleDB: make every retention policy drop after ``retention_days``; return those reset.

    Covers ``observations``, ``device_events`` and the three continuous aggregates; an
    aggregate keeps at least its refresh window (35 days, see the 0002 migration) plus a day,
    as a retention shorter than the refresh window would fight the refresh policy.
    """
    wanted = {rel: retention_days for rel in PARTITIONED_TABLES}
    wanted |= {rel: max(retention_days, CAGG_MIN_RETENTION_DAYS) for rel in ROLLUP_TABLES}
    changed: list[str] = []
    with conn.transaction():
        _lock(conn)
        rows = conn.execute(
            "SELECT COALESCE(ca.view_name, j.hypertable_name), (j.config->>'drop_after')::interval"
            " FROM timescaledb_information.jobs j"
            " LEFT JOIN timescaledb_information.continuous_aggregates ca"
            "   ON ca.materialization_hypertable_schema = j.hypertable_schema"
            "  AND ca.materialization_hypertable_name = j.hypertable_name"
            " WHERE j.proc_name = 'policy_retention'"
        ).fetchall()
        current = {r[0]: r[1] for r in rows}
        for rel, days in wanted.items():
            if current.get(rel) == timedelta(days=days):
                continue
            conn.execute("SELECT remove_retention_policy(%s, if_exists => true)", (rel,))
            conn.execute(
                "SELECT add_retention_policy(%s, drop_after => %s::interval)",
                (rel, timedelta(days=days)),
            )
            changed.append(rel)
    if changed:
        log.info("retention policies reset", extra={"relations": changed, "days": retention_days})
    return changed


def delete_old_rows(
    conn: psycopg.Connection,
    now: datetime,
    *,
    buffer_horizon_days: int = 30,
    retention_dead_letters_days: int = 90,
) -> tuple[int, int]:
    """Delete expired dedup receipts and dead letters; return (receipts, dead letters) deleted.

    Receipts are dropped a day's partition at a time (``receipts.drop_expired``); here go only
    those that found no partition and wait in the DEFAULT one.
    """
    _aware(now)
    with conn.transaction():
        _lock(conn)
        receipts_deleted = conn.execute(
            "DELETE FROM message_receipts_default WHERE day < %s",
            (receipts.retention_start(now, buffer_horizon_days),),
        ).rowcount
        dead = conn.execute(
            "DELETE FROM dead_letters WHERE received_at < %s",
            (now - timedelta(days=retention_dead_letters_days),),
        ).rowcount
    return receipts_deleted, dead


def _recompute_hours(conn: psycopg.Connection, lo: datetime, hi: datetime) -> None:
    """Rebuild the rollups of the marks in ``rollup_pending_hours`` (all within ``[lo, hi)``)."""
    # Every statement goes mark by mark: an index range scan per mark (LATERAL, or nested
    # loops only), partitions pruned at run time, those outside [lo, hi) at plan time. So the
    # cost follows the marks, whatever the estimates say: left to itself, the planner drove
    # 400 marks' deletes and inserts from the rollup and raw side (3 s and 16 s instead of
    # 0.1 s). The estimate of many loops over many partitions is high; compiling it (JIT)
    # would cost more than running it.
    conn.execute("ANALYZE rollup_pending_hours")
    conn.execute("SET LOCAL jit = off")
    conn.execute("SET LOCAL enable_hashjoin = off")
    conn.execute("SET LOCAL enable_mergejoin = off")
    params = {"origin": BUCKET_ORIGIN, "lo": lo, "hi": hi}
    for rollup in ("observations_1m", "observations_1h"):
        conn.execute(
            sql.SQL(
                "DELETE FROM {} r USING rollup_pending_hours p"
                " WHERE r.elder_id = p.elder_id AND r.metric = p.metric"
                " AND r.bucket >= p.hour AND r.bucket < p.hour + interval '1 hour'"
                " AND r.bucket >= %(lo)s AND r.bucket < %(hi)s"
            ).format(sql.Identifier(rollup)),
            params,
        )
    conn.execute(
        "INSERT INTO observations_1m (bucket, elder_id, metric, min, max, sum, count)"
        " SELECT m.bucket, p.elder_id, p.metric, m.min, m.max, m.sum, m.count"
        " FROM rollup_pending_hours p CROSS JOIN LATERAL ("
        "  SELECT date_bin('1 minute', o.time, %(origin)s) AS bucket,"
        "         min(o.value) AS min, max(o.value) AS max, sum(o.value) AS sum, count(*) AS count"
        "  FROM observations o"
        "  WHERE o.elder_id = p.elder_id AND o.metric = p.metric"
        "  AND o.time >= p.hour AND o.time < p.hour + interval '1 hour'"
        "  AND o.time >= %(lo)s AND o.time < %(hi)s"
        "  GROUP BY 1) m",
        params,
    )
    conn.execute(
        "INSERT INTO observations_1h (bucket, elder_id, metric, min, max, sum, count)"
        " SELECT p.hour, p.elder_id, p.metric, m.min, m.max, m.sum, m.count"
        " FROM rollup_pending_hours p CROSS JOIN LATERAL ("
        "  SELECT min(r.min) AS min, max(r.max) AS max, sum(r.sum) AS sum, sum(r.count)::bigint AS count"
        "  FROM observations_1m r"
        "  WHERE r.elder_id = p.elder_id AND r.metric = p.metric"
        "  AND r.bucket >= p.hour AND r.bucket < p.hour + interval '1 hour'"
        "  HAVING count(*) > 0) m",
        params,
    )
    days = (
        "WITH days AS (SELECT DISTINCT elder_id, metric, date_bin('1 day', hour, %(origin)s) AS day"
        " FROM rollup_pending_hours)"
    )
    conn.execute(
        days + " DELETE FROM observations_1d r USING days d"
        " WHERE r.elder_id = d.elder_id AND r.metric = d.metric AND r.bucket = d.day",
        params,
    )
    conn.execute(
        days + " INSERT INTO observations_1d (bucket, elder_id, metric, min, max, sum, count)"
        " SELECT d.day, d.elder_id, d.metric, m.min, m.max, m.sum, m.count"
        " FROM days d CROSS JOIN LATERAL ("
        "  SELECT min(r.min) AS min, max(r.max) AS max, sum(r.sum) AS sum, sum(r.count)::bigint AS count"
        "  FROM observations_1h r"
        "  WHERE r.elder_id = d.elder_id AND r.metric = d.metric"
        "  AND r.bucket >= d.day AND r.bucket < d.day + interval '1 day'"
        "  HAVING count(*) > 0) m",
        params,
    )


def _partitions(conn: psycopg.Connection, table: str) -> dict[str, datetime]:
    """``table``'s weekly partitions (by our naming scheme) and the week each starts."""
    rows = conn.execute(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " WHERE i.inhparent = to_regclass(%s)",
        (table,),
    ).fetchall()
    out = {}
    for (name,) in rows:
        m = _PARTITION_NAME.match(name)
        if m and m["table"] == table:
            out[name] = datetime.strptime(m["day"], "%Y%m%d").replace(tzinfo=UTC)
    return out


def _exists(conn: psycopg.Connection, relation: str) -> bool:
    row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (relation,)).fetchone()
    return bool(row and row[0])


def _lock(conn: psycopg.Connection) -> None:
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (MAINTENANCE_LOCK_KEY,))


def _idle(conn: psycopg.Connection) -> None:
    if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        raise ValueError("maintenance needs an idle connection (it commits several transactions)")


def _aware(now: datetime) -> None:
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")

"""Chart-query and rollup-refresh benchmark of the store at volume (prints figures).

    python -m eldercare.gateway.store.bench_series --admin-url postgresql://postgres@127.0.0.1/postgres \\
        --elders 95 --days 730 [--flavour timescale] [--keep [DATABASE]]

Makes a scratch database ``eldercare_bench_series_<random>``, migrates it (plain by default)
and loads ``elders x days x 1440`` per-minute heart-rate readings ending now with one
``INSERT .. SELECT generate_series`` (indexes dropped during the load and rebuilt after), fills
the rollups (TimescaleDB: a full refresh), and writes one live reading per elder through the
normal path, so the current hour is dirty as on a running store. Then it times the chart
queries (24 h at 5 min, 7 d at 1 h, 90 d at 1 d, for random elders); writes a buffered upload
(one elder's readings of 3-20 days ago, every 20 s, as the ingest writer writes them); times
that elder's charts before any refresh; and times the refresh. The database is dropped at the
end unless ``--keep``; ``--keep DATABASE`` reuses a kept one (migrated first, not reloaded).
See docs/benchmarks.md for figures.
"""

from __future__ import annotations

import argparse
import random
import secrets
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from psycopg import sql

from eldercare.gateway.services import database_url
from eldercare.gateway.store.maintenance import create_partitions, refresh_rollups
from eldercare.gateway.store.migrate import migrate
from eldercare.gateway.store.series import bucketed_series
from eldercare.gateway.store.timescale import refresh_aggregates

METRIC = "heart_rate"
#: (label, range, bucket width) of the chart queries timed.
CHARTS = (
    ("24 h at 5 min", timedelta(hours=24), timedelta(minutes=5)),
    ("7 d at 1 h", timedelta(days=7), timedelta(hours=1)),
    ("90 d at 1 d", timedelta(days=90), timedelta(days=1)),
)
_PARTS = {
    "plain": "SELECT count(*) FROM pg_inherits WHERE inhparent = 'observations'::regclass",
    "timescale": "SELECT count(*) FROM timescaledb_information.chunks WHERE hypertable_name = 'observations'",
}
_MARK_TABLES = ("rollup_dirty", "rollup_pending", "rollup_dirty_hours", "rollup_pending_hours")


def main(argv: list[str] | None = None) -> None:
    """Parse the options, run the benchmark, print the figures."""
    parser = argparse.ArgumentParser(prog="bench_series", description=__doc__.splitlines()[0])
    parser.add_argument("--admin-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--elders", type=int, default=10)
    parser.add_argument("--days", type=int, default=730, help="history per elder, per minute")
    parser.add_argument("--runs", type=int, default=30, help="timed runs of each chart query")
    parser.add_argument(
        "--keep",
        metavar="DB",
        nargs="?",
        const="",
        default=None,
        help="keep the database (or reuse DB, already loaded)",
    )
    parser.add_argument("--flavour", choices=("plain", "timescale"), default="plain")
    args = parser.parse_args(argv)
    run(args.admin_url, args.elders, args.days, args.runs, args.keep, args.flavour)


def run(admin_url: str, elders: int, days: int, runs: int, keep: str | None, flavour: str = "plain") -> None:
    """Load (unless reusing ``keep``), time, report; drop the database unless kept."""
    name = keep or f"eldercare_bench_series_{secrets.token_hex(4)}"
    url = database_url(admin_url, name)
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    try:
        if not keep:
            with psycopg.connect(admin_url, autocommit=True) as admin:
                admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        migrate(
            url, flavour="timescale" if flavour == "timescale" else "plain"
        )  # a kept one: brought up to date
        if not keep:
            took = _timed(lambda: _load(url, now, elders, days, flavour))
            print(f"loaded {elders * days * 1440:,} readings in {took:.0f} s")
        with psycopg.connect(url, autocommit=True) as conn:
            flavour = _one_row(conn, "SELECT value FROM store_info WHERE key = 'flavour'")[0]
            total, size, jit, n_elders = _one_row(
                conn,
                "SELECT (SELECT count(*) FROM observations),"
                " pg_size_pretty(pg_database_size(current_database())), current_setting('jit'),"
                " (SELECT count(DISTINCT elder_id) FROM observations_1d)",
            )
            parts = _one_row(conn, _PARTS[flavour])[0]
            print(f"database {name} ({flavour}): {total:,} readings, {parts} partitions, {size}, jit={jit}")
            _live(conn, now, n_elders, flavour)
            rng = random.Random(1)
            elders_asked = [f"e{rng.randrange(n_elders):05d}" for _ in range(runs)]
            for label, span, width in CHARTS:
                _chart(conn, label, elders_asked, now - span, now + timedelta(minutes=1), width)
            _refresh(conn, flavour)  # the live readings: a clean start for the timed refresh
            late_elder = f"e{n_elders - 1:05d}"
            late = _buffered_upload(conn, now, late_elder, flavour)
            print(
                f"buffered upload of {late:,} readings (3-20 days old) for {late_elder}; before the refresh:"
            )
            for label, span, width in CHARTS:
                _chart(conn, label, [late_elder] * runs, now - span, now + timedelta(minutes=1), width)
            took = _timed(lambda: _refresh(conn, flavour, now - timedelta(days=21), now))
            print(f"refresh after the buffered upload: {took:.2f} s")
    finally:
        if keep is None:
            with psycopg.connect(admin_url, autocommit=True) as admin:
                admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def _chart(
    conn: psycopg.Connection, label: str, elders: list[str], start: datetime, end: datetime, width: timedelta
) -> None:
    times = []
    for elder in elders:
        t0 = time.perf_counter()
        series = bucketed_series(conn, elder, METRIC, start, end, width)
        times.append((time.perf_counter() - t0) * 1000)
        assert series, (elder, label)
    times.sort()
    print(
        f"chart {label:14} median {statistics.median(times):7.1f} ms"
        f"  p95 {times[int(0.95 * (len(times) - 1))]:7.1f} ms  ({len(series)} buckets)"
    )


def _refresh(
    conn: psycopg.Connection, flavour: str, start: datetime | None = None, end: datetime | None = None
) -> None:
    if flavour == "plain":
        refresh_rollups(conn)
    else:
        refresh_aggregates(conn, start, end)


def _load(url: str, now: datetime, elders: int, days: int, flavour: str) -> None:
    start = now - timedelta(days=days)
    with psycopg.connect(url, autocommit=True) as conn:
        if flavour == "plain":
            create_partitions(conn, now, buffer_horizon_days=days + 7)
        indexes = conn.execute(
            "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'observations'"
        ).fetchall()
        for index, _ in indexes:
            conn.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(index)))
        if flavour == "plain":
            # The trigger would see the whole load at once: the rollups are filled below.
            conn.execute("ALTER TABLE observations DISABLE TRIGGER USER")
        conn.execute("SET max_parallel_workers_per_gather = 2")
        conn.execute(
            "INSERT INTO observations (time, device_id, elder_id, metric, value)"
            " SELECT t, 'w-' || e, e, %(metric)s, 60 + (extract(epoch FROM t)::bigint %% 41)"
            " FROM generate_series(0, %(elders)s - 1) AS g(i),"
            " LATERAL (SELECT lpad(i::text, 5, '0')) AS x(n),"
            " LATERAL (SELECT 'e' || x.n) AS y(e),"
            " generate_series(%(start)s::timestamptz, %(end)s::timestamptz, '1 minute') AS t",
            {"metric": METRIC, "elders": elders, "start": start, "end": now - timedelta(minutes=1)},
        )
        for _, definition in indexes:
            # pg_indexes shows a partitioned table's index as "ON ONLY", which would build none
            # of the partitions' indexes.
            conn.execute(definition.replace(" ON ONLY ", " ON "))
        if flavour == "timescale":
            refresh_aggregates(conn)
            conn.execute("VACUUM ANALYZE")
            return
        conn.execute("ALTER TABLE observations ENABLE TRIGGER USER")
        for rollup, source, width in (
            ("observations_1m", "observations", "1 minute"),
            ("observations_1h", "observations_1m", "1 hour"),
            ("observations_1d", "observations_1h", "1 day"),
        ):
            raw = source == "observations"
            conn.execute(
                sql.SQL(
                    "INSERT INTO {} (bucket, elder_id, metric, min, max, sum, count)"
                    " SELECT date_bin({}::interval, {}, '2000-01-01 00:00 UTC'), elder_id, metric,"
                    " min({}), max({}), sum({}), {} FROM {} GROUP BY 1, 2, 3"
                ).format(
                    sql.Identifier(rollup),
                    sql.Literal(width),
                    sql.Identifier("time" if raw else "bucket"),
                    *(sql.Identifier("value" if raw else c) for c in ("min", "max", "sum")),
                    sql.SQL("count(*)" if raw else "sum(count)::bigint"),
                    sql.Identifier(source),
                )
            )
        for marks in _MARK_TABLES:
            if conn.execute("SELECT to_regclass(%s)", (marks,)).fetchone() != (None,):
                conn.execute(sql.SQL("DELETE FROM {}").format(sql.Identifier(marks)))
        conn.execute("VACUUM ANALYZE")


def _write(conn: psycopg.Connection, rows: list[tuple[datetime, str, str, float]], flavour: str) -> None:
    """Store readings as the ingest writer does: COPY, then (plain) mark the UTC days touched."""
    with conn.transaction(), conn.cursor() as cur:
        with cur.copy("COPY observations (time, device_id, elder_id, metric, value) FROM STDIN") as cp:
            for t, elder, metric, value in rows:
                cp.write_row((t, f"w-{elder[1:]}", elder, metric, value))
        if flavour == "plain":
            cur.execute(
                "INSERT INTO rollup_dirty (day) SELECT unnest(%s::date[]) ON CONFLICT DO NOTHING",
                (sorted({r[0].date() for r in rows}),),
            )


def _live(conn: psycopg.Connection, now: datetime, elders: int, flavour: str) -> None:
    _write(conn, [(now, f"e{i:05d}", METRIC, 70.0) for i in range(elders)], flavour)


def _buffered_upload(conn: psycopg.Connection, now: datetime, elder: str, flavour: str) -> int:
    start, end = now - timedelta(days=20), now - timedelta(days=3)
    rows = []
    t = start + timedelta(seconds=20)
    while t < end:
        rows.append((t, elder, METRIC, 72.0))
        t += timedelta(seconds=20)
    for i in range(0, len(rows), 700):  # 700 samples per upload message
        _write(conn, rows[i : i + 700], flavour)
    return len(rows)


def _one_row(conn: psycopg.Connection, query: str) -> tuple[Any, ...]:
    row = conn.execute(query).fetchone()
    assert row is not None
    return row


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()

"""Bucketed series: the same exact answers as a brute-force computation, on both flavours.

Values are multiples of 0.25, so every sum is exact in floating point whatever the order of
addition: rollup sums of sums and raw sums must then agree to the last bit.
"""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from psycopg import sql

from eldercare.gateway.store.maintenance import partition_name, run_maintenance
from eldercare.gateway.store.series import (
    Bucket,
    abucketed_series,
    bucket_floor,
    bucket_width,
    bucketed_series,
)
from eldercare.gateway.store.timescale import refresh_aggregates

DAY0 = datetime(2031, 3, 3, tzinfo=UTC)  # first day of the data (partitions made around it)
DAYS = 4
ELDERS = ("e1", "e2", "e3")
METRICS = ("heart_rate", "spo2")
BUCKETS: tuple[str | timedelta, ...] = (
    "1m",
    "1h",
    "1d",
    timedelta(minutes=15),  # from 1 min rollups
    timedelta(hours=6),  # from 1 h rollups
    timedelta(days=7),  # from 1 d rollups
    timedelta(seconds=37),  # no rollup divides it: raw rows only
)

Row = tuple[datetime, str | None, str, float]


def _random_rows(rng: random.Random, n: int, start: datetime, span: timedelta) -> list[Row]:
    rows = []
    for _ in range(n):
        t = start + timedelta(microseconds=rng.randrange(int(span.total_seconds() * 1e6)))
        elder = rng.choice((*ELDERS, None))  # some rows of devices not assigned to anyone
        rows.append((t, elder, rng.choice(METRICS), rng.randrange(0, 800) / 4))
    # Several rows in one bucket, and rows exactly on bucket boundaries.
    for i in range(40):
        t = start + timedelta(hours=rng.randrange(int(span.total_seconds() // 3600)))
        rows.append((t, ELDERS[i % 3], METRICS[i % 2], rng.randrange(0, 800) / 4))
        rows.append((t + timedelta(seconds=5), ELDERS[i % 3], METRICS[i % 2], 1.25))
    return rows


def _write(url: str, rows: Sequence[Row], flavour: str) -> None:
    """Store rows as the ingest writer does: COPY, then mark the UTC days touched (plain)."""
    with psycopg.connect(url) as conn, conn.cursor() as cur:
        with cur.copy("COPY observations (time, device_id, elder_id, metric, value) FROM STDIN") as cp:
            for t, elder, metric, value in rows:
                cp.write_row((t, f"dev-{elder}", elder, metric, value))
        if flavour == "plain":
            cur.execute(
                "INSERT INTO rollup_dirty (day) SELECT unnest(%s::date[]) ON CONFLICT DO NOTHING",
                (sorted({r[0].astimezone(UTC).date() for r in rows}),),
            )


def _settle(url: str, flavour: str) -> None:
    """Let the rollups catch up: the maintenance job (plain) or a refresh of the aggregates."""
    if flavour == "plain":
        report = run_maintenance(url, now=DAY0 + timedelta(days=DAYS))
        assert report.hours_refreshed
        return
    with psycopg.connect(url, autocommit=True) as conn:
        refresh_aggregates(conn)


def _brute_force(
    rows: Sequence[Row], elder: str, metric: str, start: datetime, end: datetime, bucket: str | timedelta
) -> list[Bucket]:
    width = bucket_width(bucket)
    groups: dict[datetime, list[float]] = defaultdict(list)
    for t, e, m, value in rows:
        if e == elder and m == metric and start <= t < end:
            groups[bucket_floor(t, width)].append(value)
    return [
        Bucket(start=b, min=min(v), max=max(v), avg=sum(v) / len(v), count=len(v))
        for b, v in sorted(groups.items())
    ]


def _ranges(rng: random.Random) -> list[tuple[datetime, datetime]]:
    """Aligned and unaligned ranges over the data, plus a few degenerate ones."""
    span = timedelta(days=DAYS)
    out = [
        (DAY0 - timedelta(days=1), DAY0 + span + timedelta(days=1)),  # everything, day-aligned
        (DAY0 + timedelta(days=1), DAY0 + timedelta(days=2)),  # exactly one day
        (DAY0 + timedelta(hours=5, minutes=30), DAY0 + timedelta(hours=5, minutes=45)),  # inside 1h
    ]
    for _ in range(3):
        a = DAY0 + timedelta(
            seconds=rng.randrange(int(span.total_seconds())), microseconds=rng.randrange(10**6)
        )
        b = a + timedelta(seconds=rng.randrange(1, int(span.total_seconds())))
        out.append((a, b))
    return out


def _check_all(url: str, rows: Sequence[Row], rng: random.Random) -> int:
    compared = 0
    with psycopg.connect(url) as conn:
        for elder in ELDERS[:2]:
            for metric in METRICS:
                for start, end in _ranges(rng):
                    for bucket in BUCKETS:
                        got = bucketed_series(conn, elder, metric, start, end, bucket)
                        want = _brute_force(rows, elder, metric, start, end, bucket)
                        assert got == want, (elder, metric, start, end, bucket)
                        compared += len(want)
    return compared


def test_series_equal_a_brute_force_computation_before_and_after_refresh_and_late_data(
    store_db: tuple[str, str],
) -> None:
    flavour, url = store_db
    rng = random.Random(20311103)
    if flavour == "plain":
        run_maintenance(url, now=DAY0 + timedelta(days=DAYS))  # the weeks of the data

    rows = _random_rows(rng, 1500, DAY0, timedelta(days=DAYS))
    _write(url, rows, flavour)
    assert _check_all(url, rows, rng) > 0  # every day dirty: all from raw rows

    _settle(url, flavour)
    if flavour == "plain":
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT count(*) FROM rollup_dirty_hours").fetchone() == (0,)
    assert _check_all(url, rows, rng) > 0  # all from rollups, edges from raw rows

    # Late rows into days already refreshed (and one new day): dirty again, still exact.
    late = _random_rows(rng, 200, DAY0 + timedelta(days=1), timedelta(days=1))
    late += _random_rows(rng, 50, DAY0 + timedelta(days=DAYS), timedelta(hours=3))
    _write(url, late, flavour)
    assert _check_all(url, rows + late, rng) > 0  # before any refresh sees them

    _settle(url, flavour)
    assert _check_all(url, rows + late, rng) > 0


def test_clean_hours_are_answered_from_the_rollups_and_marked_ones_from_raw_rows(plain_db: str) -> None:
    run_maintenance(plain_db, now=DAY0)
    t = DAY0 + timedelta(hours=10, minutes=3)
    _write(plain_db, [(t, "e1", "heart_rate", 60.0), (t, "e1", "heart_rate", 80.0)], "plain")
    run_maintenance(plain_db, now=DAY0)
    day = (DAY0, DAY0 + timedelta(days=1))
    with psycopg.connect(plain_db) as conn:
        # Rows vanishing behind the job's back (straight from the partition: no trigger, no
        # mark) do not change clean buckets...
        conn.execute(sql.SQL("DELETE FROM {}").format(sql.Identifier(partition_name("observations", DAY0))))
        conn.commit()
        series = bucketed_series(conn, "e1", "heart_rate", *day, "1h")
        assert series == [Bucket(DAY0 + timedelta(hours=10), 60.0, 80.0, 70.0, 2)]
        # ...but a mark of that elder, metric and hour sends the hour to raw rows.
        conn.execute(
            "INSERT INTO rollup_dirty_hours (elder_id, metric, hour) VALUES ('e1', 'heart_rate', %s)",
            (DAY0 + timedelta(hours=10),),
        )
        assert bucketed_series(conn, "e1", "heart_rate", *day, "1h") == []
        conn.rollback()  # the mark only
        # A delete through observations marks the hours it touched by itself.
        _write(plain_db, [(t, "e1", "heart_rate", 60.0)], "plain")
        run_maintenance(plain_db, now=DAY0)
        assert bucketed_series(conn, "e1", "heart_rate", *day, "1h") == [
            Bucket(DAY0 + timedelta(hours=10), 60.0, 60.0, 60.0, 1)
        ]
        conn.execute("DELETE FROM observations WHERE elder_id = 'e1'")
        assert bucketed_series(conn, "e1", "heart_rate", *day, "1h") == []


def test_empty_and_reversed_ranges_give_no_buckets(plain_db: str) -> None:
    with psycopg.connect(plain_db) as conn:
        assert bucketed_series(conn, "e1", "heart_rate", DAY0, DAY0, "1h") == []
        assert bucketed_series(conn, "e1", "heart_rate", DAY0, DAY0 - timedelta(hours=1), "1h") == []


@pytest.mark.parametrize(
    ("start", "bucket", "message"),
    [
        (datetime(2031, 1, 1), "1h", "timezone-aware"),
        (DAY0, "5m", "bucket must be"),
        (DAY0, timedelta(0), "positive"),
    ],
)
def test_bad_arguments_are_refused(
    plain_db: str, start: datetime, bucket: str | timedelta, message: str
) -> None:
    with psycopg.connect(plain_db) as conn, pytest.raises(ValueError, match=message):
        bucketed_series(conn, "e1", "heart_rate", start, DAY0 + timedelta(days=1), bucket)


def test_the_async_variant_gives_the_same_answer(plain_db: str) -> None:
    run_maintenance(plain_db, now=DAY0)
    rows: list[Row] = [(DAY0 + timedelta(minutes=m), "e1", "heart_rate", 60.0 + m) for m in range(90)]
    _write(plain_db, rows, "plain")
    start, end = DAY0 + timedelta(minutes=10), DAY0 + timedelta(minutes=75)

    async def fetch() -> list[Bucket]:
        async with await psycopg.AsyncConnection.connect(plain_db) as conn:
            return await abucketed_series(conn, "e1", "heart_rate", start, end, "1h")

    assert asyncio.run(fetch()) == _brute_force(rows, "e1", "heart_rate", start, end, "1h")

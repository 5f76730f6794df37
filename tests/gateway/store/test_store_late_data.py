"""Late data: buffered uploads of 3-20 day old samples, answered exactly on both flavours.

The rollups (tables on plain PostgreSQL, real-time continuous aggregates on TimescaleDB) are
fully materialised first; the upload then lands in buckets they already hold. The rollups alone
are behind until the next refresh; the series must not be.
"""

from __future__ import annotations

import random
import threading
from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from eldercare.gateway.store.maintenance import run_maintenance
from eldercare.gateway.store.series import Bucket, bucket_floor, bucket_width, bucketed_series
from eldercare.gateway.store.timescale import AGGREGATES, refresh_aggregates, resume_refresh_policies

Row = tuple[datetime, str, str, float]
#: Real time: TimescaleDB's policies (compression after 7 days, refresh windows) follow the clock.
NOW = datetime.now(UTC).replace(second=0, microsecond=0)
START = bucket_floor(NOW - timedelta(days=25), timedelta(days=1))
WIDTHS = ("1h", "1d", timedelta(minutes=5), timedelta(minutes=15), timedelta(hours=6))


def _write(url: str, rows: Sequence[Row]) -> None:
    """COPY rows in as the ingest writer does, 700 samples per transaction."""
    with psycopg.connect(url) as conn:
        for i in range(0, len(rows), 700):
            with (
                conn.transaction(),
                conn.cursor() as cur,
                cur.copy("COPY observations (time, device_id, elder_id, metric, value) FROM STDIN") as cp,
            ):
                for t, elder, metric, value in rows[i : i + 700]:
                    cp.write_row((t, f"dev-{elder}", elder, metric, value))


def _settle(url: str, flavour: str) -> None:
    if flavour == "plain":
        run_maintenance(url, now=NOW)
        return
    with psycopg.connect(url, autocommit=True) as conn:
        refresh_aggregates(conn)


def _brute_force(
    rows: Sequence[Row], elder: str, start: datetime, end: datetime, bucket: object
) -> list[Bucket]:
    width = bucket_width(bucket)  # type: ignore[arg-type]
    groups: dict[datetime, list[float]] = defaultdict(list)
    for t, e, _, value in rows:
        if e == elder and start <= t < end:
            groups[bucket_floor(t, width)].append(value)
    return [
        Bucket(start=b, min=min(v), max=max(v), avg=sum(v) / len(v), count=len(v))
        for b, v in sorted(groups.items())
    ]


def _same(got: list[Bucket], want: list[Bucket]) -> None:
    """Equal bucket by bucket; averages within 1e-9 relative (summation order differs)."""
    assert [(b.start, b.min, b.max, b.count) for b in got] == [(b.start, b.min, b.max, b.count) for b in want]
    for g, w in zip(got, want, strict=True):
        assert g.avg == pytest.approx(w.avg, rel=1e-9), g.start


def test_a_buffered_upload_into_materialised_days_is_answered_exactly(store_db: tuple[str, str]) -> None:
    flavour, url = store_db
    rng = random.Random(720900)
    if flavour == "plain":
        run_maintenance(url, now=NOW, buffer_horizon_days=40)  # partitions for the weeks
    # Two elders, every 2 minutes for 25 days: 720 readings a day each.
    live = [
        (START + timedelta(minutes=2 * i), elder, "heart_rate", rng.uniform(40, 180))
        for elder in ("e1", "e2")
        for i in range(25 * 720)
    ]
    _write(url, live)
    _settle(url, flavour)
    # e1's second device uploads what it buffered 3-20 days ago: 180 more readings a day.
    late_from = bucket_floor(NOW - timedelta(days=20), timedelta(days=1))
    late_to = bucket_floor(NOW - timedelta(days=3), timedelta(days=1))
    late = [
        (late_from + timedelta(minutes=8 * i, seconds=17), "e1", "heart_rate", rng.uniform(40, 180))
        for i in range((late_to - late_from) // timedelta(minutes=8))
    ]
    rng.shuffle(late)
    _write(url, late)
    rows = live + late

    with psycopg.connect(url) as conn:
        # The rollup alone is behind: one day of e1 that the upload touched.
        day = late_from + timedelta(days=5)
        count = conn.execute(
            "SELECT count FROM observations_1d"
            " WHERE elder_id = 'e1' AND metric = 'heart_rate' AND bucket = %s",
            (day,),
        ).fetchone()
        assert count == (720,)
        # The series is not.
        series = bucketed_series(conn, "e1", "heart_rate", day, day + timedelta(days=1), "1d")
        assert [b.count for b in series] == [900]
        for elder in ("e1", "e2"):
            for width in WIDTHS:
                for start, end in ((START, NOW), (late_from + timedelta(hours=5, minutes=3), late_to)):
                    got = bucketed_series(conn, elder, "heart_rate", start, end, width)
                    _same(got, _brute_force(rows, elder, start, end, width))

    _settle(url, flavour)
    with psycopg.connect(url) as conn:
        for width in WIDTHS:
            _same(
                bucketed_series(conn, "e1", "heart_rate", START, NOW, width),
                _brute_force(rows, "e1", START, NOW, width),
            )


@pytest.mark.timescale
def test_refreshes_by_hand_at_once_neither_fail_nor_leave_policies_paused(store_db: tuple[str, str]) -> None:
    flavour, url = store_db
    if flavour != "timescale":
        pytest.skip("TimescaleDB only")
    _write(url, [(NOW - timedelta(days=2, minutes=i), "e1", "heart_rate", 60.0) for i in range(600)])
    errors: list[BaseException] = []

    def refresh() -> None:
        try:
            with psycopg.connect(url, autocommit=True) as conn:
                refresh_aggregates(conn, NOW - timedelta(days=3), NOW)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=refresh) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    with psycopg.connect(url, autocommit=True) as conn:
        scheduled = conn.execute(
            "SELECT count(*) FILTER (WHERE scheduled), count(*) FROM timescaledb_information.jobs"
            " WHERE proc_name = 'policy_refresh_continuous_aggregate'"
        ).fetchone()
        assert scheduled == (len(AGGREGATES), len(AGGREGATES))
        failed = conn.execute(
            "SELECT count(*) FROM timescaledb_information.job_errors"
            " WHERE err_message LIKE '%%concurrent refresh%%'"
        ).fetchone()
        assert failed == (0,)
        # A refresh that died with its jobs paused: the next maintenance run resumes them.
        job = conn.execute(
            "SELECT min(job_id) FROM timescaledb_information.jobs"
            " WHERE proc_name = 'policy_refresh_continuous_aggregate'"
        ).fetchone()
        assert job is not None
        conn.execute("SELECT alter_job(%s, scheduled => false)", (job[0],))
        conn.autocommit = False
        assert resume_refresh_policies(conn) == [job[0]]
        conn.commit()
        assert run_maintenance(url, now=NOW).refresh_policies_resumed == []

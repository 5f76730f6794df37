"""The maintenance job: partitions ahead, DEFAULT rows moved, retention, rollup refresh races."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta

import psycopg
import pytest

from eldercare.gateway.store.maintenance import (
    MaintenanceReport,
    partition_name,
    refresh_rollups,
    run_maintenance,
    week_start,
)
from eldercare.gateway.store.receipts import partition_name as receipt_partition

NOW = datetime(2031, 6, 11, 15, 30, tzinfo=UTC)  # a Wednesday, far from the real clock


def _where(conn: psycopg.Connection, table: str) -> dict[datetime, str]:
    rows = conn.execute(f"SELECT time, tableoid::regclass::text FROM {table}").fetchall()
    return {r[0]: r[1] for r in rows}


def _partitions(conn: psycopg.Connection, table: str) -> set[str]:
    rows = conn.execute(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " WHERE i.inhparent = %s::regclass",
        (table,),
    ).fetchall()
    return {r[0] for r in rows}


def _observe(conn: psycopg.Connection, t: datetime, value: float = 1.0, elder: str = "e1") -> None:
    """Insert a reading; the trigger on observations marks its hour for the rollups."""
    conn.execute(
        "INSERT INTO observations (time, device_id, elder_id, metric, value) VALUES (%s, 'd1', %s,"
        " 'heart_rate', %s)",
        (t, elder, value),
    )


def _refresh(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        return refresh_rollups(conn)


def _midweek() -> datetime:
    """Noon on Wednesday of the current week: a partition exists, and t + 1 s is the same day."""
    return week_start(datetime.now(UTC)) + timedelta(days=2, hours=12)


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_weekly_partitions_are_created_ahead_and_rows_waiting_in_default_are_moved(
    plain_db: str,
) -> None:
    soon, later, far = NOW - timedelta(days=1), NOW + timedelta(weeks=6), NOW + timedelta(weeks=30)
    with psycopg.connect(plain_db) as conn:
        for t in (soon, later, far):
            _observe(conn, t)
        conn.execute(
            "INSERT INTO device_events (time, device_id, elder_id, kind) VALUES (%s, 'd1', 'e1', 'sos')",
            (soon,),
        )
        conn.commit()
        assert set(_where(conn, "observations").values()) == {"observations_default"}

    report = run_maintenance(plain_db, now=NOW)

    first, last = week_start(NOW - timedelta(days=30)), week_start(NOW + timedelta(weeks=8))
    weeks = [first + timedelta(weeks=i) for i in range((last - first).days // 7 + 1)]
    expected = {partition_name(t, w) for t in ("observations", "device_events") for w in weeks}
    assert set(report.partitions_created) == expected
    assert report.rows_moved == 3  # two observations and one event
    with psycopg.connect(plain_db) as conn:
        assert expected <= _partitions(conn, "observations") | _partitions(conn, "device_events")
        where = _where(conn, "observations")
        assert where[soon] == partition_name("observations", week_start(soon))
        assert where[later] == partition_name("observations", week_start(later))
        assert where[far] == "observations_default"  # beyond the 8 weeks ahead: stays put
        assert set(_where(conn, "device_events").values()) == {
            partition_name("device_events", week_start(soon))
        }

    again = run_maintenance(plain_db, now=NOW)
    assert again.partitions_created == [] and again.rows_moved == 0


def test_two_maintenance_runs_at_once_both_succeed_and_create_each_partition_once(
    plain_db: str,
) -> None:
    barrier = threading.Barrier(2)
    reports: list[MaintenanceReport] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            barrier.wait(timeout=10)
            reports.append(run_maintenance(plain_db, now=NOW))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors, errors
    created = [name for r in reports for name in r.partitions_created]
    assert len(created) == len(set(created)) > 0
    assert sorted(len(r.partitions_created) == 0 for r in reports) == [False, True]


def test_retention_drops_whole_old_weeks_with_their_rollups_and_old_dead_letters(
    plain_db: str,
) -> None:
    then = NOW - timedelta(days=740)
    run_maintenance(plain_db, now=then)  # partitions around `then`
    old, kept = then - timedelta(days=1), then + timedelta(days=20)
    with psycopg.connect(plain_db) as conn:
        _observe(conn, old)
        _observe(conn, kept)
        conn.execute(
            "INSERT INTO device_events (time, device_id, elder_id, kind) VALUES (%s, 'd1', 'e1', 'sos')",
            (old,),
        )
        for age_days, msg in ((91, "old"), (89, "recent")):
            conn.execute(
                "INSERT INTO dead_letters (received_at, topic, reason, detail, payload_size)"
                " VALUES (%s, 't', 'bad_json', %s, 0)",
                (NOW - timedelta(days=age_days), msg),
            )
        for age_days, msg in ((32, "old"), (30, "recent")):  # no partitions in 2031 yet: DEFAULT
            t = NOW - timedelta(days=age_days)
            conn.execute(
                "INSERT INTO message_receipts (device_id, msg_id, day, received_at)"
                " VALUES ('d1', %s, %s, %s)",
                (msg, t.date(), t),
            )
        conn.commit()
    run_maintenance(plain_db, now=then)  # rollups of `old` and `kept`

    report = run_maintenance(
        plain_db,
        now=NOW,
        retention_observations_days=730,
        retention_dead_letters_days=90,
        buffer_horizon_days=30,
    )

    cutoff = NOW - timedelta(days=730)
    assert partition_name("observations", week_start(old)) in report.partitions_dropped
    assert partition_name("device_events", week_start(old)) in report.partitions_dropped
    assert partition_name("observations", week_start(cutoff)) not in report.partitions_dropped
    assert report.dead_letters_deleted == 1 and report.receipts_deleted == 1
    with psycopg.connect(plain_db) as conn:
        assert list(_where(conn, "observations")) == [kept]
        assert conn.execute("SELECT count(*) FROM device_events").fetchone() == (0,)
        buckets = conn.execute("SELECT bucket FROM observations_1d ORDER BY bucket").fetchall()
        assert buckets == [(datetime.combine(kept.date(), datetime.min.time(), tzinfo=UTC),)]
        assert conn.execute("SELECT detail FROM dead_letters").fetchall() == [("recent",)]
        assert conn.execute("SELECT msg_id FROM message_receipts").fetchall() == [("recent",)]


def test_refresh_waits_for_a_writer_whose_dirty_mark_is_not_committed(plain_db: str) -> None:
    t = _midweek()
    with psycopg.connect(plain_db) as conn:
        _observe(conn, t, value=10.0)  # an earlier batch: the mark already exists
        conn.commit()
    writer = psycopg.connect(plain_db)
    try:
        # This batch hits the existing mark: ON CONFLICT DO NOTHING takes no row lock.
        _observe(writer, t + timedelta(seconds=1), value=30.0)
        done: list[list[date]] = []
        refresher = threading.Thread(target=lambda: done.append(_refresh(plain_db)))
        refresher.start()
        with psycopg.connect(plain_db, autocommit=True) as watch:
            _wait_for(
                lambda: (
                    watch.execute(
                        "SELECT count(*) FROM pg_locks WHERE NOT granted"
                        " AND relation = 'rollup_dirty_hours'::regclass"
                        " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
                    ).fetchone()
                    == (1,)
                ),
                "the refresh to wait for the writer",
            )
        writer.commit()
        refresher.join(timeout=10)
    finally:
        writer.close()
    assert done == [1]  # one (elder, metric, hour)
    with psycopg.connect(plain_db) as conn:
        row = conn.execute("SELECT count, sum FROM observations_1d WHERE elder_id = 'e1'").fetchone()
        assert row == (2, 40.0)  # the writer's row made it into the rollup
        assert conn.execute("SELECT count(*) FROM rollup_dirty_hours").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM rollup_pending_hours").fetchone() == (0,)


def test_rows_committed_after_the_refresh_claimed_their_hour_keep_it_marked(plain_db: str) -> None:
    t = _midweek()
    with psycopg.connect(plain_db) as conn:
        _observe(conn, t, value=10.0)
        conn.commit()
        assert _refresh(plain_db) == 1
        _observe(conn, t + timedelta(seconds=1), value=30.0)
        conn.commit()
        hour = t.replace(minute=0, second=0, microsecond=0)
        assert conn.execute("SELECT elder_id, metric, hour FROM rollup_dirty_hours").fetchall() == [
            ("e1", "heart_rate", hour)
        ]
        assert _refresh(plain_db) == 1
        assert conn.execute("SELECT count, sum FROM observations_1h").fetchall() == [(2, 40.0)]


def test_refresh_recomputes_only_the_hours_that_changed(plain_db: str) -> None:
    """A buffered upload of one elder touches its hours, not the days of every elder."""
    t = _midweek() - timedelta(days=2)
    with psycopg.connect(plain_db) as conn:
        for elder in ("e1", "e2"):
            for minutes in range(0, 48 * 60, 30):
                _observe(conn, t + timedelta(minutes=minutes), value=2.0, elder=elder)
        conn.commit()
        assert _refresh(plain_db) == 2 * 48
        # Tamper with e2's rollups: a refresh that recomputed whole days would repair them.
        conn.execute("UPDATE observations_1h SET sum = -1 WHERE elder_id = 'e2'")
        conn.commit()
        late = t + timedelta(hours=5, minutes=10)
        _observe(conn, late, value=4.0)  # e1, late, into an already refreshed hour
        conn.execute(
            "DELETE FROM observations WHERE elder_id = 'e1' AND time = %s", (t + timedelta(hours=30),)
        )
        conn.commit()
        assert _refresh(plain_db) == 2  # e1's two hours
        hours = dict(
            conn.execute("SELECT bucket, count FROM observations_1h WHERE elder_id = 'e1'").fetchall()
        )
        assert hours[t.replace(minute=0) + timedelta(hours=5)] == 3
        assert hours[t.replace(minute=0) + timedelta(hours=30)] == 1
        assert conn.execute(
            "SELECT sum(count), sum(sum) FROM observations_1d WHERE elder_id = 'e1'"
        ).fetchone() == (96, 194.0)
        assert conn.execute("SELECT DISTINCT sum FROM observations_1h WHERE elder_id = 'e2'").fetchall() == [
            (-1.0,)
        ]


def test_maintenance_cleans_dead_letters_and_receipts_on_both_flavours(
    store_db: tuple[str, str],
) -> None:
    flavour, url = store_db
    now = datetime.now(UTC)
    with psycopg.connect(url) as conn:
        conn.execute(
            "INSERT INTO dead_letters (received_at, topic, reason, detail, payload_size)"
            " VALUES (%s, 't', 'bad_json', 'old', 0), (%s, 't', 'bad_json', 'new', 0)",
            (now - timedelta(days=11), now - timedelta(days=9)),
        )
        old, new = now - timedelta(days=7), now - timedelta(days=5)
        conn.execute(
            "INSERT INTO message_receipts (device_id, msg_id, day, received_at)"
            " VALUES ('d1', 'old', %s, %s), ('d1', 'new', %s, %s)",
            (old.date(), old, new.date(), new),
        )
        conn.commit()
    report = run_maintenance(
        url,
        now=now,
        retention_dead_letters_days=10,
        buffer_horizon_days=5,
        retention_observations_days=400,
    )
    assert report.flavour == flavour
    # The old receipt went with its day's partition; none waited in the DEFAULT one.
    assert (report.dead_letters_deleted, report.receipts_deleted) == (1, 0)
    assert receipt_partition(old.date()) in report.receipt_partitions_dropped
    assert receipt_partition(new.date()) not in report.receipt_partitions_dropped
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT msg_id FROM message_receipts").fetchall() == [("new",)]
    if flavour == "timescale":
        assert set(report.retention_policies_set) == {
            "observations",
            "device_events",
            "observations_1m",
            "observations_1h",
            "observations_1d",
        }
        assert run_maintenance(url, now=now, retention_observations_days=400).retention_policies_set == []


def test_maintenance_refuses_a_naive_now(plain_db: str) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        run_maintenance(plain_db, now=datetime(2031, 1, 1))

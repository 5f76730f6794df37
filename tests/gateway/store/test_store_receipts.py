"""Dedup receipts by day: the day a message's receipt belongs to, its partitions, retention."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from importlib import resources
from pathlib import Path

import psycopg

from eldercare.devices.records import CLOCK_SKEW, DeviceEvent, Interpretation, Reading, StatusUpdate
from eldercare.gateway.store import receipts
from eldercare.gateway.store.migrate import migrate

NOW = datetime(2031, 6, 11, 15, 30, tzinfo=UTC)  # far from the real clock: no partitions yet


def _reading(t: datetime, flags: list[str] | None = None) -> Reading:
    return Reading(t, "w-1", "e-1", "heart_rate", 70.0, flags or [])


def _where(conn: psycopg.Connection) -> dict[str, str]:
    rows = conn.execute("SELECT msg_id, tableoid::regclass::text FROM message_receipts").fetchall()
    return {r[0]: r[1] for r in rows}


def _receipt(conn: psycopg.Connection, msg_id: str, day: date) -> None:
    conn.execute(
        "INSERT INTO message_receipts (device_id, msg_id, day, received_at) VALUES ('w-1', %s, %s, %s)",
        (msg_id, day, NOW),
    )


def test_receipt_day_is_the_day_of_the_latest_time_the_message_carries() -> None:
    # A buffered upload over midnight: its newest sample decides, whatever the reception day.
    interp = Interpretation(source_id="w-1", msg_id="m1")
    interp.readings += [
        _reading(datetime(2031, 6, 3, 23, 59, tzinfo=UTC)),
        _reading(datetime(2031, 6, 4, 0, 1, tzinfo=UTC)),
    ]
    interp.readings.append(_reading(datetime(2031, 6, 2, 12, tzinfo=UTC)))
    assert receipts.receipt_day(interp, NOW) == date(2031, 6, 4)


def test_times_that_are_the_gateways_stamp_do_not_date_the_receipt() -> None:
    skewed = _reading(NOW, [CLOCK_SKEW])
    ack = DeviceEvent(NOW, "w-1", "e-1", "command_ack", {}, [])  # no ts: the receive time
    status = StatusUpdate("w-1", NOW, True)
    nothing_own = Interpretation(
        source_id="w-1", msg_id="m1", readings=[skewed], events=[ack], statuses=[status]
    )
    assert receipts.receipt_day(nothing_own, NOW) is None
    own = datetime(2031, 6, 9, 8, tzinfo=UTC)
    with_own = Interpretation(source_id="w-1", msg_id="m2", readings=[skewed, _reading(own)], events=[ack])
    assert receipts.receipt_day(with_own, NOW) == own.date()


def test_the_window_is_the_buffer_horizon_and_a_day() -> None:
    assert receipts.retention_start(NOW, 30) == date(2031, 5, 11)


def test_partitions_cover_the_window_and_take_the_rows_that_waited_in_default(plain_db: str) -> None:
    with psycopg.connect(plain_db) as conn:
        for msg_id, day in (("early", date(2031, 5, 12)), ("today", NOW.date()), ("far", date(2031, 9, 1))):
            _receipt(conn, msg_id, day)
        assert set(_where(conn).values()) == {"message_receipts_default"}
        conn.commit()

        created, moved = receipts.create_partitions(conn, NOW, buffer_horizon_days=30)
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE  # all committed

        assert created[0] == "message_receipts_p20310511" and created[-1] == "message_receipts_p20310614"
        assert len(created) == 35 and moved == 2
        assert _where(conn) == {
            "early": "message_receipts_p20310512",
            "today": "message_receipts_p20310611",
            "far": "message_receipts_default",  # beyond the days ahead: stays put
        }
        assert receipts.create_partitions(conn, NOW, buffer_horizon_days=30) == ([], 0)


def test_days_past_the_window_are_dropped_whole_and_the_rest_kept(plain_db: str) -> None:
    with psycopg.connect(plain_db) as conn:
        receipts.create_partitions(conn, NOW - timedelta(days=3), buffer_horizon_days=30)
        _receipt(conn, "gone", date(2031, 5, 9))
        _receipt(conn, "kept", date(2031, 5, 11))
        conn.commit()

        dropped = receipts.drop_expired(conn, NOW, buffer_horizon_days=30)
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE  # all committed

        # Every day before 2031-05-11 goes, including those the migration made for the real clock.
        assert {
            "message_receipts_p20310508",
            "message_receipts_p20310509",
            "message_receipts_p20310510",
        } <= set(dropped)
        assert min(receipts.partitions(conn).values()) == date(2031, 5, 11)
        assert _where(conn) == {"kept": "message_receipts_p20310511"}


def test_the_upgrade_keeps_the_receipts_of_the_window_under_their_reception_day(
    fresh_db: str, tmp_path: Path
) -> None:
    packaged = resources.files("eldercare.gateway.store").joinpath("migrations")
    before = tmp_path / "migrations"
    before.mkdir()
    for entry in packaged.iterdir():
        if entry.name.endswith(".sql") and entry.name < "0005":
            (before / entry.name).write_text(entry.read_text(encoding="utf-8"), encoding="utf-8")
    migrate(fresh_db, flavour="plain", source=before)
    now = datetime.now(UTC)
    with psycopg.connect(fresh_db) as conn:
        conn.execute(
            "INSERT INTO message_receipts (device_id, msg_id, received_at) VALUES ('w-1', 'recent', %s),"
            " ('w-1', 'expired', %s)",
            (now - timedelta(days=2), now - timedelta(days=40)),
        )
        conn.commit()

    assert migrate(fresh_db, flavour="plain")[0] == "0005"

    with psycopg.connect(fresh_db) as conn:
        day = (now - timedelta(days=2)).date()
        assert _where(conn) == {"recent": receipts.partition_name(day)}
        assert conn.execute("SELECT day FROM message_receipts").fetchone() == (day,)
        fillfactor = conn.execute("SELECT reloptions FROM pg_class WHERE relname = 'devices'").fetchone()
        assert fillfactor == (["fillfactor=70"],)

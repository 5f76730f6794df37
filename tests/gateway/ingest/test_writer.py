"""The batch writer against a real PostgreSQL: dedup, dead letters, isolation, the rules seam."""

from __future__ import annotations

from datetime import UTC, datetime

import psycopg
import pytest

from eldercare.devices.records import (
    CLOCK_SKEW,
    OUT_OF_RANGE,
    UNKNOWN_DEVICE,
    UNKNOWN_METRIC,
    DeviceEvent,
    Interpretation,
    Reading,
    Rejection,
    StatusUpdate,
)
from eldercare.gateway.store.devices import add_device
from eldercare.gateway.store.writer import INTERNAL_ERROR, OVER_BUDGET, BatchWriter, Received, StoredBatch

NOW = 1_790_000_000.0  # 2026-09-21, a fixed receive time
T = datetime.fromtimestamp(NOW, UTC)


def telemetry(device: str, msg_id: str, values: dict[str, float], flags: list[str] | None = None) -> Received:
    interp = Interpretation(source_id=device, msg_id=msg_id, seen_devices=[device])
    for metric, value in values.items():
        interp.readings.append(Reading(T, device, "e-1", metric, value, list(flags or [])))
    return Received(f"eldercare/v1/devices/{device}/telemetry", b"{}", NOW, interp)


@pytest.fixture
def conn(db_url: str):
    with psycopg.connect(db_url) as conn:
        add_device(conn, "w-0001", "wristband", "e-1")
        add_device(conn, "w-0002", "wristband", "e-1")
        yield conn


def flavour(conn: psycopg.Connection) -> str:
    return conn.execute("SELECT value FROM store_info WHERE key = 'flavour'").fetchone()[0]


def count(conn: psycopg.Connection, sql: str) -> int:
    return conn.execute(sql).fetchone()[0]


def test_batch_stores_readings_once_and_counts_redeliveries(conn) -> None:
    writer = BatchWriter(flavour(conn))
    first = writer.write(conn, [telemetry("w-0001", "m1", {"heart_rate": 72, "spo2": 97})])
    again = writer.write(
        conn,
        [telemetry("w-0001", "m1", {"heart_rate": 72, "spo2": 97}), telemetry("w-0001", "m2", {"spo2": 96})],
    )
    assert (first.readings, first.duplicates) == (2, 0)
    assert (again.readings, again.duplicates) == (1, 1)
    assert count(conn, "SELECT count(*) FROM observations") == 3
    assert count(conn, "SELECT count(*) FROM message_receipts") == 2
    assert count(conn, "SELECT count FROM device_rejections WHERE reason = 'duplicate'") == 1
    assert count(conn, "SELECT count(*) FROM dead_letters") == 0  # counted, not stored twice


def test_same_msg_id_twice_in_one_batch_is_stored_once(conn) -> None:
    writer = BatchWriter(flavour(conn))
    result = writer.write(conn, [telemetry("w-0001", "m1", {"spo2": 97})] * 2)
    assert (result.readings, result.duplicates) == (1, 1)
    assert count(conn, "SELECT count(*) FROM observations") == 1


def test_same_msg_id_from_two_devices_is_two_messages(conn) -> None:
    writer = BatchWriter(flavour(conn))
    writer.write(conn, [telemetry("w-0001", "m1", {"spo2": 97}), telemetry("w-0002", "m1", {"spo2": 95})])
    assert count(conn, "SELECT count(*) FROM observations") == 2


def test_partial_message_keeps_valid_readings_and_dead_letters_the_rest(conn) -> None:
    msg = telemetry("w-0001", "m1", {"heart_rate": 72})
    msg.payload = b'{"msg_id":"m1","metrics":{"heart_rate":72,"spo2":300}}'
    msg.interp.rejections.append(Rejection(OUT_OF_RANGE, "spo2=300 outside 50-100", "w-0001"))
    BatchWriter(flavour(conn)).write(conn, [msg])
    assert count(conn, "SELECT count(*) FROM observations") == 1
    row = conn.execute(
        "SELECT device_id, msg_id, reason, detail, payload, payload_size FROM dead_letters"
    ).fetchone()
    assert row == ("w-0001", "m1", OUT_OF_RANGE, "spo2=300 outside 50-100", msg.payload, len(msg.payload))
    assert count(conn, "SELECT count FROM device_rejections WHERE reason = 'out_of_range'") == 1


def test_huge_payload_is_kept_truncated(conn) -> None:
    interp = Interpretation(source_id="w-0001")
    interp.rejections.append(Rejection("too_large", "70000 bytes > 65536", "w-0001"))
    payload = b"x" * 70_000
    BatchWriter(flavour(conn)).write(
        conn, [Received("eldercare/v1/devices/w-0001/telemetry", payload, NOW, interp)]
    )
    size, stored, truncated = conn.execute(
        "SELECT payload_size, length(payload), payload_truncated FROM dead_letters"
    ).fetchone()
    assert (size, stored, truncated) == (70_000, 65_536, True)


def rejected(topic: str, payload: bytes, *rejections: Rejection, at: float = NOW) -> Received:
    source = topic.split("/")[3]
    interp = Interpretation(source_id=source, msg_id="m1", rejections=list(rejections))
    return Received(topic, payload, at, interp)


HUB = "eldercare/v1/hubs/hub-0001/telemetry"


def test_a_hub_naming_4000_strangers_is_one_dead_letter_counted_against_the_hub(conn) -> None:
    add_device(conn, "hub-0001", "hub")
    named = [Rejection(UNKNOWN_DEVICE, f"device gh-{i} is not registered", f"gh-{i}") for i in range(100)]
    rest = Rejection(UNKNOWN_DEVICE, "device gh-100 is not registered (+3899 more)", "hub-0001", 3900)
    payload = b"x" * 56_000
    result = BatchWriter(flavour(conn)).write(conn, [rejected(HUB, payload, *named, rest)])
    assert result.rejected == {UNKNOWN_DEVICE: 4000}
    rows = conn.execute("SELECT device_id, reason, item_count, detail, payload FROM dead_letters").fetchall()
    assert len(rows) == 1
    device_id, reason, items, detail, stored = rows[0]
    assert (device_id, reason, items, bytes(stored)) == ("hub-0001", UNKNOWN_DEVICE, 4000, payload)
    assert detail.startswith("device gh-0 is not registered; device gh-1") and detail.endswith("(+3997 more)")
    counts = conn.execute("SELECT device_id, reason, count FROM device_rejections").fetchall()
    assert counts == [("hub-0001", UNKNOWN_DEVICE, 4000)]  # no row per id the hub made up


def test_a_message_refused_for_two_reasons_stores_its_payload_once(conn) -> None:
    msg = rejected(
        "eldercare/v1/devices/w-0001/telemetry",
        b'{"msg_id":"m1","metrics":{"spo2":300,"pulse":1}}',
        Rejection(OUT_OF_RANGE, "spo2=300 outside 50-100", "w-0001"),
        Rejection(UNKNOWN_METRIC, "'pulse'", "w-0001"),
    )
    BatchWriter(flavour(conn)).write(conn, [msg])
    rows = conn.execute(
        "SELECT reason, device_id, payload, payload_size, received_at, topic, msg_id"
        " FROM dead_letters ORDER BY id"
    ).fetchall()
    assert [(r[0], r[1], r[2]) for r in rows] == [
        (OUT_OF_RANGE, "w-0001", msg.payload),
        (UNKNOWN_METRIC, "w-0001", None),
    ]
    assert rows[0][3:] == rows[1][3:]  # the two rows of one message: same size, time, topic, msg_id


def test_sub_devices_of_a_hub_keep_their_own_counts_but_share_a_dead_letter(conn) -> None:
    add_device(conn, "hub-0001", "hub")
    msg = rejected(
        HUB,
        b"{}",
        Rejection(OUT_OF_RANGE, "spo2=300 outside 50-100", "w-0001"),
        Rejection(OUT_OF_RANGE, "spo2=20 outside 50-100", "w-0002"),
    )
    BatchWriter(flavour(conn)).write(conn, [msg])
    assert conn.execute("SELECT device_id, item_count, detail FROM dead_letters").fetchall() == [
        ("hub-0001", 2, "w-0001: spo2=300 outside 50-100; w-0002: spo2=20 outside 50-100")
    ]
    counts = conn.execute("SELECT device_id, count FROM device_rejections ORDER BY 1").fetchall()
    assert counts == [("w-0001", 1), ("w-0002", 1)]


def test_dead_letters_beyond_a_devices_budget_are_counted_not_stored(conn) -> None:
    writer = BatchWriter(flavour(conn), dead_letter_budget=100_000, dead_letter_window_s=3600)
    topic = "eldercare/v1/devices/w-0001/telemetry"

    def flood(at: float, n: int) -> None:
        for _ in range(n):  # one message a batch: the budget holds across batches
            writer.write(
                conn, [rejected(topic, b"x" * 30_000, Rejection("too_old", "ts 1970", "w-0001"), at=at)]
            )

    flood(NOW, 5)
    assert count(conn, "SELECT count(*) FROM dead_letters") == 3  # 3 x 30 KB fit in 100 KB
    other = rejected(
        "eldercare/v1/devices/w-0002/telemetry", b"y", Rejection("schema", "ts: missing", "w-0002")
    )
    writer.write(conn, [other])  # another device's budget is its own
    assert count(conn, "SELECT count(*) FROM dead_letters WHERE device_id = 'w-0002'") == 1
    counts = dict(conn.execute("SELECT reason, count FROM device_rejections WHERE device_id = 'w-0001'"))
    assert counts == {"too_old": 5, OVER_BUDGET: 2}  # every rejection counted, stored or not
    flood(NOW + 3600, 1)  # the next window: a fresh budget
    assert count(conn, "SELECT count(*) FROM dead_letters WHERE device_id = 'w-0001'") == 4


class ConnectionLostOnce:
    """A rule set whose first call fails as a lost connection would, at the end of a batch."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, cur: psycopg.Cursor, batch: StoredBatch) -> None:
        self.calls += 1
        if self.calls == 1:
            raise psycopg.OperationalError("connection lost")


def test_a_batch_that_does_not_commit_spends_no_budget(conn) -> None:
    writer = BatchWriter(flavour(conn), ConnectionLostOnce(), dead_letter_budget=50_000)
    big = rejected("eldercare/v1/devices/w-0001/telemetry", b"x" * 40_000, Rejection("too_old", "", "w-0001"))
    with pytest.raises(psycopg.OperationalError):
        writer.write(conn, [big])
    writer.write(conn, [big])  # the committer's retry of the same batch
    assert count(conn, "SELECT count(*) FROM dead_letters") == 1


def test_repeated_readings_of_a_message_count_as_duplicates(conn) -> None:
    msg = telemetry("w-0001", "m1", {"heart_rate": 72})
    msg.interp.repeated = 4
    result = BatchWriter(flavour(conn)).write(conn, [msg])
    assert (result.readings, result.repeated) == (1, 4)
    assert count(conn, "SELECT count FROM device_rejections WHERE reason = 'duplicate'") == 4
    assert count(conn, "SELECT count(*) FROM dead_letters") == 0


def test_status_updates_device_and_older_status_does_not_overwrite(conn) -> None:
    writer = BatchWriter(flavour(conn))
    newer = Interpretation(source_id="w-0001", statuses=[StatusUpdate("w-0001", T, False, 12.0, "2.1.0")])
    older = Interpretation(
        source_id="w-0001",
        statuses=[StatusUpdate("w-0001", datetime.fromtimestamp(NOW - 60, UTC), True, 80.0)],
    )
    topic = "eldercare/v1/devices/w-0001/status"
    writer.write(conn, [Received(topic, b"{}", NOW, newer)])
    writer.write(conn, [Received(topic, b"{}", NOW, older)])
    online, battery, firmware = conn.execute(
        "SELECT online, battery, firmware FROM devices WHERE device_id = 'w-0001'"
    ).fetchone()
    assert (online, battery, firmware) == (False, 12.0, "2.1.0")


def test_a_value_the_store_refuses_is_isolated_and_the_rest_stored(conn) -> None:
    bad = Interpretation(source_id="w-0001", msg_id="bad", seen_devices=["w-0001"])
    bad.events.append(DeviceEvent(T, "w-0001", "e-1", "fall_detected", {"note": "a\u0000b"}, []))
    batch = [
        telemetry("w-0001", "m1", {"spo2": 97}),
        Received("eldercare/v1/devices/w-0001/events", b'{"msg_id":"bad"}', NOW, bad),
        telemetry("w-0001", "m2", {"spo2": 96}),
    ]
    result = BatchWriter(flavour(conn)).write(conn, batch)
    assert result.isolated_failures == 1
    assert count(conn, "SELECT count(*) FROM observations") == 2
    assert conn.execute("SELECT msg_id, reason FROM dead_letters").fetchall() == [("bad", "schema")]


class RecordingRules:
    """A rule set that writes one decision per reading, and fails on request."""

    def __init__(self, fail_on_value: float | None = None) -> None:
        self.fail_on_value = fail_on_value
        self.seen: list[StoredBatch] = []

    def __call__(self, cur: psycopg.Cursor, batch: StoredBatch) -> None:
        self.seen.append(batch)
        for r in batch.readings:
            cur.execute(
                "INSERT INTO test_decisions (device_id, metric, value) VALUES (%s, %s, %s)",
                (r.device_id, r.metric, r.value),
            )
            if r.value == self.fail_on_value:
                raise RuntimeError("rule blew up")


@pytest.fixture
def decisions(conn):
    conn.execute("CREATE TABLE test_decisions (device_id text, metric text, value float8)")
    conn.commit()


def test_rule_decisions_commit_with_their_readings(conn, decisions) -> None:
    rules = RecordingRules()
    BatchWriter(flavour(conn), rules).write(conn, [telemetry("w-0001", "m1", {"heart_rate": 72, "spo2": 97})])
    assert count(conn, "SELECT count(*) FROM test_decisions") == 2
    assert count(conn, "SELECT count(*) FROM observations") == 2


def test_failing_rules_roll_back_readings_and_decisions_together(conn, decisions) -> None:
    rules = RecordingRules(fail_on_value=150)
    batch = [telemetry("w-0001", "m1", {"heart_rate": 72}), telemetry("w-0001", "m2", {"heart_rate": 150})]
    result = BatchWriter(flavour(conn), rules).write(conn, batch)
    # m1 is stored with its decision; m2's reading and its half-written decision are both gone.
    assert conn.execute("SELECT value FROM observations").fetchall() == [(72.0,)]
    assert conn.execute("SELECT value FROM test_decisions").fetchall() == [(72.0,)]
    assert conn.execute("SELECT msg_id, reason FROM dead_letters").fetchall() == [("m2", INTERNAL_ERROR)]
    assert result.isolated_failures == 1
    # m2 was not claimed as received: a redelivery after the fix is stored normally.
    assert count(conn, "SELECT count(*) FROM message_receipts WHERE msg_id = 'm2'") == 0


def test_clock_skewed_readings_are_stored_but_never_reach_the_rules(conn, decisions) -> None:
    rules = RecordingRules()
    skewed = telemetry("w-0001", "m1", {"heart_rate": 72}, flags=[CLOCK_SKEW])
    skewed.interp.skewed = 1
    BatchWriter(flavour(conn), rules).write(conn, [skewed, telemetry("w-0001", "m2", {"spo2": 97})])
    assert [r.metric for r in rules.seen[0].readings] == ["spo2"]
    assert count(conn, "SELECT count(*) FROM observations WHERE 'clock_skew' = ANY(flags)") == 1
    assert count(conn, "SELECT count FROM device_rejections WHERE reason = 'clock_skew'") == 1


def _receipt_days(conn) -> list[tuple[str, object]]:
    return conn.execute("SELECT msg_id, day FROM message_receipts ORDER BY msg_id").fetchall()


def test_a_redelivery_days_later_is_caught_in_the_day_of_the_messages_own_time(conn) -> None:
    own = datetime.fromtimestamp(NOW - 3600, UTC)  # the device's ts, an hour before reception

    def sent(received_at: float) -> Received:
        interp = Interpretation(source_id="w-0001", msg_id="m1", seen_devices=["w-0001"])
        interp.readings.append(Reading(own, "w-0001", "e-1", "heart_rate", 72, []))
        return Received("eldercare/v1/devices/w-0001/telemetry", b"{}", received_at, interp)

    writer = BatchWriter(flavour(conn))
    first = writer.write(conn, [sent(NOW)])
    again = writer.write(conn, [sent(NOW + 3 * 86400)])  # the device sends it again 3 days on
    assert (first.readings, again.readings, again.duplicates) == (1, 0, 1)
    assert _receipt_days(conn) == [("m1", own.date())]


def test_a_message_with_no_time_of_its_own_is_caught_on_a_later_day_too(conn) -> None:
    def ack(received_at: float) -> Received:
        # A command ack without ts: the interpreter stamps it with the receive time.
        at = datetime.fromtimestamp(received_at, UTC)
        interp = Interpretation(source_id="w-0001", msg_id="a1")
        interp.events.append(DeviceEvent(at, "w-0001", "e-1", "command_ack", {"cmd_id": "c1"}, []))
        return Received("eldercare/v1/devices/w-0001/ack", b"{}", received_at, interp)

    writer = BatchWriter(flavour(conn))
    writer.write(conn, [ack(NOW), telemetry("w-0002", "m1", {"spo2": 97})])
    again = writer.write(conn, [ack(NOW + 2 * 86400)])
    assert (again.events, again.duplicates) == (0, 1)
    assert count(conn, "SELECT count(*) FROM device_events") == 1
    assert _receipt_days(conn) == [("a1", T.date()), ("m1", T.date())]  # filed under the reception day

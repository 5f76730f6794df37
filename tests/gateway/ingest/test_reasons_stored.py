"""Every reason of device-mqtt.md ends as a stored dead letter (or, for duplicates, a count)."""

from __future__ import annotations

import time

import orjson
import psycopg
import pytest

from eldercare.devices.catalog import load_catalog
from eldercare.devices.interpret import Policy, interpret
from eldercare.devices.records import REASONS
from eldercare.gateway.store.devices import add_device, load_registry, set_enabled
from eldercare.gateway.store.writer import BatchWriter, Received

NOW = time.time()
MS = int(NOW * 1000)
DEV = "eldercare/v1/devices/w-1/telemetry"


def telemetry(metrics: object, **extra: object) -> bytes:
    return orjson.dumps({"msg_id": f"m-{time.monotonic_ns()}", "ts": MS, "metrics": metrics, **extra})


CASES: dict[str, tuple[str, bytes]] = {
    "malformed_json": (DEV, b'{"msg_id": "x", "metrics": {'),
    "schema": (DEV, telemetry({"heart_rate": "72"})),
    "unknown_metric": (DEV, telemetry({"pulse_wave": 3})),
    "out_of_range": (DEV, telemetry({"spo2": 140})),
    "unknown_unit": (DEV, telemetry({"heart_rate": {"value": 72, "unit": "bpm"}})),
    "unknown_device": ("eldercare/v1/devices/ghost-1/telemetry", telemetry({"spo2": 97})),
    "not_attached_to_hub": (
        "eldercare/v1/hubs/hub-1/telemetry",
        orjson.dumps({"msg_id": "h-1", "devices": {"w-1": {"ts": MS, "metrics": {"spo2": 97}}}}),
    ),
    "device_disabled": ("eldercare/v1/devices/w-off/telemetry", telemetry({"spo2": 97})),
    "too_old": (DEV, orjson.dumps({"msg_id": "old-1", "ts": 0, "metrics": {"spo2": 97}})),
    "too_large": (DEV, telemetry({"spo2": 97}, padding="x" * 70_000)),
    "unknown_event": (
        "eldercare/v1/devices/w-1/events",
        orjson.dumps({"msg_id": "ev-1", "ts": MS, "event": "alien_abduction"}),
    ),
}


def test_every_contract_reason_has_a_case() -> None:
    assert set(CASES) | {"duplicate"} == set(REASONS)


@pytest.fixture
def conn(db_url: str):
    with psycopg.connect(db_url) as conn:
        add_device(conn, "w-1", "wristband", "e-1")
        add_device(conn, "w-off", "wristband", "e-1")
        add_device(conn, "hub-1", "hub")
        set_enabled(conn, "w-off", False)
        conn.commit()
        yield conn


@pytest.mark.parametrize("reason", sorted(CASES))
def test_reason_is_stored_with_device_topic_and_payload(conn, reason: str) -> None:
    topic, payload = CASES[reason]
    registry = load_registry(conn)
    conn.commit()
    interp = interpret(topic, payload, NOW, registry, Policy(load_catalog()))
    BatchWriter("plain").write(conn, [Received(topic, payload, NOW, interp)])
    rows = conn.execute("SELECT reason, topic, payload, payload_size, device_id FROM dead_letters").fetchall()
    assert [r[0] for r in rows] == [reason]
    _, stored_topic, stored_payload, size, device_id = rows[0]
    assert stored_topic == topic and size == len(payload)
    assert bytes(stored_payload) == payload[: 64 * 1024]
    assert device_id is not None
    assert (
        conn.execute("SELECT sum(count) FROM device_rejections WHERE reason = %s", (reason,)).fetchone()[0]
        >= 1
    )


def test_duplicate_is_counted_not_stored(conn) -> None:
    payload = telemetry({"spo2": 97})
    registry = load_registry(conn)
    conn.commit()
    policy = Policy(load_catalog())
    writer = BatchWriter("plain")
    for _ in range(3):
        writer.write(conn, [Received(DEV, payload, NOW, interpret(DEV, payload, NOW, registry, policy))])
    assert conn.execute("SELECT count(*) FROM observations").fetchone()[0] == 1
    assert conn.execute("SELECT count(*) FROM dead_letters").fetchone()[0] == 0
    assert conn.execute("SELECT count FROM device_rejections WHERE reason = 'duplicate'").fetchone()[0] == 2


def test_an_empty_status_clearing_the_retained_one_is_no_dead_letter(conn) -> None:
    registry = load_registry(conn)
    conn.commit()
    topic = "eldercare/v1/devices/w-1/status"
    interp = interpret(topic, b"", NOW, registry, Policy(load_catalog()), retained=True)
    result = BatchWriter("plain").write(conn, [Received(topic, b"", NOW, interp, retained=True)])
    assert result.rejected == {} and result.messages == 1
    assert conn.execute("SELECT count(*) FROM dead_letters").fetchone()[0] == 0
    assert conn.execute("SELECT count(*) FROM device_rejections").fetchone()[0] == 0


def test_five_identical_samples_are_stored_once_and_four_counted_as_duplicates(conn) -> None:
    payload = orjson.dumps({"msg_id": "up-1", "samples": [{"ts": MS, "metrics": {"heart_rate": 70}}] * 5})
    registry = load_registry(conn)
    conn.commit()
    interp = interpret(DEV, payload, NOW, registry, Policy(load_catalog()))
    BatchWriter("plain").write(conn, [Received(DEV, payload, NOW, interp)])
    assert conn.execute("SELECT count(*) FROM observations").fetchone()[0] == 1
    assert conn.execute("SELECT count FROM device_rejections WHERE reason = 'duplicate'").fetchone()[0] == 4
    assert conn.execute("SELECT count(*) FROM dead_letters").fetchone()[0] == 0

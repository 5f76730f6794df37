"""Events on a session of their own: an SOS does not queue behind telemetry, loses nothing.

Real mosquitto (project config), real PostgreSQL, the worker as a process. The broker
delivers one session's queue first in, first out; these tests hold a telemetry backlog (or
unacknowledged events) in it and check what the events session changes, and what it keeps.
"""

from __future__ import annotations

import threading
import time
import urllib.request

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from eldercare.devices.topics import SUBSCRIPTIONS
from eldercare.gateway.broker import free_port
from tests.gateway.ingest.conftest import IngestSetup
from tests.gateway.ingest.processes import Device, Publisher, scalar
from tests.gateway.ingest.test_worker_e2e import needs_mosquitto_guarantees
from tests.tcp_gate import gate_for, gated_db_url
from tests.waiting import never, wait_for

pytestmark = pytest.mark.slow

STEPS = "SELECT count(*), count(DISTINCT value) FROM observations WHERE metric = 'steps'"


def sos(device: Device, msg_id: str, kind: str = "sos_pressed") -> None:
    payload = {"msg_id": msg_id, "ts": int(time.time() * 1000), "event": kind}
    info = device.publish("events", payload)
    info.wait_for_publish(5)
    assert info.is_published(), "the broker did not acknowledge the event"


def events_of(ingest: IngestSetup, device: Device) -> int:
    return scalar(ingest.db_url, f"SELECT count(*) FROM device_events WHERE device_id = '{device.device_id}'")


def duplicates(ingest: IngestSetup) -> int:
    sql = "SELECT coalesce(sum(count), 0) FROM device_rejections WHERE reason = 'duplicate'"
    return scalar(ingest.db_url, sql)


def test_an_sos_is_committed_while_a_telemetry_backlog_still_waits_in_the_broker(ingest: IngestSetup) -> None:
    needs_mosquitto_guarantees(ingest, "a persistent session's queue")
    worker = ingest.worker().start()
    devices = ingest.devices(10)
    [pendant] = ingest.devices(1, elder="e-sos")
    probes = ingest.wait_until_subscribed(worker, devices[0])
    assert worker.stop() == 0
    n = 10_000  # the code before the events session stored about 94 % of it before the SOS
    backlog = Publisher(devices, n, rate=20_000)
    backlog.start()
    backlog.wait_all_acked(60)  # all of it queued in the worker's main session
    worker = ingest.worker().start()
    wait_for(lambda: ingest.rows(STEPS)[0][0] > 0, 30, "the worker to drain the backlog")
    sos(pendant, "sos-1")

    def telemetry_at_sos() -> tuple[int] | None:
        [(sos_rows, telemetry)] = ingest.rows(
            f"SELECT (SELECT count(*) FROM device_events WHERE device_id = '{pendant.device_id}'),"
            " (SELECT count(*) FROM observations WHERE metric = 'steps')"
        )
        return (telemetry,) if sos_rows else None

    [stored_before] = wait_for(telemetry_at_sos, 60, "the SOS")
    print(f"the SOS was committed with {stored_before:,} of {n:,} backlogged messages stored")
    assert stored_before < n // 2, "the SOS waited behind the telemetry backlog"
    wait_for(lambda: ingest.rows(STEPS)[0][0] >= n, 120, "the whole backlog stored")
    time.sleep(1.0)  # anything redelivered late would show up now
    assert ingest.rows(STEPS) == [(n, n)]
    assert events_of(ingest, pendant) == 1
    assert scalar(ingest.db_url, "SELECT count(*) FROM message_receipts") == probes + n + 1
    assert duplicates(ingest) == 0
    assert ingest.rows("SELECT rule, matches FROM alerts") == [("sos", 1)]
    assert worker.stop() == 0


def _received(port: int) -> float:
    """The worker's count of messages handed to its committer (0 while unreachable)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            text = response.read().decode()
    except OSError:
        return 0.0
    for line in text.splitlines():
        if line.startswith("eldercare_ingest_messages_received_total "):
            return float(line.split()[1])
    return 0.0


def test_events_held_unacknowledged_by_a_killed_worker_are_redelivered_and_stored_once(
    ingest: IngestSetup,
) -> None:
    needs_mosquitto_guarantees(ingest, "redelivery of un-acked messages after kill -9")
    gate = gate_for(ingest.db_url)
    try:
        port = free_port()
        gated = {"ELDERCARE_DATABASE_URL": gated_db_url(ingest.db_url, gate)}
        worker = ingest.worker(**gated, ELDERCARE_METRICS_PORT=str(port)).start()
        devices = ingest.devices(4)
        probes = ingest.wait_until_subscribed(worker, devices[0])
        gate.close()  # nothing commits, so nothing is acknowledged
        k = 20
        for i in range(k):
            sos(devices[i % 4], f"ev-{i}", "sos_pressed" if i % 2 else "fall_detected")
        wait_for(lambda: _received(port) >= probes + k, 20, "the worker to hold every event")
        worker.kill9()
        gate.open()
        worker = ingest.worker(**gated).start()
        ids = "SELECT count(*) FROM device_events WHERE msg_id LIKE 'ev-%'"
        wait_for(lambda: scalar(ingest.db_url, ids) >= k, 30, "every event stored")
        time.sleep(1.0)  # anything redelivered late would show up now
        assert scalar(ingest.db_url, ids) == k
        assert scalar(ingest.db_url, "SELECT count(DISTINCT msg_id) FROM device_events") == k
        assert scalar(ingest.db_url, "SELECT count(*) FROM message_receipts") == probes + k
        assert worker.stop() == 0
    finally:
        gate.stop()


class OldSession:
    """The worker's session as the code before the split made it: every filter, events too."""

    def __init__(self, ingest: IngestSetup, client_id: str) -> None:
        account = ingest.broker.gateway
        self.received: list[str] = []
        self._subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        self.client.username_pw_set(account.username, account.password)
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.on_message = lambda _c, _u, msg: self.received.append(msg.topic)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 600
        self.client.connect(account.host, account.port, clean_start=False, properties=props)
        self.client.loop_start()

    def subscribe_to_everything(self) -> None:
        self.client.subscribe([(t, 1) for t in SUBSCRIPTIONS])
        assert self._subscribed.wait(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_a_session_from_before_the_split_drops_its_events_filters(ingest: IngestSetup) -> None:
    """An upgraded deployment's main session was subscribed to events: they now come once."""
    needs_mosquitto_guarantees(ingest, "persistent sessions")
    worker = ingest.worker()  # not started yet
    client_id = worker.env["ELDERCARE_MQTT_CLIENT_ID"]
    old = OldSession(ingest, client_id)
    old.subscribe_to_everything()
    old.close()
    [device] = ingest.devices(1)
    for i in range(3):  # queued in the old session, for the main client to take
        sos(device, f"before-{i}", "fall_detected")
    worker.start()
    stored = ingest.wait_until_subscribed(worker, device)  # probes and the 3 events
    for i in range(10):
        sos(device, f"after-{i}", "fall_detected")
    wait_for(lambda: events_of(ingest, device) >= 13, 30, "every event stored")
    time.sleep(1.0)  # a second copy would be counted as a duplicate by now
    assert events_of(ingest, device) == 13
    assert duplicates(ingest) == 0
    assert scalar(ingest.db_url, "SELECT count(*) FROM message_receipts") == stored + 10
    assert worker.stop() == 0

    # On the broker: the main session no longer takes events; the events session does.
    sos(device, "while-stopped", "fall_detected")
    main = OldSession(ingest, client_id)
    try:
        never(lambda: main.received, 1.0, "an event queued for the main session")
    finally:
        main.close()
    worker = ingest.worker().start()
    wait_for(lambda: events_of(ingest, device) == 14, 30, "the event from the events session")
    assert worker.stop() == 0

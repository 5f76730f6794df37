"""The paced publisher against our broker (project config and ACL), and fleet registration."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import orjson
import paho.mqtt.client as mqtt
import psycopg
from paho.mqtt.enums import CallbackAPIVersion

from eldercare.gateway.broker import Broker, MqttAccount
from eldercare.simulators.publisher import Fleet, PublishPlan, publish, register_fleet, start_publishers
from tests.waiting import wait_for


@contextmanager
def subscribed(broker: Broker, topic: str) -> Iterator[list[tuple[float, str, bytes]]]:
    """A QoS 1 subscriber (the gateway's account) on ``topic``; yields what it receives.

    Each item is (receive time, topic, payload). MQTT 5 where the broker speaks it.
    """
    account = broker.gateway
    received: list[tuple[float, str, bytes]] = []
    ready = threading.Event()
    protocol = mqtt.MQTTv5 if broker.capabilities.supports_mqtt5 else mqtt.MQTTv311
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=account.client_id, protocol=protocol)
    client.username_pw_set(account.username, account.password)
    client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
    client.on_subscribe = lambda c, u, mid, rcs, p: ready.set()
    client.on_message = lambda c, u, msg: received.append((time.time(), msg.topic, bytes(msg.payload)))
    client.connect(account.host, account.port)
    client.loop_start()
    try:
        assert ready.wait(10), "no SUBACK"
        yield received
    finally:
        client.disconnect()
        client.loop_stop()


def test_paced_messages_all_arrive_spread_over_time(
    broker: Broker, mqtt_device: Callable[..., MqttAccount], new_id: Callable[[str], str]
) -> None:
    fleet = Fleet(variant="telemetry", size=1, prefix=new_id("p"))
    [device_id] = fleet.publisher_ids()
    account = mqtt_device(device_id)  # the ACL lets this account publish only as that device
    n, rate = 400, 500.0  # a pace a machine busy with other tests still keeps
    with subscribed(broker, fleet.topic(device_id)) as received:
        started = time.time()
        report = publish(PublishPlan(account.url, fleet, rate=rate, count=n, tag="t1"))
        wait_for(lambda: len(received) >= n, 10, f"{n} messages received")

    assert report.published == report.acked == n
    assert report.errors == []
    assert report.kept_up
    assert abs(report.achieved_rate - rate) < 0.05 * rate
    # Paced, not a burst: arrivals are spread over about n / rate seconds.
    arrivals = [t for t, _, _ in received]
    assert max(arrivals) - min(arrivals) > 0.9 * (n - 1) / rate
    payloads = [orjson.loads(p) for _, _, p in received]
    assert len({p["msg_id"] for p in payloads}) == n
    assert all(p["msg_id"].startswith("t1-") for p in payloads)
    for p in payloads:
        assert set(p["metrics"]) == {"heart_rate", "spo2", "steps"}
        assert 20 <= p["metrics"]["heart_rate"] <= 250 and 50 <= p["metrics"]["spo2"] <= 100
        assert isinstance(p["ts"], int) and started * 1000 - 1 <= p["ts"] <= time.time() * 1000
    steps = [p["metrics"]["steps"] for p in payloads]
    assert steps == sorted(steps)  # cumulative per device


def test_devices_with_their_own_accounts_publish_as_themselves(
    broker: Broker, mqtt_device: Callable[..., MqttAccount], new_id: Callable[[str], str]
) -> None:
    fleet = Fleet(variant="telemetry", size=3, prefix=new_id("p"))
    accounts = broker.add_users(fleet.publisher_ids())  # the ACL confines each to its own topics
    urls = tuple((device_id, account.url) for device_id, account in accounts.items())
    with subscribed(broker, "eldercare/v1/devices/+/telemetry") as received:
        plan = PublishPlan(urls[0][1], fleet, rate=600, count=90, processes=2, device_urls=urls)
        report = publish(plan)
        wait_for(lambda: len(received) >= 90, 10, "90 messages received")

    assert report.published == report.acked == 90 and report.errors == []
    msg_ids: dict[str, set[str]] = {}
    for _, topic, payload in received:
        msg_ids.setdefault(topic, set()).add(orjson.loads(payload)["msg_id"])
    assert set(msg_ids) == {fleet.topic(device_id) for device_id in fleet.publisher_ids()}
    assert sum(len(ids) for ids in msg_ids.values()) == 90  # msg_ids unique per device


def test_hub_messages_wrap_one_attached_device_with_samples(
    broker: Broker, mqtt_device: Callable[..., MqttAccount], new_id: Callable[[str], str]
) -> None:
    fleet = Fleet(variant="hub", size=1, subs_per_hub=3, samples_per_message=100, prefix=new_id("p"))
    [hub_id] = fleet.publisher_ids()
    account = mqtt_device(hub_id)
    with subscribed(broker, fleet.topic(hub_id)) as received:
        report = publish(PublishPlan(account.url, fleet, rate=200, count=6, tag="h"))
        wait_for(lambda: len(received) >= 6, 10, "6 hub messages")

    assert report.published == 6 and report.datapoints_per_message == 300
    payloads = [orjson.loads(p) for _, _, p in received]
    assert len({p["msg_id"] for p in payloads}) == 6
    subs = [next(iter(p["devices"])) for p in payloads]
    assert subs == fleet.sub_ids(0) * 2  # the hub's sub-devices in turn
    for p in payloads:
        [body] = p["devices"].values()
        samples = body["samples"]
        assert len(samples) == 100
        assert all(set(s["metrics"]) == {"heart_rate", "spo2", "steps"} for s in samples)
        times = [s["ts"] for s in samples]
        assert times == sorted(times) and len(set(times)) == 100  # oldest first


def test_register_fleet_registers_hubs_subdevices_and_elders_once(db_url: str) -> None:
    fleet = Fleet(variant="hub", size=3, subs_per_hub=4, prefix="reg")
    assert register_fleet(db_url, fleet) == 3 + 12
    assert register_fleet(db_url, fleet) == 0  # a second run reuses the rows
    with psycopg.connect(db_url) as conn:
        rows = conn.execute(
            "SELECT type, count(*), count(elder_id), count(hub_id) FROM devices"
            " WHERE device_id LIKE '%-reg-%' GROUP BY type ORDER BY type"
        ).fetchall()
        sub_id = fleet.sub_ids(2)[0]
        attached = conn.execute("SELECT hub_id FROM devices WHERE device_id = %s", (sub_id,)).fetchone()
    assert rows == [("hub", 3, 0, 0), ("wristband", 12, 12, 12)]
    assert attached == (fleet.publisher_ids()[2],)


def test_mqtt5_publishers_send_again_what_nobody_took(
    project_mosquitto: Broker, mqtt_device: Callable[..., MqttAccount], new_id: Callable[[str], str]
) -> None:
    """0x10 (No matching subscribers) is "not taken": sent again until a subscriber takes it."""
    fleet = Fleet(variant="telemetry", size=1, prefix=new_id("p"))
    [device_id] = fleet.publisher_ids()
    account = mqtt_device(device_id)
    n = 300
    plan = PublishPlan(account.url, fleet, rate=300, count=n, tag="v5", protocol="5")
    with start_publishers(plan) as run:
        time.sleep(0.4)  # about a third goes out before anybody subscribes
        with subscribed(project_mosquitto, fleet.topic(device_id)) as received:
            report = run.wait(30)
            wait_for(lambda: len({orjson.loads(p)["msg_id"] for _, _, p in received}) >= n, 10, "all")
    assert report.errors == []
    assert report.published == report.acked == n  # acked = taken: after every 0x10, a success
    assert report.not_taken > 0

"""A simulated device's link keeps each message until the broker took it (device-mqtt.md)."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from eldercare.gateway.broker import MqttAccount, ProjectBroker
from eldercare.simulators.device_link import DeviceLink
from tests.simulators.test_publisher import subscribed
from tests.waiting import wait_for


def test_a_message_nobody_subscribed_to_is_sent_again_until_someone_takes_it(
    project_mosquitto: ProjectBroker, mqtt_device: Callable[..., MqttAccount]
) -> None:
    """PUBACK 0x10 (No matching subscribers) is "not taken": the same message goes again."""
    account = mqtt_device()
    link = DeviceLink(account.username, account.password, account.host, account.port).connect()
    try:
        link.publish("telemetry", b'{"msg_id": "m-1", "ts": 1, "metrics": {"heart_rate": 70}}')
        wait_for(lambda: (link.pump(), link.not_taken)[1] >= 2, 10, "0x10 answers, each sent again")
        assert link.outstanding == 1 and link.taken == 0
        with subscribed(project_mosquitto, f"eldercare/v1/devices/{account.username}/telemetry") as got:
            assert link.wait_all_taken(10), "taken once somebody subscribed"
            wait_for(lambda: got, 5, "the message delivered")
        assert link.taken == 1 and link.refused == 0
        assert got[0][2].startswith(b'{"msg_id": "m-1"')
    finally:
        link.close()


def test_a_message_published_while_the_broker_is_away_goes_out_when_it_is_back(
    tmp_path, new_id: Callable[[str], str]
) -> None:
    """paho keeps what was not acknowledged and sends it when the link is back (0x10 or not)."""
    broker = ProjectBroker(tmp_path / "mqtt")
    if broker.backend != "mosquitto":
        pytest.skip(f"needs mosquitto for a restart with persistence ({broker.capabilities.note})")
    broker.start()
    try:
        account = broker.add_user(new_id("w"))
        link = DeviceLink(account.username, account.password, broker.host, broker.port).connect()
        broker.stop()
        link.publish("telemetry", b'{"msg_id": "m-2", "ts": 1, "metrics": {"heart_rate": 70}}')
        time.sleep(0.5)
        assert link.outstanding == 1
        broker.start()
        with subscribed(broker, "eldercare/v1/devices/+/telemetry") as got:
            assert link.wait_all_taken(15)
            wait_for(lambda: got, 5, "the message delivered after the broker returned")
        link.close()
    finally:
        broker.stop()

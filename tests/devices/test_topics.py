"""The topic grammar of device-mqtt.md v1."""

from __future__ import annotations

import pytest

from eldercare.devices.topics import (
    SUBSCRIPTIONS,
    Topic,
    commands_topic,
    device_topic,
    hub_topic,
    is_valid_device_id,
    is_valid_msg_id,
    parse_topic,
)


@pytest.mark.parametrize(
    ("topic", "expected"),
    [
        ("eldercare/v1/devices/w-000123/telemetry", ("device", "w-000123", "telemetry")),
        ("eldercare/v1/devices/w-000123/events", ("device", "w-000123", "events")),
        ("eldercare/v1/devices/w-000123/status", ("device", "w-000123", "status")),
        ("eldercare/v1/devices/w-000123/commands/ack", ("device", "w-000123", "commands/ack")),
        ("eldercare/v1/hubs/hub_7.home/telemetry", ("hub", "hub_7.home", "telemetry")),
        ("eldercare/v1/hubs/hub_7.home/events", ("hub", "hub_7.home", "events")),
        ("eldercare/v1/hubs/hub_7.home/status", ("hub", "hub_7.home", "status")),
        ("eldercare/v1/devices/abc/telemetry", ("device", "abc", "telemetry")),
        (f"eldercare/v1/devices/{'x' * 64}/telemetry", ("device", "x" * 64, "telemetry")),
    ],
)
def test_device_and_hub_topics_parse(topic: str, expected: tuple[str, str, str]) -> None:
    parsed = parse_topic(topic)
    assert parsed == expected
    assert isinstance(parsed, Topic)
    assert (parsed.kind, parsed.id, parsed.channel) == expected


@pytest.mark.parametrize(
    "topic",
    [
        "",
        "eldercare/v1/devices/w-000123",
        "eldercare/v1/devices/w-000123/telemetry/",
        "eldercare/v1/devices/w-000123/telemetry/extra",
        "eldercare/v2/devices/w-000123/telemetry",
        "Eldercare/v1/devices/w-000123/telemetry",
        "/eldercare/v1/devices/w-000123/telemetry",
        "eldercare/v1/device/w-000123/telemetry",
        "eldercare/v1/devices/w-000123/Telemetry",
        "eldercare/v1/devices/w-000123/commands",  # gateway -> device, not ingested
        "eldercare/v1/devices/w-000123/commands/nack",
        "eldercare/v1/hubs/hub-1/commands/ack",  # commands go to devices, not hubs
        "eldercare/v1/devices/ab/telemetry",  # id too short
        f"eldercare/v1/devices/{'x' * 65}/telemetry",  # id too long
        "eldercare/v1/devices/w:1/telemetry",  # ':' is allowed in msg ids, not device ids
        "eldercare/v1/devices/wrist band/telemetry",
        "eldercare/v1/devices/w-١٢٣/telemetry",  # non-ASCII digits
        "eldercare/v1/devices/+/telemetry",
        "eldercare/v1/devices//telemetry",
    ],
)
def test_anything_else_is_not_a_topic(topic: str) -> None:
    assert parse_topic(topic) is None


def test_subscriptions_cover_every_channel_and_never_the_commands_we_send() -> None:
    assert set(SUBSCRIPTIONS) == {
        "eldercare/v1/devices/+/telemetry",
        "eldercare/v1/devices/+/events",
        "eldercare/v1/devices/+/status",
        "eldercare/v1/devices/+/commands/ack",
        "eldercare/v1/hubs/+/telemetry",
        "eldercare/v1/hubs/+/events",
        "eldercare/v1/hubs/+/status",
    }


def test_builders_round_trip() -> None:
    assert parse_topic(device_topic("w-1x", "telemetry")) == ("device", "w-1x", "telemetry")
    assert parse_topic(device_topic("w-1x", "commands/ack")) == ("device", "w-1x", "commands/ack")
    assert parse_topic(hub_topic("hub-1", "events")) == ("hub", "hub-1", "events")
    assert commands_topic("w-1x") == "eldercare/v1/devices/w-1x/commands"


@pytest.mark.parametrize(
    ("value", "device_ok", "msg_ok"),
    [
        ("w-000123", True, True),
        ("0f8fad5b-d9cb-469f-a165-70867728950e", True, True),
        ("urn:uuid:1", False, True),
        ("ab", False, True),
        ("a", False, True),
        ("", False, False),
        ("x" * 64, True, True),
        ("x" * 65, False, False),
        ("has space", False, False),
        ("w/1", False, False),
        (12345, False, False),
        (None, False, False),
    ],
)
def test_id_charsets_and_lengths(value: object, device_ok: bool, msg_ok: bool) -> None:
    assert is_valid_device_id(value) is device_ok
    assert is_valid_msg_id(value) is msg_ok

"""The MQTT topic grammar of device-mqtt.md v1: parse what devices publish, build what we send.

Device → gateway::

    eldercare/v1/devices/{device_id}/telemetry | events | status | commands/ack
    eldercare/v1/hubs/{hub_id}/telemetry | events | status

Gateway → device: ``eldercare/v1/devices/{device_id}/commands``. That topic is *not* part of
the grammar parsed here (the gateway does not ingest its own commands); subscribe with
``SUBSCRIPTIONS`` rather than ``eldercare/v1/#`` so it is never delivered to the ingest worker.
"""

from __future__ import annotations

import functools
import re
from typing import Final, Literal, NamedTuple

PREFIX = "eldercare/v1"
Kind = Literal["device", "hub"]
Channel = Literal["telemetry", "events", "status", "commands/ack"]

DEVICE: Final = "device"
HUB: Final = "hub"
TELEMETRY: Final = "telemetry"
EVENTS: Final = "events"
STATUS: Final = "status"
COMMAND_ACK: Final = "commands/ack"

# device_id / hub_id: 3-64 of [A-Za-z0-9._-]; msg_id / cmd_id: 1-64 of [A-Za-z0-9._:-].
# [0-9] rather than \d, which would also match non-ASCII digits.
DEVICE_ID_RE = re.compile(r"[A-Za-z0-9._-]{3,64}")
MSG_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,64}")

_CHANNELS: dict[str, frozenset[str]] = {
    # Hubs relay telemetry and events for their sub-devices and publish their own status
    # (and Last Will); commands are addressed to devices only, so hubs have no commands/ack.
    "devices": frozenset({TELEMETRY, EVENTS, STATUS, COMMAND_ACK}),
    "hubs": frozenset({TELEMETRY, EVENTS, STATUS}),
}
_KINDS: dict[str, Kind] = {"devices": DEVICE, "hubs": HUB}

# What the ingest worker subscribes to (prefix each with "$share/<group>/" for sharing).
SUBSCRIPTIONS: tuple[str, ...] = tuple(
    f"{PREFIX}/{segment}/+/{channel}"
    for segment, channels in _CHANNELS.items()
    for channel in sorted(channels)
)
# ... in two sessions: events (an SOS, a fall) on one of their own, so that they never queue
# behind telemetry in the broker (which delivers one session's messages first in, first out),
# and everything else (telemetry, status, command acks) on the other.
EVENT_SUBSCRIPTIONS: tuple[str, ...] = tuple(t for t in SUBSCRIPTIONS if t.endswith(f"/{EVENTS}"))
TELEMETRY_SUBSCRIPTIONS: tuple[str, ...] = tuple(t for t in SUBSCRIPTIONS if t not in EVENT_SUBSCRIPTIONS)


class Topic(NamedTuple):
    """A parsed device → gateway topic."""

    kind: Kind
    id: str
    channel: Channel


def is_valid_device_id(value: object) -> bool:
    """True when ``value`` is a well-formed device or hub id."""
    return type(value) is str and DEVICE_ID_RE.fullmatch(value) is not None


def is_valid_msg_id(value: object) -> bool:
    """True when ``value`` is a well-formed msg_id or cmd_id."""
    return type(value) is str and MSG_ID_RE.fullmatch(value) is not None


# Topics repeat (a few per device), so parse results are cached; the broker's ACL bounds
# what can be published, and the cache is bounded anyway.
@functools.lru_cache(maxsize=16384)
def parse_topic(topic: str) -> Topic | None:
    """The (kind, id, channel) of a device → gateway topic, or None if it is not one."""
    parts = topic.split("/")
    n = len(parts)
    if n == 5:
        channel = parts[4]
    elif n == 6 and parts[4] == "commands" and parts[5] == "ack":
        channel = COMMAND_ACK
    else:
        return None
    if parts[0] != "eldercare" or parts[1] != "v1":
        return None
    segment = parts[2]
    channels = _CHANNELS.get(segment)
    if channels is None or channel not in channels:
        return None
    ident = parts[3]
    if DEVICE_ID_RE.fullmatch(ident) is None:
        return None
    return Topic(_KINDS[segment], ident, channel)  # type: ignore[arg-type]


def device_topic(device_id: str, channel: str) -> str:
    """The topic a device publishes ``channel`` on (or ``commands``, which it receives)."""
    return f"{PREFIX}/devices/{device_id}/{channel}"


def hub_topic(hub_id: str, channel: str) -> str:
    """The topic a hub publishes ``channel`` on."""
    return f"{PREFIX}/hubs/{hub_id}/{channel}"


def commands_topic(device_id: str) -> str:
    """The topic the gateway publishes commands for ``device_id`` on."""
    return device_topic(device_id, "commands")

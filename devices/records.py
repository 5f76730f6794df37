"""What one MQTT message turns into: readings, events, status, rejections.

These are the values that flow from the pure interpreter (``devices.interpret``) to the
store's batch writer and to the rules. ``Reading`` and ``DeviceEvent`` are NamedTuples, not
dataclasses, because tens of thousands are built per second on the ingest hot path and a
tuple goes straight into ``COPY`` without conversion.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple

# Flags carried on a reading or event (observations.flags / device_events.flags).
CLOCK_SKEW = "clock_skew"  # device ts was > 5 min ahead: replaced by the receive time
LATE = "late"  # ts older than the late threshold (10 min) at arrival: buffered upload

# Machine-readable rejection reasons (device-mqtt.md, "What the gateway does with bad input").
MALFORMED_JSON = "malformed_json"
SCHEMA = "schema"
UNKNOWN_METRIC = "unknown_metric"
OUT_OF_RANGE = "out_of_range"
UNKNOWN_UNIT = "unknown_unit"
UNKNOWN_DEVICE = "unknown_device"
NOT_ATTACHED_TO_HUB = "not_attached_to_hub"
DEVICE_DISABLED = "device_disabled"
TOO_OLD = "too_old"
TOO_LARGE = "too_large"
UNKNOWN_EVENT = "unknown_event"
DUPLICATE = "duplicate"

REASONS: tuple[str, ...] = (
    MALFORMED_JSON,
    SCHEMA,
    UNKNOWN_METRIC,
    OUT_OF_RANGE,
    UNKNOWN_UNIT,
    UNKNOWN_DEVICE,
    NOT_ATTACHED_TO_HUB,
    DEVICE_DISABLED,
    TOO_OLD,
    TOO_LARGE,
    UNKNOWN_EVENT,
    DUPLICATE,
)


class Reading(NamedTuple):
    """One accepted measurement in its canonical unit (a row of ``observations``)."""

    time: datetime
    device_id: str
    elder_id: str | None
    metric: str
    value: float
    flags: list[str]


class DeviceEvent(NamedTuple):
    """One accepted discrete happening (a row of ``device_events``)."""

    time: datetime
    device_id: str
    elder_id: str | None
    kind: str
    details: dict[str, Any]
    flags: list[str]


@dataclass(frozen=True, slots=True)
class StatusUpdate:
    """What a ``status`` message (or its Last Will) says about a device."""

    device_id: str
    time: datetime
    online: bool | None
    battery: float | None = None
    firmware: str | None = None
    signal_dbm: float | None = None


@dataclass(frozen=True, slots=True)
class Rejection:
    """Part (or all) of a message refused, with a machine-readable reason.

    ``count`` is how many items (metrics, samples, sub-devices) this rejection stands for;
    one message yields at most one Rejection per (reason, device_id).
    """

    reason: str
    detail: str
    device_id: str | None = None
    count: int = 1


@dataclass(slots=True)
class Interpretation:
    """Everything one MQTT message means, decided without I/O.

    ``source_id``/``msg_id`` form the dedup key (the device or hub that published and its
    message id); either may be None when the message is too broken to tell.
    ``immediate`` is true when the message must not wait for its batch (an event, or a
    reading past an emergency threshold). ``skewed`` counts readings and events whose
    clock was ahead and got the receive time instead (a flag, not a rejection).
    ``repeated`` counts readings dropped because the message already had one for the same
    (device, metric, time): the first wins (counted as duplicates, never dead-lettered).
    """

    source_id: str | None = None
    msg_id: str | None = None
    readings: list[Reading] = field(default_factory=list)
    events: list[DeviceEvent] = field(default_factory=list)
    statuses: list[StatusUpdate] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)
    seen_devices: list[str] = field(default_factory=list)
    immediate: bool = False
    skewed: int = 0
    repeated: int = 0

    @property
    def accepted(self) -> bool:
        """True when anything of the message is to be stored."""
        return bool(self.readings or self.events or self.statuses)

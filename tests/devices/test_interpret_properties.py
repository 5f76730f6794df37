"""Properties of interpret over arbitrary input: it never raises and never says nothing."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eldercare.devices.catalog import load_catalog
from eldercare.devices.interpret import COMMAND_ACK_KIND, Policy, interpret
from eldercare.devices.records import CLOCK_SKEW, DUPLICATE, LATE, REASONS, Interpretation
from eldercare.devices.registry import DeviceInfo, Registry

NOW = 1795327200.0
NOW_MS = int(NOW * 1000)
CATALOG = load_catalog()
POLICY = Policy(CATALOG)
REGISTRY = Registry(
    [
        DeviceInfo("w-1", "wristband", elder_id="e-1"),
        DeviceInfo("w-off", "wristband", enabled=False),
        DeviceInfo("hub-1", "hub"),
        DeviceInfo("hub-2", "hub"),
        DeviceInfo("bed-1", "bed_sensor", elder_id="e-1", hub_id="hub-1"),
        DeviceInfo("bed-2", "bed_sensor", elder_id="e-2", hub_id="hub-2"),
        DeviceInfo("bed-off", "bed_sensor", hub_id="hub-1", enabled=False),
    ]
)
IDS = ["w-1", "w-off", "hub-1", "hub-2", "bed-1", "bed-2", "bed-off", "ghost-9"]
TOPICS = [
    f"eldercare/v1/devices/{i}/{c}" for i in IDS for c in ("telemetry", "events", "status", "commands/ack")
] + [f"eldercare/v1/hubs/{i}/{c}" for i in IDS for c in ("telemetry", "events", "status")]
UNITS = sorted(
    {m.unit for m in CATALOG.metrics.values()} | {u for m in CATALOG.metrics.values() for u in m.alternatives}
)

PROPERTY_SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)


def mostly(good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Draw from ``good`` four times in five, else from ``bad``."""
    return st.integers(0, 4).flatmap(lambda i: bad if i == 0 else good)


# mostly inside the horizon, sometimes ahead of the skew tolerance or past the horizon
epoch_ms = mostly(
    st.integers(min_value=NOW_MS - 20 * 86_400_000, max_value=NOW_MS + 600_000),
    st.integers(min_value=NOW_MS - 40 * 86_400_000, max_value=NOW_MS + 86_400_000),
)
good_timestamps = epoch_ms | epoch_ms.map(lambda ms: datetime.fromtimestamp(ms / 1000, UTC).isoformat())
timestamps = mostly(
    good_timestamps,
    st.one_of(
        st.integers(min_value=-(2**63), max_value=2**63),
        st.datetimes(timezones=st.timezones()).map(lambda d: d.isoformat()),
        st.datetimes().map(lambda d: d.isoformat()),  # naive: no offset
        json_values,
    ),
)
good_msg_ids = st.sampled_from(["m-1", "0f8fad5b-d9cb-469f-a165-70867728950e", "h:9"])
msg_ids = mostly(good_msg_ids, json_scalars)
metric_values = mostly(
    st.integers(min_value=-10, max_value=300)
    | st.floats(min_value=-10, max_value=300)
    | st.fixed_dictionaries(
        {
            "value": mostly(st.floats(-1e3, 1e3), json_scalars),
            "unit": mostly(st.sampled_from(UNITS), json_scalars),
        }
    ),
    st.floats(allow_nan=False, allow_infinity=False) | json_values,
)
metric_maps = st.dictionaries(
    mostly(st.sampled_from(sorted(CATALOG.metrics)), st.text(max_size=12)),
    metric_values,
    min_size=1,
    max_size=5,
)


def some_of(required: dict[str, Any], **optional: Any) -> st.SearchStrategy[dict[str, Any]]:
    """Dicts with the required keys, each dropped now and then, plus some optional keys."""
    full = st.fixed_dictionaries(required, optional=optional)
    drops = mostly(st.just(set()), st.sets(st.sampled_from(sorted(required or [""])), max_size=1))
    return st.builds(lambda d, gone: {k: v for k, v in d.items() if k not in gone}, full, drops)


samples = mostly(some_of({"ts": timestamps, "metrics": metric_maps}), json_values)
telemetry_payloads = some_of(
    {"msg_id": msg_ids, "ts": timestamps, "metrics": metric_maps},
    samples=st.lists(samples, min_size=1, max_size=5) | json_values,
    battery=st.integers(-5, 105) | json_values,
)
buffered_payloads = some_of(
    {"msg_id": msg_ids, "samples": st.lists(samples, min_size=1, max_size=5) | json_values}
)
event_payloads = some_of(
    {
        "msg_id": msg_ids,
        "ts": timestamps,
        "event": mostly(st.sampled_from(sorted(CATALOG.event_types)), json_values),
    },
    confidence=st.floats(-0.5, 1.5) | json_values,
    location=json_values,
)
status_payloads = some_of(
    {},
    ts=timestamps,
    online=st.booleans() | json_scalars,
    battery=st.floats(-10, 110) | json_scalars,
    firmware=json_scalars,
    signal_dbm=st.floats(-120, 0) | json_scalars,
)
ack_payloads = some_of({"cmd_id": msg_ids}, msg_id=msg_ids, ts=timestamps, status=json_values)
device_payloads = telemetry_payloads | buffered_payloads | event_payloads | status_payloads | ack_payloads
sub_ids = st.sampled_from(["bed-1", "bed-1", "bed-2", "bed-off", "ghost-9", "w-1"]) | st.text(max_size=8)
hub_payloads = some_of(
    {
        "msg_id": msg_ids,
        "devices": mostly(
            st.dictionaries(sub_ids, mostly(device_payloads, json_values), max_size=4), json_values
        ),
    }
)
registered_topics = st.sampled_from(TOPICS) | st.sampled_from(
    [t for t in TOPICS if "/w-1/" in t or "/hub-1/" in t]
)


def check(result: Interpretation) -> None:
    """Invariants every interpretation satisfies, whatever the input."""
    assert isinstance(result, Interpretation)
    assert result.accepted or result.rejections, "a message must never mean nothing"
    keys = [(r.reason, r.device_id) for r in result.rejections]
    assert len(keys) == len(set(keys)), "one rejection per (reason, device)"
    for rejection in result.rejections:
        assert rejection.reason in REASONS and rejection.reason != DUPLICATE
        assert rejection.count >= 1 and 0 < len(rejection.detail) <= 600
        assert not rejection.detail.startswith("internal:"), rejection
    skewed = 0
    banded = False
    for reading in result.readings:
        metric = CATALOG.metrics[reading.metric]
        info = REGISTRY[reading.device_id]
        assert info.enabled and reading.elder_id == info.elder_id
        assert type(reading.value) is float and math.isfinite(reading.value)
        assert metric.low <= reading.value <= metric.high
        assert reading.time.tzinfo is UTC
        assert reading.flags in ([], [CLOCK_SKEW], [LATE])
        skewed += reading.flags == [CLOCK_SKEW]
        banded |= metric.in_emergency_band(reading.value) and reading.flags != [CLOCK_SKEW]
    for event in result.events:
        assert event.kind in CATALOG.event_types or event.kind == COMMAND_ACK_KIND
        assert REGISTRY[event.device_id].enabled and event.time.tzinfo is UTC
        assert not {"msg_id", "ts"} & set(event.details)
        skewed += event.flags == [CLOCK_SKEW]
    assert result.skewed == skewed
    # a reading is (device, metric, time): a message never yields one twice (skewed ones aside)
    identities = [(r.device_id, r.metric, r.time) for r in result.readings if r.flags != [CLOCK_SKEW]]
    assert len(identities) == len(set(identities))
    assert result.immediate == (bool(result.events) or banded)
    if not result.accepted:
        assert result.seen_devices == [] and not result.immediate
    for device_id in result.seen_devices:
        assert REGISTRY[device_id].enabled


@PROPERTY_SETTINGS
@given(topic=st.sampled_from(TOPICS), payload=st.binary(max_size=300))
def test_arbitrary_bytes_never_raise(topic: str, payload: bytes) -> None:
    check(interpret(topic, payload, NOW, REGISTRY, POLICY))


@PROPERTY_SETTINGS
@given(topic=st.sampled_from(TOPICS), value=json_values, retained=st.booleans())
def test_arbitrary_json_never_raises(topic: str, value: Any, retained: bool) -> None:
    check(interpret(topic, orjson.dumps(value), NOW, REGISTRY, POLICY, retained=retained))


@PROPERTY_SETTINGS
@given(topic=registered_topics, value=device_payloads)
def test_near_valid_device_payloads_never_raise(topic: str, value: Any) -> None:
    check(interpret(topic, orjson.dumps(value), NOW, REGISTRY, POLICY))


@PROPERTY_SETTINGS
@given(device_id=st.sampled_from(["w-1", "w-1", "bed-1"]), value=telemetry_payloads | buffered_payloads)
def test_near_valid_telemetry_never_raises(device_id: str, value: Any) -> None:
    check(
        interpret(f"eldercare/v1/devices/{device_id}/telemetry", orjson.dumps(value), NOW, REGISTRY, POLICY)
    )


@PROPERTY_SETTINGS
@given(
    hub_id=st.sampled_from(["hub-1", "hub-1", *IDS]),
    channel=st.sampled_from(["telemetry", "events"]),
    value=hub_payloads,
)
def test_near_valid_hub_payloads_never_raise(hub_id: str, channel: str, value: Any) -> None:
    check(interpret(f"eldercare/v1/hubs/{hub_id}/{channel}", orjson.dumps(value), NOW, REGISTRY, POLICY))


@PROPERTY_SETTINGS
@given(topic=st.text(max_size=80), payload=st.binary(max_size=50))
def test_arbitrary_topics_never_raise(topic: str, payload: bytes) -> None:
    check(interpret(topic, payload, NOW, REGISTRY, POLICY))

"""What one MQTT message turns into, per device-mqtt.md v1 (no I/O, injected receive time)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, cast

import orjson
import pytest

from eldercare.devices.catalog import load_catalog
from eldercare.devices.interpret import NAMED_STRANGERS, Policy, interpret
from eldercare.devices.records import (
    CLOCK_SKEW,
    DEVICE_DISABLED,
    LATE,
    MALFORMED_JSON,
    NOT_ATTACHED_TO_HUB,
    OUT_OF_RANGE,
    SCHEMA,
    TOO_LARGE,
    TOO_OLD,
    UNKNOWN_DEVICE,
    UNKNOWN_EVENT,
    UNKNOWN_METRIC,
    UNKNOWN_UNIT,
    Interpretation,
    Rejection,
    StatusUpdate,
)
from eldercare.devices.registry import DeviceInfo, Registry

NOW = 1795327200.0  # 2026-11-22T06:00:00Z, the gateway's receive time in these tests
NOW_DT = datetime(2026, 11, 22, 6, 0, tzinfo=UTC)
NOW_MS = int(NOW * 1000)
TS = "2026-11-22T14:00:00+08:00"  # == NOW

REGISTRY = Registry(
    [
        DeviceInfo("w-1", "wristband", elder_id="e-1"),
        DeviceInfo("w-off", "wristband", elder_id="e-1", enabled=False),
        DeviceInfo("hub-1", "hub"),
        DeviceInfo("hub-2", "hub"),
        DeviceInfo("hub-off", "hub", enabled=False),
        DeviceInfo("bed-1", "bed_sensor", elder_id="e-1", hub_id="hub-1"),
        DeviceInfo("bed-2", "bed_sensor", elder_id="e-2", hub_id="hub-2"),
        DeviceInfo("bed-off", "bed_sensor", elder_id="e-3", hub_id="hub-1", enabled=False),
        DeviceInfo("door-1", "door_sensor", elder_id="e-3", hub_id="hub-1"),
    ]
)
POLICY = Policy(load_catalog())


def device(channel: str, device_id: str = "w-1") -> str:
    return f"eldercare/v1/devices/{device_id}/{channel}"


def hub(channel: str, hub_id: str = "hub-1") -> str:
    return f"eldercare/v1/hubs/{hub_id}/{channel}"


def run(topic: str, payload: Any, now: float = NOW, **kwargs: Any) -> Interpretation:
    raw = payload if isinstance(payload, bytes) else orjson.dumps(payload)
    return interpret(topic, raw, now, REGISTRY, kwargs.pop("policy", POLICY), **kwargs)


def telemetry(metrics: Any, ts: Any = TS, **extra: Any) -> dict[str, Any]:
    return {"msg_id": "m-1", "ts": ts, "metrics": metrics, **extra}


def reasons(result: Interpretation) -> dict[tuple[str, str | None], int]:
    return {(r.reason, r.device_id): r.count for r in result.rejections}


def only_rejection(result: Interpretation) -> Rejection:
    assert not result.accepted, result
    assert len(result.rejections) == 1, result.rejections
    return result.rejections[0]


def values(result: Interpretation) -> dict[str, float]:
    return {r.metric: r.value for r in result.readings}


# -- telemetry ---------------------------------------------------------------------------------


def test_spec_telemetry_example_becomes_readings_in_canonical_units_and_a_battery_status() -> None:
    result = run(
        device("telemetry"),
        {
            "msg_id": "w-000123",
            "ts": TS,
            "metrics": {"heart_rate": 72, "spo2": 97, "blood_glucose": {"value": 110, "unit": "mg/dL"}},
            "battery": 81,
        },
    )
    assert (result.source_id, result.msg_id) == ("w-1", "w-000123")
    assert values(result) == pytest.approx({"heart_rate": 72.0, "spo2": 97.0, "blood_glucose": 110 / 18.016})
    for reading in result.readings:
        assert reading.time == NOW_DT and reading.time.tzinfo is UTC
        assert (reading.device_id, reading.elder_id, reading.flags) == ("w-1", "e-1", [])
        assert type(reading.value) is float
    assert result.statuses == [StatusUpdate("w-1", NOW_DT, None, 81.0)]
    assert result.rejections == []
    assert result.seen_devices == ["w-1"]
    assert not result.immediate
    assert result.skewed == 0


def test_ts_may_be_integer_epoch_milliseconds() -> None:
    result = run(device("telemetry"), telemetry({"heart_rate": 72}, ts=NOW_MS - 1500))
    assert result.readings[0].time == NOW_DT - timedelta(milliseconds=1500)


@pytest.mark.parametrize(
    "ts",
    [
        "2026-11-22T06:00:00Z",
        "2026-11-22t06:00:00z",
        "2026-11-22 06:00:00Z",
        "2026-11-22T06:00:00.000-00:00",
        "2026-11-22T01:00:00-05:00",
        "2026-11-22T06:00:00.0000001+00:00",
    ],
)
def test_rfc3339_variants_with_an_offset_are_accepted(ts: str) -> None:
    result = run(device("telemetry"), telemetry({"heart_rate": 72}, ts=ts))
    assert result.readings[0].time == NOW_DT


@pytest.mark.parametrize(
    ("metric", "sent", "expected"),
    [
        ("systolic_bp", {"value": 16, "unit": "kPa"}, 120.00992),
        ("diastolic_bp", {"value": 10, "unit": "kPa"}, 75.0062),
        ("body_temperature", {"value": 98.6, "unit": "[degF]"}, 37.0),
        ("room_temperature", {"value": 68, "unit": "[degF]"}, 20.0),
        ("blood_glucose", {"value": 180.16, "unit": "mg/dL"}, 10.0),
        ("body_weight", {"value": 154, "unit": "[lb_av]"}, 154 * 0.45359237),
        ("heart_rate", {"value": 72, "unit": "/min"}, 72.0),  # canonical unit spelled out
        ("blood_glucose", {"value": 5.5, "unit": "mmol/L", "note": "fasting"}, 5.5),
    ],
)
def test_alternative_units_are_converted(metric: str, sent: Any, expected: float) -> None:
    result = run(device("telemetry"), telemetry({metric: sent}))
    assert result.rejections == []
    assert values(result)[metric] == pytest.approx(expected)


@pytest.mark.parametrize(
    ("metric", "sent"),
    [
        ("heart_rate", {"value": 72, "unit": "bpm"}),
        ("blood_glucose", {"value": 110, "unit": "mg/dl"}),  # UCUM is case-sensitive
        ("systolic_bp", {"value": 120, "unit": "mmHg"}),
        ("spo2", {"value": 97, "unit": "kPa"}),  # a unit of another metric
    ],
)
def test_units_the_catalog_does_not_accept_are_unknown_unit(metric: str, sent: Any) -> None:
    rejection = only_rejection(run(device("telemetry"), telemetry({metric: sent})))
    assert (rejection.reason, rejection.device_id, rejection.count) == (UNKNOWN_UNIT, "w-1", 1)
    assert metric in rejection.detail and sent["unit"] in rejection.detail


@pytest.mark.parametrize(
    "sent",
    [
        True,
        False,
        "72",
        None,
        [72],
        {"value": True, "unit": "/min"},
        {"value": "72", "unit": "/min"},
        {"value": None, "unit": "/min"},
        {"value": 72},
        {"value": 72, "unit": 1},
        {"unit": "/min"},
    ],
)
def test_a_value_that_is_not_strictly_a_number_is_schema(sent: Any) -> None:
    rejection = only_rejection(run(device("telemetry"), telemetry({"heart_rate": sent})))
    assert (rejection.reason, rejection.device_id) == (SCHEMA, "w-1")
    assert "heart_rate" in rejection.detail


def test_unknown_metric_names_are_rejected() -> None:
    rejection = only_rejection(run(device("telemetry"), telemetry({"pulse": 72})))
    assert (rejection.reason, rejection.device_id, rejection.detail) == (UNKNOWN_METRIC, "w-1", "'pulse'")


@pytest.mark.parametrize(
    ("metric", "sent"),
    [
        ("heart_rate", 400),
        ("heart_rate", 19.99),
        ("spo2", 100.5),
        ("bed_occupied", 2),
        ("blood_glucose", {"value": 700, "unit": "mg/dL"}),  # 38.9 mmol/L after conversion
        ("body_temperature", {"value": 120, "unit": "[degF]"}),
        ("systolic_bp", {"value": 1e308, "unit": "kPa"}),  # overflows to inf on conversion
    ],
)
def test_implausible_values_are_out_of_range_after_conversion(metric: str, sent: Any) -> None:
    rejection = only_rejection(run(device("telemetry"), telemetry({metric: sent})))
    assert (rejection.reason, rejection.device_id) == (OUT_OF_RANGE, "w-1")


def test_range_bounds_are_inclusive() -> None:
    result = run(device("telemetry"), telemetry({"heart_rate": 20, "spo2": 100, "steps": 0}))
    assert values(result) == {"heart_rate": 20.0, "spo2": 100.0, "steps": 0.0}


def test_valid_metrics_are_kept_and_each_bad_one_rejected_once_per_reason() -> None:
    result = run(
        device("telemetry"),
        telemetry(
            {
                "heart_rate": 72,
                "spo2": 20,
                "pulse": 70,
                "respiration_rate": "16",
                "body_weight": {"value": 150, "unit": "lb"},
                "steps": 512,
            }
        ),
    )
    assert values(result) == {"heart_rate": 72.0, "steps": 512.0}
    assert reasons(result) == {
        (OUT_OF_RANGE, "w-1"): 1,
        (UNKNOWN_METRIC, "w-1"): 1,
        (SCHEMA, "w-1"): 1,
        (UNKNOWN_UNIT, "w-1"): 1,
    }
    assert result.seen_devices == ["w-1"]


def test_one_rejection_per_reason_counts_items_and_names_the_first_few() -> None:
    samples = [{"ts": NOW_MS, "metrics": {"heart_rate": 400 + i}} for i in range(5)]
    result = run(device("telemetry"), {"msg_id": "m-1", "samples": samples})
    (rejection,) = result.rejections
    assert (rejection.reason, rejection.count) == (OUT_OF_RANGE, 5)
    assert rejection.detail == (
        "samples[0].heart_rate=400 outside 20-250; samples[1].heart_rate=401 outside 20-250; "
        "samples[2].heart_rate=402 outside 20-250 (+2 more)"
    )


def test_unknown_top_level_fields_are_ignored() -> None:
    result = run(device("telemetry"), telemetry({"heart_rate": 72}, firmware_hint="x", devices={}))
    assert values(result) == {"heart_rate": 72.0} and result.rejections == []


def test_invalid_battery_in_telemetry_is_rejected_but_readings_are_kept() -> None:
    result = run(device("telemetry"), telemetry({"heart_rate": 72}, battery="81%"))
    assert values(result) == {"heart_rate": 72.0}
    assert result.statuses == []
    assert reasons(result) == {(SCHEMA, "w-1"): 1}


def test_battery_with_only_samples_is_stamped_with_the_receive_time() -> None:
    result = run(
        device("telemetry"),
        {"msg_id": "m-1", "samples": [{"ts": NOW_MS - 60_000, "metrics": {"steps": 5}}], "battery": 40},
    )
    assert result.statuses == [StatusUpdate("w-1", NOW_DT, None, 40.0)]


@pytest.mark.parametrize(
    ("payload", "detail"),
    [
        ({"ts": TS, "metrics": {"heart_rate": 72}}, "msg_id: missing"),
        ({"msg_id": "", "ts": TS, "metrics": {"heart_rate": 72}}, "msg_id"),
        ({"msg_id": "x" * 65, "ts": TS, "metrics": {"heart_rate": 72}}, "msg_id"),
        ({"msg_id": "a b", "ts": TS, "metrics": {"heart_rate": 72}}, "msg_id"),
        ({"msg_id": 17, "ts": TS, "metrics": {"heart_rate": 72}}, "msg_id"),
        (telemetry({"heart_rate": 72}, ts=None), "ts: missing"),
        ({"msg_id": "m-1", "metrics": {"heart_rate": 72}}, "ts: missing"),
        (telemetry({"heart_rate": 72}, ts="2026-11-22T14:00:00"), "ts"),  # naive: no offset
        (telemetry({"heart_rate": 72}, ts="2026-11-22"), "ts"),
        (telemetry({"heart_rate": 72}, ts="2026-11-22T14:00:00+0800"), "ts"),
        (telemetry({"heart_rate": 72}, ts="2026-13-22T14:00:00Z"), "ts"),
        (telemetry({"heart_rate": 72}, ts="yesterday"), "ts"),
        (telemetry({"heart_rate": 72}, ts=float(NOW_MS)), "ts"),  # epoch ms must be an integer
        (telemetry({"heart_rate": 72}, ts=True), "ts"),
        (telemetry({"heart_rate": 72}, ts=str(NOW_MS)), "ts"),
        (telemetry([72]), "metrics"),
        (telemetry({}), "metrics"),
        ({"msg_id": "m-1", "ts": TS}, "telemetry"),
    ],
)
def test_broken_telemetry_envelopes_are_schema_and_nothing_is_accepted(payload: Any, detail: str) -> None:
    result = run(device("telemetry"), payload)
    rejection = only_rejection(result)
    assert (rejection.reason, rejection.device_id) == (SCHEMA, "w-1")
    assert detail in rejection.detail
    assert result.seen_devices == [] and not result.immediate


def test_msg_id_is_reported_even_when_the_message_is_rejected() -> None:
    result = run(device("telemetry"), telemetry({"heart_rate": 72}, ts="not a time"))
    assert (result.source_id, result.msg_id) == ("w-1", "m-1")


# -- buffered samples and time ------------------------------------------------------------------


def test_buffered_samples_are_all_stored_with_their_own_times() -> None:
    samples = [{"ts": NOW_MS - (3 - i) * 60_000, "metrics": {"heart_rate": 70 + i}} for i in range(3)]
    result = run(device("telemetry"), {"msg_id": "m-1", "samples": samples})
    assert [(r.time, r.value) for r in result.readings] == [
        (NOW_DT - timedelta(minutes=3), 70.0),
        (NOW_DT - timedelta(minutes=2), 71.0),
        (NOW_DT - timedelta(minutes=1), 72.0),
    ]


def test_metrics_and_samples_in_one_message_are_both_processed() -> None:
    result = run(
        device("telemetry"),
        telemetry({"spo2": 97}, samples=[{"ts": NOW_MS - 1000, "metrics": {"heart_rate": 70}}]),
    )
    assert values(result) == {"spo2": 97.0, "heart_rate": 70.0}


def test_a_thousand_samples_are_accepted_and_more_is_schema() -> None:
    samples = [{"ts": NOW_MS - 1000 * i, "metrics": {"steps": 1}} for i in range(1001)]
    assert len(run(device("telemetry"), {"msg_id": "m-1", "samples": samples[:1000]}).readings) == 1000
    rejection = only_rejection(run(device("telemetry"), {"msg_id": "m-1", "samples": samples}))
    assert rejection.reason == SCHEMA and "1001" in rejection.detail


def test_five_identical_samples_are_one_reading_and_four_repeats() -> None:
    sample = {"ts": NOW_MS, "metrics": {"heart_rate": 72}}
    result = run(device("telemetry"), {"msg_id": "m-1", "samples": [sample] * 5})
    assert [(r.metric, r.value) for r in result.readings] == [("heart_rate", 72.0)]
    assert result.repeated == 4 and result.rejections == []


def test_a_repeated_reading_keeps_the_first_value_whatever_the_later_ones_say() -> None:
    # Same instant written two ways (epoch ms and RFC 3339): one reading, the first.
    result = run(
        device("telemetry"),
        {
            "msg_id": "m-1",
            "samples": [
                {"ts": NOW_MS, "metrics": {"heart_rate": 72, "spo2": 97}},
                {"ts": TS, "metrics": {"heart_rate": 90}},
                {"ts": NOW_MS - 60_000, "metrics": {"heart_rate": 71}},
            ],
            "ts": NOW_MS,
            "metrics": {"spo2": 95},
        },
    )
    assert sorted((r.metric, r.value) for r in result.readings) == [
        ("heart_rate", 71.0),
        ("heart_rate", 72.0),
        ("spo2", 97.0),
    ]
    assert result.repeated == 2


def test_repeats_are_per_device_in_a_hub_message() -> None:
    sample = {"ts": NOW_MS, "metrics": {"bed_occupied": 1}}
    result = run(
        hub("telemetry"),
        {
            "msg_id": "h-1",
            "devices": {"bed-1": {"samples": [sample, sample]}, "door-1": {"samples": [sample]}},
        },
    )
    assert sorted(r.device_id for r in result.readings) == ["bed-1", "door-1"]
    assert result.repeated == 1


def test_clock_skewed_samples_are_not_repeats_of_each_other() -> None:
    # Both get the receive time, which is not theirs: neither is dropped.
    future = [{"ts": NOW_MS + 3_600_000 + i, "metrics": {"heart_rate": 70 + i}} for i in range(2)]
    result = run(device("telemetry"), {"msg_id": "m-1", "samples": future})
    assert len(result.readings) == 2 and result.repeated == 0 and result.skewed == 2


@pytest.mark.parametrize("samples", [[], {}, "x", None])
def test_samples_must_be_a_non_empty_list(samples: Any) -> None:
    rejection = only_rejection(run(device("telemetry"), {"msg_id": "m-1", "samples": samples}))
    assert rejection.reason == SCHEMA and "samples" in rejection.detail


def test_bad_samples_are_rejected_one_by_one_and_good_ones_kept() -> None:
    samples = [
        {"ts": NOW_MS, "metrics": {"heart_rate": 72}},
        "not a sample",
        {"metrics": {"heart_rate": 72}},
        {"ts": NOW_MS, "metrics": {}},
        {"ts": NOW_MS},
    ]
    result = run(device("telemetry"), {"msg_id": "m-1", "samples": samples})
    assert len(result.readings) == 1
    assert reasons(result) == {(SCHEMA, "w-1"): 4}
    assert result.rejections[0].detail.startswith("samples[1]: must be an object; samples[2].ts: missing")


def test_a_clock_ahead_of_the_tolerance_gets_the_receive_time_and_a_flag() -> None:
    result = run(device("telemetry"), telemetry({"heart_rate": 72, "spo2": 97}, ts=NOW_MS + 301_000))
    assert [(r.time, r.flags) for r in result.readings] == [(NOW_DT, [CLOCK_SKEW])] * 2
    assert result.skewed == 2
    assert result.rejections == []


def test_a_clock_just_inside_the_tolerance_is_trusted() -> None:
    result = run(device("telemetry"), telemetry({"heart_rate": 72}, ts=NOW_MS + 300_000))
    assert result.readings[0].time == NOW_DT + timedelta(minutes=5)
    assert result.readings[0].flags == [] and result.skewed == 0


def test_a_far_future_clock_is_skew_not_an_error() -> None:
    result = run(device("telemetry"), telemetry({"heart_rate": 72}, ts="9999-12-31T23:59:59-12:00"))
    assert result.readings[0].flags == [CLOCK_SKEW] and result.rejections == []


def test_data_older_than_the_late_threshold_is_flagged_late() -> None:
    samples = [
        {"ts": NOW_MS - 601_000, "metrics": {"heart_rate": 70}},
        {"ts": NOW_MS - 600_000, "metrics": {"heart_rate": 71}},
    ]
    result = run(device("telemetry"), {"msg_id": "m-1", "samples": samples})
    assert [r.flags for r in result.readings] == [[LATE], []]


def test_data_past_the_horizon_is_too_old_per_sample() -> None:
    day_ms = 86_400_000
    samples = [
        {"ts": 0, "metrics": {"heart_rate": 70, "spo2": 97}},  # a reset clock: 1970
        {"ts": NOW_MS - 31 * day_ms, "metrics": {"heart_rate": 70}},
        {"ts": NOW_MS - 29 * day_ms, "metrics": {"heart_rate": 71}},
        {"ts": -(10**15), "metrics": {"heart_rate": 70}},  # before year 1: still just too old
    ]
    result = run(device("telemetry"), {"msg_id": "m-1", "samples": samples})
    assert [(r.value, r.flags) for r in result.readings] == [(71.0, [LATE])]
    assert reasons(result) == {(TOO_OLD, "w-1"): 3}
    assert result.rejections[0].detail.startswith("samples[0].ts 1970-01-01T00:00:00+00:00")


def test_a_too_old_top_level_ts_rejects_the_message() -> None:
    rejection = only_rejection(
        run(device("telemetry"), telemetry({"heart_rate": 72}, ts="0001-01-01T00:00:00Z"))
    )
    assert (rejection.reason, rejection.count) == (TOO_OLD, 1)


def test_clock_limits_come_from_the_policy() -> None:
    policy = Policy(load_catalog(), skew_tolerance_s=10, horizon_s=3600, late_after_s=60)
    samples = [
        {"ts": NOW_MS + 11_000, "metrics": {"steps": 1}},
        {"ts": NOW_MS - 61_000, "metrics": {"steps": 2}},
        {"ts": NOW_MS - 3_601_000, "metrics": {"steps": 3}},
    ]
    result = run(device("telemetry"), {"msg_id": "m-1", "samples": samples}, policy=policy)
    assert [(r.value, r.flags) for r in result.readings] == [(1.0, [CLOCK_SKEW]), (2.0, [LATE])]
    assert reasons(result) == {(TOO_OLD, "w-1"): 1}


# -- emergency flush -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("metrics", "immediate"),
    [
        ({"blood_glucose": {"value": 50, "unit": "mg/dL"}}, True),  # 2.78 mmol/L
        ({"blood_glucose": 2.9}, True),
        ({"blood_glucose": 3.0}, False),
        ({"spo2": 84}, False),  # spo2_critical needs 2 min: a flush gains nothing
        ({"heart_rate": 30}, False),
        ({"systolic_bp": 250, "steps": 100000}, False),
        ({"spo2": 97, "blood_glucose": 2.5}, True),
    ],
)
def test_a_reading_in_an_emergency_band_flushes_at_once(metrics: dict[str, Any], immediate: bool) -> None:
    assert run(device("telemetry"), telemetry(metrics)).immediate is immediate


def test_a_skewed_reading_never_flushes_because_it_never_feeds_rules() -> None:
    result = run(device("telemetry"), telemetry({"spo2": 80}, ts=NOW_MS + 3_600_000))
    assert result.readings and not result.immediate


def test_an_out_of_range_value_is_not_an_emergency() -> None:
    result = run(device("telemetry"), telemetry({"spo2": 20}))
    assert not result.immediate and reasons(result) == {(OUT_OF_RANGE, "w-1"): 1}


# -- whole-message rejections ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [b"", b"{", b"\xff\xfe{}", b'{"a": NaN}', b"[1, 2]", b'"text"', b"72", b"null", b'{"a": "\xed\xa0\x80"}'],
)
def test_anything_but_a_utf8_json_object_is_malformed_json(payload: bytes) -> None:
    rejection = only_rejection(run(device("telemetry"), payload))
    assert (rejection.reason, rejection.device_id) == (MALFORMED_JSON, "w-1")


def test_payloads_over_64_kib_are_too_large_before_anything_else() -> None:
    big = b"x" * 65537
    rejection = only_rejection(run(device("telemetry", "ghost-9"), big))
    assert (rejection.reason, rejection.device_id) == (TOO_LARGE, "ghost-9")
    assert "65537" in rejection.detail
    padded = orjson.dumps(telemetry({"heart_rate": 72}, pad=""))
    exact = padded.replace(b'"pad":""', b'"pad":"' + b" " * (65536 - len(padded)) + b'"')
    assert len(exact) == 65536
    assert run(device("telemetry"), exact).readings


def test_a_topic_outside_the_grammar_is_schema_without_a_device() -> None:
    result = run("eldercare/v1/devices/w-1/commands", telemetry({"heart_rate": 72}))
    rejection = only_rejection(result)
    assert (rejection.reason, rejection.device_id) == (SCHEMA, None)
    assert rejection.detail.startswith("topic")
    assert result.source_id is None


def test_a_non_string_topic_is_schema_not_a_crash() -> None:
    topic: Any = b"eldercare/v1/devices/w-1/telemetry"
    result = interpret(topic, b"{}", NOW, REGISTRY, POLICY)
    assert only_rejection(result).reason == SCHEMA


def test_unregistered_devices_are_unknown_device() -> None:
    result = run(device("telemetry", "ghost-9"), telemetry({"heart_rate": 72}))
    rejection = only_rejection(result)
    assert (rejection.reason, rejection.device_id) == (UNKNOWN_DEVICE, "ghost-9")
    assert result.source_id == "ghost-9"


def test_disabled_devices_are_device_disabled() -> None:
    rejection = only_rejection(run(device("telemetry", "w-off"), telemetry({"heart_rate": 72})))
    assert (rejection.reason, rejection.device_id) == (DEVICE_DISABLED, "w-off")


def test_registry_checks_come_before_decoding() -> None:
    assert only_rejection(run(device("telemetry", "ghost-9"), b"{")).reason == UNKNOWN_DEVICE


def test_an_internal_error_becomes_one_schema_rejection() -> None:
    class BrokenRegistry:
        def get(self, device_id: str) -> DeviceInfo:
            raise RuntimeError("boom")

    result = interpret(device("telemetry"), b"{}", NOW, cast(Registry, BrokenRegistry()), POLICY)
    assert result.rejections == [Rejection(SCHEMA, "internal: RuntimeError", "w-1")]
    assert not result.accepted and result.source_id == "w-1"


# -- hubs ------------------------------------------------------------------------------------------


def test_hub_wrapped_telemetry_is_stored_per_sub_device_and_others_rejected() -> None:
    result = run(
        hub("telemetry"),
        {
            "msg_id": "h-9",
            "devices": {
                "bed-1": {"ts": TS, "metrics": {"bed_occupied": 1, "heart_rate": 61}},
                "bed-2": {"ts": TS, "metrics": {"bed_occupied": 1}},  # attached to hub-2
                "ghost-9": {"ts": TS, "metrics": {"motion": 1}},
                "bed-off": {"ts": TS, "metrics": {"bed_occupied": 0}},
                "x": {"ts": TS, "metrics": {"motion": 1}},  # not even a device id
                "door-1": "closed",
            },
        },
    )
    assert (result.source_id, result.msg_id) == ("hub-1", "h-9")
    assert [(r.device_id, r.elder_id, r.metric) for r in result.readings] == [
        ("bed-1", "e-1", "bed_occupied"),
        ("bed-1", "e-1", "heart_rate"),
    ]
    assert reasons(result) == {
        (NOT_ATTACHED_TO_HUB, "bed-2"): 1,
        (UNKNOWN_DEVICE, "ghost-9"): 1,
        (DEVICE_DISABLED, "bed-off"): 1,
        (SCHEMA, "hub-1"): 1,
        (SCHEMA, "door-1"): 1,
    }
    assert result.seen_devices == ["bed-1", "hub-1"]


def test_a_hub_naming_thousands_of_strangers_yields_a_bounded_number_of_rejections() -> None:
    strangers = {f"gh-{i:05d}": 0 for i in range(4000)}
    attached_elsewhere = {"bed-2": 0, "w-1": 0}
    invalid = {f"bad id {i}": 0 for i in range(50)}
    devices = {**strangers, **attached_elsewhere, **invalid}
    result = run(hub("telemetry"), {"msg_id": "h-1", "devices": devices})
    counts = reasons(result)
    named = {device for (reason, device) in counts if reason == UNKNOWN_DEVICE and device != "hub-1"}
    # The first NAMED_STRANGERS are named (their ids are re-read from the registry), in order.
    assert named == {f"gh-{i:05d}" for i in range(NAMED_STRANGERS)}
    assert counts[(UNKNOWN_DEVICE, "hub-1")] == 4000 - NAMED_STRANGERS
    assert counts[(NOT_ATTACHED_TO_HUB, "hub-1")] == 2  # named after the first hundred
    assert counts[(SCHEMA, "hub-1")] == 50
    assert len(result.rejections) == NAMED_STRANGERS + 3
    assert all(len(r.detail) <= 600 for r in result.rejections)


def test_hub_sub_devices_may_upload_buffered_samples() -> None:
    samples = [{"ts": NOW_MS - i * 60_000, "metrics": {"motion": i % 2}} for i in range(20)]
    result = run(hub("telemetry"), {"msg_id": "h-9", "devices": {"door-1": {"samples": samples}}})
    assert len(result.readings) == 20
    assert {r.device_id for r in result.readings} == {"door-1"}
    assert [r.flags for r in result.readings[9:12]] == [[], [], [LATE]]


def test_hub_wrapped_events_are_events_of_the_sub_device() -> None:
    result = run(
        hub("events"),
        {"msg_id": "h-10", "devices": {"bed-1": {"ts": TS, "event": "bed_exit", "msg_id": "ignored"}}},
    )
    (event,) = result.events
    assert (event.device_id, event.elder_id, event.kind, event.details) == ("bed-1", "e-1", "bed_exit", {})
    assert result.immediate and result.msg_id == "h-10"


def test_all_sub_devices_rejected_means_nothing_seen() -> None:
    result = run(
        hub("telemetry"), {"msg_id": "h-9", "devices": {"bed-2": {"ts": TS, "metrics": {"motion": 1}}}}
    )
    assert only_rejection(result).reason == NOT_ATTACHED_TO_HUB
    assert result.seen_devices == []


@pytest.mark.parametrize(
    ("payload", "detail"),
    [
        ({"devices": {"bed-1": {"ts": TS, "metrics": {"motion": 1}}}}, "msg_id"),
        ({"msg_id": "h-9"}, "devices: missing"),
        ({"msg_id": "h-9", "devices": {}}, "devices"),
        ({"msg_id": "h-9", "devices": [{"bed-1": {}}]}, "devices"),
        ({"msg_id": "h-9", "ts": TS, "metrics": {"motion": 1}}, "devices"),  # hubs must wrap
    ],
)
def test_broken_hub_envelopes_are_schema(payload: Any, detail: str) -> None:
    rejection = only_rejection(run(hub("telemetry"), payload))
    assert (rejection.reason, rejection.device_id) == (SCHEMA, "hub-1")
    assert detail in rejection.detail


def test_a_hub_topic_for_a_device_that_is_not_a_hub_is_unknown_device() -> None:
    rejection = only_rejection(
        run(
            hub("telemetry", "w-1"),
            {"msg_id": "h-9", "devices": {"bed-1": {"ts": TS, "metrics": {"motion": 1}}}},
        )
    )
    assert (rejection.reason, rejection.device_id) == (UNKNOWN_DEVICE, "w-1")
    assert "wristband" in rejection.detail


def test_a_disabled_hub_is_device_disabled() -> None:
    rejection = only_rejection(run(hub("telemetry", "hub-off"), {"msg_id": "h-9", "devices": {}}))
    assert (rejection.reason, rejection.device_id) == (DEVICE_DISABLED, "hub-off")


def test_a_hub_status_is_the_hubs_own_status() -> None:
    result = run(hub("status"), {"online": False})
    assert result.statuses == [StatusUpdate("hub-1", NOW_DT, False)]
    assert result.seen_devices == ["hub-1"]


# -- events ----------------------------------------------------------------------------------------


def test_spec_event_example_is_an_immediate_event_with_its_details() -> None:
    location = {"lat": 29.306, "lon": 120.075, "accuracy_m": 12}
    result = run(
        device("events"),
        {
            "msg_id": "p-77",
            "ts": TS,
            "event": "fall_detected",
            "confidence": 0.93,
            "location": location,
            "data": {},
            "vendor_extra": 1,
        },
    )
    (event,) = result.events
    assert (event.time, event.device_id, event.elder_id, event.kind, event.flags) == (
        NOW_DT,
        "w-1",
        "e-1",
        "fall_detected",
        [],
    )
    assert event.details == {"confidence": 0.93, "location": location, "data": {}, "vendor_extra": 1}
    assert result.immediate and result.msg_id == "p-77" and result.seen_devices == ["w-1"]
    assert result.rejections == [] and result.readings == []


def test_unknown_event_types_are_dead_lettered_not_dropped() -> None:
    result = run(device("events"), {"msg_id": "p-78", "ts": TS, "event": "alien_abduction"})
    rejection = only_rejection(result)
    assert (rejection.reason, rejection.device_id) == (UNKNOWN_EVENT, "w-1")
    assert "alien_abduction" in rejection.detail
    assert not result.immediate and result.seen_devices == []


@pytest.mark.parametrize(
    ("payload", "detail"),
    [
        ({"msg_id": "p-1", "ts": TS}, "event: missing"),
        ({"msg_id": "p-1", "ts": TS, "event": 3}, "event: must be a string"),
        ({"msg_id": "p-1", "ts": TS, "event": ["sos_pressed"]}, "event"),
        ({"ts": TS, "event": "sos_pressed"}, "msg_id"),
        ({"msg_id": "p-1", "event": "sos_pressed"}, "ts: missing"),
        ({"msg_id": "p-1", "ts": TS, "event": "sos_pressed", "confidence": 1.5}, "confidence"),
        ({"msg_id": "p-1", "ts": TS, "event": "sos_pressed", "confidence": "high"}, "confidence"),
        ({"msg_id": "p-1", "ts": TS, "event": "sos_pressed", "confidence": True}, "confidence"),
    ],
)
def test_broken_events_are_schema(payload: Any, detail: str) -> None:
    rejection = only_rejection(run(device("events"), payload))
    assert (rejection.reason, rejection.device_id) == (SCHEMA, "w-1")
    assert detail in rejection.detail


def test_confidence_is_optional_and_may_be_null_or_a_bound() -> None:
    for confidence in (0, 1, None):
        result = run(
            device("events"), {"msg_id": "p-1", "ts": TS, "event": "sos_pressed", "confidence": confidence}
        )
        assert result.events, confidence


def test_event_clock_skew_late_and_too_old() -> None:
    def event_at(ts: int) -> Interpretation:
        return run(device("events"), {"msg_id": "p-1", "ts": ts, "event": "door_opened"})

    skewed = event_at(NOW_MS + 400_000)
    assert (skewed.events[0].time, skewed.events[0].flags, skewed.skewed) == (NOW_DT, [CLOCK_SKEW], 1)
    assert event_at(NOW_MS - 700_000).events[0].flags == [LATE]
    assert only_rejection(event_at(0)).reason == TOO_OLD


# -- status and command acks -----------------------------------------------------------------------


def test_spec_status_example_becomes_a_status_update() -> None:
    result = run(
        device("status"), {"ts": TS, "online": True, "battery": 64, "firmware": "2.1.0", "signal_dbm": -71}
    )
    assert result.statuses == [StatusUpdate("w-1", NOW_DT, True, 64.0, "2.1.0", -71.0)]
    assert result.msg_id is None and result.seen_devices == ["w-1"] and not result.immediate


def test_last_will_has_no_ts_and_takes_the_receive_time() -> None:
    result = run(device("status"), {"online": False}, now=NOW + 0.25)
    assert result.statuses == [StatusUpdate("w-1", NOW_DT + timedelta(milliseconds=250), False)]


def test_a_retained_status_is_stored_but_does_not_count_as_seen() -> None:
    result = run(device("status"), {"online": False}, retained=True)
    assert result.statuses and result.seen_devices == []


def test_a_status_with_no_fields_is_a_heartbeat() -> None:
    result = run(device("status"), {"uptime_s": 5})
    assert result.statuses == [StatusUpdate("w-1", NOW_DT, None)]
    assert result.rejections == [] and result.seen_devices == ["w-1"]


@pytest.mark.parametrize("retained", [True, False], ids=["retained", "live"])
def test_an_empty_status_clears_the_retained_status_silently(retained: bool) -> None:
    # The broker forwards a clearing publish live without the retain flag: both mean the same.
    result = run(device("status"), b"", retained=retained)
    assert result.rejections == [] and result.statuses == [StatusUpdate("w-1", NOW_DT, None)]
    assert result.seen_devices == [] and not result.immediate


def test_an_empty_status_from_a_disabled_device_is_still_device_disabled() -> None:
    assert only_rejection(run(device("status", "w-off"), b"")).reason == DEVICE_DISABLED


@pytest.mark.parametrize("channel", ["telemetry", "events", "commands/ack"])
def test_an_empty_payload_elsewhere_is_malformed_json(channel: str) -> None:
    assert only_rejection(run(device(channel), b"")).reason == MALFORMED_JSON


def test_bad_status_fields_are_rejected_and_good_ones_kept() -> None:
    result = run(device("status"), {"online": "yes", "battery": 50, "signal_dbm": "weak"})
    assert result.statuses == [StatusUpdate("w-1", NOW_DT, None, 50.0)]
    assert reasons(result) == {(SCHEMA, "w-1"): 2}
    assert "online" in result.rejections[0].detail and "signal_dbm" in result.rejections[0].detail


@pytest.mark.parametrize(
    "payload",
    [{"battery": 150}, {"battery": -1}, {"battery": True}, {"firmware": 2}, {"ts": "soon", "online": True}],
)
def test_a_status_with_only_bad_fields_is_schema(payload: dict[str, Any]) -> None:
    rejection = only_rejection(run(device("status"), payload))
    assert (rejection.reason, rejection.device_id) == (SCHEMA, "w-1")


def test_status_msg_id_is_optional_and_used_for_dedup_when_valid() -> None:
    assert run(device("status"), {"msg_id": "s-1", "online": True}).msg_id == "s-1"
    ignored = run(device("status"), {"msg_id": "not valid!", "online": True})
    assert ignored.msg_id is None and ignored.statuses


def test_a_command_ack_is_a_command_ack_event() -> None:
    result = run(device("commands/ack"), {"cmd_id": "c-42", "status": "done", "msg_id": "a-1"})
    (event,) = result.events
    assert (event.time, event.device_id, event.kind, event.details) == (
        NOW_DT,
        "w-1",
        "command_ack",
        {"cmd_id": "c-42", "status": "done"},
    )
    assert result.msg_id == "a-1" and result.immediate and result.seen_devices == ["w-1"]


def test_a_command_ack_uses_its_ts_when_given() -> None:
    result = run(device("commands/ack"), {"cmd_id": "c-42", "ts": NOW_MS - 2000})
    assert result.events[0].time == NOW_DT - timedelta(seconds=2)


@pytest.mark.parametrize("cmd_id", [None, "", "x" * 65, "c 42", 42])
def test_a_command_ack_needs_a_valid_cmd_id(cmd_id: Any) -> None:
    rejection = only_rejection(run(device("commands/ack"), {"cmd_id": cmd_id}))
    assert (rejection.reason, rejection.device_id) == (SCHEMA, "w-1")
    assert "cmd_id" in rejection.detail

"""The metric catalog matches device-mqtt.md and rules.md, and refuses broken catalog files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from eldercare.devices.catalog import CatalogError, load_catalog, parse_catalog

# device-mqtt.md, "Metric catalog": metric -> (unit, alternatives, low, high, LOINC)
SPEC_METRICS = {
    "heart_rate": ("/min", (), 20, 250, "8867-4"),
    "spo2": ("%", (), 50, 100, "59408-5"),
    "systolic_bp": ("mm[Hg]", ("kPa",), 50, 260, "8480-6"),
    "diastolic_bp": ("mm[Hg]", ("kPa",), 30, 160, "8462-4"),
    "respiration_rate": ("/min", (), 4, 60, "9279-1"),
    "body_temperature": ("Cel", ("[degF]",), 30, 43, "8310-5"),
    "blood_glucose": ("mmol/L", ("mg/dL",), 1.0, 35, "15074-8"),
    "body_weight": ("kg", ("[lb_av]",), 20, 250, "29463-7"),
    "steps": ("{steps}", (), 0, 100000, "55423-8"),
    "bed_occupied": ("1", (), 0, 1, None),
    "motion": ("1", (), 0, 1, None),
    "room_temperature": ("Cel", ("[degF]",), -20, 60, None),
}

SPEC_EVENTS = {
    "sos_pressed", "fall_detected", "fall_recovered", "bed_exit", "bed_return", "door_opened",
    "left_safe_zone", "returned_safe_zone", "smoke_detected", "gas_leak", "water_leak",
    "medication_taken", "medication_missed", "wearable_removed", "wearable_worn", "tamper",
    "service_requested",
}  # fmt: skip


def test_default_catalog_has_exactly_the_spec_metrics() -> None:
    catalog = load_catalog()
    assert set(catalog.metrics) == set(SPEC_METRICS)
    for name, (unit, alternatives, low, high, loinc) in SPEC_METRICS.items():
        metric = catalog.metrics[name]
        assert metric.name == name
        assert metric.unit == unit
        assert tuple(metric.alternatives) == alternatives
        assert (metric.low, metric.high) == (low, high)
        assert metric.loinc == loinc


def test_default_catalog_lists_exactly_the_spec_event_types() -> None:
    assert load_catalog().event_types == frozenset(SPEC_EVENTS)


def test_alternative_units_convert_to_the_canonical_unit() -> None:
    for metric in load_catalog().metrics.values():
        for unit, conversion in metric.alternatives.items():
            assert (conversion.source, conversion.target) == (unit, metric.unit)


def test_emergency_bands_follow_the_rules_spec() -> None:
    metrics = load_catalog().metrics
    banded = {name for name, m in metrics.items() if m.emergency_below is not None or m.emergency_above}
    assert banded == {"blood_glucose"}  # one reading raises hypoglycaemia_severe; the rest are sustained
    assert metrics["blood_glucose"].emergency_below == 3.0
    assert metrics["blood_glucose"].in_emergency_band(2.9)
    assert not metrics["blood_glucose"].in_emergency_band(3.0)
    assert not metrics["heart_rate"].in_emergency_band(151)
    assert not metrics["steps"].in_emergency_band(0)


def test_plausible_range_is_inclusive() -> None:
    heart_rate = load_catalog().metrics["heart_rate"]
    assert heart_rate.plausible(20) and heart_rate.plausible(250)
    assert not heart_rate.plausible(19.9) and not heart_rate.plausible(250.1)


def test_default_catalog_is_loaded_once() -> None:
    assert load_catalog() is load_catalog()


def test_catalog_is_read_only() -> None:
    metrics: Any = load_catalog().metrics  # Any: these writes are what the types forbid
    with pytest.raises(TypeError):
        metrics["pulse"] = metrics["heart_rate"]
    with pytest.raises(AttributeError):
        metrics["spo2"].low = 0


def test_a_deployment_can_load_its_own_catalog_file(tmp_path: Path) -> None:
    path = tmp_path / "catalog.toml"
    path.write_text(
        '[metrics.pulse]\nunit = "/min"\nlow = 30\nhigh = 220\n[events]\ntypes = ["sos_pressed"]\n'
    )
    catalog = load_catalog(path)
    assert set(catalog.metrics) == {"pulse"}
    assert catalog.metrics["pulse"].loinc is None
    assert catalog.metrics["pulse"].alternatives == {}
    assert catalog.event_types == {"sos_pressed"}


@pytest.mark.parametrize(
    ("metrics", "message"),
    [
        ({}, "missing or empty"),
        ({"pulse": {"unit": "/min", "low": 30}}, "low and high"),
        ({"pulse": {"unit": "/min", "low": 300, "high": 30}}, "low <= high"),
        ({"pulse": {"unit": "/min", "low": True, "high": 30}}, "must be a number"),
        ({"pulse": {"low": 30, "high": 220}}, "unit"),
        ({"pulse": {"unit": "/min", "low": 30, "high": 220, "hgih": 1}}, "unknown keys"),
        ({"pulse": {"unit": "/min", "low": 30, "high": 220, "alternatives": ["Hz"]}}, "no conversion"),
        ({"Pulse Rate": {"unit": "/min", "low": 30, "high": 220}}, "snake_case"),
    ],
)
def test_broken_catalogs_are_refused_with_a_reason(metrics: dict, message: str) -> None:
    with pytest.raises(CatalogError, match=message):
        parse_catalog({"metrics": metrics, "events": {"types": []}})


def test_event_types_must_be_names() -> None:
    with pytest.raises(CatalogError, match=r"events\.types"):
        parse_catalog({"metrics": {"x": {"unit": "1", "low": 0, "high": 1}}, "events": {"types": [1]}})

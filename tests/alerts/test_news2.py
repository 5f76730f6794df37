"""NEWS2 scores observations as the RCP 2017 chart does, and maps the result to the news2 rule."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from eldercare.alerts.news2 import (
    BODY_TEMPERATURE_CHART,
    HEART_RATE_CHART,
    RESPIRATION_RATE_CHART,
    SPO2_SCALE_1_CHART,
    SPO2_SCALE_2_ON_AIR_CHART,
    SPO2_SCALE_2_ON_OXYGEN_CHART,
    SYSTOLIC_BP_CHART,
    Band,
    Chart,
    ClinicalRisk,
    Consciousness,
    News2Score,
    Observations,
    Parameter,
    observations_from_latest,
    score,
    severity,
)

NOW = datetime(2026, 11, 25, 14, 0, tzinfo=UTC)
CHARTS = (
    RESPIRATION_RATE_CHART,
    SPO2_SCALE_1_CHART,
    SPO2_SCALE_2_ON_AIR_CHART,
    SPO2_SCALE_2_ON_OXYGEN_CHART,
    SYSTOLIC_BP_CHART,
    HEART_RATE_CHART,
    BODY_TEMPERATURE_CHART,
)


def scored(**fields: Any) -> News2Score:
    """The NEWS2 score of observations made of ``fields`` (everything else missing)."""
    return score(Observations(**fields))


# --- The chart, edge by edge ---------------------------------------------------------------
# Each edge of RCP 2017 Chart 1, on both sides: (parameter, value, score).
CHART_EDGES = [
    # Respiration rate (per minute): ≤8 → 3, 9–11 → 1, 12–20 → 0, 21–24 → 2, ≥25 → 3
    (Parameter.RESPIRATION_RATE, 4, 3),
    (Parameter.RESPIRATION_RATE, 8, 3),
    (Parameter.RESPIRATION_RATE, 9, 1),
    (Parameter.RESPIRATION_RATE, 11, 1),
    (Parameter.RESPIRATION_RATE, 12, 0),
    (Parameter.RESPIRATION_RATE, 20, 0),
    (Parameter.RESPIRATION_RATE, 21, 2),
    (Parameter.RESPIRATION_RATE, 24, 2),
    (Parameter.RESPIRATION_RATE, 25, 3),
    (Parameter.RESPIRATION_RATE, 60, 3),
    # SpO2 scale 1 (%): ≤91 → 3, 92–93 → 2, 94–95 → 1, ≥96 → 0
    (Parameter.SPO2, 50, 3),
    (Parameter.SPO2, 91, 3),
    (Parameter.SPO2, 92, 2),
    (Parameter.SPO2, 93, 2),
    (Parameter.SPO2, 94, 1),
    (Parameter.SPO2, 95, 1),
    (Parameter.SPO2, 96, 0),
    (Parameter.SPO2, 100, 0),
    # Systolic blood pressure (mmHg): ≤90 → 3, 91–100 → 2, 101–110 → 1, 111–219 → 0, ≥220 → 3
    (Parameter.SYSTOLIC_BP, 50, 3),
    (Parameter.SYSTOLIC_BP, 90, 3),
    (Parameter.SYSTOLIC_BP, 91, 2),
    (Parameter.SYSTOLIC_BP, 100, 2),
    (Parameter.SYSTOLIC_BP, 101, 1),
    (Parameter.SYSTOLIC_BP, 110, 1),
    (Parameter.SYSTOLIC_BP, 111, 0),
    (Parameter.SYSTOLIC_BP, 219, 0),
    (Parameter.SYSTOLIC_BP, 220, 3),
    (Parameter.SYSTOLIC_BP, 260, 3),
    # Pulse (per minute): ≤40 → 3, 41–50 → 1, 51–90 → 0, 91–110 → 1, 111–130 → 2, ≥131 → 3
    (Parameter.HEART_RATE, 20, 3),
    (Parameter.HEART_RATE, 40, 3),
    (Parameter.HEART_RATE, 41, 1),
    (Parameter.HEART_RATE, 50, 1),
    (Parameter.HEART_RATE, 51, 0),
    (Parameter.HEART_RATE, 90, 0),
    (Parameter.HEART_RATE, 91, 1),
    (Parameter.HEART_RATE, 110, 1),
    (Parameter.HEART_RATE, 111, 2),
    (Parameter.HEART_RATE, 130, 2),
    (Parameter.HEART_RATE, 131, 3),
    (Parameter.HEART_RATE, 250, 3),
    # Temperature (°C): ≤35.0 → 3, 35.1–36.0 → 1, 36.1–38.0 → 0, 38.1–39.0 → 1, ≥39.1 → 2
    (Parameter.BODY_TEMPERATURE, 30.0, 3),
    (Parameter.BODY_TEMPERATURE, 35.0, 3),
    (Parameter.BODY_TEMPERATURE, 35.1, 1),
    (Parameter.BODY_TEMPERATURE, 36.0, 1),
    (Parameter.BODY_TEMPERATURE, 36.1, 0),
    (Parameter.BODY_TEMPERATURE, 38.0, 0),
    (Parameter.BODY_TEMPERATURE, 38.1, 1),
    (Parameter.BODY_TEMPERATURE, 39.0, 1),
    (Parameter.BODY_TEMPERATURE, 39.1, 2),
    (Parameter.BODY_TEMPERATURE, 43.0, 2),
]

# Values between the chart's bands read as a monitor shows them, rounded half up to the
# precision the edges are written in (whole units; temperature to 0.1 °C).
BETWEEN_BANDS = [
    (Parameter.RESPIRATION_RATE, 8.49, 3),
    (Parameter.RESPIRATION_RATE, 8.5, 1),  # reads as 9
    (Parameter.RESPIRATION_RATE, 11.5, 0),  # reads as 12
    (Parameter.RESPIRATION_RATE, 20.49, 0),
    (Parameter.RESPIRATION_RATE, 20.5, 2),  # reads as 21
    (Parameter.RESPIRATION_RATE, 24.5, 3),  # reads as 25
    (Parameter.SPO2, 91.49, 3),
    (Parameter.SPO2, 91.5, 2),  # reads as 92
    (Parameter.SPO2, 95.5, 0),  # reads as 96
    (Parameter.SYSTOLIC_BP, 90.5, 2),  # reads as 91
    (Parameter.SYSTOLIC_BP, 110.49, 1),
    (Parameter.SYSTOLIC_BP, 110.5, 0),  # reads as 111
    (Parameter.SYSTOLIC_BP, 219.49, 0),
    (Parameter.SYSTOLIC_BP, 219.5, 3),  # reads as 220
    (Parameter.HEART_RATE, 40.5, 1),  # reads as 41
    (Parameter.HEART_RATE, 90.49, 0),
    (Parameter.HEART_RATE, 90.5, 1),  # reads as 91
    (Parameter.HEART_RATE, 130.5, 3),  # reads as 131
    (Parameter.BODY_TEMPERATURE, 35.04, 3),
    (Parameter.BODY_TEMPERATURE, 35.05, 1),  # reads as 35.1 (the float is 35.0499…)
    (Parameter.BODY_TEMPERATURE, 36.04, 1),
    (Parameter.BODY_TEMPERATURE, 36.05, 0),  # reads as 36.1
    (Parameter.BODY_TEMPERATURE, 38.04, 0),
    (Parameter.BODY_TEMPERATURE, 38.05, 1),  # reads as 38.1
    (Parameter.BODY_TEMPERATURE, 39.04, 1),
    (Parameter.BODY_TEMPERATURE, 39.05, 2),  # reads as 39.1
]


@pytest.mark.parametrize(("parameter", "value", "expected"), CHART_EDGES + BETWEEN_BANDS)
def test_each_parameter_scores_as_the_chart_says(parameter: Parameter, value: float, expected: int) -> None:
    result = scored(**{parameter.value: value})
    assert result.scores[parameter] == expected


# SpO2 scale 2 (%): ≤83 → 3, 84–85 → 2, 86–87 → 1, 88–92 → 0; ≥93 on air → 0;
# on oxygen 93–94 → 1, 95–96 → 2, ≥97 → 3.
SCALE_2_LOW_EDGES: list[tuple[float, int]] = [
    (50, 3),
    (83, 3),
    (84, 2),
    (85, 2),
    (86, 1),
    (87, 1),
    (88, 0),
    (92, 0),
]
SCALE_2_ON_AIR_HIGH = [(93, 0), (94, 0), (95, 0), (96, 0), (97, 0), (100, 0), (92.5, 0)]
SCALE_2_ON_OXYGEN_HIGH = [(93, 1), (94, 1), (95, 2), (96, 2), (97, 3), (100, 3), (92.49, 0), (92.5, 1)]


@pytest.mark.parametrize(("spo2", "expected"), SCALE_2_LOW_EDGES + SCALE_2_ON_AIR_HIGH)
def test_spo2_scale_2_on_air_scores_nothing_above_the_target(spo2: float, expected: int) -> None:
    result = scored(spo2=spo2, spo2_scale=2, supplemental_oxygen=False)
    assert result.scores[Parameter.SPO2] == expected
    assert result.scores[Parameter.AIR_OR_OXYGEN] == 0


@pytest.mark.parametrize(("spo2", "expected"), SCALE_2_LOW_EDGES + SCALE_2_ON_OXYGEN_HIGH)
def test_spo2_scale_2_on_oxygen_scores_saturation_above_the_target(spo2: float, expected: int) -> None:
    result = scored(spo2=spo2, spo2_scale=2, supplemental_oxygen=True)
    assert result.scores[Parameter.SPO2] == expected
    assert result.scores[Parameter.AIR_OR_OXYGEN] == 2


def test_spo2_97_on_oxygen_scores_0_on_scale_1_and_3_on_scale_2() -> None:
    assert scored(spo2=97, supplemental_oxygen=True).scores[Parameter.SPO2] == 0
    assert scored(spo2=97, spo2_scale=2, supplemental_oxygen=True).scores[Parameter.SPO2] == 3


def test_supplemental_oxygen_scores_2_and_air_0() -> None:
    on_oxygen = scored(supplemental_oxygen=True)
    on_air = scored(supplemental_oxygen=False)
    assert on_oxygen.scores[Parameter.AIR_OR_OXYGEN] == 2 and on_oxygen.assumed == frozenset()
    assert on_air.scores[Parameter.AIR_OR_OXYGEN] == 0 and on_air.assumed == frozenset()


def test_unknown_oxygen_is_scored_as_air_and_reported_as_assumed() -> None:
    result = scored(spo2=97, spo2_scale=2)
    assert result.scores[Parameter.AIR_OR_OXYGEN] == 0
    assert result.scores[Parameter.SPO2] == 0  # scale 2 read on air
    assert result.assumed == {Parameter.AIR_OR_OXYGEN}
    assert Parameter.AIR_OR_OXYGEN not in result.missing


@pytest.mark.parametrize(
    ("consciousness", "expected"),
    [
        (Consciousness.ALERT, 0),
        (Consciousness.NEW_CONFUSION, 3),
        (Consciousness.VOICE, 3),
        (Consciousness.PAIN, 3),
        (Consciousness.UNRESPONSIVE, 3),
    ],
)
def test_consciousness_alert_scores_0_and_cvpu_3(consciousness: Consciousness, expected: int) -> None:
    assert scored(consciousness=consciousness).scores[Parameter.CONSCIOUSNESS] == expected


@pytest.mark.parametrize("chart", CHARTS)
def test_every_rounded_reading_falls_in_exactly_one_band(chart: Chart) -> None:
    per_unit = 10**chart.decimals  # readings are whole steps of the chart's precision
    for step in range(0, 300 * per_unit):
        reading = chart.read(step / per_unit)
        assert sum(band.contains(reading) for band in chart.bands) == 1


@pytest.mark.parametrize(
    "bands",
    [
        (Band(None, 8, 3), Band(10, None, 0)),  # a gap: 9 belongs nowhere
        (Band(None, 8, 3), Band(8, None, 0)),  # an overlap: 8 in both
        (Band(0, 8, 3), Band(9, None, 0)),  # closed below
        (Band(None, 8, 3), Band(9, 20, 0)),  # closed above
        (Band(None, 8, 4), Band(9, None, 0)),  # not a NEWS2 score
        (),
    ],
)
def test_a_chart_with_gaps_overlaps_or_closed_ends_is_refused(bands: tuple[Band, ...]) -> None:
    with pytest.raises(ValueError):
        Chart(bands)


# --- Missing parameters, aggregate, risk ----------------------------------------------------


def test_missing_parameters_are_left_out_and_listed() -> None:
    result = scored(heart_rate=72, spo2=97, supplemental_oxygen=False)
    assert result.present == {Parameter.HEART_RATE, Parameter.SPO2, Parameter.AIR_OR_OXYGEN}
    assert result.missing == {
        Parameter.RESPIRATION_RATE,
        Parameter.SYSTOLIC_BP,
        Parameter.CONSCIOUSNESS,
        Parameter.BODY_TEMPERATURE,
    }
    assert result.aggregate == 0


def test_nothing_measured_scores_only_the_assumed_air() -> None:
    result = scored()
    assert result.scores == {Parameter.AIR_OR_OXYGEN: 0}
    assert result.assumed == {Parameter.AIR_OR_OXYGEN}
    assert len(result.missing) == 6


def test_a_full_set_adds_up_every_parameter_in_chart_order() -> None:
    result = scored(
        respiration_rate=24,  # 2
        spo2=93,  # 2 (scale 1)
        supplemental_oxygen=True,  # 2
        systolic_bp=105,  # 1
        heart_rate=115,  # 2
        consciousness=Consciousness.ALERT,  # 0
        body_temperature=38.5,  # 1
    )
    assert list(result.scores.items()) == [
        (Parameter.RESPIRATION_RATE, 2),
        (Parameter.SPO2, 2),
        (Parameter.AIR_OR_OXYGEN, 2),
        (Parameter.SYSTOLIC_BP, 1),
        (Parameter.HEART_RATE, 2),
        (Parameter.CONSCIOUSNESS, 0),
        (Parameter.BODY_TEMPERATURE, 1),
    ]
    assert result.missing == frozenset()
    assert result.aggregate == 10
    assert result.risk is ClinicalRisk.HIGH


# Observations with a known aggregate, and whether a single parameter scored 3.
AGGREGATE_0 = {"heart_rate": 72, "spo2": 98, "supplemental_oxygen": False}
AGGREGATE_4 = {"heart_rate": 115, "respiration_rate": 22, "supplemental_oxygen": False}  # 2 + 2
AGGREGATE_5 = {"heart_rate": 115, "respiration_rate": 22, "systolic_bp": 105}  # 2 + 2 + 1
AGGREGATE_6 = {"heart_rate": 115, "respiration_rate": 22, "supplemental_oxygen": True}  # 2 + 2 + 2
AGGREGATE_7 = {**AGGREGATE_6, "systolic_bp": 105}  # + 1
RED_3 = {"systolic_bp": 85}  # 3, alone
RED_4 = {"systolic_bp": 85, "heart_rate": 95}  # 3 + 1
RED_5 = {"systolic_bp": 85, "respiration_rate": 22}  # 3 + 2


@pytest.mark.parametrize(
    ("fields", "aggregate", "red_score", "risk"),
    [
        (AGGREGATE_0, 0, False, ClinicalRisk.LOW),
        (AGGREGATE_4, 4, False, ClinicalRisk.LOW),
        (RED_3, 3, True, ClinicalRisk.LOW_MEDIUM),
        (RED_4, 4, True, ClinicalRisk.LOW_MEDIUM),
        (AGGREGATE_5, 5, False, ClinicalRisk.MEDIUM),
        (RED_5, 5, True, ClinicalRisk.MEDIUM),
        (AGGREGATE_6, 6, False, ClinicalRisk.MEDIUM),
        (AGGREGATE_7, 7, False, ClinicalRisk.HIGH),
    ],
)
def test_clinical_risk_follows_the_aggregate_and_a_single_3(
    fields: dict[str, Any], aggregate: int, red_score: bool, risk: ClinicalRisk
) -> None:
    result = scored(**fields)
    assert (result.aggregate, result.red_score, result.risk) == (aggregate, red_score, risk)


# --- The news2 rule's severity --------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        (AGGREGATE_0, None),
        (AGGREGATE_4, None),
        (AGGREGATE_5, "urgent"),
        (AGGREGATE_6, "urgent"),
        (AGGREGATE_7, "emergency"),
        (RED_3, None),  # low-medium clinical risk, but the rule raises from 5
        (RED_5, "emergency"),  # a single 3 with aggregate 5
    ],
)
def test_severity_follows_the_rules_defaults(fields: dict[str, Any], expected: str | None) -> None:
    assert severity(scored(**fields)) == expected


def test_severity_thresholds_come_from_the_rule_set() -> None:
    assert severity(scored(**AGGREGATE_4), urgent_from=4) == "urgent"
    assert severity(scored(**AGGREGATE_6), emergency_from=6) == "emergency"
    assert severity(scored(**RED_5), red_emergency_from=6) == "urgent"
    assert severity(scored(**RED_3), red_emergency_from=3) == "emergency"


# --- From the latest readings ---------------------------------------------------------------


def test_latest_readings_become_observations() -> None:
    latest = {
        "heart_rate": (72.0, NOW - timedelta(minutes=1)),
        "spo2": (91.0, NOW - timedelta(minutes=2)),
        "blood_glucose": (5.5, NOW),  # not a NEWS2 parameter: ignored
    }
    observations = observations_from_latest(
        latest, NOW, spo2_scale=2, supplemental_oxygen=True, consciousness=Consciousness.ALERT
    )
    assert observations == Observations(
        heart_rate=72.0,
        spo2=91.0,
        spo2_scale=2,
        supplemental_oxygen=True,
        consciousness=Consciousness.ALERT,
    )


def test_readings_older_than_the_max_age_are_missing() -> None:
    latest = {
        "heart_rate": (140.0, NOW - timedelta(minutes=15)),  # exactly 15 min: still counts
        "systolic_bp": (85.0, NOW - timedelta(minutes=15, seconds=1)),  # stale
        "respiration_rate": (30.0, NOW - timedelta(hours=3)),  # stale
        "body_temperature": (37.0, NOW + timedelta(seconds=30)),  # stamped a little ahead: fresh
    }
    observations = observations_from_latest(latest, NOW)
    assert (observations.heart_rate, observations.body_temperature) == (140.0, 37.0)
    assert observations.systolic_bp is None and observations.respiration_rate is None
    result = score(observations)
    assert Parameter.SYSTOLIC_BP in result.missing and Parameter.RESPIRATION_RATE in result.missing
    assert result.aggregate == 3


def test_the_max_age_is_configurable() -> None:
    latest = {"heart_rate": (72.0, NOW - timedelta(minutes=6))}
    assert observations_from_latest(latest, NOW, max_age=timedelta(minutes=5)).heart_rate is None
    assert observations_from_latest(latest, NOW, max_age=timedelta(minutes=10)).heart_rate == 72.0


@pytest.mark.parametrize("fields", [{"heart_rate": float("nan")}, {"spo2": float("inf")}, {"spo2_scale": 3}])
def test_observations_refuse_non_numbers_and_unknown_scales(fields: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Observations(**fields)


# --- Properties -----------------------------------------------------------------------------


def optional(low: float, high: float) -> st.SearchStrategy[float | None]:
    """A value between ``low`` and ``high``, or missing."""
    return st.none() | st.floats(min_value=low, max_value=high, allow_nan=False)


observations = st.builds(
    Observations,
    respiration_rate=optional(0, 80),
    spo2=optional(40, 100),
    systolic_bp=optional(30, 300),
    heart_rate=optional(10, 300),
    body_temperature=optional(25, 45),
    consciousness=st.none() | st.sampled_from(Consciousness),
    supplemental_oxygen=st.none() | st.booleans(),
    spo2_scale=st.sampled_from([1, 2]),
)


@given(observations)
def test_the_aggregate_is_the_sum_of_the_parameter_scores(o: Observations) -> None:
    result = score(o)
    assert result.aggregate == sum(result.scores.values())
    assert result.present | result.missing == set(Parameter)
    assert not result.present & result.missing
    assert all(0 <= s <= 3 for s in result.scores.values())
    assert result.red_score == any(s == 3 for s in result.scores.values())


@given(observations)
def test_adding_supplemental_oxygen_never_lowers_the_score(o: Observations) -> None:
    on_oxygen = score(replace(o, supplemental_oxygen=True))
    on_air = score(replace(o, supplemental_oxygen=False))
    unknown = score(replace(o, supplemental_oxygen=None))
    assert on_oxygen.aggregate >= on_air.aggregate == unknown.aggregate


@given(observations, st.sampled_from([c for c in Consciousness if c is not Consciousness.ALERT]))
def test_losing_alertness_adds_3(o: Observations, cvpu: Consciousness) -> None:
    alert = score(replace(o, consciousness=Consciousness.ALERT))
    assert score(replace(o, consciousness=cvpu)).aggregate == alert.aggregate + 3


@given(observations, observations)
def test_measuring_one_more_parameter_never_lowers_the_score(o: Observations, other: Observations) -> None:
    before = score(o).aggregate
    for name in (
        "respiration_rate",
        "spo2",
        "systolic_bp",
        "heart_rate",
        "body_temperature",
        "consciousness",
    ):
        if getattr(o, name) is None and getattr(other, name) is not None:
            assert score(replace(o, **{name: getattr(other, name)})).aggregate >= before


@given(st.sampled_from(CHARTS), st.floats(-50, 350), st.floats(-50, 350))
def test_a_reading_further_from_normal_never_scores_less(chart: Chart, a: float, b: float) -> None:
    lower, higher = sorted((a, b))
    normal = [band for band in chart.bands if band.score == 0]
    normal_from, normal_to = normal[0].low, normal[-1].high
    if normal_from is not None and higher <= normal_from:  # both below normal: lower is further
        assert chart.score(lower) >= chart.score(higher)
    if normal_to is not None and lower >= normal_to:  # both above normal: higher is further
        assert chart.score(higher) >= chart.score(lower)

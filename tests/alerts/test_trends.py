"""The trend rules on means and daily means the store answers, at an injected time."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from eldercare.alerts import trends
from eldercare.alerts.careplan import CarePlan
from eldercare.alerts.decisions import ClearCondition, OpenAlert
from eldercare.alerts.lifecycle import ElderAlerts
from eldercare.alerts.rules import Severity
from eldercare.alerts.trends import DayMean, Mean, TrendFacts
from tests.alerts.scheduled_helpers import SHANGHAI, elder, kinds, local

NOW = datetime(2024, 6, 3, 4, 30, tzinfo=UTC)
HYPERTENSION = CarePlan(conditions=frozenset({"hypertension"}))
DIABETES = CarePlan(conditions=frozenset({"type2_diabetes"}))
HEART = CarePlan(conditions=frozenset({"heart_failure"}))


def mean(metric: str, value: float, readings: int = 7, last: datetime = NOW) -> Mean:
    return Mean(metric, value, readings, last - timedelta(days=6), last.replace(minute=0))


def bp(systolic: float, diastolic: float, readings: int = 7) -> TrendFacts:
    return TrendFacts(
        means={
            "bp_uncontrolled": {
                "systolic_bp": mean("systolic_bp", systolic, readings),
                "diastolic_bp": mean("diastolic_bp", diastolic, readings),
            }
        }
    )


@pytest.mark.parametrize(
    ("systolic", "diastolic", "raised"),
    [(139.9, 89.9, False), (140.0, 80.0, True), (120.0, 90.0, True), (139.99, 89.99, False)],
)
def test_a_7_day_mean_of_140_systolic_or_90_diastolic_is_uncontrolled(
    systolic: float, diastolic: float, raised: bool
) -> None:
    found = trends.decide(elder(HYPERTENSION), bp(systolic, diastolic), NOW)
    assert kinds(found) == (["OpenAlert"] if raised else [])
    if raised:
        [alert] = found
        assert isinstance(alert, OpenAlert)
        assert (alert.severity, alert.route) == (Severity.follow_up, "follow_up")
        means = alert.match.evidence["means"]
        assert means["systolic_bp"] == {
            "mean": systolic,
            "readings": 7,
            "from": (NOW - timedelta(days=6)).isoformat(),
            "to": NOW.replace(minute=0).isoformat(),
        }


def test_the_uncontrolled_alert_leaves_its_task_to_the_pulled_forward_chronic_follow_up() -> None:
    [alert] = trends.decide(elder(HYPERTENSION), bp(150, 95), NOW)
    assert isinstance(alert, OpenAlert) and alert.task is None
    alone = CarePlan(conditions=frozenset({"hypertension"}), disabled=frozenset({"chronic_follow_up"}))
    [own] = trends.decide(elder(alone), bp(150, 95), NOW)
    assert isinstance(own, OpenAlert) and own.task is not None and own.task.kind == "bp_uncontrolled"


def test_bp_trends_need_a_hypertension_plan_and_three_readings() -> None:
    assert trends.decide(elder(CarePlan()), bp(160, 100), NOW) == []
    assert trends.decide(elder(HYPERTENSION), bp(160, 100, readings=2), NOW) == []
    assert kinds(trends.decide(elder(HYPERTENSION), bp(160, 100, readings=3), NOW)) == ["OpenAlert"]


def test_an_uncontrolled_mean_is_raised_once_and_clears_below_the_margin() -> None:
    ctx = elder(HYPERTENSION)
    assert kinds(trends.decide(ctx, bp(150, 95), NOW)) == ["OpenAlert"]
    assert trends.decide(ctx, bp(151, 95), NOW + timedelta(minutes=30)) == []  # same hour's data
    assert trends.decide(ctx, bp(134, 85), NOW + timedelta(hours=1)) == []  # inside, not by 5 %
    [cleared] = trends.decide(ctx, bp(133, 85.5), NOW + timedelta(hours=2))
    assert isinstance(cleared, ClearCondition) and cleared.evidence["margin"] == 0.05
    reason = "7-day mean back inside by 5%: diastolic_bp 85.5, systolic_bp 133.0"
    assert cleared.evidence["reason"] == reason


def test_a_resolved_trend_raises_again_only_on_a_newer_reading() -> None:
    resolved = ElderAlerts(resolved={"bp_uncontrolled": (NOW + timedelta(hours=1), Severity.follow_up)})
    ctx = elder(HYPERTENSION, resolved)
    assert trends.decide(ctx, bp(150, 95), NOW + timedelta(hours=3)) == []
    newer = TrendFacts(
        means={"bp_uncontrolled": {"systolic_bp": mean("systolic_bp", 150, last=NOW + timedelta(hours=2))}}
    )
    assert kinds(trends.decide(ctx, newer, NOW + timedelta(hours=3))) == ["OpenAlert"]


def test_glucose_means_are_of_fasting_hours_in_the_elders_zone() -> None:
    ctx = elder(CarePlan(conditions=frozenset({"type2_diabetes"}), timezone="Europe/London"))
    [query] = trends.mean_queries([ctx], NOW)
    assert query.rule_id == "glucose_uncontrolled" and query.metrics == ("blood_glucose",)
    assert str(query.local_hours) == "05:00-09:00"
    assert query.elders == (("e-1", "Europe/London"),)
    assert (query.start, query.end) == (
        datetime(2024, 5, 27, 5, tzinfo=UTC),
        datetime(2024, 6, 3, 5, tzinfo=UTC),
    )
    facts = TrendFacts(means={"glucose_uncontrolled": {"blood_glucose": mean("blood_glucose", 7.0)}})
    [alert] = trends.decide(ctx, facts, NOW)
    assert isinstance(alert, OpenAlert) and alert.match.evidence["fasting_hours"] == "05:00-09:00"
    low = TrendFacts(means={"glucose_uncontrolled": {"blood_glucose": mean("blood_glucose", 6.99)}})
    assert trends.decide(elder(DIABETES), low, NOW) == []


# --- weight gain --------------------------------------------------------------------------


def days(*means: tuple[int, float]) -> TrendFacts:
    """Daily means by how many days before 2024-06-03 (Shanghai)."""
    out = []
    for back, value in means:
        day = date(2024, 6, 3) - timedelta(days=back)
        last = local(SHANGHAI, day.year, day.month, day.day, 7, 0).astimezone(UTC)
        out.append(DayMean(day, value, 1, last))
    return TrendFacts(days={"weight_gain": out})


def test_two_kilos_within_three_days_is_urgent_for_heart_failure() -> None:
    now = local(SHANGHAI, 2024, 6, 3, 9, 0)
    [alert] = trends.decide(elder(HEART), days((3, 70.0), (2, 71.0), (1, 71.5), (0, 72.0)), now)
    assert isinstance(alert, OpenAlert) and alert.severity is Severity.urgent
    assert alert.match.value == 2.0
    assert alert.match.evidence["from"] == {"day": "2024-05-31", "mean": 70.0}
    assert alert.match.evidence["to"] == {"day": "2024-06-03", "mean": 72.0}
    assert trends.decide(elder(HEART), days((3, 70.0), (0, 71.99)), now) == []
    assert trends.decide(elder(HEART), days((4, 70.0), (0, 72.5)), now) == []  # 4 days: too far
    assert trends.decide(elder(CarePlan()), days((3, 70.0), (0, 72.5)), now) == []


def test_a_rise_ending_before_yesterday_is_not_judged_again() -> None:
    now = local(SHANGHAI, 2024, 6, 3, 9, 0)
    assert trends.decide(elder(HEART), days((5, 70.0), (2, 73.0)), now) == []
    assert kinds(trends.decide(elder(HEART), days((4, 70.0), (1, 73.0)), now)) == ["OpenAlert"]


def test_the_rise_query_starts_at_local_midnight_four_days_back() -> None:
    ctx = elder(CarePlan(conditions=frozenset({"heart_failure"}), timezone="Asia/Shanghai"))
    now = local(SHANGHAI, 2024, 6, 3, 9, 30)
    [query] = trends.rise_queries([ctx], now)
    assert query.elders == (("e-1", "Asia/Shanghai", local(SHANGHAI, 2024, 5, 30, 0, 0)),)
    assert query.end == datetime(2024, 6, 3, 2, tzinfo=UTC)


@given(st.lists(st.floats(60, 90, allow_nan=False), min_size=2, max_size=4))
def test_weight_gain_is_the_latest_day_over_the_lowest_of_the_three_before(weights: list[float]) -> None:
    now = local(SHANGHAI, 2024, 6, 3, 20, 0)
    facts = days(*[(len(weights) - 1 - i, w) for i, w in enumerate(weights)])
    raised = bool(trends.decide(elder(HEART), facts, now))
    assert raised == (weights[-1] - min(weights[:-1]) >= 2.0)

"""The rule set is data: the packaged file holds every rule of rules.md with its numbers, and
every kind of mistake in a rule file is refused naming the file, the rule and the field."""

from __future__ import annotations

import copy
import tomllib
from datetime import time, timedelta
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from eldercare.alerts.rules import (
    Condition,
    DeviceSilentRule,
    EventRule,
    EventUnansweredRule,
    MeanTrendRule,
    News2Rule,
    NoActivityRule,
    PeriodicFollowUpRule,
    RiseTrendRule,
    RuleSetError,
    Severity,
    ThresholdRule,
    TimeWindow,
    format_duration,
    load_rule_set,
    parse_duration,
    parse_rule_set,
    thaw,
)

ROOT = Path(__file__).resolve().parents[2]

# rules.md, every rule by section.
SPEC_RULES = {
    "threshold": {
        "spo2_critical", "spo2_low", "hr_extreme", "hr_abnormal", "hypoglycaemia_severe",
        "hypoglycaemia", "hyperglycaemia", "bp_crisis", "hypotension", "fever",
    },
    "news2": {"news2"},
    "event": {
        "sos", "fall_no_recovery", "fall_recovered", "smoke_or_gas", "night_bed_exit", "wandering",
        "medication_missed", "service_request",
    },
    "absence": {"inactivity", "device_offline", "low_battery", "wearable_removed"},
    "trend": {"bp_uncontrolled", "weight_gain", "glucose_uncontrolled"},
    "schedule": {"chronic_follow_up", "checkup_results"},
}  # fmt: skip

# rules.md threshold table: rule -> (conditions, window, severity)
SPEC_THRESHOLDS = {
    "spo2_critical": (["spo2 < 85"], "2m", "emergency"),
    "spo2_low": (["spo2 < 90"], "5m", "urgent"),
    "hr_extreme": (["heart_rate < 35", "heart_rate > 150"], "2m", "emergency"),
    "hr_abnormal": (["heart_rate < 40", "heart_rate > 130"], "10m", "urgent"),
    "hypoglycaemia_severe": (["blood_glucose < 3"], "0s", "emergency"),
    "hypoglycaemia": (["blood_glucose < 3.9"], "0s", "urgent"),
    "hyperglycaemia": (["blood_glucose > 16.7"], "0s", "urgent"),
    "bp_crisis": (["systolic_bp >= 180", "diastolic_bp >= 120"], "0s", "urgent"),
    "hypotension": (["systolic_bp < 90"], "0s", "urgent"),
    "fever": (["body_temperature >= 38"], "0s", "follow_up"),
}


def default_data() -> dict[str, Any]:
    """The packaged rule file as plain data, to break in tests."""
    text = resources.files("eldercare.alerts").joinpath("default_rules.toml").read_text(encoding="utf-8")
    return tomllib.loads(text)


def rule_data(data: dict[str, Any], rule_id: str) -> dict[str, Any]:
    for section in ("threshold", "event", "absence", "trend", "schedule"):
        for item in data.get(section, []):
            if item["id"] == rule_id:
                return item
    raise KeyError(rule_id)


def problems(data: dict[str, Any]) -> list[tuple[str | None, str | None, str]]:
    """(rule, field, message) of every problem parse_rule_set finds; each names the file."""
    with pytest.raises(RuleSetError) as caught:
        parse_rule_set(data, source="site_rules.toml")
    assert all(p.source == "site_rules.toml" for p in caught.value.problems)
    assert all(line.startswith("site_rules.toml: ") for line in str(caught.value).splitlines())
    return [(p.rule, p.field, p.message) for p in caught.value.problems]


# --- the packaged rule set ----------------------------------------------------------------


def test_packaged_rule_set_holds_every_rule_of_rules_md() -> None:
    rule_set = load_rule_set()
    by_section: dict[str, set[str]] = {}
    for rule in rule_set.rules:
        by_section.setdefault(rule.section, set()).add(rule.id)
    assert by_section == SPEC_RULES
    for rule in rule_set.rules:
        assert rule.title.zh_cn and rule.title.en


@pytest.mark.parametrize("rule_id", sorted(SPEC_THRESHOLDS))
def test_threshold_numbers_are_those_of_rules_md(rule_id: str) -> None:
    conditions, window, severity = SPEC_THRESHOLDS[rule_id]
    rule = load_rule_set().rule(rule_id)
    assert isinstance(rule, ThresholdRule)
    assert [str(c) for c in rule.any] == conditions
    assert rule.window == parse_duration(window)
    assert rule.severity == severity


def test_inhibitions_confirmation_levels_and_copd_override() -> None:
    rule_set = load_rule_set()
    assert rule_set.inhibits("spo2_critical") == {"spo2_low"}
    assert rule_set.inhibits("hr_extreme") == {"hr_abnormal"}
    assert rule_set.inhibits("hypoglycaemia_severe") == {"hypoglycaemia"}
    assert rule_set.inhibited_by("hr_abnormal") == {"hr_extreme"}
    assert rule_set.inhibited_by("fever") == frozenset()
    bp_crisis = rule_set.rule("bp_crisis")
    assert isinstance(bp_crisis, ThresholdRule) and bp_crisis.confirm_within == timedelta(minutes=15)
    fever = rule_set.rule("fever")
    assert isinstance(fever, ThresholdRule)
    assert [(lv.severity, [str(c) for c in lv.any]) for lv in fever.levels] == [
        ("urgent", ["body_temperature >= 39.1"])
    ]
    spo2_low = rule_set.rule("spo2_low")
    assert isinstance(spo2_low, ThresholdRule)
    assert thaw(spo2_low.condition_overrides) == {"copd": {"any": ["spo2 < 85"]}}


def test_news2_and_defaults() -> None:
    rule_set = load_rule_set()
    news2 = rule_set.news2
    assert isinstance(news2, News2Rule)
    assert (news2.urgent_from, news2.emergency_from, news2.single_three_emergency_from) == (5, 7, 5)
    assert news2.max_age == timedelta(minutes=15)
    assert news2.spo2_scale == 1 and news2.spo2_scale_2_for == {"copd"}
    d = rule_set.defaults
    assert d.cooldown == timedelta(minutes=30) and d.hysteresis_margin == 0.05
    assert d.late_after == timedelta(minutes=10) and d.late_emergency_as == "urgent"
    assert rule_set.cooldown("fever") == timedelta(minutes=30)
    assert rule_set.hysteresis_margin("spo2_low") == 0.05
    assert set(rule_set.conditions) == {
        "hypertension", "type2_diabetes", "copd", "heart_failure", "cognitive_impairment",
    }  # fmt: skip


def test_event_rules_of_rules_md() -> None:
    rule_set = load_rule_set()

    def event(rule_id: str) -> EventRule:
        rule = rule_set.rule(rule_id)
        assert isinstance(rule, EventRule)
        return rule

    assert event("sos").on == {"sos_pressed"} and event("sos").severity == "emergency"
    assert rule_set.route_for("sos", Severity.emergency) == "operator_first"
    operator_first = rule_set.routes["operator_first"]
    assert [(s.notify, s.ack_within) for s in operator_first.steps] == [
        (("12349",), timedelta(seconds=60)),
        (("120",), None),
    ]
    fall = event("fall_no_recovery")
    assert (fall.on, fall.unless, fall.within) == (
        {"fall_detected"},
        {"fall_recovered"},
        timedelta(seconds=60),
    )
    assert rule_set.route_for("fall_no_recovery", Severity.emergency) == "emergency"
    assert rule_set.routes["emergency"].steps[0].notify[0] == "120"
    recovered = event("fall_recovered")
    assert recovered.after == {"fall_detected"} and recovered.severity == "follow_up"
    assert recovered.task is not None
    assert (recovered.task.kind, recovered.task.due, recovered.task.assignee) == (
        "fall_risk_assessment",
        timedelta(days=7),
        "family_doctor",
    )
    assert event("smoke_or_gas").on == {"smoke_detected", "gas_leak"}
    assert rule_set.routes["fire"].steps[0].if_configured == ("119",)
    night = event("night_bed_exit")
    assert str(night.during) == "22:00-06:00" and night.unless == {"bed_return"}
    assert night.within == timedelta(minutes=30) and night.severity == "urgent"
    wandering = event("wandering")
    assert wandering.requires == {"cognitive_impairment"} and wandering.severity == "urgent"
    assert [(lv.severity, str(lv.during)) for lv in wandering.levels] == [("emergency", "20:00-06:00")]
    missed = event("medication_missed")
    assert [(lv.severity, lv.count, lv.within) for lv in missed.levels] == [
        ("urgent", 2, timedelta(hours=48))
    ]
    service = event("service_request")
    assert service.task is not None and service.task.due == timedelta(hours=2)
    assert service.task.assignee == "service_desk" and service.severity == "follow_up"


def test_absence_trend_and_schedule_rules_of_rules_md() -> None:
    rule_set = load_rule_set()
    inactivity = rule_set.rule("inactivity")
    assert isinstance(inactivity, NoActivityRule)
    assert inactivity.silent_for == timedelta(hours=4) and str(inactivity.active_hours) == "08:00-20:00"
    assert inactivity.requires == {"lives_alone"} and inactivity.severity == "urgent"
    offline = rule_set.rule("device_offline")
    assert isinstance(offline, DeviceSilentRule)
    assert (offline.intervals, offline.at_least, offline.lwt_offline_for) == (
        3,
        timedelta(minutes=10),
        timedelta(minutes=10),
    )
    assert offline.severities == ("follow_up", "urgent")
    battery = rule_set.rule("low_battery")
    assert (
        getattr(battery, "below", None) == 15
        and rule_set.route_for("low_battery", battery.severities[0]) == "family"
    )
    removed = rule_set.rule("wearable_removed")
    assert isinstance(removed, EventUnansweredRule)
    assert removed.silent_for == timedelta(hours=2) and str(removed.active_hours) == "08:00-20:00"
    bp = rule_set.rule("bp_uncontrolled")
    assert isinstance(bp, MeanTrendRule) and bp.over == timedelta(days=7)
    assert [str(c) for c in bp.any] == ["systolic_bp >= 140", "diastolic_bp >= 90"]
    assert bp.requires == {"hypertension"}
    weight = rule_set.rule("weight_gain")
    assert isinstance(weight, RiseTrendRule)
    assert (weight.metric, weight.by, weight.within, weight.severity) == (
        "body_weight",
        2.0,
        timedelta(days=3),
        "urgent",
    )
    glucose = rule_set.rule("glucose_uncontrolled")
    assert isinstance(glucose, MeanTrendRule) and [str(c) for c in glucose.any] == ["blood_glucose >= 7"]
    assert glucose.fasting_only and glucose.requires == {"type2_diabetes"}
    chronic = rule_set.rule("chronic_follow_up")
    assert isinstance(chronic, PeriodicFollowUpRule)
    assert chronic.conditions == {"hypertension", "type2_diabetes"}
    assert chronic.task.due == timedelta(days=90) and chronic.pulled_forward_within == timedelta(days=14)
    assert chronic.pulled_forward_by == {"bp_uncontrolled", "glucose_uncontrolled"}
    checkup = rule_set.rule("checkup_results")
    task = getattr(checkup, "task", None)
    assert task is not None and task.due == timedelta(days=30) and task.overdue_route == "team_lead"


def test_lookups_by_metric_and_event_kind() -> None:
    rule_set = load_rule_set()
    assert [r.id for r in rule_set.thresholds_for("heart_rate")] == ["hr_extreme", "hr_abnormal"]
    assert {r.id for r in rule_set.thresholds_for("systolic_bp")} == {"bp_crisis", "hypotension"}
    assert rule_set.thresholds_for("steps") == ()
    assert [r.id for r in rule_set.events_for("fall_detected")] == ["fall_no_recovery"]
    assert {r.id for r in rule_set.listening_to("fall_detected")} == {"fall_no_recovery", "fall_recovered"}
    assert {r.id for r in rule_set.listening_to("wearable_worn")} == {"wearable_removed"}
    assert "fever" in rule_set and "nope" not in rule_set


def test_the_rule_set_round_trips_through_its_data() -> None:
    rule_set = load_rule_set()
    again = parse_rule_set(rule_set.as_data())
    assert again == rule_set and hash(again) == hash(rule_set)


def test_a_file_on_disk_loads(tmp_path: Path) -> None:
    path = tmp_path / "site.toml"
    path.write_bytes(resources.files("eldercare.alerts").joinpath("default_rules.toml").read_bytes())
    assert load_rule_set(path).ids == load_rule_set().ids


def test_the_wheel_ships_the_rule_file() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert "*.toml" in pyproject["tool"]["setuptools"]["package-data"]["eldercare.alerts"]


# --- values -------------------------------------------------------------------------------


def test_severity_is_ordered() -> None:
    assert Severity.follow_up < Severity.urgent < Severity.emergency
    assert max(Severity.urgent, Severity.emergency, Severity.follow_up) == Severity.emergency
    assert sorted(["emergency", "follow_up", "urgent"], key=Severity) == ["follow_up", "urgent", "emergency"]
    assert Severity("urgent") >= Severity.urgent and not Severity.urgent > Severity.emergency
    assert Severity.urgent < "emergency" and Severity.emergency > "follow_up"  # by rank, not alphabet
    with pytest.raises(ValueError):
        assert Severity.urgent < "critical"


@pytest.mark.parametrize(
    ("condition", "breaching", "inside"),
    [
        ("spo2 < 90", [89.9, 50], [90, 97]),
        ("heart_rate > 150", [150.5], [150, 60]),
        ("body_temperature >= 38.0", [38.0, 39.1], [37.9]),
        ("systolic_bp <= 90", [90, 80], [91]),
    ],
)
def test_condition_breaches(condition: str, breaching: list[float], inside: list[float]) -> None:
    c = Condition.model_validate(condition)
    assert all(c.breaches(v) for v in breaching)
    assert not any(c.breaches(v) for v in inside)


def test_condition_clears_with_the_hysteresis_margin() -> None:
    low = Condition.model_validate("spo2 < 90")
    assert not low.clears(92, 0.05) and low.clears(94.5, 0.05)
    high = Condition.model_validate("heart_rate > 150")
    assert not high.clears(145, 0.05) and high.clears(142.5, 0.05)


def test_threshold_rule_severity_of_a_reading() -> None:
    fever = load_rule_set().rule("fever")
    assert isinstance(fever, ThresholdRule)
    assert fever.severity_of("body_temperature", 37.5) is None
    assert fever.severity_of("body_temperature", 38.4) == "follow_up"
    assert fever.severity_of("body_temperature", 39.1) == "urgent"


@pytest.mark.parametrize(
    ("text", "seconds"), [("60s", 60), ("2m", 120), ("4h", 14400), ("7d", 604800), ("0s", 0)]
)
def test_durations(text: str, seconds: int) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)
    assert parse_duration(format_duration(timedelta(seconds=seconds))) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["60", "2 min", "1.5h", "-1m", "3w", ""])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


def test_time_window_wraps_midnight() -> None:
    night = TimeWindow.model_validate("22:00-06:00")
    assert night.wraps_midnight
    assert night.contains(time(23, 30)) and night.contains(time(0, 0)) and night.contains(time(5, 59))
    assert not night.contains(time(6, 0)) and not night.contains(time(12, 0))
    day = TimeWindow.model_validate("08:00-20:00")
    assert day.contains(time(8, 0)) and not day.contains(time(20, 0)) and not day.wraps_midnight


# --- every kind of mistake ----------------------------------------------------------------


def broken(change: Any) -> list[tuple[str | None, str | None, str]]:
    data = copy.deepcopy(default_data())
    change(data)
    return problems(data)


def test_unknown_keys_are_refused() -> None:
    found = broken(lambda d: rule_data(d, "spo2_low").update(windw="5m"))
    assert found == [("spo2_low", "windw", "unknown key")]
    found = broken(lambda d: d["defaults"].update(colldown="5m"))
    assert found == [(None, "[defaults].colldown", "unknown key")]
    found = broken(lambda d: d.update(thresholds=[]))
    assert found == [(None, "[thresholds]", "unknown key")]


def test_bad_durations_and_windows_name_rule_and_field() -> None:
    def change(d: dict[str, Any]) -> None:
        rule_data(d, "spo2_low")["window"] = "5 min"
        rule_data(d, "night_bed_exit")["during"] = "22:00-6:00"
        rule_data(d, "medication_missed")["levels"][0]["within"] = "2 days"

    found = broken(change)
    assert [(rule, field) for rule, field, _ in found] == [
        ("spo2_low", "window"),
        ("night_bed_exit", "during"),
        ("medication_missed", "levels[0].within"),
    ]
    assert "'5 min' is not a duration" in found[0][2]
    assert "not a time window" in found[1][2]


def test_unknown_metric_and_value_outside_the_plausible_range() -> None:
    def change(d: dict[str, Any]) -> None:
        rule_data(d, "hr_extreme")["any"] = ["heart_rat < 35", "heart_rate > 300"]
        rule_data(d, "weight_gain")["metric"] = "weight"

    found = broken(change)
    assert found[0][:2] == ("hr_extreme", "any[0]") and "unknown metric 'heart_rat'" in found[0][2]
    assert found[1][:2] == ("hr_extreme", "any[1]") and "plausible range 20-250" in found[1][2]
    assert found[2][:2] == ("weight_gain", "metric") and "unknown metric 'weight'" in found[2][2]
    assert len(found) == 3


def test_a_condition_that_does_not_parse() -> None:
    found = broken(lambda d: rule_data(d, "fever").update(any=["body_temperature = 38"]))
    assert found[0][:2] == ("fever", "any[0]") and "is not a condition" in found[0][2]


def test_unknown_event_kind() -> None:
    found = broken(lambda d: rule_data(d, "sos").update(on=["sos_press"]))
    assert found[0][:2] == ("sos", "on") and "sos_press" in found[0][2] and "event" in found[0][2]
    found = broken(lambda d: rule_data(d, "wearable_removed").update(unless=["wearable_on"]))
    assert found[0][:2] == ("wearable_removed", "unless")


def test_duplicate_ids() -> None:
    found = broken(lambda d: rule_data(d, "hypotension").update(id="fever"))
    assert ("fever", "id", "duplicate rule id") in found


def test_inhibits_must_name_a_rule_on_the_same_metric_of_lower_severity() -> None:
    found = broken(lambda d: rule_data(d, "spo2_critical").update(inhibits=["spo2_lo"]))
    assert found == [("spo2_critical", "inhibits", "no rule 'spo2_lo'")]
    found = broken(lambda d: rule_data(d, "spo2_critical").update(inhibits=["hr_abnormal"]))
    assert found[0][:2] == ("spo2_critical", "inhibits") and "same metric" in found[0][2]
    found = broken(lambda d: rule_data(d, "spo2_low").update(inhibits=["spo2_critical"]))
    assert found[0][:2] == ("spo2_low", "inhibits") and "not of lower severity" in found[0][2]


def test_levels_out_of_order() -> None:
    found = broken(lambda d: rule_data(d, "fever")["levels"][0].update(severity="follow_up"))
    assert found[0][:2] == ("fever", "levels[0]") and "must be higher than follow_up" in found[0][2]
    found = broken(lambda d: rule_data(d, "fever")["levels"][0].update(any=["body_temperature >= 37.5"]))
    assert found[0][:2] == ("fever", "levels[0].any[0]") and "beyond" in found[0][2]
    found = broken(lambda d: rule_data(d, "wandering")["levels"][0].update(severity="urgent"))
    assert found[0][:2] == ("wandering", "levels[0]")
    found = broken(lambda d: rule_data(d, "device_offline").update(only_safety_device_severity="follow_up"))
    assert found[0][:2] == ("device_offline", "only_safety_device_severity")


def test_unknown_condition_names() -> None:
    found = broken(lambda d: rule_data(d, "wandering").update(requires=["dementia"]))
    assert found[0][:2] == ("wandering", "requires") and "'dementia'" in found[0][2]
    found = broken(lambda d: rule_data(d, "spo2_low")["condition_overrides"].update(asthma={"window": "1m"}))
    assert found[0][:2] == ("spo2_low", "condition_overrides.asthma") and "unknown condition" in found[0][2]
    found = broken(lambda d: rule_data(d, "chronic_follow_up").update(conditions=["diabetes"]))
    assert found[0][:2] == ("chronic_follow_up", "conditions")


def test_condition_overrides_are_validated_like_the_rule() -> None:
    found = broken(
        lambda d: rule_data(d, "spo2_low")["condition_overrides"]["copd"].update(any=["spo2 < 20"])
    )
    assert (
        found[0][:2] == ("spo2_low", "condition_overrides.copd.any[0]") and "plausible range" in found[0][2]
    )
    found = broken(lambda d: rule_data(d, "spo2_low")["condition_overrides"]["copd"].update(id="x"))
    assert found == [("spo2_low", "condition_overrides.copd.id", "cannot be overridden")]


def test_unknown_routes_and_kinds() -> None:
    found = broken(lambda d: rule_data(d, "sos").update(route="operator_fist"))
    assert found[0][:2] == ("sos", "route") and "operator_fist" in found[0][2]
    found = broken(lambda d: rule_data(d, "inactivity").update(kind="no_motion"))
    assert found[0][:2] == ("inactivity", "kind") and "no_activity" in found[0][2]


def test_every_mistake_is_reported_at_once() -> None:
    def change(d: dict[str, Any]) -> None:
        rule_data(d, "spo2_low")["window"] = "5"
        rule_data(d, "fever")["severity"] = "high"
        rule_data(d, "sos")["on"] = ["panic"]
        d["news2"]["urgent_from"] = 9

    assert [(rule, field) for rule, field, _ in broken(change)] == [
        ("spo2_low", "window"),
        ("fever", "severity"),
        ("news2", "urgent_from"),
        ("sos", "on"),
    ]


def test_a_file_that_is_not_toml(tmp_path: Path) -> None:
    path = tmp_path / "site.toml"
    path.write_text("[[threshold]\nid = 1\n", encoding="utf-8")
    with pytest.raises(RuleSetError, match=r"site.toml: not valid TOML"):
        load_rule_set(path)
    with pytest.raises(RuleSetError, match="cannot read"):
        load_rule_set(tmp_path / "missing.toml")

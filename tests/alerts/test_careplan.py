"""Care plans adjust the rule set per elder: condition overrides, then personal ones; rules the
plan does not meet or disables are left out; mistakes name the plan's field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from eldercare.alerts.careplan import (
    CarePlan,
    CarePlanError,
    effective_rules,
    load_care_plan,
    parse_care_plan,
)
from eldercare.alerts.rules import RuleSet, RuleSetError, Severity, ThresholdRule, load_rule_set

RULES = load_rule_set()
#: Rules only some elders get (rules.md: care-plan conditions, lives alone).
CONDITIONAL = {
    "wandering",
    "inactivity",
    "bp_uncontrolled",
    "weight_gain",
    "glucose_uncontrolled",
    "chronic_follow_up",
}


def plan(**fields: Any) -> CarePlan:
    return parse_care_plan(fields)


def threshold(rule_set: RuleSet, rule_id: str) -> ThresholdRule:
    rule = rule_set.rule(rule_id)
    assert isinstance(rule, ThresholdRule)
    return rule


def plan_problems(care_plan: CarePlan) -> list[tuple[str | None, str | None, str]]:
    with pytest.raises(CarePlanError) as caught:
        effective_rules(RULES, care_plan, source="care plan of e-1")
    assert all(line.startswith("care plan of e-1: ") for line in str(caught.value).splitlines())
    return [(p.rule, p.field, p.message) for p in caught.value.problems]


def test_a_plan_without_conditions_gets_every_unconditional_rule() -> None:
    rules = effective_rules(RULES, CarePlan())
    assert rules.ids == RULES.ids - CONDITIONAL
    assert rules.news2 is not None and rules.news2.spo2_scale == 1
    assert CarePlan().timezone == "Asia/Shanghai" and str(CarePlan().zone) == "Asia/Shanghai"


def test_copd_lowers_spo2_low_and_takes_news2_scale_2() -> None:
    rules = effective_rules(RULES, plan(conditions=["copd"]))
    assert [str(c) for c in threshold(rules, "spo2_low").any] == ["spo2 < 85"]
    assert threshold(rules, "spo2_low").condition_overrides == {}
    assert rules.news2 is not None and rules.news2.spo2_scale == 2
    assert plan(conditions=["copd"]).spo2_scale_under(RULES) == 2
    # the plan's own scale wins
    rules = effective_rules(RULES, plan(conditions=["copd"], spo2_scale=1))
    assert rules.news2 is not None and rules.news2.spo2_scale == 1


def test_personal_overrides_apply_after_the_condition_overrides() -> None:
    care_plan = plan(conditions=["copd"], overrides={"spo2_low": {"any": ["spo2 < 88"], "window": "10m"}})
    spo2_low = threshold(effective_rules(RULES, care_plan), "spo2_low")
    assert [str(c) for c in spo2_low.any] == ["spo2 < 88"]
    assert spo2_low.window.total_seconds() == 600


def test_effective_rules_leave_the_rule_set_as_it_was() -> None:
    before = RULES.as_data()
    effective_rules(
        RULES, plan(conditions=["copd"], overrides={"fever": {"any": ["body_temperature >= 37.8"]}})
    )
    assert RULES.as_data() == before
    assert [str(c) for c in threshold(RULES, "spo2_low").any] == ["spo2 < 90"]


@pytest.mark.parametrize(
    ("fields", "gets"),
    [
        ({"conditions": ["cognitive_impairment"]}, {"wandering"}),
        ({"lives_alone": True}, {"inactivity"}),
        ({"conditions": ["hypertension"]}, {"bp_uncontrolled", "chronic_follow_up"}),
        ({"conditions": ["type2_diabetes"]}, {"glucose_uncontrolled", "chronic_follow_up"}),
        ({"conditions": ["heart_failure"]}, {"weight_gain"}),
        ({"conditions": ["copd"]}, set()),
    ],
)
def test_requires_decides_which_conditional_rules_apply(fields: dict[str, Any], gets: set[str]) -> None:
    rules = effective_rules(RULES, plan(**fields))
    assert rules.ids & CONDITIONAL == gets


def test_a_follow_up_is_pulled_forward_only_by_trends_the_elder_has() -> None:
    rules = effective_rules(RULES, plan(conditions=["type2_diabetes"]))
    assert getattr(rules.rule("chronic_follow_up"), "pulled_forward_by", None) == {"glucose_uncontrolled"}


def test_disabled_rules_are_left_out_and_so_are_inhibitions_of_them() -> None:
    rules = effective_rules(RULES, plan(disabled=["spo2_low", "low_battery"]))
    assert "spo2_low" not in rules and "low_battery" not in rules
    assert rules.inhibits("spo2_critical") == frozenset()
    assert rules.inhibits("hr_extreme") == {"hr_abnormal"}


def test_news2_can_be_tuned_or_disabled() -> None:
    rules = effective_rules(RULES, plan(overrides={"news2": {"urgent_from": 4}}))
    assert rules.news2 is not None and rules.news2.urgent_from == 4
    assert effective_rules(RULES, plan(disabled=["news2"])).news2 is None


@pytest.mark.parametrize("zone", ["Asia/Shanghai", "Asia/Urumqi", "Europe/London", "UTC"])
def test_known_time_zones(zone: str) -> None:
    assert plan(timezone=zone).zone.key == zone


@pytest.mark.parametrize("zone", ["Mars/Olympus", "Beijing", "+08:00", "../etc/passwd", ""])
def test_unknown_time_zones_are_refused(zone: str) -> None:
    with pytest.raises(CarePlanError) as caught:
        plan(timezone=zone)
    assert [(p.field, "unknown time zone" in p.message) for p in caught.value.problems] == [
        ("timezone", True)
    ]


def test_plan_fields_are_checked() -> None:
    with pytest.raises(CarePlanError) as caught:
        parse_care_plan(
            {"conditions": ["copd"], "spo2_scale": 3, "lives_alone": "maybe", "name": "x"}, "plan.toml"
        )
    assert [p.field for p in caught.value.problems] == ["lives_alone", "spo2_scale", "name"]
    assert str(caught.value).startswith("plan.toml: field lives_alone: ")


def test_unknown_conditions_and_rules_in_a_plan() -> None:
    found = plan_problems(plan(conditions=["copd", "asthma"], disabled=["spo2_lo"], overrides={"fevr": {}}))
    assert [(rule, field) for rule, field, _ in found] == [
        (None, "conditions"),
        (None, "disabled"),
        (None, "overrides.fevr"),
    ]
    assert "'asthma'" in found[0][2] and "copd" in found[0][2]


def test_bad_overrides_name_the_plan_field() -> None:
    found = plan_problems(
        plan(
            overrides={
                "spo2_low": {"any": ["spo2 < 20"], "windw": "1m", "id": "x"},
                "sos": {"within": "1 min"},
            }
        )
    )
    assert [(rule, field) for rule, field, _ in found] == [
        ("sos", "overrides.sos.within"),
        ("spo2_low", "overrides.spo2_low.id"),
        ("spo2_low", "overrides.spo2_low.any[0]"),
        ("spo2_low", "overrides.spo2_low.windw"),
    ]
    assert "plausible range" in found[2][2] and found[3][2] == "unknown key"


def test_overrides_that_break_the_set_are_refused() -> None:
    # spo2_critical would no longer be of higher severity than the rule it inhibits
    found = plan_problems(plan(overrides={"spo2_critical": {"severity": "urgent"}}))
    assert found[0][:2] == ("spo2_critical", "inhibits")
    # fever's urgent level must stay above the rule's own threshold
    found = plan_problems(plan(overrides={"fever": {"any": ["body_temperature >= 39.5"]}}))
    assert found[0][:2] == ("fever", "levels[0].any[0]")
    assert isinstance(CarePlanError([]), RuleSetError)


def test_a_plan_round_trips_through_its_data() -> None:
    care_plan = plan(
        conditions=["hypertension", "copd"],
        timezone="Asia/Urumqi",
        lives_alone=True,
        overrides={"spo2_low": {"window": "10m"}},
        disabled=["low_battery"],
    )
    data = care_plan.as_data()
    assert data["conditions"] == ["copd", "hypertension"]
    again = parse_care_plan(json.loads(json.dumps(data)))
    assert again == care_plan and hash(again) == hash(care_plan)
    assert len({care_plan, again, CarePlan()}) == 2  # hashable: effective rules can be cached per plan
    assert care_plan.facts == {"copd", "hypertension", "lives_alone"}


def test_care_plan_files_toml_and_json(tmp_path: Path) -> None:
    toml_file = tmp_path / "plan.toml"
    toml_file.write_text(
        'conditions = ["copd"]\nlives_alone = true\n'
        '[overrides.spo2_low]\nany = ["spo2 < 88"]\nwindow = "10m"\n',
        encoding="utf-8",
    )
    from_toml = load_care_plan(toml_file)
    json_file = tmp_path / "plan.json"
    json_file.write_text(json.dumps(from_toml.as_data()), encoding="utf-8")
    assert load_care_plan(json_file) == from_toml
    assert [str(c) for c in threshold(effective_rules(RULES, from_toml), "spo2_low").any] == ["spo2 < 88"]
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(CarePlanError, match=r"bad\.json: a care plan is an object"):
        load_care_plan(bad)
    with pytest.raises(CarePlanError, match="cannot parse"):
        load_care_plan(_write(tmp_path / "x.toml", "conditions = ["))


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_a_nursing_home_resident_is_routed_to_the_nurse_station_by_the_care_plan() -> None:
    rules = load_rule_set()
    plan = parse_care_plan(
        {"routes": {"emergency": "nursing_home_emergency", "operator_first": "nursing_home_emergency"}}
    )
    mine = effective_rules(rules, plan)
    assert mine.route_for("sos", Severity.emergency) == "nursing_home_emergency"  # the rule's own route
    assert mine.route_for("fall_no_recovery", Severity.emergency) == "nursing_home_emergency"  # severity's
    assert mine.route_for("spo2_low", Severity.urgent) == rules.route_for("spo2_low", Severity.urgent)
    assert rules.route_for("sos", Severity.emergency) == "operator_first"  # the rule set is untouched
    assert "nurse_station" in mine.routes["nursing_home_emergency"].steps[0].notify


def test_a_care_plan_naming_an_unknown_route_says_which_field() -> None:
    with pytest.raises(CarePlanError, match=r"routes\.emergency: no route 'nurse'"):
        effective_rules(load_rule_set(), parse_care_plan({"routes": {"emergency": "nurse"}}))
    with pytest.raises(CarePlanError, match=r"routes\.ambulance: no route 'ambulance'"):
        effective_rules(load_rule_set(), parse_care_plan({"routes": {"ambulance": "emergency"}}))

"""Care plans: an elder's conditions, time zone and personal adjustments, and the rules they give.

A care plan holds only what the rules need (no personal data): condition names from the rule
set's vocabulary, the IANA time zone local hours are read in, whether the elder lives alone,
the NEWS2 SpO2 scale, personal overrides of rule fields and rules switched off.
``effective_rules`` applies a plan to a rule set, purely: the rule set's per-condition
overrides first, then the personal ones; rules the plan does not meet (``requires``) or
disables are left out; the result is validated like a rule file, with the same errors.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, ValidationError, field_validator

from eldercare.alerts.rules import (
    PLAN_FACTS,
    FrozenMap,
    FrozenModel,
    Name,
    Names,
    Problem,
    Rule,
    RuleSet,
    RuleSetError,
    override_field,
    override_problems,
    problems_of,
)

DEFAULT_TIMEZONE = "Asia/Shanghai"
_SECTIONS = ("threshold", "event", "absence", "trend", "schedule")
#: Rule fields that name other rules: references to rules a plan leaves out are dropped.
_REFERENCES = {"inhibits": None, "pulled_forward_by": "pulled_forward_within"}


class CarePlanError(RuleSetError):
    """A care plan that does not validate, or does not fit the rule set; lists every problem."""


class CarePlan(FrozenModel):
    """What the rules need to know about one elder.

    Condition names and rule ids are checked against a rule set by ``effective_rules`` (a
    deployment's rule file may add conditions), so a plan is valid or not for a rule set.
    """

    conditions: Names = frozenset()
    #: IANA time zone of the elder's local hours.
    timezone: str = DEFAULT_TIMEZONE
    #: The elder lives alone (rules may ``require`` "lives_alone").
    lives_alone: bool = False
    #: NEWS2 SpO2 scale; None: as the rule set says for the plan's conditions (2 for COPD).
    spo2_scale: Literal[1, 2] | None = None
    #: On supplemental oxygen (home oxygen therapy): NEWS2 scores it (and SpO2 scale 2 on oxygen).
    #: None: not known, scored as air and reported as assumed.
    on_oxygen: bool | None = None
    #: Rule id -> fields replaced for this elder, e.g. {"spo2_low": {"any": ["spo2 < 88"]}}.
    overrides: FrozenMap[Name, FrozenMap[str, Any]] = Field(default_factory=dict, validate_default=True)
    #: Rules switched off for this elder.
    disabled: Names = frozenset()
    #: Route -> the route this elder takes instead, e.g. a nursing-home resident's
    #: {"emergency": "nursing_home_emergency"}: the nurse station is called with 120.
    routes: FrozenMap[Name, Name] = Field(default_factory=dict, validate_default=True)

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, name: str) -> str:
        try:
            ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"unknown time zone {name!r}; use an IANA name such as 'Asia/Shanghai'"
            ) from None
        return name

    @property
    def zone(self) -> ZoneInfo:
        """The plan's time zone."""
        return ZoneInfo(self.timezone)

    @property
    def facts(self) -> frozenset[str]:
        """What ``requires`` is matched against: the conditions, plus ``lives_alone`` if so."""
        return self.conditions | (PLAN_FACTS if self.lives_alone else frozenset())

    def spo2_scale_under(self, rule_set: RuleSet) -> Literal[1, 2]:
        """The NEWS2 SpO2 scale for this elder: the plan's own, else the rule set's for its conditions."""
        if self.spo2_scale is not None:
            return self.spo2_scale
        news2 = rule_set.news2
        if news2 is None:
            return 1
        return 2 if news2.spo2_scale_2_for & self.conditions else news2.spo2_scale

    def as_data(self) -> dict[str, Any]:
        """The plan as JSON-compatible data (what the store keeps; loads back the same)."""
        data: dict[str, Any] = self.model_dump(mode="json")
        return data


def parse_care_plan(data: Mapping[str, Any], source: str = "care plan") -> CarePlan:
    """A CarePlan from parsed TOML/JSON data; CarePlanError names each bad field."""
    try:
        return CarePlan.model_validate(data)
    except ValidationError as exc:
        raise CarePlanError(problems_of(exc, data, source, rule_file=False)) from None


def load_care_plan(path: Path) -> CarePlan:
    """A care plan from a ``.json`` file, or else a TOML one (the fields of ``CarePlan``)."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CarePlanError([Problem(source, None, None, f"cannot read the file ({exc})")]) from None
    try:
        data = json.loads(text) if Path(path).suffix.lower() == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise CarePlanError([Problem(source, None, None, f"cannot parse the file ({exc})")]) from None
    if not isinstance(data, dict):
        raise CarePlanError([Problem(source, None, None, "a care plan is an object of fields")])
    return parse_care_plan(data, source)


def effective_rules(rule_set: RuleSet, plan: CarePlan, source: str = "care plan") -> RuleSet:
    """The rules for one elder: ``rule_set`` adjusted by ``plan`` (see the module docstring).

    Raises CarePlanError naming the plan's field (``overrides.spo2_low.any[0]``) for a plan
    that does not fit: unknown conditions or rule ids, overrides that do not validate.
    """
    _check_names(rule_set, plan, source)
    facts = plan.facts
    keep = {r.id for r in rule_set.rules if r.id not in plan.disabled and r.applies_to(facts)}
    # The rule set's vocabulary order, so several conditions' overrides apply the same way each time.
    conditions = [c for c in rule_set.conditions if c in plan.conditions]
    data = rule_set.as_data()
    for section in _SECTIONS:
        data[section] = [
            _adjusted(item, rule_set.rule(item["id"]), plan, conditions, keep)
            for item in data.get(section, [])
            if item["id"] in keep
        ]
    if plan.routes:
        _reroute(data, plan.routes)
    if rule_set.news2 is not None:
        if rule_set.news2.id in keep:
            news2 = _adjusted(data["news2"], rule_set.news2, plan, conditions, keep)
            data["news2"] = news2 | {"spo2_scale": plan.spo2_scale_under(rule_set)}
        else:
            del data["news2"]
    try:
        return RuleSet.model_validate(data, context={"source": source, "catalog": rule_set.catalog})
    except ValidationError as exc:
        problems = problems_of(exc, data, source)
    except RuleSetError as exc:
        problems = list(exc.problems)
    raise CarePlanError([_named_in_plan(p, plan) for p in problems])


def _named_in_plan(problem: Problem, plan: CarePlan) -> Problem:
    """The problem's field under ``overrides.<rule>.`` when the plan's override set that field."""
    override = plan.overrides.get(problem.rule or "")
    if override is None:
        return problem
    field = override_field(problem.field, override, f"overrides.{problem.rule}.")
    return Problem(problem.source, problem.rule, field, problem.message)


def _check_names(rule_set: RuleSet, plan: CarePlan, source: str) -> None:
    """Every name the plan uses is the rule set's, and each override validates on its own."""
    problems = [
        Problem(
            source, None, "conditions", f"unknown condition {name!r}; known: {', '.join(rule_set.conditions)}"
        )
        for name in sorted(plan.conditions - set(rule_set.conditions))
    ]
    problems += [
        Problem(source, None, "disabled", f"no rule {rule_id!r}")
        for rule_id in sorted(plan.disabled - rule_set.ids)
    ]
    for route, instead in sorted(plan.routes.items()):
        for name in (route, instead):
            if name not in rule_set.routes:
                known = ", ".join(sorted(rule_set.routes))
                why = f"no route {name!r}; known: {known}"
                problems.append(Problem(source, None, f"routes.{route}", why))
    for rule_id, override in sorted(plan.overrides.items()):
        if rule_id not in rule_set:
            problems.append(Problem(source, None, f"overrides.{rule_id}", "no such rule"))
        else:
            rule = rule_set.rule(rule_id)
            problems += override_problems(rule, override, source, f"overrides.{rule_id}.", rule_set.catalog)
    if problems:
        raise CarePlanError(problems)


def _reroute(data: dict[str, Any], instead: Mapping[str, str]) -> None:
    """Every route the rules name (a rule's, a level's, a severity's default), as the plan
    maps it; in place."""
    defaults = data.get("defaults", {})
    routes = defaults.get("severity_routes", {})
    defaults["severity_routes"] = {sev: instead.get(name, name) for sev, name in routes.items()}
    for section in (*_SECTIONS, "news2"):
        items = data.get(section) or []
        for item in items if isinstance(items, list) else [items]:
            for holder in (item, *item.get("levels", ())):
                if holder.get("route") in instead:
                    holder["route"] = instead[holder["route"]]


def _adjusted(
    item: dict[str, Any], rule: Rule, plan: CarePlan, conditions: list[str], keep: set[str]
) -> dict[str, Any]:
    """One rule's data with the condition overrides, then the personal ones, applied."""
    for condition in conditions:
        item.update(getattr(rule, "condition_overrides", {}).get(condition, {}))
    item.update(plan.overrides.get(rule.id, {}))
    item.pop("condition_overrides", None)
    for field, companion in _REFERENCES.items():
        if field in item:
            item[field] = [r for r in item[field] if r in keep]
            if not item[field] and companion:
                item.pop(field)
                item.pop(companion, None)
    return item

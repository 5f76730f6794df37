"""The alert lifecycle as pure functions: one active alert per rule, upgrades, inhibition,
cool-down, late emergencies, tasks for follow-ups."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from uuid import UUID

import pytest

from eldercare.alerts.decisions import (
    AddEvidence,
    ClearCondition,
    Match,
    OpenAlert,
    SupersedeAlert,
    Suppressed,
    UpgradeAlert,
)
from eldercare.alerts.lifecycle import ElderAlerts, apply_match, clear_condition
from eldercare.alerts.rules import Severity, load_rule_set

RULES = load_rule_set()
NOW = datetime(2026, 11, 23, 2, 0, tzinfo=UTC)


def match(rule: str, severity: Severity, at: datetime = NOW, late: timedelta | None = None) -> Match:
    return Match("e-1", rule, severity, at, "w-1", 1.0, {"metric": "x"}, late)


def ids():
    n = iter(range(1, 1000))
    return lambda: UUID(int=next(n))


def test_a_first_match_opens_an_alert_and_a_second_adds_evidence() -> None:
    state, new_id = ElderAlerts(), ids()
    [opened] = apply_match(RULES, state, match("sos", Severity.emergency), NOW, new_id)
    assert isinstance(opened, OpenAlert) and opened.route == "operator_first" and opened.task is None
    [more] = apply_match(
        RULES, state, match("sos", Severity.emergency, NOW + timedelta(seconds=5)), NOW, new_id
    )
    assert isinstance(more, AddEvidence) and more.alert_id == opened.alert_id
    assert state.active["sos"].matches == 2


def test_a_higher_severity_upgrades_and_asks_for_dispatch_again() -> None:
    state, new_id = ElderAlerts(), ids()
    apply_match(RULES, state, match("fever", Severity.follow_up), NOW, new_id)
    [up] = apply_match(RULES, state, match("fever", Severity.urgent), NOW, new_id)
    assert isinstance(up, UpgradeAlert) and (up.from_severity, up.severity) == ("follow_up", "urgent")
    [same] = apply_match(RULES, state, match("fever", Severity.follow_up), NOW, new_id)
    assert isinstance(same, AddEvidence)  # a lower one later never downgrades


@pytest.mark.parametrize(
    ("after", "suppressed"), [(timedelta(minutes=29, seconds=59), True), (timedelta(minutes=30), False)]
)
def test_cool_down_is_30_minutes_after_resolution(after: timedelta, suppressed: bool) -> None:
    state = ElderAlerts(resolved={"hypoglycaemia": (NOW, Severity.urgent)})
    [d] = apply_match(RULES, state, match("hypoglycaemia", Severity.urgent), NOW + after, ids())
    assert isinstance(d, Suppressed) is suppressed


def test_a_higher_severity_breaks_the_cool_down() -> None:
    state = ElderAlerts(resolved={"fever": (NOW, Severity.follow_up)})
    [d] = apply_match(RULES, state, match("fever", Severity.urgent), NOW + timedelta(minutes=1), ids())
    assert isinstance(d, OpenAlert)


def test_a_higher_rule_supersedes_the_lower_and_then_inhibits_it() -> None:
    state, new_id = ElderAlerts(), ids()
    [low] = apply_match(RULES, state, match("spo2_low", Severity.urgent), NOW, new_id)
    opened, superseded = apply_match(RULES, state, match("spo2_critical", Severity.emergency), NOW, new_id)
    assert isinstance(superseded, SupersedeAlert)
    assert (superseded.alert_id, superseded.by_alert) == (low.alert_id, opened.alert_id)
    assert "spo2_low" not in state.active
    [quiet] = apply_match(RULES, state, match("spo2_low", Severity.urgent), NOW, new_id)
    assert isinstance(quiet, Suppressed) and "spo2_critical" in quiet.reason


def test_a_late_emergency_is_acted_on_as_urgent_on_the_urgent_route() -> None:
    late = match("sos", Severity.emergency, NOW - timedelta(hours=3), late=timedelta(hours=3))
    [opened] = apply_match(RULES, ElderAlerts(), late, NOW, ids())
    assert isinstance(opened, OpenAlert)
    assert (opened.severity, opened.match.severity, opened.route) == ("urgent", "emergency", "urgent")


def test_a_follow_up_becomes_a_task_due_as_its_rule_or_the_defaults_say() -> None:
    [fever] = apply_match(RULES, ElderAlerts(), match("fever", Severity.follow_up), NOW, ids())
    assert fever.task is not None and (fever.task.kind, fever.task.assignee) == ("fever", "family_doctor")
    assert fever.task.due_at == NOW + timedelta(days=7)
    [service] = apply_match(RULES, ElderAlerts(), match("service_request", Severity.follow_up), NOW, ids())
    assert service.task is not None and service.task.due_at == NOW + timedelta(hours=2)


def test_bp_crisis_is_confirmed_by_a_second_reading_within_15_minutes_once() -> None:
    state, new_id = ElderAlerts(), ids()
    apply_match(RULES, state, match("bp_crisis", Severity.urgent), NOW, new_id)
    [second] = apply_match(
        RULES, state, match("bp_crisis", Severity.urgent, NOW + timedelta(minutes=15)), NOW, new_id
    )
    assert isinstance(second, AddEvidence) and second.confirm
    [third] = apply_match(
        RULES, state, match("bp_crisis", Severity.urgent, NOW + timedelta(minutes=16)), NOW, new_id
    )
    assert not third.confirm


def test_clearing_applies_once_and_only_after_the_last_breach() -> None:
    state, new_id = ElderAlerts(), ids()
    apply_match(RULES, state, match("spo2_low", Severity.urgent), NOW, new_id)
    assert clear_condition(state, "spo2_low", NOW, {}) == []  # not after the last breach
    [cleared] = clear_condition(state, "spo2_low", NOW + timedelta(minutes=5), {"margin": 0.05})
    assert isinstance(cleared, ClearCondition)
    assert clear_condition(state, "spo2_low", NOW + timedelta(minutes=6), {}) == []
    [back] = apply_match(
        RULES, state, match("spo2_low", Severity.urgent, NOW + timedelta(minutes=7)), NOW, new_id
    )
    assert isinstance(back, AddEvidence) and back.reopen

"""Scheduled follow-ups: the quarterly chronic follow-up, pulled forward; check-up results; overdue."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from uuid import UUID

from eldercare.alerts import followups
from eldercare.alerts.careplan import CarePlan
from eldercare.alerts.decisions import OpenAlert, Suppressed
from eldercare.alerts.followups import (
    AutoClose,
    EscalateTask,
    FollowUpFacts,
    MoveTaskDue,
    OpenTask,
    OverdueTask,
)
from eldercare.alerts.lifecycle import ElderAlerts
from eldercare.alerts.rules import CheckupResultsRule, PeriodicFollowUpRule, Severity
from eldercare.alerts.scheduled import Elder
from tests.alerts.scheduled_helpers import RULES, active, elder

NOW = datetime(2024, 6, 3, 4, 0, tzinfo=UTC)
DAY = timedelta(days=1)
HYPERTENSION = CarePlan(conditions=frozenset({"hypertension"}))


def chronic(ctx: Elder) -> PeriodicFollowUpRule:
    rule = ctx.rules.rule("chronic_follow_up")
    assert isinstance(rule, PeriodicFollowUpRule)
    return rule


def checkups(ctx: Elder) -> CheckupResultsRule:
    rule = ctx.rules.rule("checkup_results")
    assert isinstance(rule, CheckupResultsRule)
    return rule


def test_an_elder_never_followed_up_gets_a_task_due_in_90_days() -> None:
    ctx = elder(HYPERTENSION)
    [opened] = followups.periodic(ctx, chronic(ctx), FollowUpFacts(), NOW)
    assert isinstance(opened, OpenAlert) and opened.task is not None
    assert (opened.task.kind, opened.task.assignee, opened.task.due_at) == (
        "chronic_follow_up",
        "family_doctor",
        NOW + 90 * DAY,
    )
    assert (opened.severity, opened.route) == (Severity.follow_up, "follow_up")
    assert opened.match.evidence["conditions"] == ["hypertension"]


def test_only_elders_with_hypertension_or_diabetes_have_chronic_follow_ups() -> None:
    assert "chronic_follow_up" not in elder(CarePlan(conditions=frozenset({"copd"}))).rules
    assert "chronic_follow_up" in elder(CarePlan(conditions=frozenset({"type2_diabetes"}))).rules


def test_the_next_follow_up_is_due_90_days_after_the_last_one_or_now_when_lapsed() -> None:
    ctx = elder(HYPERTENSION)
    [recent] = followups.periodic(ctx, chronic(ctx), FollowUpFacts(last_done=NOW - 30 * DAY), NOW)
    assert isinstance(recent, OpenAlert) and recent.task and recent.task.due_at == NOW + 60 * DAY
    ctx = elder(HYPERTENSION)
    [lapsed] = followups.periodic(ctx, chronic(ctx), FollowUpFacts(last_done=NOW - 100 * DAY), NOW)
    assert isinstance(lapsed, OpenAlert) and lapsed.task and lapsed.task.due_at == NOW


def test_an_open_follow_up_task_means_nothing_to_do() -> None:
    ctx = elder(HYPERTENSION)
    facts = FollowUpFacts(open_task=OpenTask(7, NOW + 80 * DAY, UUID(int=5)), last_done=NOW - 10 * DAY)
    assert followups.periodic(ctx, chronic(ctx), facts, NOW) == []


def test_an_uncontrolled_trend_brings_the_open_task_forward_to_14_days_once() -> None:
    ctx = elder(HYPERTENSION)
    raised = NOW - DAY
    task = OpenTask(7, NOW + 80 * DAY, UUID(int=5))
    facts = FollowUpFacts(task, NOW - 10 * DAY, ("bp_uncontrolled", raised))
    [moved] = followups.periodic(ctx, chronic(ctx), facts, NOW)
    assert isinstance(moved, MoveTaskDue)
    assert (moved.task_id, moved.alert_id, moved.to_due) == (7, UUID(int=5), raised + 14 * DAY)
    assert "bp_uncontrolled raised 2024-06-02" in moved.reason
    moved_task = OpenTask(7, raised + 14 * DAY, UUID(int=5))
    again = FollowUpFacts(moved_task, NOW - 10 * DAY, ("bp_uncontrolled", raised))
    assert followups.periodic(ctx, chronic(ctx), again, NOW + DAY) == []


def test_a_trend_answered_by_a_later_follow_up_pulls_nothing() -> None:
    ctx = elder(HYPERTENSION)
    facts = FollowUpFacts(None, NOW - DAY, ("bp_uncontrolled", NOW - 5 * DAY))
    [opened] = followups.periodic(ctx, chronic(ctx), facts, NOW)
    assert isinstance(opened, OpenAlert) and opened.task and opened.task.due_at == NOW + 89 * DAY


def test_a_trend_with_no_open_task_makes_the_next_one_due_within_14_days() -> None:
    ctx = elder(HYPERTENSION)
    facts = FollowUpFacts(None, NOW - 20 * DAY, ("glucose_uncontrolled", NOW - 2 * DAY))
    [opened] = followups.periodic(ctx, chronic(ctx), facts, NOW)
    assert isinstance(opened, OpenAlert) and opened.task and opened.task.due_at == NOW + 12 * DAY


def test_the_next_follow_up_auto_closes_the_previous_alert() -> None:
    previous = active("chronic_follow_up", NOW - 90 * DAY, Severity.follow_up, state="acknowledged")
    ctx = elder(HYPERTENSION, ElderAlerts({"chronic_follow_up": previous}))
    closed, opened = followups.periodic(ctx, chronic(ctx), FollowUpFacts(last_done=NOW - DAY), NOW)
    assert isinstance(closed, AutoClose) and isinstance(opened, OpenAlert)
    assert (closed.alert_id, closed.by_alert, closed.from_state) == (
        previous.id,
        opened.alert_id,
        "acknowledged",
    )
    assert ctx.alerts.active["chronic_follow_up"].id == opened.alert_id


def test_a_follow_up_resolved_a_moment_ago_waits_for_the_cool_down_and_keeps_its_alert() -> None:
    previous = active("chronic_follow_up", NOW - 90 * DAY, Severity.follow_up)
    alerts = ElderAlerts(
        {"chronic_follow_up": previous},
        {"chronic_follow_up": (NOW - timedelta(minutes=5), Severity.follow_up)},
    )
    ctx = elder(HYPERTENSION, alerts)
    [quiet] = followups.periodic(ctx, chronic(ctx), FollowUpFacts(last_done=NOW - DAY), NOW)
    assert isinstance(quiet, Suppressed)
    assert ctx.alerts.active["chronic_follow_up"] is previous


# --- check-ups ----------------------------------------------------------------------------


def test_a_checkup_opens_its_results_task_due_30_days_after_it() -> None:
    ctx = elder()
    at = NOW - 2 * DAY
    [opened] = followups.checkup_recorded(ctx, checkups(ctx), at, NOW)
    assert isinstance(opened, OpenAlert) and opened.task is not None
    assert (opened.task.kind, opened.task.due_at) == ("inform_checkup_results", at + 30 * DAY)
    assert opened.match.observed_at == at and opened.match.evidence["checkup_local_date"] == "2024-06-01"


def test_a_newer_checkup_supersedes_the_older_and_an_older_one_adds_nothing() -> None:
    earlier = active("checkup_results", NOW - 40 * DAY, Severity.follow_up)
    resolved = {"checkup_results": (NOW - timedelta(minutes=1), Severity.follow_up)}
    ctx = elder(alerts=ElderAlerts({"checkup_results": earlier}, resolved))
    closed, opened = followups.checkup_recorded(ctx, checkups(ctx), NOW - DAY, NOW)
    assert isinstance(closed, AutoClose) and isinstance(opened, OpenAlert)
    assert closed.reason == "superseded by a newer check-up"
    assert followups.checkup_recorded(ctx, checkups(ctx), NOW - 50 * DAY, NOW) == []


def test_an_overdue_results_task_escalates_to_the_team_lead() -> None:
    task = OverdueTask(3, "e-1", "inform_checkup_results", NOW - 2 * DAY, UUID(int=4), "checkup_results")
    assert followups.overdue_routes(RULES) == {"inform_checkup_results": ("family_doctor", "team_lead")}
    assert followups.escalate_overdue(RULES, task, NOW - 2 * DAY - timedelta(seconds=1)) == []
    [up] = followups.escalate_overdue(RULES, task, NOW)
    assert isinstance(up, EscalateTask) and (up.route, up.task_id, up.alert_id) == (
        "team_lead",
        3,
        UUID(int=4),
    )
    assert up.reason.endswith("(2 d 0 h): escalated to team_lead")
    chronic_task = OverdueTask(5, "e-1", "chronic_follow_up", NOW - DAY, None, "chronic_follow_up")
    assert followups.escalate_overdue(RULES, chronic_task, NOW) == []  # no overdue route

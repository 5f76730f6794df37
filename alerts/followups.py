"""Scheduled follow-ups (rules.md "Scheduled follow-ups"): what is due, moved, closed, escalated. Pure.

A follow-up is an alert of severity ``follow_up`` with its task, as every follow-up is: the
alert is what is dispatched (to the family doctor team's queue), escalated and closed; the
task is the work, with its due date. Three decisions the lifecycle does not have live here,
with their persistence in ``gateway/store/scheduled.py``:

- ``AutoClose``: an active follow-up alert replaced by a newer one of its rule (rules.md
  lifecycle: ``auto_closed``, "follow-ups superseded by a newer one"); its open task is
  cancelled.
- ``MoveTaskDue``: an open task's due date brought forward, with a history row on its alert.
- ``EscalateTask``: an open task past due goes to the rule's ``overdue_route`` (the team lead):
  the task and its alert become ``escalated``, an outbox row asks for the dispatch. The store
  escalates an ``open`` task only, so it happens once.

How rules.md is read here:

chronic follow-up (``periodic_follow_up``)
  Elders with any of the rule's conditions (hypertension, type 2 diabetes) always have one
  open ``chronic_follow_up`` task: when none is open (the last one was done or cancelled, or
  there never was one) the next is created, due ``task.due`` (90 days) after the last one
  was done, or 90 days from now for an elder never followed up (a new programme does not
  make every elder due at once); a due date already past (a lapsed elder) is now. The alert
  of the previous follow-up, if still active, is auto-closed by the new one. An alert of a
  ``pulled_forward_by`` rule (bp_uncontrolled, glucose_uncontrolled) raised after the last
  follow-up was done pulls the next one forward to ``pulled_forward_within`` (14 days) of
  that alert: an open task due later is moved (with history), a new one is created with the
  earlier date. A follow-up done after the alert has answered it.
check-up results (``checkup_results``)
  A check-up recorded at ``at`` opens the alert with the task ``inform_checkup_results`` due
  ``task.due`` (30 days) after ``at``; a newer check-up auto-closes the previous one's alert
  and cancels its task; one older than the active one's adds nothing (that one's task covers
  it). Check-ups are distinct events, so the cool-down after a resolution does not apply.
overdue tasks
  A task of a rule with an ``overdue_route`` (the check-up task: team_lead) still ``open`` past
  its due time is escalated, once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

from eldercare.alerts.decisions import Decision, Match, OpenAlert, TaskOrder
from eldercare.alerts.lifecycle import apply_match
from eldercare.alerts.rules import CheckupResultsRule, PeriodicFollowUpRule, Rule, RuleSet, Severity
from eldercare.alerts.scheduled import Elder, iso

# ---- decisions the lifecycle does not have -------------------------------------------------


@dataclass(frozen=True, slots=True)
class AutoClose:
    """An active follow-up alert replaced by a newer one of its rule: ``auto_closed``, its
    open tasks cancelled."""

    alert_id: UUID
    rule_id: str
    by_alert: UUID
    from_state: str
    severity: Severity
    reason: str


@dataclass(frozen=True, slots=True)
class MoveTaskDue:
    """An open task's due date brought forward (a history row on its alert says why)."""

    task_id: int
    alert_id: UUID | None
    kind: str
    from_due: datetime
    to_due: datetime
    reason: str


@dataclass(frozen=True, slots=True)
class EscalateTask:
    """An open task past due: escalated to ``route`` with its alert, once."""

    task_id: int
    elder_id: str
    alert_id: UUID | None
    kind: str
    due_at: datetime
    route: str
    severity: Severity
    reason: str


FollowUpDecision = AutoClose | MoveTaskDue | EscalateTask
#: Everything a scheduled job may decide.
ScheduledDecision = Decision | FollowUpDecision


# ---- facts the store answers ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OpenTask:
    """An elder's open (or escalated) task of a follow-up kind."""

    id: int
    due_at: datetime
    alert_id: UUID | None


@dataclass(frozen=True, slots=True)
class FollowUpFacts:
    """What the store knows of one elder's follow-ups of one rule."""

    open_task: OpenTask | None = None
    #: When the last task of the rule's kind was done (None: never).
    last_done: datetime | None = None
    #: The newest alert of a ``pulled_forward_by`` rule: (rule id, raised at).
    pulled_by: tuple[str, datetime] | None = None


@dataclass(frozen=True, slots=True)
class OverdueTask:
    """An open task past its due time."""

    id: int
    elder_id: str
    kind: str
    due_at: datetime
    alert_id: UUID | None
    rule_id: str | None


# ---- chronic follow-ups --------------------------------------------------------------------


def periodic(
    ctx: Elder,
    rule: PeriodicFollowUpRule,
    facts: FollowUpFacts,
    now: datetime,
    new_id: Callable[[], UUID] = uuid4,
) -> list[ScheduledDecision]:
    """The chronic follow-up decisions for one elder at ``now`` (see the module docstring)."""
    pull_due, pulled = None, None
    if facts.pulled_by is not None and rule.pulled_forward_within is not None:
        by_rule, raised_at = facts.pulled_by
        if facts.last_done is None or raised_at > facts.last_done:
            pull_due, pulled = raised_at + rule.pulled_forward_within, (by_rule, raised_at)
    task = facts.open_task
    if task is not None:
        if pull_due is None or pulled is None or task.due_at <= max(pull_due, now):
            return []
        to_due = max(pull_due, now)
        reason = (
            f"task {rule.task.kind} due {task.due_at:%Y-%m-%d} brought forward to {to_due:%Y-%m-%d}:"
            f" {pulled[0]} raised {pulled[1]:%Y-%m-%d}"
        )
        return [MoveTaskDue(task.id, task.alert_id, rule.task.kind, task.due_at, to_due, reason)]
    due = now + rule.task.due if facts.last_done is None else facts.last_done + rule.task.due
    why = "first follow-up" if facts.last_done is None else f"{_days(rule.task.due)} after the last one"
    if pull_due is not None and pulled is not None and pull_due < due:
        due, why = pull_due, f"brought forward by {pulled[0]} raised {pulled[1]:%Y-%m-%d}"
    due = max(due, now)
    evidence = {
        "metric": "follow-up",
        "conditions": sorted(rule.conditions & ctx.plan.conditions),
        "due": iso(due),
        "last_done": iso(facts.last_done),
        "pulled_forward_by": None if pulled is None else {"rule": pulled[0], "raised_at": iso(pulled[1])},
        "severity_reason": f"due {due:%Y-%m-%d}: {why}",
    }
    match = Match(ctx.elder_id, rule.id, rule.severity, now, None, None, evidence)
    return _replace_with(ctx, rule, match, due, now, new_id, "superseded by the next follow-up")


def _days(span: timedelta) -> str:
    return f"{span.days} days"


def _replace_with(
    ctx: Elder,
    rule: PeriodicFollowUpRule | CheckupResultsRule,
    match: Match,
    due: datetime,
    now: datetime,
    new_id: Callable[[], UUID],
    reason: str,
) -> list[ScheduledDecision]:
    """Open a follow-up alert for ``match`` with its task due at ``due``, auto-closing the
    rule's active one; nothing if the lifecycle keeps it quiet (cool-down)."""
    state = ctx.alerts
    current = state.active.pop(rule.id, None)
    alert_id = new_id()
    decided = apply_match(ctx.rules, state, match, now, lambda: alert_id)
    opened = [d for d in decided if isinstance(d, OpenAlert)]
    if not opened:
        if current is not None:
            state.active[rule.id] = current
        return list(decided)
    out: list[ScheduledDecision] = []
    if current is not None:
        out.append(AutoClose(current.id, rule.id, alert_id, current.state, current.severity, reason))
    task = TaskOrder(rule.task.kind, rule.task.assignee, due)
    return out + [replace(d, task=task) if isinstance(d, OpenAlert) else d for d in decided]


# ---- check-ups -----------------------------------------------------------------------------


def checkup_recorded(
    ctx: Elder,
    rule: CheckupResultsRule,
    at: datetime,
    now: datetime,
    new_id: Callable[[], UUID] = uuid4,
) -> list[ScheduledDecision]:
    """A check-up at ``at`` was recorded: its results task, replacing an older check-up's."""
    current = ctx.alerts.active.get(rule.id)
    if current is not None and current.observed_at >= at:
        return []  # a check-up older than (or the same as) the active one's: its task covers it
    due = at + rule.task.due
    zone = ctx.plan.zone
    evidence: dict[str, Any] = {
        "metric": "check-up",
        "checkup_at": iso(at),
        "checkup_local_date": at.astimezone(zone).date().isoformat(),
        "due": iso(due),
        "severity_reason": f"results due by {due.astimezone(zone):%Y-%m-%d}",
    }
    match = Match(ctx.elder_id, rule.id, rule.severity, at, None, None, evidence)
    ctx.alerts.resolved.pop(rule.id, None)  # each check-up needs its task: no cool-down
    return _replace_with(ctx, rule, match, due, now, new_id, "superseded by a newer check-up")


# ---- overdue tasks -------------------------------------------------------------------------


def overdue_routes(rules: RuleSet) -> dict[str, tuple[str, str]]:
    """Task kind -> (assignee, overdue route) for every rule whose task escalates when overdue."""
    out: dict[str, tuple[str, str]] = {}
    for rule in rules.rules:
        task = getattr(rule, "task", None)
        if task is not None and task.overdue_route:
            out.setdefault(task.kind, (task.assignee, task.overdue_route))
    return out


def escalate_overdue(rules: RuleSet, task: OverdueTask, now: datetime) -> list[EscalateTask]:
    """The escalation of an open task past due, when its rule names an overdue route."""
    rule: Rule | None = rules.rule(task.rule_id) if task.rule_id and task.rule_id in rules else None
    rule_task = getattr(rule, "task", None)
    if rule is None or rule_task is None or not rule_task.overdue_route or task.due_at > now:
        return []
    late = now - task.due_at
    reason = (
        f"task {task.kind} overdue since {iso(task.due_at)} ({_hours(late)}): escalated to"
        f" {rule_task.overdue_route}"
    )
    severity = getattr(rule, "severity", Severity.follow_up)
    return [
        EscalateTask(
            task.id,
            task.elder_id,
            task.alert_id,
            task.kind,
            task.due_at,
            rule_task.overdue_route,
            Severity(severity),
            reason,
        )
    ]


def _hours(span: timedelta) -> str:
    hours = int(span.total_seconds() // 3600)
    return f"{hours // 24} d {hours % 24} h" if hours >= 24 else f"{hours} h"

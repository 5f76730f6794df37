"""The alert lifecycle: what one match does to an elder's alerts (pure, injected time and ids).

rules.md, "Lifecycle and noise control":
- at most one active alert per (elder, rule): a further match adds evidence; a match of
  higher severity upgrades the alert and asks for dispatch again;
- after resolution the rule stays quiet for its cool-down unless the severity rises;
- while a higher-severity rule on the same metric is active, the lower one does not raise;
  when the higher one opens, an active lower one is superseded and its evidence moves;
- a late emergency (buffered data) is acted on as urgent, with the delay stated;
- follow-up alerts become tasks with a due date.

``ElderAlerts`` is the working state of one elder while a batch is decided: each decision
updates it, so the next match of the same batch sees the alert the previous one opened.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from uuid import UUID, uuid4

from eldercare.alerts.decisions import (
    CONDITION_ON_STATES,
    ActiveAlert,
    AddEvidence,
    ClearCondition,
    Decision,
    Match,
    OpenAlert,
    SupersedeAlert,
    Suppressed,
    TaskOrder,
    UpgradeAlert,
)
from eldercare.alerts.rules import RuleSet, Severity, ThresholdRule


@dataclass(slots=True)
class ElderAlerts:
    """One elder's active alerts by rule, and when each rule last resolved (for cool-down)."""

    active: dict[str, ActiveAlert] = field(default_factory=dict)
    #: rule id -> (resolved at, severity it had)
    resolved: dict[str, tuple[datetime, Severity]] = field(default_factory=dict)


def acted_severity(rules: RuleSet, match: Match) -> Severity:
    """The severity dispatch acts on: a late emergency is acted on as the defaults say (urgent)."""
    if match.late_by is not None and match.severity is Severity.emergency:
        return rules.defaults.late_emergency_as
    return match.severity


def route_of(rules: RuleSet, match: Match, severity: Severity) -> str:
    """The route for a match acted on at ``severity`` (a late emergency takes its severity's route)."""
    if severity != match.severity:
        return rules.defaults.severity_routes[severity]
    return rules.route_for(match.rule_id, severity)


def apply_match(
    rules: RuleSet,
    state: ElderAlerts,
    match: Match,
    now: datetime,
    new_id: Callable[[], UUID] = uuid4,
) -> list[Decision]:
    """The decisions for one match, given the elder's working state (which they update)."""
    severity = acted_severity(rules, match)
    current = state.active.get(match.rule_id)
    if current is not None:
        return _further_match(rules, state, current, match, severity)

    for higher in rules.inhibited_by(match.rule_id):
        if higher in state.active:
            return [Suppressed(match, f"inhibited by the active {higher} alert")]
    resolved = state.resolved.get(match.rule_id)
    if resolved is not None:
        resolved_at, resolved_severity = resolved
        if now - resolved_at < rules.cooldown(match.rule_id) and severity <= resolved_severity:
            return [Suppressed(match, "cool-down after resolution")]

    alert_id = new_id()
    rule = rules.rule(match.rule_id)
    decisions: list[Decision] = [
        OpenAlert(
            alert_id,
            match,
            severity,
            route_of(rules, match, severity),
            rule.title.zh_cn,
            rule.title.en,
            _task(rules, match, severity, now),
        )
    ]
    state.active[match.rule_id] = ActiveAlert(
        alert_id, match.rule_id, severity, "open", match.observed_at, match.observed_at, 1, False
    )
    for lower in sorted(rules.inhibits(match.rule_id)):
        below = state.active.pop(lower, None)
        if below is not None:
            decisions.append(
                SupersedeAlert(below.id, alert_id, lower, below.state, below.severity, below.evidence)
            )
    return decisions


def _further_match(
    rules: RuleSet, state: ElderAlerts, current: ActiveAlert, match: Match, severity: Severity
) -> list[Decision]:
    if severity > current.severity:
        state.active[match.rule_id] = replace(
            current, severity=severity, state="open", last_at=match.observed_at, matches=current.matches + 1
        )
        return [
            UpgradeAlert(
                current.id,
                match,
                current.severity,
                severity,
                route_of(rules, match, severity),
                current.state,
            )
        ]
    rule = rules.rule(match.rule_id)
    confirm_within = rule.confirm_within if isinstance(rule, ThresholdRule) else None
    confirm = (
        confirm_within is not None
        and not current.confirmed
        and match.observed_at > current.observed_at
        and match.observed_at - current.observed_at <= confirm_within
    )
    reopen = current.state == "condition_cleared"
    state.active[match.rule_id] = replace(
        current,
        state="open" if reopen else current.state,
        last_at=max(current.last_at, match.observed_at),
        matches=current.matches + 1,
        confirmed=current.confirmed or confirm,
    )
    return [AddEvidence(current.id, match, confirm=confirm, reopen=reopen)]


def clear_condition(
    state: ElderAlerts, rule_id: str, at: datetime, evidence: Mapping[str, object]
) -> list[Decision]:
    """The alert of ``rule_id`` has its condition cleared (hysteresis passed), if it is still on."""
    current = state.active.get(rule_id)
    if current is None or current.state not in CONDITION_ON_STATES or at <= current.last_at:
        return []
    state.active[rule_id] = replace(current, state="condition_cleared")
    return [ClearCondition(current.id, rule_id, at, dict(evidence), current.state, current.severity)]


def _task(rules: RuleSet, match: Match, severity: Severity, now: datetime) -> TaskOrder | None:
    """A task for a follow-up alert (or for a rule that names one, whatever its severity)."""
    rule = rules.rule(match.rule_id)
    task = getattr(rule, "task", None)
    if task is not None:
        return TaskOrder(task.kind, task.assignee, now + task.due)
    if severity is Severity.follow_up:
        defaults = rules.defaults
        return TaskOrder(match.rule_id, defaults.follow_up_assignee, now + defaults.follow_up_due)
    return None

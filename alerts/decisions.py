"""What the rules decide, as plain data: the store layer writes it, nothing here does I/O.

The engine (``engine.py``) turns readings, events and fired timers into ``Match``es; the
lifecycle (``lifecycle.py``) turns each match, against the elder's alerts, into decisions:
open an alert, add evidence to one, upgrade it, clear its condition, supersede a lower one,
start or cancel a timer. ``gateway/store/alerts.py`` persists them in the transaction of the
data that caused them, with a history row for every state change and an outbox row for
every dispatch asked for.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

from eldercare.alerts.rules import Severity

#: Alert states in which an alert is still active: one per (elder, rule) at most.
ACTIVE_STATES = frozenset({"open", "dispatched", "acknowledged", "escalated", "condition_cleared"})
#: Active states in which the condition is still on (a threshold alert may clear from these).
CONDITION_ON_STATES = ACTIVE_STATES - {"condition_cleared"}
#: Who the rules are, in alert history.
RULES_ACTOR = "rules"


@dataclass(frozen=True, slots=True)
class Match:
    """A rule matched for one elder: one reading, event or fired timer, and why.

    ``evidence`` is JSON-compatible and says what raised it (conditions, window, the readings
    of the run or the event, the severity's reason). ``late_by`` is set when the data that
    matched arrived late (a buffered upload).
    """

    elder_id: str
    rule_id: str
    severity: Severity
    observed_at: datetime
    device_id: str | None
    value: float | None
    evidence: Mapping[str, Any]
    late_by: timedelta | None = None


@dataclass(frozen=True, slots=True)
class ActiveAlert:
    """What the rules need to know of an elder's active alert."""

    id: UUID
    rule_id: str
    severity: Severity
    state: str
    observed_at: datetime
    last_at: datetime
    matches: int
    confirmed: bool
    evidence: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class TaskOrder:
    """A follow-up task to create with an alert."""

    kind: str
    assignee: str
    due_at: datetime


@dataclass(frozen=True, slots=True)
class OpenAlert:
    """A new alert. ``severity`` is what dispatch acts on (a late emergency: urgent)."""

    alert_id: UUID
    match: Match
    severity: Severity
    route: str
    title_zh: str
    title_en: str
    task: TaskOrder | None = None


@dataclass(frozen=True, slots=True)
class AddEvidence:
    """A further match for an active alert: counted, last value and time, maybe confirmed."""

    alert_id: UUID
    match: Match
    confirm: bool = False
    #: The condition had cleared and is back: the alert returns to ``open``.
    reopen: bool = False


@dataclass(frozen=True, slots=True)
class UpgradeAlert:
    """A match of higher severity for an active alert: it upgrades and asks for dispatch again."""

    alert_id: UUID
    match: Match
    from_severity: Severity
    severity: Severity
    route: str
    from_state: str


@dataclass(frozen=True, slots=True)
class ClearCondition:
    """Readings are back inside the band (with the margin) for the rule's window."""

    alert_id: UUID
    rule_id: str
    at: datetime
    evidence: Mapping[str, Any]
    from_state: str
    severity: Severity


@dataclass(frozen=True, slots=True)
class SupersedeAlert:
    """A lower alert closed because a higher one on the same metric opened; evidence moves."""

    alert_id: UUID
    by_alert: UUID
    rule_id: str
    from_state: str
    severity: Severity
    evidence: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class ScheduleTimer:
    """Start a durable timer (a waiting window); kept if one is already pending for the key."""

    kind: str
    key: str
    due_at: datetime
    payload: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class CancelTimer:
    """Cancel a pending timer: what it waited for has happened."""

    kind: str
    key: str


@dataclass(frozen=True, slots=True)
class Suppressed:
    """A match that raised nothing, and why (cool-down, inhibition): counted, not stored."""

    match: Match
    reason: str


Decision = (
    OpenAlert
    | AddEvidence
    | UpgradeAlert
    | ClearCondition
    | SupersedeAlert
    | ScheduleTimer
    | CancelTimer
    | Suppressed
)


def timer_kind(rule_id: str) -> str:
    """The durable timer kind of a rule's waiting window."""
    return f"rule:{rule_id}"

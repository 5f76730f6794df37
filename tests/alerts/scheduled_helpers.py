"""Helpers of the scheduled-rule tests: an elder with a care plan, decisions applied to state."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from itertools import count
from uuid import UUID
from zoneinfo import ZoneInfo

from eldercare.alerts.careplan import CarePlan, effective_rules
from eldercare.alerts.decisions import ActiveAlert, Decision
from eldercare.alerts.lifecycle import ElderAlerts
from eldercare.alerts.rules import RuleSet, Severity, load_rule_set
from eldercare.alerts.scheduled import Elder

RULES = load_rule_set()
SHANGHAI = ZoneInfo("Asia/Shanghai")
LONDON = ZoneInfo("Europe/London")


def elder(plan: CarePlan | None = None, alerts: ElderAlerts | None = None, rules: RuleSet = RULES) -> Elder:
    """Elder ``e-1`` with ``plan`` (default: the rule set's defaults)."""
    plan = plan or CarePlan()
    return Elder("e-1", effective_rules(rules, plan), plan, alerts or ElderAlerts())


def local(zone: ZoneInfo, *args: int) -> datetime:
    """A moment given as the wall clock of ``zone``: local(SHANGHAI, 2024, 6, 3, 12, 0)."""
    return datetime(*args, tzinfo=zone)  # type: ignore[misc]


def ids() -> Iterable[UUID]:
    """UUIDs 1, 2, 3, ... (predictable alert ids)."""
    return (UUID(int=n) for n in count(1))


def kinds(decisions: Iterable[Decision | object]) -> list[str]:
    """The decisions' class names, in order."""
    return [type(d).__name__ for d in decisions]


def active(
    rule_id: str, observed_at: datetime, severity: Severity = Severity.urgent, state: str = "open"
) -> ActiveAlert:
    """An active alert of ``rule_id`` whose last match was observed at ``observed_at``."""
    return ActiveAlert(UUID(int=99), rule_id, severity, state, observed_at, observed_at, 1, False)

"""What a scheduled rule's match does to an elder's alerts, and local-hour spans. Pure.

The absence and trend rules do not see new data arrive: a job judges stored state on every
run (``absence.py``, ``trends.py``), and a run that finds the same silence as the run before
has seen nothing new. So a match here changes the elder's alerts only when it says something
they do not say yet (``decide_match``):

- an active alert of the rule: a higher severity upgrades it, a cleared condition that is
  back reopens it, evidence newer than the alert's last (``match.observed_at > last_at``) is
  added once; the same evidence again is nothing (``matches`` does not grow run by run);
- no active alert: the match opens one through the lifecycle (inhibition, cool-down), unless
  the rule's latest resolution came after the match's evidence (``observed_at``): staff have
  handled what it shows. The rule raises again for newer evidence (a new silence, a newer
  reading) or a higher severity, as rules.md's cool-down allows.

``observed_at`` of a scheduled match is therefore the moment its evidence became true (the
silence reached its length, the device's silence its limit, the newest reading of a mean),
fixed for as long as the state it describes lasts.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from uuid import UUID, uuid4
from zoneinfo import ZoneInfo

from eldercare.alerts.careplan import CarePlan
from eldercare.alerts.decisions import Decision, Match
from eldercare.alerts.lifecycle import ElderAlerts, acted_severity, apply_match
from eldercare.alerts.rules import RuleSet, TimeWindow


@dataclass(frozen=True, slots=True)
class Elder:
    """One elder as the scheduled rules see them: effective rules, care plan, alerts (the
    working state, which decisions update)."""

    elder_id: str
    rules: RuleSet
    plan: CarePlan
    alerts: ElderAlerts


def decide_match(
    rules: RuleSet,
    state: ElderAlerts,
    match: Match,
    now: datetime,
    new_id: Callable[[], UUID] = uuid4,
    *,
    newer_evidence: bool = True,
    handled_after: datetime | None = None,
) -> list[Decision]:
    """The decisions for a scheduled rule's match: only what is new (see the module docstring).

    ``newer_evidence``: False for rules whose ``observed_at`` moves with every status report
    (low battery), so an active alert gets no evidence run by run.
    ``handled_after``: a resolution at or after this time covers the match (default: its
    ``observed_at``, i.e. the resolution came after the evidence).
    """
    severity = acted_severity(rules, match)
    current = state.active.get(match.rule_id)
    if current is not None:
        new = (
            severity > current.severity
            or current.state == "condition_cleared"
            or (newer_evidence and match.observed_at > current.last_at)
        )
        return apply_match(rules, state, match, now, new_id) if new else []
    resolved = state.resolved.get(match.rule_id)
    if resolved is not None:
        resolved_at, resolved_severity = resolved
        since = match.observed_at if handled_after is None else handled_after
        if resolved_at >= since and severity <= resolved_severity:
            return []
    return apply_match(rules, state, match, now, new_id)


@functools.lru_cache(maxsize=4096)  # a run asks the same (hours, zone, now) for many elders
def latest_span(window: TimeWindow, zone: ZoneInfo, now: datetime) -> tuple[datetime, datetime]:
    """The latest occurrence of the local hours ``window`` that began at or before ``now``: its
    (start, end) in UTC. ``now`` lies inside it, or after its end (outside the hours).

    Start and end are the wall-clock times of the elder's zone on their days, so a span across
    a daylight-saving change is an hour shorter or longer.
    """
    local = now.astimezone(zone)
    for back in range(3):
        day = local.date() - timedelta(days=back)
        start = datetime.combine(day, window.start, tzinfo=zone)
        if start <= now:
            end_day = day + timedelta(days=1) if window.wraps_midnight else day
            end = datetime.combine(end_day, window.end, tzinfo=zone)
            return start.astimezone(UTC), end.astimezone(UTC)
    raise AssertionError("a daily window always began within the last two days")  # pragma: no cover


def local_hhmm(at: datetime, zone: ZoneInfo) -> str:
    """``at`` as the elder's local ``HH:MM``."""
    return at.astimezone(zone).strftime("%H:%M")


def iso(at: datetime | None) -> str | None:
    """``at`` in ISO 8601 (UTC as stored), or None."""
    return None if at is None else at.astimezone(UTC).isoformat()

"""The rules engine over a timeline, in memory: what the store would hold, without a store.

``Replay`` keeps the readings, events, alerts and timers that the real path keeps in
PostgreSQL, answers the engine's lookups from them, and applies its decisions the way
``gateway/store/alerts.py`` writes them. Scenario files (``scenarios.py``) run on it to give
the expected alerts of a timeline; tests use it to exercise every rule with an injected
clock; the simulators reuse the scenarios against the running system.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

from eldercare.alerts import engine, news2_marks
from eldercare.alerts.careplan import CarePlan, effective_rules
from eldercare.alerts.decisions import (
    ACTIVE_STATES,
    ActiveAlert,
    AddEvidence,
    CancelTimer,
    ClearCondition,
    Decision,
    OpenAlert,
    ScheduleTimer,
    SupersedeAlert,
    Suppressed,
    UpgradeAlert,
)
from eldercare.alerts.engine import ElderContext, History, Lookup
from eldercare.alerts.lifecycle import ElderAlerts
from eldercare.alerts.rules import RuleSet, Severity
from eldercare.devices.records import DeviceEvent, Reading


@dataclass(slots=True)
class ReplayAlert:
    """An alert as the replay keeps it (the columns of ``alerts`` that tests look at)."""

    id: UUID
    elder_id: str
    rule: str
    severity: Severity
    raised_severity: Severity
    state: str
    route: str
    observed_at: datetime
    raised_at: datetime
    late_by: timedelta | None
    evidence: dict[str, Any]
    matches: int = 1
    last_at: datetime | None = None
    last_value: float | None = None
    confirmed: bool = False
    closed_at: datetime | None = None
    history: list[str] = field(default_factory=list)
    outbox: list[tuple[str, Severity, str]] = field(default_factory=list)
    task: tuple[str, str, datetime] | None = None


@dataclass(slots=True)
class _Timer:
    kind: str
    key: str
    due_at: datetime
    payload: Mapping[str, Any]


class Replay:
    """One population's rules, data and alerts in memory; ``feed`` and ``advance`` drive it."""

    def __init__(
        self, rule_set: RuleSet, plans: Mapping[str, CarePlan] | None = None, *, news2_marks: bool = True
    ) -> None:
        self.rule_set = rule_set
        self.plans = dict(plans or {})
        #: The elders' NEWS2 marks, kept as the store keeps them (None: the scan gets none).
        self.news2_marks: dict[str, list[datetime | None]] | None = {} if news2_marks else None
        self.readings: list[Reading] = []
        self.events: list[DeviceEvent] = []
        self.alerts: dict[UUID, ReplayAlert] = {}
        self.timers: dict[tuple[str, str], _Timer] = {}
        self.suppressed: list[Suppressed] = []
        self._ids = (UUID(int=i) for i in itertools.count(1))

    # ---- driving ------------------------------------------------------------------------

    def feed(
        self, readings: Sequence[Reading], events: Sequence[DeviceEvent], now: datetime
    ) -> list[Decision]:
        """One batch arrives at ``now``: stored, then decided on (as the writer's step does)."""
        self.readings.extend(readings)
        self.events.extend(events)
        elder_ids = {r.elder_id for r in readings if r.elder_id} | {e.elder_id for e in events if e.elder_id}
        marks = None
        if self.news2_marks is not None:
            for elder_id, row in news2_marks.marks_of(readings).items():
                self.news2_marks[elder_id] = news2_marks.merge(self.news2_marks.get(elder_id), row)
            marks = self.news2_marks
        found = engine.scan(readings, events, self._contexts(elder_ids, now), marks)
        if not found:
            return []
        contexts = self._contexts(set(found.elders), now)
        series, lookups = found.lookups()
        decisions = engine.decide(found, contexts, self._history(series, lookups), now, self._new_id)
        self._apply(decisions, now)
        return decisions

    def advance(self, now: datetime) -> list[Decision]:
        """Time passes to ``now``: due timers fire, oldest first."""
        decisions: list[Decision] = []
        for timer in sorted(self.timers.values(), key=lambda t: t.due_at):
            if timer.due_at > now:
                break
            del self.timers[(timer.kind, timer.key)]
            elder_id = str(timer.payload["elder_id"])
            ctx = self._contexts({elder_id}, now)[elder_id]
            fired = engine.on_timer(ctx, timer.payload, now, self._new_id)
            self._apply(fired, now)
            decisions.extend(fired)
        return decisions

    def resolve(self, alert_id: UUID, now: datetime, outcome: str = "handled") -> None:
        """Staff resolve an alert (its rule's cool-down starts)."""
        alert = self.alerts[alert_id]
        alert.history.append(f"{alert.state} -> resolved: {outcome}")
        alert.state, alert.closed_at = "resolved", now

    # ---- what the engine reads ----------------------------------------------------------

    def rules_for(self, elder_id: str) -> RuleSet:
        """The elder's effective rules."""
        return effective_rules(self.rule_set, self.plans.get(elder_id, CarePlan()))

    def active(self, elder_id: str | None = None) -> list[ReplayAlert]:
        """Active alerts (of one elder), oldest first."""
        return [
            a
            for a in self.alerts.values()
            if a.state in ACTIVE_STATES and (elder_id is None or a.elder_id == elder_id)
        ]

    def _contexts(self, elder_ids: Iterable[str], now: datetime) -> dict[str, ElderContext]:
        out = {}
        for elder_id in elder_ids:
            rules = self.rules_for(elder_id)
            alerts = ElderAlerts()
            for a in self.alerts.values():
                if a.elder_id != elder_id:
                    continue
                if a.state in ACTIVE_STATES:
                    alerts.active[a.rule] = ActiveAlert(
                        a.id,
                        a.rule,
                        a.severity,
                        a.state,
                        a.observed_at,
                        a.last_at or a.observed_at,
                        a.matches,
                        a.confirmed,
                        a.evidence,
                    )
                elif a.state == "resolved" and a.closed_at is not None:
                    previous = alerts.resolved.get(a.rule)
                    if previous is None or previous[0] < a.closed_at:
                        alerts.resolved[a.rule] = (a.closed_at, a.severity)
            plan = self.plans.get(elder_id, CarePlan())
            out[elder_id] = ElderContext(elder_id, rules, plan, alerts, engine.quiet_bands(rules, plan))
        return out

    def _history(self, series: Sequence[Lookup], events: Sequence[Lookup]) -> History:
        points: dict[tuple[str, str], set[tuple[datetime, float]]] = {}
        for s in series:
            mine = sorted(
                (r.time, r.value)
                for r in self.readings
                if r.elder_id == s.elder_id
                and r.metric == s.name
                and "clock_skew" not in r.flags
                and (s.since or s.start) <= r.time <= s.end
            )
            if s.since is not None:  # the span, and the newest reading before it
                before = [p for p in mine if p[0] < s.start][-1:]
                mine = before + [p for p in mine if p[0] >= s.start]
            points.setdefault((s.elder_id, s.name), set()).update(mine)
        times = {}
        for e in events:
            times[(e.elder_id, e.name)] = sorted(
                ev.time
                for ev in self.events
                if ev.elder_id == e.elder_id and ev.kind == e.name and e.start <= ev.time <= e.end
            )
        return History({k: sorted(v) for k, v in points.items()}, times)

    def _new_id(self) -> UUID:
        return next(self._ids)

    # ---- applying decisions (as gateway/store/alerts.py writes them) -------------------

    def _apply(self, decisions: Iterable[Decision], now: datetime) -> None:
        for d in decisions:
            match d:
                case OpenAlert():
                    m = d.match
                    alert = ReplayAlert(
                        d.alert_id,
                        m.elder_id,
                        m.rule_id,
                        d.severity,
                        m.severity,
                        "open",
                        d.route,
                        m.observed_at,
                        now,
                        m.late_by,
                        dict(m.evidence),
                        last_at=m.observed_at,
                        last_value=m.value,
                    )
                    alert.history.append("raised")
                    alert.outbox.append(("raised", d.severity, d.route))
                    if d.task is not None:
                        alert.task = (d.task.kind, d.task.assignee, d.task.due_at)
                    self.alerts[d.alert_id] = alert
                case AddEvidence():
                    a = self.alerts[d.alert_id]
                    a.matches += 1
                    a.last_value = d.match.value
                    a.last_at = max(a.last_at or d.match.observed_at, d.match.observed_at)
                    a.confirmed = a.confirmed or d.confirm
                    if d.reopen:
                        a.state = "open"
                        a.history.append("condition back")
                    if d.confirm:
                        a.history.append("confirmed")
                case UpgradeAlert():
                    a = self.alerts[d.alert_id]
                    a.severity, a.raised_severity = d.severity, max(d.severity, d.match.severity)
                    a.state, a.route, a.matches = "open", d.route, a.matches + 1
                    a.last_at = max(a.last_at or d.match.observed_at, d.match.observed_at)
                    a.history.append(f"upgraded {d.from_severity} -> {d.severity}")
                    a.outbox.append(("upgraded", d.severity, d.route))
                case ClearCondition():
                    a = self.alerts[d.alert_id]
                    a.state = "condition_cleared"
                    a.history.append("condition cleared")
                case SupersedeAlert():
                    a = self.alerts[d.alert_id]
                    a.state, a.closed_at = "superseded", now
                    a.history.append(f"superseded by {d.by_alert}")
                    self.alerts[d.by_alert].evidence.setdefault("superseded", []).append(
                        {"alert_id": str(d.alert_id), "rule": d.rule_id}
                    )
                case ScheduleTimer():
                    self.timers.setdefault((d.kind, d.key), _Timer(d.kind, d.key, d.due_at, d.payload))
                case CancelTimer():
                    self.timers.pop((d.kind, d.key), None)
                case Suppressed():
                    self.suppressed.append(d)

"""The rules engine: a batch of readings and events, plus the little state it needs, to decisions.

Pure: no SQL, no clock (``now`` is passed in). It runs in two steps around the store:

1. ``scan`` looks at the batch with each elder's effective rules and active alerts, which the
   caller has at hand for every batch. Most batches end here: no reading breaches, no event
   concerns a rule, no active alert may clear. Otherwise the scan says what history it needs:
   the readings of a sustained window, the latest NEWS2 parameters, earlier events.
2. ``decide`` takes that history (read from the store on this rare path only, so any worker
   can decide for any elder: no rule depends on one worker's memory) and returns decisions,
   elder by elder, in the time order of the data (a buffered upload is judged in its own
   order). The lifecycle (``lifecycle.py``) turns each match into alert decisions.

A fired timer (a waiting window ran out: a fall without recovery) is decided by ``on_timer``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from math import inf
from typing import Any
from uuid import UUID, uuid4

from eldercare.alerts import news2, news2_marks
from eldercare.alerts.careplan import CarePlan
from eldercare.alerts.decisions import (
    CONDITION_ON_STATES,
    CancelTimer,
    Decision,
    Match,
    ScheduleTimer,
    timer_kind,
)
from eldercare.alerts.lifecycle import ElderAlerts, apply_match, clear_condition
from eldercare.alerts.news2_marks import Marks
from eldercare.alerts.rules import EventRule, RuleSet, Severity, ThresholdRule
from eldercare.alerts.windows import Point, run_ending_at
from eldercare.devices.records import LATE, DeviceEvent, Reading

#: The NEWS2 parameters measured by devices (consciousness and oxygen are not, yet).
NEWS2_METRICS = ("respiration_rate", "spo2", "systolic_bp", "heart_rate", "body_temperature")
#: Readings kept in an alert's evidence: the run that raised it, newest last.
EVIDENCE_POINTS = 20


#: Per metric, the values no rule reacts to: (low, low included, high, high included).
QuietBands = Mapping[str, tuple[float, bool, float, bool]]


@dataclass(frozen=True, slots=True)
class ElderContext:
    """One elder as the rules see them: effective rules, care plan, alerts.

    ``quiet`` (``quiet_bands(rules, plan)``) lets the scan pass over an ordinary reading with
    two comparisons; compute it once per plan, not per batch.
    """

    elder_id: str
    rules: RuleSet
    plan: CarePlan
    alerts: ElderAlerts
    quiet: QuietBands


def quiet_bands(rules: RuleSet, plan: CarePlan) -> dict[str, tuple[float, bool, float, bool]]:
    """Per metric, the band of values that breach no threshold rule and score 0 in NEWS2.

    A reading inside it concerns no rule unless the elder has an active alert (which it
    might clear). Metrics no rule reads are absent (the scan looks at them in full, which
    finds nothing).
    """
    inf = float("inf")
    bands: dict[str, list[Any]] = {}

    def narrow(metric: str, low: float, low_in: bool, high: float, high_in: bool) -> None:
        band = bands.setdefault(metric, [-inf, True, inf, True])
        if low > band[0] or (low == band[0] and not low_in):
            band[0], band[1] = low, low_in
        if high < band[2] or (high == band[2] and not high_in):
            band[2], band[3] = high, high_in

    for rule in rules.thresholds:
        for c in (*rule.any, *(c for level in rule.levels for c in level.any)):
            match c.op:
                case "<":
                    narrow(c.metric, c.value, True, inf, True)
                case "<=":
                    narrow(c.metric, c.value, False, inf, True)
                case ">":
                    narrow(c.metric, -inf, True, c.value, True)
                case _:
                    narrow(c.metric, -inf, True, c.value, False)
    if rules.news2 is not None and not plan.on_oxygen:
        for metric, zero in _NEWS2_QUIET[plan.spo2_scale_under(rules)].items():
            low, high = min(b[0] for b in zero), max(b[1] for b in zero)  # the zero bands touch
            narrow(metric, low, True, high, True)
    elif rules.news2 is not None:  # on oxygen every NEWS2 reading may count
        for metric in NEWS2_METRICS:
            narrow(metric, inf, False, -inf, False)
    return {m: (b[0], b[1], b[2], b[3]) for m, b in bands.items()}


def _is_quiet(band: tuple[float, bool, float, bool], value: float) -> bool:
    low, low_in, high, high_in = band
    return (value > low or (low_in and value == low)) and (value < high or (high_in and value == high))


#: A closed range of values, (low, high); either end may be infinite.
Band = tuple[float, float]
#: At most this many bands per look-up reach the store (closer ones are joined: more is read).
LOOKUP_BANDS = 2


@dataclass(frozen=True, slots=True)
class Lookup:
    """History the decision needs: one elder's readings of a metric, or events of a kind, in
    [start, end]; with ``since``, also the newest reading in [since, start) (a window's run
    may begin before its start; NEWS2 wants the latest value of each parameter, not every
    reading of 15 minutes).

    ``holds`` (readings only): the bands of values the decisions judge runs of, counted back
    from each reading judged, the earliest at ``first``. A reading outside all of them ends
    every such run, so the store may leave out what lies before the newest one at or before
    ``first``: the decisions are the same. None: every value counts (nothing left out).
    """

    elder_id: str
    name: str  # a metric, or an event kind
    start: datetime
    end: datetime
    since: datetime | None = None
    first: datetime | None = None
    holds: tuple[Band, ...] | None = None


@dataclass(slots=True)
class _SeriesNeed:
    start: datetime
    end: datetime
    since: datetime
    first: datetime
    holds: list[Band] | None


def join_bands(bands: Iterable[Band], most: int = LOOKUP_BANDS) -> tuple[Band, ...]:
    """The union of ``bands``, as at most ``most`` bands (the nearest joined: a superset)."""
    merged: list[list[float]] = []
    for low, high in sorted(bands):
        if merged and low <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], high)
        else:
            merged.append([low, high])
    while len(merged) > most:
        i = min(range(len(merged) - 1), key=lambda j: merged[j + 1][0] - merged[j][1])
        merged[i : i + 2] = [[merged[i][0], merged[i + 1][1]]]
    return tuple((low, high) for low, high in merged)


@dataclass(slots=True)
class ElderScan:
    """What the batch holds for one elder that the rules must look at."""

    readings: list[Reading] = field(default_factory=list)  # breaching, clearing or NEWS2-scoring
    events: list[DeviceEvent] = field(default_factory=list)
    news2_at: list[datetime] = field(default_factory=list)


@dataclass(slots=True)
class Scan:
    """The batch's candidates, elder by elder, and the history they need."""

    elders: dict[str, ElderScan] = field(default_factory=dict)
    series: dict[tuple[str, str], _SeriesNeed] = field(default_factory=dict)
    latest: dict[tuple[str, str], _SeriesNeed] = field(default_factory=dict)  # NEWS2's
    event_spans: dict[tuple[str, str], tuple[datetime, datetime]] = field(default_factory=dict)
    #: Threshold rules a reading of the batch breaches, by (elder, metric): the batch's other
    #: readings of that metric may clear what the breach opens.
    breached: dict[tuple[str, str], list[ThresholdRule]] = field(default_factory=dict)
    #: The readings taken, by id(): none is taken twice.
    taken: set[int] = field(default_factory=set)

    def __bool__(self) -> bool:
        return bool(self.elders)

    def need_series(
        self,
        elder_id: str,
        metric: str,
        at: datetime,
        window: timedelta,
        holds: Iterable[Band] | None = None,
        before: timedelta | None = None,
        _into: dict[tuple[str, str], _SeriesNeed] | None = None,
    ) -> None:
        """Ask for the elder's readings of ``metric`` in [at - window, at], and the newest one
        in [at - window - before, at - window) (``before`` defaults to ``window``: a sustained
        run may start up to a window before the window). ``holds``: the bands of values the
        run judged at ``at`` counts (None: all). Needs of one elder and metric merge."""
        start = at - window
        since = start - (window if before is None else before)
        bands = None if holds is None else list(holds)
        needs = self.series if _into is None else _into
        need = needs.get((elder_id, metric))
        if need is None:
            needs[(elder_id, metric)] = _SeriesNeed(start, at, since, at, bands)
            return
        need.start, need.end = min(need.start, start), max(need.end, at)
        need.since, need.first = min(need.since, since), min(need.first, at)
        if need.holds is not None:
            if bands is None:
                need.holds = None
            else:
                need.holds.extend(bands)

    def need_events(self, elder_id: str, kind: str, start: datetime, end: datetime) -> None:
        """Ask for the elder's events of ``kind`` in [start, end] (spans merge)."""
        _widen(self.event_spans, (elder_id, kind), start, end)

    def need_latest(self, elder_id: str, metric: str, at: datetime, max_age: timedelta) -> None:
        """Ask for the elder's latest reading of ``metric`` at ``at`` (no older than ``max_age``)."""
        self.need_series(elder_id, metric, at, timedelta(0), before=max_age, _into=self.latest)

    def lookups(self) -> tuple[list[Lookup], list[Lookup]]:
        """(series lookups, event lookups) for the store to answer."""
        return (
            [
                Lookup(
                    e, m, n.start, n.end, n.since, n.first, None if n.holds is None else join_bands(n.holds)
                )
                for needs in (self.series, self.latest)
                for (e, m), n in sorted(needs.items())
            ],
            [Lookup(e, k, s, t) for (e, k), (s, t) in sorted(self.event_spans.items())],
        )


@dataclass(frozen=True, slots=True)
class History:
    """The store's answers to a scan's lookups: readings and event times, oldest first."""

    series: Mapping[tuple[str, str], Sequence[Point]] = field(default_factory=dict)
    events: Mapping[tuple[str, str], Sequence[datetime]] = field(default_factory=dict)

    def points(self, elder_id: str, metric: str) -> Sequence[Point]:
        return self.series.get((elder_id, metric), ())

    def event_times(self, elder_id: str, kinds: Iterable[str]) -> list[datetime]:
        return sorted(t for k in kinds for t in self.events.get((elder_id, k), ()))


def _widen(spans: dict[Any, tuple[datetime, datetime]], key: Any, start: datetime, end: datetime) -> None:
    old = spans.get(key)
    spans[key] = (start, end) if old is None else (min(old[0], start), max(old[1], end))


# ---- step 1: scan ------------------------------------------------------------------------


def scan(
    readings: Sequence[Reading],
    events: Iterable[DeviceEvent],
    contexts: Mapping[str, ElderContext],
    news2_marks: Mapping[str, Marks] | None = None,
) -> Scan:
    """The batch's candidates: breaching readings, readings that may clear an alert, NEWS2
    readings that score, events some rule listens to; and the history each needs.

    ``news2_marks`` (``news2_marks.py``: the elders' rows, this batch's marks included): a
    NEWS2 reading whose bound stays below the rule's lowest threshold asks for nothing."""
    out = Scan()
    marks = news2_marks or {}
    for r in readings:
        ctx = contexts.get(r.elder_id) if r.elder_id else None
        if ctx is None:
            continue
        _scan_reading(out, ctx, r, marks.get(ctx.elder_id))
    if out.breached:
        _scan_clearing(out, readings, contexts)
    for ev in events:
        ctx = contexts.get(ev.elder_id) if ev.elder_id else None
        if ctx is None or not ctx.rules.listening_to(ev.kind):
            continue
        out.elders.setdefault(ctx.elder_id, ElderScan()).events.append(ev)
        _scan_event(out, ctx, ev)
    return out


def _scan_reading(out: Scan, ctx: ElderContext, r: Reading, marks: Marks | None = None) -> None:
    band = ctx.quiet.get(r.metric)
    if band is None:
        return  # no rule reads this metric (steps, room temperature ...)
    if not ctx.alerts.active and _is_quiet(band, r.value):
        return  # the common case: an ordinary reading, nothing open that it could clear
    rules = ctx.rules
    wanted = False
    for rule in rules.thresholds_for(r.metric):
        active = ctx.alerts.active.get(rule.id)
        if rule.breaches(r.metric, r.value):
            wanted = True
            breached = out.breached.setdefault((ctx.elder_id, r.metric), [])
            if rule not in breached:
                breached.append(rule)
            if active is None and rule.window:
                out.need_series(ctx.elder_id, r.metric, r.time, rule.window, breach_bands(rule, r.metric))
        elif active is not None and active.state in CONDITION_ON_STATES:
            margin = rules.hysteresis_margin(rule.id)
            if _clears(rule, r.metric, r.value, margin):
                wanted = True
                bands = (clear_band(rule, r.metric, margin),)
                out.need_series(ctx.elder_id, r.metric, r.time, rule.window, bands)
    news2_rule = rules.news2
    if (
        news2_rule is not None
        and r.metric in NEWS2_METRICS
        and _news2_scores(ctx, r)
        and (
            marks is None
            or ctx.plan.on_oxygen
            or news2_marks.bound(marks, r.time, news2_rule.max_age) >= news2_rule.urgent_from
        )
    ):
        # The aggregate can only rise on a reading that scores: judge NEWS2 at its time
        # (unless the marks show it stays below every threshold).
        wanted = True
        scan_elder = out.elders.setdefault(ctx.elder_id, ElderScan())
        scan_elder.news2_at.append(r.time)
        for metric in NEWS2_METRICS:
            out.need_latest(ctx.elder_id, metric, r.time, news2_rule.max_age)
    if wanted:
        out.elders.setdefault(ctx.elder_id, ElderScan()).readings.append(r)
        out.taken.add(id(r))


def _scan_clearing(out: Scan, readings: Sequence[Reading], contexts: Mapping[str, ElderContext]) -> None:
    """Take the readings that may clear an alert a reading of the same batch opens (a buffered
    upload of a whole episode, or two messages in one batch): the decisions run in time order,
    so a clearing reading after the breach clears it."""
    for r in readings:
        rules = out.breached.get((r.elder_id, r.metric)) if r.elder_id else None
        ctx = contexts.get(r.elder_id) if rules and r.elder_id else None
        if rules is None or ctx is None:
            continue
        for rule in rules:
            margin = ctx.rules.hysteresis_margin(rule.id)
            if _clears(rule, r.metric, r.value, margin):
                bands = (clear_band(rule, r.metric, margin),)
                out.need_series(ctx.elder_id, r.metric, r.time, rule.window, bands)
                if id(r) not in out.taken:
                    out.taken.add(id(r))
                    out.elders.setdefault(ctx.elder_id, ElderScan()).readings.append(r)


def breach_bands(rule: ThresholdRule, metric: str) -> tuple[Band, ...]:
    """The values of ``metric`` that breach ``rule`` (closed bands: a superset at the edges)."""
    return tuple((-inf, c.value) if c.below else (c.value, inf) for c in rule.any if c.metric == metric)


def clear_band(rule: ThresholdRule, metric: str, margin: float) -> Band:
    """The values of ``metric`` back inside ``rule``'s band by ``margin`` (``_clears``)."""
    low, high = -inf, inf
    for c in rule.any:
        if c.metric == metric:
            step = abs(c.value) * margin
            if c.below:
                low = max(low, c.value + step)
            else:
                high = min(high, c.value - step)
    return (low, high)


def _zero_bands(chart: news2.Chart) -> tuple[tuple[float, float], ...]:
    inf = float("inf")
    return tuple(
        (-inf if b.low is None else b.low, inf if b.high is None else b.high)
        for b in chart.bands
        if b.score == 0
    )


#: Per SpO2 scale, the values of each NEWS2 metric that score 0 (oxygen unknown: scored as
#: air). A value inside scores 0 also after rounding; one outside is judged in full later.
_NEWS2_QUIET = {
    scale: {
        "respiration_rate": _zero_bands(news2.RESPIRATION_RATE_CHART),
        "spo2": _zero_bands(spo2),
        "systolic_bp": _zero_bands(news2.SYSTOLIC_BP_CHART),
        "heart_rate": _zero_bands(news2.HEART_RATE_CHART),
        "body_temperature": _zero_bands(news2.BODY_TEMPERATURE_CHART),
    }
    for scale, spo2 in ((1, news2.SPO2_SCALE_1_CHART), (2, news2.SPO2_SCALE_2_ON_AIR_CHART))
}


def _news2_scores(ctx: ElderContext, r: Reading) -> bool:
    """True when the reading's own NEWS2 parameter may score.

    On the hot path: a table lookup, not a NEWS2 computation. A reading that scores 0 can
    neither raise nor upgrade a NEWS2 alert, also when one is open (NEWS2 alerts do not clear
    by hysteresis: staff resolve them).
    """
    if ctx.plan.on_oxygen:
        return True  # on oxygen, every reading may count (the oxygen itself scores 2)
    quiet = _NEWS2_QUIET[ctx.plan.spo2_scale_under(ctx.rules)][r.metric]
    value = r.value
    return not any(low <= value <= high for low, high in quiet)


def _scan_event(out: Scan, ctx: ElderContext, ev: DeviceEvent) -> None:
    for rule in ctx.rules.listening_to(ev.kind):
        if not isinstance(rule, EventRule):
            continue
        if ev.kind in rule.on:
            if rule.after:
                for kind in rule.after:
                    out.need_events(ctx.elder_id, kind, ev.time - rule.after_within, ev.time)
            if rule.unless and rule.within is not None:
                for kind in rule.unless:
                    out.need_events(ctx.elder_id, kind, ev.time, ev.time + rule.within)
            for level in rule.levels:
                if level.count is not None and level.within is not None:
                    for kind in rule.on:
                        out.need_events(ctx.elder_id, kind, ev.time - level.within, ev.time)


# ---- step 2: decide ----------------------------------------------------------------------


def decide(
    found: Scan,
    contexts: Mapping[str, ElderContext],
    history: History,
    now: datetime,
    new_id: Callable[[], UUID] = uuid4,
) -> list[Decision]:
    """The decisions for a scanned batch, elder by elder, in the data's time order."""
    decisions: list[Decision] = []
    for elder_id, scanned in found.elders.items():
        ctx = contexts.get(elder_id)
        if ctx is None:
            continue
        steps: list[tuple[datetime, int, Callable[[], list[Decision]]]] = []
        for r in scanned.readings:
            steps.append((r.time, 0, _reading_step(ctx, r, history, now, new_id)))
        for t in scanned.news2_at:
            steps.append((t, 1, _news2_step(ctx, t, history, now, new_id)))
        for ev in scanned.events:
            steps.append((ev.time, 2, _event_step(ctx, ev, history, now, new_id)))
        steps.sort(key=lambda s: (s[0], s[1]))
        for _, _, step in steps:
            decisions.extend(step())
    return decisions


def _late_by(flags: Sequence[str], observed_at: datetime, now: datetime) -> timedelta | None:
    return max(timedelta(0), now - observed_at) if LATE in flags else None


def _reading_step(
    ctx: ElderContext, r: Reading, history: History, now: datetime, new_id: Callable[[], UUID]
) -> Callable[[], list[Decision]]:
    def step() -> list[Decision]:
        out: list[Decision] = []
        rules = ctx.rules
        points = history.points(ctx.elder_id, r.metric)
        for rule in rules.thresholds_for(r.metric):
            active = ctx.alerts.active.get(rule.id)
            if rule.breaches(r.metric, r.value):
                severity = rule.severity_of(r.metric, r.value) or rule.severity
                if active is None:
                    run = run_ending_at(points, r.time, rule.window, partial(rule.breaches, r.metric))
                    if rule.window and run is None:
                        continue  # not sustained (yet)
                    run = run or [(r.time, r.value)]
                else:
                    run = [(r.time, r.value)]
                match = Match(
                    ctx.elder_id,
                    rule.id,
                    severity,
                    r.time,
                    r.device_id,
                    r.value,
                    _threshold_evidence(rule, r, run, severity),
                    _late_by(r.flags, r.time, now),
                )
                out.extend(apply_match(rules, ctx.alerts, match, now, new_id))
            elif active is not None and active.state in CONDITION_ON_STATES:
                margin = rules.hysteresis_margin(rule.id)
                if not _clears(rule, r.metric, r.value, margin):
                    continue
                run = run_ending_at(
                    points, r.time, rule.window, partial(_clears, rule, r.metric, margin=margin)
                )
                if run is None:
                    continue
                evidence = {
                    "metric": r.metric,
                    "margin": margin,
                    "window_s": rule.window.total_seconds(),
                    "readings": _points_json(run),
                }
                out.extend(clear_condition(ctx.alerts, rule.id, r.time, evidence))
        return out

    return step


def _clears(rule: ThresholdRule, metric: str, value: float, margin: float) -> bool:
    """Back inside the band: every condition on ``metric`` clears by the margin."""
    conditions = [c for c in rule.any if c.metric == metric]
    return bool(conditions) and all(c.clears(value, margin) for c in conditions)


def _threshold_evidence(
    rule: ThresholdRule, r: Reading, run: Sequence[Point], severity: Severity
) -> dict[str, Any]:
    levels = [str(c) for level in rule.levels if level.severity == severity for c in level.any]
    return {
        "metric": r.metric,
        "value": r.value,
        "at": r.time.isoformat(),
        "device_id": r.device_id,
        "conditions": [str(c) for c in rule.any],
        "level_conditions": levels,
        "window_s": rule.window.total_seconds(),
        "readings": _points_json(run),
    }


def _points_json(run: Sequence[Point]) -> list[dict[str, Any]]:
    return [{"at": t.isoformat(), "value": v} for t, v in run[-EVIDENCE_POINTS:]]


def _news2_step(
    ctx: ElderContext, at: datetime, history: History, now: datetime, new_id: Callable[[], UUID]
) -> Callable[[], list[Decision]]:
    def step() -> list[Decision]:
        rule = ctx.rules.news2
        if rule is None:
            return []
        latest: dict[str, tuple[float, datetime]] = {}
        for metric in NEWS2_METRICS:
            last = None
            for t, v in history.points(ctx.elder_id, metric):
                if t <= at:
                    last = (v, t)
            if last is not None:
                latest[metric] = last
        observations = news2.observations_from_latest(
            latest,
            at,
            max_age=rule.max_age,
            spo2_scale=ctx.plan.spo2_scale_under(ctx.rules),
            supplemental_oxygen=ctx.plan.on_oxygen,
        )
        result = news2.score(observations)
        level = news2.severity(
            result,
            urgent_from=rule.urgent_from,
            emergency_from=rule.emergency_from,
            red_emergency_from=rule.single_three_emergency_from,
        )
        if level is None:
            return []
        evidence = {
            "aggregate": result.aggregate,
            "scores": {str(p.value): s for p, s in result.scores.items()},
            "missing": sorted(str(p.value) for p in result.missing),
            "assumed": sorted(str(p.value) for p in result.assumed),
            "readings": {m: {"value": v, "at": t.isoformat()} for m, (v, t) in sorted(latest.items())},
            "spo2_scale": observations.spo2_scale,
            "max_age_s": rule.max_age.total_seconds(),
        }
        late = _late_by([LATE], at, now) if now - at > ctx.rules.defaults.late_after else None
        match = Match(
            ctx.elder_id, rule.id, Severity(level), at, None, float(result.aggregate), evidence, late
        )
        return apply_match(ctx.rules, ctx.alerts, match, now, new_id)

    return step


def _event_step(
    ctx: ElderContext, ev: DeviceEvent, history: History, now: datetime, new_id: Callable[[], UUID]
) -> Callable[[], list[Decision]]:
    def step() -> list[Decision]:
        out: list[Decision] = []
        for rule in ctx.rules.listening_to(ev.kind):
            if not isinstance(rule, EventRule):
                continue
            if ev.kind in rule.unless:
                # What the waiting window waited for: the timer (if still pending) is cancelled.
                out.append(CancelTimer(timer_kind(rule.id), ctx.elder_id))
                continue
            if ev.kind not in rule.on:
                continue
            local = ev.time.astimezone(ctx.plan.zone)
            if rule.during is not None and not rule.during.contains(local.time()):
                continue
            if rule.after and not any(
                t <= ev.time
                for t in history.event_times(ctx.elder_id, rule.after)
                if t >= ev.time - rule.after_within
            ):
                continue
            evidence = _event_evidence(ev, local)
            if rule.unless and rule.within is not None:
                answered = [
                    t
                    for t in history.event_times(ctx.elder_id, rule.unless)
                    if ev.time <= t <= ev.time + rule.within
                ]
                if answered:
                    continue  # the answer is already here (a buffered upload carried both)
                payload = {
                    "rule": rule.id,
                    "elder_id": ctx.elder_id,
                    "event": evidence,
                    "flags": list(ev.flags),
                }
                out.append(ScheduleTimer(timer_kind(rule.id), ctx.elder_id, ev.time + rule.within, payload))
                continue
            severity, why = _event_severity(ctx, rule, ev, local, history)
            if why:
                evidence["severity_reason"] = why
            match = Match(
                ctx.elder_id,
                rule.id,
                severity,
                ev.time,
                ev.device_id,
                None,
                evidence,
                _late_by(ev.flags, ev.time, now),
            )
            out.extend(apply_match(ctx.rules, ctx.alerts, match, now, new_id))
        return out

    return step


def _event_evidence(ev: DeviceEvent, local: datetime) -> dict[str, Any]:
    return {
        "event": ev.kind,
        "at": ev.time.isoformat(),
        "local_time": local.strftime("%H:%M"),
        "device_id": ev.device_id,
        "details": dict(ev.details),
    }


def _event_severity(
    ctx: ElderContext, rule: EventRule, ev: DeviceEvent, local: datetime, history: History
) -> tuple[Severity, str | None]:
    """The rule's severity for this event: the highest level that applies, and why."""
    severity, why = rule.severity, None
    for level in rule.levels:
        if level.during is not None and level.during.contains(local.time()):
            severity, why = level.severity, f"local time {local:%H:%M} within {level.during}"
        if level.count is not None and level.within is not None:
            start = ev.time - level.within
            seen = [t for t in history.event_times(ctx.elder_id, rule.on) if start <= t <= ev.time]
            if len(seen) >= level.count:
                severity = level.severity
                why = f"{len(seen)} {'/'.join(sorted(rule.on))} within {_span(level.within)}"
    return severity, why


def _span(value: timedelta) -> str:
    seconds = int(value.total_seconds())
    for unit, size in (("d", 86_400), ("h", 3_600), ("m", 60)):
        if seconds % size == 0 and seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


# ---- fired timers ------------------------------------------------------------------------


def on_timer(
    ctx: ElderContext, payload: Mapping[str, Any], now: datetime, new_id: Callable[[], UUID] = uuid4
) -> list[Decision]:
    """A rule's waiting window ran out (nothing cancelled its timer): the rule matches now."""
    rule_id = str(payload["rule"])
    if rule_id not in ctx.rules:
        return []  # the rule was switched off for this elder since the timer started
    rule = ctx.rules.rule(rule_id)
    if not isinstance(rule, EventRule):
        return []
    event = dict(payload["event"])
    observed_at = datetime.fromisoformat(str(event["at"])).astimezone(UTC)
    flags = [str(f) for f in payload.get("flags", ())]
    evidence = {**event, "waited_s": rule.within.total_seconds() if rule.within else 0.0}
    evidence["unanswered"] = sorted(rule.unless)
    match = Match(
        ctx.elder_id,
        rule.id,
        rule.severity,
        observed_at,
        event.get("device_id"),
        None,
        evidence,
        _late_by(flags, observed_at, now),
    )
    return apply_match(ctx.rules, ctx.alerts, match, now, new_id)

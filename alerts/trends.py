"""The trend rules (rules.md "Trend rules"), judged on a schedule from the rollups. Pure.

A job (``gateway/jobs.py``) asks the store for what ``mean_queries`` and ``rise_queries`` say
(one query per rule and chunk of elders, answered from the hourly rollups, exact as the
series queries are), then calls ``decide`` with each elder's facts at an injected ``now``.
What a match does to the elder's alerts is ``scheduled.decide_match``: only what is new.

How rules.md is read here:

mean rules (``bp_uncontrolled``, ``glucose_uncontrolled``)
  The mean of every reading of the metric over ``over`` (7 days): the hourly buckets of the
  last 7 x 24 UTC hours up to and including the current one, sum over count (each reading
  weighs the same). A mean needs at least ``MIN_MEAN_READINGS`` readings: one reading of 150
  is not a 7-day mean (a single very high one is ``bp_crisis``'s). The rule breaches when the
  mean of any condition's metric meets it (systolic >= 140 or diastolic >= 90); it clears when
  every condition's mean is back inside by the hysteresis margin (5 %: systolic <= 133).
  ``fasting_only``: the device contract carries no meal context, so readings taken
  ``FASTING_HOURS`` (05:00-09:00) in the elder's time zone count as fasting ones, judged by
  the local time of their hourly bucket's start (exact for whole-hour zones; in a zone such
  as Asia/Kolkata, +05:30, the buckets cover 05:30-09:30).
rise rules (``weight_gain``)
  Daily means per day of the elder's calendar (local midnight to midnight, from the hourly
  buckets): the rise is the latest day's mean minus the lowest daily mean of the ``within``
  (3) days before it. The latest day must be today or yesterday (an old weigh-in was judged
  when it was new). It breaches at a rise of ``by`` (2 kg) or more and clears when the rise is
  below ``by`` less the hysteresis margin (1.9 kg).

A match's ``observed_at`` is the start of the newest hourly bucket it rests on, so once staff
resolve an alert the same readings do not raise it again; a newer reading that keeps the
trend over the line does.

An alert of a rule that pulls the elder's chronic follow-up forward (bp_uncontrolled,
glucose_uncontrolled: "family doctor within 14 days") has no task of its own: the follow-up
job brings the chronic follow-up's task to within 14 days of the alert (``followups.py``),
one piece of work for the team rather than two.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import date, datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

from eldercare.alerts.decisions import CONDITION_ON_STATES, Decision, Match, OpenAlert
from eldercare.alerts.lifecycle import clear_condition
from eldercare.alerts.rules import MeanTrendRule, PeriodicFollowUpRule, RiseTrendRule, TimeWindow
from eldercare.alerts.scheduled import Elder, decide_match, iso

#: Readings a mean needs before it is judged.
MIN_MEAN_READINGS = 3
#: Local hours whose readings count as fasting (the device contract has no meal context).
FASTING_HOURS = TimeWindow.model_validate("05:00-09:00")
HOUR = timedelta(hours=1)
DAY = timedelta(days=1)


# ---- facts the store answers ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Mean:
    """The mean of one elder's metric over a query's window."""

    metric: str
    mean: float
    readings: int
    #: Start of the oldest and of the newest hourly bucket with readings.
    first: datetime
    last: datetime


@dataclass(frozen=True, slots=True)
class DayMean:
    """The mean of one elder's metric over one local calendar day."""

    day: date
    mean: float
    readings: int
    #: Start of the day's newest hourly bucket with readings.
    last: datetime


@dataclass(frozen=True, slots=True)
class MeanQuery:
    """Means of ``metrics`` over ``[start, end)`` (hour-aligned) for each elder (id, time zone);
    with ``local_hours``, only buckets starting at those local hours."""

    rule_id: str
    metrics: tuple[str, ...]
    start: datetime
    end: datetime
    local_hours: TimeWindow | None
    elders: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class RiseQuery:
    """Daily means of ``metric`` per local day for each elder (id, time zone, start), up to ``end``."""

    rule_id: str
    metric: str
    end: datetime
    elders: tuple[tuple[str, str, datetime], ...]


@dataclass(frozen=True, slots=True)
class TrendFacts:
    """What the store answered for one elder: per rule id, means by metric or daily means."""

    means: Mapping[str, Mapping[str, Mean]] = field(default_factory=dict)
    days: Mapping[str, Sequence[DayMean]] = field(default_factory=dict)


# ---- what to ask ---------------------------------------------------------------------------


def floor_hour(t: datetime) -> datetime:
    """The start of the UTC hour holding ``t``."""
    return t.replace(minute=0, second=0, microsecond=0)


def mean_window(rule: MeanTrendRule, now: datetime) -> tuple[datetime, datetime]:
    """[start, end) of a mean rule's window at ``now``: whole hours, the current one included."""
    end = floor_hour(now) + HOUR
    return floor_hour(end - rule.over), end


def rise_days(rule: RiseTrendRule) -> int:
    """How many days before the latest one a rise is measured from (``within`` in whole days)."""
    return max(1, math.ceil(rule.within / DAY))


def rise_start(rule: RiseTrendRule, ctx: Elder, now: datetime) -> datetime:
    """Local midnight of the first day a rise at ``now`` may be measured from."""
    zone = ctx.plan.zone
    first = now.astimezone(zone).date() - timedelta(days=rise_days(rule) + 1)
    return datetime.combine(first, datetime.min.time(), tzinfo=zone)


def mean_queries(contexts: Iterable[Elder], now: datetime) -> list[MeanQuery]:
    """The mean queries for these elders: one per rule (and per override of its window)."""
    grouped: dict[tuple[Any, ...], list[tuple[str, str]]] = {}
    for ctx in contexts:
        for rule in ctx.rules.trends:
            if isinstance(rule, MeanTrendRule):
                start, end = mean_window(rule, now)
                hours = FASTING_HOURS if rule.fasting_only else None
                key = (rule.id, tuple(sorted(rule.metrics)), start, end, hours)
                grouped.setdefault(key, []).append((ctx.elder_id, ctx.plan.timezone))
    return [MeanQuery(r, m, s, e, h, tuple(elders)) for (r, m, s, e, h), elders in grouped.items()]


def rise_queries(contexts: Iterable[Elder], now: datetime) -> list[RiseQuery]:
    """The daily-mean queries for these elders: one per rule and metric."""
    grouped: dict[tuple[str, str], list[tuple[str, str, datetime]]] = {}
    for ctx in contexts:
        for rule in ctx.rules.trends:
            if isinstance(rule, RiseTrendRule):
                elder = (ctx.elder_id, ctx.plan.timezone, rise_start(rule, ctx, now))
                grouped.setdefault((rule.id, rule.metric), []).append(elder)
    end = floor_hour(now) + HOUR
    return [RiseQuery(rule_id, metric, end, tuple(elders)) for (rule_id, metric), elders in grouped.items()]


# ---- deciding ------------------------------------------------------------------------------


def decide(
    ctx: Elder, facts: TrendFacts, now: datetime, new_id: Callable[[], UUID] = uuid4
) -> list[Decision]:
    """The decisions of every trend rule of the elder at ``now``, given the store's facts."""
    out: list[Decision] = []
    for rule in ctx.rules.trends:
        if isinstance(rule, MeanTrendRule):
            out += _mean(ctx, rule, facts.means.get(rule.id, {}), now, new_id)
        else:
            out += _rise(ctx, rule, facts.days.get(rule.id, ()), now, new_id)
    return out


def _days(span: timedelta) -> str:
    return f"{span.days}-day" if span % DAY == timedelta(0) else f"{span.total_seconds() / 3600:g}-hour"


def _condition_on(ctx: Elder, rule_id: str) -> bool:
    active = ctx.alerts.active.get(rule_id)
    return active is not None and active.state in CONDITION_ON_STATES


def _mean(
    ctx: Elder,
    rule: MeanTrendRule,
    means: Mapping[str, Mean],
    now: datetime,
    new_id: Callable[[], UUID],
) -> list[Decision]:
    usable = {m: x for m, x in means.items() if x.readings >= MIN_MEAN_READINGS}
    breached = [c for c in rule.any if c.metric in usable and c.breaches(usable[c.metric].mean)]
    shown = {
        m: {"mean": round(x.mean, 2), "readings": x.readings, "from": iso(x.first), "to": iso(x.last)}
        for m, x in sorted(means.items())
    }
    if not breached:
        margin = ctx.rules.hysteresis_margin(rule.id)
        judged = all(c.metric in usable for c in rule.any)
        if not (judged and _condition_on(ctx, rule.id)):
            return []
        if not all(c.clears(usable[c.metric].mean, margin) for c in rule.any):
            return []
        back = ", ".join(f"{m} {usable[m].mean:.1f}" for m in sorted(rule.metrics))
        cleared = {
            "margin": margin,
            "window_s": rule.over.total_seconds(),
            "means": shown,
            "reason": f"{_days(rule.over)} mean back inside by {margin:.0%}: {back}",
        }
        return clear_condition(ctx.alerts, rule.id, now, cleared)
    first = usable[breached[0].metric]
    evidence: dict[str, Any] = {
        "metric": first.metric,
        "value": round(first.mean, 2),
        "conditions": [str(c) for c in rule.any],
        "breached": [str(c) for c in breached],
        "window_s": rule.over.total_seconds(),
        "means": shown,
    }
    if rule.fasting_only:
        evidence["fasting_hours"] = str(FASTING_HOURS)
        evidence["timezone"] = ctx.plan.timezone
    observed = min(now, max(usable[c.metric].last for c in breached))
    match = Match(ctx.elder_id, rule.id, rule.severity, observed, None, first.mean, evidence)
    decided = decide_match(ctx.rules, ctx.alerts, match, now, new_id)
    if not any(
        isinstance(r, PeriodicFollowUpRule) and rule.id in r.pulled_forward_by for r in ctx.rules.schedules
    ):
        return decided
    return [replace(d, task=None) if isinstance(d, OpenAlert) else d for d in decided]


def _rise(
    ctx: Elder,
    rule: RiseTrendRule,
    days: Sequence[DayMean],
    now: datetime,
    new_id: Callable[[], UUID],
) -> list[Decision]:
    ordered = sorted(days, key=lambda d: d.day)
    today = now.astimezone(ctx.plan.zone).date()
    if not ordered or ordered[-1].day < today - DAY:
        return []  # no weigh-in today or yesterday: nothing new to judge
    latest = ordered[-1]
    before = [d for d in ordered if latest.day - timedelta(days=rise_days(rule)) <= d.day < latest.day]
    if not before:
        return []
    lowest = min(before, key=lambda d: (d.mean, d.day))
    rise = latest.mean - lowest.mean
    daily = [{"day": d.day.isoformat(), "mean": round(d.mean, 2), "readings": d.readings} for d in ordered]
    if rise < rule.by:
        margin = ctx.rules.hysteresis_margin(rule.id)
        if rise > rule.by * (1 - margin) or not _condition_on(ctx, rule.id):
            return []
        below = rule.by * (1 - margin)
        cleared = {
            "margin": margin,
            "rise": round(rise, 2),
            "days": daily,
            "reason": f"{rule.metric} rise {rise:.1f} over {rise_days(rule)} days (clears at {below:g})",
        }
        return clear_condition(ctx.alerts, rule.id, now, cleared)
    evidence = {
        "metric": rule.metric,
        "value": round(rise, 2),
        "conditions": [f"rise >= {rule.by:g} within {rise_days(rule)}d"],
        "from": {"day": lowest.day.isoformat(), "mean": round(lowest.mean, 2)},
        "to": {"day": latest.day.isoformat(), "mean": round(latest.mean, 2)},
        "days": daily,
        "timezone": ctx.plan.timezone,
    }
    observed = min(now, latest.last)
    match = Match(ctx.elder_id, rule.id, rule.severity, observed, None, rise, evidence)
    return decide_match(ctx.rules, ctx.alerts, match, now, new_id)

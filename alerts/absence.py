"""The absence and device rules (rules.md "Absence and device rules"), judged on a schedule. Pure.

A job (``gateway/jobs.py``) asks the store, in bulk, for what ``lookups`` says each elder
needs (the newest activity reading, the newest wearable event per device) and for the
elder's devices, then calls ``decide`` with those facts at an injected ``now``. What a match
does to the elder's alerts is ``scheduled.decide_match`` (only what is new); an absence that
has ended clears its alert (``clear_condition``); staff still resolve it.

How rules.md is read here:

inactivity (``no_activity``)
  Activity is a reading meeting one of the rule's ``activity`` conditions (``motion >= 1``,
  ``steps > 0``). Silence counts only inside the active hours (08:00-20:00 in the elder's
  time zone) and starts again with each day's hours: at a moment inside today's hours the
  silence runs from the later of today's start and the last activity, so the night does not
  count and yesterday's afternoon does not carry over (no activity since 19:00 yesterday: at
  12:00 the silence is 4 h, counted from 08:00). It is judged over the latest span of the
  hours, up to ``now`` or the span's end, so a run just after 20:00 still raises for a silence
  that reached 4 h before it. Without active hours, silence runs from the last activity. With
  no activity in the last ``ACTIVITY_HISTORY`` (7 days), the elder is judged only if the
  activity sensors report at all (a reading of their metrics of any value: motion 0): a home
  without working activity sensors is not an elder who does not move (``device_offline``
  covers sensors that stopped). Only elders who live alone: the rule's ``requires``, which
  ``effective_rules`` applies. Clears on an activity reading after the silence began.
device_offline (``device_silent``)
  A device registered to the elder, enabled, and heard from at least once (never-heard
  devices have nothing to be silent since), is offline when ``last_seen`` is older than
  max(``intervals`` x its type's ``report_interval_s``, ``at_least``), or when a Last Will set
  ``online = false`` and ``status_at`` is older than ``lwt_offline_for`` with no message since.
  It is offline since the earlier of those two moments. One alert per elder lists every
  silent device; it is ``only_safety_device_severity`` (urgent) when a silent device is of a
  ``safety_device_types`` type and no safety device of the elder is left reporting: exactly
  "the elder's only safety device" when there is one, and also several all silent. A further
  device going silent adds evidence once; the alert clears when no device is silent.
low_battery (``battery_low``)
  ``devices.battery`` (the last one reported) below ``below`` percent on any device; clears
  when every device reports at least ``below`` x (1 + the hysteresis margin): 15.75 % by
  default. The store keeps no battery history, so after a resolution a battery still low is
  raised again once a day (``BATTERY_REMINDER``), not after every cool-down.
wearable_removed (``event_unanswered``)
  Per device, the newest event among ``on`` and ``unless`` (``WEARABLE_HISTORY`` back): an
  ``on`` event (``wearable_removed``) is an open removal. The 2 h are counted inside the active
  hours as for inactivity, from the later of the span's start and the removal (taken off for
  the night at 22:00 and not back on: raised at 10:00). Clears when no removal is open and an
  ``unless`` event (``wearable_worn``) came after the counting began.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

from eldercare.alerts.decisions import CONDITION_ON_STATES, Decision, Match
from eldercare.alerts.lifecycle import clear_condition
from eldercare.alerts.rules import (
    BatteryLowRule,
    Condition,
    DeviceSilentRule,
    EventUnansweredRule,
    NoActivityRule,
    TimeWindow,
)
from eldercare.alerts.scheduled import Elder, decide_match, iso, latest_span, local_hhmm

#: How far back the newest activity reading is looked for (none at all: not judged).
ACTIVITY_HISTORY = timedelta(days=7)
#: How far back the newest wearable event of each device is looked for.
WEARABLE_HISTORY = timedelta(days=30)
#: A low battery still low after its alert was resolved is raised again after this long.
BATTERY_REMINDER = timedelta(days=1)


# ---- facts the store answers ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Device:
    """One of the elder's devices as the store has it (``devices`` and its type's interval)."""

    device_id: str
    type: str
    report_interval: timedelta
    last_seen: datetime | None
    online: bool
    status_at: datetime | None
    battery: float | None


@dataclass(frozen=True, slots=True)
class Reading:
    """A reading found by a lookup."""

    at: datetime
    metric: str
    value: float
    device_id: str


@dataclass(frozen=True, slots=True)
class DeviceEvent:
    """The newest event of a lookup's kinds of one device."""

    device_id: str
    kind: str
    at: datetime


@dataclass(frozen=True, slots=True)
class ReadingLookup:
    """Ask the store for the elder's newest reading meeting ``condition`` at or after ``since``."""

    elder_id: str
    rule_id: str
    condition: Condition
    since: datetime


@dataclass(frozen=True, slots=True)
class EventLookup:
    """Ask the store for the newest event of ``kinds`` of each of the elder's devices since ``since``."""

    elder_id: str
    rule_id: str
    kinds: frozenset[str]
    since: datetime


@dataclass(frozen=True, slots=True)
class AbsenceFacts:
    """What the store answered for one elder: devices, and per rule id what its lookups found."""

    devices: Sequence[Device] = ()
    #: rule id -> the newest reading meeting any of its conditions (absent: none found)
    readings: Mapping[str, Reading] = field(default_factory=dict)
    #: rule id -> when ``readings`` found none: the newest reading of the conditions' metrics
    #: of any value (the sensors report, nothing moves); absent: no sensor reports
    sensed: Mapping[str, Reading] = field(default_factory=dict)
    #: rule id -> per device, the newest event of the rule's kinds
    events: Mapping[str, Sequence[DeviceEvent]] = field(default_factory=dict)


# ---- what to ask ---------------------------------------------------------------------------


def lookups(ctx: Elder, now: datetime) -> list[ReadingLookup | EventLookup]:
    """What the store must look up for this elder's absence rules at ``now``."""
    out: list[ReadingLookup | EventLookup] = []
    for rule in ctx.rules.absences:
        if isinstance(rule, NoActivityRule):
            since = _counting_start(ctx, rule, now) - ACTIVITY_HISTORY
            out += [ReadingLookup(ctx.elder_id, rule.id, c, since) for c in rule.activity]
        elif isinstance(rule, EventUnansweredRule):
            since = min(now - WEARABLE_HISTORY, _counting_start(ctx, rule, now) - timedelta(days=1))
            out.append(EventLookup(ctx.elder_id, rule.id, rule.on | rule.unless, since))
    return out


def _counting_start(ctx: Elder, rule: NoActivityRule | EventUnansweredRule, now: datetime) -> datetime:
    """The earliest moment a silence judged now may have begun: the span's start, or an
    active alert's silence start if earlier."""
    start = _span(rule.active_hours, ctx, now)[0] or now - rule.silent_for
    active = ctx.alerts.active.get(rule.id)
    if active is not None:
        start = min(start, active.last_at - rule.silent_for)
    return start


def _span(window: TimeWindow | None, ctx: Elder, now: datetime) -> tuple[datetime | None, datetime]:
    """(start, end) of the latest span of the active hours; (None, now) without them."""
    if window is None:
        return None, now
    return latest_span(window, ctx.plan.zone, now)


# ---- deciding ------------------------------------------------------------------------------


def decide(
    ctx: Elder, facts: AbsenceFacts, now: datetime, new_id: Callable[[], UUID] = uuid4
) -> list[Decision]:
    """The decisions of every absence rule of the elder at ``now``, given the store's facts."""
    out: list[Decision] = []
    for rule in ctx.rules.absences:
        if isinstance(rule, NoActivityRule):
            found = facts.readings.get(rule.id), facts.sensed.get(rule.id)
            out += _inactivity(ctx, rule, *found, now, new_id)
        elif isinstance(rule, DeviceSilentRule):
            out += _device_offline(ctx, rule, facts.devices, now, new_id)
        elif isinstance(rule, BatteryLowRule):
            out += _battery_low(ctx, rule, facts.devices, now, new_id)
        else:
            out += _unanswered(ctx, rule, facts.events.get(rule.id, ()), now, new_id)
    return out


def _condition_on(ctx: Elder, rule_id: str) -> bool:
    active = ctx.alerts.active.get(rule_id)
    return active is not None and active.state in CONDITION_ON_STATES


def _silence_began(ctx: Elder, rule: NoActivityRule | EventUnansweredRule) -> datetime | None:
    """When the silence of the rule's active alert began (its latest match's)."""
    active = ctx.alerts.active.get(rule.id)
    return None if active is None else active.last_at - rule.silent_for


def _inactivity(
    ctx: Elder,
    rule: NoActivityRule,
    last: Reading | None,
    sensed: Reading | None,
    now: datetime,
    new_id: Callable[[], UUID],
) -> list[Decision]:
    out: list[Decision] = []
    began = _silence_began(ctx, rule)
    if last is not None and began is not None and last.at > began and _condition_on(ctx, rule.id):
        moved = {
            "activity": _reading_json(last, ctx),
            "silent_since": iso(began),
            "reason": f"{last.metric} {last.value:g} at {local_hhmm(last.at, ctx.plan.zone)} local",
        }
        out += clear_condition(ctx.alerts, rule.id, now, moved)
    span_start, span_end = _span(rule.active_hours, ctx, now)
    if last is not None:
        since = last.at if span_start is None else max(span_start, last.at)
    elif sensed is not None and span_start is not None:
        since = span_start  # nothing moved for a week: the day's hours all count
    else:
        return out  # no activity sensor reports (or no hours to count a week's silence in)
    if min(now, span_end) - since < rule.silent_for:
        return out
    zone = ctx.plan.zone
    counted = "" if rule.active_hours is None else f" inside {rule.active_hours} local"
    evidence: dict[str, Any] = {
        "metric": "no activity",
        "conditions": [str(c) for c in rule.activity],
        "window_s": rule.silent_for.total_seconds(),
        "silent_since": iso(since),
        "silent_since_local": local_hhmm(since, zone),
        "last_activity": None if last is None else _reading_json(last, ctx),
        "active_hours": None if rule.active_hours is None else str(rule.active_hours),
        "timezone": ctx.plan.timezone,
        "summary": f"no activity since {local_hhmm(since, zone)} local{counted}",
    }
    if last is None and sensed is not None:
        evidence["sensor"] = _reading_json(sensed, ctx)
        evidence["summary"] += f" (none in {ACTIVITY_HISTORY.days} days)"
    match = Match(ctx.elder_id, rule.id, rule.severity, since + rule.silent_for, None, None, evidence)
    return out + decide_match(ctx.rules, ctx.alerts, match, now, new_id)


def _reading_json(r: Reading, ctx: Elder) -> dict[str, Any]:
    return {
        "at": iso(r.at),
        "local_time": local_hhmm(r.at, ctx.plan.zone),
        "metric": r.metric,
        "value": r.value,
        "device_id": r.device_id,
    }


def offline_since(rule: DeviceSilentRule, device: Device, now: datetime) -> tuple[datetime, str] | None:
    """When ``device`` went offline by the rule and why; None while it is not offline."""
    found: list[tuple[datetime, str]] = []
    if device.last_seen is not None:
        limit = max(device.report_interval * rule.intervals, rule.at_least)
        at = device.last_seen + limit
        if at <= now:
            found.append((at, f"no message for {int(limit.total_seconds())} s"))
    lwt = (
        not device.online
        and device.status_at is not None
        and (device.last_seen is None or device.status_at >= device.last_seen)
    )
    if lwt and device.status_at is not None and device.status_at + rule.lwt_offline_for <= now:
        found.append((device.status_at + rule.lwt_offline_for, "offline (Last Will)"))
    return min(found) if found else None


def _device_offline(
    ctx: Elder,
    rule: DeviceSilentRule,
    devices: Iterable[Device],
    now: datetime,
    new_id: Callable[[], UUID],
) -> list[Decision]:
    devices = list(devices)
    silent = {d.device_id: (d, s) for d in devices if (s := offline_since(rule, d, now)) is not None}
    if not silent:
        if not _condition_on(ctx, rule.id):
            return []
        back = [{"device_id": d.device_id, "last_seen": iso(d.last_seen)} for d in devices]
        cleared = {"devices": back, "reason": "every device reports again"}
        return clear_condition(ctx.alerts, rule.id, now, cleared)
    safety = [d for d in devices if d.type in rule.safety_device_types]
    severity, why = rule.severity, None
    if (
        rule.only_safety_device_severity is not None
        and any(d.type in rule.safety_device_types for d, _ in silent.values())
        and all(d.device_id in silent for d in safety)
    ):
        severity = rule.only_safety_device_severity
        why = (
            f"the elder's only safety device ({safety[0].type}) is offline"
            if len(safety) == 1
            else f"none of the elder's {len(safety)} safety devices is reporting"
        )
    listed = sorted(silent.values(), key=lambda item: (item[1][0], item[0].device_id))
    evidence: dict[str, Any] = {
        "metric": "device offline",
        "conditions": [f"{d.device_id} ({d.type}): {reason}" for d, (_, reason) in listed],
        "devices": [
            {
                "device_id": d.device_id,
                "type": d.type,
                "offline_since": iso(at),
                "last_seen": iso(d.last_seen),
                "online": d.online,
                "status_at": iso(d.status_at),
                "why": reason,
                "safety_device": d.type in rule.safety_device_types,
            }
            for d, (at, reason) in listed
        ],
        "safety_devices": sorted(d.device_id for d in safety),
    }
    if why:
        evidence["severity_reason"] = why
    device_id = listed[-1][0].device_id
    observed = max(at for _, (at, _) in listed)
    match = Match(ctx.elder_id, rule.id, severity, observed, device_id, None, evidence)
    return decide_match(ctx.rules, ctx.alerts, match, now, new_id)


def _battery_low(
    ctx: Elder,
    rule: BatteryLowRule,
    devices: Iterable[Device],
    now: datetime,
    new_id: Callable[[], UUID],
) -> list[Decision]:
    reported = [d for d in devices if d.battery is not None]
    low = sorted((d for d in reported if d.battery is not None and d.battery < rule.below), key=_battery)
    margin = ctx.rules.hysteresis_margin(rule.id)
    if not low:
        cleared_at = rule.below * (1 + margin)
        if not _condition_on(ctx, rule.id) or any(_battery(d) < cleared_at for d in reported):
            return []
        lowest_now = min((_battery(d) for d in reported), default=None)
        back = {
            "margin": margin,
            "devices": [{"device_id": d.device_id, "battery": d.battery} for d in reported],
            "reason": f"battery at {lowest_now:g} % or more on every device (clears at {cleared_at:g} %)"
            if lowest_now is not None
            else "no device reports a battery",
        }
        return clear_condition(ctx.alerts, rule.id, now, back)
    lowest = low[0]
    evidence = {
        "metric": "battery",
        "value": lowest.battery,
        "conditions": [f"battery < {rule.below:g}"],
        "devices": [
            {"device_id": d.device_id, "type": d.type, "battery": d.battery, "at": iso(d.status_at)}
            for d in low
        ],
    }
    observed = min(lowest.status_at or now, now)
    match = Match(ctx.elder_id, rule.id, rule.severity, observed, lowest.device_id, lowest.battery, evidence)
    return decide_match(
        ctx.rules, ctx.alerts, match, now, new_id, newer_evidence=False, handled_after=now - BATTERY_REMINDER
    )


def _battery(device: Device) -> float:
    return 101.0 if device.battery is None else device.battery


def _unanswered(
    ctx: Elder,
    rule: EventUnansweredRule,
    events: Iterable[DeviceEvent],
    now: datetime,
    new_id: Callable[[], UUID],
) -> list[Decision]:
    events = list(events)
    open_ = sorted((e for e in events if e.kind in rule.on), key=lambda e: (e.at, e.device_id))
    out: list[Decision] = []
    began = _silence_began(ctx, rule)
    if not open_ and began is not None and _condition_on(ctx, rule.id):
        answers = sorted((e for e in events if e.kind in rule.unless and e.at > began), key=lambda e: e.at)
        if answers:
            last = answers[-1]
            worn = {
                "event": last.kind,
                "at": iso(last.at),
                "device_id": last.device_id,
                "reason": f"{last.kind} at {local_hhmm(last.at, ctx.plan.zone)} local ({last.device_id})",
            }
            out += clear_condition(ctx.alerts, rule.id, now, worn)
    span_start, span_end = _span(rule.active_hours, ctx, now)
    until = min(now, span_end)
    matured = [
        (e, since)
        for e in open_
        if until - (since := e.at if span_start is None else max(span_start, e.at)) >= rule.silent_for
    ]
    if not matured:
        return out
    zone = ctx.plan.zone
    first, since = matured[0]
    evidence: dict[str, Any] = {
        "event": first.kind,
        "at": iso(first.at),
        "local_time": local_hhmm(first.at, zone),
        "device_id": first.device_id,
        "unanswered": sorted(rule.unless),
        "waited_s": rule.silent_for.total_seconds(),
        "counted_from": iso(since),
        "active_hours": None if rule.active_hours is None else str(rule.active_hours),
        "timezone": ctx.plan.timezone,
        "devices": [
            {"device_id": e.device_id, "event": e.kind, "at": iso(e.at), "counted_from": iso(s)}
            for e, s in matured
        ],
    }
    observed = max(s for _, s in matured) + rule.silent_for
    match = Match(ctx.elder_id, rule.id, rule.severity, observed, first.device_id, None, evidence)
    return out + decide_match(ctx.rules, ctx.alerts, match, now, new_id)

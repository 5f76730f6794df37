"""Every threshold and time-of-day rule of the rule set, at its edges, generated from the data:
just past the threshold for the whole window it raises; just inside, or for less than the
window, it stays quiet; an event just inside local hours raises, just outside does not."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta

import pytest

from eldercare.alerts.careplan import CarePlan
from eldercare.alerts.replay import Replay
from eldercare.alerts.rules import Condition, EventRule, ThresholdRule, TimeWindow, load_rule_set
from eldercare.devices.records import DeviceEvent, Reading

RULES = load_rule_set()
START = datetime(2026, 11, 23, 2, 0, tzinfo=UTC)
STEP = 0.1  # the finest step the catalog's metrics are read in


def just_past(c: Condition) -> float:
    return {"<": c.value - STEP, "<=": c.value, ">": c.value + STEP, ">=": c.value}[c.op]


def just_inside(c: Condition) -> float:
    return {"<": c.value, "<=": c.value + STEP, ">": c.value, ">=": c.value - STEP}[c.op]


def raised(rule: ThresholdRule, metric: str, value: float, minutes: int) -> dict[str, str]:
    """Feed one reading a minute for ``minutes`` + 1 readings; the rules raised -> severity."""
    replay = Replay(RULES)
    for i in range(minutes + 1):
        at = START + timedelta(minutes=i)
        replay.feed([Reading(at, "w-1", "e-1", metric, round(value, 1), [])], [], at)
    return {a.rule: str(a.raised_severity) for a in replay.alerts.values()}


CASES = [
    pytest.param(rule, c, id=f"{rule.id}: {c}")
    for rule in RULES.thresholds
    for c in (*rule.any, *(c for level in rule.levels for c in level.any))
]


def window_minutes(rule: ThresholdRule) -> int:
    return int(rule.window.total_seconds() // 60)


@pytest.mark.parametrize(("rule", "condition"), CASES)
def test_just_past_the_threshold_for_the_window_raises(rule: ThresholdRule, condition: Condition) -> None:
    got = raised(rule, condition.metric, just_past(condition), window_minutes(rule))
    assert rule.id in got
    assert got[rule.id] == str(rule.severity_of(condition.metric, just_past(condition)))


@pytest.mark.parametrize(("rule", "condition"), CASES)
def test_just_inside_the_threshold_stays_quiet(rule: ThresholdRule, condition: Condition) -> None:
    got = raised(rule, condition.metric, just_inside(condition), window_minutes(rule))
    level_only = condition not in rule.any
    if level_only:  # inside a level's threshold: the rule may raise, not at that level's severity
        assert got.get(rule.id) != str(rule.severity_of(condition.metric, just_past(condition)))
    else:
        assert rule.id not in got


@pytest.mark.parametrize(
    ("rule", "condition"), [p for p in CASES if p.values[0].window and p.values[1] in p.values[0].any]
)
def test_past_the_threshold_for_a_minute_less_than_the_window_stays_quiet(
    rule: ThresholdRule, condition: Condition
) -> None:
    assert rule.id not in raised(rule, condition.metric, just_past(condition), window_minutes(rule) - 1)


# ---- local hours, in the elder's own time zone -----------------------------------------


def local_edges(window: TimeWindow) -> list[tuple[time, bool]]:
    """(local time, inside?) on both sides of both ends of a window of local hours."""

    def minute_before(t: time) -> time:
        return (datetime.combine(START.date(), t) - timedelta(minutes=1)).time()

    return [
        (minute_before(window.start), False),
        (window.start, True),
        (minute_before(window.end), True),
        (window.end, False),
    ]


def event_severity(rule: EventRule, kind: str, local: time, zone: str) -> str | None:
    plan = CarePlan(timezone=zone, conditions=frozenset(c for c in rule.requires if c in RULES.conditions))
    day = datetime(2026, 11, 23, tzinfo=plan.zone)
    at = datetime.combine(day.date(), local, tzinfo=plan.zone).astimezone(UTC)
    replay = Replay(RULES, {"e-1": plan})
    replay.feed([], [DeviceEvent(at, "d-1", "e-1", kind, {}, [])], at)
    replay.advance(at + (rule.within or timedelta(0)) + timedelta(seconds=1))
    [severity] = [str(a.raised_severity) for a in replay.alerts.values() if a.rule == rule.id] or [None]
    return severity


@pytest.mark.parametrize("zone", ["Asia/Shanghai", "Europe/London", "America/Chicago"])
@pytest.mark.parametrize(
    "rule", [r for r in RULES.events if r.during or any(lv.during for lv in r.levels)], ids=lambda r: r.id
)
def test_local_hours_are_the_elders_and_both_edges_hold(rule: EventRule, zone: str) -> None:
    kind = sorted(rule.on)[0]
    if rule.during is not None:
        for local, inside in local_edges(rule.during):
            expected = str(rule.severity) if inside else None
            assert event_severity(rule, kind, local, zone) == expected, (local, zone)
    for level in rule.levels:
        if level.during is not None:
            for local, inside in local_edges(level.during):
                expected = str(level.severity) if inside else str(rule.severity)
                assert event_severity(rule, kind, local, zone) == expected, (local, zone)


def test_every_emergency_one_reading_raises_flushes_its_batch() -> None:
    """The catalog's emergency bands (batch flush) cover the single-reading emergencies."""
    catalog = RULES.catalog
    for rule in RULES.thresholds:
        if rule.severity == "emergency" and not rule.window:
            for c in rule.any:
                assert catalog.metrics[c.metric].in_emergency_band(just_past(c)), (rule.id, str(c))

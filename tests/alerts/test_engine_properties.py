"""Properties of the engine over random timelines (hypothesis): whatever the readings, the
lifecycle's promises hold."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from eldercare.alerts.replay import Replay
from eldercare.alerts.rules import Severity, load_rule_set
from eldercare.devices.records import Reading

RULES = load_rule_set()
START = datetime(2026, 11, 23, 2, 0, tzinfo=UTC)
SEVERITY_RANK = {s: i for i, s in enumerate(Severity)}

readings = st.lists(
    st.tuples(
        st.sampled_from(["spo2", "heart_rate", "blood_glucose"]),
        st.floats(0, 1),
        st.integers(1, 180),  # seconds after the previous reading
    ),
    min_size=1,
    max_size=60,
)
RANGES = {"spo2": (78, 99), "heart_rate": (30, 160), "blood_glucose": (2.5, 18)}


@settings(max_examples=150, deadline=None)
@given(readings)
def test_whatever_the_readings_the_lifecycle_holds(series: list[tuple[str, float, int]]) -> None:
    replay = Replay(RULES)
    at = START
    worst: dict[str, int] = {}
    for metric, x, gap in series:
        at += timedelta(seconds=gap)
        low, high = RANGES[metric]
        replay.feed([Reading(at, "w-1", "e-1", metric, round(low + x * (high - low), 1), [])], [], at)
        active = replay.active("e-1")
        counts = Counter(a.rule for a in active)
        assert all(n == 1 for n in counts.values()), counts  # one active alert per rule
        for a in active:  # an active higher rule and the lower one it inhibits never coexist
            assert not (RULES.inhibits(a.rule) & set(counts)), (a.rule, counts)
        for a in replay.alerts.values():  # severity only ever rises
            rank = SEVERITY_RANK[a.severity]
            assert rank >= worst.get(str(a.id), rank)
            worst[str(a.id)] = rank
            assert a.outbox and a.outbox[0][0] == "raised"  # every alert asked for its dispatch
            assert a.evidence  # and explains itself


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 150), st.sampled_from([("spo2", 88.0, "spo2_low"), ("spo2", 84.0, "spo2_critical")]))
def test_a_sustained_window_opens_at_any_cadence(every_s: int, case: tuple[str, float, str]) -> None:
    """Readings that breach every ``every_s`` seconds open the rule at the first one whose run
    spans the window, whether or not a reading falls exactly a window before it (a device
    sending every 7 s once never opened spo2_low's 5 minutes)."""
    metric, value, rule_id = case
    window = RULES.rule(rule_id).window
    replay = Replay(RULES)
    opened_at = None
    for i in range(int(2 * window.total_seconds() / every_s) + 2):
        at = START + timedelta(seconds=every_s * i)
        replay.feed([Reading(at, "w1", "e1", metric, value, [])], [], at)
        if opened_at is None and any(a.rule == rule_id for a in replay.active("e1")):
            opened_at = at
    if every_s > window.total_seconds():
        assert opened_at is None  # readings further apart than the window make no run
    else:
        first_spanning = START + timedelta(seconds=every_s * -(-window.total_seconds() // every_s))
        assert opened_at == first_spanning


NEWS2_RANGES = {
    "spo2": (80, 99),
    "heart_rate": (35, 150),
    "systolic_bp": (80, 230),
    "respiration_rate": (6, 30),
    "body_temperature": (34.5, 40.0),
}
news2_timelines = st.lists(
    st.tuples(
        st.sampled_from(sorted(NEWS2_RANGES)),
        st.floats(0, 1),
        st.integers(-600, 400),  # seconds after the previous reading (< 0: a late one)
        st.booleans(),  # the next reading comes in the same batch
    ),
    min_size=1,
    max_size=50,
)


@settings(max_examples=80, deadline=None)
@given(news2_timelines, st.sampled_from([None, {"conditions": ["copd"]}, {"on_oxygen": True}]))
def test_news2_marks_never_change_a_decision(
    series: list[tuple[str, float, int, bool]], plan: dict[str, object] | None
) -> None:
    """Bounding NEWS2 with the marks only skips look-ups whose judgement would raise nothing."""
    from eldercare.alerts.careplan import CarePlan

    plans = {} if plan is None else {"e-1": CarePlan.model_validate(plan)}
    with_marks, without = Replay(RULES, plans), Replay(RULES, plans, news2_marks=False)
    at = now = START
    batch: list[Reading] = []
    for metric, x, gap, more in series:
        at += timedelta(seconds=gap)
        now = max(now, at) + timedelta(seconds=1)
        low, high = NEWS2_RANGES[metric]
        batch.append(Reading(at, "w-1", "e-1", metric, round(low + x * (high - low), 1), []))
        if not more:
            assert with_marks.feed(batch, [], now) == without.feed(batch, [], now)
            batch = []
    if batch:
        assert with_marks.feed(batch, [], now) == without.feed(batch, [], now)
    assert with_marks.alerts == without.alerts

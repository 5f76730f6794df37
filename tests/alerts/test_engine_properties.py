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

"""The bench population: care plans of a few kinds, vitals that breach at the share asked, per seed."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta

from eldercare.simulators.population import EPISODES, PLAN_KINDS, Population

DEVICES = 4_000


def breach_share(population: Population, seconds: int = 1_200, every_s: int = 11) -> float:
    """Share of readings (3 per message) that breach, one message per device every ``every_s``."""
    profiles = [population.profile(i) for i in range(DEVICES)]
    vitals = population.vitals(range(DEVICES), 0)
    t0 = 1_800_000_000_000
    breaching = readings = seq = 0
    for second in range(0, seconds, every_s):
        for slot, profile in enumerate(profiles):
            hr, spo2 = vitals.at(slot, seq, t0 + second * 1000)
            seq += 1
            breaching += (hr > 130 or hr < 40) + (spo2 < (85 if profile.copd else 90))
            readings += 3
    return breaching / readings


def test_about_the_share_of_readings_asked_breaches() -> None:
    assert 0.008 < breach_share(Population(breach_rate=0.01)) < 0.011
    assert 0.025 < breach_share(Population(breach_rate=0.03)) < 0.031
    assert breach_share(Population(breach_rate=0.0)) == 0.0


def test_the_same_seed_gives_the_same_elders_and_values() -> None:
    a, b, other = Population(seed=7), Population(seed=7), Population(seed=8)
    assert [a.profile(i) for i in range(500)] == [b.profile(i) for i in range(500)]
    assert [a.profile(i) for i in range(500)] != [other.profile(i) for i in range(500)]
    va, vb = a.vitals(range(0, 500, 2), 0), b.vitals(range(0, 500, 2), 0)
    at = 1_800_000_000_000
    assert [va.at(i % 250, i, at + i) for i in range(5_000)] == [
        vb.at(i % 250, i, at + i) for i in range(5_000)
    ]


def test_every_care_plan_kind_and_episode_kind_is_there() -> None:
    profiles = [Population().profile(i) for i in range(DEVICES)]
    kinds = Counter(p.plan_kind for p in profiles)
    assert set(kinds) == {name for name, _, _ in PLAN_KINDS}
    assert 0.15 < kinds["copd"] / DEVICES < 0.25
    episodes = Counter(p.episode.name for p in profiles if p.episode)
    assert set(episodes) == {e.name for e in EPISODES}
    assert max(episodes.values()) - min(episodes.values()) <= 2  # spread evenly


def test_history_follows_the_episodes_up_to_the_start() -> None:
    pop = Population()
    profiles = [pop.profile(i) for i in range(200)]
    end = datetime(2027, 1, 1, tzinfo=UTC)
    rows = list(pop.history(profiles, end - timedelta(minutes=16), end, 10))
    assert {index for _, index, _, _ in rows} == {p.index for p in profiles if p.episode}
    for at, index, metric, value in rows:
        phase = pop.episode_phase(profiles[index], at.timestamp())
        expected = getattr(phase, metric) if phase else None
        if expected:
            assert value == expected
        else:
            assert (56 <= value <= 88) if metric == "heart_rate" else (96 <= value <= 99)


def test_news2_scoring_values_do_not_breach() -> None:
    pop = Population(breach_rate=0.0, news2_scoring=0.2)
    vitals = pop.vitals(range(100), 0)
    values = [vitals.at(i % 100, i, 1_800_000_000_000) for i in range(10_000)]
    scoring = sum(1 for hr, spo2 in values if 91 <= hr <= 99 or spo2 in (94, 95))
    assert 0.18 < scoring / len(values) < 0.22
    assert all(40 <= hr <= 130 and spo2 >= 90 for hr, spo2 in values)

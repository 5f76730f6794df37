"""A population of elders for load tests: care plans of a few kinds, and vitals of which a set
share breach a threshold of the default rules (alerts/default_rules.toml).

Pure and deterministic per seed: each device's care plan, episode kind and episode phase come
from ``random.Random(f"{seed}:{index}")``, and what it sends is a function of the device, the
message sequence and the wall-clock time of the message, so a bench publisher, the history a
bench writes ahead of a run and the breach count all agree.

What breaches (``breach_rate`` is the share of *readings*, i.e. data points: a telemetry
message carries three, heart rate, SpO2 and steps, and a breaching message one breaching
value, so about three times that share of messages carries one):

- **episodes** (two thirds of the breaching readings): a share of the devices goes through one
  episode every ``period_s``, at its own phase, in wall-clock time, so sustained windows are
  read from the store and alerts open, add evidence, supersede lower ones and clear:
  ``EPISODES`` lists them (SpO2 84 % for 3 min: spo2_critical after its 2 min window;
  heart rate 155 for 3 min: hr_extreme; SpO2 88 % for 6 min then 84 %: spo2_low after 5 min
  (not for COPD, whose plan moves it to < 85), superseded by spo2_critical; heart rate 135
  with SpO2 91 % for 2 min: NEWS2 6 with a single 3, an emergency at once on SpO2 scale 1);
- **spikes** (one third): single messages with SpO2 84 % or heart rate 155 among normal ones,
  as a loose sensor gives: every one asks the store for its windows and raises nothing.

Every other value is quiet: heart rate 56-88 and SpO2 96-99 score 0 in NEWS2, so the rules'
rare path is taken only for the breaches, unless ``news2_scoring`` asks for a share of
messages with a value NEWS2 scores 1 (heart rate 91-99 or SpO2 94-95) without breaching.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

#: Care plans, as (kind, share of the elders, plan data or None for no plan): the effective
#: rules differ between them (COPD: spo2_low below 85 %, NEWS2 SpO2 scale 2), and several
#: elders share each plan, as the rules' plan cache expects.
PLAN_KINDS: tuple[tuple[str, float, dict[str, Any] | None], ...] = (
    ("none", 0.50, None),
    ("copd", 0.20, {"conditions": ["copd"]}),
    ("hypertension", 0.20, {"conditions": ["hypertension"]}),
    ("hypertension_alone", 0.05, {"conditions": ["hypertension"], "lives_alone": True}),
    ("copd_hypertension", 0.05, {"conditions": ["copd", "hypertension"]}),
)


@dataclass(frozen=True)
class Phase:
    """Part of an episode: seconds long, with these values (None: the quiet value)."""

    seconds: int
    heart_rate: int | None = None
    spo2: int | None = None


@dataclass(frozen=True)
class Episode:
    """A run of abnormal vitals one device goes through once a period."""

    name: str
    phases: tuple[Phase, ...]

    @property
    def seconds(self) -> int:
        return sum(p.seconds for p in self.phases)

    def at(self, into_s: float) -> Phase | None:
        """The phase ``into_s`` seconds into the episode (None: the episode is over)."""
        for phase in self.phases:
            if into_s < phase.seconds:
                return phase
            into_s -= phase.seconds
        return None


EPISODES: tuple[Episode, ...] = (
    Episode("spo2_critical", (Phase(180, spo2=84),)),
    Episode("hr_extreme", (Phase(180, heart_rate=155),)),
    Episode("hypoxia_worsening", (Phase(360, spo2=88), Phase(180, spo2=84))),
    Episode("news2", (Phase(120, heart_rate=135, spo2=91),)),
)
#: Spikes: one breaching value in one message (both in the catalog's emergency band).
SPIKE_SPO2 = 84
SPIKE_HEART_RATE = 155
#: Reading values in one message that breach, per message that carries one.
BREACHES_PER_BREACHING_MESSAGE = 1
READINGS_PER_MESSAGE = 3
#: Share of the breaching readings that come from spikes (the rest from episodes).
SPIKE_SHARE = 1 / 3
_TABLE = 1009  # per-process tables of quiet values, spikes and scoring values (a prime)
_GOLDEN = 0.6180339887498949


@dataclass(frozen=True)
class DeviceProfile:
    """One device's elder: care plan kind, episode (None: never abnormal) and its phase."""

    index: int
    plan_kind: str
    plan: dict[str, Any] | None
    episode: Episode | None
    offset_s: int

    @property
    def copd(self) -> bool:
        return bool(self.plan) and "copd" in (self.plan or {}).get("conditions", ())


@dataclass(frozen=True)
class Population:
    """Who the simulated elders are and how often their vitals breach (module docstring)."""

    #: Share of readings (data points) that breach a threshold of the elder's effective rules.
    breach_rate: float = 0.01
    seed: int = 1
    #: Share of messages with a value NEWS2 scores 1 (heart rate 91-99 or SpO2 94-95).
    news2_scoring: float = 0.0
    #: Every episodic device has one episode per period.
    period_s: int = 1200

    def __post_init__(self) -> None:
        if not 0 <= self.breach_rate <= 0.1:
            raise ValueError(f"breach rate {self.breach_rate} outside 0-0.1")
        if not 0 <= self.news2_scoring <= 0.5:
            raise ValueError(f"NEWS2-scoring share {self.news2_scoring} outside 0-0.5")

    @property
    def breaching_messages(self) -> float:
        """Share of messages carrying a breaching value."""
        return self.breach_rate * READINGS_PER_MESSAGE / BREACHES_PER_BREACHING_MESSAGE

    @property
    def spike_rate(self) -> float:
        """Share of messages that are spikes."""
        return self.breaching_messages * SPIKE_SHARE

    @property
    def episodic_share(self) -> float:
        """Share of devices that have episodes, so episodes give the rest of the breaches."""
        duty = sum(e.seconds for e in EPISODES) / len(EPISODES) / self.period_s
        return min(1.0, self.breaching_messages * (1 - SPIKE_SHARE) / duty)

    def profile(self, index: int) -> DeviceProfile:
        """Device number ``index``'s elder (deterministic per seed)."""
        rnd = random.Random(f"{self.seed}:{index}")
        x, kind, plan = rnd.random(), PLAN_KINDS[-1][0], PLAN_KINDS[-1][2]
        for name, share, data in PLAN_KINDS:
            if x < share:
                kind, plan = name, data
                break
            x -= share
        # Low-discrepancy rather than random: any run of consecutive devices (a publisher
        # process's slice, a small fleet) has the episodic share and every episode kind.
        spread = ((index + self.seed * 7919) * _GOLDEN) % 1.0
        episode = None
        if spread < self.episodic_share:
            episode = EPISODES[int(spread / self.episodic_share * len(EPISODES))]
        return DeviceProfile(index, kind, plan, episode, rnd.randrange(self.period_s))

    def episode_phase(self, profile: DeviceProfile, at_s: float) -> Phase | None:
        """The device's episode phase at epoch second ``at_s`` (None: quiet then)."""
        if profile.episode is None:
            return None
        return profile.episode.at((at_s + profile.offset_s) % self.period_s)

    def vitals(self, indices: Iterable[int], process: int) -> Vitals:
        """What the devices ``indices`` (one publisher process's slots, in order) send."""
        return Vitals(self, [self.profile(i) for i in indices], process)

    def history(
        self, profiles: list[DeviceProfile], start: datetime, end: datetime, every_s: int
    ) -> Iterator[tuple[datetime, int, str, float]]:
        """(time, device index, metric, value) of heart rate and SpO2 every ``every_s`` seconds
        in [start, end) for the episodic devices: what they sent before a bench started."""
        quiet_hr, quiet_spo2, _, _ = _tables(self.seed, 0, 0.0, 0.0)
        t0 = int(start.timestamp())
        for p in profiles:
            if p.episode is None:
                continue
            for k, t in enumerate(range(t0, int(end.timestamp()), every_s)):
                phase = self.episode_phase(p, t)
                at = datetime.fromtimestamp(t, UTC)
                hr = phase.heart_rate if phase and phase.heart_rate else quiet_hr[(k + p.index) % _TABLE]
                spo2 = phase.spo2 if phase and phase.spo2 else quiet_spo2[(k + p.index) % _TABLE]
                yield at, p.index, "heart_rate", float(hr)
                yield at, p.index, "spo2", float(spo2)


def _tables(
    seed: int, process: int, spike_rate: float, scoring: float
) -> tuple[list[int], list[int], list[int], list[int]]:
    """Quiet heart rates and SpO2, and per message: 0 normal, 1 SpO2 spike, 2 heart-rate
    spike; 0 quiet, 1 heart rate scoring 1, 2 SpO2 scoring 1."""
    rnd = random.Random(f"{seed}:tables:{process}")
    hr = [rnd.randint(56, 88) for _ in range(_TABLE)]
    spo2 = [rnd.choice((96, 97, 97, 98, 98, 99)) for _ in range(_TABLE)]
    return hr, spo2, _exactly(rnd, spike_rate), _exactly(rnd, scoring)


def _exactly(rnd: random.Random, share: float) -> list[int]:
    """A table with ``share`` of its entries 1 or 2 (alternately), at random places."""
    n = round(share * _TABLE)
    table = [1 + (i & 1) if i < n else 0 for i in range(_TABLE)]
    rnd.shuffle(table)
    return table


class Vitals:
    """Heart rate and SpO2 of one publisher process's devices, message by message."""

    def __init__(self, population: Population, profiles: list[DeviceProfile], process: int) -> None:
        self.population = population
        self.period_s = population.period_s
        # Per slot: the episode and its offset, for the episodic devices only.
        self.episodes = [(p.episode, p.offset_s) if p.episode else None for p in profiles]
        self.hr, self.spo2, self.spikes, self.scores = _tables(
            population.seed, process, population.spike_rate, population.news2_scoring
        )
        self.scoring_hr = [91 + (i % 9) for i in range(_TABLE)]

    def at(self, slot: int, seq: int, now_ms: int) -> tuple[int, int]:
        """(heart rate, SpO2) of the message number ``seq``, from the device in ``slot``."""
        k = (seq + slot) % _TABLE
        hr, spo2 = self.hr[k], self.spo2[k]
        score = self.scores[k]
        if score == 1:
            hr = self.scoring_hr[k]
        elif score == 2:
            spo2 = 94 + (k & 1)
        episode = self.episodes[slot]
        if episode is not None:
            phase = episode[0].at((now_ms // 1000 + episode[1]) % self.period_s)
            if phase is not None:
                return phase.heart_rate or hr, phase.spo2 or spo2
        spike = self.spikes[(seq * 7 + slot) % _TABLE]
        if spike == 1:
            return hr, SPIKE_SPO2
        if spike == 2:
            return SPIKE_HEART_RATE, spo2
        return hr, spo2

"""NEWS2, the Royal College of Physicians' National Early Warning Score 2 (2017), as pure functions.

The chart (RCP 2017, "Chart 1: The NEWS scoring system") is data: one ``Chart`` of ``Band``
rows per measured parameter, plus score tables for air or oxygen and for consciousness.
``score`` turns one set of ``Observations`` into a ``News2Score``; ``severity`` maps that to
the ``news2`` rule of shared/spec/rules.md; ``observations_from_latest`` builds the
observations from each metric's latest reading, leaving stale ones out.

Reading values between the chart's bands: the chart is written for values as a clinician
reads them off a monitor, in whole units (respiration rate, SpO2, blood pressure, pulse) or
to one decimal (temperature). A value is therefore first rounded half up to the precision its
chart's edges are written in, then looked up: 8.5 /min reads as 9 (score 1), SpO2 91.5 % as
92 (score 2 on scale 1), 35.05 °C as 35.1 (score 1), 38.05 °C as 38.1 (score 1),
39.05 °C as 39.1 (score 2). The value is rounded as written in decimal (35.05, not the
binary float 35.0499…), so the result is the one a person reading the number would give.

Home devices rarely measure all seven parameters. A missing one is left out of the
aggregate and listed in ``News2Score.missing``: the aggregate of a partial set is a lower
bound of the full NEWS2, never an overestimate. Supplemental oxygen that is not known is
scored as air and listed in ``News2Score.assumed``, so the alert evidence can say so.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import ROUND_HALF_UP, Context, Decimal
from enum import StrEnum
from itertools import pairwise
from types import MappingProxyType
from typing import Literal

SpO2Scale = Literal[1, 2]
Severity = Literal["urgent", "emergency"]

#: rules.md, ``news2``: "the latest readings (≤ 15 min old)".
DEFAULT_MAX_AGE = timedelta(minutes=15)


class Parameter(StrEnum):
    """A NEWS2 parameter, named like the catalog metric that measures it where there is one."""

    RESPIRATION_RATE = "respiration_rate"
    SPO2 = "spo2"
    AIR_OR_OXYGEN = "air_or_oxygen"
    SYSTOLIC_BP = "systolic_bp"
    HEART_RATE = "heart_rate"  # the chart's "pulse"
    CONSCIOUSNESS = "consciousness"
    BODY_TEMPERATURE = "body_temperature"  # °C


class Consciousness(StrEnum):
    """The ACVPU scale: Alert, new Confusion, responds to Voice, to Pain, Unresponsive."""

    ALERT = "alert"
    NEW_CONFUSION = "new_confusion"
    VOICE = "voice"
    PAIN = "pain"
    UNRESPONSIVE = "unresponsive"


class ClinicalRisk(StrEnum):
    """The RCP clinical risk category of an aggregate score."""

    LOW = "low"  # aggregate 0-4
    LOW_MEDIUM = "low_medium"  # a single parameter scored 3, aggregate below 5
    MEDIUM = "medium"  # aggregate 5-6
    HIGH = "high"  # aggregate 7 or more


@dataclass(frozen=True, slots=True)
class Band:
    """One cell of a chart row: readings from ``low`` to ``high`` score ``score``.

    Both edges are inclusive, as the chart writes them ("9–11"); None is an open end ("≤8").
    """

    low: float | None
    high: float | None
    score: int

    def contains(self, reading: float) -> bool:
        """True when the (already rounded) ``reading`` lies in this band."""
        return (self.low is None or self.low <= reading) and (self.high is None or reading <= self.high)


# Big enough to round any finite float to one decimal exactly (the default 28 digits is not).
_HALF_UP = Context(prec=400, rounding=ROUND_HALF_UP)


@dataclass(frozen=True, slots=True)
class Chart:
    """One parameter's row of the NEWS2 chart: its bands, lowest first, edges written to ``decimals``."""

    bands: tuple[Band, ...]
    decimals: int = 0

    def __post_init__(self) -> None:
        # Every rounded reading must fall in exactly one band: open at both ends, and each
        # band starting one step of the chart's precision above where the previous one ends.
        step = Decimal(1).scaleb(-self.decimals)
        if not self.bands or self.bands[0].low is not None or self.bands[-1].high is not None:
            raise ValueError("a chart's first band is open below and its last open above")
        for below, above in pairwise(self.bands):
            if below.high is None or above.low is None:
                raise ValueError(f"only the outer bands may be open: {below} then {above}")
            if Decimal(str(below.high)) + step != Decimal(str(above.low)):
                raise ValueError(f"bands must be contiguous at step {step}: {below} then {above}")
        if any(not 0 <= band.score <= 3 for band in self.bands):
            raise ValueError("NEWS2 scores a parameter 0 to 3")

    def read(self, value: float) -> float:
        """``value`` rounded half up to the precision the chart's edges are written in."""
        # str(), not Decimal(value): 35.05 is stored as 35.0499…, but a clinician rounds the
        # 35.05 the monitor shows. Back to float so that it compares equal to the edges.
        exponent = Decimal(1).scaleb(-self.decimals)
        return float(Decimal(str(value)).quantize(exponent, context=_HALF_UP))

    def score(self, value: float) -> int:
        """The chart's score for ``value``, read to the chart's precision."""
        reading = self.read(value)
        return next(band.score for band in self.bands if band.contains(reading))


# RCP 2017, Chart 1. Each row reads like the chart: ≤low edge, the middle bands, ≥high edge.
RESPIRATION_RATE_CHART = Chart(  # per minute
    (Band(None, 8, 3), Band(9, 11, 1), Band(12, 20, 0), Band(21, 24, 2), Band(25, None, 3))
)
SPO2_SCALE_1_CHART = Chart(  # %
    (Band(None, 91, 3), Band(92, 93, 2), Band(94, 95, 1), Band(96, None, 0))
)
# Scale 2 (target 88-92 %, hypercapnic respiratory failure): above 92 % scores only on
# oxygen, where it means more oxygen than the care plan wants; on air "≥93" scores 0.
SPO2_SCALE_2_ON_AIR_CHART = Chart(
    (Band(None, 83, 3), Band(84, 85, 2), Band(86, 87, 1), Band(88, 92, 0), Band(93, None, 0))
)
SPO2_SCALE_2_ON_OXYGEN_CHART = Chart(
    (
        Band(None, 83, 3),
        Band(84, 85, 2),
        Band(86, 87, 1),
        Band(88, 92, 0),
        Band(93, 94, 1),
        Band(95, 96, 2),
        Band(97, None, 3),
    ),
)
SYSTOLIC_BP_CHART = Chart(  # mmHg
    (Band(None, 90, 3), Band(91, 100, 2), Band(101, 110, 1), Band(111, 219, 0), Band(220, None, 3))
)
HEART_RATE_CHART = Chart(  # "pulse", per minute
    (
        Band(None, 40, 3),
        Band(41, 50, 1),
        Band(51, 90, 0),
        Band(91, 110, 1),
        Band(111, 130, 2),
        Band(131, None, 3),
    ),
)
BODY_TEMPERATURE_CHART = Chart(  # °C
    (Band(None, 35.0, 3), Band(35.1, 36.0, 1), Band(36.1, 38.0, 0), Band(38.1, 39.0, 1), Band(39.1, None, 2)),
    decimals=1,
)
#: "Air or oxygen?": keyed by supplemental oxygen.
AIR_OR_OXYGEN_SCORES: Mapping[bool, int] = MappingProxyType({False: 0, True: 2})
CONSCIOUSNESS_SCORES: Mapping[Consciousness, int] = MappingProxyType(
    {
        Consciousness.ALERT: 0,
        Consciousness.NEW_CONFUSION: 3,
        Consciousness.VOICE: 3,
        Consciousness.PAIN: 3,
        Consciousness.UNRESPONSIVE: 3,
    }
)


# The parameters measured as numbers; each is also the catalog metric's name.
_MEASURED = (
    Parameter.RESPIRATION_RATE,
    Parameter.SPO2,
    Parameter.SYSTOLIC_BP,
    Parameter.HEART_RATE,
    Parameter.BODY_TEMPERATURE,
)


@dataclass(frozen=True, slots=True)
class Observations:
    """One set of observations to score; any of them may be missing (None).

    Values are in the catalog's canonical units (°C for temperature). ``spo2_scale`` is 2
    only where the care plan prescribes it (hypercapnic respiratory failure, e.g. COPD with
    an 88-92 % target). ``supplemental_oxygen`` None means not known: scored as air.
    """

    respiration_rate: float | None = None
    spo2: float | None = None
    systolic_bp: float | None = None
    heart_rate: float | None = None
    body_temperature: float | None = None
    consciousness: Consciousness | None = None
    supplemental_oxygen: bool | None = None
    spo2_scale: SpO2Scale = 1

    def __post_init__(self) -> None:
        if self.spo2_scale not in (1, 2):
            raise ValueError(f"spo2_scale is 1 or 2, got {self.spo2_scale!r}")
        for name in _MEASURED:
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")


@dataclass(frozen=True, slots=True)
class News2Score:
    """A scored set of observations: each parameter's score, what was missing or assumed, the total."""

    observations: Observations
    # The parameters that were scored, in chart order; the missing ones are absent.
    scores: Mapping[Parameter, int]
    # Scored on an assumption rather than a measurement: AIR_OR_OXYGEN when oxygen is not known.
    assumed: frozenset[Parameter] = frozenset()

    @property
    def present(self) -> frozenset[Parameter]:
        """The parameters that were scored."""
        return frozenset(self.scores)

    @property
    def missing(self) -> frozenset[Parameter]:
        """The parameters with nothing to score: left out of the aggregate."""
        return frozenset(Parameter) - self.present

    @property
    def aggregate(self) -> int:
        """The NEWS2 aggregate: the sum of the scored parameters' scores."""
        return sum(self.scores.values())

    @property
    def red_score(self) -> bool:
        """True when any single parameter scored 3 (the chart's "red score")."""
        return 3 in self.scores.values()

    @property
    def risk(self) -> ClinicalRisk:
        """The RCP clinical risk: low, low-medium (a single 3 below 5), medium (5-6), high (≥ 7)."""
        aggregate = self.aggregate
        if aggregate >= 7:
            return ClinicalRisk.HIGH
        if aggregate >= 5:
            return ClinicalRisk.MEDIUM
        return ClinicalRisk.LOW_MEDIUM if self.red_score else ClinicalRisk.LOW


def score(observations: Observations) -> News2Score:
    """The NEWS2 score of one set of observations; missing ones are left out, not guessed."""
    o = observations
    on_oxygen = bool(o.supplemental_oxygen)  # not known: scored as air (and said so below)
    if o.spo2_scale == 1:
        spo2_chart = SPO2_SCALE_1_CHART
    else:
        spo2_chart = SPO2_SCALE_2_ON_OXYGEN_CHART if on_oxygen else SPO2_SCALE_2_ON_AIR_CHART
    measured: tuple[tuple[Parameter, float | None, Chart], ...] = (
        (Parameter.RESPIRATION_RATE, o.respiration_rate, RESPIRATION_RATE_CHART),
        (Parameter.SPO2, o.spo2, spo2_chart),
        (Parameter.SYSTOLIC_BP, o.systolic_bp, SYSTOLIC_BP_CHART),
        (Parameter.HEART_RATE, o.heart_rate, HEART_RATE_CHART),
        (Parameter.BODY_TEMPERATURE, o.body_temperature, BODY_TEMPERATURE_CHART),
    )
    scores = {parameter: chart.score(value) for parameter, value, chart in measured if value is not None}
    scores[Parameter.AIR_OR_OXYGEN] = AIR_OR_OXYGEN_SCORES[on_oxygen]
    if o.consciousness is not None:
        scores[Parameter.CONSCIOUSNESS] = CONSCIOUSNESS_SCORES[o.consciousness]
    in_chart_order = {parameter: scores[parameter] for parameter in Parameter if parameter in scores}
    assumed = frozenset({Parameter.AIR_OR_OXYGEN}) if o.supplemental_oxygen is None else frozenset()
    return News2Score(observations=o, scores=MappingProxyType(in_chart_order), assumed=assumed)


def severity(
    result: News2Score,
    *,
    urgent_from: int = 5,
    emergency_from: int = 7,
    red_emergency_from: int = 5,
) -> Severity | None:
    """The severity the ``news2`` rule raises for ``result``, or None when it raises nothing.

    rules.md defaults: aggregate 5-6 is "urgent"; aggregate ≥ 7, or a single parameter
    scoring 3 with aggregate ≥ 5, is "emergency". The thresholds come from the rule set.
    """
    aggregate = result.aggregate
    if aggregate >= emergency_from or (result.red_score and aggregate >= red_emergency_from):
        return "emergency"
    if aggregate >= urgent_from:
        return "urgent"
    return None


def observations_from_latest(
    latest: Mapping[str, tuple[float, datetime]],
    now: datetime,
    *,
    max_age: timedelta = DEFAULT_MAX_AGE,
    spo2_scale: SpO2Scale = 1,
    supplemental_oxygen: bool | None = None,
    consciousness: Consciousness | None = None,
) -> Observations:
    """Observations from each metric's latest (value, time); readings older than ``max_age`` are missing.

    ``latest`` is keyed by catalog metric name; metrics NEWS2 does not use are ignored. A
    reading exactly ``max_age`` old still counts. One stamped after ``now`` counts as fresh:
    readings whose clock ran ahead by more than the skew limit never reach the rules.
    """

    def fresh(metric: Parameter) -> float | None:
        reading = latest.get(metric)
        if reading is None:
            return None
        value, time = reading
        return value if now - time <= max_age else None

    return Observations(
        respiration_rate=fresh(Parameter.RESPIRATION_RATE),
        spo2=fresh(Parameter.SPO2),
        systolic_bp=fresh(Parameter.SYSTOLIC_BP),
        heart_rate=fresh(Parameter.HEART_RATE),
        body_temperature=fresh(Parameter.BODY_TEMPERATURE),
        consciousness=consciousness,
        supplemental_oxygen=supplemental_oxygen,
        spo2_scale=spo2_scale,
    )

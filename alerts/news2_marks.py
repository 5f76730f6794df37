"""NEWS2 marks: an upper bound of an elder's NEWS2 aggregate without reading their history.

A reading that scores in NEWS2 (heart rate 91-110, SpO2 94-95 %: common in older people)
makes the rules judge the aggregate at its time, which needs the latest value of every
parameter: the elders' locks and a look-up in the store. Most such readings cannot raise
anything: a heart rate scoring 1 with nothing else scoring is an aggregate of 1.

The marks say so without the look-up. Per elder, for each measured parameter and each score
k = 1, 2, 3: the time of the newest reading of that parameter scoring at least k (under the
highest of the SpO2 scales on air, so that one row serves every care plan). The writer
upserts the batch's marks (``greatest``) before the rules scan it, and reads the row back in
the same statement. Then, at a reading's time t, each parameter scores at most the highest k
whose mark is no older than t - max_age, and the sum of those is at least the aggregate the
rules would compute: the latest reading of a parameter within max_age scores some k, and it
left a mark for k no older than itself. When the bound is below the NEWS2 rule's lowest
threshold, the reading can neither raise nor upgrade a NEWS2 alert, and the scan asks for
nothing on its account.

A mark newer than t (a buffered upload judged in its own, earlier time) only raises the
bound: it errs on the side of the look-up. An elder on oxygen is never bounded (the oxygen
itself scores, and SpO2 scores on scale 2 above 92 %). The upsert's row lock orders two
batches that both mark one elder, as the rules' elder lock does: the later one reads what the
earlier committed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from math import inf

from eldercare.alerts import news2
from eldercare.devices.records import Reading

#: The parameters marked, in the order of a row's marks.
MARKED = ("respiration_rate", "spo2", "systolic_bp", "heart_rate", "body_temperature")
_INDEX = {metric: i for i, metric in enumerate(MARKED)}
#: A row: for each parameter, the times of its newest readings scoring at least 1, 2, 3.
SIZE = 3 * len(MARKED)

Marks = Sequence[datetime | None]

_CHARTS: dict[str, tuple[news2.Chart, ...]] = {
    "respiration_rate": (news2.RESPIRATION_RATE_CHART,),
    "spo2": (news2.SPO2_SCALE_1_CHART, news2.SPO2_SCALE_2_ON_AIR_CHART),
    "systolic_bp": (news2.SYSTOLIC_BP_CHART,),
    "heart_rate": (news2.HEART_RATE_CHART,),
    "body_temperature": (news2.BODY_TEMPERATURE_CHART,),
}


def _zero(chart: news2.Chart) -> tuple[float, float]:
    """The values a chart scores 0 (its zero bands touch: one range)."""
    zero = [b for b in chart.bands if b.score == 0]
    low, high = zero[0].low, zero[-1].high
    return (-inf if low is None else low, inf if high is None else high)


#: Per parameter, values every chart of it scores 0 (also after rounding): no chart is read.
_QUIET = {
    metric: (max(_zero(c)[0] for c in charts), min(_zero(c)[1] for c in charts))
    for metric, charts in _CHARTS.items()
}


def highest_score(metric: str, value: float) -> int:
    """The reading's NEWS2 score, the highest over the SpO2 scales on air (0 if not marked)."""
    quiet = _QUIET.get(metric)
    if quiet is None or quiet[0] <= value <= quiet[1]:
        return 0
    return max(chart.score(value) for chart in _CHARTS[metric])


def marks_of(readings: Iterable[Reading]) -> dict[str, list[datetime | None]]:
    """Per elder, the marks the readings leave (only elders with a scoring reading)."""
    out: dict[str, list[datetime | None]] = {}
    for r in readings:
        i = _INDEX.get(r.metric)
        if i is None or not r.elder_id:
            continue
        score = highest_score(r.metric, r.value)
        if score == 0:
            continue
        row = out.get(r.elder_id)
        if row is None:
            row = out[r.elder_id] = [None] * SIZE
        for k in range(score):
            old = row[3 * i + k]
            if old is None or r.time > old:
                row[3 * i + k] = r.time
    return out


def merge(old: Marks | None, new: Marks) -> list[datetime | None]:
    """Two rows as one: the newer time of each mark (what the upsert's ``greatest`` keeps)."""
    if old is None:
        return list(new)
    return [a if b is None or (a is not None and a >= b) else b for a, b in zip(old, new, strict=True)]


def bound(marks: Marks, at: datetime, max_age: timedelta) -> int:
    """An upper bound of the NEWS2 aggregate at ``at`` of the measured parameters (air)."""
    since = at - max_age
    total = 0
    for i in range(len(MARKED)):
        for k in (3, 2, 1):
            t = marks[3 * i + k - 1]
            if t is not None and t >= since:
                total += k
                break
    return total

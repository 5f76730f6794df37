"""Sustained windows: does a condition hold for every reading over a span of time?

A threshold rule with a window (spo2 < 85 for 2 min) matches at a reading when the run of
consecutive readings that breach, ending at that reading, spans at least the window. Two
readings further apart than the window do not make a run: a device that fell silent for
longer than the window says nothing about the time between. A window of zero: the reading
alone is enough. The same test, with "back inside the band by the margin", clears an alert.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta

Point = tuple[datetime, float]


def run_ending_at(
    points: Sequence[Point], at: datetime, window: timedelta, holds: Callable[[float], bool]
) -> list[Point] | None:
    """The run of points up to ``at`` for which ``holds`` is true, if it spans ``window``.

    ``points`` are sorted by time. The point at ``at`` itself must hold (it is the reading
    being judged). Returns the run, oldest first, or None when it does not span the window.
    """
    end = bisect_right(points, at, key=lambda p: p[0])
    if end == 0 or points[end - 1][0] != at:
        return None
    run: list[Point] = []
    later = at
    for i in range(end - 1, -1, -1):
        moment, value = points[i]
        if not holds(value):
            break
        if window and later - moment > window:
            break
        run.append(points[i])
        later = moment
        if at - moment >= window:
            run.reverse()
            return run
    return None

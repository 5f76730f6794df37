"""Sustained windows: a run of breaching readings that spans the window, no gap longer than it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from eldercare.alerts.windows import run_ending_at

T0 = datetime(2026, 11, 23, 2, 0, tzinfo=UTC)
MIN = timedelta(minutes=1)


def low(v: float) -> bool:
    return v < 85


def points(*values: float, every: timedelta = MIN) -> list[tuple[datetime, float]]:
    return [(T0 + i * every, v) for i, v in enumerate(values)]


def test_a_run_spanning_the_window_matches_at_its_last_reading() -> None:
    series = points(84, 83, 84)
    assert run_ending_at(series, T0 + 2 * MIN, 2 * MIN, low) == series


def test_a_run_shorter_than_the_window_does_not() -> None:
    assert run_ending_at(points(84, 84), T0 + MIN, 2 * MIN, low) is None


def test_the_reading_judged_must_be_in_the_series_and_breach() -> None:
    series = points(84, 84, 90)
    assert run_ending_at(series, T0 + 2 * MIN, 2 * MIN, low) is None
    assert run_ending_at(series, T0 + 5 * MIN, 2 * MIN, low) is None


def test_a_zero_window_needs_only_the_reading() -> None:
    assert run_ending_at(points(90, 84), T0 + MIN, timedelta(0), low) == [(T0 + MIN, 84)]


def test_a_gap_longer_than_the_window_breaks_the_run() -> None:
    assert run_ending_at(points(84, 84, every=3 * MIN), T0 + 3 * MIN, 2 * MIN, low) is None
    assert run_ending_at(points(84, 84, every=2 * MIN), T0 + 2 * MIN, 2 * MIN, low) is not None


def test_the_run_returned_is_only_what_spans_the_window() -> None:
    series = points(84, 84, 84, 84, 84)
    assert run_ending_at(series, T0 + 4 * MIN, 2 * MIN, low) == series[2:]


@given(st.lists(st.sampled_from([80.0, 84.0, 86.0, 95.0]), min_size=1, max_size=30), st.integers(0, 6))
def test_a_match_is_exactly_every_reading_of_the_window_breaching(values: list[float], minutes: int) -> None:
    series = points(*values)
    window = minutes * MIN
    at = series[-1][0]
    run = run_ending_at(series, at, window, low)
    inside = [v for t, v in series if at - window <= t <= at]
    spans = len(series) - 1 >= minutes  # one reading a minute: the series reaches back far enough
    assert (run is not None) == (spans and all(low(v) for v in inside))

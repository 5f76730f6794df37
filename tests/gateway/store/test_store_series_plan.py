"""How a series query cuts its range into rollup and raw pieces: a pure function, no database."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

from eldercare.gateway.store.series import RAW, plan_pieces

T0 = datetime(2031, 3, 3, tzinfo=UTC)  # a Monday, 00:00 UTC
H = timedelta(hours=1)
D = timedelta(days=1)
M = timedelta(minutes=1)


def test_aligned_clean_range_comes_from_the_widest_rollup_that_divides_the_width() -> None:
    assert plan_pieces(T0, T0 + 90 * D, D) == {"observations_1d": [(T0, T0 + 90 * D)]}
    assert plan_pieces(T0, T0 + 7 * D, H) == {"observations_1h": [(T0, T0 + 7 * D)]}
    assert plan_pieces(T0, T0 + D, 5 * M) == {"observations_1m": [(T0, T0 + D)]}


def test_cut_edges_go_to_narrower_rollups_and_then_to_raw_rows() -> None:
    start = T0 + 10 * H + 7 * M + timedelta(seconds=30)
    end = T0 + 3 * D + 2 * H + 30 * M
    assert plan_pieces(start, end, D) == {
        "observations_1d": [(T0 + D, T0 + 3 * D)],
        "observations_1h": [(T0 + 11 * H, T0 + D), (T0 + 3 * D, T0 + 3 * D + 2 * H)],
        "observations_1m": [(start + 30 * timedelta(seconds=1), T0 + 11 * H), (T0 + 3 * D + 2 * H, end)],
        RAW: [(start, start + timedelta(seconds=30))],
    }


def test_a_stale_hour_is_read_raw_and_the_rest_of_its_day_from_hourly_rollups() -> None:
    stale = [(T0 + 2 * D + 5 * H, T0 + 2 * D + 6 * H)]
    assert plan_pieces(T0, T0 + 4 * D, D, stale) == {
        "observations_1d": [(T0, T0 + 2 * D), (T0 + 3 * D, T0 + 4 * D)],
        "observations_1h": [(T0 + 2 * D, T0 + 2 * D + 5 * H), (T0 + 2 * D + 6 * H, T0 + 3 * D)],
        RAW: stale,
    }


def test_a_stale_span_inside_an_hour_spoils_only_the_minutes_it_touches() -> None:
    lo = T0 + 5 * H + 10 * M + timedelta(seconds=1)
    stale = [(lo, lo + timedelta(microseconds=1))]
    assert plan_pieces(T0 + 5 * H, T0 + 6 * H, H, stale) == {
        "observations_1m": [(T0 + 5 * H, T0 + 5 * H + 10 * M), (T0 + 5 * H + 11 * M, T0 + 6 * H)],
        RAW: [(T0 + 5 * H + 10 * M, T0 + 5 * H + 11 * M)],
    }


def test_stale_spans_outside_the_range_or_overlapping_are_harmless() -> None:
    stale = [
        (T0 - 3 * H, T0 - 2 * H),
        (T0 + H, T0 + 3 * H),
        (T0 + 2 * H, T0 + 4 * H),
        (T0 + 50 * D, T0 + 60 * D),
    ]
    assert plan_pieces(T0, T0 + 6 * H, H, stale) == {
        "observations_1h": [(T0, T0 + H), (T0 + 4 * H, T0 + 6 * H)],
        RAW: [(T0 + H, T0 + 4 * H)],
    }


def test_a_width_no_rollup_divides_reads_raw_rows_only() -> None:
    assert plan_pieces(T0, T0 + D, timedelta(seconds=37)) == {RAW: [(T0, T0 + D)]}


def test_an_empty_range_has_no_pieces() -> None:
    assert plan_pieces(T0, T0, H) == {}
    assert plan_pieces(T0, T0 - H, H) == {}


def test_pieces_cover_the_range_exactly_once() -> None:
    start, end = T0 + 17 * M + timedelta(seconds=3), T0 + 9 * D + 13 * H + 59 * M
    stale = [(T0 + 3 * D + 4 * H, T0 + 3 * D + 9 * H), (T0 + 9 * D + 13 * H, T0 + 9 * D + 14 * H)]
    for width in (M, 5 * M, H, 6 * H, D, 7 * D):
        spans = sorted(s for pieces in plan_pieces(start, end, width, stale).values() for s in pieces)
        assert spans[0][0] == start and spans[-1][1] == end
        assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))


def test_a_span_stale_in_one_rollup_only_sends_its_buckets_to_the_next_narrower_one() -> None:
    # The daily aggregate is behind on day 2; the hourly one is not.
    stale_in = {"observations_1d": [(T0 + 2 * D + 5 * H, T0 + 2 * D + 6 * H)]}
    assert plan_pieces(T0, T0 + 4 * D, D, stale_in=stale_in) == {
        "observations_1d": [(T0, T0 + 2 * D), (T0 + 3 * D, T0 + 4 * D)],
        "observations_1h": [(T0 + 2 * D, T0 + 3 * D)],
    }

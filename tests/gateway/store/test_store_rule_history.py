"""The history the rules read from the store: what ``lock_and_read`` leaves out never changes
a decision.

A look-up of a sustained window sends only the readings from the newest one that breaks
every run judged (``Lookup.holds``, ``first``); NEWS2 look-ups send the newest reading
before their span. Over random series (irregular times, values either side of the bands,
clock-skewed readings, several readings judged per batch) the runs the engine finds in the
store's answer are the runs it finds in the whole series.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from functools import partial

import psycopg

from eldercare.alerts.engine import Scan
from eldercare.alerts.windows import run_ending_at
from eldercare.gateway.store import alerts as store

T0 = datetime(2026, 11, 25, 3, 0, tzinfo=UTC)
NEWS2_AGE = timedelta(minutes=15)
WINDOWS = (timedelta(minutes=2), timedelta(minutes=5), timedelta(seconds=30))
#: (band of values a run counts, as the rules' conditions would give it)
BANDS = (
    ((-float("inf"), 90.0),),
    ((-float("inf"), 85.0),),
    ((94.5, float("inf")),),
    ((-1e9, 40.0), (130.0, 1e9)),
)


def _holds(bands: tuple[tuple[float, float], ...], value: float) -> bool:
    return any(low <= value <= high for low, high in bands)


def _case(
    rng: random.Random, elder: str
) -> tuple[list[tuple[datetime, float, bool]], list[tuple[datetime, timedelta, tuple]]]:
    """A random series for one elder (time, value, clock-skewed) and the readings judged."""
    series, at, value = [], T0, 0.0
    for _ in range(rng.randint(5, 120)):
        at += timedelta(seconds=rng.choice([1, 3, 7, 10, 10, 31, 61, 200]))
        if not series or rng.random() < 0.15:  # episodes: values stay on one side a while
            value = rng.choice([80.0, 84.0, 86.0, 89.0, 91.0, 96.0, 35.0, 135.0, 70.0])
        series.append((at, value, rng.random() < 0.05))
    judged = []
    for at, value, skewed in rng.sample(series, min(len(series), rng.randint(1, 4))):
        bands = [b for b in BANDS if _holds(b, value)]  # a reading is judged when it breaches
        if bands and not skewed:
            judged.append((at, rng.choice(WINDOWS), rng.choice(bands)))
    return series, judged


def test_the_store_answer_gives_the_runs_of_the_whole_series(plain_db: str) -> None:
    rng = random.Random(20261125)
    cases = {f"elder-{i}": _case(rng, f"elder-{i}") for i in range(60)}
    with psycopg.connect(plain_db) as conn, conn.cursor() as cur:
        with cur.copy(
            "COPY observations (time, device_id, elder_id, metric, value, flags) FROM STDIN"
        ) as copy:
            for elder, (series, _) in cases.items():
                for at, value, skewed in series:
                    copy.write_row(
                        (at, "dev-" + elder, elder, "spo2", value, ["clock_skew"] if skewed else [])
                    )
        scan = Scan()
        latest: dict[str, datetime] = {}
        for elder, (_, judged) in cases.items():
            for at, window, bands in judged:
                scan.need_series(elder, "spo2", at, window, bands)
            if judged and rng.random() < 0.5:  # NEWS2 asks for the latest reading too
                scan.need_latest(elder, "spo2", judged[0][0] - timedelta(seconds=1), NEWS2_AGE)
                latest[elder] = judged[0][0] - timedelta(seconds=1)
        series_lookups, _ = scan.lookups()
        history = store.lock_and_read(cur, list(cases), T0, series_lookups, []).history
        sent = sum(len(v) for v in history.series.values())
        whole = 0
        runs: list[object] = []
        for elder, (series, judged) in cases.items():
            full = sorted((at, value) for at, value, skewed in series if not skewed)
            whole += len(full)
            got = history.points(elder, "spo2")
            assert set(got) <= set(full)
            for at, window, bands in judged:
                holds = partial(_holds, bands)
                runs.append(run_ending_at(full, at, window, holds))
                assert run_ending_at(got, at, window, holds) == runs[-1], (
                    elder,
                    at,
                    window,
                    bands,
                )
            if elder in latest:  # NEWS2's view: the newest reading at or before its time
                at = latest[elder]
                newest = [p for p in full if at - NEWS2_AGE <= p[0] <= at][-1:]
                assert [p for p in got if at - NEWS2_AGE <= p[0] <= at][-1:] == newest
        assert sent < whole / 2  # the cut leaves readings out (else this test shows nothing)
        assert sum(bool(run) for run in runs) > 15  # and many runs span their windows

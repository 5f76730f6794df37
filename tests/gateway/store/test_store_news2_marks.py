"""NEWS2 marks in the store: merged by the upsert, ordered by its row lock, and the rules still
raise what two batches' readings add up to (alerts/news2_marks.py)."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from eldercare.alerts import news2_marks
from eldercare.alerts.rules import load_rule_set
from eldercare.devices.records import Interpretation, Reading
from eldercare.gateway.ingest.alerting import AlertingStep
from eldercare.gateway.store import alerts as store
from eldercare.gateway.store.devices import add_device
from eldercare.gateway.store.writer import BatchWriter, Received

NOW = datetime(2026, 11, 23, 2, 0, tzinfo=UTC)
HR_1 = 3 * news2_marks.MARKED.index("heart_rate")  # heart rate scoring at least 1
HR_2, HR_3 = HR_1 + 1, HR_1 + 2


def row(elder: str, marks: dict[int, datetime]) -> dict[str, list[datetime | None]]:
    """An elder's row with these marks (by index) set and the others empty."""
    return {elder: [marks.get(i) for i in range(news2_marks.SIZE)]}


def test_the_upsert_keeps_the_newest_time_of_each_mark_and_returns_the_row(plain_db: str) -> None:
    t0, t1 = NOW, NOW + timedelta(minutes=1)
    with psycopg.connect(plain_db) as conn, conn.cursor() as cur:
        assert store.mark_news2(cur, {}) == {}
        first = store.mark_news2(cur, row("e-1", {HR_1: t1, HR_2: t0}) | row("e-2", {HR_3: t0}))
        assert first["e-1"][HR_1] == t1 and first["e-1"][HR_2] == t0 and first["e-1"][HR_3] is None
        again = store.mark_news2(cur, row("e-1", {HR_1: t0, HR_3: t0}))
        assert (again["e-1"][HR_1], again["e-1"][HR_2], again["e-1"][HR_3]) == (t1, t0, t0)
        assert set(again) == {"e-1"}  # only the rows asked for


def test_a_second_batch_marking_the_same_elder_waits_and_reads_the_first_ones_marks(plain_db: str) -> None:
    t0, t1 = NOW, NOW + timedelta(seconds=30)
    seen: list[dict[str, list[datetime | None]]] = []
    with psycopg.connect(plain_db) as first:
        with first.cursor() as cur:
            store.mark_news2(cur, row("e-1", {HR_3: t0}))  # uncommitted, row locked

        def second() -> None:
            with psycopg.connect(plain_db) as conn, conn.cursor() as cur:
                seen.append(store.mark_news2(cur, row("e-1", {HR_1: t1})))

        other = threading.Thread(target=second)
        other.start()
        time.sleep(0.3)
        assert not seen, "the second batch did not wait for the first's row lock"
        first.commit()
        other.join(5)
    [marks] = seen
    assert marks["e-1"][HR_3] == t0 and marks["e-1"][HR_1] == t1


def _reading(metric: str, value: float, at: datetime, n: int) -> Received:
    interp = Interpretation(source_id="d-1", msg_id=f"m{n}", seen_devices=["d-1"])
    interp.readings.append(Reading(at, "d-1", "e-9", metric, value, []))
    return Received("eldercare/v1/devices/d-1/telemetry", b"{}", at.timestamp(), interp)


def test_scores_from_two_batches_add_up_to_a_news2_emergency(
    plain_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Systolic 85 scores 3; a heart rate of 100 (1) is bounded at 4 and reads nothing; one of
    115 (2) a minute later reaches 5 with a single 3: an emergency, judged on both readings."""
    reads: list[str] = []
    real = store.lock_and_read
    monkeypatch.setattr(
        store, "lock_and_read", lambda cur, ids, *a: reads.append(",".join(ids)) or real(cur, ids, *a)
    )
    writer = BatchWriter("plain", AlertingStep(load_rule_set(), clock=(NOW + timedelta(minutes=2)).timestamp))
    with psycopg.connect(plain_db) as conn:
        add_device(conn, "d-1", "wristband", "e-9")
        conn.commit()
        writer.write(conn, [_reading("systolic_bp", 85.0, NOW, 1)])  # hypotension's window: read
        assert reads == ["e-9"]
        writer.write(conn, [_reading("heart_rate", 100.0, NOW + timedelta(seconds=30), 2)])
        assert reads == ["e-9"], "a NEWS2 reading bounded at 4 went down the rare path"
        news2_alerts = "SELECT severity FROM alerts WHERE elder_id = 'e-9' AND rule = 'news2'"
        assert conn.execute(news2_alerts).fetchall() == []
        writer.write(conn, [_reading("heart_rate", 115.0, NOW + timedelta(minutes=1), 3)])
        assert reads == ["e-9", "e-9"]
        assert conn.execute(news2_alerts).fetchall() == [("emergency",)]
        [evidence] = conn.execute(
            "SELECT evidence FROM alerts WHERE elder_id = 'e-9' AND rule = 'news2'"
        ).fetchone() or [None]
        assert evidence["aggregate"] == 5 and evidence["scores"]["systolic_bp"] == 3

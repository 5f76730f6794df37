"""Durable timers in the store: scheduling, cancelling, claiming, announcing (real PostgreSQL)."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from eldercare.gateway.store import timers
from tests.waiting import wait_for

T0 = datetime(2030, 1, 1, 8, 0, tzinfo=UTC)  # far ahead: nothing here is announced by accident
SECOND = timedelta(seconds=1)


def connect(db_url: str) -> psycopg.Connection[Any]:
    return psycopg.connect(db_url, autocommit=True)


def rows(db_url: str, query: str, *params: object) -> list[tuple[Any, ...]]:
    with connect(db_url) as conn:
        return conn.execute(query, params).fetchall()


def waiting_on_a_lock(db_url: str) -> int:
    """How many sessions of this database wait for a lock (a row another transaction holds)."""
    query = (
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )
    return rows(db_url, query)[0][0]


def schedule(
    db_url: str, kind: str, key: str, due: datetime, payload: dict[str, Any] | None = None, **kw: Any
) -> int:
    kw.setdefault("if_pending", "keep")
    with connect(db_url) as conn, conn.transaction(), conn.cursor() as cur:
        return timers.schedule(cur, kind, key, due, payload, **kw)


def claim(db_url: str, now: datetime, limit: int = 100, kinds: list[str] | None = None) -> list[timers.Timer]:
    """Claim and mark fired in one transaction, as a runner does."""
    with connect(db_url) as conn, conn.transaction(), conn.cursor() as cur:
        claimed = timers.claim_due(cur, now, limit, kinds)
        timers.mark_fired(cur, [t.id for t in claimed], now)
        return claimed


def test_a_scheduled_timer_is_claimed_once_it_is_due_with_its_payload(db_url: str) -> None:
    tid = schedule(db_url, "fall_no_recovery", "e-1", T0 + 60 * SECOND, {"event_id": 7, "elder": "e-1"})
    assert claim(db_url, T0 + 59 * SECOND) == []
    [timer] = claim(db_url, T0 + 60 * SECOND)
    assert (timer.id, timer.kind, timer.key, timer.due_at) == (
        tid,
        "fall_no_recovery",
        "e-1",
        T0 + 60 * SECOND,
    )
    assert timer.payload == {"event_id": 7, "elder": "e-1"}
    assert timer.attempts == 0
    assert claim(db_url, T0 + 120 * SECOND) == []  # fired: never again
    assert rows(db_url, "SELECT fired_at, cancelled_at FROM timers") == [(T0 + 60 * SECOND, None)]


def test_keep_leaves_the_pending_timer_as_it_was(db_url: str) -> None:
    first = schedule(db_url, "fall_no_recovery", "e-1", T0 + 60 * SECOND, {"n": 1}, if_pending="keep")
    again = schedule(db_url, "fall_no_recovery", "e-1", T0 + 90 * SECOND, {"n": 2}, if_pending="keep")
    assert again == first
    assert rows(db_url, "SELECT due_at, payload FROM timers") == [(T0 + 60 * SECOND, {"n": 1})]


def test_replace_moves_the_pending_timer_and_clears_its_failures(db_url: str) -> None:
    first = schedule(db_url, "dispatch_retry", "a-1", T0, {"try": 1})
    with connect(db_url) as conn, conn.transaction(), conn.cursor() as cur:
        [timer] = timers.claim_due(cur, T0, 10)
        timers.mark_failed(cur, timer.id, "ConnectError: refused", T0 + 5 * SECOND)
    again = schedule(db_url, "dispatch_retry", "a-1", T0 + 30 * SECOND, {"try": 2}, if_pending="replace")
    assert again == first
    assert rows(db_url, "SELECT due_at, run_at, payload, attempts, last_error FROM timers") == [
        (T0 + 30 * SECOND, T0 + 30 * SECOND, {"try": 2}, 0, None)
    ]


def test_if_pending_must_be_said(db_url: str) -> None:
    with connect(db_url) as conn, conn.cursor() as cur:
        with pytest.raises(ValueError, match="if_pending"):
            timers.schedule(cur, "k", "1", T0, if_pending="earliest")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="timezone"):
            timers.schedule(cur, "k", "1", datetime(2030, 1, 1), if_pending="keep")


def test_the_same_kind_and_key_after_firing_or_cancelling_is_a_new_timer(db_url: str) -> None:
    first = schedule(db_url, "fall_no_recovery", "e-1", T0)
    claim(db_url, T0)
    second = schedule(db_url, "fall_no_recovery", "e-1", T0 + SECOND)
    with connect(db_url) as conn, conn.cursor() as cur:
        assert timers.cancel(cur, "fall_no_recovery", "e-1")
    third = schedule(db_url, "fall_no_recovery", "e-1", T0 + 2 * SECOND)
    assert len({first, second, third}) == 3
    assert rows(db_url, "SELECT count(*) FROM timers WHERE fired_at IS NULL AND cancelled_at IS NULL") == [
        (1,)
    ]


def test_the_same_key_of_another_kind_is_another_timer(db_url: str) -> None:
    a = schedule(db_url, "fall_no_recovery", "e-1", T0)
    b = schedule(db_url, "night_bed_exit", "e-1", T0)
    assert a != b


def test_a_cancelled_timer_is_never_claimed(db_url: str) -> None:
    schedule(db_url, "fall_no_recovery", "e-1", T0)
    with connect(db_url) as conn, conn.cursor() as cur:
        assert timers.cancel(cur, "fall_no_recovery", "e-1", now=T0 - SECOND) is True
        assert timers.cancel(cur, "fall_no_recovery", "e-1") is False  # nothing pending any more
        assert timers.cancel(cur, "fall_no_recovery", "e-2") is False  # never scheduled
    assert claim(db_url, T0 + 3600 * SECOND) == []
    assert rows(db_url, "SELECT cancelled_at, fired_at FROM timers") == [(T0 - SECOND, None)]
    with connect(db_url) as conn:
        assert timers.next_due(conn) is None


def test_scheduling_and_cancelling_roll_back_with_the_callers_transaction(db_url: str) -> None:
    with connect(db_url) as conn:
        with conn.transaction(force_rollback=True), conn.cursor() as cur:
            timers.schedule(cur, "fall_no_recovery", "e-1", T0, if_pending="keep")
        assert timers.next_due(conn) is None
        schedule(db_url, "fall_no_recovery", "e-1", T0)
        with conn.transaction(force_rollback=True), conn.cursor() as cur:
            assert timers.cancel(cur, "fall_no_recovery", "e-1")
        assert timers.next_due(conn) == T0


def test_claims_are_earliest_first_limited_and_by_kind(db_url: str) -> None:
    for i in range(5):
        schedule(db_url, "fall_no_recovery", f"e-{i}", T0 + (5 - i) * SECOND)
    schedule(db_url, "night_bed_exit", "e-9", T0)
    got = claim(db_url, T0 + 10 * SECOND, limit=3, kinds=["fall_no_recovery"])
    assert [t.key for t in got] == ["e-4", "e-3", "e-2"]
    with connect(db_url) as conn:
        assert timers.next_due(conn, ["fall_no_recovery"]) == T0 + 4 * SECOND
        assert timers.next_due(conn, ["night_bed_exit"]) == T0
        assert timers.next_due(conn) == T0
        assert timers.next_due(conn, ["sos_operator_first"]) is None


def test_a_claimed_row_is_skipped_by_other_claims_until_its_transaction_ends(db_url: str) -> None:
    for i in range(4):
        schedule(db_url, "fall_no_recovery", f"e-{i}", T0 + i * SECOND)
    with connect(db_url) as holder, holder.transaction(), holder.cursor() as cur:
        mine = timers.claim_due(cur, T0 + 10 * SECOND, 2)
        theirs = claim(db_url, T0 + 10 * SECOND)  # does not wait for the held rows
        assert [t.key for t in mine] == ["e-0", "e-1"]
        assert [t.key for t in theirs] == ["e-2", "e-3"]
        raise psycopg.Rollback()  # the runner died: e-0 and e-1 are pending again
    assert [t.key for t in claim(db_url, T0 + 10 * SECOND)] == ["e-0", "e-1"]


def test_a_cancel_racing_a_firing_waits_and_reports_it_fired(db_url: str) -> None:
    schedule(db_url, "fall_no_recovery", "e-1", T0)
    cancelled: list[bool] = []
    with connect(db_url) as runner:
        with runner.transaction(), runner.cursor() as cur:
            [timer] = timers.claim_due(cur, T0, 10)

            def cancel() -> None:
                with connect(db_url) as conn, conn.transaction(), conn.cursor() as c:
                    cancelled.append(timers.cancel(c, "fall_no_recovery", "e-1"))

            rule = threading.Thread(target=cancel)
            rule.start()
            wait_for(lambda: waiting_on_a_lock(db_url), 10, "the cancel to wait for the firing")
            timers.mark_fired(cur, [timer.id], T0)
        rule.join(10)
    assert cancelled == [False]
    assert rows(db_url, "SELECT fired_at IS NOT NULL, cancelled_at IS NULL FROM timers") == [(True, True)]


def test_two_transactions_scheduling_the_same_timer_leave_one_pending(db_url: str) -> None:
    with connect(db_url) as a, connect(db_url) as b:
        done: list[int] = []
        with a.transaction(), a.cursor() as cur:
            first = timers.schedule(cur, "fall_no_recovery", "e-1", T0, {"by": "a"}, if_pending="keep")

            def second() -> None:
                with b.transaction(), b.cursor() as c:
                    done.append(
                        timers.schedule(c, "fall_no_recovery", "e-1", T0, {"by": "b"}, if_pending="keep")
                    )

            other = threading.Thread(target=second)
            other.start()
            wait_for(lambda: waiting_on_a_lock(db_url), 10, "b to wait for a's uncommitted timer")
        other.join(10)
    assert done == [first]
    assert rows(db_url, "SELECT payload FROM timers") == [({"by": "a"},)]


def test_a_failed_try_counts_keeps_the_due_time_and_waits_for_its_retry(db_url: str) -> None:
    schedule(db_url, "dispatch_retry", "a-1", T0)
    with connect(db_url) as conn, conn.transaction(), conn.cursor() as cur:
        [timer] = timers.claim_due(cur, T0, 10)
        timers.mark_failed(cur, timer.id, "TimeoutError: hotline", T0 + 2 * SECOND)
    assert claim(db_url, T0 + SECOND) == []
    [again] = claim(db_url, T0 + 2 * SECOND)
    assert (again.due_at, again.attempts) == (T0, 1)
    assert rows(db_url, "SELECT last_error FROM timers") == [("TimeoutError: hotline",)]


def listener(db_url: str) -> psycopg.Connection[Any]:
    conn = connect(db_url)
    conn.execute(f"LISTEN {timers.CHANNEL}")
    return conn


def announced(conn: psycopg.Connection[Any]) -> list[str]:
    return [n.payload for n in conn.notifies(timeout=0.3)]


def test_a_timer_due_within_the_runners_sleep_is_announced_at_commit(db_url: str) -> None:
    now = datetime.now(UTC)
    with listener(db_url) as listen:
        schedule(db_url, "fall_no_recovery", "soon", now + timers.ANNOUNCE_WITHIN - SECOND)
        schedule(db_url, "night_bed_exit", "past", now - SECOND)
        assert sorted(announced(listen)) == ["fall_no_recovery", "night_bed_exit"]
        schedule(db_url, "fall_no_recovery", "later", now + timers.ANNOUNCE_WITHIN + 2 * SECOND)
        with connect(db_url) as conn, conn.transaction(force_rollback=True), conn.cursor() as cur:
            timers.schedule(cur, "fall_no_recovery", "rolled-back", now, if_pending="keep")
        assert announced(listen) == []


def test_moving_a_timer_earlier_announces_it(db_url: str) -> None:
    now = datetime.now(UTC)
    schedule(db_url, "dispatch_retry", "a-1", now + timedelta(hours=1))
    with listener(db_url) as listen:
        schedule(db_url, "dispatch_retry", "a-1", now, if_pending="replace")
        assert announced(listen) == ["dispatch_retry"]


def test_overdue_kinds_and_retention(db_url: str) -> None:
    schedule(db_url, "fall_no_recovery", "e-1", T0)
    schedule(db_url, "orphan", "x", T0)
    schedule(db_url, "orphan", "y", T0 + 10 * SECOND)
    with connect(db_url) as conn:
        assert timers.overdue_kinds(conn, T0 + SECOND, ["fall_no_recovery"]) == ["orphan"]
        assert timers.overdue_kinds(conn, T0, ["fall_no_recovery"]) == []
    claim(db_url, T0, kinds=["fall_no_recovery"])
    with connect(db_url) as conn, conn.cursor() as cur:
        assert timers.delete_finished(cur, T0) == 0
        assert timers.delete_finished(cur, T0 + SECOND) == 1
    assert rows(db_url, "SELECT kind, key FROM timers ORDER BY key") == [("orphan", "x"), ("orphan", "y")]

"""The dispatcher's decisions, without I/O: route steps, backoff, escalation, acknowledgements."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from eldercare.alerts.dispatch.adapter import Delivered, Permanent, Retryable
from eldercare.alerts.dispatch.routing import (
    AckStatus,
    DispatchView,
    Next,
    Planned,
    ack_moves,
    after_attempt,
    deadline_escalation,
    escalation_step,
    retry_delay,
    step_deadline,
    step_dispatches,
    to_supersede,
    unconfigured,
)
from eldercare.alerts.rules import load_rule_set

ROUTES = load_rule_set().routes
NOW = datetime(2026, 11, 22, 6, 0, 3, tzinfo=UTC)
ALL = ("120", "12349", "12320", "family", "family_doctor")


def test_an_emergency_goes_to_120_and_the_family_first_and_only_120_acknowledges() -> None:
    assert step_dispatches(ROUTES["emergency"], 0, ALL, {"family"}) == [
        Planned("120", 0, True),
        Planned("family", 0, False),
    ]
    assert step_dispatches(ROUTES["emergency"], 1, ALL, {"family"}) == [Planned("12349", 1, True)]
    assert step_dispatches(ROUTES["emergency"], 2, ALL, {"family"}) == []


def test_a_channel_the_deployment_lacks_is_skipped_and_named() -> None:
    assert step_dispatches(ROUTES["urgent"], 0, ("12349",)) == [Planned("12349", 0, True)]
    assert unconfigured(ROUTES["urgent"], 0, ("12349",)) == ["family"]


def test_optional_channels_join_only_where_configured() -> None:
    assert [p.channel for p in step_dispatches(ROUTES["fire"], 0, ALL)] == ["12349", "family"]
    assert [p.channel for p in step_dispatches(ROUTES["fire"], 0, (*ALL, "119"))] == [
        "12349",
        "family",
        "119",
    ]
    assert unconfigured(ROUTES["fire"], 0, ALL) == []  # 119 is optional


@pytest.mark.parametrize(
    ("route", "step", "deadline"),
    [
        ("emergency", 0, timedelta(seconds=60)),
        ("emergency", 1, None),  # the last step waits as long as it takes
        ("urgent", 0, timedelta(minutes=10)),
        ("urgent", 1, timedelta(minutes=10)),
        ("urgent", 2, None),
        ("follow_up", 0, None),  # a task's due date is its deadline, not the route's
    ],
)
def test_each_step_escalates_after_its_own_deadline(
    route: str, step: int, deadline: timedelta | None
) -> None:
    assert step_deadline(ROUTES[route], step, NOW) == (None if deadline is None else NOW + deadline)


@pytest.mark.parametrize(
    ("attempt", "draw", "retry_after", "delay"),
    [
        (1, 0.0, None, 1.0),
        (2, 0.0, None, 2.0),
        (3, 0.0, None, 4.0),
        (6, 0.0, None, 32.0),
        (7, 0.0, None, 60.0),  # capped
        (30, 0.0, None, 60.0),
        (1, 1.0, None, 0.75),  # jitter shortens by at most a quarter
        (7, 1.0, None, 45.0),
        (1, 0.0, 30.0, 30.0),  # Retry-After is honoured ...
        (7, 0.0, 5.0, 60.0),  # ... as a lower bound
    ],
)
def test_retries_back_off_exponentially_with_jitter_and_honour_retry_after(
    attempt: int, draw: float, retry_after: float | None, delay: float
) -> None:
    assert retry_delay(attempt, retry_after, draw) == pytest.approx(delay)


@given(st.integers(1, 100), st.floats(0, 0.999999), st.none() | st.floats(0, 3600))
def test_a_retry_is_never_sooner_than_asked_nor_later_than_the_cap_or_retry_after(
    attempt: int, draw: float, retry_after: float | None
) -> None:
    delay = retry_delay(attempt, retry_after, draw)
    assert delay >= 0.75 * min(60.0, 2.0 ** (attempt - 1)) - 1e-9
    assert delay <= max(60.0, retry_after or 0.0)
    if retry_after is not None:
        assert delay >= retry_after


def test_after_an_attempt() -> None:
    rng = random.Random(0)
    assert after_attempt(Delivered(202, "120-1"), 1, NOW, rng).next is Next.delivered
    retry = after_attempt(Retryable("http 503", 503), 2, NOW, rng)
    assert retry.next is Next.retry and retry.next_attempt_at is not None
    assert timedelta(seconds=1.5) <= retry.next_attempt_at - NOW <= timedelta(seconds=2)
    failed = after_attempt(Permanent("http 404", 404), 1, NOW, rng)
    assert failed.next is Next.failed and failed.escalate_now and failed.next_attempt_at is None


@pytest.mark.parametrize(
    ("current", "new", "moves"),
    [
        (None, "accepted", True),
        (None, "declined", True),
        (None, "closed", True),
        ("accepted", "en_route", True),
        ("accepted", "closed", True),
        ("en_route", "accepted", False),  # out of order: never backwards
        ("on_scene", "on_scene", False),  # repeated: nothing to do
        ("closed", "accepted", False),
        ("declined", "accepted", False),
        ("accepted", "declined", False),
    ],
)
def test_acknowledgements_only_move_forward(current: str | None, new: str, moves: bool) -> None:
    assert ack_moves(current, AckStatus(new)) is moves


def view(
    id_: str, step: int, state: str = "delivered", ack: str | None = None, counts: bool = True
) -> DispatchView:
    return DispatchView(id_, step, counts, state, ack)


def test_a_step_escalates_at_once_when_every_channel_that_counts_failed_or_declined() -> None:
    route = ROUTES["urgent"]
    assert escalation_step(route, [view("a", 0, "failed"), view("f", 0, counts=False)]) == 1
    assert escalation_step(route, [view("a", 0, ack="declined"), view("f", 0, counts=False)]) == 1
    assert escalation_step(route, [view("a", 0, "pending")]) is None  # still retrying
    assert escalation_step(route, [view("a", 0, "failed"), view("b", 1, "failed")]) == 2
    assert (
        escalation_step(route, [view("a", 0, "failed"), view("b", 1), view("c", 2, "failed")]) is None
    )  # last


def test_a_family_acknowledgement_does_not_stop_escalation_but_a_hotline_one_does() -> None:
    route = ROUTES["emergency"]
    family_acked = [view("120", 0, "failed"), view("fam", 0, ack="accepted", counts=False)]
    assert escalation_step(route, family_acked) == 1
    assert escalation_step(route, [view("120", 0, ack="accepted"), view("12349", 1, "failed")]) is None


def test_the_first_acknowledgement_supersedes_the_other_open_dispatches_that_count() -> None:
    dispatches = [
        view("120", 0, "pending"),
        view("fam", 0, counts=False),
        view("12349", 1, ack="accepted"),
        view("old", 0, "failed"),
    ]
    assert to_supersede(dispatches, "12349") == ["120"]


def test_at_its_deadline_a_step_nobody_acknowledged_escalates_once() -> None:
    route = ROUTES["urgent"]
    assert (
        deadline_escalation(route, [view("12349", 0), view("fam", 0, ack="accepted", counts=False)], 0) == 1
    )
    assert deadline_escalation(route, [view("12349", 0, "pending")], 0) == 1  # still retrying: no matter
    assert deadline_escalation(route, [view("12349", 0, ack="accepted")], 0) is None
    assert deadline_escalation(route, [view("12349", 0, "failed"), view("fd", 1)], 0) is None  # went on early
    assert deadline_escalation(route, [view("a", 0), view("b", 1), view("c", 2)], 2) is None  # the last step


def test_a_follow_ups_first_step_escalates_at_its_tasks_due_date() -> None:
    due = NOW + timedelta(days=7)
    assert step_deadline(ROUTES["follow_up"], 0, NOW, task_due=due) == due
    assert step_deadline(ROUTES["follow_up"], 1, NOW, task_due=due) is None  # 12320 is the last
    assert step_deadline(ROUTES["emergency"], 0, NOW, task_due=due) == NOW + timedelta(seconds=60)

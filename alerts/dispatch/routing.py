"""Every decision the dispatcher makes, as pure functions of a dispatch's state and the clock.

Which channels a route step notifies, when a failed attempt is tried again, when a step
escalates, whether an acknowledgement moves a dispatch forward: no I/O here, and the random
jitter comes in as an argument, so each decision is tested as a table.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from eldercare.alerts.dispatch.adapter import Delivered, Outcome, Permanent, Retryable
from eldercare.alerts.rules import Route

#: Retries back off 1 s, 2 s, 4 s ... up to this (hotline-dispatch.md).
BACKOFF_CAP_S = 60.0
#: Jitter: each delay is drawn from [1 - JITTER, 1] of its step, so retries of many dispatches
#: after one outage do not arrive at a hotline together.
JITTER = 0.25


class AckStatus(StrEnum):
    """A hotline's progress on a dispatch, in the only order it may move."""

    accepted = "accepted"
    en_route = "en_route"
    on_scene = "on_scene"
    closed = "closed"
    declined = "declined"


_ORDER = {AckStatus.accepted: 1, AckStatus.en_route: 2, AckStatus.on_scene: 3, AckStatus.closed: 4}


@dataclass(frozen=True, slots=True)
class Planned:
    """A dispatch a route step asks for."""

    channel: str
    step: int
    counts_as_ack: bool


def step_dispatches(
    route: Route,
    step: int,
    configured: Collection[str],
    notify_only: Collection[str] = (),
) -> list[Planned]:
    """The dispatches of one route step: its channels that the deployment configured.

    A step's ``if_configured`` channels are added where configured; a channel named in a step
    but not configured is skipped (the caller reports it: a route that reaches nobody is an
    operator's problem to see, not a reason to stop the other channels). ``notify_only``
    channels (family contacts) are told, but their acknowledgement does not stop escalation.
    """
    if step >= len(route.steps):
        return []
    wanted = (*route.steps[step].notify, *route.steps[step].if_configured)
    seen: set[str] = set()
    planned = []
    for channel in wanted:
        if channel in configured and channel not in seen:
            seen.add(channel)
            planned.append(Planned(channel, step, channel not in notify_only))
    return planned


def unconfigured(route: Route, step: int, configured: Collection[str]) -> list[str]:
    """The channels a step names (not its optional ones) that the deployment lacks."""
    if step >= len(route.steps):
        return []
    return [c for c in route.steps[step].notify if c not in configured]


def step_deadline(
    route: Route, step: int, started: datetime, task_due: datetime | None = None
) -> datetime | None:
    """When a step that nobody acknowledged escalates to the next; None: it never does (the
    last step, or a step with no deadline of its own and no task). A follow-up's step has no
    deadline of its own: its task's due date is (hotline-dispatch.md, default routes)."""
    if step + 1 >= len(route.steps):
        return None
    within = route.steps[step].ack_within
    if within is None:
        return task_due
    return started + within


def retry_delay(attempt: int, retry_after_s: float | None, draw: float) -> float:
    """Seconds before attempt ``attempt + 1``, after attempt ``attempt`` (1-based) failed.

    1 s, 2 s, 4 s ... capped at 60 s, each shortened by up to ``JITTER`` (``draw`` in [0, 1)),
    and never sooner than the channel's Retry-After (which the adapter already clamped).
    """
    base = min(BACKOFF_CAP_S, 2.0 ** max(0, attempt - 1))
    delay = base * (1.0 - JITTER * draw)
    if retry_after_s is not None:
        delay = max(delay, retry_after_s)
    return delay


class Next(StrEnum):
    """What becomes of a dispatch after one attempt."""

    delivered = "delivered"  # wait for its acknowledgement (or the step's deadline)
    retry = "retry"  # pending again, due at ``next_attempt_at``
    failed = "failed"  # permanent failure: escalate now


@dataclass(frozen=True, slots=True)
class AfterAttempt:
    """The decision after one attempt."""

    next: Next
    next_attempt_at: datetime | None = None
    escalate_now: bool = False


def after_attempt(
    outcome: Outcome, attempt: int, now: datetime, rng: random.Random | None = None
) -> AfterAttempt:
    """Delivered waits for an ack; retryable is due again after the backoff; permanent fails
    the dispatch and escalates its step at once."""
    if isinstance(outcome, Delivered):
        return AfterAttempt(Next.delivered)
    if isinstance(outcome, Retryable):
        draw = (rng or random).random()
        delay = retry_delay(attempt, outcome.retry_after_s, draw)
        return AfterAttempt(Next.retry, now + timedelta(seconds=delay))
    assert isinstance(outcome, Permanent)
    return AfterAttempt(Next.failed, escalate_now=True)


def ack_moves(current: str | None, new: AckStatus) -> bool:
    """True if ``new`` moves a dispatch forward from ``current`` (None: not acknowledged yet).

    Repeated and out-of-order acks are safe: a status never moves backwards, and nothing
    moves after ``declined`` or ``closed``.
    """
    if current is None:
        return True
    if current in (AckStatus.declined, AckStatus.closed):
        return False
    if new is AckStatus.declined:
        return False  # a hotline that has accepted does not decline afterwards
    return _ORDER[new] > _ORDER[AckStatus(current)]


@dataclass(frozen=True, slots=True)
class DispatchView:
    """What escalation looks at of one dispatch of an alert."""

    id: str
    step: int
    counts_as_ack: bool
    state: str  # pending, delivered, acknowledged, failed, superseded
    ack_status: str | None


def acknowledged(dispatches: Sequence[DispatchView]) -> bool:
    """True once any dispatch whose acknowledgement counts was accepted (not declined)."""
    return any(
        d.counts_as_ack and d.ack_status is not None and d.ack_status != AckStatus.declined
        for d in dispatches
    )


def escalation_step(route: Route, dispatches: Sequence[DispatchView]) -> int | None:
    """The step to escalate to now, if the current one has failed or been declined by every
    channel whose acknowledgement counts; None otherwise (someone may still answer)."""
    if not dispatches or acknowledged(dispatches):
        return None
    current = max(d.step for d in dispatches)
    if current + 1 >= len(route.steps):
        return None
    counting = [d for d in dispatches if d.step == current and d.counts_as_ack]
    if counting and all(d.state == "failed" or d.ack_status == AckStatus.declined for d in counting):
        return current + 1
    return None


def deadline_escalation(route: Route, dispatches: Sequence[DispatchView], step: int) -> int | None:
    """At step ``step``'s deadline: the step to escalate to, or None when someone whose
    acknowledgement counts has answered, the route already went further (a failure escalated
    it early), or there is no further step."""
    if acknowledged(dispatches):
        return None
    if any(d.step > step for d in dispatches):
        return None
    return step + 1 if step + 1 < len(route.steps) else None


def to_supersede(dispatches: Sequence[DispatchView], winner: str) -> list[str]:
    """Once ``winner`` acknowledged first: the other counting dispatches still open, which
    are told ``superseded`` (their retries stop; a delivered one gets the notice)."""
    return [
        d.id
        for d in dispatches
        if d.id != winner and d.counts_as_ack and d.state in ("pending", "delivered") and d.ack_status is None
    ]


@dataclass(frozen=True, slots=True)
class Routing:
    """The deployment's routes and channels, as the store's dispatch functions need them."""

    routes: Mapping[str, Route]
    configured: frozenset[str]
    notify_only: frozenset[str] = frozenset()

    def step(self, route: str, step: int) -> list[Planned]:
        """The dispatches of a route's step (none for an unknown route: said by the caller)."""
        found = self.routes.get(route)
        return [] if found is None else step_dispatches(found, step, self.configured, self.notify_only)

    def steps_of(self, route: str) -> int:
        """How many steps the route has (0 for an unknown route)."""
        found = self.routes.get(route)
        return 0 if found is None else len(found.steps)

    def deadline(
        self, route: str, step: int, started: datetime, task_due: datetime | None = None
    ) -> datetime | None:
        found = self.routes.get(route)
        return None if found is None else step_deadline(found, step, started, task_due)

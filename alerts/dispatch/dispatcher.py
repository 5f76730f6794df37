"""The dispatcher: claims what must be delivered, hands it to the adapters, keeps what happened.

One asyncio loop per process. It LISTENs on ``eldercare_outbox`` (an alert was raised or
upgraded: the NOTIFY comes with the commit of the batch that raised it) and on
``eldercare_dispatch`` (a retry became due), and sweeps every second as a safety net. Each
pass turns new outbox rows into dispatches of their route's first step and leases them, and
leases the pending dispatches that are due; each leased dispatch is delivered in a task of
its own, so a slow hotline never holds up an emergency for another. The decisions (retry
delay, failure) come from ``routing.py``; the adapters only send. Store calls are short
transactions run in worker threads (``gateway/store/dispatches.py``).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import psycopg
from psycopg_pool import ConnectionPool

from eldercare.alerts.dispatch.adapter import Adapter, Attempt, Outcome, Retryable
from eldercare.alerts.dispatch.channels import Channels
from eldercare.alerts.dispatch.routing import Next, Routing, after_attempt, unconfigured
from eldercare.alerts.rules import RuleSet
from eldercare.alerts.timers import TimerRunner
from eldercare.devices.catalog import load_catalog
from eldercare.gateway.store import dispatches as store
from eldercare.gateway.store.alerts import OUTBOX_CHANNEL
from eldercare.gateway.store.timers import Timer

log = logging.getLogger(__name__)

#: Kinds the webhook adapter serves (they differ in fields and URL, not in the wire).
WEBHOOK_KINDS = ("webhook", "sms_gateway", "task_queue", "nurse_station")
#: How long a claim is ours beyond the channel's own attempt deadline.
LEASE_MARGIN_S = 10.0
#: The safety-net sweep, when no NOTIFY came.
SWEEP_S = 1.0
#: Deliveries in flight at once per channel: a slow hotline never takes every slot, and each
#: hotline's connections stay few enough to be kept alive (the webhook client keeps 100).
PER_CHANNEL = 16
#: Outbox rows and due dispatches claimed per pass; a full pass is followed by another at
#: once (a backlog drains at the adapters' pace, not one batch per sweep).
CLAIM_BATCH = 100
#: Claimed deliveries held at most (in flight or waiting for their channel's slot): more would
#: wait past their lease, and another dispatcher would take them again.
MAX_HELD = 400


def default_adapters() -> dict[str, Adapter]:
    """One adapter per channel kind: the webhook one (pooled httpx client) and SIA DC-09."""
    from eldercare.alerts.dispatch.sia_adapter import SiaAdapter
    from eldercare.alerts.dispatch.webhook import WebhookAdapter

    webhook = WebhookAdapter()
    adapters: dict[str, Adapter] = {kind: webhook for kind in WEBHOOK_KINDS}
    adapters["sia_dc09"] = SiaAdapter()
    return adapters


class Dispatcher:
    """Delivers dispatches until stopped; any number may run at once against one store."""

    def __init__(
        self,
        conninfo: str,
        channels: Channels,
        rules: RuleSet,
        *,
        ack_base_url: str,
        name: str = "dispatcher",
        adapters: Mapping[str, Adapter] | None = None,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.conninfo = conninfo
        self.channels = channels
        self.rules = rules
        self.ack_base_url = ack_base_url.rstrip("/")
        self.name = name
        self.adapters = dict(adapters) if adapters is not None else default_adapters()
        self.clock = clock
        self.rng = rng or random.Random()
        self.units = {m.name: m.unit for m in load_catalog().metrics.values()}
        longest = max((c.timeout_s for c in channels.by_name.values()), default=5.0)
        self.lease = timedelta(seconds=3 * longest + LEASE_MARGIN_S)
        self.pool = ConnectionPool(conninfo, min_size=2, max_size=4, open=False, name="dispatcher")
        self._tasks: set[asyncio.Task[None]] = set()
        self._slots: dict[str, asyncio.Semaphore] = defaultdict(lambda: asyncio.Semaphore(PER_CHANNEL))
        self.routing = Routing(rules.routes, frozenset(channels.by_name), channels.notify_only)
        # Route steps' deadlines are durable timers: any dispatcher alive escalates them.
        self.timers = TimerRunner(
            conninfo,
            {store.ESCALATION_TIMER: self._escalate_at_deadline},
            clock,
            max_sleep=SWEEP_S,  # a deadline is looked for every second, as dispatches are
            name=f"{name}-escalation",
        )

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), UTC)

    # ---- the loop -------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Deliver until ``stop`` is set; then let the deliveries in flight finish."""
        self.pool.open(wait=True, timeout=30)
        listener = await psycopg.AsyncConnection.connect(self.conninfo, autocommit=True)
        try:
            await listener.execute(f"LISTEN {OUTBOX_CHANNEL}")
            await listener.execute(f"LISTEN {store.DISPATCH_CHANNEL}")
            log.info(
                "dispatcher started",
                extra={"dispatcher": self.name, "channels": sorted(self.channels.by_name)},
            )
            self._say_unconfigured()
            self.timers.start()
            while not stop.is_set():
                if len(self._tasks) >= MAX_HELD:
                    await asyncio.wait(set(self._tasks), timeout=SWEEP_S, return_when=asyncio.FIRST_COMPLETED)
                    continue
                if await self.run_once() < CLAIM_BATCH:
                    await self._wait(listener, stop)
        finally:
            self.timers.stop()
            await listener.close()
            if self._tasks:
                await asyncio.wait(self._tasks, timeout=30)
            for adapter in {id(a): a for a in self.adapters.values()}.values():
                await adapter.aclose()
            self.pool.close()
            log.info("dispatcher stopped", extra={"dispatcher": self.name})

    async def _wait(self, listener: psycopg.AsyncConnection[Any], stop: asyncio.Event) -> None:
        """Until a NOTIFY, the next due dispatch, the sweep or ``stop``, whichever is first."""
        due = await asyncio.to_thread(self._next_due)
        timeout = SWEEP_S
        if due is not None:
            timeout = min(timeout, max(0.0, (due - self.now()).total_seconds()))
        if timeout <= 0:
            return
        notified = asyncio.ensure_future(_first_notify(listener, timeout))
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait({notified, stopped}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if not notified.done():
            notified.cancel()
            # A cancelled notifies() generator leaves the connection usable for the next wait.
            await asyncio.gather(notified, return_exceptions=True)

    async def run_once(self) -> int:
        """One pass: new outbox rows and due dispatches, each delivery started; how many rows
        it took (``CLAIM_BATCH`` or more: there may be more waiting)."""
        claimed, taken = await asyncio.to_thread(self._claim)
        if not claimed:
            return taken
        docs = await asyncio.to_thread(self._documents, {c.alert_id for c in claimed})
        for c in claimed:
            task = asyncio.create_task(self._deliver(c, docs.get(c.alert_id)))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return taken

    async def idle(self) -> None:
        """Wait until every delivery started has recorded its outcome (for tests and stop)."""
        while self._tasks:
            await asyncio.wait(set(self._tasks))

    # ---- in worker threads: the store ---------------------------------------------------

    def _say_unconfigured(self) -> None:
        """Once at start: each route step's channel that this deployment does not configure."""
        for name, route in self.rules.routes.items():
            for step in range(len(route.steps)):
                for channel in unconfigured(route, step, self.routing.configured):
                    log.warning(
                        "route step names a channel not configured",
                        extra={"route": name, "step": step + 1, "channel": channel},
                    )

    def _claim(self) -> tuple[list[store.Claimed], int]:
        """Leased dispatches to deliver now, and the most rows one of the two claims took."""
        now = self.now()
        with self.pool.connection() as conn:
            fresh, empty, taken = store.take_outbox(conn, self.routing, now, self.lease, CLAIM_BATCH)
            if empty:
                log.warning("alerts reached no configured channel", extra={"outbox_ids": empty})
            due = store.claim_due(conn, now, self.lease, CLAIM_BATCH)
            return fresh + due, max(taken, len(due))

    def _documents(self, alert_ids: set[UUID]) -> dict[UUID, dict[str, Any]]:
        with self.pool.connection() as conn:
            return store.documents(conn, sorted(alert_ids, key=str), self.units)

    def _next_due(self) -> datetime | None:
        with self.pool.connection() as conn:
            return store.next_due(conn)

    def _record(self, claimed: store.Claimed, started: datetime, outcome: Outcome) -> bool:
        now = self.now()
        decision = after_attempt(outcome, claimed.attempt, now, self.rng)
        with self.pool.connection() as conn:
            moved = store.record_outcome(conn, claimed, started, outcome, decision, now, self.name)
            if moved and decision.escalate_now and claimed.notice is None:
                with conn.transaction(), conn.cursor() as cur:
                    to = store.escalate(cur, claimed.alert_id, self.routing, now)
                if to is not None:
                    log.warning("alert escalated", extra={"alert_id": str(claimed.alert_id), "step": to + 1})
        fields = {
            "dispatch_id": str(claimed.id),
            "channel": claimed.channel,
            "attempt": claimed.attempt,
            "outcome": decision.next.value,
            "latency_ms": round(outcome.latency_s * 1000, 1),
        }
        if decision.next is Next.delivered:
            log.info("dispatch delivered", extra=fields)
        else:
            retry_in = None
            if decision.next_attempt_at is not None:
                retry_in = round((decision.next_attempt_at - now).total_seconds(), 2)
            log.warning(
                "dispatch not delivered",
                extra={**fields, "reason": getattr(outcome, "reason", None), "retry_in_s": retry_in},
            )
        return moved

    def _escalate_at_deadline(self, cur: psycopg.Cursor[Any], timer: Timer, now: datetime) -> None:
        """A route step's deadline came (in the timer's transaction): escalate if nobody acked."""
        alert_id = UUID(timer.payload["alert_id"])
        step = int(timer.payload["step"])
        deadline_of = (int(timer.payload["outbox_id"]), step)
        to = store.escalate(cur, alert_id, self.routing, now, deadline_of=deadline_of)
        if to is not None:
            log.warning(
                "alert escalated", extra={"alert_id": str(alert_id), "step": to + 1, "why": "deadline"}
            )

    # ---- delivering -------------------------------------------------------------------------

    async def _deliver(self, claimed: store.Claimed, document: dict[str, Any] | None) -> None:
        async with self._slots[claimed.channel]:
            started = self.now()
            outcome = await self._send(claimed, document)
            try:
                await asyncio.to_thread(self._record, claimed, started, outcome)
            except psycopg.Error:
                # The lease runs out and the dispatch is claimed again: at-least-once.
                log.exception("dispatch outcome not recorded", extra={"dispatch_id": str(claimed.id)})

    async def _send(self, claimed: store.Claimed, document: dict[str, Any] | None) -> Outcome:
        channel = self.channels.by_name.get(claimed.channel)
        if channel is None or document is None:
            return Retryable("channel or alert not found here")
        adapter = self.adapters.get(channel.kind)
        if adapter is None:
            return Retryable(f"no adapter for {channel.kind}")
        dispatch_id = str(claimed.id)
        if claimed.notice is not None:
            # Nothing to act on, nothing to acknowledge: which dispatch, and that it is over.
            full: dict[str, Any] = {
                "dispatch_id": dispatch_id,
                "notice": claimed.notice,
                "superseded_dispatch_id": str(claimed.notice_of),
                "alert": {"id": str(claimed.alert_id), "rule": document["alert"]["rule"]},
            }
        else:
            full = {
                **document,
                "dispatch_id": dispatch_id,
                "ack_url": f"{self.ack_base_url}/api/v1/dispatches/{dispatch_id}/ack",
            }
        attempt = Attempt(dispatch_id, claimed.attempt, channel, full, int(self.clock()))
        try:
            return await adapter.send(attempt)
        except Exception as exc:  # an adapter bug must not kill the loop: retried, and logged
            log.exception("adapter failed", extra={"dispatch_id": dispatch_id, "channel": channel.name})
            return Retryable(f"adapter error: {type(exc).__name__}")


async def _first_notify(conn: psycopg.AsyncConnection[Any], timeout: float) -> None:
    async for _ in conn.notifies(timeout=timeout, stop_after=1):
        return


__all__ = ["Dispatcher", "default_adapters"]

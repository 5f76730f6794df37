"""The timer runner: fires due durable timers by calling their kind's handler, on any instance.

    runner = TimerRunner(settings.database_url, {"fall_no_recovery": on_fall_timeout})
    runner.start()        # a thread; or runner.run() in the calling thread
    ...
    runner.stop()

A handler is called as ``handler(cur, timer, now)`` inside the transaction that claimed the
timer, in a savepoint of its own, with the timer already marked fired (so it may schedule
the same (kind, key) again: the next retry). Its writes commit together with the timer's
``fired_at``; if it raises, its writes and the mark are rolled back to the savepoint, the
failure is recorded on the timer (one more attempt, the error, no retry before a backoff)
and the timer stays pending. A savepoint rather than a second transaction: the failure is
recorded while this runner still holds the row, so no other runner can take the timer again
before its backoff, and the batch's other timers are not rolled back with it.
A handler only writes through ``cur`` (an alert, an outbox row); anything that leaves the
database (an HTTP call) belongs behind an outbox, since a runner that dies after such a
call but before its commit leaves the timer to be fired again by another runner.

The loop LISTENs on ``eldercare_timers``, sleeps until the earliest due time of its kinds or
a notification (never longer than ``MAX_SLEEP``, the safety sweep), claims due timers in
small batches with ``FOR UPDATE SKIP LOCKED`` and runs their handlers. Any number of runners
(threads, processes, machines) share the table: a timer fires exactly once, whichever runner
is alive. A database outage is one log line; the runner reconnects and fires what became due
meanwhile, late, with the lateness logged.

Timers of a kind this runner has no handler for stay pending (another runner may handle
them); one overdue by more than ``unhandled_after`` is logged once per kind.
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Self

import psycopg
from psycopg.conninfo import conninfo_to_dict

from eldercare.gateway.store import timers as store
from eldercare.gateway.store.timers import Timer

log = logging.getLogger(__name__)

#: ``handler(cur, timer, now)``: do what the timer is for, writing through ``cur`` only.
Handler = Callable[[psycopg.Cursor[Any], Timer, datetime], None]

#: Wait before claiming again when due timers were skipped: another transaction holds their
#: rows (a runner firing them, a rule cancelling them). Short: if that runner just died, the
#: timer is ours to fire at once.
HELD_RETRY_S = 0.05
#: Pause between attempts to reach the database during an outage.
RECONNECT_EVERY_S = 0.5
#: A claiming transaction idle this long (a hung handler) is ended by the server.
IDLE_IN_TRANSACTION_S = 30
#: Longest stored error text of a failed try.
ERROR_TEXT_MAX = 2000


def retry_delay(attempts: int) -> float:
    """Seconds before the next try of a timer whose handler failed ``attempts`` times: 1, 2, 4 .. 60."""
    return float(min(60, 2 ** max(0, attempts - 1)))


def wait_seconds(
    now: datetime,
    claimed_up_to: datetime,
    next_due: datetime | None,
    max_sleep: float,
    held_retry: float = HELD_RETRY_S,
) -> float:
    """How long a runner waits before its next claim.

    ``claimed_up_to`` is the ``now`` of the last claim, ``next_due`` the earliest pending
    timer's ``run_at`` read after it. Nothing pending: a sweep away. Due later: until then,
    at most a sweep. Due since the last claim: no wait. Due by the last claim yet still
    pending: another transaction held it, so a short wait before trying again.
    """
    if next_due is None:
        return max_sleep
    if next_due > now:
        return min((next_due - now).total_seconds(), max_sleep)
    if next_due > claimed_up_to:
        return 0.0
    return min(held_retry, max_sleep)


class TimerRunner:
    """Fires due timers of the kinds in ``handlers``; see the module docstring."""

    def __init__(
        self,
        conninfo: str,
        handlers: Mapping[str, Handler],
        clock: Callable[[], float] = time.time,
        *,
        batch: int = 10,
        max_sleep: float = store.MAX_SLEEP.total_seconds(),
        retry_delay: Callable[[int], float] = retry_delay,
        late_after: float = 1.0,
        unhandled_after: float = 30.0,
        name: str = "timers",
    ) -> None:
        if not handlers:
            raise ValueError("a timer runner needs at least one handler")
        if not 0 < max_sleep <= store.MAX_SLEEP.total_seconds():
            # Longer, and a timer scheduled without an announcement could be found too late.
            raise ValueError(f"max_sleep must be in (0, {store.MAX_SLEEP.total_seconds():g}] s")
        self.conninfo = conninfo
        self.handlers = dict(handlers)
        self.clock = clock
        self.batch = batch
        self.max_sleep = max_sleep
        self.retry_delay = retry_delay
        self.late_after = late_after
        self.unhandled_after = unhandled_after
        self.name = name
        self._kinds = sorted(self.handlers)
        self._stopping = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._listen: psycopg.Connection[Any] | None = None
        self._work: psycopg.Connection[Any] | None = None
        self._thread: threading.Thread | None = None
        self._down_since: float | None = None
        self._unhandled_seen: set[str] = set()
        self._unhandled_checked = 0.0

    # --- life cycle ---------------------------------------------------------------------

    def start(self) -> Self:
        """Run the loop in a thread of its own."""
        self._thread = threading.Thread(target=self.run, name=f"timer-runner-{self.name}", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop after the batch in hand (its transaction commits or rolls back whole)."""
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                log.warning("timer runner still busy in a handler at stop", extra={"runner": self.name})

    def run(self) -> None:
        """Fire timers until ``stop``; wait out database outages."""
        try:
            while not self._stopping.is_set():
                try:
                    self._connect()
                    self._serve()
                except psycopg.Error as exc:
                    self._close()
                    if not self._stopping.is_set():
                        self._database_lost(exc)
        except Exception:
            log.exception("timer runner failed", extra={"runner": self.name})
            raise
        finally:
            self._close()
            self._wake_r.close()
            self._wake_w.close()

    # --- the loop -----------------------------------------------------------------------

    def _connect(self) -> None:
        options: dict[str, Any] = {
            "autocommit": True,
            "connect_timeout": 5,
            "application_name": f"eldercare-timers-{self.name}",
            # A peer that vanishes without a reset (lost host, cut cable) is noticed in ~25 s,
            # here and by the server, which then ends the session and frees its row locks.
            "keepalives": 1,
            "keepalives_idle": 10,
            "keepalives_interval": 5,
            "keepalives_count": 3,
            "options": " ".join(
                (
                    str(conninfo_to_dict(self.conninfo).get("options") or ""),
                    "-c tcp_keepalives_idle=10 -c tcp_keepalives_interval=5 -c tcp_keepalives_count=3",
                    # A handler hung this long loses its transaction, and its timers, to another runner.
                    f"-c idle_in_transaction_session_timeout={IDLE_IN_TRANSACTION_S}s",
                )
            ).strip(),
        }
        self._listen = psycopg.connect(self.conninfo, **options)
        self._listen.execute(f"LISTEN {store.CHANNEL}")
        # Claims start only after LISTEN: a timer announced from now on wakes us.
        self._work = psycopg.connect(self.conninfo, **options)
        if self._down_since is not None:
            log.info(
                "timer runner reached the database again",
                extra={"runner": self.name, "down_s": round(time.monotonic() - self._down_since, 1)},
            )
            self._down_since = None

    def _serve(self) -> None:
        assert self._listen is not None and self._work is not None
        with selectors.DefaultSelector() as selector:
            selector.register(self._listen.fileno(), selectors.EVENT_READ, "listen")
            selector.register(self._wake_r, selectors.EVENT_READ, "wake")
            while not self._stopping.is_set():
                claimed, claimed_up_to = self._fire_batch()
                if claimed == self.batch:
                    continue  # a full batch: more may be due already
                next_due = store.next_due(self._work, self._kinds)
                now = self._now()
                self._report_unhandled(now)
                self._wait(selector, wait_seconds(now, claimed_up_to, next_due, self.max_sleep))

    def _fire_batch(self) -> tuple[int, datetime]:
        """Claim up to a batch of due timers, run their handlers, commit; (claimed, claim time)."""
        assert self._work is not None
        conn = self._work
        now = self._now()
        fired: list[Timer] = []
        failed: list[tuple[Timer, BaseException, float]] = []
        with conn.transaction(), conn.cursor() as cur:
            claimed = store.claim_due(cur, now, self.batch, self._kinds)
            for timer in claimed:
                try:
                    # A savepoint: a failed handler's writes, and the mark, go alone. Marked
                    # first, so a handler may schedule its own (kind, key) again (a retry).
                    with conn.transaction():
                        store.mark_fired(cur, [timer.id], now)
                        self.handlers[timer.kind](cur, timer, now)
                except Exception as exc:
                    if conn.broken:
                        raise psycopg.OperationalError("connection lost in a timer handler") from exc
                    delay = self.retry_delay(timer.attempts + 1)
                    text = f"{type(exc).__name__}: {exc}"[:ERROR_TEXT_MAX]
                    store.mark_failed(cur, timer.id, text, now + timedelta(seconds=delay))
                    failed.append((timer, exc, delay))
                else:
                    fired.append(timer)
        self._log_batch(now, fired, failed)
        return len(claimed), now

    def _wait(self, selector: selectors.BaseSelector, timeout: float) -> None:
        """Sleep up to ``timeout`` s; return early on an announcement of our kinds, or on stop."""
        assert self._listen is not None
        deadline = time.monotonic() + timeout
        while not self._stopping.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            for key, _ in selector.select(remaining):
                if key.data == "wake":
                    with contextlib.suppress(BlockingIOError):
                        self._wake_r.recv(64)
                    return
                # Readable: announcements, or the server going away (then this raises).
                kinds = {n.payload for n in self._listen.notifies(timeout=0)}
                if not kinds.isdisjoint(self.handlers):
                    return

    # --- reporting ----------------------------------------------------------------------

    def _log_batch(
        self, now: datetime, fired: Sequence[Timer], failed: Sequence[tuple[Timer, BaseException, float]]
    ) -> None:
        for timer, exc, delay in failed:
            # The error's text may carry personal data: it is stored on the timer, not logged.
            log.warning(
                "timer handler failed; the timer stays pending",
                extra={
                    "runner": self.name,
                    "timer_id": timer.id,
                    "kind": timer.kind,
                    "attempts": timer.attempts + 1,
                    "error": type(exc).__name__,
                    "retry_in_s": delay,
                },
            )
        late = [(now - t.due_at).total_seconds() for t in fired if t.attempts == 0]
        late = [s for s in late if s > self.late_after]
        if late:
            log.warning(
                "timers fired late",
                extra={
                    "runner": self.name,
                    "count": len(late),
                    "max_late_s": round(max(late), 3),
                    "kinds": sorted({t.kind for t in fired}),
                },
            )

    def _report_unhandled(self, now: datetime) -> None:
        """Log once per kind a timer overdue by ``unhandled_after`` that no handler here can fire."""
        if time.monotonic() - self._unhandled_checked < self.max_sleep:
            return
        assert self._work is not None
        self._unhandled_checked = time.monotonic()
        before = now - timedelta(seconds=self.unhandled_after)
        for kind in store.overdue_kinds(self._work, before, self._kinds):
            if kind not in self._unhandled_seen:
                self._unhandled_seen.add(kind)
                log.warning(
                    "overdue timers of a kind this runner has no handler for; left pending",
                    extra={"runner": self.name, "kind": kind},
                )

    def _database_lost(self, exc: psycopg.Error) -> None:
        """One line for the outage, then try to reconnect every RECONNECT_EVERY_S until stop."""
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.warning(
                "timer runner cannot reach the database; waiting for it",
                extra={"runner": self.name, "error": type(exc).__name__},
            )
        self._stopping.wait(RECONNECT_EVERY_S)

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), UTC)

    def _close(self) -> None:
        for conn in (self._work, self._listen):
            if conn is not None:
                with contextlib.suppress(psycopg.Error):
                    conn.close()
        self._work = self._listen = None

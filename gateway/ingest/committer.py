"""The committer: the ingest worker's second process, which interprets, batches and commits.

The receiving process (``worker.py``) spends its core on paho; everything after the socket
happens here, on the other core, so the two never queue for one interpreter lock. Messages
arrive over a pipe in small bundles; each committed batch goes back as the list of MQTT
packet ids to acknowledge, with the figures for the metrics. Nothing is acknowledged that
has not committed: if this process dies, the receiver acks nothing more, and the broker
redelivers to the next session (dedup drops what had committed).

Two batches may be in the database at once, each on its own connection: while PostgreSQL
works on one, this process builds the next (on a loaded machine that is up to 1.5x the
rate of one at a time). Reports still leave in batch order, so acknowledgements stay in
arrival order and a batch is never acked before an earlier one commits. Only plain batches
overlap (unflagged readings only: no rejection, status or event, and a batch step that allows
it): any other batch waits until every earlier batch is reported,
so per-device budgets, status order and the rules see batches one at a time as before.

The emergency lane: a message that must not wait (an event, a reading in the catalog's
emergency band: one that alone raises an emergency) ends the
batch being gathered *before* it and goes in a batch of its own. A batch of plain events
(no rejection, status or flag) may then be written beside the plain reading batches in
flight instead of after them: the rules read events for event rules and readings for
threshold rules, never one for the other, and lock each elder while deciding, so the order
between a reading batch and an event batch does not change any decision. Two event batches
never overlap (a recovery must be decided after its fall). Its report still waits its turn.

The events lane: the receiver takes events over an MQTT session of their own (``worker.py``),
so an SOS never waits in the broker behind a telemetry backlog, and they arrive here in a
queue of their own, which is always looked at first: before a batch is started, while one
is gathered (an event waiting ends the gathering), while a reading batch waits for a slot
and while a serial one waits for its turn (a plain event batch is then written ahead of
it). A batch holds messages of one lane, acknowledged by the client that received them; the
events queue is first in, first out, and two event batches never overlap, so an elder's
events are still decided in the order the device sent them. Reports keep one order, by
batch: an event batch's report may wait for earlier reading batches, which delays its
acknowledgement, not its commit.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import pickle
import queue
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Final, Literal

import psycopg
from psycopg_pool import PoolTimeout

from eldercare.devices.catalog import load_catalog
from eldercare.devices.interpret import Policy, interpret
from eldercare.devices.records import NOT_ATTACHED_TO_HUB, UNKNOWN_DEVICE
from eldercare.gateway.ingest.alerting import batch_step
from eldercare.gateway.settings import Settings
from eldercare.gateway.store.devices import RegistryFeed
from eldercare.gateway.store.flavour import Flavour
from eldercare.gateway.store.migrate import pending as pending_migrations
from eldercare.gateway.store.migrate import store_flavour as recorded_flavour
from eldercare.gateway.store.store import Store
from eldercare.gateway.store.writer import BatchResult, BatchStep, BatchWriter, Received

log = logging.getLogger(__name__)

STATS_EVERY_S = 30.0
#: Publish-to-commit lag is sampled for one message in this many.
LAG_SAMPLE = 4
#: Reading batches in the database at once (each on its own pooled connection) ...
PIPELINE_DEPTH = 2
#: ... and beside them, at most one event batch (the emergency lane).
CONNECTIONS = PIPELINE_DEPTH + 1
#: Kinds of batch: written alone after every earlier one, or beside others.
SERIAL, READINGS, EVENTS = "serial", "readings", "events"
#: Rejections that a registration made a moment ago could turn into acceptance.
REGISTRY_REASONS = frozenset({UNKNOWN_DEVICE, NOT_ATTACHED_TO_HUB})

#: Which of the receiver's two MQTT sessions a message came over: events have one of their own.
Lane = Literal["main", "events"]
MAIN_LANE: Final = "main"
EVENT_LANE: Final = "events"
#: One received MQTT message as it crosses the pipe:
#: (topic, payload, received_at, packet id, qos, connection generation, retained, lane).
Wire = tuple[str, bytes, float, int, int, int, bool, Lane]
#: The last bundle the receiver sends: commit what you hold, answer DONE, exit.
DRAIN = None
DONE = "done"


@dataclass(slots=True)
class CommitReport:
    """What one committed batch tells the receiver: what to ack, and figures for metrics."""

    lane: Lane  # the session whose client acks them: a batch holds messages of one lane
    acks: list[tuple[int, int, int]]  # (packet id, qos, generation)
    result: BatchResult
    payload_bytes: int  # of all the batch's messages: the receiver's in-flight byte count
    commit_seconds: float
    lags: list[float] = field(default_factory=list)
    failures: int = 0


def store_flavour(conninfo: str) -> Flavour:
    """'timescale' or 'plain', as recorded by the migrations; raise if not migrated, or if a
    migration of this version of the gateway is missing (the batch step would fail on every
    batch and turn it into dead letters: refuse to start instead)."""
    with psycopg.connect(conninfo) as conn:
        flavour = recorded_flavour(conn)
        missing = pending_migrations(conn) if flavour is not None else []
    if flavour is None:
        raise RuntimeError("the store is not migrated: run `eldercare migrate` first")
    if missing:
        raise RuntimeError(
            f"the store lacks {len(missing)} migration(s) of this version ({', '.join(missing)}):"
            " run `eldercare migrate` first"
        )
    return flavour


class Committer:
    """Interprets what arrives from the receiver, commits it in batches, reports acks."""

    def __init__(
        self,
        settings: Settings,
        inbound: Connection,
        outbound: Connection,
        step: BatchStep | None = None,
        clock: Callable[[], float] = time.time,
        flavour: Flavour | None = None,
    ) -> None:
        self.settings = settings
        self.inbound = inbound
        self.outbound = outbound
        self.clock = clock
        self.policy = Policy(catalog=load_catalog(), horizon_s=settings.buffer_horizon_days * 86_400.0)
        # What the main session delivered (None is DRAIN), and what the events session did.
        self.queue: queue.SimpleQueue[Received | None] = queue.SimpleQueue()
        self.events: queue.SimpleQueue[Received] = queue.SimpleQueue()
        self._inbound = threading.Event()  # set by the reader after each bundle
        # The writer's connections, one per batch in flight, opened at start; the registry
        # feed keeps its own (LISTEN needs one for good).
        self.store = Store.known(
            settings.database_url,
            flavour or store_flavour(settings.database_url),
            min_size=CONNECTIONS,
            max_size=CONNECTIONS,
            name="ingest-writer",
        )
        self.writer = BatchWriter(
            self.store.flavour,
            step,
            dead_letter_budget=settings.dead_letter_budget_kib * 1024,
        )
        self.feed = RegistryFeed(settings.database_url)
        self._draining = False
        self._receiver_gone = threading.Event()
        self._totals = BatchResult()
        # A step keeping state between batches must see them one at a time.
        self._overlap = getattr(step, "concurrent_batches", step is None)
        self._writers = ThreadPoolExecutor(CONNECTIONS, thread_name_prefix="committer-write")
        self._slots = threading.Semaphore(PIPELINE_DEPTH)
        self._turn = threading.Condition()  # guards the three below and the outbound pipe
        self._submitted = 0  # batches handed out (main thread)
        self._reported = 0  # batches reported, in order
        self._failed = False  # a batch gave up: nothing after it may be reported
        self._outage = False  # one warning per database outage, whichever writer sees it
        self._events_in_flight = 0  # event batches being written (at most one)
        # Messages taken off the queue ahead of the next batch (the urgent one that ended the
        # last batch, or what the emergency lane swept past), oldest first; None is DRAIN.
        self._pending: deque[Received | None] = deque()
        # The same for the events queue (a serial batch the overtaking left for the main loop).
        self._pending_events: deque[Received] = deque()
        # Batches cut off by the emergency lane, with the sequence numbers they were given.
        self._deferred: deque[tuple[list[Received], int]] = deque()

    def run(self) -> None:
        """Commit until the receiver says DRAIN (then answer DONE) or goes away."""
        self.feed.start()
        threading.Thread(target=self._read, name="committer-inbound", daemon=True).start()
        log.info("committer started", extra={"flavour": self.writer.flavour})
        last_stats = time.monotonic()
        try:
            while not self._receiver_gone.is_set():
                if not self._submit_deferred():
                    break
                batch, lane, last = self._next_batch()
                if batch and not self._submit(batch, lane):
                    break
                if last:
                    if self._submit_deferred() and self._wait_reported():
                        self.outbound.send_bytes(pickle.dumps(DONE))
                    break
                if time.monotonic() - last_stats >= STATS_EVERY_S:
                    self._log_stats()
                    last_stats = time.monotonic()
        finally:
            self._writers.shutdown(wait=True)
            self.feed.stop()
            self.store.close()
            self._log_stats()

    # ---- inbound: bundles from the receiver, interpreted here ---------------------------

    def _read(self) -> None:
        policy, put, put_event, wake = self.policy, self.queue.put, self.events.put, self._inbound.set
        try:
            while True:
                bundle: list[Wire] | None = pickle.loads(self.inbound.recv_bytes())
                if bundle is DRAIN:
                    self._draining = True
                    put(None)
                    wake()
                    return
                registry = self.feed.current
                for topic, payload, received_at, mid, qos, generation, retained, lane in bundle:
                    interp = interpret(topic, payload, received_at, registry, policy, retained)
                    item = Received(topic, payload, received_at, interp, mid, qos, generation, retained)
                    (put_event if lane == EVENT_LANE else put)(item)
                wake()
        except (EOFError, OSError):
            log.warning("the receiving process went away; stopping")
            self._receiver_gone.set()
            put(None)
            wake()

    def _next_batch(self) -> tuple[list[Received], Lane, bool]:
        """The next batch and its lane: events first, else up to batch_size main messages
        within the max delay (an emergency, or an event waiting, ends the wait).

        The flag is true when the receiver's DRAIN was reached: nothing more will come.
        """
        s = self.settings
        if not self._wait_for_inbound(0.2):
            return [], MAIN_LANE, False
        if self._events_waiting():
            return self._event_batch(), EVENT_LANE, False
        # What was taken off the queue ahead of this batch comes first. Not empty: only this
        # thread takes from the queue, and it was not empty a moment ago.
        first = self._pending.popleft() if self._pending else self.queue.get_nowait()
        if first is None:
            if not self._events_waiting():
                return [], MAIN_LANE, True
            self._pending.appendleft(None)  # the events queued before DRAIN are committed first
            return self._event_batch(), EVENT_LANE, False
        batch = [first]
        deadline = time.monotonic() + s.batch_max_delay_ms / 1000
        urgent = first.interp.immediate
        while not urgent and len(batch) < s.batch_size:
            with contextlib.suppress(queue.Empty):  # took all there was
                while len(batch) < s.batch_size:
                    item = self._pending.popleft() if self._pending else self.queue.get_nowait()
                    if item is None or item.interp.immediate:
                        # The emergency lane: what came before goes now, the urgent one next,
                        # in a batch of its own that need not wait behind reading batches.
                        # (DRAIN, next too: the events queued before it go first.)
                        self._pending.appendleft(item)
                        return batch, MAIN_LANE, False
                    batch.append(item)
            remaining = deadline - time.monotonic()
            if len(batch) >= s.batch_size or remaining <= 0 or self._events_waiting():
                break
            # Napping and then taking everything queued costs less CPU than waking per message.
            time.sleep(min(0.002, remaining))
        return batch, MAIN_LANE, False

    def _wait_for_inbound(self, timeout: float) -> bool:
        """Wait until a message is queued on either lane (or DRAIN); False after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            self._inbound.clear()  # before looking, so a bundle put right after still wakes us
            if self._pending or self._events_waiting() or not self.queue.empty():
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._inbound.wait(remaining):
                return False

    def _events_waiting(self) -> bool:
        return bool(self._pending_events) or not self.events.empty()

    def _take_event(self) -> Received | None:
        if self._pending_events:
            return self._pending_events.popleft()
        try:
            return self.events.get_nowait()
        except queue.Empty:
            return None

    def _event_batch(self) -> list[Received]:
        """The next batch of the events lane, from what is queued now (no waiting): an urgent
        event alone (as on the emergency lane), or the others (refused ones) up to the next."""
        batch: list[Received] = []
        while len(batch) < self.settings.batch_size and (item := self._take_event()) is not None:
            if item.interp.immediate:
                if batch:
                    self._pending_events.appendleft(item)
                else:
                    batch.append(item)
                break
            batch.append(item)
        return batch

    # ---- committing ---------------------------------------------------------------------

    def _kind(self, batch: list[Received]) -> str:
        """'readings' or 'events' for a plain batch that may overlap others, else 'serial'."""
        if not self._overlap:
            return SERIAL
        readings = events = False
        for item in batch:
            it = item.interp
            # Flagged readings go in a second COPY: two marks statements could deadlock.
            if it.rejections or it.statuses or any(r.flags for r in it.readings):
                return SERIAL
            if any(e.flags for e in it.events):
                return SERIAL
            readings = readings or bool(it.readings)
            events = events or bool(it.events)
        if readings and events:
            return SERIAL
        return EVENTS if events else READINGS

    def _submit_deferred(self) -> bool:
        """Submit the batches the emergency lane cut off, in their order; False once one gave up."""
        while self._deferred:
            batch, seq = self._deferred.popleft()
            if not self._submit(batch, MAIN_LANE, seq):
                return False
        return True

    def _reserve(self) -> int:
        seq = self._submitted
        self._submitted += 1
        return seq

    def _overtake(self) -> None:
        """While a reading batch waits for a slot: a plain event batch of the events lane, or an
        urgent plain event already queued on the main lane, is written now, ahead of what came
        between on that lane (which keeps its place in the acknowledgement order)."""
        if self._events_in_flight:
            return  # one event batch at a time; it will be found by the next batch instead
        if self._overtake_events():
            return
        with contextlib.suppress(queue.Empty):
            while len(self._pending) < 2 * self.settings.batch_size:
                item = self.queue.get_nowait()
                self._pending.append(item)
                if item is None:
                    break
        for i, item in enumerate(self._pending):
            if item is None:
                return
            if item.interp.immediate:
                if self._kind([item]) != EVENTS:
                    return
                before: list[Received] = [m for m in (self._pending.popleft() for _ in range(i)) if m]
                self._pending.popleft()
                size = self.settings.batch_size
                for start in range(0, len(before), size):  # they arrived first: lower numbers
                    self._deferred.append((before[start : start + size], self._reserve()))
                self._submit([item], MAIN_LANE, self._reserve())
                return

    def _overtake_events(self) -> bool:
        """Submit the events lane's next batch if it is a plain one and none is in flight.

        It never waits: with no event batch in flight, an event batch takes no slot. A serial
        one stays at the head of its queue for the main loop (its lane keeps its order).
        """
        if self._events_in_flight or not self._events_waiting():
            return False
        batch = self._event_batch()
        if self._kind(batch) != EVENTS:
            self._pending_events.extendleft(reversed(batch))
            return False
        return self._submit(batch, EVENT_LANE)

    def _submit(self, batch: list[Received], lane: Lane, seq: int | None = None) -> bool:
        """Write the batch beside the one in flight, or alone after it; False once one gave up.

        ``seq``: the batch's place in the acknowledgement order, if the emergency lane gave it
        one already (default: the next).
        """
        if seq is None:
            seq = self._reserve()
        kind = self._kind(batch)
        if kind == SERIAL:
            return self._wait_alone(seq, lane) and self._commit(batch, seq, lane)
        if kind == EVENTS:
            with self._turn:  # never beside another event batch; no reading batch's slot
                while self._events_in_flight and not self._failed:
                    self._turn.wait(0.5)
                if self._failed:
                    return False
                self._events_in_flight += 1
        else:
            # Meanwhile the queue fills (the next batch is a full one), and an urgent event in
            # it is written at once instead of after a reading batch commits.
            while not self._slots.acquire(timeout=0.002):
                if self._failed:
                    return False
                self._overtake()
            if self._failed:
                self._slots.release()
                return False
        self._writers.submit(self._commit_released, batch, seq, lane, kind)
        return True

    def _wait_alone(self, seq: int, lane: Lane) -> bool:
        """For a serial batch: wait until every earlier batch is reported and no event batch is
        being written; False if one gave up.

        Meanwhile plain event batches of the events lane go ahead of a main-lane batch (not of
        an events-lane one: that lane keeps its order); it then waits for them to be written.
        """
        overtaking = lane == MAIN_LANE
        while True:
            with self._turn:
                if self._failed:
                    return False
                if self._reported >= seq and not self._events_in_flight:
                    return True
                self._turn.wait(0.002 if overtaking else 0.5)
            if overtaking:
                self._overtake_events()

    def _commit_released(self, batch: list[Received], seq: int, lane: Lane, kind: str = READINGS) -> None:
        gate = [kind == EVENTS]  # an event batch opens the gate once written, not once reported

        def written() -> None:
            if gate[0]:
                gate[0] = False
                with self._turn:
                    self._events_in_flight -= 1
                    self._turn.notify_all()

        try:
            self._commit(batch, seq, lane, written)
        except BaseException:
            log.exception("batch writer failed; stopping")
            self._give_up()
        finally:
            written()
            if kind != EVENTS:
                self._slots.release()

    def _wait_reported(self, upto: int | None = None) -> bool:
        """Wait until every batch before ``upto`` (default: all) is reported; False if one gave up."""
        upto = self._submitted if upto is None else upto
        with self._turn:
            while self._reported < upto and not self._failed:
                self._turn.wait(0.5)
            return not self._failed

    def _give_up(self) -> None:
        with self._turn:
            self._failed = True
            self._turn.notify_all()

    def _recheck_unknown(self, conn: psycopg.Connection, batch: list[Received]) -> None:
        """Re-interpret messages refused for a device the registry snapshot may lack yet."""
        suspects = [
            (i, {r.device_id for r in item.interp.rejections if r.reason in REGISTRY_REASONS and r.device_id})
            for i, item in enumerate(batch)
        ]
        suspects = [(i, ids) for i, ids in suspects if ids]
        if not suspects:
            return
        ids = set().union(*(ids for _, ids in suspects))
        with conn.transaction():
            if not self.feed.recheck(conn, ids, self.clock()):
                return
        registry = self.feed.current
        for i, _ in suspects:
            item = batch[i]
            item.interp = interpret(
                item.topic, item.payload, item.received_at, registry, self.policy, item.retained
            )

    def _commit(
        self, batch: list[Received], seq: int, lane: Lane, written: Callable[[], None] | None = None
    ) -> bool:
        """Write the batch (retrying until it commits), report it in turn; False if giving up.

        ``written`` is called once the batch has committed, before it waits for its turn to report.
        """
        delay, failures = 0.5, 0
        while True:
            started = time.perf_counter()
            try:
                with self.store.connection(timeout=10.0) as conn:
                    self._recheck_unknown(conn, batch)
                    result = self.writer.write(conn, batch)
                break
            except Exception as exc:  # connection trouble, or worse: retry, never ack early
                failures += 1
                if not isinstance(exc, psycopg.OperationalError | PoolTimeout):
                    log.exception("batch failed unexpectedly, retrying")
                # One warning per outage (not per retry, nor per writer); the recovery says
                # how long it took.
                with self._turn:
                    new_outage, self._outage = not self._outage, True
                log.log(
                    logging.WARNING if new_outage else logging.DEBUG,
                    "batch not committed, retrying until the database answers",
                    extra={
                        "error": str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
                        "messages": len(batch),
                    },
                )
                if self._receiver_gone.is_set() or self._draining or self._failed:
                    log.warning("stopping with uncommitted messages; the broker redelivers them")
                    self._give_up()
                    return False
                time.sleep(delay)
                delay = min(delay * 2, 10.0)
        committed = self.clock()
        if written is not None:
            written()
        if failures:
            with self._turn:
                recovered, self._outage = self._outage, False
            if recovered:
                log.info("batch committed again", extra={"failed_attempts": failures, "messages": len(batch)})
        lags = []
        # Every LAG_SAMPLE-th message, live data only (buffered uploads would swamp it).
        for item in batch[:: LAG_SAMPLE if len(batch) > LAG_SAMPLE else 1]:
            first = item.interp.readings[:1] or item.interp.events[:1]
            if first and not first[0].flags:
                lags.append(max(0.0, committed - first[0].time.timestamp()))
        report = CommitReport(
            lane=lane,
            acks=[(m.mid, m.qos, m.generation) for m in batch if m.qos],
            result=result,
            payload_bytes=sum(len(m.payload) for m in batch),
            commit_seconds=time.perf_counter() - started,
            lags=lags,
            failures=failures,
        )
        message = pickle.dumps(report, protocol=pickle.HIGHEST_PROTOCOL)
        with self._turn:  # in batch order: acks stay in arrival order
            while self._reported != seq and not self._failed:
                self._turn.wait(0.5)
            if self._failed:
                return False
            try:
                self.outbound.send_bytes(message)
            except OSError:
                self._receiver_gone.set()
                self._failed = True
                self._turn.notify_all()
                return False
            self._reported += 1
            self._turn.notify_all()
            self._totals.add(result)
        if result.rejected and log.isEnabledFor(logging.DEBUG):
            for item in batch:
                for rej in item.interp.rejections:
                    log.debug(
                        "rejected", extra={"reason": rej.reason, "topic": item.topic, "detail": rej.detail}
                    )
        return True

    def _log_stats(self) -> None:
        t = self._totals
        log.info(
            "ingest totals",
            extra={
                "messages": t.messages,
                "stored_messages": t.stored_messages,
                "datapoints": t.readings,
                "events": t.events,
                "duplicates": t.duplicates,
                "repeated_readings": t.repeated,
                "dead_letters_over_budget": t.unstored_dead_letters,
                "rejected": dict(t.rejected),
                "clock_skew": t.skewed,
                "pid": os.getpid(),
            },
        )


def child_process(settings_values: dict[str, Any]) -> Settings:
    """Set up a process the receiver spawned: die with it, leave signals to it, log alike."""
    with contextlib.suppress(OSError, AttributeError):  # Linux: die with the receiver, no orphan
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    # Ctrl-C and SIGTERM (systemd, docker and a terminal signal the whole process group) are
    # the receiver's to handle: it stops taking messages and sends DRAIN, and this process
    # commits what it holds before it exits. If the receiver dies, PDEATHSIG ends us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from eldercare.gateway.logs import configure_logging

    settings = Settings(**settings_values)
    configure_logging(settings.log_level, settings.log_format)
    return settings


def committer_main(
    settings_values: dict[str, Any], inbound: Connection, outbound: Connection, flavour: Flavour | None = None
) -> None:
    """Entry point of the committer process (spawned by the receiver)."""
    settings = child_process(settings_values)
    Committer(settings, inbound, outbound, step=batch_step(settings), flavour=flavour).run()

"""The committer: the ingest worker's second process, which interprets, batches and commits.

The receiving process (``worker.py``) spends its core on paho; everything after the socket
happens here, on the other core, so the two never queue for one interpreter lock. Messages
arrive over a pipe in small bundles; each committed batch goes back as the list of MQTT
packet ids to acknowledge, with the figures for the metrics. Nothing is acknowledged that
has not committed: if this process dies, the receiver acks nothing more, and the broker
redelivers to the next session (dedup drops what had committed).
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
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from eldercare.alerts.ruleset import NoRules, RuleSet, load_rules
from eldercare.devices.catalog import load_catalog
from eldercare.devices.interpret import Policy, interpret
from eldercare.devices.records import NOT_ATTACHED_TO_HUB, UNKNOWN_DEVICE
from eldercare.gateway.settings import Settings
from eldercare.gateway.store.devices import RegistryFeed
from eldercare.gateway.store.migrate import store_flavour as recorded_flavour
from eldercare.gateway.store.writer import BatchResult, BatchWriter, Received

log = logging.getLogger(__name__)

STATS_EVERY_S = 30.0
#: Publish-to-commit lag is sampled for one message in this many.
LAG_SAMPLE = 4
#: Rejections that a registration made a moment ago could turn into acceptance.
REGISTRY_REASONS = frozenset({UNKNOWN_DEVICE, NOT_ATTACHED_TO_HUB})

#: One received MQTT message as it crosses the pipe:
#: (topic, payload, received_at, packet id, qos, connection generation, retained).
Wire = tuple[str, bytes, float, int, int, int, bool]
#: The last bundle the receiver sends: commit what you hold, answer DONE, exit.
DRAIN = None
DONE = "done"


@dataclass(slots=True)
class CommitReport:
    """What one committed batch tells the receiver: what to ack, and figures for metrics."""

    acks: list[tuple[int, int, int]]  # (packet id, qos, generation)
    result: BatchResult
    payload_bytes: int  # of all the batch's messages: the receiver's in-flight byte count
    commit_seconds: float
    lags: list[float] = field(default_factory=list)
    failures: int = 0


def store_flavour(conninfo: str) -> str:
    """'timescale' or 'plain', as recorded by the migrations; raise if not migrated."""
    with psycopg.connect(conninfo) as conn:
        flavour = recorded_flavour(conn)
    if flavour is None:
        raise RuntimeError("the store is not migrated: run `eldercare migrate` first")
    return flavour


class Committer:
    """Interprets what arrives from the receiver, commits it in batches, reports acks."""

    def __init__(
        self,
        settings: Settings,
        inbound: Connection,
        outbound: Connection,
        rules: RuleSet | None = None,
        clock: Callable[[], float] = time.time,
        flavour: str | None = None,
    ) -> None:
        self.settings = settings
        self.inbound = inbound
        self.outbound = outbound
        self.clock = clock
        self.policy = Policy(catalog=load_catalog(), horizon_s=settings.buffer_horizon_days * 86_400.0)
        self.queue: queue.SimpleQueue[Received | None] = queue.SimpleQueue()
        self.writer = BatchWriter(
            flavour or store_flavour(settings.database_url),
            rules or NoRules(),
            dead_letter_budget=settings.dead_letter_budget_kib * 1024,
        )
        self.feed = RegistryFeed(settings.database_url)
        # The writer's connections; the registry feed keeps its own (LISTEN needs one for good).
        self.pool = ConnectionPool(
            settings.database_url, min_size=1, max_size=2, open=False, name="ingest-writer"
        )
        self._draining = False
        self._receiver_gone = threading.Event()
        self._totals = BatchResult()

    def run(self) -> None:
        """Commit until the receiver says DRAIN (then answer DONE) or goes away."""
        self.feed.start()
        self.pool.open(wait=False)
        threading.Thread(target=self._read, name="committer-inbound", daemon=True).start()
        log.info("committer started", extra={"flavour": self.writer.flavour})
        last_stats = time.monotonic()
        try:
            while not self._receiver_gone.is_set():
                batch, last = self._next_batch()
                if batch and not self._commit(batch):
                    break
                if last:
                    self.outbound.send_bytes(pickle.dumps(DONE))
                    break
                if time.monotonic() - last_stats >= STATS_EVERY_S:
                    self._log_stats()
                    last_stats = time.monotonic()
        finally:
            self.feed.stop()
            self.pool.close()
            self._log_stats()

    # ---- inbound: bundles from the receiver, interpreted here ---------------------------

    def _read(self) -> None:
        policy, put = self.policy, self.queue.put
        try:
            while True:
                bundle: list[Wire] | None = pickle.loads(self.inbound.recv_bytes())
                if bundle is DRAIN:
                    self._draining = True
                    put(None)
                    return
                registry = self.feed.current
                for topic, payload, received_at, mid, qos, generation, retained in bundle:
                    interp = interpret(topic, payload, received_at, registry, policy, retained)
                    put(Received(topic, payload, received_at, interp, mid, qos, generation, retained))
        except (EOFError, OSError):
            log.warning("the receiving process went away; stopping")
            self._receiver_gone.set()
            put(None)

    def _next_batch(self) -> tuple[list[Received], bool]:
        """Up to batch_size messages within the max delay (an emergency ends the wait).

        The flag is true when the receiver's DRAIN was reached: nothing more will come.
        """
        s = self.settings
        try:
            first = self.queue.get(timeout=0.2)
        except queue.Empty:
            return [], False
        if first is None:
            return [], True
        batch = [first]
        deadline = time.monotonic() + s.batch_max_delay_ms / 1000
        urgent = first.interp.immediate
        while not urgent and len(batch) < s.batch_size:
            with contextlib.suppress(queue.Empty):  # took all there was
                while len(batch) < s.batch_size:
                    item = self.queue.get_nowait()
                    if item is None:
                        return batch, True
                    batch.append(item)
                    if item.interp.immediate:
                        urgent = True
                        break
            remaining = deadline - time.monotonic()
            if urgent or len(batch) >= s.batch_size or remaining <= 0:
                break
            # Napping and then taking everything queued costs less CPU than waking per message.
            time.sleep(min(0.002, remaining))
        return batch, False

    # ---- committing ---------------------------------------------------------------------

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

    def _commit(self, batch: list[Received]) -> bool:
        """Write the batch (retrying until it commits) and report it; False if giving up."""
        delay, failures = 0.5, 0
        while True:
            started = time.perf_counter()
            try:
                with self.pool.connection(timeout=10.0) as conn:
                    self._recheck_unknown(conn, batch)
                    result = self.writer.write(conn, batch)
                break
            except Exception as exc:  # connection trouble, or worse: retry, never ack early
                failures += 1
                if not isinstance(exc, psycopg.OperationalError | PoolTimeout):
                    log.exception("batch failed unexpectedly, retrying")
                # One warning per outage, not one per retry; the recovery says how long it took.
                log.log(
                    logging.WARNING if failures == 1 else logging.DEBUG,
                    "batch not committed, retrying until the database answers",
                    extra={
                        "error": str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
                        "messages": len(batch),
                    },
                )
                if self._receiver_gone.is_set() or self._draining:
                    log.warning("stopping with uncommitted messages; the broker redelivers them")
                    return False
                time.sleep(delay)
                delay = min(delay * 2, 10.0)
        committed = self.clock()
        if failures:
            log.info("batch committed again", extra={"failed_attempts": failures, "messages": len(batch)})
        lags = []
        # Every LAG_SAMPLE-th message, live data only (buffered uploads would swamp it).
        for item in batch[:: LAG_SAMPLE if len(batch) > LAG_SAMPLE else 1]:
            first = item.interp.readings[:1] or item.interp.events[:1]
            if first and not first[0].flags:
                lags.append(max(0.0, committed - first[0].time.timestamp()))
        report = CommitReport(
            acks=[(m.mid, m.qos, m.generation) for m in batch if m.qos],
            result=result,
            payload_bytes=sum(len(m.payload) for m in batch),
            commit_seconds=time.perf_counter() - started,
            lags=lags,
            failures=failures,
        )
        try:
            self.outbound.send_bytes(pickle.dumps(report, protocol=pickle.HIGHEST_PROTOCOL))
        except OSError:
            self._receiver_gone.set()
            return False
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


def committer_main(
    settings_values: dict[str, Any], inbound: Connection, outbound: Connection, flavour: str | None = None
) -> None:
    """Entry point of the committer process (spawned by the receiver)."""
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
    Committer(settings, inbound, outbound, rules=load_rules(settings.rules), flavour=flavour).run()

"""The ingest worker: MQTT in, one transaction per batch, acknowledgements after commit.

Threads:
- paho's network thread receives a message, interprets it (pure, no I/O) and puts it on a
  bounded queue. When the queue is full the put blocks, paho stops reading the socket, and
  TCP plus the broker's in-flight limit hold everything else back: backpressure without
  loss, with memory bounded.
- the writer thread (``run``) takes what is queued, batches by size or a short delay, and
  writes one transaction. An event or an emergency reading flushes at once. After COMMIT it
  acknowledges the batch's messages in arrival order (paho-mqtt 2 manual acks).
- the registry feed follows LISTEN/NOTIFY on the devices table.

A message received on an earlier connection is never acknowledged on a later one (its
packet id may have been reused): the broker redelivers it and dedup drops the copy.
"""

from __future__ import annotations

import fcntl
import logging
import os
import queue
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

import paho.mqtt.client as mqtt
import psycopg
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions
from psycopg_pool import ConnectionPool, PoolTimeout

from eldercare.alerts.ruleset import NoRules, RuleSet
from eldercare.devices.catalog import load_catalog
from eldercare.devices.interpret import Policy, interpret
from eldercare.devices.records import NOT_ATTACHED_TO_HUB, UNKNOWN_DEVICE
from eldercare.devices.topics import SUBSCRIPTIONS
from eldercare.gateway.ingest import metrics
from eldercare.gateway.settings import Settings
from eldercare.gateway.store.devices import RegistryFeed
from eldercare.gateway.store.writer import BatchResult, BatchWriter, Received

log = logging.getLogger(__name__)

#: Rejections that a registration made a moment ago could turn into acceptance.
REGISTRY_REASONS = frozenset({UNKNOWN_DEVICE, NOT_ATTACHED_TO_HUB})
STATS_EVERY_S = 30.0
#: Publish-to-commit lag is observed for one message in this many (a histogram is a sample).
LAG_SAMPLE = 4
_slot_locks: list[IO[str]] = []  # open for the life of the process: they hold the slots


def subscriptions(settings: Settings) -> list[str]:
    """The topic filters the worker subscribes to (shared when a group is set).

    The device-to-gateway topics only, not ``eldercare/v1/#``: that would also deliver the
    commands the gateway itself publishes to devices.
    """
    if settings.mqtt_shared_group:
        return [f"$share/{settings.mqtt_shared_group}/{t}" for t in SUBSCRIPTIONS]
    return list(SUBSCRIPTIONS)


def default_client_id(settings: Settings) -> str:
    """A client id that is stable across restarts and unique among this host's workers.

    Stability matters: a persistent session is found again only under the same id, and
    Mosquitto keeps handing an offline member of a shared group its share of the messages
    until that session expires. So the n-th worker on a host is always ``...-<host>-<n>``:
    each running worker holds a lock on its slot, and a restarted one takes the lowest free.
    """
    if settings.mqtt_client_id:
        return settings.mqtt_client_id
    host = socket.gethostname()
    folder = Path(tempfile.gettempdir()) / "eldercare-ingest-slots"
    folder.mkdir(exist_ok=True)
    for slot in range(1, 257):
        handle = open(folder / f"{host}-{slot}.lock", "w")  # noqa: SIM115 - held for life
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            continue
        _slot_locks.append(handle)
        return f"eldercare-ingest-{host}-{slot}"
    raise RuntimeError("more than 256 ingest workers on one host: set ELDERCARE_MQTT_CLIENT_ID")


def store_flavour(conninfo: str) -> str:
    """'timescale' or 'plain', as recorded by the migrations."""
    with psycopg.connect(conninfo) as conn:
        row = conn.execute("SELECT value FROM store_info WHERE key = 'flavour'").fetchone()
    if row is None:
        raise RuntimeError("the store is not migrated: run `eldercare migrate` first")
    return str(row[0])


class IngestWorker:
    """One ingest worker process's moving parts; ``run`` blocks until ``stop`` is called."""

    def __init__(
        self,
        settings: Settings,
        rules: RuleSet | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.policy = Policy(catalog=load_catalog(), horizon_s=settings.buffer_horizon_days * 86_400.0)
        self.queue: queue.Queue[Received] = queue.Queue(maxsize=settings.queue_size)
        self.writer = BatchWriter(store_flavour(settings.database_url), rules or NoRules())
        self.feed = RegistryFeed(settings.database_url)
        # The writer's connections; the registry feed keeps its own (LISTEN needs one for good).
        self.pool = ConnectionPool(
            settings.database_url, min_size=1, max_size=2, open=False, name="ingest-writer"
        )
        self.client_id = default_client_id(settings)
        self._stopping = threading.Event()
        self._generation = 0
        self._connected = threading.Event()
        self._totals = BatchResult()
        self._client = self._make_client()

    # ---- MQTT side (paho's network thread) ---------------------------------------------

    def _make_client(self) -> mqtt.Client:
        s = self.settings
        v5 = s.mqtt_protocol == "5"
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            clean_session=None if v5 else False,
            manual_ack=True,
        )
        target = s.mqtt
        if target.username:
            client.username_pw_set(target.username, target.password)
        if target.tls:
            client.tls_set()
        # paho's own outgoing queue is unused by a subscriber; its inflight counter limits
        # nothing here. The broker-side bound is MQTT 5's receive maximum (below).
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        return client

    def _connect_properties(self) -> Properties | None:
        if self.settings.mqtt_protocol != "5":
            return None
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.settings.mqtt_session_expiry
        # The broker sends at most this many un-acked QoS 1 messages: about one queue's worth.
        props.ReceiveMaximum = min(65_535, self.settings.queue_size)
        return props

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:  # type: ignore[no-untyped-def]
        if reason_code.is_failure:
            log.error("broker refused the connection", extra={"reason": str(reason_code)})
            return
        self._generation += 1
        log.info(
            "connected to the broker",
            extra={
                "broker": repr(self.settings.mqtt),
                "session_present": bool(flags.session_present),
                "subscriptions": len(subscriptions(self.settings)),
            },
        )
        if self.settings.mqtt_protocol == "5":
            # retain_handling=1: retained messages only when the subscription is new.
            options = SubscribeOptions(qos=1, retainHandling=1)
            client.subscribe([(t, options) for t in subscriptions(self.settings)])
        else:
            client.subscribe([(t, 1) for t in subscriptions(self.settings)])
        self._connected.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:  # type: ignore[no-untyped-def]
        self._connected.clear()
        if not self._stopping.is_set():
            log.warning("lost the broker connection, reconnecting", extra={"reason": str(reason_code)})

    def _on_message(self, client, userdata, msg: mqtt.MQTTMessage) -> None:  # type: ignore[no-untyped-def]
        now = self.clock()
        payload = bytes(msg.payload)  # paho hands over bytes already: no copy then
        interp = interpret(msg.topic, payload, now, self.feed.current, self.policy, msg.retain)
        item = Received(msg.topic, payload, now, interp, msg.mid, msg.qos, self._generation, msg.retain)
        while True:
            try:
                self.queue.put(item, timeout=0.5)
                return
            except queue.Full:
                if self._stopping.is_set():
                    return  # not acked: the broker redelivers it to the next session

    # ---- writer side --------------------------------------------------------------------

    def run(self) -> None:
        """Connect, consume and write until ``stop``; flush and ack what is queued, then leave."""
        s = self.settings
        self.feed.start()
        target = s.mqtt
        if s.mqtt_protocol == "5":
            self._client.connect_async(
                target.host,
                target.port,
                keepalive=30,
                clean_start=False,
                properties=self._connect_properties(),
            )
        else:  # 3.1.1: the persistent session comes from clean_session=False on the client
            self._client.connect_async(target.host, target.port, keepalive=30)
        self._client.loop_start()
        log.info(
            "ingest worker started",
            extra={"client_id": self.client_id, "flavour": self.writer.flavour},
        )
        self.pool.open(wait=False)
        last_stats = time.monotonic()
        try:
            while not self._stopping.is_set() or not self.queue.empty():
                batch = self._next_batch()
                if batch and not self._commit_and_ack(batch):
                    break  # stopping while the store is unreachable: the broker keeps them
                if time.monotonic() - last_stats >= STATS_EVERY_S:
                    self._log_stats()
                    last_stats = time.monotonic()
        finally:
            self._client.disconnect()
            self._client.loop_stop()
            self.feed.stop()
            self.pool.close()
            self._log_stats()
            log.info("ingest worker stopped")

    def stop(self) -> None:
        """Ask ``run`` to finish: stop taking messages, commit and ack what it holds."""
        self._stopping.set()

    def _next_batch(self) -> list[Received]:
        """Gather up to batch_size messages, waiting at most the max delay for the first's batch."""
        s = self.settings
        try:
            first = self.queue.get(timeout=0.2)
        except queue.Empty:
            return []
        batch = [first]
        deadline = time.monotonic() + s.batch_max_delay_ms / 1000
        urgent = first.interp.immediate
        while not urgent and len(batch) < s.batch_size:
            try:
                while len(batch) < s.batch_size:
                    item = self.queue.get_nowait()
                    batch.append(item)
                    if item.interp.immediate:
                        urgent = True
                        break
            except queue.Empty:
                pass
            remaining = deadline - time.monotonic()
            if urgent or len(batch) >= s.batch_size or remaining <= 0:
                break
            # Napping and then taking everything queued costs less CPU than waking per message.
            time.sleep(min(0.002, remaining))
        return batch

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

    def _commit_and_ack(self, batch: list[Received]) -> bool:
        """Write the batch (retrying until it commits), then ack it; False if given up on stop."""
        delay = 0.5
        while True:
            started = time.perf_counter()
            try:
                with self.pool.connection(timeout=10.0) as conn:
                    self._recheck_unknown(conn, batch)
                    result = self.writer.write(conn, batch)
                break
            except Exception as exc:  # connection trouble, or worse: retry, never ack early
                metrics.BATCH_FAILURES.inc()
                if not isinstance(exc, psycopg.OperationalError | PoolTimeout):
                    log.exception("batch failed unexpectedly, retrying")
                log.warning(
                    "batch not committed, retrying",
                    extra={
                        "error": str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
                        "messages": len(batch),
                    },
                )
                if self._stopping.is_set():
                    log.warning("stopping with uncommitted messages; the broker redelivers them")
                    return False
                time.sleep(delay)
                delay = min(delay * 2, 10.0)
        committed = self.clock()
        metrics.COMMIT_SECONDS.observe(time.perf_counter() - started)
        metrics.BATCH_SIZE.observe(len(batch))
        self._ack(batch)
        self._record(result, batch, committed)
        return True

    def _ack(self, batch: list[Received]) -> None:
        generation = self._generation
        acked = 0
        for item in batch:
            if item.qos and item.generation == generation:
                self._client.ack(item.mid, item.qos)
                acked += 1
        metrics.ACKED.inc(acked)

    def _record(self, result: BatchResult, batch: list[Received], committed: float) -> None:
        metrics.RECEIVED.inc(len(batch))
        metrics.STORED.inc(result.stored_messages)
        metrics.DATAPOINTS.inc(result.readings)
        metrics.EVENTS.inc(result.events)
        metrics.DUPLICATES.inc(result.duplicates)
        metrics.CLOCK_SKEW.inc(result.skewed)
        for reason, n in result.rejected.items():
            metrics.DEAD_LETTERS.labels(reason).inc(n)
        metrics.QUEUE_DEPTH.set(self.queue.qsize())
        lag = metrics.LAG_SECONDS
        # Every LAG_SAMPLE-th message, live data only (buffered uploads would swamp it).
        for item in batch[:: LAG_SAMPLE if len(batch) > LAG_SAMPLE else 1]:
            first = item.interp.readings[:1] or item.interp.events[:1]
            if first and not first[0].flags:
                lag.observe(max(0.0, committed - first[0].time.timestamp()))
        self._totals.add(result)
        if result.rejected and log.isEnabledFor(logging.DEBUG):
            for item in batch:
                for rej in item.interp.rejections:
                    log.debug(
                        "rejected",
                        extra={"reason": rej.reason, "topic": item.topic, "detail": rej.detail},
                    )

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
                "rejected": dict(t.rejected),
                "clock_skew": t.skewed,
                "queue": self.queue.qsize(),
                "pid": os.getpid(),
            },
        )

"""The ingest worker: MQTT in, one transaction per batch, acknowledgements after commit.

A worker is two processes, so that paho (the receiver) and the database work (the
committer, ``committer.py``) each have a core and an interpreter lock of their own:

- receiver, paho's network thread: takes a message off the socket and appends it to the
  outgoing bundle. While more than ``queue_size`` messages are received but not yet
  committed, it waits: paho stops reading its socket, and TCP plus the broker's in-flight
  limit (MQTT 5 receive maximum) hold everything else back: backpressure without loss.
- receiver, ``bundles`` thread: every millisecond or so, sends what was received to the
  committer over a pipe.
- receiver, ``acks`` thread: reads the committer's reports and acknowledges each committed
  message (paho-mqtt 2 manual acks, in arrival order), and keeps the Prometheus metrics.
- committer: interprets, batches by size or a short delay (an event or an emergency
  reading flushes at once), writes one transaction per batch, reports it.

A message received on an earlier connection is never acknowledged on a later one (its
packet id may have been reused): the broker redelivers it and dedup drops the copy.
"""

from __future__ import annotations

import fcntl
import logging
import multiprocessing
import pickle
import socket
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import IO

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from eldercare.alerts.ruleset import load_rules
from eldercare.devices.topics import SUBSCRIPTIONS
from eldercare.gateway.ingest import metrics
from eldercare.gateway.ingest.committer import DONE, DRAIN, CommitReport, Wire, committer_main, store_flavour
from eldercare.gateway.settings import Settings

log = logging.getLogger(__name__)

#: A retiring slot stops once it has received nothing for this long and acked everything.
RETIRE_IDLE_S = 3.0
#: How long the bundles thread gathers before sending (latency it adds, at most).
BUNDLE_EVERY_S = 0.001
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


class IngestWorker:
    """One ingest worker's moving parts; ``run`` blocks until ``stop`` is called."""

    def __init__(
        self, settings: Settings, clock: Callable[[], float] = time.time, retire: bool = False
    ) -> None:
        self.settings = settings
        self.retire = retire
        self._last_message = time.monotonic()
        self.clock = clock
        self.flavour = store_flavour(settings.database_url)  # fail early if not migrated
        load_rules(settings.rules)  # and if the rule set cannot be loaded
        self.client_id = default_client_id(settings)
        self._outgoing: deque[Wire] = deque()
        self._arrived = threading.Event()
        self._received = 0  # written by paho's thread only
        self._acked = 0  # written by the acks thread only
        self._stopping = threading.Event()
        self._committer_gone = threading.Event()
        self._done = threading.Event()
        self._generation = 0
        self._connected = threading.Event()
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
        if self.retire:
            # No new share of the group's messages; what the session holds still comes.
            client.unsubscribe(subscriptions(self.settings))
        elif self.settings.mqtt_protocol == "5":
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
        if self._stopping.is_set():
            return  # not acked: the broker redelivers it to the next session
        self._last_message = time.monotonic()
        capacity = self.settings.queue_size
        while self._received - self._acked >= capacity:  # backpressure: stop reading
            if self._stopping.is_set() or self._committer_gone.is_set():
                return
            time.sleep(0.001)
        outgoing = self._outgoing
        outgoing.append(
            # paho hands over bytes (bytes() of bytes is the same object: no copy)
            (msg.topic, bytes(msg.payload), self.clock(), msg.mid, msg.qos, self._generation, msg.retain)
        )
        self._received += 1
        if len(outgoing) == 1:
            self._arrived.set()

    # ---- the bundles and acks threads ---------------------------------------------------

    def _send_bundles(self, pipe: Connection) -> None:
        outgoing, arrived = self._outgoing, self._arrived
        try:
            while True:
                arrived.clear()  # before looking, so an append right after still wakes us
                if not outgoing:
                    if self._stopping.is_set():
                        break
                    arrived.wait(0.2)
                    continue
                time.sleep(BUNDLE_EVERY_S)  # let a few more arrive: one send for many
                bundle = [outgoing.popleft() for _ in range(len(outgoing))]
                pipe.send_bytes(pickle.dumps(bundle, protocol=pickle.HIGHEST_PROTOCOL))
                metrics.RECEIVED.inc(len(bundle))
            pipe.send_bytes(pickle.dumps(DRAIN))
        except OSError:
            self._committer_gone.set()

    def _receive_reports(self, pipe: Connection) -> None:
        try:
            while True:
                report: CommitReport | str = pickle.loads(pipe.recv_bytes())
                if report == DONE:
                    break
                assert isinstance(report, CommitReport)
                self._ack(report)
                self._record(report)
        except (EOFError, OSError):
            if not self._stopping.is_set():
                log.error("the committer process died; stopping this worker")
            self._committer_gone.set()
        finally:
            self._done.set()

    def _ack(self, report: CommitReport) -> None:
        generation, ack = self._generation, self._client.ack
        acked = 0
        for mid, qos, gen in report.acks:
            if gen == generation:
                ack(mid, qos)
                acked += 1
        self._acked += report.result.messages  # QoS 0 ones too: they left the pipeline
        metrics.ACKED.inc(acked)

    def _record(self, report: CommitReport) -> None:
        result = report.result
        metrics.STORED.inc(result.stored_messages)
        metrics.DATAPOINTS.inc(result.readings)
        metrics.EVENTS.inc(result.events)
        metrics.DUPLICATES.inc(result.duplicates)
        metrics.CLOCK_SKEW.inc(result.skewed)
        for reason, n in result.rejected.items():
            metrics.DEAD_LETTERS.labels(reason).inc(n)
        metrics.BATCH_FAILURES.inc(report.failures)
        metrics.BATCH_SIZE.observe(result.messages)
        metrics.COMMIT_SECONDS.observe(report.commit_seconds)
        metrics.QUEUE_DEPTH.set(self._received - self._acked)
        for lag in report.lags:
            metrics.LAG_SECONDS.observe(lag)

    # ---- lifecycle ------------------------------------------------------------------------

    def run(self) -> None:
        """Connect, consume and commit until ``stop``; flush and ack what is held, then leave."""
        s = self.settings
        spawn = multiprocessing.get_context("spawn")
        committer_in, to_committer = spawn.Pipe(duplex=False)  # (reading end, writing end)
        reports_in, reports_out = spawn.Pipe(duplex=False)
        committer = spawn.Process(
            target=committer_main,
            args=(s.model_dump(), committer_in, reports_out),
            name="eldercare-committer",
            daemon=True,
        )
        committer.start()
        committer_in.close()
        reports_out.close()
        sender = threading.Thread(target=self._send_bundles, args=(to_committer,), name="bundles")
        acks = threading.Thread(target=self._receive_reports, args=(reports_in,), name="acks")
        sender.start()
        acks.start()
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
        log.info("ingest worker started", extra={"client_id": self.client_id, "flavour": self.flavour})
        try:
            while not (self._stopping.is_set() or self._committer_gone.is_set()):
                self._stopping.wait(0.5)
                if self.retire and self._drained():
                    log.info(
                        "retired slot drained: removing its session", extra={"client_id": self.client_id}
                    )
                    break
            self._stopping.set()
            sender.join(30)
            self._done.wait(60)  # the committer commits what it holds and reports it
        finally:
            self._client.disconnect(properties=self._disconnect_properties())  # after the last acks
            self._client.loop_stop()
            if self.retire and self.settings.mqtt_protocol != "5":
                self._end_session_311()
            committer.join(10)
            if committer.is_alive():
                committer.kill()
            log.info("ingest worker stopped")
        if self._committer_gone.is_set() and not self._done.is_set():
            raise RuntimeError("the committer process died")

    def stop(self) -> None:
        """Ask ``run`` to finish: stop taking messages, commit and ack what it holds."""
        self._stopping.set()

    # ---- retiring a slot for good ---------------------------------------------------------

    def _drained(self) -> bool:
        """Connected, nothing received for RETIRE_IDLE_S, and everything received acked."""
        idle = time.monotonic() - self._last_message >= RETIRE_IDLE_S
        return self._connected.is_set() and idle and self._received == self._acked

    def _disconnect_properties(self) -> Properties | None:
        if not (self.retire and self.settings.mqtt_protocol == "5"):
            return None
        props = Properties(PacketTypes.DISCONNECT)
        props.SessionExpiryInterval = 0  # the broker forgets the session now
        return props

    def _end_session_311(self) -> None:
        """MQTT 3.1.1 has no session expiry: a clean-session connect removes the session."""
        target = self.settings.mqtt
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=mqtt.MQTTv311, clean_session=True
        )
        if target.username:
            client.username_pw_set(target.username, target.password)
        if target.tls:
            client.tls_set()
        client.connect(target.host, target.port)
        client.disconnect()

"""The ingest worker: MQTT in, one transaction per batch, acknowledgements after commit.

A worker is three processes, so that paho (the receiver), the database work (the
committer, ``committer.py``) and the events each have an interpreter lock of their own:

- receiver (this process), the main *link*: a paho client on the worker's MQTT session,
  taking everything but events. Its network thread takes a message off the socket and
  appends it to the link's outgoing bundle. While ``queue_size`` messages or
  ``queue_bytes`` of payload it received are not yet committed, it waits: paho stops reading
  its socket, and TCP plus the broker's in-flight limit (MQTT 5 receive maximum) hold
  everything else back: backpressure without loss. While it waits it still sends what the
  acks thread queued and a PINGREQ now and then, so a long database outage does not cost
  the broker connection.
- receiver, ``bundles`` thread: every millisecond or so, sends what was received to the
  committer over a pipe.
- receiver, ``acks`` thread: reads the committer's reports and acknowledges each committed
  message (paho-mqtt 2 manual acks, in arrival order), and keeps the Prometheus metrics.
- committer: interprets, batches by size or a short delay (an emergency reading flushes at
  once), writes one transaction per batch, reports it.
- events (``EventsProcess``): the events link (``.../events``: an SOS, a fall) on an MQTT
  session of its own, with the same threads and a committer of its own in a thread. The
  broker delivers one session's messages first in, first out, so on the main session an SOS
  would wait behind any telemetry backlog (a burst, a database outage); and in the receiver
  or the committer it would wait for an interpreter lock that 10,000 telemetry messages a
  second keep busy. Here it waits for neither. Its in-flight bound is its own (a full
  telemetry queue never holds it), and it reports each batch back for the metrics.

A message received on an earlier connection is never acknowledged on a later one (its
packet id may have been reused): the broker redelivers it and dedup drops the copy.

Which sessions: by default plain subscriptions on two persistent sessions (``<client id>``
and ``<client id>-events``), consumed by whichever worker holds the ingest lease
(``lease.py`` says why: Mosquitto 2.0 does not restore ``$share`` subscriptions after a
restart); other workers stand by. With ``ELDERCARE_MQTT_SHARED_GROUP`` set, every worker
takes a share on two sessions of its own (for brokers that persist shared subscriptions).
The events link subscribes before the main link connects, and the main link unsubscribes
the events filters (a session from before the split still has them), so events come once.
"""

from __future__ import annotations

import contextlib
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
from multiprocessing.synchronize import Event as EventFlag
from pathlib import Path
from typing import IO, Any

import paho.mqtt.client as mqtt
import psycopg
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions
from psycopg.conninfo import conninfo_to_dict

from eldercare.devices.topics import EVENT_SUBSCRIPTIONS, TELEMETRY_SUBSCRIPTIONS
from eldercare.gateway.ingest import metrics
from eldercare.gateway.ingest.alerting import batch_step
from eldercare.gateway.ingest.committer import (
    DONE,
    DRAIN,
    EVENT_LANE,
    MAIN_LANE,
    CommitReport,
    Committer,
    Lane,
    Wire,
    child_process,
    committer_main,
    store_flavour,
)
from eldercare.gateway.ingest.lease import IngestLease
from eldercare.gateway.settings import Settings
from eldercare.gateway.store.flavour import Flavour

log = logging.getLogger(__name__)

#: A retiring slot stops once it has received nothing for this long and acked everything.
RETIRE_IDLE_S = 3.0
#: How long the bundles thread gathers before sending (latency it adds, at most).
BUNDLE_EVERY_S = 0.001
#: Reconnect backoff to the broker (seconds): back within about a second of it returning.
RECONNECT_MIN_S, RECONNECT_MAX_S = 0.2, 1.0
#: The session's client id when every worker shares one session (no shared group).
SESSION_CLIENT_ID = "eldercare-ingest"
#: The events session's client id is the main one's with this after it.
EVENTS_SUFFIX = "-events"
#: How often a worker waiting for the database tries again.
STORE_RETRY_S = 2.0
_slot_locks: list[IO[str]] = []  # open for the life of the process: they hold the slots


def subscriptions(settings: Settings, lane: Lane) -> list[str]:
    """The topic filters a lane's client subscribes to (shared when a group is set).

    The device-to-gateway topics only, not ``eldercare/v1/#``: that would also deliver the
    commands the gateway itself publishes to devices.
    """
    topics = EVENT_SUBSCRIPTIONS if lane == EVENT_LANE else TELEMETRY_SUBSCRIPTIONS
    if settings.mqtt_shared_group:
        return [f"$share/{settings.mqtt_shared_group}/{t}" for t in topics]
    return list(topics)


def default_client_id(settings: Settings) -> str:
    """A client id that is stable across restarts (and hosts, containers, re-creations).

    Without a shared group every worker uses the one session ``eldercare-ingest`` (the lease
    says who consumes it). With a shared group each worker needs a session of its own, and
    Mosquitto keeps handing an offline member its share until the session expires, so the
    n-th worker on a host is always ``...-<host>-<n>``: each running worker holds a lock on
    its slot, and a restarted one takes the lowest free.
    """
    if settings.mqtt_client_id:
        return settings.mqtt_client_id
    if not settings.mqtt_shared_group:
        return SESSION_CLIENT_ID
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


def events_client_id(client_id: str) -> str:
    """The client id of the events session beside the session ``client_id``."""
    return client_id + EVENTS_SUFFIX


def database_target(conninfo: str) -> str:
    """Where the store is, for a log line: host, port and database, never the password."""
    try:
        parts = conninfo_to_dict(conninfo)
    except psycopg.Error:
        return "the configured database"
    return f"{parts.get('host', 'localhost')}:{parts.get('port', 5432)}/{parts.get('dbname', '')}"


def wait_for_store(conninfo: str, stopping: threading.Event) -> Flavour | None:
    """The store's flavour once the database answers; None if ``stopping`` came first.

    A database that is down is waited for, with one log line (an operator starting the
    gateway before PostgreSQL is a normal start order, not a crash).
    """
    said = False
    while True:
        try:
            flavour = store_flavour(conninfo)
            if said:
                log.info("the database answers", extra={"database": database_target(conninfo)})
            return flavour
        except psycopg.OperationalError as exc:
            if not said:
                log.warning(
                    "waiting for the database",
                    extra={
                        "database": database_target(conninfo),
                        "error": str(exc).strip().splitlines()[-1]
                        if str(exc).strip()
                        else type(exc).__name__,
                        "retry_every_s": STORE_RETRY_S,
                    },
                )
                said = True
        if stopping.wait(STORE_RETRY_S):
            return None


class IngestWorker:
    """One ingest worker: waits for the store and (by default) the lease, then consumes.

    ``run`` blocks until ``stop`` is called. Each stretch of holding the lease is one
    ``IngestSession`` (its own processes and MQTT clients); a worker that loses the
    lease to another goes back to standing by.
    """

    def __init__(
        self, settings: Settings, clock: Callable[[], float] = time.time, retire: bool = False
    ) -> None:
        self.settings = settings
        self.retire = retire
        self.clock = clock
        batch_step(settings)  # fail early if the rules cannot be loaded
        self.client_id = default_client_id(settings)
        self.flavour: Flavour | None = None
        self._stopping = threading.Event()
        self.session: IngestSession | None = None

    def run(self) -> None:
        """Wait for what is needed, consume until ``stop``, flush and ack what is held."""
        s = self.settings
        self.flavour = wait_for_store(s.database_url, self._stopping)
        if self.flavour is None:
            return
        lease = None if s.mqtt_shared_group else IngestLease(s.database_url, self.client_id)
        while not self._stopping.is_set():
            if lease is not None and not lease.acquire(self._stopping):
                break
            try:
                self.session = IngestSession(self, lease)
                self.session.run()
            finally:
                if lease is not None:
                    lease.release()
            if lease is None or not lease.lost.is_set():
                break

    def stop(self) -> None:
        """Ask ``run`` to finish: stop taking messages, commit and ack what it holds."""
        self._stopping.set()


class Link:
    """One of the worker's two MQTT clients (each on a session of its own) and what it holds.

    Each link has its own in-flight bound (a full telemetry queue blocks the main link's
    network thread, never the events link's) and its own connection generation: a message is
    acknowledged by the client that received it, on the connection that received it.
    """

    def __init__(
        self,
        lane: Lane,
        client_id: str,
        settings: Settings,
        *,
        retire: bool,
        clock: Callable[[], float],
        arrived: threading.Event,
        stopping: threading.Event,
        committer_gone: threading.Event,
    ) -> None:
        self.lane = lane
        self.client_id = client_id
        self.settings = settings
        self.retire = retire
        self.clock = clock
        self._arrived = arrived  # shared with the other link: wakes the bundles thread
        self._stopping = stopping
        self._committer_gone = committer_gone
        self.outgoing: deque[Wire] = deque()  # received, not yet sent to the committer
        self.received = 0  # written by paho's thread only
        self.received_bytes = 0
        self.acked = 0  # written by the acks thread only
        self.acked_bytes = 0
        self.generation = 0
        self.last_message = time.monotonic()
        self.connected = threading.Event()
        self.ready = threading.Event()  # the broker answered the first (un)subscribe
        self.started = False
        self._awaited: int | None = None  # the packet id of that (un)subscribe
        self._broker_said = False
        self.client = self._make_client()

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
        client.reconnect_delay_set(RECONNECT_MIN_S, RECONNECT_MAX_S)  # type: ignore[arg-type]
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_unsubscribe = self._on_unsubscribe
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

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.error("broker refused the connection", extra={"lane": self.lane, "reason": str(reason_code)})
            return
        self.generation += 1
        self._broker_said = False
        s = self.settings
        topics = subscriptions(s, self.lane)
        log.info(
            "connected to the broker",
            extra={
                "broker": repr(s.mqtt),
                "lane": self.lane,
                "client_id": self.client_id,
                "session_present": bool(flags.session_present),
                "subscriptions": len(topics),
            },
        )
        if self.lane == MAIN_LANE:
            # A session from before events had their own still holds their filters: without
            # this, each event would come twice, and the copy here behind the telemetry.
            client.unsubscribe(subscriptions(s, EVENT_LANE))
        if self.retire:
            # No new share of the group's messages; what the session holds still comes.
            _, self._awaited = client.unsubscribe(topics)
        elif s.mqtt_protocol == "5":
            # retain_handling=1: retained messages only when the subscription is new.
            options = SubscribeOptions(qos=1, retainHandling=1)
            _, self._awaited = client.subscribe([(t, options) for t in topics])
        else:
            _, self._awaited = client.subscribe([(t, 1) for t in topics])
        self.connected.set()

    def _on_subscribe(self, client, userdata, mid, reason_code_list, properties) -> None:
        if mid != self._awaited:
            return
        refused = [str(rc) for rc in reason_code_list if rc.is_failure]
        if refused:
            log.error("broker refused a subscription", extra={"lane": self.lane, "reasons": refused})
        self.ready.set()

    def _on_unsubscribe(self, client, userdata, mid, reason_code_list, properties) -> None:
        if mid == self._awaited:
            self.ready.set()

    def _on_connect_fail(self, client, userdata) -> None:
        if not self._broker_said:  # one line per outage, not one per attempt
            log.warning(
                "waiting for the broker",
                extra={
                    "broker": repr(self.settings.mqtt),
                    "lane": self.lane,
                    "retry_every_s": RECONNECT_MAX_S,
                },
            )
            self._broker_said = True

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected.clear()
        if not self._stopping.is_set():
            log.warning(
                "lost the broker connection, reconnecting",
                extra={"lane": self.lane, "reason": str(reason_code)},
            )

    def _on_message(self, client, userdata, msg: mqtt.MQTTMessage) -> None:
        if self._stopping.is_set():
            return  # not acked: the broker redelivers it to the next session
        self.last_message = time.monotonic()
        payload = bytes(msg.payload)  # paho hands over bytes (bytes() of bytes: no copy)
        if self._full(len(payload)) and not self._wait_for_room(client, len(payload)):
            return
        outgoing = self.outgoing
        outgoing.append(
            (msg.topic, payload, self.clock(), msg.mid, msg.qos, self.generation, msg.retain, self.lane)
        )
        self.received += 1
        self.received_bytes += len(payload)
        if len(outgoing) == 1:
            self._arrived.set()

    def _full(self, size: int) -> bool:
        """True while taking one more message would pass the in-flight bound (count or bytes)."""
        held = self.received - self.acked
        if held >= self.settings.queue_size:
            return True
        # One message always fits when nothing is held, whatever its size.
        return held > 0 and self.received_bytes - self.acked_bytes + size > self.settings.queue_bytes

    def _wait_for_room(self, client: mqtt.Client, size: int) -> bool:
        """Backpressure: block paho's thread (its socket is not read) until there is room.

        Blocking here also stops paho from writing: the acks queued meanwhile and the
        keepalive. So the wait flushes the queued writes itself and sends a PINGREQ every
        third of the keepalive: the broker sees a live client and keeps the connection (and
        the session's in-flight messages) through a database outage of any length. False if
        the session is stopping instead.
        """
        ping_every = max(1.0, self.settings.mqtt_keepalive / 3)
        last_ping = time.monotonic()
        while self._full(size):
            if self._stopping.is_set() or self._committer_gone.is_set():
                return False
            time.sleep(0.001)
            now = time.monotonic()
            if now - last_ping >= ping_every:
                last_ping = now
                _send_keepalive(client)
        return True

    # ---- the acks thread ----------------------------------------------------------------

    def ack(self, report: CommitReport) -> int:
        """Acknowledge a committed batch of this link's; how many acks went out."""
        generation, ack = self.generation, self.client.ack
        acked = 0
        for mid, qos, gen in report.acks:
            if gen == generation:
                ack(mid, qos)
                acked += 1
        self.acked_bytes += report.payload_bytes  # before the count: the waiter reads both
        self.acked += report.result.messages  # QoS 0 ones too: they left the pipeline
        return acked

    # ---- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        s, target = self.settings, self.settings.mqtt
        if s.mqtt_protocol == "5":
            self.client.connect_async(
                target.host,
                target.port,
                keepalive=s.mqtt_keepalive,
                clean_start=False,
                properties=self._connect_properties(),
            )
        else:  # 3.1.1: the persistent session comes from clean_session=False on the client
            self.client.connect_async(target.host, target.port, keepalive=s.mqtt_keepalive)
        self.client.loop_start()
        self.started = True

    def stop(self) -> None:
        """Disconnect (a retiring link's session with it); after the last acks."""
        if not self.started:
            return
        self.client.disconnect(properties=self._disconnect_properties())
        self.client.loop_stop()
        if self.retire and self.settings.mqtt_protocol != "5":
            self._end_session_311()

    def drained(self) -> bool:
        """Connected, nothing received for RETIRE_IDLE_S, and everything received acked."""
        idle = time.monotonic() - self.last_message >= RETIRE_IDLE_S
        return self.connected.is_set() and idle and self.received == self.acked

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


class Pipeline:
    """Links and the two threads joining them to a committer: bundles out, reports back."""

    def __init__(
        self,
        settings: Settings,
        client_ids: dict[Lane, str],
        *,
        retire: bool,
        clock: Callable[[], float],
        forward: Connection | None = None,
    ) -> None:
        self.settings = settings
        self.retire = retire
        self._arrived = threading.Event()
        self._stopping = threading.Event()
        self._committer_gone = threading.Event()
        self._done = threading.Event()
        self._forward = forward  # where the figures go when the metrics are served elsewhere
        self._forward_lock = threading.Lock()  # the bundles and acks threads both send
        self.links = {
            lane: Link(
                lane,
                client_id,
                settings,
                retire=retire,
                clock=clock,
                arrived=self._arrived,
                stopping=self._stopping,
                committer_gone=self._committer_gone,
            )
            for lane, client_id in client_ids.items()
        }

    def _send_bundles(self, pipe: Connection) -> None:
        links, arrived = list(self.links.values()), self._arrived
        try:
            while True:
                arrived.clear()  # before looking, so an append right after still wakes us
                if not any(link.outgoing for link in links):
                    if self._stopping.is_set():
                        break
                    arrived.wait(0.2)
                    continue
                time.sleep(BUNDLE_EVERY_S)  # let a few more arrive: one send for many
                for link in links:
                    outgoing = link.outgoing
                    if outgoing:
                        bundle = [outgoing.popleft() for _ in range(len(outgoing))]
                        pipe.send_bytes(pickle.dumps(bundle, protocol=pickle.HIGHEST_PROTOCOL))
                        self._count(len(bundle), None, 0)
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
                self._count(0, report, self.links[report.lane].ack(report))
        except (EOFError, OSError):
            if not self._stopping.is_set():
                log.error("the committer died; stopping this worker")
            self._committer_gone.set()
        finally:
            self._done.set()

    def _count(self, received: int, report: CommitReport | None, acked: int) -> None:
        """Count in the metrics here, or send the figures to the process that serves them."""
        if self._forward is not None:
            with self._forward_lock, contextlib.suppress(OSError):  # if the parent is gone, so are we
                self._forward.send_bytes(pickle.dumps((received, report, acked), pickle.HIGHEST_PROTOCOL))
            return
        count(received, report, acked)
        if report is not None:
            metrics.QUEUE_DEPTH.set(sum(link.received - link.acked for link in self.links.values()))

    def start_threads(self, to_committer: Connection, reports_in: Connection) -> threading.Thread:
        """Start the bundles and acks threads; the bundles one, to join when stopping."""
        sender = threading.Thread(target=self._send_bundles, args=(to_committer,), name="bundles")
        acks = threading.Thread(target=self._receive_reports, args=(reports_in,), name="acks")
        sender.start()
        acks.start()
        return sender

    def finish(self, sender: threading.Thread) -> None:
        """Stop taking messages; wait until the committer has committed and reported the rest."""
        self._stopping.set()
        sender.join(30)
        self._done.wait(60)

    def stop_links(self) -> None:
        for link in self.links.values():
            link.stop()  # after the last acks


def count(received: int, report: CommitReport | None, acked: int) -> None:
    """Count messages received, and a committed batch with its acks, in the metrics."""
    metrics.RECEIVED.inc(received)
    metrics.ACKED.inc(acked)
    if report is None:
        return
    result = report.result
    metrics.STORED.inc(result.stored_messages)
    metrics.DATAPOINTS.inc(result.readings)
    metrics.EVENTS.inc(result.events)
    metrics.DUPLICATES.inc(result.duplicates)
    metrics.REPEATED.inc(result.repeated)
    metrics.UNSTORED_DEAD_LETTERS.inc(result.unstored_dead_letters)
    metrics.CLOCK_SKEW.inc(result.skewed)
    for reason, n in result.rejected.items():
        metrics.DEAD_LETTERS.labels(reason).inc(n)
    for decision, n in result.decisions.items():
        metrics.DECISIONS.labels(decision).inc(n)
    metrics.BATCH_FAILURES.inc(report.failures)
    metrics.BATCH_SIZE.observe(result.messages)
    metrics.COMMIT_SECONDS.observe(report.commit_seconds)
    for lag in report.lags:
        metrics.LAG_SECONDS.observe(lag)


class IngestSession(Pipeline):
    """One stretch of consuming: the main link and its committer process here, the events
    lane in a process of its own (``EventsProcess``)."""

    def __init__(self, worker: IngestWorker, lease: IngestLease | None) -> None:
        super().__init__(
            worker.settings, {MAIN_LANE: worker.client_id}, retire=worker.retire, clock=worker.clock
        )
        self.client_id = worker.client_id
        self.flavour = worker.flavour
        self._worker_stopping = worker._stopping
        self._lease = lease
        self.main = self.links[MAIN_LANE]
        self.events = EventsProcess(
            self.settings, events_client_id(self.client_id), self.flavour, self.retire
        )

    def _ending(self) -> bool:
        lease_lost = self._lease is not None and self._lease.lost.is_set()
        return (
            self._worker_stopping.is_set()
            or self._stopping.is_set()
            or self._committer_gone.is_set()
            or self.events.gone()
            or lease_lost
        )

    def run(self) -> None:
        """Connect, consume and commit until the worker stops or the lease goes elsewhere."""
        s = self.settings
        spawn = multiprocessing.get_context("spawn")
        committer_in, to_committer = spawn.Pipe(duplex=False)  # (reading end, writing end)
        reports_in, reports_out = spawn.Pipe(duplex=False)
        committer = spawn.Process(
            target=committer_main,
            args=(s.model_dump(), committer_in, reports_out, self.flavour),
            name="eldercare-committer",
            daemon=True,
        )
        committer.start()
        committer_in.close()
        reports_out.close()
        sender = self.start_threads(to_committer, reports_in)
        self.events.start()
        log.info(
            "ingest worker started",
            extra={
                "client_id": self.client_id,
                "events_client_id": self.events.client_id,
                "flavour": self.flavour,
                "subscription": "shared" if s.mqtt_shared_group else "plain (ingest lease held)",
            },
        )
        try:
            # The main link connects once the events link has subscribed: no moment where an
            # upgraded main session has dropped the events filters and the events one lacks
            # them, and telemetry stored means events are taken too.
            while not self._ending():
                if self.events.ready.wait(0.2):
                    self.main.start()
                    break
            while not self._ending():
                self._worker_stopping.wait(0.2)
                metrics.SUBSCRIBED.set(self.events.ready.is_set() + self.main.ready.is_set())
                if self.retire and self.main.drained() and self.events.drained.is_set():
                    log.info(
                        "retired slot drained: removing its sessions", extra={"client_id": self.client_id}
                    )
                    break
            metrics.SUBSCRIBED.set(0)
            events_died = self.events.gone()
            self.events.stop()  # both lanes commit and ack what they hold, at the same time
            self.finish(sender)
        finally:
            self.events.join()
            self.stop_links()
            committer.join(10)
            if committer.is_alive():
                committer.kill()
            log.info("ingest worker stopped")
        if self._committer_gone.is_set() and not self._done.is_set():
            raise RuntimeError("the committer process died")
        if events_died:
            raise RuntimeError("the events process died")

    def stop(self) -> None:
        """Stop taking messages; commit and ack what is held."""
        self._stopping.set()


class EventsProcess:
    """The events lane, run in a process of its own: its MQTT session, its own committer.

    An SOS must not wait behind telemetry anywhere: not in the broker (a session of its own),
    not in a queue, and not for an interpreter lock that the telemetry's paho thread and
    batches hold most of the time under load. So the events link and a committer for it run
    in this process, which is idle until an event comes. It reports each committed batch
    back for the metrics, which the parent serves.
    """

    def __init__(self, settings: Settings, client_id: str, flavour: Flavour | None, retire: bool) -> None:
        self.settings = settings
        self.client_id = client_id
        self.flavour = flavour
        self.retire = retire
        spawn = multiprocessing.get_context("spawn")
        self._spawn = spawn
        self.ready = spawn.Event()  # the events link subscribed
        self.drained = spawn.Event()  # (retiring) nothing held, nothing coming
        self._stop = spawn.Event()
        self._process: multiprocessing.process.BaseProcess | None = None
        self._reports: threading.Thread | None = None
        self._stopped = False

    def start(self) -> None:
        reports_in, reports_out = self._spawn.Pipe(duplex=False)
        self._process = self._spawn.Process(
            target=events_main,
            args=(
                self.settings.model_dump(),
                self.client_id,
                self.flavour,
                self.retire,
                (self.ready, self.drained, self._stop),
                reports_out,
            ),
            name="eldercare-events",
            daemon=True,
        )
        self._process.start()
        reports_out.close()
        self._reports = threading.Thread(
            target=self._record, args=(reports_in,), name="events-reports", daemon=True
        )
        self._reports.start()

    def _record(self, pipe: Connection) -> None:
        with contextlib.suppress(EOFError, OSError):
            while True:
                count(*pickle.loads(pipe.recv_bytes()))

    def gone(self) -> bool:
        """True if the process ended before it was asked to."""
        return self._process is not None and not self._stopped and not self._process.is_alive()

    def stop(self) -> None:
        """Ask it to commit and ack what it holds, then exit."""
        self._stopped = True
        self._stop.set()

    def join(self) -> None:
        self.stop()
        if self._process is None:
            return
        self._process.join(90)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(5)
        if self._reports is not None:
            self._reports.join(5)


def events_main(
    settings_values: dict[str, Any],
    client_id: str,
    flavour: Flavour | None,
    retire: bool,
    control: tuple[EventFlag, EventFlag, EventFlag],
    forward: Connection,
) -> None:
    """Entry point of the events process: the events link, a committer thread, until stopped."""
    settings = child_process(settings_values)
    ready, drained, stop = control
    pipeline = Pipeline(settings, {EVENT_LANE: client_id}, retire=retire, clock=time.time, forward=forward)
    link = pipeline.links[EVENT_LANE]
    committer_in, to_committer = multiprocessing.Pipe(duplex=False)
    reports_in, reports_out = multiprocessing.Pipe(duplex=False)
    committer = Committer(settings, committer_in, reports_out, step=batch_step(settings), flavour=flavour)
    writing = threading.Thread(target=committer.run, name="events-committer")
    writing.start()
    sender = pipeline.start_threads(to_committer, reports_in)
    try:
        link.start()
        while not stop.wait(0.1) and not pipeline._committer_gone.is_set():
            if link.ready.is_set():
                ready.set()
            if retire and link.drained():
                drained.set()
        pipeline.finish(sender)
    finally:
        writing.join(30)
        pipeline.stop_links()


def _send_keepalive(client: mqtt.Client) -> None:
    """From paho's own thread, while it is held in on_message: queue a PINGREQ, write out.

    paho offers no public call for this; ``_send_simple_command`` queues the two-byte
    packet and ``loop_write`` (safe in the network thread, which is where we are) writes it
    after whatever was queued before it, PUBACKs included, so the stream stays well formed.
    The PINGRESP is read once the wait is over.
    """
    try:
        client._send_simple_command(mqtt.PINGREQ)
        client.loop_write()
    except (OSError, AttributeError):  # the connection is going anyway: paho reconnects
        pass

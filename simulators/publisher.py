"""Paced MQTT publisher: a fleet of simulated wristbands or hubs, one process per paho client.

Used by ``eldercare bench ingest`` (load at a fixed total rate) and by ``eldercare demo``
(a small fleet publishing until stopped). Each publisher process has its own paho-mqtt 2
client (MQTT 3.1.1 by default, the cheaper protocol for a publisher; MQTT 5 with
``PublishPlan.protocol``), QoS 1, and owns a slice of the fleet, so a ``msg_id``
(``<tag>-<sequence>``) is unique per device within a run tag.

On MQTT 5 a publisher does what device-mqtt.md asks of a device: a PUBACK with reason 0x10
(No matching subscribers) means "not taken", so the message is sent again (same ``msg_id``)
until the broker takes it; ``ProcessReport.not_taken`` counts those answers.

Pacing is a token bucket holding at most a few milliseconds of tokens: messages go out
evenly, never in bursts, and a process that cannot keep up loses tokens instead of catching
up later, so its achieved rate (reported) shows the shortfall honestly.

Payload shapes (device-mqtt.md):
- ``telemetry``: ``eldercare/v1/devices/<id>/telemetry``,
  ``{"msg_id", "ts": <epoch ms at publish>, "metrics": {"heart_rate", "spo2", "steps"}}``:
  3 data points per message.
- ``hub``: ``eldercare/v1/hubs/<hub>/telemetry``,
  ``{"msg_id", "devices": {"<sub_id>": {"samples": [{"ts", "metrics": {3 metrics}}, ...]}}}``:
  one attached sub-device per message (the hub's sub-devices in turn), ``samples_per_message``
  samples of the same 3 metrics, oldest first, the newest stamped at publish time:
  ``3 × samples_per_message`` data points per message.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import queue
import random
import signal
import time
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import paho.mqtt.client as mqtt
import psycopg
from paho.mqtt.enums import CallbackAPIVersion

from eldercare.devices.connection import MqttTarget
from eldercare.simulators.device_link import NO_MATCHING_SUBSCRIBERS
from eldercare.simulators.population import Population

Variant = Literal["telemetry", "hub"]
METRICS_PER_SAMPLE = 3  # heart_rate, spo2, steps

#: The token bucket holds at most this much time's worth of messages.
BURST_S = 0.005
#: A process reaching less than this share of its target rate did not keep up.
KEPT_UP_SHARE = 0.98


@dataclass(frozen=True)
class Fleet:
    """The simulated devices: wristbands publishing directly, or hubs relaying sub-devices."""

    variant: Variant = "telemetry"
    #: telemetry: number of wristbands; hub: number of hubs.
    size: int = 1_000
    #: hub variant: wristbands attached to each hub.
    subs_per_hub: int = 10
    #: hub variant: samples per message.
    samples_per_message: int = 100
    #: hub variant: time between consecutive samples of one message.
    sample_spacing_ms: int = 10
    #: Distinguishes fleets sharing one database (e.g. ``bench``, ``demo``).
    prefix: str = "bench"
    #: telemetry variant: who the elders are and how often their vitals breach a rule
    #: (``population.py``); None: plausible values, no care plans.
    population: Population | None = None

    @property
    def datapoints_per_message(self) -> int:
        """Observations one message carries."""
        if self.variant == "hub":
            return METRICS_PER_SAMPLE * self.samples_per_message
        return METRICS_PER_SAMPLE

    def publisher_ids(self) -> list[str]:
        """The ids that publish: wristband ids, or hub ids."""
        if self.variant == "hub":
            return [f"hub-{self.prefix}-{h:04d}" for h in range(self.size)]
        return [f"dev-{self.prefix}-{i:04d}" for i in range(self.size)]

    def sub_ids(self, hub_index: int) -> list[str]:
        """The wristbands attached to hub number ``hub_index``."""
        return [f"sub-{self.prefix}-{hub_index:04d}-{k:02d}" for k in range(self.subs_per_hub)]

    def topic(self, publisher_id: str) -> str:
        """The telemetry topic of one publisher id."""
        kind = "hubs" if self.variant == "hub" else "devices"
        return f"eldercare/v1/{kind}/{publisher_id}/telemetry"


@dataclass(frozen=True)
class PublishPlan:
    """What to publish, where and how fast; stops at ``count``, ``duration_s`` or ``stop()``."""

    mqtt_url: str
    fleet: Fleet = field(default_factory=Fleet)
    #: Total messages per second over all processes; None: as fast as the processes can.
    rate: float | None = 1_000.0
    #: Total messages to publish (None: no limit).
    count: int | None = None
    #: Seconds to publish for (None: no limit).
    duration_s: float | None = None
    processes: int = 1
    #: msg_id prefix; use a new tag for every run against the same database.
    tag: str = "m"
    qos: int = 1
    #: Seconds to wait, after the last publish, for the broker's PUBACKs.
    ack_timeout_s: float = 30.0
    #: Per-device accounts, ``(publisher_id, mqtt://id:password@host:port)``: each device (or
    #: hub) then connects as itself, as the project's ACL requires (``client_id = username =
    #: id``). For small fleets (the demo); without them every process uses ``mqtt_url``.
    device_urls: tuple[tuple[str, str], ...] = ()
    #: "3.1.1" or "5" (reason codes: 0x10 answers are sent again).
    protocol: str = "3.1.1"


@dataclass(frozen=True)
class ProcessReport:
    """What one publisher process did."""

    index: int
    target_rate: float | None
    published: int
    acked: int
    #: Wall-clock (epoch seconds) of the first and last publish.
    first_publish: float
    last_publish: float
    #: Messages published in each whole second since the common start.
    per_second: tuple[int, ...]
    error: str | None = None
    #: MQTT 5: PUBACKs with reason 0x10 (each message sent again until taken).
    not_taken: int = 0

    @property
    def achieved_rate(self) -> float:
        """Messages per second over this process's publishing time."""
        span = self.last_publish - self.first_publish
        return self.published / span if span > 0 and self.published > 1 else 0.0


@dataclass(frozen=True)
class PublishReport:
    """What all publisher processes of one plan did together."""

    target_rate: float | None
    started_at: float
    processes: tuple[ProcessReport, ...]
    datapoints_per_message: int
    #: The plan's msg_id tag: every msg_id of this run starts with ``<tag>-``.
    tag: str = ""

    @property
    def published(self) -> int:
        return sum(p.published for p in self.processes)

    @property
    def acked(self) -> int:
        """Messages the broker acknowledged (PUBACK): it holds them."""
        return sum(p.acked for p in self.processes)

    @property
    def not_taken(self) -> int:
        """MQTT 5: 0x10 answers (No matching subscribers), each message sent again."""
        return sum(p.not_taken for p in self.processes)

    @property
    def first_publish(self) -> float:
        firsts = [p.first_publish for p in self.processes if p.published]
        return min(firsts) if firsts else self.started_at

    @property
    def last_publish(self) -> float:
        lasts = [p.last_publish for p in self.processes if p.published]
        return max(lasts) if lasts else self.started_at

    @property
    def achieved_rate(self) -> float:
        """Messages per second from the first to the last publish, all processes."""
        span = self.last_publish - self.first_publish
        return self.published / span if span > 0 and self.published > 1 else 0.0

    @property
    def errors(self) -> list[str]:
        return [f"publisher {p.index}: {p.error}" for p in self.processes if p.error]

    @property
    def kept_up(self) -> bool:
        """Whether the publishers reached the target rate (always true when unpaced)."""
        if self.errors:
            return False
        if self.target_rate is None:
            return True
        return self.achieved_rate >= KEPT_UP_SHARE * self.target_rate

    def per_second(self) -> list[int]:
        """Messages published in each second since the common start, all processes."""
        width = max((len(p.per_second) for p in self.processes), default=0)
        total = [0] * width
        for p in self.processes:
            for i, n in enumerate(p.per_second):
                total[i] += n
        return total


class PublisherRun:
    """Publisher processes at work; ``published()`` is live, ``wait()`` collects reports."""

    def __init__(self, plan: PublishPlan) -> None:
        self.plan = plan
        ctx = mp.get_context("spawn")
        # Each process owns a slice of the fleet: never more processes than publisher ids.
        n = max(1, min(plan.processes, len(plan.fleet.publisher_ids())))
        self._counts = ctx.Array("q", n, lock=False)
        self._ready = ctx.Array("b", n, lock=False)
        self._start_at = ctx.Value("d", 0.0, lock=False)
        self._go = ctx.Event()
        self._stop = ctx.Event()
        self._results: Any = ctx.Queue()
        self._reports: dict[int, ProcessReport] = {}
        self._procs = [
            ctx.Process(
                target=_process_main,
                args=(
                    plan,
                    i,
                    n,
                    self._counts,
                    self._ready,
                    self._start_at,
                    self._go,
                    self._stop,
                    self._results,
                ),
                name=f"eldercare-publisher-{i}",
                daemon=True,
            )
            for i in range(n)
        ]
        for proc in self._procs:
            proc.start()
        self.started_at = 0.0

    def start(self, connect_timeout_s: float = 30.0) -> float:
        """Wait until every process is connected, then start them together; returns t0."""
        deadline = time.monotonic() + connect_timeout_s
        while not all(self._ready):
            self._collect(block=False)
            if self._reports or any(not p.is_alive() for p in self._procs):
                break  # a process failed to connect: start the others, report the error
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError("publisher processes did not connect to the broker in time")
            time.sleep(0.01)
        self.started_at = time.time() + 0.02
        self._start_at.value = self.started_at
        self._go.set()
        return self.started_at

    def pids(self) -> list[int]:
        """The publisher processes' ids (for CPU accounting)."""
        return [p.pid for p in self._procs if p.pid is not None]

    def published(self) -> int:
        """Messages published so far (all processes; updated every few milliseconds)."""
        return sum(self._counts)

    def stop(self) -> None:
        """Ask every process to stop publishing (they still wait for outstanding PUBACKs)."""
        self._stop.set()
        self._go.set()

    def running(self) -> bool:
        return any(p.is_alive() for p in self._procs) and len(self._reports) < len(self._procs)

    def wait(self, timeout_s: float | None = None) -> PublishReport:
        """Wait for every process to finish; returns what they did together."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while len(self._reports) < len(self._procs):
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError("publisher processes did not finish in time")
            if not self._collect(block=True, timeout=min(0.5, remaining or 0.5)) and all(
                not p.is_alive() for p in self._procs
            ):
                self._collect(block=False)
                break
        for proc in self._procs:
            proc.join(timeout=5)
        reports = []
        for i in range(len(self._procs)):
            rep = self._reports.get(i)
            if rep is None:  # died without reporting
                rep = ProcessReport(i, None, self._counts[i], 0, 0.0, 0.0, (), "process died")
            reports.append(rep)
        return PublishReport(
            self.plan.rate,
            self.started_at,
            tuple(reports),
            self.plan.fleet.datapoints_per_message,
            self.plan.tag,
        )

    def close(self) -> None:
        """Stop and reap the processes (kills them if they do not exit in time)."""
        self.stop()
        for proc in self._procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=2)

    def _collect(self, block: bool, timeout: float | None = None) -> bool:
        try:
            rep = self._results.get(block=block, timeout=timeout)
        except queue.Empty:
            return False
        self._reports[rep.index] = rep
        return True

    def __enter__(self) -> PublisherRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_publishers(plan: PublishPlan) -> PublisherRun:
    """Spawn the publisher processes, wait until they are connected and start them together."""
    run = PublisherRun(plan)
    try:
        run.start()
    except BaseException:
        run.close()
        raise
    return run


def publish(plan: PublishPlan) -> PublishReport:
    """Publish a plan to the end (``count`` or ``duration_s`` must be set) and report."""
    if plan.count is None and plan.duration_s is None:
        raise ValueError("publish() needs plan.count or plan.duration_s; use start_publishers")
    with start_publishers(plan) as run:
        return run.wait()


# ---- registering the fleet --------------------------------------------------------------


def fleet_rows(fleet: Fleet) -> tuple[list[str], list[tuple[str, str, str | None, str | None]]]:
    """The elders and the device rows ``(device_id, type, elder_id, hub_id)`` of a fleet."""
    elders: list[str] = []
    devices: list[tuple[str, str, str | None, str | None]] = []
    if fleet.variant == "hub":
        for h, hub_id in enumerate(fleet.publisher_ids()):
            devices.append((hub_id, "hub", None, None))
            for k, sub_id in enumerate(fleet.sub_ids(h)):
                elder = f"eld-{fleet.prefix}-{h:04d}-{k:02d}"
                elders.append(elder)
                devices.append((sub_id, "wristband", elder, hub_id))
    else:
        for i, device_id in enumerate(fleet.publisher_ids()):
            elder = f"eld-{fleet.prefix}-{i:04d}"
            elders.append(elder)
            devices.append((device_id, "wristband", elder, None))
    return elders, devices


def register_fleet(conninfo: str, fleet: Fleet) -> int:
    """Register a fleet's elders and devices in one transaction (COPY); returns devices added.

    Idempotent: rows that already exist are left as they are, so a second run reuses them.
    """
    elders, devices = fleet_rows(fleet)
    with psycopg.connect(conninfo) as conn, conn.cursor() as cur:
        cur.execute("CREATE TEMP TABLE new_elders (elder_id text) ON COMMIT DROP")
        with cur.copy("COPY new_elders (elder_id) FROM STDIN") as copy:
            for elder in elders:
                copy.write_row((elder,))
        cur.execute("INSERT INTO elders SELECT elder_id FROM new_elders ON CONFLICT DO NOTHING")
        cur.execute(
            "CREATE TEMP TABLE new_devices"
            " (device_id text, type text, elder_id text, hub_id text) ON COMMIT DROP"
        )
        with cur.copy("COPY new_devices (device_id, type, elder_id, hub_id) FROM STDIN") as copy:
            for row in devices:
                copy.write_row(row)
        # Hubs first: a sub-device's hub_id references its hub.
        cur.execute(
            "INSERT INTO devices (device_id, type, elder_id, hub_id)"
            " SELECT device_id, type, elder_id, hub_id FROM new_devices"
            " ORDER BY hub_id NULLS FIRST ON CONFLICT (device_id) DO NOTHING"
        )
        return cur.rowcount


# ---- inside a publisher process ---------------------------------------------------------


def _value_tables(seed: int) -> tuple[list[int], list[int], list[int]]:
    """Plausible heart rate, SpO2 and step increments, cycled through per device."""
    rnd = random.Random(seed)
    hr = [rnd.randint(58, 96) for _ in range(257)]
    spo2 = [rnd.choice((94, 95, 96, 96, 97, 97, 98, 98, 99)) for _ in range(263)]
    steps = [rnd.choice((0, 0, 0, 1, 2, 4, 8, 12, 20)) for _ in range(269)]
    return hr, spo2, steps


class _Payloads:
    """Builds the payloads of one process's slice of the fleet, device after device."""

    def __init__(self, fleet: Fleet, index: int, processes: int, tag: str) -> None:
        self.fleet = fleet
        self.tag = f"{tag}-p{index}-".encode()
        ids = fleet.publisher_ids()
        mine = range(index, len(ids), processes)
        #: This process's publisher ids, in slot order.
        self.ids = [ids[i] for i in mine]
        self.topics = [fleet.topic(ids[i]) for i in mine]
        self.subs = [fleet.sub_ids(i) for i in mine] if fleet.variant == "hub" else []
        self.steps = [0] * (len(self.topics) * max(1, fleet.subs_per_hub))
        self.hr, self.spo2, self.step_inc = _value_tables(index * 7919 + 17)
        pop = fleet.population if fleet.variant == "telemetry" else None
        self.vitals = pop.vitals(mine, index) if pop is not None else None
        self.seq = 0

    def __bool__(self) -> bool:
        return bool(self.topics)

    def next(self, now_ms: int) -> tuple[int, str, bytes]:
        """The next message: (slot of its publisher id, topic, payload)."""
        seq = self.seq
        self.seq = seq + 1
        n = len(self.topics)
        slot = seq % n
        if self.fleet.variant == "hub":
            return slot, self.topics[slot], self._hub(seq, slot, seq // n, now_ms)
        steps = self.steps[slot] + self.step_inc[seq % 269]
        self.steps[slot] = steps
        if self.vitals is None:
            hr, spo2 = self.hr[(seq + slot) % 257], self.spo2[(seq + slot) % 263]
        else:
            hr, spo2 = self.vitals.at(slot, seq, now_ms)
        payload = b'{"msg_id":"%s%d","ts":%d,"metrics":{"heart_rate":%d,"spo2":%d,"steps":%d}}' % (
            self.tag,
            seq,
            now_ms,
            hr,
            spo2,
            steps,
        )
        return slot, self.topics[slot], payload

    def _hub(self, seq: int, slot: int, round_: int, now_ms: int) -> bytes:
        subs = self.subs[slot]
        k = round_ % len(subs)
        state = slot * len(subs) + k
        steps = self.steps[state]
        n = self.fleet.samples_per_message
        spacing = self.fleet.sample_spacing_ms
        parts = []
        for i in range(n):
            steps += self.step_inc[(seq + i) % 269]
            parts.append(
                b'{"ts":%d,"metrics":{"heart_rate":%d,"spo2":%d,"steps":%d}}'
                % (
                    now_ms - (n - 1 - i) * spacing,
                    self.hr[(seq + i) % 257],
                    self.spo2[(seq + i) % 263],
                    steps,
                )
            )
        self.steps[state] = steps
        return b'{"msg_id":"%s%d","devices":{"%s":{"samples":[%s]}}}' % (
            self.tag,
            seq,
            subs[k].encode(),
            b",".join(parts),
        )


def _connect(url: str, client_id: str, protocol: str = "3.1.1") -> mqtt.Client:
    target = MqttTarget(url)
    v5 = protocol == "5"
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
        clean_session=None if v5 else True,
    )
    if target.username:
        client.username_pw_set(target.username, target.password)
    if target.tls:
        client.tls_set()
    # Unlimited in flight and queued on the client side: the pacing bounds what is out.
    client.max_inflight_messages_set(0)
    client.max_queued_messages_set(0)
    client.connect(target.host, target.port, keepalive=60)
    deadline = time.monotonic() + 10
    while not client.is_connected():
        if client.loop(timeout=0.05) != mqtt.MQTT_ERR_SUCCESS or time.monotonic() > deadline:
            raise ConnectionError(f"no CONNACK from {target!r}")
    return client


def _process_main(
    plan: PublishPlan,
    index: int,
    processes: int,
    counts: Any,
    ready: Any,
    start_at: Any,
    go: Any,
    stop: Any,
    results: Any,
) -> None:
    """Entry point of one publisher process (spawned)."""
    # Ctrl-C reaches the whole process group: the parent decides when to stop (stop event).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    rate = None if plan.rate is None else plan.rate / processes
    count = None if plan.count is None else _share(plan.count, index, processes)
    empty = ProcessReport(index, rate, 0, 0, 0.0, 0.0, ())
    payloads = _Payloads(plan.fleet, index, processes, plan.tag)
    clients: list[mqtt.Client] = []
    try:
        if plan.device_urls:
            urls = dict(plan.device_urls)
            # One connection per device of this process's slice, as that device.
            for device_id in payloads.ids:
                clients.append(_connect(urls[device_id], device_id, plan.protocol))
        else:
            client_id = f"eldercare-pub-{plan.tag}-{index}-{os.getpid()}"
            clients.append(_connect(plan.mqtt_url, client_id, plan.protocol))
    except Exception as exc:
        for c in clients:
            c.disconnect()
        results.put(replace(empty, error=f"connect failed: {type(exc).__name__}: {exc}"))
        return
    acked = 0
    # MQTT 5: what each client has in flight (packet id -> topic, payload), to send again
    # what the broker answers 0x10. 3.1.1 has no reason codes: nothing to keep.
    resend = _Resend(clients) if plan.protocol == "5" else None

    def on_publish(client, userdata, mid, reason_code, properties) -> None:
        nonlocal acked
        if resend is not None and not resend.answered(client, mid, reason_code.value):
            return
        acked += 1

    for client in clients:
        client.on_publish = on_publish
    ready[index] = 1
    go.wait()
    published = 0
    per_second: list[int] = []
    first = last = 0.0
    error = None
    try:
        if payloads and not stop.is_set() and count != 0:
            published, per_second, first, last = _pace(
                clients, payloads, rate, count, plan, start_at.value, counts, index, stop, resend
            )
        # Wait for the broker's PUBACKs: only then does it hold every message.
        deadline = time.monotonic() + plan.ack_timeout_s
        while acked < published and time.monotonic() < deadline and error is None:
            if resend is not None:
                resend.send_due()
            for client in clients:
                if client.loop(timeout=0.05 / len(clients)) != mqtt.MQTT_ERR_SUCCESS:
                    error = "connection lost while waiting for PUBACKs"
                    break
        if acked < published and error is None:
            error = f"{published - acked} PUBACKs missing after {plan.ack_timeout_s:.0f} s"
    except Exception as exc:  # reported, not raised: the parent shows it
        error = f"{type(exc).__name__}: {exc}"
    finally:
        counts[index] = published
        for client in clients:
            try:
                client.disconnect()
                client.loop(timeout=0.05)
            except Exception:
                pass
    not_taken = resend.not_taken if resend is not None else 0
    report = ProcessReport(index, rate, published, acked, first, last, tuple(per_second), error, not_taken)
    results.put(report)


class _Resend:
    """MQTT 5 publishers: keeps what is in flight, sends again what was answered 0x10."""

    def __init__(self, clients: list[mqtt.Client]) -> None:
        self.in_flight: dict[tuple[int, int], tuple[mqtt.Client, str, bytes]] = {}
        self.again: list[tuple[mqtt.Client, str, bytes]] = []
        self.not_taken = 0

    def sent(self, client: mqtt.Client, info: mqtt.MQTTMessageInfo, topic: str, payload: bytes) -> None:
        self.in_flight[(id(client), info.mid)] = (client, topic, payload)

    def answered(self, client: mqtt.Client, mid: int, reason: int) -> bool:
        """Settle one PUBACK; True if the broker took the message."""
        message = self.in_flight.pop((id(client), mid), None)
        if reason == NO_MATCHING_SUBSCRIBERS and message is not None:
            self.not_taken += 1
            self.again.append(message)
            return False
        return True

    def send_due(self) -> None:
        """Send again what was not taken (paho's thread is ours: called from the pacing loop)."""
        again, self.again = self.again, []
        for client, topic, payload in again:
            self.sent(client, client.publish(topic, payload, 1), topic, payload)


def _share(total: int, index: int, processes: int) -> int:
    return total // processes + (1 if index < total % processes else 0)


def _pace(
    clients: list[mqtt.Client],
    payloads: _Payloads,
    rate: float | None,
    count: int | None,
    plan: PublishPlan,
    start_at: float,
    counts: Any,
    index: int,
    stop: Any,
    resend: _Resend | None = None,
) -> tuple[int, list[int], float, float]:
    """Publish paced by a token bucket until count, duration or stop; returns what it did."""
    perf0 = time.perf_counter() + (start_at - time.time())
    while time.perf_counter() < perf0:
        time.sleep(0.001)
    limit = math.inf if count is None else count
    end = math.inf if plan.duration_s is None else perf0 + plan.duration_s
    burst = 1.0 if rate is None else max(4.0, rate * BURST_S)
    tokens = 1.0
    last_refill = time.perf_counter()
    published = 0
    per_second: list[int] = [0]
    first = last = 0.0
    qos = plan.qos
    # One shared connection (the bench), or one per device in payload slot order (the demo).
    pubs = [c.publish for c in clients]
    single = pubs[0] if len(pubs) == 1 else None
    next_check = 0.0
    time_ns = time.time_ns
    while published < limit:
        now = time.perf_counter()
        if now >= end:
            break
        if rate is not None:
            tokens = min(burst, tokens + (now - last_refill) * rate)
            last_refill = now
            if tokens < 1.0:
                time.sleep(max(0.0001, (1.0 - tokens) / rate))
                continue
            n = int(min(tokens, limit - published))
            tokens -= n
        else:
            n = int(min(200, limit - published))
        now_ns = time_ns()
        now_ms = now_ns // 1_000_000
        for _ in range(n):
            slot, topic, payload = payloads.next(now_ms)
            info = (single or pubs[slot])(topic, payload, qos)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                raise ConnectionError(f"publish failed: {mqtt.error_string(info.rc)}")
            if resend is not None:
                resend.sent(clients[0 if single else slot], info, topic, payload)
        if resend is not None and resend.again:
            resend.send_due()
        if not published:
            first = now_ns / 1e9
        last = now_ns / 1e9
        published += n
        second = int(now - perf0)
        while len(per_second) <= second:
            per_second.append(0)
        per_second[second] += n
        # Read PUBACKs and flush what the socket did not take yet.
        for client in clients:
            if client.loop(timeout=0) != mqtt.MQTT_ERR_SUCCESS:
                raise ConnectionError("connection to the broker lost")
        if now >= next_check:
            counts[index] = published
            next_check = now + 0.005
            if stop.is_set():
                break
    counts[index] = published
    return published, per_second, first, last

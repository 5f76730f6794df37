"""Emergency latency: SOS presses published beside the telemetry, timed to their alert's commit.

A separate process (its own MQTT connection and its own database connection) presses SOS
buttons at a steady rate, each press from its own device and elder, so every press opens an
alert and writes one ``alert_outbox`` row (a press for an elder whose alert is open would only
add evidence: no outbox row, no NOTIFY). A press is one ``EmergencyKind``: the SOS event, or
a glucose reading in the catalog's emergency band (another rule, another route). It LISTENs
on ``eldercare_outbox``: PostgreSQL delivers a NOTIFY only after its transaction commits, so
on each one it looks up the presses still waiting, and a press whose outbox row it finds was
committed by then. That time is an upper bound of the commit, late by the look-up's own
start (well under a millisecond here). Publish and commit times are read on this process's
clock; the worker's receipt time (``message_receipts.received_at``; the press is the last
message of its batch, as an event or an emergency-band reading ends a batch) and the decision
time (``alerts.raised_at``) come from the same machine's clock and split the latency.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import queue
import signal
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import paho.mqtt.client as mqtt
import psycopg

from eldercare.gateway.bench.broker import connect_client, mqtt_client
from eldercare.gateway.store.alerts import OUTBOX_CHANNEL

SOS_PREFIX = "sos"
#: After the last press, wait this long at most for the outstanding alerts (a press not
#: committed by then counts as infinitely late in the total's quantiles).
SETTLE_S = 60.0


@dataclass(frozen=True)
class EmergencyKind:
    """What one press is: the device that sends it, where and what, and the rule it raises."""

    #: Also the prefix of its devices' and elders' ids.
    name: str
    device_type: str
    #: The topic's last part: ``events`` (the worker's events lane) or ``telemetry``.
    topic: str
    #: The message, less its msg_id and ts.
    payload: Mapping[str, Any]
    rule: str


SOS = EmergencyKind(SOS_PREFIX, "sos_button", "events", {"event": "sos_pressed"}, "sos")
#: A reading in the catalog's emergency band (blood_glucose < 3.0): it goes in a batch of
#: its own, but over the telemetry session, behind whatever telemetry the broker holds.
SEVERE_HYPOGLYCAEMIA = EmergencyKind(
    "hypo", "glucometer", "telemetry", {"metrics": {"blood_glucose": 2.5}}, "hypoglycaemia_severe"
)


def sos_devices(count: int, offset: int = 0, kind: EmergencyKind = SOS) -> list[tuple[str, str]]:
    """(device id, elder id) of the kind's devices number offset .. offset + count - 1."""
    return [(f"dev-{kind.name}-{i:05d}", f"eld-{kind.name}-{i:05d}") for i in range(offset, offset + count)]


def register_sos_devices(conn: psycopg.Connection, count: int, kind: EmergencyKind = SOS) -> None:
    """Register ``count`` devices of the kind, each with its own elder (no care plan: the defaults)."""
    pairs = sos_devices(count, kind=kind)
    with conn.transaction(), conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO elders (elder_id) VALUES (%s) ON CONFLICT DO NOTHING", [(e,) for _, e in pairs]
        )
        cur.executemany(
            "INSERT INTO devices (device_id, type, elder_id) VALUES (%s, %s, %s)"
            " ON CONFLICT (device_id) DO NOTHING",
            [(d, kind.device_type, e) for d, e in pairs],
        )


@dataclass(frozen=True)
class SosPlan:
    """What the presser does: one press per device, ``rate`` a second, after ``lead_s``."""

    mqtt_url: str
    db_url: str
    devices: tuple[tuple[str, str], ...]
    rate: float = 2.0
    lead_s: float = 5.0
    tag: str = "sos"
    kind: EmergencyKind = SOS
    #: The first press at this epoch time instead of ``lead_s`` after the presser connected:
    #: two pressers then take turns (their presses never coincide by accident).
    start_at: float | None = None

    @property
    def seconds(self) -> float:
        """From start to the last press."""
        return self.lead_s + max(0, len(self.devices) - 1) / self.rate


@dataclass(frozen=True)
class Press:
    """One SOS press and when each part of it happened (epoch seconds; None: never seen)."""

    device_id: str
    elder_id: str
    msg_id: str
    published_at: float
    #: A NOTIFY had come and the alert's outbox row was there: committed by then.
    committed_by: float | None
    #: The worker's receipt of the message, and its decision (inside the transaction).
    received_at: float | None = None
    raised_at: float | None = None

    @property
    def latency(self) -> float | None:
        return None if self.committed_by is None else self.committed_by - self.published_at


@dataclass(frozen=True)
class SosResult:
    """Every press of one run, with the background it ran beside."""

    presses: tuple[Press, ...]
    background: str
    error: str | None = None

    @property
    def committed(self) -> list[Press]:
        return [p for p in self.presses if p.committed_by is not None]

    def quantiles(self, part: str = "total") -> dict[str, float]:
        """p50, p90, p99 and max (seconds) of one part: total, to_worker, worker, commit.

        The total counts every press, one never seen committed as ``inf`` (not within
        SETTLE_S of the last press); the parts only the presses seen all the way.
        """
        values = sorted(v for p in self.committed if (v := _part(p, part)) is not None)
        if part == "total":
            values += [math.inf] * (len(self.presses) - len(self.committed))
        if not values:
            return {}
        return {
            "p50": quantile(values, 0.5),
            "p90": quantile(values, 0.9),
            "p99": quantile(values, 0.99),
            "max": values[-1],
        }


def _part(p: Press, part: str) -> float | None:
    if part == "total":
        return p.latency
    if p.received_at is None or p.raised_at is None or p.committed_by is None:
        return None
    return {
        "to_worker": p.received_at - p.published_at,  # broker and the worker's receiver
        "worker": p.raised_at - p.received_at,  # queue, batch, write, rules up to the decision
        "commit": p.committed_by - p.raised_at,  # writing the alert, COMMIT, NOTIFY delivered
    }[part]


def quantile(values: Sequence[float], q: float) -> float:
    """The q-quantile of sorted values (nearest rank: a value that was measured)."""
    return values[min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))]


class Presser:
    """The presser process: start it, then ``result()`` once its presses are done."""

    def __init__(self, plan: SosPlan) -> None:
        self.plan = plan
        ctx = mp.get_context("spawn")
        self._ready = ctx.Event()
        self._results: Any = ctx.Queue()
        self._proc = ctx.Process(
            target=_presser_main, args=(plan, self._ready, self._results), name="eldercare-sos", daemon=True
        )
        self._proc.start()
        if not self._ready.wait(30):
            self.close()
            raise RuntimeError("the SOS presser did not connect in 30 s")

    @property
    def pid(self) -> int:
        return self._proc.pid or 0

    def result(self, background: str) -> SosResult:
        """Wait for the presses, then add each one's receipt and decision times from the store."""
        try:
            presses, error = self._results.get(timeout=self.plan.seconds + SETTLE_S + 60)
        except queue.Empty:
            presses, error = [], "the SOS presser reported nothing"
        self.close()
        return SosResult(
            tuple(_with_store_times(self.plan.db_url, presses, self.plan.kind.rule)), background, error
        )

    def close(self) -> None:
        self._proc.join(timeout=5)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(timeout=2)


def _with_store_times(db_url: str, presses: list[Press], rule: str) -> list[Press]:
    if not presses:
        return presses
    with psycopg.connect(db_url) as conn:
        rows = conn.execute(
            "SELECT p.msg_id, extract(epoch FROM r.received_at)::float8,"
            " extract(epoch FROM a.raised_at)::float8"
            " FROM unnest(%s::text[], %s::text[], %s::text[]) AS p(device_id, elder_id, msg_id)"
            " LEFT JOIN message_receipts r ON r.device_id = p.device_id AND r.msg_id = p.msg_id"
            " LEFT JOIN alerts a ON a.elder_id = p.elder_id AND a.rule = %s",
            (
                [p.device_id for p in presses],
                [p.elder_id for p in presses],
                [p.msg_id for p in presses],
                rule,
            ),
        ).fetchall()
    times = {msg_id: (rx, raised) for msg_id, rx, raised in rows}
    out = []
    for p in presses:
        rx, raised = times.get(p.msg_id, (None, None))
        out.append(Press(p.device_id, p.elder_id, p.msg_id, p.published_at, p.committed_by, rx, raised))
    return out


def _presser_main(plan: SosPlan, ready: Any, results: Any) -> None:
    """Entry point of the presser process (spawned)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    presses: list[Press] = []
    try:
        with psycopg.connect(plan.db_url, autocommit=True) as conn:
            conn.execute(f"LISTEN {OUTBOX_CHANNEL}")
            client = mqtt_client(f"eldercare-bench-{plan.tag}", "3.1.1", clean=True)
            connect_client(client, plan.mqtt_url, "3.1.1", clean=True)
            deadline = time.monotonic() + 10
            while not client.is_connected():
                if client.loop(timeout=0.05) != mqtt.MQTT_ERR_SUCCESS or time.monotonic() > deadline:
                    raise ConnectionError("no CONNACK")
            ready.set()
            presses = _press(plan, conn, client)
            client.disconnect()
        results.put((presses, None))
    except Exception as exc:  # reported, not raised: the parent shows it
        ready.set()
        results.put((presses, f"{type(exc).__name__}: {exc}"))


def _press(plan: SosPlan, conn: psycopg.Connection, client: mqtt.Client) -> list[Press]:
    start = plan.start_at or time.time() + plan.lead_s
    kind = plan.kind
    published: list[tuple[str, str, str, float]] = []
    committed: dict[int, float] = {}
    waiting: dict[str, int] = {}  # elder id -> press number
    end: float | None = None
    while True:
        now = time.time()
        i = len(published)
        if i < len(plan.devices) and now >= start + i / plan.rate:
            device_id, elder_id = plan.devices[i]
            msg_id = f"{plan.tag}-{i}"
            ts = time.time()
            body = orjson.dumps({"msg_id": msg_id, "ts": int(ts * 1000), **kind.payload})
            info = client.publish(f"eldercare/v1/devices/{device_id}/{kind.topic}", body, qos=1)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                raise ConnectionError(f"publish failed: {mqtt.error_string(info.rc)}")
            client.loop(timeout=0)  # out on the socket now
            published.append((device_id, elder_id, msg_id, ts))
            waiting[elder_id] = i
            continue
        if i == len(plan.devices):
            end = end or now
            if not waiting or now - end > SETTLE_S:
                break
        next_press = start + i / plan.rate if i < len(plan.devices) else now + 0.01
        notified = any(
            True for _ in conn.notifies(timeout=max(0.0, min(0.005, next_press - now)), stop_after=1)
        )
        if notified and waiting:
            looked = time.time()  # what this look-up finds had committed before it started
            rows = conn.execute(
                "SELECT a.elder_id FROM alerts a JOIN alert_outbox o ON o.alert_id = a.id"
                " WHERE a.elder_id = ANY(%s) AND a.rule = %s",
                (list(waiting), kind.rule),
            ).fetchall()
            for (elder_id,) in rows:
                committed[waiting.pop(elder_id)] = looked
        if client.loop(timeout=0) != mqtt.MQTT_ERR_SUCCESS:
            raise ConnectionError("connection to the broker lost")
    return [Press(d, e, m, at, committed.get(k)) for k, (d, e, m, at) in enumerate(published)]

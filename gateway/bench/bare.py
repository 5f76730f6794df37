"""Bare paho subscribers: the baseline that only counts, on the worker's kind of subscription."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import queue
import signal
import time
from dataclasses import dataclass
from typing import Any

from eldercare.gateway.bench.broker import clear_session, connect_client, mqtt_client
from eldercare.gateway.bench.options import Protocol

TOPIC_FILTER = "eldercare/v1/#"


@dataclass(frozen=True)
class BareReport:
    """What one bare subscriber process counted."""

    index: int
    received: int
    first_at: float
    last_at: float
    error: str | None = None


def _bare_main(
    url: str,
    protocol: Protocol,
    client_id: str,
    topic: str,
    index: int,
    counts: Any,
    ready: Any,
    stop: Any,
    results: Any,
) -> None:
    """A bare subscriber process: QoS 1, persistent session, counts messages, nothing else."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops it (stop event)
    received = 0
    first_at = last_at = 0.0

    def on_message(client, userdata, msg) -> None:
        nonlocal received, first_at, last_at
        last_at = time.time()
        if not received:
            first_at = last_at
        received += 1

    def on_connect(client, userdata, flags, reason_code, properties) -> None:
        client.subscribe(topic, qos=1)

    def on_subscribe(client, userdata, mid, reason_codes, properties) -> None:
        ready[index] = 1

    client = mqtt_client(client_id, protocol, clean=False)
    client.on_message = on_message
    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    error = None
    try:
        connect_client(client, url, protocol, clean=False)
        client.loop_start()
        while not stop.wait(0.02):
            counts[index] = received
        counts[index] = received
        client.disconnect()
        client.loop_stop()
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    results.put(BareReport(index, received, first_at, last_at, error))


class BareSubscribers:
    """Bare paho subscriber processes on the worker's kind of subscription (counting only)."""

    def __init__(self, url: str, protocol: Protocol, n: int, group: str = "bench-bare") -> None:
        self.url, self.protocol, self.n = url, protocol, n
        # One subscriber: a plain subscription, as the shipped worker; several: a shared group.
        self.topic = f"$share/{group}/{TOPIC_FILTER}" if group and n > 1 else TOPIC_FILTER
        self.client_ids = [f"eldercare-bench-bare-{i}" for i in range(n)]
        self._ctx = mp.get_context("spawn")
        self._procs: list[Any] = []
        self._counts: Any = None
        self._stop: Any = None
        self._results: Any = None
        self.pids: list[int] = []

    def start(self, timeout_s: float = 30.0) -> None:
        """Start the processes and wait until each has its subscription."""
        ctx = self._ctx
        self._counts = ctx.Array("q", self.n, lock=False)
        ready = ctx.Array("b", self.n, lock=False)
        self._stop = ctx.Event()
        self._results = ctx.Queue()
        self._procs = [
            ctx.Process(
                target=_bare_main,
                args=(
                    self.url,
                    self.protocol,
                    cid,
                    self.topic,
                    i,
                    self._counts,
                    ready,
                    self._stop,
                    self._results,
                ),
                daemon=True,
            )
            for i, cid in enumerate(self.client_ids)
        ]
        for p in self._procs:
            p.start()
        self.pids = [p.pid for p in self._procs]
        deadline = time.monotonic() + timeout_s
        while not all(ready):
            if time.monotonic() > deadline or any(not p.is_alive() for p in self._procs):
                self.stop()
                raise RuntimeError("bare subscribers did not subscribe in time")
            time.sleep(0.01)

    def received(self) -> int:
        return sum(self._counts) if self._counts is not None else 0

    def stop(self) -> list[BareReport]:
        """Disconnect (the sessions stay on the broker) and collect the reports."""
        if not self._procs:
            return []
        self._stop.set()
        reports: list[BareReport] = []
        deadline = time.monotonic() + 15
        while len(reports) < len(self._procs) and time.monotonic() < deadline:
            with contextlib.suppress(queue.Empty):
                reports.append(self._results.get(timeout=0.2))
        for p in self._procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
        self._procs = []
        return reports

    def clear(self) -> None:
        """Forget the sessions on the broker."""
        for cid in self.client_ids:
            clear_session(self.url, cid, self.protocol)

"""The committer writes two batches at once yet acknowledges in arrival order."""

from __future__ import annotations

import pickle
import random
import threading
import time
from collections.abc import Callable
from multiprocessing import Pipe

import psycopg
import pytest

from eldercare.gateway.ingest.alerting import batch_step
from eldercare.gateway.ingest.committer import DONE, DRAIN, PIPELINE_DEPTH, CommitReport, Committer
from eldercare.gateway.settings import Settings
from eldercare.gateway.store.devices import add_device
from eldercare.gateway.store.writer import Received

TOPIC = "eldercare/v1/devices/w-order/telemetry"


def payload(i: int) -> bytes:
    return b'{"msg_id":"o-%d","ts":%d,"metrics":{"heart_rate":%d}}' % (
        i,
        int(time.time() * 1000),
        60 + i % 30,
    )


def test_batches_finishing_out_of_order_are_acknowledged_in_arrival_order(db_url: str) -> None:
    with psycopg.connect(db_url) as conn:
        add_device(conn, "w-order", "wristband", "e-1")
    settings = Settings(database_url=db_url, metrics_port=0, batch_size=50, batch_max_delay_ms=5)
    to_committer, inbound = Pipe()
    outbound, from_committer = Pipe()
    committer = Committer(settings, inbound, outbound)
    write, rnd, lock = committer.writer.write, random.Random(7), threading.Lock()
    in_flight, most = 0, 0

    def slow_write(conn, batch):
        nonlocal in_flight, most
        with lock:
            in_flight += 1
            most = max(most, in_flight)
        try:
            time.sleep(rnd.random() * 0.03)  # so a later batch often commits first
            return write(conn, batch)
        finally:
            with lock:
                in_flight -= 1

    committer.writer.write = slow_write  # type: ignore[method-assign]
    thread = threading.Thread(target=committer.run, daemon=True)
    thread.start()
    n = 1_000
    for start in range(0, n, 25):
        bundle = [
            (TOPIC, payload(i), time.time(), i + 1, 1, 0, False, "main") for i in range(start, start + 25)
        ]
        to_committer.send_bytes(pickle.dumps(bundle))
    to_committer.send_bytes(pickle.dumps(DRAIN))
    acked: list[int] = []
    while (answer := pickle.loads(from_committer.recv_bytes())) != DONE:
        assert isinstance(answer, CommitReport)
        acked += [mid for mid, _, _ in answer.acks]
    thread.join(30)

    assert most == PIPELINE_DEPTH  # batches did overlap
    assert acked == list(range(1, n + 1))
    with psycopg.connect(db_url) as conn:
        row = conn.execute("SELECT count(*) FROM message_receipts WHERE msg_id LIKE 'o-%'").fetchone()
    assert row is not None and row[0] == n


class SlowedCommitter:
    """A committer with the rules on, on pipes, its writes slowed down by kind of batch.

    ``on_write(batch, in_flight)`` sees each batch as its write begins (under a lock, with
    the kinds already being written) and names its kind; ``pauses`` says how long each kind
    takes before it is written.
    """

    def __init__(
        self,
        db_url: str,
        pauses: dict[str, float],
        on_write: Callable[[list[Received], list[str]], str],
    ) -> None:
        with psycopg.connect(db_url) as conn:
            add_device(conn, "w-order", "wristband", "e-1")
            add_device(conn, "p-order", "sos_button", "e-1")
        settings = Settings(database_url=db_url, metrics_port=0, batch_size=50, batch_max_delay_ms=20)
        self._to_committer, inbound = Pipe()
        outbound, self._from_committer = Pipe()
        committer = Committer(settings, inbound, outbound, step=batch_step(settings))
        write, lock, in_flight = committer.writer.write, threading.Lock(), []

        def slow_write(conn, batch):
            with lock:
                kind = on_write(batch, in_flight)
                in_flight.append(kind)
            try:
                time.sleep(pauses[kind])
                return write(conn, batch)
            finally:
                with lock:
                    in_flight.remove(kind)

        committer.writer.write = slow_write  # type: ignore[method-assign]
        self._thread = threading.Thread(target=committer.run, daemon=True)
        self._thread.start()

    def send(self, wires: list[tuple]) -> None:
        self._to_committer.send_bytes(pickle.dumps(wires))

    def drain(self) -> list[CommitReport]:
        """Send DRAIN; every report until DONE."""
        self._to_committer.send_bytes(pickle.dumps(DRAIN))
        reports = []
        while (answer := pickle.loads(self._from_committer.recv_bytes())) != DONE:
            assert isinstance(answer, CommitReport)
            reports.append(answer)
        self._thread.join(30)
        return reports


PENDANT = "eldercare/v1/devices/p-order/events"


def sos(n: int) -> bytes:
    return b'{"msg_id":"s-%d","ts":%d,"event":"sos_pressed"}' % (n, int(time.time() * 1000))


def status(i: int) -> bytes:
    return b'{"ts":%d,"online":true,"battery":%d}' % (int(time.time() * 1000), 50 + i % 50)


def test_the_emergency_lane_writes_an_event_beside_reading_batches_and_acks_in_order(db_url: str) -> None:
    seen_beside: list[list[str]] = []  # what was in flight when an event batch started
    started: set[int] = set()  # packet ids whose batch has started writing
    overtook = 0  # event batches written before an earlier reading batch started

    def on_write(batch: list[Received], in_flight: list[str]) -> str:
        nonlocal overtook
        kind = "events" if any(m.interp.events for m in batch) else "readings"
        if kind == "events":
            seen_beside.append(list(in_flight))
            assert len(batch) == 1, "an urgent message travels alone"
            overtook += any(m not in started for m in range(1, batch[0].mid))
        started.update(m.mid for m in batch)
        return kind

    committer = SlowedCommitter(db_url, {"readings": 0.02, "events": 0.001}, on_write)
    mid = 0
    for start in range(0, 1_000, 25):
        bundle = []
        for i in range(start, start + 25):
            mid += 1
            bundle.append((TOPIC, payload(i), time.time(), mid, 1, 0, False, "main"))
            if i % 100 == 50:  # an SOS in the middle of the telemetry, on the same session
                mid += 1
                bundle.append((PENDANT, sos(i), time.time(), mid, 1, 0, False, "main"))
        committer.send(bundle)
    acked = [m for report in committer.drain() for m, _, _ in report.acks]

    assert acked == list(range(1, mid + 1))  # in arrival order, every one
    assert len(seen_beside) == 10
    assert all("events" not in beside for beside in seen_beside)  # never two event batches at once
    assert any("readings" in beside for beside in seen_beside)  # the lane did not wait behind them
    assert overtook > 0  # nor for a reading slot: it went ahead of messages that came before it
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT count(*) FROM device_events").fetchone() == (10,)
        assert conn.execute("SELECT rule, matches FROM alerts").fetchall() == [("sos", 10)]


@pytest.mark.parametrize(
    ("channel", "make"),
    [("telemetry", payload), ("status", status)],
    ids=["reading-batches", "serial-batches"],
)
def test_the_events_lane_goes_ahead_of_a_queued_backlog_and_is_acked_on_its_own_lane(
    db_url: str, channel: str, make: Callable[[int], bytes]
) -> None:
    """Events of the events session are taken first, whatever the main session has queued: beside
    reading batches waiting for a slot, or ahead of serial batches waiting for their turn."""
    backlog_writing = threading.Event()
    started = 0  # main-lane messages whose batch has started writing
    events_written: list[tuple[list[int], int, list[str]]] = []  # packet ids, started, beside

    def on_write(batch: list[Received], in_flight: list[str]) -> str:
        nonlocal started
        if batch[0].topic == PENDANT:
            events_written.append(([m.mid for m in batch], started, list(in_flight)))
            return "events"
        started += len(batch)
        backlog_writing.set()
        return "main"

    committer = SlowedCommitter(db_url, {"main": 0.03, "events": 0.001}, on_write)
    n, k = 2_000, 5
    topic = f"eldercare/v1/devices/w-order/{channel}"
    for start in range(0, n, 100):
        committer.send(
            [(topic, make(i), time.time(), i + 1, 1, 0, False, "main") for i in range(start, start + 100)]
        )
    assert backlog_writing.wait(10)
    for j in range(1, k + 1):  # the events session numbers its packets on its own
        committer.send([(PENDANT, sos(j), time.time(), j, 1, 0, False, "events")])
    acked: dict[str, list[int]] = {"main": [], "events": []}
    for report in committer.drain():
        acked[report.lane] += [m for m, _, _ in report.acks]

    assert acked == {"main": list(range(1, n + 1)), "events": list(range(1, k + 1))}  # each in its order
    assert [mids for mids, _, _ in events_written] == [[j] for j in range(1, k + 1)]  # one by one, in order
    assert all(before < n // 2 for _, before, _ in events_written), events_written  # ahead of the backlog
    assert all("events" not in beside for _, _, beside in events_written)  # never two event batches at once
    if channel == "status":
        assert all(not beside for _, _, beside in events_written)  # nothing beside a serial batch
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT count(*) FROM device_events").fetchone() == (k,)
        stored = conn.execute("SELECT count(*) FROM message_receipts WHERE device_id = 'w-order'").fetchone()
        assert stored == ((n,) if channel == "telemetry" else (0,))

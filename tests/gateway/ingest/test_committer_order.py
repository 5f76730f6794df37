"""The committer writes two batches at once yet acknowledges in arrival order."""

from __future__ import annotations

import pickle
import random
import threading
import time
from multiprocessing import Pipe

import psycopg

from eldercare.gateway.ingest.alerting import batch_step
from eldercare.gateway.ingest.committer import DONE, DRAIN, PIPELINE_DEPTH, CommitReport, Committer
from eldercare.gateway.settings import Settings
from eldercare.gateway.store.devices import add_device

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
        bundle = [(TOPIC, payload(i), time.time(), i + 1, 1, 0, False) for i in range(start, start + 25)]
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


def test_the_emergency_lane_writes_an_event_beside_reading_batches_and_acks_in_order(db_url: str) -> None:
    with psycopg.connect(db_url) as conn:
        add_device(conn, "w-order", "wristband", "e-1")
        add_device(conn, "p-order", "sos_button", "e-1")
    settings = Settings(database_url=db_url, metrics_port=0, batch_size=50, batch_max_delay_ms=20)
    to_committer, inbound = Pipe()
    outbound, from_committer = Pipe()
    committer = Committer(settings, inbound, outbound, step=batch_step(settings))  # the rules on
    write, lock = committer.writer.write, threading.Lock()
    in_flight: list[str] = []
    seen_beside: list[list[str]] = []  # what was in flight when an event batch started
    started: set[int] = set()  # packet ids whose batch has started writing
    overtook = 0  # event batches written before an earlier reading batch started

    def slow_write(conn, batch):
        nonlocal overtook
        kind = "events" if any(m.interp.events for m in batch) else "readings"
        with lock:
            if kind == "events":
                seen_beside.append(list(in_flight))
                assert len(batch) == 1, "an urgent message travels alone"
                overtook += any(m not in started for m in range(1, batch[0].mid))
            started.update(m.mid for m in batch)
            in_flight.append(kind)
        try:
            time.sleep(0.02 if kind == "readings" else 0.001)
            return write(conn, batch)
        finally:
            with lock:
                in_flight.remove(kind)

    committer.writer.write = slow_write  # type: ignore[method-assign]
    thread = threading.Thread(target=committer.run, daemon=True)
    thread.start()
    mid, pendant = 0, "eldercare/v1/devices/p-order/events"
    for start in range(0, 1_000, 25):
        bundle = []
        for i in range(start, start + 25):
            mid += 1
            bundle.append((TOPIC, payload(i), time.time(), mid, 1, 0, False))
            if i % 100 == 50:  # an SOS in the middle of the telemetry
                mid += 1
                sos = b'{"msg_id":"s-%d","ts":%d,"event":"sos_pressed"}' % (i, int(time.time() * 1000))
                bundle.append((pendant, sos, time.time(), mid, 1, 0, False))
        to_committer.send_bytes(pickle.dumps(bundle))
    to_committer.send_bytes(pickle.dumps(DRAIN))
    acked: list[int] = []
    while (answer := pickle.loads(from_committer.recv_bytes())) != DONE:
        acked += [m for m, _, _ in answer.acks]
    thread.join(30)

    assert acked == list(range(1, mid + 1))  # in arrival order, every one
    assert len(seen_beside) == 10
    assert all("events" not in beside for beside in seen_beside)  # never two event batches at once
    assert any("readings" in beside for beside in seen_beside)  # the lane did not wait behind them
    assert overtook > 0  # nor for a reading slot: it went ahead of messages that came before it
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT count(*) FROM device_events").fetchone() == (10,)
        assert conn.execute("SELECT rule, matches FROM alerts").fetchall() == [("sos", 10)]

"""Arbitrary messages through interpret and the batch writer: every one ends as rows or dead letters."""

from __future__ import annotations

from typing import Any

import orjson
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eldercare.devices.interpret import interpret
from eldercare.gateway.store.devices import add_device
from eldercare.gateway.store.writer import BatchWriter, Received
from tests.devices.test_interpret_properties import (
    NOW,
    POLICY,
    REGISTRY,
    TOPICS,
    device_payloads,
    hub_payloads,
    json_values,
)

payloads = (
    st.binary(max_size=300)
    | json_values.map(orjson.dumps)
    | device_payloads.map(orjson.dumps)
    | hub_payloads.map(orjson.dumps)
)
messages = st.lists(st.tuples(st.sampled_from(TOPICS), payloads), min_size=1, max_size=8)


@pytest.fixture
def conn(db_url: str):
    with psycopg.connect(db_url) as conn:
        for info in sorted(REGISTRY.values(), key=lambda d: d.hub_id is not None):
            add_device(conn, info.device_id, info.type, info.elder_id, info.hub_id)
            if not info.enabled:
                conn.execute("UPDATE devices SET enabled = false WHERE device_id = %s", (info.device_id,))
        conn.commit()
        yield conn


def totals(conn: psycopg.Connection) -> tuple[int, ...]:
    return conn.execute(
        "SELECT (SELECT count(*) FROM observations), (SELECT count(*) FROM device_events),"
        " (SELECT count(*) FROM dead_letters), (SELECT count(*) FROM message_receipts)"
    ).fetchone()


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=messages, seq=st.integers(0, 10**9))
def test_any_batch_is_stored_or_dead_lettered_and_nothing_vanishes(conn, batch: list[Any], seq: int) -> None:
    # A fresh msg_id space per example, so earlier examples' receipts don't count as duplicates.
    received = []
    for i, (topic, payload) in enumerate(batch):
        payload = payload.replace(b'"m-1"', b'"m-%d-%d"' % (seq, i))
        received.append(Received(topic, payload, NOW, interpret(topic, payload, NOW, REGISTRY, POLICY)))
    before = totals(conn)
    result = BatchWriter("plain").write(conn, received)  # must not raise, whatever came in
    after = totals(conn)

    fresh = [m for m in received if m.interp.accepted] if not result.duplicates else None
    assert result.messages == len(batch)
    assert after[0] - before[0] == result.readings
    assert after[1] - before[1] == result.events
    assert after[2] - before[2] >= sum(1 for m in received if not m.interp.accepted)
    if fresh is not None:
        assert result.readings == sum(len(m.interp.readings) for m in fresh)
    for msg in received:  # never silently nothing: accepted content or at least one reason
        assert msg.interp.accepted or msg.interp.rejections

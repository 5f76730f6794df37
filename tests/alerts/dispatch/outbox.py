"""Alerts and outbox rows written as the rules write them, for the dispatcher's tests."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from eldercare.alerts.dispatch.dispatcher import Dispatcher
from eldercare.gateway.store.devices import add_device


def raise_alert(
    db_url: str,
    *,
    route: str = "emergency",
    rule: str = "sos",
    severity: str = "emergency",
    task_due: datetime | None = None,
) -> uuid.UUID:
    """An alert and its outbox row as the rules write them (one transaction, NOTIFY on commit)."""
    elder = f"e-{uuid.uuid4().hex[:8]}"
    device = f"w-{uuid.uuid4().hex[:8]}"
    alert_id = uuid.uuid4()
    now = datetime.now(UTC)
    with psycopg.connect(db_url) as conn:
        add_device(conn, device, "wristband", elder)
        with conn.transaction():
            conn.execute(
                "INSERT INTO elder_profiles (elder_id, name, sex, birth_year, phone, address)"
                " VALUES (%s, '测试乙', 'F', 1941, '13800000000', '某市某区某路 1 号')",
                (elder,),
            )
            conn.execute(
                "INSERT INTO observations (time, device_id, elder_id, metric, value) VALUES (%s, %s, %s,"
                " 'heart_rate', 112)",
                (now, device, elder),
            )
            conn.execute(
                "INSERT INTO alerts (id, elder_id, rule, severity, raised_severity, route, device_id,"
                " observed_at, raised_at, title_zh, title_en, evidence, last_at, updated_at)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, '紧急呼叫', 'SOS', %s, %s, %s)",
                (
                    alert_id,
                    elder,
                    rule,
                    severity,
                    severity,
                    route,
                    device,
                    now,
                    now,
                    Jsonb({"event": "sos"}),
                    now,
                    now,
                ),
            )
            if task_due is not None:  # a follow-up: its task for the family doctor team
                conn.execute(
                    "INSERT INTO tasks (elder_id, kind, assignee, due_at, created_at, source_alert,"
                    " source_rule) VALUES (%s, 'follow_up', 'family_doctor', %s, %s, %s, %s)",
                    (elder, task_due, now, alert_id, rule),
                )
            conn.execute(
                "INSERT INTO alert_outbox (alert_id, reason, severity, route, created_at)"
                " VALUES (%s, 'raised', %s, %s, %s)",
                (alert_id, severity, route, now),
            )
            conn.execute("NOTIFY eldercare_outbox")
    return alert_id


def rows(db_url: str, query: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(db_url) as conn:
        return conn.execute(query, params).fetchall()


class Clock:
    """The wall clock, moved forward at will: deadlines without waiting for them."""

    def __init__(self) -> None:
        self.ahead = 0.0

    def __call__(self) -> float:
        return time.time() + self.ahead


def dispatch_id(db_url: str, alert_id: Any, channel: str) -> uuid.UUID:
    """The id of the alert's dispatch to ``channel`` (not a notice about one)."""
    [(found,)] = rows(
        db_url,
        "SELECT id FROM dispatches WHERE alert_id = %s AND channel = %s AND notice IS NULL",
        alert_id,
        channel,
    )
    return found


async def run_until(dispatchers: list[Dispatcher], done: Any, timeout: float = 15.0) -> None:
    """Run the dispatchers until ``done()`` holds (polled), then stop them."""
    stop = asyncio.Event()
    tasks = [asyncio.create_task(d.run(stop)) for d in dispatchers]
    try:
        async with asyncio.timeout(timeout):
            while not done():
                await asyncio.sleep(0.02)
    finally:
        stop.set()
        await asyncio.gather(*tasks)

"""The acknowledgement API over real HTTP: hotlines (simulated) acknowledge what they received."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import uvicorn

from eldercare.alerts.dispatch.channels import Channels, channels_from
from eldercare.alerts.dispatch.dispatcher import Dispatcher
from eldercare.alerts.rules import load_rule_set
from eldercare.api.app import create_app
from eldercare.gateway.broker import free_port
from eldercare.gateway.settings import Settings
from eldercare.simulators.hotlines import HotlineSimulator
from tests.alerts.dispatch.outbox import Clock, dispatch_id, raise_alert, rows
from tests.waiting import wait_for

RULES = load_rule_set()
HOTLINE_OF = {"120": "120", "12349": "12349", "12320": "12320", "family": "sms"}


@pytest.fixture(scope="module")
def simulator() -> Iterator[HotlineSimulator]:
    with HotlineSimulator(ack_delay_s=600.0) as sim:
        yield sim


@pytest.fixture(autouse=True)
def hotlines_heal(simulator: HotlineSimulator) -> Iterator[None]:
    yield
    for name in simulator.hotlines:
        simulator.set_mode(name, "ok")
        simulator.set_acks(name, delay_s=600.0, statuses=["accepted"])


def channels(sim: HotlineSimulator) -> Channels:
    entries: dict[str, Any] = {
        name: {
            "kind": "sms_gateway" if name == "family" else "webhook",
            "url": sim.url(hotline),
            "secret": sim.secret(hotline),
            "api_key": sim.api_key(hotline),
            "timeout": 1.0,
        }
        for name, hotline in HOTLINE_OF.items()
    }
    return channels_from({"channels": entries}, environ={})


class Api:
    """The API served by uvicorn on a free loopback port, in a thread."""

    def __init__(self, db_url: str, chans: Channels) -> None:
        self.port = free_port()
        app = create_app(Settings(database_url=db_url), chans, RULES)
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Api:
        self.thread.start()
        wait_for(lambda: self.server.started, 10, "the API to listen")
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture
def api(db_url: str, simulator: HotlineSimulator) -> Iterator[Api]:
    with Api(db_url, channels(simulator)) as served:
        yield served


def dispatch_until(
    db_url: str, sim: HotlineSimulator, api: Api, done: Any, clock: Clock | None = None
) -> None:
    """Run a dispatcher whose ack_url points at ``api`` until ``done()`` holds."""
    dispatcher = Dispatcher(
        db_url,
        channels(sim),
        RULES,
        ack_base_url=api.url,
        rng=random.Random(1),
        clock=clock or time.time,
    )

    async def go() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(dispatcher.run(stop))
        try:
            async with asyncio.timeout(20):
                while not done():
                    await asyncio.sleep(0.02)
        finally:
            stop.set()
            await task

    asyncio.run(go())


def test_120s_acknowledgement_wins_and_the_emergency_never_escalates(
    db_url: str, simulator: HotlineSimulator, api: Api
) -> None:
    simulator.set_acks("120", delay_s=0.1, statuses=["accepted", "en_route"])
    before = len(simulator.received("12349"))
    alert_id = raise_alert(db_url)
    clock = Clock()

    def acknowledged() -> bool:
        return rows(
            db_url, "SELECT ack_status FROM dispatches WHERE alert_id = %s AND channel = '120'", alert_id
        ) == [("en_route",)]

    dispatch_until(db_url, simulator, api, acknowledged, clock)
    assert rows(db_url, "SELECT state FROM alerts WHERE id = %s", alert_id) == [("acknowledged",)]
    assert ("acknowledged", "channel:120") in rows(
        db_url, "SELECT to_state, actor FROM alert_history WHERE alert_id = %s", alert_id
    )
    acks = rows(db_url, "SELECT status, moved FROM dispatch_acks ORDER BY id")
    assert acks == [("accepted", True), ("en_route", True)]
    # The 60 s deadline passes: nobody is called, the timer was cancelled by the ack.
    clock.ahead = 120.0
    dispatch_until(db_url, simulator, api, lambda: True, clock)
    time.sleep(0.5)
    assert len(simulator.received("12349")) == before
    assert rows(
        db_url, "SELECT count(*) FROM timers WHERE kind = 'dispatch_escalation' AND cancelled_at IS NOT NULL"
    ) == [(1,)]


def test_acks_are_forward_only_idempotent_and_only_for_the_channels_own_dispatches(
    db_url: str, simulator: HotlineSimulator, api: Api
) -> None:
    alert_id = raise_alert(db_url)
    dispatch_until(
        db_url,
        simulator,
        api,
        lambda: rows(db_url, "SELECT count(*) FROM dispatches WHERE state = 'delivered'") == [(2,)],
    )
    d120 = str(dispatch_id(db_url, alert_id, "120"))
    key = {"Authorization": f"Bearer {simulator.api_key('120')}"}
    with httpx.Client(base_url=api.url) as http:
        missing = http.post(f"/api/v1/dispatches/{d120}/ack", json={"status": "accepted"})
        assert missing.status_code == 401 and missing.headers["content-type"] == "application/problem+json"
        other = {"Authorization": f"Bearer {simulator.api_key('12349')}"}
        assert (
            http.post(
                f"/api/v1/dispatches/{d120}/ack", json={"status": "accepted"}, headers=other
            ).status_code
            == 404
        )
        assert http.get(f"/api/v1/dispatches/{d120}", headers=other).status_code == 404
        first = http.post(
            f"/api/v1/dispatches/{d120}/ack", json={"status": "en_route", "operator": "op-7"}, headers=key
        )
        assert first.status_code == 200 and first.json()["moved"] and first.json()["alert_acknowledged"]
        late = http.post(f"/api/v1/dispatches/{d120}/ack", json={"status": "accepted"}, headers=key)
        assert late.status_code == 200 and late.json() == {
            **late.json(),
            "moved": False,
            "ack_status": "en_route",
        }
        again = http.post(f"/api/v1/dispatches/{d120}/ack", json={"status": "en_route"}, headers=key)
        assert again.json()["moved"] is False
        bad = http.post(f"/api/v1/dispatches/{d120}/ack", json={"status": "maybe"}, headers=key)
        assert bad.status_code == 422
        status = http.get(f"/api/v1/dispatches/{d120}", headers=key).json()
    assert status["ack_status"] == "en_route" and status["state"] == "acknowledged"
    assert [a["outcome"] for a in status["attempt_log"]] == ["delivered"]
    assert rows(db_url, "SELECT status, moved, operator FROM dispatch_acks ORDER BY id") == [
        ("en_route", True, "op-7"),
        ("accepted", False, None),
        ("en_route", False, None),
    ]


def test_a_decline_by_120_escalates_to_12349_at_once(
    db_url: str, simulator: HotlineSimulator, api: Api
) -> None:
    simulator.set_acks("120", delay_s=0.1, statuses=["declined"])
    before = len(simulator.received("12349"))
    alert_id = raise_alert(db_url)
    dispatch_until(db_url, simulator, api, lambda: len(simulator.received("12349")) > before)
    assert rows(
        db_url,
        "SELECT channel, step, state, ack_status FROM dispatches WHERE alert_id = %s ORDER BY step, channel",
        alert_id,
    ) == [
        ("120", 0, "delivered", "declined"),
        ("family", 0, "delivered", None),
        ("12349", 1, "delivered", None),
    ]
    assert rows(db_url, "SELECT state FROM alerts WHERE id = %s", alert_id) == [("escalated",)]


def test_health_and_readiness(api: Api) -> None:
    with httpx.Client(base_url=api.url) as http:
        assert http.get("/healthz").json() == {"status": "ok"}
        assert http.get("/readyz").json() == {"status": "ready"}

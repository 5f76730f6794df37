"""The dispatcher end to end: outbox rows in a real database, simulated hotlines over real HTTP."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from eldercare.alerts.dispatch.channels import Channels, channels_from
from eldercare.alerts.dispatch.dispatcher import Dispatcher
from eldercare.alerts.dispatch.routing import AckStatus
from eldercare.alerts.rules import load_rule_set
from eldercare.gateway.store import dispatches as store
from eldercare.gateway.store.alerts import resolve
from eldercare.simulators.alarm_centre import AlarmCentreSimulator, channel_secret
from eldercare.simulators.hotlines import HotlineSimulator
from tests.alerts.dispatch.outbox import Clock, dispatch_id, raise_alert, rows, run_until

RULES = load_rule_set()


pytestmark = pytest.mark.usefixtures("every_hotline_ok")


def channels(sim: HotlineSimulator, without: tuple[str, ...] = ()) -> Channels:
    """The deployment's channels pointed at the simulators: family contacts by SMS, the family
    doctor team's task queue; ``without`` some of them."""
    entries: dict[str, Any] = {
        name: {"kind": "webhook", "url": sim.url(name), "secret": sim.secret(name), "timeout": 1.0}
        for name in ("120", "12349", "12320")
    }
    entries["family_doctor"] = {
        "kind": "task_queue",
        "url": sim.url("family_doctor"),
        "secret": sim.secret("family_doctor"),
        "timeout": 1.0,
    }
    entries["family"] = {
        "kind": "sms_gateway",
        "url": sim.url("sms"),
        "secret": sim.secret("sms"),
        "timeout": 1.0,
    }
    for name in without:
        del entries[name]
    return channels_from({"channels": entries}, environ={})


@asynccontextmanager
async def serving(d: Dispatcher, timeout: float = 20.0) -> AsyncIterator[None]:
    """Run ``d`` while the block runs (at most ``timeout`` s), then stop it and wait."""
    stop = asyncio.Event()
    task = asyncio.create_task(d.run(stop))
    try:
        async with asyncio.timeout(timeout):
            yield
    finally:
        stop.set()
        await task


def dispatcher(
    db_url: str, sim: HotlineSimulator, name: str = "d1", seed: int = 1, clock: Clock | None = None
) -> Dispatcher:
    return Dispatcher(
        db_url,
        channels(sim),
        RULES,
        ack_base_url="http://127.0.0.1:9",
        name=name,
        rng=random.Random(seed),
        clock=clock or time.time,
    )


def test_an_emergency_reaches_120_and_the_family_at_once_signed_and_minimised(
    db_url: str, simulator: HotlineSimulator
) -> None:
    before = {h: len(simulator.received(h)) for h in simulator.hotlines}
    alert_id = raise_alert(db_url)
    asyncio.run(
        run_until(
            [dispatcher(db_url, simulator)],
            lambda: (
                len(simulator.received("120")) > before["120"]
                and len(simulator.received("sms")) > before["sms"]
            ),
        )
    )
    [to_120] = simulator.received("120")[before["120"] :]
    [to_family] = simulator.received("sms")[before["sms"] :]
    assert to_120.refused is None and to_120.answer == 202  # verified by standardwebhooks
    assert to_120.idempotency_key == to_120.webhook_id
    body = to_120.document
    assert body is not None and body["alert"]["id"] == str(alert_id) and body["channel"] == "120"
    assert body["elder"]["name"] == "测试乙" and body["latest_vitals"]["heart_rate"]["value"] == 112
    assert body["latest_vitals"]["heart_rate"]["unit"] == "/min"
    assert body["ack_url"].endswith(f"/api/v1/dispatches/{to_120.webhook_id}/ack")
    assert to_family.document is not None and "medications" not in to_family.document["elder"]
    # Nobody else: 12349 is the emergency route's second step, after 60 s without an ack.
    assert len(simulator.received("12349")) == before["12349"]
    got = rows(
        db_url,
        "SELECT channel, state, counts_as_ack, attempts, reference FROM dispatches WHERE alert_id = %s"
        " ORDER BY channel",
        alert_id,
    )
    assert got == [
        ("120", "delivered", True, 1, to_120.reference),
        ("family", "delivered", False, 1, to_family.reference),
    ]
    assert rows(db_url, "SELECT state FROM alerts WHERE id = %s", alert_id) == [("dispatched",)]
    assert rows(db_url, "SELECT to_state, actor FROM alert_history WHERE alert_id = %s", alert_id) == [
        ("dispatched", "dispatcher")
    ]
    assert rows(db_url, "SELECT count(*) FROM alert_outbox WHERE done_at IS NULL") == [(0,)]


def test_three_500s_are_retried_with_backoff_and_the_same_idempotency_key(
    db_url: str, simulator: HotlineSimulator
) -> None:
    simulator.set_mode("120", "error_500", times=3)
    before = len(simulator.received("120"))
    alert_id = raise_alert(db_url)

    def delivered() -> bool:
        return any(r.answer == 202 for r in simulator.received("120")[before:])

    asyncio.run(run_until([dispatcher(db_url, simulator)], delivered))
    got = simulator.received("120")[before:]
    assert [r.answer for r in got] == [500, 500, 500, 202]  # delivered on attempt 4
    assert len({r.idempotency_key for r in got}) == 1
    attempts = rows(
        db_url,
        "SELECT a.number, a.outcome, a.status, a.started_at, a.next_attempt_at FROM dispatch_attempts a"
        " JOIN dispatches d ON d.id = a.dispatch_id WHERE d.alert_id = %s AND d.channel = '120'"
        " ORDER BY a.number",
        alert_id,
    )
    assert [(n, o, s) for n, o, s, _, _ in attempts] == [
        (1, "retryable", 500),
        (2, "retryable", 500),
        (3, "retryable", 500),
        (4, "delivered", 202),
    ]
    # Backoff 1 s, 2 s, 4 s, each shortened by at most a quarter (jitter), and respected.
    for (_, _, _, started, due), (_, _, _, next_started, _), base in zip(
        attempts, attempts[1:], (1.0, 2.0, 4.0), strict=False
    ):
        assert 0.75 * base - 0.05 <= (due - started).total_seconds() <= base + 0.5
        assert next_started >= due


def test_a_permanent_refusal_fails_the_dispatch_at_once(db_url: str, simulator: HotlineSimulator) -> None:
    simulator.set_mode("120", "wrong_secret")
    alert_id = raise_alert(db_url)
    asyncio.run(
        run_until(
            [dispatcher(db_url, simulator)],
            lambda: (
                rows(db_url, "SELECT state FROM dispatches WHERE alert_id = %s AND channel = '120'", alert_id)
                == [("failed",)]
            ),
        )
    )
    assert rows(
        db_url,
        "SELECT a.outcome, a.status FROM dispatch_attempts a JOIN dispatches d ON d.id = a.dispatch_id"
        " WHERE d.alert_id = %s AND d.channel = '120'",
        alert_id,
    ) == [("permanent", 401)]


def test_two_dispatchers_never_deliver_one_dispatch_twice(db_url: str, simulator: HotlineSimulator) -> None:
    before = len(simulator.received("12349"))
    alerts = [raise_alert(db_url, route="hotline", rule="sos", severity="urgent") for _ in range(30)]
    asyncio.run(
        run_until(
            [dispatcher(db_url, simulator, "d1", 1), dispatcher(db_url, simulator, "d2", 2)],
            lambda: len(simulator.received("12349")) >= before + len(alerts),
        )
    )
    got = simulator.received("12349")[before:]
    assert len(got) == len(alerts) and not any(r.duplicate for r in got)
    assert rows(db_url, "SELECT count(*), count(DISTINCT dispatcher) FROM dispatch_attempts")[0][0] == len(
        alerts
    )


def history(db_url: str, alert_id: Any) -> list[tuple[Any, ...]]:
    return rows(
        db_url, "SELECT to_state, reason FROM alert_history WHERE alert_id = %s ORDER BY id", alert_id
    )


def test_an_emergency_nobody_acknowledges_in_60_s_escalates_to_12349(
    db_url: str, simulator: HotlineSimulator
) -> None:
    before = {h: len(simulator.received(h)) for h in ("120", "12349")}
    alert_id = raise_alert(db_url)
    clock = Clock()

    async def scenario() -> None:
        async with serving(dispatcher(db_url, simulator, clock=clock), 20):
            while len(simulator.received("120")) == before["120"]:
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.5)
            assert len(simulator.received("12349")) == before["12349"]  # not before the deadline
            clock.ahead = 61.0  # 120 took it but nobody acknowledged within 60 s
            while len(simulator.received("12349")) == before["12349"]:
                await asyncio.sleep(0.02)

    asyncio.run(scenario())
    assert rows(
        db_url,
        "SELECT channel, step, state FROM dispatches WHERE alert_id = %s ORDER BY step, channel",
        alert_id,
    ) == [
        ("120", 0, "delivered"),
        ("family", 0, "delivered"),
        ("12349", 1, "delivered"),
    ]
    assert history(db_url, alert_id) == [
        ("dispatched", "delivered to a channel"),
        ("escalated", "step 2 of route emergency: nobody acknowledged in time"),
    ]
    assert rows(db_url, "SELECT state FROM alerts WHERE id = %s", alert_id) == [("escalated",)]
    assert rows(
        db_url, "SELECT count(*) FROM timers WHERE kind = 'dispatch_escalation' AND fired_at IS NOT NULL"
    ) == [(1,)]


def test_a_permanent_refusal_by_120_escalates_at_once_without_waiting(
    db_url: str, simulator: HotlineSimulator
) -> None:
    simulator.set_mode("120", "wrong_secret")
    before = len(simulator.received("12349"))
    alert_id = raise_alert(db_url)
    asyncio.run(run_until([dispatcher(db_url, simulator)], lambda: len(simulator.received("12349")) > before))
    assert rows(
        db_url,
        "SELECT channel, step, state FROM dispatches WHERE alert_id = %s ORDER BY step, channel",
        alert_id,
    ) == [
        ("120", 0, "failed"),
        ("family", 0, "delivered"),
        ("12349", 1, "delivered"),
    ]
    assert ("escalated", "step 2 of route emergency: every channel refused or declined") in history(
        db_url, alert_id
    )


def notices(sim: HotlineSimulator, hotline: str, since: int) -> list[dict[str, Any]]:
    return [r.document for r in sim.received(hotline)[since:] if r.document and "notice" in r.document]


def test_the_first_acknowledgement_wins_and_the_others_are_told_superseded(
    db_url: str, simulator: HotlineSimulator
) -> None:
    before = {h: len(simulator.received(h)) for h in ("120", "12349", "sms")}
    alert_id = raise_alert(db_url)
    clock = Clock()
    d = dispatcher(db_url, simulator, clock=clock)

    async def scenario() -> None:
        async with serving(d, 20):
            while len(simulator.received("120")) == before["120"]:
                await asyncio.sleep(0.02)
            clock.ahead = 61.0  # 120 does not answer: 12349 is called
            while len(simulator.received("12349")) == before["12349"]:
                await asyncio.sleep(0.02)
            d12349 = dispatch_id(db_url, alert_id, "12349")
            with psycopg.connect(db_url) as conn:
                done = store.acknowledge(conn, d12349, "12349", AckStatus.accepted, d.routing, d.now())
            assert done is not None and done.alert_acknowledged and len(done.superseded) == 1
            while not notices(simulator, "120", before["120"]):
                await asyncio.sleep(0.02)

    asyncio.run(scenario())
    d120 = dispatch_id(db_url, alert_id, "120")
    [notice] = notices(simulator, "120", before["120"])
    assert notice["notice"] == "superseded" and notice["superseded_dispatch_id"] == str(d120)
    assert notice["alert"]["id"] == str(alert_id) and "elder" not in notice
    assert not notices(
        simulator, "sms", before["sms"]
    )  # the family was told, not asked: nothing to supersede
    assert rows(
        db_url,
        "SELECT channel, state FROM dispatches WHERE alert_id = %s ORDER BY created_at, channel",
        alert_id,
    ) == [
        ("120", "superseded"),
        ("family", "delivered"),
        ("12349", "acknowledged"),
        ("120", "delivered"),  # the notice
    ]


def test_resolving_the_alert_stops_retries_and_tells_the_channel(
    db_url: str, simulator: HotlineSimulator
) -> None:
    simulator.set_mode("12349", "error_500", times=0)  # until told otherwise
    before = len(simulator.received("12349"))
    alert_id = raise_alert(db_url, route="hotline", severity="urgent")
    d = dispatcher(db_url, simulator)

    async def scenario() -> None:
        async with serving(d, 20):
            while len(simulator.received("12349")) == before:
                await asyncio.sleep(0.02)
            with psycopg.connect(db_url) as conn:
                resolve(conn, alert_id, "cli:nurse", "false alarm", d.now())
            simulator.set_mode("12349", "ok")
            while not notices(simulator, "12349", before):
                await asyncio.sleep(0.02)
            await asyncio.sleep(2.5)  # the original's next retry would have come by now

    asyncio.run(scenario())
    originals = [
        r for r in simulator.received("12349")[before:] if r.document is None or "notice" not in r.document
    ]
    assert [r.answer for r in originals] == [500]  # tried once, never again once resolved
    assert rows(
        db_url, "SELECT state, notice FROM dispatches WHERE alert_id = %s ORDER BY created_at", alert_id
    ) == [
        ("superseded", None),
        ("delivered", "superseded"),
    ]


def test_12349_down_an_sos_goes_to_120_after_60_s_and_12349_is_told_once_back(
    db_url: str, simulator: HotlineSimulator
) -> None:
    """The SOS route asks the 12349 operator first; 120 if nobody acknowledges within 60 s."""
    simulator.set_mode("12349", "down")
    before = {h: len(simulator.received(h)) for h in ("120", "12349")}
    alert_id = raise_alert(db_url, route="operator_first")
    clock = Clock()
    d = dispatcher(db_url, simulator, clock=clock)
    tried = "SELECT attempts FROM dispatches WHERE alert_id = %s AND channel = '12349'"

    async def scenario() -> None:
        async with serving(d, 30):
            while rows(db_url, tried, alert_id) < [(2,)]:  # refused, and retried
                await asyncio.sleep(0.05)
            clock.ahead = 61.0
            while len(simulator.received("120")) == before["120"]:
                await asyncio.sleep(0.02)
            d120 = dispatch_id(db_url, alert_id, "120")
            with psycopg.connect(db_url) as conn:
                store.acknowledge(conn, d120, "120", AckStatus.accepted, d.routing, d.now())
            simulator.set_mode("12349", "ok")  # back after the outage
            clock.ahead = 200.0  # past any backoff
            while not notices(simulator, "12349", before["12349"]):
                await asyncio.sleep(0.02)

    asyncio.run(scenario())
    d12349 = dispatch_id(db_url, alert_id, "12349")
    got = simulator.received("12349")[before["12349"] :]
    # While down it got nothing; back, it gets the notice, not the stale call-out.
    assert [r.document["notice"] for r in got if r.document] == ["superseded"]
    assert got[-1].document is not None and got[-1].document["superseded_dispatch_id"] == str(d12349)
    assert rows(db_url, "SELECT state FROM alerts WHERE id = %s", alert_id) == [("acknowledged",)]
    outcomes = rows(
        db_url,
        "SELECT a.outcome, a.reason FROM dispatch_attempts a WHERE a.dispatch_id = %s ORDER BY a.number",
        d12349,
    )
    assert outcomes and all(o == ("retryable", "connect error") for o in outcomes)


def test_an_alarm_receiving_centre_gets_the_emergency_over_sia_dc09(db_url: str) -> None:
    """The dispatcher picks the adapter by channel kind: 120 here is an ARC speaking DC-09 (AES)."""
    key = "0123456789ABCDEF"
    alert_id = raise_alert(db_url)

    async def scenario() -> list[Any]:
        centre = AlarmCentreSimulator({"E1001": key})
        await centre.start()
        try:
            entry = {"kind": "sia_dc09", "url": centre.url, "secret": channel_secret(key), "account": "E1001"}
            d = Dispatcher(
                db_url,
                channels_from({"channels": {"120": entry}}, environ={}),
                RULES,
                ack_base_url="http://x",
            )
            async with serving(d, 15):
                while not centre.received():
                    await asyncio.sleep(0.02)
            return list(centre.received())
        finally:
            await centre.stop()

    [event] = asyncio.run(scenario())
    [(dispatch_id, state)] = rows(db_url, "SELECT id, state FROM dispatches WHERE alert_id = %s", alert_id)
    assert event.encrypted and event.account == "E1001" and event.answer == "ACK"
    assert event.dispatch_id == str(dispatch_id) and state == "delivered"


def test_a_follow_up_nobody_takes_by_its_tasks_due_date_goes_to_12320(
    db_url: str, simulator: HotlineSimulator
) -> None:
    before = len(simulator.received("12320"))
    due = datetime.now(UTC) + timedelta(days=7)
    alert_id = raise_alert(
        db_url, route="follow_up", rule="bp_uncontrolled", severity="follow_up", task_due=due
    )
    clock = Clock()
    d = dispatcher(db_url, simulator, clock=clock)
    escalations = "SELECT due_at FROM timers WHERE kind = 'dispatch_escalation' AND key LIKE %s"

    async def scenario() -> None:
        async with serving(d, 20):
            while not rows(db_url, escalations, f"{alert_id}:%"):
                await asyncio.sleep(0.02)
            clock.ahead = 8 * 86_400.0
            while len(simulator.received("12320")) == before:
                await asyncio.sleep(0.02)

    asyncio.run(scenario())
    assert rows(db_url, escalations, f"{alert_id}:%") == [(due,)]
    assert rows(
        db_url, "SELECT channel, step FROM dispatches WHERE alert_id = %s ORDER BY step", alert_id
    ) == [
        ("family_doctor", 0),
        ("12320", 1),
    ]


def test_a_route_step_reaching_no_configured_channel_passes_to_the_next_at_once(
    db_url: str, simulator: HotlineSimulator
) -> None:
    """A deployment without a family doctor system: follow-ups go to 12320 at once, not in 7 days."""
    before = len(simulator.received("12320"))
    due = datetime.now(UTC) + timedelta(days=7)
    alert_id = raise_alert(
        db_url, route="follow_up", rule="bp_uncontrolled", severity="follow_up", task_due=due
    )
    d = Dispatcher(
        db_url,
        channels(simulator, without=("family_doctor",)),
        RULES,
        ack_base_url="http://x",
        rng=random.Random(1),
    )
    asyncio.run(run_until([d], lambda: len(simulator.received("12320")) > before))
    assert rows(db_url, "SELECT channel, step FROM dispatches WHERE alert_id = %s", alert_id) == [
        ("12320", 1)
    ]

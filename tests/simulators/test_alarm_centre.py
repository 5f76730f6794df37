"""The SIA DC-09 adapter against the pysiaalarm-based alarm receiving centre, over TCP on loopback.

pysiaalarm checks a message's timestamp against the wall clock (it has no clock to inject),
so attempts here are stamped with ``time.time()``; the clock-skew case stamps them 10 minutes
behind it. The centre records a message before it answers, so once ``send`` has returned,
``received()`` already holds it: no waiting needed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

import pytest

from eldercare.alerts.dispatch.adapter import Attempt, Channel, Delivered, Permanent, Retryable
from eldercare.alerts.dispatch.sia_adapter import SiaAdapter
from eldercare.simulators.alarm_centre import AlarmCentreSimulator, channel_secret

#: account -> pysiaalarm key (its characters are the AES key), None for clear messages.
ACCOUNTS: dict[str, str | None] = {
    "1234": None,
    "A128": "0123456789ABCDEF",
    "A256": "0123456789ABCDEF0123456789ABCDEF",
}

DOCUMENT: dict[str, Any] = {
    "alert": {
        "rule": "fall_no_recovery",
        "severity": "emergency",
        "title": "跌倒未起身 / Fall, no recovery",
        "evidence": {"event": "fall_detected"},
    },
    "elder": {"id": "e-1001", "location": {"lat": 29.306, "lon": 120.075}},
    "device": {"id": "w-0007", "type": "wristband"},
}

Scenario = Callable[[AlarmCentreSimulator, SiaAdapter], Awaitable[None]]


def run(scenario: Scenario) -> None:
    """Run ``scenario`` with a started centre and an adapter; stop the centre afterwards."""

    async def main() -> None:
        centre = AlarmCentreSimulator(ACCOUNTS)
        await centre.start()
        adapter = SiaAdapter()
        try:
            await scenario(centre, adapter)
        finally:
            await adapter.aclose()
            await centre.stop()

    asyncio.run(main())


def attempt(
    centre: AlarmCentreSimulator,
    account: str = "1234",
    *,
    dispatch_id: str = "8b1c0f",
    number: int = 1,
    timeout_s: float = 2.0,
    behind_s: int = 0,
) -> Attempt:
    key = ACCOUNTS.get(account)
    channel = Channel(
        name="arc",
        kind="sia_dc09",
        url=centre.url,
        secret=channel_secret(key) if key else "",
        timeout_s=timeout_s,
        account=account,
        receiver="R1",
        prefix="L1",
    )
    return Attempt(dispatch_id, number, channel, DOCUMENT, int(time.time()) - behind_s)


@pytest.mark.parametrize(("account", "encrypted"), [("1234", False), ("A128", True), ("A256", True)])
def test_pysiaalarm_decodes_what_the_adapter_sends(account: str, encrypted: bool) -> None:
    async def scenario(centre: AlarmCentreSimulator, adapter: SiaAdapter) -> None:
        outcome = await adapter.send(attempt(centre, account))
        assert isinstance(outcome, Delivered)
        [event] = centre.received()
        assert (event.code, event.account, event.dispatch_id) == ("MA", account, "8b1c0f")
        assert (event.encrypted, event.answer, event.zone) == (encrypted, "ACK", "007")
        assert event.extended["X"] == "120.075000" and event.extended["Y"] == "29.306000"
        assert "device w-0007" in event.extended["I"]

    run(scenario)


def test_a_nak_is_retryable_and_the_retry_is_recognisable_at_the_centre() -> None:
    async def scenario(centre: AlarmCentreSimulator, adapter: SiaAdapter) -> None:
        await centre.set_mode("nak", times=1)
        first = await adapter.send(attempt(centre, "A128", number=1))
        retry = await adapter.send(attempt(centre, "A128", number=2))
        assert isinstance(first, Retryable) and first.reason == "sia nak"
        assert isinstance(retry, Delivered)
        naked, acked = centre.received()
        assert (naked.answer, acked.answer) == ("NAK", "ACK")
        assert naked.sequence == acked.sequence  # DC-09's repeated message
        assert naked.dispatch_id == acked.dispatch_id == "8b1c0f"

    run(scenario)


def test_different_dispatches_reach_the_centre_with_their_own_sequence_and_id() -> None:
    async def scenario(centre: AlarmCentreSimulator, adapter: SiaAdapter) -> None:
        for dispatch_id in ("d-1", "d-2"):
            assert isinstance(await adapter.send(attempt(centre, dispatch_id=dispatch_id)), Delivered)
        one, two = centre.received()
        assert (one.dispatch_id, two.dispatch_id) == ("d-1", "d-2")
        assert one.sequence != two.sequence

    run(scenario)


def test_a_clock_the_centre_refuses_is_a_nak_and_the_next_attempt_uses_the_centres_time() -> None:
    async def scenario(centre: AlarmCentreSimulator, adapter: SiaAdapter) -> None:
        skewed = await adapter.send(attempt(centre, behind_s=600, number=1))
        assert isinstance(skewed, Retryable) and "clock skew +6" in skewed.reason  # about +600 s
        assert isinstance(await adapter.send(attempt(centre, behind_s=600, number=2)), Delivered)
        assert [e.answer for e in centre.received()] == ["NAK", "ACK"]

    run(scenario)


def test_duh_is_permanent() -> None:
    async def scenario(centre: AlarmCentreSimulator, adapter: SiaAdapter) -> None:
        await centre.set_mode("duh")
        outcome = await adapter.send(attempt(centre, "A256"))
        assert isinstance(outcome, Permanent) and "duh" in outcome.reason

    run(scenario)


def test_a_centre_that_is_down_is_retryable_and_takes_messages_again_once_up() -> None:
    async def scenario(centre: AlarmCentreSimulator, adapter: SiaAdapter) -> None:
        await centre.set_mode("down")
        refused = await adapter.send(attempt(centre))
        assert isinstance(refused, Retryable) and refused.reason == "sia connection refused"
        await centre.set_mode("ok")
        assert isinstance(await adapter.send(attempt(centre, number=2)), Delivered)
        assert [e.answer for e in centre.received()] == ["ACK"]

    run(scenario)


def test_a_silent_centre_is_retryable_after_the_channel_timeout() -> None:
    async def scenario(centre: AlarmCentreSimulator, adapter: SiaAdapter) -> None:
        await centre.set_mode("silent")
        started = time.monotonic()
        outcome = await adapter.send(attempt(centre, timeout_s=0.2))
        assert isinstance(outcome, Retryable) and outcome.reason == "sia answer timeout"
        assert 0.2 <= time.monotonic() - started < 1.5
        assert [e.answer for e in centre.received()] == [""]  # decoded, never answered

    run(scenario)


def test_a_slow_centre_delivers_within_the_timeout_and_is_retryable_beyond_it() -> None:
    async def scenario(centre: AlarmCentreSimulator, adapter: SiaAdapter) -> None:
        await centre.set_mode("slow", delay_s=0.05)
        assert isinstance(await adapter.send(attempt(centre, timeout_s=2.0)), Delivered)
        await centre.set_mode("slow", delay_s=1.0)
        outcome = await adapter.send(attempt(centre, timeout_s=0.2, number=2))
        assert isinstance(outcome, Retryable) and outcome.reason == "sia answer timeout"

    run(scenario)


def test_an_account_the_centre_does_not_know_is_refused_with_a_nak() -> None:
    async def scenario(centre: AlarmCentreSimulator, adapter: SiaAdapter) -> None:
        outcome = await adapter.send(attempt(centre, "BEEF"))  # pysiaalarm: a bare "NAK"
        assert isinstance(outcome, Retryable) and outcome.reason == "sia nak"

    run(scenario)


def test_a_key_the_centre_does_not_share_is_refused() -> None:
    async def scenario(centre: AlarmCentreSimulator, adapter: SiaAdapter) -> None:
        sent = attempt(centre, "A128")
        wrong = replace(sent, channel=replace(sent.channel, secret=channel_secret("F" * 16)))
        outcome = await adapter.send(wrong)
        assert isinstance(outcome, Retryable) and outcome.reason == "sia nak"
        assert centre.received() == []  # nothing pysiaalarm could decrypt

    run(scenario)


def test_a_misconfigured_channel_is_permanent_without_a_connection() -> None:
    async def scenario(centre: AlarmCentreSimulator, adapter: SiaAdapter) -> None:
        good = attempt(centre)
        for channel in (
            replace(good.channel, url="http://127.0.0.1:1"),
            replace(good.channel, account="xyz"),
            replace(good.channel, secret="abcd"),
        ):
            outcome = await adapter.send(replace(good, channel=channel))
            assert isinstance(outcome, Permanent) and "misconfigured" in outcome.reason
        assert centre.received() == []

    run(scenario)

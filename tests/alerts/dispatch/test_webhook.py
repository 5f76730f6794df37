"""The webhook adapter against the simulated hotlines, over real HTTP on loopback.

The hotlines verify with the ``standardwebhooks`` library, so a delivered attempt is also a
signature a third party accepts. One simulator serves the module; each test starts from every
hotline ``ok`` and uses dispatch ids of its own. The hotlines record a request before they
answer it, so once ``send`` has returned, ``received()`` holds it: no waiting needed.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import httpx
import pytest

from eldercare.alerts.dispatch.adapter import (
    Adapter,
    Attempt,
    Channel,
    ChannelKind,
    Delivered,
    Permanent,
    Retryable,
)
from eldercare.alerts.dispatch.webhook import (
    MAX_RETRY_AFTER_S,
    WebhookAdapter,
    judge,
    reference_of,
    retry_after_seconds,
)
from eldercare.simulators.hotlines import HotlineSimulator

T = TypeVar("T")

DOCUMENT: dict[str, Any] = {
    "alert": {"id": "a-1", "rule": "fall_no_recovery", "severity": "emergency", "title": "跌倒未起身"},
    "elder": {"id": "e-1001", "name": "测试甲", "medications": ["amlodipine 5mg"], "location": {"lat": 29.3}},
    "device": {"id": "w-0007", "type": "wristband"},
}


pytestmark = pytest.mark.usefixtures("every_hotline_ok")


def channel(
    sim: HotlineSimulator,
    hotline: str = "120",
    *,
    name: str | None = None,
    kind: ChannelKind = "webhook",
    **kw: Any,
) -> Channel:
    return Channel(name=name or hotline, kind=kind, url=sim.url(hotline), secret=sim.secret(hotline), **kw)


def attempt(
    chan: Channel, number: int = 1, dispatch_id: str | None = None, timestamp: int | None = None
) -> Attempt:
    dispatch_id = dispatch_id or f"d-{uuid.uuid4().hex[:12]}"
    document = {"dispatch_id": dispatch_id, **DOCUMENT, "ack_url": "http://127.0.0.1:9/ack"}
    return Attempt(dispatch_id, number, chan, document, int(time.time()) if timestamp is None else timestamp)


def run(scenario: Callable[[WebhookAdapter], Awaitable[T]]) -> T:
    """Run ``scenario`` with a fresh adapter, closed afterwards."""

    async def main() -> T:
        adapter = WebhookAdapter()
        try:
            return await scenario(adapter)
        finally:
            await adapter.aclose()

    return asyncio.run(main())


def send(one: Attempt) -> Delivered | Retryable | Permanent:
    return run(lambda adapter: adapter.send(one))


def test_2xx_is_delivered_with_the_hotlines_reference(simulator: HotlineSimulator) -> None:
    sent = attempt(channel(simulator))
    outcome = send(sent)
    assert isinstance(outcome, Delivered)
    assert outcome.status == 202 and outcome.reference and outcome.reference.startswith("120-")
    assert outcome.latency_s > 0
    got = [r for r in simulator.received("120") if r.webhook_id == sent.dispatch_id]
    assert len(got) == 1 and got[0].refused is None
    assert got[0].idempotency_key == sent.dispatch_id
    assert got[0].user_agent and got[0].user_agent.startswith("eldercare-gateway")
    assert got[0].document == {**sent.document, "attempt": 1, "channel": "120"}


def test_a_retry_is_deduplicated_and_carries_the_same_idempotency_key(simulator: HotlineSimulator) -> None:
    chan = channel(simulator, "12349")
    first = attempt(chan)
    second = attempt(chan, number=2, dispatch_id=first.dispatch_id)

    async def both(adapter: WebhookAdapter) -> tuple[Any, Any]:
        return await adapter.send(first), await adapter.send(second)

    one, two = run(both)
    assert isinstance(one, Delivered) and isinstance(two, Delivered)
    assert two.reference == one.reference
    got = [r for r in simulator.received("12349") if r.webhook_id == first.dispatch_id]
    assert [r.duplicate for r in got] == [False, True]
    assert {r.idempotency_key for r in got} == {first.dispatch_id}
    assert [r.document["attempt"] for r in got if r.document] == [1, 2]


def test_consecutive_attempts_share_one_kept_alive_connection(simulator: HotlineSimulator) -> None:
    chan = channel(simulator, "12320")
    sent = [attempt(chan) for _ in range(3)]

    async def all_three(adapter: WebhookAdapter) -> None:
        for one in sent:
            assert isinstance(await adapter.send(one), Delivered)

    run(all_three)
    ids = {one.dispatch_id for one in sent}
    got = [r for r in simulator.received("12320") if r.webhook_id in ids]
    assert len({r.client_port for r in got}) == 1
    assert {r.http_version for r in got} == {"1.1"}  # plain http://: no HTTP/2 (that needs TLS)


def test_500_is_retryable_with_its_status(simulator: HotlineSimulator) -> None:
    simulator.set_mode("120", "error_500", times=1)
    outcome = send(attempt(channel(simulator)))
    assert outcome == Retryable("http 500", status=500, latency_s=outcome.latency_s)


def test_429_is_retryable_with_the_retry_after_asked_for(simulator: HotlineSimulator) -> None:
    simulator.set_mode("120", "rate_limited", retry_after_s=7)
    outcome = send(attempt(channel(simulator)))
    assert isinstance(outcome, Retryable)
    assert (outcome.reason, outcome.status, outcome.retry_after_s) == ("http 429", 429, 7.0)


def test_a_wrong_secret_is_a_permanent_401(simulator: HotlineSimulator) -> None:
    simulator.set_mode("120", "wrong_secret")
    outcome = send(attempt(channel(simulator)))
    assert isinstance(outcome, Permanent) and (outcome.reason, outcome.status) == ("http 401", 401)


def test_a_stale_timestamp_is_a_permanent_400(simulator: HotlineSimulator) -> None:
    outcome = send(attempt(channel(simulator), timestamp=int(time.time()) - 600))
    assert isinstance(outcome, Permanent) and outcome.status == 400
    assert simulator.received("120")[-1].refused == "timestamp"


def test_a_wrong_path_is_a_permanent_404(simulator: HotlineSimulator) -> None:
    chan = channel(simulator)
    outcome = send(attempt(Channel(chan.name, chan.kind, chan.url + "/nowhere", chan.secret)))
    assert isinstance(outcome, Permanent) and outcome.status == 404


def test_a_hotline_down_is_retryable(simulator: HotlineSimulator) -> None:
    simulator.set_mode("family_doctor", "down")
    outcome = send(attempt(channel(simulator, "family_doctor", kind="task_queue")))
    assert isinstance(outcome, Retryable) and outcome.reason == "connect error" and outcome.status is None


def test_a_hotline_slower_than_the_timeout_is_retryable(simulator: HotlineSimulator) -> None:
    simulator.set_mode("sms", "slow", delay_s=1.0)
    outcome = send(attempt(channel(simulator, "sms", kind="sms_gateway", timeout_s=0.2)))
    assert isinstance(outcome, Retryable) and outcome.reason == "read timeout"
    assert 0.2 <= outcome.latency_s < 1.0


def test_an_answer_dribbled_out_slower_than_the_attempts_deadline_is_retryable() -> None:
    """Each byte comes within the read timeout; the whole answer never does."""

    async def dribble(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
        try:
            while True:
                writer.write(b"a")
                await writer.drain()
                await asyncio.sleep(0.05)  # the misbehaving server's pace, not a test wait
        except ConnectionError:
            pass

    async def scenario() -> Any:
        server = await asyncio.start_server(dribble, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        chan = Channel("120", "webhook", f"http://127.0.0.1:{port}/", "whsec_" + "A" * 44, timeout_s=0.2)
        adapter = WebhookAdapter()
        try:
            return await adapter.send(attempt(chan))
        finally:
            await adapter.aclose()
            server.close()

    outcome = asyncio.run(scenario())
    assert isinstance(outcome, Retryable) and outcome.reason == "attempt deadline"
    assert 0.6 <= outcome.latency_s < 2.0


def test_a_slow_hotline_within_the_timeout_is_delivered(simulator: HotlineSimulator) -> None:
    simulator.set_mode("sms", "slow", delay_s=0.2)
    outcome = send(attempt(channel(simulator, "sms", kind="sms_gateway", timeout_s=2.0)))
    assert isinstance(outcome, Delivered) and outcome.latency_s >= 0.2


def test_the_family_channel_never_receives_medications(simulator: HotlineSimulator) -> None:
    family = attempt(channel(simulator, "sms", name="family", kind="sms_gateway"))
    emergency = attempt(channel(simulator, "120"))
    assert isinstance(send(family), Delivered) and isinstance(send(emergency), Delivered)
    (got,) = [r.document for r in simulator.received("sms") if r.webhook_id == family.dispatch_id]
    assert got is not None and got["channel"] == "family" and "medications" not in got["elder"]
    (full,) = [r.document for r in simulator.received("120") if r.webhook_id == emergency.dispatch_id]
    assert full is not None and full["elder"]["medications"] == ["amlodipine 5mg"]


def test_several_secrets_during_rotation_are_all_sent_and_one_verifies(simulator: HotlineSimulator) -> None:
    from eldercare.alerts.dispatch.signing import new_secret

    chan = channel(simulator)
    rotating = Channel(chan.name, chan.kind, chan.url, f"{new_secret()} {chan.secret}")
    sent = attempt(rotating)
    assert isinstance(send(sent), Delivered)
    (got,) = [r for r in simulator.received("120") if r.webhook_id == sent.dispatch_id]
    assert got.signatures == 2


@pytest.mark.parametrize(
    ("url", "secret", "reason"),
    [
        ("ftp://127.0.0.1/x", None, "bad channel url"),
        (None, "", "bad channel secret"),
        (None, "whsec_%%%", "bad channel secret"),
    ],
)
def test_a_channel_configured_wrongly_is_permanent(
    simulator: HotlineSimulator, url: str | None, secret: str | None, reason: str
) -> None:
    chan = channel(simulator)
    wrong = Channel(chan.name, chan.kind, url or chan.url, chan.secret if secret is None else secret)
    outcome = send(attempt(wrong))
    assert isinstance(outcome, Permanent) and outcome.reason == reason


def test_it_is_an_adapter_and_closes_only_a_client_it_made() -> None:
    async def both() -> bool:
        made: Adapter = WebhookAdapter()  # mypy checks it against the protocol
        await made.aclose()
        async with httpx.AsyncClient() as shared:
            await WebhookAdapter(client=shared).aclose()
            return shared.is_closed

    assert asyncio.run(both()) is False


def test_latency_is_measured_with_the_injected_clock(simulator: HotlineSimulator) -> None:
    ticks = iter([100.0, 100.25])

    async def once() -> Any:
        adapter = WebhookAdapter(monotonic=lambda: next(ticks))
        try:
            return await adapter.send(attempt(channel(simulator)))
        finally:
            await adapter.aclose()

    assert asyncio.run(once()).latency_s == 0.25


# --- what an answer means, without a network ----------------------------------------------


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (200, Delivered),
        (201, Delivered),
        (204, Delivered),
        (408, Retryable),
        (429, Retryable),
        (500, Retryable),
        (502, Retryable),
        (503, Retryable),
        (599, Retryable),
        (400, Permanent),
        (401, Permanent),
        (403, Permanent),
        (404, Permanent),
        (409, Permanent),
        (422, Permanent),
        (301, Permanent),  # a webhook URL that redirects is configured wrongly
        (307, Permanent),
    ],
)
def test_each_status_means_what_the_spec_says(status: int, kind: type) -> None:
    outcome = judge(httpx.Response(status), now=0.0, latency_s=0.1)
    assert isinstance(outcome, kind)
    assert outcome.status == status
    if not isinstance(outcome, Delivered):
        assert outcome.reason == f"http {status}"


def test_an_http_date_retry_after_counts_from_the_hotlines_own_date() -> None:
    headers = {"Retry-After": "Wed, 21 Oct 2026 07:28:30 GMT", "Date": "Wed, 21 Oct 2026 07:28:00 GMT"}
    outcome = judge(httpx.Response(503, headers=headers), now=0.0, latency_s=0.0)
    assert isinstance(outcome, Retryable) and outcome.retry_after_s == 30.0


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (None, None),
        ("", None),
        ("soon", None),
        ("nan", None),
        ("120", 120.0),
        (" 1.5 ", 1.5),
        ("0", 0.0),
        ("-5", 0.0),  # in the past: at once
        ("99999999", MAX_RETRY_AFTER_S),  # absurd: cut to an hour
        ("inf", MAX_RETRY_AFTER_S),
        ("Wed, 21 Oct 2026 07:28:45 GMT", 45.0),
        ("Wed, 21 Oct 2026 07:27:00 GMT", 0.0),
        ("Wed, 21 Oct 2099 07:28:00 GMT", MAX_RETRY_AFTER_S),
        ("Wed, 21 Oct 2026 07:28:45 -0000", 45.0),
    ],
)
def test_retry_after_in_seconds_or_as_a_date_is_clamped(value: str | None, seconds: float | None) -> None:
    now = 1792567680.0  # Wed, 21 Oct 2026 07:28:00 GMT
    assert retry_after_seconds(value, now) == seconds


@pytest.mark.parametrize(
    ("content", "reference"),
    [
        (b'{"reference": "120-7"}', "120-7"),
        (b'{"reference": 42}', "42"),
        (b'{"reference": ""}', None),
        (b'{"reference": true}', None),
        (b'{"reference": {"id": 1}}', None),
        (b'{"ok": true}', None),
        (b'["120-7"]', None),
        (b"OK", None),
        (b"<html>accepted</html>", None),
        (b"", None),
        (b"\xff\xfe", None),
    ],
)
def test_the_reference_is_taken_from_json_and_never_fails(content: bytes, reference: str | None) -> None:
    assert reference_of(content) == reference
    outcome = judge(httpx.Response(200, content=content), now=0.0, latency_s=0.0)
    assert isinstance(outcome, Delivered) and outcome.reference == reference

"""The simulated hotlines: verification, deduplication, acknowledgements, failure modes, control.

Requests are signed here with the ``standardwebhooks`` library itself where the hotline's own
checks are under test, and sent with the gateway's ``WebhookAdapter`` where a dispatch is
simply to be delivered. Acknowledgements go to a small real HTTP server that records them.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, get_args

import httpx
import orjson
import pytest
from standardwebhooks.webhooks import Webhook

from eldercare.alerts.dispatch.adapter import Attempt, Channel, Delivered, Outcome, Retryable
from eldercare.alerts.dispatch.webhook import WebhookAdapter
from eldercare.gateway.simulate_commands import ACK_STATUSES, read_secrets_file, write_secrets_file
from eldercare.simulators.hotline_app import AckStatus
from eldercare.simulators.hotlines import ACK_TRIES, ACKS_IN_FLIGHT, HotlineSimulator
from tests.waiting import never, wait_for


@dataclass(frozen=True)
class AckSeen:
    at: float
    path: str
    authorization: str | None
    body: dict[str, Any]


class AckEndpoint:
    """A tiny real HTTP server standing in for the gateway's acknowledgement API.

    It answers 503 to the first ``failing`` requests, then 204; every request is recorded.
    ``service_s``: each request takes this long, one at a time (as a store that writes each
    acknowledgement in a transaction of its own would). ``most_in_hand``: the most requests it
    held at once.
    """

    def __init__(self, failing: int = 0, service_s: float = 0.0) -> None:
        self.seen: list[AckSeen] = []
        self.failing = failing
        self.most_in_hand = 0
        endpoint = self
        in_hand = 0
        counting, one_at_a_time = threading.Lock(), threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                nonlocal in_hand
                with counting:
                    in_hand += 1
                    endpoint.most_in_hand = max(endpoint.most_in_hand, in_hand)
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length) or b"{}")
                if service_s:
                    with one_at_a_time:
                        time.sleep(service_s)  # the simulated API's own pace, not a test wait
                endpoint.seen.append(AckSeen(time.time(), self.path, self.headers.get("Authorization"), body))
                failing = endpoint.failing > 0
                endpoint.failing -= failing
                with counting:
                    in_hand -= 1  # before answering: the sender may send its next one once answered
                self.send_response(503 if failing else 204)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass  # quiet test output

        self._server = _Server(("127.0.0.1", 0), Handler)
        # A short poll: shutdown() waits for serve_forever's next look (0.5 s by default).
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.02,), daemon=True)
        self._thread.start()

    def url(self, dispatch_id: str) -> str:
        return f"http://127.0.0.1:{self._server.server_port}/api/v1/dispatches/{dispatch_id}/ack"

    def statuses(self, dispatch_id: str) -> list[str]:
        return [a.body["status"] for a in self.seen if f"/{dispatch_id}/" in a.path]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class _Server(ThreadingHTTPServer):
    request_queue_size = 512  # a listen backlog for hundreds knocking at once (the default is 5)


@pytest.fixture
def acks() -> Iterator[AckEndpoint]:
    endpoint = AckEndpoint()
    yield endpoint
    endpoint.close()


@pytest.fixture(scope="module")
def simulator() -> Iterator[HotlineSimulator]:
    with HotlineSimulator(ack_delay_s=0.05, ack_backoff_s=0.05) as sim:
        yield sim


@pytest.fixture(autouse=True)
def every_hotline_as_it_was(simulator: HotlineSimulator) -> Iterator[None]:
    yield
    for name in simulator.hotlines:
        simulator.set_mode(name, "ok")
        simulator.set_acks(name, delay_s=0.05, statuses=["accepted"])


def new_id() -> str:
    return f"d-{uuid.uuid4().hex[:12]}"


def document(dispatch_id: str, ack_url: str = "http://127.0.0.1:9/ack") -> dict[str, Any]:
    return {
        "dispatch_id": dispatch_id,
        "attempt": 1,
        "channel": "120",
        "alert": {"rule": "fall_no_recovery", "severity": "emergency"},
        "ack_url": ack_url,
    }


def deliver(sim: HotlineSimulator, hotline: str, dispatch_id: str, ack_url: str, number: int = 1) -> Outcome:
    """Send one attempt with the gateway's adapter."""
    chan = Channel(hotline, "webhook", sim.url(hotline), sim.secret(hotline), timeout_s=2.0)
    attempt = Attempt(dispatch_id, number, chan, document(dispatch_id, ack_url), int(time.time()))

    async def once() -> Outcome:
        adapter = WebhookAdapter()
        try:
            return await adapter.send(attempt)
        finally:
            await adapter.aclose()

    return asyncio.run(once())


def deliver_all(sim: HotlineSimulator, hotline: str, dispatches: list[tuple[str, str]]) -> list[Outcome]:
    """Send one attempt of each (dispatch id, ack URL), four at a time, with the gateway's adapter."""
    chan = Channel(hotline, "webhook", sim.url(hotline), sim.secret(hotline), timeout_s=5.0)
    now = int(time.time())

    async def together() -> list[Outcome]:
        adapter = WebhookAdapter()
        turns = asyncio.Semaphore(4)

        async def one(dispatch_id: str, ack_url: str) -> Outcome:
            async with turns:
                return await adapter.send(Attempt(dispatch_id, 1, chan, document(dispatch_id, ack_url), now))

        try:
            return await asyncio.gather(*(one(d, url) for d, url in dispatches))
        finally:
            await adapter.aclose()

    return asyncio.run(together())


def signed(secret: str, dispatch_id: str, body: bytes, at: float | None = None) -> dict[str, str]:
    """Headers signed by the standardwebhooks library (not the gateway's code)."""
    when = datetime.fromtimestamp(time.time() if at is None else at, UTC)
    return {
        "content-type": "application/json",
        "webhook-id": dispatch_id,
        "webhook-timestamp": str(int(when.timestamp())),
        "webhook-signature": Webhook(secret).sign(dispatch_id, when, body.decode()),
    }


# --- verification and deduplication -------------------------------------------------------


def test_a_request_signed_by_the_library_is_taken_with_a_reference(simulator: HotlineSimulator) -> None:
    dispatch_id = new_id()
    body = orjson.dumps(document(dispatch_id))
    answer = httpx.post(
        simulator.url("12349"), content=body, headers=signed(simulator.secret("12349"), dispatch_id, body)
    )
    assert answer.status_code == 202
    assert answer.json()["reference"].startswith("12349-")


@pytest.mark.parametrize(
    ("case", "status", "why"),
    [
        ("another secret", 401, "signature"),
        ("a changed body", 401, "signature"),
        ("ten minutes old", 400, "timestamp"),
        ("ten minutes ahead", 400, "timestamp"),
        ("no signature", 400, "headers"),
        ("a garbled signature", 401, "signature"),
    ],
)
def test_a_request_that_does_not_verify_is_refused(
    simulator: HotlineSimulator, case: str, status: int, why: str
) -> None:
    dispatch_id = new_id()
    body = orjson.dumps(document(dispatch_id))
    secret = simulator.secret("12320")
    headers = signed(secret, dispatch_id, body)
    if case == "another secret":
        headers = signed("whsec_" + "A" * 44, dispatch_id, body)
    elif case == "a changed body":
        body = body.replace(b"emergency", b"follow_up")
    elif case == "ten minutes old":
        headers = signed(secret, dispatch_id, body, at=time.time() - 600)
    elif case == "ten minutes ahead":
        headers = signed(secret, dispatch_id, body, at=time.time() + 600)
    elif case == "no signature":
        del headers["webhook-signature"]
    elif case == "a garbled signature":
        headers["webhook-signature"] = "v1-not-a-signature"
    answer = httpx.post(simulator.url("12320"), content=body, headers=headers)
    assert answer.status_code == status
    (got,) = [r for r in simulator.received("12320") if r.webhook_id == dispatch_id]
    assert got.refused == why and got.reference is None


def test_a_repeat_gets_the_same_answer_and_is_counted_as_a_duplicate(
    simulator: HotlineSimulator, acks: AckEndpoint
) -> None:
    dispatch_id = new_id()
    before = simulator.state("120")["duplicates"]
    first = deliver(simulator, "120", dispatch_id, acks.url(dispatch_id))
    again = deliver(simulator, "120", dispatch_id, acks.url(dispatch_id), number=2)
    assert isinstance(first, Delivered) and isinstance(again, Delivered)
    assert (again.status, again.reference) == (first.status, first.reference)
    assert simulator.state("120")["duplicates"] == before + 1
    wait_for(lambda: acks.statuses(dispatch_id), 5, "the acknowledgement")
    never(lambda: len(acks.statuses(dispatch_id)) > 1, 0.2, "a second acknowledgement for the repeat")


# --- acknowledgements ---------------------------------------------------------------------


def test_acks_follow_after_the_delay_with_the_configured_statuses(
    simulator: HotlineSimulator, acks: AckEndpoint
) -> None:
    simulator.set_acks("120", delay_s=0.15, statuses=["accepted", "en_route", "on_scene"])
    dispatch_id = new_id()
    outcome = deliver(simulator, "120", dispatch_id, acks.url(dispatch_id))
    assert isinstance(outcome, Delivered)
    wait_for(lambda: len(acks.statuses(dispatch_id)) == 3, 5, "three acknowledgements")
    assert acks.statuses(dispatch_id) == ["accepted", "en_route", "on_scene"]
    sent_at = next(r.at for r in simulator.received("120") if r.webhook_id == dispatch_id)
    seen = [a for a in acks.seen if dispatch_id in a.path]
    assert seen[0].at - sent_at >= 0.15
    assert all(b.at - a.at >= 0.15 for a, b in itertools.pairwise(seen))
    assert {a.authorization for a in seen} == {f"Bearer {simulator.api_key('120')}"}
    assert {a.body["reference"] for a in seen} == {outcome.reference}
    assert all(a.body["operator"] and "note" in a.body for a in seen)


def test_decline_acknowledges_declined(simulator: HotlineSimulator, acks: AckEndpoint) -> None:
    simulator.set_mode("12349", "decline")
    dispatch_id = new_id()
    assert isinstance(deliver(simulator, "12349", dispatch_id, acks.url(dispatch_id)), Delivered)
    wait_for(lambda: acks.statuses(dispatch_id), 5, "the acknowledgement")
    assert acks.statuses(dispatch_id) == ["declined"]


def test_no_ack_takes_the_dispatch_and_never_acknowledges(
    simulator: HotlineSimulator, acks: AckEndpoint
) -> None:
    simulator.set_mode("12320", "no_ack")
    silent, answered = new_id(), new_id()
    assert isinstance(deliver(simulator, "12320", silent, acks.url(silent)), Delivered)
    assert isinstance(deliver(simulator, "120", answered, acks.url(answered)), Delivered)
    wait_for(lambda: acks.statuses(answered), 5, "the other hotline's acknowledgement")
    never(lambda: acks.statuses(silent), 0.2, "an acknowledgement from no_ack")


def test_the_api_key_of_the_acks_is_configurable(simulator: HotlineSimulator, acks: AckEndpoint) -> None:
    simulator.set_acks("sms", api_key="key-for-test")
    dispatch_id = new_id()
    deliver(simulator, "sms", dispatch_id, acks.url(dispatch_id))
    wait_for(lambda: acks.statuses(dispatch_id), 5, "the acknowledgement")
    assert acks.seen[-1].authorization == "Bearer key-for-test"


def test_a_failed_ack_is_recorded_and_tried_again(simulator: HotlineSimulator) -> None:
    endpoint = AckEndpoint(failing=1)
    try:
        dispatch_id = new_id()
        deliver(simulator, "family_doctor", dispatch_id, endpoint.url(dispatch_id))

        def tries() -> list[tuple[int, int | None]]:
            return [
                (a.try_number, a.answer)
                for a in simulator.acks("family_doctor")
                if a.dispatch_id == dispatch_id
            ]

        # The simulator records a try after its answer arrives, so wait on its record, not on the
        # endpoint's (which sees the retry a moment before the simulator writes it down).
        wait_for(lambda: len(tries()) == 2, 5, "the acknowledgement and its retry")
        assert tries() == [(1, 503), (2, 204)]
        assert len(endpoint.statuses(dispatch_id)) == 2
    finally:
        endpoint.close()


def test_acks_due_together_take_turns_and_none_times_out_waiting() -> None:
    """150 dispatches delivered, acknowledged ``ack_delay_s`` later to an API that takes one
    acknowledgement at a time: they come due faster than it answers, queue in the simulator
    (``ACKS_IN_FLIGHT`` at the API at once) and each is taken at the first try, none timing out
    while it waits its turn."""
    endpoint = AckEndpoint(service_s=0.02)  # ~3 s of the API's time for all of them
    try:
        # The timeout: ~9x what the acks in flight take (8 x 20 ms), half what all of them take
        # (room for a machine busy with other tests, none for acks queued in httpx's pool).
        with HotlineSimulator(["120"], ack_delay_s=0.6, ack_timeout_s=1.5) as sim:
            ids = [new_id() for _ in range(150)]
            outcomes = deliver_all(sim, "120", [(d, endpoint.url(d)) for d in ids])
            assert all(isinstance(o, Delivered) for o in outcomes)

            def settled() -> int:
                tries = sim.acks("120")
                taken = {a.dispatch_id for a in tries if a.answer == 204}
                given_up = Counter(a.dispatch_id for a in tries if a.answer != 204)
                return len(taken | {d for d, n in given_up.items() if n == ACK_TRIES})

            wait_for(lambda: settled() == len(ids), 20, "every acknowledgement taken or given up")
            tries = sim.acks("120")
        assert sorted(a.dispatch_id for a in tries) == sorted(ids)  # one try each
        assert {(a.try_number, a.answer, a.error) for a in tries} == {(1, 204, None)}
        assert sorted(a.path for a in endpoint.seen) == sorted(f"/api/v1/dispatches/{d}/ack" for d in ids)
        assert 1 < endpoint.most_in_hand <= ACKS_IN_FLIGHT
    finally:
        endpoint.close()


def test_an_unreachable_ack_url_is_recorded_and_the_hotline_keeps_working(
    simulator: HotlineSimulator, acks: AckEndpoint
) -> None:
    lost = new_id()
    deliver(simulator, "family_doctor", lost, "http://127.0.0.1:9/unreachable")
    wait_for(
        lambda: len([a for a in simulator.acks("family_doctor") if a.dispatch_id == lost]) == 3,
        5,
        "three tries to acknowledge",
    )
    tries = [a for a in simulator.acks("family_doctor") if a.dispatch_id == lost]
    assert all(a.answer is None and a.error for a in tries)
    after = new_id()
    assert isinstance(deliver(simulator, "family_doctor", after, acks.url(after)), Delivered)
    wait_for(lambda: acks.statuses(after), 5, "the next acknowledgement")


# --- failure modes and the control endpoint -----------------------------------------------


def test_error_500_answers_500_n_times_then_heals(simulator: HotlineSimulator, acks: AckEndpoint) -> None:
    simulator.set_mode("120", "error_500", times=2)
    dispatch_id = new_id()
    outcomes = [deliver(simulator, "120", dispatch_id, acks.url(dispatch_id), number=n) for n in (1, 2, 3)]
    assert [o.status for o in outcomes] == [500, 500, 202]
    assert simulator.state("120")["mode"] == "ok"


def test_the_control_endpoint_breaks_and_heals_a_hotline(
    simulator: HotlineSimulator, acks: AckEndpoint
) -> None:
    control = f"{simulator.control_url}/12349"
    assert httpx.post(control, json={"mode": "down"}).json()["mode"] == "down"
    dispatch_id = new_id()
    refused = deliver(simulator, "12349", dispatch_id, acks.url(dispatch_id))
    assert isinstance(refused, Retryable) and refused.reason == "connect error"
    assert isinstance(deliver(simulator, "120", new_id(), acks.url("x")), Delivered)  # the others stay up

    assert httpx.post(control, json={"mode": "rate_limited", "retry_after_s": 9}).status_code == 200
    limited = deliver(simulator, "12349", dispatch_id, acks.url(dispatch_id), number=2)
    assert isinstance(limited, Retryable) and limited.retry_after_s == 9.0

    assert httpx.post(control, json={"mode": "ok"}).json()["mode"] == "ok"
    healed = deliver(simulator, "12349", dispatch_id, acks.url(dispatch_id), number=3)
    assert isinstance(healed, Delivered)

    state = httpx.get(control).json()
    log = [r for r in state["received_log"] if r["webhook_id"] == dispatch_id]
    assert [(r["answer"], r["refused"]) for r in log] == [(429, "rate_limited"), (202, None)]
    assert state["mode"] == "ok" and state["url"] == simulator.url("12349")
    wait_for(lambda: acks.statuses(dispatch_id), 5, "the acknowledgement once healed")
    assert any(a["dispatch_id"] == dispatch_id for a in httpx.get(control).json()["acks_log"])


def test_the_control_endpoint_sets_slow_and_the_ack_plan(
    simulator: HotlineSimulator, acks: AckEndpoint
) -> None:
    control = f"{simulator.control_url}/sms"
    change = {"mode": "slow", "delay_s": 0.2, "ack_delay_s": 0.1, "ack_statuses": ["accepted", "closed"]}
    state = httpx.post(control, json=change).json()
    assert (state["mode"], state["delay_s"], state["ack_statuses"]) == ("slow", 0.2, ["accepted", "closed"])
    dispatch_id = new_id()
    outcome = deliver(simulator, "sms", dispatch_id, acks.url(dispatch_id))
    assert isinstance(outcome, Delivered) and outcome.latency_s >= 0.2
    wait_for(lambda: acks.statuses(dispatch_id) == ["accepted", "closed"], 5, "both acknowledgements")


def test_the_control_endpoint_refuses_what_it_does_not_know(simulator: HotlineSimulator) -> None:
    assert httpx.post(f"{simulator.control_url}/110", json={"mode": "ok"}).status_code == 404
    assert httpx.post(f"{simulator.control_url}/120", json={"mode": "on_fire"}).status_code == 422
    assert httpx.post(f"{simulator.control_url}/120", json={"delay": 1}).status_code == 422
    every = httpx.get(simulator.control_url).json()["hotlines"]
    assert list(every) == ["120", "12349", "12320", "sms", "family_doctor"]
    assert all("secret" not in state for state in every.values())


def test_a_kept_alive_connection_is_answered_without_waiting_for_a_delayed_ack(
    simulator: HotlineSimulator,
) -> None:
    """20 requests on one connection: ~2 ms each, not the ~44 ms of Nagle's algorithm meeting
    the client's delayed ACK (which took them to 0.9 s)."""
    with httpx.Client() as client:
        client.get(f"{simulator.control_url}/120")  # the connection, opened
        started = time.perf_counter()
        for _ in range(20):
            assert client.get(f"{simulator.control_url}/120").status_code == 200
        took = time.perf_counter() - started
    assert took < 0.5


def test_a_hotline_down_refuses_connections_and_keeps_its_port_when_back(simulator: HotlineSimulator) -> None:
    url = simulator.url("12320")
    simulator.set_mode("12320", "down")
    with pytest.raises(httpx.ConnectError):
        httpx.post(url, content=b"{}")
    simulator.set_mode("12320", "ok")
    assert simulator.url("12320") == url
    assert httpx.post(url, content=b"{}").status_code == 400  # listening again (and unsigned)


def test_stopping_with_an_answer_in_hand_leaves_no_task_pending(caplog: pytest.LogCaptureFixture) -> None:
    """A slow hotline still answering when the simulator stops: its request ends with the loop,
    quietly, instead of being destroyed pending later ("Task was destroyed but it is pending!")."""
    with HotlineSimulator(["120"]) as sim:
        sim.set_mode("120", "slow", delay_s=5.0)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(sim.url("120"), content=b"{}", timeout=0.2)
    gc.collect()  # a task left pending is reported when it is collected
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


# --- secrets and the command ---------------------------------------------------------------


def test_given_secrets_are_used_and_the_rest_generated() -> None:
    given = "whsec_" + "B" * 44
    with HotlineSimulator(["120", "sms"], secrets={"120": given}, api_keys={"sms": "k"}) as sim:
        assert sim.secret("120") == given and sim.secret("sms").startswith("whsec_")
        assert sim.generated_secrets == {"sms"} and sim.generated_api_keys == {"120"}
        assert sim.channels()["sms"] == {"url": sim.url("sms"), "secret": sim.secret("sms"), "api_key": "k"}


def test_a_written_secrets_file_reads_back_and_so_does_a_plain_one(tmp_path: Path) -> None:
    with HotlineSimulator(["120", "sms"]) as sim:
        written = {"control_url": sim.control_url, "hotlines": sim.channels()}
    write_secrets_file(tmp_path / "written.json", written)
    secrets, api_keys = read_secrets_file(tmp_path / "written.json")
    assert secrets == {"120": sim.secret("120"), "sms": sim.secret("sms")}
    assert api_keys == {"120": sim.api_key("120"), "sms": sim.api_key("sms")}
    (tmp_path / "plain.json").write_text('{"120": "whsec_AAAA"}')
    assert read_secrets_file(tmp_path / "plain.json") == ({"120": "whsec_AAAA"}, {})


def test_the_commands_ack_statuses_are_the_simulators() -> None:
    assert get_args(AckStatus) == ACK_STATUSES


def test_the_command_serves_until_interrupted_and_writes_the_secrets(tmp_path: Path) -> None:
    secrets_file = tmp_path / "hotlines.json"
    command = [sys.executable, "-c", "from eldercare.gateway.cli import main; main()"]
    args = ["simulate", "hotlines", "--port", "0", "--hotline", "120", "--write-secrets", str(secrets_file)]
    process = subprocess.Popen(
        command + args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    try:
        wait_for(secrets_file.exists, 20, "the secrets file")
        written = json.loads(secrets_file.read_text())
        assert secrets_file.stat().st_mode & 0o777 == 0o600
        hotline = written["hotlines"]["120"]
        dispatch_id = new_id()
        body = orjson.dumps(document(dispatch_id))
        answer = httpx.post(
            hotline["url"], content=body, headers=signed(hotline["secret"], dispatch_id, body)
        )
        assert answer.status_code == 202
        assert httpx.get(written["control_url"] + "/120").json()["accepted"] == 1
    finally:
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=20)
    assert process.returncode == 0, stderr[-2000:]
    assert hotline["url"] in stdout and written["control_url"] in stdout
    assert hotline["secret"] not in stdout + stderr  # not asked to show them

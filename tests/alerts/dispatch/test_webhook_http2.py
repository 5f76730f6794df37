"""The webhook adapter over TLS: HTTP/2 where a hotline offers it, and a channel's own CA.

httpx speaks HTTP/2 only over TLS (ALPN), which uvicorn does not offer, so here the simulated
hotline's own app (``hotline_app``: it verifies each signature with ``standardwebhooks``) is
served by hypercorn, which offers h2, on a loopback port with a certificate for 127.0.0.1
from a test CA (trustme), in the test's own event loop. The channel comes from the channels
configuration with ``ca_file`` naming that CA, as a deployment would write it.
"""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trustme
from hypercorn.asyncio import serve
from hypercorn.config import Config

from eldercare.alerts.dispatch.adapter import Attempt, Channel, Delivered, Outcome, Permanent
from eldercare.alerts.dispatch.channels import channels_from
from eldercare.alerts.dispatch.signing import new_secret
from eldercare.alerts.dispatch.webhook import WebhookAdapter
from eldercare.simulators.hotline_app import PATH, Hotline, hotline_app


@dataclass(frozen=True)
class TlsHotline:
    hotline: Hotline
    url: str
    ca_file: Path  # the CA its certificate comes from (PEM)


@asynccontextmanager
async def tls_hotline(folder: Path) -> AsyncIterator[TlsHotline]:
    """The simulated 120 served over TLS (h2 offered by ALPN) until the block ends."""
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(folder / "server.pem"))
    hotline = Hotline("120", new_secret(), "ack-key")
    config = Config()
    config.certfile = config.keyfile = str(folder / "server.pem")
    config.graceful_timeout = 1.0
    config.errorlog = None  # quiet: no "Running on ..."
    # A socket listening before the server runs: the port is known, connections wait in the backlog.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    port = sock.getsockname()[1]
    config.bind = [f"fd://{sock.detach()}"]  # hypercorn owns (and closes) it from here on
    stop = asyncio.Event()
    app = hotline_app(hotline, lambda plan: None)  # no acknowledgements: not under test here
    # hypercorn types an ASGI app more narrowly than Starlette does: the ignore is for that.
    server = asyncio.create_task(serve(app, config, shutdown_trigger=stop.wait))  # type: ignore[arg-type]
    try:
        yield TlsHotline(hotline, f"https://127.0.0.1:{port}{PATH}", folder / "ca.pem")
    finally:
        stop.set()
        await asyncio.wait_for(server, 5)


def channel(served: TlsHotline, ca_file: Path | None) -> Channel:
    entry: dict[str, Any] = {"kind": "webhook", "url": served.url, "secret": served.hotline.secret}
    if ca_file is not None:
        entry["ca_file"] = str(ca_file)
    return channels_from({"channels": {"120": entry}}, environ={}).by_name["120"]


def attempt(chan: Channel) -> Attempt:
    dispatch_id = f"d-{uuid.uuid4().hex[:12]}"
    document = {"dispatch_id": dispatch_id, "alert": {"rule": "fall_no_recovery"}}
    return Attempt(dispatch_id, 1, chan, document, int(time.time()))


def test_a_hotline_offering_http2_gets_concurrent_attempts_as_streams_of_one_connection(
    tmp_path: Path,
) -> None:
    async def scenario() -> tuple[list[Outcome], TlsHotline]:
        async with tls_hotline(tmp_path) as served:
            chan = channel(served, served.ca_file)
            adapter = WebhookAdapter()
            try:
                outcomes = await asyncio.gather(adapter.send(attempt(chan)), adapter.send(attempt(chan)))
            finally:
                await adapter.aclose()
            return list(outcomes), served

    outcomes, served = asyncio.run(scenario())
    assert [(type(o), o.status) for o in outcomes] == [(Delivered, 202), (Delivered, 202)]
    got = served.hotline.received()
    assert [r.http_version for r in got] == ["2", "2"]
    assert len({r.client_port for r in got}) == 1  # both on one connection: pooled, multiplexed
    # The hotline verified each signature with the standardwebhooks library (refused otherwise).
    assert [(r.refused, r.answer) for r in got] == [(None, 202), (None, 202)]


def test_a_certificate_from_a_ca_the_channel_does_not_trust_is_a_permanent_failure(tmp_path: Path) -> None:
    another_ca = tmp_path / "another-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(another_ca))

    async def scenario() -> tuple[list[Outcome], TlsHotline]:
        async with tls_hotline(tmp_path) as served:
            adapter = WebhookAdapter()
            try:
                outcomes = [
                    await adapter.send(attempt(channel(served, None))),  # the public CAs only
                    await adapter.send(attempt(channel(served, another_ca))),
                ]
            finally:
                await adapter.aclose()
            return outcomes, served

    outcomes, served = asyncio.run(scenario())
    assert [(type(o), getattr(o, "reason", None)) for o in outcomes] == [
        (Permanent, "certificate not trusted"),
        (Permanent, "certificate not trusted"),
    ]
    assert served.hotline.received() == []  # nothing was sent to a server we do not trust


def test_a_ca_file_gone_since_start_up_is_a_permanent_failure(tmp_path: Path) -> None:
    ca_file = tmp_path / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(ca_file))
    chan = channels_from(
        {
            "channels": {
                "120": {
                    "kind": "webhook",
                    "url": "https://127.0.0.1:9/",
                    "secret": new_secret(),
                    "ca_file": str(ca_file),
                }
            }
        },
        environ={},
    ).by_name["120"]
    ca_file.unlink()

    async def once() -> Outcome:
        adapter = WebhookAdapter()
        try:
            return await adapter.send(attempt(chan))
        finally:
            await adapter.aclose()

    outcome = asyncio.run(once())
    assert isinstance(outcome, Permanent) and outcome.reason == "bad channel ca file"

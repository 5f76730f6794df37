"""Simulated hotlines (120, 12349, 12320, SMS gateway, family doctor) over real HTTP on loopback.

Each hotline is its own HTTP server (uvicorn) on a port of its own, as each real one is its own
system: ``down`` then really refuses connections (and cuts the open ones) for that hotline
alone, and the gateway keeps a connection pool per hotline as it will in production. A sixth
server answers the control endpoint (``/_control/<hotline>``), which stays up while hotlines
go down. All of them run on one event loop in a thread of their own, so tests and the CLI
drive them through a plain Python API: ``HotlineSimulator``.

A hotline verifies each webhook with the ``standardwebhooks`` library (signature and replay
window), deduplicates on ``webhook-id``, keeps everything it received, answers
``202 {"reference": "<hotline>-<n>"}`` and, ``ack_delay_s`` later, acknowledges to the body's
``ack_url`` with ``Authorization: Bearer <its API key>``: each of ``ack_statuses`` in turn,
``ack_delay_s`` apart. A failed acknowledgement is kept and tried again (``ACK_TRIES`` in all).
Acknowledgements due together take turns, ``ACKS_IN_FLIGHT`` at a time, so hundreds due at
once queue rather than time out. Failure modes: see ``hotline_app.Mode``.
"""

from __future__ import annotations

import asyncio
import logging
import secrets as random_tokens
import socket
import threading
import time
from collections.abc import Coroutine, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
import orjson
import uvicorn
from fastapi import FastAPI, HTTPException, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.types import ASGIApp, Receive, Scope, Send

from eldercare.alerts.dispatch.signing import new_secret
from eldercare.simulators.hotline_app import (
    MODES,
    PATH,
    AckPlan,
    AckSent,
    AckStatus,
    Behaviour,
    Hotline,
    Mode,
    Received,
    hotline_app,
)

__all__ = ["HOTLINES", "MODES", "AckSent", "ControlChange", "HotlineSimulator", "Mode", "Received"]

log = logging.getLogger(__name__)

#: The hotlines, in port order (control port + 1, + 2, ... when a port is given).
HOTLINES: tuple[str, ...] = ("120", "12349", "12320", "sms", "family_doctor")

#: How a gateway's channels reach the simulated hotlines: channel -> (kind, hotline).
GATEWAY_CHANNELS: dict[str, tuple[str, str]] = {
    "120": ("webhook", "120"),
    "12349": ("webhook", "12349"),
    "12320": ("webhook", "12320"),
    "family": ("sms_gateway", "sms"),
    "family_doctor": ("task_queue", "family_doctor"),
}
#: Tries per acknowledgement: the first and two retries.
ACK_TRIES = 3
#: Acknowledgements being sent at once (a few keep an acknowledgement API busy; more would only
#: wait there, their timeout running); the others wait for a turn here, with no clock running,
#: and the client keeps this many connections alive. Queued in httpx's pool instead, as they
#: were, hundreds due at once timed out waiting there (the pool wait counted in the timeout),
#: were tried again and queued once more; and httpcore's pool looks through every queued request
#: and connection each time one starts or ends, so the simulator's loop spent a core on it and
#: its hotlines stopped answering in time.
ACKS_IN_FLIGHT = 8
#: How long starting or stopping one server may take.
SERVER_DEADLINE_S = 10.0

T = TypeVar("T")


class ControlChange(BaseModel):
    """A change to one hotline's behaviour (``POST /_control/<hotline>``); None = unchanged."""

    model_config = ConfigDict(extra="forbid")

    mode: Mode | None = None
    #: slow: seconds before answering
    delay_s: float | None = Field(default=None, ge=0, le=3600)
    #: error_500: how many 500s (0: until another mode)
    times: int | None = Field(default=None, ge=0)
    #: rate_limited: the Retry-After seconds
    retry_after_s: int | None = Field(default=None, ge=0)
    #: seconds before each acknowledgement
    ack_delay_s: float | None = Field(default=None, ge=0, le=3600)
    #: acknowledgement statuses, in order
    ack_statuses: list[AckStatus] | None = None
    #: the Bearer key acknowledgements carry
    api_key: str | None = Field(default=None, min_length=1)


@dataclass(frozen=True, slots=True)
class _Running:
    server: uvicorn.Server
    task: asyncio.Task[None]


class HotlineSimulator:
    """The simulated hotlines and their control endpoint, served from a thread of their own.

    ``port``: the control endpoint's; hotline i (in ``hotlines`` order) takes ``port + 1 + i``.
    0 (the default) takes free ports. ``secrets`` / ``api_keys``: per hotline; the missing ones
    are generated (``generated_secrets`` / ``generated_api_keys`` say which). ``ack_delay_s``
    and ``ack_statuses`` are every hotline's first acknowledgement plan (``set_acks`` changes one);
    an acknowledgement not taken is tried again after ``ack_backoff_s``, then twice that.
    """

    def __init__(
        self,
        hotlines: Iterable[str] = HOTLINES,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        secrets: Mapping[str, str] | None = None,
        api_keys: Mapping[str, str] | None = None,
        ack_delay_s: float = 1.0,
        ack_statuses: Iterable[AckStatus] = ("accepted",),
        ack_timeout_s: float = 5.0,
        ack_backoff_s: float = 0.5,
    ) -> None:
        names = list(dict.fromkeys(hotlines))
        secrets = secrets or {}
        api_keys = api_keys or {}
        self.host = host
        #: The hotlines whose secret / API key was made here (not given).
        self.generated_secrets = frozenset(n for n in names if not secrets.get(n))
        self.generated_api_keys = frozenset(n for n in names if not api_keys.get(n))
        behaviour = Behaviour(ack_delay_s=ack_delay_s, ack_statuses=tuple(ack_statuses))
        self._hotlines = {
            name: Hotline(
                name,
                secrets.get(name) or new_secret(),
                api_keys.get(name) or random_tokens.token_urlsafe(24),
                behaviour,
            )
            for name in names
        }
        self._control_port = port
        self._ports = {name: (port + 1 + i if port else 0) for i, name in enumerate(names)}
        self._ack_timeout_s = ack_timeout_s
        self._ack_backoff_s = ack_backoff_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._running: dict[str, _Running] = {}
        self._ack_tasks: set[asyncio.Task[None]] = set()
        self._ack_turns: asyncio.Semaphore | None = None
        self._stopping = False
        self._client: httpx.AsyncClient | None = None

    # --- the plain Python API ---------------------------------------------------------------

    @property
    def hotlines(self) -> list[str]:
        """The hotlines' names, in port order."""
        return list(self._hotlines)

    def url(self, hotline: str) -> str:
        """Where the hotline takes dispatches: a ``Channel.url``."""
        return f"http://{_url_host(self.host)}:{self._ports[self._hotline(hotline).name]}{PATH}"

    @property
    def control_url(self) -> str:
        """The control endpoint: ``<control_url>/<hotline>``."""
        return f"http://{_url_host(self.host)}:{self._control_port}/_control"

    def secret(self, hotline: str) -> str:
        """The hotline's webhook secret (``whsec_...``): the gateway's ``Channel.secret``."""
        return self._hotline(hotline).secret

    def api_key(self, hotline: str) -> str:
        """The key the hotline's acknowledgements carry (``Authorization: Bearer <key>``)."""
        return self._hotline(hotline).api_key

    def start(self) -> None:
        """Serve every hotline and the control endpoint; returns once all of them listen."""
        if self._thread is not None:
            return
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="hotline-simulator", daemon=True)
        self._thread.start()
        try:
            self._call(self._start_all())
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop every server and pending acknowledgement; what was received stays readable."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            self._call(self._stop_all())
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(SERVER_DEADLINE_S)
            loop.close()
            self._loop = self._thread = None

    def __enter__(self) -> HotlineSimulator:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def set_mode(
        self,
        hotline: str,
        mode: Mode,
        *,
        delay_s: float | None = None,
        times: int | None = None,
        retry_after_s: int | None = None,
    ) -> dict[str, Any]:
        """Switch the hotline's failure mode (parameters as ``ControlChange``); its new state."""
        change = ControlChange(mode=mode, delay_s=delay_s, times=times, retry_after_s=retry_after_s)
        return self._call(self.apply(hotline, change))

    def set_acks(
        self,
        hotline: str,
        *,
        delay_s: float | None = None,
        statuses: Iterable[AckStatus] | None = None,
        api_key: str | None = None,
    ) -> dict[str, Any]:
        """Change the hotline's acknowledgements: delay, statuses in order, API key; its new state."""
        change = ControlChange(
            ack_delay_s=delay_s, ack_statuses=None if statuses is None else list(statuses), api_key=api_key
        )
        return self._call(self.apply(hotline, change))

    def received(self, hotline: str) -> list[Received]:
        """Every request the hotline received, oldest first."""
        return self._hotline(hotline).received()

    def acks(self, hotline: str) -> list[AckSent]:
        """Every acknowledgement try the hotline made, oldest first."""
        return self._hotline(hotline).acks()

    def state(self, hotline: str) -> dict[str, Any]:
        """The hotline's mode, parameters and counts, with its URL."""
        return {**self._hotline(hotline).state(), "url": self.url(hotline)}

    def channels(self) -> dict[str, dict[str, str]]:
        """Per hotline, what a gateway needs to reach it: url, secret, api_key."""
        return {
            n: {"url": self.url(n), "secret": h.secret, "api_key": h.api_key}
            for n, h in self._hotlines.items()
        }

    # --- in the simulator's loop ------------------------------------------------------------

    async def apply(self, hotline: str, change: ControlChange) -> dict[str, Any]:
        """Apply a change (in the simulator's loop): going ``down`` stops the server, leaving starts it."""
        target = self._hotline(hotline)
        was_down = target.behaviour.mode == "down"
        fields = change.model_dump(exclude={"api_key", "ack_statuses"})
        if change.ack_statuses is not None:
            fields["ack_statuses"] = tuple(change.ack_statuses)
        if change.api_key is not None:
            target.api_key = change.api_key
        behaviour = target.change(**fields)
        if behaviour.mode == "down" and not was_down:
            await self._stop_server(target.name)
        elif was_down and behaviour.mode != "down":
            await self._start_server(target.name, hotline_app(target, self._acknowledge_later))
        log.info("hotline mode", extra={"hotline": target.name, "mode": behaviour.mode})
        return self.state(target.name)

    async def _start_all(self) -> None:
        self._ack_turns = asyncio.Semaphore(ACKS_IN_FLIGHT)
        self._client = httpx.AsyncClient(
            # The pool never makes a request wait (no more are sent at once than it has
            # connections); its timeout stays as a bound all the same.
            timeout=self._ack_timeout_s,
            limits=httpx.Limits(max_connections=ACKS_IN_FLIGHT, max_keepalive_connections=ACKS_IN_FLIGHT),
            trust_env=False,
        )
        self._control_port = await self._start_server("_control", control_app(self), self._control_port)
        for name, hotline in self._hotlines.items():
            await self._start_server(name, hotline_app(hotline, self._acknowledge_later))

    async def _stop_all(self) -> None:
        self._stopping = True
        await asyncio.gather(*(self._stop_server(name) for name in list(self._running)))
        for task in list(self._ack_tasks):
            task.cancel()
        await asyncio.gather(*self._ack_tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()
        # The requests still in hand (uvicorn's force_exit does not wait for them: a slow
        # hotline's) end here, as asyncio.run would end them; left pending, they were destroyed
        # with the closed loop later ("Task was destroyed but it is pending!", GeneratorExit).
        this = asyncio.current_task()
        left = [task for task in asyncio.all_tasks() if task is not this]
        for task in left:
            task.cancel()
        await asyncio.gather(*left, return_exceptions=True)
        loop = asyncio.get_running_loop()
        await loop.shutdown_asyncgens()
        await loop.shutdown_default_executor()
        self._stopping = False

    async def _start_server(self, key: str, app: FastAPI, port: int | None = None) -> int:
        """Serve ``app`` on its port (a free one the first time, unless given); the port."""
        sock = _listening_socket(self.host, self._ports.get(key, 0) if port is None else port)
        bound = sock.getsockname()[1]
        if key in self._ports:
            self._ports[key] = bound
        config = uvicorn.Config(
            self._cut_short_quietly(app),
            lifespan="off",
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=1,
        )
        server = uvicorn.Server(config)
        task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
        deadline = time.monotonic() + SERVER_DEADLINE_S
        while not server.started:
            if task.done():
                task.result()  # raises what stopped it
                raise RuntimeError(f"the {key} server stopped while starting")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the {key} server did not start within {SERVER_DEADLINE_S:g} s")
            await asyncio.sleep(0.01)
        self._running[key] = _Running(server, task)
        return bound

    async def _stop_server(self, key: str) -> None:
        """Stop listening and cut every open connection, as a hotline that went down would."""
        running = self._running.pop(key, None)
        if running is None:
            return
        server = running.server
        for listener in getattr(server, "servers", []):
            listener.close()  # no new connections from here on
        for connection in list(server.server_state.connections):
            transport = getattr(connection, "transport", None)
            if transport is not None:
                transport.abort()
        server.should_exit = server.force_exit = True
        try:
            await asyncio.wait_for(running.task, SERVER_DEADLINE_S)
        except Exception:
            log.warning("server stopped uncleanly", extra={"server": key}, exc_info=True)

    def _cut_short_quietly(self, app: FastAPI) -> ASGIApp:
        """``app``, whose requests in hand when the simulator stops end without an error logged.

        Their connections are cut by then, so there is no one to answer; uvicorn would log the
        cancellation as the application's error.
        """

        async def serve(scope: Scope, receive: Receive, send: Send) -> None:
            try:
                await app(scope, receive, send)
            except asyncio.CancelledError:
                if not self._stopping:
                    raise

        return serve

    def _acknowledge_later(self, plan: AckPlan) -> None:
        """Start the acknowledgements of an accepted dispatch (called in the loop)."""
        task = asyncio.get_running_loop().create_task(self._acknowledge(plan))
        self._ack_tasks.add(task)
        task.add_done_callback(self._ack_tasks.discard)

    async def _acknowledge(self, plan: AckPlan) -> None:
        hotline = self._hotlines[plan.hotline]
        try:
            for status in plan.statuses:
                await asyncio.sleep(plan.delay_s)  # the operator takes a while: simulated
                await self._post_ack(hotline, plan, status)
        except asyncio.CancelledError:
            raise
        except Exception:  # an acknowledgement never takes the simulator down
            log.warning("acknowledgement failed", extra={"hotline": plan.hotline}, exc_info=True)

    async def _post_ack(self, hotline: Hotline, plan: AckPlan, status: AckStatus) -> None:
        """POST one acknowledgement, trying again on no answer, 408, 429 or 5xx."""
        assert self._client is not None and self._ack_turns is not None
        body = {
            "status": status,
            "operator": f"sim-{plan.hotline}-operator",
            "reference": plan.reference,
            "note": f"simulated hotline {plan.hotline}",
        }
        headers = {"Authorization": f"Bearer {plan.api_key}", "Content-Type": "application/json"}
        for try_number in range(1, ACK_TRIES + 1):
            answer: int | None = None
            error: str | None = None
            try:
                async with self._ack_turns:  # a turn first; the timeout runs from the sending
                    response = await self._client.post(
                        plan.ack_url, content=orjson.dumps(body), headers=headers
                    )
                answer = response.status_code
            except Exception as exc:  # unreachable, a bad URL, ...: kept, never raised
                error = type(exc).__name__
            hotline.record_ack(AckSent(time.time(), plan.dispatch_id, status, try_number, answer, error))
            if answer is not None and (200 <= answer < 300 or (answer < 500 and answer not in (408, 429))):
                return
            if try_number < ACK_TRIES:
                await asyncio.sleep(self._ack_backoff_s * 2 ** (try_number - 1))
        log.warning("acknowledgement not taken", extra={"hotline": plan.hotline, "status": status})

    # --- plumbing ---------------------------------------------------------------------------

    def _hotline(self, name: str) -> Hotline:
        try:
            return self._hotlines[name]
        except KeyError:
            raise KeyError(f"no simulated hotline {name!r} (there are {', '.join(self._hotlines)})") from None

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run ``coroutine`` in the simulator's loop and wait for it."""
        if self._loop is None:
            coroutine.close()
            raise RuntimeError("the hotline simulator is not running (start() it first)")
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(2 * SERVER_DEADLINE_S)


def control_app(simulator: HotlineSimulator) -> FastAPI:
    """``GET /_control`` (every hotline), ``GET|POST /_control/<hotline>`` (one: state and logs)."""
    app = FastAPI(title="simulated hotlines: control", openapi_url=None, docs_url=None, redoc_url=None)

    def known(hotline: str) -> str:
        if hotline not in simulator.hotlines:
            raise HTTPException(404, f"no simulated hotline {hotline!r}")
        return hotline

    @app.get("/_control")
    async def every_hotline() -> Response:
        return _json({"hotlines": {name: simulator.state(name) for name in simulator.hotlines}})

    @app.get("/_control/{hotline}")
    async def one_hotline(hotline: str) -> Response:
        name = known(hotline)
        return _json(
            {
                **simulator.state(name),
                "received_log": simulator.received(name),
                "acks_log": simulator.acks(name),
            }
        )

    @app.post("/_control/{hotline}")
    async def change(hotline: str, change: ControlChange) -> Response:
        return _json(await simulator.apply(known(hotline), change))

    return app


def _json(content: Any) -> Response:
    return Response(orjson.dumps(content), media_type="application/json")


def _listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port (reusable address, so a hotline back up gets its port again)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP said, not left 0: asyncio sets TCP_NODELAY only on sockets that say it, and
    # without it an answer on a kept-alive connection waited ~40 ms for the client's delayed
    # ACK (Nagle): every attempt but a connection's first, and every poll of the control endpoint.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host

"""One simulated hotline: how it answers a webhook (by its failure mode), what it keeps, its app.

The signature and the replay window are checked by the ``standardwebhooks`` library, the one
a real hotline would use, never by the gateway's own signing code: a mismatch between the two
shows up as a 401. ``hotlines.py`` serves these apps over HTTP and sends the acknowledgements;
an app also runs on any ASGI server by itself (the HTTP/2 tests serve one with hypercorn).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal, get_args

import orjson
from fastapi import FastAPI, Request, Response
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from eldercare.alerts.dispatch.signing import new_secret

log = logging.getLogger(__name__)

#: How a hotline behaves (switchable at run time):
#: ok: verify, deduplicate, answer 202 {"reference"}, acknowledge as configured;
#: down: not listening (connections refused, open ones cut);
#: slow: as ok, after ``delay_s``;
#: error_500: 500 for the next ``times`` requests (0: until another mode), then ok;
#: rate_limited: 429 with ``Retry-After: retry_after_s``;
#: decline: as ok, then acknowledges "declined";
#: wrong_secret: verifies with another secret, so every request gets 401;
#: no_ack: as ok, never acknowledges.
Mode = Literal["ok", "down", "slow", "error_500", "rate_limited", "decline", "wrong_secret", "no_ack"]
MODES: tuple[Mode, ...] = get_args(Mode)
AckStatus = Literal["accepted", "en_route", "on_scene", "closed", "declined"]

#: Where a hotline takes dispatches (the channel URL is ``http://host:port`` + this).
PATH = "/dispatch"


@dataclass(frozen=True, slots=True)
class Received:
    """One request a hotline received, and how it answered."""

    at: float  # unix seconds
    webhook_id: str | None
    idempotency_key: str | None
    timestamp: str | None  # webhook-timestamp as sent
    signatures: int  # how many signatures webhook-signature carried
    user_agent: str | None
    client_port: int | None  # the sender's port: the same for attempts over one kept connection
    http_version: str | None  # as the server's ASGI scope says: "1.1", "2"
    answer: int  # the HTTP status answered
    reference: str | None
    duplicate: bool
    #: Why it was not taken: "signature", "timestamp", "headers", "body", "error_500",
    #: "rate_limited", "down"; None when it was.
    refused: str | None
    document: Mapping[str, Any] | None  # the body, once verified


@dataclass(frozen=True, slots=True)
class AckSent:
    """One try at acknowledging a dispatch to the gateway."""

    at: float
    dispatch_id: str
    status: AckStatus
    try_number: int
    answer: int | None  # the gateway's HTTP status; None when it could not be reached
    error: str | None  # the error's kind ("ConnectError"), when there was one


@dataclass(frozen=True, slots=True)
class AckPlan:
    """The acknowledgements one accepted dispatch is to get: ``statuses`` in order, ``delay_s`` apart."""

    hotline: str
    dispatch_id: str
    ack_url: str
    reference: str
    statuses: tuple[AckStatus, ...]
    delay_s: float
    api_key: str


@dataclass(frozen=True, slots=True)
class Answer:
    """A hotline's answer to one request; ``ack`` when acknowledgements are to follow."""

    status: int
    body: Mapping[str, Any]
    headers: Mapping[str, str]
    ack: AckPlan | None = None


@dataclass(frozen=True, slots=True)
class Behaviour:
    """A hotline's failure mode with its parameters, and its acknowledgement plan."""

    mode: Mode = "ok"
    delay_s: float = 1.0  # slow
    times: int = 1  # error_500: how many are left (0: until another mode)
    retry_after_s: int = 1  # rate_limited
    ack_delay_s: float = 1.0
    ack_statuses: tuple[AckStatus, ...] = ("accepted",)


class Hotline:
    """One simulated hotline's secret, API key, behaviour and logs (safe to read from any thread)."""

    def __init__(self, name: str, secret: str, api_key: str, behaviour: Behaviour | None = None) -> None:
        self.name = name
        self.secret = secret
        self.api_key = api_key
        self._behaviour = behaviour or Behaviour()
        self._other_secret = new_secret()  # what wrong_secret verifies with
        self._lock = threading.Lock()
        self._references: dict[str, str] = {}
        self._received: list[Received] = []
        self._acks: list[AckSent] = []

    @property
    def behaviour(self) -> Behaviour:
        """The failure mode and acknowledgement plan now in force."""
        with self._lock:
            return self._behaviour

    def change(self, **changes: Any) -> Behaviour:
        """Switch mode or parameters (``Behaviour``'s fields, None = unchanged); the new behaviour."""
        changes = {k: v for k, v in changes.items() if v is not None}
        if changes.get("mode") == "error_500":
            changes.setdefault("times", 1)  # a count left at 0 by the last run would mean "forever"
        with self._lock:
            self._behaviour = replace(self._behaviour, **changes)
            return self._behaviour

    def received(self) -> list[Received]:
        """Every request so far, oldest first."""
        with self._lock:
            return list(self._received)

    def acks(self) -> list[AckSent]:
        """Every acknowledgement try so far, oldest first."""
        with self._lock:
            return list(self._acks)

    def record_ack(self, ack: AckSent) -> None:
        """Keep one acknowledgement try."""
        with self._lock:
            self._acks.append(ack)

    def state(self) -> dict[str, Any]:
        """Behaviour and counts, JSON-ready (no secrets)."""
        with self._lock:
            received = list(self._received)
            acks = list(self._acks)
            behaviour = self._behaviour
            accepted = len(self._references)
        return {
            "hotline": self.name,
            **asdict(behaviour),
            "received": len(received),
            "accepted": accepted,
            "duplicates": sum(r.duplicate for r in received),
            "refused": sum(r.refused is not None for r in received),
            "acks_sent": sum(a.answer is not None and 200 <= a.answer < 300 for a in acks),
            "acks_failed": sum(a.answer is None or not 200 <= a.answer < 300 for a in acks),
        }

    async def handle(
        self,
        raw: bytes,
        headers: Mapping[str, str],
        client_port: int | None,
        http_version: str | None = None,
    ) -> Answer:
        """Answer one webhook request as the behaviour says, and keep it."""
        behaviour = self._take()
        if behaviour.mode == "slow":
            await asyncio.sleep(behaviour.delay_s)  # the hotline is slow: simulated, not a test wait
        headers = {k.lower(): v for k, v in headers.items()}
        seen = _Seen(
            at=time.time(),
            webhook_id=headers.get("webhook-id"),
            idempotency_key=headers.get("idempotency-key"),
            timestamp=headers.get("webhook-timestamp"),
            signatures=len(headers.get("webhook-signature", "").split()),
            user_agent=headers.get("user-agent"),
            client_port=client_port,
            http_version=http_version,
        )
        if behaviour.mode == "down":  # a request that came in as the hotline went down
            return self._refuse(seen, 503, "down")
        if behaviour.mode == "error_500":
            return self._refuse(seen, 500, "error_500")
        if behaviour.mode == "rate_limited":
            return self._refuse(seen, 429, "rate_limited", {"Retry-After": str(behaviour.retry_after_s)})
        secret = self._other_secret if behaviour.mode == "wrong_secret" else self.secret
        refused = _verify(secret, raw, headers)
        if refused is not None:
            return self._refuse(seen, 401 if refused == "signature" else 400, refused)
        try:
            document = orjson.loads(raw)
        except orjson.JSONDecodeError:
            document = None
        if not isinstance(document, dict) or not seen.webhook_id:
            return self._refuse(seen, 400, "body")
        return self._accept(seen, seen.webhook_id, document, behaviour)

    def _take(self) -> Behaviour:
        """The behaviour for this request; counts one of error_500's ``times`` down."""
        with self._lock:
            behaviour = self._behaviour
            if behaviour.mode == "error_500" and behaviour.times > 0:
                left = behaviour.times - 1
                self._behaviour = replace(behaviour, mode="ok" if left == 0 else "error_500", times=left)
            return behaviour

    def _refuse(self, seen: _Seen, status: int, why: str, headers: Mapping[str, str] | None = None) -> Answer:
        self._keep(seen.received(status, refused=why))
        return Answer(status, {"error": why}, headers or {})

    def _accept(self, seen: _Seen, webhook_id: str, document: dict[str, Any], behaviour: Behaviour) -> Answer:
        with self._lock:
            reference = self._references.get(webhook_id)
            duplicate = reference is not None
            if reference is None:
                reference = f"{self.name}-{len(self._references) + 1}"
                self._references[webhook_id] = reference
            self._received.append(
                seen.received(202, reference=reference, duplicate=duplicate, document=document)
            )
        log.info(
            "dispatch received",
            extra={
                "hotline": self.name,
                "dispatch": webhook_id,
                "reference": reference,
                "duplicate": duplicate,
            },
        )
        ack_url = document.get("ack_url")
        if duplicate or behaviour.mode == "no_ack" or not isinstance(ack_url, str):
            return Answer(202, {"reference": reference}, {})
        dispatch_id = document.get("dispatch_id")
        plan = AckPlan(
            hotline=self.name,
            dispatch_id=dispatch_id if isinstance(dispatch_id, str) else webhook_id,
            ack_url=ack_url,
            reference=reference,
            statuses=("declined",) if behaviour.mode == "decline" else behaviour.ack_statuses,
            delay_s=behaviour.ack_delay_s,
            api_key=self.api_key,
        )
        return Answer(202, {"reference": reference}, {}, plan)

    def _keep(self, received: Received) -> None:
        with self._lock:
            self._received.append(received)
        log.info(
            "dispatch refused",
            extra={"hotline": self.name, "dispatch": received.webhook_id, "answer": received.answer},
        )


@dataclass(frozen=True, slots=True)
class _Seen:
    """What a request said about itself, before it is judged."""

    at: float
    webhook_id: str | None
    idempotency_key: str | None
    timestamp: str | None
    signatures: int
    user_agent: str | None
    client_port: int | None
    http_version: str | None

    def received(
        self,
        answer: int,
        *,
        reference: str | None = None,
        duplicate: bool = False,
        refused: str | None = None,
        document: Mapping[str, Any] | None = None,
    ) -> Received:
        return Received(
            at=self.at,
            webhook_id=self.webhook_id,
            idempotency_key=self.idempotency_key,
            timestamp=self.timestamp,
            signatures=self.signatures,
            user_agent=self.user_agent,
            client_port=self.client_port,
            http_version=self.http_version,
            answer=answer,
            reference=reference,
            duplicate=duplicate,
            refused=refused,
            document=document,
        )


def _verify(secret: str, raw: bytes, headers: dict[str, str]) -> str | None:
    """None when ``standardwebhooks`` accepts the request, else why not (in our words)."""
    try:
        Webhook(secret).verify(raw, headers, json_parse=False)
    except WebhookVerificationError as exc:
        text = str(exc).lower()
        if "timestamp" in text:
            return "timestamp"  # outside the replay window (5 minutes)
        if "headers" in text:
            return "headers"  # missing, or a timestamp that is no number
        return "signature"
    except UnicodeDecodeError:
        return "body"
    except ValueError:  # a signature that is not "v1,<base64>": the library trips over it
        return "signature"
    return None


def hotline_app(hotline: Hotline, accepted: Callable[[AckPlan], None]) -> FastAPI:
    """The hotline's HTTP face: ``POST /dispatch``; ``accepted`` is told of acks to send."""
    app = FastAPI(title=f"simulated hotline {hotline.name}", openapi_url=None, docs_url=None, redoc_url=None)

    @app.post(PATH)
    async def dispatch(request: Request) -> Response:
        raw = await request.body()
        answer = await hotline.handle(
            raw,
            request.headers,
            request.client.port if request.client else None,
            request.scope.get("http_version"),
        )
        if answer.ack is not None:
            accepted(answer.ack)
        return Response(
            orjson.dumps(answer.body),
            status_code=answer.status,
            headers=dict(answer.headers),
            media_type="application/json",
        )

    return app

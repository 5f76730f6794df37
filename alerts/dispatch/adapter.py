"""The one small interface every channel adapter implements, and what an attempt returns.

An adapter formats one dispatch for its channel and sends it once. It never sleeps, retries
or escalates: it reports what happened (delivered, retryable with an optional Retry-After,
permanent failure) and the dispatcher decides what comes next (Alertmanager's ``Notify``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

#: How a channel is reached.
ChannelKind = Literal["webhook", "sms_gateway", "task_queue", "nurse_station", "sia_dc09"]


@dataclass(frozen=True, slots=True)
class Channel:
    """One destination, as configured: who it is, how it is reached, what it may receive."""

    name: str  # "120", "12349", "12320", "family", "family_doctor", "nurse_station", ...
    kind: ChannelKind
    url: str  # http(s)://... for the webhook kinds, tcp://host:port for SIA DC-09
    secret: str = ""  # webhook: "whsec_<base64 key>"; SIA DC-09: AES key as hex ("" = clear)
    timeout_s: float = 5.0
    #: The body fields this channel receives (data minimisation): top-level names such as
    #: "alert", or dotted ones such as "elder.medications"; empty = everything.
    fields: frozenset[str] = frozenset()
    account: str = ""  # SIA DC-09 account number (the elder's premises at the receiver)
    receiver: str = ""  # SIA DC-09 receiver number ("R..."), line prefix ("L...")
    prefix: str = ""
    #: https:// webhooks: a PEM bundle of the CAs this channel's certificate comes from (a
    #: private or government CA), trusted instead of the public ones; "" = the public CAs.
    ca_file: str = ""


@dataclass(frozen=True, slots=True)
class Attempt:
    """One try at delivering one dispatch over one channel."""

    dispatch_id: str  # webhook-id and Idempotency-Key: the same on every retry
    number: int  # 1 for the first try
    channel: Channel
    #: The full request document of the spec (dispatch_id, attempt, channel, alert, elder,
    #: latest_vitals, device, ack_url); the adapter minimises it for its channel.
    document: Mapping[str, Any]
    timestamp: int  # unix seconds of this attempt (webhook-timestamp), from the injected clock


@dataclass(frozen=True, slots=True)
class Delivered:
    """The channel took it (HTTP 2xx, SIA ACK)."""

    status: int | None = None
    reference: str | None = None  # the hotline's own reference, when it returns one
    latency_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Retryable:
    """Not taken this time, may be next time (408, 429, 5xx, timeout, refused, SIA NAK)."""

    reason: str  # short and free of personal data: "http 503", "connect timeout"
    status: int | None = None
    retry_after_s: float | None = None  # what the channel asked for (Retry-After), if anything
    latency_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Permanent:
    """Never going to be taken on this channel (other 4xx, SIA DUH): escalate at once."""

    reason: str
    status: int | None = None
    latency_s: float = 0.0


Outcome = Delivered | Retryable | Permanent


class Adapter(Protocol):
    """Formats and sends one attempt; says what happened. No retries, no escalation."""

    async def send(self, attempt: Attempt) -> Outcome: ...

    async def aclose(self) -> None: ...

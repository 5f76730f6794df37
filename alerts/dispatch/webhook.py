"""The webhook channel adapter: one signed HTTP POST per attempt, and what came of it.

The kinds "webhook", "sms_gateway", "task_queue" and "nurse_station" all use it: they differ
only in the fields they receive (``payload.py``) and the URL they point at. Each channel's
``httpx.AsyncClient`` keeps connections alive between attempts and speaks HTTP/2 where the
hotline offers it (over TLS, by ALPN; plain http:// stays HTTP/1.1). A channel whose
certificate comes from a CA of its own (``ca_file``) has a client that trusts that CA only.

Outcomes, as hotline-dispatch.md says: 2xx -> Delivered (with the hotline's
``{"reference": ...}`` when the body has one); 408, 429, 5xx, a timeout or a connection that
fails -> Retryable (with ``Retry-After``); any other status -> Permanent. A channel that cannot
be sent to as configured (no or a bad secret, a URL that is not http(s), a CA file that no
longer loads) is Permanent too, and so is a certificate we do not trust ("certificate not
trusted"): like a wrong URL it is a configuration to put right (the channel's ``ca_file``, or
the hotline's certificate), not something a retry a few seconds later mends, so the route
escalates at once instead of at its deadline. Other TLS failures are Retryable ("tls error").
Reasons are short and fixed ("http 503", "read timeout"): never a body, a URL or an exception's
text, which could carry personal data. No retries here: the dispatcher decides.
"""

from __future__ import annotations

import asyncio
import math
import ssl
import time
from collections.abc import Callable
from datetime import UTC
from email.utils import parsedate_to_datetime
from importlib.metadata import PackageNotFoundError, version

import httpx
import orjson

from eldercare.alerts.dispatch import payload
from eldercare.alerts.dispatch.adapter import Attempt, Channel, Delivered, Outcome, Permanent, Retryable
from eldercare.alerts.dispatch.channels import ca_context
from eldercare.alerts.dispatch.signing import SecretError, sign

#: The kinds of channel this adapter serves.
KINDS = frozenset({"webhook", "sms_gateway", "task_queue", "nurse_station"})

#: The longest Retry-After we pass on. Longer asks (a typo, a date years ahead) are cut to this
#: rather than ignored, so the channel still rests; the dispatcher's deadlines escalate meanwhile.
MAX_RETRY_AFTER_S = 3600.0
#: A reference longer than this is not one a person reads out on the phone: cut.
MAX_REFERENCE = 200

RETRYABLE_STATUS = frozenset({408, 429})

#: A whole attempt is bounded at this many channel timeouts (connect, send, answer): httpx's
#: read timeout starts again at every chunk, so a hotline that dribbles its answer a few bytes
#: at a time would otherwise hold an attempt, and the dispatcher waiting on it, for ever.
ATTEMPT_DEADLINE_FACTOR = 3

#: Each client's pool: connections kept alive between attempts (an HTTP/2 hotline takes the
#: dispatcher's concurrent attempts to it as streams of one connection).
LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=100, keepalive_expiry=30.0)


def user_agent() -> str:
    """``eldercare-gateway/<version>``: names us in the hotline's logs."""
    try:
        return f"eldercare-gateway/{version('eldercare-gateway')}"
    except PackageNotFoundError:
        return "eldercare-gateway"


def http_date(value: str | None) -> float | None:
    """Unix seconds of an HTTP-date ("Wed, 21 Oct 2026 07:28:00 GMT"); None if absent or unreadable."""
    if not value:
        return None
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)  # "-0000": the zone is unknown, HTTP dates are GMT
    return when.timestamp()


def retry_after_seconds(value: str | None, now: float) -> float | None:
    """Seconds to wait that a ``Retry-After`` value asks for, clamped to 0..``MAX_RETRY_AFTER_S``.

    Both forms of RFC 9110: delay-seconds ("120") and an HTTP-date, taken relative to ``now``
    (unix seconds). None when there is no value or it is neither form.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        when = http_date(text)
        if when is None:
            return None
        seconds = when - now
    if math.isnan(seconds):
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


def reference_of(content: bytes) -> str | None:
    """The hotline's reference from a ``{"reference": ...}`` body; None for anything else."""
    if not content:
        return None
    try:
        data = orjson.loads(content)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(data, dict):
        return None
    reference = data.get("reference")
    if isinstance(reference, bool) or not isinstance(reference, str | int):
        return None
    return str(reference)[:MAX_REFERENCE] or None


def pooled_client(verify: ssl.SSLContext | bool = True) -> httpx.AsyncClient:
    """A client as the adapter makes them: HTTP/2 where offered, keep-alive, no redirects, no proxy.

    ``verify``: the TLS trust (True: the public CAs; a channel's ``ca_context``).
    """
    return httpx.AsyncClient(
        http2=True,
        verify=verify,
        limits=LIMITS,
        follow_redirects=False,
        trust_env=False,  # a hotline is reached directly; a proxy from the environment is a surprise
    )


def judge(response: httpx.Response, now: float, latency_s: float) -> Outcome:
    """What a hotline's answer means for the dispatch (hotline-dispatch.md, "Response and retries").

    An HTTP-date Retry-After is taken relative to the answer's own ``Date`` (the hotline's
    clock, so a skew between the clocks cancels out), or to ``now`` (unix seconds, ours) when
    the answer has none.
    """
    status = response.status_code
    if 200 <= status < 300:
        return Delivered(status=status, reference=reference_of(response.content), latency_s=latency_s)
    if status in RETRYABLE_STATUS or 500 <= status < 600:
        server_now = http_date(response.headers.get("date"))
        retry_after = retry_after_seconds(
            response.headers.get("retry-after"), now if server_now is None else server_now
        )
        return Retryable(f"http {status}", status=status, retry_after_s=retry_after, latency_s=latency_s)
    # Other 4xx, and 1xx/3xx, which a webhook receiver has no business answering (a redirect
    # means the channel's URL is wrong): nothing a retry would fix.
    return Permanent(f"http {status}", status=status, latency_s=latency_s)


class WebhookAdapter:
    """Sends attempts as signed webhooks (Standard Webhooks v1), each channel over a pooled
    HTTP client of its own.

    One pool per channel, made at the channel's first attempt (``pooled_client``, trusting its
    ``ca_file`` if it has one) and closed with the adapter: a hotline that hangs holds only its
    own connections, and httpcore's pool, which looks through every waiting request and every
    connection whenever one starts or ends, looks through one channel's (at most the
    dispatcher's ``PER_CHANNEL`` in flight), not every channel's. ``client``: one given client
    for every channel without a ``ca_file`` instead (tests); the adapter never closes it.
    ``monotonic`` measures latency. Our "now", where one is needed (an HTTP-date Retry-After
    without a Date header), is the attempt's timestamp plus the latency: the dispatcher's
    injected clock, no second one.
    """

    def __init__(
        self,
        *,
        client: httpx.AsyncClient | None = None,
        monotonic: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._given = client
        self._clients: dict[tuple[str, str], httpx.AsyncClient] = {}  # (channel, ca_file) -> its pool
        self._monotonic = monotonic
        self._user_agent = user_agent()

    async def send(self, attempt: Attempt) -> Outcome:
        """POST the attempt's body, signed, to the channel's URL; say what happened."""
        channel = attempt.channel
        content = payload.body(attempt.document, channel, attempt.number)
        try:
            signature = sign(channel.secret, attempt.dispatch_id, attempt.timestamp, content)
        except SecretError:
            return Permanent("bad channel secret")
        try:
            client = self._client_for(channel)
        except OSError:  # ssl.SSLError included: the CA file was moved or changed since start-up
            return Permanent("bad channel ca file")
        headers = {
            "Content-Type": "application/json; charset=utf-8",
            "User-Agent": self._user_agent,
            "webhook-id": attempt.dispatch_id,
            "webhook-timestamp": str(int(attempt.timestamp)),
            "webhook-signature": signature,
            "Idempotency-Key": attempt.dispatch_id,
        }
        # connect and read as the spec's "connect/read timeout"; write and the wait for a pooled
        # connection bounded the same, so no phase of an attempt waits longer than the channel allows.
        timeout = httpx.Timeout(channel.timeout_s)
        started = self._monotonic()
        try:
            async with asyncio.timeout(ATTEMPT_DEADLINE_FACTOR * channel.timeout_s):
                response = await client.post(channel.url, content=content, headers=headers, timeout=timeout)
        except httpx.TimeoutException as exc:
            return Retryable(_timeout_reason(exc), latency_s=self._monotonic() - started)
        except TimeoutError:
            return Retryable("attempt deadline", latency_s=self._monotonic() - started)
        except (httpx.UnsupportedProtocol, httpx.InvalidURL):
            return Permanent("bad channel url", latency_s=self._monotonic() - started)
        except httpx.ConnectError as exc:
            if _caused_by(exc, ssl.SSLCertVerificationError):
                return Permanent("certificate not trusted", latency_s=self._monotonic() - started)
            reason = "tls error" if _caused_by(exc, ssl.SSLError) else "connect error"
            return Retryable(reason, latency_s=self._monotonic() - started)
        except httpx.RemoteProtocolError:
            return Retryable("connection closed", latency_s=self._monotonic() - started)
        except httpx.TransportError:
            return Retryable("network error", latency_s=self._monotonic() - started)
        latency = self._monotonic() - started
        return judge(response, attempt.timestamp + latency, latency)

    async def aclose(self) -> None:
        """Close the channels' pooled connections (never a given client's)."""
        clients, self._clients = list(self._clients.values()), {}
        await asyncio.gather(*(client.aclose() for client in clients))

    def _client_for(self, channel: Channel) -> httpx.AsyncClient:
        """The channel's own client (made at its first use), or the given one."""
        if self._given is not None and not channel.ca_file:
            return self._given
        key = (channel.name, channel.ca_file)
        client = self._clients.get(key)
        if client is None:
            verify = ca_context(channel.ca_file) if channel.ca_file else True
            client = self._clients[key] = pooled_client(verify)
        return client


def _caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    """Whether ``kind`` is in the exception's chain (httpx wraps httpcore's, which wraps ssl's)."""
    seen: BaseException | None = exc
    for _ in range(8):  # a chain is a few links long; never follow a cycle for ever
        if seen is None:
            return False
        if isinstance(seen, kind):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _timeout_reason(exc: httpx.TimeoutException) -> str:
    if isinstance(exc, httpx.ConnectTimeout):
        return "connect timeout"
    if isinstance(exc, httpx.ReadTimeout):
        return "read timeout"
    if isinstance(exc, httpx.WriteTimeout):
        return "write timeout"
    return "pool timeout"

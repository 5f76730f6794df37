"""The SIA DC-09 channel adapter: one attempt, one TCP connection, one message, one answer.

The framing is ``sia.py``; this is the shell around it. A connection per attempt keeps the
adapter free of connection state (a kept connection would need DC-09's NULL polling and a
reconnect policy), and an alert is rare enough that the handshake costs nothing that matters.
Outcomes: ACK -> Delivered; NAK -> Retryable (the reason says "clock skew" when the receiver's
clock is why); DUH -> Permanent; timeout, refused, reset, an unreadable answer -> Retryable;
a channel configured wrongly (URL, account, key) -> Permanent. No retries here.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable

from eldercare.alerts.dispatch.adapter import Attempt, Outcome, Permanent, Retryable
from eldercare.alerts.dispatch.sia import (
    CLOCK_SKEW_S,
    DEFAULT_CODES,
    AnswerError,
    CodeTable,
    answer_complete,
    build_message,
    channel_key,
    clock_skew,
    judge,
    parse_answer,
    receiver_address,
)

#: More than this without a whole answer is not a DC-09 receiver talking.
MAX_ANSWER = 4096


class SiaAdapter:
    """Sends attempts to alarm receiving centres over SIA DC-09 (TCP), a connection per attempt.

    A receiver's NAK carries its clock; when that is more than ``CLOCK_SKEW_S`` from the
    timestamp we sent, the difference is kept per receiver and applied to the next message's
    timestamp, as DC-09 asks of a transmitter (the attempt itself still says the dispatcher's
    time). ``pad_source`` gives the encryption pad's bytes; ``monotonic`` measures latency.
    """

    def __init__(
        self,
        *,
        codes: CodeTable = DEFAULT_CODES,
        pad_source: Callable[[int], bytes] = os.urandom,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._codes = codes
        self._pad_source = pad_source
        self._monotonic = monotonic
        self._clock_offsets: dict[tuple[str, int], int] = {}

    async def send(self, attempt: Attempt) -> Outcome:
        """Send one attempt and say what the receiver made of it."""
        channel = attempt.channel
        try:
            address = receiver_address(channel.url)
            key = channel_key(channel)
            message = build_message(
                attempt,
                pad_source=self._pad_source,
                codes=self._codes,
                clock_offset_s=self._clock_offsets.get(address, 0),
            )
        except ValueError as exc:
            return Permanent(f"sia channel misconfigured: {exc}")
        started = self._monotonic()
        phase = "connect"
        raw = b""
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(channel.timeout_s):
                reader, writer = await asyncio.open_connection(*address)
                phase = "answer"
                writer.write(message.frame)
                await writer.drain()
                while not answer_complete(raw) and len(raw) < MAX_ANSWER:
                    chunk = await reader.read(1024)
                    if not chunk:
                        break
                    raw += chunk
        except TimeoutError:
            return Retryable(f"sia {phase} timeout", latency_s=self._monotonic() - started)
        except ConnectionRefusedError:
            return Retryable("sia connection refused", latency_s=self._monotonic() - started)
        except (ConnectionResetError, BrokenPipeError):
            return Retryable("sia connection reset", latency_s=self._monotonic() - started)
        except OSError as exc:
            return Retryable(
                f"sia {phase} failed: {type(exc).__name__}", latency_s=self._monotonic() - started
            )
        finally:
            if writer is not None:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
        latency = self._monotonic() - started
        if not raw.strip():
            return Retryable("sia connection closed without an answer", latency_s=latency)
        try:
            answer = parse_answer(raw, key)
        except AnswerError as exc:
            return Retryable(f"sia answer unreadable: {exc}", latency_s=latency)
        skew = clock_skew(message, answer)
        if answer.kind == "NAK" and skew is not None and abs(skew) > CLOCK_SKEW_S:
            self._clock_offsets[address] = message.timestamp - attempt.timestamp + skew
        return judge(message, answer, latency)

    async def aclose(self) -> None:
        """Nothing to close: every attempt's connection is closed when it is done."""

"""A simulated alarm receiving centre (ARC): pysiaalarm decodes and answers SIA DC-09, or fails on purpose.

The decoding, the checks (CRC, account, key, timestamp window, known code) and the answers are
pysiaalarm's, the receiver Home Assistant uses: its ``SIAServerTCP`` with one ``SIAAccount``
per account (and key), so a third party judges what the gateway sends. The connection handler
is ours, because pysiaalarm's own ``handle_line`` cannot fail on purpose: per message it calls
the same ``parse_and_check_event`` and ``create_response`` as pysiaalarm does, unless a failure
mode says otherwise:

- ``ok``: pysiaalarm's answer (ACK; its own NAK for a timestamp outside the window or an
  unknown account; its own DUH for an unknown code).
- ``nak``: the next ``times`` messages get pysiaalarm's NAK (``NAKEvent``, with its clock).
- ``duh``: pysiaalarm's DUH for the message, as it answers a code it does not know.
- ``slow``: pysiaalarm's answer after ``delay_s``.
- ``silent``: decoded, never answered.
- ``down``: not listening; connections are refused (and open ones cut) until another mode.

Every message pysiaalarm could decode (CRC right, decrypted when encrypted) is kept with the
answer it got, in arrival order: ``received()``.

pysiaalarm's keys are strings whose ASCII characters are the AES key ("0123456789ABCDEF" is
AES-128): ``channel_secret(key)`` is the ``Channel.secret`` (hex) that matches one.
"""

from __future__ import annotations

import asyncio
import copy
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from types import MappingProxyType
from typing import Literal

from pysiaalarm import SIAAccount, SIAEvent
from pysiaalarm.aio.server import SIAServerTCP
from pysiaalarm.event import NAKEvent
from pysiaalarm.utils import Counter

Mode = Literal["ok", "down", "nak", "duh", "slow", "silent"]

_ANSWER = re.compile(rb'"\*?(ACK|NAK|DUH|RSP)"')
_DISPATCH = re.compile(r"dispatch ([A-Za-z0-9._:-]+)")


def channel_secret(key: str) -> str:
    """The ``Channel.secret`` (hex) for a pysiaalarm account key (its characters are the key)."""
    return key.encode("ascii").hex()


@dataclass(frozen=True, slots=True)
class ReceivedEvent:
    """One message the centre decoded, and what it answered."""

    account: str
    sequence: str
    code: str | None
    zone: str | None  # the address field after the code (pysiaalarm calls it "message")
    area: str | None  # ri
    extended: Mapping[str, str]  # extended data blocks: identifier -> value
    dispatch_id: str | None  # from the alarm text ("dispatch <id>")
    timestamp: datetime | None  # the message's own timestamp (UTC)
    encrypted: bool
    answer: str  # "ACK", "NAK", "DUH", "RSP", or "" when none was sent


async def _ignore(event: SIAEvent) -> None:
    """pysiaalarm's server wants a callback; the handler keeps every event itself."""


class AlarmCentreSimulator:
    """A SIA DC-09 receiver on 127.0.0.1 with switchable failure modes (see the module docstring)."""

    def __init__(
        self,
        accounts: Mapping[str, str | None],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        timeband: tuple[int, int] | None = (40, 20),
    ) -> None:
        """``accounts``: account id -> pysiaalarm key (16, 24 or 32 characters) or None for clear.

        ``timeband``: how many seconds a message's timestamp may be behind / ahead of the
        centre's clock (pysiaalarm's ``allowed_timeband``); None accepts any.
        """
        sia_accounts = {
            acc.account_id: acc
            for acc in (
                SIAAccount(account, key, allowed_timeband=timeband) for account, key in accounts.items()
            )
        }
        self._sia = SIAServerTCP(sia_accounts, _ignore, Counter())
        self._host = host
        self._port = port
        self._server: asyncio.Server | None = None
        self._connections: dict[asyncio.StreamWriter, asyncio.Task[None]] = {}
        self._events: list[ReceivedEvent] = []
        self._mode: Mode = "ok"
        self._naks_left = 0
        self._delay_s = 0.0

    @property
    def port(self) -> int:
        """The port it listens on (fixed at the first start, kept across ``down``)."""
        return self._port

    @property
    def url(self) -> str:
        """``tcp://host:port``, a ``Channel.url``."""
        return f"tcp://{self._host}:{self._port}"

    @property
    def mode(self) -> Mode:
        """The failure mode now in force."""
        return self._mode

    async def start(self) -> None:
        """Listen (on a free port the first time, unless one was given)."""
        if self._server is not None:
            return
        self._server = await asyncio.start_server(self._handle, self._host, self._port)
        self._port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening and cut every open connection (its handler ended before this returns)."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        handlers = list(self._connections.values())
        for writer, handler in list(self._connections.items()):
            writer.transport.abort()
            handler.cancel()  # a slow answer may be waiting: the connection is gone anyway
        await asyncio.gather(*handlers, return_exceptions=True)
        if server is not None:
            await server.wait_closed()

    async def set_mode(self, mode: Mode, *, times: int = 1, delay_s: float = 1.0) -> None:
        """Switch the failure mode: ``times`` for ``nak`` (then ``ok``), ``delay_s`` for ``slow``."""
        if mode == "down":
            await self.stop()
        elif self._mode == "down":
            await self.start()
        self._mode = mode
        self._naks_left = times if mode == "nak" else 0
        self._delay_s = delay_s

    def received(self) -> list[ReceivedEvent]:
        """Every decoded message so far, oldest first."""
        return list(self._events)

    def _take_mode(self) -> Mode:
        mode = self._mode
        if mode == "nak":
            self._naks_left -= 1
            if self._naks_left <= 0:
                self._mode = "ok"
        return mode

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handler = asyncio.current_task()
        assert handler is not None
        self._connections[writer] = handler
        try:
            while True:
                try:
                    line = await reader.readuntil(b"\r")  # a DC-09 frame ends with CR
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    return
                event = self._sia.parse_and_check_event(line)
                if event is None:
                    continue
                mode = self._take_mode()
                answer = self._answer(event, mode)
                if isinstance(event, SIAEvent) and event.valid_message:
                    self._record(event, answer)
                if mode == "slow":
                    await asyncio.sleep(self._delay_s)  # the simulated receiver is slow, not a test wait
                if answer is not None:
                    writer.write(answer)
                    await writer.drain()
        except ConnectionError:
            return
        except asyncio.CancelledError:
            return  # stopped: ending quietly keeps asyncio's stream callback from reporting it
        finally:
            self._connections.pop(writer, None)
            writer.close()

    def _answer(self, event: SIAEvent | NAKEvent, mode: Mode) -> bytes | None:
        """pysiaalarm's answer to the event, or the one the failure mode asks for."""
        if mode == "silent":
            return None
        if mode == "nak":
            return NAKEvent().create_response()
        if mode == "duh" and isinstance(event, SIAEvent) and event.valid_message:
            unknown = copy.copy(event)
            unknown.sia_code = None  # pysiaalarm answers DUH to a code it has no entry for
            return unknown.create_response()
        return event.create_response()

    def _record(self, event: SIAEvent, answer: bytes | None) -> None:
        extended = {block[0]: block[1:] for block in (event.x_data or "").split("][") if block}
        found = _ANSWER.search(answer or b"")
        dispatch = _DISPATCH.search(extended.get("I", ""))
        self._events.append(
            ReceivedEvent(
                account=event.account or "",
                sequence=event.sequence or "",
                code=event.code,
                zone=event.message,
                area=event.ri,
                extended=MappingProxyType(extended),
                dispatch_id=dispatch.group(1) if dispatch else None,
                timestamp=event.timestamp if isinstance(event.timestamp, datetime) else None,
                encrypted=bool(event.encrypted),
                answer=found.group(1).decode("ascii") if found else "",
            )
        )

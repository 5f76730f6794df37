"""SIA DC-09 framing for alarm receiving centres: one message per attempt, and its answer read back.

Pure: no sockets, no clock (``sia_adapter.py`` is the TCP shell around it). What we send, per
ANSI/SIA DC-09-2013:

    <LF><crc><0LLL>"SIA-DCS"<seq>R<rcv>L<line>#<acct>[#<acct>|Nri1/<code><zone>][I...][X..][Y..]_HH:MM:SS,MM-DD-YYYY<CR>

- ``crc``: CRC-16/ARC of everything between the length and the CR, 4 upper-case hex digits;
  ``0LLL``: the length of that same text, 4 hex digits.
- ``seq``: 0001-9999, derived from the dispatch id, so every retry of one dispatch carries the
  sequence number of its first try: DC-09's "repeated message", which a receiver recognises.
- ``code``: a two-letter SIA event code from ``DEFAULT_CODES``; ``zone``: the device's number.
- ``[I...]`` alarm text: the alert's English title, ``dispatch <id>`` (the id an ARC reports
  back on the acknowledgement API) and ``device <id>``; ``[X...]``/``[Y...]``: longitude and
  latitude of the elder's home, when the channel may receive ``elder.location``.
- With a key (``Channel.secret``, hex), the token is ``"*SIA-DCS"`` and everything after the
  ``[`` (from the data to the timestamp) is AES-CBC encrypted with a zero IV, prefixed by 1-16
  pad characters (never ``|``, ``[`` or ``]``) and a ``|`` so the length is a multiple of 16,
  and written as upper-case hex.

The receiver answers ``"ACK"`` (taken), ``"NAK"`` with its own timestamp (not taken: often a
clock too far from the receiver's), ``"DUH"`` (not understood), all framed the same way; the
answer to an encrypted message is encrypted too (``"*ACK"``).
"""

from __future__ import annotations

import hashlib
import re
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, Literal, cast
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from eldercare.alerts.dispatch.adapter import Attempt, Channel, Delivered, Outcome, Permanent, Retryable

#: The area (``ri``) every event is reported in: an elder's home is one area.
AREA = "1"
#: A NAK whose receiver clock is further than this from the timestamp we sent is a clock
#: problem (pysiaalarm accepts -40 s / +20 s by default; DC-09 receivers are similar).
CLOCK_SKEW_S = 20
#: DC-09's length field is "0LLL": three hex digits.
MAX_BODY = 0xFFF
#: The alarm text block's limit (DC-09 extended data ``I``).
MAX_TEXT = 256

AnswerKind = Literal["ACK", "NAK", "DUH", "RSP"]


# --- The event code table ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EventCode:
    """One SIA event code and why it was chosen (the docs' code table is built from these)."""

    code: str
    why: str


_MEDICAL = EventCode("MA", "Medical Alarm, emergency assistance request (Contact ID 100)")


@dataclass(frozen=True, slots=True)
class CodeTable:
    """Which SIA code an alert is sent as: its hazard event, else its rule, else its severity.

    ``events`` is keyed by the alert's ``evidence.event`` (the detector's event kind), the most
    specific choice; ``rules`` by ``"<rule>/<severity>"`` or ``"<rule>"``; ``severities`` is
    the fallback every alert has.
    """

    events: Mapping[str, EventCode]
    rules: Mapping[str, EventCode]
    severities: Mapping[str, EventCode]

    def choose(self, alert: Mapping[str, Any]) -> EventCode:
        """The code for one alert of a dispatch document."""
        evidence = alert.get("evidence")
        event = evidence.get("event") if isinstance(evidence, Mapping) else None
        rule, severity = str(alert.get("rule", "")), str(alert.get("severity", ""))
        for table, key in (
            (self.events, event),
            (self.rules, f"{rule}/{severity}"),
            (self.rules, rule),
            (self.severities, severity),
        ):
            if isinstance(key, str) and key in table:
                return table[key]
        return self.severities["emergency"]  # an unknown severity is not allowed to sound milder


DEFAULT_CODES = CodeTable(
    events=MappingProxyType(
        {
            "smoke_detected": EventCode("FA", "Fire Alarm, fire condition detected (Contact ID 111 smoke)"),
            "gas_leak": EventCode("GA", "Gas Alarm (Contact ID 151)"),
            "water_leak": EventCode("WA", "Water Alarm, water detected at the premises"),
        }
    ),
    rules=MappingProxyType(
        {
            "sos": EventCode(
                "QA",
                "the pendant's button: Contact ID 101 personal emergency, which receivers translate to "
                "QA Emergency Alarm",
            ),
            "fall_no_recovery": _MEDICAL,
            "spo2_critical": _MEDICAL,
            "hr_extreme": _MEDICAL,
            "hypoglycaemia_severe": _MEDICAL,
            "news2/emergency": _MEDICAL,
            "smoke_or_gas": EventCode("FA", "Fire Alarm, when the evidence does not say smoke or gas"),
            "inactivity": EventCode("NA", "No Activity for a programmed time, the telecare inactivity alarm"),
            "low_battery": EventCode("XT", "Transmitter Battery Trouble, low battery in a wireless device"),
            "device_offline": EventCode("UY", "Untyped Missing Trouble, a device is logically missing"),
        }
    ),
    severities=MappingProxyType(
        {
            "emergency": EventCode("QA", "Emergency Alarm: someone must act now; the alarm text says why"),
            "urgent": EventCode(
                "UA", "Untyped Zone Alarm: an alarm for an operator, the alarm text says what"
            ),
            "follow_up": EventCode("UT", "Untyped Zone Trouble: a condition to look at, not a call-out"),
        }
    ),
)


# --- Framing ---------------------------------------------------------------------------------


def crc16_arc(data: bytes) -> int:
    """CRC-16/ARC (poly 0x8005 reflected, init 0), the DC-09 message CRC."""
    crc = 0
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc


def frame(body: str) -> bytes:
    """``<LF><crc><0LLL><body><CR>`` for one message or answer body (ASCII)."""
    raw = body.encode("ascii")
    if len(raw) > MAX_BODY:
        raise ValueError(f"a DC-09 message holds at most {MAX_BODY} characters, this one {len(raw)}")
    return b"\n" + f"{crc16_arc(raw):04X}{len(raw):04X}".encode("ascii") + raw + b"\r"


def sequence_for(dispatch_id: str) -> int:
    """The sequence number (1-9999) of every attempt of one dispatch: a retry is a DC-09 repeat."""
    digest = hashlib.sha256(dispatch_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 9999 + 1


def sia_timestamp(unix_s: int) -> str:
    """``_HH:MM:SS,MM-DD-YYYY`` in UTC, the DC-09 timestamp."""
    return datetime.fromtimestamp(unix_s, UTC).strftime("_%H:%M:%S,%m-%d-%Y")


def channel_key(channel: Channel) -> bytes | None:
    """The channel's AES key (``secret`` as hex, 16/24/32 bytes), or None for clear messages."""
    if not channel.secret:
        return None
    try:
        key = bytes.fromhex(channel.secret)
    except ValueError:
        raise ValueError("the SIA key (Channel.secret) is not hex") from None
    if len(key) not in (16, 24, 32):
        raise ValueError(f"the SIA key is {len(key)} bytes; AES needs 16, 24 or 32")
    return key


def receiver_address(url: str) -> tuple[str, int]:
    """Host and port of ``tcp://host:port``."""
    parts = urlsplit(url)
    if parts.scheme != "tcp" or not parts.hostname:
        raise ValueError("a SIA DC-09 channel URL is tcp://host:port")
    try:
        port = parts.port
    except ValueError:
        port = None
    if port is None:
        raise ValueError("a SIA DC-09 channel URL needs a port")
    return parts.hostname, port


_PAD_ALPHABET = string.ascii_letters + string.digits
_HEX = re.compile(r"[0-9A-Fa-f]+")


def encrypt_block(text: str, key: bytes, pad_source: Callable[[int], bytes]) -> str:
    """``text`` behind its DC-09 pad and ``|``, AES-CBC with a zero IV, as upper-case hex."""
    count = 16 - (len(text) + 1) % 16  # 1-16 pad characters; with the "|", a multiple of 16
    pad = "".join(_PAD_ALPHABET[b % len(_PAD_ALPHABET)] for b in pad_source(count)[:count])
    if len(pad) != count:
        raise ValueError("the pad source gave too few bytes")
    plain = (pad + "|" + text).encode("ascii")
    encryptor = Cipher(algorithms.AES(key), modes.CBC(bytes(16))).encryptor()
    return (encryptor.update(plain) + encryptor.finalize()).hex().upper()


def decrypt_block(hex_text: str, key: bytes) -> str:
    """The plain text of an encrypted DC-09 block (pad included), from its hex."""
    if not _HEX.fullmatch(hex_text) or len(hex_text) % 32:
        raise ValueError("an encrypted block is hex in whole 16-byte blocks")
    decryptor = Cipher(algorithms.AES(key), modes.CBC(bytes(16))).decryptor()
    plain = decryptor.update(bytes.fromhex(hex_text)) + decryptor.finalize()
    return plain.decode("latin-1")  # never fails: a wrong key shows as a missing timestamp


# --- One attempt as one message --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SiaMessage:
    """One DC-09 message, framed, and what its answer must match."""

    frame: bytes
    sequence: int
    account: str
    code: str
    timestamp: int  # unix seconds written into the message (the attempt's, plus any offset)
    encrypted: bool


def _field(value: str, letter: str, *, default: str | None) -> str | None:
    """A receiver (``R``) or line (``L``) number: 1-6 hex digits, given with or without its letter."""
    digits = value[1:] if value[:1].upper() == letter else value
    if not digits:
        return default
    if not _HEX.fullmatch(digits) or len(digits) > 6:
        raise ValueError(f"the SIA {letter} number is 1-6 hex digits")
    return digits.upper()


def _account(value: str) -> str:
    if not _HEX.fullmatch(value) or not 3 <= len(value) <= 16:
        raise ValueError("the SIA account is 3-16 hex digits")
    return value.upper()


def _allowed(channel: Channel, field: str) -> bool:
    """Whether the channel may receive a field (``elder.location``): data minimisation."""
    if not channel.fields:
        return True
    parts = field.split(".")
    return any(".".join(parts[:i]) in channel.fields for i in range(1, len(parts) + 1))


def _text(value: object) -> str:
    """Printable ASCII without DC-09's delimiters, for alarm text and such."""
    return "".join(c for c in str(value) if " " <= c <= "~" and c not in "[]|").strip()


def _title(alert: Mapping[str, Any]) -> str:
    title = alert.get("title", "")
    if isinstance(title, Mapping):
        title = title.get("en", "")
    text = str(title)
    if " / " in text:  # "跌倒未起身 / Fall, no recovery": the English half
        text = text.rsplit(" / ", 1)[1]
    if alert.get("late"):  # the operator must know the event is not happening now
        text = f"{text} (late, raised {alert.get('raised_at', '?')})"
    return _text(text)


def zone_of(device_id: str) -> str:
    """The address field for a device: the number its id ends in (``w-0007`` -> ``007``), else 000."""
    found = re.search(r"(\d+)$", device_id)
    number = int(found.group(1)) if found else 0
    return f"{number:03d}" if number <= 9999 else "000"


_REFERENCE = re.compile(r"[A-Za-z0-9._:-]+")


def alarm_text(title: str, dispatch_id: str, device_id: str) -> str:
    """The ``I`` block: title, ``dispatch <id>``, ``device <id>``; the title shortened to fit."""
    if not _REFERENCE.fullmatch(dispatch_id):
        raise ValueError("the dispatch id has characters SIA alarm text cannot carry")
    tail = f"dispatch {dispatch_id}" + (f"; device {device_id}" if device_id else "")
    room = MAX_TEXT - len(tail) - 2
    return f"{title[:room]}; {tail}" if title and room > 0 else tail


def extended_data(attempt: Attempt) -> tuple[tuple[str, str], ...]:
    """The extended data blocks (identifier, value) of an attempt, in the order sent."""
    document, channel = attempt.document, attempt.channel
    alert = document.get("alert") or {}
    device = document.get("device") or {}
    device_id = _text(device.get("id", "")) if _allowed(channel, "device.id") else ""
    title = _title(alert) if _allowed(channel, "alert.title") else ""
    blocks = [("I", alarm_text(title, attempt.dispatch_id, device_id))]
    location = (document.get("elder") or {}).get("location")
    if isinstance(location, Mapping) and _allowed(channel, "elder.location"):
        try:
            lon, lat = float(location["lon"]), float(location["lat"])
        except (KeyError, TypeError, ValueError):
            pass  # a home without a usable position: the ARC has the account's address
        else:
            blocks += [("X", f"{lon:.6f}"), ("Y", f"{lat:.6f}")]
    return tuple(blocks)


def build_message(
    attempt: Attempt,
    *,
    pad_source: Callable[[int], bytes],
    codes: CodeTable = DEFAULT_CODES,
    clock_offset_s: int = 0,
) -> SiaMessage:
    """The DC-09 message of one attempt; ``ValueError`` if the channel cannot be used as configured.

    ``clock_offset_s`` moves the timestamp towards a receiver whose clock differs (learnt from
    its NAK); ``pad_source(n)`` gives n bytes for the encryption pad (``os.urandom``).
    """
    channel = attempt.channel
    account = _account(channel.account)
    receiver = _field(channel.receiver, "R", default=None)
    line = _field(channel.prefix, "L", default="0")
    key = channel_key(channel)
    sequence = sequence_for(attempt.dispatch_id)
    alert = attempt.document.get("alert") or {}
    code = codes.choose(alert).code
    device = attempt.document.get("device") or {}
    zone = zone_of(str(device.get("id", ""))) if _allowed(channel, "device.id") else "000"
    blocks = "".join(f"[{identifier}{value}]" for identifier, value in extended_data(attempt))
    stamp = attempt.timestamp + clock_offset_s
    data = f"Nri{AREA}/{code}{zone}]{blocks}{sia_timestamp(stamp)}"
    route = (f"R{receiver}" if receiver else "") + f"L{line}#{account}"
    if key is None:
        body = f'"SIA-DCS"{sequence:04d}{route}[#{account}|{data}'
    else:  # the "#acct|" of a clear message becomes the pad and its "|"
        body = f'"*SIA-DCS"{sequence:04d}{route}[{encrypt_block(data, key, pad_source)}'
    return SiaMessage(
        frame=frame(body),
        sequence=sequence,
        account=account,
        code=code,
        timestamp=stamp,
        encrypted=key is not None,
    )


# --- The receiver's answer -------------------------------------------------------------------


class AnswerError(ValueError):
    """The receiver's bytes are not a DC-09 answer we can trust."""


@dataclass(frozen=True, slots=True)
class Answer:
    """A receiver's answer, read and checked."""

    kind: AnswerKind
    sequence: int | None  # None in a bare answer ("NAK" without framing)
    account: str | None
    timestamp: int | None  # the receiver's clock, unix seconds, when it sent one
    encrypted: bool


_BARE = re.compile(rb'\s*"\*?(?:ACK|NAK|DUH|RSP)"\s*')
_ANSWER = re.compile(r'"(?P<enc>\*)?(?P<kind>ACK|NAK|DUH|RSP)"(?P<seq>\d{4})?(?P<rest>.*)', re.S)
_ANSWER_ACCOUNT = re.compile(r"#([0-9A-Fa-f]{3,16})\[")
_STAMP = re.compile(r"_(\d{2}):(\d{2}):(\d{2}),(\d{2})-(\d{2})-(\d{4})$")


def answer_complete(data: bytes) -> bool:
    """Whether ``data`` holds a whole answer: a frame up to its CR, or a bare ``"NAK"``."""
    return b"\r" in data or _BARE.fullmatch(data) is not None


def _unix(found: re.Match[str]) -> int:
    hour, minute, second, month, day, year = (int(g) for g in found.groups())
    try:
        return int(datetime(year, month, day, hour, minute, second, tzinfo=UTC).timestamp())
    except ValueError:
        raise AnswerError("the answer's timestamp is not a date") from None


def parse_answer(raw: bytes, key: bytes | None = None) -> Answer:
    """Read one answer: check its CRC and length, decrypt it with ``key`` if it is encrypted.

    pysiaalarm answers a message for an account it does not know with a bare ``"NAK"``
    (no CRC, length or sequence); that is accepted too.
    """
    try:
        text = raw.decode("ascii").partition("\r")[0].strip()  # one answer: up to its CR
    except UnicodeDecodeError:
        raise AnswerError("the answer is not ASCII") from None
    if not text:
        raise AnswerError("the answer is empty")
    if text.startswith('"'):
        body = text
    else:
        head, body = text[:8], text[8:]
        if len(head) < 8 or not _HEX.fullmatch(head):
            raise AnswerError("the answer has no CRC and length")
        if int(head[:4], 16) != crc16_arc(body.encode("ascii")):
            raise AnswerError("the answer's CRC does not match")
        if int(head[4:], 16) != len(body):
            raise AnswerError("the answer's length does not match")
    found = _ANSWER.fullmatch(body)
    if found is None:
        raise AnswerError("the answer is not ACK, NAK, DUH or RSP")
    rest, encrypted = found["rest"], found["enc"] is not None
    if encrypted:
        if key is None:
            raise AnswerError("an encrypted answer on a channel without a key")
        _, bracket, hex_text = rest.partition("[")
        try:
            rest = decrypt_block(hex_text, key) if bracket else ""
        except ValueError as exc:
            raise AnswerError(str(exc)) from None
        if "]" not in rest or not _STAMP.search(rest):
            raise AnswerError("the encrypted answer does not decrypt with the channel's key")
    account = _ANSWER_ACCOUNT.search(found["rest"])
    stamp = _STAMP.search(rest)
    return Answer(
        kind=cast(AnswerKind, found["kind"]),  # the pattern allows only these four
        sequence=int(found["seq"]) if found["seq"] else None,
        account=account.group(1).upper() if account else None,
        timestamp=_unix(stamp) if stamp else None,
        encrypted=encrypted,
    )


def clock_skew(message: SiaMessage, answer: Answer) -> int | None:
    """How far the receiver's clock is ahead of the timestamp we sent (seconds), if it said."""
    return None if answer.timestamp is None else answer.timestamp - message.timestamp


def judge(message: SiaMessage, answer: Answer, latency_s: float = 0.0) -> Outcome:
    """What an answer means for the attempt: ACK delivered, NAK retry, DUH permanent."""
    if answer.kind in ("ACK", "RSP"):
        if answer.sequence != message.sequence:
            return Retryable(f"sia {answer.kind.lower()} for another message", latency_s=latency_s)
        if answer.account is not None and answer.account != message.account:
            return Retryable(f"sia {answer.kind.lower()} for another account", latency_s=latency_s)
        if message.encrypted and not answer.encrypted:
            # Anyone on the path can write a clear ACK; an encrypted one proves the receiver has the key.
            return Retryable("sia ack in clear to an encrypted message", latency_s=latency_s)
        return Delivered(latency_s=latency_s)
    if answer.kind == "DUH":
        return Permanent("sia duh: the receiver does not understand the message", latency_s=latency_s)
    skew = clock_skew(message, answer)
    if skew is not None and abs(skew) > CLOCK_SKEW_S:
        return Retryable(f"sia nak: clock skew {skew:+d} s", latency_s=latency_s)
    return Retryable("sia nak", latency_s=latency_s)

"""SIA DC-09 framing: CRC, length, sequence, timestamp, encryption, the code table, answers.

pysiaalarm (the receiver Home Assistant uses) is the third party here: it decodes what we
build and builds the answers we read, offline. Its accounts are made with no timestamp window
(``allowed_timeband=None``) so fixed timestamps can be used.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pysiaalarm import SIAAccount, SIAEvent
from pysiaalarm.event import NAKEvent
from pysiaalarm.utils import SIA_CODES

from eldercare.alerts.dispatch.adapter import Attempt, Channel, Delivered, Permanent, Retryable
from eldercare.alerts.dispatch.sia import (
    DEFAULT_CODES,
    AnswerError,
    alarm_text,
    answer_complete,
    build_message,
    crc16_arc,
    decrypt_block,
    encrypt_block,
    frame,
    judge,
    parse_answer,
    sequence_for,
    sia_timestamp,
    zone_of,
)

ROOT = Path(__file__).resolve().parents[3]
RULES_FILE = ROOT / "alerts" / "default_rules.toml"
DOCS = ROOT / "docs" / "sia-dc09.md"
#: 2026-11-22 06:00:03 UTC, the spec's example alert.
AT = int(datetime(2026, 11, 22, 6, 0, 3, tzinfo=UTC).timestamp())
#: pysiaalarm's keys: the characters are the key bytes (16, 24, 32 of them).
KEYS = {
    "AES-128": "0123456789ABCDEF",
    "AES-192": "0123456789ABCDEF01234567",
    "AES-256": "0123456789ABCDEF" * 2,
}

DOCUMENT: dict[str, Any] = {
    "dispatch_id": "8b1c0f",
    "alert": {
        "rule": "fall_no_recovery",
        "severity": "emergency",
        "title": "跌倒未起身 / Fall, no recovery",
        "evidence": {"event": "fall_detected", "confidence": 0.93},
    },
    "elder": {"id": "e-1001", "location": {"lat": 29.306, "lon": 120.075}},
    "device": {"id": "w-0007", "type": "wristband"},
}


def counting_pad(n: int) -> bytes:
    """A pad source that makes the pad predictable: "abcd..."."""
    return bytes(range(n))


def channel(key: str | None = None, **changes: Any) -> Channel:
    fields: dict[str, Any] = {
        "name": "arc",
        "kind": "sia_dc09",
        "url": "tcp://127.0.0.1:9",
        "secret": key.encode("ascii").hex() if key else "",
        "account": "1234",
        "receiver": "R12",
        "prefix": "L3",
    }
    return Channel(**(fields | changes))


def attempt(
    ch: Channel | None = None, *, number: int = 1, document: dict[str, Any] | None = None, at: int = AT
) -> Attempt:
    return Attempt("8b1c0f", number, ch or channel(), document or DOCUMENT, at)


def decoded(raw: bytes, key: str | None = None) -> SIAEvent:
    """What pysiaalarm makes of a frame (account 1234, any timestamp accepted)."""
    account = SIAAccount("1234", key, allowed_timeband=None)
    return SIAEvent.from_line(raw.decode("ascii").strip(), {"1234": account})


# --- CRC, length, sequence, timestamp --------------------------------------------------------


def test_crc_is_crc16_arc_with_the_catalogue_check_value() -> None:
    assert crc16_arc(b"123456789") == 0xBB3D


@pytest.mark.parametrize(
    ("crc", "body"),
    [
        ("E5D5", '"SIA-DCS"6002L0#AAA[|Nri1/CL501]_14:12:04,09-25-2019'),
        (
            "60AB",
            '"*SIA-DCS"5994L0#AAA[5AB718E008C616BF16F6468033A11326B0F7546CAB230910BCA10E4DEBA42283C436E4F8EF'
            "F50931070DDE36D5BB5F0C",
        ),
        ("76D8", '"*NULL"0000R0L0#AAAB[B4BC8B40D0E6D959D6BEA78E88CC0B2155741A3C44FBB96D476A3E557CAD64D9'),
    ],
)
def test_crc_matches_the_messages_of_pysiaalarms_tests(crc: str, body: str) -> None:
    assert f"{crc16_arc(body.encode('ascii')):04X}" == crc


def test_a_frame_is_lf_crc_length_body_cr() -> None:
    body = '"*NULL"0000R0L0#AAAB[B4BC8B40D0E6D959D6BEA78E88CC0B2155741A3C44FBB96D476A3E557CAD64D9'
    assert frame(body) == b"\n76D80055" + body.encode("ascii") + b"\r"  # 0x55 = 85 characters


def test_a_body_beyond_the_three_hex_digit_length_is_refused() -> None:
    with pytest.raises(ValueError, match="at most"):
        frame("x" * 0x1000)


def test_every_attempt_of_one_dispatch_carries_one_sequence_number() -> None:
    first = build_message(attempt(number=1), pad_source=counting_pad)
    retry = build_message(attempt(number=2, at=AT + 60), pad_source=counting_pad)
    assert first.sequence == retry.sequence == sequence_for("8b1c0f")
    assert first.frame[9:22] == f'"SIA-DCS"{first.sequence:04d}'.encode()


def test_sequence_numbers_are_four_digits_and_differ_between_dispatches() -> None:
    sequences = {sequence_for(f"dispatch-{i}") for i in range(2000)}
    assert all(1 <= s <= 9999 for s in sequences)
    assert len(sequences) > 1600  # spread: few dispatches share one


def test_the_timestamp_is_utc_in_dc09_form() -> None:
    assert sia_timestamp(AT) == "_06:00:03,11-22-2026"


# --- The message ----------------------------------------------------------------------------


def test_a_clear_message_reads_as_the_standard_lays_it_out() -> None:
    message = build_message(attempt(), pad_source=counting_pad)
    body = (
        f'"SIA-DCS"{message.sequence:04d}R12L3#1234[#1234|Nri1/MA007]'
        "[IFall, no recovery; dispatch 8b1c0f; device w-0007][X120.075000][Y29.306000]_06:00:03,11-22-2026"
    )
    assert message.frame == frame(body)
    assert (message.code, message.account, message.timestamp, message.encrypted) == ("MA", "1234", AT, False)


def test_pysiaalarm_decodes_a_clear_message() -> None:
    message = build_message(attempt(), pad_source=counting_pad)
    event = decoded(message.frame)
    assert event.valid_message
    assert (event.code, event.account, event.sequence) == ("MA", "1234", f"{message.sequence:04d}")
    assert (event.receiver, event.line, event.ri, event.message) == ("R12", "L3", "1", "007")
    assert event.timestamp == datetime(2026, 11, 22, 6, 0, 3, tzinfo=UTC)
    blocks = {x.identifier: x.value for x in event.extended_data or []}
    assert blocks == {
        "I": "Fall, no recovery; dispatch 8b1c0f; device w-0007",
        "X": "120.075000",
        "Y": "29.306000",
    }


@pytest.mark.parametrize("cipher", sorted(KEYS))
def test_an_encrypted_message_round_trips_behind_its_pad(cipher: str) -> None:
    key = KEYS[cipher]
    message = build_message(attempt(channel(key)), pad_source=counting_pad)
    body = message.frame.decode("ascii").strip()[8:]
    head, _, hex_text = body.partition("[")
    assert head == f'"*SIA-DCS"{message.sequence:04d}R12L3#1234'
    plain = decrypt_block(hex_text, key.encode("ascii"))
    pad, bar, data = plain.partition("|")
    assert bar and 1 <= len(pad) <= 16 and not set(pad) & set("[]|")
    assert len(plain) % 16 == 0
    assert data == (
        "Nri1/MA007][IFall, no recovery; dispatch 8b1c0f; device w-0007][X120.075000][Y29.306000]"
        "_06:00:03,11-22-2026"
    )


@pytest.mark.parametrize("length", [14, 15, 16, 31])
def test_the_pad_is_one_to_sixteen_characters(length: int) -> None:
    plain = decrypt_block(encrypt_block("x" * length, b"K" * 16, counting_pad), b"K" * 16)
    assert len(plain) % 16 == 0
    assert 1 <= len(plain.partition("|")[0]) <= 16


@pytest.mark.parametrize("cipher", sorted(KEYS))
def test_pysiaalarm_decrypts_an_encrypted_message(cipher: str) -> None:
    key = KEYS[cipher]
    event = decoded(build_message(attempt(channel(key)), pad_source=counting_pad).frame, key)
    assert event.valid_message and event.encrypted
    assert (event.code, event.account, event.message) == ("MA", "1234", "007")
    assert "dispatch 8b1c0f" in (event.x_data or "")


def test_decryption_reads_pysiaalarms_recorded_null_message() -> None:
    hex_text = "B4BC8B40D0E6D959D6BEA78E88CC0B2155741A3C44FBB96D476A3E557CAD64D9"
    assert decrypt_block(hex_text, b"AAAAAAAAAAAAAAAA") == "ppppppppppp]_18:24:52,07-05-2020"


def test_a_receiver_clock_offset_moves_the_timestamp() -> None:
    message = build_message(attempt(), pad_source=counting_pad, clock_offset_s=600)
    assert message.timestamp == AT + 600
    assert message.frame.endswith(b"_06:10:03,11-22-2026\r")


def test_a_channel_without_elder_location_gets_no_position() -> None:
    minimal = channel(fields=frozenset({"alert"}))
    message = build_message(attempt(minimal), pad_source=counting_pad)
    event = decoded(message.frame)
    assert event.x_data == "IFall, no recovery; dispatch 8b1c0f"
    assert event.message == "000"  # no device either


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"account": "12"}, "account"),
        ({"account": "12G4"}, "account"),
        ({"secret": "00" * 15}, "AES needs"),
        ({"secret": "not hex"}, "not hex"),
        ({"receiver": "R1234567"}, "R number"),
        ({"prefix": "LX"}, "L number"),
    ],
)
def test_a_misconfigured_channel_is_refused(changes: dict[str, str], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        build_message(attempt(channel(**changes)), pad_source=counting_pad)


@pytest.mark.parametrize(("device", "zone"), [("w-0007", "007"), ("hub-1234", "1234"), ("pendant", "000")])
def test_the_zone_is_the_number_a_device_id_ends_in(device: str, zone: str) -> None:
    assert zone_of(device) == zone


def test_a_late_alert_says_so_in_its_alarm_text() -> None:
    late = DOCUMENT | {"alert": DOCUMENT["alert"] | {"late": True, "raised_at": "2026-11-22T05:40:00Z"}}
    event = decoded(build_message(attempt(document=late), pad_source=counting_pad).frame)
    assert (event.x_data or "").startswith("IFall, no recovery (late, raised 2026-11-22T05:40:00Z); dispatch")


def test_alarm_text_keeps_the_dispatch_id_when_the_title_is_long() -> None:
    text = alarm_text("T" * 400, "8b1c0f", "w-0007")
    assert len(text) == 256 and text.endswith("dispatch 8b1c0f; device w-0007")
    with pytest.raises(ValueError, match="dispatch id"):
        alarm_text("Fall", "8b1c]0f", "w-0007")


# --- The code table ---------------------------------------------------------------------------


def code(rule: str, severity: str, event: str | None = None) -> str:
    alert: dict[str, Any] = {"rule": rule, "severity": severity}
    if event:
        alert["evidence"] = {"event": event}
    return DEFAULT_CODES.choose(alert).code


def test_a_pressed_pendant_is_an_emergency_alarm_and_a_fall_a_medical_one() -> None:
    assert code("sos", "emergency", "sos_pressed") == "QA"
    assert code("fall_no_recovery", "emergency", "fall_detected") == "MA"


def test_the_detector_decides_between_fire_and_gas() -> None:
    assert code("smoke_or_gas", "emergency", "smoke_detected") == "FA"
    assert code("smoke_or_gas", "emergency", "gas_leak") == "GA"
    assert code("smoke_or_gas", "emergency") == "FA"
    assert code("a_deployments_own_rule", "urgent", "water_leak") == "WA"


def test_a_rule_whose_level_changes_is_coded_by_its_severity() -> None:
    assert code("news2", "emergency") == "MA"
    assert code("news2", "urgent") == "UA"


def test_unknown_rules_fall_back_on_their_severity() -> None:
    severities = ("emergency", "urgent", "follow_up", "catastrophic")
    assert [code("a_deployments_own_rule", s) for s in severities] == ["QA", "UA", "UT", "QA"]


def test_every_code_we_send_is_one_pysiaalarm_knows() -> None:
    tables = (DEFAULT_CODES.events, DEFAULT_CODES.rules, DEFAULT_CODES.severities)
    unknown = {e.code for table in tables for e in table.values()} - set(SIA_CODES)
    assert not unknown  # a receiver would answer DUH


def test_every_default_rule_has_a_code_at_each_of_its_severities() -> None:
    rules = tomllib.loads(RULES_FILE.read_text(encoding="utf-8"))
    seen = 0
    for section in ("threshold", "event", "absence", "trend", "schedule"):
        for rule in rules.get(section, []):
            for severity in [rule["severity"], *(level["severity"] for level in rule.get("levels", []))]:
                assert code(rule["id"], severity) in SIA_CODES
                seen += 1
    assert seen > 20


# --- Answers ----------------------------------------------------------------------------------


def answered(key: str | None, respond: Callable[[SIAEvent], bytes]) -> tuple[Any, Any]:
    """Our message, and the answer pysiaalarm's ``respond`` gives to it, read back."""
    message = build_message(attempt(channel(key)), pad_source=counting_pad)
    raw = respond(decoded(message.frame, key))
    return message, parse_answer(raw, key.encode("ascii") if key else None)


def test_pysiaalarms_ack_is_delivered() -> None:
    message, answer = answered(None, lambda event: event.create_response())
    assert (answer.kind, answer.sequence, answer.account) == ("ACK", message.sequence, "1234")
    assert not answer.encrypted
    assert isinstance(judge(message, answer, 0.01), Delivered)


@pytest.mark.parametrize("cipher", sorted(KEYS))
def test_pysiaalarms_encrypted_ack_is_decrypted_and_delivered(cipher: str) -> None:
    message, answer = answered(KEYS[cipher], lambda event: event.create_response())
    assert (answer.kind, answer.encrypted) == ("ACK", True)
    assert answer.timestamp is not None  # the receiver's clock, inside the encryption
    assert isinstance(judge(message, answer), Delivered)


def test_a_nak_with_a_distant_receiver_clock_says_clock_skew() -> None:
    message = build_message(attempt(), pad_source=counting_pad)
    answer = parse_answer(frame('"NAK"0000R0L0A0[]_06:10:03,11-22-2026'))
    assert (answer.kind, answer.timestamp) == ("NAK", AT + 600)
    assert judge(message, answer) == Retryable("sia nak: clock skew +600 s")


def test_pysiaalarms_own_nak_is_retryable() -> None:
    message = build_message(attempt(), pad_source=counting_pad)
    answer = parse_answer(NAKEvent().create_response())
    assert answer.kind == "NAK" and answer.timestamp is not None
    assert isinstance(judge(message, answer), Retryable)


def test_a_bare_nak_for_an_unknown_account_is_read() -> None:
    assert parse_answer(b'"NAK"').kind == "NAK"
    assert answer_complete(b'"NAK"') and not answer_complete(b"\n1234")


def test_pysiaalarms_duh_is_permanent() -> None:
    def duh(event: SIAEvent) -> bytes:
        event.sia_code = None  # what pysiaalarm does with a code it does not know
        return event.create_response()

    message, answer = answered(KEYS["AES-128"], duh)
    assert answer.kind == "DUH"
    assert isinstance(judge(message, answer), Permanent)


def test_only_the_first_frame_of_an_answer_is_read() -> None:
    answer = parse_answer(frame('"ACK"0401R12L3#1234[]') + b"\n trailing bytes")
    assert (answer.kind, answer.sequence) == ("ACK", 401)


def test_an_ack_for_another_sequence_is_not_a_delivery() -> None:
    message = build_message(attempt(), pad_source=counting_pad)
    other = (message.sequence % 9999) + 1
    answer = parse_answer(frame(f'"ACK"{other:04d}R12L3#1234[]'))
    assert judge(message, answer) == Retryable("sia ack for another message")


def test_a_clear_ack_to_an_encrypted_message_is_not_a_delivery() -> None:
    message = build_message(attempt(channel(KEYS["AES-128"])), pad_source=counting_pad)
    answer = parse_answer(frame(f'"ACK"{message.sequence:04d}R12L3#1234[]'), b"0123456789ABCDEF")
    assert judge(message, answer) == Retryable("sia ack in clear to an encrypted message")


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b"\n00000015" + b'"ACK"0401R12L3#1234[]' + b"\r", "CRC"),
        (frame('"ACK"0401R12L3#1234[]').replace(b"0015", b"0016"), "length"),
        (frame('"HUH"0401R12L3#1234[]'), "not ACK"),
        (b"\n\r", "empty"),
    ],
)
def test_an_answer_that_cannot_be_trusted_is_refused(raw: bytes, problem: str) -> None:
    with pytest.raises(AnswerError, match=problem):
        parse_answer(raw)


def test_an_encrypted_answer_under_another_key_is_refused() -> None:
    message, _ = answered(KEYS["AES-128"], lambda event: event.create_response())
    raw = decoded(message.frame, KEYS["AES-128"]).create_response()
    with pytest.raises(AnswerError, match="key"):
        parse_answer(raw, b"FEDCBA9876543210")


# --- The docs say what the code does -----------------------------------------------------------


def test_the_docs_example_is_the_message_the_code_builds() -> None:
    example = re.search(r"^<LF>(.*)<CR>$", DOCS.read_text(encoding="utf-8"), re.M)
    assert example is not None
    built = build_message(attempt(), pad_source=counting_pad).frame
    assert built == b"\n" + example.group(1).encode("ascii") + b"\r"


def test_the_docs_code_table_is_the_default_table() -> None:
    row = re.compile(r"^\| (event|rule|severity) \| `([^`]+)` \| ([A-Z]{2}) \|", re.M)
    documented = set(row.findall(DOCS.read_text(encoding="utf-8")))
    tables = (
        ("event", DEFAULT_CODES.events),
        ("rule", DEFAULT_CODES.rules),
        ("severity", DEFAULT_CODES.severities),
    )
    assert documented == {(kind, key, e.code) for kind, table in tables for key, e in table.items()}

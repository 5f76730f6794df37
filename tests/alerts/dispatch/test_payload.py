"""Data minimisation per channel, and the body each channel is sent."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from eldercare.alerts.dispatch.adapter import Channel, ChannelKind
from eldercare.alerts.dispatch.payload import body, fields_for, minimise

DOCUMENT: dict[str, Any] = {
    "dispatch_id": "8b1c-0001",
    "attempt": 1,
    "channel": "?",
    "alert": {
        "id": "a41f",
        "rule": "fall_no_recovery",
        "severity": "emergency",
        "title": "跌倒未起身 / Fall, no recovery",
        "evidence": {"event": "fall_detected", "confidence": 0.93},
    },
    "elder": {
        "id": "e-1001",
        "name": "测试甲",
        "sex": "F",
        "birth_year": 1941,
        "phone": "000",
        "address": "test address",
        "location": {"lat": 29.306, "lon": 120.075},
        "conditions": ["hypertension"],
        "medications": ["amlodipine 5mg"],
        "allergies": [],
        "emergency_contacts": [{"name": "contact", "relation": "daughter", "phone": "000"}],
        "family_doctor": {"name": "doctor", "clinic": "clinic", "phone": "000"},
    },
    "latest_vitals": {"heart_rate": {"value": 112, "unit": "/min", "at": "2026-11-22T06:00:00Z"}},
    "device": {"id": "w-0007", "type": "wristband"},
    "ack_url": "https://gateway.test/api/v1/dispatches/8b1c-0001/ack",
}


def channel(name: str, kind: ChannelKind = "webhook", fields: frozenset[str] = frozenset()) -> Channel:
    return Channel(name=name, kind=kind, url="http://127.0.0.1:1/", fields=fields)


def sent(name: str, kind: ChannelKind = "webhook", fields: frozenset[str] = frozenset()) -> dict[str, Any]:
    result: dict[str, Any] = orjson.loads(body(DOCUMENT, channel(name, kind, fields), attempt=2))
    return result


@pytest.mark.parametrize(
    ("fields", "kept"),
    [
        (set(), DOCUMENT),
        ({"alert"}, {"alert": DOCUMENT["alert"]}),
        (
            {"elder.id", "elder.location"},
            {"elder": {"id": "e-1001", "location": {"lat": 29.306, "lon": 120.075}}},
        ),
        ({"elder", "elder.medications"}, {"elder": DOCUMENT["elder"]}),
        ({"elder.medications", "elder"}, {"elder": DOCUMENT["elder"]}),
        ({"elder.family_doctor.clinic"}, {"elder": {"family_doctor": {"clinic": "clinic"}}}),
        (
            {"alert.evidence.event", "device"},
            {"alert": {"evidence": {"event": "fall_detected"}}, "device": DOCUMENT["device"]},
        ),
        ({"nothing", "elder.nothing"}, {}),
        ({"elder.medications.first"}, {}),  # a dotted name into a list selects nothing
    ],
)
def test_minimise_keeps_what_is_selected(fields: set[str], kept: dict[str, Any]) -> None:
    assert minimise(DOCUMENT, fields) == kept


@given(
    st.sets(
        st.sampled_from(["alert", "elder", "elder.id", "elder.medications", "device", "x.y", "alert.rule"])
    )
)
def test_minimise_never_invents_or_changes_a_value(fields: set[str]) -> None:
    def within(part: Any, whole: Any) -> bool:
        if isinstance(part, dict):
            return isinstance(whole, dict) and all(
                k in whole and within(v, whole[k]) for k, v in part.items()
            )
        return part == whole

    assert within(minimise(DOCUMENT, fields), DOCUMENT)
    assert DOCUMENT["elder"]["medications"] == ["amlodipine 5mg"]  # the input is left alone


def test_120_receives_everything_with_attempt_and_channel_set() -> None:
    got = sent("120")
    assert got == {**DOCUMENT, "attempt": 2, "channel": "120"}
    assert list(got)[:3] == ["dispatch_id", "attempt", "channel"] and list(got)[-1] == "ack_url"


def test_the_envelope_is_sent_whatever_the_selection() -> None:
    got = sent("12320", fields=frozenset({"alert.rule"}))
    assert got == {
        "dispatch_id": "8b1c-0001",
        "attempt": 2,
        "channel": "12320",
        "alert": {"rule": "fall_no_recovery"},
        "ack_url": DOCUMENT["ack_url"],
    }


def test_body_is_utf8_json_without_escapes() -> None:
    raw = body(DOCUMENT, channel("120"), attempt=1)
    assert "跌倒未起身".encode() in raw


def test_family_default_has_no_medications_nor_other_health_detail() -> None:
    got = sent("family")
    assert set(got["elder"]) == {"id", "name", "location"}
    assert got["alert"] == DOCUMENT["alert"] and got["ack_url"] == DOCUMENT["ack_url"]


def test_sms_gateway_default_has_the_contacts_but_no_medications() -> None:
    got = sent("sms", kind="sms_gateway")
    assert "medications" not in got["elder"]
    assert got["elder"]["emergency_contacts"] == DOCUMENT["elder"]["emergency_contacts"]


@given(st.sets(st.sampled_from(["alert", "elder", "elder.medications", "elder.id", "device"])))
def test_a_family_channel_never_receives_medications_however_configured(fields: set[str]) -> None:
    family_channels: list[tuple[str, ChannelKind]] = [("family", "webhook"), ("sms", "sms_gateway")]
    for name, kind in family_channels:
        got = sent(name, kind, frozenset(fields))
        assert "medications" not in got.get("elder", {})


def test_the_family_doctor_is_no_family_channel() -> None:
    assert fields_for(channel("family_doctor", kind="task_queue")) == frozenset()
    assert sent("family_doctor", kind="task_queue")["elder"]["medications"] == ["amlodipine 5mg"]

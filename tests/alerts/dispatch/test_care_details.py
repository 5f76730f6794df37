"""The elder's care details in the request body: position, medications, allergies, emergency
contacts and family doctor, from the profile and the event, minimised per channel."""

from __future__ import annotations

import asyncio
import random
import time
from datetime import UTC, datetime
from typing import Any

import orjson
import psycopg
from psycopg.types.json import Jsonb

from eldercare.alerts.careplan import parse_care_plan
from eldercare.alerts.dispatch.adapter import Channel
from eldercare.alerts.dispatch.channels import channels_from
from eldercare.alerts.dispatch.dispatcher import Dispatcher
from eldercare.alerts.dispatch.payload import body
from eldercare.alerts.rules import load_rule_set
from eldercare.devices.catalog import load_catalog
from eldercare.devices.interpret import Policy, interpret
from eldercare.devices.registry import DeviceInfo, Registry
from eldercare.gateway.ingest.alerting import AlertingStep
from eldercare.gateway.store import dispatches as store
from eldercare.gateway.store.devices import add_device
from eldercare.gateway.store.elders import set_care_plan
from eldercare.gateway.store.profiles import Contact, FamilyDoctor, Location, set_profile
from eldercare.gateway.store.writer import BatchWriter, Received
from eldercare.simulators.hotlines import HotlineSimulator
from tests.alerts.dispatch.outbox import raise_alert, rows, run_until

RULES = load_rule_set()
#: Invented people and numbers.
CARE = {
    "location": Location(29.2, 120.1),  # home, a few km from where the wristband is
    "medications": ["amlodipine 5mg daily", "metformin 500mg twice daily"],
    "allergies": ["penicillin"],
    "emergency_contacts": [
        Contact("联系人甲", "daughter", "13800000001"),
        Contact("联系人乙", "son", "13800000002"),
    ],
    "family_doctor": FamilyDoctor("医生丙", "某社区卫生服务中心", "0579-85000000"),
}
CONTACTS = [
    {"name": "联系人甲", "relation": "daughter", "phone": "13800000001"},
    {"name": "联系人乙", "relation": "son", "phone": "13800000002"},
]
DOCTOR = {"name": "医生丙", "clinic": "某社区卫生服务中心", "phone": "0579-85000000"}


def sos_with_position(db_url: str, elder: str, device: str) -> None:
    """The spec's event message, interpreted and written with the rules on, as a worker does."""
    payload = orjson.dumps(
        {
            "msg_id": "w-9",
            "ts": datetime.now(UTC).isoformat(),
            "event": "sos_pressed",
            "location": {"lat": 29.306, "lon": 120.075, "accuracy_m": 12},
            "data": {},
        }
    )
    topic = f"eldercare/v1/devices/{device}/events"
    registry = Registry([DeviceInfo(device, "wristband", elder_id=elder)])
    now = time.time()
    interp = interpret(topic, payload, now, registry, Policy(load_catalog()))
    assert not interp.rejections and interp.events
    with psycopg.connect(db_url) as conn:
        BatchWriter("plain", AlertingStep(RULES)).write(conn, [Received(topic, payload, now, interp)])


def test_an_sos_sends_120_the_wristbands_position_and_all_care_details_and_the_family_sms_no_medications(
    db_url: str, simulator: HotlineSimulator
) -> None:
    with psycopg.connect(db_url) as conn:
        add_device(conn, "w-1001", "wristband", "e-1001")
        # This elder's SOS goes to 120 and the family at once (not the 12349 operator first).
        set_care_plan(conn, "e-1001", parse_care_plan({"routes": {"operator_first": "emergency"}}), "test")
        assert set_profile(conn, "e-1001", {"name": "测试丁", **CARE}, "test")
    sos_with_position(db_url, "e-1001", "w-1001")
    [(alert_id,)] = rows(db_url, "SELECT id FROM alerts WHERE elder_id = 'e-1001'")
    before = {h: len(simulator.received(h)) for h in ("120", "sms")}
    channels = channels_from(
        {
            "channels": {
                "120": {"kind": "webhook", "url": simulator.url("120"), "secret": simulator.secret("120")},
                "family": {
                    "kind": "sms_gateway",
                    "url": simulator.url("sms"),
                    "secret": simulator.secret("sms"),
                },
            }
        },
        environ={},
    )
    dispatcher = Dispatcher(db_url, channels, RULES, ack_base_url="http://127.0.0.1:9", rng=random.Random(1))
    asyncio.run(
        run_until([dispatcher], lambda: all(len(simulator.received(h)) > n for h, n in before.items()))
    )
    [to_120] = simulator.received("120")[before["120"] :]
    [to_family] = simulator.received("sms")[before["sms"] :]
    assert to_120.document is not None and to_120.document["alert"]["id"] == str(alert_id)
    elder = to_120.document["elder"]
    assert elder["location"] == {"lat": 29.306, "lon": 120.075, "accuracy_m": 12, "source": "device"}
    assert elder["medications"] == CARE["medications"] and elder["allergies"] == ["penicillin"]
    assert elder["emergency_contacts"] == CONTACTS and elder["family_doctor"] == DOCTOR
    assert list(elder) == [
        "id", "name", "sex", "birth_year", "phone", "address", "location", "conditions",
        "medications", "allergies", "emergency_contacts", "family_doctor",
    ]  # fmt: skip
    assert to_family.document is not None
    assert to_family.document["elder"] == {
        "id": "e-1001",
        "name": "测试丁",
        "location": elder["location"],
        "emergency_contacts": CONTACTS,
    }


def test_the_home_position_stands_in_for_an_event_without_one_and_nothing_is_invented(db_url: str) -> None:
    plain, no_details, bad_position, upgraded = (raise_alert(db_url) for _ in range(4))
    elder_of = dict(rows(db_url, "SELECT id, elder_id FROM alerts"))
    positions = {
        bad_position: {"event": "fall_detected", "details": {"location": {"lat": 91, "lon": 0}}},
        upgraded: {
            "event": "wandering",
            "details": {"location": {"lat": 29.0, "lon": 120.0}},
            "upgraded": {"event": "wandering", "details": {"location": {"lat": 29.5, "lon": 120.5}}},
        },
    }
    with psycopg.connect(db_url) as conn:
        for alert_id in (no_details, bad_position, upgraded):
            assert set_profile(conn, elder_of[alert_id], CARE, "test")
        for alert_id, evidence in positions.items():
            conn.execute("UPDATE alerts SET evidence = %s WHERE id = %s", (Jsonb(evidence), alert_id))
        conn.commit()
        docs = store.documents(conn, [plain, no_details, bad_position, upgraded], {})

    home = {"lat": 29.2, "lon": 120.1, "source": "home"}
    assert docs[no_details]["elder"]["location"] == home
    assert docs[bad_position]["elder"]["location"] == home  # not a position: never sent
    assert docs[upgraded]["elder"]["location"] == {"lat": 29.5, "lon": 120.5, "source": "device"}
    # A profile without care details: empty lists and nulls, the rest as it was.
    bare = docs[plain]["elder"]
    assert bare["name"] == "测试乙" and bare["location"] is None and bare["family_doctor"] is None
    assert bare["medications"] == bare["allergies"] == bare["emergency_contacts"] == []

    def sent(name: str, kind: Any) -> dict[str, Any]:
        channel = Channel(name=name, kind=kind, url="http://127.0.0.1:1/")
        document = {**docs[no_details], "dispatch_id": "d-1"}
        return dict(orjson.loads(body(document, channel, attempt=1))["elder"])

    assert sent("120", "webhook") == docs[no_details]["elder"]
    assert set(sent("family", "webhook")) == {"id", "name", "location"}
    assert set(sent("family", "sms_gateway")) == {"id", "name", "location", "emergency_contacts"}

"""The rules end to end: devices publish through the real broker, real workers decide, the
alerts, their evidence, tasks, timers and outbox rows are read back from the database."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import orjson
import psycopg
import pytest

from eldercare.gateway.store.devices import add_device
from tests.gateway.ingest.conftest import IngestSetup
from tests.gateway.ingest.processes import Device
from tests.gateway.ingest.test_worker_e2e import needs_mosquitto_guarantees
from tests.waiting import wait_for

pytestmark = pytest.mark.slow


def ms(at: datetime) -> int:
    return int(at.timestamp() * 1000)


def event(device: Device, msg_id: str, kind: str, at: datetime | None = None) -> None:
    at = at or datetime.now(UTC)
    device.publish("events", {"msg_id": msg_id, "ts": ms(at), "event": kind}).wait_for_publish(5)


def alerts(ingest: IngestSetup, elder: str) -> list[tuple]:
    return ingest.rows(
        "SELECT rule, severity, raised_severity, state, route, late, matches, evidence"
        f" FROM alerts WHERE elder_id = '{elder}' ORDER BY raised_at"
    )


def test_sos_raises_an_emergency_alert_with_its_evidence_and_an_outbox_row(ingest: IngestSetup) -> None:
    worker = ingest.worker().start()
    [dev] = ingest.devices(1, elder="e-sos")
    ingest.wait_until_subscribed(worker, dev)
    pressed = datetime.now(UTC)
    event(dev, "sos-1", "sos_pressed", pressed)

    rows = wait_for(lambda: alerts(ingest, "e-sos"), 15, "the SOS alert")
    [(rule, severity, raised, state, route, late, matches, evidence)] = rows
    assert (rule, severity, raised, state, route) == (
        "sos",
        "emergency",
        "emergency",
        "open",
        "operator_first",
    )
    assert (late, matches) == (False, 1)
    assert evidence["event"] == "sos_pressed" and evidence["device_id"] == dev.device_id
    assert datetime.fromisoformat(evidence["at"]) == datetime.fromtimestamp(ms(pressed) / 1000, UTC)
    [(reason, outbox_severity, outbox_route)] = ingest.rows(
        "SELECT reason, severity, route FROM alert_outbox"
    )
    assert (reason, outbox_severity, outbox_route) == ("raised", "emergency", "operator_first")
    [(to_state, why)] = ingest.rows("SELECT to_state, reason FROM alert_history")
    assert to_state == "open" and why.startswith("raised: sos_pressed at ")


def test_fall_then_recovery_within_60_s_is_a_follow_up_task_and_no_emergency(ingest: IngestSetup) -> None:
    worker = ingest.worker().start()
    [dev] = ingest.devices(1, elder="e-fall")
    ingest.wait_until_subscribed(worker, dev)
    event(dev, "f-1", "fall_detected")
    wait_for(
        lambda: ingest.rows("SELECT 1 FROM timers WHERE kind = 'rule:fall_no_recovery'"), 15, "the timer"
    )
    event(dev, "f-2", "fall_recovered")

    rows = wait_for(lambda: alerts(ingest, "e-fall"), 15, "the follow-up")
    assert [(r[0], r[1]) for r in rows] == [("fall_recovered", "follow_up")]
    [(kind, assignee, due_in)] = ingest.rows(
        "SELECT kind, assignee, due_at - created_at FROM tasks WHERE elder_id = 'e-fall'"
    )
    assert (kind, assignee, due_in) == ("fall_risk_assessment", "family_doctor", timedelta(days=7))
    # The emergency can only come from the timer, and it is cancelled: none will come.
    assert ingest.rows(
        "SELECT fired_at IS NULL, cancelled_at IS NOT NULL FROM timers WHERE kind = 'rule:fall_no_recovery'"
    ) == [(True, True)]


def test_fall_without_recovery_is_an_emergency_at_60_s_also_when_the_worker_that_saw_it_died(
    ingest: IngestSetup,
) -> None:
    first = ingest.worker("a").start()
    [dev] = ingest.devices(1, elder="e-down")
    ingest.wait_until_subscribed(first, dev)
    # The fall happened 55 s ago by the device's clock (not late: under 10 min): due in 5 s.
    fell = datetime.now(UTC) - timedelta(seconds=55)
    event(dev, "d-1", "fall_detected", fell)
    [(due,)] = wait_for(
        lambda: ingest.rows("SELECT due_at FROM timers WHERE kind = 'rule:fall_no_recovery'"), 15, "the timer"
    )
    first.kill9()  # the worker that saw the fall is gone before the minute is up
    ingest.worker("b").start()

    rows = wait_for(lambda: alerts(ingest, "e-down"), 30, "the emergency from the timer")
    [(rule, severity, _, state, route, late, _, evidence)] = rows
    assert (rule, severity, state, route, late) == (
        "fall_no_recovery",
        "emergency",
        "open",
        "emergency",
        False,
    )
    assert evidence["unanswered"] == ["fall_recovered"] and evidence["waited_s"] == 60
    [(fired_at, raised_at)] = ingest.rows(
        "SELECT t.fired_at, a.raised_at FROM timers t, alerts a WHERE t.kind = 'rule:fall_no_recovery'"
    )
    assert due <= fired_at == raised_at
    print(f"timer fired {(fired_at - due).total_seconds():.3f} s after its due time")


def test_a_buffered_hub_upload_of_yesterdays_hypoxia_is_a_late_alert_routed_as_urgent(
    ingest: IngestSetup,
) -> None:
    worker = ingest.worker().start()
    hub_id, clip_id = "hub-late-1", "clip-late-1"
    account = ingest.broker.add_user(hub_id)
    with psycopg.connect(ingest.db_url) as conn:
        add_device(conn, hub_id, "hub")
        add_device(conn, clip_id, "wristband", "e-late", hub_id)
    hub = Device(hub_id, account.password, ingest.broker.host, ingest.broker.port).connect()
    ingest.opened.append(hub)
    [probe] = ingest.devices(1, elder="e-probe")
    ingest.wait_until_subscribed(worker, probe)

    yesterday = datetime.now(UTC) - timedelta(days=1)
    samples = [{"ts": ms(yesterday + timedelta(minutes=i)), "metrics": {"spo2": 80}} for i in range(3)]
    body = {"msg_id": "up-1", "devices": {clip_id: {"samples": samples}}}
    hub.client.publish(f"eldercare/v1/hubs/{hub_id}/telemetry", orjson.dumps(body), qos=1).wait_for_publish(5)

    rows = wait_for(lambda: alerts(ingest, "e-late"), 15, "the late alert")
    [(rule, severity, raised, state, route, late, _, evidence)] = rows
    assert (rule, severity, raised, state, route) == (
        "spo2_critical",
        "urgent",
        "emergency",
        "open",
        "urgent",
    )
    assert late is True
    assert evidence["late_by_s"] > 23 * 3600 and evidence["acted_on_as"] == "urgent"
    assert [p["value"] for p in evidence["readings"]] == [80.0, 80.0, 80.0]
    assert ingest.rows("SELECT severity, route FROM alert_outbox") == [("urgent", "urgent")]


def test_two_workers_never_open_two_alerts_for_one_elder_and_rule(ingest: IngestSetup) -> None:
    needs_mosquitto_guarantees(ingest, "two workers sharing a $share group")
    a = ingest.worker("a", shared=True).start()
    b = ingest.worker("b", shared=True).start()
    devices = ingest.devices(12, elder="e-race")
    ingest.wait_until_subscribed(a, devices[0], also=[b])
    for round_ in range(3):  # every pendant of the home pressed at once, three times
        infos = [
            d.publish("events", {"msg_id": f"r{round_}", "ts": ms(datetime.now(UTC)), "event": "sos_pressed"})
            for d in devices
        ]
        for info in infos:
            info.wait_for_publish(5)
        time.sleep(0.05)

    def all_counted() -> list[tuple]:
        rows = alerts(ingest, "e-race")
        return rows if rows and sum(r[6] for r in rows) == 36 else []

    rows = wait_for(all_counted, 30, "36 presses counted")
    assert [(r[0], r[3], r[6]) for r in rows] == [("sos", "open", 36)]
    assert ingest.rows("SELECT count(*) FROM alert_outbox") == [(1,)]
    # Both workers took part (a $share group splits the messages between them).
    a.stop()
    b.stop()
    assert ingest.stored_by(a) > 0 and ingest.stored_by(b) > 0

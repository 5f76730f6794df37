"""``eldercare alerts`` and ``eldercare tasks`` on alerts the rules raised in a real database."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from typer.testing import CliRunner

from eldercare.alerts.dispatch.channels import channels_from
from eldercare.alerts.dispatch.dispatcher import Dispatcher
from eldercare.alerts.rules import load_rule_set
from eldercare.devices.records import DeviceEvent, Interpretation
from eldercare.gateway.cli import app
from eldercare.gateway.ingest.alerting import AlertingStep
from eldercare.gateway.store.devices import add_device
from eldercare.gateway.store.writer import BatchWriter, Received
from eldercare.simulators.hotlines import HotlineSimulator

runner = CliRunner()
NOW = datetime(2026, 11, 23, 2, 0, tzinfo=UTC)


def raise_by_events(db_url: str, *kinds: str) -> None:
    """Store events of a pendant through the writer with the rules on (as the worker does)."""
    step = AlertingStep(load_rule_set(), clock=NOW.timestamp)
    writer = BatchWriter("plain", step)
    with psycopg.connect(db_url) as conn:
        add_device(conn, "p-1", "sos_button", "e-7")
        batch = []
        for i, kind in enumerate(kinds):
            interp = Interpretation(source_id="p-1", msg_id=f"m{i}", seen_devices=["p-1"])
            interp.events.append(DeviceEvent(NOW - timedelta(seconds=5), "p-1", "e-7", kind, {}, []))
            batch.append(Received("eldercare/v1/devices/p-1/events", b"{}", NOW.timestamp(), interp))
        writer.write(conn, batch)


@pytest.fixture
def cli_env(db_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("ELDERCARE_DATABASE_URL", db_url)
    return db_url


def test_alerts_list_show_ack_and_resolve(cli_env: str) -> None:
    raise_by_events(cli_env, "sos_pressed")
    listed = runner.invoke(app, ["alerts", "list", "--json"])
    assert listed.exit_code == 0, listed.output
    [alert] = [json.loads(line) for line in listed.stdout.splitlines()]
    assert (alert["rule"], alert["severity"], alert["state"]) == ("sos", "emergency", "open")

    shown = runner.invoke(app, ["alerts", "show", alert["id"], "--json"])
    detail = json.loads(shown.stdout)
    assert detail["evidence"]["event"] == "sos_pressed"
    assert [h[3] for h in detail["history"]] == ["open"]
    assert [o[1:4] for o in detail["outbox"]] == [["raised", "emergency", "operator_first"]]
    assert "history" in runner.invoke(app, ["alerts", "show", alert["id"]]).stdout

    acked = runner.invoke(app, ["alerts", "ack", alert["id"], "--by", "nurse-3", "--note", "calling"])
    assert acked.exit_code == 0 and "open -> acknowledged" in acked.stdout
    resolved = runner.invoke(app, ["alerts", "resolve", alert["id"], "--outcome", "pressed by mistake"])
    assert resolved.exit_code == 0 and "acknowledged -> resolved" in resolved.stdout
    again = runner.invoke(app, ["alerts", "resolve", alert["id"], "--outcome", "twice"])
    assert again.exit_code == 1 and "is resolved" in again.output

    detail = json.loads(runner.invoke(app, ["alerts", "show", alert["id"], "--json"]).stdout)
    assert [(h[1], h[3]) for h in detail["history"]] == [
        ("rules", "open"),
        ("nurse-3", "acknowledged"),
        (detail["history"][2][1], "resolved"),
    ]
    assert detail["outcome"] == "pressed by mistake"
    assert runner.invoke(app, ["alerts", "list", "--json"]).stdout == ""  # no longer active
    assert json.loads(runner.invoke(app, ["alerts", "list", "--all", "--json"]).stdout)["state"] == "resolved"


def test_an_unknown_alert_is_one_clear_error(cli_env: str) -> None:
    result = runner.invoke(app, ["alerts", "show", "00000000-0000-0000-0000-000000000009"])
    assert result.exit_code == 1 and "no alert" in result.output
    result = runner.invoke(app, ["alerts", "ack", "not-a-uuid"])
    assert result.exit_code == 2 and "not an alert id" in result.output


def test_tasks_list_and_done(cli_env: str) -> None:
    raise_by_events(cli_env, "service_requested")
    listed = runner.invoke(app, ["tasks", "list", "--assignee", "service_desk", "--json"])
    [task] = [json.loads(line) for line in listed.stdout.splitlines()]
    assert (task["kind"], task["elder_id"], task["state"]) == ("service_request", "e-7", "open")
    task_id = task["id"]
    due_in = datetime.fromisoformat(task["due_at"]) - datetime.fromisoformat(task["created_at"])
    assert due_in == timedelta(hours=2)
    assert runner.invoke(app, ["tasks", "list"]).exit_code == 0
    done = runner.invoke(app, ["tasks", "done", str(task_id), "--outcome", "meal delivered"])
    assert done.exit_code == 0, done.output
    assert runner.invoke(app, ["tasks", "done", str(task_id), "--outcome", "again"]).exit_code == 1
    [finished] = [
        json.loads(x) for x in runner.invoke(app, ["tasks", "list", "--done", "--json"]).stdout.splitlines()
    ]
    assert finished["id"] == task_id and finished["state"] == "done"


def test_alerts_show_tells_who_was_called_and_what_came_of_it(cli_env: str) -> None:
    """The rules raise an SOS (12349 first), a dispatcher calls the simulated 12349."""
    raise_by_events(cli_env, "sos_pressed")
    [alert] = [
        json.loads(line) for line in runner.invoke(app, ["alerts", "list", "--json"]).stdout.splitlines()
    ]
    with HotlineSimulator(ack_delay_s=600.0) as sim:
        entry = {"kind": "webhook", "url": sim.url("12349"), "secret": sim.secret("12349"), "timeout": 1.0}
        dispatcher = Dispatcher(
            cli_env,
            channels_from({"channels": {"12349": entry}}, environ={}),
            load_rule_set(),
            ack_base_url="http://x",
        )

        async def until_delivered() -> None:
            stop = asyncio.Event()
            task = asyncio.create_task(dispatcher.run(stop))
            try:
                async with asyncio.timeout(15):
                    while not sim.received("12349"):
                        await asyncio.sleep(0.02)
                    await dispatcher.idle()
            finally:
                stop.set()
                await task

        asyncio.run(until_delivered())
    detail = json.loads(runner.invoke(app, ["alerts", "show", alert["id"], "--json"]).stdout)
    assert [d[:5] for d in detail["dispatches"]] == [["12349", 0, "delivered", None, 1]]
    text = runner.invoke(app, ["alerts", "show", alert["id"]]).stdout
    assert "who was called" in text and "12349" in text and "delivered" in text

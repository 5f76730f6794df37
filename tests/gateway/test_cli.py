"""The `eldercare` command: settings errors, migrate, devices, dead-letters."""

from __future__ import annotations

import psycopg
import pytest
from typer.testing import CliRunner

from eldercare.devices.credentials import parse_password_file, verify_password
from eldercare.gateway.broker import mqtt_connack
from eldercare.gateway.cli import app

runner = CliRunner()


@pytest.fixture
def env(db_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path) -> str:
    monkeypatch.setenv("ELDERCARE_DATABASE_URL", db_url)
    monkeypatch.setenv("ELDERCARE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)  # no stray .env file
    return db_url


def test_bad_setting_is_one_clear_line(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ELDERCARE_BATCH_SIZE", "lots")
    result = runner.invoke(app, ["devices", "list"])
    assert result.exit_code == 2
    assert "ELDERCARE_BATCH_SIZE" in result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_bad_mqtt_url_names_the_variable(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ELDERCARE_MQTT_URL", "http://broker")
    result = runner.invoke(app, ["devices", "list"])
    assert result.exit_code == 2 and "ELDERCARE_MQTT_URL" in result.output


def test_help_explains_the_settings() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in (
        "ELDERCARE_DATABASE_URL",
        "ELDERCARE_MQTT_URL",
        "ELDERCARE_MQTT_SHARED_GROUP",
        "ELDERCARE_BATCH_SIZE",
    ):
        assert name in result.output


def test_migrate_is_idempotent(env: str) -> None:
    result = runner.invoke(app, ["migrate"])
    assert result.exit_code == 0, result.output
    assert "up to date" in result.output


def test_devices_add_list_disable(env: str) -> None:
    added = runner.invoke(app, ["devices", "add", "w-0042", "--type", "wristband", "--elder", "e-7"])
    assert added.exit_code == 0, added.output
    password = added.output.split("(shown once): ")[1].split()[0]
    with psycopg.connect(env) as conn:
        stored = conn.execute("SELECT password_hash FROM devices WHERE device_id = 'w-0042'").fetchone()[0]
    assert password not in stored and verify_password(password, stored)

    again = runner.invoke(app, ["devices", "add", "w-0042", "--type", "wristband"])
    assert again.exit_code == 1 and "already registered" in again.output
    bad_type = runner.invoke(app, ["devices", "add", "w-0043", "--type", "toaster"])
    assert bad_type.exit_code == 1 and "unknown type" in bad_type.output

    listed = runner.invoke(app, ["devices", "list"], terminal_width=200)
    assert "w-0042" in listed.output and "wristband" in listed.output

    assert runner.invoke(app, ["devices", "disable", "w-0042"]).exit_code == 0
    with psycopg.connect(env) as conn:
        assert conn.execute("SELECT enabled FROM devices WHERE device_id = 'w-0042'").fetchone()[0] is False
    missing = runner.invoke(app, ["devices", "disable", "nope-1"])
    assert missing.exit_code == 1


def test_dead_letters_filters_by_device_and_reason(env: str) -> None:
    with psycopg.connect(env) as conn:
        conn.execute(
            "INSERT INTO dead_letters"
            " (received_at, topic, device_id, msg_id, reason, detail, payload, payload_size)"
            " VALUES (now(), 't', 'w-1', 'm1', 'out_of_range', 'spo2=300 outside 50-100', '{}', 2),"
            "        (now(), 't', 'w-2', 'm2', 'unknown_metric', 'pulse', '{}', 2)"
        )
    everything = runner.invoke(app, ["dead-letters"], terminal_width=200)
    assert everything.exit_code == 0, everything.output
    assert "out_of_range" in everything.output and "unknown_metric" in everything.output
    one = runner.invoke(app, ["dead-letters", "--device", "w-1"], terminal_width=200)
    assert "spo2=300" in one.output and "pulse" not in one.output
    by_reason = runner.invoke(app, ["dead-letters", "--reason", "unknown_metric"], terminal_width=200)
    assert "pulse" in by_reason.output and "spo2=300" not in by_reason.output


def test_passwd_file_lets_enabled_devices_and_the_gateway_into_a_real_broker(
    env: str, project_mosquitto, monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    broker = project_mosquitto
    monkeypatch.setenv("ELDERCARE_MQTT_URL", broker.gateway.url)
    on = runner.invoke(app, ["devices", "add", "w-on-1", "--type", "wristband"])
    off = runner.invoke(app, ["devices", "add", "w-off-1", "--type", "wristband"])
    pw_on = on.output.split("(shown once): ")[1].split()[0]
    pw_off = off.output.split("(shown once): ")[1].split()[0]
    runner.invoke(app, ["devices", "disable", "w-off-1"])

    target = tmp_path / "passwd"
    result = runner.invoke(app, ["devices", "passwd-file", str(target)])
    assert result.exit_code == 0, result.output
    assert (target.stat().st_mode & 0o777) == 0o600
    assert pw_on not in target.read_text()

    # Load the file's accounts into our broker; the disabled device is simply not there.
    accounts = parse_password_file(target.read_text())
    assert set(accounts) == {"w-on-1", broker.gateway.username}
    for name, hashed in accounts.items():
        broker.add_user_hash(name, hashed, reload=False)
    broker.reload()
    assert mqtt_connack(broker.host, broker.port, "w-on-1", pw_on) == 0
    assert mqtt_connack(broker.host, broker.port, "w-off-1", pw_off) != 0
    assert mqtt_connack(broker.host, broker.port, broker.gateway.username, broker.gateway.password) == 0

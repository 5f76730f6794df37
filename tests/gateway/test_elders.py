"""Elders and care plans in the store, and the `eldercare rules` / `eldercare elders` commands."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import psycopg
import pytest
from typer.testing import CliRunner

from eldercare.alerts.careplan import CarePlan, parse_care_plan
from eldercare.gateway.cli import app
from eldercare.gateway.store.devices import add_device
from eldercare.gateway.store.elders import (
    add_elder,
    get_care_plan,
    get_elder,
    list_elders,
    load_care_plans,
    set_care_plan,
)

runner = CliRunner()


@pytest.fixture
def env(db_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    monkeypatch.setenv("ELDERCARE_DATABASE_URL", db_url)
    monkeypatch.setenv("ELDERCARE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("ELDERCARE_RULES_FILE", raising=False)
    monkeypatch.setenv("COLUMNS", "200")  # rich's tables: one line per row
    monkeypatch.chdir(tmp_path)  # no stray .env file
    return db_url


def packaged_rules_text() -> str:
    return resources.files("eldercare.alerts").joinpath("default_rules.toml").read_text(encoding="utf-8")


# --- store --------------------------------------------------------------------------------


def test_care_plans_round_trip_through_the_store(db_url: str) -> None:
    copd = parse_care_plan({"conditions": ["copd"], "overrides": {"spo2_low": {"window": "10m"}}})
    with psycopg.connect(db_url) as conn:
        assert add_elder(conn, "e-1001") is True
        assert add_elder(conn, "e-1001") is False
        assert add_elder(conn, "e-1002") is True
        assert get_care_plan(conn, "e-1001") is None
        assert set_care_plan(conn, "e-1001", copd, "nurse-7") is True
        assert set_care_plan(conn, "e-9999", copd, "nurse-7") is False
        assert get_care_plan(conn, "e-1001") == copd
        assert set_care_plan(conn, "e-1001", CarePlan(lives_alone=True), "nurse-8") is True
        assert get_care_plan(conn, "e-1001") == CarePlan(lives_alone=True)
        stored = conn.execute("SELECT plan, updated_by FROM care_plans WHERE elder_id = 'e-1001'").fetchone()
        assert stored is not None and stored[0]["lives_alone"] is True and stored[1] == "nurse-8"
        assert load_care_plans(conn, ["e-1001", "e-1002", "e-none"]) == {
            "e-1001": CarePlan(lives_alone=True),
            "e-1002": None,
            "e-none": None,
        }


def test_elders_are_listed_with_their_plans_and_devices(db_url: str) -> None:
    with psycopg.connect(db_url) as conn:
        add_elder(conn, "e-2")
        add_elder(conn, "e-1")
        set_care_plan(conn, "e-1", CarePlan(conditions=frozenset({"hypertension"})), "cli:test")
        add_device(conn, "w-0001", "wristband", "e-1")
        rows = list_elders(conn)
        assert [r.elder_id for r in rows] == ["e-1", "e-2"]
        assert rows[0].plan is not None and rows[0].plan.conditions == {"hypertension"}
        assert rows[0].devices == 1 and rows[0].updated_by == "cli:test" and rows[0].updated_at is not None
        assert rows[1].plan is None and rows[1].updated_at is None
        assert get_elder(conn, "e-1") == rows[0]
        assert get_elder(conn, "e-3") is None


def test_an_elder_id_is_pseudonymous_and_a_plan_goes_with_its_elder(db_url: str) -> None:
    with psycopg.connect(db_url) as conn:
        with pytest.raises(ValueError, match="elder id"):
            add_elder(conn, "Wang Xiuying")
        add_elder(conn, "e-5")
        set_care_plan(conn, "e-5", CarePlan(), "cli:test")
        conn.execute("DELETE FROM elders WHERE elder_id = 'e-5'")
        assert conn.execute("SELECT count(*) FROM care_plans").fetchone() == (0,)


# --- eldercare rules ----------------------------------------------------------------------


def test_rules_check_a_good_file(tmp_path: Path) -> None:
    path = tmp_path / "site.toml"
    path.write_text(packaged_rules_text(), encoding="utf-8")
    result = runner.invoke(app, ["rules", "check", str(path)])
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines() == [f"{path}: ok, {result.output.split('ok, ')[1].strip()}"]
    assert "28 rules" in result.output


def test_rules_check_lists_every_mistake(tmp_path: Path) -> None:
    path = tmp_path / "site.toml"
    text = packaged_rules_text().replace('window = "5m"', 'window = "5 min"', 1)
    text = text.replace('on = ["sos_pressed"]', 'on = ["sos_press"]')
    path.write_text(text, encoding="utf-8")
    result = runner.invoke(app, ["rules", "check", str(path)])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"error: {path}: rule spo2_low, field window: ")
    assert lines[1].startswith(f"error: {path}: rule sos, field on: ")


def test_rules_show_the_packaged_rules(env: str) -> None:
    result = runner.invoke(app, ["rules", "show"])
    assert result.exit_code == 0, result.output
    for rule_id in ("spo2_critical", "news2", "fall_no_recovery", "inactivity", "checkup_results"):
        assert rule_id in result.output
    as_json = runner.invoke(app, ["rules", "show", "--json"])
    assert as_json.exit_code == 0, as_json.output
    data = json.loads(as_json.stdout)
    assert len(data["threshold"]) == 10 and data["news2"]["urgent_from"] == 5


def test_rules_show_a_deployments_file(env: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "site.toml"
    path.write_text(packaged_rules_text().replace("urgent_from = 5", "urgent_from = 4"), encoding="utf-8")
    monkeypatch.setenv("ELDERCARE_RULES_FILE", str(path))
    result = runner.invoke(app, ["rules", "show", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["news2"]["urgent_from"] == 4
    broken = tmp_path / "broken.toml"
    broken.write_text("version = 2\n", encoding="utf-8")
    result = runner.invoke(app, ["rules", "show", "--file", str(broken)])
    assert result.exit_code == 1 and f"{broken}: field [version]" in result.stderr


# --- eldercare elders ---------------------------------------------------------------------


def test_elders_cli_round_trip(env: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from eldercare.gateway import care_commands

    monkeypatch.setattr(care_commands.out, "width", 200)  # a pipe's 80 columns would cut the ids
    added = runner.invoke(
        app,
        ["elders", "add", "e-1001", "--condition", "copd", "--condition", "hypertension", "--lives-alone"],
    )
    assert added.exit_code == 0, added.output
    assert "registered e-1001" in added.output
    again = runner.invoke(app, ["elders", "add", "e-1001"])
    assert again.exit_code == 1 and "already registered" in again.stderr

    shown = runner.invoke(app, ["elders", "show", "e-1001", "--json"])
    assert shown.exit_code == 0, shown.output
    data = json.loads(shown.stdout)
    assert data["plan"]["conditions"] == ["copd", "hypertension"] and data["plan"]["lives_alone"] is True
    assert data["plan"]["timezone"] == "Asia/Shanghai" and data["updated_by"].startswith("cli")

    # the effective rules: COPD's SpO2 threshold, the hypertension trend, inactivity (lives alone)
    rules = json.loads(runner.invoke(app, ["rules", "show", "--elder", "e-1001", "--json"]).stdout)
    spo2_low = next(r for r in rules["threshold"] if r["id"] == "spo2_low")
    assert spo2_low["any"] == ["spo2 < 85"] and rules["news2"]["spo2_scale"] == 2
    ids = {r["id"] for section in ("absence", "trend", "event") for r in rules[section]}
    assert {"inactivity", "bp_uncontrolled"} <= ids and "wandering" not in ids

    changed = runner.invoke(
        app,
        [
            "elders", "set-care-plan", "e-1001", "--no-lives-alone", "--timezone", "Asia/Urumqi",
            "--disable", "low_battery", "--override", 'spo2_low.window="10m"', "--override",
            'spo2_low.any=["spo2 < 88"]', "--by", "doctor-3",
        ],
    )  # fmt: skip
    assert changed.exit_code == 0, changed.output
    data = json.loads(runner.invoke(app, ["elders", "show", "e-1001", "--json"]).stdout)
    assert data["plan"]["conditions"] == ["copd", "hypertension"]  # kept: not named by a flag
    assert data["plan"]["lives_alone"] is False and data["plan"]["timezone"] == "Asia/Urumqi"
    assert data["plan"]["disabled"] == ["low_battery"] and data["updated_by"] == "doctor-3"
    assert data["plan"]["overrides"] == {"spo2_low": {"window": "10m", "any": ["spo2 < 88"]}}

    readable = runner.invoke(app, ["elders", "show", "e-1001"])
    assert "time zone: Asia/Urumqi" in readable.output and "disabled: low_battery" in readable.output
    listed = runner.invoke(app, ["elders", "list"])
    assert listed.exit_code == 0 and "e-1001" in listed.output and "copd, hypertension" in listed.output


def test_a_nursing_home_resident_gets_the_nurse_station_route_from_the_cli(env: str) -> None:
    added = runner.invoke(app, ["elders", "add", "e-2001", "--route", "emergency=nursing_home_emergency"])
    assert added.exit_code == 0, added.output
    assert "routes emergency->nursing_home_emergency" in added.output
    changed = runner.invoke(
        app,
        [
            "elders", "set-care-plan", "e-2001", "--route", "emergency=nursing_home_emergency",
            "--route", "urgent=nursing_home_urgent",
        ],
    )  # fmt: skip
    assert changed.exit_code == 0, changed.output
    readable = runner.invoke(app, ["elders", "show", "e-2001"]).output
    assert (
        "route emergency: nursing_home_emergency" in readable
        and "route urgent: nursing_home_urgent" in readable
    )
    rules = json.loads(runner.invoke(app, ["rules", "show", "--elder", "e-2001", "--json"]).stdout)
    assert rules["defaults"]["severity_routes"]["emergency"] == "nursing_home_emergency"
    wrong = runner.invoke(app, ["elders", "set-care-plan", "e-2001", "--route", "emergency=nurse"])
    assert wrong.exit_code == 1 and "routes.emergency: no route 'nurse'" in wrong.stderr
    bad = runner.invoke(app, ["elders", "set-care-plan", "e-2001", "--route", "emergency"])
    assert bad.exit_code == 2 and "ROUTE=INSTEAD" in bad.stderr


def test_set_care_plan_from_a_file(env: str, tmp_path: Path) -> None:
    assert runner.invoke(app, ["elders", "add", "e-7"]).exit_code == 0
    path = tmp_path / "plan.toml"
    path.write_text(
        'conditions = ["cognitive_impairment"]\n'
        '[overrides.wandering]\nlevels = [{ severity = "emergency", during = "18:00-07:00" }]\n'
    )
    result = runner.invoke(app, ["elders", "set-care-plan", "e-7", "--from", str(path), "--lives-alone"])
    assert result.exit_code == 0, result.output
    with psycopg.connect(env) as conn:
        plan = get_care_plan(conn, "e-7")
    assert plan is not None and plan.conditions == {"cognitive_impairment"} and plan.lives_alone
    rules = json.loads(runner.invoke(app, ["rules", "show", "--elder", "e-7", "--json"]).stdout)
    wandering = next(r for r in rules["event"] if r["id"] == "wandering")
    assert wandering["levels"] == [{"severity": "emergency", "during": "18:00-07:00"}]


def test_a_care_plan_that_does_not_fit_is_refused_and_nothing_is_stored(env: str) -> None:
    bad = runner.invoke(app, ["elders", "add", "e-8", "--condition", "asthma"])
    assert (
        bad.exit_code == 1 and "care plan of e-8: field conditions: unknown condition 'asthma'" in bad.stderr
    )
    assert runner.invoke(app, ["elders", "show", "e-8"]).exit_code == 1
    zone = runner.invoke(app, ["elders", "add", "e-8", "--timezone", "Beijing"])
    assert zone.exit_code == 1 and "unknown time zone 'Beijing'" in zone.stderr
    assert runner.invoke(app, ["elders", "add", "e-8"]).exit_code == 0
    override = runner.invoke(
        app, ["elders", "set-care-plan", "e-8", "--override", 'spo2_low.any=["spo2 < 20"]']
    )
    assert override.exit_code == 1
    assert "rule spo2_low, field overrides.spo2_low.any[0]" in override.stderr
    assert runner.invoke(app, ["elders", "set-care-plan", "e-8", "--override", "spo2_low"]).exit_code == 2
    missing = runner.invoke(app, ["elders", "set-care-plan", "e-9", "--lives-alone"])
    assert missing.exit_code == 1 and "no elder e-9" in missing.stderr
    assert runner.invoke(app, ["rules", "show", "--elder", "e-9"]).exit_code == 1
    no_name = runner.invoke(app, ["elders", "add", "Wang Xiuying"])
    assert no_name.exit_code == 1 and "elder id" in no_name.stderr


def test_the_rules_file_setting(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from eldercare.gateway.settings import SETTINGS_HELP, load_settings

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ELDERCARE_RULES_FILE", raising=False)
    assert load_settings().rules_file is None
    monkeypatch.setenv("ELDERCARE_RULES_FILE", "")
    assert load_settings().rules_file is None
    monkeypatch.setenv("ELDERCARE_RULES_FILE", "/etc/eldercare/rules.toml")
    assert load_settings().rules_file == Path("/etc/eldercare/rules.toml")
    assert "ELDERCARE_RULES_FILE" in SETTINGS_HELP

"""``eldercare elders set-profile`` and ``elders show --personal``: the personal profile the
hotlines get, set field by field, shown only when asked for."""

from __future__ import annotations

import json
from pathlib import Path

import psycopg
import pytest
from typer.testing import CliRunner

from eldercare.gateway.cli import app

runner = CliRunner()


@pytest.fixture
def env(db_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    monkeypatch.setenv("ELDERCARE_DATABASE_URL", db_url)
    monkeypatch.delenv("ELDERCARE_RULES_FILE", raising=False)
    monkeypatch.chdir(tmp_path)  # no stray .env file
    assert runner.invoke(app, ["elders", "add", "e-1001"]).exit_code == 0
    return db_url


def profile(env: str) -> dict:
    shown = runner.invoke(app, ["elders", "show", "e-1001", "--personal", "--json"])
    assert shown.exit_code == 0, shown.output
    data: dict = json.loads(shown.stdout)["profile"]
    return data


def test_set_profile_changes_only_what_it_names_and_show_prints_it_only_when_asked(env: str) -> None:
    # Invented people and numbers.
    first = runner.invoke(
        app,
        [
            "elders", "set-profile", "e-1001", "--name", "测试甲", "--sex", "f", "--birth-year", "1941",
            "--phone", "13800000000", "--address", "某市某区某路 1 号", "--location", "29.306, 120.075",
            "--medication", "amlodipine 5mg daily", "--medication", "metformin 500mg",
            "--allergy", "penicillin", "--contact", "联系人甲|daughter|138 0000 0001",
            "--family-doctor", "医生丙|某社区卫生服务中心|0579-85000000", "--by", "nurse-3",
        ],
    )  # fmt: skip
    assert first.exit_code == 0, first.output
    assert "medications (2)" in first.stdout and "13800000000" not in first.stdout  # names, no values
    got = profile(env)
    assert got.pop("updated_at") is not None
    assert got == {
        "name": "测试甲",
        "sex": "F",
        "birth_year": 1941,
        "phone": "13800000000",
        "address": "某市某区某路 1 号",
        "location": {"lat": 29.306, "lon": 120.075},
        "medications": ["amlodipine 5mg daily", "metformin 500mg"],
        "allergies": ["penicillin"],
        "emergency_contacts": [{"name": "联系人甲", "relation": "daughter", "phone": "138 0000 0001"}],
        "family_doctor": {"name": "医生丙", "clinic": "某社区卫生服务中心", "phone": "0579-85000000"},
        "updated_by": "nurse-3",
    }

    # Repeated options replace the list; an empty value clears; the rest is kept.
    second = runner.invoke(
        app,
        [
            "elders", "set-profile", "e-1001", "--medication", "bisoprolol 2.5mg", "--allergy", "",
            "--contact", "联系人乙|son|13800000002", "--contact", "邻居丁|neighbour|13800000003",
            "--family-doctor", "", "--location", "-33.86,151.21",
        ],
    )  # fmt: skip
    assert second.exit_code == 0, second.output
    now = profile(env)
    assert now["medications"] == ["bisoprolol 2.5mg"] and now["allergies"] == []
    assert [c["relation"] for c in now["emergency_contacts"]] == ["son", "neighbour"]
    assert now["family_doctor"] is None and now["location"] == {"lat": -33.86, "lon": 151.21}
    assert now["name"] == "测试甲" and now["phone"] == "13800000000" and now["birth_year"] == 1941

    plain = runner.invoke(app, ["elders", "show", "e-1001"])
    plain_json = runner.invoke(app, ["elders", "show", "e-1001", "--json"])
    for shown in (plain, plain_json):
        assert shown.exit_code == 0 and "测试甲" not in shown.stdout and "13800000000" not in shown.stdout
    assert "profile" not in json.loads(plain_json.stdout)
    personal = runner.invoke(app, ["elders", "show", "e-1001", "--personal"]).stdout
    assert "name: 测试甲" in personal and "medications: bisoprolol 2.5mg" in personal
    assert "emergency contact: 邻居丁 (neighbour) 13800000003" in personal and "allergies: none" in personal


#: Options that must be refused (with exit code 2, as a malformed option is), and why.
REFUSED = [
    (["--location", "29.3"], "write LAT,LON"),
    (["--location", "91,120"], "latitude 91.0 is not a number from -90 to 90"),
    (["--location", "29,nan"], "longitude nan"),
    (["--contact", "联系人甲|daughter"], "--contact '联系人甲|daughter': write NAME|RELATION|PHONE"),
    (["--contact", "联系人甲|daughter|call her"], "emergency contact phone is not a phone number"),
    (["--family-doctor", "|clinic|0579"], "write NAME|CLINIC|PHONE"),
    (["--medication", "a", "--medication", ""], "an empty value empties the list and goes alone"),
    (["--sex", "female"], "sex is one of F, M"),
    (["--birth-year", "1850"], "birth year 1850 is not from 1900"),
    (["--phone", "call me"], "phone is not a phone number"),
    (["--name", "line\nbreak"], "name has a line break"),
]


def test_set_profile_refuses_bad_input_and_stores_nothing(env: str) -> None:
    for args, problem in REFUSED:
        done = runner.invoke(app, ["elders", "set-profile", "e-1001", "--phone", "13800000000", *args])
        assert done.exit_code == 2 and problem in done.stderr, (args, done.output)
    assert profile(env) is None
    empty = runner.invoke(app, ["elders", "set-profile", "e-1001"])
    assert empty.exit_code == 2 and "nothing to set" in empty.stderr


def test_a_profile_needs_its_elder_and_the_table_refuses_what_the_cli_would(env: str) -> None:
    missing = runner.invoke(app, ["elders", "set-profile", "e-9", "--phone", "13800000000"])
    assert missing.exit_code == 1 and "no elder e-9" in missing.stderr
    for values in (
        "latitude, longitude) VALUES ('e-1001', 91, 0",
        "latitude) VALUES ('e-1001', 29",  # a latitude without its longitude
        "emergency_contacts) VALUES ('e-1001', '{\"name\": \"x\"}'",
        "emergency_contacts) VALUES ('e-1001', '[\"13800000000\"]'",
        "family_doctor) VALUES ('e-1001', '[]'",
    ):
        with psycopg.connect(env) as conn, pytest.raises(psycopg.errors.CheckViolation):
            conn.execute(f"INSERT INTO elder_profiles (elder_id, {values})")

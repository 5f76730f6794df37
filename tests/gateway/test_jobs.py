"""The scheduled rule jobs on the real database: stored devices, readings, rollups and events in,
alerts, tasks, history and outbox rows out, at an injected time; re-runs and two instances."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from apscheduler.schedulers.background import BackgroundScheduler
from typer.testing import CliRunner

from eldercare.alerts.careplan import CarePlan
from eldercare.alerts.rules import load_rule_set
from eldercare.gateway.cli import app
from eldercare.gateway.jobs import JobReport, ScheduledRules, UnknownElder, record_checkup, timers_cleanup
from eldercare.gateway.runner import MaintenanceRole
from eldercare.gateway.settings import Settings
from eldercare.gateway.store import timers
from eldercare.gateway.store.alerts import complete_task
from eldercare.gateway.store.devices import add_device
from eldercare.gateway.store.elders import add_elder, set_care_plan
from eldercare.gateway.store.maintenance import refresh_rollups

RULES = load_rule_set()
NOW = datetime(2024, 6, 3, 4, 30, tzinfo=UTC)  # 12:30 in Shanghai, 05:30 (BST) in London
MIN = timedelta(minutes=1)
HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
SHANGHAI_ALONE = CarePlan(lives_alone=True, timezone="Asia/Shanghai")


@pytest.fixture
def conn(db_url: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(db_url, autocommit=True) as c:
        yield c


def elder(conn: psycopg.Connection, elder_id: str, plan: CarePlan | None = None) -> None:
    add_elder(conn, elder_id)
    if plan is not None:
        set_care_plan(conn, elder_id, plan, "test")


def device(
    conn: psycopg.Connection,
    device_id: str,
    type_: str,
    elder_id: str,
    last_seen: datetime | None = None,
    online: bool = True,
    battery: float | None = None,
) -> None:
    add_device(conn, device_id, type_, elder_id)
    conn.execute(
        "UPDATE devices SET last_seen = %s, online = %s, status_at = %s, battery = %s WHERE device_id = %s",
        (last_seen, online, last_seen, battery, device_id),
    )


def readings(
    conn: psycopg.Connection, elder_id: str, metric: str, points: list[tuple[datetime, float]]
) -> None:
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO observations (time, device_id, elder_id, metric, value)"
            " VALUES (%s, 'dev-1', %s, %s, %s)",
            [(at, elder_id, metric, value) for at, value in points],
        )


def alerts(conn: psycopg.Connection, elder_id: str) -> list[tuple[Any, ...]]:
    return conn.execute(
        "SELECT rule, severity, state, matches, route, evidence FROM alerts WHERE elder_id = %s"
        " ORDER BY raised_at",
        (elder_id,),
    ).fetchall()


def one(conn: psycopg.Connection, query: str, *args: object) -> Any:
    row = conn.execute(query, args).fetchone()
    assert row is not None
    return row[0] if len(row) == 1 else row


# --- absence ------------------------------------------------------------------------------


def test_device_offline_is_raised_once_over_runs_and_clears_when_the_device_reports(
    conn: psycopg.Connection,
) -> None:
    elder(conn, "e-1")
    device(conn, "wb-1", "wristband", "e-1", last_seen=NOW - 30 * MIN)
    device(conn, "sos-1", "sos_button", "e-1", last_seen=NOW)
    jobs = ScheduledRules(RULES)
    report = jobs.absence(conn, NOW)
    assert (report.judged, report.changed, report.counts["alert_opened"]) == (1, 1, 1)
    for minutes in (1, 2):
        assert jobs.absence(conn, NOW + minutes * MIN).changed == 0
    [(rule, severity, state, matches, route, evidence)] = alerts(conn, "e-1")
    assert (rule, severity, state, matches, route) == ("device_offline", "follow_up", "open", 1, "follow_up")
    assert evidence["devices"][0]["device_id"] == "wb-1"
    assert evidence["devices"][0]["offline_since"] == (NOW - 20 * MIN).isoformat()
    assert one(conn, "SELECT count(*) FROM alert_outbox") == 1
    assert one(conn, "SELECT actor FROM alert_history") == "rules:schedule"
    assert one(conn, "SELECT kind, due_at FROM tasks") == ("device_offline", NOW + 7 * DAY)

    conn.execute("UPDATE devices SET last_seen = %s WHERE device_id = 'wb-1'", (NOW + 3 * MIN,))
    assert ScheduledRules(RULES).absence(conn, NOW + 4 * MIN).counts["condition_cleared"] == 1
    assert [a[2] for a in alerts(conn, "e-1")] == ["condition_cleared"]
    cleared = one(conn, "SELECT reason FROM alert_history WHERE to_state = 'condition_cleared'")
    assert cleared == "condition cleared: every device reports again"


def test_inactivity_is_judged_in_each_elders_own_time_zone_and_only_for_those_alone(
    conn: psycopg.Connection,
) -> None:
    elder(conn, "e-sh", SHANGHAI_ALONE)
    elder(conn, "e-ld", CarePlan(lives_alone=True, timezone="Europe/London"))
    elder(conn, "e-family", CarePlan(lives_alone=False, timezone="Asia/Shanghai"))
    elder(conn, "e-still", SHANGHAI_ALONE)
    readings(conn, "e-still", "motion", [(NOW - k * HOUR, 0.0) for k in range(200)])  # never moves
    for elder_id in ("e-sh", "e-ld", "e-family"):
        # The last movement at 19:00 UTC yesterday; the sensor has reported "no motion" since.
        quiet = [(NOW - k * 10 * MIN, 0.0) for k in range(1, 40)]
        readings(conn, elder_id, "motion", [(datetime(2024, 6, 2, 19, 0, tzinfo=UTC), 1.0), *quiet])
    report = ScheduledRules(RULES).absence(conn, NOW)
    assert report.counts["alert_opened"] == 2
    [(_, _, _, _, _, still)] = alerts(conn, "e-still")
    assert still["last_activity"] is None and still["sensor"]["metric"] == "motion"
    [(rule, severity, _, _, route, evidence)] = alerts(conn, "e-sh")
    assert (rule, severity, route) == ("inactivity", "urgent", "urgent")
    assert (evidence["silent_since_local"], evidence["last_activity"]["local_time"]) == ("08:00", "03:00")
    assert alerts(conn, "e-ld") == [] and alerts(conn, "e-family") == []
    # Noon in London (11:00 UTC): the London elder's 4 h since 08:00 BST.
    ScheduledRules(RULES).absence(conn, datetime(2024, 6, 3, 11, 0, tzinfo=UTC))
    assert [a[0] for a in alerts(conn, "e-ld")] == ["inactivity"]
    # The Shanghai elder moves: the alert's condition clears.
    readings(conn, "e-sh", "steps", [(NOW + 5 * MIN, 12.0)])
    assert ScheduledRules(RULES).absence(conn, NOW + 6 * MIN).counts["condition_cleared"] == 1


def test_a_wearable_taken_off_overnight_and_a_low_battery_from_stored_state(conn: psycopg.Connection) -> None:
    elder(conn, "e-1", CarePlan(timezone="Asia/Shanghai"))
    device(conn, "wb-1", "wristband", "e-1", last_seen=NOW, battery=12.0)
    conn.execute(
        "INSERT INTO device_events (time, device_id, elder_id, kind)"
        " VALUES (%s, 'wb-1', 'e-1', 'wearable_removed')",
        (datetime(2024, 6, 2, 14, 0, tzinfo=UTC),),  # 22:00 in Shanghai
    )
    ScheduledRules(RULES).absence(conn, NOW)
    found = {a[0]: a for a in alerts(conn, "e-1")}
    assert set(found) == {"wearable_removed", "low_battery"}
    assert found["low_battery"][4] == "family" and found["low_battery"][5]["value"] == 12.0
    removed = found["wearable_removed"][5]
    assert (removed["local_time"], removed["unanswered"]) == ("22:00", ["wearable_worn"])
    describe = one(
        conn,
        "SELECT reason FROM alert_history h JOIN alerts a ON a.id = h.alert_id"
        " WHERE a.rule = 'wearable_removed'",
    )
    assert describe == "raised: wearable_removed at 22:00 local, no wearable_worn within 7200 s"


def test_two_instances_running_at_once_raise_one_alert(db_url: str, conn: psycopg.Connection) -> None:
    for n in range(20):
        elder(conn, f"e-{n:02}")
        device(conn, f"wb-{n:02}", "wristband", f"e-{n:02}", last_seen=NOW - HOUR)
    start = threading.Barrier(2)
    reports: list[JobReport] = []

    def run() -> None:
        with psycopg.connect(db_url, autocommit=True) as own:
            start.wait()
            reports.append(ScheduledRules(RULES, chunk_size=3).absence(own, NOW))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(reports) == 2
    assert one(conn, "SELECT count(*) FROM alerts") == 20
    assert one(conn, "SELECT count(DISTINCT elder_id) FROM alerts") == 20
    assert one(conn, "SELECT count(*) FROM alert_outbox") == 20


def test_a_run_stops_while_another_instance_holds_the_jobs_lock(
    db_url: str, conn: psycopg.Connection
) -> None:
    elder(conn, "e-1")
    device(conn, "wb-1", "wristband", "e-1", last_seen=NOW - HOUR)
    with psycopg.connect(db_url) as other:
        other.execute("SELECT pg_advisory_xact_lock(hashtextextended('eldercare-job:absence', 0))")
        report = ScheduledRules(RULES).absence(conn, NOW)
        assert report.skipped and report.chunks == 0 and alerts(conn, "e-1") == []
        assert not ScheduledRules(RULES).trends(conn, NOW).skipped  # other jobs run on
    assert ScheduledRules(RULES).absence(conn, NOW).counts["alert_opened"] == 1


def test_every_chunk_of_elders_is_judged(conn: psycopg.Connection) -> None:
    for n in range(5):
        elder(conn, f"e-{n}")
        device(conn, f"wb-{n}", "wristband", f"e-{n}", last_seen=NOW - HOUR)
    report = ScheduledRules(RULES, chunk_size=2).absence(conn, NOW)
    assert (report.chunks, report.judged, report.counts["alert_opened"]) == (3, 5, 5)


# --- trends -------------------------------------------------------------------------------


def test_the_7_day_mean_is_exact_over_refreshed_rollups_late_data_and_fresh_hours(
    conn: psycopg.Connection,
) -> None:
    elder(conn, "e-1", CarePlan(conditions=frozenset({"hypertension"})))
    week = [(NOW - k * DAY - 3 * HOUR, 150.0) for k in range(1, 7)]
    readings(conn, "e-1", "systolic_bp", [(NOW - 8 * DAY, 300.0), *week])  # 8 days ago: outside
    refresh_rollups(conn)
    readings(conn, "e-1", "systolic_bp", [(NOW - DAY - 3 * HOUR + MIN, 90.0)])  # late, into a rolled-up hour
    readings(conn, "e-1", "systolic_bp", [(NOW - 10 * MIN, 170.0)])  # this hour, not rolled up yet
    dirty = one(conn, "SELECT count(*) FROM rollup_dirty_hours WHERE elder_id = 'e-1'")
    assert dirty == 2
    expected = (150.0 * 6 + 90.0 + 170.0) / 8
    ScheduledRules(RULES).trends(conn, NOW)
    [(rule, severity, _, _, route, evidence)] = alerts(conn, "e-1")
    assert (rule, severity, route) == ("bp_uncontrolled", "follow_up", "follow_up")
    assert evidence["means"]["systolic_bp"]["mean"] == round(expected, 2)
    assert evidence["means"]["systolic_bp"]["readings"] == 8
    assert ScheduledRules(RULES).trends(conn, NOW + HOUR).changed == 0  # the same readings


def test_fasting_glucose_is_the_mean_of_readings_05_to_09_local(conn: psycopg.Connection) -> None:
    elder(conn, "e-1", CarePlan(conditions=frozenset({"type2_diabetes"}), timezone="Asia/Shanghai"))
    fasting = [(datetime(2024, 6, d, 22, 30, tzinfo=UTC), 7.5) for d in (28, 29, 30)]  # 06:30 local
    meals = [(datetime(2024, 6, d, 5, 0, tzinfo=UTC), 12.0) for d in (1, 2, 3)]  # 13:00 local
    readings(conn, "e-1", "blood_glucose", [(t.replace(month=5), v) for t, v in fasting] + meals)
    ScheduledRules(RULES).trends(conn, NOW)
    [(rule, _, _, _, _, evidence)] = alerts(conn, "e-1")
    assert rule == "glucose_uncontrolled"
    assert evidence["means"]["blood_glucose"] == {
        "mean": 7.5,
        "readings": 3,
        "from": "2024-05-28T22:00:00+00:00",
        "to": "2024-05-30T22:00:00+00:00",
    }


def test_weight_gain_compares_the_elders_own_days(conn: psycopg.Connection) -> None:
    elder(conn, "e-1", CarePlan(conditions=frozenset({"heart_failure"}), timezone="Asia/Shanghai"))
    # Weighed at 07:30 Shanghai each morning (23:30 UTC the day before), 30 May to 3 June.
    first = datetime(2024, 5, 29, 23, 30, tzinfo=UTC)
    weights = [69.5, 70.0, 70.6, 71.2, 72.0]
    readings(conn, "e-1", "body_weight", [(first + k * DAY, w) for k, w in enumerate(weights)])
    ScheduledRules(RULES).trends(conn, NOW)
    [(rule, severity, _, _, _, evidence)] = alerts(conn, "e-1")
    assert (rule, severity, evidence["value"]) == ("weight_gain", "urgent", 2.0)
    assert evidence["from"] == {"day": "2024-05-31", "mean": 70.0}  # 30 May is 4 days before
    assert evidence["to"] == {"day": "2024-06-03", "mean": 72.0}


# --- follow-ups ---------------------------------------------------------------------------


def tasks(conn: psycopg.Connection, elder_id: str, kind: str) -> list[tuple[Any, ...]]:
    return conn.execute(
        "SELECT t.kind, t.state, t.due_at, a.state FROM tasks t JOIN alerts a ON a.id = t.source_alert"
        " WHERE t.elder_id = %s AND t.kind = %s ORDER BY t.id",
        (elder_id, kind),
    ).fetchall()


def test_chronic_follow_ups_are_created_pulled_forward_and_replaced(conn: psycopg.Connection) -> None:
    elder(conn, "e-1", CarePlan(conditions=frozenset({"hypertension"})))
    elder(conn, "e-2", CarePlan(conditions=frozenset({"copd"})))
    jobs = ScheduledRules(RULES)
    jobs.followups(conn, NOW)
    jobs.followups(conn, NOW + HOUR)
    assert tasks(conn, "e-1", "chronic_follow_up") == [("chronic_follow_up", "open", NOW + 90 * DAY, "open")]
    assert tasks(conn, "e-2", "chronic_follow_up") == []

    readings(conn, "e-1", "systolic_bp", [(NOW - k * DAY, 160.0) for k in range(3)])
    jobs.trends(conn, NOW + HOUR)
    assert [a[0] for a in alerts(conn, "e-1")] == ["chronic_follow_up", "bp_uncontrolled"]
    assert one(conn, "SELECT count(*) FROM tasks") == 1  # the follow-up is the uncontrolled BP's task
    jobs.followups(conn, NOW + 2 * HOUR)
    jobs.followups(conn, NOW + 3 * HOUR)
    assert tasks(conn, "e-1", "chronic_follow_up")[0][2] == NOW + HOUR + 14 * DAY
    moved = conn.execute(
        "SELECT h.reason FROM alert_history h JOIN alerts a ON a.id = h.alert_id"
        " WHERE a.rule = 'chronic_follow_up' AND h.from_state = h.to_state"
    ).fetchall()
    assert [r[0] for r in moved] == [
        "task chronic_follow_up due 2024-09-01 brought forward to 2024-06-17:"
        " bp_uncontrolled raised 2024-06-03"
    ]

    task_id = one(conn, "SELECT id FROM tasks WHERE kind = 'chronic_follow_up'")
    assert complete_task(conn, task_id, "dr-1", "seen, medication adjusted", NOW + 3 * DAY)
    jobs.followups(conn, NOW + 3 * DAY + HOUR)
    assert tasks(conn, "e-1", "chronic_follow_up") == [
        ("chronic_follow_up", "done", NOW + HOUR + 14 * DAY, "auto_closed"),
        ("chronic_follow_up", "open", NOW + 93 * DAY, "open"),
    ]


def test_a_checkup_gives_a_results_task_and_overdue_it_escalates_to_the_team_lead_once(
    conn: psycopg.Connection,
) -> None:
    elder(conn, "e-1", CarePlan(timezone="Asia/Shanghai"))
    at = NOW - 31 * DAY
    done = record_checkup(conn, RULES, "e-1", at, "nurse-1", NOW)
    assert done.task_due == at + 30 * DAY and done.alert_id is not None
    assert record_checkup(conn, RULES, "e-1", at, "nurse-1", NOW).checkup_id is None
    with pytest.raises(UnknownElder):
        record_checkup(conn, RULES, "e-none", at, "nurse-1", NOW)

    jobs = ScheduledRules(RULES)
    for hours in (0, 1, 2):
        jobs.followups(conn, NOW + hours * HOUR)
    assert tasks(conn, "e-1", "inform_checkup_results") == [
        ("inform_checkup_results", "escalated", at + 30 * DAY, "escalated")
    ]
    outbox = conn.execute("SELECT reason, route FROM alert_outbox ORDER BY id").fetchall()
    assert outbox == [("raised", "follow_up"), ("escalated", "team_lead")]

    newer = record_checkup(conn, RULES, "e-1", NOW - DAY, "nurse-1", NOW)
    assert newer.replaced == done.alert_id
    older = record_checkup(conn, RULES, "e-1", NOW - 60 * DAY, "nurse-1", NOW)
    assert (older.alert_id, older.covered_by) == (None, newer.alert_id)
    assert [t[1] for t in tasks(conn, "e-1", "inform_checkup_results")] == ["cancelled", "open"]
    assert one(conn, "SELECT alert_id FROM checkups WHERE at = %s", NOW - DAY) == newer.alert_id


def test_eldercare_elders_checkup_records_one(
    conn: psycopg.Connection, db_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("ELDERCARE_DATABASE_URL", db_url)
    monkeypatch.setenv("ELDERCARE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("ELDERCARE_RULES_FILE", raising=False)
    monkeypatch.chdir(tmp_path)
    elder(conn, "e-1", CarePlan(timezone="Asia/Shanghai"))
    result = CliRunner().invoke(app, ["elders", "checkup", "e-1", "--at", "2024-06-01", "--by", "nurse-1"])
    assert result.exit_code == 0, result.output
    assert "task inform_checkup_results due 2024-07-01" in result.output
    assert one(conn, "SELECT at, recorded_by FROM checkups") == (
        datetime(2024, 5, 31, 16, 0, tzinfo=UTC),
        "nurse-1",
    )
    again = CliRunner().invoke(app, ["elders", "checkup", "e-1", "--at", "2024-06-01"])
    assert again.exit_code == 0 and "recorded already" in again.output
    bad = CliRunner().invoke(app, ["elders", "checkup", "e-1", "--at", "2999-01-01"])
    assert bad.exit_code == 2 and "in the future" in bad.output
    missing = CliRunner().invoke(app, ["elders", "checkup", "e-none"])
    assert missing.exit_code == 1 and "no elder e-none" in missing.output


# --- the maintenance role -----------------------------------------------------------------


def test_the_maintenance_role_schedules_the_rule_jobs_and_runs_them_at_its_clock(
    db_url: str, conn: psycopg.Connection
) -> None:
    elder(conn, "e-1", CarePlan(conditions=frozenset({"hypertension"})))
    device(conn, "wb-1", "wristband", "e-1", last_seen=NOW - HOUR)
    role = MaintenanceRole(Settings(database_url=db_url), clock=lambda: NOW)
    scheduler = BackgroundScheduler(timezone="UTC")
    role.schedule(scheduler)
    every = {job.id: job.trigger.interval for job in scheduler.get_jobs()}
    assert every == {
        "maintenance": timedelta(minutes=10),
        "absence": MIN,
        "trends": HOUR,
        "followups": HOUR,
        "timers_cleanup": DAY,
    }
    try:
        role.absence()
        role.trends()
        role.followups()
        role.timers_cleanup()
    finally:
        role.close()
    assert sorted(a[0] for a in alerts(conn, "e-1")) == ["chronic_follow_up", "device_offline"]


def test_finished_timers_are_deleted_after_a_week(conn: psycopg.Connection) -> None:
    with conn.transaction(), conn.cursor() as cur:
        old = timers.schedule(cur, "rule:x", "a", NOW - 9 * DAY, if_pending="keep")
        new = timers.schedule(cur, "rule:x", "b", NOW - DAY, if_pending="keep")
        timers.mark_fired(cur, [old], NOW - 8 * DAY)
        timers.mark_fired(cur, [new], NOW - DAY)
    assert timers_cleanup(conn, NOW) == 1
    assert one(conn, "SELECT array_agg(key) FROM timers") == ["b"]

"""The absence and device rules, judged at an injected time in the elder's own time zone."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from eldercare.alerts import absence
from eldercare.alerts.absence import AbsenceFacts, Device, DeviceEvent, Reading
from eldercare.alerts.careplan import CarePlan
from eldercare.alerts.decisions import AddEvidence, ClearCondition, OpenAlert, UpgradeAlert
from eldercare.alerts.lifecycle import ElderAlerts
from eldercare.alerts.rules import Severity
from eldercare.alerts.scheduled import Elder, latest_span
from tests.alerts.scheduled_helpers import LONDON, RULES, SHANGHAI, active, elder, kinds, local

ALONE = CarePlan(lives_alone=True)
MIN = timedelta(minutes=1)
SECOND = timedelta(seconds=1)


def motion(at: datetime) -> Reading:
    return Reading(at, "motion", 1.0, "pir-1")


def decide(ctx: Elder, now: datetime, **facts: object) -> list[object]:
    return list(absence.decide(ctx, AbsenceFacts(**facts), now))  # type: ignore[arg-type]


def opened(decisions: list[object]) -> OpenAlert:
    [d] = [d for d in decisions if isinstance(d, OpenAlert)]
    return d


def device(
    device_id: str = "wb-1",
    type_: str = "wristband",
    interval_s: int = 60,
    last_seen: datetime | None = None,
    online: bool = True,
    status_at: datetime | None = None,
    battery: float | None = None,
) -> Device:
    return Device(device_id, type_, timedelta(seconds=interval_s), last_seen, online, status_at, battery)


# --- inactivity ---------------------------------------------------------------------------


def test_inactivity_counts_the_morning_from_08_00_local_not_from_last_night() -> None:
    zone = SHANGHAI
    last = motion(local(zone, 2024, 6, 2, 19, 0))  # yesterday evening
    ctx = elder(CarePlan(lives_alone=True, timezone="Asia/Shanghai"))
    readings = {"inactivity": last}
    assert decide(ctx, local(zone, 2024, 6, 3, 11, 59, 59), readings=readings) == []
    raised = opened(decide(ctx, local(zone, 2024, 6, 3, 12, 0), readings=readings))
    m = raised.match
    assert (m.rule_id, raised.severity, raised.route) == ("inactivity", Severity.urgent, "urgent")
    assert m.observed_at == local(zone, 2024, 6, 3, 12, 0)
    assert m.evidence["silent_since_local"] == "08:00"
    assert m.evidence["last_activity"]["local_time"] == "19:00"
    assert m.evidence["summary"] == "no activity since 08:00 local inside 08:00-20:00 local"


def test_inactivity_is_four_hours_after_the_last_activity_just_past_and_just_inside() -> None:
    ctx = elder(ALONE)
    last = motion(local(SHANGHAI, 2024, 6, 3, 10, 30))
    readings = {"inactivity": last}
    assert decide(ctx, last.at + timedelta(hours=4) - SECOND, readings=readings) == []
    raised = opened(decide(ctx, last.at + timedelta(hours=4), readings=readings))
    assert raised.match.evidence["silent_since_local"] == "10:30"


def test_inactivity_applies_only_to_elders_who_live_alone() -> None:
    last = motion(local(SHANGHAI, 2024, 6, 3, 8, 0))
    now = local(SHANGHAI, 2024, 6, 3, 15, 0)
    assert decide(elder(CarePlan(lives_alone=False)), now, readings={"inactivity": last}) == []
    assert kinds(decide(elder(ALONE), now, readings={"inactivity": last})) == ["OpenAlert"]


def test_the_same_utc_moment_is_midday_in_shanghai_and_dawn_in_london() -> None:
    now = datetime(2024, 6, 3, 4, 30, tzinfo=UTC)  # 12:30 in Shanghai, 05:30 (BST) in London
    last = motion(datetime(2024, 6, 2, 19, 0, tzinfo=UTC))  # 03:00 in Shanghai, 20:00 in London
    shanghai = elder(CarePlan(lives_alone=True, timezone="Asia/Shanghai"))
    london = elder(CarePlan(lives_alone=True, timezone="Europe/London"))
    assert kinds(decide(shanghai, now, readings={"inactivity": last})) == ["OpenAlert"]
    assert decide(london, now, readings={"inactivity": last}) == []
    # London's day starts at 08:00 BST (07:00 UTC): silent until 12:00 BST.
    later = datetime(2024, 6, 3, 11, 0, tzinfo=UTC)
    raised = opened(decide(london, later, readings={"inactivity": last}))
    assert raised.match.evidence["silent_since_local"] == "08:00"


def test_silence_after_20_00_does_not_count_and_a_missed_run_still_raises_the_days_silence() -> None:
    ctx = elder(ALONE)
    evening = motion(local(SHANGHAI, 2024, 6, 3, 18, 0))
    assert decide(ctx, local(SHANGHAI, 2024, 6, 3, 23, 0), readings={"inactivity": evening}) == []
    noon = motion(local(SHANGHAI, 2024, 6, 3, 12, 0))
    raised = opened(decide(ctx, local(SHANGHAI, 2024, 6, 3, 21, 0), readings={"inactivity": noon}))
    assert raised.match.observed_at == local(SHANGHAI, 2024, 6, 3, 16, 0)


def test_an_elder_without_any_activity_reading_is_not_judged() -> None:
    assert decide(elder(ALONE), local(SHANGHAI, 2024, 6, 3, 19, 0)) == []


def test_sensors_reporting_no_movement_for_a_week_count_the_day_from_08_00() -> None:
    still = Reading(local(SHANGHAI, 2024, 6, 3, 11, 55), "motion", 0.0, "pir-1")
    ctx = elder(ALONE)
    assert decide(ctx, local(SHANGHAI, 2024, 6, 3, 11, 59), sensed={"inactivity": still}) == []
    raised = opened(decide(ctx, local(SHANGHAI, 2024, 6, 3, 12, 0), sensed={"inactivity": still}))
    evidence = raised.match.evidence
    assert evidence["last_activity"] is None and evidence["sensor"]["value"] == 0.0
    assert evidence["summary"] == "no activity since 08:00 local inside 08:00-20:00 local (none in 7 days)"
    assert decide(ctx, local(SHANGHAI, 2024, 6, 3, 12, 1), sensed={"inactivity": still}) == []


def test_the_same_silence_on_the_next_run_changes_nothing_and_activity_clears_it() -> None:
    ctx = elder(ALONE)
    last = motion(local(SHANGHAI, 2024, 6, 3, 8, 30))
    first = decide(ctx, local(SHANGHAI, 2024, 6, 3, 12, 40), readings={"inactivity": last})
    assert kinds(first) == ["OpenAlert"]
    for minutes in (1, 2, 60):  # the lifecycle state now has the alert
        again = local(SHANGHAI, 2024, 6, 3, 12, 40) + minutes * MIN
        assert decide(ctx, again, readings={"inactivity": last}) == []
    moved = motion(local(SHANGHAI, 2024, 6, 3, 14, 5))
    [cleared] = decide(ctx, local(SHANGHAI, 2024, 6, 3, 14, 6), readings={"inactivity": moved})
    assert isinstance(cleared, ClearCondition) and cleared.evidence["reason"] == "motion 1 at 14:05 local"
    # A new silence of 4 h reopens the alert (staff have not resolved it).
    [back] = decide(ctx, local(SHANGHAI, 2024, 6, 3, 18, 5), readings={"inactivity": moved})
    assert isinstance(back, AddEvidence) and back.reopen


def test_a_resolved_silence_stays_quiet_until_a_new_one() -> None:
    last = motion(local(SHANGHAI, 2024, 6, 3, 8, 30))
    resolved_at = local(SHANGHAI, 2024, 6, 3, 13, 0)
    alerts = ElderAlerts(resolved={"inactivity": (resolved_at, Severity.urgent)})
    ctx = elder(ALONE, alerts)
    assert decide(ctx, local(SHANGHAI, 2024, 6, 3, 19, 0), readings={"inactivity": last}) == []
    # The next day's silence is a new one: raised at noon.
    assert kinds(decide(ctx, local(SHANGHAI, 2024, 6, 4, 12, 0), readings={"inactivity": last})) == [
        "OpenAlert"
    ]


def test_activity_lookups_reach_back_a_week_before_the_days_hours() -> None:
    ctx = elder(ALONE)
    now = local(SHANGHAI, 2024, 6, 3, 9, 0)
    asked = [x for x in absence.lookups(ctx, now) if isinstance(x, absence.ReadingLookup)]
    assert sorted(str(x.condition) for x in asked) == ["motion >= 1", "steps > 0"]
    assert {x.since for x in asked} == {local(SHANGHAI, 2024, 6, 3, 8, 0) - absence.ACTIVITY_HISTORY}


@given(st.integers(0, 24 * 60 - 1), st.integers(0, 24 * 60 - 1))
def test_inactivity_raises_exactly_when_4_h_of_todays_hours_passed_since_the_last_activity(
    last_minute: int, now_minute: int
) -> None:
    day = local(SHANGHAI, 2024, 6, 3, 0, 0)
    last, now = day + last_minute * MIN, day + timedelta(days=1) + now_minute * MIN
    ctx = elder(ALONE)
    raised = any(isinstance(d, OpenAlert) for d in decide(ctx, now, readings={"inactivity": motion(last)}))
    start, end = latest_span(ctx.rules.rule("inactivity").active_hours, SHANGHAI, now)  # type: ignore[union-attr]
    silence = min(now, end) - max(start, last)
    assert raised == (silence >= timedelta(hours=4))


# --- device offline -----------------------------------------------------------------------


def test_a_wristband_is_offline_after_10_minutes_of_silence_and_a_motion_sensor_after_15() -> None:
    now = datetime(2024, 6, 3, 4, 0, tzinfo=UTC)
    sos = device("sos-1", "sos_button", 3600, last_seen=now)
    for dev, limit in ((device("wb-1", last_seen=now), 10), (device("pir-1", "motion_sensor", 300), 15)):
        inside = [sos, replace(dev, last_seen=now - (limit * MIN - SECOND))]
        past = [sos, replace(dev, last_seen=now - limit * MIN)]
        assert decide(elder(), now, devices=inside) == []
        raised = opened(decide(elder(), now, devices=past))
        assert raised.severity is Severity.follow_up  # the SOS button still reports
        assert raised.match.evidence["devices"][0]["why"] == f"no message for {limit * 60} s"


def test_the_elders_only_safety_device_offline_is_urgent() -> None:
    now = datetime(2024, 6, 3, 4, 0, tzinfo=UTC)
    wristband = device(last_seen=now - timedelta(minutes=30))
    pir = device("pir-1", "motion_sensor", 300, last_seen=now)
    raised = opened(decide(elder(), now, devices=[wristband, pir]))
    assert raised.severity is Severity.urgent and raised.route == "urgent"
    assert raised.match.evidence["severity_reason"] == "the elder's only safety device (wristband) is offline"
    # A motion sensor is no safety device: alone offline it is a follow-up.
    pir_off = device("pir-1", "motion_sensor", 300, last_seen=now - timedelta(hours=1))
    only_pir = opened(decide(elder(), now, devices=[device(last_seen=now), pir_off]))
    assert only_pir.severity is Severity.follow_up


def test_a_last_will_offline_for_10_minutes_is_offline_before_the_silence_limit() -> None:
    now = datetime(2024, 6, 3, 4, 0, tzinfo=UTC)
    sos = device("sos-1", "sos_button", 3600, last_seen=now - timedelta(minutes=20), online=False)
    wristband = device(last_seen=now)
    gone = device("sos-1", "sos_button", 3600, sos.last_seen, False, now - 10 * MIN)
    just = device("sos-1", "sos_button", 3600, sos.last_seen, False, now - 10 * MIN + SECOND)
    assert decide(elder(), now, devices=[just, wristband]) == []
    raised = opened(decide(elder(), now, devices=[gone, wristband]))
    assert raised.match.evidence["devices"][0]["why"] == "offline (Last Will)"
    assert raised.match.observed_at == now


def test_a_device_never_heard_from_is_not_offline() -> None:
    now = datetime(2024, 6, 3, 4, 0, tzinfo=UTC)
    assert decide(elder(), now, devices=[device(last_seen=None, online=False)]) == []


def test_a_second_device_going_silent_adds_evidence_once_then_all_back_clears() -> None:
    now = datetime(2024, 6, 3, 4, 0, tzinfo=UTC)
    ctx = elder()
    pir = device("pir-1", "motion_sensor", 300, last_seen=now - timedelta(minutes=20))
    sos_ok = device("sos-1", "sos_button", 3600, last_seen=now)
    assert kinds(decide(ctx, now, devices=[pir, sos_ok])) == ["OpenAlert"]
    assert decide(ctx, now + MIN, devices=[pir, sos_ok]) == []
    sos_off = device("sos-1", "sos_button", 3600, last_seen=now - timedelta(hours=3))
    [more] = decide(ctx, now + 2 * MIN, devices=[pir, sos_off])
    assert isinstance(more, UpgradeAlert)  # the only safety device is silent too: urgent
    assert decide(ctx, now + 3 * MIN, devices=[pir, sos_off]) == []
    back = [device("pir-1", "motion_sensor", 300, last_seen=now), device("sos-1", "sos_button", 3600, now)]
    [cleared] = decide(ctx, now + 4 * MIN, devices=back)
    assert isinstance(cleared, ClearCondition)
    assert decide(ctx, now + 5 * MIN, devices=back) == []


# --- low battery --------------------------------------------------------------------------


@pytest.mark.parametrize(("battery", "raised"), [(14.9, True), (15.0, False)])
def test_battery_below_15_percent_is_a_follow_up_for_the_family(battery: float, raised: bool) -> None:
    now = datetime(2024, 6, 3, 4, 0, tzinfo=UTC)
    found = decide(elder(), now, devices=[device(last_seen=now, status_at=now, battery=battery)])
    if not raised:
        assert found == []
        return
    alert = opened(found)
    assert (alert.severity, alert.route, alert.match.value) == (Severity.follow_up, "family", battery)
    assert alert.task is not None and alert.task.kind == "low_battery"


def test_low_battery_clears_back_above_the_margin_and_is_not_counted_run_by_run() -> None:
    now = datetime(2024, 6, 3, 4, 0, tzinfo=UTC)
    ctx = elder()

    def at(battery: float, minutes: int) -> list[object]:
        t = now + minutes * MIN
        return decide(ctx, t, devices=[device(last_seen=t, status_at=t, battery=battery)])

    assert kinds(at(12, 0)) == ["OpenAlert"]
    assert at(11, 1) == [] and at(12, 2) == []  # a fresher report is nothing new
    assert at(15.5, 3) == []  # above 15 but below 15.75: not cleared
    [cleared] = at(15.75, 4)
    assert isinstance(cleared, ClearCondition)
    assert cleared.evidence["reason"] == "battery at 15.75 % or more on every device (clears at 15.75 %)"
    assert kinds(at(14, 5)) == ["AddEvidence"]  # low again: the alert reopens


def test_a_resolved_low_battery_is_reminded_a_day_later() -> None:
    now = datetime(2024, 6, 3, 4, 0, tzinfo=UTC)
    resolved = ElderAlerts(resolved={"low_battery": (now - timedelta(hours=23), Severity.follow_up)})
    low = [device(last_seen=now, status_at=now, battery=10)]
    assert decide(elder(alerts=resolved), now, devices=low) == []
    assert kinds(decide(elder(alerts=resolved), now + timedelta(hours=1), devices=low)) == ["OpenAlert"]


# --- wearable removed ---------------------------------------------------------------------


def removed(at: datetime, kind: str = "wearable_removed") -> DeviceEvent:
    return DeviceEvent("wb-1", kind, at)


def test_a_wearable_taken_off_at_night_counts_from_08_00_local() -> None:
    events = {"wearable_removed": [removed(local(SHANGHAI, 2024, 6, 2, 22, 0))]}
    assert decide(elder(), local(SHANGHAI, 2024, 6, 3, 9, 59), events=events) == []
    raised = opened(decide(elder(), local(SHANGHAI, 2024, 6, 3, 10, 0), events=events))
    m = raised.match
    assert (raised.severity, m.device_id) == (Severity.follow_up, "wb-1")
    assert m.evidence["event"] == "wearable_removed" and m.evidence["local_time"] == "22:00"
    assert m.evidence["counted_from"] == local(SHANGHAI, 2024, 6, 3, 8, 0).astimezone(UTC).isoformat()


def test_a_wearable_removed_in_the_afternoon_is_raised_2_h_later_and_worn_again_clears() -> None:
    ctx = elder(CarePlan(timezone="Europe/London"))
    off = removed(local(LONDON, 2024, 1, 15, 14, 0))
    assert decide(ctx, local(LONDON, 2024, 1, 15, 15, 59), events={"wearable_removed": [off]}) == []
    assert kinds(decide(ctx, local(LONDON, 2024, 1, 15, 16, 0), events={"wearable_removed": [off]})) == [
        "OpenAlert"
    ]
    worn = removed(local(LONDON, 2024, 1, 15, 16, 30), "wearable_worn")
    [cleared] = decide(ctx, local(LONDON, 2024, 1, 15, 16, 31), events={"wearable_removed": [worn]})
    assert isinstance(cleared, ClearCondition)
    assert cleared.evidence["reason"] == "wearable_worn at 16:30 local (wb-1)"


def test_a_wearable_worn_again_in_the_morning_raises_nothing() -> None:
    worn = removed(local(SHANGHAI, 2024, 6, 3, 7, 0), "wearable_worn")
    assert decide(elder(), local(SHANGHAI, 2024, 6, 3, 15, 0), events={"wearable_removed": [worn]}) == []


def test_an_active_alerts_silence_reaches_the_lookups_back() -> None:
    start = local(SHANGHAI, 2024, 5, 1, 10, 0)
    ctx = elder(
        alerts=ElderAlerts({"wearable_removed": active("wearable_removed", start, Severity.follow_up)})
    )
    now = local(SHANGHAI, 2024, 6, 3, 10, 0)
    [ask] = [x for x in absence.lookups(ctx, now) if isinstance(x, absence.EventLookup)]
    assert ask.kinds == {"wearable_removed", "wearable_worn"}
    assert ask.since == start - timedelta(hours=2) - timedelta(days=1)
    assert RULES.rule("wearable_removed").severity is Severity.follow_up

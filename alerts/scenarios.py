"""Labelled scenarios: a timeline of one elder's readings and events, and the alerts it must give.

The table (``scenarios.toml``) is ground truth for the rules: ``run`` replays a scenario on
the in-memory engine (``replay.py``); the end-to-end tests publish the same timelines as a
device would, through the broker and the database; the simulators reuse them.

A scenario:

    [[scenario]]
    id = "fall_without_recovery_is_an_emergency_at_60_s"
    start = "2026-11-23T10:00:00+08:00"        # t = 0; steps say "+90s", "+2h", "-1d"
    plan = { conditions = ["copd"] }           # the elder's care plan (optional)
    steps = [
      { at = "+0s", event = "fall_detected" },
      { at = "+0s", metric = "spo2", values = [84, 84, 84], every = "60s" },
      { at = "-1d", event = "fall_detected", arrives = "+0s" },   # a buffered upload
      { at = "+5m", resolve = "sos" },          # staff resolve the rule's active alert
    ]
    until = "+10m"                              # time runs on to here (timers fire)
    expect = [{ rule = "fall_no_recovery", severity = "emergency", state = "open" }]

Each step is a batch arriving at ``arrives`` (default: its own time; a series: each reading
at its own time). Data arriving more than ``late_after`` (10 min) after its time is flagged
late, as the interpreter flags it. ``expect`` lists every alert the timeline raises (any
other is a mismatch); an expectation checks only the fields it names.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Any

from eldercare.alerts.careplan import CarePlan, parse_care_plan
from eldercare.alerts.replay import Replay, ReplayAlert
from eldercare.alerts.rules import RuleSet, parse_duration
from eldercare.devices.records import LATE, DeviceEvent, Reading

ELDER = "e-scenario"
DEVICE = "dev-scenario"
SCENARIOS_FILE = "scenarios.toml"


@dataclass(frozen=True, slots=True)
class Step:
    """Data of one batch (or a series of batches), or a staff action, at an offset from start."""

    at: timedelta
    arrives: timedelta | None = None
    event: str | None = None
    metric: str | None = None
    values: tuple[float, ...] = ()
    every: timedelta = timedelta(minutes=1)
    resolve: str | None = None
    details: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Scenario:
    """One labelled timeline."""

    id: str
    description: str
    start: datetime
    plan: CarePlan
    steps: tuple[Step, ...]
    until: timedelta
    expect: tuple[Mapping[str, Any], ...]


def _offset(text: str) -> timedelta:
    text = str(text).strip()
    sign = -1 if text.startswith("-") else 1
    return sign * parse_duration(text.lstrip("+-"))


def _step(data: Mapping[str, Any]) -> Step:
    values = data.get("values")
    if values is None and "value" in data:
        values = [data["value"]]
    return Step(
        at=_offset(data.get("at", "+0s")),
        arrives=_offset(data["arrives"]) if "arrives" in data else None,
        event=data.get("event"),
        metric=data.get("metric"),
        values=tuple(float(v) for v in values or ()),
        every=parse_duration(data.get("every", "60s")),
        resolve=data.get("resolve"),
        details=data.get("details", {}),
    )


def parse_scenarios(data: Mapping[str, Any]) -> list[Scenario]:
    """Scenarios from parsed TOML."""
    out = []
    for raw in data.get("scenario", []):
        out.append(
            Scenario(
                id=raw["id"],
                description=raw.get("description", ""),
                start=datetime.fromisoformat(raw["start"]),
                plan=parse_care_plan(raw.get("plan", {}), source=f"scenario {raw['id']}"),
                steps=tuple(_step(s) for s in raw.get("steps", [])),
                until=_offset(raw.get("until", "+0s")),
                expect=tuple(raw.get("expect", [])),
            )
        )
    return out


def load_scenarios(path: Path | None = None) -> list[Scenario]:
    """The scenario table (default: the packaged one)."""
    if path is None:
        text = resources.files("eldercare.alerts").joinpath(SCENARIOS_FILE).read_text(encoding="utf-8")
    else:
        text = Path(path).read_text(encoding="utf-8")
    return parse_scenarios(tomllib.loads(text))


@dataclass(frozen=True, slots=True)
class Batch:
    """What arrives at one moment of a scenario: readings, events, or a resolution."""

    arrives: datetime
    readings: tuple[Reading, ...] = ()
    events: tuple[DeviceEvent, ...] = ()
    resolve: str | None = None


def batches(scenario: Scenario, late_after: timedelta = timedelta(minutes=10)) -> list[Batch]:
    """The scenario's timeline as batches in arrival order (a device's view of it)."""
    out: list[tuple[datetime, int, Batch]] = []
    for i, step in enumerate(scenario.steps):
        at = scenario.start + step.at
        arrives = scenario.start + step.arrives if step.arrives is not None else None
        if step.resolve:
            out.append((arrives or at, i, Batch(arrives or at, resolve=step.resolve)))
            continue
        if step.event:
            when = arrives or at
            flags = [LATE] if when - at > late_after else []
            ev = DeviceEvent(at, DEVICE, ELDER, step.event, dict(step.details), flags)
            out.append((when, i, Batch(when, events=(ev,))))
            continue
        if step.metric:
            readings = []
            for n, value in enumerate(step.values):
                t = at + n * step.every
                when = arrives or t
                flags = [LATE] if when - t > late_after else []
                readings.append(Reading(t, DEVICE, ELDER, step.metric, value, flags))
            if arrives is not None:  # a buffered upload: one batch
                out.append((arrives, i, Batch(arrives, readings=tuple(readings))))
            else:
                out.extend((r.time, i, Batch(r.time, readings=(r,))) for r in readings)
    out.sort(key=lambda item: (item[0], item[1]))
    merged: list[Batch] = []
    for when, _, batch in out:  # what arrives at one moment is one batch (one upload)
        last = merged[-1] if merged else None
        if last is not None and last.arrives == when and not (last.resolve or batch.resolve):
            merged[-1] = Batch(when, last.readings + batch.readings, last.events + batch.events)
        else:
            merged.append(batch)
    return merged


def run(scenario: Scenario, rule_set: RuleSet) -> Replay:
    """Replay the scenario on the in-memory engine; the replay holds the alerts it raised."""
    replay = Replay(rule_set, {ELDER: scenario.plan})
    for batch in batches(scenario, rule_set.defaults.late_after):
        replay.advance(batch.arrives)
        if batch.resolve:
            for alert in replay.active(ELDER):
                if alert.rule == batch.resolve:
                    replay.resolve(alert.id, batch.arrives)
            continue
        replay.feed(batch.readings, batch.events, batch.arrives)
    replay.advance(scenario.start + scenario.until)
    return replay


def alert_facts(alert: ReplayAlert) -> dict[str, Any]:
    """The fields an expectation may name, for one alert."""
    return {
        "rule": alert.rule,
        "severity": str(alert.severity),
        "raised_severity": str(alert.raised_severity),
        "state": alert.state,
        "route": alert.route,
        "late": alert.late_by is not None,
        "matches": alert.matches,
        "confirmed": alert.confirmed,
        "task": alert.task[0] if alert.task else None,
        "dispatches": len(alert.outbox),
    }


def mismatches(expect: Sequence[Mapping[str, Any]], got: Sequence[Mapping[str, Any]]) -> list[str]:
    """What differs between expected and raised alerts (empty: they agree), in raising order."""
    problems = []
    if len(expect) != len(got):
        problems.append(f"expected {len(expect)} alerts, got {len(got)}: {[g['rule'] for g in got]}")
    for i, (want, have) in enumerate(zip(expect, got, strict=False)):
        for key, value in want.items():
            if have.get(key) != value:
                rule = have.get("rule")
                problems.append(f"alert {i} ({rule}): {key} is {have.get(key)!r}, expected {value!r}")
    return problems


def check(scenario: Scenario, rule_set: RuleSet) -> list[str]:
    """Run a scenario and compare with its expectations."""
    replay = run(scenario, rule_set)
    got = [alert_facts(a) for a in sorted(replay.alerts.values(), key=lambda a: (a.raised_at, a.id))]
    return mismatches(scenario.expect, got)

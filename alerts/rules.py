"""The rule set as data: typed, frozen models of ``default_rules.toml`` and their loader.

Every number of the clinical rule set (shared/spec/rules.md) lives in the TOML file next to
this module; a deployment may load its own (``ELDERCARE_RULES_FILE``) and each elder's care
plan adjusts it further (``alerts/careplan.py``). This module only describes and validates
rules; evaluating readings and events against them is the engine's job.

``load_rule_set`` checks everything it can before anything runs: unknown keys, bad
durations and time windows, metrics and event kinds the device catalog does not know,
values outside a metric's plausible range, duplicate ids, inhibitions across metrics,
severity levels out of order, unknown care-plan conditions and routes. Every mistake is a
``Problem`` naming the file, the rule and the field; ``RuleSetError`` carries all of them.
"""

from __future__ import annotations

import functools
import re
import tomllib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import time, timedelta
from enum import StrEnum
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    PrivateAttr,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    WrapSerializer,
    field_validator,
    model_serializer,
    model_validator,
)

from eldercare.devices.catalog import Catalog, load_catalog

#: The packaged rule file (next to this module).
DEFAULT_RULES_FILE = "default_rules.toml"
#: Requirement names a care plan provides besides its conditions (``CarePlan.facts``).
PLAN_FACTS = frozenset({"lives_alone"})


# --- errors -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Problem:
    """One mistake in a rule file or care plan: where it is and what is wrong."""

    source: str
    rule: str | None
    field: str | None
    message: str

    def __str__(self) -> str:
        where = [f"rule {self.rule}"] if self.rule else []
        if self.field:
            where.append(f"field {self.field}")
        return (
            f"{self.source}: {', '.join(where)}: {self.message}"
            if where
            else f"{self.source}: {self.message}"
        )


class RuleSetError(Exception):
    """A rule set (or a care plan applied to one) that does not validate; lists every problem.

    Deliberately not a ValueError: raised from inside a pydantic validator, it passes through
    unchanged instead of being folded into a ValidationError.
    """

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


# --- small value types --------------------------------------------------------------------

_K = TypeVar("_K")
_V = TypeVar("_V")
_DURATION = re.compile(r"(?P<n>\d+)(?P<unit>[smhd])")
_UNIT_SECONDS = {"d": 86_400, "h": 3_600, "m": 60, "s": 1}
_WINDOW = re.compile(r"(?P<h1>\d\d):(?P<m1>\d\d)-(?P<h2>\d\d):(?P<m2>\d\d)")
_CONDITION = re.compile(r"\s*(?P<metric>[a-z][a-z0-9_]*)\s*(?P<op><=|>=|<|>)\s*(?P<value>-?\d+(?:\.\d+)?)\s*")


def parse_duration(text: str) -> timedelta:
    """``"60s"``, ``"2m"``, ``"4h"``, ``"7d"`` as a timedelta; ValueError otherwise."""
    m = _DURATION.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"{text!r} is not a duration; write a whole number and s, m, h or d: '60s', '7d'")
    return timedelta(seconds=int(m["n"]) * _UNIT_SECONDS[m["unit"]])


def format_duration(value: timedelta) -> str:
    """The shortest exact form of a duration: 90 s -> ``"90s"``, 14 days -> ``"14d"``."""
    seconds = int(value.total_seconds())
    for unit, size in _UNIT_SECONDS.items():
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return "0s"


def _to_duration(value: object) -> object:
    if isinstance(value, str):
        return parse_duration(value)
    if isinstance(value, timedelta):
        return value
    raise ValueError("a duration is a string like '60s', '2m', '4h' or '7d'")


def _positive(value: timedelta) -> timedelta:
    if value <= timedelta(0):
        raise ValueError("must be longer than 0s")
    return value


class FrozenDict(Mapping[_K, _V]):
    """A read-only, hashable mapping (so frozen models holding one are hashable too)."""

    __slots__ = ("_data", "_hash")

    def __init__(self, data: Mapping[_K, _V] | None = None) -> None:
        self._data: dict[_K, _V] = dict(data or {})
        self._hash: int | None = None

    def __getitem__(self, key: _K) -> _V:
        return self._data[key]

    def __iter__(self) -> Iterator[_K]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash(frozenset(self._data.items()))
        return self._hash

    def __repr__(self) -> str:
        return f"FrozenDict({self._data!r})"


def freeze(value: Any) -> Any:
    """``value`` made immutable all the way down: mappings as FrozenDict, lists as tuples."""
    if isinstance(value, Mapping):
        return FrozenDict({k: freeze(v) for k, v in value.items()})
    if isinstance(value, list | tuple):
        return tuple(freeze(v) for v in value)
    if isinstance(value, set | frozenset):
        return frozenset(freeze(v) for v in value)
    return value


def thaw(value: Any) -> Any:
    """The plain data of a frozen value: FrozenDicts as dicts, tuples as lists (models kept)."""
    if isinstance(value, FrozenDict):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [thaw(v) for v in value]
    return value


def _empty_map() -> Mapping[Any, Any]:
    return FrozenDict()


#: A duration written as ``"60s"``/``"2m"``/``"4h"``/``"7d"``, zero allowed.
Duration = Annotated[
    timedelta, BeforeValidator(_to_duration), PlainSerializer(format_duration, return_type=str)
]
#: A duration longer than zero.
PositiveDuration = Annotated[Duration, AfterValidator(_positive)]
#: A snake_case name: rule ids, conditions, routes, task kinds.
Name = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,63}$")]
#: A set of names, written as a list and shown sorted.
Names = Annotated[frozenset[Name], PlainSerializer(sorted, return_type=list[str])]
#: A read-only, hashable mapping (dict in, dict out), its values frozen all the way down.
FrozenMap = Annotated[Mapping[_K, _V], AfterValidator(freeze), WrapSerializer(lambda v, nxt: nxt(thaw(v)))]


class Severity(StrEnum):
    """How soon someone must act; ordered follow_up < urgent < emergency."""

    follow_up = "follow_up"
    urgent = "urgent"
    emergency = "emergency"

    @property
    def rank(self) -> int:
        """0 for follow_up, 1 for urgent, 2 for emergency."""
        return _SEVERITY_RANK[self]

    # Compared by rank, also with plain strings ("urgent" < "emergency" is not alphabetical).
    def __lt__(self, other: object) -> bool:
        return self.rank < _rank(other) if isinstance(other, str) else NotImplemented

    def __le__(self, other: object) -> bool:
        return self.rank <= _rank(other) if isinstance(other, str) else NotImplemented

    def __gt__(self, other: object) -> bool:
        return self.rank > _rank(other) if isinstance(other, str) else NotImplemented

    def __ge__(self, other: object) -> bool:
        return self.rank >= _rank(other) if isinstance(other, str) else NotImplemented


_SEVERITY_RANK = {s: i for i, s in enumerate(Severity)}


def _rank(severity: str) -> int:
    return _SEVERITY_RANK[Severity(severity)]


class FrozenModel(BaseModel):
    """A pydantic model that cannot change after validation and refuses unknown keys."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


def _catalog(info: ValidationInfo) -> Catalog:
    """The device catalog rules are checked against: the validation context's, else the default."""
    context = info.context if isinstance(info.context, Mapping) else {}
    found = context.get("catalog")
    return found if isinstance(found, Catalog) else load_catalog()


class TimeWindow(FrozenModel):
    """Local hours such as ``"22:00-06:00"``; the end is exclusive, and may wrap midnight."""

    start: time
    end: time

    @model_validator(mode="before")
    @classmethod
    def _parse(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        m = _WINDOW.fullmatch(value.strip())
        if m is None:
            raise ValueError(f"{value!r} is not a time window; write 'HH:MM-HH:MM' such as '22:00-06:00'")
        try:
            start, end = time(int(m["h1"]), int(m["m1"])), time(int(m["h2"]), int(m["m2"]))
        except ValueError:
            raise ValueError(f"{value!r}: hours are 00-23 and minutes 00-59") from None
        return {"start": start, "end": end}

    @model_validator(mode="after")
    def _not_empty(self) -> TimeWindow:
        if self.start == self.end:
            raise ValueError("a time window's start and end must differ")
        return self

    @model_serializer
    def _text(self) -> str:
        return str(self)

    def __str__(self) -> str:
        return f"{self.start:%H:%M}-{self.end:%H:%M}"

    @property
    def wraps_midnight(self) -> bool:
        """True for windows such as 22:00-06:00."""
        return self.end < self.start

    def contains(self, moment: time) -> bool:
        """True when the local time ``moment`` falls inside the window."""
        moment = moment.replace(tzinfo=None)
        if self.wraps_midnight:
            return moment >= self.start or moment < self.end
        return self.start <= moment < self.end


Op = Literal["<", "<=", ">", ">="]


class Condition(FrozenModel):
    """``metric op value`` such as ``"spo2 < 90"``: the metric from the device catalog, the
    value in its canonical unit and inside its plausible range."""

    metric: str
    op: Op
    value: float

    @model_validator(mode="before")
    @classmethod
    def _parse(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        m = _CONDITION.fullmatch(value)
        if m is None:
            raise ValueError(
                f"{value!r} is not a condition; write 'metric op number' with op one of < <= > >=,"
                " such as 'spo2 < 90'"
            )
        return {"metric": m["metric"], "op": m["op"], "value": float(m["value"])}

    @model_validator(mode="after")
    def _in_catalog(self, info: ValidationInfo) -> Condition:
        metric = _catalog(info).metrics.get(self.metric)
        if metric is None:
            raise ValueError(f"unknown metric {self.metric!r} (not in the device catalog)")
        if not metric.plausible(self.value):
            raise ValueError(
                f"{self}: {_number(self.value)} {metric.unit} is outside {self.metric}'s plausible range"
                f" {_number(metric.low)}-{_number(metric.high)}"
            )
        return self

    @model_serializer
    def _text(self) -> str:
        return str(self)

    def __str__(self) -> str:
        return f"{self.metric} {self.op} {_number(self.value)}"

    @property
    def below(self) -> bool:
        """True for ``<``/``<=`` conditions (a breach is a low value)."""
        return self.op in ("<", "<=")

    def breaches(self, value: float) -> bool:
        """True when ``value`` (canonical unit) meets the condition."""
        match self.op:
            case "<":
                return value < self.value
            case "<=":
                return value <= self.value
            case ">":
                return value > self.value
            case _:
                return value >= self.value

    def clears(self, value: float, margin: float) -> bool:
        """True when ``value`` is back inside the band by ``margin`` (a fraction of the threshold)."""
        step = abs(self.value) * margin
        return value >= self.value + step if self.below else value <= self.value - step

    def beyond(self, other: Condition) -> bool:
        """True when this is a condition on ``other``'s metric and side, further out than it."""
        if (self.metric, self.below) != (other.metric, other.below):
            return False
        return self.value < other.value if self.below else self.value > other.value


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


Conditions = Annotated[tuple[Condition, ...], Field(min_length=1)]


def _known_events(kinds: frozenset[str], info: ValidationInfo) -> frozenset[str]:
    unknown = sorted(kinds - _catalog(info).event_types)
    if unknown:
        raise ValueError(f"unknown event kind(s) {unknown} (not in the device catalog's events.types)")
    return kinds


# --- building blocks of rules -------------------------------------------------------------


class Title(FrozenModel):
    """A rule's (or condition's) display name in Chinese and English."""

    zh_cn: str = Field(alias="zh-CN", min_length=1)
    en: str = Field(min_length=1)


class Task(FrozenModel):
    """A work item a rule creates instead of (or besides) a call-out."""

    kind: Name
    due: PositiveDuration
    #: Who works it, e.g. ``family_doctor`` (the family doctor team) or ``service_desk`` (12349).
    assignee: Name
    #: Route taken when the task is overdue (e.g. ``team_lead``); None: no escalation.
    overdue_route: Name | None = None


class RouteStep(FrozenModel):
    """One step of a route: channels notified together, and how long they have to acknowledge."""

    notify: Annotated[tuple[str, ...], Field(min_length=1)]
    #: Channels added to this step only where the deployment configured them (e.g. 119).
    if_configured: tuple[str, ...] = ()
    #: None: no deadline of its own (the last step, or a task's due date).
    ack_within: PositiveDuration | None = None


class Route(FrozenModel):
    """Where alerts go, step by step (the dispatcher owns the details)."""

    description: str
    steps: Annotated[tuple[RouteStep, ...], Field(min_length=1)]


class Defaults(FrozenModel):
    """Values every rule uses unless it sets its own."""

    cooldown: Duration = timedelta(minutes=30)
    #: A threshold alert clears when readings are back inside the band by this fraction.
    hysteresis_margin: float = Field(0.05, ge=0, lt=1)
    #: A reading or event whose ``ts`` is this much older than its arrival is late.
    late_after: PositiveDuration = timedelta(minutes=10)
    #: A late alert of this severity is routed as ...
    late_emergency_as: Severity = Severity.urgent
    #: A follow-up alert whose rule names no task gets one due this long after it is raised.
    follow_up_due: PositiveDuration = timedelta(days=7)
    #: ... assigned to this team.
    follow_up_assignee: Name = "family_doctor"
    #: The route of each severity, for rules that name none.
    severity_routes: FrozenMap[Severity, Name]

    @field_validator("severity_routes")
    @classmethod
    def _every_severity(cls, value: Mapping[Severity, str]) -> Mapping[Severity, str]:
        missing = [s.value for s in Severity if s not in value]
        if missing:
            raise ValueError(f"no route for severity {', '.join(missing)}")
        return value


# --- rules --------------------------------------------------------------------------------


class _Rule(FrozenModel):
    """What every rule has: id, titles, route, the care-plan facts it needs, a cool-down."""

    section: ClassVar[str]

    id: Name
    title: Title
    #: Route name; None: the route of the severity raised (``defaults.severity_routes``).
    route: Name | None = None
    #: Care-plan facts (conditions, ``lives_alone``) the elder must have for the rule to apply.
    requires: Names = frozenset()
    #: Quiet period after resolution; None: ``defaults.cooldown``.
    cooldown: PositiveDuration | None = None

    @property
    def severities(self) -> tuple[Severity, ...]:
        """Every severity the rule can raise, lowest first."""
        raise NotImplementedError

    @property
    def routes(self) -> tuple[str, ...]:
        """Route names the rule itself mentions (rule, levels, task)."""
        return (self.route,) if self.route else ()

    def applies_to(self, facts: frozenset[str]) -> bool:
        """True when an elder with these care-plan facts gets this rule."""
        return self.requires <= facts


def _levels_rise(base: Severity, severities: Iterable[Severity], field: str = "levels[{i}]") -> None:
    previous = base
    for i, severity in enumerate(severities):
        if severity <= previous:
            raise ValueError(
                f"{field.format(i=i)}: severity {severity.value} must be higher than {previous.value}"
                " (levels go from the rule's own severity upwards)"
            )
        previous = severity


class ThresholdLevel(FrozenModel):
    """A higher severity for readings further out than the rule's own conditions."""

    severity: Severity
    any: Conditions
    route: Name | None = None


class ThresholdRule(_Rule):
    """Readings past a threshold: one reading, or every reading of a window (sustained)."""

    section: ClassVar[str] = "threshold"

    severity: Severity
    #: Breach when any of these holds (all in the same canonical units as the catalog).
    any: Conditions
    #: Every reading in the window must breach; 0s: one reading is enough.
    window: Duration = timedelta(0)
    levels: tuple[ThresholdLevel, ...] = ()
    #: Lower-severity rules on the same metric that stay quiet while this one is open.
    inhibits: Names = frozenset()
    #: A second breaching reading within this time marks the alert confirmed.
    confirm_within: PositiveDuration | None = None
    #: None: ``defaults.hysteresis_margin``.
    hysteresis_margin: float | None = Field(None, ge=0, lt=1)
    #: Care-plan condition -> fields replaced for elders with that condition.
    condition_overrides: FrozenMap[Name, FrozenMap[str, Any]] = Field(default_factory=_empty_map)

    @field_validator("levels")
    @classmethod
    def _levels_in_order(
        cls, levels: tuple[ThresholdLevel, ...], info: ValidationInfo
    ) -> tuple[ThresholdLevel, ...]:
        base, severity = info.data.get("any"), info.data.get("severity")
        if base is None or severity is None:
            return levels  # reported on their own fields
        _levels_rise(severity, (level.severity for level in levels))
        previous: tuple[Condition, ...] = base
        for i, level in enumerate(levels):
            for j, condition in enumerate(level.any):
                if not any(condition.beyond(c) for c in previous):
                    raise ValueError(
                        f"levels[{i}].any[{j}]: '{condition}' must lie beyond the lower level's"
                        f" {[str(c) for c in previous if c.metric == condition.metric] or 'metrics'}"
                    )
            previous = level.any
        return levels

    @property
    def metrics(self) -> frozenset[str]:
        """The metrics the rule reads."""
        return frozenset(c.metric for c in self.any)

    @property
    def severities(self) -> tuple[Severity, ...]:
        return (self.severity, *(level.severity for level in self.levels))

    @property
    def routes(self) -> tuple[str, ...]:
        return super().routes + tuple(level.route for level in self.levels if level.route)

    def breaches(self, metric: str, value: float) -> bool:
        """True when one reading of ``metric`` breaches the rule's own conditions."""
        return any(c.metric == metric and c.breaches(value) for c in self.any)

    def severity_of(self, metric: str, value: float) -> Severity | None:
        """The highest severity one reading reaches, or None when it does not breach."""
        if not self.breaches(metric, value):
            return None
        reached = self.severity
        for level in self.levels:
            if any(c.metric == metric and c.breaches(value) for c in level.any):
                reached = level.severity
        return reached


class News2Rule(_Rule):
    """NEWS2 aggregate of the latest readings: urgent from one score, emergency from another."""

    section: ClassVar[str] = "news2"

    id: Name = "news2"
    urgent_from: int = Field(ge=1, le=20)
    emergency_from: int = Field(ge=1, le=20)
    #: Any single parameter scoring 3 makes it an emergency from this aggregate on.
    single_three_emergency_from: int = Field(ge=0, le=20)
    #: Readings older than this do not count.
    max_age: PositiveDuration
    #: SpO2 scale for elders without a scale-2 condition (1: standard; 2: hypercapnic).
    spo2_scale: Literal[1, 2] = 1
    #: Care-plan conditions that put an elder on SpO2 scale 2.
    spo2_scale_2_for: Names = frozenset()

    @model_validator(mode="after")
    def _scores_in_order(self) -> News2Rule:
        if not self.urgent_from < self.emergency_from:
            raise ValueError("urgent_from: must be below emergency_from")
        if not self.urgent_from <= self.single_three_emergency_from <= self.emergency_from:
            raise ValueError("single_three_emergency_from: must lie between urgent_from and emergency_from")
        return self

    @property
    def severities(self) -> tuple[Severity, ...]:
        return (Severity.urgent, Severity.emergency)


class EventLevel(FrozenModel):
    """A higher severity at certain local hours, or when the event repeats."""

    severity: Severity
    #: Applies when the event happens inside these local hours.
    during: TimeWindow | None = None
    #: Applies from the ``count``-th such event within ``within`` on.
    count: int | None = Field(None, ge=2)
    within: PositiveDuration | None = None
    route: Name | None = None

    @model_validator(mode="after")
    def _qualified(self) -> EventLevel:
        if (self.count is None) != (self.within is None):
            raise ValueError("within: count and within go together (e.g. count = 2, within = '48h')")
        if self.during is None and self.count is None:
            raise ValueError("a level needs during, or count and within")
        return self


EventKinds = Annotated[Names, AfterValidator(_known_events)]


class EventRule(_Rule):
    """A device event, optionally waiting for another that does not come."""

    section: ClassVar[str] = "event"

    severity: Severity
    #: Event kinds that start the rule.
    on: Annotated[EventKinds, Field(min_length=1)]
    #: Raise only if none of these follows ``within`` (a waiting window).
    unless: EventKinds = frozenset()
    within: PositiveDuration | None = None
    #: Raise only when one of these came before (``fall_recovered`` after ``fall_detected``).
    after: EventKinds = frozenset()
    #: How far back ``after`` looks (rules.md gives no time; an hour covers a fall and getting up).
    after_within: PositiveDuration = timedelta(hours=1)
    #: Only events at these local hours count.
    during: TimeWindow | None = None
    levels: tuple[EventLevel, ...] = ()
    task: Task | None = None

    @model_validator(mode="after")
    def _consistent(self) -> EventRule:
        if bool(self.unless) != (self.within is not None):
            raise ValueError("within: unless and within go together (no 'unless' event within the time)")
        if self.on & (self.unless | self.after):
            raise ValueError("on: an event kind cannot both start the rule and be waited for")
        _levels_rise(self.severity, (level.severity for level in self.levels))
        return self

    @property
    def event_kinds(self) -> frozenset[str]:
        """Every event kind the rule listens to."""
        return self.on | self.unless | self.after

    @property
    def severities(self) -> tuple[Severity, ...]:
        return (self.severity, *(level.severity for level in self.levels))

    @property
    def routes(self) -> tuple[str, ...]:
        levels = tuple(level.route for level in self.levels if level.route)
        task = (self.task.overdue_route,) if self.task and self.task.overdue_route else ()
        return super().routes + levels + task


class _SingleSeverity(_Rule):
    severity: Severity

    @property
    def severities(self) -> tuple[Severity, ...]:
        return (self.severity,)


class NoActivityRule(_SingleSeverity):
    """No activity signal for a while, counted only inside the active hours (``inactivity``)."""

    section: ClassVar[str] = "absence"

    kind: Literal["no_activity"]
    #: A reading meeting any of these is activity.
    activity: Conditions
    silent_for: PositiveDuration
    #: Local hours in which silence counts; None: all day.
    active_hours: TimeWindow | None = None


class DeviceSilentRule(_SingleSeverity):
    """A device stops reporting, or its Last Will says it is offline (``device_offline``)."""

    section: ClassVar[str] = "absence"

    kind: Literal["device_silent"]
    #: Silent for this many of the device type's reporting intervals ...
    intervals: float = Field(gt=0)
    #: ... and at least this long.
    at_least: PositiveDuration
    #: Or: an LWT ``online: false`` that lasts this long.
    lwt_offline_for: PositiveDuration
    #: Device types that protect an elder (fall, SOS, smoke detection).
    safety_device_types: Names = frozenset()
    #: Severity when the silent device is the elder's only safety device.
    only_safety_device_severity: Severity | None = None

    @model_validator(mode="after")
    def _higher(self) -> DeviceSilentRule:
        if self.only_safety_device_severity is not None:
            _levels_rise(self.severity, [self.only_safety_device_severity], "only_safety_device_severity")
        return self

    @property
    def severities(self) -> tuple[Severity, ...]:
        extra = self.only_safety_device_severity
        return (self.severity,) if extra is None else (self.severity, extra)


class BatteryLowRule(_SingleSeverity):
    """A device's reported battery below a percentage (``low_battery``)."""

    section: ClassVar[str] = "absence"

    kind: Literal["battery_low"]
    below: float = Field(gt=0, le=100)


class EventUnansweredRule(_SingleSeverity):
    """An event not followed by its counterpart, counted inside the active hours."""

    section: ClassVar[str] = "absence"

    kind: Literal["event_unanswered"]
    on: Annotated[EventKinds, Field(min_length=1)]
    unless: Annotated[EventKinds, Field(min_length=1)]
    silent_for: PositiveDuration
    active_hours: TimeWindow | None = None

    @property
    def event_kinds(self) -> frozenset[str]:
        """Every event kind the rule listens to."""
        return self.on | self.unless


class MeanTrendRule(_SingleSeverity):
    """The mean of a metric over a period past a threshold (``bp_uncontrolled``)."""

    section: ClassVar[str] = "trend"

    kind: Literal["mean"]
    over: PositiveDuration
    #: Breach when the period's mean meets any of these.
    any: Conditions
    #: Only fasting readings count.
    fasting_only: bool = False

    @property
    def metrics(self) -> frozenset[str]:
        """The metrics the rule reads."""
        return frozenset(c.metric for c in self.any)


class RiseTrendRule(_SingleSeverity):
    """A metric rising by some amount within a period (``weight_gain``)."""

    section: ClassVar[str] = "trend"

    kind: Literal["rise"]
    metric: str
    by: float = Field(gt=0)
    within: PositiveDuration

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, metric: str, info: ValidationInfo) -> str:
        if metric not in _catalog(info).metrics:
            raise ValueError(f"unknown metric {metric!r} (not in the device catalog)")
        return metric

    @model_validator(mode="after")
    def _plausible_rise(self, info: ValidationInfo) -> RiseTrendRule:
        m = _catalog(info).metrics[self.metric]
        if self.by > m.high - m.low:
            raise ValueError(f"by: {_number(self.by)} {m.unit} is more than {self.metric}'s plausible range")
        return self

    @property
    def metrics(self) -> frozenset[str]:
        """The metrics the rule reads."""
        return frozenset({self.metric})


class PeriodicFollowUpRule(_SingleSeverity):
    """Recurring follow-up tasks for elders with any of some conditions.

    Each task is due ``task.due`` after the last follow-up; an alert of a rule in
    ``pulled_forward_by`` brings the next one forward to within ``pulled_forward_within``.
    """

    section: ClassVar[str] = "schedule"

    kind: Literal["periodic_follow_up"]
    #: The elder gets the follow-ups with any one of these.
    conditions: Annotated[Names, Field(min_length=1)]
    task: Task
    #: An alert of one of these rules brings the next follow-up forward to within ...
    pulled_forward_by: Names = frozenset()
    pulled_forward_within: PositiveDuration | None = None

    @model_validator(mode="after")
    def _pull(self) -> PeriodicFollowUpRule:
        if bool(self.pulled_forward_by) != (self.pulled_forward_within is not None):
            raise ValueError("pulled_forward_within: goes together with pulled_forward_by")
        return self

    @property
    def routes(self) -> tuple[str, ...]:
        return super().routes + ((self.task.overdue_route,) if self.task.overdue_route else ())

    def applies_to(self, facts: frozenset[str]) -> bool:
        return super().applies_to(facts) and bool(self.conditions & facts)


class CheckupResultsRule(_SingleSeverity):
    """A recorded health check-up creates a task to inform the elder of results and advice."""

    section: ClassVar[str] = "schedule"

    kind: Literal["checkup_results"]
    task: Task

    @property
    def routes(self) -> tuple[str, ...]:
        return super().routes + ((self.task.overdue_route,) if self.task.overdue_route else ())


AbsenceRule = Annotated[
    NoActivityRule | DeviceSilentRule | BatteryLowRule | EventUnansweredRule, Field(discriminator="kind")
]
TrendRule = Annotated[MeanTrendRule | RiseTrendRule, Field(discriminator="kind")]
ScheduleRule = Annotated[PeriodicFollowUpRule | CheckupResultsRule, Field(discriminator="kind")]
#: Any rule of a rule set.
Rule = (
    ThresholdRule
    | News2Rule
    | EventRule
    | NoActivityRule
    | DeviceSilentRule
    | BatteryLowRule
    | EventUnansweredRule
    | MeanTrendRule
    | RiseTrendRule
    | PeriodicFollowUpRule
    | CheckupResultsRule
)
#: Fields an override may not replace.
FIXED_FIELDS = frozenset({"id", "kind"})


# --- the rule set -------------------------------------------------------------------------


class RuleSet(FrozenModel):
    """Every rule, its vocabulary (conditions, routes) and defaults, with lookups by id,
    metric and event kind and the inhibition map both ways."""

    version: Literal[1] = 1
    defaults: Defaults
    #: Care-plan condition vocabulary, in file order: name -> title.
    conditions: FrozenMap[Name, Title]
    routes: FrozenMap[Name, Route]
    thresholds: tuple[ThresholdRule, ...] = Field((), alias="threshold")
    news2: News2Rule | None = None
    events: tuple[EventRule, ...] = Field((), alias="event")
    absences: tuple[AbsenceRule, ...] = Field((), alias="absence")
    trends: tuple[TrendRule, ...] = Field((), alias="trend")
    schedules: tuple[ScheduleRule, ...] = Field((), alias="schedule")

    _catalog: Catalog = PrivateAttr()
    _by_id: Mapping[str, Rule] = PrivateAttr()
    _by_metric: Mapping[str, tuple[ThresholdRule, ...]] = PrivateAttr()
    _by_event: Mapping[str, tuple[EventRule, ...]] = PrivateAttr()
    _listening: Mapping[str, tuple[Rule, ...]] = PrivateAttr()
    _inhibits: Mapping[str, frozenset[str]] = PrivateAttr()
    _inhibited_by: Mapping[str, frozenset[str]] = PrivateAttr()

    @model_validator(mode="after")
    def _consistent(self, info: ValidationInfo) -> RuleSet:
        context = info.context if isinstance(info.context, Mapping) else {}
        problems = _cross_check(self, str(context.get("source", "rules")), _catalog(info))
        if problems:
            raise RuleSetError(problems)
        self._catalog = _catalog(info)
        self._index()
        return self

    def _index(self) -> None:
        rules = self.rules
        self._by_id = MappingProxyType({r.id: r for r in rules})
        by_metric: dict[str, list[ThresholdRule]] = {}
        for t in self.thresholds:
            for metric in sorted(t.metrics):
                by_metric.setdefault(metric, []).append(t)
        self._by_metric = MappingProxyType({m: tuple(rs) for m, rs in by_metric.items()})
        by_event: dict[str, list[EventRule]] = {}
        listening: dict[str, list[Rule]] = {}
        for r in rules:
            if isinstance(r, EventRule):
                for kind in sorted(r.on):
                    by_event.setdefault(kind, []).append(r)
            if isinstance(r, EventRule | EventUnansweredRule):
                for kind in sorted(r.event_kinds):
                    listening.setdefault(kind, []).append(r)
        self._by_event = MappingProxyType({k: tuple(rs) for k, rs in by_event.items()})
        self._listening = MappingProxyType({k: tuple(rs) for k, rs in listening.items()})
        inhibited_by: dict[str, set[str]] = {}
        for t in self.thresholds:
            for target in t.inhibits:
                inhibited_by.setdefault(target, set()).add(t.id)
        self._inhibits = MappingProxyType({t.id: t.inhibits for t in self.thresholds if t.inhibits})
        self._inhibited_by = MappingProxyType({k: frozenset(v) for k, v in inhibited_by.items()})

    # -- lookups --------------------------------------------------------------------------

    @property
    def rules(self) -> tuple[Rule, ...]:
        """Every rule, section by section in file order."""
        news2 = (self.news2,) if self.news2 else ()
        return (*self.thresholds, *news2, *self.events, *self.absences, *self.trends, *self.schedules)

    def __contains__(self, rule_id: object) -> bool:
        return rule_id in self._by_id

    @property
    def ids(self) -> frozenset[str]:
        """Every rule id."""
        return frozenset(self._by_id)

    @property
    def catalog(self) -> Catalog:
        """The device catalog the rules were checked against."""
        return self._catalog

    def rule(self, rule_id: str) -> Rule:
        """The rule with this id (KeyError if there is none)."""
        return self._by_id[rule_id]

    def thresholds_for(self, metric: str) -> tuple[ThresholdRule, ...]:
        """Threshold rules reading ``metric``, in file order."""
        return self._by_metric.get(metric, ())

    def events_for(self, kind: str) -> tuple[EventRule, ...]:
        """Event rules an event of ``kind`` starts."""
        return self._by_event.get(kind, ())

    def listening_to(self, kind: str) -> tuple[Rule, ...]:
        """Every rule that mentions event ``kind`` (starts, ends a wait, or must come before)."""
        return self._listening.get(kind, ())

    def inhibits(self, rule_id: str) -> frozenset[str]:
        """Rules kept quiet while ``rule_id`` is open."""
        return self._inhibits.get(rule_id, frozenset())

    def inhibited_by(self, rule_id: str) -> frozenset[str]:
        """Rules whose open alert keeps ``rule_id`` quiet."""
        return self._inhibited_by.get(rule_id, frozenset())

    def route_for(self, rule_id: str, severity: Severity) -> str:
        """The route of an alert of ``rule_id`` at ``severity``: the level's, the rule's, or the
        severity's default."""
        rule = self.rule(rule_id)
        levels = getattr(rule, "levels", ())
        for level in levels:
            if level.severity == severity and level.route:
                return str(level.route)
        return rule.route or self.defaults.severity_routes[severity]

    def cooldown(self, rule_id: str) -> timedelta:
        """The rule's cool-down after resolution."""
        return self.rule(rule_id).cooldown or self.defaults.cooldown

    def hysteresis_margin(self, rule_id: str) -> float:
        """The clearing margin of a threshold rule, as a fraction of the threshold."""
        rule = self.rule(rule_id)
        own = rule.hysteresis_margin if isinstance(rule, ThresholdRule) else None
        return self.defaults.hysteresis_margin if own is None else own

    def as_data(self) -> dict[str, Any]:
        """The rule set as the plain data of a rule file (JSON-compatible; loads back the same)."""
        data: dict[str, Any] = self.model_dump(mode="json", by_alias=True, exclude_none=True)
        return data


# --- loading and checking -----------------------------------------------------------------


def load_rule_set(path: Path | None = None, catalog: Catalog | None = None) -> RuleSet:
    """The rule set in ``path`` (TOML), or the packaged default; RuleSetError lists every mistake."""
    if path is None and catalog is None:
        return _default_rule_set()
    if path is None:
        text = resources.files(__package__).joinpath(DEFAULT_RULES_FILE).read_text(encoding="utf-8")
        return parse_rule_set_text(text, DEFAULT_RULES_FILE, catalog)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RuleSetError([Problem(str(path), None, None, f"cannot read the file ({exc})")]) from None
    return parse_rule_set_text(text, str(path), catalog)


@functools.cache
def _default_rule_set() -> RuleSet:
    text = resources.files(__package__).joinpath(DEFAULT_RULES_FILE).read_text(encoding="utf-8")
    return parse_rule_set_text(text, DEFAULT_RULES_FILE)


def parse_rule_set_text(text: str, source: str = "rules", catalog: Catalog | None = None) -> RuleSet:
    """A RuleSet from the text of a TOML rule file."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RuleSetError([Problem(source, None, None, f"not valid TOML: {exc}")]) from None
    return parse_rule_set(data, source, catalog)


def parse_rule_set(data: Mapping[str, Any], source: str = "rules", catalog: Catalog | None = None) -> RuleSet:
    """A RuleSet from already-parsed rule-file data; RuleSetError lists every mistake."""
    context = {"source": source, "catalog": catalog or load_catalog()}
    try:
        return RuleSet.model_validate(data, context=context)
    except ValidationError as exc:
        raise RuleSetError(problems_of(exc, data, source)) from None


_RULE_SECTIONS = frozenset({"threshold", "event", "absence", "trend", "schedule"})
_UNION_SECTIONS = frozenset({"absence", "trend", "schedule"})


def problems_of(
    exc: ValidationError,
    data: Any,
    source: str,
    rule: str | None = None,
    prefix: str = "",
    rule_file: bool = True,
) -> list[Problem]:
    """A pydantic ValidationError of rule-set data as Problems naming rule and field.

    ``rule`` and ``prefix``: the error is of one rule's data (an override being applied).
    ``rule_file``: the data is a whole rule file (its sections name the rules); False for
    other data (a care plan), whose fields are named as they are.
    """
    problems = []
    errors = exc.errors()
    for err in errors:
        loc = list(err["loc"])
        if err["type"] == "too_short" and any(_under(other["loc"], err["loc"]) for other in errors):
            continue  # "no items left" after its items' own errors: noise
        where = rule
        if not rule_file:
            pass
        elif where is None and loc and loc[0] in _RULE_SECTIONS and len(loc) > 1 and isinstance(loc[1], int):
            section, index = str(loc[0]), loc[1]
            rule_id = _rule_field(data, section, index, "id")
            where = rule_id if isinstance(rule_id, str) else f"{section}[{index}]"
            loc = loc[2:]
            if section in _UNION_SECTIONS and loc and loc[0] == _rule_field(data, section, index, "kind"):
                loc = loc[1:]  # the discriminator's tag, e.g. 'no_activity'
        elif where is None and loc and loc[0] == "news2":
            news2 = data.get("news2") if isinstance(data, Mapping) else None
            where = str(news2.get("id", "news2")) if isinstance(news2, Mapping) else "news2"
            loc = loc[1:]
        elif where is None and loc:
            loc[0] = f"[{loc[0]}]"
        message = _message(err)
        if err["type"] in ("union_tag_not_found", "union_tag_invalid"):
            loc.append("kind")
        # A validator that knows the exact field says so: "levels[0]: severity ...".
        said = _FIELD_SAID.match(message)
        if said and (not loc or isinstance(loc[-1], int)):  # a model's validator: the model's field
            loc, message = [*loc, said["path"]], said["text"]
        elif said and loc[-1] == re.split(r"[.\[]", said["path"], maxsplit=1)[0]:  # a field's validator
            loc, message = [*loc[:-1], said["path"]], said["text"]
        field = prefix + _path(loc)
        problems.append(Problem(source, where, field or None, message))
    return problems


_FIELD_SAID = re.compile(r"(?P<path>[a-z_][a-z0-9_]*(?:\[\d+\]|\.[a-z_][a-z0-9_]*)*): (?P<text>.+)", re.S)


def _under(loc: Sequence[int | str], parent: Sequence[int | str]) -> bool:
    return len(loc) > len(parent) and tuple(loc[: len(parent)]) == tuple(parent)


def _rule_field(data: Any, section: str, index: int, field: str) -> Any:
    try:
        return data[section][index][field]
    except (KeyError, IndexError, TypeError):
        return None


def _path(loc: Sequence[int | str]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _message(err: Any) -> str:
    kind, msg, ctx = err["type"], str(err["msg"]), err.get("ctx") or {}
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required"
    if kind == "union_tag_invalid":
        return f"unknown kind {ctx.get('tag')!r}; one of {ctx.get('expected_tags')}"
    if kind == "union_tag_not_found":
        return "required: say which kind of rule this is"
    return msg.removeprefix("Value error, ")


def _cross_check(rule_set: RuleSet, source: str, catalog: Catalog) -> list[Problem]:
    """Problems between rules: duplicate ids, unknown names, inhibitions, overrides."""
    problems: list[Problem] = []

    def problem(rule: str | None, field: str | None, message: str) -> None:
        problems.append(Problem(source, rule, field, message))

    conditions = frozenset(rule_set.conditions)
    for name in sorted(conditions & PLAN_FACTS):
        problem(None, f"[conditions].{name}", "reserved name (a care-plan flag, not a condition)")
    facts = conditions | PLAN_FACTS
    for severity, route in rule_set.defaults.severity_routes.items():
        if route not in rule_set.routes:
            problem(None, f"[defaults].severity_routes.{severity.value}", f"unknown route {route!r}")

    seen: set[str] = set()
    by_id: dict[str, Rule] = {}
    for rule in rule_set.rules:
        if rule.id in seen:
            problem(rule.id, "id", "duplicate rule id")
        seen.add(rule.id)
        by_id.setdefault(rule.id, rule)
        for route in rule.routes:
            if route not in rule_set.routes:
                problem(rule.id, "route", f"unknown route {route!r} (not in [routes])")
        for name in sorted(rule.requires - facts):
            problem(rule.id, "requires", f"unknown condition {name!r} (not in [conditions])")
        for field in ("conditions", "spo2_scale_2_for"):
            for name in sorted(getattr(rule, field, frozenset()) - conditions):
                problem(rule.id, field, f"unknown condition {name!r} (not in [conditions])")

    for rule in rule_set.thresholds:
        _check_inhibits(rule, by_id, problem)
        for condition, override in rule.condition_overrides.items():
            if condition not in conditions:
                problem(
                    rule.id, f"condition_overrides.{condition}", "unknown condition (not in [conditions])"
                )
            problems += override_problems(
                rule, override, source, f"condition_overrides.{condition}.", catalog
            )
    for rule in rule_set.schedules:
        if isinstance(rule, PeriodicFollowUpRule):
            for target in sorted(rule.pulled_forward_by):
                if not isinstance(by_id.get(target), MeanTrendRule | RiseTrendRule):
                    problem(rule.id, "pulled_forward_by", f"{target!r} is not a trend rule of this set")
    return problems


def _check_inhibits(rule: ThresholdRule, by_id: Mapping[str, Rule], problem: Any) -> None:
    for target_id in sorted(rule.inhibits):
        target = by_id.get(target_id)
        if target is None:
            problem(rule.id, "inhibits", f"no rule {target_id!r}")
        elif not isinstance(target, ThresholdRule):
            problem(rule.id, "inhibits", f"{target_id!r} is not a threshold rule")
        elif target_id == rule.id:
            problem(rule.id, "inhibits", "a rule cannot inhibit itself")
        elif not target.metrics <= rule.metrics:
            problem(
                rule.id,
                "inhibits",
                f"{target_id!r} reads {sorted(target.metrics - rule.metrics)}, which this rule does not"
                " (inhibition is between rules on the same metric)",
            )
        elif not target.severity < rule.severity:
            problem(
                rule.id,
                "inhibits",
                f"{target_id!r} ({target.severity.value}) is not of lower severity than this rule"
                f" ({rule.severity.value})",
            )


def apply_overrides(rule: Rule, *overrides: Mapping[str, Any], catalog: Catalog | None = None) -> Rule:
    """``rule`` with the fields of each override replaced in turn (validated again)."""
    data = rule.model_dump(mode="json", by_alias=True, exclude_none=True)
    for override in overrides:
        data.update(override)
    data.pop("condition_overrides", None)
    context = {"catalog": catalog or load_catalog()}
    return type(rule).model_validate(data, context=context)


def override_problems(
    rule: Rule, override: Mapping[str, Any], source: str, prefix: str, catalog: Catalog
) -> list[Problem]:
    """What is wrong with replacing fields of ``rule`` by ``override`` (empty: nothing)."""
    if not isinstance(override, Mapping):
        return [Problem(source, rule.id, prefix.rstrip("."), "must be a table of field = value")]
    fixed = FIXED_FIELDS | {"condition_overrides"}
    problems = [
        Problem(source, rule.id, prefix + name, "cannot be overridden")
        for name in sorted(set(override) & fixed)
    ]
    override = {k: v for k, v in override.items() if k not in fixed}
    try:
        apply_overrides(rule, override, catalog=catalog)
    except ValidationError as exc:
        problems += [
            Problem(p.source, p.rule, override_field(p.field, override, prefix), p.message)
            for p in problems_of(exc, {}, source, rule=rule.id)
        ]
    return problems


def override_field(field: str | None, override: Mapping[str, Any], prefix: str) -> str | None:
    """An error's field, named under ``prefix`` (``overrides.spo2_low.``) when ``override`` set it."""
    if field is None:
        return prefix.rstrip(".")
    head = re.split(r"[.\[]", field, maxsplit=1)[0]
    return prefix + field if head in override else field

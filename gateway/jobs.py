"""The scheduled rules as jobs: absence, trends and follow-ups, plus recording a check-up.

The maintenance role runs these on APScheduler (``gateway/runner.py``); each run is a pure
function of the store and an injected ``now``. A run goes through the elders in chunks of
``chunk_size`` (keyset order), one transaction per chunk:

1. ``pg_try_advisory_xact_lock`` on the job's key. If another instance holds it, that
   instance is running the job at this moment and this run stops: the other one started at
   the first chunk and covers them all (at most the chunk between the two is judged twice,
   which changes nothing: see 5).
2. The chunk's care plans (``ElderRules``, cached per plan), active alerts and resolutions,
   and the facts the rules ask for, one query per rule kind (``gateway/store/scans.py``).
3. The pure decisions (``alerts/absence.py``, ``alerts/trends.py``, ``alerts/followups.py``).
4. For the elders with something to write: their alert locks (``lock_elders``, as the ingest
   path and the timers take them), their alerts read again, the decisions made again on the
   same facts, and written (``persist_scheduled``, actor ``rules:schedule``).
5. Idempotent: decisions only say what is new (``alerts/scheduled.py``), so running a job
   twice, or on two instances, gives the same alerts.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Generic, TypeVar
from uuid import UUID, uuid4

import psycopg

from eldercare.alerts import absence as absence_rules
from eldercare.alerts import followups as follow_up_rules
from eldercare.alerts import trends as trend_rules
from eldercare.alerts.decisions import OpenAlert, Suppressed
from eldercare.alerts.followups import ScheduledDecision
from eldercare.alerts.lifecycle import ElderAlerts
from eldercare.alerts.rules import CheckupResultsRule, PeriodicFollowUpRule, RuleSet
from eldercare.alerts.scheduled import Elder
from eldercare.gateway.store import alerts as store
from eldercare.gateway.store import scans, timers
from eldercare.gateway.store.elder_rules import ElderRules, PlannedRules
from eldercare.gateway.store.flavour import Flavour
from eldercare.gateway.store.scheduled import insert_checkup, link_checkup, persist_scheduled

#: Elders per transaction of a job run.
CHUNK_SIZE = 1000
#: How far back resolutions are read: a resolved episode stays quiet at most this long.
RESOLVED_LOOKBACK = timedelta(days=30)
#: Finished timers are kept this long (``timers_cleanup``).
TIMERS_KEEP = timedelta(days=7)

log = logging.getLogger(__name__)

F = TypeVar("F")
NewId = Callable[[], UUID]


@dataclass(slots=True)
class JobReport:
    """What one run of a job did."""

    job: str
    #: Another instance held the job's lock: this run stopped (after ``chunks`` chunks).
    skipped: bool = False
    chunks: int = 0
    #: Elders with a rule of the job, and elders whose alerts or tasks changed.
    judged: int = 0
    changed: int = 0
    counts: Counter[str] = field(default_factory=Counter)
    opened: list[tuple[UUID, str, str]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class _Job(Generic[F]):
    name: str
    #: Does an elder with these rules take part?
    wanted: Callable[[RuleSet], bool]
    #: The facts of a chunk's elders (every elder of ``contexts`` has an entry).
    read: Callable[[psycopg.Cursor[Any], Mapping[str, Elder], datetime], Mapping[str, F]]
    decide: Callable[[Elder, F, datetime, NewId], list[ScheduledDecision]]


class ScheduledRules:
    """The scheduled rule jobs on one rule set (see the module docstring)."""

    def __init__(
        self,
        rule_set: RuleSet,
        flavour: Flavour = "plain",
        chunk_size: int = CHUNK_SIZE,
        new_id: NewId = uuid4,
    ) -> None:
        self.rule_set = rule_set
        self.flavour: Flavour = flavour
        self.chunk_size = chunk_size
        self.new_id = new_id
        self.plans = ElderRules(rule_set)

    # ---- the jobs ------------------------------------------------------------------------

    def absence(self, conn: psycopg.Connection[Any], now: datetime) -> JobReport:
        """Inactivity, device offline, low battery, wearable removed: raise, add, clear."""
        job: _Job[absence_rules.AbsenceFacts] = _Job(
            "absence", lambda rules: bool(rules.absences), _absence_facts, _decide_absence
        )
        return self._run(conn, job, now)

    def trends(self, conn: psycopg.Connection[Any], now: datetime) -> JobReport:
        """7-day means and weight rises from the rollups: raise, clear."""
        job: _Job[trend_rules.TrendFacts] = _Job(
            "trends", lambda rules: bool(rules.trends), self._trend_facts, _decide_trends
        )
        return self._run(conn, job, now)

    def followups(self, conn: psycopg.Connection[Any], now: datetime) -> JobReport:
        """Chronic follow-ups created, pulled forward; overdue tasks escalated."""
        job: _Job[dict[str, follow_up_rules.FollowUpFacts]] = _Job(
            "follow_ups", lambda rules: bool(_periodic(rules)), _follow_up_facts, _decide_follow_ups
        )
        report = self._run(conn, job, now)
        if not report.skipped:
            self._escalate_overdue(conn, now, report)
        return report

    # ---- running one ---------------------------------------------------------------------

    def _run(self, conn: psycopg.Connection[Any], job: _Job[F], now: datetime) -> JobReport:
        report = JobReport(job.name)
        after = ""
        while True:
            with conn.transaction(), conn.cursor() as cur:
                if not scans.try_job_lock(cur, job.name):
                    report.skipped = True
                    return report
                chunk = scans.elder_chunk(cur, after, self.chunk_size)
                if chunk:
                    report.chunks += 1
                    self._chunk(cur, job, chunk, now, report)
            if len(chunk) < self.chunk_size:
                return report
            after = chunk[-1]

    def _chunk(
        self, cur: psycopg.Cursor[Any], job: _Job[F], chunk: list[str], now: datetime, report: JobReport
    ) -> None:
        plans = self.plans.load(cur, chunk)
        ids = [e for e in chunk if e in plans and job.wanted(plans[e].rules)]
        if not ids:
            return
        report.judged += len(ids)
        contexts = self._contexts(cur, plans, ids, now)
        facts = job.read(cur, contexts, now)
        # Decided once without locks: most elders have nothing new, and are not locked.
        touched = [e for e in ids if _writes(job.decide(contexts[e], facts[e], now, self.new_id))]
        if not touched:
            return
        state = store.lock_and_read(cur, touched, now - RESOLVED_LOOKBACK)  # read again, locked
        contexts = _elders(plans, touched, state.active, state.resolved)
        decisions = [d for e in touched for d in job.decide(contexts[e], facts[e], now, self.new_id)]
        self._persist(cur, decisions, now, report)
        report.changed += len(touched)

    def _contexts(
        self, cur: psycopg.Cursor[Any], plans: Mapping[str, PlannedRules], ids: Collection[str], now: datetime
    ) -> dict[str, Elder]:
        active = store.active_alerts(cur, ids)
        return _elders(plans, ids, active, store.recently_resolved(cur, ids, now - RESOLVED_LOOKBACK))

    def _persist(
        self, cur: psycopg.Cursor[Any], decisions: list[ScheduledDecision], now: datetime, report: JobReport
    ) -> None:
        counts, opened = persist_scheduled(cur, decisions, now)
        report.counts.update(counts)
        report.opened.extend(opened)

    def _trend_facts(
        self, cur: psycopg.Cursor[Any], contexts: Mapping[str, Elder], now: datetime
    ) -> dict[str, trend_rules.TrendFacts]:
        means: dict[str, dict[str, Mapping[str, trend_rules.Mean]]] = defaultdict(dict)
        for mq in trend_rules.mean_queries(contexts.values(), now):
            for elder_id, by_metric in scans.means(cur, self.flavour, mq).items():
                means[elder_id][mq.rule_id] = by_metric
        days: dict[str, dict[str, list[trend_rules.DayMean]]] = defaultdict(dict)
        for rq in trend_rules.rise_queries(contexts.values(), now):
            for elder_id, daily in scans.daily_means(cur, self.flavour, rq).items():
                days[elder_id][rq.rule_id] = daily
        return {e: trend_rules.TrendFacts(means.get(e, {}), days.get(e, {})) for e in contexts}

    def _escalate_overdue(self, conn: psycopg.Connection[Any], now: datetime, report: JobReport) -> None:
        """Open tasks past due whose rule has an overdue route: escalated, once, by task id."""
        routes = follow_up_rules.overdue_routes(self.rule_set)
        after = 0
        while True:
            with conn.transaction(), conn.cursor() as cur:
                if not scans.try_job_lock(cur, "follow_ups"):
                    report.skipped = True
                    return
                due = scans.overdue_tasks(cur, routes, now, after, self.chunk_size)
                elder_ids = sorted({t.elder_id for t in due})
                if elder_ids:
                    plans = self.plans.load(cur, elder_ids)
                    store.lock_elders(cur, elder_ids)
                    decisions: list[ScheduledDecision] = []
                    for task in due:
                        rules = plans[task.elder_id].rules if task.elder_id in plans else self.rule_set
                        decisions += follow_up_rules.escalate_overdue(rules, task, now)
                    self._persist(cur, decisions, now, report)
            if len(due) < self.chunk_size:
                return
            after = due[-1].id


def _writes(decisions: list[ScheduledDecision]) -> bool:
    return any(not isinstance(d, Suppressed) for d in decisions)


def _periodic(rules: RuleSet) -> list[PeriodicFollowUpRule]:
    return [r for r in rules.schedules if isinstance(r, PeriodicFollowUpRule)]


# ---- absence -------------------------------------------------------------------------------


def _absence_facts(
    cur: psycopg.Cursor[Any], contexts: Mapping[str, Elder], now: datetime
) -> dict[str, absence_rules.AbsenceFacts]:
    devices = scans.devices_of(cur, list(contexts))
    asked = [lookup for ctx in contexts.values() for lookup in absence_rules.lookups(ctx, now)]
    reading_asks = [x for x in asked if isinstance(x, absence_rules.ReadingLookup)]
    event_asks = [x for x in asked if isinstance(x, absence_rules.EventLookup)]
    readings: dict[str, dict[str, absence_rules.Reading]] = defaultdict(dict)
    for (elder_id, rule_id), reading in scans.latest_readings(cur, reading_asks, now).items():
        readings[elder_id][rule_id] = reading
    # The rare elder without activity in a week: do the sensors report at all?
    unmoved = [x for x in reading_asks if x.rule_id not in readings.get(x.elder_id, {})]
    sensed: dict[str, dict[str, absence_rules.Reading]] = defaultdict(dict)
    for (elder_id, rule_id), reading in scans.latest_readings(cur, unmoved, now, any_value=True).items():
        sensed[elder_id][rule_id] = reading
    events: dict[str, dict[str, list[absence_rules.DeviceEvent]]] = defaultdict(dict)
    for (elder_id, rule_id), found in scans.latest_events(cur, event_asks, now).items():
        events[elder_id][rule_id] = found
    return {
        e: absence_rules.AbsenceFacts(
            devices.get(e, []), readings.get(e, {}), sensed.get(e, {}), events.get(e, {})
        )
        for e in contexts
    }


def _decide_absence(
    ctx: Elder, facts: absence_rules.AbsenceFacts, now: datetime, new_id: NewId
) -> list[ScheduledDecision]:
    return list(absence_rules.decide(ctx, facts, now, new_id))


def _decide_trends(
    ctx: Elder, facts: trend_rules.TrendFacts, now: datetime, new_id: NewId
) -> list[ScheduledDecision]:
    return list(trend_rules.decide(ctx, facts, now, new_id))


# ---- follow-ups ----------------------------------------------------------------------------


def _follow_up_facts(
    cur: psycopg.Cursor[Any], contexts: Mapping[str, Elder], now: datetime
) -> dict[str, dict[str, follow_up_rules.FollowUpFacts]]:
    wanted: dict[tuple[str, str, frozenset[str]], list[str]] = defaultdict(list)
    for ctx in contexts.values():
        for rule in _periodic(ctx.rules):
            wanted[(rule.id, rule.task.kind, frozenset(rule.pulled_forward_by))].append(ctx.elder_id)
    out: dict[str, dict[str, follow_up_rules.FollowUpFacts]] = {e: {} for e in contexts}
    for (rule_id, kind, pulled_by), elder_ids in wanted.items():
        for elder_id, facts in scans.follow_up_facts(cur, elder_ids, kind, pulled_by).items():
            out[elder_id][rule_id] = facts
    return out


def _decide_follow_ups(
    ctx: Elder, facts: Mapping[str, follow_up_rules.FollowUpFacts], now: datetime, new_id: NewId
) -> list[ScheduledDecision]:
    out: list[ScheduledDecision] = []
    for rule in _periodic(ctx.rules):
        out += follow_up_rules.periodic(
            ctx, rule, facts.get(rule.id, follow_up_rules.FollowUpFacts()), now, new_id
        )
    return out


# ---- check-ups -----------------------------------------------------------------------------


class UnknownElder(LookupError):
    """No elder with that id."""


@dataclass(frozen=True, slots=True)
class CheckupRecorded:
    """What recording a check-up did."""

    #: None: that check-up (elder, time) was recorded already; nothing else happened.
    checkup_id: int | None
    #: The follow-up alert and its task's due time; None when the elder's rules have no
    #: check-up rule, or a newer check-up's alert is active (``covered_by``).
    alert_id: UUID | None = None
    task_due: datetime | None = None
    #: The previous check-up's alert, closed by this one.
    replaced: UUID | None = None
    #: The active alert of a newer check-up, whose task covers this older one.
    covered_by: UUID | None = None


def record_checkup(
    conn: psycopg.Connection[Any],
    rule_set: RuleSet,
    elder_id: str,
    at: datetime,
    recorded_by: str,
    now: datetime,
    new_id: NewId = uuid4,
) -> CheckupRecorded:
    """Record a health check-up of the elder at ``at``: the check-up row, and its follow-up
    (the task "inform the elder of the results and advice", due 30 days after ``at``), in one
    transaction. UnknownElder if the elder is not registered."""
    with conn.transaction(), conn.cursor() as cur:
        cur.execute("SELECT 1 FROM elders WHERE elder_id = %s", (elder_id,))
        if cur.fetchone() is None:
            raise UnknownElder(elder_id)
        checkup_id = insert_checkup(cur, elder_id, at, recorded_by, now)
        if checkup_id is None:
            return CheckupRecorded(None)
        store.lock_elders(cur, [elder_id])
        cached = ElderRules(rule_set).load(cur, [elder_id])[elder_id]
        rule = next((r for r in cached.rules.schedules if isinstance(r, CheckupResultsRule)), None)
        if rule is None:
            return CheckupRecorded(checkup_id)
        active = store.active_alerts(cur, [elder_id]).get(elder_id, {})
        ctx = Elder(elder_id, cached.rules, cached.plan, ElderAlerts(dict(active)))
        decisions = follow_up_rules.checkup_recorded(ctx, rule, at, now, new_id)
        persist_scheduled(cur, decisions, now, actor="rules:checkup")
        opened = next((d for d in decisions if isinstance(d, OpenAlert)), None)
        if opened is None:
            newer = active.get(rule.id)
            return CheckupRecorded(checkup_id, covered_by=None if newer is None else newer.id)
        link_checkup(cur, checkup_id, opened.alert_id)
        replaced = next((d.alert_id for d in decisions if isinstance(d, follow_up_rules.AutoClose)), None)
        due = opened.task.due_at if opened.task else None
        return CheckupRecorded(checkup_id, opened.alert_id, due, replaced)


# ---- housekeeping --------------------------------------------------------------------------


def timers_cleanup(conn: psycopg.Connection[Any], now: datetime, keep: timedelta = TIMERS_KEEP) -> int:
    """Delete timers fired or cancelled more than ``keep`` ago; how many."""
    with conn.transaction(), conn.cursor() as cur:
        return timers.delete_finished(cur, now - keep)


def _elders(
    plans: Mapping[str, PlannedRules],
    ids: Collection[str],
    active: Mapping[str, Mapping[str, Any]],
    resolved: Mapping[str, Mapping[str, Any]],
) -> dict[str, Elder]:
    """The elders as the scheduled rules see them, from their plans and alerts as read."""
    return {
        e: Elder(
            e,
            plans[e].rules,
            plans[e].plan,
            ElderAlerts(dict(active.get(e, {})), dict(resolved.get(e, {}))),
        )
        for e in ids
    }

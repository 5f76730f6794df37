"""The rules, wired into ingestion: the batch step the writer calls, and the timers' handler.

The writer knows nothing of rules: it calls a ``BatchStep`` in each batch's transaction,
after the batch's readings and events are written. ``AlertingStep`` is that step: it reads
what the engine needs (care plans, active alerts; on the rare path, under the elders' locks,
windows and earlier events), runs the pure engine (``alerts/engine.py``) and persists its
decisions (``gateway/store/alerts.py``), all in that transaction: alerts and outbox rows
commit with the readings that raised them, or not at all.

``RuleTimers`` handles the durable timers of waiting windows (a fall without recovery in
60 s) when a ``TimerRunner`` fires them, in the same way.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import psycopg

from eldercare.alerts import engine
from eldercare.alerts.careplan import CarePlan, CarePlanError, effective_rules, parse_care_plan
from eldercare.alerts.decisions import timer_kind
from eldercare.alerts.engine import ElderContext
from eldercare.alerts.lifecycle import ElderAlerts
from eldercare.alerts.rules import EventRule, RuleSet, load_rule_set
from eldercare.alerts.timers import TimerRunner
from eldercare.gateway.ingest import metrics
from eldercare.gateway.settings import Settings
from eldercare.gateway.store import alerts as store
from eldercare.gateway.store.timers import Timer
from eldercare.gateway.store.writer import BatchStep, StoredBatch

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Cached:
    updated_at: datetime | None
    plan: CarePlan
    rules: RuleSet
    quiet: engine.QuietBands
    #: The elder's context for the scan while they have no active alert (the scan only reads
    #: it), kept instead of built for every batch.
    idle: ElderContext | None = None


@dataclass(slots=True)
class ElderRules:
    """Each elder's effective rules: the rule set adjusted by their care plan.

    ``effective_rules`` costs about a millisecond, so results are kept per plan (many elders
    share one) and per elder until their plan's ``updated_at`` changes, which one query per
    batch checks. An elder without a plan gets the rule set's defaults.
    """

    rule_set: RuleSet
    _by_plan: dict[CarePlan, tuple[RuleSet, engine.QuietBands]] = field(default_factory=dict)
    _by_elder: dict[str, _Cached] = field(default_factory=dict)
    _warned: set[str] = field(default_factory=set)

    def for_plan(self, plan: CarePlan, elder_id: str = "") -> tuple[RuleSet, engine.QuietBands]:
        """The rules for a plan and their quiet bands (cached); the plain rule set if the plan
        does not fit it."""
        known = self._by_plan.get(plan)
        if known is None:
            try:
                rules = effective_rules(self.rule_set, plan, source=f"care plan of {elder_id}")
            except CarePlanError as exc:
                if elder_id not in self._warned:
                    self._warned.add(elder_id)
                    log.warning(
                        "care plan does not fit the rule set; default rules apply",
                        extra={"elder_id": elder_id, "problems": [str(p) for p in exc.problems]},
                    )
                rules = effective_rules(self.rule_set, CarePlan(timezone=plan.timezone))
            known = self._by_plan[plan] = (rules, engine.quiet_bands(rules, plan))
        return known

    def load(
        self, cur: psycopg.Cursor[Any], elder_ids: Collection[str], stamps: Mapping[str, datetime]
    ) -> dict[str, _Cached]:
        """The elders' plans and rules, reading a plan again only when its stamp (when it was
        last set, from ``store.elders_at_a_glance``) changed."""
        known = self._by_elder
        changed = [e for e, at in stamps.items() if e not in known or known[e].updated_at != at]
        if changed:
            cur.execute(
                "SELECT elder_id, plan, updated_at FROM care_plans WHERE elder_id = ANY(%s)", (changed,)
            )
            for elder_id, data, updated_at in cur.fetchall():
                plan = self._parse(elder_id, data)
                self._by_elder[elder_id] = _Cached(updated_at, plan, *self.for_plan(plan, elder_id))
        out = {}
        for elder_id in elder_ids:
            cached = self._by_elder.get(elder_id)
            if elder_id not in stamps and (cached is None or cached.updated_at is not None):
                plan = CarePlan()  # no plan (or no longer one): the defaults
                cached = self._by_elder[elder_id] = _Cached(None, plan, *self.for_plan(plan))
            if cached is not None:
                out[elder_id] = cached
        return out

    def _parse(self, elder_id: str, data: Any) -> CarePlan:
        try:
            return parse_care_plan(data if isinstance(data, dict) else orjson.loads(data))
        except CarePlanError as exc:
            log.warning(
                "stored care plan does not validate; defaults apply",
                extra={"elder_id": elder_id, "problems": [str(p) for p in exc.problems]},
            )
            return CarePlan()


def _longest_cooldown(rule_set: RuleSet) -> timedelta:
    return max((rule_set.cooldown(r.id) for r in rule_set.rules), default=timedelta(0))


def _contexts(
    cached: Mapping[str, _Cached],
    active: Mapping[str, Mapping[str, Any]],
    resolved: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, ElderContext]:
    """Contexts to decide with: the elders' alerts as just read (their own, mutable state)."""
    return {
        elder_id: ElderContext(
            elder_id,
            c.rules,
            c.plan,
            ElderAlerts(dict(active.get(elder_id, {})), dict((resolved or {}).get(elder_id, {}))),
            c.quiet,
        )
        for elder_id, c in cached.items()
    }


def _scan_contexts(
    cached: Mapping[str, _Cached], active: Mapping[str, Mapping[str, Any]]
) -> dict[str, ElderContext]:
    """Contexts to scan with: those of elders without an active alert are reused batch to batch."""
    out = {}
    for elder_id, c in cached.items():
        alerts = active.get(elder_id)
        if alerts:
            out[elder_id] = ElderContext(elder_id, c.rules, c.plan, ElderAlerts(dict(alerts)), c.quiet)
            continue
        if c.idle is None:
            c.idle = ElderContext(elder_id, c.rules, c.plan, ElderAlerts(), c.quiet)
        out[elder_id] = c.idle
    return out


class AlertingStep:
    """The rules in each batch's transaction (a ``BatchStep``; see the module docstring)."""

    #: Elders are locked while decided: batches may be written two at a time.
    concurrent_batches = True

    def __init__(self, rule_set: RuleSet, clock: Callable[[], float] = time.time) -> None:
        self.elders = ElderRules(rule_set)
        self.clock = clock
        self._cooldown = _longest_cooldown(rule_set)

    def __call__(self, cur: psycopg.Cursor[Any], stored: StoredBatch) -> dict[str, int] | None:
        elder_ids = {r.elder_id for r in stored.readings if r.elder_id}
        elder_ids.update(e.elder_id for e in stored.events if e.elder_id)
        if not elder_ids:
            return None
        stamps, alerted = store.elders_at_a_glance(cur, elder_ids)
        cached = self.elders.load(cur, elder_ids, stamps)
        contexts = _scan_contexts(cached, store.active_alerts(cur, alerted) if alerted else {})
        found = engine.scan(stored.readings, stored.events, contexts)
        if not found:
            return None
        # The rare path: something may raise, upgrade or clear. Decide under the elders' locks.
        now = datetime.fromtimestamp(self.clock(), UTC)
        involved = set(found.elders)
        store.lock_elders(cur, involved)
        contexts = _contexts(
            {e: cached[e] for e in involved},
            store.active_alerts(cur, involved),
            store.recently_resolved(cur, involved, now - self._cooldown),
        )
        series, events = found.lookups()
        history = store.load_history(cur, series, events)
        done = store.persist(cur, engine.decide(found, contexts, history, now), now)
        _log(done)
        return done.counts()


class RuleTimers:
    """Handles the timers of the rules' waiting windows (``TimerRunner`` handlers)."""

    def __init__(self, rule_set: RuleSet) -> None:
        self.elders = ElderRules(rule_set)
        self._cooldown = _longest_cooldown(rule_set)
        self.kinds = tuple(timer_kind(r.id) for r in rule_set.events if isinstance(r, EventRule) and r.unless)

    def handlers(self) -> dict[str, Callable[[psycopg.Cursor[Any], Timer, datetime], None]]:
        """Handler per timer kind, for a ``TimerRunner``."""
        return dict.fromkeys(self.kinds, self.fire)

    def fire(self, cur: psycopg.Cursor[Any], timer: Timer, now: datetime) -> None:
        """The waiting window ran out: decide and persist in the timer's transaction."""
        elder_id = str(timer.payload["elder_id"])
        store.lock_elders(cur, [elder_id])
        stamps, _ = store.elders_at_a_glance(cur, [elder_id])
        cached = self.elders.load(cur, [elder_id], stamps)
        active = store.active_alerts(cur, [elder_id])
        resolved = store.recently_resolved(cur, [elder_id], now - self._cooldown)
        contexts = _contexts(cached, active, resolved)
        ctx = contexts.get(elder_id)
        if ctx is not None:
            done = store.persist(cur, engine.on_timer(ctx, timer.payload, now), now, actor="rules:timer")
            _log(done)
            for decision, n in done.counts().items():
                metrics.DECISIONS.labels(decision).inc(n)


def _log(done: store.Persisted) -> None:
    """A log line per alert raised or upgraded (alerts are rare; readings never log)."""
    for alert_id, rule, severity in done.opened:
        log.info("alert raised", extra={"alert_id": str(alert_id), "rule": rule, "severity": severity})


def start_rule_timers(settings: Settings) -> TimerRunner | None:
    """Fire the rules' waiting windows (a fall without recovery in 60 s) in this process.

    Every ingest worker runs one, standing-by ones too: whichever is alive claims a due
    timer. None when the rules are not the default engine.
    """
    if settings.rules != "default":
        return None
    timers = RuleTimers(load_rule_set(settings.rules_file))
    return TimerRunner(settings.database_url, timers.handlers(), name="rules").start()


def batch_step(settings: Settings) -> BatchStep | None:
    """The step the writer runs in each batch's transaction, as ``ELDERCARE_RULES`` says.

    ``default``: the rules engine with ``ELDERCARE_RULES_FILE`` (or the packaged rule set);
    ``off``: none (storage only); ``module:factory``: a factory called with the settings,
    returning a ``BatchStep`` (tests, extensions).
    """
    spec = settings.rules
    if spec == "off":
        return None
    if spec == "default":
        return AlertingStep(load_rule_set(settings.rules_file))
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"ELDERCARE_RULES is default, off or module:factory, got {spec!r}")
    step = getattr(importlib.import_module(module_name), attribute)(settings)
    if not callable(step):
        raise TypeError(f"{spec} did not make a batch step (not callable)")
    return step

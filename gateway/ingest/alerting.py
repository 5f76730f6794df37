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
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from eldercare.alerts import engine, news2_marks
from eldercare.alerts.decisions import timer_kind
from eldercare.alerts.engine import ElderContext
from eldercare.alerts.lifecycle import ElderAlerts
from eldercare.alerts.rules import EventRule, RuleSet, load_rule_set
from eldercare.alerts.timers import TimerRunner
from eldercare.gateway.ingest import metrics
from eldercare.gateway.settings import Settings
from eldercare.gateway.store import alerts as store
from eldercare.gateway.store.elder_rules import ElderRules, PlannedRules
from eldercare.gateway.store.timers import Timer
from eldercare.gateway.store.writer import BatchStep, StoredBatch

log = logging.getLogger(__name__)


def _longest_cooldown(rule_set: RuleSet) -> timedelta:
    return max((rule_set.cooldown(r.id) for r in rule_set.rules), default=timedelta(0))


def _contexts(
    cached: Mapping[str, PlannedRules],
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
    cached: Mapping[str, PlannedRules], active: Mapping[str, Mapping[str, Any]]
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
        #: Whether any elder's rules may have NEWS2 (a care plan may tune it, not add it).
        self._news2 = rule_set.news2 is not None

    def read_ahead(
        self, cur: psycopg.Cursor[Any], elder_ids: Collection[str]
    ) -> Callable[[], store.Glance] | None:
        """Queue the glance (plans' version, active alerts) to go with the batch's first statement."""
        if not elder_ids:
            return None
        store.ask_glance(cur, elder_ids)
        return lambda: store.glance_from(cur)

    def __call__(self, cur: psycopg.Cursor[Any], stored: StoredBatch) -> dict[str, int] | None:
        elder_ids = {r.elder_id for r in stored.readings if r.elder_id}
        elder_ids.update(e.elder_id for e in stored.events if e.elder_id)
        if not elder_ids:
            return None
        if stored.ahead is not None:  # sent with the batch's first statement
            version, alerted = stored.ahead()
        else:
            version, alerted = store.elders_at_a_glance(cur, elder_ids)
        cached = self.elders.load(cur, elder_ids, self.elders.stamps_at(cur, version))
        marks = None
        if self._news2:  # a NEWS2 reading that cannot reach a threshold needs no look-up
            marks = store.mark_news2(cur, news2_marks.marks_of(stored.readings))
        found = engine.scan(stored.readings, stored.events, _scan_contexts(cached, alerted), marks)
        if not found:
            return None
        # The rare path: something may raise, upgrade or clear. Decide under the elders' locks,
        # on their state read again under them (one round trip for the locks and every read).
        now = datetime.fromtimestamp(self.clock(), UTC)
        involved = set(found.elders)
        series, events = found.lookups()
        state = store.lock_and_read(cur, involved, now - self._cooldown, series, events)
        contexts = _contexts({e: cached[e] for e in involved}, state.active, state.resolved)
        done = store.persist(cur, engine.decide(found, contexts, state.history, now), now)
        _log(done)
        return done.counts()


class RuleTimers:
    """Handles the timers of the rules' waiting windows (``TimerRunner`` handlers)."""

    def __init__(self, rule_set: RuleSet) -> None:
        self.elders = ElderRules(rule_set)
        self._cooldown = _longest_cooldown(rule_set)
        #: Whether any elder's rules may have NEWS2 (a care plan may tune it, not add it).
        self._news2 = rule_set.news2 is not None
        self.kinds = tuple(timer_kind(r.id) for r in rule_set.events if isinstance(r, EventRule) and r.unless)

    def handlers(self) -> dict[str, Callable[[psycopg.Cursor[Any], Timer, datetime], None]]:
        """Handler per timer kind, for a ``TimerRunner``."""
        return dict.fromkeys(self.kinds, self.fire)

    def fire(self, cur: psycopg.Cursor[Any], timer: Timer, now: datetime) -> None:
        """The waiting window ran out: decide and persist in the timer's transaction."""
        elder_id = str(timer.payload["elder_id"])
        state = store.lock_and_read(cur, [elder_id], now - self._cooldown)
        cached = self.elders.load(cur, [elder_id])
        contexts = _contexts(cached, state.active, state.resolved)
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

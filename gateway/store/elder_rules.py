"""Each elder's effective rules (the rule set adjusted by their stored care plan), cached.

The ingest batch step, the timers and the scheduled jobs all need, for many elders at a
time, the rules in force and (for the scan) their quiet bands. ``effective_rules`` costs about
a millisecond, so results are kept per plan (many elders share one) and per elder until their
plan's ``updated_at`` changes.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson
import psycopg

from eldercare.alerts import engine
from eldercare.alerts.careplan import CarePlan, CarePlanError, effective_rules, parse_care_plan
from eldercare.alerts.engine import ElderContext
from eldercare.alerts.rules import RuleSet

log = logging.getLogger(__name__)


def plan_stamps(cur: psycopg.Cursor[Any], elder_ids: Collection[str]) -> dict[str, datetime]:
    """When each elder's care plan was last set (elders with a plan only)."""
    cur.execute("SELECT elder_id, updated_at FROM care_plans WHERE elder_id = ANY(%s)", (list(elder_ids),))
    return dict(cur.fetchall())


@dataclass(slots=True)
class PlannedRules:
    """An elder's care plan (the defaults without one), its rules and quiet bands, and when it was set."""

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
    _by_elder: dict[str, PlannedRules] = field(default_factory=dict)
    _warned: set[str] = field(default_factory=set)
    #: Every plan's stamp as of ``_version`` of ``care_plan_version`` (``stamps_at``).
    _stamps: Mapping[str, datetime] = field(default_factory=dict)
    _version: int | None = None

    def stamps_at(self, cur: psycopg.Cursor[Any], version: int) -> Mapping[str, datetime]:
        """Every elder's plan stamp, read again only when the plans' version moved.

        Batches written at once may each find it moved and read the stamps: the last to
        finish wins, and each is at least as new as the version it saw.
        """
        if version != self._version:
            cur.execute("SELECT elder_id, updated_at FROM care_plans")
            self._stamps, self._version = dict(cur.fetchall()), version
        return self._stamps

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
        self,
        cur: psycopg.Cursor[Any],
        elder_ids: Collection[str],
        stamps: Mapping[str, datetime] | None = None,
    ) -> dict[str, PlannedRules]:
        """The elders' plans and rules, reading a plan again only when its stamp (when it was
        last set: ``plan_stamps``, or ``stamps_at`` on the ingest path; elders without one
        are absent) changed."""
        if stamps is None:
            stamps = plan_stamps(cur, elder_ids)
        known = self._by_elder
        changed = [
            e for e in elder_ids if e in stamps and (e not in known or known[e].updated_at != stamps[e])
        ]
        if changed:
            cur.execute(
                "SELECT elder_id, plan, updated_at FROM care_plans WHERE elder_id = ANY(%s)", (changed,)
            )
            for elder_id, data, updated_at in cur.fetchall():
                plan = self._parse(elder_id, data)
                self._by_elder[elder_id] = PlannedRules(updated_at, plan, *self.for_plan(plan, elder_id))
        out = {}
        for elder_id in elder_ids:
            cached = self._by_elder.get(elder_id)
            if elder_id not in stamps and (cached is None or cached.updated_at is not None):
                plan = CarePlan()  # no plan (or no longer one): the defaults
                cached = self._by_elder[elder_id] = PlannedRules(None, plan, *self.for_plan(plan))
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

"""The ingest path's care-plan cache: one version row per batch, the stamps read again only
when it moved, so a plan set (or removed) while the worker runs applies to the next batch."""

from __future__ import annotations

import psycopg

from eldercare.alerts.careplan import CarePlan
from eldercare.alerts.rules import load_rule_set
from eldercare.gateway.store import alerts as store
from eldercare.gateway.store.elder_rules import ElderRules
from eldercare.gateway.store.elders import add_elder, set_care_plan


def _batch(conn: psycopg.Connection, rules: ElderRules, elder_ids: list[str]) -> dict[str, CarePlan]:
    """What the batch step does for its elders, in a transaction of its own."""
    with conn.transaction(), conn.cursor() as cur:
        version, _ = store.elders_at_a_glance(cur, elder_ids)
        return {e: c.plan for e, c in rules.load(cur, elder_ids, rules.stamps_at(cur, version)).items()}


def test_a_plan_set_or_removed_applies_to_the_next_batch(plain_db: str) -> None:
    rules = ElderRules(load_rule_set())
    copd = CarePlan(conditions=frozenset({"copd"}))
    with psycopg.connect(plain_db, autocommit=True) as conn:
        for elder in ("e-1", "e-2"):
            add_elder(conn, elder)
        assert _batch(conn, rules, ["e-1", "e-2"]) == {"e-1": CarePlan(), "e-2": CarePlan()}
        version = conn.execute("SELECT version FROM care_plan_version").fetchone()

        set_care_plan(conn, "e-1", copd, "test")
        assert conn.execute("SELECT version FROM care_plan_version").fetchone() != version
        assert _batch(conn, rules, ["e-1", "e-2"]) == {"e-1": copd, "e-2": CarePlan()}

        with conn.cursor() as cur:  # nothing changed: the stamps are not read again
            cur.execute("SELECT version FROM care_plan_version")
            (now,) = cur.fetchone() or (0,)
            assert rules.stamps_at(cur, now) is rules.stamps_at(cur, now)

        set_care_plan(conn, "e-1", CarePlan(conditions=frozenset({"copd", "hypertension"})), "test")
        assert _batch(conn, rules, ["e-1"])["e-1"].conditions == {"copd", "hypertension"}

        conn.execute("DELETE FROM care_plans WHERE elder_id = 'e-1'")
        assert _batch(conn, rules, ["e-1"]) == {"e-1": CarePlan()}

"""The elders table (pseudonymous ids only) and their care plans."""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import tuple_row
from psycopg.types.json import Jsonb

from eldercare.alerts.careplan import CarePlan, parse_care_plan

#: A pseudonymous elder id: no names, phone or id numbers (those live in elder_profiles).
ELDER_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


@dataclass(frozen=True, slots=True)
class ElderRow:
    """An elder as ``eldercare elders`` shows it: the id and the care plan, if one is set."""

    elder_id: str
    created_at: datetime
    plan: CarePlan | None
    updated_at: datetime | None
    updated_by: str | None
    devices: int


def check_elder_id(elder_id: str) -> str:
    """``elder_id`` if it is a valid pseudonymous id, else ValueError."""
    if not ELDER_ID.fullmatch(elder_id):
        raise ValueError("an elder id is 1-64 chars of [A-Za-z0-9._-]")
    return elder_id


def add_elder(conn: psycopg.Connection, elder_id: str) -> bool:
    """Register an elder; False if the id is already registered."""
    check_elder_id(elder_id)
    with conn.transaction():
        cur = conn.execute("INSERT INTO elders (elder_id) VALUES (%s) ON CONFLICT DO NOTHING", (elder_id,))
        return cur.rowcount == 1


def set_care_plan(conn: psycopg.Connection, elder_id: str, plan: CarePlan, updated_by: str) -> bool:
    """Store (replace) an elder's care plan; False if there is no such elder."""
    with conn.transaction():
        cur = conn.execute(
            "INSERT INTO care_plans (elder_id, plan, updated_at, updated_by)"
            " SELECT elder_id, %(plan)s, now(), %(by)s FROM elders WHERE elder_id = %(e)s"
            " ON CONFLICT (elder_id) DO UPDATE"
            " SET plan = EXCLUDED.plan, updated_at = EXCLUDED.updated_at, updated_by = EXCLUDED.updated_by",
            {"e": elder_id, "plan": Jsonb(plan.as_data()), "by": updated_by},
        )
        return cur.rowcount == 1


def get_care_plan(conn: psycopg.Connection, elder_id: str) -> CarePlan | None:
    """An elder's care plan, or None if none is set (or there is no such elder)."""
    row = conn.execute("SELECT plan FROM care_plans WHERE elder_id = %s", (elder_id,)).fetchone()
    return None if row is None else _plan(elder_id, row[0])


def load_care_plans(conn: psycopg.Connection, elder_ids: Collection[str]) -> dict[str, CarePlan | None]:
    """Several elders' care plans in one query: each id maps to its plan, or None if it has none."""
    found: dict[str, CarePlan | None] = dict.fromkeys(elder_ids)
    with conn.cursor(row_factory=tuple_row) as cur:
        cur.execute("SELECT elder_id, plan FROM care_plans WHERE elder_id = ANY(%s)", (list(elder_ids),))
        for elder_id, plan in cur:
            found[elder_id] = _plan(elder_id, plan)
    return found


_ELDER_ROWS = """
SELECT e.elder_id, e.created_at, p.plan, p.updated_at, p.updated_by,
       (SELECT count(*) FROM devices d WHERE d.elder_id = e.elder_id)
FROM elders e LEFT JOIN care_plans p USING (elder_id)
"""


def get_elder(conn: psycopg.Connection, elder_id: str) -> ElderRow | None:
    """One elder with its care plan, or None if the id is not registered."""
    with conn.cursor(row_factory=tuple_row) as cur:
        cur.execute(_ELDER_ROWS + " WHERE e.elder_id = %s", (elder_id,))
        row = cur.fetchone()
    return None if row is None else _elder(row)


def list_elders(conn: psycopg.Connection, limit: int = 200) -> list[ElderRow]:
    """Registered elders by id, with their care plans."""
    with conn.cursor(row_factory=tuple_row) as cur:
        cur.execute(_ELDER_ROWS + " ORDER BY e.elder_id LIMIT %s", (limit,))
        return [_elder(row) for row in cur]


def _elder(row: tuple[Any, ...]) -> ElderRow:
    elder_id, created_at, plan, updated_at, updated_by, devices = row
    return ElderRow(
        elder_id,
        created_at,
        None if plan is None else _plan(elder_id, plan),
        updated_at,
        updated_by,
        devices,
    )


def _plan(elder_id: str, data: object) -> CarePlan:
    if not isinstance(data, dict):
        raise ValueError(f"the stored care plan of {elder_id} is not an object")
    return parse_care_plan(data, source=f"stored care plan of {elder_id}")

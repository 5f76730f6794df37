"""The bench population in its database: care plans, the minutes before the run, breaches counted."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import psycopg
from psycopg.types.json import Jsonb

from eldercare.alerts.careplan import parse_care_plan
from eldercare.simulators.population import Population
from eldercare.simulators.publisher import Fleet, fleet_rows

#: History written ahead of a run: NEWS2 looks back 15 minutes, the longest window 10.
HISTORY = timedelta(minutes=16)
HISTORY_EVERY_S = 10


def set_care_plans(conn: psycopg.Connection, fleet: Fleet, population: Population) -> dict[str, int]:
    """Give the fleet's elders their care plans (kinds as the population says); count per kind."""
    elders, _ = fleet_rows(fleet)
    rows: list[tuple[str, Jsonb]] = []
    kinds: dict[str, int] = {}
    for index, elder_id in enumerate(elders):
        profile = population.profile(index)
        kinds[profile.plan_kind] = kinds.get(profile.plan_kind, 0) + 1
        if profile.plan is not None:
            # Validated as the CLI would, then stored as the store stores it (one statement
            # for thousands of elders, where gateway/store/elders.py sets one at a time).
            rows.append((elder_id, Jsonb(parse_care_plan(profile.plan).as_data())))
    with conn.transaction(), conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO care_plans (elder_id, plan, updated_at, updated_by)"
            " VALUES (%s, %s, now(), 'bench') ON CONFLICT (elder_id) DO UPDATE SET plan = EXCLUDED.plan",
            rows,
        )
    return kinds


def write_history(
    conn: psycopg.Connection, fleet: Fleet, population: Population, end: datetime | None = None
) -> int:
    """What the episodic devices sent in the minutes before ``end`` (now), as observations.

    An episode under way when the run starts then opens its alert as it would on a gateway
    that had been running: its sustained window is in the store.
    """
    end = end or datetime.now(UTC)
    elders, devices = fleet_rows(fleet)
    profiles = [population.profile(i) for i in range(len(elders))]
    n = 0
    rows = population.history(profiles, end - HISTORY, end, HISTORY_EVERY_S)
    with (
        conn.transaction(),
        conn.cursor() as cur,
        cur.copy("COPY observations (time, device_id, elder_id, metric, value) FROM STDIN") as copy,
    ):
        for at, index, metric, value in rows:
            copy.write_row((at, devices[index][0], elders[index], metric, value))
            n += 1
    return n


#: Readings that breach a threshold of the elder's effective rules, for the metrics the
#: population sends: SpO2 below 90 % (below 85 % for COPD, whose plan moves spo2_low there;
#: spo2_critical is below 85 % for all), heart rate above 130 or below 40.
_BREACHES = """
SELECT count(*) FILTER (WHERE
         (o.metric = 'spo2' AND o.value < CASE WHEN coalesce(p.plan->'conditions' ? 'copd', false)
                                               THEN 85 ELSE 90 END)
         OR (o.metric = 'heart_rate' AND (o.value > 130 OR o.value < 40))),
       count(*)
FROM observations o LEFT JOIN care_plans p ON p.elder_id = o.elder_id
WHERE o.time >= %s AND o.time < %s AND o.device_id LIKE %s
"""


def count_breaches(conn: psycopg.Connection, fleet: Fleet, start: float, end: float) -> tuple[int, int]:
    """(breaching readings, readings) the fleet's devices sent between two epoch times."""
    row = conn.execute(
        _BREACHES,
        (datetime.fromtimestamp(start, UTC), datetime.fromtimestamp(end, UTC), f"dev-{fleet.prefix}-%"),
    ).fetchone()
    return (int(row[0]), int(row[1])) if row else (0, 0)

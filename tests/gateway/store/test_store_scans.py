"""The trend facts of the scheduled rules: exact means from the rollups on both store flavours."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import psycopg

from eldercare.alerts.trends import MeanQuery
from eldercare.gateway.store import scans
from eldercare.gateway.store.flavour import Flavour
from eldercare.gateway.store.maintenance import refresh_rollups
from eldercare.gateway.store.timescale import refresh_aggregates

#: Recent (TimescaleDB's compression and retention policies act on old chunks), in the past.
NOW = (datetime.now(UTC) - timedelta(hours=2)).replace(minute=30, second=0, microsecond=0)
DAY = timedelta(days=1)
HOUR = timedelta(hours=1)
MIN = timedelta(minutes=1)
QUERY = MeanQuery(
    "bp", ("systolic_bp",), NOW - 7 * DAY, NOW.replace(minute=0) + HOUR, None, (("e-1", "UTC"),)
)
#: Six days of 150 rolled up, then a late 90 into a rolled-up hour and a fresh 170.
EXPECTED = (150.0 * 6 + 90.0 + 170.0) / 8
LATE = NOW - DAY - 3 * HOUR + MIN


def insert(conn: psycopg.Connection, points: list[tuple[datetime, float]]) -> None:
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO observations (time, device_id, elder_id, metric, value)"
            " VALUES (%s, 'bp-1', 'e-1', 'systolic_bp', %s)",
            points,
        )


def roll_up(conn: psycopg.Connection, flavour: str) -> None:
    if flavour == "timescale":
        refresh_aggregates(conn, NOW - 10 * DAY, NOW + DAY)
    else:
        refresh_rollups(conn)


def test_a_mean_is_exact_over_rolled_up_late_and_fresh_readings(store_db: tuple[Flavour, str]) -> None:
    flavour, url = store_db
    with psycopg.connect(url, autocommit=True) as conn:
        insert(conn, [(NOW - 8 * DAY, 300.0), *[(NOW - k * DAY - 3 * HOUR, 150.0) for k in range(1, 7)]])
        roll_up(conn, flavour)
        insert(conn, [(LATE, 90.0), (NOW - 10 * MIN, 170.0)])
        with conn.cursor() as cur:
            [mean] = scans.means(cur, flavour, QUERY)["e-1"].values()
    assert (mean.mean, mean.readings) == (EXPECTED, 8)
    assert mean.last == NOW.replace(minute=0)


# TimescaleDB's catalog as STALE_SPANS reads it: the tables and functions, faked on plain
# PostgreSQL, so the composed TimescaleDB statement is run and checked here too (the real
# thing runs above where ELDERCARE_TEST_TIMESCALE_URL is set).
FAKE_CATALOG = """
CREATE SCHEMA _timescaledb_catalog;
CREATE SCHEMA _timescaledb_functions;
CREATE TABLE _timescaledb_catalog.hypertable (id int, schema_name name, table_name name);
CREATE TABLE _timescaledb_catalog.continuous_agg (
    mat_hypertable_id int, raw_hypertable_id int, user_view_name name);
CREATE TABLE _timescaledb_catalog.continuous_aggs_hypertable_invalidation_log (
    hypertable_id int, lowest_modified_value bigint, greatest_modified_value bigint);
CREATE TABLE _timescaledb_catalog.continuous_aggs_materialization_invalidation_log (
    materialization_id int, lowest_modified_value bigint, greatest_modified_value bigint);
CREATE TABLE fake_watermarks (id int, w bigint);
CREATE FUNCTION _timescaledb_functions.to_unix_microseconds(timestamptz) RETURNS bigint
    LANGUAGE sql AS $$ SELECT (extract(epoch FROM $1) * 1000000)::bigint $$;
CREATE FUNCTION _timescaledb_functions.to_timestamp(bigint) RETURNS timestamptz
    LANGUAGE sql AS $$ SELECT to_timestamp($1 / 1000000.0) $$;
CREATE FUNCTION _timescaledb_functions.cagg_watermark(int) RETURNS bigint
    LANGUAGE sql AS $$ SELECT w FROM fake_watermarks WHERE id = $1 $$;
INSERT INTO _timescaledb_catalog.hypertable VALUES (1, current_schema(), 'observations');
INSERT INTO _timescaledb_catalog.continuous_agg
    VALUES (11, 1, 'observations_1m'), (12, 1, 'observations_1h'), (13, 1, 'observations_1d');
"""


def _us(t: datetime) -> int:
    return int(t.timestamp() * 1_000_000)


def test_the_timescale_statement_reads_invalidated_and_unmaterialised_hours_raw(plain_db: str) -> None:
    with psycopg.connect(plain_db, autocommit=True) as conn:
        conn.execute(FAKE_CATALOG)
        insert(conn, [(NOW - k * DAY - 3 * HOUR, 150.0) for k in range(1, 7)])
        refresh_rollups(conn)  # observations_1h as materialised
        insert(conn, [(LATE, 90.0), (NOW - 10 * MIN, 170.0)])
        conn.execute("DELETE FROM rollup_dirty_hours")  # TimescaleDB keeps no such marks
        watermark = _us(NOW - HOUR)
        conn.execute("INSERT INTO fake_watermarks VALUES (11, %s), (12, %s), (13, %s)", (watermark,) * 3)
        conn.execute(
            "INSERT INTO _timescaledb_catalog.continuous_aggs_hypertable_invalidation_log VALUES (1, %s, %s)",
            (_us(LATE), _us(LATE)),
        )
        with conn.cursor() as cur:
            [stale_read] = scans.means(cur, "plain", QUERY)["e-1"].values()
            [mean] = scans.means(cur, "timescale", QUERY)["e-1"].values()
    assert (stale_read.mean, stale_read.readings) == (150.0, 6)  # what the rollup alone says
    assert (mean.mean, mean.readings) == (EXPECTED, 8)

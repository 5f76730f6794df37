"""What TimescaleDB knows about its continuous aggregates that the series queries need.

Real-time continuous aggregates answer from the materialisation below the watermark, and
TimescaleDB re-materialises a range only when a refresh covers it: late rows in an already
materialised range are not in the answer until then. TimescaleDB logs the time ranges such rows
touch (``continuous_aggs_hypertable_invalidation_log``, moved per aggregate into
``continuous_aggs_materialization_invalidation_log`` by a refresh, deleted when the refresh
that re-materialises them commits). Those ranges, plus everything past each aggregate's
watermark, are where an aggregate of ``observations`` may be out of date; the series queries
read them from raw rows. No writer needs to know.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime

import psycopg
from psycopg import sql

log = logging.getLogger(__name__)

#: The continuous aggregates of ``observations``, as the 0002 migration creates them.
AGGREGATES = ("observations_1m", "observations_1h", "observations_1d")
#: pg_advisory_lock key held while refreshing by hand ("eldercag" in ASCII).
REFRESH_LOCK_KEY = 0x656C_6465_7263_6167

#: (aggregate or NULL for all, lo, hi): spans where an aggregate of ``observations`` may be out
#: of date, clipped to [%(lo)s, %(hi)s). Rows logged for the hypertable (not yet moved to each
#: aggregate's log by a refresh) concern every aggregate. Times in the catalog are TimescaleDB's
#: internal microseconds since the Unix epoch, with sentinels far outside the timestamp range;
#: the logged upper bound is inclusive. Clipping happens on those integers, so no sentinel is
#: ever converted.
STALE_SPANS = sql.SQL(
    "WITH ht AS ("
    " SELECT h.id FROM _timescaledb_catalog.hypertable h"
    " WHERE h.schema_name = current_schema() AND h.table_name = 'observations'"
    "), caggs AS ("
    " SELECT ca.mat_hypertable_id AS id, ca.user_view_name::text AS view"
    " FROM _timescaledb_catalog.continuous_agg ca"
    " JOIN ht ON ca.raw_hypertable_id = ht.id"
    "), logged AS ("
    " SELECT NULL AS view, l.lowest_modified_value AS lo, l.greatest_modified_value AS last"
    " FROM _timescaledb_catalog.continuous_aggs_hypertable_invalidation_log l"
    " JOIN ht ON l.hypertable_id = ht.id"
    " UNION ALL"
    " SELECT caggs.view, l.lowest_modified_value, l.greatest_modified_value"
    " FROM _timescaledb_catalog.continuous_aggs_materialization_invalidation_log l"
    " JOIN caggs ON l.materialization_id = caggs.id"
    " UNION ALL"
    " SELECT caggs.view, _timescaledb_functions.cagg_watermark(caggs.id), 9223372036854775807"
    " FROM caggs"
    "), asked AS ("
    " SELECT _timescaledb_functions.to_unix_microseconds(%(lo)s) AS lo,"
    " _timescaledb_functions.to_unix_microseconds(%(hi)s) AS hi"
    ")"
    " SELECT l.view, _timescaledb_functions.to_timestamp(greatest(l.lo, a.lo)),"
    " _timescaledb_functions.to_timestamp(least(l.last, a.hi - 1) + 1)"
    " FROM logged l, asked a WHERE l.lo < a.hi AND l.last >= a.lo ORDER BY 2"
)


def refresh_aggregates(
    conn: psycopg.Connection,
    start: datetime | None = None,
    end: datetime | None = None,
    *,
    timeout: float = 300.0,
) -> None:
    """Refresh the aggregates of ``observations`` over ``[start, end)`` now (None: unbounded).

    Series answers do not need this (they are exact without it); it is for operators, tests
    and benchmarks that want everything materialised. A refresh and a refresh policy run of the
    same aggregate over overlapping windows cannot run at once: whichever comes second fails
    "due to a concurrent refresh", and a policy run that fails so is recorded as Failed. A
    policy run refreshes in batches, each registering its own window, so a refresh can slip in
    between two batches and fail the run's next one. So each aggregate's policy job is paused
    while it is refreshed here, a run already under way is waited out (its worker gone), this
    refresh is retried while it still meets one (until ``timeout`` seconds), and the job is
    resumed after. A session advisory lock keeps two such refreshes apart.
    ``conn`` must be in autocommit mode (a refresh cannot run inside a transaction).
    """
    if not conn.autocommit:
        raise ValueError("refresh_aggregates needs an autocommit connection")
    deadline = time.monotonic() + timeout
    with _refresh_lock(conn):
        for view in AGGREGATES:
            jobs = _refresh_jobs(conn, view)
            for job in jobs:
                conn.execute("SELECT alter_job(%s, scheduled => false)", (job,))
            try:
                _wait_for_runs_to_end(conn, jobs, deadline)
                _refresh_until_through(conn, view, start, end, deadline)
            finally:
                for job in jobs:
                    conn.execute("SELECT alter_job(%s, scheduled => true)", (job,))


def resume_refresh_policies(conn: psycopg.Connection) -> list[int]:
    """Resume refresh policy jobs a crashed ``refresh_aggregates`` left paused; return their ids.

    Skips (returns []) while a ``refresh_aggregates`` runs. ``conn`` must be idle.
    """
    with conn.transaction():
        got = conn.execute("SELECT pg_try_advisory_xact_lock(%s)", (REFRESH_LOCK_KEY,)).fetchone()
        if not (got and got[0]):
            return []
        paused = [job for view in AGGREGATES for job in _refresh_jobs(conn, view, scheduled=False)]
        for job in paused:
            conn.execute("SELECT alter_job(%s, scheduled => true)", (job,))
    if paused:
        log.warning("paused aggregate refresh policies resumed", extra={"jobs": paused})
    return paused


def _refresh_until_through(
    conn: psycopg.Connection, view: str, start: datetime | None, end: datetime | None, deadline: float
) -> None:
    # Literals, not parameters: with parameters psycopg would prepare the CALL, and a
    # refresh must go out as a simple query outside any transaction block.
    call = sql.SQL("CALL refresh_continuous_aggregate({}, {}::timestamptz, {}::timestamptz)").format(
        sql.Literal(view), sql.Literal(start), sql.Literal(end)
    )
    while True:
        try:
            conn.execute(call)
            return
        except psycopg.errors.LockNotAvailable:
            # A policy run of this aggregate is under way: it ends soon.
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _wait_for_runs_to_end(conn: psycopg.Connection, jobs: list[int], deadline: float) -> None:
    while True:
        row = conn.execute(
            "SELECT EXISTS (SELECT 1 FROM pg_stat_activity a"
            " JOIN _timescaledb_catalog.bgw_job j ON a.application_name = j.application_name"
            " WHERE a.datname = current_database() AND j.id = ANY(%s))",
            (jobs,),
        ).fetchone()
        if not (row and row[0]):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"policy jobs {jobs} still running")
        time.sleep(0.05)


def _refresh_jobs(conn: psycopg.Connection, view: str, *, scheduled: bool | None = None) -> list[int]:
    # jobs.hypertable_name names the view (older releases: its materialisation hypertable).
    rows = conn.execute(
        "SELECT j.job_id FROM timescaledb_information.jobs j"
        " JOIN timescaledb_information.continuous_aggregates ca"
        "   ON (j.hypertable_schema, j.hypertable_name) IN ((ca.view_schema, ca.view_name),"
        "      (ca.materialization_hypertable_schema, ca.materialization_hypertable_name))"
        " WHERE j.proc_name = 'policy_refresh_continuous_aggregate'"
        " AND ca.view_schema = current_schema() AND ca.view_name = %s"
        " AND (%s::boolean IS NULL OR j.scheduled = %s::boolean)"
        " ORDER BY 1",
        (view, scheduled, scheduled),
    ).fetchall()
    return [r[0] for r in rows]


@contextmanager
def _refresh_lock(conn: psycopg.Connection) -> Iterator[None]:
    conn.execute("SELECT pg_advisory_lock(%s)", (REFRESH_LOCK_KEY,))
    try:
        yield
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s)", (REFRESH_LOCK_KEY,))

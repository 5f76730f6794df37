"""What the scheduled rules read, in bulk: one query per rule kind for a chunk of elders.

The scheduled jobs (``gateway/jobs.py``) go through the elders in chunks (``elder_chunk``);
for each chunk these functions answer what the pure rule modules ask (``alerts/absence.py``,
``alerts/trends.py``, ``alerts/followups.py``), every one a single statement over the whole
chunk, walking the per-elder indexes (never one query per elder): a city of 100k elders is
a hundred chunks a run.

Trend means come from the hourly rollups, exact as ``series.py`` is: the hours whose rollup
may be out of date (plain PostgreSQL: the (elder, metric, hour) marks not yet refreshed;
TimescaleDB: the invalidation logs and everything past each aggregate's watermark) are read
from raw rows instead, in the same statement, so in one snapshot.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

import psycopg
from psycopg import sql

from eldercare.alerts.absence import Device, DeviceEvent, EventLookup, Reading, ReadingLookup
from eldercare.alerts.followups import FollowUpFacts, OpenTask, OverdueTask
from eldercare.alerts.trends import DayMean, Mean, MeanQuery, RiseQuery
from eldercare.gateway.store.flavour import Flavour
from eldercare.gateway.store.maintenance import BUCKET_ORIGIN
from eldercare.gateway.store.timescale import STALE_SPANS

# ---- runs and chunks -----------------------------------------------------------------------


def try_job_lock(cur: psycopg.Cursor[Any], job: str) -> bool:
    """Take the job's advisory lock until the transaction ends; False if another run holds it."""
    cur.execute("SELECT pg_try_advisory_xact_lock(hashtextextended('eldercare-job:' || %s, 0))", (job,))
    row = cur.fetchone()
    return bool(row and row[0])


def elder_chunk(cur: psycopg.Cursor[Any], after: str, size: int) -> list[str]:
    """The next ``size`` elder ids after ``after`` (keyset order)."""
    cur.execute("SELECT elder_id FROM elders WHERE elder_id > %s ORDER BY elder_id LIMIT %s", (after, size))
    return [row[0] for row in cur.fetchall()]


# ---- absence -------------------------------------------------------------------------------


def devices_of(cur: psycopg.Cursor[Any], elder_ids: Collection[str]) -> dict[str, list[Device]]:
    """The enabled devices of each elder, with their type's reporting interval."""
    cur.execute(
        "SELECT d.elder_id, d.device_id, d.type, t.report_interval_s, d.last_seen, d.online, d.status_at,"
        " d.battery FROM devices d JOIN device_types t ON t.type = d.type"
        " WHERE d.elder_id = ANY(%s) AND d.enabled ORDER BY d.elder_id, d.device_id",
        (list(elder_ids),),
    )
    out: dict[str, list[Device]] = defaultdict(list)
    for elder_id, device_id, type_, interval_s, last_seen, online, status_at, battery in cur:
        interval = timedelta(seconds=interval_s)
        out[elder_id].append(Device(device_id, type_, interval, last_seen, online, status_at, battery))
    return out


_OPS = {"<": "<", "<=": "<=", ">": ">", ">=": ">="}


def latest_readings(
    cur: psycopg.Cursor[Any], lookups: Sequence[ReadingLookup], now: datetime, any_value: bool = False
) -> dict[tuple[str, str], Reading]:
    """Per (elder, rule), the newest reading meeting any of the rule's lookups' conditions
    (``any_value``: of their metrics, whatever the value), taken at or after their ``since``
    and at or before ``now`` (clock-skewed ones never count)."""
    found: dict[tuple[str, str], Reading] = {}
    by_op: dict[str, list[ReadingLookup]] = defaultdict(list)
    for lookup in lookups:
        by_op["any" if any_value else lookup.condition.op].append(lookup)
    for op, group in sorted(by_op.items()):
        # One statement per comparison (a handful): the operator is SQL, the rest parameters.
        test = sql.SQL("true") if op == "any" else sql.SQL("o.value {} w.threshold").format(sql.SQL(_OPS[op]))
        cur.execute(
            sql.SQL(
                "SELECT w.elder_id, w.rule, o.time, w.metric, o.value, o.device_id"
                " FROM unnest(%s::text[], %s::text[], %s::text[], %s::float8[], %s::timestamptz[])"
                "   AS w(elder_id, rule, metric, threshold, since)"
                " CROSS JOIN LATERAL (SELECT time, value, device_id FROM observations o"
                "   WHERE o.elder_id = w.elder_id AND o.metric = w.metric"
                "     AND o.time >= w.since AND o.time <= %s AND {test}"
                "     AND NOT ('clock_skew' = ANY(o.flags))"
                "   ORDER BY o.time DESC LIMIT 1) AS o"
            ).format(test=test),
            (
                [x.elder_id for x in group],
                [x.rule_id for x in group],
                [x.condition.metric for x in group],
                [x.condition.value for x in group],
                [x.since for x in group],
                now,
            ),
        )
        for elder_id, rule_id, at, metric, value, device_id in cur:
            known = found.get((elder_id, rule_id))
            if known is None or at > known.at:
                found[(elder_id, rule_id)] = Reading(at, metric, value, device_id)
    return found


def latest_events(
    cur: psycopg.Cursor[Any], lookups: Sequence[EventLookup], now: datetime
) -> dict[tuple[str, str], list[DeviceEvent]]:
    """Per (elder, rule), for each enabled device of the elder, its newest event of the
    lookup's kinds at or after ``since`` and at or before ``now``."""
    found: dict[tuple[str, str], list[DeviceEvent]] = defaultdict(list)
    by_kinds: dict[frozenset[str], list[EventLookup]] = defaultdict(list)
    for lookup in lookups:
        by_kinds[lookup.kinds].append(lookup)
    for kinds, group in sorted(by_kinds.items(), key=lambda item: sorted(item[0])):
        cur.execute(
            "SELECT w.elder_id, w.rule, d.device_id, e.kind, e.time"
            " FROM unnest(%s::text[], %s::text[], %s::timestamptz[]) AS w(elder_id, rule, since)"
            " JOIN devices d ON d.elder_id = w.elder_id AND d.enabled"
            " CROSS JOIN LATERAL (SELECT kind, time FROM device_events e"
            "   WHERE e.device_id = d.device_id AND e.elder_id = w.elder_id AND e.kind = ANY(%s)"
            "     AND e.time >= w.since AND e.time <= %s AND NOT ('clock_skew' = ANY(e.flags))"
            "   ORDER BY e.time DESC LIMIT 1) AS e"
            " ORDER BY 1, 2, 3",
            (
                [x.elder_id for x in group],
                [x.rule_id for x in group],
                [x.since for x in group],
                sorted(kinds),
                now,
            ),
        )
        for elder_id, rule_id, device_id, kind, at in cur:
            found[(elder_id, rule_id)].append(DeviceEvent(device_id, kind, at))
    return found


# ---- trends --------------------------------------------------------------------------------

_STALE_PLAIN = (
    "SELECT DISTINCT m.elder_id, m.metric, m.hour FROM ("
    "  SELECT elder_id, metric, hour FROM rollup_dirty_hours"
    "  UNION ALL SELECT elder_id, metric, hour FROM rollup_pending_hours) AS m"
    " WHERE m.elder_id = ANY(%(elders)s) AND m.metric = ANY(%(metrics)s)"
    "   AND m.hour >= %(lo)s AND m.hour < %(hi)s"
)
# Every hour of a span where observations_1h may be stale, for every elder and metric asked.
_STALE_TIMESCALE = (
    "SELECT e.elder_id, m.metric, h.hour FROM ("
    "  SELECT DISTINCT generate_series(date_bin('1 hour', s.lo, %(origin)s),"
    "    s.hi - interval '1 microsecond', interval '1 hour') AS hour"
    "  FROM spans s WHERE s.view IS NULL OR s.view = 'observations_1h') AS h"
    " CROSS JOIN e CROSS JOIN unnest(%(metrics)s::text[]) AS m(metric)"
)


def _pieces(flavour: Flavour) -> sql.Composable:
    """The CTEs ``e`` (elder, tz, start), ``stale`` and ``pieces`` (elder, metric, hour, sum,
    count, tz): the hourly rollup where it is fresh, raw rows binned by hour where it may not be."""
    if flavour == "timescale":
        stale = sql.SQL("spans (view, lo, hi) AS ({}), stale AS ({})").format(
            STALE_SPANS, sql.SQL(_STALE_TIMESCALE)
        )
    else:
        stale = sql.SQL("stale AS ({})").format(sql.SQL(_STALE_PLAIN))
    return sql.SQL(
        "WITH e (elder_id, tz, start) AS ("
        "  SELECT * FROM unnest(%(elders)s::text[], %(zones)s::text[], %(starts)s::timestamptz[])),"
        " {stale},"
        " pieces AS ("
        "  SELECT r.elder_id, r.metric, r.bucket AS t, r.sum AS s, r.count AS n, e.tz"
        "  FROM e JOIN observations_1h r ON r.elder_id = e.elder_id"
        "  WHERE r.metric = ANY(%(metrics)s) AND r.bucket >= e.start AND r.bucket >= %(lo)s"
        "    AND r.bucket < %(hi)s AND NOT EXISTS (SELECT 1 FROM stale"
        "      WHERE stale.elder_id = r.elder_id AND stale.metric = r.metric AND stale.hour = r.bucket)"
        "  UNION ALL"
        "  SELECT o.elder_id, o.metric, date_bin('1 hour', o.time, %(origin)s), o.value, 1, e.tz"
        "  FROM stale JOIN e ON e.elder_id = stale.elder_id"
        "  JOIN observations o ON o.elder_id = stale.elder_id AND o.metric = stale.metric"
        "    AND o.time >= stale.hour AND o.time < stale.hour + interval '1 hour'"
        "  WHERE o.time >= e.start AND o.time >= %(lo)s AND o.time < %(hi)s"
        "    AND NOT ('clock_skew' = ANY(o.flags)))"
    ).format(stale=stale)


def _params(
    elders: Sequence[tuple[str, str, datetime]], metrics: Sequence[str], end: datetime
) -> dict[str, Any]:
    lo = min(start for _, _, start in elders)
    return {
        "elders": [e for e, _, _ in elders],
        "zones": [z for _, z, _ in elders],
        "starts": [s for _, _, s in elders],
        "metrics": list(metrics),
        "lo": lo.replace(minute=0, second=0, microsecond=0),
        "hi": end,
        "origin": BUCKET_ORIGIN,
    }


def means(cur: psycopg.Cursor[Any], flavour: Flavour, query: MeanQuery) -> dict[str, dict[str, Mean]]:
    """Per elder and metric, the mean over the query's window (and local hours) from the rollups."""
    if not query.elders:
        return {}
    params = _params([(e, z, query.start) for e, z in query.elders], query.metrics, query.end)
    where = sql.SQL("")
    hours = query.local_hours
    if hours is not None:
        params |= {"h0": hours.start, "h1": hours.end}
        local = "(t AT TIME ZONE tz)::time"
        join = "OR" if hours.wraps_midnight else "AND"
        where = sql.SQL(f" WHERE ({local} >= %(h0)s {join} {local} < %(h1)s)")
    cur.execute(
        sql.SQL(
            "{pieces} SELECT elder_id, metric, sum(s) / sum(n), sum(n)::bigint, min(t), max(t)"
            " FROM pieces{where} GROUP BY elder_id, metric"
        ).format(pieces=_pieces(flavour), where=where),
        params,
    )
    out: dict[str, dict[str, Mean]] = defaultdict(dict)
    for elder_id, metric, mean, count, first, last in cur:
        out[elder_id][metric] = Mean(metric, mean, count, first, last)
    return out


def daily_means(cur: psycopg.Cursor[Any], flavour: Flavour, query: RiseQuery) -> dict[str, list[DayMean]]:
    """Per elder, the daily means of the query's metric per local day, oldest first."""
    if not query.elders:
        return {}
    params = _params(query.elders, [query.metric], query.end)
    cur.execute(
        sql.SQL(
            "{pieces} SELECT elder_id, (t AT TIME ZONE tz)::date, sum(s) / sum(n), sum(n)::bigint, max(t)"
            " FROM pieces GROUP BY 1, 2 ORDER BY 1, 2"
        ).format(pieces=_pieces(flavour)),
        params,
    )
    out: dict[str, list[DayMean]] = defaultdict(list)
    for elder_id, day, mean, count, last in cur:
        out[elder_id].append(DayMean(day, mean, count, last))
    return out


# ---- follow-ups ----------------------------------------------------------------------------


def follow_up_facts(
    cur: psycopg.Cursor[Any], elder_ids: Collection[str], kind: str, pulled_by: Collection[str]
) -> dict[str, FollowUpFacts]:
    """Per elder: the open task of ``kind`` due first, when the last one was done, and the
    newest alert of a ``pulled_by`` rule."""
    if not elder_ids:
        return {}
    cur.execute(
        "SELECT e.elder_id, o.id, o.due_at, o.source_alert, d.done_at, p.rule, p.raised_at"
        " FROM unnest(%(elders)s::text[]) AS e(elder_id)"
        " LEFT JOIN LATERAL (SELECT id, due_at, source_alert FROM tasks t"
        "   WHERE t.elder_id = e.elder_id AND t.kind = %(kind)s AND t.state IN ('open', 'escalated')"
        "   ORDER BY t.due_at LIMIT 1) AS o ON true"
        " LEFT JOIN LATERAL (SELECT max(done_at) AS done_at FROM tasks t"
        "   WHERE t.elder_id = e.elder_id AND t.kind = %(kind)s AND t.state = 'done') AS d ON true"
        " LEFT JOIN LATERAL (SELECT rule, raised_at FROM alerts a"
        "   WHERE a.elder_id = e.elder_id AND a.rule = ANY(%(rules)s)"
        "   ORDER BY a.raised_at DESC LIMIT 1) AS p ON true",
        {"elders": list(elder_ids), "kind": kind, "rules": sorted(pulled_by)},
    )
    out = {}
    for elder_id, task_id, due_at, alert_id, done_at, rule, raised_at in cur:
        task = None if task_id is None else OpenTask(task_id, due_at, alert_id)
        pull = None if rule is None else (rule, raised_at)
        out[elder_id] = FollowUpFacts(task, done_at, pull)
    return out


def overdue_tasks(
    cur: psycopg.Cursor[Any],
    routes: Mapping[str, tuple[str, str]],
    now: datetime,
    after_id: int = 0,
    limit: int = 1000,
) -> list[OverdueTask]:
    """Open tasks of the ``routes``' kinds (kind -> (assignee, route)) due before ``now``, by id."""
    if not routes:
        return []
    cur.execute(
        "SELECT id, elder_id, kind, due_at, source_alert, source_rule FROM tasks"
        " WHERE state = 'open' AND due_at <= %s AND assignee = ANY(%s) AND kind = ANY(%s) AND id > %s"
        " ORDER BY id LIMIT %s",
        (now, sorted({a for a, _ in routes.values()}), sorted(routes), after_id, limit),
    )
    return [OverdueTask(*row) for row in cur.fetchall()]

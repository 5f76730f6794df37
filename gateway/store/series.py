"""Bucketed series of one metric for one elder: the one query both store flavours answer alike.

Semantics: the rows of ``observations`` with ``elder_id``, ``metric`` and ``start <= time <
end``, grouped into buckets of the requested width aligned on UTC (origin 2000-01-01 00:00 UTC,
as ``date_bin``); a bucket cut by ``start`` or ``end`` holds only the rows inside the range
and is labelled with its full bucket start. Buckets without rows are absent.

How: full buckets of the largest rollup width (1 min, 1 h, 1 day) that divides the requested
width come from the rollups (``observations_1m/_1h/_1d``: tables on plain PostgreSQL,
real-time continuous aggregates on TimescaleDB); the cut edges, and on plain PostgreSQL every
day still listed in ``rollup_dirty`` / ``rollup_pending``, come from raw rows, in the same
query. So the answer is exact before, during and after the rollup refresh job.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, Literal

import psycopg
from psycopg import sql

from eldercare.gateway.store.maintenance import BUCKET_ORIGIN

BucketName = Literal["1m", "1h", "1d"]

#: Rollup relations by width, widest first.
ROLLUPS: tuple[tuple[timedelta, str], ...] = (
    (timedelta(days=1), "observations_1d"),
    (timedelta(hours=1), "observations_1h"),
    (timedelta(minutes=1), "observations_1m"),
)
_NAMED: dict[str, timedelta] = {"1m": timedelta(minutes=1), "1h": timedelta(hours=1), "1d": timedelta(days=1)}

_flavours: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()


@dataclass(frozen=True, slots=True)
class Bucket:
    """One bucket of a series: its start, and min / max / avg / count of the values in it."""

    start: datetime
    min: float
    max: float
    avg: float
    count: int


def bucket_width(bucket: BucketName | timedelta) -> timedelta:
    """The width of a bucket given as '1m' / '1h' / '1d' or as a timedelta."""
    if isinstance(bucket, timedelta):
        width = bucket
    elif bucket in _NAMED:
        width = _NAMED[bucket]
    else:
        raise ValueError(f"bucket must be '1m', '1h', '1d' or a timedelta, got {bucket!r}")
    if width <= timedelta(0):
        raise ValueError("bucket width must be positive")
    return width


def bucket_floor(t: datetime, width: timedelta) -> datetime:
    """The start of the ``width`` bucket holding ``t`` (UTC-aligned, as the queries bin)."""
    return BUCKET_ORIGIN + ((t - BUCKET_ORIGIN) // width) * width


def bucketed_series(
    conn: psycopg.Connection,
    elder_id: str,
    metric: str,
    start: datetime,
    end: datetime,
    bucket: BucketName | timedelta,
) -> list[Bucket]:
    """The buckets of ``metric`` for ``elder_id`` over ``[start, end)``, oldest first."""
    flavour = _flavours.get(conn)
    if flavour is None:
        row = conn.execute("SELECT value FROM store_info WHERE key = 'flavour'").fetchone()
        if row is None:
            raise RuntimeError("store_info has no flavour: is the store migrated?")
        flavour = _flavours[conn] = row[0]
    built = series_query(flavour, elder_id, metric, start, end, bucket)
    if built is None:
        return []
    query, params = built
    return [_bucket(r) for r in conn.execute(query, params).fetchall()]


async def abucketed_series(
    conn: psycopg.AsyncConnection,
    elder_id: str,
    metric: str,
    start: datetime,
    end: datetime,
    bucket: BucketName | timedelta,
) -> list[Bucket]:
    """``bucketed_series`` on an async connection."""
    flavour = _flavours.get(conn)
    if flavour is None:
        cur = await conn.execute("SELECT value FROM store_info WHERE key = 'flavour'")
        row = await cur.fetchone()
        if row is None:
            raise RuntimeError("store_info has no flavour: is the store migrated?")
        flavour = _flavours[conn] = row[0]
    built = series_query(flavour, elder_id, metric, start, end, bucket)
    if built is None:
        return []
    query, params = built
    cur = await conn.execute(query, params)
    return [_bucket(r) for r in await cur.fetchall()]


def series_query(
    flavour: str,
    elder_id: str,
    metric: str,
    start: datetime,
    end: datetime,
    bucket: BucketName | timedelta,
) -> tuple[sql.Composed, dict[str, Any]] | None:
    """The SQL and parameters of a series query on a store of ``flavour`` (None: empty range).

    Rows: (bucket start, min, max, sum, count), ordered by bucket start.
    """
    if flavour not in ("plain", "timescale"):
        raise ValueError(f"unknown store flavour {flavour!r}")
    if start.tzinfo is None or end.tzinfo is None:
        raise ValueError("start and end must be timezone-aware")
    width = bucket_width(bucket)
    if end <= start:
        return None
    base = next(((w, rel) for w, rel in ROLLUPS if width % w == timedelta(0)), None)
    params: dict[str, Any] = {
        "elder": elder_id,
        "metric": metric,
        "start": start,
        "end": end,
        "width": width,
        "origin": BUCKET_ORIGIN,
    }
    if base is not None:
        base_width, rollup = base
        a0 = _ceil(start, base_width)
        a1 = bucket_floor(end, base_width)
    if base is None or a0 >= a1:
        # No whole rollup bucket inside the range: everything from raw rows.
        rollup, a0, a1 = ROLLUPS[-1][1], start, start
        edges = [(start, end), (end, end)]
    else:
        edges = [(start, a0), (a1, end)]
    params.update(a0=a0, a1=a1, lo1=edges[0][0], hi1=edges[0][1], lo2=edges[1][0], hi2=edges[1][1])

    if flavour == "plain":
        params["d0"], params["d1"] = _utc_day(start), _utc_day(end)
        dirty_cte = sql.SQL(
            "dirty AS ("
            " SELECT day FROM rollup_dirty WHERE day BETWEEN %(d0)s AND %(d1)s"
            " UNION SELECT day FROM rollup_pending WHERE day BETWEEN %(d0)s AND %(d1)s), "
        )
        dirty_ranges = sql.SQL(
            " UNION ALL SELECT tstzrange(day::timestamp AT TIME ZONE 'UTC',"
            " (day + 1)::timestamp AT TIME ZONE 'UTC') FROM dirty"
        )
        clean_only = sql.SQL(
            " AND NOT EXISTS (SELECT 1 FROM dirty d WHERE d.day = (r.bucket AT TIME ZONE 'UTC')::date)"
        )
    else:
        dirty_cte = dirty_ranges = clean_only = sql.SQL("")

    query = sql.SQL(
        "WITH {dirty_cte}raw_ranges AS ("
        " SELECT unnest(range_agg(p.r) * tstzmultirange(tstzrange(%(start)s, %(end)s))) AS r"
        " FROM (SELECT tstzrange(%(lo1)s, %(hi1)s) AS r"
        " UNION ALL SELECT tstzrange(%(lo2)s, %(hi2)s){dirty_ranges}) p"
        "), parts AS ("
        " SELECT r.bucket AS t, r.min, r.max, r.sum, r.count FROM {rollup} r"
        " WHERE r.elder_id = %(elder)s AND r.metric = %(metric)s"
        " AND r.bucket >= %(a0)s AND r.bucket < %(a1)s{clean_only}"
        " UNION ALL"
        " SELECT o.time, o.value, o.value, o.value, 1::bigint"
        " FROM raw_ranges rr JOIN observations o"
        " ON o.time >= lower(rr.r) AND o.time < upper(rr.r)"
        " WHERE o.elder_id = %(elder)s AND o.metric = %(metric)s"
        ")"
        " SELECT date_bin(%(width)s::interval, t, %(origin)s::timestamptz) AS bucket,"
        " min(min), max(max), sum(sum), sum(count)::bigint"
        " FROM parts GROUP BY 1 ORDER BY 1"
    ).format(
        dirty_cte=dirty_cte,
        dirty_ranges=dirty_ranges,
        rollup=sql.Identifier(rollup),
        clean_only=clean_only,
    )
    return query, params


def _bucket(row: tuple[Any, ...]) -> Bucket:
    start, lo, hi, total, count = row
    return Bucket(start=start.astimezone(UTC), min=lo, max=hi, avg=total / count, count=count)


def _ceil(t: datetime, width: timedelta) -> datetime:
    floor = bucket_floor(t, width)
    return floor if floor == t else floor + width


def _utc_day(t: datetime) -> date:
    return t.astimezone(UTC).date()

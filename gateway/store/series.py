"""Bucketed series of one metric for one elder: the one query both store flavours answer alike.

Semantics: the rows of ``observations`` with ``elder_id``, ``metric`` and ``start <= time <
end``, grouped into buckets of the requested width aligned on UTC (origin 2000-01-01 00:00 UTC,
as ``date_bin``); a bucket cut by ``start`` or ``end`` holds only the rows inside the range
and is labelled with its full bucket start. Buckets without rows are absent.

How: the range is cut into pieces (``plan_pieces``, a pure function): every stretch that whole,
clean buckets of a rollup (``observations_1d/_1h/_1m``, widest first, of a width dividing the
requested one) can cover comes from that rollup; the rest (the cut edges and the hours whose
rollups are stale) comes from raw rows. All pieces go into one query with constant time
bounds, so the planner prunes partitions (chunks) and reads only the index entries of that
elder and metric inside them: the cost follows what is asked, not what is stored.

Stale hours: on plain PostgreSQL, the (elder, metric, hour) marks in ``rollup_dirty_hours`` /
``rollup_pending_hours`` (written by a trigger with the rows, cleared by the refresh); on
TimescaleDB, the ranges TimescaleDB itself has logged as invalid and not yet re-materialised,
and everything past the aggregate's watermark. So the answer is exact before, during and after
a refresh, late data included.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import psycopg
from psycopg import sql

from eldercare.gateway.store.flavour import Flavour, StoreNotMigrated, arecorded_flavour, recorded_flavour
from eldercare.gateway.store.maintenance import BUCKET_ORIGIN
from eldercare.gateway.store.timescale import STALE_SPANS

BucketName = Literal["1m", "1h", "1d"]
Span = tuple[datetime, datetime]

#: Rollup relations by width, widest first.
ROLLUPS: tuple[tuple[timedelta, str], ...] = (
    (timedelta(days=1), "observations_1d"),
    (timedelta(hours=1), "observations_1h"),
    (timedelta(minutes=1), "observations_1m"),
)
RAW = "observations"
HOUR = timedelta(hours=1)
_NAMED: dict[str, timedelta] = {"1m": timedelta(minutes=1), "1h": timedelta(hours=1), "1d": timedelta(days=1)}

_SNAPSHOT = sql.SQL("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")


def _migrated(flavour: Flavour | None) -> Flavour:
    if flavour is None:
        raise StoreNotMigrated("store_info has no flavour: is the store migrated?")
    return flavour


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


def plan_pieces(
    start: datetime,
    end: datetime,
    width: timedelta,
    stale: Iterable[Span] = (),
    stale_in: Mapping[str, Iterable[Span]] | None = None,
) -> dict[str, list[Span]]:
    """Which relation answers which part of ``[start, end)``: {relation: spans, oldest first}.

    A rollup of width ``w`` (dividing ``width``) answers the whole ``w`` buckets inside the range
    that overlap no span where it may be out of date (``stale``: every rollup; ``stale_in``:
    that rollup only); what is left goes to the next narrower rollup, and in the end to raw rows
    (``RAW``). Relations without a span are absent.
    """
    stale = list(stale)
    todo = [(start, end)] if start < end else []
    out: dict[str, list[Span]] = {}
    for w, relation in ROLLUPS:
        if width % w:
            continue
        # A stale span spoils every w bucket it touches.
        mine = [*stale, *(stale_in or {}).get(relation, ())]
        spoiled = _merged((bucket_floor(lo, w), _ceil(hi, w)) for lo, hi in mine)
        left: list[Span] = []
        for lo, hi in todo:
            a0, a1 = _ceil(lo, w), bucket_floor(hi, w)
            if a0 >= a1:
                left.append((lo, hi))
                continue
            clean = _minus((a0, a1), spoiled)
            out.setdefault(relation, []).extend(clean)
            left += [(lo, a0), *_minus((a0, a1), clean), (a1, hi)]
        todo = [s for s in left if s[0] < s[1]]
    if todo:
        out[RAW] = todo
    return {rel: _merged(spans) for rel, spans in out.items() if spans}


def bucketed_series(
    conn: psycopg.Connection,
    elder_id: str,
    metric: str,
    start: datetime,
    end: datetime,
    bucket: BucketName | timedelta,
    flavour: Flavour | None = None,
) -> list[Bucket]:
    """The buckets of ``metric`` for ``elder_id`` over ``[start, end)``, oldest first.

    ``flavour``: the store's (``Store.flavour``); without it, read from the store (one query).
    """
    width = _check(start, end, bucket)
    if end <= start:
        return []
    if flavour is None:
        flavour = _migrated(recorded_flavour(conn))
    stale_sql, stale_params = stale_query(flavour, elder_id, metric, start, end)
    with _one_snapshot(conn):
        stale = conn.execute(stale_sql, stale_params).fetchall()
        query, params = series_query(elder_id, metric, start, end, width, stale)
        return [_bucket(r) for r in conn.execute(query, params).fetchall()]


async def abucketed_series(
    conn: psycopg.AsyncConnection,
    elder_id: str,
    metric: str,
    start: datetime,
    end: datetime,
    bucket: BucketName | timedelta,
    flavour: Flavour | None = None,
) -> list[Bucket]:
    """``bucketed_series`` on an async connection."""
    width = _check(start, end, bucket)
    if end <= start:
        return []
    if flavour is None:
        flavour = _migrated(await arecorded_flavour(conn))
    stale_sql, stale_params = stale_query(flavour, elder_id, metric, start, end)
    idle = conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    async with conn.transaction():
        if idle:
            await conn.execute(_SNAPSHOT)
        cur = await conn.execute(stale_sql, stale_params)
        stale = await cur.fetchall()
        query, params = series_query(elder_id, metric, start, end, width, stale)
        cur = await conn.execute(query, params)
        return [_bucket(r) for r in await cur.fetchall()]


def stale_query(
    flavour: str, elder_id: str, metric: str, start: datetime, end: datetime
) -> tuple[sql.SQL | sql.Composed, dict[str, Any]]:
    """The SQL and parameters that list the stale spans touching ``[start, end)``.

    Rows: (rollup or NULL for every rollup, lo, hi).
    """
    params: dict[str, Any] = {
        "elder": elder_id,
        "metric": metric,
        "lo": bucket_floor(start, HOUR),
        "hi": end,
    }
    if flavour == "plain":
        marks = " UNION ".join(
            f"SELECT hour FROM {table} WHERE elder_id = %(elder)s AND metric = %(metric)s"
            " AND hour >= %(lo)s AND hour < %(hi)s"
            for table in ("rollup_dirty_hours", "rollup_pending_hours")
        )
        return sql.SQL(f"SELECT NULL, hour, hour + interval '1 hour' FROM ({marks}) m ORDER BY 2"), params
    if flavour == "timescale":
        return STALE_SPANS, params
    raise ValueError(f"unknown store flavour {flavour!r}")


def series_query(
    elder_id: str,
    metric: str,
    start: datetime,
    end: datetime,
    bucket: BucketName | timedelta,
    stale: Sequence[tuple[str | None, datetime, datetime]] = (),
) -> tuple[sql.Composed, dict[str, Any]]:
    """The SQL and parameters of a series query over pieces planned by ``plan_pieces``.

    ``stale``: rows of ``stale_query`` (rollup or None for all, lo, hi).

    Rows: (bucket start, min, max, sum, count), ordered by bucket start. Every time bound is a
    parameter of its own, so a custom plan prunes partitions on them.
    """
    width = _check(start, end, bucket)
    params: dict[str, Any] = {
        "elder": elder_id,
        "metric": metric,
        "width": width,
        "origin": BUCKET_ORIGIN,
    }
    parts: list[sql.Composable] = []
    everywhere = [(lo, hi) for rel, lo, hi in stale if rel is None]
    stale_in: dict[str, list[Span]] = {}
    for rel, lo, hi in stale:
        if rel is not None:
            stale_in.setdefault(rel, []).append((lo, hi))
    for relation, spans in plan_pieces(start, end, width, everywhere, stale_in).items():
        column = "time" if relation == RAW else "bucket"
        ranges = []
        for lo, hi in spans:
            n = len(params)
            params[f"p{n}"], params[f"p{n + 1}"] = lo, hi
            ranges.append(
                sql.SQL("({c} >= %({lo})s AND {c} < %({hi})s)").format(
                    c=sql.Identifier(column), lo=sql.SQL(f"p{n}"), hi=sql.SQL(f"p{n + 1}")
                )
            )
        values = "value, value, value, 1::bigint" if relation == RAW else "min, max, sum, count"
        parts.append(
            sql.SQL(
                "SELECT {c} AS t, {values} FROM {rel}"
                " WHERE elder_id = %(elder)s AND metric = %(metric)s AND ({ranges})"
            ).format(
                c=sql.Identifier(column),
                values=sql.SQL(values),
                rel=sql.Identifier(relation),
                ranges=sql.SQL(" OR ").join(ranges),
            )
        )
    if not parts:  # an empty range
        parts.append(
            sql.SQL("SELECT NULL::timestamptz, 0::float8, 0::float8, 0::float8, 0::bigint WHERE false")
        )
    query = sql.SQL(
        "SELECT date_bin(%(width)s::interval, t, %(origin)s::timestamptz) AS bucket,"
        " min(lo), max(hi), sum(s), sum(n)::bigint"
        " FROM ({parts}) AS parts (t, lo, hi, s, n) GROUP BY 1 ORDER BY 1"
    ).format(parts=sql.SQL(" UNION ALL ").join(parts))
    return query, params


@contextmanager
def _one_snapshot(conn: psycopg.Connection) -> Iterator[None]:
    """Both statements of a series query see one snapshot (in the caller's transaction, if any).

    Otherwise rows and marks committed between the two could be missed by both: the marks by
    the first statement, the rows by the rollups the second one reads.
    """
    idle = conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    with conn.transaction():
        if idle:
            conn.execute(_SNAPSHOT)
        yield


def _check(start: datetime, end: datetime, bucket: BucketName | timedelta) -> timedelta:
    if start.tzinfo is None or end.tzinfo is None:
        raise ValueError("start and end must be timezone-aware")
    return bucket_width(bucket)


def _bucket(row: tuple[Any, ...]) -> Bucket:
    start, lo, hi, total, count = row
    return Bucket(start=start.astimezone(UTC), min=lo, max=hi, avg=total / count, count=count)


def _ceil(t: datetime, width: timedelta) -> datetime:
    floor = bucket_floor(t, width)
    return floor if floor == t else floor + width


def _merged(spans: Iterable[Span]) -> list[Span]:
    """Spans sorted, with overlapping and touching ones joined; empty ones dropped."""
    out: list[Span] = []
    for lo, hi in sorted(s for s in spans if s[0] < s[1]):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def _minus(span: Span, holes: Sequence[Span]) -> list[Span]:
    """``span`` without the (sorted, disjoint) ``holes``."""
    lo, hi = span
    out: list[Span] = []
    for h_lo, h_hi in holes:
        if h_hi <= lo or h_lo >= hi:
            continue
        if h_lo > lo:
            out.append((lo, h_lo))
        lo = max(lo, h_hi)
    if lo < hi:
        out.append((lo, hi))
    return out

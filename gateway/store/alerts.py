"""Alerts in the store: what the rules read (active alerts, history), and writing their decisions.

Every function takes the caller's cursor or connection: the rules' decisions are written in
the transaction of the readings, events or timer that caused them (``persist``), with a row
in ``alert_history`` for every change of state or severity and a row in ``alert_outbox``
for every dispatch asked for (a new alert, an upgrade), announced with
``NOTIFY eldercare_outbox`` when that transaction commits.

Two workers deciding for one elder at once would each see "no alert yet": ``lock_elders``
takes a transaction-level advisory lock per elder (in a fixed order, so no deadlock), after
which the active alerts are read again. The unique index ``alerts_one_active`` backs this up.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from math import inf, isfinite
from typing import Any
from uuid import UUID

import orjson
import psycopg
from psycopg.types.json import Jsonb

from eldercare.alerts import news2_marks
from eldercare.alerts.decisions import (
    ACTIVE_STATES,
    RULES_ACTOR,
    ActiveAlert,
    AddEvidence,
    CancelTimer,
    ClearCondition,
    Decision,
    Match,
    OpenAlert,
    ScheduleTimer,
    SupersedeAlert,
    Suppressed,
    UpgradeAlert,
)
from eldercare.alerts.engine import History, Lookup
from eldercare.alerts.rules import Severity
from eldercare.gateway.store import timers
from eldercare.gateway.store.dispatches import close_dispatches

#: NOTIFY channel the dispatcher listens on; the payload is the number of outbox rows written.
OUTBOX_CHANNEL = "eldercare_outbox"
_ACTIVE = sorted(ACTIVE_STATES)
#: Readings a window lookup returns at most, the newest (a window of minutes holds a handful;
#: a device sending several a second fills it, and the oldest are left out).
SERIES_LIMIT = 5_000


def _dumps(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()


def _json(value: Any) -> Jsonb:
    return Jsonb(value, dumps=_dumps)


# ---- what the rules read ---------------------------------------------------------------


def lock_elders(cur: psycopg.Cursor[Any], elder_ids: Collection[str]) -> None:
    """Hold each elder's alert lock until the transaction ends (taken in one fixed order)."""
    if elder_ids:
        cur.execute(
            "SELECT pg_advisory_xact_lock(k) FROM"
            " (SELECT DISTINCT hashtextextended('eldercare-alerts:' || e, 0) AS k"
            "  FROM unnest(%s::text[]) AS e ORDER BY 1) AS keys",
            (sorted(elder_ids),),
        )


def _id_list(ids: Collection[str]) -> str | list[str]:
    """Ids as one newline-joined text (cheap to send; split by ``string_to_array``), or as a
    list when an id could contain the separator."""
    return list(ids) if any("\n" in i for i in ids) else "\n".join(ids)


Glance = tuple[int, dict[str, dict[str, ActiveAlert]]]


def elders_at_a_glance(cur: psycopg.Cursor[Any], elder_ids: Collection[str]) -> Glance:
    """What every batch's rules need, in one statement: the care plans' version
    (``elder_rules.ElderRules`` reads the plans' stamps again when it moved) and the active
    alerts of the elders that have any (a handful: most have none; the partial index of
    active alerts answers). ``ask_glance`` and ``glance_from`` are its two halves, for a
    caller that sends the statement in a pipeline with others."""
    ask_glance(cur, elder_ids)
    return glance_from(cur)


def ask_glance(cur: psycopg.Cursor[Any], elder_ids: Collection[str]) -> None:
    """Send (or queue, in a pipeline) the glance's statement on ``cur``."""
    ids = _id_list(elder_ids)
    match = "= ANY(string_to_array(%s, E'\\n'))" if isinstance(ids, str) else "= ANY(%s)"
    cur.execute(
        f"SELECT v.version, a.* FROM care_plan_version v LEFT JOIN LATERAL (SELECT {_ACTIVE_COLUMNS}"
        f" FROM alerts WHERE elder_id {match} AND {_IS_ACTIVE}) AS a ON true",
        (ids,),
    )


def glance_from(cur: psycopg.Cursor[Any]) -> Glance:
    """The glance's answer, from the cursor ``ask_glance`` sent it on."""
    version = 0
    active: dict[str, dict[str, ActiveAlert]] = defaultdict(dict)
    for row in cur:
        version = row[0]
        if row[1] is not None:
            _add_active(active, row[1:])
    return version, active


#: An active alert's row, shaped as ``elders_at_a_glance`` reads it (second column: a plan's stamp).
_ACTIVE_COLUMNS = (
    "elder_id, NULL::timestamptz, id, rule, severity, state, observed_at, last_at, matches, "
    "confirmed, evidence"
)


def _add_active(out: dict[str, dict[str, ActiveAlert]], row: Sequence[Any]) -> None:
    elder_id, _, alert_id, rule, severity, state, observed, last, matches, confirmed, evidence = row
    out[elder_id][rule] = ActiveAlert(
        alert_id, rule, Severity(severity), state, observed, last, matches, confirmed, evidence
    )


def active_alerts(cur: psycopg.Cursor[Any], elder_ids: Collection[str]) -> dict[str, dict[str, ActiveAlert]]:
    """The elders' active alerts, by elder and rule."""
    out: dict[str, dict[str, ActiveAlert]] = defaultdict(dict)
    if elder_ids:
        cur.execute(_ACTIVE_SQL, (list(elder_ids),))
        for row in cur:
            _add_active(out, row)
    return out


#: The states of ``ACTIVE_STATES`` as the partial index ``alerts_one_active`` names them (in a
#: literal, so a generic plan may use that index).
_IS_ACTIVE = "state IN ({})".format(", ".join(f"'{state}'" for state in _ACTIVE))
_ACTIVE_SQL = f"SELECT {_ACTIVE_COLUMNS} FROM alerts WHERE elder_id = ANY(%s) AND {_IS_ACTIVE}"


def recently_resolved(
    cur: psycopg.Cursor[Any], elder_ids: Collection[str], since: datetime
) -> dict[str, dict[str, tuple[datetime, Severity]]]:
    """Per elder and rule, the latest resolution since ``since`` and its severity (for cool-down)."""
    out: dict[str, dict[str, tuple[datetime, Severity]]] = defaultdict(dict)
    if elder_ids:
        cur.execute(_RESOLVED_SQL, (list(elder_ids), since))
        _add_resolved(out, cur)
    return out


_RESOLVED_SQL = (
    "SELECT DISTINCT ON (elder_id, rule) elder_id, rule, closed_at, severity FROM alerts"
    " WHERE elder_id = ANY(%s) AND state = 'resolved' AND closed_at >= %s"
    " ORDER BY elder_id, rule, closed_at DESC"
)


def _add_resolved(
    out: dict[str, dict[str, tuple[datetime, Severity]]], rows: Iterable[Sequence[Any]]
) -> None:
    for elder_id, rule, closed_at, severity in rows:
        out[elder_id][rule] = (closed_at, Severity(severity))


#: The readings of each look-up (``engine.Lookup``): the newest reading at or before ``first``
#: whose value lies outside the look-up's bands (``cut``: every run judged stops there, so
#: nothing older is sent), then the newest reading before ``start`` from the cut or ``since``
#: on (where a run may begin), then the readings in [start, stop], newest first (the reading
#: judged is among them). Clock-skewed readings never feed rules.
_SERIES_SQL = """
SELECT w.elder_id, w.metric, o.time, o.value
FROM (SELECT elder_id, metric, start, stop, since, first, cuts,
             coalesce(lo1, '-Infinity') AS lo1, coalesce(hi1, 'Infinity') AS hi1,
             coalesce(lo2, '-Infinity') AS lo2, coalesce(hi2, 'Infinity') AS hi2
        FROM json_to_recordset(%s::json) AS x(elder_id text, metric text, start timestamptz,
             stop timestamptz, since timestamptz, first timestamptz, cuts bool, lo1 float8,
             hi1 float8, lo2 float8, hi2 float8)) AS w
CROSS JOIN LATERAL (SELECT coalesce((
    SELECT o.time FROM observations o
    WHERE w.cuts AND o.elder_id = w.elder_id AND o.metric = w.metric
      AND o.time >= w.since AND o.time <= w.first AND NOT ('clock_skew' = ANY(o.flags))
      AND NOT (o.value BETWEEN w.lo1 AND w.hi1 OR o.value BETWEEN w.lo2 AND w.hi2)
    ORDER BY o.time DESC LIMIT 1), w.since) AS cut) AS c
CROSS JOIN LATERAL (
  (SELECT time, value FROM observations o
   WHERE o.elder_id = w.elder_id AND o.metric = w.metric AND o.time >= c.cut AND o.time < w.start
     AND NOT ('clock_skew' = ANY(o.flags))
   ORDER BY o.time DESC LIMIT 1)
  UNION ALL
  (SELECT time, value FROM observations o
   WHERE o.elder_id = w.elder_id AND o.metric = w.metric AND o.time >= greatest(c.cut, w.start)
     AND o.time <= w.stop AND NOT ('clock_skew' = ANY(o.flags))
   ORDER BY o.time DESC LIMIT %s)) AS o
"""

_EVENTS_SQL = (
    "SELECT w.elder_id, w.kind, e.time"
    " FROM unnest(%s::text[], %s::text[], %s::timestamptz[], %s::timestamptz[])"
    "   AS w(elder_id, kind, start, stop)"
    " JOIN device_events e ON e.elder_id = w.elder_id AND e.kind = w.kind"
    "   AND e.time >= w.start AND e.time <= w.stop AND NOT ('clock_skew' = ANY(e.flags))"
    " ORDER BY 1, 2, 3"
)


def _series_params(series: Sequence[Lookup]) -> tuple[Any, ...]:
    """The look-ups as one JSON document (orjson, in C), not eleven arrays that psycopg would
    adapt element by element in Python (a measured 6 % of the committer's time with the rules
    on). JSON has no infinity: an open band's end goes as null, read back as +-Infinity."""
    rows = []
    for x in series:
        bands = x.holds or ((-inf, inf),)
        (lo1, hi1), (lo2, hi2) = bands[0], bands[-1]
        rows.append(
            {
                "elder_id": x.elder_id,
                "metric": x.name,
                "start": x.start,
                "stop": x.end,
                "since": x.since or x.start,
                "first": x.first or x.start,
                "cuts": x.holds is not None,
                "lo1": _finite(lo1),
                "hi1": _finite(hi1),
                "lo2": _finite(lo2),
                "hi2": _finite(hi2),
            }
        )
    return (orjson.dumps(rows).decode(), SERIES_LIMIT)


def _finite(value: float) -> float | None:
    return value if isfinite(value) else None


def _event_params(events: Sequence[Lookup]) -> tuple[Any, ...]:
    return (
        [x.elder_id for x in events],
        [x.name for x in events],
        [x.start for x in events],
        [x.end for x in events],
    )


def _history_from(series_rows: Iterable[Sequence[Any]], event_rows: Iterable[Sequence[Any]]) -> History:
    points: dict[tuple[str, str], set[tuple[datetime, float]]] = defaultdict(set)
    for elder_id, metric, at, value in series_rows:
        points[(elder_id, metric)].add((at, value))
    times: dict[tuple[str, str], list[datetime]] = defaultdict(list)
    for elder_id, kind, at in event_rows:
        times[(elder_id, kind)].append(at)
    return History({k: sorted(v) for k, v in points.items()}, dict(times))


@dataclass(frozen=True, slots=True)
class DecisionState:
    """What deciding needs, read under the elders' locks: active alerts, recent resolutions
    (cool-down) and the history the scan asked for."""

    active: dict[str, dict[str, ActiveAlert]]
    resolved: dict[str, dict[str, tuple[datetime, Severity]]]
    history: History


_MARK_COLUMNS = [f"{metric}_{k}" for metric in news2_marks.MARKED for k in (1, 2, 3)]
_MARK_NEWS2_SQL = "".join(
    (
        "INSERT INTO news2_marks AS n (elder_id, {columns})",
        " SELECT elder_id, {columns} FROM json_to_recordset(%s::json) AS x(elder_id text, {typed})",
        " ORDER BY elder_id",
        " ON CONFLICT (elder_id) DO UPDATE SET {merged}",
        " RETURNING elder_id, {columns}",
    )
).format(
    columns=", ".join(_MARK_COLUMNS),
    typed=", ".join(f"{c} timestamptz" for c in _MARK_COLUMNS),
    merged=", ".join(f"{c} = greatest(n.{c}, excluded.{c})" for c in _MARK_COLUMNS),
)


def mark_news2(
    cur: psycopg.Cursor[Any], marks: Mapping[str, Sequence[datetime | None]]
) -> dict[str, list[datetime | None]]:
    """Add the batch's NEWS2 marks to the elders' rows; the rows as they now stand.

    One statement; the rows are locked in elder order until the batch commits, so a batch
    that marks one of these elders too waits, then reads these marks (news2_marks.py)."""
    if not marks:
        return {}
    doc = [dict(zip(_MARK_COLUMNS, m, strict=True), elder_id=e) for e, m in marks.items()]
    cur.execute(_MARK_NEWS2_SQL, (orjson.dumps(doc).decode(),))  # orjson writes RFC 3339
    return {row[0]: list(row[1:]) for row in cur.fetchall()}


def lock_and_read(
    cur: psycopg.Cursor[Any],
    elder_ids: Collection[str],
    resolved_since: datetime,
    series: Sequence[Lookup] = (),
    events: Sequence[Lookup] = (),
) -> DecisionState:
    """Take the elders' locks, then read their state and history: one round trip (psycopg's
    pipeline mode; PostgreSQL runs the statements in order, so every read follows the locks)."""
    conn = cur.connection
    ids = list(elder_ids)
    with conn.pipeline():
        lock_elders(cur, ids)
        reads = [conn.cursor() for _ in range(4)]
        reads[0].execute(_ACTIVE_SQL, (ids,))
        reads[1].execute(_RESOLVED_SQL, (ids, resolved_since))
        if series:
            reads[2].execute(_SERIES_SQL, _series_params(series))
        if events:
            reads[3].execute(_EVENTS_SQL, _event_params(events))
    active: dict[str, dict[str, ActiveAlert]] = defaultdict(dict)
    for row in reads[0].fetchall():
        _add_active(active, row)
    resolved: dict[str, dict[str, tuple[datetime, Severity]]] = defaultdict(dict)
    _add_resolved(resolved, reads[1].fetchall())
    history = _history_from(reads[2].fetchall() if series else (), reads[3].fetchall() if events else ())
    for c in reads:
        c.close()
    return DecisionState(active, resolved, history)


# ---- writing decisions -----------------------------------------------------------------


@dataclass(slots=True)
class Persisted:
    """What ``persist`` wrote, for metrics and logs."""

    opened: list[tuple[UUID, str, str]] = field(default_factory=list)  # (id, rule, severity)
    evidence: int = 0
    upgraded: int = 0
    cleared: int = 0
    superseded: int = 0
    timers_scheduled: int = 0
    timers_cancelled: int = 0
    tasks: int = 0
    suppressed: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    outbox: int = 0

    def counts(self) -> dict[str, int]:
        """Non-zero counts by decision kind (for the ``eldercare_rules_decisions`` metric)."""
        counts = {
            "alert_opened": len(self.opened),
            "evidence_added": self.evidence,
            "alert_upgraded": self.upgraded,
            "condition_cleared": self.cleared,
            "alert_superseded": self.superseded,
            "timer_scheduled": self.timers_scheduled,
            "timer_cancelled": self.timers_cancelled,
            "task_created": self.tasks,
            "outbox_row": self.outbox,
        }
        counts.update({f"suppressed_{reason}": n for reason, n in self.suppressed.items()})
        return {k: n for k, n in counts.items() if n}


def describe(match: Match) -> str:
    """One line of why: what matched, its value or event, and when (for history and logs)."""
    ev = match.evidence
    if ev.get("summary"):
        text = str(ev["summary"])
    elif "event" in ev:
        text = f"{ev['event']} at {ev.get('local_time', '?')} local"
        if ev.get("unanswered"):
            text += f", no {'/'.join(ev['unanswered'])} within {int(ev.get('waited_s', 0))} s"
    elif "aggregate" in ev:
        text = f"NEWS2 {ev['aggregate']}"
    else:
        text = f"{ev.get('metric')} {match.value:g}" if match.value is not None else str(ev.get("metric"))
        conditions = ev.get("level_conditions") or ev.get("conditions") or []
        if conditions:
            text += f" ({' or '.join(conditions)}"
            window = ev.get("window_s") or 0
            text += f" for {int(window)} s)" if window else ")"
    if ev.get("severity_reason"):
        text += f"; {ev['severity_reason']}"
    if match.late_by is not None:
        text += f"; late by {int(match.late_by.total_seconds())} s"
    return text


def persist(
    cur: psycopg.Cursor[Any], decisions: Iterable[Decision], now: datetime, actor: str = RULES_ACTOR
) -> Persisted:
    """Write the decisions in the caller's transaction (pipelined: one round trip for most)."""
    with cur.connection.pipeline():
        return _persist(cur, decisions, now, actor)


def _persist(cur: psycopg.Cursor[Any], decisions: Iterable[Decision], now: datetime, actor: str) -> Persisted:
    done = Persisted()
    plain: dict[UUID, list[Match]] = {}
    for d in decisions:
        match d:
            case OpenAlert():
                _open(cur, d, now, actor, done)
            case AddEvidence() if not (d.confirm or d.reopen):
                plain.setdefault(d.alert_id, []).append(d.match)  # one UPDATE for the batch
                done.evidence += 1
            case AddEvidence():
                _add_evidence(cur, d, now, actor)
                done.evidence += 1
            case UpgradeAlert():
                _upgrade(cur, d, now, actor, done)
            case ClearCondition():
                _clear(cur, d, now, actor)
                done.cleared += 1
            case SupersedeAlert():
                _supersede(cur, d, now, actor)
                done.superseded += 1
            case ScheduleTimer():
                timers.schedule(cur, d.kind, d.key, d.due_at, dict(d.payload), if_pending="keep")
                done.timers_scheduled += 1
            case CancelTimer():
                done.timers_cancelled += int(timers.cancel(cur, d.kind, d.key, now))
            case Suppressed():
                done.suppressed[d.reason.split(" ")[0].replace("-", "")] += 1
    if plain:
        _add_plain_evidence(cur, plain, now)
    if done.outbox:
        cur.execute("SELECT pg_notify(%s, %s)", (OUTBOX_CHANNEL, str(done.outbox)))
    return done


def _add_plain_evidence(cur: psycopg.Cursor[Any], plain: dict[UUID, list[Match]], now: datetime) -> None:
    """Further matches of active alerts, counted with the newest value and time: one UPDATE."""
    ids, counts, times, values = [], [], [], []
    for alert_id, matches in plain.items():
        newest = max(matches, key=lambda m: m.observed_at)
        ids.append(alert_id)
        counts.append(len(matches))
        times.append(newest.observed_at)
        values.append(newest.value)
    cur.execute(
        "UPDATE alerts a SET matches = a.matches + e.n, updated_at = %s,"
        " last_value = CASE WHEN e.at >= a.last_at THEN e.value ELSE a.last_value END,"
        " last_at = greatest(a.last_at, e.at)"
        " FROM unnest(%s::uuid[], %s::int[], %s::timestamptz[], %s::float8[]) AS e(id, n, at, value)"
        " WHERE a.id = e.id",
        (now, ids, counts, times, values),
    )


def _history(
    cur: psycopg.Cursor[Any],
    alert_id: UUID,
    now: datetime,
    actor: str,
    from_state: str | None,
    to_state: str,
    from_severity: str | None,
    to_severity: str,
    reason: str,
) -> None:
    cur.execute(
        "INSERT INTO alert_history (alert_id, at, actor, from_state, to_state, from_severity,"
        " to_severity, reason) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
        (alert_id, now, actor, from_state, to_state, from_severity, to_severity, reason),
    )


def _outbox(
    cur: psycopg.Cursor[Any], alert_id: UUID, reason: str, severity: str, route: str, now: datetime
) -> None:
    cur.execute(
        "INSERT INTO alert_outbox (alert_id, reason, severity, route, created_at)"
        " VALUES (%s, %s, %s, %s, %s)",
        (alert_id, reason, severity, route, now),
    )


def _open(cur: psycopg.Cursor[Any], d: OpenAlert, now: datetime, actor: str, done: Persisted) -> None:
    m = d.match
    late_by = m.late_by.total_seconds() if m.late_by is not None else None
    evidence = dict(m.evidence)
    if late_by is not None:
        evidence["late_by_s"] = late_by
        if d.severity != m.severity:
            evidence["acted_on_as"] = str(d.severity)
    cur.execute(
        "INSERT INTO alerts (id, elder_id, rule, severity, raised_severity, route, device_id,"
        " observed_at, raised_at, late, late_by_s, title_zh, title_en, evidence, last_value, last_at,"
        " updated_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
        (
            d.alert_id,
            m.elder_id,
            m.rule_id,
            str(d.severity),
            str(m.severity),
            d.route,
            m.device_id,
            m.observed_at,
            now,
            late_by is not None,
            late_by,
            d.title_zh,
            d.title_en,
            _json(evidence),
            m.value,
            m.observed_at,
            now,
        ),
    )
    _history(cur, d.alert_id, now, actor, None, "open", None, str(d.severity), f"raised: {describe(m)}")
    _outbox(cur, d.alert_id, "raised", str(d.severity), d.route, now)
    done.outbox += 1
    done.opened.append((d.alert_id, m.rule_id, str(d.severity)))
    if d.task is not None:
        cur.execute(
            "INSERT INTO tasks (elder_id, kind, assignee, due_at, created_at, source_alert, source_rule)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s)",
            (m.elder_id, d.task.kind, d.task.assignee, d.task.due_at, now, d.alert_id, m.rule_id),
        )
        done.tasks += 1


def _add_evidence(cur: psycopg.Cursor[Any], d: AddEvidence, now: datetime, actor: str) -> None:
    m = d.match
    cur.execute(
        "UPDATE alerts SET matches = matches + 1,"
        " last_value = CASE WHEN %s >= last_at THEN %s ELSE last_value END, last_at = greatest(last_at, %s),"
        " confirmed = confirmed OR %s, state = CASE WHEN %s THEN 'open' ELSE state END, updated_at = %s"
        " WHERE id = %s RETURNING severity",
        (m.observed_at, m.value, m.observed_at, d.confirm, d.reopen, now, d.alert_id),
    )
    row = cur.fetchone()
    severity = row[0] if row else str(m.severity)
    if d.reopen:
        _history(
            cur,
            d.alert_id,
            now,
            actor,
            "condition_cleared",
            "open",
            severity,
            severity,
            f"condition back: {describe(m)}",
        )
    if d.confirm:
        _history(cur, d.alert_id, now, actor, "open", "open", severity, severity, f"confirmed: {describe(m)}")


def _upgrade(cur: psycopg.Cursor[Any], d: UpgradeAlert, now: datetime, actor: str, done: Persisted) -> None:
    m = d.match
    cur.execute(
        "UPDATE alerts SET severity = %s, raised_severity = %s, route = %s, state = 'open',"
        " matches = matches + 1, last_value = %s, last_at = greatest(last_at, %s), updated_at = %s,"
        " evidence = evidence || jsonb_build_object('upgraded', %s::jsonb) WHERE id = %s",
        (
            str(d.severity),
            str(max(d.severity, m.severity)),
            d.route,
            m.value,
            m.observed_at,
            now,
            _json(dict(m.evidence)),
            d.alert_id,
        ),
    )
    _history(
        cur,
        d.alert_id,
        now,
        actor,
        d.from_state,
        "open",
        str(d.from_severity),
        str(d.severity),
        f"upgraded: {describe(m)}",
    )
    _outbox(cur, d.alert_id, "upgraded", str(d.severity), d.route, now)
    done.outbox += 1
    done.upgraded += 1


def _clear(cur: psycopg.Cursor[Any], d: ClearCondition, now: datetime, actor: str) -> None:
    cur.execute(
        "UPDATE alerts SET state = 'condition_cleared', updated_at = %s,"
        " evidence = evidence || jsonb_build_object('cleared', %s::jsonb) WHERE id = %s",
        (now, _json({"at": d.at.isoformat(), **d.evidence}), d.alert_id),
    )
    if "reason" in d.evidence:  # the scheduled rules say why in their own words
        why = f"condition cleared: {d.evidence['reason']}"
    else:
        margin, window = float(d.evidence.get("margin", 0)), int(d.evidence.get("window_s", 0))
        why = f"back inside the band by {margin:.0%} for {window} s"
    _history(
        cur, d.alert_id, now, actor, d.from_state, "condition_cleared", str(d.severity), str(d.severity), why
    )


def _supersede(cur: psycopg.Cursor[Any], d: SupersedeAlert, now: datetime, actor: str) -> None:
    cur.execute(
        "UPDATE alerts SET state = 'superseded', superseded_by = %s, closed_at = %s, updated_at = %s"
        " WHERE id = %s",
        (d.by_alert, now, now, d.alert_id),
    )
    moved = {"alert_id": str(d.alert_id), "rule": d.rule_id, "evidence": dict(d.evidence)}
    cur.execute(
        "UPDATE alerts SET evidence = jsonb_set(evidence, '{superseded}',"
        " coalesce(evidence->'superseded', '[]'::jsonb) || %s::jsonb) WHERE id = %s",
        (_json([moved]), d.by_alert),
    )
    _history(
        cur,
        d.alert_id,
        now,
        actor,
        d.from_state,
        "superseded",
        str(d.severity),
        str(d.severity),
        f"superseded by the higher alert {d.by_alert}",
    )


# ---- staff actions (CLI now, the API later) ----------------------------------------------


class AlertNotFound(LookupError):
    """No alert with that id."""


class InvalidTransition(ValueError):
    """The alert is not in a state that allows this."""


def acknowledge(conn: psycopg.Connection[Any], alert_id: UUID, actor: str, note: str, now: datetime) -> str:
    """Mark an active alert acknowledged; its previous state."""
    return _transition(
        conn,
        alert_id,
        actor,
        now,
        "acknowledged",
        note or "acknowledged",
        allowed=("open", "dispatched", "escalated", "condition_cleared"),
    )


def resolve(conn: psycopg.Connection[Any], alert_id: UUID, actor: str, outcome: str, now: datetime) -> str:
    """Resolve an active alert with its outcome (the rule's cool-down starts); its previous state."""
    return _transition(
        conn, alert_id, actor, now, "resolved", f"resolved: {outcome}", allowed=_ACTIVE, outcome=outcome
    )


def _transition(
    conn: psycopg.Connection[Any],
    alert_id: UUID,
    actor: str,
    now: datetime,
    to_state: str,
    reason: str,
    allowed: Sequence[str],
    outcome: str | None = None,
) -> str:
    with conn.transaction(), conn.cursor() as cur:
        cur.execute("SELECT state, severity FROM alerts WHERE id = %s FOR UPDATE", (alert_id,))
        row = cur.fetchone()
        if row is None:
            raise AlertNotFound(str(alert_id))
        state, severity = row
        if state not in allowed:
            raise InvalidTransition(f"alert {alert_id} is {state}: cannot become {to_state}")
        closing = to_state == "resolved"
        cur.execute(
            "UPDATE alerts SET state = %s, updated_at = %s, outcome = coalesce(%s, outcome),"
            " closed_at = CASE WHEN %s THEN %s ELSE closed_at END WHERE id = %s",
            (to_state, now, outcome, closing, now, alert_id),
        )
        _history(cur, alert_id, now, actor, state, to_state, severity, severity, reason)
        if closing:
            close_dispatches(cur, alert_id, now)
    return str(state)


@dataclass(frozen=True, slots=True)
class AlertRow:
    """An alert as listed."""

    id: UUID
    elder_id: str
    rule: str
    severity: str
    state: str
    raised_at: datetime
    observed_at: datetime
    late: bool
    matches: int
    last_value: float | None
    last_at: datetime
    title_en: str
    title_zh: str
    route: str
    device_id: str | None


_ALERT_COLUMNS = (
    "id, elder_id, rule, severity, state, raised_at, observed_at, late, matches, last_value, last_at,"
    " title_en, title_zh, route, device_id"
)


def list_alerts(
    conn: psycopg.Connection[Any],
    *,
    states: Sequence[str] | None = None,
    severity: str | None = None,
    elder_id: str | None = None,
    rule: str | None = None,
    since: datetime | None = None,
    limit: int = 50,
) -> list[AlertRow]:
    """Alerts, newest first, filtered."""
    where: list[str] = ["true"]
    args: list[Any] = []
    if states:
        where.append("state = ANY(%s)")
        args.append(list(states))
    for column, value in (("severity", severity), ("elder_id", elder_id), ("rule", rule)):
        if value:
            where.append(f"{column} = %s")
            args.append(value)
    if since is not None:
        where.append("raised_at >= %s")
        args.append(since)
    rows = conn.execute(
        f"SELECT {_ALERT_COLUMNS} FROM alerts WHERE {' AND '.join(where)} ORDER BY raised_at DESC LIMIT %s",
        (*args, limit),
    ).fetchall()
    return [AlertRow(*r) for r in rows]


@dataclass(frozen=True, slots=True)
class AlertDetail:
    """One alert with its evidence, history, outbox rows and tasks."""

    alert: AlertRow
    evidence: dict[str, Any]
    confirmed: bool
    late_by_s: float | None
    outcome: str | None
    history: list[tuple[datetime, str, str | None, str, str | None, str, str]]
    outbox: list[tuple[int, str, str, str, datetime]]
    tasks: list[tuple[int, str, str, str, datetime]]
    #: The dispatch trail: (channel, step, state, ack status, attempts, created, delivered,
    #: acknowledged, notice), in the order they were opened.
    dispatches: list[tuple[Any, ...]] = field(default_factory=list)


def get_alert(conn: psycopg.Connection[Any], alert_id: UUID) -> AlertDetail:
    """One alert, all it says about itself; AlertNotFound if there is none."""
    row = conn.execute(
        f"SELECT {_ALERT_COLUMNS}, evidence, confirmed, late_by_s, outcome FROM alerts WHERE id = %s",
        (alert_id,),
    ).fetchone()
    if row is None:
        raise AlertNotFound(str(alert_id))
    history = conn.execute(
        "SELECT at, actor, from_state, to_state, from_severity, to_severity, reason FROM alert_history"
        " WHERE alert_id = %s ORDER BY id",
        (alert_id,),
    ).fetchall()
    outbox = conn.execute(
        "SELECT id, reason, severity, route, created_at FROM alert_outbox WHERE alert_id = %s ORDER BY id",
        (alert_id,),
    ).fetchall()
    tasks = conn.execute(
        "SELECT id, kind, assignee, state, due_at FROM tasks WHERE source_alert = %s ORDER BY id", (alert_id,)
    ).fetchall()
    dispatches = conn.execute(
        "SELECT channel, step, state, ack_status, attempts, created_at, delivered_at, acked_at, notice"
        " FROM dispatches WHERE alert_id = %s ORDER BY created_at, step, channel",
        (alert_id,),
    ).fetchall()
    return AlertDetail(
        AlertRow(*row[:15]), row[15], row[16], row[17], row[18], history, outbox, tasks, dispatches
    )


@dataclass(frozen=True, slots=True)
class TaskRow:
    """A follow-up task as listed."""

    id: int
    elder_id: str
    kind: str
    assignee: str
    state: str
    due_at: datetime
    created_at: datetime
    source_alert: UUID | None
    source_rule: str | None


def list_tasks(
    conn: psycopg.Connection[Any],
    *,
    assignee: str | None = None,
    states: Sequence[str] = ("open", "escalated"),
    elder_id: str | None = None,
    limit: int = 100,
) -> list[TaskRow]:
    """Tasks, soonest due first."""
    where: list[str] = ["state = ANY(%s)"]
    args: list[Any] = [list(states)]
    for column, value in (("assignee", assignee), ("elder_id", elder_id)):
        if value:
            where.append(f"{column} = %s")
            args.append(value)
    rows = conn.execute(
        "SELECT id, elder_id, kind, assignee, state, due_at, created_at, source_alert, source_rule"
        f" FROM tasks WHERE {' AND '.join(where)} ORDER BY due_at LIMIT %s",
        (*args, limit),
    ).fetchall()
    return [TaskRow(*r) for r in rows]


def complete_task(
    conn: psycopg.Connection[Any], task_id: int, actor: str, outcome: str, now: datetime
) -> bool:
    """Mark an open task done with its outcome; False if there is no open task with that id."""
    with conn.transaction():
        row = conn.execute(
            "UPDATE tasks SET state = 'done', done_at = %s, done_by = %s, outcome = %s"
            " WHERE id = %s AND state IN ('open', 'escalated') RETURNING id",
            (now, actor, outcome, task_id),
        ).fetchone()
    return row is not None


def resolved_since(now: datetime, cooldowns: Iterable[timedelta]) -> datetime:
    """How far back resolutions matter: the longest cool-down."""
    return now - max(cooldowns, default=timedelta(0))

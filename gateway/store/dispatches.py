"""Dispatches in the store: outbox rows turned into dispatches, due ones claimed, outcomes kept.

Each function is one short transaction; delivery happens between them, outside any. A claim
leases a dispatch (``claimed_until``): a dispatcher killed before it records the outcome
leaves a lease that runs out, and the dispatch is claimed again (at-least-once, same id). Two
dispatchers never claim one dispatch at once (``FOR UPDATE SKIP LOCKED`` and the lease).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeGuard
from uuid import UUID

import psycopg

from eldercare.alerts.dispatch.adapter import Delivered, Outcome, Permanent, Retryable
from eldercare.alerts.dispatch.routing import (
    AckStatus,
    AfterAttempt,
    DispatchView,
    Next,
    Routing,
    ack_moves,
    deadline_escalation,
    escalation_step,
    to_supersede,
)
from eldercare.gateway.store import timers

#: What dispatchers LISTEN on besides the outbox: a dispatch became due (a retry, an escalation).
DISPATCH_CHANNEL = "eldercare_dispatch"
#: Who the alert history names for the dispatcher's changes.
ACTOR = "dispatcher"


@dataclass(frozen=True, slots=True)
class Claimed:
    """A dispatch this dispatcher holds the lease of: deliver attempt ``attempt`` now."""

    id: UUID
    alert_id: UUID
    channel: str
    attempt: int
    notice: str | None = None  # 'superseded': a notice about dispatch ``notice_of``
    notice_of: UUID | None = None


#: The durable timer of a route step's deadline: (kind, key = "<alert id>:<outbox id>:<step>").
ESCALATION_TIMER = "dispatch_escalation"
#: Alert states in which escalation still means something.
_ACTIVE = ("open", "dispatched", "escalated")


def take_outbox(
    conn: psycopg.Connection[Any], routing: Routing, now: datetime, lease: timedelta, limit: int = 100
) -> tuple[list[Claimed], list[int], int]:
    """Turn pending outbox rows into dispatches of their route's first step, leased to us.

    Returns the claimed dispatches (attempt 1 each, to deliver now), the outbox ids that
    asked for nobody (their route's channels are not configured here) and how many rows were
    taken (``limit``: there may be more). A step with a deadline gets its escalation timer in
    the same transaction.
    """
    claimed: list[Claimed] = []
    empty: list[int] = []
    with conn.transaction(), conn.cursor() as cur:
        cur.execute(
            "SELECT o.id, o.alert_id, o.route, (SELECT min(t.due_at) FROM tasks t"
            "   WHERE t.source_alert = o.alert_id AND t.state = 'open')"
            " FROM alert_outbox o WHERE o.done_at IS NULL"
            " ORDER BY o.id LIMIT %s FOR UPDATE OF o SKIP LOCKED",
            (limit,),
        )
        rows = cur.fetchall()
        for outbox_id, alert_id, route, task_due in rows:
            opened = _open_step(cur, alert_id, outbox_id, route, 0, routing, now, lease, task_due)
            if not opened:
                empty.append(outbox_id)
            claimed += opened
        if rows:
            cur.execute(
                "UPDATE alert_outbox SET claimed_at = %s, done_at = %s WHERE id = ANY(%s)",
                (now, now, [r[0] for r in rows]),
            )
    return claimed, empty, len(rows)


def _open_step(
    cur: psycopg.Cursor[Any],
    alert_id: UUID,
    outbox_id: int,
    route: str,
    step: int,
    routing: Routing,
    now: datetime,
    lease: timedelta | None,
    task_due: datetime | None = None,
) -> list[Claimed]:
    """Insert a route step's dispatches, due now (leased to the caller when ``lease``), and
    schedule the step's escalation at its deadline (a follow-up's: its task's due date).

    A step that names no channel this deployment configured is passed over for the next one
    at once: an alert that a later step can deliver never waits for a deadline of nobody.
    """
    planned = routing.step(route, step)
    while not planned and step + 1 < routing.steps_of(route):
        step += 1
        planned = routing.step(route, step)
    claimed = []
    for p in planned:
        cur.execute(
            "INSERT INTO dispatches (alert_id, outbox_id, channel, route, step, counts_as_ack,"
            " attempts, next_attempt_at, claimed_until, created_at)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
            " ON CONFLICT (alert_id, outbox_id, channel) DO NOTHING RETURNING id",
            (
                alert_id,
                outbox_id,
                p.channel,
                route,
                p.step,
                p.counts_as_ack,
                1 if lease else 0,
                now,
                now + lease if lease else None,
                now,
            ),
        )
        row = cur.fetchone()
        if row is not None:
            claimed.append(Claimed(row[0], alert_id, p.channel, 1))
    deadline = routing.deadline(route, step, now, task_due)
    if claimed and deadline is not None:
        payload = {"alert_id": str(alert_id), "outbox_id": outbox_id, "step": step}
        timers.schedule(
            cur, ESCALATION_TIMER, f"{alert_id}:{outbox_id}:{step}", deadline, payload, if_pending="keep"
        )
    return claimed


def escalate(
    cur: psycopg.Cursor[Any],
    alert_id: UUID,
    routing: Routing,
    now: datetime,
    *,
    deadline_of: tuple[int, int] | None = None,
) -> int | None:
    """Open the alert's next route step if its state calls for it; the step opened, or None.

    ``deadline_of``: (outbox id, step) whose deadline came: escalate unless someone whose ack
    counts answered (nothing if an upgrade has since started another route). Without it:
    after a failure or a decline, escalate once every channel of the step whose ack counts
    failed or declined. The alert's row is locked first, so a deadline and a failure arriving
    together open the next step once. Only the dispatches of the alert's latest outbox row
    count: an upgrade started a route of its own.
    """
    cur.execute("SELECT state FROM alerts WHERE id = %s FOR UPDATE", (alert_id,))
    row = cur.fetchone()
    if row is None or row[0] not in _ACTIVE:
        return None
    cur.execute(
        "SELECT id, step, counts_as_ack, state, ack_status, route, outbox_id FROM dispatches"
        " WHERE alert_id = %s AND outbox_id = (SELECT max(outbox_id) FROM dispatches WHERE alert_id = %s)",
        (alert_id, alert_id),
    )
    rows = cur.fetchall()
    if not rows:
        return None
    route_name, outbox_id = rows[0][5], rows[0][6]
    route = routing.routes.get(route_name)
    if route is None or (deadline_of is not None and deadline_of[0] != outbox_id):
        return None
    views = [DispatchView(str(r[0]), r[1], r[2], r[3], r[4]) for r in rows]
    if deadline_of is None:
        to = escalation_step(route, views)
    else:
        to = deadline_escalation(route, views, deadline_of[1])
    if to is None:
        return None
    opened = _open_step(cur, alert_id, outbox_id, route_name, to, routing, now, None)
    cur.execute(
        "UPDATE alerts SET state = 'escalated', updated_at = %s WHERE id = %s RETURNING severity",
        (now, alert_id),
    )
    severity = next(iter(cur.fetchone() or ()), None)
    why = f"step {to + 1} of route {route_name}: " + (
        "nobody acknowledged in time" if deadline_of is not None else "every channel refused or declined"
    )
    cur.execute(
        "INSERT INTO alert_history (alert_id, at, actor, from_state, to_state, from_severity,"
        " to_severity, reason) VALUES (%s, %s, %s, %s, 'escalated', %s, %s, %s)",
        (alert_id, now, ACTOR, row[0], severity, severity, why),
    )
    if opened:
        cur.execute(f"NOTIFY {DISPATCH_CHANNEL}")
    return to


def claim_due(
    conn: psycopg.Connection[Any], now: datetime, lease: timedelta, limit: int = 100
) -> list[Claimed]:
    """Lease the pending dispatches that are due (and whose last lease, if any, ran out)."""
    with conn.transaction(), conn.cursor() as cur:
        cur.execute(
            "UPDATE dispatches d SET claimed_until = %(until)s, attempts = d.attempts + 1"
            " FROM (SELECT id FROM dispatches WHERE state = 'pending' AND next_attempt_at <= %(now)s"
            "       AND (claimed_until IS NULL OR claimed_until <= %(now)s)"
            "       ORDER BY next_attempt_at LIMIT %(limit)s FOR UPDATE SKIP LOCKED) due"
            " WHERE d.id = due.id RETURNING d.id, d.alert_id, d.channel, d.attempts, d.notice, d.notice_of",
            {"until": now + lease, "now": now, "limit": limit},
        )
        return [Claimed(*row) for row in cur.fetchall()]


def next_due(conn: psycopg.Connection[Any]) -> datetime | None:
    """When the next pending dispatch is due (or its lease runs out), if any is pending."""
    with conn.cursor() as cur:
        cur.execute(
            "SELECT min(greatest(next_attempt_at, coalesce(claimed_until, next_attempt_at)))"
            " FROM dispatches WHERE state = 'pending'"
        )
        row = cur.fetchone()
    return row[0] if row else None


_DOCUMENT_SQL = """
SELECT a.id, a.rule, a.severity, a.title_zh, a.title_en, a.raised_at, a.late, a.late_by_s,
       a.evidence, a.device_id, a.elder_id, d.type,
       p.name, p.sex, p.birth_year, p.phone, p.address, p.latitude, p.longitude,
       coalesce(cp.plan -> 'conditions', '[]'::jsonb), p.medications, p.allergies,
       p.emergency_contacts, p.family_doctor,
       (SELECT coalesce(jsonb_object_agg(v.metric, jsonb_build_object(
                 'value', v.value, 'at', v.time)), '{}'::jsonb)
          FROM (SELECT DISTINCT ON (o.metric) o.metric, o.value, o.time
                  FROM observations o
                 WHERE o.elder_id = a.elder_id AND o.time > a.raised_at - interval '1 hour'
                   AND NOT ('clock_skew' = ANY(o.flags))
                   AND o.time <= a.raised_at + interval '1 minute'
                 ORDER BY o.metric, o.time DESC) v)
FROM alerts a
LEFT JOIN devices d ON d.device_id = a.device_id
LEFT JOIN elder_profiles p ON p.elder_id = a.elder_id
LEFT JOIN care_plans cp ON cp.elder_id = a.elder_id
WHERE a.id = ANY(%s)
"""


def documents(
    conn: psycopg.Connection[Any], alert_ids: Sequence[UUID], units: Mapping[str, str]
) -> dict[UUID, dict[str, Any]]:
    """The spec's request body of each alert, before the per-dispatch fields and minimisation
    (``units``: each metric's canonical unit, from the device catalog).

    Personal data (name, phone, address, home, medications, allergies, emergency contacts,
    family doctor) comes from ``elder_profiles``, which only the dispatcher and authorised
    roles read; it goes to the channels allowed it, never to a log. Lists are empty and
    ``family_doctor`` is None when nothing is known (or there is no profile).

    ``elder.location`` is where the device said it was at the event that raised the alert (its
    latest upgrade's event if one carried a position), with the fix's ``accuracy_m`` when the
    device gave one: the wristband's position at a fall beats the home address. The alert's
    evidence keeps the event's details as they came (``alerts/engine.py``), so this costs no
    look-up in ``device_events``. Otherwise the home position from the profile; otherwise None.
    ``source`` says which ("device" or "home").
    """
    if not alert_ids:
        return {}
    with conn.cursor() as cur:
        cur.execute(_DOCUMENT_SQL, (list(alert_ids),))
        rows = cur.fetchall()
    out: dict[UUID, dict[str, Any]] = {}
    for (
        alert_id, rule, severity, title_zh, title_en, raised_at, late, late_by_s, evidence,
        device_id, elder_id, device_type, name, sex, birth_year, phone, address, home_lat, home_lon,
        conditions, medications, allergies, contacts, family_doctor, vitals,
    ) in rows:  # fmt: skip
        alert = {
            "id": str(alert_id),
            "rule": rule,
            "severity": severity,
            "title": f"{title_zh} / {title_en}",
            "raised_at": raised_at.isoformat(),
            "late": late,
            "evidence": evidence,
        }
        if late and late_by_s is not None:
            alert["late_by_s"] = late_by_s
        location = event_location(evidence)
        if location is None and home_lat is not None and home_lon is not None:
            location = {"lat": home_lat, "lon": home_lon, "source": "home"}
        out[alert_id] = {
            "alert": alert,
            "elder": {
                "id": elder_id,
                "name": name,
                "sex": sex,
                "birth_year": birth_year,
                "phone": phone,
                "address": address,
                "location": location,
                "conditions": list(conditions),
                "medications": list(medications or ()),
                "allergies": list(allergies or ()),
                "emergency_contacts": list(contacts or ()),
                "family_doctor": family_doctor,
            },
            "latest_vitals": {m: {**v, "unit": units.get(m, "")} for m, v in vitals.items()},
            "device": {"id": device_id, "type": device_type} if device_id else None,
        }
    return out


def event_location(evidence: Any) -> dict[str, Any] | None:
    """The position the alert's event carried (``details.location`` of its evidence; the latest
    upgrade's first), or None when there is none usable.

    Devices' positions are not checked at ingest (``location`` is a detail of the event): a
    value that is not a WGS 84 position is passed over here, never sent.
    """
    if not isinstance(evidence, Mapping):
        return None
    for part in (evidence.get("upgraded"), evidence):
        details = part.get("details") if isinstance(part, Mapping) else None
        given = details.get("location") if isinstance(details, Mapping) else None
        if not isinstance(given, Mapping):
            continue
        lat, lon = given.get("lat"), given.get("lon")
        if _degrees(lat, 90) and _degrees(lon, 180):
            location: dict[str, Any] = {"lat": lat, "lon": lon}
            accuracy = given.get("accuracy_m")
            if _number(accuracy) and accuracy >= 0:
                location["accuracy_m"] = accuracy
            location["source"] = "device"
            return location
    return None


def _number(value: object) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _degrees(value: object, limit: float) -> bool:
    return _number(value) and -limit <= value <= limit


def record_outcome(
    conn: psycopg.Connection[Any],
    claimed: Claimed,
    started_at: datetime,
    outcome: Outcome,
    decision: AfterAttempt,
    now: datetime,
    dispatcher: str,
) -> bool:
    """Keep the attempt and move the dispatch on; False if it was no longer ours to move
    (superseded meanwhile, or a lease that ran out and another dispatcher took it)."""
    status = getattr(outcome, "status", None)
    reason = None if isinstance(outcome, Delivered) else outcome.reason
    retry_after = outcome.retry_after_s if isinstance(outcome, Retryable) else None
    kind = {Delivered: "delivered", Retryable: "retryable", Permanent: "permanent"}[type(outcome)]
    with conn.transaction(), conn.cursor() as cur:
        cur.execute(
            "INSERT INTO dispatch_attempts (dispatch_id, number, started_at, latency_ms, outcome, status,"
            " reason, retry_after_s, next_attempt_at, dispatcher) VALUES (%s, %s, %s, %s, %s, %s, %s, %s,"
            " %s, %s)",
            (
                claimed.id,
                claimed.attempt,
                started_at,
                outcome.latency_s * 1000.0,
                kind,
                status,
                reason,
                retry_after,
                decision.next_attempt_at,
                dispatcher,
            ),
        )
        if decision.next is Next.delivered:
            reference = outcome.reference if isinstance(outcome, Delivered) else None
            cur.execute(
                "UPDATE dispatches SET state = 'delivered', delivered_at = %s, reference = %s,"
                " claimed_until = NULL, last_error = NULL"
                " WHERE id = %s AND state = 'pending' AND attempts = %s",
                (now, reference, claimed.id, claimed.attempt),
            )
        elif decision.next is Next.retry:
            cur.execute(
                "UPDATE dispatches SET next_attempt_at = %s, claimed_until = NULL, last_error = %s"
                " WHERE id = %s AND state = 'pending' AND attempts = %s",
                (decision.next_attempt_at, reason, claimed.id, claimed.attempt),
            )
        else:
            cur.execute(
                "UPDATE dispatches SET state = 'failed', claimed_until = NULL, last_error = %s"
                " WHERE id = %s AND state = 'pending' AND attempts = %s",
                (reason, claimed.id, claimed.attempt),
            )
        moved = cur.rowcount == 1
        if moved and decision.next is Next.delivered and claimed.notice is None:
            _mark_dispatched(cur, claimed.alert_id, now)
        if moved and decision.next is Next.retry:
            cur.execute(f"NOTIFY {DISPATCH_CHANNEL}")
    return moved


def _mark_dispatched(cur: psycopg.Cursor[Any], alert_id: UUID, now: datetime) -> None:
    """The alert's first delivery: open -> dispatched, in its history."""
    cur.execute(
        "UPDATE alerts SET state = 'dispatched', updated_at = %s WHERE id = %s AND state = 'open'"
        " RETURNING severity",
        (now, alert_id),
    )
    row = cur.fetchone()
    if row is not None:
        cur.execute(
            "INSERT INTO alert_history (alert_id, at, actor, from_state, to_state, from_severity,"
            " to_severity, reason) VALUES (%s, %s, %s, 'open', 'dispatched', %s, %s, %s)",
            (alert_id, now, ACTOR, row[0], row[0], "delivered to a channel"),
        )


@dataclass(frozen=True, slots=True)
class AckResult:
    """What an acknowledgement did: the dispatch's status now, and what followed from it."""

    dispatch_id: UUID
    ack_status: str | None
    moved: bool
    alert_acknowledged: bool = False  # this was the first counting acknowledgement
    superseded: tuple[UUID, ...] = ()
    escalated_to: int | None = None  # the route step a decline opened


def acknowledge(
    conn: psycopg.Connection[Any],
    dispatch_id: UUID,
    channel: str,
    status: AckStatus,
    routing: Routing,
    now: datetime,
    *,
    operator: str | None = None,
    reference: str | None = None,
    note: str | None = None,
) -> AckResult | None:
    """Record a hotline's acknowledgement; None if the dispatch is not that channel's.

    Forward only and idempotent (``routing.ack_moves``); every ack is kept in
    ``dispatch_acks``. The first acknowledgement of a channel whose ack counts wins: the
    alert becomes ``acknowledged`` and the other open dispatches that count are
    ``superseded`` (their retries stop). ``declined`` escalates once every counting channel
    of the step has declined or failed.
    """
    with conn.transaction(), conn.cursor() as cur:
        cur.execute(
            "SELECT alert_id FROM dispatches WHERE id = %s AND channel = %s AND notice IS NULL",
            (dispatch_id, channel),
        )
        row = cur.fetchone()
        if row is None:
            return None
        alert_id = row[0]
        # The alert first, as escalate() does: one order of locks, no deadlock between them.
        cur.execute("SELECT state FROM alerts WHERE id = %s FOR UPDATE", (alert_id,))
        alert_state = next(iter(cur.fetchone() or ()), None)
        cur.execute(
            "SELECT ack_status, counts_as_ack, outbox_id FROM dispatches WHERE id = %s FOR UPDATE",
            (dispatch_id,),
        )
        current, counts, outbox_id = cur.fetchone() or (None, False, None)
        moved = ack_moves(current, status)
        cur.execute(
            "INSERT INTO dispatch_acks (dispatch_id, at, channel, status, moved, operator, reference, note)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
            (dispatch_id, now, channel, status.value, moved, operator, reference, note),
        )
        if not moved:
            return AckResult(dispatch_id, current, False)
        declined = status is AckStatus.declined
        cur.execute(
            "UPDATE dispatches SET ack_status = %s, acked_at = coalesce(acked_at, %s),"
            " reference = coalesce(%s, reference), claimed_until = NULL,"
            " state = CASE WHEN %s THEN state ELSE 'acknowledged' END WHERE id = %s",
            (status.value, now, reference, declined, dispatch_id),
        )
        if declined:
            escalated = escalate(cur, alert_id, routing, now)
            return AckResult(dispatch_id, status.value, True, escalated_to=escalated)
        if not counts or alert_state not in _ACTIVE:
            return AckResult(dispatch_id, status.value, True)
        cur.execute(
            "SELECT id, step, counts_as_ack, state, ack_status FROM dispatches"
            " WHERE alert_id = %s AND outbox_id = %s",
            (alert_id, outbox_id),
        )
        views = [DispatchView(str(r[0]), r[1], r[2], r[3], r[4]) for r in cur.fetchall()]
        losers = [UUID(i) for i in to_supersede(views, str(dispatch_id))]
        supersede(cur, losers, now)
        cur.execute(
            "UPDATE alerts SET state = 'acknowledged', updated_at = %s WHERE id = %s RETURNING severity",
            (now, alert_id),
        )
        severity = next(iter(cur.fetchone() or ()), None)
        cur.execute(
            "INSERT INTO alert_history (alert_id, at, actor, from_state, to_state, from_severity,"
            " to_severity, reason) VALUES (%s, %s, %s, %s, 'acknowledged', %s, %s, %s)",
            (
                alert_id,
                now,
                f"channel:{channel}",
                alert_state,
                severity,
                severity,
                f"{channel}: {status.value}",
            ),
        )
        # Nobody needs to escalate any more: the deadlines of this alert's steps are moot.
        _cancel_deadlines(cur, alert_id, now)
        return AckResult(dispatch_id, status.value, True, True, tuple(losers))


def supersede(cur: psycopg.Cursor[Any], dispatch_ids: Sequence[UUID], now: datetime) -> int:
    """Stop these dispatches (retries too) and tell the channels that may have them: a
    ``superseded`` notice to each that was delivered or tried at least once; how many notices."""
    if not dispatch_ids:
        return 0
    cur.execute(
        "UPDATE dispatches SET state = 'superseded', claimed_until = NULL"
        " WHERE id = ANY(%s) AND state IN ('pending', 'delivered')",
        (list(dispatch_ids),),
    )
    cur.execute(
        "INSERT INTO dispatches (alert_id, channel, route, step, counts_as_ack, notice, notice_of,"
        " next_attempt_at, created_at)"
        " SELECT alert_id, channel, route, step, false, 'superseded', id, %s, %s FROM dispatches"
        " WHERE id = ANY(%s) AND attempts > 0 AND notice IS NULL ON CONFLICT (notice_of) DO NOTHING",
        (now, now, list(dispatch_ids)),
    )
    notices = cur.rowcount
    if notices:
        cur.execute(f"NOTIFY {DISPATCH_CHANNEL}")
    return notices


def close_dispatches(cur: psycopg.Cursor[Any], alert_id: UUID, now: datetime) -> int:
    """The alert is over (resolved): its open dispatches are superseded (retries stop, the
    channels that had it are told) and its route's deadlines cancelled; how many notices."""
    cur.execute(
        "SELECT id FROM dispatches WHERE alert_id = %s AND notice IS NULL"
        " AND state IN ('pending', 'delivered')"
        " AND (ack_status IS NULL OR ack_status NOT IN ('closed', 'declined'))",
        (alert_id,),
    )
    open_ids = [r[0] for r in cur.fetchall()]
    _cancel_deadlines(cur, alert_id, now)
    return supersede(cur, open_ids, now)


def _cancel_deadlines(cur: psycopg.Cursor[Any], alert_id: UUID, now: datetime) -> None:
    cur.execute(
        "UPDATE timers SET cancelled_at = %s WHERE kind = %s AND key LIKE %s"
        " AND fired_at IS NULL AND cancelled_at IS NULL",
        (now, ESCALATION_TIMER, f"{alert_id}:%"),
    )


def dispatch_status(conn: psycopg.Connection[Any], dispatch_id: UUID, channel: str) -> dict[str, Any] | None:
    """A dispatch's status and attempts, as its own channel may see them; None if not its own."""
    with conn.cursor() as cur:
        cur.execute(
            "SELECT id, alert_id, channel, state, ack_status, attempts, created_at, delivered_at, acked_at,"
            " reference FROM dispatches WHERE id = %s AND channel = %s",
            (dispatch_id, channel),
        )
        names = [c.name for c in cur.description or ()]
        row = cur.fetchone()
    if row is None:
        return None
    return {**dict(zip(names, row, strict=True)), "attempt_log": attempts_of(conn, dispatch_id)}


def attempts_of(conn: psycopg.Connection[Any], dispatch_id: UUID) -> list[dict[str, Any]]:
    """A dispatch's attempts, oldest first (for the CLI, the API and tests)."""
    with conn.cursor() as cur:
        cur.execute(
            "SELECT number, started_at, latency_ms, outcome, status, reason, retry_after_s,"
            " next_attempt_at, dispatcher FROM dispatch_attempts WHERE dispatch_id = %s ORDER BY id",
            (dispatch_id,),
        )
        names = [c.name for c in cur.description or ()]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


__all__ = [
    "ACTOR",
    "DISPATCH_CHANNEL",
    "ESCALATION_TIMER",
    "AckResult",
    "Claimed",
    "acknowledge",
    "attempts_of",
    "claim_due",
    "close_dispatches",
    "dispatch_status",
    "documents",
    "escalate",
    "event_location",
    "next_due",
    "record_outcome",
    "supersede",
    "take_outbox",
]

"""Writing the scheduled rules' decisions, and recording health check-ups.

``persist_scheduled`` writes a run's decisions in order, in the caller's transaction: the
lifecycle's through ``alerts.persist`` (alert, history, outbox and task rows as for the
ingest path), with two things written here instead:

- ``ClearCondition`` of a scheduled rule (its evidence has a ``reason``): the same update,
  with the reason in the history row (``alerts.persist`` words every clearing as a threshold
  band's: "back inside the band by 0% for 0 s" would not say that a device reports again);
- the follow-up decisions of ``alerts/followups.py``:

- ``AutoClose``: the alert becomes ``auto_closed`` (closed_at set, a history row naming the
  alert that replaces it), its open tasks ``cancelled``. It comes before the ``OpenAlert`` of
  its successor, so the one-active-alert index holds at every statement.
- ``MoveTaskDue``: the task's due date, only ever earlier, and a history row on its alert.
- ``EscalateTask``: an ``open`` task becomes ``escalated`` (a task already escalated, done or
  cancelled is left alone: the escalation happens once), its alert too if still active, with
  a history row, and an ``alert_outbox`` row (reason ``escalated``, migration 0010) asking the
  dispatcher to notify the overdue route (the team lead).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from datetime import datetime
from typing import Any
from uuid import UUID

import psycopg

from eldercare.alerts.decisions import ACTIVE_STATES, Decision
from eldercare.alerts.followups import AutoClose, EscalateTask, MoveTaskDue, ScheduledDecision
from eldercare.gateway.store import alerts as store

#: Who the scheduled rules are, in alert history.
SCHEDULE_ACTOR = "rules:schedule"


def persist_scheduled(
    cur: psycopg.Cursor[Any],
    decisions: Iterable[ScheduledDecision],
    now: datetime,
    actor: str = SCHEDULE_ACTOR,
) -> tuple[Counter[str], list[tuple[UUID, str, str]]]:
    """Write the decisions in order; (counts by decision kind, alerts opened (id, rule, severity))."""
    counts: Counter[str] = Counter()
    opened: list[tuple[UUID, str, str]] = []
    batch: list[Decision] = []

    def flush() -> None:
        if batch:
            done = store.persist(cur, batch, now, actor)
            counts.update(done.counts())
            opened.extend(done.opened)
            batch.clear()

    notify = False
    for d in decisions:
        match d:
            case AutoClose():
                flush()
                _auto_close(cur, d, now, actor)
                counts["alert_auto_closed"] += 1
            case MoveTaskDue():
                flush()
                counts["task_due_moved"] += _move_due(cur, d, now, actor)
            case EscalateTask():
                flush()
                escalated = _escalate(cur, d, now, actor)
                counts["task_escalated"] += escalated
                notify = notify or bool(escalated and d.alert_id)
            case _:
                batch.append(d)
    flush()
    if notify:
        cur.execute("SELECT pg_notify(%s, %s)", (store.OUTBOX_CHANNEL, "escalated"))
    return counts, opened


def _history(
    cur: psycopg.Cursor[Any],
    alert_id: UUID,
    now: datetime,
    actor: str,
    from_state: str,
    to_state: str,
    severity: str,
    reason: str,
) -> None:
    cur.execute(
        "INSERT INTO alert_history (alert_id, at, actor, from_state, to_state, from_severity,"
        " to_severity, reason) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
        (alert_id, now, actor, from_state, to_state, severity, severity, reason),
    )


def _auto_close(cur: psycopg.Cursor[Any], d: AutoClose, now: datetime, actor: str) -> None:
    cur.execute(
        "UPDATE alerts SET state = 'auto_closed', closed_at = %s, updated_at = %s,"
        " outcome = coalesce(outcome, %s) WHERE id = %s",
        (now, now, d.reason, d.alert_id),
    )
    cur.execute(
        "UPDATE tasks SET state = 'cancelled', done_at = %s, done_by = %s, outcome = %s"
        " WHERE source_alert = %s AND state IN ('open', 'escalated')",
        (now, actor, d.reason, d.alert_id),
    )
    reason = f"{d.reason} ({d.by_alert})"
    _history(cur, d.alert_id, now, actor, d.from_state, "auto_closed", str(d.severity), reason)


def _move_due(cur: psycopg.Cursor[Any], d: MoveTaskDue, now: datetime, actor: str) -> int:
    cur.execute(
        "UPDATE tasks SET due_at = %s WHERE id = %s AND state IN ('open', 'escalated') AND due_at > %s",
        (d.to_due, d.task_id, d.to_due),
    )
    if cur.rowcount != 1:
        return 0
    if d.alert_id is not None:
        state = _alert_state(cur, d.alert_id)
        if state is not None:
            _history(cur, d.alert_id, now, actor, state[0], state[0], state[1], d.reason)
    return 1


def _alert_state(cur: psycopg.Cursor[Any], alert_id: UUID) -> tuple[str, str] | None:
    cur.execute("SELECT state, severity FROM alerts WHERE id = %s FOR UPDATE", (alert_id,))
    row = cur.fetchone()
    return None if row is None else (row[0], row[1])


def _escalate(cur: psycopg.Cursor[Any], d: EscalateTask, now: datetime, actor: str) -> int:
    cur.execute("UPDATE tasks SET state = 'escalated' WHERE id = %s AND state = 'open'", (d.task_id,))
    if cur.rowcount != 1:
        return 0
    if d.alert_id is None:
        return 1  # a task without an alert: nothing to dispatch it through
    state = _alert_state(cur, d.alert_id)
    if state is None:
        return 1
    from_state, severity = state
    to_state = "escalated" if from_state in ACTIVE_STATES else from_state
    if to_state != from_state:
        cur.execute("UPDATE alerts SET state = 'escalated', updated_at = %s WHERE id = %s", (now, d.alert_id))
    _history(cur, d.alert_id, now, actor, from_state, to_state, severity, d.reason)
    cur.execute(
        "INSERT INTO alert_outbox (alert_id, reason, severity, route, created_at)"
        " VALUES (%s, 'escalated', %s, %s, %s)",
        (d.alert_id, severity, d.route, now),
    )
    return 1


# ---- check-ups -----------------------------------------------------------------------------


def insert_checkup(
    cur: psycopg.Cursor[Any], elder_id: str, at: datetime, recorded_by: str, now: datetime
) -> int | None:
    """Record a check-up of the elder at ``at``; its id, or None if that one is recorded already."""
    cur.execute(
        "INSERT INTO checkups (elder_id, at, recorded_at, recorded_by) VALUES (%s, %s, %s, %s)"
        " ON CONFLICT (elder_id, at) DO NOTHING RETURNING id",
        (elder_id, at, now, recorded_by),
    )
    row = cur.fetchone()
    return None if row is None else int(row[0])


def link_checkup(cur: psycopg.Cursor[Any], checkup_id: int, alert_id: UUID) -> None:
    """Note the alert (and so the task) a check-up raised."""
    cur.execute("UPDATE checkups SET alert_id = %s WHERE id = %s", (alert_id, checkup_id))

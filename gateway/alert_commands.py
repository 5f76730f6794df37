"""``eldercare alerts`` and ``eldercare tasks``: look at alerts, acknowledge and resolve them;
the family doctor team's follow-up queue."""

from __future__ import annotations

import getpass
import json
from dataclasses import fields
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Annotated, Any
from uuid import UUID

import typer
from rich.console import Console
from rich.table import Table

from eldercare.alerts.decisions import ACTIVE_STATES

if TYPE_CHECKING:
    import psycopg

out = Console()

alerts_app = typer.Typer(help="List, show, acknowledge and resolve alerts.", no_args_is_help=True)
tasks_app = typer.Typer(help="The follow-up task queue: list and complete tasks.", no_args_is_help=True)

By = Annotated[str | None, typer.Option("--by", help="who does it (default: cli:<your login>)")]


def _connect() -> psycopg.Connection:
    import psycopg

    from eldercare.gateway.cli import database_url, settings

    return psycopg.connect(database_url(settings()))


def _actor(by: str | None) -> str:
    return by or f"cli:{getpass.getuser()}"


def _alert_id(text: str) -> UUID:
    try:
        return UUID(text)
    except ValueError:
        out.print(f"[red]error:[/] {text!r} is not an alert id (a UUID, as `eldercare alerts list` shows)")
        raise typer.Exit(2) from None


def _when(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


@alerts_app.command("list")
def alerts_list(
    state: Annotated[
        list[str] | None,
        typer.Option(help="only these states (repeat); default: the active ones, --all for every state"),
    ] = None,
    every_state: Annotated[bool, typer.Option("--all", help="alerts in any state")] = False,
    severity: Annotated[str | None, typer.Option(help="emergency, urgent or follow_up")] = None,
    elder: Annotated[str | None, typer.Option(help="one elder's alerts")] = None,
    rule: Annotated[str | None, typer.Option(help="one rule's alerts")] = None,
    since: Annotated[str | None, typer.Option(help="raised within this long, e.g. 24h, 7d")] = None,
    limit: int = 50,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines instead of a table")] = False,
) -> None:
    """Alerts, newest first (by default the active ones)."""
    from eldercare.alerts.rules import parse_duration
    from eldercare.gateway.store.alerts import list_alerts

    states = None if every_state else (state or sorted(ACTIVE_STATES))
    start = datetime.now(UTC) - parse_duration(since) if since else None
    with _connect() as conn:
        rows = list_alerts(
            conn, states=states, severity=severity, elder_id=elder, rule=rule, since=start, limit=limit
        )
    if as_json:
        for r in rows:
            print(json.dumps(_row(r), ensure_ascii=False))
        return
    table = Table("alert", "raised (UTC)", "elder", "rule", "severity", "state", "matches", "last", "title")
    for r in rows:
        last = f"{r.last_value:g}" if r.last_value is not None else ""
        table.add_row(
            str(r.id),
            _when(r.raised_at) + (" late" if r.late else ""),
            r.elder_id,
            r.rule,
            r.severity,
            r.state,
            str(r.matches),
            last,
            f"{r.title_zh} / {r.title_en}",
        )
    out.print(table)
    if not rows:
        out.print("no alerts" + ("" if every_state else " in the active states (--all for every state)"))


def _row(r: Any) -> dict[str, Any]:
    return {f.name: _plain(getattr(r, f.name)) for f in fields(r)}


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, timedelta):
        return value.total_seconds()
    return value


@alerts_app.command("show")
def alerts_show(
    alert_id: Annotated[str, typer.Argument(help="the alert's id")],
    as_json: Annotated[bool, typer.Option("--json", help="the alert as JSON")] = False,
) -> None:
    """One alert and why: its evidence, history, dispatches asked for and tasks."""
    from eldercare.gateway.store.alerts import AlertNotFound, get_alert

    with _connect() as conn:
        try:
            detail = get_alert(conn, _alert_id(alert_id))
        except AlertNotFound:
            out.print(f"[red]error:[/] no alert {alert_id}")
            raise typer.Exit(1) from None
    a = detail.alert
    if as_json:
        data = {**_row(a), "evidence": detail.evidence, "confirmed": detail.confirmed}
        data["late_by_s"], data["outcome"] = detail.late_by_s, detail.outcome
        data["history"] = [[_plain(v) for v in h] for h in detail.history]
        data["outbox"] = [[_plain(v) for v in o] for o in detail.outbox]
        data["tasks"] = [[_plain(v) for v in t] for t in detail.tasks]
        data["dispatches"] = [[_plain(v) for v in d] for d in detail.dispatches]
        print(json.dumps(data, ensure_ascii=False, indent=2))
        return
    out.print(f"[bold]{a.title_zh} / {a.title_en}[/]  ({a.rule}, {a.severity}, {a.state})")
    out.print(f"elder {a.elder_id}, device {a.device_id or '-'}, route {a.route}")
    out.print(f"observed {_when(a.observed_at)} UTC, raised {_when(a.raised_at)} UTC")
    if a.late:
        out.print(f"[yellow]late data[/]: arrived {detail.late_by_s or 0:.0f} s after it happened")
    last = f" (last {a.last_value:g})" if a.last_value is not None else ""
    confirmed = ", confirmed" if detail.confirmed else ""
    out.print(f"matches {a.matches}, last at {_when(a.last_at)} UTC{last}{confirmed}")
    if detail.outcome:
        out.print(f"outcome: {detail.outcome}")
    out.print("[bold]evidence[/]")
    out.print_json(json.dumps(detail.evidence, ensure_ascii=False))
    history = Table("at (UTC)", "by", "change", "why", title="history")
    for at, actor, from_state, to_state, from_sev, to_sev, reason in detail.history:
        change = f"{from_state or '-'} -> {to_state}"
        if from_sev and from_sev != to_sev:
            change += f" ({from_sev} -> {to_sev})"
        history.add_row(_when(at), actor, change, reason)
    out.print(history)
    if detail.outbox:
        dispatches = Table("#", "asked", "severity", "route", "at (UTC)", title="dispatches asked for")
        for n, reason, severity, route, at in detail.outbox:
            dispatches.add_row(str(n), reason, severity, route, _when(at))
        out.print(dispatches)
    if detail.dispatches:
        trail = Table(
            "channel",
            "step",
            "state",
            "ack",
            "tries",
            "delivered (UTC)",
            "acked (UTC)",
            title="who was called",
        )
        for channel, step, state, ack, tries, _created, delivered, acked, notice in detail.dispatches:
            what = f"{channel} ({notice} notice)" if notice else channel
            delivered_at = _when(delivered) if delivered else "-"
            acked_at = _when(acked) if acked else "-"
            trail.add_row(what, str(step + 1), state, ack or "-", str(tries), delivered_at, acked_at)
        out.print(trail)
    if detail.tasks:
        tasks = Table("task", "kind", "assignee", "state", "due (UTC)", title="tasks")
        for n, kind, assignee, state, due in detail.tasks:
            tasks.add_row(str(n), kind, assignee, state, _when(due))
        out.print(tasks)


@alerts_app.command("ack")
def alerts_ack(
    alert_id: Annotated[str, typer.Argument(help="the alert's id")],
    note: Annotated[str, typer.Option(help="a note for the history")] = "",
    by: By = None,
) -> None:
    """Acknowledge an active alert (someone is on it)."""
    from eldercare.gateway.store.alerts import acknowledge

    _act(acknowledge, alert_id, by, note, "acknowledged")


@alerts_app.command("resolve")
def alerts_resolve(
    alert_id: Annotated[str, typer.Argument(help="the alert's id")],
    outcome: Annotated[str, typer.Option(help="what was found and done (kept with the alert)")],
    by: By = None,
) -> None:
    """Resolve an active alert with its outcome (the rule is then quiet for its cool-down)."""
    from eldercare.gateway.store.alerts import resolve

    _act(resolve, alert_id, by, outcome, "resolved")


def _act(action: Any, alert_id: str, by: str | None, text: str, done: str) -> None:
    from eldercare.gateway.store.alerts import AlertNotFound, InvalidTransition

    target = _alert_id(alert_id)
    with _connect() as conn:
        try:
            before = action(conn, target, _actor(by), text, datetime.now(UTC))
        except AlertNotFound:
            out.print(f"[red]error:[/] no alert {alert_id}")
            raise typer.Exit(1) from None
        except InvalidTransition as exc:
            out.print(f"[red]error:[/] {exc}")
            raise typer.Exit(1) from None
    out.print(f"alert {alert_id}: {before} -> {done}")


@tasks_app.command("list")
def tasks_list(
    assignee: Annotated[str | None, typer.Option(help="e.g. family_doctor, service_desk")] = None,
    elder: Annotated[str | None, typer.Option(help="one elder's tasks")] = None,
    done: Annotated[bool, typer.Option("--done", help="completed tasks instead of open ones")] = False,
    limit: int = 100,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines instead of a table")] = False,
) -> None:
    """Follow-up tasks, soonest due first (open and escalated ones by default)."""
    from eldercare.gateway.store.alerts import list_tasks

    states = ("done",) if done else ("open", "escalated")
    with _connect() as conn:
        rows = list_tasks(conn, assignee=assignee, states=states, elder_id=elder, limit=limit)
    if as_json:
        for t in rows:
            print(json.dumps(_row(t), ensure_ascii=False))
        return
    now = datetime.now(UTC)
    table = Table("task", "due (UTC)", "elder", "kind", "assignee", "state", "from alert")
    for t in rows:
        due = _when(t.due_at) + (" [red]overdue[/]" if t.due_at < now and t.state != "done" else "")
        table.add_row(str(t.id), due, t.elder_id, t.kind, t.assignee, t.state, str(t.source_alert or ""))
    out.print(table)
    if not rows:
        out.print("no tasks")


@tasks_app.command("done")
def tasks_done(
    task_id: Annotated[int, typer.Argument(help="the task's number")],
    outcome: Annotated[str, typer.Option(help="what was done")],
    by: By = None,
) -> None:
    """Complete an open task with its outcome."""
    from eldercare.gateway.store.alerts import complete_task

    with _connect() as conn:
        if not complete_task(conn, task_id, _actor(by), outcome, datetime.now(UTC)):
            out.print(f"[red]error:[/] no open task {task_id}")
            raise typer.Exit(1)
    out.print(f"task {task_id}: done")

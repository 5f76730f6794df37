"""``eldercare rules`` and ``eldercare elders``: rule files, elders and their care plans."""

from __future__ import annotations

import getpass
import json
import tomllib
from datetime import UTC, date, datetime, time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any
from zoneinfo import ZoneInfo

import typer
from rich.console import Console
from rich.table import Column, Table
from rich.text import Text

from eldercare.alerts.careplan import (
    DEFAULT_TIMEZONE,
    CarePlan,
    effective_rules,
    load_care_plan,
    parse_care_plan,
)
from eldercare.alerts.rules import (
    BatteryLowRule,
    DeviceSilentRule,
    EventRule,
    EventUnansweredRule,
    MeanTrendRule,
    News2Rule,
    NoActivityRule,
    PeriodicFollowUpRule,
    RiseTrendRule,
    Rule,
    RuleSet,
    RuleSetError,
    ThresholdRule,
    format_duration,
    load_rule_set,
    thaw,
)

if TYPE_CHECKING:
    import psycopg

out = Console()

rules_app = typer.Typer(help="Check rule files; show the rules in force for an elder.", no_args_is_help=True)
elders_app = typer.Typer(
    help="Register elders (pseudonymous ids only), set their care plans and personal profiles.",
    no_args_is_help=True,
)

# Options shared by `elders add` and `elders set-care-plan`.
FromFile = Annotated[
    Path | None,
    typer.Option(
        "--from", help="a care plan file (.toml or .json, the fields of a care plan); flags go on top"
    ),
]
Conditions = Annotated[
    list[str] | None,
    typer.Option(
        "--condition", help="care-plan condition, e.g. hypertension, copd (repeat; replaces the list)"
    ),
]
Timezone = Annotated[
    str | None, typer.Option(help=f"IANA time zone of local hours (default {DEFAULT_TIMEZONE})")
]
LivesAlone = Annotated[
    bool | None, typer.Option("--lives-alone/--no-lives-alone", help="the elder lives alone")
]
Spo2Scale = Annotated[
    int | None, typer.Option(min=1, max=2, help="NEWS2 SpO2 scale (default: 2 with COPD, else 1)")
]
Disable = Annotated[
    list[str] | None, typer.Option("--disable", help="rule id to switch off (repeat; replaces the list)")
]
Override = Annotated[
    list[str] | None,
    typer.Option(
        "--override",
        metavar="RULE.FIELD=VALUE",
        help="a rule field for this elder, VALUE as in TOML: 'spo2_low.window=\"10m\"' (repeat)",
    ),
]
Reroute = Annotated[
    list[str] | None,
    typer.Option(
        "--route",
        metavar="ROUTE=INSTEAD",
        help="a route this elder takes instead, e.g. emergency=nursing_home_emergency (repeat;"
        " replaces the map)",
    ),
]
UpdatedBy = Annotated[str | None, typer.Option("--by", help="who sets the plan (default cli:<user>)")]


def fail(lines: str | list[str], code: int = 1) -> typer.Exit:
    """Print an error (every line of it) to stderr; the Exit to raise."""
    for line in [lines] if isinstance(lines, str) else lines:
        typer.echo(f"error: {line}", err=True)
    return typer.Exit(code)


def _connect() -> psycopg.Connection:
    import psycopg

    # Imported here: the main CLI module imports this one.
    from eldercare.gateway.cli import database_url, settings

    return psycopg.connect(database_url(settings()))


def _rule_set(path: Path | None) -> RuleSet:
    """The rule set of ``path``, else of ELDERCARE_RULES_FILE, else the packaged default."""
    if path is None:
        from eldercare.gateway.cli import settings

        path = settings().rules_file
    try:
        return load_rule_set(path)
    except RuleSetError as exc:
        raise fail([str(p) for p in exc.problems]) from None


# --- eldercare rules ----------------------------------------------------------------------


@rules_app.command("check")
def rules_check(file: Annotated[Path, typer.Argument(help="a rule file (TOML)")]) -> None:
    """Check a rule file: every mistake with its rule and field, or a one-line summary."""
    try:
        rule_set = load_rule_set(file)
    except RuleSetError as exc:
        raise fail([str(p) for p in exc.problems]) from None
    typer.echo(f"{file}: ok, {summary(rule_set)}")


@rules_app.command("show")
def rules_show(
    elder: Annotated[str | None, typer.Option(help="the rules in force for this elder's care plan")] = None,
    file: Annotated[
        Path | None, typer.Option(help="rule file (default: ELDERCARE_RULES_FILE or the packaged one)")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="the rules as JSON (the rule file's shape)")
    ] = False,
) -> None:
    """Show the rules: the rule file's, or the effective ones for one elder."""
    rule_set = _rule_set(file)
    if elder is not None:
        from eldercare.gateway.store.elders import get_elder

        with _connect() as conn:
            row = get_elder(conn, elder)
        if row is None:
            raise fail(f"no elder {elder}")
        plan = row.plan or CarePlan()
        try:
            rule_set = effective_rules(rule_set, plan, source=f"care plan of {elder}")
        except RuleSetError as exc:
            raise fail([str(p) for p in exc.problems]) from None
    if as_json:
        typer.echo(json.dumps(rule_set.as_data(), ensure_ascii=False, indent=2))
        return
    title = f"rules for {elder}" if elder else "rules"
    columns = ("kind", "severity", "when", "route", "requires")
    table = Table(Column("rule", no_wrap=True), *columns, title=f"{title}: {summary(rule_set)}")
    for rule in rule_set.rules:
        severities = ", ".join(s.value for s in rule.severities)
        routes = sorted({rule_set.route_for(rule.id, s) for s in rule.severities})
        requires = ", ".join(sorted(rule.requires))
        table.add_row(*cells(rule.id, kind_of(rule), severities, describe(rule), ", ".join(routes), requires))
    out.print(table)


def cells(*values: str) -> list[Text]:
    """Table cells shown as written (no markup) and folded rather than cut when narrow."""
    return [Text(value, overflow="fold") for value in values]


def summary(rule_set: RuleSet) -> str:
    """``28 rules (10 threshold, 1 news2, ...), 5 conditions, 11 routes``."""
    counts: dict[str, int] = {}
    for rule in rule_set.rules:
        counts[rule.section] = counts.get(rule.section, 0) + 1
    sections = ", ".join(f"{n} {section}" for section, n in counts.items())
    return (
        f"{len(rule_set.rules)} rules ({sections}), {len(rule_set.conditions)} conditions,"
        f" {len(rule_set.routes)} routes"
    )


def kind_of(rule: Rule) -> str:
    """The rule's section, and its kind where the section has several."""
    kind = getattr(rule, "kind", None)
    return f"{rule.section}: {kind}" if kind else rule.section


def describe(rule: Rule) -> str:
    """One line saying when the rule raises, with its numbers."""
    if isinstance(rule, ThresholdRule):
        text = " or ".join(str(c) for c in rule.any)
        if rule.window:
            text += f" for {format_duration(rule.window)}"
        for level in rule.levels:
            text += f"; {level.severity.value}: " + " or ".join(str(c) for c in level.any)
        if rule.confirm_within:
            text += f"; confirmed by a second within {format_duration(rule.confirm_within)}"
        if rule.inhibits:
            text += f"; inhibits {', '.join(sorted(rule.inhibits))}"
        return text
    if isinstance(rule, News2Rule):
        return (
            f"aggregate >= {rule.urgent_from}; emergency >= {rule.emergency_from}, or a single 3 with"
            f" >= {rule.single_three_emergency_from}; readings <= {format_duration(rule.max_age)} old;"
            f" SpO2 scale {rule.spo2_scale}"
        )
    if isinstance(rule, EventRule):
        text = " or ".join(sorted(rule.on))
        if rule.during:
            text += f" at {rule.during}"
        if rule.after:
            text += f" after {' or '.join(sorted(rule.after))}"
        if rule.within:
            text += f", no {' or '.join(sorted(rule.unless))} within {format_duration(rule.within)}"
        for event_level in rule.levels:
            qualifier = f"at {event_level.during}" if event_level.during else ""
            if event_level.count and event_level.within:
                qualifier += f"{event_level.count} within {format_duration(event_level.within)}"
            text += f"; {event_level.severity.value}: {qualifier}"
        if rule.task:
            text += f"; task {rule.task.kind} due {format_duration(rule.task.due)}"
        return text
    if isinstance(rule, NoActivityRule | EventUnansweredRule):
        what = (
            "no " + " or ".join(str(c) for c in rule.activity)
            if isinstance(rule, NoActivityRule)
            else f"{' or '.join(sorted(rule.on))}, no {' or '.join(sorted(rule.unless))}"
        )
        hours = f" within {rule.active_hours}" if rule.active_hours else ""
        return f"{what} for {format_duration(rule.silent_for)}{hours}"
    if isinstance(rule, DeviceSilentRule):
        text = (
            f"silent {rule.intervals:g} x reporting interval (>= {format_duration(rule.at_least)}),"
            f" or LWT offline {format_duration(rule.lwt_offline_for)}"
        )
        if rule.only_safety_device_severity:
            text += f"; {rule.only_safety_device_severity.value}: the only safety device"
        return text
    if isinstance(rule, MeanTrendRule):
        fasting = " (fasting)" if rule.fasting_only else ""
        return f"{format_duration(rule.over)} mean{fasting} " + " or ".join(str(c) for c in rule.any)
    if isinstance(rule, RiseTrendRule):
        return f"{rule.metric} +{rule.by:g} within {format_duration(rule.within)}"
    if isinstance(rule, PeriodicFollowUpRule):
        text = (
            f"any of {', '.join(sorted(rule.conditions))}: task {rule.task.kind}"
            f" every {format_duration(rule.task.due)}"
        )
        if rule.pulled_forward_within:
            text += (
                f"; within {format_duration(rule.pulled_forward_within)} after"
                f" {' or '.join(sorted(rule.pulled_forward_by))}"
            )
        return text
    if isinstance(rule, BatteryLowRule):
        return f"battery < {rule.below:g} %"
    task = rule.task
    overdue = f", overdue -> {task.overdue_route}" if task.overdue_route else ""
    return f"a recorded check-up: task {task.kind} due {format_duration(task.due)}{overdue}"


# --- eldercare elders ---------------------------------------------------------------------


def care_plan(
    base: CarePlan,
    *,
    from_file: Path | None = None,
    conditions: list[str] | None = None,
    timezone: str | None = None,
    lives_alone: bool | None = None,
    spo2_scale: int | None = None,
    disable: list[str] | None = None,
    overrides: list[str] | None = None,
    routes: list[str] | None = None,
) -> CarePlan:
    """``base`` (or the plan in ``from_file``) with the fields the flags name replaced."""
    data = (load_care_plan(from_file) if from_file else base).as_data()
    given: dict[str, Any] = {
        "conditions": conditions,
        "timezone": timezone,
        "lives_alone": lives_alone,
        "spo2_scale": spo2_scale,
        "disabled": disable,
    }
    data.update({k: v for k, v in given.items() if v is not None})
    if routes is not None:
        data["routes"] = {}
        for text in routes:
            route, sep, instead = (part.strip() for part in text.partition("="))
            if not (sep and route and instead):
                raise fail(f"--route {text!r}: write ROUTE=INSTEAD, e.g. emergency=nursing_home_emergency", 2)
            data["routes"][route] = instead
    for text in overrides or []:
        target, sep, raw = text.partition("=")
        rule_id, dot, field = target.strip().partition(".")
        if not (sep and dot and rule_id and field):
            raise fail(f'--override {text!r}: write RULE.FIELD=VALUE, e.g. spo2_low.window="10m"', 2)
        data["overrides"].setdefault(rule_id, {})[field] = _toml_value(raw)
    return parse_care_plan(data, source="the command line")


def _toml_value(raw: str) -> Any:
    """VALUE of ``--override`` as TOML would read it; a bare word is a string."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw.strip()


def _checked(plan: CarePlan, elder_id: str) -> CarePlan:
    """``plan`` if it fits the deployment's rule set; else exit with every problem."""
    try:
        effective_rules(_rule_set(None), plan, source=f"care plan of {elder_id}")
    except RuleSetError as exc:
        raise fail([str(p) for p in exc.problems]) from None
    return plan


def _updated_by(given: str | None) -> str:
    if given:
        return given
    try:
        return f"cli:{getpass.getuser()}"
    except (OSError, KeyError):  # no login name in some containers
        return "cli"


@elders_app.command("add")
def elders_add(
    elder_id: Annotated[str, typer.Argument(help="pseudonymous id, 1-64 chars of [A-Za-z0-9._-]")],
    condition: Conditions = None,
    timezone: Timezone = None,
    lives_alone: LivesAlone = None,
    spo2_scale: Spo2Scale = None,
    route: Reroute = None,
    from_file: FromFile = None,
    by: UpdatedBy = None,
) -> None:
    """Register an elder with a care plan (no personal data: that is kept apart, set it with
    `elders set-profile`)."""
    from eldercare.gateway.store.elders import add_elder, check_elder_id, set_care_plan

    try:
        check_elder_id(elder_id)
        plan = care_plan(
            CarePlan(),
            from_file=from_file,
            conditions=condition,
            timezone=timezone,
            lives_alone=lives_alone,
            spo2_scale=spo2_scale,
            routes=route,
        )
    except (ValueError, RuleSetError) as exc:
        raise fail(str(exc).splitlines()) from None
    _checked(plan, elder_id)
    with _connect() as conn, conn.transaction():
        if not add_elder(conn, elder_id):
            raise fail(f"elder {elder_id} is already registered (change the plan with set-care-plan)")
        set_care_plan(conn, elder_id, plan, _updated_by(by))
    typer.echo(f"registered {elder_id}: {plan_summary(plan)}")


@elders_app.command("set-care-plan")
def elders_set_care_plan(
    elder_id: str,
    from_file: FromFile = None,
    condition: Conditions = None,
    timezone: Timezone = None,
    lives_alone: LivesAlone = None,
    spo2_scale: Spo2Scale = None,
    disable: Disable = None,
    override: Override = None,
    route: Reroute = None,
    by: UpdatedBy = None,
) -> None:
    """Set an elder's care plan: the one in --from (or the current one) with the flags on top."""
    from eldercare.gateway.store.elders import get_elder, set_care_plan

    with _connect() as conn:
        row = get_elder(conn, elder_id)
        if row is None:
            raise fail(f"no elder {elder_id} (register it with `eldercare elders add`)")
        try:
            plan = care_plan(
                row.plan or CarePlan(),
                from_file=from_file,
                conditions=condition,
                timezone=timezone,
                lives_alone=lives_alone,
                spo2_scale=spo2_scale,
                disable=disable,
                overrides=override,
                routes=route,
            )
        except RuleSetError as exc:
            raise fail([str(p) for p in exc.problems]) from None
        _checked(plan, elder_id)
        set_care_plan(conn, elder_id, plan, _updated_by(by))
    typer.echo(f"care plan of {elder_id}: {plan_summary(plan)}")


@elders_app.command("show")
def elders_show(
    elder_id: str,
    as_json: Annotated[bool, typer.Option("--json", help="as JSON")] = False,
    personal: Annotated[
        bool,
        typer.Option(
            "--personal",
            help="also the personal profile (name, phone, address, medications, contacts ...);"
            " left out unless asked for",
        ),
    ] = False,
) -> None:
    """Show an elder's care plan (and, with --personal, the personal profile)."""
    from eldercare.gateway.profile_commands import profile_lines
    from eldercare.gateway.store.elders import get_elder
    from eldercare.gateway.store.profiles import get_profile

    with _connect() as conn:
        row = get_elder(conn, elder_id)
        profile = get_profile(conn, elder_id) if personal and row is not None else None
    if row is None:
        raise fail(f"no elder {elder_id}")
    updated = row.updated_at.isoformat(timespec="seconds") if row.updated_at else None
    if as_json:
        data = {
            "elder_id": row.elder_id,
            "plan": row.plan.as_data() if row.plan else None,
            "updated_at": updated,
            "updated_by": row.updated_by,
            "devices": row.devices,
        }
        if personal:
            data["profile"] = profile.as_data() if profile else None
        typer.echo(json.dumps(data, ensure_ascii=False, indent=2))
        return
    typer.echo(f"elder {row.elder_id} ({row.devices} device(s))")
    if row.plan is None:
        typer.echo("no care plan: the rule set's defaults apply")
    else:
        plan = row.plan
        typer.echo(f"conditions: {', '.join(sorted(plan.conditions)) or 'none'}")
        typer.echo(f"time zone: {plan.timezone}")
        typer.echo(f"lives alone: {'yes' if plan.lives_alone else 'no'}")
        typer.echo(f"SpO2 scale: {plan.spo2_scale or 'by conditions'}")
        for rule_id, fields in sorted(plan.overrides.items()):
            typer.echo(f"override {rule_id}: {json.dumps(thaw(fields), ensure_ascii=False)}")
        typer.echo(f"disabled: {', '.join(sorted(plan.disabled)) or 'none'}")
        for route, instead in sorted(plan.routes.items()):
            typer.echo(f"route {route}: {instead}")
        typer.echo(f"updated {updated} by {row.updated_by}")
    if personal:
        for line in profile_lines(profile):
            typer.echo(line)


def checkup_time(text: str | None, zone: ZoneInfo, now: datetime) -> datetime:
    """``--at`` of ``elders checkup``: a date (its midnight in the elder's zone), an ISO date and
    time (in the elder's zone unless it says its own), or None for now; never in the future."""
    if text is None:
        return now
    try:
        at = (
            datetime.combine(date.fromisoformat(text), time(), tzinfo=zone)
            if len(text.strip()) == 10
            else datetime.fromisoformat(text)
        )
    except ValueError:
        raise ValueError(
            f"--at {text!r}: write a date (2024-06-01) or a date and time (2024-06-01T09:30)"
        ) from None
    if at.tzinfo is None:
        at = at.replace(tzinfo=zone)
    if at > now:
        raise ValueError(f"--at {text!r} is in the future")
    return at


@elders_app.command("checkup")
def elders_checkup(
    elder_id: str,
    at: Annotated[
        str | None,
        typer.Option(
            metavar="DATE",
            help="when the check-up was: a date (in the elder's time zone) or an ISO date and time;"
            " default now",
        ),
    ] = None,
    by: Annotated[str | None, typer.Option("--by", help="who records it (default cli:<user>)")] = None,
) -> None:
    """Record a health check-up: a task to inform the elder of the results, due in 30 days."""
    from eldercare.gateway.jobs import UnknownElder, record_checkup
    from eldercare.gateway.store.elders import get_care_plan

    now = datetime.now(UTC)
    rule_set = _rule_set(None)
    with _connect() as conn:
        zone = (get_care_plan(conn, elder_id) or CarePlan()).zone
        try:
            when = checkup_time(at, zone, now)
            done = record_checkup(conn, rule_set, elder_id, when, _updated_by(by), now)
        except ValueError as exc:
            raise fail(str(exc), 2) from None
        except UnknownElder:
            raise fail(f"no elder {elder_id} (register it with `eldercare elders add`)") from None
    day = f"{when.astimezone(zone):%Y-%m-%d %H:%M}"
    if done.checkup_id is None:
        typer.echo(f"the check-up of {elder_id} at {day} is recorded already")
    elif done.covered_by is not None:
        typer.echo(f"check-up of {elder_id} at {day} recorded; a newer check-up's task covers it")
    elif done.task_due is None:
        typer.echo(f"check-up of {elder_id} at {day} recorded; the elder's rules give no results task")
    else:
        due = f"{done.task_due.astimezone(zone):%Y-%m-%d}"
        typer.echo(f"check-up of {elder_id} at {day} recorded; task inform_checkup_results due {due}")


@elders_app.command("list")
def elders_list(limit: int = 200) -> None:
    """List elders with their care plans."""
    from eldercare.gateway.store.elders import list_elders

    with _connect() as conn:
        rows = list_elders(conn, limit)
    columns = ("conditions", "time zone", "lives alone", "devices", "plan updated", "by")
    table = Table(Column("elder", no_wrap=True), *columns)
    for row in rows:
        plan = row.plan
        table.add_row(
            *cells(
                row.elder_id,
                ", ".join(sorted(plan.conditions)) if plan else "",
                plan.timezone if plan else "",
                ("yes" if plan.lives_alone else "no") if plan else "",
                str(row.devices),
                f"{row.updated_at:%Y-%m-%d %H:%M}" if row.updated_at else "no plan",
                row.updated_by or "",
            )
        )
    out.print(table)


def plan_summary(plan: CarePlan) -> str:
    """One line: conditions, time zone, lives alone, overrides, disabled rules."""
    parts = [
        f"conditions {', '.join(sorted(plan.conditions)) or 'none'}",
        plan.timezone,
        "lives alone" if plan.lives_alone else "not alone",
    ]
    if plan.overrides:
        parts.append(f"overrides {', '.join(sorted(plan.overrides))}")
    if plan.disabled:
        parts.append(f"disabled {', '.join(sorted(plan.disabled))}")
    if plan.routes:
        parts.append("routes " + ", ".join(f"{r}->{i}" for r, i in sorted(plan.routes.items())))
    return "; ".join(parts)

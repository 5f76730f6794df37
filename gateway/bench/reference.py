"""The reference worker (``../shared/peers/refpipe``) run on the bench's broker, as a sink.

The reference is a measuring stick kept outside the project: a lean, correct MQTT ->
PostgreSQL worker (dedup receipts, binary COPY, acks after commit) with none of the
gateway's features. ``eldercare bench compare`` runs it right after the gateway, on the
same broker, the same fleet and the same backlog, so the ratio of the two is measured in
one sitting. Its files are run unchanged, with two adaptations made from outside:

- the bench's broker wants a password: ``mqtt.Client.connect`` is wrapped to log in with
  the gateway's own account;
- the bench's publishers send ``steps`` where the reference's model expects
  ``body_temperature``: its ``model`` module is replaced by one of the same form (a
  TypeAdapter over TypedDicts, three range-checked numbers), so validation costs the same.

Its tables live in a database of their own beside the bench's (``<bench>_ref``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import psycopg

from eldercare.gateway.bench.broker import clear_session
from eldercare.gateway.bench.options import Protocol
from eldercare.gateway.services import database_url

#: The bench payload's model, in the reference's own form (see the module docstring).
_MODEL = '''"""Bench payload schema for the reference worker (steps instead of body_temperature)."""
from typing import Annotated
from typing_extensions import TypedDict
from pydantic import Field, StringConstraints, TypeAdapter

class Metrics(TypedDict):
    heart_rate: Annotated[float, Field(ge=20, le=250)]
    spo2: Annotated[float, Field(ge=50, le=100)]
    steps: Annotated[float, Field(ge=0, le=100000)]

class Telemetry(TypedDict):
    msg_id: Annotated[str, StringConstraints(min_length=1, max_length=128)]
    ts: Annotated[int, Field(gt=1_500_000_000_000, lt=4_000_000_000_000)]
    metrics: Metrics

TELEMETRY = TypeAdapter(Telemetry)
'''

#: Runs the reference's worker.py unchanged, logged in with the account in REFPIPE_MQTT_*.
_LAUNCHER = """import os, runpy, sys
import paho.mqtt.client as mqtt
_connect = mqtt.Client.connect
def connect(self, *args, **kwargs):
    self.username_pw_set(os.environ["REFPIPE_MQTT_USER"], os.environ["REFPIPE_MQTT_PASSWORD"])
    return _connect(self, *args, **kwargs)
mqtt.Client.connect = connect
script = sys.argv.pop(1)
sys.argv[0] = script
runpy.run_path(script, run_name="__main__")
"""


#: ``--reference-store like-gateway``: the reference's table given the indexes the gateway's
#: observations keep for charts, rollups and rules (the bench's devices and elders are one to
#: one, so device_id stands in for elder_id), to tell the store's cost from the worker's.
LIKE_GATEWAY_INDEXES = (
    "CREATE INDEX observations_device_metric_time_idx ON observations (device_id, metric, time)",
    "CREATE INDEX observations_time_brin ON observations USING brin (time)",
)


def reference_database(admin_url: str, bench_db: str, reference: Path, like_gateway: bool = False) -> str:
    """Create ``<bench_db>_ref`` with the reference's schema (plus the gateway's indexes); its URL."""
    name = f"{bench_db}_ref"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    url = database_url(admin_url, name)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute((reference / "schema.sql").read_text())
        for statement in LIKE_GATEWAY_INDEXES if like_gateway else ():
            conn.execute(statement)
    return url


def drop_reference_database(admin_url: str, url: str) -> None:
    """Drop the reference's database."""
    name = url.rsplit("/", 1)[-1].split("?")[0]
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class ReferenceWorker:
    """The reference's worker.py as a subprocess on the bench broker; counts what it stored."""

    def __init__(
        self, reference: Path, mqtt_url: str, db_url: str, protocol: Protocol, workdir: Path
    ) -> None:
        from eldercare.devices.connection import MqttTarget

        self.reference = reference
        self.mqtt_url = mqtt_url
        self.target = MqttTarget(mqtt_url)
        self.db_url = db_url
        self.protocol = protocol
        self.client_id = "eldercare-bench-reference"
        self.workdir = workdir
        self.shim = Path(tempfile.mkdtemp(prefix="refpipe-shim-", dir=workdir))
        (self.shim / "model.py").write_text(_MODEL)
        (self.shim / "launch.py").write_text(_LAUNCHER)
        self.stats_path = self.shim / "stats.json"
        self.proc: subprocess.Popen[str] | None = None
        self.pids: list[int] = []
        self.max_rss = 0
        self.stats: dict[str, Any] = {}
        self._log: Any = None

    def command(self) -> list[str]:
        t = self.target
        # The reference's DSN is libpq key=value; ours is a URL, which libpq also takes.
        return [
            sys.executable,
            str(self.shim / "launch.py"),
            str(self.reference / "worker.py"),
            "--host",
            t.host,
            "--port",
            str(t.port),
            "--protocol",
            "5" if self.protocol == "5" else "311",
            "--client-id",
            self.client_id,
            "--dsn",
            self.db_url,
            "--stats",
            str(self.stats_path),
        ]

    def start(self, timeout_s: float = 30.0) -> None:
        """Start it and wait until it has subscribed (its first stdout line)."""
        env = dict(os.environ)
        env["PYTHONPATH"] = str(self.shim)  # its ``model`` is ours (see the module docstring)
        env["REFPIPE_MQTT_USER"] = self.target.username or ""
        env["REFPIPE_MQTT_PASSWORD"] = self.target.password or ""
        with contextlib.suppress(FileNotFoundError):
            self.stats_path.unlink()
        self._log = (self.workdir / "reference.log").open("a")
        self.proc = subprocess.Popen(
            self.command(), env=env, stdout=subprocess.PIPE, stderr=self._log, text=True
        )
        self.pids = [self.proc.pid]
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout_s
        line = self.proc.stdout.readline()  # {"ready": true, ...} once subscribed
        if not line.strip() or time.monotonic() > deadline:
            self.stop()
            raise RuntimeError(
                f"the reference worker did not subscribe; see {self.workdir / 'reference.log'}"
            )

    def received(self) -> int:
        """Messages stored so far (its dedup table has one row per stored message)."""
        with psycopg.connect(self.db_url) as conn:
            row = conn.execute("SELECT count(*) FROM msg_dedup").fetchone()
        return int(row[0]) if row else 0

    def rss(self) -> int:
        with contextlib.suppress(psutil.Error):
            if self.proc is not None:
                self.max_rss = max(self.max_rss, psutil.Process(self.proc.pid).memory_info().rss)
        return self.max_rss

    def stop(self) -> dict[str, Any]:
        """SIGTERM (it commits and acks its batch), then its stats (first_rx_wall, ...)."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
            self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
        self.stats = {}
        with contextlib.suppress(OSError, ValueError):
            self.stats = json.loads(self.stats_path.read_text())
        return self.stats

    def clear(self) -> None:
        """Forget its session on the broker, and what it stored."""
        clear_session(self.mqtt_url, self.client_id, self.protocol)
        with psycopg.connect(self.db_url, autocommit=True) as conn:
            conn.execute("TRUNCATE observations, msg_dedup")

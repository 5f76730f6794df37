"""``eldercare bench ingest``: the highest sustained zero-loss ingest rate, beside a bare drain.

One run, per payload variant (3-metric telemetry, hub messages of 100 samples):

1. bare baseline: a bare paho subscriber (same protocol and subscription kind as the
   worker, QoS 1, counting only) drains a backlog of M messages pre-loaded into its
   persistent session, then keeps up with a paced publisher stepped up in rate;
2. the real worker(s), ``eldercare serve --role ingest`` subprocesses: the same paced steps,
   each passing only if every published message is stored (zero loss) within a couple of
   seconds of the step's end and the lag p99 does not grow; then the worker's own backlog
   drain (offline while M messages are published, then started), for the ratio
   worker / bare drain.

Everything runs on this machine: its own database (created, migrated, dropped unless
``--keep``) and its own Mosquitto. Publishers, broker, worker(s) and PostgreSQL share the
cores, which the output says, with each one's CPU share per step.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing as mp
import os
import platform
import queue
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
import psutil
import psycopg
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from eldercare.gateway.broker import free_port
from eldercare.gateway.services import database_url
from eldercare.simulators.publisher import (
    Fleet,
    PublisherRun,
    PublishPlan,
    PublishReport,
    register_fleet,
)

Protocol = Literal["5", "3.1.1"]
VARIANTS: tuple[str, ...] = ("telemetry", "hub")
TOPIC_FILTER = "eldercare/v1/#"
#: One publisher process is given at most this rate (msg/s) before another is added.
PUBLISHER_PROCESS_RATE = 15_000.0
#: A step passes only if the lag p99 of its second half stays below this multiple of the
#: first half's (plus LAG_GROWTH_SLACK_S): a backlog that grows shows as a lag that grows.
LAG_GROWTH_FACTOR = 1.5
LAG_GROWTH_SLACK_S = 0.1
#: After a failed step, wait this long at most for the backlog to drain, to tell a backlog
#: (everything stored, late) from a loss (messages never stored).
BACKLOG_WAIT_S = 60.0
NO_PROGRESS_S = 10.0
DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
#: The Foundation issue's targets for 3-metric telemetry on the 2-core machine.
TARGET_DATAPOINTS_S = 60_000.0
TARGET_DRAIN_RATIO = 0.6


@dataclass(frozen=True)
class BenchOptions:
    """How ``eldercare bench ingest`` runs; the defaults are the documented benchmark."""

    #: PostgreSQL URL with the right to CREATE DATABASE; the bench database is made beside it.
    admin_url: str = DEFAULT_ADMIN_URL
    variants: tuple[str, ...] = VARIANTS
    #: Ingest worker processes (two share the load on a shared subscription).
    workers: int = 1
    #: MQTT protocol of the worker and of the bare subscriber.
    protocol: Protocol = "5"
    #: MQTT protocol of the publishers (5: 0x10 answers are sent again, as devices must).
    publisher_protocol: Protocol = "3.1.1"
    #: Paced steps, messages/s: 3-metric telemetry, and hub messages (each with
    #: ``samples_per_message`` samples of 3 metrics).
    rates: tuple[float, ...] = (4_000, 6_000, 8_000, 10_000, 12_000, 14_000, 16_000, 20_000)
    hub_rates: tuple[float, ...] = (50, 100, 150, 200, 250, 300, 400, 500, 600)
    step_s: float = 20.0
    #: Steps of the bare subscriber's ladder (a baseline: shorter is enough).
    bare_step_s: float = 10.0
    #: A step passes if everything published is stored within this many seconds of its end.
    settle_s: float = 2.0
    #: Backlogs for the drain measurements (bare and worker), in messages.
    drain_messages: int = 200_000
    hub_drain_messages: int = 5_000
    devices: int = 1_000
    hubs: int = 100
    subs_per_hub: int = 10
    samples_per_message: int = 100
    #: Publisher processes per step; 0: one per 15,000 msg/s of target rate.
    publishers: int = 0
    #: Run the bare subscriber phases (the baseline).
    bare: bool = True
    #: Stop a ladder at its first failed step.
    stop_at_failure: bool = True
    #: Extra ELDERCARE_* settings for the workers, e.g. (("ELDERCARE_BATCH_SIZE", "1000"),).
    worker_env: tuple[tuple[str, str], ...] = ()
    #: Keep the database, the broker's config and the workers' logs afterwards.
    keep: bool = False
    #: Write the results as JSON here too.
    json_path: str | None = None
    #: Record the (first) worker with py-spy during its backlog drain: files
    #: ``<profile_prefix>-<variant>.txt`` (collapsed stacks, one line per stack, with thread ids)
    #: and a summary printed at the end of the drain.
    profile_prefix: str | None = None

    @classmethod
    def quick(cls, **changes: Any) -> BenchOptions:
        """A smoke-test run: short steps, small backlogs (about 30 s for both variants)."""
        base = cls(
            rates=(1_000, 2_000),
            hub_rates=(20, 40),
            step_s=1.5,
            settle_s=2.0,
            drain_messages=3_000,
            hub_drain_messages=60,
            devices=100,
            hubs=10,
        )
        return replace(base, **changes)

    def fleet(self, variant: str) -> Fleet:
        """The simulated fleet of one variant."""
        if variant == "hub":
            return Fleet(
                variant="hub",
                size=self.hubs,
                subs_per_hub=self.subs_per_hub,
                samples_per_message=self.samples_per_message,
                # Close together: the worker's lag histogram measures from the oldest sample,
                # and the bench subtracts that sample's age (lag_offset_s); 1 ms apart keeps
                # it at 99 ms, inside the histogram's fine buckets.
                sample_spacing_ms=1,
                prefix="bench",
            )
        return Fleet(variant="telemetry", size=self.devices, prefix="bench")

    def ladder(self, variant: str) -> tuple[float, ...]:
        return self.hub_rates if variant == "hub" else self.rates

    def lag_offset_s(self, variant: str) -> float:
        """How old a message's oldest sample is when published (what the lag includes)."""
        fleet = self.fleet(variant)
        if variant != "hub":
            return 0.0
        return (fleet.samples_per_message - 1) * fleet.sample_spacing_ms / 1000

    def drain_size(self, variant: str) -> int:
        return self.hub_drain_messages if variant == "hub" else self.drain_messages


@dataclass(frozen=True)
class StepResult:
    """One paced step: what was published, what was stored, and the verdict."""

    target_rate: float
    published: int
    publish_rate: float
    stored: int
    stored_rate: float
    #: Seconds after the last publish until everything was stored (None: never).
    catch_up_s: float | None
    lag_p50_s: float | None
    lag_p99_s: float | None
    lag_p99_first_half_s: float | None
    lag_p99_second_half_s: float | None
    rss_mib: float
    cpu: dict[str, float]
    verdict: str
    passed: bool
    #: Workers only: mean messages per committed batch, write+commit time p50 / p99.
    batch_mean: float | None = None
    commit_p50_s: float | None = None
    commit_p99_s: float | None = None


@dataclass(frozen=True)
class DrainResult:
    """A backlog drained by a subscriber that was offline while it was published."""

    messages: int
    drained: int
    seconds: float
    rate: float
    rss_mib: float
    #: Including the worker's start-up (process start to last commit); None for bare.
    seconds_from_start: float | None = None
    #: CPU during the drain, % of one core per process group (see CpuMeter).
    cpu: dict[str, float] = field(default_factory=dict)
    #: Workers only: mean messages per committed batch, write+commit time p50 / p99.
    batch_mean: float | None = None
    commit_p50_s: float | None = None
    commit_p99_s: float | None = None


@dataclass(frozen=True)
class VariantResult:
    """Everything measured for one payload variant."""

    variant: str
    datapoints_per_message: int
    bare_drain: DrainResult | None
    bare_steps: tuple[StepResult, ...]
    worker_steps: tuple[StepResult, ...]
    worker_drain: DrainResult | None
    #: Rows counted in the database for the worker phases vs what was published to them.
    receipts_expected: int
    receipts_found: int
    observations_expected: int
    observations_found: int
    dead_letters: dict[str, int]
    notes: tuple[str, ...]

    @property
    def sustained(self) -> StepResult | None:
        """The fastest passing worker step."""
        ok = [s for s in self.worker_steps if s.passed]
        return max(ok, key=lambda s: s.publish_rate) if ok else None

    @property
    def bare_sustained(self) -> StepResult | None:
        ok = [s for s in self.bare_steps if s.passed]
        return max(ok, key=lambda s: s.publish_rate) if ok else None

    @property
    def drain_ratio(self) -> float | None:
        """Worker drain rate / bare drain rate (the apples-to-apples ratio)."""
        if self.worker_drain and self.bare_drain and self.bare_drain.rate:
            return self.worker_drain.rate / self.bare_drain.rate
        return None

    @property
    def lossless(self) -> bool:
        return (
            self.receipts_found == self.receipts_expected
            and self.observations_found == self.observations_expected
        )


@dataclass(frozen=True)
class BenchResult:
    """What ``run_ingest_bench`` measured, with the machine it ran on."""

    options: BenchOptions
    machine: dict[str, str]
    variants: tuple[VariantResult, ...]
    notes: tuple[str, ...]
    started_at: float
    seconds: float
    database: str | None = None

    def to_json(self) -> str:
        """The whole result as JSON (derived figures included)."""
        data = asdict(self)
        for v, out in zip(self.variants, data["variants"], strict=True):
            out["sustained_rate"] = v.sustained.publish_rate if v.sustained else None
            out["drain_ratio"] = v.drain_ratio
        return json.dumps(data, indent=2, default=str)


# ---- the store -----------------------------------------------------------------------------


@contextlib.contextmanager
def bench_database(admin_url: str, keep: bool) -> Iterator[tuple[str, str]]:
    """A fresh, migrated database ``eldercare_bench_<random>``; dropped afterwards unless keep."""
    from eldercare.gateway.store.migrate import migrate

    name = f"eldercare_bench_{secrets.token_hex(4)}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = database_url(admin_url, name)
    try:
        migrate(url)
        yield name, url
    finally:
        if not keep:
            with psycopg.connect(admin_url, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _count(url: str, sql: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute(sql).fetchone()
    return int(row[0]) if row and row[0] is not None else 0


# ---- the broker ----------------------------------------------------------------------------


#: The bench publishers' broker account: may publish under any device or hub id.
BENCH_USER = "eldercare-bench"
BENCH_ACL = f"""
# Added by eldercare bench ingest: one publisher connection sends for many device ids.
user {BENCH_USER}
topic write eldercare/v1/#
"""


class BenchBroker:
    """The project's Mosquitto (``ProjectBroker``: packaged config, passwords, ACL) for the bench.

    The one difference from the shipped setup: an extra account, ``eldercare-bench``, may
    publish under every device id, because a bench publisher sends for a thousand ids over
    one connection, which the per-device ACL forbids. Workers and bare subscribers use the
    gateway's own account, as in production.
    """

    def __init__(self, workdir: Path) -> None:
        from eldercare.gateway.broker import ProjectBroker

        class _Broker(ProjectBroker):
            def _write_files(self) -> None:
                super()._write_files()
                with self.acl_file.open("a", encoding="utf-8") as acl:
                    acl.write(BENCH_ACL)

        self._broker = _Broker(workdir / "mqtt", backend="mosquitto").start()
        self.url = self._broker.gateway.url
        self.publisher_url = self._broker.add_user(BENCH_USER).url
        self.worker_env = self._broker.worker_env()
        conf = self._broker.config_file
        self.pid = next(
            (p.pid for p in psutil.Process().children() if str(conf) in " ".join(p.cmdline())),
            0,
        )
        keys = ("max_inflight_messages", "max_queued_messages", "max_queued_bytes", "persistence")
        self.limits = {
            k: v.strip()
            for k, _, v in (line.partition(" ") for line in conf.read_text().splitlines())
            if k in keys
        }

    def close(self) -> None:
        self._broker.stop()


def mosquitto_version() -> str:
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    try:
        out = subprocess.run([exe, "-h"], capture_output=True, text=True, timeout=5).stdout
    except OSError:
        return "?"
    return out.splitlines()[0].strip() if out else "?"


# ---- MQTT sessions -------------------------------------------------------------------------


def _client(client_id: str, protocol: Protocol, clean: bool) -> mqtt.Client:
    v5 = protocol == "5"
    return mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
        clean_session=None if v5 else clean,
    )


def _connect(client: mqtt.Client, url: str, protocol: Protocol, clean: bool) -> None:
    from eldercare.devices.connection import MqttTarget

    target = MqttTarget(url)
    if target.username:
        client.username_pw_set(target.username, target.password)
    if protocol == "5":
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 0 if clean else 3_600
        client.connect(target.host, target.port, 30, clean_start=clean, properties=props)
    else:
        client.connect(target.host, target.port, 30)


def clear_session(url: str, client_id: str, protocol: Protocol) -> None:
    """Make the broker forget a persistent session (and the messages queued for it)."""
    client = _client(client_id, protocol, clean=True)
    _connect(client, url, protocol, clean=True)
    deadline = time.monotonic() + 10
    while not client.is_connected() and time.monotonic() < deadline:
        client.loop(timeout=0.05)
    client.disconnect()
    client.loop(timeout=0.05)


@dataclass(frozen=True)
class BareReport:
    """What one bare subscriber process counted."""

    index: int
    received: int
    first_at: float
    last_at: float
    error: str | None = None


def _bare_main(
    url: str,
    protocol: Protocol,
    client_id: str,
    topic: str,
    index: int,
    counts: Any,
    ready: Any,
    stop: Any,
    results: Any,
) -> None:
    """A bare subscriber process: QoS 1, persistent session, counts messages, nothing else."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops it (stop event)
    received = 0
    first_at = last_at = 0.0

    def on_message(client, userdata, msg) -> None:
        nonlocal received, first_at, last_at
        last_at = time.time()
        if not received:
            first_at = last_at
        received += 1

    def on_connect(client, userdata, flags, reason_code, properties) -> None:
        client.subscribe(topic, qos=1)

    def on_subscribe(client, userdata, mid, reason_codes, properties) -> None:
        ready[index] = 1

    client = _client(client_id, protocol, clean=False)
    client.on_message = on_message
    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    error = None
    try:
        _connect(client, url, protocol, clean=False)
        client.loop_start()
        while not stop.wait(0.02):
            counts[index] = received
        counts[index] = received
        client.disconnect()
        client.loop_stop()
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    results.put(BareReport(index, received, first_at, last_at, error))


class BareSubscribers:
    """Bare paho subscriber processes on the worker's kind of subscription (counting only)."""

    def __init__(self, url: str, protocol: Protocol, n: int, group: str = "bench-bare") -> None:
        self.url, self.protocol, self.n = url, protocol, n
        # One subscriber: a plain subscription, as the shipped worker; several: a shared group.
        self.topic = f"$share/{group}/{TOPIC_FILTER}" if group and n > 1 else TOPIC_FILTER
        self.client_ids = [f"eldercare-bench-bare-{i}" for i in range(n)]
        self._ctx = mp.get_context("spawn")
        self._procs: list[Any] = []
        self._counts: Any = None
        self._stop: Any = None
        self._results: Any = None
        self.pids: list[int] = []

    def start(self, timeout_s: float = 30.0) -> None:
        """Start the processes and wait until each has its subscription."""
        ctx = self._ctx
        self._counts = ctx.Array("q", self.n, lock=False)
        ready = ctx.Array("b", self.n, lock=False)
        self._stop = ctx.Event()
        self._results = ctx.Queue()
        self._procs = [
            ctx.Process(
                target=_bare_main,
                args=(
                    self.url,
                    self.protocol,
                    cid,
                    self.topic,
                    i,
                    self._counts,
                    ready,
                    self._stop,
                    self._results,
                ),
                daemon=True,
            )
            for i, cid in enumerate(self.client_ids)
        ]
        for p in self._procs:
            p.start()
        self.pids = [p.pid for p in self._procs]
        deadline = time.monotonic() + timeout_s
        while not all(ready):
            if time.monotonic() > deadline or any(not p.is_alive() for p in self._procs):
                self.stop()
                raise RuntimeError("bare subscribers did not subscribe in time")
            time.sleep(0.01)

    def received(self) -> int:
        return sum(self._counts) if self._counts is not None else 0

    def stop(self) -> list[BareReport]:
        """Disconnect (the sessions stay on the broker) and collect the reports."""
        if not self._procs:
            return []
        self._stop.set()
        reports: list[BareReport] = []
        deadline = time.monotonic() + 15
        while len(reports) < len(self._procs) and time.monotonic() < deadline:
            with contextlib.suppress(queue.Empty):
                reports.append(self._results.get(timeout=0.2))
        for p in self._procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
        self._procs = []
        return reports

    def clear(self) -> None:
        """Forget the sessions on the broker."""
        for cid in self.client_ids:
            clear_session(self.url, cid, self.protocol)


# ---- the workers ---------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerSample:
    """The workers' counters at one instant, summed over the worker processes."""

    at: float
    stored: int
    received: int
    datapoints: int
    dead_letters: dict[str, float]
    #: Cumulative bucket counts of eldercare_ingest_lag_seconds: (upper bound, count).
    lag_buckets: tuple[tuple[float, float], ...]
    #: Messages stored by each worker.
    per_worker: tuple[int, ...] = ()
    #: Cumulative buckets of eldercare_ingest_commit_seconds (write + COMMIT of one batch).
    commit_buckets: tuple[tuple[float, float], ...] = ()
    #: Batches committed, and the messages in them.
    batches: int = 0
    batched: int = 0

    def batch_stats(self, before: WorkerSample) -> tuple[float | None, float | None, float | None]:
        """Mean batch size, commit p50 and p99 since ``before``."""
        n = self.batches - before.batches
        mean = (self.batched - before.batched) / n if n else None
        delta = bucket_delta(self.commit_buckets, before.commit_buckets)
        return mean, histogram_quantile(0.5, delta), histogram_quantile(0.99, delta)


def scrape(port: int) -> dict[str, Any]:
    """The ingest metrics one worker exposes on ``port``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, Any] = {"dead_letters": {}, "lag": {}, "commit": {}}
    names = {
        "eldercare_ingest_messages_stored_total": "stored",
        "eldercare_ingest_messages_received_total": "received",
        "eldercare_ingest_datapoints_stored_total": "datapoints",
        "eldercare_ingest_batch_size_count": "batches",
        "eldercare_ingest_batch_size_sum": "batched",
    }
    for family in text_string_to_metric_families(text):
        if not family.name.startswith("eldercare_ingest"):
            continue
        for s in family.samples:
            if s.name in names:
                out[names[s.name]] = s.value
            elif s.name == "eldercare_ingest_dead_letters_total":
                out["dead_letters"][s.labels.get("reason", "?")] = s.value
            elif s.name == "eldercare_ingest_lag_seconds_bucket":
                out["lag"][float(s.labels["le"])] = s.value
            elif s.name == "eldercare_ingest_commit_seconds_bucket":
                out["commit"][float(s.labels["le"])] = s.value
    return out


def histogram_quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float | None:
    """The q-quantile of a cumulative histogram, interpolated linearly within its bucket."""
    if not buckets:
        return None
    total = buckets[-1][1]
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if math.isinf(upper):
                return lower  # beyond the last finite bound: the bound is all we know
            inside = count - below
            return lower + (upper - lower) * ((rank - below) / inside if inside else 0.0)
        lower, below = upper, count
    return lower


def bucket_delta(
    after: Sequence[tuple[float, float]], before: Sequence[tuple[float, float]]
) -> tuple[tuple[float, float], ...]:
    """Observations between two scrapes of one cumulative histogram."""
    prior = dict(before)
    return tuple((le, count - prior.get(le, 0.0)) for le, count in after)


class Workers:
    """``eldercare serve --role ingest`` subprocesses of the bench, and their metrics."""

    def __init__(
        self,
        options: BenchOptions,
        db_url: str,
        mqtt_url: str,
        workdir: Path,
        broker_env: dict[str, str] | None = None,
    ) -> None:
        self.options = options
        #: ELDERCARE_MQTT_* from the broker (the worker settings' own defaults otherwise).
        self.broker_env = broker_env or {}
        self.db_url = db_url
        self.mqtt_url = mqtt_url
        self.workdir = workdir
        self.client_ids = [f"eldercare-bench-ingest-{i}" for i in range(options.workers)]
        self.ports = [free_port() for _ in self.client_ids]
        self.procs: list[subprocess.Popen[bytes]] = []
        self.started_at = 0.0
        self._logs: list[Any] = []
        self._ps: list[psutil.Process] = []
        self.max_rss = 0

    def command(self) -> list[str]:
        exe = Path(sys.executable).with_name("eldercare")
        if exe.exists():
            return [str(exe), "serve", "--role", "ingest"]
        code = "from eldercare.gateway.cli import main; main()"
        return [sys.executable, "-c", code, "serve", "--role", "ingest"]

    def env(self, i: int) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ELDERCARE_")}
        env.update(self.broker_env)
        env.update(
            ELDERCARE_DATABASE_URL=self.db_url,
            ELDERCARE_MQTT_URL=self.mqtt_url,
            ELDERCARE_MQTT_PROTOCOL=self.options.protocol,
            ELDERCARE_MQTT_CLIENT_ID=self.client_ids[i],
            # One worker: the shipped set-up (plain subscription, lease). Several: a shared
            # group, to measure the load split (not restart-safe on Mosquitto 2.0).
            ELDERCARE_MQTT_SHARED_GROUP="" if len(self.client_ids) == 1 else "bench",
            ELDERCARE_METRICS_PORT=str(self.ports[i]),
            ELDERCARE_LOG_FORMAT="json",
            ELDERCARE_LOG_LEVEL="INFO",
        )
        env.update(dict(self.options.worker_env))
        return env

    def start(self) -> None:
        """Start the workers and wait until their /metrics answer."""
        self.started_at = time.time()
        for i in range(len(self.client_ids)):
            log = (self.workdir / f"worker-{i}.log").open("ab")
            self._logs.append(log)
            self.procs.append(
                subprocess.Popen(
                    self.command(),
                    env=self.env(i),
                    cwd=self.workdir,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        self._ps = [psutil.Process(p.pid) for p in self.procs]
        deadline = time.monotonic() + 60
        for i, port in enumerate(self.ports):
            while True:
                if self.procs[i].poll() is not None:
                    raise RuntimeError(
                        f"worker {i} exited ({self.procs[i].returncode}); "
                        f"see {self.workdir / f'worker-{i}.log'}"
                    )
                try:
                    scrape(port)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"worker {i} /metrics never answered") from None
                    time.sleep(0.1)

    @property
    def pids(self) -> list[int]:
        """The workers' processes: each worker and its committer process."""
        pids = []
        for p in self._ps:
            pids.append(p.pid)
            with contextlib.suppress(psutil.Error):
                pids.extend(c.pid for c in p.children(recursive=True))
        return pids

    def sample(self) -> WorkerSample:
        """Scrape every worker and sum the counters."""
        stored = received = datapoints = 0.0
        dead: dict[str, float] = {}
        lag: dict[float, float] = {}
        commit: dict[float, float] = {}
        batches = batched = 0.0
        per_worker = []
        for port in self.ports:
            m = scrape(port)
            per_worker.append(int(m.get("stored", 0.0)))
            batches += m.get("batches", 0.0)
            batched += m.get("batched", 0.0)
            for le, v in m["commit"].items():
                commit[le] = commit.get(le, 0.0) + v
            stored += m.get("stored", 0.0)
            received += m.get("received", 0.0)
            datapoints += m.get("datapoints", 0.0)
            for k, v in m["dead_letters"].items():
                dead[k] = dead.get(k, 0.0) + v
            for le, v in m["lag"].items():
                lag[le] = lag.get(le, 0.0) + v
        self.rss()
        return WorkerSample(
            time.time(),
            int(stored),
            int(received),
            int(datapoints),
            dead,
            tuple(sorted(lag.items())),
            tuple(per_worker),
            tuple(sorted(commit.items())),
            int(batches),
            int(batched),
        )

    def rss(self) -> int:
        """Resident memory of the workers now (bytes, summed); tracks the maximum."""
        total = 0
        for p in self._ps:
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
                total += sum(c.memory_info().rss for c in p.children(recursive=True))
        self.max_rss = max(self.max_rss, total)
        return total

    def stop(self) -> None:
        """SIGTERM (the worker commits and acks what it holds), then wait."""
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
        for log in self._logs:
            log.close()
        self.procs, self._logs, self._ps = [], [], []

    def clear_sessions(self) -> None:
        """Forget the workers' persistent sessions on the broker (between variants)."""
        for cid in self.client_ids:
            clear_session(self.mqtt_url, cid, self.options.protocol)


# ---- CPU accounting ------------------------------------------------------------------------


class CpuMeter:
    """CPU used by groups of processes since it was made, in % of one core (100 = one core).

    Each process's last reading is kept, so one that has exited still counts what it used
    up to the last ``read`` before it exited.
    """

    def __init__(self, groups: dict[str, Sequence[int]]) -> None:
        self._procs: dict[str, list[psutil.Process]] = {}
        for name, pids in groups.items():
            procs = []
            for pid in pids:
                with contextlib.suppress(psutil.Error):
                    procs.append(psutil.Process(pid))
            self._procs[name] = procs
        self._t0 = time.monotonic()
        self._last: dict[int, float] = {}
        self._base = {p.pid: self._cpu(p) for ps in self._procs.values() for p in ps}
        self._total0 = psutil.cpu_times()

    def _cpu(self, p: psutil.Process) -> float:
        try:
            t = p.cpu_times()
            # Children reaped by this process count too (none for our workers and brokers).
            self._last[p.pid] = t.user + t.system
        except psutil.Error:
            pass
        return self._last.get(p.pid, 0.0)

    def read(self) -> dict[str, float]:
        """% of one core per group since start, and 'machine' (all processes, same unit)."""
        dt = time.monotonic() - self._t0
        if dt < 0.25:
            return {}  # too short to mean anything
        out = {
            name: 100.0 * sum(self._cpu(p) - self._base[p.pid] for p in ps) / dt
            for name, ps in self._procs.items()
        }
        t1 = psutil.cpu_times()
        busy0 = sum(self._total0) - self._total0.idle - getattr(self._total0, "iowait", 0.0)
        busy1 = sum(t1) - t1.idle - getattr(t1, "iowait", 0.0)
        total = sum(t1) - sum(self._total0)
        # Same unit as the groups: 100 = one core busy (all cores busy = 100 x cores).
        cores = os.cpu_count() or 1
        out["machine"] = 100.0 * cores * (busy1 - busy0) / total if total > 0 else 0.0
        # Everything else busy meanwhile: other users' processes, PostgreSQL's background
        # processes, the kernel. A large figure means the run was disturbed.
        out["rest"] = max(0.0, out["machine"] - sum(v for k, v in out.items() if k != "machine"))
        return out


def postgres_pids(url: str) -> list[int]:
    """The server processes serving the bench database (the workers' connections)."""
    name = urlsplit(url).path.lstrip("/")
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        ).fetchall()
    return [int(r[0]) for r in rows]


# ---- one variant ---------------------------------------------------------------------------


def _fmt_rate(x: float | None) -> str:
    return "—" if x is None else f"{x:,.0f}"


def _fmt_s(x: float | None) -> str:
    if x is None:
        return "—"
    return f"{x * 1000:,.0f} ms" if x < 10 else f"{x:,.1f} s"


def _cpu_text(cpu: dict[str, float]) -> str:
    keys = ("worker", "postgres", "broker", "publishers", "bare", "bench", "rest")
    if not cpu:
        return "CPU: too short to measure"
    parts = [f"{k} {cpu[k]:.0f}%" for k in keys if k in cpu]
    if "machine" in cpu:
        parts.append(f"machine {cpu['machine']:.0f}% of {100 * (os.cpu_count() or 1)}%")
    return "CPU " + ", ".join(parts)


def _batch_text(r: StepResult | DrainResult) -> str:
    if r.batch_mean is None:
        return ""
    return (
        f", batches of {r.batch_mean:,.0f} msgs committed in p50/p99 "
        f"{_fmt_s(r.commit_p50_s)}/{_fmt_s(r.commit_p99_s)}"
    )


class VariantRun:
    """Runs every phase of one payload variant against one broker and database."""

    def __init__(
        self,
        options: BenchOptions,
        variant: str,
        console: Console,
        broker: BenchBroker,
        db_url: str,
        workdir: Path,
    ) -> None:
        self.o = options
        self.variant = variant
        self.console = console
        self.broker = broker
        self.db_url = db_url
        self.workdir = workdir
        self.fleet = options.fleet(variant)
        self.dp = self.fleet.datapoints_per_message
        self.notes: list[str] = []
        self._tags = 0
        self.worker_published = 0

    # -- helpers

    def tag(self, phase: str) -> str:
        self._tags += 1
        return f"{self.variant[0]}{phase}{self._tags}"

    def plan(self, rate: float | None, tag: str, **kw: Any) -> PublishPlan:
        procs = self.o.publishers or (2 if rate is None else max(1, math.ceil(rate / PUBLISHER_PROCESS_RATE)))
        return PublishPlan(
            mqtt_url=self.broker.publisher_url,
            fleet=self.fleet,
            rate=rate,
            processes=procs,
            tag=tag,
            protocol=self.o.publisher_protocol,
            **kw,
        )

    def say(self, text: str) -> None:
        self.console.print(f"[bold cyan]{self.variant}[/] {text}")

    def preload(self, count: int) -> PublishReport:
        """Publish ``count`` messages as fast as the publishers can, all PUBACKed."""
        with PublisherRun(self.plan(None, self.tag("d"), count=count)) as run:
            run.start()
            report = run.wait()
        if report.acked != count or report.errors:
            raise RuntimeError(
                f"pre-load: {report.acked:,}/{count:,} acknowledged by the broker {'; '.join(report.errors)}"
            )
        return report

    # -- phases

    def run(self) -> VariantResult:
        bare_drain, bare_steps = (None, ()) if not self.o.bare else self.run_bare()
        workers = Workers(self.o, self.db_url, self.broker.url, self.workdir, self.broker.worker_env)
        receipts0 = _count(self.db_url, "SELECT count(*) FROM message_receipts")
        obs0 = _count(self.db_url, "SELECT count(*) FROM observations")
        try:
            self.say(f"starting {self.o.workers} ingest worker(s): {' '.join(workers.command())}")
            workers.start()
            self.warm_up(workers)
            worker_steps = self.ladder("worker", workers)
            worker_drain = self.worker_drain(workers)
        finally:
            workers.stop()
            workers.clear_sessions()
        receipts = _count(self.db_url, "SELECT count(*) FROM message_receipts") - receipts0
        obs = _count(self.db_url, "SELECT count(*) FROM observations") - obs0
        with psycopg.connect(self.db_url) as conn:
            rows = conn.execute("SELECT reason, count(*) FROM dead_letters GROUP BY reason").fetchall()
        dead: dict[str, int] = {str(r[0]): int(r[1]) for r in rows}
        if dead:
            self.notes.append(f"dead letters in the bench database: {dead}")
        expected = self.worker_published
        if receipts != expected:
            self.notes.append(
                f"LOSS CHECK FAILED: {expected:,} messages published to the worker, "
                f"{receipts:,} receipts in the database"
            )
        return VariantResult(
            variant=self.variant,
            datapoints_per_message=self.dp,
            bare_drain=bare_drain,
            bare_steps=tuple(bare_steps),
            worker_steps=tuple(worker_steps),
            worker_drain=worker_drain,
            receipts_expected=expected,
            receipts_found=receipts,
            observations_expected=expected * self.dp,
            observations_found=obs,
            dead_letters=dead,
            notes=tuple(self.notes),
        )

    def run_bare(self) -> tuple[DrainResult, list[StepResult]]:
        bare = BareSubscribers(self.broker.url, self.o.protocol, self.o.workers)
        m = self.o.drain_size(self.variant)
        try:
            # The sessions must exist (subscribed, offline) before the backlog is published.
            bare.start()
            bare.stop()
            self.say(f"bare drain: pre-loading {m:,} messages into the offline session(s)")
            self.preload(m)
            t0 = time.time()
            bare.start()
            meter = self._drain_meter(bare.pids, "bare")
            deadline = time.monotonic() + 120
            while bare.received() < m and time.monotonic() < deadline:
                time.sleep(0.05)
                meter.read()  # keeps each process's last reading
            cpu = meter.read()
            reports = bare.stop()
            got = sum(r.received for r in reports)
            first = min((r.first_at for r in reports if r.received), default=t0)
            last = max((r.last_at for r in reports if r.received), default=t0)
            span = max(1e-6, last - first)
            drain = DrainResult(m, got, span, got / span, 0.0, None, cpu)
            self.say(
                f"bare drain: {got:,}/{m:,} messages in {span:.2f} s = "
                f"[bold]{drain.rate:,.0f} msg/s[/] (MQTT {self.o.protocol}, QoS 1, counting only)"
                f" | {_cpu_text(cpu)}"
            )
            bare.start()
            steps = self.ladder("bare", bare)
        finally:
            bare.stop()
            bare.clear()
        return drain, steps

    def warm_up(self, workers: Workers) -> None:
        """Publish a few messages and wait until they are stored: the workers are subscribed."""
        n = max(50, min(1_000, self.o.devices)) if self.variant == "telemetry" else 20
        before = workers.sample().stored
        deadline = time.monotonic() + 60
        with PublisherRun(self.plan(min(1_000.0, n * 2.0), self.tag("w"), count=n)) as run:
            run.start()
            report = run.wait()
        self.worker_published += report.published
        while workers.sample().stored - before < report.published:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    "the workers stored nothing of the warm-up messages in 60 s; "
                    f"see the logs in {self.workdir}"
                )
            time.sleep(0.1)

    def ladder(self, who: str, sink: Workers | BareSubscribers) -> list[StepResult]:
        steps: list[StepResult] = []
        rates = self.o.ladder(self.variant)
        if who == "bare" and len(rates) > 1:
            # The bare subscriber is the baseline: if it keeps up with the top rate, that is
            # all there is to know; otherwise find its limit from the bottom.
            top = self.step(who, sink, rates[-1], "top")
            steps.append(top)
            if top.passed:
                return steps
            rates = rates[:-1]
        for i, rate in enumerate(rates, 1):
            step = self.step(who, sink, rate, f"{i}/{len(rates)}")
            steps.append(step)
            if not step.passed and self.o.stop_at_failure:
                break
        return steps

    def step(self, who: str, sink: Workers | BareSubscribers, rate: float, label: str) -> StepResult:
        """One paced step: publish at ``rate`` for step_s, then check what arrived."""
        is_worker = isinstance(sink, Workers)

        def count() -> int:
            return sink.sample().stored if isinstance(sink, Workers) else sink.received()

        first = sink.sample() if isinstance(sink, Workers) else None
        base = first.stored if first else count()
        mid: WorkerSample | None = None
        step_s = self.o.step_s if is_worker else min(self.o.step_s, self.o.bare_step_s)
        run = PublisherRun(self.plan(rate, self.tag("s"), duration_s=step_s))
        groups: dict[str, Sequence[int]] = {
            "broker": [self.broker.pid],
            "publishers": run.pids(),
            "bench": [os.getpid()],
        }
        if isinstance(sink, Workers):
            groups["worker"] = sink.pids
            with contextlib.suppress(psycopg.Error):
                groups["postgres"] = postgres_pids(self.db_url)
        else:
            groups["bare"] = sink.pids
        samples: list[tuple[float, int, int]] = []  # (time, published, stored)
        rss = 0.0
        with run:
            t0 = run.start()
            meter = CpuMeter(groups)
            title = f"{who} step {label}: target {rate:,.0f} msg/s"
            with Live(Text(title), console=self.console, transient=True, refresh_per_second=4) as live:
                while run.running():
                    time.sleep(0.25)
                    now = time.time()
                    s = sink.sample() if isinstance(sink, Workers) else None
                    stored = (s.stored if s else count()) - base
                    published = run.published()
                    samples.append((now, published, stored))
                    if s is not None and mid is None and now - t0 >= step_s / 2:
                        mid = s
                    rss = max(rss, sink.rss() if isinstance(sink, Workers) else 0)
                    live.update(Text(self._live_line(title, now - t0, step_s, samples, rss, meter)))
            report = run.wait()
            cpu = meter.read()
        if is_worker:
            self.worker_published += report.published
        # Everything published (and PUBACKed) must be stored within settle_s.
        catch_up = None
        end = report.last_publish
        deadline = time.monotonic() + self.o.settle_s
        final: WorkerSample | None = None
        while True:
            final = sink.sample() if isinstance(sink, Workers) else None
            stored = (final.stored if final else count()) - base
            if stored >= report.published:
                catch_up = max(0.0, time.time() - end)
                break
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        verdict, passed = self._verdict(report, stored, catch_up)
        if not passed and stored < report.published:
            stored, verdict = self._wait_backlog(count, base, report.published, verdict)
        lag50 = lag99 = lag99a = lag99b = None
        offset = self.o.lag_offset_s(self.variant)

        def quantile(q: float, after: WorkerSample, before: WorkerSample) -> float | None:
            x = histogram_quantile(q, bucket_delta(after.lag_buckets, before.lag_buckets))
            return None if x is None else max(0.0, x - offset)

        if first is not None and final is not None:
            lag50 = quantile(0.5, final, first)
            lag99 = quantile(0.99, final, first)
            if mid is not None:
                lag99a = quantile(0.99, mid, first)
                lag99b = quantile(0.99, final, mid)
                if (
                    passed
                    and lag99a is not None
                    and lag99b is not None
                    and lag99b > LAG_GROWTH_FACTOR * lag99a + LAG_GROWTH_SLACK_S
                ):
                    passed = False
                    verdict = f"lag growing (p99 {_fmt_s(lag99a)} → {_fmt_s(lag99b)})"
        if first is not None and final is not None:
            dead = sum(final.dead_letters.values()) - sum(first.dead_letters.values())
            if dead > 0:  # the bench's messages are all valid: a rejection is a fault
                passed = False
                verdict = f"{verdict}; {dead:,.0f} items dead-lettered"
        stored_rate = self._stored_rate(samples, report)
        result = StepResult(
            target_rate=rate,
            published=report.published,
            publish_rate=report.achieved_rate,
            stored=stored,
            stored_rate=stored_rate,
            catch_up_s=catch_up,
            lag_p50_s=lag50,
            lag_p99_s=lag99,
            lag_p99_first_half_s=lag99a,
            lag_p99_second_half_s=lag99b,
            rss_mib=rss / 2**20,
            cpu=cpu,
            verdict=verdict,
            passed=passed,
        )
        if first is not None and final is not None:
            mean, p50, p99 = final.batch_stats(first)
            result = replace(result, batch_mean=mean, commit_p50_s=p50, commit_p99_s=p99)
        self._print_step(who, label, result)
        return result

    def _live_line(
        self,
        title: str,
        elapsed: float,
        step_s: float,
        samples: list[tuple[float, int, int]],
        rss: float,
        meter: CpuMeter,
    ) -> str:
        pub_rate = stored_rate = 0.0
        if len(samples) >= 2:
            (ta, pa, sa), (tb, pb, sb) = samples[max(0, len(samples) - 5)], samples[-1]
            if tb > ta:
                pub_rate, stored_rate = (pb - pa) / (tb - ta), (sb - sa) / (tb - ta)
        published, stored = (samples[-1][1], samples[-1][2]) if samples else (0, 0)
        line = (
            f"{title} | {elapsed:4.1f}/{step_s:.0f} s | published {pub_rate:,.0f}/s"
            f" | stored {stored_rate:,.0f}/s | backlog {max(0, published - stored):,}"
        )
        if rss:
            line += f" | RSS {rss / 2**20:,.0f} MiB"
        return line + " | " + _cpu_text(meter.read())

    @staticmethod
    def _stored_rate(samples: list[tuple[float, int, int]], report: PublishReport) -> float:
        inside = [s for s in samples if report.first_publish <= s[0] <= report.last_publish]
        if len(inside) < 2:
            return 0.0
        (ta, _, sa), (tb, _, sb) = inside[0], inside[-1]
        return (sb - sa) / (tb - ta) if tb > ta else 0.0

    def _verdict(self, report: PublishReport, stored: int, catch_up: float | None) -> tuple[str, bool]:
        if report.errors:
            return "publisher error: " + "; ".join(report.errors), False
        if report.acked < report.published:
            return f"broker did not acknowledge {report.published - report.acked:,}", False
        if catch_up is None:
            return f"backlog: {report.published - stored:,} not stored after {self.o.settle_s:.0f} s", False
        if not report.kept_up:
            target = report.target_rate or 0.0
            self.notes.append(
                f"publisher could not keep up at {target:,.0f} msg/s "
                f"(reached {report.achieved_rate:,.0f}/s): the cores are saturated"
            )
            return (
                f"publisher-limited ({report.achieved_rate:,.0f} of {target:,.0f} msg/s); all stored",
                True,
            )
        return "ok", True

    def _wait_backlog(
        self, count: Callable[[], int], base: int, published: int, verdict: str
    ) -> tuple[int, str]:
        """Wait for a backlog to drain; a count that stops short of published is a loss."""
        self.say("waiting for the backlog to drain before going on...")
        t0 = time.monotonic()
        last, last_change = count() - base, time.monotonic()
        while last < published:
            time.sleep(0.2)
            now = count() - base
            if now != last:
                last, last_change = now, time.monotonic()
            if time.monotonic() - last_change > NO_PROGRESS_S or time.monotonic() - t0 > BACKLOG_WAIT_S:
                break
        if last >= published:
            return last, f"{verdict}; caught up after {time.monotonic() - t0 + self.o.settle_s:.0f} s"
        missing = published - last
        if time.monotonic() - last_change > NO_PROGRESS_S:
            self.notes.append(f"LOSS: {missing:,} messages never stored")
            return last, f"{verdict}; LOSS: {missing:,} never stored"
        return last, f"{verdict}; still {missing:,} behind after {BACKLOG_WAIT_S:.0f} s"

    def _print_step(self, who: str, label: str, s: StepResult) -> None:
        mark = "[green]PASS[/]" if s.passed else "[red]FAIL[/]"
        dp = f" ({s.publish_rate * self.dp:,.0f} dp/s)" if who == "worker" else ""
        lag = f", lag p50/p99 {_fmt_s(s.lag_p50_s)}/{_fmt_s(s.lag_p99_s)}" if s.lag_p99_s is not None else ""
        rss = f", RSS {s.rss_mib:,.0f} MiB" if s.rss_mib else ""
        self.say(
            f"{who} step {label} {mark} target {s.target_rate:,.0f}: published "
            f"{s.published:,} at {s.publish_rate:,.0f}/s{dp}, stored {s.stored:,} "
            f"(during the step {s.stored_rate:,.0f}/s){lag}{rss}{_batch_text(s)} | "
            f"{_cpu_text(s.cpu)} | {s.verdict}"
        )

    def worker_drain(self, workers: Workers) -> DrainResult:
        """Workers offline while M messages are published, then started: how fast they drain."""
        m = self.o.drain_size(self.variant)
        workers.stop()
        self.say(f"worker drain: workers stopped, pre-loading {m:,} messages")
        tag_report = self.preload(m)
        self.worker_published += tag_report.published
        workers.max_rss = 0
        workers.start()
        started = workers.started_at
        spy = self._start_profile(workers)
        deadline = time.monotonic() + max(120.0, m / 500.0)
        last, last_change = 0, time.monotonic()
        meter: CpuMeter | None = None
        zero = workers.sample()
        with Live(Text(""), console=self.console, transient=True, refresh_per_second=4) as live:
            while True:
                s = workers.sample()
                if meter is None and s.stored:
                    # From the first commit on: by then the workers' database sessions exist.
                    meter = self._drain_meter(workers.pids)
                if s.stored >= m:
                    done = time.time()
                    break
                if s.stored != last:
                    last, last_change = s.stored, time.monotonic()
                if time.monotonic() > deadline or time.monotonic() - last_change > 30:
                    done = time.time()
                    self.notes.append(f"worker drain stopped at {s.stored:,}/{m:,}")
                    break
                live.update(
                    Text(f"worker drain: {s.stored:,}/{m:,} stored | RSS {workers.rss() / 2**20:,.0f} MiB")
                )
                time.sleep(0.05)
        if spy is not None:
            self._finish_profile(*spy)
        # The drain starts when the first backlog message reaches a worker (receipt time).
        first_rx = self._first_receipt(tag_report)
        begin = first_rx if first_rx is not None else started
        span = max(1e-6, done - begin)
        drain = DrainResult(
            m,
            min(s.stored, m),
            span,
            min(s.stored, m) / span,
            workers.max_rss / 2**20,
            done - started,
            meter.read() if meter else {},
            *s.batch_stats(zero),
        )
        self.say(
            f"worker drain: {drain.drained:,}/{m:,} in {span:.2f} s = [bold]{drain.rate:,.0f} "
            f"msg/s[/] ({drain.rate * self.dp:,.0f} dp/s; {drain.seconds_from_start:.1f} s from "
            f"process start), RSS max {drain.rss_mib:,.0f} MiB{_batch_text(drain)} | "
            f"{_cpu_text(drain.cpu)}"
            + (f" | per worker {', '.join(f'{n:,}' for n in s.per_worker)}" if len(s.per_worker) > 1 else "")
        )
        return drain

    def _drain_meter(self, pids: Sequence[int], name: str = "worker") -> CpuMeter:
        groups: dict[str, Sequence[int]] = {name: pids, "broker": [self.broker.pid]}
        if name == "worker":
            with contextlib.suppress(psycopg.Error):
                groups["postgres"] = postgres_pids(self.db_url)
        return CpuMeter(groups)

    def _start_profile(self, workers: Workers) -> tuple[subprocess.Popen[bytes], Path] | None:
        if not self.o.profile_prefix:
            return None
        exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        out = Path(f"{self.o.profile_prefix}-{self.variant}.txt")
        # --gil: only the thread holding the GIL is sampled (the worker is GIL-bound, so that
        # is where its one core goes); --nonblocking: the worker is not paused per sample.
        cmd = [exe, "record", "--pid", str(workers.pids[0]), "--rate", "100", "--format", "raw"]
        cmd += ["--threads", "--gil", "--nonblocking", "--output", str(out)]
        spy = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.say(f"recording worker {workers.pids[0]} with py-spy into {out}")
        return spy, out

    def _finish_profile(self, spy: subprocess.Popen[bytes], out: Path) -> None:
        spy.send_signal(signal.SIGINT)
        try:
            _, err = spy.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            spy.kill()
            _, err = spy.communicate()
        if not out.exists():
            self.notes.append(f"py-spy wrote no profile: {err.decode(errors='replace')[-300:]}")
            return
        for line in profile_summary(out.read_text()):
            self.say(f"profile: {line}")

    def _first_receipt(self, report: PublishReport) -> float | None:
        tag = f"{report.tag}-%"
        with psycopg.connect(self.db_url) as conn:
            row = conn.execute(
                "SELECT extract(epoch FROM min(received_at)) FROM message_receipts WHERE msg_id LIKE %s",
                (tag,),
            ).fetchone()
        return float(row[0]) if row and row[0] is not None else None


# ---- profiles -------------------------------------------------------------------------------

#: Where a worker's time goes: the innermost frame from one of these names a sample's owner.
_PROFILE_BUCKETS: tuple[tuple[str, str], ...] = (
    ("interpret (orjson decode, validation, units)", "devices/"),
    ("store writer (our code: rows, receipts, SQL)", "store/writer"),
    ("psycopg (driver: COPY encoding, waiting for the server)", "psycopg/"),
    ("prometheus_client (metrics, /metrics scrapes)", "prometheus_client/"),
    ("worker (queue, batching, acks, metrics calls)", "ingest/"),
    ("paho-mqtt (socket, packet parsing, callbacks, acks)", "paho/"),
    ("queue / threading", "threading.py"),
)


def profile_summary(raw: str, top: int = 12, rate: float = 100.0) -> list[str]:
    """Lines saying where the samples of a py-spy raw (collapsed, --threads) profile went."""
    total = 0
    threads: dict[str, int] = {}
    buckets: dict[str, int] = {}
    selfs: dict[str, int] = {}
    for line in raw.splitlines():
        stack, _, n_text = line.rpartition(" ")
        if not stack or not n_text.isdigit():
            continue
        n = int(n_text)
        frames = stack.split(";")
        total += n
        head = frames[0]
        thread = head.split(": ", 1)[1] if ": " in head else "(unnamed)"
        threads[thread] = threads.get(thread, 0) + n
        owner = "other"
        for f in reversed(frames[1:]):
            label = next((lbl for lbl, needle in _PROFILE_BUCKETS if needle in f), None)
            if label:
                owner = label
                break
        buckets[owner] = buckets.get(owner, 0) + n
        leaf = frames[-1].rsplit(":", 1)[0] + ")"
        selfs[leaf] = selfs.get(leaf, 0) + n
    if not total:
        return ["no samples"]

    def by_count(d: dict[str, int]) -> list[tuple[str, int]]:
        return sorted(d.items(), key=lambda kv: -kv[1])

    out = [f"{total} samples at {rate:g}/s per busy thread = {total / rate:.1f} thread-seconds"]
    out += [f"thread {k}: {v / rate:.1f} s ({v / total:.0%})" for k, v in by_count(threads)[:5]]
    out += [f"{v / total:4.0%} {k}" for k, v in by_count(buckets)]
    out.append("hottest frames (self time):")
    out += [f"  {v / total:5.1%} {k}" for k, v in by_count(selfs)[:top]]
    return out


# ---- the run -------------------------------------------------------------------------------


def machine_info(db_url: str | None = None) -> dict[str, str]:
    """The machine the figures were measured on."""
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    info = {
        "cpus": str(os.cpu_count()),
        "cpu_model": model,
        "ram_gib": f"{psutil.virtual_memory().total / 2**30:.1f}",
        "os": platform.platform(),
        "python": platform.python_version(),
        "paho_mqtt": _version("paho-mqtt"),
        "psycopg": _version("psycopg"),
        "mosquitto": mosquitto_version(),
        "load_average": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "code": code_version(),
    }
    if db_url:
        with contextlib.suppress(psycopg.Error), psycopg.connect(db_url) as conn:
            row = conn.execute("SELECT current_setting('server_version')").fetchone()
            info["postgresql"] = str(row[0]) if row else "?"
            flav = conn.execute("SELECT value FROM store_info WHERE key = 'flavour'").fetchone()
            info["store_flavour"] = str(flav[0]) if flav else "?"
    return info


def code_version() -> str:
    """The git commit of the code measured (``+changes`` when the work tree differs)."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return "?"
    if head.returncode:
        return "?"
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


def run_ingest_bench(options: BenchOptions, console: Console) -> BenchResult:
    """Run the whole ingest benchmark, printing progress and a summary; returns the figures."""
    for v in options.variants:
        if v not in VARIANTS:
            raise ValueError(f"unknown variant {v!r} (choose from {', '.join(VARIANTS)})")
    started = time.time()
    workdir = Path(tempfile.mkdtemp(prefix="eldercare-bench-"))
    console.rule("eldercare bench ingest")
    cpus = os.cpu_count() or 0
    console.print(
        f"{cpus} CPU(s). Publisher processes, Mosquitto, the worker(s) and PostgreSQL all run "
        "here and compete for them: the publishers' CPU is taken from the worker. Compare the "
        "worker with the bare subscriber measured in this same run (the ratio), not with other "
        "machines."
    )
    variants: list[VariantResult] = []
    notes: list[str] = []
    db_name = None
    machine: dict[str, str] = {}
    broker: BenchBroker | None = None
    try:
        with bench_database(options.admin_url, options.keep) as (db_name, db_url):
            machine = machine_info(db_url)
            console.print(
                f"database {db_name} ({machine.get('store_flavour', '?')} store), "
                f"{machine['mosquitto']}, MQTT {options.protocol} for worker and bare "
                f"subscriber (publishers: 3.1.1), {options.workers} worker(s), "
                f"steps of {options.step_s:g} s, work folder {workdir}"
            )
            for v in options.variants:
                register_fleet(db_url, options.fleet(v))
            broker = BenchBroker(workdir)
            notes.append(
                "broker: ProjectBroker (system mosquitto, the packaged config: "
                f"{', '.join(f'{k} {v}' for k, v in broker.limits.items())}; passwords and ACL on) "
                f"plus one account, {BENCH_USER}, allowed to publish under any device id"
            )
            for v in options.variants:
                run = VariantRun(options, v, console, broker, db_url, workdir)
                variants.append(run.run())
    finally:
        if broker is not None:
            broker.close()
        if not options.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    result = BenchResult(
        options=options,
        machine=machine,
        variants=tuple(variants),
        notes=tuple(notes),
        started_at=started,
        seconds=time.time() - started,
        database=db_name if options.keep else None,
    )
    print_summary(console, result)
    if options.json_path:
        Path(options.json_path).write_text(result.to_json())
    return result


def print_summary(console: Console, result: BenchResult) -> None:
    """The final table: one column per variant."""
    o = result.options
    table = Table(title=f"ingest benchmark — {o.workers} worker(s), MQTT {o.protocol}")
    table.add_column("measure")
    for v in result.variants:
        table.add_column(f"{v.variant} ({v.datapoints_per_message} dp/msg)", justify="right")

    def row(name: str, fn: Callable[[VariantResult], str]) -> None:
        table.add_row(name, *(fn(v) for v in result.variants))

    def sus(v: VariantResult) -> StepResult | None:
        return v.sustained

    def limited(v: VariantResult) -> str:
        s = sus(v)
        return " (publisher-limited)" if s and s.verdict.startswith("publisher-limited") else ""

    def bare_paced(v: VariantResult) -> tuple[float, str] | None:
        """The bare subscriber's best paced rate; '≥' when it kept up with the top step."""
        b = v.bare_sustained
        if b is None:
            return None
        at_top = b.target_rate >= max(o.ladder(v.variant))
        return b.publish_rate, ("≥ " if at_top else "")

    row(
        "sustained, zero loss: msg/s",
        lambda v: f"{_fmt_rate(s.publish_rate)}{limited(v)}" if (s := sus(v)) else "none",
    )
    row(
        "sustained: data points/s",
        lambda v: _fmt_rate(s.publish_rate * v.datapoints_per_message) if (s := sus(v)) else "—",
    )
    row(
        "  highest step tried (msg/s)",
        lambda v: _fmt_rate(max((s.target_rate for s in v.worker_steps), default=None)),
    )
    row("  first failure", lambda v: next((s.verdict for s in v.worker_steps if not s.passed), "none"))
    row("publish→commit p50", lambda v: _fmt_s(s.lag_p50_s) if (s := sus(v)) else "—")
    row("publish→commit p99", lambda v: _fmt_s(s.lag_p99_s) if (s := sus(v)) else "—")
    all_workers = " (all workers)" if o.workers > 1 else ""
    row(
        f"worker RSS{all_workers}, max in step",
        lambda v: f"{s.rss_mib:,.0f} MiB" if (s := sus(v)) else "—",
    )
    row(
        f"worker CPU{all_workers} (100% = one core)",
        lambda v: f"{s.cpu.get('worker', 0):.0f}%" if (s := sus(v)) else "—",
    )
    row(
        "  whole machine in that step",
        lambda v: (
            f"{s.cpu.get('machine', 0):.0f}% of {100 * (os.cpu_count() or 1)}%" if (s := sus(v)) else "—"
        ),
    )
    row(
        "bare subscriber, paced: msg/s",
        lambda v: f"{b[1]}{_fmt_rate(b[0])}" if (b := bare_paced(v)) else "—",
    )
    row(
        "worker / bare, paced",
        lambda v: (
            f"{'≤ ' if b[1] else ''}{s.publish_rate / b[0]:.2f}"
            if (s := sus(v)) and (b := bare_paced(v))
            else "—"
        ),
    )
    row("bare drain: msg/s", lambda v: _fmt_rate(v.bare_drain.rate) if v.bare_drain else "—")
    row("worker drain: msg/s", lambda v: _fmt_rate(v.worker_drain.rate) if v.worker_drain else "—")
    row(
        "worker drain: data points/s",
        lambda v: _fmt_rate(v.worker_drain.rate * v.datapoints_per_message) if v.worker_drain else "—",
    )
    row("worker drain RSS (max)", lambda v: f"{v.worker_drain.rss_mib:,.0f} MiB" if v.worker_drain else "—")
    row("worker / bare, drain", lambda v: f"{r:.2f}" if (r := v.drain_ratio) is not None else "—")
    row(
        "stored exactly once (db)",
        lambda v: (
            f"{'yes' if v.lossless else 'NO'}: {v.receipts_found:,}/{v.receipts_expected:,} msgs, "
            f"{v.observations_found:,}/{v.observations_expected:,} rows"
        ),
    )
    console.print(table)
    for v in result.variants:
        if v.variant != "telemetry":
            continue
        dps = (v.sustained.publish_rate * v.datapoints_per_message) if v.sustained else 0.0
        ratio = v.drain_ratio
        met_dps = dps >= TARGET_DATAPOINTS_S
        met_ratio = ratio is not None and ratio >= TARGET_DRAIN_RATIO
        if v.worker_steps and all(st.passed for st in v.worker_steps) and not met_dps:
            console.print(
                "[yellow]the worker passed every step of the ladder: its limit is higher than "
                "this run shows (add higher --rates)[/]"
            )
        console.print(
            f"target (issue 3): ≥ {TARGET_DATAPOINTS_S:,.0f} data points/s sustained for 3-metric "
            f"messages — {'[green]met[/]' if met_dps else '[red]missed[/]'} ({dps:,.0f}); "
            f"worker ≥ {TARGET_DRAIN_RATIO} × bare drain — "
            f"{'[green]met[/]' if met_ratio else '[red]missed[/]'} "
            f"({'—' if ratio is None else f'{ratio:.2f}'})"
        )
    for v in result.variants:
        for note in v.notes:
            console.print(f"[yellow]{v.variant}:[/] {note}")
    for note in result.notes:
        console.print(f"note: {note}")
    m = result.machine
    console.print(
        f"machine: {m.get('cpus')} × {m.get('cpu_model')}, {m.get('ram_gib')} GiB RAM, "
        f"PostgreSQL {m.get('postgresql', '?')} ({m.get('store_flavour', '?')}), "
        f"{m.get('mosquitto')}, paho-mqtt {m.get('paho_mqtt')}, Python {m.get('python')}; "
        f"code {m.get('code')}; load average at start {m.get('load_average')}; "
        f"run took {result.seconds:.0f} s"
    )


# ---- command line --------------------------------------------------------------------------


def default_admin_url() -> str:
    """The server of ELDERCARE_DATABASE_URL (its 'postgres' database), else local PostgreSQL."""
    url = os.environ.get("ELDERCARE_DATABASE_URL", "")
    return database_url(url, "postgres") if url.startswith("postgres") else DEFAULT_ADMIN_URL


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x.replace("_", "")) for x in text.split(",") if x.strip())


def parse_args(argv: Sequence[str]) -> BenchOptions:
    """BenchOptions from ``eldercare bench ingest`` arguments."""
    d = BenchOptions()
    p = argparse.ArgumentParser(
        prog="eldercare bench ingest",
        description=(
            "Measure the highest sustained zero-loss ingest rate of the worker(s), beside a bare "
            "paho subscriber draining the same broker in the same run. Uses its own database "
            "(created on --admin-url, dropped afterwards) and its own mosquitto."
        ),
    )
    p.add_argument("--quick", action="store_true", help="smoke run: short steps (about 30 s)")
    p.add_argument("--variant", choices=[*VARIANTS, "both"], default="both")
    p.add_argument("--workers", type=int, default=d.workers)
    p.add_argument("--protocol", choices=["5", "3.1.1"], default=d.protocol)
    p.add_argument(
        "--publisher-protocol",
        choices=["5", "3.1.1"],
        default=d.publisher_protocol,
        help="MQTT protocol of the publishers (5: a 0x10 PUBACK is sent again, as devices must)",
    )
    p.add_argument("--rates", type=_floats, help="telemetry steps, msg/s, e.g. 4000,8000,12000")
    p.add_argument("--hub-rates", type=_floats, help="hub steps, msg/s, e.g. 50,100,200")
    p.add_argument("--step-seconds", type=float, help=f"seconds per step (default {d.step_s:g})")
    p.add_argument("--settle-seconds", type=float, help=f"catch-up allowed (default {d.settle_s:g})")
    p.add_argument("--drain", type=int, help=f"telemetry backlog (default {d.drain_messages:,})")
    p.add_argument("--hub-drain", type=int, help=f"hub backlog (default {d.hub_drain_messages:,})")
    p.add_argument("--devices", type=int, help=f"wristbands (default {d.devices})")
    p.add_argument("--hubs", type=int, help=f"hubs (default {d.hubs}, {d.subs_per_hub} subs each)")
    p.add_argument("--publishers", type=int, help="publisher processes (default: 1 per 15k msg/s)")
    p.add_argument("--no-bare", action="store_true", help="skip the bare subscriber baseline")
    p.add_argument("--keep-going", action="store_true", help="run every step even after a failure")
    p.add_argument(
        "--worker-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra setting for the workers, e.g. ELDERCARE_BATCH_SIZE=1000 (repeatable)",
    )
    p.add_argument(
        "--admin-url", default=default_admin_url(), help="PostgreSQL URL allowed to CREATE DATABASE"
    )
    p.add_argument("--keep", action="store_true", help="keep the database and the work folder")
    p.add_argument("--json", dest="json_path", help="also write the results as JSON to this file")
    p.add_argument(
        "--profile",
        dest="profile_prefix",
        metavar="PREFIX",
        help="record the worker with py-spy during its drain into PREFIX-<variant>.txt",
    )
    a = p.parse_args(list(argv))
    opts = BenchOptions.quick() if a.quick else BenchOptions()
    changes: dict[str, Any] = {
        "variants": VARIANTS if a.variant == "both" else (a.variant,),
        "workers": a.workers,
        "protocol": a.protocol,
        "publisher_protocol": a.publisher_protocol,
        "bare": not a.no_bare,
        "stop_at_failure": not a.keep_going,
        "admin_url": a.admin_url,
        "keep": a.keep,
        "json_path": a.json_path,
        "profile_prefix": a.profile_prefix,
        "worker_env": tuple(tuple(e.split("=", 1)) for e in a.worker_env),
    }
    for key, attr in (
        ("rates", "rates"),
        ("hub_rates", "hub_rates"),
        ("step_s", "step_seconds"),
        ("settle_s", "settle_seconds"),
        ("drain_messages", "drain"),
        ("hub_drain_messages", "hub_drain"),
        ("devices", "devices"),
        ("hubs", "hubs"),
        ("publishers", "publishers"),
    ):
        value = getattr(a, attr)
        if value is not None:
            changes[key] = value
    return replace(opts, **changes)


def main(argv: Sequence[str] | None = None) -> None:
    """``eldercare bench ingest [options]``."""
    options = parse_args(sys.argv[1:] if argv is None else argv)
    result = run_ingest_bench(options, Console())
    if not all(v.lossless for v in result.variants):
        raise SystemExit(1)


__all__ = [
    "BenchOptions",
    "BenchResult",
    "DrainResult",
    "StepResult",
    "VariantResult",
    "main",
    "run_ingest_bench",
]

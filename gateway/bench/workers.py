"""``eldercare serve --role ingest`` subprocesses of the bench."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from eldercare.gateway.bench.broker import clear_session
from eldercare.gateway.bench.metrics import WorkerSample, scrape
from eldercare.gateway.bench.options import BenchOptions
from eldercare.gateway.broker import free_port


def eldercare_command(*args: str) -> list[str]:
    """The ``eldercare`` command of this interpreter's environment, with ``args``."""
    exe = Path(sys.executable).with_name("eldercare")
    if exe.exists():
        return [str(exe), *args]
    code = "from eldercare.gateway.cli import main; main()"
    return [sys.executable, "-c", code, *args]


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
        return eldercare_command("serve", "--role", "ingest")

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
        """Start the workers and wait until their /metrics say they are subscribed."""
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
                    # Subscribed on both sessions: what is published before that would find
                    # no subscriber on a new session.
                    if scrape(port).get("subscribed", 0) >= 2:
                        break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"worker {i} never subscribed; see {self.workdir / f'worker-{i}.log'}")
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

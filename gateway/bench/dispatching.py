"""The bench's dispatcher and API: ``eldercare serve --role dispatch`` and ``--role api`` subprocesses.

Two processes, not one ``serve --role dispatch --role api``: the dispatcher measured is the
dispatch role alone, its CPU apart from the acknowledgements the API takes. The API is
there so the simulated hotlines' acknowledgements land as in production: each alert is
acknowledged, its 60 s escalation cancelled, and no escalation adds dispatches of its own
to the figures.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

from eldercare.gateway.bench.workers import eldercare_command
from eldercare.gateway.broker import free_port

START_DEADLINE_S = 60.0


class DispatchRoles:
    """One dispatcher and one API process on the bench database, the channels at the hotlines."""

    def __init__(self, db_url: str, workdir: Path, channels_toml: str, secrets_env: dict[str, str]) -> None:
        channels = workdir / "channels.toml"
        channels.write_text(channels_toml, encoding="utf-8")
        self.api_port = free_port()
        self.api_url = f"http://127.0.0.1:{self.api_port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("ELDERCARE_")}
        env.update(secrets_env)
        env.update(
            ELDERCARE_DATABASE_URL=db_url,
            ELDERCARE_CHANNELS_FILE=str(channels),
            ELDERCARE_ACK_BASE_URL=self.api_url,
            ELDERCARE_API_PORT=str(self.api_port),
            ELDERCARE_METRICS_PORT="0",
            ELDERCARE_LOG_FORMAT="json",
            ELDERCARE_LOG_LEVEL="INFO",
        )
        self.dispatcher_log = workdir / "dispatcher.log"
        self.api_log = workdir / "api.log"
        self._logs = [self.dispatcher_log.open("ab"), self.api_log.open("ab")]
        self.dispatcher = subprocess.Popen(
            eldercare_command("serve", "--role", "dispatch"),
            env=env,
            cwd=workdir,
            stdout=self._logs[0],
            stderr=subprocess.STDOUT,
        )
        self.api = subprocess.Popen(
            eldercare_command("serve", "--role", "api"),
            env=env,
            cwd=workdir,
            stdout=self._logs[1],
            stderr=subprocess.STDOUT,
        )
        try:
            self._wait_started()
        except BaseException:
            self.close()
            raise

    def _wait_started(self) -> None:
        """Until the dispatcher LISTENs (its log says so) and the API answers /readyz."""
        deadline = time.monotonic() + START_DEADLINE_S
        dispatching = ready = False
        while not (dispatching and ready):
            for role, proc, log in (
                ("dispatch", self.dispatcher, self.dispatcher_log),
                ("api", self.api, self.api_log),
            ):
                if proc.poll() is not None:
                    raise RuntimeError(f"serve --role {role} exited ({proc.returncode}); see {log}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the dispatcher or the API did not start; see {self.dispatcher_log}")
            dispatching = dispatching or '"dispatcher started"' in self.dispatcher_log.read_text(
                errors="replace"
            )
            if not ready:
                try:
                    with urllib.request.urlopen(f"{self.api_url}/readyz", timeout=2) as response:
                        ready = response.status == 200
                except OSError:
                    pass
            time.sleep(0.1)

    @property
    def pids(self) -> dict[str, int]:
        return {"dispatcher": self.dispatcher.pid, "api": self.api.pid}

    def close(self) -> None:
        """SIGTERM (the dispatcher lets its deliveries in flight finish), then wait."""
        for proc in (self.dispatcher, self.api):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in (self.dispatcher, self.api):
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        for log in self._logs:
            log.close()

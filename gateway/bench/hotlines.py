"""The bench's simulated hotlines: ``eldercare simulate hotlines`` in a process of its own.

A process of its own, not a thread of the bench: the hotlines stand for other systems on
other machines, so they get their own interpreter (no lock shared with the bench's polling
and live display) and their CPU is counted apart. The bench reads what each hotline received
and switches its failure mode through the simulator's control endpoint, as an operator would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx

from eldercare.gateway.bench.workers import eldercare_command
from eldercare.simulators.hotlines import GATEWAY_CHANNELS

#: The gateway's channels and the simulated hotline serving each: family contacts by SMS,
#: the family doctor team's task queue. (channel: (kind, hotline))

START_DEADLINE_S = 30.0


class BenchHotlines:
    """``eldercare simulate hotlines`` on free ports, acknowledging ``ack_delay_s`` after each dispatch."""

    def __init__(self, workdir: Path, ack_delay_s: float = 1.0) -> None:
        self._file = workdir / "hotlines.json"
        self._log = (workdir / "hotlines.log").open("ab")
        env = {k: v for k, v in os.environ.items() if not k.startswith("ELDERCARE_")}
        command = [
            *eldercare_command("simulate", "hotlines"),
            "--port",
            "0",
            "--ack-delay",
            str(ack_delay_s),
            "--write-secrets",
            str(self._file),
        ]
        self.proc = subprocess.Popen(
            command, env=env, cwd=workdir, stdout=self._log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + START_DEADLINE_S
        while not self._file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"the simulated hotlines did not start; see {workdir / 'hotlines.log'}")
            time.sleep(0.05)
        written = json.loads(self._file.read_text(encoding="utf-8"))
        self.control_url: str = written["control_url"]
        self._hotlines: dict[str, dict[str, str]] = written["hotlines"]
        self._client = httpx.Client(timeout=30.0, trust_env=False)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def url(self, hotline: str) -> str:
        return self._hotlines[hotline]["url"]

    def channels_toml(self) -> str:
        """A channels file for the gateway: every channel at its simulated hotline, secrets from the
        environment (``secrets_env``)."""
        out = []
        for channel, (kind, hotline) in GATEWAY_CHANNELS.items():
            name = _env_name(channel)
            out.append(
                f'[channels."{channel}"]\nkind = "{kind}"\nurl = "{self.url(hotline)}"\n'
                f'secret_env = "BENCH_SECRET_{name}"\napi_key_env = "BENCH_API_KEY_{name}"\n'
            )
        return "\n".join(out)

    def secrets_env(self) -> dict[str, str]:
        """The channels' webhook secrets and acknowledgement keys, as the channels file names them."""
        env = {}
        for channel, (_, hotline) in GATEWAY_CHANNELS.items():
            name = _env_name(channel)
            env[f"BENCH_SECRET_{name}"] = self._hotlines[hotline]["secret"]
            env[f"BENCH_API_KEY_{name}"] = self._hotlines[hotline]["api_key"]
        return env

    def received(self, hotline: str) -> list[dict[str, Any]]:
        """Every request the hotline received (``at``, ``webhook_id``, ``answer``, ``document``...)."""
        response = self._client.get(f"{self.control_url}/{hotline}")
        response.raise_for_status()
        log: list[dict[str, Any]] = response.json()["received_log"]
        return log

    def counts(self) -> dict[str, int]:
        """Requests received per hotline so far."""
        response = self._client.get(self.control_url)
        response.raise_for_status()
        return {name: int(state["received"]) for name, state in response.json()["hotlines"].items()}

    def set_mode(self, hotline: str, mode: str, **parameters: Any) -> None:
        """Switch a hotline's failure mode (``ok``, ``error_500`` with ``times``: 0 = until changed...)."""
        response = self._client.post(f"{self.control_url}/{hotline}", json={"mode": mode, **parameters})
        response.raise_for_status()

    def set_acks(self, hotline: str, statuses: list[str]) -> None:
        """The acknowledgements the hotline sends after each dispatch it takes (``[]``: none)."""
        response = self._client.post(f"{self.control_url}/{hotline}", json={"ack_statuses": statuses})
        response.raise_for_status()

    @property
    def hotlines(self) -> list[str]:
        return list(self._hotlines)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        if hasattr(self, "_client"):
            self._client.close()
        self._log.close()


def _env_name(channel: str) -> str:
    return channel.upper().replace("-", "_")

"""Worker processes and device publishers for the end-to-end ingest tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import paho.mqtt.client as mqtt
import psycopg
from paho.mqtt.enums import CallbackAPIVersion

ELDERCARE = str(Path(sys.executable).with_name("eldercare"))


@dataclass
class WorkerProcess:
    """``eldercare serve --role ingest`` as a child process."""

    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen | None = None

    def start(self) -> WorkerProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it
        self.proc = subprocess.Popen(
            [ELDERCARE, "serve", "--role", "ingest"],
            env={**os.environ, **self.env},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        return self

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout: float = 20) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise AssertionError(f"worker did not stop on SIGTERM; log: {self.log()}") from None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


@dataclass
class Device:
    """A simulated device with its own broker account (client id = username = device id)."""

    device_id: str
    password: str
    host: str
    port: int
    protocol: int = mqtt.MQTTv311
    client: mqtt.Client = field(init=False)

    def connect(self) -> Device:
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=self.device_id, protocol=self.protocol
        )
        self.client.username_pw_set(self.device_id, self.password)
        self.client.max_inflight_messages_set(200)
        self.client.max_queued_messages_set(0)
        self.client.connect(self.host, self.port)
        self.client.loop_start()
        return self

    def publish(self, channel: str, payload: dict | bytes, qos: int = 1) -> mqtt.MQTTMessageInfo:
        body = payload if isinstance(payload, bytes) else orjson.dumps(payload)
        return self.client.publish(f"eldercare/v1/devices/{self.device_id}/{channel}", body, qos=qos)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def telemetry_stream(
    devices: list[Device], n: int, rate: float, tag: str = "m"
) -> Iterator[tuple[Device, dict]]:
    """n telemetry messages round-robin over devices, paced at ``rate`` per second.

    Message k carries ``steps = k`` so every stored message can be told apart.
    """
    started = time.monotonic()
    for k in range(n):
        due = started + k / rate
        pause = due - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        device = devices[k % len(devices)]
        yield (
            device,
            {
                "msg_id": f"{tag}-{k}",
                "ts": int(time.time() * 1000),
                "metrics": {"heart_rate": 60 + k % 40, "spo2": 95 + k % 5, "steps": k},
            },
        )


class Publisher(threading.Thread):
    """Publishes a paced telemetry stream in the background; ``published`` counts PUBACKs."""

    def __init__(self, devices: list[Device], n: int, rate: float, tag: str = "m") -> None:
        super().__init__(daemon=True)
        self.devices, self.n, self.rate, self.tag = devices, n, rate, tag
        self.infos: list[mqtt.MQTTMessageInfo] = []

    def run(self) -> None:
        for device, payload in telemetry_stream(self.devices, self.n, self.rate, self.tag):
            self.infos.append(device.publish("telemetry", payload))

    def wait_all_acked(self, timeout: float) -> None:
        self.join(timeout)
        deadline = time.monotonic() + timeout
        for info in self.infos:
            info.wait_for_publish(max(0.1, deadline - time.monotonic()))
            assert info.is_published(), "the broker did not acknowledge a publish"


def scalar(db_url: str, sql: str) -> int:
    with psycopg.connect(db_url) as conn:
        return conn.execute(sql).fetchone()[0]

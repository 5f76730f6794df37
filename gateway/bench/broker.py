"""The bench's Mosquitto (the project's, plus one publisher account) and its MQTT sessions."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import psutil
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from eldercare.gateway.bench.options import Protocol

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
    """The installed mosquitto's version line ("?" when it cannot say)."""
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    try:
        out = subprocess.run([exe, "-h"], capture_output=True, text=True, timeout=5).stdout
    except OSError:
        return "?"
    return out.splitlines()[0].strip() if out else "?"


# ---- MQTT sessions -------------------------------------------------------------------------


def mqtt_client(client_id: str, protocol: Protocol, clean: bool) -> mqtt.Client:
    """A paho client of ``protocol``; ``clean``: MQTT 3.1.1's clean session (5: at connect)."""
    v5 = protocol == "5"
    return mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
        clean_session=None if v5 else clean,
    )


def connect_client(client: mqtt.Client, url: str, protocol: Protocol, clean: bool) -> None:
    """Connect to ``url`` with its account; not clean: a session kept for an hour (MQTT 5)."""
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
    client = mqtt_client(client_id, protocol, clean=True)
    connect_client(client, url, protocol, clean=True)
    deadline = time.monotonic() + 10
    while not client.is_connected() and time.monotonic() < deadline:
        client.loop(timeout=0.05)
    client.disconnect()
    client.loop(timeout=0.05)

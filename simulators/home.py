"""Simulated homes for the demo: each elder's wristband, blood-pressure monitor and hub.

Every device connects with its own broker account (client id = username = device id), as a
real one would, and publishes what device-mqtt.md describes: telemetry (now and then in an
alternative unit), a hub relaying a bed sensor, events, status with a Last Will, and,
deliberately, the odd faulty message (an impossible value, an unknown metric, broken JSON)
so that the demo shows dead letters with their reasons too.
"""

from __future__ import annotations

import random
import threading
import time
from itertools import count

import orjson

from eldercare.devices.connection import MqttAccount
from eldercare.devices.registry import DeviceInfo
from eldercare.simulators.device_link import DeviceLink


def home_devices(homes: int, prefix: str = "demo") -> list[DeviceInfo]:
    """The devices of ``homes`` simulated homes (hubs listed before their sensors)."""
    devices: list[DeviceInfo] = []
    for h in range(1, homes + 1):
        elder = f"e-{prefix}-{h:03d}"
        hub = f"hub-{prefix}-{h:03d}"
        devices += [
            DeviceInfo(f"w-{prefix}-{h:03d}", "wristband", elder),
            DeviceInfo(f"bp-{prefix}-{h:03d}", "bp_monitor", elder),
            DeviceInfo(hub, "hub"),
            DeviceInfo(f"bed-{prefix}-{h:03d}", "bed_sensor", elder, hub),
        ]
    return devices


class SimulatedHomes:
    """Publishes for the simulated devices at about ``rate`` messages per second until stopped."""

    def __init__(
        self,
        devices: list[DeviceInfo],
        accounts: dict[str, MqttAccount],
        rate: float = 5.0,
        fault_share: float = 0.05,
        seed: int | None = None,
        protocol: str = "3.1.1",
    ) -> None:
        self.devices = devices
        self.protocol = protocol
        self.accounts = accounts
        self.rate = rate
        self.fault_share = fault_share
        self.random = random.Random(seed)
        self.published = 0
        self._stop = threading.Event()
        self._clients: dict[str, DeviceLink] = {}
        # msg_id = <device>-<run>-<n>: unique per device across runs too (a second demo run
        # reusing the first one's numbers would have its messages dropped as duplicates).
        self._run_tag = f"{time.time_ns() // 1_000_000:x}"
        self._seq = count(1)
        self._thread = threading.Thread(target=self._run, name="simulated-homes", daemon=True)

    def start(self) -> SimulatedHomes:
        for device in self.devices:
            if device.hub_id is None:  # sensors behind a hub have no connection of their own
                self._clients[device.device_id] = self._connect(device)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for link in self._clients.values():
            link.close()  # a clean disconnect: no Last Will

    def _connect(self, device: DeviceInfo) -> DeviceLink:
        """A link that keeps each message until the broker took it (0x10: sent again)."""
        account = self.accounts[device.device_id]
        return DeviceLink(
            account.username,
            account.password,
            account.host,
            account.port,
            protocol=self.protocol,
            kind="hubs" if device.type == "hub" else "devices",
            will=orjson.dumps({"online": False}),
        ).connect(wait=False)

    def _run(self) -> None:
        for link in self._clients.values():
            status = {"ts": _now_ms(), "online": True, "battery": 80, "firmware": "2.1.0"}
            link.publish("status", orjson.dumps(status), retain=True)
        publishers = [d for d in self.devices if d.hub_id is None]
        interval = 1.0 / self.rate
        while not self._stop.wait(interval):
            device = self.random.choice(publishers)
            channel, payload = self._message(device)
            self._clients[device.device_id].publish(channel, payload)
            self.published += 1

    def _message(self, device: DeviceInfo) -> tuple[str, bytes]:
        """(channel, payload) of the device's next message."""
        r = self.random
        msg_id = f"{device.device_id}-{self._run_tag}-{next(self._seq)}"
        if device.type != "hub" and r.random() < self.fault_share:  # a hub's faults: its own kind
            return self._fault(msg_id)
        if device.type == "wristband":
            if r.random() < 0.03:
                event = r.choice(["sos_pressed", "fall_detected", "fall_recovered", "wearable_removed"])
                body = {"msg_id": msg_id, "ts": _now_ms(), "event": event, "confidence": 0.9}
                return "events", orjson.dumps(body)
            metrics: dict[str, object] = {
                "heart_rate": r.randint(58, 96),
                "spo2": r.randint(93, 99),
                "steps": r.randint(0, 8000),
            }
            return "telemetry", orjson.dumps(
                {"msg_id": msg_id, "ts": _now_ms(), "metrics": metrics, "battery": r.randint(40, 90)}
            )
        if device.type == "bp_monitor":
            systolic, diastolic = r.randint(110, 165), r.randint(65, 98)
            if r.random() < 0.3:  # some monitors report in kPa: the gateway converts
                metrics = {
                    "systolic_bp": {"value": round(systolic / 7.50062, 2), "unit": "kPa"},
                    "diastolic_bp": {"value": round(diastolic / 7.50062, 2), "unit": "kPa"},
                }
            else:
                metrics = {"systolic_bp": systolic, "diastolic_bp": diastolic}
            return "telemetry", orjson.dumps({"msg_id": msg_id, "ts": _now_ms(), "metrics": metrics})
        # a hub relays its bed sensors, as a short buffered batch of samples
        beds = [d for d in self.devices if d.hub_id == device.device_id]
        now = _now_ms()
        wrapped = {
            bed.device_id: {
                "samples": [
                    {
                        "ts": now - 1000 * k,
                        "metrics": {"bed_occupied": 1, "respiration_rate": r.randint(12, 20)},
                    }
                    for k in range(3, 0, -1)
                ]
            }
            for bed in beds
        }
        return (
            "telemetry",
            orjson.dumps({"msg_id": msg_id, "devices": wrapped}),
        )

    def _fault(self, msg_id: str) -> tuple[str, bytes]:
        """A faulty message of a kind real vendors send, to be dead-lettered with a reason."""
        kind = self.random.choice(["out_of_range", "unknown_metric", "malformed_json", "unknown_unit"])
        if kind == "malformed_json":
            return "telemetry", b'{"msg_id": "' + msg_id.encode() + b'", "metrics": {'
        faults: dict[str, dict[str, object]] = {
            "out_of_range": {"spo2": 140},
            "unknown_metric": {"pulse_wave": 3},
            "unknown_unit": {"heart_rate": {"value": 70, "unit": "bpm"}},
        }
        body = {"msg_id": msg_id, "ts": _now_ms(), "metrics": faults[kind]}
        return "telemetry", orjson.dumps(body)


def _now_ms() -> int:
    return int(time.time() * 1000)

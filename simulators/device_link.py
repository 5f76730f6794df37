"""A simulated device's MQTT 5 link that keeps each message until the broker has taken it.

device-mqtt.md, Delivery semantics: a PUBACK with a success code is the broker's promise;
reason ``0x10`` (No matching subscribers) means "not taken": keep the message and send it
again later with the same ``msg_id``. A lost connection is the same: paho re-sends what was
not acknowledged when it reconnects. ``DeviceLink`` does both, the way a vendor's firmware
should, and counts what happened, so a test can check that every message got a success.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

#: PUBACK reason codes (MQTT 5): below 0x80 is success, but 0x10 means nobody got it.
NO_MATCHING_SUBSCRIBERS = 0x10
#: How long a message answered 0x10 waits before it is sent again.
RESEND_AFTER_S = 0.5


class DeviceLink:
    """One device's (or hub's) connection: client id = username = its id, QoS 1.

    MQTT 5 by default; ``protocol="3.1.1"`` for brokers without it (no reason codes there,
    so only the re-send after a lost connection applies). ``will``: the retained
    ``{"online": false}`` status the broker publishes if the link dies.
    """

    def __init__(
        self,
        device_id: str,
        password: str,
        host: str,
        port: int,
        *,
        protocol: str = "5",
        kind: str = "devices",
        will: bytes | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.device_id = device_id
        self.kind = kind
        self.clock = clock
        version = mqtt.MQTTv5 if protocol == "5" else mqtt.MQTTv311
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device_id, protocol=version)
        client.username_pw_set(device_id, password)
        if will is not None:
            client.will_set(self.topic("status"), will, qos=1, retain=True)
        client.max_inflight_messages_set(100)
        client.max_queued_messages_set(0)
        client.reconnect_delay_set(1, 2)
        client.on_publish = self._on_publish
        self.client = client
        self._host, self._port = host, port
        self._lock = threading.Lock()
        self._pending: dict[int, tuple[str, bytes]] = {}  # packet id -> message awaiting PUBACK
        self._answers: deque[tuple[int, int]] = deque()  # (packet id, reason), from paho's thread
        self._again: deque[tuple[float, str, bytes]] = deque()  # (due, topic, payload)
        self.taken = 0  # PUBACK with a success code other than 0x10
        self.not_taken = 0  # 0x10 answers (each message sent again)
        self.refused = 0  # failure codes (>= 0x80): the broker will never take these

    def connect(self, wait: bool = True) -> DeviceLink:
        """Connect and start paho's thread (it reconnects by itself after a loss).

        ``wait=False``: return at once; what is published meanwhile goes out on connecting.
        """
        if wait:
            self.client.connect(self._host, self._port, keepalive=30)
        else:
            self.client.connect_async(self._host, self._port, keepalive=30)
        self.client.loop_start()
        return self

    def topic(self, channel: str) -> str:
        """This device's topic for ``channel`` (telemetry, events, status, ...)."""
        return f"eldercare/v1/{self.kind}/{self.device_id}/{channel}"

    def publish(self, channel: str, payload: bytes, retain: bool = False) -> None:
        """Send one QoS 1 message; it is kept until the broker has taken it."""
        self._send(self.topic(channel), payload, retain)
        self.pump()

    def _send(self, topic: str, payload: bytes, retain: bool = False) -> None:
        with self._lock:  # paho's on_publish never takes this lock, so no deadlock with its own
            info = self.client.publish(topic, payload, qos=1, retain=retain)
            self._pending[info.mid] = (topic, payload)

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        self._answers.append((mid, reason_code.value))

    def pump(self) -> None:
        """Settle the broker's answers; send again what was not taken and is due."""
        now = self.clock()
        with self._lock:
            while self._answers:
                mid, reason = self._answers.popleft()
                message = self._pending.pop(mid, None)
                if message is None:
                    continue
                if reason == NO_MATCHING_SUBSCRIBERS:
                    self.not_taken += 1
                    self._again.append((now + RESEND_AFTER_S, *message))
                elif reason >= 0x80:
                    self.refused += 1
                else:
                    self.taken += 1
        while self._again and self._again[0][0] <= now:
            _, topic, payload = self._again.popleft()
            self._send(topic, payload)

    @property
    def outstanding(self) -> int:
        """Messages not taken yet: awaiting a PUBACK or waiting to be sent again."""
        with self._lock:
            return len(self._pending) + len(self._again) + len(self._answers)

    def wait_all_taken(self, timeout: float) -> bool:
        """Pump until every message was taken (True) or ``timeout`` passed (False)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.pump()
            if not self.outstanding:
                return True
            time.sleep(0.05)
        return False

    def close(self) -> None:
        """Disconnect and stop paho's thread."""
        self.client.disconnect()
        self.client.loop_stop()

"""Our Mosquitto with the project config: accounts, ACL, limits, reload; and the fallbacks."""

from __future__ import annotations

import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from eldercare.devices.credentials import (
    hash_password,
    new_password,
    parse_password_file,
    render_password_file,
    verify_password,
)
from eldercare.gateway.broker import (
    INSTALL_MOSQUITTO,
    MqttAccount,
    ProjectBroker,
    mosquitto_path,
    mqtt_connack,
    packaged_mosquitto_file,
    render_acl,
    render_mosquitto_conf,
)
from tests.waiting import never, wait_for

NOT_AUTHORIZED = 135  # MQTT 5 reason code 0x87
PROTOCOLS = [pytest.param(mqtt.MQTTv5, id="mqtt5"), pytest.param(mqtt.MQTTv311, id="mqtt311")]


class Client:
    """A paho client that records what the broker answered, for assertions."""

    def __init__(
        self,
        account: MqttAccount,
        protocol: mqtt.MQTTProtocolVersion = mqtt.MQTTv5,
        *,
        client_id: str | None = None,
        clean: bool = True,
        session_expiry: int = 0,
    ) -> None:
        self.account, self.protocol = account, protocol
        self.clean, self.session_expiry = clean, session_expiry
        self.paho = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or account.client_id,
            protocol=protocol,
            clean_session=None if protocol == mqtt.MQTTv5 else clean,
            reconnect_on_failure=False,  # a refused or dropped client stays down
        )
        self.paho.username_pw_set(account.username, account.password)
        self.paho.max_inflight_messages_set(1000)
        self.paho.max_queued_messages_set(0)
        self.messages: list[tuple[str, bytes]] = []
        self.connack: mqtt.ReasonCode | None = None
        self.pubacks: dict[int, int] = {}
        self.subacks: dict[int, list[int]] = {}
        self.disconnected = threading.Event()
        self._lock = threading.Lock()
        self.paho.on_connect = self._on_connect
        self.paho.on_disconnect = self._on_disconnect
        self.paho.on_message = self._on_message
        self.paho.on_publish = lambda c, u, mid, rc, p: self.pubacks.__setitem__(mid, rc.value)
        self.paho.on_subscribe = lambda c, u, mid, rcs, p: self.subacks.__setitem__(
            mid, [rc.value for rc in rcs]
        )

    def _on_connect(
        self, client: mqtt.Client, userdata: object, flags: object, rc: mqtt.ReasonCode, props: object
    ) -> None:
        self.connack = rc

    def _on_disconnect(
        self, client: mqtt.Client, userdata: object, flags: object, rc: mqtt.ReasonCode, props: object
    ) -> None:
        self.disconnected.set()

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((msg.topic, bytes(msg.payload)))

    def connect(self) -> mqtt.ReasonCode:
        """Connect and wait for the CONNACK (or the broker closing the connection)."""
        props = None
        if self.protocol == mqtt.MQTTv5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = self.session_expiry
        self.connack = None
        self.disconnected.clear()
        self.paho.connect(
            self.account.host,
            self.account.port,
            clean_start=self.clean if self.protocol == mqtt.MQTTv5 else mqtt.MQTT_CLEAN_START_FIRST_ONLY,
            properties=props,
        )

        # Drive the socket from here until the CONNACK; a network thread only once accepted,
        # so a refused client leaves nothing running behind.
        def answered() -> bool:
            self.paho.loop(0.02)
            return self.connack is not None or self.disconnected.is_set()

        wait_for(answered, 10, "CONNACK")
        assert self.connack is not None, "connection closed without a CONNACK"
        if not self.connack.is_failure:
            self.paho.loop_start()
        return self.connack

    def subscribe(self, topic: str, qos: int = 1) -> list[int]:
        """Subscribe and return the SUBACK reason codes."""
        _, mid = self.paho.subscribe(topic, qos)
        assert mid is not None
        wait_for(lambda: mid in self.subacks, 10, f"SUBACK for {topic}")
        return self.subacks[mid]

    def publish(self, topic: str, payload: bytes | str, qos: int = 1) -> int:
        """Publish at QoS 1 and return the PUBACK reason code (0: success)."""
        mid = self.paho.publish(topic, payload, qos).mid
        wait_for(lambda: mid in self.pubacks, 10, f"PUBACK on {topic}")
        return self.pubacks[mid]

    def received(self, topic_prefix: str = "") -> list[tuple[str, bytes]]:
        """Messages received so far, optionally those under a topic prefix."""
        with self._lock:
            return [m for m in self.messages if m[0].startswith(topic_prefix)]

    def close(self) -> None:
        """Disconnect (politely) and stop the network thread."""
        self.paho.disconnect()
        self.paho.loop_stop()


@pytest.fixture
def clients() -> Iterator[Callable[..., Client]]:
    """Maker of connected test clients, all closed after the test."""
    made: list[Client] = []

    def make(
        account: MqttAccount, protocol: mqtt.MQTTProtocolVersion = mqtt.MQTTv5, **options: object
    ) -> Client:
        client = Client(account, protocol, **options)  # type: ignore[arg-type]
        made.append(client)
        assert not client.connect().is_failure, f"{account} refused"
        return client

    yield make
    for client in made:
        client.close()


def devices_topic(device_id: str, channel: str = "telemetry") -> str:
    return f"eldercare/v1/devices/{device_id}/{channel}"


def gateway_filter(broker: ProjectBroker, topic: str) -> str:
    """The gateway's subscription to ``topic``: shared, as the ingest worker subscribes."""
    return f"$share/test/{topic}" if broker.capabilities.supports_shared else topic


# --- accounts and ACL ---------------------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_device_telemetry_on_its_own_topic_reaches_the_gateway(
    project_mosquitto: ProjectBroker, mqtt_device, clients, new_id, protocol: mqtt.MQTTProtocolVersion
) -> None:
    dev = mqtt_device()
    gateway = clients(project_mosquitto.gateway, protocol, client_id=new_id("gw"))
    assert gateway.subscribe(gateway_filter(project_mosquitto, "eldercare/v1/devices/+/telemetry")) == [1]
    device = clients(dev, protocol)

    assert device.publish(devices_topic(dev.username), b'{"msg_id": "m1"}') == 0

    wait_for(lambda: gateway.received(devices_topic(dev.username)), 5, "the telemetry at the gateway")


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_device_publishing_on_another_devices_topic_is_refused(
    project_mosquitto: ProjectBroker, mqtt_device, clients, new_id, protocol: mqtt.MQTTProtocolVersion
) -> None:
    attacker, victim = mqtt_device(), mqtt_device()
    gateway = clients(project_mosquitto.gateway, protocol, client_id=new_id("gw"))
    gateway.subscribe(gateway_filter(project_mosquitto, "eldercare/v1/devices/+/telemetry"))
    device = clients(attacker, protocol)

    code = device.publish(devices_topic(victim.username), b'{"msg_id": "forged"}')

    if protocol == mqtt.MQTTv5:
        assert code == NOT_AUTHORIZED
    # mosquitto 2.0 then closes the connection (MQTT-3.3.5-2 allows it), both protocols
    wait_for(device.disconnected.is_set, 5, "the broker closing the offender's connection")
    # Positive control: the same device, reconnected, on its own topic. Had the forged
    # message been routed, it would have reached the gateway before this one.
    honest = clients(attacker, protocol)
    assert honest.publish(devices_topic(attacker.username), b'{"msg_id": "own"}') == 0
    wait_for(lambda: gateway.received(devices_topic(attacker.username)), 5, "the control message")
    never(lambda: gateway.received(devices_topic(victim.username)), 0.2, "the forged message arrived")


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_device_subscribed_to_the_whole_tree_receives_only_its_own_commands(
    project_mosquitto: ProjectBroker, mqtt_device, clients, new_id, protocol: mqtt.MQTTProtocolVersion
) -> None:
    snoop, other = mqtt_device(), mqtt_device()
    gateway = clients(project_mosquitto.gateway, protocol, client_id=new_id("gw"))
    gateway.subscribe(gateway_filter(project_mosquitto, devices_topic(other.username)))
    spy = clients(snoop, protocol)
    [granted] = spy.subscribe("eldercare/v1/#")
    # mosquitto 2.0.11 grants any filter and checks `read` per delivered message; a newer
    # broker may refuse the filter outright (>= 0x80). Either way nothing foreign arrives.
    assert spy.subscribe(devices_topic(snoop.username, "commands")) == [1]
    clients(other, protocol).publish(devices_topic(other.username), b"{}")
    gateway.publish(devices_topic(other.username, "commands"), b'{"cmd_id": "c1"}')
    gateway.publish(devices_topic(snoop.username, "commands"), b'{"cmd_id": "c2"}')

    wait_for(lambda: gateway.received(devices_topic(other.username)), 5, "the other's telemetry")
    if granted < 0x80:
        wait_for(lambda: spy.received(devices_topic(snoop.username, "commands")), 5, "own command")
    never(
        lambda: [m for m in spy.received() if not m[0].startswith(f"eldercare/v1/devices/{snoop.username}/")],
        0.2,
        "a foreign message reached the device",
    )


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_wrong_password_unknown_user_and_anonymous_are_refused(
    project_mosquitto: ProjectBroker, mqtt_device, protocol: mqtt.MQTTProtocolVersion
) -> None:
    dev = mqtt_device()
    attempts = {
        "wrong password": MqttAccount(dev.username, "not-it", dev.host, dev.port, dev.client_id),
        "unknown user": MqttAccount("nobody-here", "x", dev.host, dev.port, "nobody-here"),
    }
    for what, account in attempts.items():
        client = Client(account, protocol)
        try:
            assert client.connect().is_failure, f"{what} was let in"
        finally:
            client.close()
    assert mqtt_connack(project_mosquitto.host, project_mosquitto.port) not in (0, None), "anonymous let in"
    assert mqtt_connack(project_mosquitto.host, project_mosquitto.port, dev.username, dev.password) == 0


def test_added_account_works_after_reload_without_dropping_connections(
    project_mosquitto: ProjectBroker, clients, new_id
) -> None:
    gateway = clients(project_mosquitto.gateway, client_id=new_id("gw"))
    gateway.subscribe("eldercare/v1/devices/+/status")
    dev_id = new_id("late")
    assert mqtt_connack(project_mosquitto.host, project_mosquitto.port, dev_id, "pw") != 0

    dev = project_mosquitto.add_user(dev_id)

    clients(dev).publish(devices_topic(dev_id, "status"), b'{"online": true}')
    wait_for(lambda: gateway.received(devices_topic(dev_id, "status")), 5, "the new device's status")
    assert not gateway.disconnected.is_set()


# --- credentials ----------------------------------------------------------------------------


def test_password_hashed_by_credentials_is_accepted_by_mosquitto(
    project_mosquitto: ProjectBroker, new_id
) -> None:
    dev_id, password = new_id("hashed"), new_password()

    project_mosquitto.add_user_hash(dev_id, hash_password(password))

    host, port = project_mosquitto.host, project_mosquitto.port
    assert mqtt_connack(host, port, dev_id, password) == 0
    assert mqtt_connack(host, port, dev_id, password + "x") == 5  # 3.1.1: not authorised


@pytest.mark.skipif(
    not shutil.which("mosquitto_passwd"), reason=f"mosquitto_passwd not installed ({INSTALL_MOSQUITTO})"
)
def test_hash_from_mosquitto_passwd_verifies_and_round_trips(tmp_path: Path) -> None:
    pwfile = tmp_path / "passwd"
    pwfile.touch()
    subprocess.run(["mosquitto_passwd", "-b", str(pwfile), "w-0001", "s3cret pässword"], check=True)
    users = parse_password_file(pwfile.read_text())

    assert verify_password("s3cret pässword", users["w-0001"])
    assert not verify_password("s3cret passwörd", users["w-0001"])
    assert render_password_file(users.items()) == pwfile.read_text()
    assert verify_password("pw", hash_password("pw")) and not verify_password("pw", "pw")
    with pytest.raises(ValueError):
        render_password_file([("w-0002", "plain text")])


# --- limits -------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_burst_to_an_offline_persistent_session_is_delivered_in_full(
    project_mosquitto: ProjectBroker, mqtt_device, clients, new_id, protocol: mqtt.MQTTProtocolVersion
) -> None:
    n = 20_000
    dev = mqtt_device()
    session_id = new_id("gw-burst")
    topic = devices_topic(dev.username)
    persistent = {"client_id": session_id, "clean": False, "session_expiry": 300}
    offline = clients(project_mosquitto.gateway, protocol, **persistent)
    offline.subscribe(topic)
    offline.close()

    device = clients(dev, mqtt.MQTTv311)
    infos = [device.paho.publish(topic, str(i).encode(), qos=1) for i in range(n)]
    wait_for(lambda: all(info.is_published() for info in infos[-100:]), 30, "all PUBACKs")
    assert all(info.is_published() for info in infos)

    back = clients(project_mosquitto.gateway, protocol, **persistent)
    try:
        wait_for(lambda: len(back.received()) >= n, 30, f"{n} queued messages")
        assert {payload for _, payload in back.received()} == {str(i).encode() for i in range(n)}
    finally:
        back.close()
        # end the session so it does not keep queueing for the rest of the run
        clients(project_mosquitto.gateway, protocol, client_id=session_id, clean=True)


def test_queued_messages_and_accounts_survive_a_broker_restart(tmp_path: Path, clients) -> None:
    if mosquitto_path() is None:
        pytest.skip(f"no mosquitto binary ({INSTALL_MOSQUITTO})")
    own = ProjectBroker(tmp_path / "mqtt", backend="mosquitto").start()
    try:
        dev = own.add_user("w-0001")
        persistent = {"client_id": "gw-restart", "clean": False, "session_expiry": 300}
        offline = clients(own.gateway, **persistent)
        offline.subscribe(devices_topic("w-0001"))
        offline.close()
        device = clients(dev)
        for i in range(100):
            device.paho.publish(devices_topic("w-0001"), str(i), qos=1)
        wait_for(lambda: len(device.pubacks) == 100, 10, "100 PUBACKs")

        own.stop()  # SIGTERM: mosquitto saves its persistence file
        own.start()

        back = clients(own.gateway, **persistent)
        wait_for(lambda: len(back.received()) >= 100, 10, "the 100 queued messages")
        assert {p for _, p in back.received()} == {str(i).encode() for i in range(100)}
        assert mqtt_connack(own.host, own.port, dev.username, dev.password) == 0
    finally:
        own.stop()


def test_payloads_up_to_the_size_limit_pass_and_larger_ones_are_refused(
    project_mosquitto: ProjectBroker, mqtt_device, clients, new_id
) -> None:
    dev = mqtt_device()
    gateway = clients(project_mosquitto.gateway, client_id=new_id("gw"))
    gateway.subscribe(devices_topic(dev.username))
    device = clients(dev)

    # 100 KiB: over the contract's 64 KiB, so the gateway can dead-letter it as too_large
    assert device.publish(devices_topic(dev.username), b"x" * 100 * 1024) == 0
    wait_for(lambda: gateway.received(devices_topic(dev.username)), 5, "the 100 KiB payload")
    # over message_size_limit (128 KiB), under max_packet_size: refused (mosquitto 2.0.11
    # answers PUBACK 0x95 Packet too large, then closes the connection), never delivered
    device.paho.publish(devices_topic(dev.username), b"y" * 130 * 1024, qos=1)
    wait_for(device.disconnected.is_set, 5, "the broker closing the sender's connection")
    never(lambda: len(gateway.received()) > 1, 0.3, "the oversized payload arrived")


# --- config rendering and the fallback broker -------------------------------------------


def test_rendered_config_changes_only_listener_and_paths() -> None:
    shipped = packaged_mosquitto_file("mosquitto.conf").splitlines()
    rendered = render_mosquitto_conf(
        port=18830,
        bind="127.0.0.1",
        persistence_dir="/data",
        password_file="/data/passwd",
        acl_file="/data/acl",
        run_as="root",
    ).splitlines()

    changed = {line for line in rendered if line not in shipped}
    assert changed == {
        "listener 18830 127.0.0.1",
        "persistence_location /data/",
        "password_file /data/passwd",
        "acl_file /data/acl",
        "user root",
    }
    for setting in ("allow_anonymous false", "persistence true", "max_queued_messages 0", "protocol mqtt"):
        assert setting in rendered
    assert "user ward-7-gateway" in render_acl("ward-7-gateway").splitlines()
    with pytest.raises(ValueError, match="blanks"):
        render_mosquitto_conf(port=1, bind=None, persistence_dir="/a b", password_file="/p", acl_file="/a")


def test_iotcore_fallback_carries_mqtt_311_and_says_what_it_lacks(tmp_path: Path) -> None:
    with ProjectBroker(tmp_path / "iot", backend="iotcore") as fallback:
        caps = fallback.capabilities
        assert not (caps.supports_mqtt5 or caps.supports_shared or caps.enforces_acl)
        assert fallback.worker_env()["ELDERCARE_MQTT_PROTOCOL"] == "3.1.1"
        assert fallback.worker_env()["ELDERCARE_MQTT_SHARED_GROUP"] == ""
        dev = fallback.add_user("w-0001")
        sub = Client(fallback.gateway, mqtt.MQTTv311, client_id="gw-1")
        pub = Client(dev, mqtt.MQTTv311)
        try:
            sub.connect()
            sub.subscribe("eldercare/v1/#")
            pub.connect()
            assert pub.publish(devices_topic("w-0001"), b"{}") == 0
            wait_for(lambda: sub.received(), 5, "the message through iotcore")
        finally:
            pub.close()
            sub.close()

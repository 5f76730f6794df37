"""How a device (or the gateway) reaches the broker: its URL and an account on it.

device-mqtt.md, Connection: every device connects with its own account, client id =
username = its id. These types are shared by the gateway (settings, broker management) and
the simulators (simulated devices and publishers), so neither depends on the other for them.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote, unquote, urlsplit


class MqttTarget:
    """The broker address parsed out of ``MQTT_URL``."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts"):
            raise ValueError(f"MQTT_URL must start with mqtt:// or mqtts://, got {url!r}")
        if not parts.hostname:
            raise ValueError(f"MQTT_URL has no host: {url!r}")
        self.tls = parts.scheme == "mqtts"
        self.host = parts.hostname
        self.port = parts.port or (8883 if self.tls else 1883)
        self.username = unquote(parts.username) if parts.username else None
        self.password = unquote(parts.password) if parts.password else None

    def __repr__(self) -> str:  # never print the password
        scheme = "mqtts" if self.tls else "mqtt"
        user = f"{self.username}@" if self.username else ""
        return f"{scheme}://{user}{self.host}:{self.port}"


@dataclass(frozen=True)
class MqttAccount:
    """Credentials of one broker account, and the client id to connect with."""

    username: str
    password: str
    host: str
    port: int
    client_id: str

    @property
    def url(self) -> str:
        """``mqtt://user:password@host:port`` (for ELDERCARE_MQTT_URL)."""
        return mqtt_url(self.host, self.port, self.username, self.password)

    def __repr__(self) -> str:  # never print the password
        return f"MqttAccount({self.username!r} @ {self.host}:{self.port})"


def mqtt_url(host: str, port: int, username: str | None = None, password: str | None = None) -> str:
    """``mqtt://[user[:password]@]host:port`` with the credentials percent-encoded."""
    auth = ""
    if username is not None:
        auth = quote(username, safe="")
        if password is not None:
            auth += ":" + quote(password, safe="")
        auth += "@"
    return f"mqtt://{auth}{host}:{port}"

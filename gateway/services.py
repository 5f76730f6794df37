"""The services ``eldercare demo`` and the tests run against: a store URL, a broker.

- ``database_url``: a PostgreSQL URL pointed at another database of the same server.
- ``find_broker``: the given URL (an external broker: we cannot add accounts there); else our
  own :class:`~eldercare.gateway.broker.ProjectBroker`: the system mosquitto on a free port,
  else iotcore. ``capabilities.note`` says what is missing.

Finding a PostgreSQL server for the test suite (local, Docker, embedded) is test support,
kept with the tests (``tests/services.py``); the demo starts its embedded server itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

from eldercare.gateway.broker import (
    GATEWAY_USER,
    Broker,
    BrokerCapabilities,
    MqttAccount,
    ProjectBroker,
    gateway_env,
    mqtt_url,
)

# --- PostgreSQL ---------------------------------------------------------------------------


def database_url(url: str, database: str) -> str:
    """``url`` with its database name replaced (TCP and socket ``?host=`` URIs alike)."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{database}"))


# --- MQTT ---------------------------------------------------------------------------------


class ExternalBroker:
    """A broker given by URL: used as is, with one account for everyone.

    We cannot create accounts there, so ``add_user`` hands out the URL's own credentials
    (with the requested name as client id) and ``capabilities.enforces_acl`` is False: the
    ACL tests skip. Set ``protocol`` "3.1.1" for a broker without MQTT 5.
    """

    def __init__(self, url: str, *, protocol: str = "5", shared: bool = True) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise ValueError("broker URL must be mqtt://[user:password@]host[:port]")
        self.host = parts.hostname
        self.port = parts.port or (8883 if parts.scheme == "mqtts" else 1883)
        username = unquote(parts.username) if parts.username else GATEWAY_USER
        password = unquote(parts.password) if parts.password else ""
        self._url = url
        self.gateway = MqttAccount(username, password, self.host, self.port, client_id=username)
        self.capabilities = BrokerCapabilities(
            kind="external",
            supports_mqtt5=protocol == "5",
            supports_shared=shared,
            enforces_auth=True,
            enforces_acl=False,
            manages_accounts=False,
            note=f"external broker {self.host}:{self.port}: its accounts and ACL are not ours to manage",
        )

    def add_user(self, name: str, password: str | None = None, *, reload: bool = True) -> MqttAccount:
        """The URL's own account, to connect with client id ``name``."""
        return MqttAccount(self.gateway.username, self.gateway.password, self.host, self.port, client_id=name)

    def add_users(self, names: Iterable[str]) -> dict[str, MqttAccount]:
        """The URL's own account once per name (see ``add_user``)."""
        return {name: self.add_user(name) for name in names}

    def url_for(self, user: str, password: str) -> str:
        """``mqtt://`` URL of this broker for an account."""
        return mqtt_url(self.host, self.port, user, password)

    def worker_env(self, shared_group: str = "ingest") -> dict[str, str]:
        """ELDERCARE_MQTT_* variables for an ingest worker (the URL's account)."""
        return {**gateway_env(self.gateway, self.capabilities, shared_group), "ELDERCARE_MQTT_URL": self._url}

    def stop(self, timeout: float = 10.0) -> None:
        """Nothing to stop: not ours."""

    def __repr__(self) -> str:
        return f"<ExternalBroker {self.host}:{self.port}>"


def find_broker(
    url: str | None,
    data_dir: str | Path,
    *,
    protocol: str = "5",
    gateway_user: str = GATEWAY_USER,
    port: int | None = None,
) -> Broker:
    """The broker to use, started if it is ours (see the module docstring for the order)."""
    if url:
        return ExternalBroker(url, protocol=protocol)
    return ProjectBroker(Path(data_dir), port=port, gateway_user=gateway_user, backend="auto").start()

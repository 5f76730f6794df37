"""Finding the PostgreSQL server and MQTT broker to use: configured, local, Docker, embedded.

Used by the test suite and by ``eldercare demo``. Order, first that works:

- PostgreSQL: the given URL; a local server on 127.0.0.1:5432 (user postgres, then root);
  TimescaleDB in Docker (testcontainers, ``timescale/timescaledb:latest-pg16``) if a Docker
  engine answers; else embedded PostgreSQL in ``<data_dir>/pg``.
- MQTT: the given URL (an external broker: we cannot add accounts there); else our own
  :class:`~eldercare.gateway.broker.ProjectBroker`: the system mosquitto on a free port, else
  ``eclipse-mosquitto:2`` in Docker, else iotcore. ``capabilities.note`` says what is missing.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
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

log = logging.getLogger(__name__)

TIMESCALE_IMAGE = "timescale/timescaledb:latest-pg16"
LOCAL_PG_HOST = "127.0.0.1"
LOCAL_PG_PORT = 5432
LOCAL_PG_USERS = ("postgres", "root")


# --- PostgreSQL ---------------------------------------------------------------------------


@dataclass
class PostgresService:
    """A PostgreSQL server found or started, with an admin URL (may CREATE DATABASE)."""

    admin_url: str
    source: str  # "env", "local", "docker", "embedded"
    description: str  # for logs and skip reasons; no password
    _stop: Callable[[], None] | None = field(default=None, repr=False)

    def url_for(self, database: str) -> str:
        """The admin URL pointed at another database of the same server."""
        return database_url(self.admin_url, database)

    def stop(self) -> None:
        """Stop the server if we started it (Docker, embedded); else nothing."""
        stop, self._stop = self._stop, None
        if stop is not None:
            stop()


def database_url(url: str, database: str) -> str:
    """``url`` with its database name replaced (TCP and socket ``?host=`` URIs alike)."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{database}"))


def find_postgres(
    url: str | None,
    data_dir: str | Path,
    *,
    local: bool = True,
    docker: bool = True,
    embedded: bool = True,
) -> PostgresService:
    """The first PostgreSQL that answers, in the module's order (starting one if needed)."""
    if url:
        return PostgresService(url, "env", f"PostgreSQL at {_safe_location(url)}")
    if local:
        for user in LOCAL_PG_USERS:
            candidate = f"postgresql://{user}@{LOCAL_PG_HOST}:{LOCAL_PG_PORT}/postgres"
            if _pg_answers(candidate):
                return PostgresService(
                    candidate, "local", f"local PostgreSQL at {LOCAL_PG_HOST}:{LOCAL_PG_PORT} as {user}"
                )
    reasons = []
    if docker:
        if (reason := docker_unavailable_reason()) is None:
            return _timescale_in_docker()
        reasons.append(reason)
    if embedded:
        from eldercare.gateway.embedded import EmbeddedPostgres

        server = EmbeddedPostgres(data_dir)
        admin = server.start()
        return PostgresService(admin, "embedded", f"embedded PostgreSQL in {server.pgdata}", server.stop)
    raise RuntimeError("no PostgreSQL found: " + ("; ".join(reasons) or "all sources disabled"))


def _pg_answers(url: str, timeout: float = 2.0) -> bool:
    import psycopg

    try:
        with psycopg.connect(url, connect_timeout=max(1, int(timeout)), autocommit=True) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.Error:
        return False


def _timescale_in_docker() -> PostgresService:
    from testcontainers.postgres import PostgresContainer

    container = PostgresContainer(TIMESCALE_IMAGE, driver=None).start()
    url = container.get_connection_url()
    return PostgresService(url, "docker", f"TimescaleDB in Docker ({TIMESCALE_IMAGE})", container.stop)


def _safe_location(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname or 'socket'}:{parts.port or ''}{parts.path}"


# --- Docker -------------------------------------------------------------------------------


def docker_unavailable_reason(timeout: float = 2.0) -> str | None:
    """None if a Docker engine answers a ping within ``timeout``; else why not, in one line."""
    host = os.environ.get("DOCKER_HOST", "")
    if not host or host.startswith("unix://"):
        socket_path = host.removeprefix("unix://") or "/var/run/docker.sock"
        if not Path(socket_path).exists():
            return f"no Docker engine ({socket_path} does not exist)"
    try:
        import docker

        client = docker.from_env(timeout=max(1, int(timeout)))
        try:
            client.ping()
        finally:
            client.close()
    except Exception as exc:  # any failure means "no Docker" here
        return f"no Docker engine answers ({type(exc).__name__})"
    return None


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
    docker: bool = True,
    port: int | None = None,
) -> Broker:
    """The broker to use, started if it is ours (see the module docstring for the order)."""
    if url:
        return ExternalBroker(url, protocol=protocol)
    broker = ProjectBroker(Path(data_dir), port=port, gateway_user=gateway_user, backend="auto")
    if broker.backend == "docker" and not docker:
        broker = ProjectBroker(Path(data_dir), port=port, gateway_user=gateway_user, backend="iotcore")
    return broker.start()

"""Test support: the PostgreSQL server a test session runs against, found or started.

Order, first that works: the given URL (ELDERCARE_TEST_DATABASE_URL); a local server on
127.0.0.1:5432 (user postgres, then root); TimescaleDB in Docker (testcontainers, from the
``dev`` extra) if a Docker engine answers; else embedded PostgreSQL (the ``demo`` extra) in
``<data_dir>/pg``. Nothing here ships in the product: Docker and testcontainers are for tests.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import psycopg

from eldercare.gateway.services import database_url

TIMESCALE_IMAGE = "timescale/timescaledb:latest-pg16"
LOCAL_PG_HOST = "127.0.0.1"
LOCAL_PG_PORT = 5432
LOCAL_PG_USERS = ("postgres", "root")


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


def _pg_answers(url: str, timeout: float = 2.0) -> bool:
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

"""The bench's own database: created, migrated, counted, dropped."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator

import psycopg

from eldercare.gateway.bench.options import DEFAULT_ADMIN_URL
from eldercare.gateway.services import database_url


@contextlib.contextmanager
def bench_database(admin_url: str, keep: bool) -> Iterator[tuple[str, str]]:
    """A fresh, migrated database ``eldercare_bench_<random>``; dropped afterwards unless keep."""
    from eldercare.gateway.store.migrate import migrate

    name = f"eldercare_bench_{secrets.token_hex(4)}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = database_url(admin_url, name)
    try:
        migrate(url)
        yield name, url
    finally:
        if not keep:
            with psycopg.connect(admin_url, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def count_rows(url: str, sql: str) -> int:
    """The one number a ``SELECT count(*) ...`` answers (0 for NULL)."""
    with psycopg.connect(url) as conn:
        row = conn.execute(sql).fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def default_admin_url() -> str:
    """The server of ELDERCARE_DATABASE_URL (its 'postgres' database), else local PostgreSQL."""
    url = os.environ.get("ELDERCARE_DATABASE_URL", "")
    return database_url(url, "postgres") if url.startswith("postgres") else DEFAULT_ADMIN_URL

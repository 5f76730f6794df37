"""Local fixtures of the store tests: a fresh database per test, plain or TimescaleDB.

The plain server is the session's PostgreSQL (``pg_admin_url`` in tests/conftest.py: the
environment's, a local one, Docker or the embedded one); TimescaleDB comes from
ELDERCARE_TEST_TIMESCALE_URL only.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from eldercare.gateway.store.migrate import migrate, probe_timescale
from tests.conftest import SESSION_TAG, DatabaseClones, migrated_template

TIMESCALE_ADMIN_URL = os.environ.get("ELDERCARE_TEST_TIMESCALE_URL", "")
TIMESCALE_SKIP_REASON = (
    "TimescaleDB extension not available on this server (run with "
    "ELDERCARE_TEST_TIMESCALE_URL=postgresql://... pointing at a TimescaleDB, "
    "e.g. docker compose up timescaledb)"
)


@contextmanager
def _database(admin_url: str) -> Iterator[str]:
    name = f"eldercare_store_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_conninfo(admin_url, dbname=name)
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def fresh_db(pg_admin_url: str) -> Iterator[str]:
    """Conninfo of a new, empty database on the session's PostgreSQL server (dropped after)."""
    with _database(pg_admin_url) as url:
        yield url


@pytest.fixture(scope="session")
def plain_clones(pg_admin_url: str) -> Iterator[DatabaseClones]:
    """Maker of plain-PostgreSQL stores: clones of a template migrated once as 'plain' (a
    clone takes ~0.2 s, a migration ~1.3 s)."""
    with migrated_template(pg_admin_url, f"eldercare_tpl_plain_{SESSION_TAG}", "plain") as name:
        clones = DatabaseClones(pg_admin_url, name)
        try:
            yield clones
        finally:
            clones.close()


@pytest.fixture
def plain_db(pg_admin_url: str, plain_clones: DatabaseClones) -> Iterator[str]:
    """Conninfo of a new database migrated as a plain-PostgreSQL store (dropped after)."""
    with plain_clones.database() as url:
        yield url


@pytest.fixture
def freshly_migrated_db(fresh_db: str) -> str:
    """Conninfo of a new database migrated as 'plain' by this test itself (tests of migrate)."""
    migrate(fresh_db, flavour="plain")
    return fresh_db


@pytest.fixture(params=["plain", pytest.param("timescale", marks=pytest.mark.timescale)])
def store_db(request: pytest.FixtureRequest) -> Iterator[tuple[str, str]]:
    """(flavour, conninfo) of a new migrated store, once per flavour; TimescaleDB may skip."""
    if request.param == "plain":
        # Asked for here, not as a parameter: the TimescaleDB case needs no plain server.
        with request.getfixturevalue("plain_clones").database() as url:
            yield "plain", url
        return
    if not TIMESCALE_ADMIN_URL:
        pytest.skip(TIMESCALE_SKIP_REASON)
    with _database(TIMESCALE_ADMIN_URL) as url:
        probe = probe_timescale(url)  # listed is not enough: it must be creatable (preloaded)
        if not probe.creatable:
            pytest.skip(f"{TIMESCALE_SKIP_REASON}: {probe.create_error or 'not installed'}")
        migrate(url, flavour="timescale")
        yield "timescale", url

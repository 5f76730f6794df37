"""Which kind of store a database is, as its migrations recorded it: plain or TimescaleDB.

The one place that reads it back (``store_info``), for the migration runner, maintenance,
the series queries and the ingest worker alike.
"""

from __future__ import annotations

from typing import Literal

import psycopg

Flavour = Literal["timescale", "plain"]
FLAVOURS: tuple[Flavour, ...] = ("timescale", "plain")
#: What ``ELDERCARE_STORE_FLAVOUR`` may say: a flavour, or ``auto`` (decide from the server).
FlavourChoice = Literal["auto", "timescale", "plain"]

_SELECT = "SELECT value FROM store_info WHERE key = 'flavour'"


class UnknownFlavour(RuntimeError):
    """``store_info`` names a flavour this release does not know."""


class StoreNotMigrated(RuntimeError):
    """The database has no recorded flavour: ``eldercare migrate`` has not run on it."""


def has_store_info(conn: psycopg.Connection) -> bool:
    """True once the first migration has made ``store_info``."""
    row = conn.execute("SELECT to_regclass('store_info') IS NOT NULL").fetchone()
    return bool(row and row[0])


def recorded_flavour(conn: psycopg.Connection) -> Flavour | None:
    """The flavour recorded in ``store_info``, or None on a store not migrated that far."""
    if not has_store_info(conn):
        return None
    row = conn.execute(_SELECT).fetchone()
    return None if row is None else _known(row[0])


async def arecorded_flavour(conn: psycopg.AsyncConnection) -> Flavour | None:
    """``recorded_flavour`` on an async connection (a migrated store)."""
    cur = await conn.execute(_SELECT)
    row = await cur.fetchone()
    return None if row is None else _known(row[0])


def _known(value: str) -> Flavour:
    if value not in FLAVOURS:
        raise UnknownFlavour(f"store_info has an unknown flavour {value!r}")
    return value

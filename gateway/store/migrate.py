"""Versioned schema migrations: a small runner over the packaged ``migrations/*.sql`` files.

File names: ``NNNN_name.sql`` applies on every store; ``NNNN_name.timescale.sql`` and
``NNNN_name.plain.sql`` are the two variants of one version, picked by the store's flavour.
The flavour is decided once, when the first variant migration is applied, from the setting
``ELDERCARE_STORE_FLAVOUR`` (``auto``: 'timescale' when ``CREATE EXTENSION timescaledb`` can
actually succeed on the server, tried in a transaction that is rolled back, else 'plain'), and
is read back from ``store_info`` ever after. Each migration runs in its own transaction and is recorded in
``schema_migrations`` with the checksum of the file applied; an edited, already-applied file
is refused. A session-level advisory lock serialises concurrent runners.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from importlib.abc import Traversable
from pathlib import Path

import psycopg

from eldercare.gateway.store.flavour import (
    FLAVOURS,
    Flavour,
    FlavourChoice,
    UnknownFlavour,
    has_store_info,
    recorded_flavour,
)

log = logging.getLogger(__name__)


#: pg_advisory_lock key held while migrating ("eldercar" in ASCII).
MIGRATE_LOCK_KEY = 0x656C_6465_7263_6172

_FILE_NAME = re.compile(r"^(?P<version>\d{4})_(?P<name>[a-z0-9_]+)(?:\.(?P<flavour>timescale|plain))?\.sql$")

_BOOKKEEPING = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    text PRIMARY KEY,
    name       text NOT NULL,
    flavour    text,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


class MigrationError(RuntimeError):
    """The migrations cannot be applied as they are (bad files, edited history, wrong flavour)."""


@dataclass(frozen=True, slots=True)
class TimescaleProbe:
    """What the server says about TimescaleDB: listed as available, and can it be created.

    ``create_error`` is the server's message when ``CREATE EXTENSION timescaledb`` failed
    (e.g. "extension "timescaledb" must be preloaded"), None when it succeeded.
    """

    available: bool
    create_error: str | None = None

    @property
    def creatable(self) -> bool:
        """True when the extension exists on the server and creating it succeeded."""
        return self.available and self.create_error is None


def choose_flavour(choice: FlavourChoice, probe: TimescaleProbe) -> tuple[Flavour, str | None]:
    """The flavour of a fresh store for the setting ``choice``: (flavour, warning or None).

    ``auto`` takes TimescaleDB only when it can be created; an extension that is installed
    but cannot be created (not preloaded, no privilege) gives 'plain' and a warning saying
    why. An explicit 'timescale' that cannot be had is a MigrationError of one line.
    """
    if choice == "plain":
        return "plain", None
    if choice not in ("auto", "timescale"):
        raise MigrationError(f"store flavour must be auto, plain or timescale, got {choice!r}")
    if probe.creatable:
        return "timescale", None
    if not probe.available:
        why = "the timescaledb extension is not installed on this PostgreSQL server"
    else:
        why = f"the timescaledb extension is installed but cannot be created ({probe.create_error})"
    if choice == "timescale":
        raise MigrationError(
            f"ELDERCARE_STORE_FLAVOUR=timescale, but {why}; add timescaledb to "
            "shared_preload_libraries and restart PostgreSQL, or set ELDERCARE_STORE_FLAVOUR=plain"
        )
    if not probe.available:
        return "plain", None  # the ordinary plain server: nothing to warn about
    return "plain", (
        f"using the plain PostgreSQL store: {why}; to use TimescaleDB, add timescaledb to "
        "shared_preload_libraries and restart PostgreSQL before the first migrate "
        "(ELDERCARE_STORE_FLAVOUR=plain silences this)"
    )


@dataclass(frozen=True, slots=True)
class MigrationFile:
    """One SQL file: a version, its name, and the flavour it is for (None: every flavour)."""

    version: str
    name: str
    flavour: Flavour | None
    sql: str

    @property
    def checksum(self) -> str:
        """sha256 of the text, line endings normalised (a CRLF checkout is the same file)."""
        return hashlib.sha256(self.sql.replace("\r\n", "\n").encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class Migration:
    """One version: a common file, or a variant per flavour."""

    version: str
    name: str
    files: dict[Flavour | None, MigrationFile]

    def for_flavour(self, flavour: Flavour | None) -> MigrationFile:
        """The file to apply on a store of ``flavour`` (the common one if there is no variant)."""
        if None in self.files:
            return self.files[None]
        if flavour is None:
            raise MigrationError(f"migration {self.version} has variants but no flavour is known")
        return self.files[flavour]

    @property
    def has_variants(self) -> bool:
        """True when this version comes as a timescale and a plain file."""
        return None not in self.files


def load_migrations(source: Traversable | Path | None = None) -> list[Migration]:
    """The migrations in ``source`` (default: the packaged folder), ordered by version."""
    folder = source if source is not None else resources.files(__package__).joinpath("migrations")
    by_version: dict[str, list[MigrationFile]] = {}
    for entry in folder.iterdir():
        if not entry.name.endswith(".sql"):
            continue
        m = _FILE_NAME.match(entry.name)
        if m is None:
            raise MigrationError(
                f"migration file {entry.name!r}: expected NNNN_name.sql, "
                "NNNN_name.timescale.sql or NNNN_name.plain.sql"
            )
        flavour: Flavour | None = m["flavour"]  # type: ignore[assignment]
        by_version.setdefault(m["version"], []).append(
            MigrationFile(m["version"], m["name"], flavour, entry.read_text(encoding="utf-8"))
        )
    migrations = []
    for version in sorted(by_version):
        files = by_version[version]
        names = {f.name for f in files}
        if len(names) != 1:
            raise MigrationError(f"migration {version}: files disagree on the name: {sorted(names)}")
        keyed: dict[Flavour | None, MigrationFile] = {f.flavour: f for f in files}
        if None in keyed and len(keyed) > 1:
            raise MigrationError(f"migration {version}: a common file and variants; pick one")
        if None not in keyed and set(keyed) != set(FLAVOURS):
            raise MigrationError(f"migration {version}: needs both a .timescale.sql and a .plain.sql")
        migrations.append(Migration(version, names.pop(), keyed))
    return migrations


def migrate(
    conninfo: str,
    *,
    flavour: FlavourChoice | None = None,
    source: Traversable | Path | None = None,
) -> list[str]:
    """Apply pending migrations under an advisory lock; return the versions applied.

    ``flavour`` is the setting ``ELDERCARE_STORE_FLAVOUR`` (None: 'auto', see
    ``choose_flavour``). On a store that already has a flavour, an explicit different one is
    an error. ``source`` replaces the packaged folder (tests).
    """
    if flavour == "auto":
        flavour = None
    migrations = load_migrations(source)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        # Held for the session (closing the connection releases it, also on errors): a
        # second runner waits here, then finds nothing left to do.
        conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATE_LOCK_KEY,))
        conn.execute(_BOOKKEEPING)
        applied = _applied(conn)
        _check_history(migrations, applied)
        stored = _stored_flavour(conn)
        if stored is not None and flavour is not None and stored != flavour:
            raise MigrationError(f"this store is {stored!r}; it cannot be migrated as {flavour!r}")
        chosen: Flavour | None = stored or flavour
        pending = [m for m in migrations if m.version not in applied]
        if stored is None and any(m.has_variants for m in pending):
            # 'plain' needs nothing from the server: no probe.
            probe = TimescaleProbe(available=False) if flavour == "plain" else probe_timescale(conninfo)
            chosen, warning = choose_flavour(flavour or "auto", probe)
            if warning:
                log.warning(warning)
            log.info("store flavour decided", extra={"flavour": chosen})
        if chosen == "timescale" and pending:
            _create_timescaledb(conn)
        done = []
        for m in pending:
            file = m.for_flavour(chosen)
            with conn.transaction():
                # Without parameters psycopg sends the file as one simple query: several
                # statements, $$ bodies and literal % signs all fine.
                conn.execute(file.sql.encode("utf-8"))
                conn.execute(
                    "INSERT INTO schema_migrations (version, name, flavour, checksum, applied_at)"
                    " VALUES (%s, %s, %s, %s, now())",
                    (m.version, m.name, file.flavour, file.checksum),
                )
            log.info("migration applied", extra={"version": m.version, "migration": m.name})
            done.append(m.version)
        if _stored_flavour(conn) is None and chosen is not None and has_store_info(conn):
            conn.execute(
                "INSERT INTO store_info (key, value) VALUES ('flavour', %s) ON CONFLICT (key) DO NOTHING",
                (chosen,),
            )
        sync_metrics(conn)
        if _stored_flavour(conn) == "plain":
            # Partitions for the current weeks right away, so the first rows written
            # before the maintenance job's first run do not pile up in the DEFAULT one.
            from eldercare.gateway.store.maintenance import create_partitions

            create_partitions(conn, datetime.now(UTC))
        return done


def status(
    conninfo: str, *, source: Traversable | Path | None = None
) -> list[tuple[str, str, datetime | None]]:
    """Every known migration as (version, name, applied_at or None), oldest first."""
    migrations = load_migrations(source)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        exists = conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL").fetchone()
        rows = []
        if exists and exists[0]:
            rows = conn.execute("SELECT version, name, applied_at FROM schema_migrations").fetchall()
    applied = {r[0]: (r[1], r[2]) for r in rows}
    out: list[tuple[str, str, datetime | None]] = [
        (m.version, m.name, applied.get(m.version, (None, None))[1]) for m in migrations
    ]
    known = {m.version for m in migrations}
    out += [(v, name, at) for v, (name, at) in applied.items() if v not in known]
    return sorted(out)


def pending(conn: psycopg.Connection, source: Traversable | Path | None = None) -> list[str]:
    """The known migrations not applied to this store yet, as ``NNNN_name``, oldest first."""
    exists = conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL").fetchone()
    applied = set(_applied(conn)) if exists and exists[0] else set()
    return [f"{m.version}_{m.name}" for m in load_migrations(source) if m.version not in applied]


def sync_metrics(conn: psycopg.Connection) -> int:
    """Mirror the metric catalog into the ``metrics`` table (upsert); return rows written.

    Metrics dropped from the catalog stay in the table: old observations still refer to them.
    """
    from eldercare.devices.catalog import load_catalog

    metrics = load_catalog().metrics.values()
    rows = [(m.name, m.unit, m.loinc, float(m.low), float(m.high)) for m in metrics]
    exists = conn.execute("SELECT to_regclass('metrics') IS NOT NULL").fetchone()
    if not rows or not (exists and exists[0]):
        return 0
    with conn.transaction(), conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO metrics (metric, unit, loinc, range_low, range_high)"
            " VALUES (%s, %s, %s, %s, %s)"
            " ON CONFLICT (metric) DO UPDATE SET unit = EXCLUDED.unit, loinc = EXCLUDED.loinc,"
            " range_low = EXCLUDED.range_low, range_high = EXCLUDED.range_high"
            " WHERE (metrics.unit, metrics.loinc, metrics.range_low, metrics.range_high)"
            " IS DISTINCT FROM (EXCLUDED.unit, EXCLUDED.loinc, EXCLUDED.range_low,"
            " EXCLUDED.range_high)",
            rows,
        )
    return len(rows)


def store_flavour(conn: psycopg.Connection) -> Flavour | None:
    """The flavour recorded in ``store_info``, or None on a store not migrated that far."""
    return _stored_flavour(conn)


def _applied(conn: psycopg.Connection) -> dict[str, tuple[str | None, str]]:
    rows = conn.execute("SELECT version, flavour, checksum FROM schema_migrations").fetchall()
    return {r[0]: (r[1], r[2]) for r in rows}


def _check_history(migrations: list[Migration], applied: dict[str, tuple[str | None, str]]) -> None:
    by_version = {m.version: m for m in migrations}
    for version, (flavour, checksum) in sorted(applied.items()):
        m = by_version.get(version)
        if m is None:
            # A newer release migrated this store; running older code against it is the
            # operator's call, so say it but do not refuse.
            log.warning("store has a migration this release does not know", extra={"version": version})
            continue
        key: Flavour | None = flavour  # type: ignore[assignment]
        file = m.files.get(key)
        if file is None:
            raise MigrationError(
                f"migration {version} was applied as {flavour or 'common'} but this release has no such file"
            )
        if file.checksum != checksum:
            variant = f".{flavour}" if flavour else ""
            raise MigrationError(
                f"migration {version}_{m.name}{variant}.sql was changed after it was applied "
                f"(checksum {checksum[:12]} recorded, {file.checksum[:12]} now); "
                "add a new migration instead of editing an applied one"
            )


def _stored_flavour(conn: psycopg.Connection) -> Flavour | None:
    try:
        return recorded_flavour(conn)
    except UnknownFlavour as exc:
        raise MigrationError(str(exc)) from None


def probe_timescale(conninfo: str) -> TimescaleProbe:
    """Ask the server whether TimescaleDB can be had: try ``CREATE EXTENSION``, then roll back.

    Being listed in ``pg_available_extensions`` is not enough: an extension installed but not
    in ``shared_preload_libraries`` is listed, and creating it fails. It fails with FATAL,
    which ends the session, so the probe has a connection of its own.
    """
    with psycopg.connect(conninfo, autocommit=True) as conn:
        row = conn.execute(
            "SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb')"
        ).fetchone()
        if not (row and row[0]):
            return TimescaleProbe(available=False)
        try:
            with conn.transaction(force_rollback=True):
                conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
        except psycopg.Error as exc:
            return TimescaleProbe(available=True, create_error=exc.diag.message_primary or str(exc))
    return TimescaleProbe(available=True)


def _create_timescaledb(conn: psycopg.Connection) -> None:
    try:
        conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
    except psycopg.Error as exc:
        raise MigrationError(
            "the timescaledb extension is available but cannot be created "
            f"({exc.diag.message_primary or exc}); add it to shared_preload_libraries, or "
            "migrate with flavour='plain' on a fresh store"
        ) from exc

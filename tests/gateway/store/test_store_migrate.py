"""The migration runner: idempotent, concurrent-safe, flavour variants, edited history refused."""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from importlib import resources
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from eldercare.gateway.store.maintenance import partition_name, week_start
from eldercare.gateway.store.migrate import (
    MigrationError,
    TimescaleProbe,
    choose_flavour,
    load_migrations,
    migrate,
    probe_timescale,
    status,
)

NOT_PRELOADED = 'extension "timescaledb" must be preloaded'
#: Admin URL of a server where TimescaleDB is installed but not in shared_preload_libraries.
UNLOADED_ADMIN_URL = os.environ.get("ELDERCARE_TEST_TIMESCALE_UNLOADED_URL", "")
#: Every packaged version, oldest first.
PACKAGED = [m.version for m in load_migrations()]


def _applied(url: str) -> list[tuple[str, str, str | None]]:
    with psycopg.connect(url) as conn:
        return conn.execute(
            "SELECT version, name, flavour FROM schema_migrations ORDER BY version"
        ).fetchall()


def _tiny_migrations(folder: Path) -> Path:
    """A folder with one common migration and one with flavour variants."""
    folder.mkdir()
    (folder / "0001_first.sql").write_text("CREATE TABLE first (id int);\n")
    for flavour in ("plain", "timescale"):
        (folder / f"0002_second.{flavour}.sql").write_text(
            "CREATE TABLE store_info (key text PRIMARY KEY, value text NOT NULL);\n"
            f"INSERT INTO store_info VALUES ('flavour', '{flavour}');\n"
            f"CREATE TABLE second_{flavour} (id int);\n"
        )
    return folder


def test_packaged_migrations_pair_their_variants() -> None:
    versions = {m.version: m for m in load_migrations()}
    assert set(versions) >= {"0001", "0002"}
    assert not versions["0001"].has_variants
    assert versions["0002"].has_variants
    assert versions["0002"].name == "timeseries"


def test_migrate_applies_everything_once_then_is_a_noop(fresh_db: str) -> None:
    assert migrate(fresh_db) == PACKAGED  # no TimescaleDB here: detected plain
    assert migrate(fresh_db) == []
    assert _applied(fresh_db)[:2] == [("0001", "core", None), ("0002", "timeseries", "plain")]
    with psycopg.connect(fresh_db) as conn:
        flavour = conn.execute("SELECT value FROM store_info WHERE key = 'flavour'").fetchone()
        assert flavour == ("plain",)
        for table in ("observations", "device_events", "rollup_dirty", "observations_1m"):
            row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (table,)).fetchone()
            assert row == (True,), table


def test_two_processes_migrating_a_fresh_store_at_once_apply_each_migration_once(
    fresh_db: str,
) -> None:
    barrier = threading.Barrier(2)
    results: list[list[str]] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            barrier.wait(timeout=10)
            results.append(migrate(fresh_db))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors, errors
    assert sorted(results) == [[], PACKAGED]
    assert [r[0] for r in _applied(fresh_db)] == PACKAGED


def test_an_applied_migration_edited_afterwards_is_refused(fresh_db: str, tmp_path: Path) -> None:
    folder = _tiny_migrations(tmp_path / "migrations")
    assert migrate(fresh_db, source=folder) == ["0001", "0002"]
    (folder / "0001_first.sql").write_text("CREATE TABLE first (id bigint);\n")
    with pytest.raises(MigrationError, match=r"0001_first\.sql was changed after it was applied"):
        migrate(fresh_db, source=folder)
    # Line endings alone do not count as an edit.
    (folder / "0001_first.sql").write_text("CREATE TABLE first (id int);\r\n", newline="")
    assert migrate(fresh_db, source=folder) == []


def test_the_variant_of_the_store_flavour_is_applied_and_the_flavour_sticks(
    fresh_db: str, tmp_path: Path
) -> None:
    folder = _tiny_migrations(tmp_path / "migrations")
    assert migrate(fresh_db, source=folder) == ["0001", "0002"]
    assert _applied(fresh_db)[1] == ("0002", "second", "plain")
    (folder / "0003_third.sql").write_text("CREATE TABLE third (id int);\n")
    with pytest.raises(MigrationError, match="cannot be migrated as 'timescale'"):
        migrate(fresh_db, source=folder, flavour="timescale")
    assert migrate(fresh_db, source=folder) == ["0003"]
    with psycopg.connect(fresh_db) as conn:
        assert conn.execute("SELECT to_regclass('second_plain') IS NOT NULL").fetchone() == (True,)
        assert conn.execute("SELECT to_regclass('second_timescale')").fetchone() == (None,)


def test_a_failing_migration_leaves_nothing_half_done(fresh_db: str, tmp_path: Path) -> None:
    folder = _tiny_migrations(tmp_path / "migrations")
    (folder / "0003_broken.sql").write_text("CREATE TABLE half (id int);\nSELECT 1/0;\n")
    with pytest.raises(psycopg.errors.DivisionByZero):
        migrate(fresh_db, source=folder)
    assert [r[0] for r in _applied(fresh_db)] == ["0001", "0002"]
    with psycopg.connect(fresh_db) as conn:
        assert conn.execute("SELECT to_regclass('half')").fetchone() == (None,)


@pytest.mark.parametrize(
    ("files", "message"),
    [
        (["0001_x.plain.sql"], "needs both"),
        (["0001_x.sql", "0001_x.plain.sql", "0001_x.timescale.sql"], "pick one"),
        (["0001_x.sql", "0001_y.sql"], "disagree on the name"),
        (["1_x.sql"], "expected NNNN_name.sql"),
    ],
)
def test_badly_named_migration_files_are_refused(tmp_path: Path, files: list[str], message: str) -> None:
    for name in files:
        (tmp_path / name).write_text("SELECT 1;\n")
    with pytest.raises(MigrationError, match=message):
        load_migrations(tmp_path)


def test_status_lists_pending_then_applied_migrations(fresh_db: str) -> None:
    assert [(v, n, at) for v, n, at in status(fresh_db)][:2] == [
        ("0001", "core", None),
        ("0002", "timeseries", None),
    ]
    assert [v for v, _, at in status(fresh_db) if at is None] == PACKAGED
    migrate(fresh_db)
    rows = status(fresh_db)
    assert [(v, n) for v, n, _ in rows][:2] == [("0001", "core"), ("0002", "timeseries")]
    assert [v for v, _, _ in rows] == PACKAGED
    assert all(isinstance(at, datetime) for _, _, at in rows)


def test_migrate_mirrors_the_metric_catalog(freshly_migrated_db: str) -> None:
    catalog = pytest.importorskip("eldercare.devices.catalog")
    expected = {m.name: m for m in catalog.load_catalog().metrics.values()}
    with psycopg.connect(freshly_migrated_db) as conn:
        rows = conn.execute("SELECT metric, unit, loinc, range_low, range_high FROM metrics").fetchall()
    assert {r[0] for r in rows} == set(expected)
    for metric, unit, loinc, low, high in rows:
        m = expected[metric]
        assert (unit, loinc, low, high) == (m.unit, m.loinc, m.low, m.high)


def test_migrate_creates_the_partitions_of_the_current_weeks(freshly_migrated_db: str) -> None:
    this_week = partition_name("observations", week_start(datetime.now(UTC)))
    with psycopg.connect(freshly_migrated_db) as conn:
        names = {
            r[0]
            for r in conn.execute(
                "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
                " WHERE i.inhparent = 'observations'::regclass"
            )
        }
    assert this_week in names
    assert "observations_default" in names


@pytest.mark.parametrize(
    ("choice", "probe", "flavour", "warns"),
    [
        ("auto", TimescaleProbe(available=True), "timescale", False),
        ("auto", TimescaleProbe(available=False), "plain", False),
        ("auto", TimescaleProbe(available=True, create_error=NOT_PRELOADED), "plain", True),
        ("plain", TimescaleProbe(available=True), "plain", False),
        ("plain", TimescaleProbe(available=True, create_error=NOT_PRELOADED), "plain", False),
        ("timescale", TimescaleProbe(available=True), "timescale", False),
    ],
)
def test_the_flavour_follows_the_setting_and_what_the_server_can_create(
    choice: str, probe: TimescaleProbe, flavour: str, warns: bool
) -> None:
    chosen, warning = choose_flavour(choice, probe)  # type: ignore[arg-type]
    assert chosen == flavour
    assert (warning is not None) == warns
    if warning:
        # One line that says why and what to do.
        assert "\n" not in warning and "must be preloaded" in warning
        assert "shared_preload_libraries" in warning


@pytest.mark.parametrize(
    ("probe", "why"),
    [
        (TimescaleProbe(available=False), "not installed"),
        (TimescaleProbe(available=True, create_error=NOT_PRELOADED), "must be preloaded"),
    ],
)
def test_an_explicit_timescale_the_server_cannot_give_is_one_clear_line(
    probe: TimescaleProbe, why: str
) -> None:
    with pytest.raises(MigrationError, match=why) as caught:
        choose_flavour("timescale", probe)
    message = str(caught.value)
    assert "\n" not in message
    assert "ELDERCARE_STORE_FLAVOUR=plain" in message and "shared_preload_libraries" in message


def test_an_unknown_flavour_setting_is_refused() -> None:
    with pytest.raises(MigrationError, match="auto, plain or timescale"):
        choose_flavour("timescaledb", TimescaleProbe(available=False))  # type: ignore[arg-type]


def test_the_probe_reports_what_this_server_can_create(fresh_db: str) -> None:
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        available = conn.execute(
            "SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb')"
        ).fetchone()
        probe = probe_timescale(fresh_db)
        assert probe.available == (available == (True,))
        # Whatever it found, it leaves nothing behind.
        assert conn.execute("SELECT count(*) FROM pg_extension WHERE extname = 'timescaledb'").fetchone() == (
            0,
        )
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE


def test_migrate_auto_on_a_server_without_timescaledb_makes_a_plain_store(fresh_db: str) -> None:
    if probe_timescale(fresh_db).creatable:
        pytest.skip("this server can create TimescaleDB")
    assert migrate(fresh_db, flavour="auto") == PACKAGED
    assert _applied(fresh_db)[1] == ("0002", "timeseries", "plain")


def test_migrate_as_timescale_where_it_cannot_be_created_fails_before_applying_anything(
    fresh_db: str,
) -> None:
    if probe_timescale(fresh_db).creatable:
        pytest.skip("this server can create TimescaleDB")
    with pytest.raises(MigrationError, match="ELDERCARE_STORE_FLAVOUR=timescale, but"):
        migrate(fresh_db, flavour="timescale")
    assert _applied(fresh_db) == []


def test_eldercare_migrate_with_an_impossible_flavour_says_so_in_one_line(
    fresh_db: str, pg_admin_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from eldercare.gateway.cli import app
    from eldercare.gateway.services import database_url

    if probe_timescale(fresh_db).creatable:
        pytest.skip("this server can create TimescaleDB")
    monkeypatch.chdir(tmp_path)  # no stray .env file
    monkeypatch.setenv(
        "ELDERCARE_DATABASE_URL", database_url(pg_admin_url, conninfo_to_dict(fresh_db)["dbname"])
    )
    monkeypatch.setenv("ELDERCARE_STORE_FLAVOUR", "timescale")
    result = CliRunner().invoke(app, ["migrate"])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert "ELDERCARE_STORE_FLAVOUR=timescale" in result.output

    monkeypatch.setenv("ELDERCARE_STORE_FLAVOUR", "plain")
    result = CliRunner().invoke(app, ["migrate"])
    assert result.exit_code == 0, result.output
    assert _applied(fresh_db)[1] == ("0002", "timeseries", "plain")


@pytest.fixture
def unloaded_db() -> Iterator[str]:
    """A new database on a server with TimescaleDB installed but not preloaded (else skip)."""
    if not UNLOADED_ADMIN_URL:
        pytest.skip(
            "set ELDERCARE_TEST_TIMESCALE_UNLOADED_URL to a server with TimescaleDB installed"
            " but not in shared_preload_libraries"
        )
    name = f"eldercare_store_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(UNLOADED_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_conninfo(UNLOADED_ADMIN_URL, dbname=name)
    finally:
        with psycopg.connect(UNLOADED_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_timescaledb_installed_but_not_preloaded_gives_a_plain_store_and_one_warning(
    unloaded_db: str, caplog: pytest.LogCaptureFixture
) -> None:
    probe = probe_timescale(unloaded_db)
    assert probe.available and not probe.creatable
    assert probe.create_error is not None and "preloaded" in probe.create_error

    with pytest.raises(MigrationError, match="must be preloaded"):
        migrate(unloaded_db, flavour="timescale")
    assert _applied(unloaded_db) == []

    with caplog.at_level(logging.WARNING, logger="eldercare.gateway.store.migrate"):
        assert migrate(unloaded_db) == PACKAGED
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "must be preloaded" in warnings[0].getMessage()
    assert _applied(unloaded_db)[1] == ("0002", "timeseries", "plain")


def test_days_still_dirty_at_the_upgrade_become_marks_of_their_hours(fresh_db: str, tmp_path: Path) -> None:
    """0004 replaces the day marks of 0002 by (elder, metric, hour) marks: nothing dirty is lost."""
    packaged = Path(str(resources.files("eldercare.gateway.store").joinpath("migrations")))
    older = tmp_path / "migrations"
    older.mkdir()
    for f in packaged.glob("000[12]_*.sql"):
        (older / f.name).write_text(f.read_text())
    migrate(fresh_db, source=older, flavour="plain")
    day = datetime(2031, 5, 6, tzinfo=UTC)
    with psycopg.connect(fresh_db) as conn:
        conn.execute(
            "INSERT INTO observations (time, device_id, elder_id, metric, value) VALUES"
            " (%s, 'd1', 'e1', 'heart_rate', 60), (%s, 'd1', 'e1', 'heart_rate', 61),"
            " (%s, 'd2', NULL, 'heart_rate', 62)",
            (day + timedelta(hours=3, minutes=5), day + timedelta(hours=7), day + timedelta(hours=9)),
        )
        # A rollup bucket whose raw rows are gone (deleted after the last refresh).
        conn.execute(
            "INSERT INTO observations_1m VALUES (%s, 'e2', 'spo2', 90, 90, 90, 1)",
            (day + timedelta(hours=11, minutes=1),),
        )
        conn.execute("INSERT INTO rollup_dirty (day) VALUES (%s)", (day.date(),))
        conn.commit()
    migrate(fresh_db)
    with psycopg.connect(fresh_db) as conn:
        marks = conn.execute("SELECT elder_id, metric, hour FROM rollup_dirty_hours ORDER BY 1, 3").fetchall()
        assert marks == [
            ("e1", "heart_rate", day + timedelta(hours=3)),
            ("e1", "heart_rate", day + timedelta(hours=7)),
            ("e2", "spo2", day + timedelta(hours=11)),
        ]
        assert conn.execute("SELECT count(*) FROM rollup_dirty").fetchone() == (0,)


def test_a_worker_refuses_a_store_that_lacks_a_migration_of_its_version(
    fresh_db: str, tmp_path: Path
) -> None:
    """An upgrade that forgot `eldercare migrate`: one clear line at start, not a dead letter per batch."""
    from eldercare.gateway.ingest.committer import store_flavour

    packaged = resources.files("eldercare.gateway.store").joinpath("migrations")
    for entry in packaged.iterdir():
        if entry.name.endswith(".sql") and not entry.name.startswith(PACKAGED[-1]):
            (tmp_path / entry.name).write_text(entry.read_text(encoding="utf-8"), encoding="utf-8")
    migrate(fresh_db, flavour="plain", source=tmp_path)
    with pytest.raises(RuntimeError, match=rf"lacks 1 migration\(s\) of this version \({PACKAGED[-1]}_\w+\)"):
        store_flavour(fresh_db)
    migrate(fresh_db)
    assert store_flavour(fresh_db) == "plain"

"""The store as one object: its flavour read once, its pool, its series."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest

from eldercare.gateway.store.flavour import StoreNotMigrated
from eldercare.gateway.store.maintenance import run_maintenance
from eldercare.gateway.store.series import Bucket, bucketed_series
from eldercare.gateway.store.store import Store
from tests.tcp_gate import gate_for, gated_db_url

DAY0 = datetime(2031, 3, 3, tzinfo=UTC)


def test_a_migrated_store_knows_its_flavour_and_answers_series(store_db: tuple[str, str]) -> None:
    flavour, url = store_db
    run_maintenance(url, now=DAY0)
    t = DAY0 + timedelta(hours=10, minutes=3)
    with Store.open(url) as store:
        assert store.flavour == flavour
        copy = "COPY observations (time, device_id, elder_id, metric, value) FROM STDIN"
        with store.connection() as conn, conn.cursor() as cur, cur.copy(copy) as cp:
            cp.write_row((t, "dev-e1", "e1", "heart_rate", 60.0))
            cp.write_row((t, "dev-e1", "e1", "heart_rate", 80.0))
        day = (DAY0, DAY0 + timedelta(days=1))
        expected = [Bucket(DAY0 + timedelta(hours=10), 60.0, 80.0, 70.0, 2)]
        assert store.series("e1", "heart_rate", *day, "1h") == expected
        with store.connection() as conn:  # the same answer without being told the flavour
            assert bucketed_series(conn, "e1", "heart_rate", *day, "1h") == expected


def test_a_database_never_migrated_is_one_clear_error(fresh_db: str) -> None:
    with pytest.raises(StoreNotMigrated, match="eldercare migrate"):
        Store.open(fresh_db)


def test_a_store_of_known_flavour_waits_for_a_database_that_comes_up(store_db: tuple[str, str]) -> None:
    flavour, url = store_db
    gate = gate_for(url)
    gate.close()  # the database is "down" when the role starts: no error yet
    store = Store.known(gated_db_url(url, gate), flavour, name="test-known")
    try:
        time.sleep(0.3)  # the pool tries, and fails, meanwhile
        gate.open()
        with store.connection(timeout=10) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        assert store.flavour == flavour
    finally:
        store.close()
        gate.stop()

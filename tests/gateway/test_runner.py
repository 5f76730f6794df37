"""The roles' runner: the maintenance role's jobs on one store."""

from __future__ import annotations

import psycopg
import pytest

from eldercare.gateway.runner import MaintenanceRole
from eldercare.gateway.settings import Settings


def test_the_maintenance_role_runs_on_one_store_and_survives_a_database_that_is_down(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    down = MaintenanceRole(Settings(database_url="postgresql://postgres@127.0.0.1:1/none"), open_timeout_s=1)
    down.maintenance()  # logs and returns: the scheduler's next run tries again
    assert "maintenance failed" in caplog.text and down.store is None

    role = MaintenanceRole(Settings(database_url=db_url))
    try:
        role.maintenance()
        store = role.store
        role.maintenance()
        assert role.store is store is not None  # one pool for every run, not a connection each
    finally:
        role.close()
    with psycopg.connect(db_url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_inherits WHERE inhrelid::regclass::text LIKE 'message_receipts_p%'"
        ).fetchone()
    assert row is not None and row[0] > 0  # the job ran: receipts' daily partitions exist

"""A batch step for tests, loaded by name (ELDERCARE_RULES) into a real worker's committer."""

from __future__ import annotations

import psycopg

from eldercare.gateway.settings import Settings
from eldercare.gateway.store.writer import StoredBatch


class RecordingRules:
    """Writes one decision row per reading; a heart rate of exactly 222 makes it fail."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings

    def __call__(self, cur: psycopg.Cursor, batch: StoredBatch) -> None:
        for r in batch.readings:
            cur.execute(
                "INSERT INTO test_decisions (device_id, metric, value) VALUES (%s, %s, %s)",
                (r.device_id, r.metric, r.value),
            )
            if r.metric == "heart_rate" and r.value == 222:
                raise RuntimeError("rule blew up")

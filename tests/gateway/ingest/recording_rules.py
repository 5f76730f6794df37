"""A rule set for tests, loaded by name (ELDERCARE_RULES) into a real worker's committer."""

from __future__ import annotations

import psycopg

from eldercare.alerts.ruleset import RuleBatch


class RecordingRules:
    """Writes one decision row per reading; a heart rate of exactly 222 makes it fail."""

    def apply(self, cur: psycopg.Cursor, batch: RuleBatch) -> None:
        for r in batch.readings:
            cur.execute(
                "INSERT INTO test_decisions (device_id, metric, value) VALUES (%s, %s, %s)",
                (r.device_id, r.metric, r.value),
            )
            if r.metric == "heart_rate" and r.value == 222:
                raise RuntimeError("rule blew up")

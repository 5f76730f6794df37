"""Prometheus metrics of the ingest worker (one registry per process)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

RECEIVED = Counter("eldercare_ingest_messages_received", "MQTT messages received")
STORED = Counter("eldercare_ingest_messages_stored", "Messages with at least one accepted item, committed")
DATAPOINTS = Counter("eldercare_ingest_datapoints_stored", "Observations committed")
EVENTS = Counter("eldercare_ingest_events_stored", "Device events committed")
DEAD_LETTERS = Counter(
    "eldercare_ingest_dead_letters", "Rejected items by reason (duplicates included)", ["reason"]
)
DUPLICATES = Counter("eldercare_ingest_duplicates", "Redelivered (device_id, msg_id) not stored again")
REPEATED = Counter(
    "eldercare_ingest_repeated_readings",
    "Readings a message repeated (same device, metric and time): the first is kept",
)
UNSTORED_DEAD_LETTERS = Counter(
    "eldercare_ingest_dead_letters_over_budget",
    "Rejected messages not stored because their publisher's dead-letter budget was spent (counted)",
)
CLOCK_SKEW = Counter("eldercare_ingest_clock_skew", "Items whose device clock was ahead")
ACKED = Counter("eldercare_ingest_messages_acked", "Messages acknowledged to the broker")
BATCH_SIZE = Histogram(
    "eldercare_ingest_batch_size",
    "Messages per committed batch",
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000),
)
COMMIT_SECONDS = Histogram(
    "eldercare_ingest_commit_seconds",
    "Time to write and commit one batch",
    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5),
)
LAG_SECONDS = Histogram(
    "eldercare_ingest_lag_seconds",
    "Commit time minus message ts (publish to commit, for live data)",
    buckets=(
        0.001,
        0.002,
        0.005,
        0.01,
        0.02,
        0.03,
        0.05,
        0.075,
        0.1,
        0.15,
        0.2,
        0.3,
        0.5,
        0.75,
        1,
        2,
        5,
        10,
        30,
        60,
        300,
    ),
)
QUEUE_DEPTH = Gauge("eldercare_ingest_queue_depth", "Received messages not yet committed")
SUBSCRIBED = Gauge(
    "eldercare_ingest_sessions_subscribed",
    "MQTT sessions of this worker the broker has confirmed subscribed (2 when consuming: main and events)",
)
DECISIONS = Counter(
    "eldercare_rules_decisions",
    "Decisions of the rules written: alerts opened, evidence added, upgraded, cleared, superseded,"
    " suppressed (by reason), timers scheduled and cancelled, tasks created",
    ["decision"],
)
BATCH_FAILURES = Counter("eldercare_ingest_batch_failures", "Batches whose transaction failed")


def serve_metrics(port: int, host: str = "127.0.0.1") -> None:
    """Expose /metrics on ``host:port`` (port 0: don't)."""
    if port:
        start_http_server(port, addr=host)

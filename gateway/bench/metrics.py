"""The ingest workers' Prometheus metrics as the bench reads them: samples and histograms."""

from __future__ import annotations

import math
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client.parser import text_string_to_metric_families


@dataclass(frozen=True)
class WorkerSample:
    """The workers' counters at one instant, summed over the worker processes."""

    at: float
    stored: int
    received: int
    datapoints: int
    dead_letters: dict[str, float]
    #: Cumulative bucket counts of eldercare_ingest_lag_seconds: (upper bound, count).
    lag_buckets: tuple[tuple[float, float], ...]
    #: Messages stored by each worker.
    per_worker: tuple[int, ...] = ()
    #: Cumulative buckets of eldercare_ingest_commit_seconds (write + COMMIT of one batch).
    commit_buckets: tuple[tuple[float, float], ...] = ()
    #: Batches committed, and the messages in them.
    batches: int = 0
    batched: int = 0

    def batch_stats(self, before: WorkerSample) -> tuple[float | None, float | None, float | None]:
        """Mean batch size, commit p50 and p99 since ``before``."""
        n = self.batches - before.batches
        mean = (self.batched - before.batched) / n if n else None
        delta = bucket_delta(self.commit_buckets, before.commit_buckets)
        return mean, histogram_quantile(0.5, delta), histogram_quantile(0.99, delta)


def scrape(port: int) -> dict[str, Any]:
    """The ingest metrics one worker exposes on ``port``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, Any] = {"dead_letters": {}, "lag": {}, "commit": {}}
    names = {
        "eldercare_ingest_messages_stored_total": "stored",
        "eldercare_ingest_messages_received_total": "received",
        "eldercare_ingest_datapoints_stored_total": "datapoints",
        "eldercare_ingest_batch_size_count": "batches",
        "eldercare_ingest_batch_size_sum": "batched",
        "eldercare_ingest_sessions_subscribed": "subscribed",
    }
    for family in text_string_to_metric_families(text):
        if not family.name.startswith("eldercare_ingest"):
            continue
        for s in family.samples:
            if s.name in names:
                out[names[s.name]] = s.value
            elif s.name == "eldercare_ingest_dead_letters_total":
                out["dead_letters"][s.labels.get("reason", "?")] = s.value
            elif s.name == "eldercare_ingest_lag_seconds_bucket":
                out["lag"][float(s.labels["le"])] = s.value
            elif s.name == "eldercare_ingest_commit_seconds_bucket":
                out["commit"][float(s.labels["le"])] = s.value
    return out


def histogram_quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float | None:
    """The q-quantile of a cumulative histogram, interpolated linearly within its bucket."""
    if not buckets:
        return None
    total = buckets[-1][1]
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if math.isinf(upper):
                return lower  # beyond the last finite bound: the bound is all we know
            inside = count - below
            return lower + (upper - lower) * ((rank - below) / inside if inside else 0.0)
        lower, below = upper, count
    return lower


def bucket_delta(
    after: Sequence[tuple[float, float]], before: Sequence[tuple[float, float]]
) -> tuple[tuple[float, float], ...]:
    """Observations between two scrapes of one cumulative histogram."""
    prior = dict(before)
    return tuple((le, count - prior.get(le, 0.0)) for le, count in after)

"""`eldercare bench alerts --quick`: every press reaches its first hotline, every dispatch is delivered."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.gateway.test_bench import ELDERCARE, needs_mosquitto, quick_bench

ALERTS_OPTIONS = (
    "--quick",
    "--presses",
    "--press-rate",
    "--background",
    "--devices",
    "--alerts",
    "--outbox-batch",
    "--outage-seconds",
    "--ack-delay",
    "--worker-env",
    "--admin-url",
    "--keep",
    "--json",
)


def test_help_lists_every_option() -> None:
    done = subprocess.run(
        [ELDERCARE, "bench", "alerts", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert done.returncode == 0, done.stderr
    listed = {word for line in done.stdout.splitlines() for word in line.split() if word.startswith("--")}
    assert set(ALERTS_OPTIONS) <= listed


def test_a_negative_press_count_is_refused() -> None:
    done = subprocess.run(
        [ELDERCARE, "bench", "alerts", "--presses", "-1"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2 and "--presses" in done.stderr


@pytest.mark.slow
@needs_mosquitto
def test_quick_alerts_benchmark_follows_each_press_to_its_first_hotline_and_counts_deliveries(
    tmp_path: Path, pg_admin_url: str
) -> None:
    done, result = quick_bench("alerts", tmp_path, pg_admin_url)
    assert "work folder" in done.stdout and "first request at 120" in done.stdout
    [background] = result["latency"]
    sos, hypo = background["kinds"]
    # The SOS rule's route asks the 12349 operator first; the emergency-band reading, 120.
    assert (sos["rule"], sos["route"], sos["channel"]) == ("sos", "operator_first", "12349")
    assert (hypo["rule"], hypo["route"], hypo["channel"]) == ("hypoglycaemia_severe", "emergency", "120")
    for kind in (sos, hypo):
        assert kind["requested"] == len(kind["reached"]) > 0
        total = kind["quantiles"]["total"]
        assert 0 < total["p50"] <= total["p99"] <= total["max"] < 60
        for part in ("commit", "send", "request"):
            assert kind["quantiles"][part]["p50"] >= 0
    at_once, outage = result["throughput"]
    for run in (at_once, outage):
        assert run["delivered"] == run["dispatches"] == 2 * run["plan"]["alerts"] > 0
        assert run["rate"] > 0
    assert at_once["attempts"] == at_once["dispatches"]
    assert outage["attempts"] > outage["dispatches"]  # 120's 500s were retried

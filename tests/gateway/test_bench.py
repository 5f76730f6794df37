"""`eldercare bench ingest --quick`: the benchmark runs end to end and counts exactly."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ELDERCARE = str(Path(sys.executable).with_name("eldercare"))


def quick_bench(
    name: str, tmp_path: Path, admin_url: str, *extra: str, timeout: float = 240
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """Run ``eldercare bench NAME --quick`` on its own database; its output and JSON figures."""
    out = tmp_path / f"{name}.json"
    done = subprocess.run(
        [ELDERCARE, "bench", name, "--quick", *extra, "--admin-url", admin_url, "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "160"},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done, json.loads(out.read_text())


needs_mosquitto = pytest.mark.skipif(
    not (shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists()),
    reason="the benchmark measures the real Mosquitto: apt-get install mosquitto",
)

INGEST_OPTIONS = (
    "--quick",
    "--variant",
    "--workers",
    "--protocol",
    "--publisher-protocol",
    "--rates",
    "--hub-rates",
    "--step-seconds",
    "--settle-seconds",
    "--drain",
    "--hub-drain",
    "--devices",
    "--hubs",
    "--publishers",
    "--no-bare",
    "--keep-going",
    "--worker-env",
    "--admin-url",
    "--keep",
    "--json",
    "--profile",
)


@pytest.mark.parametrize(
    ("args", "option"),
    [(("ingest", "--rates", "4000,fast"), "--rates"), (("rules", "--breach-rate", "0.5"), "--breach-rate")],
)
def test_a_bench_rejects_an_option_out_of_its_range(args: tuple[str, ...], option: str) -> None:
    done = subprocess.run([ELDERCARE, "bench", *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and option in done.stderr


@pytest.mark.slow
@needs_mosquitto
def test_quick_benchmark_stores_everything_once_and_reports_rates(tmp_path: Path, pg_admin_url: str) -> None:
    done, result = quick_bench("ingest", tmp_path, pg_admin_url, "--variant", "telemetry")
    assert "bare drain" in done.stdout and "worker drain" in done.stdout
    [variant] = result["variants"]
    assert variant["receipts_found"] == variant["receipts_expected"] > 0
    assert variant["observations_found"] == variant["observations_expected"] > 0
    assert variant["sustained_rate"] > 0 and variant["drain_ratio"] > 0


@pytest.mark.slow
@needs_mosquitto
def test_memory_benchmark_floods_a_worker_and_reports_its_peak(pg_admin_url: str) -> None:
    done = subprocess.run(
        [ELDERCARE, "bench", "memory", "--shape", "telemetry", "--seconds", "3", "--admin-url", pg_admin_url],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "COLUMNS": "160"},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    [line] = [x for x in done.stdout.splitlines() if x.strip().startswith("telemetry ")]

    def figure(word: str) -> int:
        return int(line.split(word)[1].split()[0].replace(",", ""))

    published, stored = figure("published"), figure("stored")
    assert published == stored > 0
    assert "peak" in line and "committer" in line


def test_compare_refuses_a_folder_without_the_reference_worker(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "eldercare.gateway.bench.compare", "--reference", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert done.returncode == 2 and "worker.py" in done.stderr


def test_compare_rejects_an_unknown_protocol(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "eldercare.gateway.bench.compare",
            "--reference",
            str(tmp_path),
            "--protocols",
            "4",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert done.returncode == 2 and "3.1.1 or 5" in done.stderr


def test_profile_summary_names_the_process_of_each_thread() -> None:
    from eldercare.gateway.bench.profiling import profile_summary

    raw = (
        'process 10:"eldercare serve";thread (0x1): paho;_loop (paho/mqtt/client.py:1) 30\n'
        'process 11:"python -c spawn";thread (0x2): MainThread;write (gateway/store/writer.py:9) 10\n'
    )
    lines = profile_summary(raw)
    assert any("process 10" in line and "paho" in line for line in lines)
    assert any("process 11" in line and "MainThread" in line for line in lines)


RULES_OPTIONS = (
    "--quick",
    "--rules",
    "--breach-rate",
    "--news2-scoring",
    "--seed",
    "--devices",
    "--rates",
    "--step-seconds",
    "--drain",
    "--sos",
    "--sos-rate",
    "--sos-background",
    "--worker-env",
    "--admin-url",
    "--keep",
    "--json",
    "--profile",
)


@pytest.mark.parametrize(("command", "options"), [("ingest", INGEST_OPTIONS), ("rules", RULES_OPTIONS)])
def test_help_lists_every_option(command: str, options: tuple[str, ...]) -> None:
    done = subprocess.run(
        [ELDERCARE, "bench", command, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert done.returncode == 0, done.stderr
    listed = {word for line in done.stdout.splitlines() for word in line.split() if word.startswith("--")}
    assert set(options) <= listed


@pytest.mark.slow
@needs_mosquitto
def test_quick_rules_benchmark_compares_rules_off_and_on_and_times_sos_presses(
    tmp_path: Path, pg_admin_url: str
) -> None:
    done, result = quick_bench("rules", tmp_path, pg_admin_url, timeout=300)
    assert "rules on / off, drain" in done.stdout and "SOS" in done.stdout
    off, on = result["runs"]
    assert (off["setting"], on["setting"]) == ("off", "default")
    for run in (off, on):
        assert run["result"]["receipts_found"] == run["result"]["receipts_expected"] > 0
        assert run["breaching_readings"] > 0 and run["result"]["worker_drain"]["rate"] > 0
    assert off["decisions"]["alerts opened"] == 0 < on["decisions"]["alerts opened"]
    assert result["ratio_drain"] > 0
    [sos] = result["sos"]
    assert sos["committed"] == len(sos["presses"]["presses"]) > 0
    assert sos["quantiles"]["total"]["p99"] > 0 and sos["quantiles"]["commit"]["p50"] >= 0


def test_callee_shares_split_a_callers_samples_by_what_it_called() -> None:
    from eldercare.gateway.bench.profiling import callee_shares

    raw = (
        "thread (0x1): w;write (gateway/store/writer.py:9);__call__ (gateway/ingest/alerting.py:1);"
        "load_history (gateway/store/alerts.py:5);execute (psycopg/cursor.py:2) 30\n"
        "thread (0x1): w;write (gateway/store/writer.py:9);__call__ (gateway/ingest/alerting.py:1) 10\n"
        "thread (0x1): w;write (gateway/store/writer.py:9);_copy_readings (gateway/store/writer.py:4) 60\n"
        "thread (0x2): paho;_loop (paho/mqtt/client.py:1) 99\n"
    )
    assert callee_shares(raw, "store/writer.py", "ingest/alerting.py") == (
        100,
        40,
        {"load_history": 30, "(itself)": 10},
    )


def test_an_sos_press_never_seen_committed_counts_as_infinitely_late() -> None:
    from eldercare.gateway.bench.emergency import Press, SosResult

    presses = [Press("d", "e", f"m{i}", 100.0, 100.0 + 0.01 * (i + 1), 100.001, 100.005) for i in range(3)]
    result = SosResult((*presses, Press("d", "e", "m9", 100.0, None)), "idle")
    total = result.quantiles()
    assert total["p50"] == pytest.approx(0.02) and total["max"] == float("inf")
    assert result.quantiles("to_worker")["max"] == pytest.approx(0.001)  # parts: presses seen through

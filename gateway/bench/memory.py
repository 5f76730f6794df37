"""``eldercare bench memory``: the ingest worker's memory under a flood of one message shape.

The worker bounds what it holds (received, not yet committed) by count (``QUEUE_SIZE``) and
by payload bytes (``QUEUE_BYTES``). This bench floods one worker with large buffered uploads
or with small telemetry, samples the resident memory of both of its processes (receiver and
committer) twice a second, and prints the peak beside what was stored, so the bound can be
checked in bytes, not only in messages. Its own database and mosquitto, as ``bench ingest``.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
from rich.console import Console

from eldercare.gateway.bench.broker import BenchBroker
from eldercare.gateway.bench.database import bench_database, count_rows, default_admin_url
from eldercare.gateway.bench.options import BenchOptions
from eldercare.gateway.bench.workers import Workers
from eldercare.simulators.publisher import Fleet, PublisherRun, PublishPlan, register_fleet


@dataclass(frozen=True)
class Shape:
    """One kind of flood: a fleet, a rate and what each message is."""

    name: str
    fleet: Fleet
    rate: float
    publishers: int
    what: str


SHAPES = {
    # The measurement: buffered uploads, 700 samples x 3 metrics (~56 KB), 80 msg/s.
    "buffered": Shape(
        "buffered",
        Fleet(
            variant="hub",
            size=20,
            subs_per_hub=5,
            samples_per_message=700,
            sample_spacing_ms=60_000,
            prefix="mem",
        ),
        80.0,
        1,
        "hub uploads of 700 samples x 3 metrics (~56 KB)",
    ),
    # Small live telemetry at a high rate.
    "telemetry": Shape(
        "telemetry",
        Fleet(variant="telemetry", size=1_000, prefix="mem"),
        6_600.0,
        1,
        "3-metric telemetry (~110 B)",
    ),
}


@dataclass(frozen=True)
class MemoryResult:
    """Peak resident memory of one worker during one flood."""

    shape: str
    queue_bytes: int
    published: int
    stored: int
    seconds: float
    rss_start_mb: float
    rss_peak_mb: float
    receiver_peak_mb: float
    committer_peak_mb: float


def _rss(pids: list[int]) -> list[float]:
    out = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            out.append(psutil.Process(pid).memory_info().rss / 2**20)
    return out


def run_shape(
    shape: Shape, *, seconds: float, queue_bytes: int | None, admin_url: str, console: Console
) -> MemoryResult:
    """Flood one fresh worker with ``shape`` for ``seconds``; wait for the drain; the peaks."""
    workdir = Path(tempfile.mkdtemp(prefix="eldercare-bench-memory-"))
    env = (("ELDERCARE_QUEUE_BYTES", str(queue_bytes)),) if queue_bytes else ()
    options = BenchOptions(workers=1, worker_env=env)
    broker = None
    workers = None
    try:
        with bench_database(admin_url, keep=False) as (_, db_url):
            register_fleet(db_url, shape.fleet)
            broker = BenchBroker(workdir)
            workers = Workers(options, db_url, broker.url, workdir, broker.worker_env)
            workers.start()
            time.sleep(1.0)
            start = sum(_rss(workers.pids))
            peak, receiver, committer = start, 0.0, 0.0
            plan = PublishPlan(
                broker.publisher_url,
                shape.fleet,
                rate=shape.rate,
                duration_s=seconds,
                processes=shape.publishers,
                tag=f"mem{int(time.time())}",
            )
            began = time.monotonic()
            console.print(f"[bold]{shape.name}[/]: {shape.what} at {shape.rate:,.0f} msg/s for {seconds:g} s")
            with PublisherRun(plan) as run:
                run.start()
                last_print = 0.0
                published = stored = 0
                while True:
                    rss = _rss(workers.pids)
                    if rss:
                        peak = max(peak, sum(rss))
                        receiver = max(receiver, rss[0])
                        committer = max(committer, max(rss[1:], default=0.0))
                    published = run.published()
                    publishing = run.running()
                    stored = count_rows(db_url, "SELECT count(*) FROM message_receipts")
                    now = time.monotonic() - began
                    if now - last_print >= 5:
                        last_print = now
                        console.print(
                            f"  {now:5.0f} s  published {published:>8,}  stored {stored:>8,}  "
                            f"worker RSS {sum(rss):6.0f} MB (peak {peak:.0f})"
                        )
                    if not publishing and stored >= published:
                        break
                    if now > seconds + 600:
                        console.print("[red]  not drained 10 minutes after the flood; giving up[/]")
                        break
                    time.sleep(0.5)
                report = run.wait()
            return MemoryResult(
                shape=shape.name,
                queue_bytes=queue_bytes or 0,
                published=report.published,
                stored=stored,
                seconds=time.monotonic() - began,
                rss_start_mb=start,
                rss_peak_mb=peak,
                receiver_peak_mb=receiver,
                committer_peak_mb=committer,
            )
    finally:
        if workers is not None:
            workers.stop()
        if broker is not None:
            broker.close()
        shutil.rmtree(workdir, ignore_errors=True)


def run_memory_bench(
    shapes: list[str], *, seconds: float, queue_bytes: int | None, admin_url: str | None, console: Console
) -> list[MemoryResult]:
    """Run each shape and print a table of the peaks."""
    results = [
        run_shape(
            SHAPES[s],
            seconds=seconds,
            queue_bytes=queue_bytes,
            admin_url=admin_url or default_admin_url(),
            console=console,
        )
        for s in shapes
    ]
    console.print("\ningest worker memory (resident, receiver + committer processes):")
    for r in results:
        console.print(
            f"  {r.shape:<10} QUEUE_BYTES {r.queue_bytes or 'default':>10}  "
            f"published {r.published:>9,}  stored {r.stored:>9,}  in {r.seconds:4.0f} s  "
            f"RSS {r.rss_start_mb:.0f} MB at start, peak {r.rss_peak_mb:.0f} MB "
            f"(receiver {r.receiver_peak_mb:.0f} MB, committer {r.committer_peak_mb:.0f} MB)"
        )
    return results

"""``eldercare bench ingest``: the highest sustained zero-loss ingest rate, beside a bare drain.

One run, per payload variant (3-metric telemetry, hub messages of 100 samples):

1. bare baseline: a bare paho subscriber (same protocol and subscription kind as the
   worker, QoS 1, counting only) drains a backlog of M messages pre-loaded into its
   persistent session, then keeps up with a paced publisher stepped up in rate;
2. the real worker(s), ``eldercare serve --role ingest`` subprocesses: the same paced steps,
   each passing only if every published message is stored (zero loss) within a couple of
   seconds of the step's end and the lag p99 does not grow; then the worker's own backlog
   drain (offline while M messages are published, then started), for the ratio
   worker / bare drain.

Everything runs on this machine: its own database (created, migrated, dropped unless
``--keep``) and its own Mosquitto. Publishers, broker, worker(s) and PostgreSQL share the
cores, which the output says, with each one's CPU share per step.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import psycopg
from rich.console import Console
from rich.live import Live
from rich.text import Text

from eldercare.gateway.bench.bare import BareSubscribers
from eldercare.gateway.bench.broker import BENCH_USER, BenchBroker
from eldercare.gateway.bench.cpu import CpuMeter, postgres_pids
from eldercare.gateway.bench.database import bench_database, count_rows
from eldercare.gateway.bench.machine import machine_info
from eldercare.gateway.bench.metrics import WorkerSample, bucket_delta, histogram_quantile
from eldercare.gateway.bench.options import (
    VARIANTS,
    BenchOptions,
    BenchResult,
    DrainResult,
    StepResult,
    VariantResult,
)
from eldercare.gateway.bench.profiling import PySpy, profile_summary
from eldercare.gateway.bench.reference import ReferenceWorker
from eldercare.gateway.bench.report import batch_text, cpu_text, fmt_seconds, print_summary
from eldercare.gateway.bench.workers import Workers
from eldercare.simulators.publisher import (
    PublisherRun,
    PublishPlan,
    PublishReport,
    register_fleet,
)

#: One publisher process is given at most this rate (msg/s) before another is added: one
#: process tops out near 11k msg/s on the 2-core machine while a worker shares it, so a
#: step is never publisher-limited below the rate it reports. Never fewer than two.
PUBLISHER_PROCESS_RATE = 5_000.0
MIN_PUBLISHER_PROCESSES = 2
#: A step passes only if the lag p99 of its second half stays below this multiple of the
#: first half's (plus LAG_GROWTH_SLACK_S): a backlog that grows shows as a lag that grows.
LAG_GROWTH_FACTOR = 1.5
LAG_GROWTH_SLACK_S = 0.1
#: After a failed step, wait this long at most for the backlog to drain, to tell a backlog
#: (everything stored, late) from a loss (messages never stored).
BACKLOG_WAIT_S = 60.0
NO_PROGRESS_S = 10.0
#: What a paced step publishes to: the gateway's workers, bare subscribers, the reference.
Sink = Workers | BareSubscribers | ReferenceWorker


class VariantRun:
    """Runs every phase of one payload variant against one broker and database."""

    def __init__(
        self,
        options: BenchOptions,
        variant: str,
        console: Console,
        broker: BenchBroker,
        db_url: str,
        workdir: Path,
        tag_prefix: str = "",
    ) -> None:
        self.o = options
        #: Starts every msg_id tag: runs sharing a database need different ones (dedup).
        self.tag_prefix = tag_prefix
        self.variant = variant
        self.console = console
        self.broker = broker
        self.db_url = db_url
        self.workdir = workdir
        self.fleet = options.fleet(variant)
        self.dp = self.fleet.datapoints_per_message
        self.notes: list[str] = []
        self._tags = 0
        self.worker_published = 0

    # -- helpers

    def tag(self, phase: str) -> str:
        self._tags += 1
        return f"{self.tag_prefix}{self.variant[0]}{phase}{self._tags}"

    def plan(self, rate: float | None, tag: str, **kw: Any) -> PublishPlan:
        procs = self.o.publishers or (
            MIN_PUBLISHER_PROCESSES
            if rate is None
            else max(MIN_PUBLISHER_PROCESSES, math.ceil(rate / PUBLISHER_PROCESS_RATE))
        )
        return PublishPlan(
            mqtt_url=self.broker.publisher_url,
            fleet=self.fleet,
            rate=rate,
            processes=procs,
            tag=tag,
            protocol=self.o.publisher_protocol,
            **kw,
        )

    def say(self, text: str) -> None:
        self.console.print(f"[bold cyan]{self.variant}[/] {text}")

    def preload(self, count: int) -> PublishReport:
        """Publish ``count`` messages as fast as the publishers can, all PUBACKed."""
        with PublisherRun(self.plan(None, self.tag("d"), count=count)) as run:
            run.start()
            report = run.wait()
        if report.acked != count or report.errors:
            raise RuntimeError(
                f"pre-load: {report.acked:,}/{count:,} acknowledged by the broker {'; '.join(report.errors)}"
            )
        return report

    # -- phases

    def run(self) -> VariantResult:
        bare_drain, bare_steps = (None, ()) if not self.o.bare else self.run_bare()
        workers = Workers(self.o, self.db_url, self.broker.url, self.workdir, self.broker.worker_env)
        receipts0 = count_rows(self.db_url, "SELECT count(*) FROM message_receipts")
        obs0 = count_rows(self.db_url, "SELECT count(*) FROM observations")
        try:
            self.say(f"starting {self.o.workers} ingest worker(s): {' '.join(workers.command())}")
            workers.start()
            self.warm_up(workers)
            worker_steps = self.ladder("worker", workers)
            worker_drain = self.worker_drain(workers)
        finally:
            workers.stop()
            workers.clear_sessions()
        receipts = count_rows(self.db_url, "SELECT count(*) FROM message_receipts") - receipts0
        obs = count_rows(self.db_url, "SELECT count(*) FROM observations") - obs0
        with psycopg.connect(self.db_url) as conn:
            rows = conn.execute("SELECT reason, count(*) FROM dead_letters GROUP BY reason").fetchall()
        dead: dict[str, int] = {str(r[0]): int(r[1]) for r in rows}
        if dead:
            self.notes.append(f"dead letters in the bench database: {dead}")
        expected = self.worker_published
        if receipts != expected:
            self.notes.append(
                f"LOSS CHECK FAILED: {expected:,} messages published to the worker, "
                f"{receipts:,} receipts in the database"
            )
        return VariantResult(
            variant=self.variant,
            datapoints_per_message=self.dp,
            bare_drain=bare_drain,
            bare_steps=tuple(bare_steps),
            worker_steps=tuple(worker_steps),
            worker_drain=worker_drain,
            receipts_expected=expected,
            receipts_found=receipts,
            observations_expected=expected * self.dp,
            observations_found=obs,
            dead_letters=dead,
            notes=tuple(self.notes),
        )

    def run_bare(self) -> tuple[DrainResult, list[StepResult]]:
        bare = BareSubscribers(self.broker.url, self.o.protocol, self.o.workers)
        m = self.o.drain_size(self.variant)
        try:
            # The sessions must exist (subscribed, offline) before the backlog is published.
            bare.start()
            bare.stop()
            self.say(f"bare drain: pre-loading {m:,} messages into the offline session(s)")
            self.preload(m)
            t0 = time.time()
            bare.start()
            meter = self._drain_meter(bare.pids, "bare")
            deadline = time.monotonic() + 120
            while bare.received() < m and time.monotonic() < deadline:
                time.sleep(0.05)
                meter.read()  # keeps each process's last reading
            cpu = meter.read()
            reports = bare.stop()
            got = sum(r.received for r in reports)
            first = min((r.first_at for r in reports if r.received), default=t0)
            last = max((r.last_at for r in reports if r.received), default=t0)
            span = max(1e-6, last - first)
            drain = DrainResult(m, got, span, got / span, 0.0, None, cpu)
            self.say(
                f"bare drain: {got:,}/{m:,} messages in {span:.2f} s = "
                f"[bold]{drain.rate:,.0f} msg/s[/] (MQTT {self.o.protocol}, QoS 1, counting only)"
                f" | {cpu_text(cpu)}"
            )
            bare.start()
            steps = self.ladder("bare", bare)
        finally:
            bare.stop()
            bare.clear()
        return drain, steps

    def warm_up(self, workers: Workers) -> None:
        """Publish a few messages and wait until they are stored: the workers are subscribed."""
        n = max(50, min(1_000, self.o.devices)) if self.variant == "telemetry" else 20
        before = workers.sample().stored
        deadline = time.monotonic() + 60
        with PublisherRun(self.plan(min(1_000.0, n * 2.0), self.tag("w"), count=n)) as run:
            run.start()
            report = run.wait()
        self.worker_published += report.published
        while workers.sample().stored - before < report.published:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    "the workers stored nothing of the warm-up messages in 60 s; "
                    f"see the logs in {self.workdir}"
                )
            time.sleep(0.1)

    def ladder(self, who: str, sink: Sink) -> list[StepResult]:
        steps: list[StepResult] = []
        rates = self.o.ladder(self.variant)
        if who == "bare" and len(rates) > 1:
            # The bare subscriber is the baseline: if it keeps up with the top rate, that is
            # all there is to know; otherwise find its limit from the bottom.
            top = self.step(who, sink, rates[-1], "top")
            steps.append(top)
            if top.passed:
                return steps
            rates = rates[:-1]
        for i, rate in enumerate(rates, 1):
            step = self.step(who, sink, rate, f"{i}/{len(rates)}")
            steps.append(step)
            if not step.passed and self.o.stop_at_failure:
                break
        return steps

    def step(self, who: str, sink: Sink, rate: float, label: str) -> StepResult:
        """One paced step: publish at ``rate`` for step_s, then check what arrived."""
        is_worker = isinstance(sink, Workers)

        def count() -> int:
            return sink.sample().stored if isinstance(sink, Workers) else sink.received()

        first = sink.sample() if isinstance(sink, Workers) else None
        base = first.stored if first else count()
        mid: WorkerSample | None = None
        bare = isinstance(sink, BareSubscribers)
        step_s = min(self.o.step_s, self.o.bare_step_s) if bare else self.o.step_s
        run = PublisherRun(self.plan(rate, self.tag("s"), duration_s=step_s))
        groups: dict[str, Sequence[int]] = {
            "broker": [self.broker.pid],
            "publishers": run.pids(),
            "bench": [os.getpid()],
        }
        if isinstance(sink, Workers):
            groups["worker"] = sink.pids
            with contextlib.suppress(psycopg.Error):
                groups["postgres"] = postgres_pids(self.db_url)
        elif isinstance(sink, ReferenceWorker):
            groups["worker"] = sink.pids
            with contextlib.suppress(psycopg.Error):
                groups["postgres"] = postgres_pids(sink.db_url)
        else:
            groups["bare"] = sink.pids
        samples: list[tuple[float, int, int]] = []  # (time, published, stored)
        rss = 0.0
        with run:
            t0 = run.start()
            meter = CpuMeter(groups)
            title = f"{who} step {label}: target {rate:,.0f} msg/s"
            with Live(Text(title), console=self.console, transient=True, refresh_per_second=4) as live:
                while run.running():
                    time.sleep(0.25)
                    now = time.time()
                    s = sink.sample() if isinstance(sink, Workers) else None
                    stored = (s.stored if s else count()) - base
                    published = run.published()
                    samples.append((now, published, stored))
                    if s is not None and mid is None and now - t0 >= step_s / 2:
                        mid = s
                    rss = max(rss, sink.rss() if isinstance(sink, Workers | ReferenceWorker) else 0)
                    live.update(Text(self._live_line(title, now - t0, step_s, samples, rss, meter)))
            report = run.wait()
            cpu = meter.read()
        if is_worker:
            self.worker_published += report.published
        # Everything published (and PUBACKed) must be stored within settle_s.
        catch_up = None
        end = report.last_publish
        deadline = time.monotonic() + self.o.settle_s
        final: WorkerSample | None = None
        while True:
            final = sink.sample() if isinstance(sink, Workers) else None
            stored = (final.stored if final else count()) - base
            if stored >= report.published:
                catch_up = max(0.0, time.time() - end)
                break
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        verdict, passed = self._verdict(report, stored, catch_up)
        if not passed and stored < report.published:
            stored, verdict = self._wait_backlog(count, base, report.published, verdict)
        lag50 = lag99 = lag99a = lag99b = None
        offset = self.o.lag_offset_s(self.variant)

        def quantile(q: float, after: WorkerSample, before: WorkerSample) -> float | None:
            x = histogram_quantile(q, bucket_delta(after.lag_buckets, before.lag_buckets))
            return None if x is None else max(0.0, x - offset)

        if first is not None and final is not None:
            lag50 = quantile(0.5, final, first)
            lag99 = quantile(0.99, final, first)
            if mid is not None:
                lag99a = quantile(0.99, mid, first)
                lag99b = quantile(0.99, final, mid)
                if (
                    passed
                    and lag99a is not None
                    and lag99b is not None
                    and lag99b > LAG_GROWTH_FACTOR * lag99a + LAG_GROWTH_SLACK_S
                ):
                    passed = False
                    verdict = f"lag growing (p99 {fmt_seconds(lag99a)} → {fmt_seconds(lag99b)})"
        if first is not None and final is not None:
            dead = sum(final.dead_letters.values()) - sum(first.dead_letters.values())
            if dead > 0:  # the bench's messages are all valid: a rejection is a fault
                passed = False
                verdict = f"{verdict}; {dead:,.0f} items dead-lettered"
        stored_rate = self._stored_rate(samples, report)
        result = StepResult(
            target_rate=rate,
            published=report.published,
            publish_rate=report.achieved_rate,
            stored=stored,
            stored_rate=stored_rate,
            catch_up_s=catch_up,
            lag_p50_s=lag50,
            lag_p99_s=lag99,
            lag_p99_first_half_s=lag99a,
            lag_p99_second_half_s=lag99b,
            rss_mib=rss / 2**20,
            cpu=cpu,
            verdict=verdict,
            passed=passed,
        )
        if first is not None and final is not None:
            mean, p50, p99 = final.batch_stats(first)
            result = replace(result, batch_mean=mean, commit_p50_s=p50, commit_p99_s=p99)
        self._print_step(who, label, result)
        return result

    def _live_line(
        self,
        title: str,
        elapsed: float,
        step_s: float,
        samples: list[tuple[float, int, int]],
        rss: float,
        meter: CpuMeter,
    ) -> str:
        pub_rate = stored_rate = 0.0
        if len(samples) >= 2:
            (ta, pa, sa), (tb, pb, sb) = samples[max(0, len(samples) - 5)], samples[-1]
            if tb > ta:
                pub_rate, stored_rate = (pb - pa) / (tb - ta), (sb - sa) / (tb - ta)
        published, stored = (samples[-1][1], samples[-1][2]) if samples else (0, 0)
        line = (
            f"{title} | {elapsed:4.1f}/{step_s:.0f} s | published {pub_rate:,.0f}/s"
            f" | stored {stored_rate:,.0f}/s | backlog {max(0, published - stored):,}"
        )
        if rss:
            line += f" | RSS {rss / 2**20:,.0f} MiB"
        return line + " | " + cpu_text(meter.read())

    @staticmethod
    def _stored_rate(samples: list[tuple[float, int, int]], report: PublishReport) -> float:
        inside = [s for s in samples if report.first_publish <= s[0] <= report.last_publish]
        if len(inside) < 2:
            return 0.0
        (ta, _, sa), (tb, _, sb) = inside[0], inside[-1]
        return (sb - sa) / (tb - ta) if tb > ta else 0.0

    def _verdict(self, report: PublishReport, stored: int, catch_up: float | None) -> tuple[str, bool]:
        if report.errors:
            return "publisher error: " + "; ".join(report.errors), False
        if report.acked < report.published:
            return f"broker did not acknowledge {report.published - report.acked:,}", False
        if catch_up is None:
            return f"backlog: {report.published - stored:,} not stored after {self.o.settle_s:.0f} s", False
        if not report.kept_up:
            target = report.target_rate or 0.0
            self.notes.append(
                f"publisher could not keep up at {target:,.0f} msg/s "
                f"(reached {report.achieved_rate:,.0f}/s): the cores are saturated"
            )
            return (
                f"publisher-limited ({report.achieved_rate:,.0f} of {target:,.0f} msg/s); all stored",
                True,
            )
        return "ok", True

    def _wait_backlog(
        self, count: Callable[[], int], base: int, published: int, verdict: str
    ) -> tuple[int, str]:
        """Wait for a backlog to drain; a count that stops short of published is a loss."""
        self.say("waiting for the backlog to drain before going on...")
        t0 = time.monotonic()
        last, last_change = count() - base, time.monotonic()
        while last < published:
            time.sleep(0.2)
            now = count() - base
            if now != last:
                last, last_change = now, time.monotonic()
            if time.monotonic() - last_change > NO_PROGRESS_S or time.monotonic() - t0 > BACKLOG_WAIT_S:
                break
        if last >= published:
            return last, f"{verdict}; caught up after {time.monotonic() - t0 + self.o.settle_s:.0f} s"
        missing = published - last
        if time.monotonic() - last_change > NO_PROGRESS_S:
            self.notes.append(f"LOSS: {missing:,} messages never stored")
            return last, f"{verdict}; LOSS: {missing:,} never stored"
        return last, f"{verdict}; still {missing:,} behind after {BACKLOG_WAIT_S:.0f} s"

    def _print_step(self, who: str, label: str, s: StepResult) -> None:
        mark = "[green]PASS[/]" if s.passed else "[red]FAIL[/]"
        dp = f" ({s.publish_rate * self.dp:,.0f} dp/s)" if who == "worker" else ""
        lag = (
            f", lag p50/p99 {fmt_seconds(s.lag_p50_s)}/{fmt_seconds(s.lag_p99_s)}"
            if s.lag_p99_s is not None
            else ""
        )
        rss = f", RSS {s.rss_mib:,.0f} MiB" if s.rss_mib else ""
        self.say(
            f"{who} step {label} {mark} target {s.target_rate:,.0f}: published "
            f"{s.published:,} at {s.publish_rate:,.0f}/s{dp}, stored {s.stored:,} "
            f"(during the step {s.stored_rate:,.0f}/s){lag}{rss}{batch_text(s)} | "
            f"{cpu_text(s.cpu)} | {s.verdict}"
        )

    def worker_drain(self, workers: Workers) -> DrainResult:
        """Workers offline while M messages are published, then started: how fast they drain."""
        m = self.o.drain_size(self.variant)
        workers.stop()
        self.say(f"worker drain: workers stopped, pre-loading {m:,} messages")
        tag_report = self.preload(m)
        self.worker_published += tag_report.published
        workers.max_rss = 0
        workers.start()
        started = workers.started_at
        spy = None
        if self.o.profile_prefix:
            out = Path(f"{self.o.profile_prefix}-{self.variant}.txt")
            try:
                spy = PySpy(workers.pids[0], out, wall=self.o.profile_wall)
                self.say(f"recording worker {workers.pids[0]} with py-spy into {out}")
            except RuntimeError as exc:
                self.notes.append(str(exc))
        deadline = time.monotonic() + max(120.0, m / 500.0)
        last, last_change = 0, time.monotonic()
        meter: CpuMeter | None = None
        zero = workers.sample()
        with Live(Text(""), console=self.console, transient=True, refresh_per_second=4) as live:
            while True:
                s = workers.sample()
                if meter is None and s.stored:
                    # From the first commit on: by then the workers' database sessions exist.
                    meter = self._drain_meter(workers.pids)
                if s.stored >= m:
                    done = time.time()
                    break
                if s.stored != last:
                    last, last_change = s.stored, time.monotonic()
                if time.monotonic() > deadline or time.monotonic() - last_change > 30:
                    done = time.time()
                    self.notes.append(f"worker drain stopped at {s.stored:,}/{m:,}")
                    break
                live.update(
                    Text(f"worker drain: {s.stored:,}/{m:,} stored | RSS {workers.rss() / 2**20:,.0f} MiB")
                )
                time.sleep(0.05)
        if spy is not None:
            try:
                for line in profile_summary(spy.stop()):
                    self.say(f"profile: {line}")
            except RuntimeError as exc:
                self.notes.append(str(exc))
        # The drain starts when the first backlog message reaches a worker (receipt time).
        first_rx = self._first_receipt(tag_report)
        begin = first_rx if first_rx is not None else started
        span = max(1e-6, done - begin)
        drain = DrainResult(
            m,
            min(s.stored, m),
            span,
            min(s.stored, m) / span,
            workers.max_rss / 2**20,
            done - started,
            meter.read() if meter else {},
            *s.batch_stats(zero),
        )
        self.say(
            f"worker drain: {drain.drained:,}/{m:,} in {span:.2f} s = [bold]{drain.rate:,.0f} "
            f"msg/s[/] ({drain.rate * self.dp:,.0f} dp/s; {drain.seconds_from_start:.1f} s from "
            f"process start), RSS max {drain.rss_mib:,.0f} MiB{batch_text(drain)} | "
            f"{cpu_text(drain.cpu)}"
            + (f" | per worker {', '.join(f'{n:,}' for n in s.per_worker)}" if len(s.per_worker) > 1 else "")
        )
        return drain

    def _drain_meter(self, pids: Sequence[int], name: str = "worker") -> CpuMeter:
        groups: dict[str, Sequence[int]] = {name: pids, "broker": [self.broker.pid]}
        if name == "worker":
            with contextlib.suppress(psycopg.Error):
                groups["postgres"] = postgres_pids(self.db_url)
        return CpuMeter(groups)

    def _first_receipt(self, report: PublishReport) -> float | None:
        tag = f"{report.tag}-%"
        with psycopg.connect(self.db_url) as conn:
            row = conn.execute(
                "SELECT extract(epoch FROM min(received_at)) FROM message_receipts WHERE msg_id LIKE %s",
                (tag,),
            ).fetchone()
        return float(row[0]) if row and row[0] is not None else None


def run_ingest_bench(options: BenchOptions, console: Console) -> BenchResult:
    """Run the whole ingest benchmark, printing progress and a summary; returns the figures."""
    for v in options.variants:
        if v not in VARIANTS:
            raise ValueError(f"unknown variant {v!r} (choose from {', '.join(VARIANTS)})")
    started = time.time()
    workdir = Path(tempfile.mkdtemp(prefix="eldercare-bench-"))
    console.rule("eldercare bench ingest")
    cpus = os.cpu_count() or 0
    console.print(
        f"{cpus} CPU(s). Publisher processes, Mosquitto, the worker(s) and PostgreSQL all run "
        "here and compete for them: the publishers' CPU is taken from the worker. Compare the "
        "worker with the bare subscriber measured in this same run (the ratio), not with other "
        "machines."
    )
    variants: list[VariantResult] = []
    notes: list[str] = []
    db_name = None
    machine: dict[str, str] = {}
    broker: BenchBroker | None = None
    try:
        with bench_database(options.admin_url, options.keep) as (db_name, db_url):
            machine = machine_info(db_url)
            console.print(
                f"database {db_name} ({machine.get('store_flavour', '?')} store), "
                f"{machine['mosquitto']}, MQTT {options.protocol} for worker and bare "
                f"subscriber (publishers: 3.1.1), {options.workers} worker(s), "
                f"steps of {options.step_s:g} s, work folder {workdir}"
            )
            for v in options.variants:
                register_fleet(db_url, options.fleet(v))
            broker = BenchBroker(workdir)
            notes.append(
                "broker: ProjectBroker (system mosquitto, the packaged config: "
                f"{', '.join(f'{k} {v}' for k, v in broker.limits.items())}; passwords and ACL on) "
                f"plus one account, {BENCH_USER}, allowed to publish under any device id"
            )
            for v in options.variants:
                run = VariantRun(options, v, console, broker, db_url, workdir)
                variants.append(run.run())
    finally:
        if broker is not None:
            broker.close()
        if not options.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    result = BenchResult(
        options=options,
        machine=machine,
        variants=tuple(variants),
        notes=tuple(notes),
        started_at=started,
        seconds=time.time() - started,
        database=db_name if options.keep else None,
    )
    print_summary(console, result)
    if options.json_path:
        Path(options.json_path).write_text(result.to_json())
    return result

"""``eldercare bench rules``: the ingest bench with the rules off and on, and SOS latency.

One sitting, one database and one broker, a population of elders with care plans whose
vitals breach a threshold of the default rules at a set share (``simulators/population.py``):

1. for each ``ELDERCARE_RULES`` setting in turn (``off``, ``default``, ...): the worker's paced
   steps and its backlog drain, as ``eldercare bench ingest`` runs them (no bare subscriber:
   the rules off are the baseline), then what the rules decided, counted in the store, and the
   share of readings that breached;
2. SOS presses (``emergency.py``) beside telemetry paced at each ``sos_backgrounds`` rate
   (0: an idle worker), with the rules on: publish to alert and outbox row committed.

The ratio rules on / rules off of the drain and of the sustained paced rate is the figure;
the machine is shared, so the load average is printed with each.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

import psycopg
from rich.console import Console
from rich.table import Table

from eldercare.gateway.bench.broker import BenchBroker
from eldercare.gateway.bench.cohort import count_breaches, set_care_plans, write_history
from eldercare.gateway.bench.database import bench_database, count_rows
from eldercare.gateway.bench.emergency import (
    SETTLE_S,
    Presser,
    SosPlan,
    SosResult,
    register_sos_devices,
    sos_devices,
)
from eldercare.gateway.bench.ingest import VariantRun
from eldercare.gateway.bench.machine import machine_info
from eldercare.gateway.bench.options import BenchOptions, StepResult, VariantResult
from eldercare.gateway.bench.profiling import callee_shares
from eldercare.gateway.bench.report import batch_text, cpu_text, fmt_rate, fmt_seconds
from eldercare.gateway.bench.workers import Workers
from eldercare.simulators.population import Population
from eldercare.simulators.publisher import register_fleet

VARIANT = "telemetry"
#: The issue's targets: throughput at most 10 % below rules off; SOS p99 under 20 ms.
TARGET_RATIO = 0.9
TARGET_SOS_P99_S = 0.020
#: What the rules wrote, counted in the store before and after each run.
_DECISIONS = {
    "alerts opened": "SELECT count(*) FROM alerts",
    "outbox rows": "SELECT count(*) FROM alert_outbox",
    "history rows": "SELECT count(*) FROM alert_history",
    "matches (opened + evidence)": "SELECT coalesce(sum(matches), 0) FROM alerts",
    "active NEWS2 alerts": "SELECT count(*) FROM alerts WHERE rule = 'news2' AND closed_at IS NULL",
}


@dataclass(frozen=True)
class RulesOptions:
    """What ``eldercare bench rules`` runs; the defaults are the documented benchmark."""

    bench: BenchOptions = field(
        default_factory=lambda: BenchOptions(
            variants=(VARIANT,),
            rates=(6_000, 8_000, 10_000, 12_000),
            drain_messages=150_000,
            devices=10_000,
            bare=False,
            population=Population(),
        )
    )
    #: ELDERCARE_RULES of each run, in order.
    settings: tuple[str, ...] = ("off", "default")
    #: SOS presses per background rate (0: no emergency phase), and presses per second.
    sos: int = 300
    sos_rate: float = 2.0
    #: Telemetry rates (msg/s) the presses run beside; 0: an idle worker.
    sos_backgrounds: tuple[float, ...] = (0.0, 5_000.0, 10_000.0)
    #: Seconds from the presser's start to its first press (the background gets going).
    sos_lead_s: float = 5.0

    @classmethod
    def quick(cls) -> RulesOptions:
        """A smoke run (about a minute)."""
        bench = replace(
            BenchOptions.quick(),
            variants=(VARIANT,),
            rates=(1_000,),
            # Enough elders that some are always inside an episode's alert (about 28 of them).
            devices=1_000,
            bare=False,
            population=Population(breach_rate=0.03),
        )
        return cls(bench=bench, sos=6, sos_rate=4.0, sos_backgrounds=(500.0,), sos_lead_s=2.0)


@dataclass(frozen=True)
class RulesRun:
    """One ELDERCARE_RULES setting: the ingest figures and what the rules wrote meanwhile."""

    setting: str
    result: VariantResult
    started_at: float
    ended_at: float
    breaching_readings: int
    readings: int
    decisions: dict[str, int]
    load_average: str
    #: --profile: samples of the batch writer threads, of them in the rules' step, by callee.
    profile: dict[str, int] = field(default_factory=dict)

    @property
    def breach_share(self) -> float | None:
        return self.breaching_readings / self.readings if self.readings else None


@dataclass(frozen=True)
class SosRun:
    """SOS presses beside one background rate."""

    background_target: float
    presses: SosResult
    step: StepResult | None
    load_average: str
    #: Background messages the store holds (the step's own count includes the presses).
    background_stored: int = 0


@dataclass(frozen=True)
class RulesResult:
    """Everything ``run_rules_bench`` measured."""

    options: RulesOptions
    machine: dict[str, str]
    care_plans: dict[str, int]
    history_rows: int
    runs: tuple[RulesRun, ...]
    sos: tuple[SosRun, ...]
    seconds: float

    def ratio(self, figure: str) -> float | None:
        """Mean of the rules-on runs' figure over the mean of the rules-off runs' ('drain',
        'sustained'): alternate them (off,default,off,default) on a machine whose load moves."""
        off = [x for r in self.runs if r.setting == "off" and (x := _figure(r, figure))]
        on = [x for r in self.runs if r.setting != "off" and (x := _figure(r, figure))]
        return (sum(on) / len(on)) / (sum(off) / len(off)) if off and on else None

    def to_json(self) -> str:
        data = asdict(self)
        data["ratio_drain"] = self.ratio("drain")
        data["ratio_sustained"] = self.ratio("sustained")
        for s, out in zip(self.sos, data["sos"], strict=True):
            out["quantiles"] = {part: s.presses.quantiles(part) for part in PARTS}
            out["committed"] = len(s.presses.committed)
        return json.dumps(data, indent=2, default=str)


PARTS = ("total", "to_worker", "worker", "commit")


def _figure(run: RulesRun, figure: str) -> float | None:
    if figure == "drain":
        return run.result.worker_drain.rate if run.result.worker_drain else None
    sustained = run.result.sustained
    return sustained.publish_rate if sustained else None


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _counts(db_url: str) -> dict[str, int]:
    return {name: count_rows(db_url, sql) for name, sql in _DECISIONS.items()}


def run_setting(
    o: RulesOptions, setting: str, console: Console, broker: BenchBroker, db_url: str, workdir: Path, k: int
) -> RulesRun:
    """The ingest phases with ELDERCARE_RULES=setting, and what the rules wrote meanwhile."""
    bench = replace(
        o.bench,
        worker_env=(*o.bench.worker_env, ("ELDERCARE_RULES", setting)),
        profile_prefix=f"{o.bench.profile_prefix}-{k}-{setting}" if o.bench.profile_prefix else None,
    )
    console.rule(f"ELDERCARE_RULES={setting} — load average {load_average()}")
    before = _counts(db_url)
    started = time.time()
    result = VariantRun(bench, VARIANT, console, broker, db_url, workdir, tag_prefix=f"r{k}").run()
    ended = time.time()
    after = _counts(db_url)
    with psycopg.connect(db_url) as conn:
        breaching, readings = count_breaches(conn, bench.fleet(VARIANT), started, ended)
    decisions = {name: after[name] - before[name] for name in after}
    decisions["active NEWS2 alerts"] = after["active NEWS2 alerts"]
    profile: dict[str, int] = {}
    if bench.profile_prefix:
        out = Path(f"{bench.profile_prefix}-{VARIANT}.txt")
        if out.exists():
            total, inside, by = callee_shares(out.read_text(), "store/writer.py", "ingest/alerting.py")
            profile = {"batch writer": total, "rules step": inside, **by}
    return RulesRun(setting, result, started, ended, breaching, readings, decisions, load_average(), profile)


def run_sos(
    o: RulesOptions, console: Console, broker: BenchBroker, db_url: str, workdir: Path
) -> list[SosRun]:
    """SOS presses beside each background rate, the rules on (a worker of its own)."""
    bench = replace(
        o.bench, worker_env=(*o.bench.worker_env, ("ELDERCARE_RULES", "default")), profile_prefix=None
    )
    runner = VariantRun(bench, VARIANT, console, broker, db_url, workdir, tag_prefix="ew")
    workers = Workers(bench, db_url, broker.url, workdir, broker.worker_env)
    out: list[SosRun] = []
    console.rule(f"SOS presses, ELDERCARE_RULES=default — load average {load_average()}")
    try:
        workers.start()
        runner.warm_up(workers)
        for k, background in enumerate(o.sos_backgrounds):
            plan = SosPlan(
                broker.publisher_url,
                db_url,
                tuple(sos_devices(o.sos, offset=k * o.sos)),
                rate=o.sos_rate,
                lead_s=o.sos_lead_s,
                tag=f"sos{k}-{int(time.time())}",
            )
            presser = Presser(plan)
            step = None
            stored = 0
            if background > 0:
                # The step's publishers start a second or two after the presser: its lead
                # covers that, and the step runs on past the last press.
                tag = f"e{k}"
                paced = VariantRun(
                    replace(bench, step_s=plan.seconds + 3.0), VARIANT, console, broker, db_url, workdir, tag
                )
                step = paced.step("worker", workers, background, f"beside {o.sos} SOS presses")
                stored = count_rows(
                    db_url, f"SELECT count(*) FROM message_receipts WHERE msg_id LIKE '{tag}t%'"
                )
            result = presser.result(f"{background:,.0f} msg/s")
            run = SosRun(background, result, step, load_average(), stored)
            _say_sos(console, run)
            out.append(run)
    finally:
        workers.stop()
        workers.clear_sessions()
    return out


def _say_sos(console: Console, run: SosRun) -> None:
    r = run.presses
    q = r.quantiles()
    parts = ", ".join(
        f"{part} p50/p99 {fmt_seconds(x.get('p50'))}/{fmt_seconds(x.get('p99'))}"
        for part in PARTS[1:]
        if (x := r.quantiles(part))
    )
    console.print(
        f"[bold cyan]SOS[/] beside {run.background_target:,.0f} msg/s: {len(r.committed)}/{len(r.presses)} "
        f"committed, publish→commit p50 {fmt_seconds(q.get('p50'))}, p90 {fmt_seconds(q.get('p90'))}, "
        f"p99 {fmt_seconds(q.get('p99'))}, max {fmt_seconds(q.get('max'))} ({parts})"
        f" | load {run.load_average}" + (f" | [red]{r.error}[/]" if r.error else "")
    )


def run_rules_bench(o: RulesOptions, console: Console) -> RulesResult:
    """Run every setting and the SOS phase on one database and broker; print and return the figures."""
    started = time.time()
    workdir = Path(tempfile.mkdtemp(prefix="eldercare-bench-rules-"))
    population = o.bench.population or Population()
    bench = replace(o.bench, population=population)
    o = replace(o, bench=bench)
    fleet = bench.fleet(VARIANT)
    runs: list[RulesRun] = []
    sos: list[SosRun] = []
    broker: BenchBroker | None = None
    console.rule("eldercare bench rules")
    try:
        with bench_database(bench.admin_url, bench.keep) as (db_name, db_url):
            machine = machine_info(db_url)
            register_fleet(db_url, fleet)
            with psycopg.connect(db_url) as conn:
                plans = set_care_plans(conn, fleet, population)
                history = write_history(conn, fleet, population)
                register_sos_devices(conn, o.sos * len(o.sos_backgrounds))
            console.print(
                f"database {db_name}, {bench.devices:,} wristbands, care plans {plans}, "
                f"{history:,} readings of history; breach rate {population.breach_rate:.2%} of readings "
                f"({population.breaching_messages:.1%} of messages: {population.spike_rate:.1%} spikes, "
                f"{population.episodic_share:.1%} of devices with episodes), seed {population.seed}; "
                f"load average {load_average()}"
            )
            broker = BenchBroker(workdir)
            for k, setting in enumerate(o.settings):
                runs.append(run_setting(o, setting, console, broker, db_url, workdir, k))
            if o.sos and o.sos_backgrounds:
                sos = run_sos(o, console, broker, db_url, workdir)
    finally:
        if broker is not None:
            broker.close()
        if not bench.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    result = RulesResult(o, machine, plans, history, tuple(runs), tuple(sos), time.time() - started)
    print_summary(console, result)
    if bench.json_path:
        Path(bench.json_path).write_text(result.to_json())
    return result


def print_summary(console: Console, result: RulesResult) -> None:
    """The rules-off / rules-on table, the ratios against the targets, and the SOS table."""
    table = Table(title=f"rules off / on — {result.options.bench.devices:,} wristbands, one worker")
    table.add_column("measure")
    for r in result.runs:
        table.add_column(f"ELDERCARE_RULES={r.setting}", justify="right")
    runs = result.runs

    def row(name: str, cell: Callable[[RulesRun], str]) -> None:
        table.add_row(name, *(cell(r) for r in runs))

    rates = sorted({s.target_rate for r in runs for s in r.result.worker_steps})
    for rate in rates:

        def step_cell(r: RulesRun, rate: float = rate) -> str:
            s = next((s for s in r.result.worker_steps if s.target_rate == rate), None)
            if s is None:
                return "—"
            mark = "pass" if s.passed else "FAIL"
            return (
                f"{mark} {fmt_rate(s.publish_rate)}/s, lag p50/p99 {fmt_seconds(s.lag_p50_s)}/"
                f"{fmt_seconds(s.lag_p99_s)}, commit p99 {fmt_seconds(s.commit_p99_s)}, "
                f"worker {s.cpu.get('worker', 0):.0f}% pg {s.cpu.get('postgres', 0):.0f}%"
            )

        row(f"step {rate:,.0f} msg/s", step_cell)
    row("sustained, zero loss: msg/s", lambda r: fmt_rate(x) if (x := _figure(r, "sustained")) else "none")
    row("drain: msg/s", lambda r: fmt_rate(_figure(r, "drain")))
    row(
        "  drain batches",
        lambda r: batch_text(r.result.worker_drain).lstrip(", ") if r.result.worker_drain else "—",
    )
    row("  drain CPU", lambda r: cpu_text(r.result.worker_drain.cpu) if r.result.worker_drain else "—")
    row(
        "breaching readings (store)",
        lambda r: f"{r.breaching_readings:,}/{r.readings:,} = {s:.2%}" if (s := r.breach_share) else "—",
    )
    for name in _DECISIONS:
        row(name, partial(_decision_cell, name))
    row(
        "stored exactly once (db)",
        lambda r: (
            f"{'yes' if r.result.lossless else 'NO'}: "
            f"{r.result.receipts_found:,}/{r.result.receipts_expected:,}"
        ),
    )
    row("load average after", lambda r: r.load_average)
    if any(r.profile for r in runs):
        row("profile: writer threads in the rules step", _profile_share)
    console.print(table)
    for figure, what in (("drain", "drain"), ("sustained", "sustained paced rate")):
        ratio = result.ratio(figure)
        met = ratio is not None and ratio >= TARGET_RATIO
        console.print(
            f"rules on / off, {what}: {'—' if ratio is None else f'{ratio:.2f}'} "
            f"(target ≥ {TARGET_RATIO}: {'[green]met[/]' if met else '[red]missed[/]'})"
        )
    for r in runs:
        if r.profile.get("rules step", 0) > r.profile.get("batch writer", 0) / 100:
            top = sorted(
                ((k, v) for k, v in r.profile.items() if k not in ("batch writer", "rules step")),
                key=lambda kv: -kv[1],
            )
            inside = r.profile.get("rules step", 0) or 1
            console.print(
                f"profile ({r.setting}), the rules step by callee: "
                + ", ".join(f"{k} {v / inside:.0%}" for k, v in top[:10])
            )
    for r in runs:
        for note in r.result.notes:
            console.print(f"[yellow]{r.setting}:[/] {note}")
    if result.sos:
        _print_sos(console, result)
    m = result.machine
    console.print(
        f"machine: {m.get('cpus')} × {m.get('cpu_model')}, PostgreSQL {m.get('postgresql', '?')}, "
        f"{m.get('mosquitto')}, code {m.get('code')}; load average at start {m.get('load_average')}, "
        f"at end {load_average()}; run took {result.seconds:.0f} s"
    )


def _decision_cell(name: str, r: RulesRun) -> str:
    return f"{r.decisions.get(name, 0):,}"


def _quantile_cell(q: str, s: SosRun) -> str:
    return fmt_seconds(s.presses.quantiles().get(q))


def _profile_share(r: RulesRun) -> str:
    total, inside = r.profile.get("batch writer", 0), r.profile.get("rules step", 0)
    return f"{inside / total:.0%} of {total:,} samples" if total else "—"


def _print_sos(console: Console, result: RulesResult) -> None:
    table = Table(title="SOS press → its alert and outbox row committed (rules on)")
    table.add_column("measure")
    for s in result.sos:
        table.add_column(f"beside {s.background_target:,.0f} msg/s", justify="right")

    def row(name: str, cell: Callable[[SosRun], str]) -> None:
        table.add_row(name, *(cell(s) for s in result.sos))

    def part(s: SosRun, name: str) -> str:
        x = s.presses.quantiles(name)
        return f"{fmt_seconds(x.get('p50'))} / {fmt_seconds(x.get('p99'))}" if x else "—"

    row(
        f"presses committed (never: not within {SETTLE_S:.0f} s of the last)",
        lambda s: f"{len(s.presses.committed)}/{len(s.presses.presses)}",
    )
    for q in ("p50", "p90", "p99", "max"):
        row(f"publish → committed {q}", partial(_quantile_cell, q))
    row("  publish → worker p50 / p99", lambda s: part(s, "to_worker"))
    row("  worker → decided p50 / p99", lambda s: part(s, "worker"))
    row("  decided → committed p50 / p99", lambda s: part(s, "commit"))
    row(
        "background published",
        lambda s: f"{fmt_rate(s.step.publish_rate)} msg/s, {s.step.verdict}" if s.step else "idle",
    )
    row(
        "  stored / lag p50 / p99",
        lambda s: (
            f"{s.background_stored:,}/{s.step.published:,}, "
            f"{fmt_seconds(s.step.lag_p50_s)} / {fmt_seconds(s.step.lag_p99_s)}"
            if s.step
            else "—"
        ),
    )
    row("  CPU", lambda s: cpu_text(s.step.cpu) if s.step else "—")
    row("load average after", lambda s: s.load_average)
    console.print(table)
    for s in result.sos:
        p99 = s.presses.quantiles().get("p99")
        met = (
            p99 is not None and p99 < TARGET_SOS_P99_S and len(s.presses.committed) == len(s.presses.presses)
        )
        console.print(
            f"SOS beside {s.background_target:,.0f} msg/s: p99 {fmt_seconds(p99)} "
            f"(target < {fmt_seconds(TARGET_SOS_P99_S)}: {'[green]met[/]' if met else '[red]missed[/]'})"
        )

"""``eldercare bench alerts``: emergency latency to the first hotline request, and dispatch throughput.

One sitting, one database and one broker (as ``bench rules``), with the whole alert path
running: the ingest worker with the rules on, the simulated hotlines (``hotlines.py``), one
dispatcher and the API that takes the hotlines' acknowledgements (``dispatching.py``).

1. Latency: presses (``emergency.py``) published beside telemetry paced at each background
   rate, two kinds taking turns: an SOS (rule ``sos``, route ``operator_first``: the 12349
   operator first) and a glucose reading in the catalog's emergency band (rule
   ``hypoglycaemia_severe``, route ``emergency``: 120 first). Each press is followed to the
   first request its alert's first hotline received (matched on the device id in the
   document), split into publish → alert committed (the presser's LISTEN), → the
   dispatcher's claim (``dispatches.created_at``), → its send (first attempt's start),
   → the request received (the hotline's clock; one machine, one clock).
2. Throughput (``throughput.py``): a backlog of emergency alerts written into the outbox,
   delivered to 120 and the family contacts with the hotlines answering at once, then again
   with 120 answering 500 for the first seconds.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

import psycopg
from rich.console import Console
from rich.table import Table

from eldercare.alerts.rules import Severity, load_rule_set
from eldercare.gateway.bench.broker import BenchBroker
from eldercare.gateway.bench.cohort import set_care_plans, write_history
from eldercare.gateway.bench.database import bench_database, count_rows
from eldercare.gateway.bench.dispatching import DispatchRoles
from eldercare.gateway.bench.emergency import (
    SETTLE_S,
    SEVERE_HYPOGLYCAEMIA,
    SOS,
    EmergencyKind,
    Press,
    Presser,
    SosPlan,
    SosResult,
    quantile,
    register_sos_devices,
    sos_devices,
)
from eldercare.gateway.bench.hotlines import BenchHotlines
from eldercare.gateway.bench.ingest import VariantRun
from eldercare.gateway.bench.machine import machine_info
from eldercare.gateway.bench.options import BenchOptions, StepResult
from eldercare.gateway.bench.report import cpu_text, fmt_rate, fmt_seconds
from eldercare.gateway.bench.rules import load_average
from eldercare.gateway.bench.throughput import ROUTE, ThroughputPlan, ThroughputRun, run_throughput
from eldercare.gateway.bench.workers import Workers
from eldercare.simulators.hotlines import GATEWAY_CHANNELS
from eldercare.simulators.population import Population
from eldercare.simulators.publisher import register_fleet

VARIANT = "telemetry"
#: The issue's target: publish → first hotline request, p99 under 50 ms beside 10k msg/s.
TARGET_P99_S = 0.050
#: The presses, taking turns: an SOS (12349 first) and an emergency-band reading (120 first).
KINDS: tuple[EmergencyKind, ...] = (SOS, SEVERE_HYPOGLYCAEMIA)
#: After the presses committed, wait this long at most for their requests at the hotlines.
REACH_S = 30.0
#: Seconds from the pressers' start to the first press, beyond the lead (spawning them).
SPAWN_S = 1.5
#: The latency's parts, in order; "total" is publish → first hotline request.
PARTS = ("total", "commit", "claim", "send", "request")


@dataclass(frozen=True)
class AlertsOptions:
    """What ``eldercare bench alerts`` runs; the defaults are the documented benchmark."""

    bench: BenchOptions = field(
        default_factory=lambda: BenchOptions(
            variants=(VARIANT,), devices=10_000, bare=False, population=Population()
        )
    )
    #: Presses of each kind per background rate, and presses of each kind per second.
    presses: int = 200
    press_rate: float = 2.0
    #: Telemetry rates (msg/s) the presses run beside; 0: an idle worker.
    backgrounds: tuple[float, ...] = (0.0, 5_000.0, 10_000.0)
    #: Seconds from the pressers' start to the first press (the background gets going).
    lead_s: float = 5.0
    #: Throughput: alerts in the backlog (each a dispatch to 120 and one to the family),
    #: written this many per transaction; 120 answers 500 for this long in the second run.
    throughput_alerts: int = 2_000
    outbox_batch: int = 50
    outage_s: float = 5.0
    #: Seconds before each simulated hotline acknowledges what it accepted.
    ack_delay_s: float = 1.0

    @classmethod
    def quick(cls) -> AlertsOptions:
        """A smoke run (well under a minute)."""
        bench = replace(
            BenchOptions.quick(), variants=(VARIANT,), devices=1_000, bare=False, population=Population()
        )
        return cls(
            bench=bench,
            presses=4,
            press_rate=4.0,
            backgrounds=(500.0,),
            lead_s=0.5,
            throughput_alerts=100,
            outage_s=1.0,
            ack_delay_s=0.5,
        )


@dataclass(frozen=True)
class Reached:
    """One press followed to its alert's first hotline (epoch seconds; None: never seen)."""

    press: Press
    #: The dispatcher made the dispatch (its claim pass began), began sending, and the
    #: hotline received the first request.
    claimed_at: float | None
    sent_at: float | None
    requested_at: float | None

    def part(self, name: str) -> float | None:
        """One part of the latency (seconds): total, commit, claim, send, request."""
        p = self.press
        points = (p.published_at, p.committed_by, self.claimed_at, self.sent_at, self.requested_at)
        if name == "total":
            return None if self.requested_at is None else self.requested_at - p.published_at
        i = PARTS.index(name)
        before, after = points[i - 1], points[i]
        return None if before is None or after is None else after - before


@dataclass(frozen=True)
class KindRun:
    """The presses of one kind beside one background, followed to the hotline."""

    kind: str
    rule: str
    route: str
    #: The channel of the route's first step whose first request is timed.
    channel: str
    reached: tuple[Reached, ...]
    error: str | None = None

    def quantiles(self, part: str = "total") -> dict[str, float]:
        """p50, p90, p99 and max (seconds) of one part; in the total, a press that never
        reached the hotline counts as ``inf``, the parts count the presses seen through."""
        values = sorted(v for r in self.reached if (v := r.part(part)) is not None)
        if part == "total":
            values += [float("inf")] * sum(r.requested_at is None for r in self.reached)
        if not values:
            return {}
        return {q: quantile(values, x) for q, x in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))} | {
            "max": values[-1]
        }

    @property
    def requested(self) -> int:
        return sum(r.requested_at is not None for r in self.reached)


@dataclass(frozen=True)
class BackgroundRun:
    """Every kind's presses beside one background rate."""

    background_target: float
    kinds: tuple[KindRun, ...]
    step: StepResult | None
    load_average: str
    background_stored: int = 0


@dataclass(frozen=True)
class AlertsResult:
    """Everything ``run_alerts_bench`` measured."""

    options: AlertsOptions
    machine: dict[str, str]
    latency: tuple[BackgroundRun, ...]
    throughput: tuple[ThroughputRun, ...]
    seconds: float

    def to_json(self) -> str:
        data = asdict(self)
        for run, out in zip(self.latency, data["latency"], strict=True):
            for kind, kout in zip(run.kinds, out["kinds"], strict=True):
                kout["quantiles"] = {part: kind.quantiles(part) for part in PARTS}
                kout["requested"] = kind.requested
        for t, out in zip(self.throughput, data["throughput"], strict=True):
            out["rate"] = t.rate
        return json.dumps(data, indent=2, default=str)


def first_channel(kind: EmergencyKind) -> tuple[str, str]:
    """(route, first channel) of the kind's alert, as the default rules route an emergency."""
    rules = load_rule_set()
    route = rules.route_for(kind.rule, Severity.emergency)
    return route, rules.routes[route].steps[0].notify[0]


# ---- latency ------------------------------------------------------------------------------


def run_latency(
    o: AlertsOptions,
    console: Console,
    broker: BenchBroker,
    hotlines: BenchHotlines,
    db_url: str,
    workdir: Path,
) -> list[BackgroundRun]:
    """Presses beside each background rate, the rules on, followed to their first hotline."""
    bench = replace(
        o.bench, worker_env=(*o.bench.worker_env, ("ELDERCARE_RULES", "default")), profile_prefix=None
    )
    runner = VariantRun(bench, VARIANT, console, broker, db_url, workdir, tag_prefix="aw")
    workers = Workers(bench, db_url, broker.url, workdir, broker.worker_env)
    routes = {kind.name: first_channel(kind) for kind in KINDS}
    out: list[BackgroundRun] = []
    try:
        workers.start()
        runner.warm_up(workers)
        for k, background in enumerate(o.backgrounds):
            console.rule(f"presses beside {background:,.0f} msg/s — load average {load_average()}")
            plans = _plans(o, broker, db_url, k)
            pressers: list[Presser] = []
            try:
                for plan in plans:
                    pressers.append(Presser(plan))
            except BaseException:
                for p in pressers:
                    p.close()
                raise
            step = None
            stored = 0
            if background > 0:
                tag = f"a{k}"
                step_s = max(p.seconds for p in plans) + 3.0
                paced = VariantRun(
                    replace(bench, step_s=step_s), VARIANT, console, broker, db_url, workdir, tag
                )
                step = paced.step("worker", workers, background, f"beside {o.presses} presses of each kind")
                stored = count_rows(
                    db_url, f"SELECT count(*) FROM message_receipts WHERE msg_id LIKE '{tag}t%'"
                )
            label = f"{background:,.0f} msg/s"
            results = [p.result(label) for p in pressers]
            kinds = tuple(
                _follow(db_url, hotlines, kind, *routes[kind.name], result)
                for kind, result in zip(KINDS, results, strict=True)
            )
            run = BackgroundRun(background, kinds, step, load_average(), stored)
            for kind_run in kinds:
                _say_kind(console, run, kind_run)
            out.append(run)
    finally:
        workers.stop()
        workers.clear_sessions()
    return out


def _plans(o: AlertsOptions, broker: BenchBroker, db_url: str, k: int) -> list[SosPlan]:
    """One presser per kind, their presses taking turns (evenly apart)."""
    start = time.time() + SPAWN_S + o.lead_s
    apart = 1.0 / (len(KINDS) * o.press_rate)
    return [
        SosPlan(
            broker.publisher_url,
            db_url,
            tuple(sos_devices(o.presses, offset=k * o.presses, kind=kind)),
            rate=o.press_rate,
            lead_s=SPAWN_S + o.lead_s + j * apart,
            tag=f"{kind.name}{k}-{int(time.time())}",
            kind=kind,
            start_at=start + j * apart,
        )
        for j, kind in enumerate(KINDS)
    ]


_DISPATCH_TIMES = """
SELECT a.elder_id, extract(epoch FROM d.created_at)::float8, extract(epoch FROM t.started_at)::float8
FROM alerts a
JOIN dispatches d ON d.alert_id = a.id AND d.step = 0 AND d.channel = %s
LEFT JOIN dispatch_attempts t ON t.dispatch_id = d.id AND t.number = 1
WHERE a.elder_id = ANY(%s) AND a.rule = %s
"""


def _follow(
    db_url: str, hotlines: BenchHotlines, kind: EmergencyKind, route: str, channel: str, result: SosResult
) -> KindRun:
    """Each press's dispatch times (store) and first request at the hotline (simulator)."""
    presses = result.presses
    committed = {p.device_id for p in result.committed}
    hotline = GATEWAY_CHANNELS[channel][1]
    deadline = time.monotonic() + REACH_S
    while True:
        first_at: dict[str, float] = {}
        for r in hotlines.received(hotline):
            device = ((r.get("document") or {}).get("device") or {}).get("id")
            if device in committed or device in first_at:
                first_at[device] = min(first_at.get(device, r["at"]), r["at"])
        with psycopg.connect(db_url) as conn:
            rows = conn.execute(
                _DISPATCH_TIMES, (channel, [p.elder_id for p in presses], kind.rule)
            ).fetchall()
        times = {elder: (claimed, sent) for elder, claimed, sent in rows}
        sent = sum(times.get(p.elder_id, (None, None))[1] is not None for p in presses)
        if (len(first_at) >= len(committed) and sent >= len(committed)) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    reached = tuple(
        Reached(p, *times.get(p.elder_id, (None, None)), first_at.get(p.device_id)) for p in presses
    )
    return KindRun(kind.name, kind.rule, route, channel, reached, result.error)


def _say_kind(console: Console, run: BackgroundRun, k: KindRun) -> None:
    q = k.quantiles()
    parts = ", ".join(
        f"{part} p50/p99 {fmt_seconds(x.get('p50'))}/{fmt_seconds(x.get('p99'))}"
        for part in PARTS[1:]
        if (x := k.quantiles(part))
    )
    console.print(
        f"[bold cyan]{k.rule}[/] beside {run.background_target:,.0f} msg/s: {k.requested}/{len(k.reached)} "
        f"reached {k.channel} (route {k.route}), publish→request p50 {fmt_seconds(q.get('p50'))}, "
        f"p90 {fmt_seconds(q.get('p90'))}, p99 {fmt_seconds(q.get('p99'))}, max {fmt_seconds(q.get('max'))} "
        f"({parts}) | load {run.load_average}" + (f" | [red]{k.error}[/]" if k.error else "")
    )


# ---- the sitting ----------------------------------------------------------------------------


def run_alerts_bench(o: AlertsOptions, console: Console) -> AlertsResult:
    """Set everything up, run the latency and throughput phases; print and return the figures."""
    started = time.time()
    workdir = Path(tempfile.mkdtemp(prefix="eldercare-bench-alerts-"))
    population = o.bench.population or Population()
    o = replace(o, bench=replace(o.bench, population=population))
    fleet = o.bench.fleet(VARIANT)
    latency: list[BackgroundRun] = []
    throughput: list[ThroughputRun] = []
    machine: dict[str, str] = {}
    console.rule("eldercare bench alerts")
    console.print(f"work folder {workdir} (logs of the hotlines, the dispatcher, the API and the workers)")
    with contextlib.ExitStack() as stack:
        if not o.bench.keep:
            stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        db_name, db_url = stack.enter_context(bench_database(o.bench.admin_url, o.bench.keep))
        machine = machine_info(db_url)
        register_fleet(db_url, fleet)
        with psycopg.connect(db_url) as conn:
            plans = set_care_plans(conn, fleet, population)
            history = write_history(conn, fleet, population)
            for kind in KINDS:
                register_sos_devices(conn, o.presses * len(o.backgrounds), kind)
        console.print(
            f"database {db_name}, {o.bench.devices:,} wristbands, care plans {plans}, {history:,} readings "
            f"of history, breach rate {population.breach_rate:.2%}; load average {load_average()}"
        )
        broker = BenchBroker(workdir)
        stack.callback(broker.close)
        hotlines = BenchHotlines(workdir, o.ack_delay_s)
        stack.callback(hotlines.close)
        console.print(
            f"simulated hotlines (pid {hotlines.pid}): control {hotlines.control_url}, "
            + ", ".join(f"{c} → {hotlines.url(h)}" for c, (_, h) in GATEWAY_CHANNELS.items())
        )
        roles = DispatchRoles(db_url, workdir, hotlines.channels_toml(), hotlines.secrets_env())
        stack.callback(roles.close)
        console.print(
            f"dispatcher (pid {roles.dispatcher.pid}, log {roles.dispatcher_log}), "
            f"API for the acknowledgements at {roles.api_url} (pid {roles.api.pid}); "
            f"hotlines acknowledge {o.ack_delay_s:g} s after each dispatch"
        )
        for kind in KINDS:
            route, channel = first_channel(kind)
            console.print(f"{kind.rule}: route {route}, first request timed at {channel}")
        if o.presses and o.backgrounds:
            latency = run_latency(o, console, broker, hotlines, db_url, workdir)
        if o.throughput_alerts:
            throughput = _run_throughput(o, console, hotlines, roles, db_url)
    result = AlertsResult(o, machine, tuple(latency), tuple(throughput), time.time() - started)
    print_summary(console, result)
    if o.bench.json_path:
        Path(o.bench.json_path).write_text(result.to_json())
    return result


def _run_throughput(
    o: AlertsOptions, console: Console, hotlines: BenchHotlines, roles: DispatchRoles, db_url: str
) -> list[ThroughputRun]:
    rules = load_rule_set()
    step = rules.routes[ROUTE].steps[0]
    per_alert = sum(c in GATEWAY_CHANNELS for c in step.notify)
    groups: dict[str, Sequence[int]] = {
        "dispatcher": [roles.dispatcher.pid],
        "api": [roles.api.pid],
        "hotlines": [hotlines.pid],
    }
    # No acknowledgements here: with hundreds in flight at once the simulator's ack client
    # (httpcore's connection pool, quadratic in the requests waiting) takes its core, and the
    # hotlines stop answering within the dispatcher's timeout. The throughput is the dispatcher's.
    for hotline in hotlines.hotlines:
        hotlines.set_acks(hotline, [])
    console.print("the simulated hotlines acknowledge nothing from here on: the dispatcher's throughput")
    plans = [ThroughputPlan(o.throughput_alerts, o.outbox_batch, tag="thr0")]
    if o.outage_s > 0:
        plans.append(ThroughputPlan(o.throughput_alerts, o.outbox_batch, "120", o.outage_s, tag="thr1"))
    out = []
    for plan in plans:
        console.rule(
            f"throughput: {plan.alerts:,} emergency alerts, {plan.label} — load average {load_average()}"
        )
        run = run_throughput(db_url, plan, per_alert, groups, hotlines.set_mode, console)
        console.print(
            f"[bold cyan]throughput[/], {plan.label}: {run.delivered:,}/{run.dispatches:,} dispatches "
            f"delivered in {run.seconds:.2f} s = [bold]{run.rate:,.0f}/s[/] ({run.attempts:,} attempts; "
            f"outbox written in {run.written_s:.2f} s); outbox → delivered p50 "
            f"{fmt_seconds(run.latency.get('p50'))}, p99 {fmt_seconds(run.latency.get('p99'))}"
            f" | {_cpu(run.cpu)} | load {load_average()}"
        )
        out.append(run)
    return out


def _cpu(cpu: dict[str, float]) -> str:
    keys = ("dispatcher", "api", "hotlines", "postgres", "rest")
    parts = [f"{k} {cpu[k]:.0f}%" for k in keys if k in cpu]
    return "CPU " + ", ".join(parts) if parts else "CPU: too short to measure"


# ---- the report -----------------------------------------------------------------------------


def print_summary(console: Console, result: AlertsResult) -> None:
    """A latency table per kind, the throughput table, the target and the machine."""
    runs = result.latency
    for i in range(len(KINDS) if runs else 0):
        _print_kind(console, runs, i)
    for r in runs:
        for k in r.kinds:
            p99 = k.quantiles().get("p99")
            met = p99 is not None and p99 < TARGET_P99_S and k.requested == len(k.reached)
            console.print(
                f"{k.rule} → {k.channel} beside {r.background_target:,.0f} msg/s: p99 {fmt_seconds(p99)} "
                f"(target < {fmt_seconds(TARGET_P99_S)}: {'[green]met[/]' if met else '[red]missed[/]'})"
            )
    if result.throughput:
        table = Table(title="dispatch throughput — emergency alerts (120 + family), one dispatcher")
        table.add_column("measure")
        for t in result.throughput:
            table.add_column(t.plan.label, justify="right")

        def trow(name: str, cell: Callable[[ThroughputRun], str]) -> None:
            table.add_row(name, *(cell(t) for t in result.throughput))

        trow("alerts / dispatches", lambda t: f"{t.plan.alerts:,} / {t.dispatches:,}")
        trow("delivered", lambda t: f"{t.delivered:,} ({_by_channel(t)})")
        trow("dispatches/s delivered", lambda t: f"{t.rate:,.0f}")
        trow("seconds, first outbox commit → last delivery", lambda t: f"{t.seconds:.2f}")
        trow("outbox written in", lambda t: f"{t.written_s:.2f} s ({t.plan.batch} alerts per transaction)")
        trow("attempts", lambda t: f"{t.attempts:,}")
        trow("acknowledged by the hotlines", lambda t: f"{t.acknowledged:,}")
        for q in ("p50", "p99", "max"):
            trow(f"outbox → delivered {q}", partial(_latency_cell, q))
        trow("CPU", lambda t: _cpu(t.cpu))
        console.print(table)
    m = result.machine
    console.print(
        f"machine: {m.get('cpus')} × {m.get('cpu_model')}, PostgreSQL {m.get('postgresql', '?')}, "
        f"{m.get('mosquitto')}, code {m.get('code')}; load average at start {m.get('load_average')}, "
        f"at end {load_average()}; run took {result.seconds:.0f} s"
    )


def _print_kind(console: Console, runs: Sequence[BackgroundRun], i: int) -> None:
    """The latency table of the i-th kind: one column per background rate."""
    kind, sample = KINDS[i], runs[0].kinds[i]
    table = Table(
        title=f"{kind.rule} ({kind.device_type}, {kind.topic}) → first request at {sample.channel} "
        f"(route {sample.route})"
    )
    table.add_column("measure")
    for r in runs:
        table.add_column(f"beside {r.background_target:,.0f} msg/s", justify="right")

    def row(name: str, cell: Callable[[KindRun, BackgroundRun], str]) -> None:
        table.add_row(name, *(cell(r.kinds[i], r) for r in runs))

    row(
        f"reached the hotline (never: not within {SETTLE_S + REACH_S:.0f} s)",
        lambda k, _: f"{k.requested}/{len(k.reached)}",
    )
    for q in ("p50", "p90", "p99", "max"):
        row(f"publish → first request {q}", partial(_quantile_cell, q))
    for part, what in (
        ("commit", "publish → alert committed"),
        ("claim", "committed → dispatcher's claim"),
        ("send", "claim → send started"),
        ("request", "send → request received"),
    ):
        row(f"  {what} p50 / p99", partial(_part_cell, part))
    row("background published", _background_cell)
    row("  lag p50 / p99", _lag_cell)
    row("  CPU", lambda _, r: cpu_text(r.step.cpu) if r.step else "—")
    row("load average after", lambda _, r: r.load_average)
    console.print(table)


def _background_cell(_: KindRun, r: BackgroundRun) -> str:
    return f"{fmt_rate(r.step.publish_rate)} msg/s, {r.step.verdict}" if r.step else "idle"


def _lag_cell(_: KindRun, r: BackgroundRun) -> str:
    return f"{fmt_seconds(r.step.lag_p50_s)} / {fmt_seconds(r.step.lag_p99_s)}" if r.step else "—"


def _latency_cell(q: str, t: ThroughputRun) -> str:
    return fmt_seconds(t.latency.get(q))


def _by_channel(t: ThroughputRun) -> str:
    return ", ".join(f"{c} {n:,}" for c, n in sorted(t.delivered_by_channel.items()))


def _quantile_cell(q: str, k: KindRun, _: BackgroundRun) -> str:
    return fmt_seconds(k.quantiles().get(q))


def _part_cell(part: str, k: KindRun, _: BackgroundRun) -> str:
    x = k.quantiles(part)
    return f"{fmt_seconds(x.get('p50'))} / {fmt_seconds(x.get('p99'))}" if x else "—"


__all__ = ["AlertsOptions", "AlertsResult", "run_alerts_bench"]

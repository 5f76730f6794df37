"""How the bench prints its figures: per step, per drain, and the final table."""

from __future__ import annotations

import math
import os
from collections.abc import Callable

from rich.console import Console
from rich.table import Table

from eldercare.gateway.bench.options import (
    TARGET_DATAPOINTS_S,
    TARGET_DRAIN_RATIO,
    BenchResult,
    DrainResult,
    StepResult,
    VariantResult,
)


def fmt_rate(x: float | None) -> str:
    """A rate as ``12,345`` (``—`` for none)."""
    return "—" if x is None else f"{x:,.0f}"


def fmt_seconds(x: float | None) -> str:
    """A duration in ms below 10 s, else in s (``—`` for none, ``never`` for infinity)."""
    if x is None:
        return "—"
    if math.isinf(x):
        return "never"
    return f"{x * 1000:,.0f} ms" if x < 10 else f"{x:,.1f} s"


def cpu_text(cpu: dict[str, float]) -> str:
    """A CpuMeter reading as one line, per group and for the whole machine."""
    keys = ("worker", "postgres", "broker", "publishers", "bare", "bench", "rest")
    if not cpu:
        return "CPU: too short to measure"
    parts = [f"{k} {cpu[k]:.0f}%" for k in keys if k in cpu]
    if "machine" in cpu:
        parts.append(f"machine {cpu['machine']:.0f}% of {100 * (os.cpu_count() or 1)}%")
    return "CPU " + ", ".join(parts)


def batch_text(r: StepResult | DrainResult) -> str:
    """The workers' batch size and commit times, or nothing (bare subscribers)."""
    if r.batch_mean is None:
        return ""
    return (
        f", batches of {r.batch_mean:,.0f} msgs committed in p50/p99 "
        f"{fmt_seconds(r.commit_p50_s)}/{fmt_seconds(r.commit_p99_s)}"
    )


def print_summary(console: Console, result: BenchResult) -> None:
    """The final table: one column per variant."""
    o = result.options
    table = Table(title=f"ingest benchmark — {o.workers} worker(s), MQTT {o.protocol}")
    table.add_column("measure")
    for v in result.variants:
        table.add_column(f"{v.variant} ({v.datapoints_per_message} dp/msg)", justify="right")

    def row(name: str, fn: Callable[[VariantResult], str]) -> None:
        table.add_row(name, *(fn(v) for v in result.variants))

    def sus(v: VariantResult) -> StepResult | None:
        return v.sustained

    def limited(v: VariantResult) -> str:
        s = sus(v)
        return " (publisher-limited)" if s and s.verdict.startswith("publisher-limited") else ""

    def bare_paced(v: VariantResult) -> tuple[float, str] | None:
        """The bare subscriber's best paced rate; '≥' when it kept up with the top step."""
        b = v.bare_sustained
        if b is None:
            return None
        at_top = b.target_rate >= max(o.ladder(v.variant))
        return b.publish_rate, ("≥ " if at_top else "")

    row(
        "sustained, zero loss: msg/s",
        lambda v: f"{fmt_rate(s.publish_rate)}{limited(v)}" if (s := sus(v)) else "none",
    )
    row(
        "sustained: data points/s",
        lambda v: fmt_rate(s.publish_rate * v.datapoints_per_message) if (s := sus(v)) else "—",
    )
    row(
        "  highest step tried (msg/s)",
        lambda v: fmt_rate(max((s.target_rate for s in v.worker_steps), default=None)),
    )
    row("  first failure", lambda v: next((s.verdict for s in v.worker_steps if not s.passed), "none"))
    row("publish→commit p50", lambda v: fmt_seconds(s.lag_p50_s) if (s := sus(v)) else "—")
    row("publish→commit p99", lambda v: fmt_seconds(s.lag_p99_s) if (s := sus(v)) else "—")
    all_workers = " (all workers)" if o.workers > 1 else ""
    row(
        f"worker RSS{all_workers}, max in step",
        lambda v: f"{s.rss_mib:,.0f} MiB" if (s := sus(v)) else "—",
    )
    row(
        f"worker CPU{all_workers} (100% = one core)",
        lambda v: f"{s.cpu.get('worker', 0):.0f}%" if (s := sus(v)) else "—",
    )
    row(
        "  whole machine in that step",
        lambda v: (
            f"{s.cpu.get('machine', 0):.0f}% of {100 * (os.cpu_count() or 1)}%" if (s := sus(v)) else "—"
        ),
    )
    row(
        "bare subscriber, paced: msg/s",
        lambda v: f"{b[1]}{fmt_rate(b[0])}" if (b := bare_paced(v)) else "—",
    )
    row(
        "worker / bare, paced",
        lambda v: (
            f"{'≤ ' if b[1] else ''}{s.publish_rate / b[0]:.2f}"
            if (s := sus(v)) and (b := bare_paced(v))
            else "—"
        ),
    )
    row("bare drain: msg/s", lambda v: fmt_rate(v.bare_drain.rate) if v.bare_drain else "—")
    row("worker drain: msg/s", lambda v: fmt_rate(v.worker_drain.rate) if v.worker_drain else "—")
    row(
        "worker drain: data points/s",
        lambda v: fmt_rate(v.worker_drain.rate * v.datapoints_per_message) if v.worker_drain else "—",
    )
    row("worker drain RSS (max)", lambda v: f"{v.worker_drain.rss_mib:,.0f} MiB" if v.worker_drain else "—")
    row("worker / bare, drain", lambda v: f"{r:.2f}" if (r := v.drain_ratio) is not None else "—")
    row(
        "stored exactly once (db)",
        lambda v: (
            f"{'yes' if v.lossless else 'NO'}: {v.receipts_found:,}/{v.receipts_expected:,} msgs, "
            f"{v.observations_found:,}/{v.observations_expected:,} rows"
        ),
    )
    console.print(table)
    for v in result.variants:
        if v.variant != "telemetry":
            continue
        dps = (v.sustained.publish_rate * v.datapoints_per_message) if v.sustained else 0.0
        ratio = v.drain_ratio
        met_dps = dps >= TARGET_DATAPOINTS_S
        met_ratio = ratio is not None and ratio >= TARGET_DRAIN_RATIO
        if v.worker_steps and all(st.passed for st in v.worker_steps) and not met_dps:
            console.print(
                "[yellow]the worker passed every step of the ladder: its limit is higher than "
                "this run shows (add higher --rates)[/]"
            )
        console.print(
            f"target (issue 3): ≥ {TARGET_DATAPOINTS_S:,.0f} data points/s sustained for 3-metric "
            f"messages — {'[green]met[/]' if met_dps else '[red]missed[/]'} ({dps:,.0f}); "
            f"worker ≥ {TARGET_DRAIN_RATIO} × bare drain — "
            f"{'[green]met[/]' if met_ratio else '[red]missed[/]'} "
            f"({'—' if ratio is None else f'{ratio:.2f}'})"
        )
    for v in result.variants:
        for note in v.notes:
            console.print(f"[yellow]{v.variant}:[/] {note}")
    for note in result.notes:
        console.print(f"note: {note}")
    m = result.machine
    console.print(
        f"machine: {m.get('cpus')} × {m.get('cpu_model')}, {m.get('ram_gib')} GiB RAM, "
        f"PostgreSQL {m.get('postgresql', '?')} ({m.get('store_flavour', '?')}), "
        f"{m.get('mosquitto')}, paho-mqtt {m.get('paho_mqtt')}, Python {m.get('python')}; "
        f"code {m.get('code')}; load average at start {m.get('load_average')}; "
        f"run took {result.seconds:.0f} s"
    )

"""The gateway's worker beside the reference worker, in one sitting, on both MQTT protocols.

``python -m eldercare.gateway.bench.compare --reference ../shared/peers/refpipe`` runs, per
protocol, on one broker (the bench's) and one fleet (1,000 telemetry devices, 3 metrics):

1. the bare paho subscriber: backlog drain (the ceiling of any Python worker);
2. the gateway's worker (``eldercare serve --role ingest``): paced steps, then its drain;
3. right after, the reference worker (``reference.py``): the same backlog drained, then
   the same paced steps.

Each figure comes with PostgreSQL's CPU (its backends serving that worker, per message)
and the load average at the time: the machine is shared, so the ratios measured side by
side are what compares, not the absolute rates.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Annotated, Literal

import psycopg
import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from eldercare.gateway.bench.broker import BenchBroker
from eldercare.gateway.bench.cpu import CpuMeter, postgres_pids
from eldercare.gateway.bench.database import bench_database, default_admin_url
from eldercare.gateway.bench.ingest import VariantRun
from eldercare.gateway.bench.machine import machine_info
from eldercare.gateway.bench.options import BenchOptions, DrainResult, Protocol, StepResult, parse_rates
from eldercare.gateway.bench.reference import ReferenceWorker, drop_reference_database, reference_database
from eldercare.gateway.bench.report import cpu_text, fmt_rate
from eldercare.simulators.publisher import register_fleet

VARIANT = "telemetry"

#: What the reference writes into (see ``reference.LIKE_GATEWAY_INDEXES``).
ReferenceStore = Literal["as-is", "like-gateway"]


def load_average() -> str:
    """The 1-minute load average now (how busy the shared machine is)."""
    return f"{os.getloadavg()[0]:.2f}"


@dataclass(frozen=True)
class Drain:
    """One drain with the load average when it ended."""

    result: DrainResult
    load: str

    @property
    def postgres_us_per_msg(self) -> float | None:
        """PostgreSQL CPU per stored message, µs (its % of a core / the rate)."""
        pg = self.result.cpu.get("postgres")
        if pg is None or not self.result.rate:
            return None
        return pg / 100 * 1e6 / self.result.rate


@dataclass(frozen=True)
class ProtocolResult:
    """Everything measured on one protocol."""

    protocol: str
    bare: Drain | None
    gateway: Drain | None
    reference: Drain | None
    gateway_steps: tuple[StepResult, ...]
    reference_steps: tuple[StepResult, ...]
    reference_published: int
    reference_stored: int
    gateway_lossless: bool
    notes: tuple[str, ...] = field(default_factory=tuple)


def _sustained(steps: tuple[StepResult, ...]) -> StepResult | None:
    ok = [s for s in steps if s.passed]
    return max(ok, key=lambda s: s.publish_rate) if ok else None


def _caught_up(steps: tuple[StepResult, ...]) -> StepResult | None:
    """The fastest step stored in full within the settle time: the one test both workers get.

    The gateway's steps must also keep their lag p99 from growing (its metrics have a lag
    histogram); the reference has no such histogram, so this is the like-for-like figure.
    """
    ok = [s for s in steps if s.catch_up_s is not None and s.published == s.stored]
    return max(ok, key=lambda s: s.publish_rate) if ok else None


def reference_drain(run: VariantRun, ref: ReferenceWorker, console: Console) -> tuple[Drain, int]:
    """The reference offline while the backlog is published, then started: how fast it drains."""
    m = run.o.drain_size(VARIANT)
    ref.start()  # its session must exist, offline, before the backlog is published
    ref.stop()
    base = ref.received()
    run.say(f"reference drain: pre-loading {m:,} messages")
    report = run.preload(m)
    ref.max_rss = 0
    ref.start()
    meter: CpuMeter | None = None
    deadline = time.monotonic() + max(120.0, m / 500.0)
    stored = 0
    with Live(Text(""), console=console, transient=True, refresh_per_second=4) as live:
        while stored < m and time.monotonic() < deadline:
            stored = ref.received() - base
            if meter is None and stored:
                groups: dict[str, Sequence[int]] = {"worker": ref.pids, "broker": [run.broker.pid]}
                with contextlib.suppress(psycopg.Error):
                    groups["postgres"] = postgres_pids(ref.db_url)
                meter = CpuMeter(groups)
            ref.rss()
            live.update(Text(f"reference drain: {stored:,}/{m:,} stored"))
            time.sleep(0.05)
    cpu = meter.read() if meter else {}
    stats = ref.stop()
    first, last = stats.get("first_rx_wall"), stats.get("last_commit_wall")
    span = max(1e-6, (last or 0.0) - (first or 0.0))
    drain = DrainResult(m, min(stored, m), span, min(stored, m) / span, ref.max_rss / 2**20, None, cpu)
    run.say(
        f"reference drain: {drain.drained:,}/{m:,} in {span:.2f} s = [bold]{drain.rate:,.0f} msg/s[/]"
        f" | {cpu_text(cpu)} | load {load_average()}"
    )
    return Drain(drain, load_average()), report.published


def run_protocol(
    options: BenchOptions,
    reference: Path,
    console: Console,
    broker: BenchBroker,
    db_url: str,
    ref_url: str,
    workdir: Path,
) -> ProtocolResult:
    """Bare drain, the gateway (steps, drain), then the reference (drain, steps) on one protocol."""
    tag = "p5" if options.protocol == "5" else "p3"
    run = VariantRun(options, VARIANT, console, broker, db_url, workdir, tag_prefix=tag)
    console.rule(f"MQTT {options.protocol} — load average {load_average()}")
    gw = run.run()
    loads = {"after gateway": load_average()}
    ref = ReferenceWorker(reference, broker.url, ref_url, options.protocol, workdir)
    try:
        ref_drain, published = reference_drain(run, ref, console)
        ref.start()
        run.say(f"starting the reference worker: {' '.join(ref.command()[1:3])}")
        steps = run.ladder("reference", ref)
        published += sum(s.published for s in steps)
        stored = ref.received()
    finally:
        ref.stop()
        ref.clear()
    bare = Drain(gw.bare_drain, loads["after gateway"]) if gw.bare_drain else None
    gateway = Drain(gw.worker_drain, loads["after gateway"]) if gw.worker_drain else None
    notes = list(gw.notes)
    if stored != published:
        notes.append(f"REFERENCE LOSS CHECK: {stored:,} stored of {published:,} published")
    return ProtocolResult(
        protocol=options.protocol,
        bare=bare,
        gateway=gateway,
        reference=ref_drain,
        gateway_steps=gw.worker_steps,
        reference_steps=tuple(steps),
        reference_published=published,
        reference_stored=stored,
        gateway_lossless=gw.lossless,
        notes=tuple(notes),
    )


def print_table(console: Console, results: list[ProtocolResult]) -> None:
    """The side-by-side table: one column per protocol and worker."""
    table = Table(title="gateway worker beside the reference worker (same broker, fleet, backlog)")
    table.add_column("measure")
    for r in results:
        table.add_column(f"{r.protocol}: gateway", justify="right")
        table.add_column(f"{r.protocol}: reference", justify="right")
        table.add_column(f"{r.protocol}: gw/ref", justify="right")

    def ratio(a: float | None, b: float | None) -> str:
        return f"{a / b:.2f}" if a and b else "—"

    def row(name: str, fn: Callable[..., float | str | None]) -> None:
        cells = []
        for r in results:
            a, b = fn(r, r.gateway, r.gateway_steps), fn(r, r.reference, r.reference_steps)
            cells += [
                fmt_rate(a) if isinstance(a, float) else (a or "—"),
                fmt_rate(b) if isinstance(b, float) else (b or "—"),
                ratio(a, b) if isinstance(a, float) and isinstance(b, float) else "",
            ]
        table.add_row(name, *cells)

    row("drain, msg/s", lambda r, d, s: d.result.rate if d else None)
    row("  bare paho drain, msg/s", lambda r, d, s: r.bare.result.rate if r.bare and d is r.gateway else None)
    row(
        "  drain / bare",
        lambda r, d, s: f"{d.result.rate / r.bare.result.rate:.2f}" if d and r.bare else None,
    )
    row("  worker CPU in drain, % core", lambda r, d, s: d.result.cpu.get("worker") if d else None)
    row("  PostgreSQL CPU in drain, % core", lambda r, d, s: d.result.cpu.get("postgres") if d else None)
    row("  PostgreSQL CPU per message, µs", lambda r, d, s: d.postgres_us_per_msg if d else None)
    row("  load average (1 min) after", lambda r, d, s: d.load if d else None)
    row("paced, zero loss, msg/s", lambda r, d, s: x.publish_rate if (x := _sustained(s)) else None)
    row(
        "  all stored within the settle time",
        lambda r, d, s: x.publish_rate if (x := _caught_up(s)) else None,
    )
    row(
        "  highest step tried",
        lambda r, d, s: max((x.target_rate for x in s), default=None),
    )
    row(
        "  PostgreSQL % core at that rate",
        lambda r, d, s: x.cpu.get("postgres") if (x := _sustained(s)) else None,
    )
    row(
        "  PostgreSQL µs per message",
        lambda r, d, s: (
            x.cpu["postgres"] / 100 * 1e6 / x.publish_rate
            if (x := _sustained(s)) and "postgres" in x.cpu and x.publish_rate
            else None
        ),
    )
    console.print(table)
    for r in results:
        for note in r.notes:
            console.print(f"[yellow]MQTT {r.protocol}:[/] {note}")


def run_compare(
    options: BenchOptions,
    reference: Path,
    protocols: tuple[Protocol, ...],
    console: Console,
    reference_store: ReferenceStore = "as-is",
) -> list[ProtocolResult]:
    """Run every protocol in turn on one broker and one database pair."""
    if not (reference / "worker.py").exists():
        raise typer.BadParameter(f"{reference} has no worker.py (the reference worker's folder)")
    workdir = Path(tempfile.mkdtemp(prefix="eldercare-compare-"))
    results: list[ProtocolResult] = []
    broker: BenchBroker | None = None
    try:
        with bench_database(options.admin_url, options.keep) as (db_name, db_url):
            machine = machine_info(db_url)
            ref_url = reference_database(
                options.admin_url, db_name, reference, like_gateway=reference_store == "like-gateway"
            )
            try:
                register_fleet(db_url, options.fleet(VARIANT))
                broker = BenchBroker(workdir)
                for p in protocols:
                    results.append(
                        run_protocol(
                            replace(options, protocol=p), reference, console, broker, db_url, ref_url, workdir
                        )
                    )
            finally:
                if not options.keep:
                    drop_reference_database(options.admin_url, ref_url)
    finally:
        if broker is not None:
            broker.close()
        if not options.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print_table(console, results)
    console.print(
        f"machine: {machine.get('cpus')} × {machine.get('cpu_model')}, PostgreSQL "
        f"{machine.get('postgresql', '?')} ({machine.get('store_flavour', '?')}), "
        f"{machine.get('mosquitto')}, "
        f"code {machine.get('code')}, reference store {reference_store}; "
        f"load average at start {machine.get('load_average')}, "
        f"at end {load_average()}"
    )
    if options.json_path:
        Path(options.json_path).write_text(
            json.dumps(
                {
                    "machine": machine,
                    "reference_store": reference_store,
                    "results": [asdict(r) for r in results],
                },
                indent=2,
                default=str,
            )
        )
    return results


app = typer.Typer(add_completion=False)


@app.command()
def compare(
    reference: Annotated[Path, typer.Option(help="The reference worker's folder (refpipe).")],
    protocols: Annotated[str, typer.Option(help="MQTT protocols, in order.")] = "3.1.1,5",
    rates: Annotated[
        str, typer.Option(help="Paced steps, msg/s (empty: drains only).")
    ] = "10000,12000,14000",
    step_s: Annotated[float, typer.Option(help="Seconds per paced step.")] = 20.0,
    drain_messages: Annotated[int, typer.Option(help="Backlog of each drain.")] = 200_000,
    publishers: Annotated[
        int, typer.Option(help="Publisher processes per step (0: 1 per 5k msg/s, ≥ 2).")
    ] = 0,
    no_bare: Annotated[bool, typer.Option("--no-bare", help="Skip the bare subscriber.")] = False,
    worker_env: Annotated[
        list[str] | None, typer.Option(help="ELDERCARE_X=value for the gateway worker.")
    ] = None,
    profile: Annotated[
        str | None, typer.Option(help="py-spy the gateway worker's drain into PREFIX-*.txt.")
    ] = None,
    json_path: Annotated[str | None, typer.Option("--json", help="Write the figures as JSON here.")] = None,
    reference_store: Annotated[
        ReferenceStore,
        typer.Option(help="as-is: the reference's table without indexes; like-gateway: with the gateway's."),
    ] = "as-is",
    admin_url: Annotated[str | None, typer.Option(help="PostgreSQL URL allowed to CREATE DATABASE.")] = None,
) -> None:
    """Gateway worker vs reference worker vs bare paho, both protocols, one sitting."""
    chosen: list[Protocol] = []
    for p in protocols.split(","):
        if p.strip() not in ("3.1.1", "5"):
            raise typer.BadParameter(f"protocol {p!r}: 3.1.1 or 5")
        chosen.append("5" if p.strip() == "5" else "3.1.1")
    env = tuple(tuple(kv.split("=", 1)) for kv in (worker_env or []))
    options = BenchOptions(
        admin_url=admin_url or default_admin_url(),
        variants=(VARIANT,),
        rates=parse_rates(rates) if rates else (),
        step_s=step_s,
        bare_step_s=step_s,
        drain_messages=drain_messages,
        publishers=publishers,
        bare=not no_bare,
        worker_env=env,  # type: ignore[arg-type]
        json_path=json_path,
        profile_prefix=profile,
    )
    run_compare(
        options,
        reference,
        tuple(chosen),
        Console(width=max(120, shutil.get_terminal_size().columns)),
        reference_store,
    )


if __name__ == "__main__":
    app()

"""What each statement of the ingest writer's batch transaction costs PostgreSQL.

``python -m eldercare.gateway.bench.txcost`` writes batches of 500 three-metric telemetry
messages (1,000 registered devices) with the real ``BatchWriter`` into a fresh bench
database, timing every statement by wall clock and by the server process's own CPU time
(``/proc/<backend>/schedstat``, nanoseconds), then writes the same rows the reference
worker's way (dedup ``INSERT ... unnest ... ON CONFLICT``, binary ``COPY`` into an unindexed
table) for the ratio. Variants then take one feature away at a time, in the same sitting,
to say what each costs: the rollup-marks trigger, the observations indexes, receipts by day.
No interpretation or MQTT: only the database side, as the ingest path drives it.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import psycopg
import typer
from rich.console import Console
from rich.table import Table

from eldercare.devices.catalog import load_catalog
from eldercare.devices.interpret import Policy, interpret
from eldercare.gateway.bench.database import bench_database, default_admin_url
from eldercare.gateway.store.devices import load_registry
from eldercare.gateway.store.writer import BatchWriter, Received
from eldercare.simulators.publisher import Fleet, register_fleet

BATCH = 500


def backend_ns(pid: int) -> int:
    """CPU time the server process ``pid`` has run, in ns (``/proc/<pid>/schedstat``)."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])


class StatementClock:
    """Times every execute and COPY on the cursors of one connection: wall and server CPU."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)
        self.pid = 0

    @contextlib.contextmanager
    def timed(self, label: str) -> Iterator[None]:
        c0, t0 = backend_ns(self.pid), time.perf_counter()
        try:
            yield
        finally:
            self.wall[label] += time.perf_counter() - t0
            self.cpu[label] += (backend_ns(self.pid) - c0) / 1e9

    @contextlib.contextmanager
    def installed(self, conn: psycopg.Connection) -> Iterator[None]:
        """Wrap ``psycopg.Cursor.execute`` and ``.copy`` while inside."""
        self.pid = conn.info.backend_pid
        execute, copy = psycopg.Cursor.execute, psycopg.Cursor.copy
        clock = self

        def timed_execute(cur: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
            with clock.timed(_label(str(query))):
                return execute(cur, query, *args, **kwargs)

        @contextlib.contextmanager
        def timed_copy(cur: Any, statement: Any, *args: Any, **kwargs: Any) -> Iterator[Any]:
            with clock.timed(_label(str(statement))), copy(cur, statement, *args, **kwargs) as c:
                yield c

        psycopg.Cursor.execute = timed_execute  # type: ignore[method-assign,assignment]
        psycopg.Cursor.copy = timed_copy  # type: ignore[method-assign,assignment]
        try:
            yield
        finally:
            psycopg.Cursor.execute = execute  # type: ignore[method-assign]
            psycopg.Cursor.copy = copy  # type: ignore[method-assign]


def _label(sql: str) -> str:
    s = " ".join(sql.split())
    for needle, label in (
        ("INSERT INTO message_receipts", "claim receipts (message_receipts by day)"),
        ("COPY observations", "COPY observations (+ indexes, rollup-marks trigger)"),
        ("rollup_dirty ", "INSERT rollup_dirty (day marks)"),
        ("UPDATE devices d SET last_seen", "UPDATE devices last_seen"),
        ("UPDATE devices d SET status_at", "UPDATE devices status"),
        ("device_rejections", "device_rejections counts"),
        ("INSERT INTO ref_dedup", "reference: dedup INSERT unnest"),
        ("COPY ref_observations", "reference: COPY (no index)"),
    ):
        if needle in s:
            return label
    return s[:60]


def batches(fleet: Fleet, url: str, n: int, tag: str) -> list[list[Received]]:
    """``n`` batches of interpreted telemetry, as the committer would hand them to the writer."""
    with psycopg.connect(url) as conn:
        registry = load_registry(conn)
    policy = Policy(catalog=load_catalog(), horizon_s=30 * 86_400.0)
    ids = fleet.publisher_ids()
    out, seq = [], 0
    now = time.time()
    for _ in range(n):
        batch = []
        for _ in range(BATCH):
            device = ids[seq % len(ids)]
            payload = b'{"msg_id":"%s-%d","ts":%d,"metrics":{"heart_rate":%d,"spo2":%d,"steps":%d}}' % (
                tag.encode(),
                seq,
                int(now * 1000) + seq,
                60 + seq % 40,
                92 + seq % 8,
                seq % 5000,
            )
            topic = fleet.topic(device)
            received = now + seq / 10_000
            batch.append(
                Received(topic, payload, received, interpret(topic, payload, received, registry, policy))
            )
            seq += 1
        out.append(batch)
    return out


def run_writer(url: str, work: list[list[Received]]) -> tuple[StatementClock, float, float]:
    """The real writer over ``work``; (per-statement clock, total wall, total server CPU)."""
    writer = BatchWriter("plain")
    clock = StatementClock()
    with psycopg.connect(url) as conn, clock.installed(conn):
        c0, t0 = backend_ns(clock.pid), time.perf_counter()
        for batch in work:
            with clock.timed("whole transaction"):
                writer.write(conn, batch)
        return clock, time.perf_counter() - t0, (backend_ns(clock.pid) - c0) / 1e9


def run_reference(url: str, work: list[list[Received]]) -> tuple[StatementClock, float, float]:
    """The reference worker's transaction over the same rows (its two tables, no index)."""
    clock = StatementClock()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS ref_observations (time timestamptz NOT NULL, device_id text NOT NULL,"
            " metric text NOT NULL, value double precision, msg_id text NOT NULL)"
        )
        conn.execute(
            "CREATE TABLE IF NOT EXISTS ref_dedup (device_id text NOT NULL, msg_id text NOT NULL,"
            " PRIMARY KEY (device_id, msg_id))"
        )
        with clock.installed(conn):
            c0, t0 = backend_ns(clock.pid), time.perf_counter()
            for batch in work:
                with clock.timed("whole transaction"), conn.transaction(), conn.cursor(binary=True) as cur:
                    cur.execute(
                        "INSERT INTO ref_dedup (device_id, msg_id)"
                        " SELECT * FROM unnest(%s::text[], %s::text[])"
                        " ON CONFLICT DO NOTHING RETURNING device_id, msg_id",
                        ([m.interp.source_id for m in batch], [m.interp.msg_id for m in batch]),
                    )
                    cur.fetchall()
                    with cur.copy(
                        "COPY ref_observations (time, device_id, metric, value, msg_id)"
                        " FROM STDIN (FORMAT BINARY)"
                    ) as copy:
                        copy.set_types(["timestamptz", "text", "text", "float8", "text"])
                        for m in batch:
                            for r in m.interp.readings:
                                copy.write_row((r.time, r.device_id, r.metric, r.value, m.interp.msg_id))
            return clock, time.perf_counter() - t0, (backend_ns(clock.pid) - c0) / 1e9


#: Variants, cumulative: what each takes away from the store (in the scratch database only)
#: on top of the ones before it.
VARIANTS: dict[str, tuple[str, ...]] = {
    "as shipped": (),
    "- rollup-marks trigger": ("ALTER TABLE observations DISABLE TRIGGER observations_mark_rollup_inserts",),
    "- trigger, the (elder_id, metric, time) index": ("DROP INDEX observations_elder_metric_time_idx",),
    "- trigger, all observations indexes": ("DROP INDEX observations_time_brin",),
}


def main(
    batches_per_run: Annotated[int, typer.Option("--batches", help="Batches of 500 messages per run.")] = 100,
    admin_url: Annotated[str | None, typer.Option(help="PostgreSQL URL allowed to CREATE DATABASE.")] = None,
) -> None:
    """Per-statement cost of the ingest transaction vs the reference's, in one sitting."""
    console = Console(width=140)
    fleet = Fleet(variant="telemetry", size=1_000, prefix="bench")
    rows: list[tuple[str, str, float, float, float]] = []
    with bench_database(admin_url or default_admin_url(), keep=False) as (_, url):
        register_fleet(url, fleet)
        for i, (variant, changes) in enumerate(VARIANTS.items()):
            with psycopg.connect(url, autocommit=True) as conn:
                for sql in changes:
                    conn.execute(sql)
            work = batches(fleet, url, batches_per_run, f"v{i}")
            run_writer(url, work[:5])  # warm the caches and the plans
            clock, wall, cpu = run_writer(url, work[5:])
            n = (len(work) - 5) * BATCH
            for label in sorted(clock.cpu, key=lambda k: -clock.cpu[k]):
                rows.append((variant, label, clock.wall[label] / n * 1e6, clock.cpu[label] / n * 1e6, 0.0))
            rows.append((variant, "= server CPU of the connection, all", wall / n * 1e6, cpu / n * 1e6, 0.0))
        work = batches(fleet, url, batches_per_run, "ref")
        run_reference(url, work[:5])
        clock, wall, cpu = run_reference(url, work[5:])
        n = (len(work) - 5) * BATCH
        for label in sorted(clock.cpu, key=lambda k: -clock.cpu[k]):
            rows.append(
                ("reference transaction", label, clock.wall[label] / n * 1e6, clock.cpu[label] / n * 1e6, 0)
            )
        rows.append(
            ("reference transaction", "= server CPU of the connection, all", wall / n * 1e6, cpu / n * 1e6, 0)
        )
    table = Table(title=f"PostgreSQL cost per message, batches of {BATCH} (3 readings each)")
    for col in ("run", "statement", "wall µs/msg", "server CPU µs/msg"):
        table.add_column(col, justify="left" if col in ("run", "statement") else "right")
    for variant, label, wall_us, cpu_us, _ in rows:
        table.add_row(variant, label, f"{wall_us:.1f}", f"{cpu_us:.1f}")
    console.print(table)


if __name__ == "__main__":
    typer.run(main)

"""Dedup-receipt benchmark: batch writes on an empty and a full receipts table, and retention.

    python -m eldercare.gateway.store.bench_receipts --rows 102400000 --devices 100000 [--layout single]

Makes two scratch databases, ``eldercare_bench_receipts_<random>`` and ``..._empty``, migrates
both as plain stores and registers ``--devices`` wristbands in each. First it times the
writer's last_seen update of 500 devices on ``devices`` (fillfactor 70, migration 0005) and on
a copy at fillfactor 100 (before), in turn. Then it loads ``--rows`` receipts into the first
database, spread over the kept days (buffer horizon + 1, ending today; one ``INSERT .. SELECT
generate_series`` a day, primary key rebuilt after), and times 500-message batches from
devices picked at random among all of them, a batch on the empty store and one on the full
store in turn, so both see the same load from the rest of the machine:
- ``claim``: the writer's receipt step alone (its SQL, one transaction a batch);
- ``write``: the whole writer (one reading a message, receipts, last_seen), as ingest runs it;
- ``write, last_seen done``: the same with every device's last_seen already written.
Last, retention beside a write loop on the full store: the oldest day's partition is dropped
(``--layout single``: one table keyed ``(device_id, msg_id)`` as before migration 0005, whose
oldest day is ``DELETE``d) and the loop's latencies before, during and after are printed.
The databases are dropped at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import random
import secrets
import statistics
import threading
import time
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from eldercare.devices.records import Interpretation, Reading
from eldercare.gateway.store import receipts
from eldercare.gateway.store.migrate import migrate
from eldercare.gateway.store.writer import BatchWriter, Received

BATCH = 500
HORIZON_DAYS = 30
#: Days of receipts a store keeps: the window (horizon + 1) and today.
KEPT_DAYS = HORIZON_DAYS + 2


def main(argv: list[str] | None = None) -> None:
    """Parse the options, run the benchmark, print the figures."""
    parser = argparse.ArgumentParser(prog="bench_receipts", description=__doc__.splitlines()[0])
    parser.add_argument("--admin-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument(
        "--rows", type=int, default=100_000_000, help="receipts loaded before the second round"
    )
    parser.add_argument("--devices", type=int, default=100_000)
    parser.add_argument("--batches", type=int, default=200, help="timed batches per measurement")
    parser.add_argument(
        "--layout",
        choices=("daily", "single"),
        default="daily",
        help="daily: the store's partitions (0005); single: one table keyed (device_id, msg_id) as before",
    )
    parser.add_argument(
        "--days",
        type=int,
        default=KEPT_DAYS,
        help=f"days up to today the rows are spread over (default {KEPT_DAYS}, all kept; 1: one busy day)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the scratch database")
    args = parser.parse_args(argv)

    name = f"eldercare_bench_receipts_{secrets.token_hex(4)}"
    names = (name, f"{name}_empty")
    with psycopg.connect(args.admin_url, autocommit=True) as admin:
        for db in names:
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db)))
    print(f"scratch databases {', '.join(names)}", flush=True)
    try:
        full, empty = (make_conninfo(args.admin_url, dbname=db) for db in names)
        _run(full, empty, args.rows, args.devices, args.batches, args.layout, args.days)
    finally:
        if not args.keep:
            with psycopg.connect(args.admin_url, autocommit=True) as admin:
                for db in names:
                    admin.execute(
                        sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(db))
                    )
            print(f"dropped {', '.join(names)}", flush=True)


def _run(full: str, empty: str, rows: int, devices: int, batches: int, layout: str, days: int) -> None:
    """Load ``full``; time batches on it and on ``empty`` in turn (same load on both); retention."""
    for url in (full, empty):
        _prepare(url, devices, layout)
    print(f"{devices:,} devices registered in both; load average {_load()}", flush=True)
    _devices_update(empty, devices, batches)
    today = datetime.now(UTC).date()
    per_day = _load_receipts(full, rows, devices, today, layout, days)
    bench = _Bench(devices, start_seq=rows // devices + 1)
    bench.measure({"empty store": empty, f"{per_day * days:,} receipts": full}, batches)
    _retention(
        full, bench, today - timedelta(days=HORIZON_DAYS + 1), per_day if days == KEPT_DAYS else 0, layout
    )


def _prepare(url: str, devices: int, layout: str) -> None:
    migrate(url, flavour="plain")
    with psycopg.connect(url, autocommit=True) as conn:
        if layout == "single":
            conn.execute("DROP TABLE message_receipts")
            conn.execute(_SINGLE_TABLE)
        conn.execute(
            "INSERT INTO devices (device_id, type, online) SELECT 'd-' || lpad(i::text, 6, '0'), 'wristband',"
            " true FROM generate_series(0, %s - 1) i",
            (devices,),
        )
        conn.execute("VACUUM ANALYZE devices")


#: The receipts table as it was before 0005 (plus the day column the writer now fills).
_SINGLE_TABLE = (
    "CREATE TABLE message_receipts (device_id text NOT NULL, msg_id text NOT NULL, day date NOT NULL,"
    " received_at timestamptz NOT NULL);"
    " CREATE INDEX message_receipts_received_brin ON message_receipts USING brin (received_at)"
)

#: The writer's last_seen statement (``BatchWriter._update_devices``) on a table named here.
_LAST_SEEN = (
    "UPDATE {} d SET last_seen = GREATEST(d.last_seen, u.t), online = true"
    " FROM unnest(%s::text[], %s::timestamptz[]) AS u(id, t) WHERE d.device_id = u.id"
)


def _devices_update(url: str, devices: int, batches: int) -> None:
    """The writer's last_seen update of 500 devices: on ``devices``, and on two copies of it
    (indexes, no triggers) at fillfactor 100 (before 0005) and 70, in turn."""
    print(
        f"-- last_seen of {BATCH} devices of {devices:,}: devices, copies at fillfactor 100 and 70",
        flush=True,
    )
    rng = random.Random(3)
    with psycopg.connect(url, autocommit=True) as conn:
        for ff in (100, 70):
            conn.execute(f"CREATE TABLE devices_ff{ff} (LIKE devices INCLUDING ALL) WITH (fillfactor = {ff})")
            conn.execute(f"INSERT INTO devices_ff{ff} SELECT * FROM devices")
            conn.execute(f"VACUUM ANALYZE devices_ff{ff}")
        steps: dict[str, Callable[[], None]] = {}
        for table in ("devices", "devices_ff100", "devices_ff70"):
            statement = sql.SQL(_LAST_SEEN).format(sql.Identifier(table))

            def step(statement: sql.Composed = statement) -> None:
                ids = sorted(f"d-{d:06d}" for d in rng.sample(range(devices), BATCH))
                with conn.transaction():
                    conn.execute(statement, (ids, [datetime.now(UTC)] * BATCH))

            steps[table] = step
        for table, latencies in _time_in_turn(steps, batches).items():
            _report(f"last_seen update, {table}", latencies)
        hot = conn.execute(
            "SELECT relname, n_tup_hot_upd * 100 / greatest(n_tup_upd, 1) FROM pg_stat_user_tables"
            " WHERE relname LIKE 'devices%' ORDER BY relname"
        ).fetchall()
        print("   HOT updates: " + ", ".join(f"{name} {pct} %" for name, pct in hot), flush=True)
        conn.execute("DROP TABLE devices_ff100, devices_ff70")


class _Bench:
    """Batches of new messages from random devices, each device's msg ids counting up."""

    def __init__(self, devices: int, start_seq: int) -> None:
        self.devices = devices
        self.seq = start_seq
        self.rng = random.Random(7)

    def batch(self) -> list[Received]:
        now = time.time()
        t = datetime.fromtimestamp(now - 1, UTC)  # the device's own ts, a second old
        out = []
        for d in self.rng.sample(range(self.devices), BATCH):
            device = f"d-{d:06d}"
            self.seq += 1
            interp = Interpretation(source_id=device, msg_id=f"m-{self.seq:09d}", seen_devices=[device])
            interp.readings.append(Reading(t, device, None, "heart_rate", 70.0, []))
            out.append(Received("bench", b"{}", now, interp))
        return out

    def measure(self, stores: dict[str, str], batches: int) -> None:
        """Time each step on every store, a batch on each in turn, so they share the machine's load."""
        print(f"-- {batches} batches of {BATCH} from {self.devices:,} devices, stores in turn", flush=True)
        conns = {label: psycopg.connect(url) for label, url in stores.items()}
        try:
            writers = {label: BatchWriter("plain") for label in stores}
            kinds: dict[str, dict[str, Callable[[], None]]] = {
                "claim": {},
                "write": {},
                "write, last_seen done": {},
            }
            for label, conn in conns.items():
                writer = writers[label]

                def claim(conn: psycopg.Connection = conn, writer: BatchWriter = writer) -> None:
                    with conn.transaction(), conn.cursor() as cur:
                        writer._claim_receipts(cur, self.batch())

                def write(conn: psycopg.Connection = conn, writer: BatchWriter = writer) -> None:
                    writer._last_seen_written.clear()  # every device due, as at 1 message a minute
                    writer.write(conn, self.batch())

                def write_seen(conn: psycopg.Connection = conn, writer: BatchWriter = writer) -> None:
                    batch = self.batch()
                    writer._last_seen_written.update({m.interp.source_id or "": m.received_at for m in batch})
                    writer.write(conn, batch)

                kinds["claim"][label] = claim
                kinds["write"][label] = write
                kinds["write, last_seen done"][label] = write_seen
            for kind, steps in kinds.items():
                results = _time_in_turn(steps, batches)
                for label, latencies in results.items():
                    _report(f"{label}: {kind}", latencies)
                first, *rest = (statistics.median(x) for x in results.values())
                print(f"   median ratio {' / '.join(f'{m / first:.2f}' for m in rest)} x the empty store")
        finally:
            for conn in conns.values():
                conn.close()


def _time_in_turn(steps: dict[str, Callable[[], None]], batches: int) -> dict[str, list[float]]:
    """Run every step ``batches`` times, one of each in turn (after 5 warm-up rounds)."""
    for _ in range(5):
        for step in steps.values():
            step()
    out: dict[str, list[float]] = {label: [] for label in steps}
    for _ in range(batches):
        for label, step in steps.items():
            t0 = time.perf_counter()
            step()
            out[label].append(time.perf_counter() - t0)
    return out


def _report(label: str, latencies: list[float]) -> None:
    ms = sorted(x * 1000 for x in latencies)
    p95 = ms[min(len(ms) - 1, int(len(ms) * 0.95))]
    rate = BATCH * len(ms) / (sum(ms) / 1000)
    print(
        f"{label:45s} median {statistics.median(ms):7.1f} ms  p95 {p95:7.1f} ms  max {ms[-1]:7.1f} ms"
        f"  {rate:9,.0f} msg/s  (load {_load()})",
        flush=True,
    )


def _load_receipts(url: str, rows: int, devices: int, today: date, layout: str, days_loaded: int) -> int:
    """Fill the last ``days_loaded`` days up to today with ``rows`` receipts; return receipts per day."""
    days = [today - timedelta(days=i) for i in range(days_loaded - 1, -1, -1)]
    per_day = max(1, rows // len(days) // devices) * devices  # whole rounds of the fleet a day
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SET maintenance_work_mem = '1GB'")
        if layout == "daily":
            conn.execute("ALTER TABLE message_receipts DROP CONSTRAINT message_receipts_pkey")
        t0 = time.perf_counter()
        for i, day in enumerate(days):
            lo = i * per_day
            conn.execute(
                sql.SQL(
                    "INSERT INTO {} (device_id, msg_id, day, received_at)"
                    " SELECT 'd-' || lpad((i %% %(devices)s)::text, 6, '0'),"
                    " 'm-' || lpad((i / %(devices)s)::text, 9, '0'), %(day)s, %(day)s::timestamptz"
                    " FROM generate_series(%(lo)s, %(hi)s) i"
                ).format(
                    sql.Identifier(receipts.partition_name(day) if layout == "daily" else receipts.TABLE)
                ),
                {"devices": devices, "day": day, "lo": lo, "hi": lo + per_day - 1},
            )
            print(
                f"   loaded {day} ({(i + 1) * per_day:,} rows, {time.perf_counter() - t0:.0f} s)", flush=True
            )
        t1 = time.perf_counter()
        key = "device_id, msg_id, day" if layout == "daily" else "device_id, msg_id"
        conn.execute(sql.SQL("ALTER TABLE message_receipts ADD PRIMARY KEY ({})").format(sql.SQL(key)))
        t2 = time.perf_counter()
        conn.execute("VACUUM ANALYZE message_receipts")
        conn.execute("CHECKPOINT")  # the load's dirty pages written now, not during the timing
        size = conn.execute(
            "SELECT pg_size_pretty(sum(pg_table_size(c.oid))), pg_size_pretty(sum(pg_indexes_size(c.oid)))"
            " FROM pg_class c WHERE c.oid = 'message_receipts'::regclass OR c.oid IN"
            " (SELECT inhrelid FROM pg_inherits WHERE inhparent = 'message_receipts'::regclass)"
        ).fetchone()
    assert size is not None
    print(
        f"{per_day * len(days):,} receipts in {len(days)} days: load {t1 - t0:.0f} s, primary key"
        f" {t2 - t1:.0f} s, vacuum {time.perf_counter() - t2:.0f} s; table {size[0]}, primary key {size[1]}",
        flush=True,
    )
    return per_day


def _retention(url: str, bench: _Bench, oldest: date, per_day: int, layout: str) -> None:
    """Expire the oldest day (drop its partition, or DELETE it) while a write loop runs."""
    how = f"drop {receipts.partition_name(oldest)}" if layout == "daily" else "DELETE the day"
    print(f"-- retention: {how} ({per_day:,} receipts) beside a write loop", flush=True)
    spans: list[tuple[float, float]] = []
    stop = threading.Event()

    def loop() -> None:
        with psycopg.connect(url) as conn:
            writer = BatchWriter("plain")
            while not stop.is_set():
                batch = bench.batch()
                writer._last_seen_written.clear()
                t0 = time.perf_counter()
                writer.write(conn, batch)
                spans.append((t0, time.perf_counter()))

    thread = threading.Thread(target=loop)
    thread.start()
    time.sleep(5)
    now = datetime.combine(oldest + timedelta(days=HORIZON_DAYS + 2), datetime.min.time(), UTC)
    with psycopg.connect(url) as conn:
        start = time.perf_counter()
        if layout == "daily":
            dropped = receipts.drop_expired(conn, now, buffer_horizon_days=HORIZON_DAYS)
        else:
            with conn.transaction():
                cur = conn.execute(
                    "DELETE FROM message_receipts WHERE received_at < %s::timestamptz",
                    (oldest + timedelta(days=1),),
                )
            dropped = [f"{cur.rowcount:,} rows deleted"]
        end = time.perf_counter()
    time.sleep(2)
    stop.set()
    thread.join()
    print(f"dropped {dropped} in {(end - start) * 1000:.0f} ms", flush=True)
    # A batch overlapping the drop is "during": it waited for it, or the drop for it.
    _report("write loop before the drop", [t1 - t0 for t0, t1 in spans if t1 < start])
    during = [t1 - t0 for t0, t1 in spans if t0 <= end and t1 >= start]
    _report("write loop during the drop", during)
    _report("write loop after the drop", [t1 - t0 for t0, t1 in spans if t0 > end])


def _load() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


if __name__ == "__main__":
    main()

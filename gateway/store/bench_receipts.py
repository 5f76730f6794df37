"""Dedup-receipt benchmark: batch writes on an empty and a full receipts table, and retention.

    python -m eldercare.gateway.store.bench_receipts --rows 100000000 --devices 100000

Makes a scratch database ``eldercare_bench_receipts_<random>``, migrates it as a plain store
and registers ``--devices`` wristbands. Then, first on the empty store and again after loading
``--rows`` receipts spread over the kept days (buffer horizon + 1, ending today; one
``INSERT .. SELECT generate_series`` per day's partition, primary key rebuilt after), it times
500-message batches from devices picked at random among all of them:
- ``claim``: the writer's receipt step alone (its SQL, one transaction a batch);
- ``write``: the whole writer (one reading a message, receipts, last_seen), as ingest runs it;
- ``write, last_seen done``: the same with every device's last_seen already written, to show
  what the per-device ``devices`` update costs.
Last, retention beside a write loop: the oldest day's partition is dropped while batches go
on, and the loop's latencies before and during the drop are printed. The database is
dropped at the end unless ``--keep``.
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


def main(argv: list[str] | None = None) -> None:
    """Parse the options, run the benchmark, print the figures."""
    parser = argparse.ArgumentParser(prog="bench_receipts", description=__doc__.splitlines()[0])
    parser.add_argument("--admin-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument(
        "--rows", type=int, default=100_000_000, help="receipts loaded before the second round"
    )
    parser.add_argument("--devices", type=int, default=100_000)
    parser.add_argument("--batches", type=int, default=200, help="timed batches per measurement")
    parser.add_argument("--keep", action="store_true", help="keep the scratch database")
    args = parser.parse_args(argv)

    name = f"eldercare_bench_receipts_{secrets.token_hex(4)}"
    with psycopg.connect(args.admin_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = make_conninfo(args.admin_url, dbname=name)
    print(f"scratch database {name}", flush=True)
    try:
        _run(url, args.rows, args.devices, args.batches)
    finally:
        if not args.keep:
            with psycopg.connect(args.admin_url, autocommit=True) as admin:
                admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
            print(f"dropped {name}", flush=True)


def _run(url: str, rows: int, devices: int, batches: int) -> None:
    migrate(url, flavour="plain")
    today = datetime.now(UTC).date()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO devices (device_id, type, online) SELECT 'd-' || lpad(i::text, 6, '0'), 'wristband',"
            " true FROM generate_series(0, %s - 1) i",
            (devices,),
        )
        conn.execute("ANALYZE devices")
    print(f"{devices:,} devices registered; load average {_load()}", flush=True)
    bench = _Bench(url, devices, start_seq=rows // devices + 1)
    bench.measure_all("empty store", batches)

    per_day = _load_receipts(url, rows, devices, today)
    bench.measure_all(f"{rows:,} receipts", batches)
    _retention(url, bench, today - timedelta(days=HORIZON_DAYS + 1), per_day)


class _Bench:
    """Batches of new messages from random devices, each device's msg ids counting up."""

    def __init__(self, url: str, devices: int, start_seq: int) -> None:
        self.url = url
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

    def measure_all(self, label: str, batches: int) -> None:
        print(f"-- {label}: {batches} batches of {BATCH} from {self.devices:,} devices", flush=True)
        with psycopg.connect(self.url) as conn:
            writer = BatchWriter("plain")

            def claim() -> None:
                with conn.transaction(), conn.cursor() as cur:
                    writer._claim_receipts(cur, self.batch())

            def write() -> None:
                writer._last_seen_written.clear()  # every device due, as at 1 message a minute
                writer.write(conn, self.batch())

            def write_seen() -> None:
                batch = self.batch()
                writer._last_seen_written.update({m.interp.source_id: m.received_at for m in batch})
                writer.write(conn, batch)

            for what, step in (("claim", claim), ("write", write), ("write, last_seen done", write_seen)):
                _report(f"{label}: {what}", _time(step, batches))


def _time(step: Callable[[], None], batches: int) -> list[float]:
    for _ in range(5):  # warm-up
        step()
    out = []
    for _ in range(batches):
        t0 = time.perf_counter()
        step()
        out.append(time.perf_counter() - t0)
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


def _load_receipts(url: str, rows: int, devices: int, today: date) -> int:
    """Fill the kept days up to today with ``rows`` receipts; return receipts per day."""
    days = [today - timedelta(days=i) for i in range(HORIZON_DAYS + 1, -1, -1)]
    per_day = max(1, rows // len(days) // devices) * devices  # whole rounds of the fleet a day
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SET maintenance_work_mem = '1GB'")
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
                ).format(sql.Identifier(receipts.partition_name(day))),
                {"devices": devices, "day": day, "lo": lo, "hi": lo + per_day - 1},
            )
            print(
                f"   loaded {day} ({(i + 1) * per_day:,} rows, {time.perf_counter() - t0:.0f} s)", flush=True
            )
        t1 = time.perf_counter()
        conn.execute("ALTER TABLE message_receipts ADD PRIMARY KEY (device_id, msg_id, day)")
        t2 = time.perf_counter()
        conn.execute("VACUUM ANALYZE message_receipts")
        size = conn.execute(
            "SELECT pg_size_pretty(sum(pg_table_size(c.oid))), pg_size_pretty(sum(pg_indexes_size(c.oid)))"
            " FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
            " WHERE i.inhparent = 'message_receipts'::regclass"
        ).fetchone()
    assert size is not None
    print(
        f"{per_day * len(days):,} receipts in {len(days)} days: load {t1 - t0:.0f} s, primary key"
        f" {t2 - t1:.0f} s, vacuum {time.perf_counter() - t2:.0f} s; table {size[0]}, primary key {size[1]}",
        flush=True,
    )
    return per_day


def _retention(url: str, bench: _Bench, oldest: date, per_day: int) -> None:
    """Drop the oldest day's partition while a write loop runs; print both sides."""
    print(f"-- retention: drop {receipts.partition_name(oldest)} ({per_day:,} receipts) beside a write loop")
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
        dropped = receipts.drop_expired(conn, now, buffer_horizon_days=HORIZON_DAYS)
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

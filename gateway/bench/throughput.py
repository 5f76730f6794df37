"""Dispatch throughput: a backlog of emergency alerts written straight into the outbox, delivered.

The alerts and their outbox rows are written as the rules write them (one transaction per
batch, a NOTIFY on commit, like ``tests/alerts/dispatch/outbox.py`` but many at once), each
for an elder of its own with a profile and a recent reading, so the dispatcher builds full
documents. Their route is ``emergency``: each alert is a dispatch to 120 and one to the
family contacts. The figure is dispatches delivered per second, from the first outbox commit
to the last delivery the store records; optionally one hotline answers 500 for the first
seconds (every attempt then retried with backoff). Once measured, the backlog's alerts are
resolved, so their 60 s deadlines escalate nothing into the next run.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import psycopg
from psycopg.types.json import Jsonb
from rich.console import Console
from rich.live import Live
from rich.text import Text

from eldercare.gateway.bench.cpu import CpuMeter, postgres_pids
from eldercare.gateway.bench.emergency import quantile

#: The route of the throughput alerts, and the rule they claim to come from.
ROUTE = "emergency"
RULE = "fall_no_recovery"
#: Give up when nothing more was delivered for this long.
NO_PROGRESS_S = 30.0


@dataclass(frozen=True)
class ThroughputPlan:
    """``alerts`` alerts in transactions of ``batch``; ``outage`` hotline answers 500 for ``outage_s``."""

    alerts: int
    batch: int = 50
    outage: str | None = None
    outage_s: float = 0.0
    tag: str = "thr"

    @property
    def label(self) -> str:
        if self.outage is None:
            return "hotlines answering at once"
        return f"{self.outage} answering 500 for {self.outage_s:g} s"


@dataclass(frozen=True)
class ThroughputRun:
    """What one backlog did: dispatches delivered, how fast, after how many attempts."""

    plan: ThroughputPlan
    dispatches: int
    delivered: int
    attempts: int
    #: First to last outbox commit.
    written_s: float
    #: First outbox commit to the last delivery.
    seconds: float
    #: Each dispatch: its outbox row committed to its delivery (seconds).
    latency: dict[str, float]
    cpu: dict[str, float]
    acknowledged: int = 0
    delivered_by_channel: dict[str, int] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.delivered / self.seconds if self.seconds > 0 else 0.0


def prepare(db_url: str, plan: ThroughputPlan) -> list[tuple[str, str]]:
    """The plan's elders (with a profile and a heart rate a minute old) and wristbands."""
    pairs = [(f"eld-{plan.tag}-{i:05d}", f"dev-{plan.tag}-{i:05d}") for i in range(plan.alerts)]
    with psycopg.connect(db_url) as conn, conn.transaction(), conn.cursor() as cur:
        cur.executemany("INSERT INTO elders (elder_id) VALUES (%s)", [(e,) for e, _ in pairs])
        cur.executemany(
            "INSERT INTO devices (device_id, type, elder_id) VALUES (%s, 'wristband', %s)",
            [(d, e) for e, d in pairs],
        )
        # Invented people: the documents carry a name, a phone and an address, as 120's do.
        cur.executemany(
            "INSERT INTO elder_profiles (elder_id, name, sex, birth_year, phone, address)"
            " VALUES (%s, '测试', 'F', 1941, '13800000000', '某市某区某路 1 号')",
            [(e,) for e, _ in pairs],
        )
        cur.executemany(
            "INSERT INTO observations (time, device_id, elder_id, metric, value)"
            " VALUES (now() - interval '1 minute', %s, %s, 'heart_rate', 112)",
            [(d, e) for e, d in pairs],
        )
    return pairs


def write_outbox(
    db_url: str, pairs: Sequence[tuple[str, str]], batch: int
) -> tuple[list[uuid.UUID], float, float]:
    """The alerts and their outbox rows, ``batch`` per transaction as fast as it goes.

    Returns the alert ids and the first and last commit's time (epoch seconds).
    """
    ids: list[uuid.UUID] = []
    first = last = 0.0
    with psycopg.connect(db_url) as conn:
        for start in range(0, len(pairs), batch):
            chunk = [(uuid.uuid4(), e, d) for e, d in pairs[start : start + batch]]
            with conn.transaction(), conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO alerts (id, elder_id, rule, severity, raised_severity, route, device_id,"
                    " observed_at, raised_at, title_zh, title_en, evidence, last_at, updated_at)"
                    " VALUES (%s, %s, %s, 'emergency', 'emergency', %s, %s, now(), now(), '跌倒未起身',"
                    " 'Fall, no recovery', %s, now(), now())",
                    [(a, e, RULE, ROUTE, d, Jsonb({"event": "fall_detected"})) for a, e, d in chunk],
                )
                cur.executemany(
                    "INSERT INTO alert_outbox (alert_id, reason, severity, route, created_at)"
                    " VALUES (%s, 'raised', 'emergency', %s, now())",
                    [(a, ROUTE) for a, _, _ in chunk],
                )
                cur.execute("NOTIFY eldercare_outbox")
            last = time.time()
            first = first or last
            ids += [a for a, _, _ in chunk]
    return ids, first, last


_PROGRESS = """
WITH d AS (SELECT id, delivered_at, acked_at FROM dispatches WHERE alert_id = ANY(%s) AND step = 0)
SELECT (SELECT count(*) FROM d), (SELECT count(delivered_at) FROM d), (SELECT count(acked_at) FROM d),
       (SELECT count(*) FROM dispatch_attempts t JOIN d ON d.id = t.dispatch_id)
"""

_RESULT = """
SELECT d.channel, extract(epoch FROM d.delivered_at)::float8,
       extract(epoch FROM d.delivered_at - o.created_at)::float8
FROM dispatches d JOIN alert_outbox o ON o.id = d.outbox_id
WHERE d.alert_id = ANY(%s) AND d.step = 0 AND d.delivered_at IS NOT NULL
"""


def run_throughput(
    db_url: str,
    plan: ThroughputPlan,
    per_alert: int,
    cpu_groups: dict[str, Sequence[int]],
    set_mode: Callable[..., None],
    console: Console,
) -> ThroughputRun:
    """Write the backlog, wait for every dispatch of its first step to be delivered, measure.

    ``per_alert``: dispatches each alert makes (its route's first step, configured channels);
    ``set_mode(hotline, mode, **parameters)``: the outage's switch (``BenchHotlines.set_mode``).
    """
    pairs = prepare(db_url, plan)
    expected = plan.alerts * per_alert
    groups = dict(cpu_groups)
    with contextlib.suppress(psycopg.Error):
        groups["postgres"] = postgres_pids(db_url)
    if plan.outage:
        set_mode(plan.outage, "error_500", times=0)  # 0: until switched back
    meter = CpuMeter(groups)
    ids, first, last = write_outbox(db_url, pairs, plan.batch)
    outage_over = plan.outage is None
    progress = (0, 0, 0, 0)
    changed = time.monotonic()
    with psycopg.connect(db_url, autocommit=True) as conn:
        with Live(Text(""), console=console, transient=True, refresh_per_second=4) as live:
            while True:
                if not outage_over and plan.outage and time.time() - first >= plan.outage_s:
                    set_mode(plan.outage, "ok")
                    outage_over = True
                row = conn.execute(_PROGRESS, (ids,)).fetchone()
                now = (int(row[0]), int(row[1]), int(row[2]), int(row[3])) if row else progress
                if now != progress:
                    progress, changed = now, time.monotonic()
                made, delivered, acked, attempts = progress
                live.update(
                    Text(
                        f"throughput, {plan.label}: {delivered:,}/{expected:,} delivered "
                        f"({made:,} dispatches made, {attempts:,} attempts, {acked:,} acknowledged), "
                        f"{time.time() - first:.1f} s"
                    )
                )
                if outage_over and delivered >= expected:
                    break
                if time.monotonic() - changed > NO_PROGRESS_S:
                    break
                time.sleep(0.1)
        cpu = meter.read()
        rows = conn.execute(_RESULT, (ids,)).fetchall()
        final = conn.execute(_PROGRESS, (ids,)).fetchone()
        conn.execute(
            "UPDATE alerts SET state = 'resolved', closed_at = now(), updated_at = now() WHERE id = ANY(%s)",
            (ids,),
        )
    _, _, acked, attempts = (int(x) for x in final) if final else progress
    ends = [r[1] for r in rows]
    latencies = sorted(float(r[2]) for r in rows)
    by_channel: dict[str, int] = {}
    for channel, _, _ in rows:
        by_channel[channel] = by_channel.get(channel, 0) + 1
    latency = (
        {q: quantile(latencies, x) for q, x in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))}
        | {"max": latencies[-1]}
        if latencies
        else {}
    )
    return ThroughputRun(
        plan=plan,
        dispatches=expected,
        delivered=len(rows),
        attempts=attempts,
        written_s=last - first,
        seconds=(max(ends) - first) if ends else 0.0,
        latency=latency,
        cpu=cpu,
        acknowledged=acked,
        delivered_by_channel=by_channel,
    )

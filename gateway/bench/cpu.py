"""CPU accounting per group of processes (workers, PostgreSQL, broker, publishers)."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Sequence
from urllib.parse import urlsplit

import psutil
import psycopg


class CpuMeter:
    """CPU used by groups of processes since it was made, in % of one core (100 = one core).

    Each process's last reading is kept, so one that has exited still counts what it used
    up to the last ``read`` before it exited.
    """

    def __init__(self, groups: dict[str, Sequence[int]]) -> None:
        self._procs: dict[str, list[psutil.Process]] = {}
        for name, pids in groups.items():
            procs = []
            for pid in pids:
                with contextlib.suppress(psutil.Error):
                    procs.append(psutil.Process(pid))
            self._procs[name] = procs
        self._t0 = time.monotonic()
        self._last: dict[int, float] = {}
        self._base = {p.pid: self._cpu(p) for ps in self._procs.values() for p in ps}
        self._total0 = psutil.cpu_times()

    def _cpu(self, p: psutil.Process) -> float:
        try:
            t = p.cpu_times()
            # Children reaped by this process count too (none for our workers and brokers).
            self._last[p.pid] = t.user + t.system
        except psutil.Error:
            pass
        return self._last.get(p.pid, 0.0)

    def read(self) -> dict[str, float]:
        """% of one core per group since start, and 'machine' (all processes, same unit)."""
        dt = time.monotonic() - self._t0
        if dt < 0.25:
            return {}  # too short to mean anything
        out = {
            name: 100.0 * sum(self._cpu(p) - self._base[p.pid] for p in ps) / dt
            for name, ps in self._procs.items()
        }
        t1 = psutil.cpu_times()
        busy0 = sum(self._total0) - self._total0.idle - getattr(self._total0, "iowait", 0.0)
        busy1 = sum(t1) - t1.idle - getattr(t1, "iowait", 0.0)
        total = sum(t1) - sum(self._total0)
        # Same unit as the groups: 100 = one core busy (all cores busy = 100 x cores).
        cores = os.cpu_count() or 1
        out["machine"] = 100.0 * cores * (busy1 - busy0) / total if total > 0 else 0.0
        # Everything else busy meanwhile: other users' processes, PostgreSQL's background
        # processes, the kernel. A large figure means the run was disturbed.
        out["rest"] = max(0.0, out["machine"] - sum(v for k, v in out.items() if k != "machine"))
        return out


def postgres_pids(url: str) -> list[int]:
    """The server processes serving the bench database (the workers' connections)."""
    name = urlsplit(url).path.lstrip("/")
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        ).fetchall()
    return [int(r[0]) for r in rows]

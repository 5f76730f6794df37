"""Where a worker's time goes: py-spy recording a worker, and a summary of its profile."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

#: Where a worker's time goes: the innermost frame from one of these names a sample's owner.
_PROFILE_BUCKETS: tuple[tuple[str, str], ...] = (
    ("interpret (orjson decode, validation, units)", "devices/"),
    ("store writer (our code: rows, receipts, SQL)", "store/writer"),
    ("psycopg (driver: COPY encoding, waiting for the server)", "psycopg/"),
    ("prometheus_client (metrics, /metrics scrapes)", "prometheus_client/"),
    ("worker (queue, batching, acks, metrics calls)", "ingest/"),
    ("paho-mqtt (socket, packet parsing, callbacks, acks)", "paho/"),
    ("queue / threading", "threading.py"),
)


_PROCESSES = re.compile(r'(?:process \d+:"[^"]*";)+')
_PROCESS_IDS = re.compile(r'process (\d+):"')


class PySpy:
    """py-spy recording one process into a file of collapsed stacks (with threads) until stopped."""

    def __init__(self, pid: int, out: Path, wall: bool = False) -> None:
        """Start recording ``pid`` (RuntimeError when py-spy is not installed).

        ``wall``: every thread at every sample, waiting or not (where a thread's wall time
        goes, e.g. a batch writer waiting for PostgreSQL); else only the thread holding the GIL.
        """
        self.out = out
        exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        if not Path(exe).exists():
            raise RuntimeError("py-spy is not installed (pip install py-spy): no profile")
        # --gil: only the thread holding the GIL is sampled (the worker is GIL-bound, so that
        # is where its one core goes); --nonblocking: the worker is not paused per sample;
        # --subprocesses: the committer process too.
        cmd = [exe, "record", "--pid", str(pid), "--rate", "100", "--format", "raw"]
        cmd += ["--threads", "--idle" if wall else "--gil", "--nonblocking", "--subprocesses"]
        cmd += ["--output", str(out)]
        self._proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def stop(self) -> str:
        """Stop recording; the profile's text (RuntimeError with py-spy's words when it wrote none)."""
        self._proc.send_signal(signal.SIGINT)
        try:
            _, err = self._proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            _, err = self._proc.communicate()
        if not self.out.exists():
            raise RuntimeError(f"py-spy wrote no profile: {err.decode(errors='replace')[-300:]}")
        return self.out.read_text()


def profile_summary(raw: str, top: int = 12, rate: float = 100.0) -> list[str]:
    """Lines saying where the samples of a py-spy raw (collapsed, --threads) profile went."""
    total = 0
    threads: dict[str, int] = {}
    buckets: dict[str, int] = {}
    selfs: dict[str, int] = {}
    for line in raw.splitlines():
        stack, _, n_text = line.rpartition(" ")
        if not stack or not n_text.isdigit():
            continue
        n = int(n_text)
        # With --subprocesses each stack starts with its processes, parent first (the
        # committer is a child); a command line may hold ';', so they are cut off first.
        process = ""
        if procs := _PROCESSES.match(stack):
            process = f"process {_PROCESS_IDS.findall(procs.group(0))[-1]} "
            stack = stack[procs.end() :]
        frames = stack.split(";")
        total += n
        head = frames[0]
        thread = process + (head.split(": ", 1)[1] if ": " in head else "(unnamed)")
        threads[thread] = threads.get(thread, 0) + n
        owner = "other"
        for f in reversed(frames[1:]):
            label = next((lbl for lbl, needle in _PROFILE_BUCKETS if needle in f), None)
            if label:
                owner = label
                break
        buckets[owner] = buckets.get(owner, 0) + n
        leaf = frames[-1].rsplit(":", 1)[0] + ")"
        selfs[leaf] = selfs.get(leaf, 0) + n
    if not total:
        return ["no samples"]

    def by_count(d: dict[str, int]) -> list[tuple[str, int]]:
        return sorted(d.items(), key=lambda kv: -kv[1])

    out = [f"{total} samples at {rate:g}/s per busy thread = {total / rate:.1f} thread-seconds"]
    out += [f"thread {k}: {v / rate:.1f} s ({v / total:.0%})" for k, v in by_count(threads)[:8]]
    out += [f"{v / total:4.0%} {k}" for k, v in by_count(buckets)]
    out.append("hottest frames (self time):")
    out += [f"  {v / total:5.1%} {k}" for k, v in by_count(selfs)[:top]]
    return out


def callee_shares(raw: str, within: str, caller: str) -> tuple[int, int, dict[str, int]]:
    """Where a caller's time goes, in a py-spy raw profile.

    Returns the samples whose stack holds a frame containing ``within`` (e.g. the batch
    writer), those of them that also hold ``caller`` (e.g. the rules' batch step), and those
    by the function ``caller`` was running then (the frame right below it, file and line cut).
    """
    total = inside = 0
    by: dict[str, int] = {}
    for line in raw.splitlines():
        stack, _, n_text = line.rpartition(" ")
        if not stack or not n_text.isdigit() or within not in stack:
            continue
        n = int(n_text)
        total += n
        frames = stack.split(";")
        at = next((i for i, f in enumerate(frames) if caller in f), None)
        if at is None:
            continue
        inside += n
        callee = frames[at + 1].split(" (", 1)[0] if at + 1 < len(frames) else "(itself)"
        by[callee] = by.get(callee, 0) + n
    return total, inside, by

"""Where a worker's time goes: a summary of a py-spy profile."""

from __future__ import annotations

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
        frames = stack.split(";")
        total += n
        head = frames[0]
        thread = head.split(": ", 1)[1] if ": " in head else "(unnamed)"
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
    out += [f"thread {k}: {v / rate:.1f} s ({v / total:.0%})" for k, v in by_count(threads)[:5]]
    out += [f"{v / total:4.0%} {k}" for k, v in by_count(buckets)]
    out.append("hottest frames (self time):")
    out += [f"  {v / total:5.1%} {k}" for k, v in by_count(selfs)[:top]]
    return out

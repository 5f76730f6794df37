"""The batch writer: one transaction per batch of interpreted MQTT messages.

Given messages in arrival order, it deduplicates on (publisher, msg_id), COPYs readings,
events and dead letters, updates device status, counts rejections per device, runs the
batch step (the worker wires the rules there: their decisions commit with the data that
caused them), and commits. The caller acknowledges the messages only after
``write`` returns. A batch the database refuses for a data reason is split so one bad
message can never poison the others: the bad one becomes a dead letter on its own.

Dead letters are stored per message, never per item, so what a message names does not
change what it costs:
- One ``dead_letters`` row per reason of a message. ``item_count`` is how many items
  (metrics, samples, sub-devices) that reason refused; ``detail`` names the first few
  offenders; ``device_id`` is the device they belong to when they are all one device, else
  the publisher (a hub naming several sub-devices).
- The raw payload is stored once per message, on its first row (the lowest id); its other
  rows (other reasons) carry ``payload`` NULL, the same ``received_at``, ``topic``,
  ``msg_id`` and ``payload_size``.
- Per-device counts (``device_rejections``) stay per item and per device, except that
  sub-devices a hub names that are not registered or not attached to it are counted against
  the hub: a hub cannot make rows appear for ids of its choosing.
- Each publisher has a budget of dead-letter bytes per window (payload, detail and a fixed
  overhead per row; default 256 KiB an hour). A rejected message that does not fit is not
  stored; its rejections are still counted per reason, and the message is counted as
  ``dead_letter_budget`` in ``device_rejections`` and in ``BatchResult.unstored_dead_letters``.
  So no device can fill the disk: at most 6 MiB a day each, whatever it sends.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any, Protocol

import orjson
import psycopg
from psycopg.types.json import Jsonb

from eldercare.devices.records import (
    CLOCK_SKEW,
    DUPLICATE,
    NOT_ATTACHED_TO_HUB,
    SCHEMA,
    UNKNOWN_DEVICE,
    DeviceEvent,
    Interpretation,
    Reading,
    Rejection,
)
from eldercare.gateway.store.receipts import receipt_day

log = logging.getLogger(__name__)

#: Dead letters keep the raw payload up to this size (the contract's maximum message size).
PAYLOAD_CAP = 64 * 1024

#: Dead-letter reason for a message the gateway itself failed to process (a bug, not the
#: device's fault); an addition to the contract's list, which names only device faults.
INTERNAL_ERROR = "internal_error"

#: last_seen is written at most this often per device (seconds), to spare the devices table
#: a row update per message; a change of online state is always written at once.
LAST_SEEN_RESOLUTION_S = 30.0

#: Dead-letter bytes a publisher may write per window (see the module docstring).
DEAD_LETTER_BUDGET_BYTES = 256 * 1024
DEAD_LETTER_WINDOW_S = 3600.0
#: What a dead-letter row costs beside its payload and detail, for the budget (row header,
#: the other columns, index entries).
DEAD_LETTER_ROW_BYTES = 200
#: ``device_rejections`` reason of a rejected message not stored for want of budget.
OVER_BUDGET = "dead_letter_budget"
#: Devices a multi-device dead letter names in its detail; the rest are counted.
DETAIL_DEVICES = 3
#: Reasons that name a sub-device the hub has no business with: counted against the hub.
_HUB_FAULTS = frozenset({UNKNOWN_DEVICE, NOT_ATTACHED_TO_HUB})


@dataclass(frozen=True, slots=True)
class StoredBatch:
    """What a batch stored that decisions may follow from, in the batch's transaction.

    Readings and events flagged ``clock_skew`` are left out (they never feed rules);
    out-of-range readings never get this far. ``late`` ones are included, flagged.
    Duplicates (redeliveries) are not in it: a message is decided on once.
    """

    readings: Sequence[Reading]
    events: Sequence[DeviceEvent]
    #: What the step's ``read_ahead`` returned for this batch (None without one).
    ahead: Callable[[], Any] | None = None


class BatchStep(Protocol):
    """Work done in each batch's transaction once its data is written (the rules, wired by the
    worker: the writer never imports them). What it writes commits or rolls back with the
    batch; if it raises, the batch is split to isolate the message behind it. It may return
    counts of what it decided, for metrics. ``concurrent_batches`` (optional attribute, default
    False): the step is safe with two batches in their transactions at once.

    ``read_ahead(cur, elder_ids)`` (optional): queue the reads every batch's step needs on
    ``cur`` (its own cursor) and return what gets their answer once sent (``StoredBatch.ahead``).
    The writer sends them in one round trip with the batch's first statement, at the start of
    its transaction (elder ids of the batch's readings and events, duplicates included)."""

    def __call__(self, cur: psycopg.Cursor[Any], stored: StoredBatch) -> Mapping[str, int] | None: ...


@dataclass(slots=True)
class Received:
    """One MQTT message as the worker holds it until its batch commits."""

    topic: str
    payload: bytes
    received_at: float
    interp: Interpretation
    mid: int = 0
    qos: int = 1
    generation: int = 0
    retained: bool = False


@dataclass(slots=True)
class BatchResult:
    """What one committed batch did (for metrics and the periodic log line)."""

    messages: int = 0
    stored_messages: int = 0
    readings: int = 0
    events: int = 0
    duplicates: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    #: What the batch step decided, by kind (alerts opened, timers scheduled ...).
    decisions: Counter[str] = field(default_factory=Counter)
    skewed: int = 0
    isolated_failures: int = 0
    repeated: int = 0  # readings a message repeated (same device, metric, time), not stored
    unstored_dead_letters: int = 0  # rejected messages over their publisher's budget

    def add(self, other: BatchResult) -> None:
        self.messages += other.messages
        self.stored_messages += other.stored_messages
        self.readings += other.readings
        self.events += other.events
        self.duplicates += other.duplicates
        self.rejected.update(other.rejected)
        self.decisions.update(other.decisions)
        self.skewed += other.skewed
        self.isolated_failures += other.isolated_failures
        self.repeated += other.repeated
        self.unstored_dead_letters += other.unstored_dead_letters


def _dead_letter_row(
    reason: str, rejections: list[Rejection], source: str | None
) -> tuple[str, str | None, str, int]:
    """(reason, device_id, detail, item count) of a message's dead letter for one reason."""
    count = sum(r.count for r in rejections)
    if len(rejections) == 1:
        only = rejections[0]
        return reason, only.device_id or source, only.detail, count
    shown = rejections[:DETAIL_DEVICES]
    detail = "; ".join(
        r.detail if r.device_id and r.device_id in r.detail else f"{r.device_id}: {r.detail}" for r in shown
    )
    rest = count - sum(r.count for r in shown)
    if rest:
        detail += f" (+{rest} more)"
    return reason, source, detail, count


def _dumps(obj: object) -> str:
    return orjson.dumps(obj).decode()


def _utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


# The batch's receipt keys as one text parameter: "device\tmsg_id\tday\tanywhere" lines,
# ``anywhere`` non-empty for a message with no time of its own (looked up in every day).
_CLAIM_KEYS = (
    "WITH k AS ("
    " SELECT split_part(x, E'\\t', 1) AS device_id, split_part(x, E'\\t', 2) AS msg_id,"
    " split_part(x, E'\\t', 3)::date AS day, split_part(x, E'\\t', 4) <> '' AS anywhere"
    " FROM unnest(string_to_array(%s, E'\\n')) WITH ORDINALITY AS u(x, n) ORDER BY n)"
)
_CLAIM = (
    _CLAIM_KEYS + ", ins AS (INSERT INTO message_receipts (device_id, msg_id, day, received_at)"
    " SELECT device_id, msg_id, day, %s FROM k ON CONFLICT DO NOTHING RETURNING device_id, msg_id)"
    " SELECT device_id, msg_id FROM k EXCEPT SELECT device_id, msg_id FROM ins"
)
_CLAIM_ANY_DAY = (
    _CLAIM_KEYS + ", seen AS (SELECT device_id, msg_id FROM k WHERE anywhere AND EXISTS ("
    " SELECT 1 FROM message_receipts r WHERE r.device_id = k.device_id AND r.msg_id = k.msg_id)),"
    " ins AS (INSERT INTO message_receipts (device_id, msg_id, day, received_at)"
    " SELECT device_id, msg_id, day, %s FROM k"
    " WHERE NOT EXISTS (SELECT 1 FROM seen WHERE seen.device_id = k.device_id AND seen.msg_id = k.msg_id)"
    " ON CONFLICT DO NOTHING RETURNING device_id, msg_id)"
    " SELECT device_id, msg_id FROM k EXCEPT SELECT device_id, msg_id FROM ins"
)


def _elder_ids(batch: Sequence[Received]) -> set[str]:
    ids = {r.elder_id for msg in batch for r in msg.interp.readings if r.elder_id}
    ids.update(e.elder_id for msg in batch for e in msg.interp.events if e.elder_id)
    return ids


class BatchWriter:
    """Writes batches through one connection; ``write`` is one transaction (or a few, split)."""

    def __init__(
        self,
        flavour: str,
        step: BatchStep | None = None,
        dead_letter_budget: int = DEAD_LETTER_BUDGET_BYTES,
        dead_letter_window_s: float = DEAD_LETTER_WINDOW_S,
    ) -> None:
        self.flavour = flavour
        self.step = step
        self.dead_letter_budget = dead_letter_budget
        self.dead_letter_window_s = dead_letter_window_s
        self._last_seen_written: dict[str, float] = {}
        # publisher -> (window number, dead-letter bytes written in it), committed batches only
        self._dead_letter_spent: dict[str | None, tuple[int, int]] = {}

    def write(self, conn: psycopg.Connection, batch: Sequence[Received]) -> BatchResult:
        """Store a batch in one transaction; on a refusal, isolate the message(s) behind it.

        Raises psycopg.OperationalError (connection trouble) for the caller to retry the
        same batch later; nothing of it is then committed. Any other failure (the store
        refusing a value, the rule set raising) splits the batch in halves until the message
        that causes it stands alone; that one becomes a dead letter, the others are stored.
        """
        try:
            return self._write_once(conn, batch)
        except psycopg.OperationalError:
            raise
        except Exception as exc:
            if conn.closed or conn.broken:
                raise psycopg.OperationalError(str(exc)) from exc
            if len(batch) == 1:
                return self._write_refused(conn, batch[0], exc)
            log.warning(
                "batch refused, isolating messages",
                extra={"error": type(exc).__name__, "messages": len(batch)},
            )
            result = BatchResult()
            middle = len(batch) // 2
            result.add(self.write(conn, batch[:middle]))
            result.add(self.write(conn, batch[middle:]))
            return result

    def _write_refused(self, conn: psycopg.Connection, msg: Received, exc: Exception) -> BatchResult:
        """A message refused on its own becomes a dead letter, payload kept.

        The store refusing a value (a NUL in a string, say) is the device's doing: reason
        ``schema``. Anything else (the rule set raising) is ours: reason ``internal_error``.
        """
        if isinstance(exc, psycopg.Error):
            reason, why = SCHEMA, f"refused by the store ({exc.sqlstate or type(exc).__name__})"
        else:
            reason, why = INTERNAL_ERROR, f"processing failed ({type(exc).__name__})"
            log.error("message could not be processed", exc_info=exc, extra={"topic": msg.topic})
        source = msg.interp.source_id
        interp = Interpretation(source_id=source, msg_id=msg.interp.msg_id)
        interp.rejections.append(Rejection(reason, why, source))
        refused = Received(msg.topic, msg.payload, msg.received_at, interp, msg.mid, msg.qos, msg.generation)
        result = self._write_once(conn, [refused])
        result.isolated_failures = 1
        return result

    def _write_once(self, conn: psycopg.Connection, batch: Sequence[Received]) -> BatchResult:
        result = BatchResult(messages=len(batch))
        read_ahead = getattr(self.step, "read_ahead", None)
        with conn.transaction(), conn.cursor() as cur, conn.cursor() as side:
            ahead = None
            if read_ahead is None:
                existing = self._claim_receipts(cur, batch)
            else:
                with conn.pipeline():  # the step's reads and the receipts: one round trip
                    ahead = read_ahead(side, _elder_ids(batch))
                    existing = self._claim_receipts(cur, batch)
            readings: list = []
            rule_readings: list = []
            events: list = []
            rule_events: list = []
            dead: list = []
            counts: Counter[tuple[str, date, str]] = Counter()
            seen: dict[str, float] = {}
            statuses: dict[str, tuple] = {}
            in_batch: set[tuple[str, str]] = set()
            spent: dict[str | None, tuple[int, int]] = {}  # budgets as this batch leaves them

            day = _utc(batch[-1].received_at).date()  # counts go to the batch's (UTC) day
            for msg in batch:
                it = msg.interp
                key = (it.source_id, it.msg_id) if it.source_id and it.msg_id else None
                if key is not None and it.accepted:
                    if key in existing or key in in_batch:
                        result.duplicates += 1
                        counts[(key[0], day, DUPLICATE)] += 1
                        continue
                    in_batch.add(key)
                if it.accepted:
                    result.stored_messages += 1
                if it.rejections:
                    self._dead_letter(msg, day, result, counts, dead, spent)
                if it.repeated:
                    result.repeated += it.repeated
                    if it.source_id:
                        counts[(it.source_id, day, DUPLICATE)] += it.repeated
                if it.skewed:
                    result.skewed += it.skewed
                    if it.source_id:
                        counts[(it.source_id, day, CLOCK_SKEW)] += it.skewed
                if it.readings:
                    readings.extend(it.readings)
                    if it.skewed:
                        rule_readings.extend(r for r in it.readings if CLOCK_SKEW not in r.flags)
                    else:
                        rule_readings.extend(it.readings)
                for ev in it.events:
                    events.append((*ev[:4], Jsonb(ev.details, dumps=_dumps), ev.flags, it.msg_id))
                    if CLOCK_SKEW not in ev.flags:
                        rule_events.append(ev)
                for device_id in it.seen_devices:
                    seen[device_id] = msg.received_at
                for st in it.statuses:
                    statuses[st.device_id] = (
                        st.time,
                        st.online,
                        st.battery,
                        st.firmware,
                        st.signal_dbm,
                    )

            result.readings = len(readings)
            result.events = len(events)
            if readings:
                self._copy_readings(cur, readings)
            if events:
                with cur.copy(
                    "COPY device_events (time, device_id, elder_id, kind, details, flags, msg_id) FROM STDIN"
                ) as copy:
                    for row in events:
                        copy.write_row(row)
            if dead:
                with cur.copy(
                    "COPY dead_letters (received_at, topic, device_id, msg_id, reason, detail,"
                    " item_count, payload, payload_size, payload_truncated) FROM STDIN"
                ) as copy:
                    for row in dead:
                        copy.write_row(row)
            if counts:
                self._count_rejections(cur, counts)
            self._update_devices(cur, seen, statuses)
            if self.step is not None:
                decided = self.step(cur, StoredBatch(rule_readings, rule_events, ahead))
                if decided:
                    result.decisions.update(decided)
        self._spend(spent)  # committed: the bytes are on disk
        return result

    def _dead_letter(
        self,
        msg: Received,
        day: date,
        result: BatchResult,
        counts: Counter[tuple[str, date, str]],
        dead: list,
        spent: dict[str | None, tuple[int, int]],
    ) -> None:
        """Count a message's rejections; queue its dead-letter rows if its publisher's budget allows."""
        it = msg.interp
        source = it.source_id
        by_reason: dict[str, list[Rejection]] = {}
        for rej in it.rejections:
            result.rejected[rej.reason] += rej.count
            owner = rej.device_id or source
            if source and owner != source and rej.reason in _HUB_FAULTS:
                owner = source
            if owner:
                counts[(owner, day, rej.reason)] += rej.count
            by_reason.setdefault(rej.reason, []).append(rej)
        rows = [_dead_letter_row(reason, rejections, source) for reason, rejections in by_reason.items()]
        payload = msg.payload[:PAYLOAD_CAP]
        cost = len(payload) + sum(len(detail) + DEAD_LETTER_ROW_BYTES for _, _, detail, _ in rows)
        if not self._afford(source, msg.received_at, cost, spent):
            result.unstored_dead_letters += 1
            if source:
                counts[(source, day, OVER_BUDGET)] += 1
            return
        received_at, size = _utc(msg.received_at), len(msg.payload)
        for i, (reason, device_id, detail, count) in enumerate(rows):
            dead.append(
                (
                    received_at,
                    msg.topic,
                    device_id,
                    it.msg_id,
                    reason,
                    detail,
                    count,
                    payload if i == 0 else None,  # the payload once per message
                    size,
                    size > PAYLOAD_CAP,
                )
            )

    def _afford(
        self, source: str | None, received_at: float, cost: int, spent: dict[str | None, tuple[int, int]]
    ) -> bool:
        """Take ``cost`` bytes from the publisher's budget for this window, if it has them."""
        window = int(received_at // self.dead_letter_window_s)
        at, used = spent.get(source) or self._dead_letter_spent.get(source) or (window, 0)
        if at != window:  # a new window: a fresh budget
            used = 0
        if used + cost > self.dead_letter_budget:
            return False
        spent[source] = (window, used + cost)
        return True

    def _spend(self, spent: dict[str | None, tuple[int, int]]) -> None:
        """Record what a committed batch took from the budgets; forget windows long gone."""
        if not spent:
            return
        budgets = self._dead_letter_spent
        budgets.update(spent)
        if len(budgets) > 10_000:
            latest = max(at for at, _ in budgets.values())
            self._dead_letter_spent = {k: v for k, v in budgets.items() if v[0] >= latest}

    def _claim_receipts(self, cur: psycopg.Cursor, batch: Sequence[Received]) -> set[tuple[str, str]]:
        """Insert the batch's (publisher, msg_id) receipts; return the keys already there.

        Each receipt goes to its message's day (``receipts.receipt_day``): one probe of that
        day's unique index. A message with no time of its own is looked up in every day kept
        first, then filed under its reception day. The keys travel as one text parameter
        (ids cannot hold tabs or newlines), which costs far less to send than arrays dumped
        element by element; only the duplicates come back, and there are normally none.
        """
        days: dict[tuple[str, str], tuple[date, bool]] = {}
        for msg in batch:
            it = msg.interp
            if not (it.source_id and it.msg_id and it.accepted):
                continue
            key = (it.source_id, it.msg_id)
            if key not in days:  # a repeat in the batch is the same message: the first decides
                received = _utc(msg.received_at)
                own = receipt_day(it, received)
                days[key] = (received.date(), True) if own is None else (own, False)
        if not days:
            return set()
        ordered = sorted(days)  # a fixed lock order, so two workers never deadlock
        lines = "\n".join(
            f"{d}\t{m}\t{days[d, m][0].isoformat()}\t{'t' if days[d, m][1] else ''}" for d, m in ordered
        )
        any_day = any(anywhere for _, anywhere in days.values())
        cur.execute(_CLAIM_ANY_DAY if any_day else _CLAIM, (lines, _utc(batch[-1].received_at)))
        return {(row[0], row[1]) for row in cur.fetchall()}

    def _copy_readings(self, cur: psycopg.Cursor, readings: list) -> None:
        """COPY readings; unflagged ones (nearly all) without the flags column, which defaults."""
        flagged = [r for r in readings if r.flags]
        with cur.copy(
            "COPY observations (time, device_id, elder_id, metric, value) FROM STDIN (FORMAT BINARY)"
        ) as copy:
            copy.set_types(["timestamptz", "text", "text", "text", "float8"])
            write = copy.write_row
            for row in readings:
                if not row.flags:
                    write(row[:5])
        if flagged:
            with cur.copy(
                "COPY observations (time, device_id, elder_id, metric, value, flags)"
                " FROM STDIN (FORMAT BINARY)"
            ) as copy:
                copy.set_types(["timestamptz", "text", "text", "text", "float8", "text[]"])
                for row in flagged:
                    copy.write_row(row)
        # The plain store's rollup marks come from a trigger on observations (migration 0004).

    def _count_rejections(self, cur: psycopg.Cursor, counts: Counter[tuple[str, date, str]]) -> None:
        ordered = sorted(counts)
        cur.execute(
            "INSERT INTO device_rejections (device_id, day, reason, count)"
            " SELECT * FROM unnest(%s::text[], %s::date[], %s::text[], %s::bigint[])"
            " ON CONFLICT (device_id, day, reason)"
            " DO UPDATE SET count = device_rejections.count + EXCLUDED.count",
            (
                [k[0] for k in ordered],
                [k[1] for k in ordered],
                [k[2] for k in ordered],
                [counts[k] for k in ordered],
            ),
        )

    def _update_devices(
        self, cur: psycopg.Cursor, seen: dict[str, float], statuses: dict[str, tuple]
    ) -> None:
        """Write last_seen (coarsely) and status fields of the devices the batch heard from."""
        due = {
            d: t for d, t in seen.items() if t - self._last_seen_written.get(d, 0.0) >= LAST_SEEN_RESOLUTION_S
        }
        if due:
            ordered = sorted(due)
            cur.execute(
                "UPDATE devices d SET last_seen = GREATEST(d.last_seen, u.t), online = true"
                " FROM unnest(%s::text[], %s::timestamptz[]) AS u(id, t)"
                " WHERE d.device_id = u.id",
                (ordered, [_utc(due[d]) for d in ordered]),
            )
            self._last_seen_written.update(due)
        if statuses:
            ordered = sorted(statuses)
            cols = list(zip(*(statuses[d] for d in ordered), strict=True))
            cur.execute(
                "UPDATE devices d SET status_at = u.t,"
                " online = COALESCE(u.online, d.online),"
                " battery = COALESCE(u.battery, d.battery),"
                " firmware = COALESCE(u.firmware, d.firmware),"
                " signal_dbm = COALESCE(u.signal, d.signal_dbm)"
                " FROM unnest(%s::text[], %s::timestamptz[], %s::bool[], %s::real[], %s::text[],"
                " %s::real[]) AS u(id, t, online, battery, firmware, signal)"
                " WHERE d.device_id = u.id AND (d.status_at IS NULL OR d.status_at <= u.t)",
                (ordered, *[list(c) for c in cols]),
            )
            for d in ordered:  # an online flip must not wait for the last_seen resolution
                self._last_seen_written.pop(d, None)

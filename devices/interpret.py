"""Turn one MQTT message into readings, events, status and rejections, without any I/O.

This is the functional core of ingestion (device-mqtt.md v1). ``interpret`` is called from the
MQTT callback for every message, so it is written for speed: orjson decode, plain type checks
on the decoded values and precompiled regexes, a per-metric table built once per ``Policy``,
and no model objects built per metric. Bad input never raises: every problem becomes a
``Rejection`` with a reason from ``records.REASONS``.

Resolved details the spec leaves open (the module's tests pin each one):
- Order of whole-message checks: too_large, topic (schema), registry (unknown_device,
  device_disabled), JSON (malformed_json). An unregistered publisher's payload is not decoded.
- A hub topic whose id is registered but not as a hub is ``unknown_device`` ("no such hub").
- A hub message naming sub-devices that are unregistered or attached elsewhere: the first
  ``NAMED_STRANGERS`` get a Rejection each, under their own id; the rest one Rejection per
  reason under the hub's id, with their count. So what a hub names costs one dict lookup per
  id and a bounded number of Rejections, however many ids it names.
- Telemetry may carry ``metrics`` (with ``ts``), ``samples``, or both; both are processed.
  ``too_old`` and sample-level ``schema`` count samples (a top-level ``metrics`` block is one
  sample); metric-level reasons count metrics; hub-level reasons count sub-devices.
- ``battery`` in telemetry also yields a StatusUpdate (online=None) stamped with the message's
  ``ts`` when that was accepted, else the receive time.
- An optional field sent as ``null`` counts as absent; a required one (msg_id, ts, event,
  cmd_id, a metric value) does not. An invalid optional ``msg_id`` (status, ack) is ignored.
- A status with no known fields is a heartbeat: an all-None StatusUpdate, so every message
  ends with something accepted or at least one rejection.
- A retained message (a status or Last Will replayed by the broker) is not evidence the device
  is alive now: it never puts the device into ``seen_devices``.
- A reading with a clock_skew flag never feeds rules, so it never makes a message immediate.
- An empty payload on ``status`` is a device clearing its retained status (contract v1): not
  an error, not dead-lettered. It becomes a field-less StatusUpdate at the receive time (so
  every message still means something) and never marks the device seen. It is judged after
  the registry checks, like any message: from a disabled device it is ``device_disabled``.
- A reading is identified by (device, metric, time). A message that repeats one (a buffered
  upload sending a sample twice) keeps the first, in the order read (``samples`` in order,
  then the top-level ``metrics``), whatever the later values; the repeats are dropped and
  counted in ``Interpretation.repeated`` (stored as ``duplicate`` in device_rejections, like a
  redelivered message: counted, not stored twice, not dead-lettered). Clock-skewed readings
  are exempt: they all carry the receive time, which is not theirs. Readings of different
  messages are never compared here (each message is its own record; redeliveries of one are
  caught by msg_id).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from eldercare.devices.catalog import Catalog
from eldercare.devices.records import (
    CLOCK_SKEW,
    DEVICE_DISABLED,
    LATE,
    MALFORMED_JSON,
    NOT_ATTACHED_TO_HUB,
    OUT_OF_RANGE,
    SCHEMA,
    TOO_LARGE,
    TOO_OLD,
    UNKNOWN_DEVICE,
    UNKNOWN_EVENT,
    UNKNOWN_METRIC,
    UNKNOWN_UNIT,
    DeviceEvent,
    Interpretation,
    Reading,
    Rejection,
    StatusUpdate,
)
from eldercare.devices.registry import DeviceInfo, Registry
from eldercare.devices.topics import (
    COMMAND_ACK,
    DEVICE_ID_RE,
    HUB,
    MSG_ID_RE,
    STATUS,
    TELEMETRY,
    parse_topic,
)
from eldercare.devices.units import Conversion

COMMAND_ACK_KIND = "command_ack"  # DeviceEvent.kind of a commands/ack message
MAX_SAMPLES = 1000
# Offenders named in a Rejection's detail; the rest are counted as "(+N more)".
DETAIL_OFFENDERS = 3
# Sub-devices a hub message may name that are unregistered or attached elsewhere, each with a
# Rejection of its own (the ids the ingest worker re-reads from the registry, in case one was
# registered a moment ago); the rest are counted in one Rejection under the hub.
NAMED_STRANGERS = 100

# RFC 3339 date-time with a mandatory offset ("T" may be "t" or a space, RFC 3339 5.6 note).
_RFC3339 = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]+)?"
    r"(?:[Zz]|[+-][0-9]{2}:[0-9]{2})"
)
_MSG_ID_OK = MSG_ID_RE.fullmatch
_DEVICE_ID_OK = DEVICE_ID_RE.fullmatch
_EVENT_ENVELOPE = frozenset({"msg_id", "ts", "event"})
_ACK_ENVELOPE = frozenset({"msg_id", "ts"})
_MISSING: Any = object()
_JSON_TYPES = {
    bool: "bool",
    int: "number",
    float: "number",
    str: "string",
    list: "array",
    dict: "object",
}
_INF = math.inf

# Per-metric row of the hot loop: low, high, canonical unit, alternatives, emergency band.
_Rule = tuple[float, float, str, dict[str, Conversion], float, float]


@dataclass(frozen=True)
class Policy:
    """What the interpreter accepts: the catalog plus size and clock limits."""

    catalog: Catalog
    max_payload: int = 65536  # bytes; larger payloads are too_large
    skew_tolerance_s: float = 300  # a ts further ahead gets the receive time and clock_skew
    horizon_s: float = 30 * 86400  # a ts further back is too_old (the buffer horizon)
    late_after_s: float = 600  # a ts further back is flagged late
    # Built once from the catalog, so the per-metric loop does one dict lookup.
    _rules: dict[str, _Rule] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        rules = {
            name: (
                m.low,
                m.high,
                m.unit,
                dict(m.alternatives),
                -_INF if m.emergency_below is None else m.emergency_below,
                _INF if m.emergency_above is None else m.emergency_above,
            )
            for name, m in self.catalog.metrics.items()
        }
        object.__setattr__(self, "_rules", rules)


def interpret(
    topic: str,
    payload: bytes,
    received_at: float,
    registry: Registry,
    policy: Policy,
    retained: bool = False,
) -> Interpretation:
    """Everything one MQTT message means: what to store, what to dead-letter, what to flush."""
    run = _Run(received_at, registry, policy, retained)
    try:
        run.message(topic, payload)
        return run.finish()
    except Exception as exc:  # a bug must cost one message, never the ingestion loop
        out = run.out
        return Interpretation(
            source_id=out.source_id,
            msg_id=out.msg_id,
            rejections=[Rejection(SCHEMA, f"internal: {type(exc).__name__}", out.source_id)],
        )


class _Run:
    """The state of interpreting one message."""

    __slots__ = ("_now_dt", "_rejects", "now", "out", "policy", "registry", "retained")

    def __init__(self, received_at: float, registry: Registry, policy: Policy, retained: bool) -> None:
        self.now = received_at
        self.registry = registry
        self.policy = policy
        self.retained = retained
        self.out = Interpretation()
        self._now_dt: datetime | None = None
        # (reason, device_id) -> [count, first offenders]; only built on the first rejection
        self._rejects: dict[tuple[str, str | None], list[Any]] | None = None

    # -- whole message -------------------------------------------------------------------

    def message(self, topic: str, payload: bytes) -> None:
        out = self.out
        parsed = parse_topic(topic) if type(topic) is str else None
        source = parsed.id if parsed is not None else None
        out.source_id = source
        size = len(payload)
        if size > self.policy.max_payload:
            self.reject(TOO_LARGE, source, f"payload {size} bytes > {self.policy.max_payload}")
            return
        if parsed is None:
            self.reject(SCHEMA, None, "topic: not eldercare/v1/{devices|hubs}/<id>/<channel>")
            return
        kind, ident, channel = parsed
        info = self.registry.get(ident)
        if info is None:
            self.reject(UNKNOWN_DEVICE, ident, f"{kind} {ident} is not registered")
            return
        if kind == HUB and not info.is_hub:
            self.reject(UNKNOWN_DEVICE, ident, f"no hub {ident}: registered as a {info.type}")
            return
        if not info.enabled:
            self.reject(DEVICE_DISABLED, ident, f"{kind} {ident} is disabled")
            return
        if not payload and channel == STATUS:
            # A device clearing its retained status (MQTT deletes a retained message with an
            # empty one): not an error. A field-less status at the receive time, so the message
            # still means something; no sign of life, since anyone allowed could clear it.
            out.statuses.append(StatusUpdate(ident, self.now_dt(), None))
            return
        try:
            body = orjson.loads(payload)
        except orjson.JSONDecodeError as exc:
            self.reject(MALFORMED_JSON, ident, f"not UTF-8 JSON: {_clip(str(exc), 120)}")
            return
        if type(body) is not dict:
            self.reject(MALFORMED_JSON, ident, f"not a JSON object but {_json_type(body)}")
            return

        msg_id = body.get("msg_id")
        if msg_id is not None and type(msg_id) is str and _MSG_ID_OK(msg_id):
            out.msg_id = msg_id
        if channel == STATUS:
            self.status(info, body)
        elif channel == COMMAND_ACK:
            self.command_ack(info, body)
        elif out.msg_id is None:
            what = "missing" if msg_id is None else "must be 1-64 chars of [A-Za-z0-9._:-]"
            self.reject(SCHEMA, ident, f"msg_id: {what}")
            return
        elif kind == HUB:
            self.hub(info, body, channel)  # marks its sub-devices and itself as seen
            return
        elif channel == TELEMETRY:
            self.telemetry(info, body)
        else:
            self.event(info, body)
        if out.accepted and not self.retained:
            out.seen_devices.append(ident)

    def finish(self) -> Interpretation:
        out = self.out
        if self._rejects:
            for (reason, device_id), (count, offenders) in self._rejects.items():
                detail = "; ".join(offenders)
                if count > len(offenders):
                    detail += f" (+{count - len(offenders)} more)"
                out.rejections.append(Rejection(reason, detail, device_id, count))
        return out

    def counted(self, key: tuple[str, str | None]) -> bool:
        """Count one more refused item if ``key`` already names all the offenders it shows."""
        entry = self._rejects.get(key) if self._rejects else None
        if entry is None or len(entry[1]) < DETAIL_OFFENDERS:
            return False
        entry[0] += 1
        return True

    def reject(self, reason: str, device_id: str | None, what: str) -> None:
        """Count one refused item under (reason, device_id), naming the first few."""
        if self._rejects is None:
            self._rejects = {}
        entry = self._rejects.get((reason, device_id))
        if entry is None:
            self._rejects[(reason, device_id)] = [1, [what]]
        else:
            entry[0] += 1
            if len(entry[1]) < DETAIL_OFFENDERS:
                entry[1].append(what)

    # -- hubs ----------------------------------------------------------------------------

    def hub(self, hub: DeviceInfo, body: dict[str, Any], channel: str) -> None:
        hub_id = hub.device_id
        devices = body.get("devices")
        if type(devices) is not dict or not devices:
            what = "missing" if devices is None else "must be a non-empty object"
            self.reject(SCHEMA, hub_id, f"devices: {what}")
            return
        out = self.out
        lookup = self.registry.lookup
        strangers = 0
        for sub_id, sub in devices.items():
            info = lookup(sub_id)
            if info is None or info.hub_id != hub_id:
                # Cheap per id, whatever a hub names: one dict lookup, and a description
                # only for the first few of each rejection.
                if info is None and not _DEVICE_ID_OK(sub_id):
                    key = (SCHEMA, hub_id)
                else:
                    strangers += 1
                    reason = UNKNOWN_DEVICE if info is None else NOT_ATTACHED_TO_HUB
                    key = (reason, sub_id if strangers <= NAMED_STRANGERS else hub_id)
                if not self.counted(key):
                    self.reject(*key, _stranger(key[0], sub_id, hub_id))
            elif not info.enabled:
                self.reject(DEVICE_DISABLED, sub_id, f"device {sub_id} is disabled")
            elif type(sub) is not dict:
                self.reject(SCHEMA, sub_id, f"payload: must be an object, not {_json_type(sub)}")
            else:
                before = len(out.readings) + len(out.events) + len(out.statuses)
                if channel == TELEMETRY:
                    self.telemetry(info, sub)
                else:
                    self.event(info, sub)
                accepted = len(out.readings) + len(out.events) + len(out.statuses) > before
                if accepted and not self.retained:
                    out.seen_devices.append(sub_id)
        if out.seen_devices:
            out.seen_devices.append(hub_id)

    # -- telemetry -----------------------------------------------------------------------

    def telemetry(self, info: DeviceInfo, body: dict[str, Any]) -> None:
        device_id = info.device_id
        metrics = body.get("metrics", _MISSING)
        samples = body.get("samples", _MISSING)
        if metrics is _MISSING and samples is _MISSING:
            self.reject(SCHEMA, device_id, "telemetry: needs metrics (with ts) or samples")
            return
        # (metric, time) of this device's readings so far, when the message can repeat one.
        taken: set[tuple[str, datetime]] | None = None if samples is _MISSING else set()
        if samples is not _MISSING:
            if type(samples) is not list or not samples:
                self.reject(SCHEMA, device_id, "samples: must be a non-empty list")
            elif len(samples) > MAX_SAMPLES:
                self.reject(SCHEMA, device_id, f"samples: {len(samples)} > {MAX_SAMPLES}")
                return
            else:
                for i, sample in enumerate(samples):
                    if type(sample) is dict:
                        self.sample(
                            info,
                            sample.get("ts", _MISSING),
                            sample.get("metrics", _MISSING),
                            f"samples[{i}].",
                            taken,
                        )
                    else:
                        self.reject(SCHEMA, device_id, f"samples[{i}]: must be an object")
        stamp = None
        if metrics is not _MISSING:
            stamp = self.sample(info, body.get("ts", _MISSING), metrics, "", taken)
        battery = body.get("battery")
        if battery is not None:
            if _is_percent(battery):
                self.out.statuses.append(
                    StatusUpdate(device_id, stamp or self.now_dt(), None, float(battery))
                )
            else:
                self.reject(SCHEMA, device_id, "battery: must be a number 0-100")

    def sample(
        self,
        info: DeviceInfo,
        ts: Any,
        metrics: Any,
        where: str,
        taken: set[tuple[str, datetime]] | None = None,
    ) -> datetime | None:
        """Readings of one {ts, metrics} block; the time used, or None if it was refused.

        ``taken``: (metric, time) of the device's readings earlier in the message; a reading
        already there is a repeat, dropped and counted (the first one wins).
        """
        device_id = info.device_id
        if type(metrics) is not dict or not metrics:
            what = "missing" if metrics is _MISSING else "must be a non-empty object"
            self.reject(SCHEMA, device_id, f"{where}metrics: {what}")
            return None
        when = self.when(ts, device_id, where)
        if when is None:
            return None
        time, flag = when
        skewed = flag == CLOCK_SKEW
        elder_id = info.elder_id
        rules = self.policy._rules
        out = self.out
        readings = out.readings
        before = len(readings)
        append = readings.append
        for name, raw in metrics.items():
            rule = rules.get(name)
            if rule is None:
                self.reject(UNKNOWN_METRIC, device_id, f"{where}{_clip(name, 64)!r}")
                continue
            low, high, unit, alternatives, emergency_below, emergency_above = rule
            kind = type(raw)
            if kind is int or kind is float:
                value = float(raw)
            elif kind is dict:
                canonical = self.converted(name, raw, unit, alternatives, device_id, where)
                if canonical is None:
                    continue
                value = canonical
            else:
                self.reject(SCHEMA, device_id, f"{where}{name}: {_json_type(raw)} is not a number")
                continue
            if not low <= value <= high:
                self.reject(OUT_OF_RANGE, device_id, f"{where}{name}={value:.6g} outside {low:g}-{high:g}")
                continue
            if taken is not None and not skewed:  # a skewed reading's time is not its own
                key = (name, time)
                if key in taken:
                    out.repeated += 1
                    continue
                taken.add(key)
            append(Reading(time, device_id, elder_id, name, value, [flag] if flag else []))
            if (value < emergency_below or value > emergency_above) and not skewed:
                out.immediate = True
        if skewed:
            out.skewed += len(readings) - before
        return time

    def converted(
        self,
        name: str,
        raw: dict[str, Any],
        unit: str,
        alternatives: dict[str, Conversion],
        device_id: str,
        where: str,
    ) -> float | None:
        """The canonical value of {"value": n, "unit": u}, or None (rejection recorded)."""
        value: Any = raw.get("value")
        kind = type(value)
        if kind is not int and kind is not float:
            self.reject(SCHEMA, device_id, f"{where}{name}.value: {_json_type(value)} is not a number")
            return None
        given = raw.get("unit")
        if given == unit:
            return float(value)
        if type(given) is not str:
            self.reject(SCHEMA, device_id, f"{where}{name}.unit: must be a unit code")
            return None
        convert = alternatives.get(given)
        if convert is None:
            accepted = ", ".join([unit, *alternatives])
            self.reject(
                UNKNOWN_UNIT, device_id, f"{where}{name}: unit {_clip(given, 32)!r} (accepted: {accepted})"
            )
            return None
        return convert(value)

    # -- events, command acks, status ----------------------------------------------------

    def event(self, info: DeviceInfo, body: dict[str, Any]) -> None:
        device_id = info.device_id
        kind = body.get("event")
        if type(kind) is not str:
            what = "missing" if kind is None else "must be a string"
            self.reject(SCHEMA, device_id, f"event: {what}")
            return
        if kind not in self.policy.catalog.event_types:
            self.reject(UNKNOWN_EVENT, device_id, f"event {_clip(kind, 64)!r}")
            return
        when = self.when(body.get("ts", _MISSING), device_id, "")
        if when is None:
            return
        confidence = body.get("confidence")
        if confidence is not None and not _is_fraction(confidence):
            self.reject(SCHEMA, device_id, "confidence: must be a number 0-1")
            return
        details = {k: v for k, v in body.items() if k not in _EVENT_ENVELOPE}
        self.add_event(info, kind, details, when)

    def command_ack(self, info: DeviceInfo, body: dict[str, Any]) -> None:
        device_id = info.device_id
        cmd_id = body.get("cmd_id")
        if type(cmd_id) is not str or not _MSG_ID_OK(cmd_id):
            what = "missing" if cmd_id is None else "must be 1-64 chars of [A-Za-z0-9._:-]"
            self.reject(SCHEMA, device_id, f"cmd_id: {what}")
            return
        ts = body.get("ts")
        when = (self.now_dt(), None) if ts is None else self.when(ts, device_id, "")
        if when is None:
            return
        details = {k: v for k, v in body.items() if k not in _ACK_ENVELOPE}
        self.add_event(info, COMMAND_ACK_KIND, details, when)

    def add_event(
        self, info: DeviceInfo, kind: str, details: dict[str, Any], when: tuple[datetime, str | None]
    ) -> None:
        time, flag = when
        out = self.out
        out.events.append(
            DeviceEvent(time, info.device_id, info.elder_id, kind, details, [flag] if flag else [])
        )
        if flag == CLOCK_SKEW:
            out.skewed += 1
        out.immediate = True

    def status(self, info: DeviceInfo, body: dict[str, Any]) -> None:
        device_id = info.device_id
        ts = body.get("ts")
        when = (self.now_dt(), None) if ts is None else self.when(ts, device_id, "")
        if when is None:
            return
        online = body.get("online")
        battery = body.get("battery")
        firmware = body.get("firmware")
        signal = body.get("signal_dbm")
        good = bad = 0
        if online is not None:
            if type(online) is bool:
                good += 1
            else:
                bad += 1
                online = None
                self.reject(SCHEMA, device_id, "online: must be true or false")
        if battery is not None:
            if _is_percent(battery):
                good += 1
                battery = float(battery)
            else:
                bad += 1
                battery = None
                self.reject(SCHEMA, device_id, "battery: must be a number 0-100")
        if firmware is not None:
            if type(firmware) is str:
                good += 1
            else:
                bad += 1
                firmware = None
                self.reject(SCHEMA, device_id, "firmware: must be a string")
        if signal is not None:
            if type(signal) is int or type(signal) is float:
                good += 1
                signal = float(signal)
            else:
                bad += 1
                signal = None
                self.reject(SCHEMA, device_id, "signal_dbm: must be a number")
        if good or not bad:  # nothing at all is a heartbeat; only bad fields is a rejection
            self.out.statuses.append(StatusUpdate(device_id, when[0], online, battery, firmware, signal))

    # -- time ----------------------------------------------------------------------------

    def now_dt(self) -> datetime:
        if self._now_dt is None:
            self._now_dt = datetime.fromtimestamp(self.now, UTC)
        return self._now_dt

    def when(self, raw: Any, device_id: str, where: str) -> tuple[datetime, str | None] | None:
        """The UTC time and flag for a ``ts`` value, or None (rejection recorded)."""
        kind = type(raw)
        parsed: datetime | None = None
        if kind is int:
            epoch = raw / 1000
        elif kind is str and _RFC3339.fullmatch(raw) is not None:
            try:
                parsed = datetime.fromisoformat(raw.upper())
                epoch = parsed.timestamp()
            except (ValueError, OverflowError):
                self.reject(SCHEMA, device_id, f"{where}ts: {_clip(raw, 40)!r} is not a date-time")
                return None
        else:
            what = "missing" if raw is _MISSING or raw is None else "must be RFC 3339 with offset or epoch ms"
            self.reject(SCHEMA, device_id, f"{where}ts: {what}")
            return None
        policy = self.policy
        now = self.now
        if epoch > now + policy.skew_tolerance_s:
            return self.now_dt(), CLOCK_SKEW
        if epoch < now - policy.horizon_s:
            self.reject(TOO_OLD, device_id, f"{where}ts {_iso(epoch)} is past the buffer horizon")
            return None
        flag = LATE if epoch < now - policy.late_after_s else None
        if parsed is None:
            return datetime.fromtimestamp(epoch, UTC), flag
        return parsed.astimezone(UTC), flag


def _stranger(reason: str, sub_id: str, hub_id: str) -> str:
    """What is wrong with a sub-device a hub has no business with."""
    if reason == SCHEMA:
        return f"devices: {_clip(sub_id, 70)!r} is not a device id"
    if reason == UNKNOWN_DEVICE:
        return f"device {sub_id} is not registered"
    return f"{sub_id} is not attached to {hub_id}"


def _is_percent(value: Any) -> bool:
    kind = type(value)
    return (kind is int or kind is float) and 0 <= value <= 100


def _is_fraction(value: Any) -> bool:
    kind = type(value)
    return (kind is int or kind is float) and 0 <= value <= 1


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if value is _MISSING:
        return "missing"
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _iso(epoch: float) -> str:
    try:
        return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds")
    except (ValueError, OverflowError, OSError):
        return f"{epoch:.0f}s since 1970"

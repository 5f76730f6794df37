"""The devices table: the registry the worker caches, its change feed, and admin."""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import datetime

import psycopg
from psycopg.rows import tuple_row

from eldercare.devices.registry import DeviceInfo, Registry

log = logging.getLogger(__name__)

CHANNEL = "eldercare_devices"
#: An id ``recheck`` read is not read again for this long (unless a notification names it).
RECHECK_EVERY_S = 5.0
#: Ids ``recheck`` reads per batch at most; a registration a moment old is never that many.
RECHECK_AT_MOST = 500
#: ``recheck`` also reports a change the feed made this recently to one of its ids.
CHANGED_WITHIN_S = 10.0
#: Bound of each of the feed's memories (ids checked, ids changed), whatever devices send.
MAX_REMEMBERED = 100_000
_INF = math.inf
_COLUMNS = "device_id, type, elder_id, hub_id, enabled"


def load_registry(conn: psycopg.Connection) -> Registry:
    """Read every registered device into a registry."""
    with conn.cursor(row_factory=tuple_row) as cur:
        cur.execute(f"SELECT {_COLUMNS} FROM devices")
        return Registry(DeviceInfo(*row) for row in cur)


def load_device(conn: psycopg.Connection, device_id: str) -> DeviceInfo | None:
    """Read one device, or None if it is not registered."""
    return load_devices(conn, [device_id])[device_id]


def load_devices(conn: psycopg.Connection, device_ids: Collection[str]) -> dict[str, DeviceInfo | None]:
    """Read some devices in one query: each id maps to its DeviceInfo, or None if unregistered."""
    found: dict[str, DeviceInfo | None] = dict.fromkeys(device_ids)
    with conn.cursor(row_factory=tuple_row) as cur:
        cur.execute(f"SELECT {_COLUMNS} FROM devices WHERE device_id = ANY(%s)", (list(device_ids),))
        for row in cur:
            found[row[0]] = DeviceInfo(*row)
    return found


class RegistryFeed:
    """Keeps a Registry current from LISTEN/NOTIFY on the devices table.

    ``current`` is changed in place, entry by entry (see ``Registry``), so a registration
    costs the same whatever the fleet size and readers on other threads never lock; it is
    replaced whole only when the feed reloads everything after a lost connection, since
    notifications sent meanwhile are gone.

    Ids the interpreter did not find (or found attached elsewhere) are re-read by ``recheck``,
    once per batch in one query, and remembered for ``RECHECK_EVERY_S`` (a short negative
    cache), so a hub naming thousands of strangers costs one bounded query, not one per id per
    message. A notification about a device drops what was remembered about it.
    """

    def __init__(
        self,
        conninfo: str,
        on_change: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.conninfo = conninfo
        self.current = Registry()
        self._on_change = on_change
        self._clock = clock
        self._stop = threading.Event()
        self._lock = threading.Lock()  # one writer of ``current`` at a time; guards the two dicts below
        # Ids read by ``recheck`` -> when; oldest first (a refreshed id is re-inserted at the end).
        self._checked: dict[str, float] = {}
        # Ids whose entry changed -> when (clock of ``recheck``), to spot changes a recheck
        # would otherwise miss: the feed applied them after the interpreter looked.
        self._changed_at: dict[str, float] = {}
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = 30.0) -> None:
        """Load the registry and start following changes; raise if the first load fails."""
        conn = self._listen()
        try:
            self.current = load_registry(conn)
        except BaseException:
            conn.close()
            raise
        self._thread = threading.Thread(target=self._run, args=(conn,), name="registry-feed", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop following changes (waits briefly for the feed's thread)."""
        self._stop.set()
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(2.0)

    def _listen(self) -> psycopg.Connection:
        """A connection that LISTENs: opened before any load, so no change falls in between."""
        conn = psycopg.connect(self.conninfo, autocommit=True)
        conn.execute(f"LISTEN {CHANNEL}")
        return conn

    def _run(self, first: psycopg.Connection) -> None:
        conn: psycopg.Connection | None = first
        outage = False  # said once per outage, not once per attempt
        while not self._stop.is_set():
            try:
                if conn is None:
                    conn = self._listen()
                    registry = load_registry(conn)  # changes made while we were away
                    with self._lock:
                        self.current = registry
                        self._checked.clear()
                    self._changed()
                    if outage:
                        log.info("registry feed connected again; registry reloaded")
                        outage = False
                with conn:
                    while not self._stop.is_set():
                        changed = {n.payload for n in conn.notifies(timeout=0.5)}
                        if changed:
                            self._reload(conn, changed, forget=True)
            except psycopg.Error as exc:
                if self._stop.is_set():
                    return
                if not outage:
                    log.warning(
                        "registry feed lost its connection, retrying every second",
                        extra={"error": type(exc).__name__},
                    )
                    outage = True
                self._stop.wait(1.0)
            finally:
                if conn is not None:
                    conn.close()
                conn = None

    def _reload(
        self,
        conn: psycopg.Connection,
        device_ids: Collection[str],
        now: float | None = None,
        forget: bool = False,
    ) -> bool:
        """Re-read some devices (one query) into ``current``; True if anything changed.

        ``forget``: drop what ``recheck`` remembered about them (they were notified).
        """
        rows = load_devices(conn, device_ids)
        now = self._clock() if now is None else now
        with self._lock:
            if forget:
                for device_id in device_ids:
                    self._checked.pop(device_id, None)
            changed = self.current.apply(rows)
            for device_id in changed:
                self._changed_at[device_id] = now
            if len(self._changed_at) > MAX_REMEMBERED:
                self._changed_at = {d: t for d, t in self._changed_at.items() if now - t < CHANGED_WITHIN_S}
        if changed:
            self._changed()
        return bool(changed)

    def recheck(self, conn: psycopg.Connection, device_ids: set[str], now: float) -> bool:
        """Read devices the interpreter did not find (or found attached elsewhere) from the table.

        Closes the window between a registration and its notification: a message from a
        device registered a moment ago is not refused. Each id is read at most once per
        ``RECHECK_EVERY_S``, all due ids of a batch in one query, at most
        ``RECHECK_AT_MOST`` of them (the rest wait for a later batch), so whatever a message
        names, this costs the batch at most one bounded query. True if the registry changed
        for any of the ids, by this read or by the feed a moment ago (after the interpreter
        may have looked): the caller then interprets those messages again.
        """
        with self._lock:
            checked = self._checked
            recent = any(now - self._changed_at.get(d, -_INF) < CHANGED_WITHIN_S for d in device_ids)
            due = []
            for device_id in device_ids:
                if now - checked.get(device_id, -_INF) >= RECHECK_EVERY_S:
                    due.append(device_id)
                    if len(due) >= RECHECK_AT_MOST:
                        break
            for device_id in due:
                checked.pop(device_id, None)  # re-inserted at the end: the dict stays oldest first
                checked[device_id] = now
            self._forget_oldest(now)
        if not due:
            return recent
        return self._reload(conn, due, now) or recent

    def _forget_oldest(self, now: float) -> None:
        """Drop expired entries, and the oldest beyond MAX_REMEMBERED (caller holds the lock)."""
        checked = self._checked
        excess = len(checked) - MAX_REMEMBERED
        for device_id, when in list(itertools.islice(checked.items(), max(excess, 0) + 64)):
            if excess <= 0 and now - when < RECHECK_EVERY_S:
                break
            del checked[device_id]
            excess -= 1

    def _changed(self) -> None:
        if self._on_change:
            self._on_change()


@dataclass(frozen=True, slots=True)
class DeviceRow:
    """A device as ``eldercare devices list`` shows it."""

    device_id: str
    type: str
    elder_id: str | None
    hub_id: str | None
    enabled: bool
    online: bool
    last_seen: datetime | None
    battery: float | None


def add_device(
    conn: psycopg.Connection,
    device_id: str,
    type_: str,
    elder_id: str | None = None,
    hub_id: str | None = None,
    password_hash: str | None = None,
) -> None:
    """Register a device (creating its pseudonymous elder if new)."""
    with conn.transaction():
        if elder_id:
            conn.execute("INSERT INTO elders (elder_id) VALUES (%s) ON CONFLICT DO NOTHING", (elder_id,))
        conn.execute(
            "INSERT INTO devices (device_id, type, elder_id, hub_id, password_hash)"
            " VALUES (%s, %s, %s, %s, %s)",
            (device_id, type_, elder_id, hub_id, password_hash),
        )


def set_enabled(conn: psycopg.Connection, device_id: str, enabled: bool) -> bool:
    """Enable or disable a device; False if there is no such device."""
    with conn.transaction():
        cur = conn.execute("UPDATE devices SET enabled = %s WHERE device_id = %s", (enabled, device_id))
        return cur.rowcount == 1


def list_devices(conn: psycopg.Connection, elder_id: str | None = None, limit: int = 200) -> list[DeviceRow]:
    """Registered devices, newest first, optionally of one elder."""
    with conn.cursor(row_factory=tuple_row) as cur:
        cur.execute(
            "SELECT device_id, type, elder_id, hub_id, enabled, online, last_seen, battery"
            " FROM devices WHERE (%(e)s::text IS NULL OR elder_id = %(e)s)"
            " ORDER BY created_at DESC, device_id LIMIT %(n)s",
            {"e": elder_id, "n": limit},
        )
        return [DeviceRow(*row) for row in cur]


def broker_accounts(conn: psycopg.Connection) -> list[tuple[str, str]]:
    """(device id, password hash) of every enabled device with a password, by id."""
    rows = conn.execute(
        "SELECT device_id, password_hash FROM devices"
        " WHERE enabled AND password_hash IS NOT NULL ORDER BY device_id"
    ).fetchall()
    return [(device_id, password_hash) for device_id, password_hash in rows]

"""The devices table: the registry snapshot the worker caches, its change feed, and admin."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import psycopg
from psycopg.rows import tuple_row

from eldercare.devices.registry import DeviceInfo, Registry

log = logging.getLogger(__name__)

CHANNEL = "eldercare_devices"
RECHECK_EVERY_S = 5.0
_COLUMNS = "device_id, type, elder_id, hub_id, enabled"


def load_registry(conn: psycopg.Connection) -> Registry:
    """Read every registered device into an immutable snapshot."""
    with conn.cursor(row_factory=tuple_row) as cur:
        cur.execute(f"SELECT {_COLUMNS} FROM devices")
        return Registry(DeviceInfo(*row) for row in cur)


def load_device(conn: psycopg.Connection, device_id: str) -> DeviceInfo | None:
    """Read one device, or None if it is not registered."""
    with conn.cursor(row_factory=tuple_row) as cur:
        cur.execute(f"SELECT {_COLUMNS} FROM devices WHERE device_id = %s", (device_id,))
        row = cur.fetchone()
    return DeviceInfo(*row) if row else None


class RegistryFeed:
    """Keeps a Registry current from LISTEN/NOTIFY on the devices table.

    ``current`` is replaced whole (never mutated), so readers on other threads always see a
    consistent snapshot without locks. After a lost connection the feed reconnects and
    reloads everything, since notifications sent meanwhile are gone.
    """

    def __init__(self, conninfo: str, on_change: Callable[[], None] | None = None) -> None:
        self.conninfo = conninfo
        self.current = Registry()
        self._on_change = on_change
        self._stop = threading.Event()
        self._lock = threading.Lock()  # serialises replacements of ``current``
        self._checked: dict[str, float] = {}
        self._thread = threading.Thread(target=self._run, name="registry-feed", daemon=True)

    def start(self, timeout: float = 30.0) -> None:
        """Load the registry and start following changes; raise if the first load fails."""
        with psycopg.connect(self.conninfo) as conn:
            self.current = load_registry(conn)
        self._thread.start()

    def stop(self) -> None:
        """Stop following changes (waits briefly for the feed's thread)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(2.0)

    def _run(self) -> None:
        first = True
        while not self._stop.is_set():
            try:
                with psycopg.connect(self.conninfo, autocommit=True) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    if not first:  # changes made while we were away
                        self.current = load_registry(conn)
                        self._changed()
                    first = False
                    while not self._stop.is_set():
                        changed = {n.payload for n in conn.notifies(timeout=0.5)}
                        if changed:
                            self._reload(conn, changed)
            except psycopg.Error as exc:
                if self._stop.is_set():
                    return
                log.warning(
                    "registry feed lost its connection, retrying",
                    extra={"error": type(exc).__name__},
                )
                self._stop.wait(1.0)

    def _reload(self, conn: psycopg.Connection, device_ids: set[str]) -> bool:
        """Re-read some devices into a new snapshot; True if anything changed."""
        with self._lock:
            registry = self.current
            for device_id in device_ids:
                registry = registry.replace(device_id, load_device(conn, device_id))
            changed = any(registry.get(d) != self.current.get(d) for d in device_ids)
            self.current = registry
        if changed:
            self._changed()
        return changed

    def recheck(self, conn: psycopg.Connection, device_ids: set[str], now: float) -> bool:
        """Read devices the snapshot does not know (yet) straight from the table.

        Closes the window between a registration and its notification: a message from a
        device registered a moment ago is not refused. Each id is read at most once per
        ``RECHECK_EVERY_S``, so a device publishing under an unknown id costs no query per
        message. True if the snapshot changed.
        """
        due = {d for d in device_ids if now - self._checked.get(d, 0.0) >= RECHECK_EVERY_S}
        if not due:
            return False
        for device_id in due:
            self._checked[device_id] = now
        if len(self._checked) > 10_000:
            self._checked = {d: t for d, t in self._checked.items() if now - t < RECHECK_EVERY_S}
        return self._reload(conn, due)

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

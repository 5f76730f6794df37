"""The ingest lease: at most one worker at a time consumes the deployment's MQTT session.

Why one session, not a shared subscription: a subscription is what makes the broker take
(and acknowledge) a device's message, so it must survive a broker restart. Mosquitto 2.0
persists a persistent session's plain subscriptions but not its ``$share`` ones: after a
restart, until the worker has reconnected and subscribed again, messages to the group are
acknowledged to the device and dropped (measured: 42,042 of 90,000 lost in one restart).
A plain subscription on a persistent session is restored with the session, so every
acknowledged message is queued for the gateway.

Several workers therefore run as hot standbys: each asks PostgreSQL for a session-level
advisory lock named after the MQTT client id; the holder connects, the others wait. The lock
goes with its connection, so a holder that crashes (kill -9, lost host) releases it at once
and a standby takes over the same session, with whatever the broker holds for it. A holder
whose lease connection breaks (database restart) keeps going and re-takes the lease as soon
as the database answers; it stands down only when another worker holds it by then.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import zlib

import psycopg

log = logging.getLogger(__name__)

#: First key of our advisory locks (``pg_advisory_lock(int, int)``): "ECIG".
LOCK_CLASS = 0x45434947
#: How often a held lease's connection is checked, and a lost one re-tried.
CHECK_EVERY_S = 1.0
RETRY_EVERY_S = 0.2


def lease_key(client_id: str) -> int:
    """The second advisory-lock key of the lease for this MQTT client id (stable across runs)."""
    return zlib.crc32(client_id.encode()) - 2**31  # a signed 32-bit int, as PostgreSQL wants


class LeaseLost(Exception):
    """Another worker holds the lease now: this one must stop consuming."""


class IngestLease:
    """A PostgreSQL advisory lock held on a connection of its own for as long as we run.

    ``acquire`` waits until this worker holds the lease; ``watch`` (a thread) checks the
    connection and re-takes the lease after a database outage, setting ``lost`` when another
    worker got it first.
    """

    def __init__(self, conninfo: str, client_id: str) -> None:
        self.conninfo = conninfo
        self.key = lease_key(client_id)
        self.client_id = client_id
        self.lost = threading.Event()
        self._conn: psycopg.Connection | None = None
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None

    def _try(self) -> bool | None:
        """True: held now; False: another worker holds it; None: the database did not answer."""
        try:
            if self._conn is None or self._conn.closed:
                self._conn = psycopg.connect(self.conninfo, autocommit=True, connect_timeout=5)
            row = self._conn.execute("SELECT pg_try_advisory_lock(%s, %s)", (LOCK_CLASS, self.key)).fetchone()
            return bool(row and row[0])
        except psycopg.Error:
            self._close()
            return None

    def acquire(self, stopping: threading.Event, poll_s: float = 1.0) -> bool:
        """Wait until the lease is ours (True) or ``stopping`` is set (False)."""
        said = False
        while not stopping.is_set():
            held = self._try()
            if held:
                if said:
                    log.info("took over the ingest session", extra={"client_id": self.client_id})
                self.lost.clear()
                self._start_watch()
                return True
            if not said:
                what = "the database" if held is None else "another worker to give up the ingest session"
                log.info(
                    f"standing by: waiting for {what}",
                    extra={"client_id": self.client_id},
                )
                said = True
            stopping.wait(poll_s)
        return False

    def _start_watch(self) -> None:
        self._stop.clear()
        self._watcher = threading.Thread(target=self._watch, name="ingest-lease", daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        while not self._stop.wait(CHECK_EVERY_S):
            if self._alive():
                continue
            log.warning(
                "lost the database connection holding the ingest lease; taking it again",
                extra={"client_id": self.client_id},
            )
            while not self._stop.is_set():
                held = self._try()
                if held:
                    log.info("ingest lease held again", extra={"client_id": self.client_id})
                    break
                if held is False:
                    log.warning(
                        "another worker took the ingest session: standing down",
                        extra={"client_id": self.client_id},
                    )
                    self.lost.set()
                    return
                self._stop.wait(RETRY_EVERY_S)

    def _alive(self) -> bool:
        try:
            assert self._conn is not None
            self._conn.execute("SELECT 1")
            return True
        except (psycopg.Error, AssertionError):
            self._close()
            return False

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                conn.close()

    def release(self) -> None:
        """Give the lease up (closing its connection releases the lock)."""
        self._stop.set()
        if self._watcher is not None and self._watcher is not threading.current_thread():
            self._watcher.join(5)
        self._close()

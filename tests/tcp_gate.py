"""A TCP forwarder a test can close: a service outage for one client, nobody else's.

Stopping the machine's PostgreSQL would take it away from every other test (and every other
developer on the machine); putting this gate between a worker and the server gives the
worker the same experience (connections reset, new ones refused) while the server runs on.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading

from psycopg.conninfo import conninfo_to_dict


class TcpGate:
    """Forwards 127.0.0.1:<port> to ``target`` (TCP, or a PostgreSQL socket folder); ``close()`` cuts."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._open = threading.Event()
        self._open.set()
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._stop = threading.Event()
        threading.Thread(target=self._accept, name="tcp-gate", daemon=True).start()

    def _accept(self) -> None:
        self._listener.settimeout(0.1)
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if not self._open.is_set():
                _reset(conn)  # the service is "down": refused at once
                continue
            try:
                upstream = self._connect_upstream()
            except OSError:
                _reset(conn)
                continue
            with self._lock:
                self._pairs.append((conn, upstream))
            threading.Thread(target=self._pipe, args=(conn, upstream), daemon=True).start()

    def _connect_upstream(self) -> socket.socket:
        host, port = self.target
        if host.startswith("/"):  # a Unix socket folder, as PostgreSQL names it
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(5)
            sock.connect(f"{host}/.s.PGSQL.{port}")
            sock.settimeout(None)
            return sock
        upstream = socket.create_connection((host, port), timeout=5)
        upstream.settimeout(None)
        return upstream

    def _pipe(self, a: socket.socket, b: socket.socket) -> None:
        sel = selectors.DefaultSelector()
        sel.register(a, selectors.EVENT_READ, b)
        sel.register(b, selectors.EVENT_READ, a)
        try:
            while not self._stop.is_set():
                for key, _ in sel.select(0.2):
                    data = key.fileobj.recv(65536)  # type: ignore[union-attr]
                    if not data:
                        return
                    key.data.sendall(data)
        except OSError:
            return
        finally:
            sel.close()
            _reset(a)
            _reset(b)

    def close(self) -> None:
        """The outage starts: open connections are reset, new ones refused."""
        self._open.clear()
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for a, b in pairs:
            _reset(a)
            _reset(b)

    def open(self) -> None:
        """The outage ends."""
        self._open.set()

    def stop(self) -> None:
        self._stop.set()
        self.close()
        self._listener.close()


def _reset(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()


def gate_for(db_url: str) -> TcpGate:
    """A gate in front of the PostgreSQL server ``db_url`` names."""
    parts = conninfo_to_dict(db_url)
    return TcpGate(str(parts.get("host") or "/var/run/postgresql"), int(parts.get("port") or 5432))


def gated_db_url(db_url: str, gate: TcpGate) -> str:
    """The same database, reached through the gate (a postgresql:// URL, as settings want)."""
    parts = conninfo_to_dict(db_url)
    user = parts.get("user") or "postgres"
    return f"postgresql://{user}@127.0.0.1:{gate.port}/{parts['dbname']}"

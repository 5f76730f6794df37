"""The project's own MQTT broker: Mosquitto with deploy/mosquitto's config, run on a port.

``ProjectBroker`` runs the system ``mosquitto`` binary (Debian: ``apt-get install mosquitto``)
or, where there is none, the pure-pip ``iotcore`` broker of the ``demo`` extra, in a data
folder of its own (config, password file, ACL, persistence, log). Users are added by rewriting
the password file and reloading the broker (SIGHUP): connections stay up. ``capabilities``
says what the running broker can do (MQTT 5, ``$share``, ACLs) so the worker and tests adapt.

The config and ACL are rendered from the packaged ``eldercare.deploy/mosquitto`` files, the
same ones docker-compose mounts: only the port, the paths and (as root) ``user`` change.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import logging
import os
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from importlib.resources import files
from pathlib import Path
from typing import Any, Literal, Protocol, Self

from eldercare.devices.connection import MqttAccount, mqtt_url
from eldercare.devices.credentials import (
    check_username,
    hash_password,
    is_password_hash,
    new_password,
    parse_password_file,
    render_password_file,
)

log = logging.getLogger(__name__)

#: The gateway's broker account when the configuration names no other.
GATEWAY_USER = "eldercare-gateway"
#: Account whose password changes at every reload: accepted again = reload done.
PROBE_USER = "eldercare-broker-probe"
#: Largest payload the project config lets through (mosquitto.conf: message_size_limit).
MAX_PAYLOAD = 131_072

Backend = Literal["mosquitto", "iotcore"]
#: What to run where no mosquitto is installed (Debian, Ubuntu).
INSTALL_MOSQUITTO = "apt-get install mosquitto"


# --- rendering the packaged config ------------------------------------------------------


def packaged_mosquitto_file(name: str) -> str:
    """Text of a file of the packaged ``deploy/mosquitto`` folder (``mosquitto.conf``, ``acl``)."""
    return files("eldercare.deploy").joinpath("mosquitto", name).read_text(encoding="utf-8")


def render_mosquitto_conf(
    *,
    port: int,
    bind: str | None,
    persistence_dir: str | Path,
    password_file: str | Path,
    acl_file: str | Path,
    run_as: str | None = None,
    template: str | None = None,
) -> str:
    """The project's mosquitto.conf with its listener and file paths replaced.

    Every other line (limits, persistence, logging to stdout) stays as shipped. ``run_as``
    adds a ``user`` line (needed when started as root: Mosquitto would otherwise switch to
    the ``mosquitto`` user, who cannot read a private data folder).
    """
    values = {
        "listener": f"{port} {bind}" if bind else str(port),
        "persistence_location": f"{_config_path(persistence_dir)}/",
        "password_file": _config_path(password_file),
        "acl_file": _config_path(acl_file),
    }
    text = packaged_mosquitto_file("mosquitto.conf") if template is None else template
    lines, seen = [], set()
    for line in text.splitlines():
        key = line.split(" ", 1)[0]
        if key in values:
            if key in seen:
                raise ValueError(f"mosquitto.conf template sets {key} twice")
            seen.add(key)
            line = f"{key} {values[key]}"
        lines.append(line)
    if missing := set(values) - seen:
        raise ValueError(f"mosquitto.conf template lacks {', '.join(sorted(missing))}")
    if run_as:
        lines.append(f"user {run_as}")
    return "\n".join(lines) + "\n"


def render_acl(gateway_user: str = GATEWAY_USER, *, template: str | None = None) -> str:
    """The project's ACL file with the gateway account named ``gateway_user``."""
    check_username(gateway_user)
    text = packaged_mosquitto_file("acl") if template is None else template
    lines = [f"user {gateway_user}" if line.startswith("user ") else line for line in text.splitlines()]
    if sum(line.startswith("user ") for line in lines) != 1:
        raise ValueError("ACL template must have exactly one `user` line (the gateway's)")
    return "\n".join(lines) + "\n"


def _config_path(path: str | Path) -> str:
    text = str(path)
    if any(ch.isspace() for ch in text):
        # mosquitto.conf splits values on blanks: such a path would be silently cut
        raise ValueError(f"mosquitto cannot use a path with blanks: {text!r}")
    return text


# --- accounts, capabilities ---------------------------------------------------------------


@dataclass(frozen=True)
class BrokerCapabilities:
    """What the running broker offers; the worker and tests adapt to it."""

    kind: str  # "mosquitto", "iotcore", "external"
    supports_mqtt5: bool
    supports_shared: bool  # $share/<group>/... subscriptions
    enforces_auth: bool  # wrong passwords are refused
    enforces_acl: bool  # our ACL is in force (a device is confined to its own topics)
    manages_accounts: bool  # add_user creates a real, separate broker account
    note: str = ""  # why something is missing, for logs and test skip reasons

    @property
    def mqtt_protocol(self) -> str:
        """The ELDERCARE_MQTT_PROTOCOL value to use with this broker."""
        return "5" if self.supports_mqtt5 else "3.1.1"


MOSQUITTO_CAPABILITIES = BrokerCapabilities(
    kind="mosquitto",
    supports_mqtt5=True,
    supports_shared=True,
    enforces_auth=True,
    enforces_acl=True,
    manages_accounts=True,
)
IOTCORE_CAPABILITIES = BrokerCapabilities(
    kind="iotcore",
    supports_mqtt5=False,  # only on a second listener, and without sessions
    supports_shared=False,  # use one worker on a plain subscription
    enforces_auth=False,
    enforces_acl=False,
    manages_accounts=False,
    note="iotcore broker: MQTT 3.1.1 only, no passwords, no topic ACL, no $share",
)


class Broker(Protocol):
    """What tests and the demo need from a broker, ours or an external one."""

    host: str
    port: int
    capabilities: BrokerCapabilities
    gateway: MqttAccount

    def add_user(self, name: str, password: str | None = None, *, reload: bool = True) -> MqttAccount:
        """Create (or re-password) an account; return its credentials."""
        ...

    def add_users(self, names: Iterable[str]) -> dict[str, MqttAccount]:
        """Create several accounts with random passwords (one reload)."""
        ...

    def url_for(self, user: str, password: str) -> str:
        """``mqtt://`` URL of this broker for an account."""
        ...

    def worker_env(self, shared_group: str = "ingest") -> dict[str, str]:
        """ELDERCARE_MQTT_* variables for an ingest worker using the gateway account."""
        ...

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the broker if we run it."""
        ...


def gateway_env(
    account: MqttAccount, capabilities: BrokerCapabilities, shared_group: str = "ingest"
) -> dict[str, str]:
    """ELDERCARE_MQTT_* variables for an ingest worker on a broker with these capabilities."""
    return {
        "ELDERCARE_MQTT_URL": account.url,
        "ELDERCARE_MQTT_PROTOCOL": capabilities.mqtt_protocol,
        "ELDERCARE_MQTT_SHARED_GROUP": shared_group if capabilities.supports_shared else "",
    }


# --- probing ------------------------------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def mqtt_connack(
    host: str,
    port: int,
    username: str | None = None,
    password: str | None = None,
    *,
    client_id: str | None = None,
    timeout: float = 2.0,
) -> int | None:
    """CONNACK return code of a bare MQTT 3.1.1 connect (0: accepted), None if none came.

    A dozen bytes over a plain socket: cheap enough to poll for readiness, and independent
    of any client library.
    """

    def text(value: str) -> bytes:
        raw = value.encode("utf-8")
        return struct.pack("!H", len(raw)) + raw

    flags = 0x02  # clean session
    payload = text(client_id or f"probe-{secrets.token_hex(6)}")
    if username is not None:
        flags |= 0x80
        payload += text(username)
        if password is not None:
            flags |= 0x40
            payload += text(password)
    body = text("MQTT") + bytes([4, flags]) + struct.pack("!H", 10) + payload
    packet = b"\x10" + _remaining_length(len(body)) + body
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(packet)
            reply = b""
            while len(reply) < 4:
                chunk = sock.recv(4 - len(reply))
                if not chunk:
                    return None
                reply += chunk
            if reply[0] != 0x20:
                return None
            if reply[3] == 0:
                sock.sendall(b"\xe0\x00")  # DISCONNECT: no "connection lost" noise in logs
            return reply[3]
    except OSError:
        return None


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _poll(check: Any, deadline: float, what: str, alive: Any = None) -> None:
    """Call ``check()`` until true; raise if ``alive()`` turns false or the deadline passes."""
    pause = 0.01
    while True:
        if check():
            return
        if alive is not None and not alive():
            raise RuntimeError(f"{what}: the broker process exited")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: no success before the deadline")
        time.sleep(pause)
        pause = min(pause * 2, 0.2)


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when the parent dies (Linux), so no orphan."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


# --- the broker ----------------------------------------------------------------------------


class ProjectBroker:
    """An MQTT broker of our own with the project config, on a free (or given) port.

    ::

        with ProjectBroker(tmp_path / "mqtt") as broker:
            dev = broker.add_user("w-0001")        # client_id = username = device id
            paho_client.username_pw_set(dev.username, dev.password)
            ... broker.gateway.url ...             # the gateway's account

    ``backend`` "auto" picks the system mosquitto, else iotcore (which lacks MQTT 5, ``$share``
    and ACLs: ``capabilities.note`` says so). The data folder keeps the password file, the
    gateway's password and Mosquitto's persistence, so a second start in the same folder
    resumes sessions and accounts.
    """

    def __init__(
        self,
        data_dir: str | Path,
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        gateway_user: str = GATEWAY_USER,
        gateway_password: str | None = None,
        backend: Backend | Literal["auto"] = "auto",
        mosquitto_binary: str | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.host = host
        self._auto_port = port is None
        self.port = port or free_port(host)
        self._binary = mosquitto_binary or mosquitto_path()
        self.backend: Backend = self._pick_backend(backend)
        if self.backend == "iotcore":
            note = IOTCORE_CAPABILITIES.note
            if backend == "auto":  # a fallback: say how to get the real thing
                note += f" (no mosquitto installed: {INSTALL_MOSQUITTO})"
            self.capabilities = replace(IOTCORE_CAPABILITIES, note=note)
        else:
            self.capabilities = MOSQUITTO_CAPABILITIES
        self._lock = threading.RLock()
        self._process: subprocess.Popen[bytes] | None = None
        self._iotcore: Any = None
        self._probe_password = new_password()

        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._hashes: dict[str, str] = {}
        if self.password_file.exists():
            self._hashes = parse_password_file(self.password_file.read_text(encoding="utf-8"))
            self._hashes.pop(PROBE_USER, None)
        if gateway_password is None:
            gateway_password = self._stored_gateway_password(gateway_user)
        self._hashes[check_username(gateway_user)] = hash_password(gateway_password)
        self.gateway = self._account(gateway_user, gateway_password)

    # -- paths

    @property
    def config_file(self) -> Path:
        """The rendered mosquitto.conf."""
        return self.data_dir / "mosquitto.conf"

    @property
    def password_file(self) -> Path:
        """The password file (hashes only)."""
        return self.data_dir / "passwd"

    @property
    def acl_file(self) -> Path:
        """The rendered ACL file."""
        return self.data_dir / "acl"

    @property
    def log_file(self) -> Path:
        """Where the broker's own log goes."""
        return self.data_dir / "mosquitto.log"

    # -- lifecycle

    @property
    def running(self) -> bool:
        """True while the broker we started is up."""
        if self._process is not None:
            return self._process.poll() is None
        return self._iotcore is not None

    def start(self, timeout: float = 15.0) -> Self:
        """Start the broker and return once it accepts the gateway's login."""
        with self._lock:
            if self.running:
                return self
            if self.backend == "iotcore":
                self._start_iotcore(timeout)
                return self
            for attempt in range(3):
                try:
                    self._launch(timeout)
                    break
                except _PortTaken:
                    if not self._auto_port or attempt == 2:
                        raise RuntimeError(f"port {self.port} is in use") from None
                    self.port = free_port(self.host)  # lost a race for the port: take another
                    self.gateway = self._account(self.gateway.username, self.gateway.password)
            log.info(
                "MQTT broker ready",
                extra={"broker": self.capabilities.kind, "port": self.port, "data": str(self.data_dir)},
            )
            return self

    def _launch(self, timeout: float) -> None:
        self._write_files()
        self._start_mosquitto()
        atexit.register(self.stop)
        try:
            _poll(
                lambda: self._connack(self.gateway.username, self.gateway.password) == 0,
                time.monotonic() + timeout,
                f"{self.capabilities.kind} broker on port {self.port}",
                alive=lambda: self.running,
            )
        except (RuntimeError, TimeoutError) as exc:
            tail = self._log_tail()
            self.stop()
            if "Address already in use" in tail:
                raise _PortTaken from None
            raise RuntimeError(f"{exc}; see {self.log_file}:\n{tail}") from None

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the broker (Mosquitto saves its persistence first). Safe to call twice."""
        with self._lock:
            process, self._process = self._process, None
            if process is not None and process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout)
            iot, self._iotcore = self._iotcore, None
            if iot is not None:
                iot.stop(timeout)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- accounts

    def add_user(self, name: str, password: str | None = None, *, reload: bool = True) -> MqttAccount:
        """Create or re-password account ``name`` (new random password if none); reload."""
        password = new_password() if password is None else password
        self.add_user_hash(name, hash_password(password), reload=reload)
        return self._account(name, password)

    def add_users(self, names: Iterable[str]) -> dict[str, MqttAccount]:
        """Create several accounts with random passwords and one reload."""
        accounts = {name: self.add_user(name, reload=False) for name in names}
        self.reload()
        return accounts

    def add_user_hash(self, name: str, hashed: str, *, reload: bool = True) -> None:
        """Create or update account ``name`` from a stored mosquitto hash; reload."""
        if not is_password_hash(hashed):
            raise ValueError("not a mosquitto password hash")
        with self._lock:
            self._hashes[check_username(name)] = hashed
            if reload:
                self.reload()

    def remove_user(self, name: str, *, reload: bool = True) -> None:
        """Delete account ``name`` (its open connections stay until they end); reload."""
        if name == self.gateway.username:
            raise ValueError("the gateway account cannot be removed")
        with self._lock:
            self._hashes.pop(name, None)
            if reload:
                self.reload()

    @property
    def users(self) -> frozenset[str]:
        """Account names in the password file (the gateway's included)."""
        return frozenset(self._hashes)

    def reload(self, timeout: float = 10.0) -> None:
        """Write the password file and make the running broker re-read it (SIGHUP).

        Returns once the reload has taken effect: the probe account's password changes with
        every reload, and the broker accepting the new one proves the file was re-read.
        """
        with self._lock:
            if self.backend == "iotcore" or not self.running:
                if self.backend != "iotcore":
                    self._write_files()
                return
            self._probe_password = new_password()
            self._write_files()
            assert self._process is not None
            self._process.send_signal(signal.SIGHUP)
            _poll(
                lambda: self._connack(PROBE_USER, self._probe_password) == 0,
                time.monotonic() + timeout,
                "broker reload",
                alive=lambda: self.running,
            )

    def url_for(self, user: str, password: str) -> str:
        """``mqtt://user:password@host:port`` of this broker."""
        return mqtt_url(self.host, self.port, user, password)

    def worker_env(self, shared_group: str = "ingest") -> dict[str, str]:
        """ELDERCARE_MQTT_* variables for an ingest worker using the gateway account."""
        return gateway_env(self.gateway, self.capabilities, shared_group)

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<ProjectBroker {self.capabilities.kind} {self.host}:{self.port} {state}>"

    # -- internals

    def _pick_backend(self, wanted: str) -> Backend:
        if wanted == "auto":
            return "mosquitto" if self._binary else "iotcore"
        if wanted == "mosquitto" and not self._binary:
            raise RuntimeError(f"no mosquitto binary found ({INSTALL_MOSQUITTO})")
        return wanted  # type: ignore[return-value]

    def _account(self, name: str, password: str) -> MqttAccount:
        return MqttAccount(name, password, self.host, self.port, client_id=name)

    def _connack(self, user: str, password: str) -> int | None:
        return mqtt_connack(self.host, self.port, user, password, timeout=1.0)

    def _stored_gateway_password(self, user: str) -> str:
        """The gateway's password kept in the data folder (made on first use)."""
        secret = self.data_dir / f"{user}.password"
        if secret.exists():
            return secret.read_text(encoding="utf-8").strip()
        password = new_password()
        _write_private(secret, password + "\n")
        return password

    def _write_files(self) -> None:
        conf = render_mosquitto_conf(
            port=self.port,
            bind=self.host,
            persistence_dir=self.data_dir,
            password_file=self.password_file,
            acl_file=self.acl_file,
            run_as="root" if os.geteuid() == 0 else None,
        )
        _write_private(self.config_file, conf)
        _write_private(self.acl_file, render_acl(self.gateway.username))
        hashes = {**self._hashes, PROBE_USER: hash_password(self._probe_password)}
        _write_private(self.password_file, render_password_file(hashes.items()))

    def _start_mosquitto(self) -> None:
        assert self._binary
        with self.log_file.open("ab") as log_out:
            self._process = subprocess.Popen(
                [self._binary, "-c", str(self.config_file)],
                stdin=subprocess.DEVNULL,
                stdout=log_out,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                # A process group of its own: Ctrl-C or a SIGTERM to our group (timeout,
                # systemd) must not take the broker away before the worker's last acks;
                # stop() ends it, and the prctl below if we die.
                process_group=0,
                preexec_fn=_die_with_parent,  # only a prctl call: safe before exec
            )

    def _start_iotcore(self, timeout: float) -> None:
        try:
            from iotcore import Broker as IotcoreBroker
        except ImportError:
            raise RuntimeError(
                f"no MQTT broker: install mosquitto ({INSTALL_MOSQUITTO}) or the demo extra"
                " (pip install 'eldercare-gateway[demo]', which brings iotcore)"
            ) from None

        self._iotcore = IotcoreBroker(
            port=self.port,
            listen=self.host,
            max_payload_size=MAX_PAYLOAD,
            max_inflight_count=1000,
        ).start(timeout)
        log.warning("MQTT broker: %s", IOTCORE_CAPABILITIES.note)

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


class _PortTaken(Exception):
    """The broker could not bind its port."""


def mosquitto_path() -> str | None:
    """The system ``mosquitto`` binary, or None (also looked for in /usr/sbin, off many PATHs)."""
    if found := shutil.which("mosquitto"):
        return found
    path = Path("/usr/sbin/mosquitto")
    return str(path) if os.access(path, os.X_OK) else None


def _write_private(path: Path, text: str) -> None:
    """Replace ``path`` atomically with ``text``, readable by this user only."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(text)
    os.replace(tmp, path)

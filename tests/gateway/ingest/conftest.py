"""Fixtures for end-to-end ingest tests: a broker of the test's own, workers, devices."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import psycopg
import pytest

from eldercare.gateway.broker import Broker, MqttAccount, ProjectBroker
from eldercare.gateway.store.devices import add_device
from eldercare.simulators.device_link import DeviceLink
from tests.gateway.ingest.processes import Device, WorkerProcess, scalar
from tests.waiting import wait_for


class IngestSetup:
    """A database, a broker and the means to run workers and devices against them."""

    def __init__(self, db_url: str, broker: Broker, tmp: Path) -> None:
        self.db_url = db_url
        self.broker = broker
        self.tmp = tmp
        self.group = f"g{secrets.token_hex(3)}"
        self.workers: list[WorkerProcess] = []
        self.opened: list[Device | DeviceLink] = []
        self._ids = 0

    def worker(self, slot: str = "a", *, shared: bool = False, **env: str) -> WorkerProcess:
        """An ingest worker process (not started).

        By default, as shipped: a plain subscription on the test's one session, consumed by
        whichever worker holds the lease (``slot`` only names the log). ``shared=True``: a
        ``$share`` member whose slot is its client id (same slot = same session).
        """
        client_id = f"ingest-{self.group}-{slot}" if shared else f"ingest-{self.group}"
        settings = {
            "ELDERCARE_DATABASE_URL": self.db_url,
            **self.broker.worker_env(self.group if shared else ""),
            "ELDERCARE_MQTT_CLIENT_ID": client_id,
            "ELDERCARE_MQTT_SESSION_EXPIRY": "600",
            "ELDERCARE_METRICS_PORT": "0",
            "ELDERCARE_LOG_FORMAT": "json",
            "ELDERCARE_LOG_LEVEL": "INFO",
            **env,
        }
        worker = WorkerProcess(settings, self.tmp / f"worker-{slot}-{len(self.workers)}.log")
        self.workers.append(worker)
        return worker

    def _new_id(self, prefix: str) -> str:
        self._ids += 1
        return f"{prefix}-{self.group}-{self._ids:03d}"

    def _register_wristbands(self, n: int, elder: str) -> dict[str, MqttAccount]:
        """n new wristbands, registered and with broker accounts: id -> account."""
        ids = [self._new_id("w") for _ in range(n)]
        accounts = self.broker.add_users(ids)
        with psycopg.connect(self.db_url) as conn:
            for device_id in ids:
                add_device(conn, device_id, "wristband", elder)
        return accounts

    def devices(self, n: int, elder: str = "e-1") -> list[Device]:
        """n registered wristbands with broker accounts, connected (MQTT 3.1.1)."""
        accounts = self._register_wristbands(n, elder)
        return [self._connect(a.username, a.password) for a in accounts.values()]

    def links(self, n: int, elder: str = "e-1") -> list[DeviceLink]:
        """n registered wristbands speaking MQTT 5 as the contract says (0x10: send again)."""
        host, port = self.broker.host, self.broker.port
        accounts = self._register_wristbands(n, elder)
        links = [DeviceLink(d, a.password, host, port).connect() for d, a in accounts.items()]
        self.opened.extend(links)
        return links

    def hub_with_stranger(self) -> Device:
        """A registered hub with one attached sensor, connected (it will name a stranger)."""
        hub_id, bed_id = self._new_id("hub"), self._new_id("bed")
        account = self.broker.add_user(hub_id)
        with psycopg.connect(self.db_url) as conn:
            add_device(conn, hub_id, "hub")
            add_device(conn, bed_id, "bed_sensor", "e-2", hub_id)
        return self._connect(account.username, account.password)

    def _connect(self, user: str, password: str) -> Device:
        device = Device(user, password, self.broker.host, self.broker.port).connect()
        self.opened.append(device)
        return device

    def wait_until_subscribed(
        self, worker: WorkerProcess, device: Device, also: list[WorkerProcess] = ()
    ) -> int:
        """Publish probes until the worker(s) store one; return how many probes were stored."""
        sent = 0

        def stored() -> bool:
            nonlocal sent
            for w in (worker, *also):
                assert w.proc is not None and w.proc.poll() is None, f"worker died: {w.log()}"
            sent += 1
            device.publish(
                "telemetry",
                {"msg_id": f"probe-{sent}", "ts": int(time.time() * 1000), "metrics": {"heart_rate": 70}},
            ).wait_for_publish(5)
            time.sleep(0.2)
            return scalar(self.db_url, "SELECT count(*) FROM message_receipts") > 0

        wait_for(stored, 30, "the worker to subscribe")
        # Probes sent before the subscription existed are lost by MQTT's design: count what
        # was stored once the count has settled (every probe was PUBACKed before the check).
        return wait_for(self._settled_receipts, 10, "probes to settle")

    def _settled_receipts(self) -> int:
        before = scalar(self.db_url, "SELECT count(*) FROM message_receipts")
        time.sleep(0.5)
        after = scalar(self.db_url, "SELECT count(*) FROM message_receipts")
        return after if after == before else 0

    def rows(self, sql: str) -> list[tuple]:
        with psycopg.connect(self.db_url) as conn:
            return conn.execute(sql).fetchall()

    def stored_by(self, worker: WorkerProcess) -> int:
        """Messages a stopped worker stored, from the final 'ingest totals' log line of each of
        its committers (the telemetry's and the events process's)."""
        last_by_process = {
            line["pid"]: line["stored_messages"]
            for line in (
                orjson.loads(text)
                for text in worker.log_path.read_text().splitlines()
                if text.startswith("{") and '"ingest totals"' in text
            )
        }
        return sum(last_by_process.values())

    def close(self) -> None:
        for device in self.opened:
            device.close()
        for worker in self.workers:
            if worker.proc is not None and worker.proc.poll() is None:
                worker.proc.kill()
                worker.proc.wait(5)


@pytest.fixture
def test_broker(broker: Broker, tmp_path: Path) -> Iterator[Broker]:
    """A broker of this test's own when we run mosquitto (sessions of other tests stay away)."""
    if isinstance(broker, ProjectBroker) and broker.backend == "mosquitto":
        own = ProjectBroker(tmp_path / "mqtt").start()
        yield own
        own.stop()
    else:
        yield broker


@pytest.fixture
def ingest(db_url: str, test_broker: Broker, tmp_path: Path) -> Iterator[IngestSetup]:
    setup = IngestSetup(db_url, test_broker, tmp_path)
    yield setup
    setup.close()

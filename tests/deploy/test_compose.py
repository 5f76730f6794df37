"""The compose file: valid YAML of the right shape, and the ingest settings that keep the
MQTT session stable and durable (one session, a plain subscription, a pinned broker)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

COMPOSE = Path(__file__).resolve().parents[2] / "docker-compose.yml"


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def test_services_are_all_there_and_every_gateway_service_uses_the_project_image() -> None:
    services = compose()["services"]
    assert {"timescaledb", "mosquitto-accounts", "mosquitto", "ingest", "maintenance"} <= set(services)
    for name in ("ingest", "maintenance"):
        assert services[name]["image"] == "eldercare-gateway:latest"
        assert "eldercare migrate" in " ".join(services[name]["command"])


def test_ingest_uses_one_stable_session_on_a_plain_subscription() -> None:
    """A re-created container must resume the same session, never orphan one ($share)."""
    env = compose()["services"]["ingest"]["environment"]
    assert env["ELDERCARE_MQTT_CLIENT_ID"] == "eldercare-ingest"
    assert env["ELDERCARE_MQTT_SHARED_GROUP"] == ""
    assert env["ELDERCARE_STORE_FLAVOUR"] == "timescale"


def test_maintenance_shares_the_ingest_settings() -> None:
    services = compose()["services"]
    ingest, maintenance = services["ingest"]["environment"], services["maintenance"]["environment"]
    assert maintenance["ELDERCARE_DATABASE_URL"] == ingest["ELDERCARE_DATABASE_URL"]


def test_the_broker_image_is_pinned_to_a_mosquitto_2_0_release() -> None:
    services = compose()["services"]
    for name in ("mosquitto", "mosquitto-accounts"):
        assert re.fullmatch(r"eclipse-mosquitto:2\.0\.\d+", services[name]["image"])


def test_timescaledb_gets_enough_background_workers() -> None:
    command = " ".join(compose()["services"]["timescaledb"]["command"])
    workers = int(re.search(r"max_worker_processes=(\d+)", command).group(1))  # type: ignore[union-attr]
    background = int(re.search(r"timescaledb.max_background_workers=(\d+)", command).group(1))  # type: ignore[union-attr]
    assert background >= 16 and workers >= background + 8

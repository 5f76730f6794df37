"""The compose file: valid, and the ingest settings that keep sessions stable and durable."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

COMPOSE = Path(__file__).resolve().parents[2] / "docker-compose.yml"


def service_block(name: str) -> str:
    """The text of one top-level service of the compose file."""
    text = COMPOSE.read_text()
    match = re.search(rf"^  {name}:\n(.*?)(?=^  \S|^\S)", text, re.S | re.M)
    assert match, f"no service {name!r} in {COMPOSE}"
    return match.group(1)


def test_ingest_uses_one_stable_session_on_a_plain_subscription() -> None:
    """A re-created container must resume the same session, never orphan one ($share)."""
    ingest = service_block("ingest")
    assert re.search(r"ELDERCARE_MQTT_CLIENT_ID: eldercare-ingest\n", ingest)
    assert re.search(r'ELDERCARE_MQTT_SHARED_GROUP: ""\n', ingest)


def test_the_broker_image_is_pinned_to_a_mosquitto_2_0_release() -> None:
    assert re.search(r"image: eclipse-mosquitto:2\.0\.\d+\n", service_block("mosquitto"))


def test_compose_file_is_valid_where_docker_compose_is_installed() -> None:
    """``docker-compose config`` accepts it (the text checks above run everywhere)."""
    tool = shutil.which("docker-compose")
    if tool is None:
        pytest.skip("docker-compose is not installed (apt-get install docker-compose); text checks ran")
    env = {**os.environ, "ELDERCARE_DB_PASSWORD": "x", "ELDERCARE_MQTT_GATEWAY_PASSWORD": "y"}
    done = subprocess.run(
        [tool, "-f", str(COMPOSE), "config", "-q"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr

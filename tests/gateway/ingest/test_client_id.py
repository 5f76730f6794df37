"""Worker client ids (stable across restarts, unique on a host with a shared group) and topics."""

from __future__ import annotations

import subprocess
import sys

import pytest

from eldercare.devices.topics import SUBSCRIPTIONS
from eldercare.gateway.ingest.worker import default_client_id, events_client_id, subscriptions
from eldercare.gateway.settings import Settings

CLAIM = (
    "import sys, time; from eldercare.gateway.ingest.worker import default_client_id;"
    "from eldercare.gateway.settings import Settings;"
    "print(default_client_id(Settings(mqtt_shared_group='ingest')), flush=True); sys.stdin.read()"
)


def claim_in_child() -> tuple[subprocess.Popen, str]:
    child = subprocess.Popen(
        [sys.executable, "-c", CLAIM], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    return child, child.stdout.readline().strip()


def test_configured_client_id_wins() -> None:
    assert default_client_id(Settings(mqtt_client_id="ingest-a")) == "ingest-a"
    assert default_client_id(Settings(mqtt_client_id="ingest-a", mqtt_shared_group="g")) == "ingest-a"


def test_without_a_shared_group_every_worker_uses_the_one_session() -> None:
    """Same id on every host and container: the lease, not the id, says who consumes."""
    assert default_client_id(Settings()) == "eldercare-ingest"


def test_concurrent_workers_get_distinct_ids_and_a_restart_gets_its_slot_back() -> None:
    first, id1 = claim_in_child()
    second, id2 = claim_in_child()
    try:
        assert id1 != id2 and id1.startswith("eldercare-ingest-")
        first.communicate("")  # the first worker exits, its slot is free again
        again, id3 = claim_in_child()
        again.communicate("")
        assert id3 == id1
    finally:
        for child in (first, second):
            if child.poll() is None:
                child.communicate("")


def test_events_have_a_session_of_their_own_named_after_the_main_one() -> None:
    assert events_client_id(default_client_id(Settings())) == "eldercare-ingest-events"
    assert events_client_id("ingest-a") == "ingest-a-events"


@pytest.mark.parametrize("group", ["", "ingest"])
def test_the_two_sessions_split_the_device_topics_between_them(group: str) -> None:
    settings = Settings(mqtt_shared_group=group)
    prefix = f"$share/{group}/" if group else ""
    events, main = subscriptions(settings, "events"), subscriptions(settings, "main")
    assert events == [f"{prefix}eldercare/v1/devices/+/events", f"{prefix}eldercare/v1/hubs/+/events"]
    assert sorted(events + main) == sorted(prefix + t for t in SUBSCRIPTIONS)

"""The registry feed against a real PostgreSQL: notifications, rechecks, the negative cache."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest

from eldercare.devices.registry import DeviceInfo
from eldercare.gateway.store.devices import (
    RECHECK_AT_MOST,
    RECHECK_EVERY_S,
    RegistryFeed,
    add_device,
    load_devices,
    set_enabled,
)
from tests.waiting import wait_for

NOW = 1_790_000_000.0


@pytest.fixture
def conn(db_url: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(db_url, autocommit=True) as conn:
        add_device(conn, "hub-1", "hub")
        yield conn


@pytest.fixture
def feed(db_url: str, conn: psycopg.Connection) -> Iterator[RegistryFeed]:
    """A feed loaded from the table but not following notifications (unless started)."""
    feed = RegistryFeed(db_url, clock=lambda: NOW)
    yield feed
    feed.stop()


def test_load_devices_reads_many_ids_in_one_query(conn) -> None:
    add_device(conn, "w-1", "wristband", "e-1")
    found = load_devices(conn, ["w-1", "ghost"])
    assert found == {"w-1": DeviceInfo("w-1", "wristband", "e-1"), "ghost": None}


def test_a_registration_the_feed_has_not_heard_of_is_found_by_a_recheck(feed, conn) -> None:
    add_device(conn, "w-1", "wristband", "e-1")  # the feed does not listen: as if NOTIFY were late
    assert feed.recheck(conn, {"w-1", "ghost-1"}, NOW) is True
    assert feed.current.get("w-1") == DeviceInfo("w-1", "wristband", "e-1")


def test_misses_are_remembered_so_a_repeated_stranger_costs_no_query(feed, conn, db_url) -> None:
    strangers = {f"gh-{i:05d}" for i in range(4000)}
    assert feed.recheck(conn, strangers, NOW) is False  # read, in batches of RECHECK_AT_MOST
    for k in range(1, 4000 // RECHECK_AT_MOST):
        feed.recheck(conn, strangers, NOW + k * 0.01)
    with psycopg.connect(db_url) as closed:
        pass
    # Every id is remembered now: a connection that cannot query is never touched.
    assert feed.recheck(closed, strangers, NOW + 1) is False
    with pytest.raises(psycopg.OperationalError):  # after the TTL they are read again
        feed.recheck(closed, strangers, NOW + RECHECK_EVERY_S + 1)


def test_a_recheck_reads_at_most_a_bounded_number_of_ids(feed, conn) -> None:
    for i in range(RECHECK_AT_MOST + 10):
        conn.execute("INSERT INTO devices (device_id, type) VALUES (%s, 'wristband')", (f"w-{i:05d}",))
    assert feed.recheck(conn, {f"w-{i:05d}" for i in range(RECHECK_AT_MOST + 10)}, NOW) is True
    assert len(feed.current) == RECHECK_AT_MOST  # hub-1 was never loaded: the feed did not start
    feed.recheck(conn, {f"w-{i:05d}" for i in range(RECHECK_AT_MOST + 10)}, NOW + 0.01)
    assert len(feed.current) == RECHECK_AT_MOST + 10  # the rest in the next batch


def test_a_registration_notified_while_remembered_as_a_miss_is_taken_at_once(feed, conn) -> None:
    feed.start()
    assert feed.recheck(conn, {"bed-1"}, NOW) is False  # a miss, remembered
    add_device(conn, "bed-1", "bed_sensor", "e-1", "hub-1")
    wait_for(lambda: "bed-1" in feed.current, 5, "the feed to apply the notification")
    # A message interpreted before the feed applied it is interpreted again: the recheck says
    # the registry changed for this id a moment ago (the notification also dropped the miss).
    assert feed.recheck(conn, {"bed-1"}, NOW + 0.5) is True


def test_the_feed_follows_disable_and_reattach_without_copying_the_registry(feed, conn) -> None:
    add_device(conn, "w-1", "wristband", "e-1")
    feed.start()
    registry = feed.current
    set_enabled(conn, "w-1", False)
    wait_for(
        lambda: registry.get("w-1") == DeviceInfo("w-1", "wristband", "e-1", enabled=False), 5, "w-1 off"
    )
    conn.execute("UPDATE devices SET hub_id = 'hub-1' WHERE device_id = 'w-1'")
    wait_for(lambda: (registry.get("w-1") or DeviceInfo("", "")).hub_id == "hub-1", 5, "w-1 moved")
    assert feed.current is registry  # changed in place, entry by entry

"""The registry the interpreter reads: changed entry by entry, whatever the fleet size."""

from __future__ import annotations

import threading
import time

from eldercare.devices.registry import DeviceInfo, Registry


def wristband(device_id: str, elder_id: str = "e-1", enabled: bool = True) -> DeviceInfo:
    return DeviceInfo(device_id, "wristband", elder_id, enabled=enabled)


def test_apply_adds_changes_and_removes_and_says_what_changed() -> None:
    registry = Registry([wristband("w-1"), wristband("w-2")])
    changed = registry.apply(
        {"w-1": wristband("w-1", enabled=False), "w-2": None, "w-3": wristband("w-3"), "w-4": None}
    )
    assert changed == {"w-1", "w-2", "w-3"}  # w-4 was not there and is not now: no change
    assert registry.get("w-1") == wristband("w-1", enabled=False)
    assert "w-2" not in registry and registry.lookup("w-3") == wristband("w-3")
    assert sorted(registry) == ["w-1", "w-3"] and len(registry) == 2


def test_applying_what_is_already_there_changes_nothing() -> None:
    registry = Registry([wristband("w-1")])
    assert registry.apply({"w-1": wristband("w-1")}) == set()


def test_a_registration_costs_the_same_in_a_fleet_of_100k_as_in_one_of_1k() -> None:
    def cost(fleet: int) -> float:
        registry = Registry(wristband(f"w-{i:06d}") for i in range(fleet))
        started = time.process_time()
        for k in range(1000):
            registry.apply({f"new-{k:04d}": wristband(f"new-{k:04d}")})
        return time.process_time() - started

    small, large = min(cost(1_000) for _ in range(3)), min(cost(100_000) for _ in range(3))
    # A copy of the fleet per registration took 1.2 s here at 100k (0.01 s at 1k).
    assert large < 0.1 and large < 10 * small + 0.01


def test_readers_never_lock_and_never_see_half_a_change() -> None:
    registry = Registry(wristband(f"w-{i:04d}") for i in range(1000))
    stop = threading.Event()

    def flip() -> None:
        enabled = True
        while not stop.is_set():
            enabled = not enabled
            ids = [f"w-{i:04d}" for i in range(50)]
            registry.apply({d: wristband(d, f"e-{enabled}", enabled) for d in ids})
            registry.apply({"w-new": None if enabled else wristband("w-new")})

    writer = threading.Thread(target=flip)
    writer.start()
    try:
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            for i in range(50):
                info = registry.lookup(f"w-{i:04d}")
                assert info is not None and info.elder_id == f"e-{info.enabled}"  # whole, never mixed
            assert len(list(registry)) in (1000, 1001)  # iterating while it changes is safe
    finally:
        stop.set()
        writer.join()

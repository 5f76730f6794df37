"""The device registry as the ingest worker sees it: a map kept current one entry at a time."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

HUB_TYPE = "hub"


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """A registered device or hub, as far as ingestion needs to know it."""

    device_id: str
    type: str
    elder_id: str | None = None
    hub_id: str | None = None
    enabled: bool = True

    @property
    def is_hub(self) -> bool:
        return self.type == HUB_TYPE


class Registry(Mapping[str, DeviceInfo]):
    """Map device_id -> DeviceInfo; readers never lock, one writer changes it entry by entry.

    A change (``apply``) costs what it changes, never a copy of the fleet: each entry is a
    frozen DeviceInfo put in place (or removed) by a single dict operation, which is atomic
    under the interpreter lock. So a lookup sees a device wholly as it was before a change or
    wholly after it, with no lock on the interpret path. What a reader does not get is one
    frozen view of the whole fleet: a message interpreted while a change lands may see it for
    one device and not yet for another. The interpreter judges each device of a message on its
    own, so that is the same as the change landing a moment earlier or later; and the feed's
    notifications never promised more, since they arrive per device, not per transaction.
    Only one thread may call ``apply`` at a time (the registry feed serialises its writers).
    """

    __slots__ = ("_devices",)

    def __init__(self, devices: Iterable[DeviceInfo] = ()) -> None:
        self._devices: dict[str, DeviceInfo] = {d.device_id: d for d in devices}

    def __getitem__(self, device_id: str) -> DeviceInfo:
        return self._devices[device_id]

    def get(self, device_id: str, default: DeviceInfo | None = None) -> DeviceInfo | None:  # type: ignore[override]
        return self._devices.get(device_id, default)

    @property
    def lookup(self) -> Callable[[str], DeviceInfo | None]:
        """``get`` as the live dict's own bound method: the cheapest lookup, for hot loops."""
        return self._devices.get

    def __contains__(self, device_id: object) -> bool:
        return device_id in self._devices

    def __iter__(self) -> Iterator[str]:
        # A list taken in one step: iterating the live dict would fail on a concurrent change.
        return iter(list(self._devices))

    def __len__(self) -> int:
        return len(self._devices)

    def apply(self, changes: Mapping[str, DeviceInfo | None]) -> set[str]:
        """Add, change or (None) remove devices in place; the ids whose entry really changed."""
        devices = self._devices
        changed = set()
        for device_id, info in changes.items():
            if devices.get(device_id) == info:
                continue
            if info is None:
                devices.pop(device_id, None)
            else:
                devices[device_id] = info
            changed.add(device_id)
        return changed

"""The device registry as the ingest worker sees it: an immutable snapshot, swapped whole."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
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
    """Read-only map device_id -> DeviceInfo; ``replace`` builds a new one, never mutates."""

    __slots__ = ("_devices",)

    def __init__(self, devices: Iterable[DeviceInfo] = ()) -> None:
        self._devices: dict[str, DeviceInfo] = {d.device_id: d for d in devices}

    def __getitem__(self, device_id: str) -> DeviceInfo:
        return self._devices[device_id]

    def get(self, device_id: str, default: DeviceInfo | None = None) -> DeviceInfo | None:  # type: ignore[override]
        return self._devices.get(device_id, default)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._devices)

    def __len__(self) -> int:
        return len(self._devices)

    def replace(self, device_id: str, info: DeviceInfo | None) -> Registry:
        """A new registry with one device added, changed or (info=None) removed."""
        new = Registry()
        new._devices = dict(self._devices)
        if info is None:
            new._devices.pop(device_id, None)
        else:
            new._devices[device_id] = info
        return new

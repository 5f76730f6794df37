"""The metric catalog: metrics, their units, plausible ranges and LOINC codes, and event types.

The catalog is data (``catalog.toml`` next to this module), loaded once into frozen
dataclasses. A deployment may load its own file with ``load_catalog(path)``.
"""

from __future__ import annotations

import functools
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any

from eldercare.devices.units import Conversion, conversion

_METRIC_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")
_EVENT_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")
_METRIC_KEYS = frozenset(
    {"unit", "alternatives", "low", "high", "loinc", "emergency_below", "emergency_above"}
)


class CatalogError(ValueError):
    """The catalog file is not a valid catalog."""


@dataclass(frozen=True, slots=True)
class Metric:
    """One metric devices may report: canonical unit, accepted alternatives, plausible range."""

    name: str
    unit: str
    loinc: str | None
    low: float
    high: float
    # alternative unit -> conversion to ``unit`` (the canonical unit itself is not listed)
    alternatives: Mapping[str, Conversion]
    emergency_below: float | None = None
    emergency_above: float | None = None

    def plausible(self, value: float) -> bool:
        """True when ``value`` (canonical unit) lies inside the plausible range."""
        return self.low <= value <= self.high

    def in_emergency_band(self, value: float) -> bool:
        """True when ``value`` (canonical unit) is past an emergency threshold."""
        return (self.emergency_below is not None and value < self.emergency_below) or (
            self.emergency_above is not None and value > self.emergency_above
        )


@dataclass(frozen=True, slots=True)
class Catalog:
    """All metrics by name, and the event types devices may send."""

    metrics: Mapping[str, Metric]
    event_types: frozenset[str]


def load_catalog(path: str | Path | None = None) -> Catalog:
    """The catalog from ``path``, or the packaged default (loaded once, then shared)."""
    if path is None:
        return _default_catalog()
    with open(path, "rb") as f:
        return parse_catalog(tomllib.load(f), source=str(path))


@functools.cache
def _default_catalog() -> Catalog:
    text = resources.files("eldercare.devices").joinpath("catalog.toml").read_bytes()
    return parse_catalog(tomllib.loads(text.decode("utf-8")), source="catalog.toml")


def parse_catalog(data: Mapping[str, Any], source: str = "catalog") -> Catalog:
    """A Catalog from already-parsed TOML data; ``CatalogError`` names what is wrong."""
    raw_metrics = data.get("metrics")
    if not isinstance(raw_metrics, Mapping) or not raw_metrics:
        raise CatalogError(f"{source}: [metrics] table missing or empty")
    metrics = {name: _parse_metric(name, spec, source) for name, spec in raw_metrics.items()}

    raw_events = data.get("events", {})
    types = raw_events.get("types", []) if isinstance(raw_events, Mapping) else None
    if not isinstance(types, list) or not all(isinstance(t, str) and _EVENT_NAME.fullmatch(t) for t in types):
        raise CatalogError(f"{source}: events.types must be a list of snake_case names")
    return Catalog(metrics=MappingProxyType(metrics), event_types=frozenset(types))


def _parse_metric(name: str, spec: Any, source: str) -> Metric:
    where = f"{source}: metrics.{name}"
    if not _METRIC_NAME.fullmatch(name):
        raise CatalogError(f"{where}: name must be snake_case, at most 64 chars")
    if not isinstance(spec, Mapping):
        raise CatalogError(f"{where}: must be a table")
    unknown = set(spec) - _METRIC_KEYS
    if unknown:
        raise CatalogError(f"{where}: unknown keys {sorted(unknown)}")
    unit = spec.get("unit")
    if not isinstance(unit, str) or not unit:
        raise CatalogError(f"{where}: unit must be a non-empty string")
    low, high = _number(spec, "low", where), _number(spec, "high", where)
    if low is None or high is None or low > high:
        raise CatalogError(f"{where}: low and high are required numbers with low <= high")
    loinc = spec.get("loinc")
    if loinc is not None and not isinstance(loinc, str):
        raise CatalogError(f"{where}: loinc must be a string")
    alternatives: dict[str, Conversion] = {}
    raw_alts = spec.get("alternatives", [])
    if not isinstance(raw_alts, list):
        raise CatalogError(f"{where}: alternatives must be a list of unit codes")
    for alt in raw_alts:
        if not isinstance(alt, str) or alt == unit:
            raise CatalogError(f"{where}: bad alternative unit {alt!r}")
        try:
            alternatives[alt] = conversion(alt, unit)
        except KeyError as exc:
            raise CatalogError(f"{where}: {exc.args[0]}") from None
    return Metric(
        name=name,
        unit=unit,
        loinc=loinc,
        low=low,
        high=high,
        alternatives=MappingProxyType(alternatives),
        emergency_below=_number(spec, "emergency_below", where),
        emergency_above=_number(spec, "emergency_above", where),
    )


def _number(spec: Mapping[str, Any], key: str, where: str) -> float | None:
    value = spec.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise CatalogError(f"{where}: {key} must be a number")
    return float(value)

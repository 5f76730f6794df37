"""The seam where rules plug into ingestion: decisions in the same transaction as readings.

For each batch the ingest writer, after storing the batch's readings and events and before
committing, calls ``RuleSet.apply(cur, batch)`` with the batch's accepted, deduplicated
items. Whatever the rule set writes through ``cur`` (alerts, outbox rows) commits or rolls
back together with the readings, and the MQTT messages are acknowledged only after that
commit. If ``apply`` raises, the whole batch rolls back and nothing is acknowledged.

The rules engine (next issue) implements this protocol; the Foundation ships ``NoRules``.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

import psycopg

from eldercare.devices.records import DeviceEvent, Reading


@dataclass(frozen=True, slots=True)
class RuleBatch:
    """What the rules see of one committed batch.

    Readings and events flagged ``clock_skew`` are left out (they never feed rules);
    out-of-range readings never get this far. ``late`` ones are included, flagged.
    """

    readings: Sequence[Reading]
    events: Sequence[DeviceEvent]
    committed_at: datetime


class RuleSet(Protocol):
    """Evaluates rules for one batch and writes its decisions through ``cur``."""

    def apply(self, cur: psycopg.Cursor, batch: RuleBatch) -> None: ...


class NoRules:
    """The Foundation's rule set: decides nothing."""

    def apply(self, cur: psycopg.Cursor, batch: RuleBatch) -> None:
        return None


def load_rules(spec: str) -> RuleSet:
    """The rule set named ``module:factory`` (a class or function returning one)."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"a rule set is named module:factory, got {spec!r}")
    factory = getattr(importlib.import_module(module_name), attribute)
    rules = factory()
    if not callable(getattr(rules, "apply", None)):
        raise TypeError(f"{spec} did not make a rule set (no apply method)")
    return rules

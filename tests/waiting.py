"""Waiting on real services in tests: poll a condition until a deadline, never a fixed sleep."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float = 10.0, what: str = "condition") -> T:
    """Call ``predicate`` until it returns something truthy and return that; fail at the deadline.

    Polls fast at first (5 ms) and backs off to 100 ms. The failure says ``what`` was awaited
    and the last value seen, e.g. ``wait_for(lambda: count() == 10, 5, "10 rows stored")``.
    """
    deadline = time.monotonic() + timeout
    pause = 0.005
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what} (last: {value!r})")
        time.sleep(pause)
        pause = min(pause * 1.5, 0.1)


def never(predicate: Callable[[], object], within: float, what: str = "condition") -> None:
    """Assert ``predicate`` stays falsy for ``within`` seconds (e.g. a refused message never lands).

    Use after a positive control (something that must arrive) to keep ``within`` short.
    """
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            raise AssertionError(f"{what} happened: {value!r}")
        time.sleep(0.01)

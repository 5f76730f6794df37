"""The simulated hotlines, shared by the adapter's and the dispatcher's tests (one per module)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from eldercare.simulators.hotlines import HotlineSimulator


@pytest.fixture(scope="module")
def simulator() -> Iterator[HotlineSimulator]:
    """Real HTTP servers on loopback; no acknowledgements (test_hotlines has those)."""
    with HotlineSimulator(ack_delay_s=600.0) as sim:
        yield sim


@pytest.fixture
def every_hotline_ok(simulator: HotlineSimulator) -> Iterator[None]:
    """Whatever a test broke, healed after it."""
    yield
    for name in simulator.hotlines:
        simulator.set_mode(name, "ok")

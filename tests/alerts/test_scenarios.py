"""The labelled scenario table (alerts/scenarios.toml), replayed on the pure engine."""

from __future__ import annotations

import pytest

from eldercare.alerts.rules import load_rule_set
from eldercare.alerts.scenarios import Scenario, check, load_scenarios

RULES = load_rule_set()
SCENARIOS = load_scenarios()


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.id for s in SCENARIOS])
def test_scenario(scenario: Scenario) -> None:
    assert check(scenario, RULES) == []


def test_every_rule_that_reacts_to_data_has_a_scenario_that_raises_it() -> None:
    raised = {e["rule"] for s in SCENARIOS for e in s.expect}
    reacting = {r.id for r in (*RULES.thresholds, *RULES.events)} | {"news2"}
    assert reacting - raised == set()

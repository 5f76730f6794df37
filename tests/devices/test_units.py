"""Alternative units convert to the catalog's canonical units."""

from __future__ import annotations

import pytest

from eldercare.devices.units import CONVERSIONS, conversion, convert


@pytest.mark.parametrize(
    ("value", "source", "target", "expected"),
    [
        (16.0, "kPa", "mm[Hg]", 120.00992),
        (1.0, "kPa", "mm[Hg]", 7.50062),
        (98.6, "[degF]", "Cel", 37.0),
        (32.0, "[degF]", "Cel", 0.0),
        (212.0, "[degF]", "Cel", 100.0),
        (-40.0, "[degF]", "Cel", -40.0),
        (180.16, "mg/dL", "mmol/L", 10.0),
        (110.0, "mg/dL", "mmol/L", 110 / 18.016),
        (100.0, "[lb_av]", "kg", 45.359237),
        (1.0, "[lb_av]", "kg", 0.45359237),
    ],
)
def test_each_conversion(value: float, source: str, target: str, expected: float) -> None:
    assert convert(value, source, target) == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_same_unit_is_identity() -> None:
    assert convert(72.0, "/min", "/min") == 72.0


def test_unknown_pair_raises_key_error_naming_both_units() -> None:
    with pytest.raises(KeyError, match=r"mm\[Hg\].*kPa"):
        conversion("mm[Hg]", "kPa")


def test_table_holds_exactly_the_spec_conversions() -> None:
    assert set(CONVERSIONS) == {
        ("kPa", "mm[Hg]"),
        ("[degF]", "Cel"),
        ("mg/dL", "mmol/L"),
        ("[lb_av]", "kg"),
    }

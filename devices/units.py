"""Unit conversions from the alternative units devices may send to the catalog's canonical ones.

Unit names are UCUM codes, as in the catalog. Each conversion is affine,
``canonical = (value + shift) * scale``, so one small frozen object covers all of them and the
interpreter can apply it without a lookup per reading.
"""

from __future__ import annotations

from dataclasses import dataclass

# mm[Hg] per kPa (1 kPa = 1000 Pa; 1 mm[Hg] = 133.322 Pa).
MMHG_PER_KPA = 7.50062
# mg/dL per mmol/L *of glucose* (molar mass 180.16 g/mol). Only right for glucose: another
# analyte in mmol/L would need its own factor, which is why the table key names the pair.
GLUCOSE_MG_DL_PER_MMOL_L = 18.016
# kg per international avoirdupois pound (exact by definition).
KG_PER_LB = 0.45359237


@dataclass(frozen=True, slots=True)
class Conversion:
    """An affine conversion ``target = (value + shift) * scale`` between two units."""

    source: str
    target: str
    scale: float
    shift: float = 0.0

    def __call__(self, value: float) -> float:
        return (value + self.shift) * self.scale


CONVERSIONS: dict[tuple[str, str], Conversion] = {
    (c.source, c.target): c
    for c in (
        Conversion("kPa", "mm[Hg]", MMHG_PER_KPA),
        Conversion("[degF]", "Cel", 5.0 / 9.0, -32.0),
        Conversion("mg/dL", "mmol/L", 1.0 / GLUCOSE_MG_DL_PER_MMOL_L),
        Conversion("[lb_av]", "kg", KG_PER_LB),
    )
}


def conversion(source: str, target: str) -> Conversion:
    """The conversion from ``source`` to ``target`` unit; ``KeyError`` when none is known."""
    if source == target:
        return Conversion(source, target, 1.0)
    try:
        return CONVERSIONS[(source, target)]
    except KeyError:
        raise KeyError(f"no conversion from {source!r} to {target!r}") from None


def convert(value: float, source: str, target: str) -> float:
    """``value`` in ``source`` unit expressed in ``target`` unit."""
    return conversion(source, target)(value)

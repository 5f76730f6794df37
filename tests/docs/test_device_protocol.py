"""docs/device-protocol.md, the contract vendors build against, says what devices/catalog.toml says.

The doc's metric table and event list sit between ``<!-- catalog:... -->`` markers and must be
exactly what :func:`render_metrics` and :func:`render_events` make of the packaged catalog.
After changing the catalog, rewrite them with::

    .venv/bin/python -m tests.docs.test_device_protocol
"""

from __future__ import annotations

import re
from pathlib import Path

from eldercare.devices.catalog import Catalog, Metric, load_catalog
from eldercare.devices.units import Conversion

DOC = Path(__file__).parents[2] / "docs" / "device-protocol.md"
SECTIONS = ("metrics", "events")


def render_metrics(catalog: Catalog) -> str:
    """The metric table: canonical unit, accepted alternatives (with conversion), range, LOINC."""
    lines = [
        "| metric | unit | accepted alternatives | plausible range | LOINC |",
        "|---|---|---|---|---|",
    ]
    for metric in catalog.metrics.values():  # in the catalog file's order
        alternatives = ", ".join(
            f"`{unit}` ({_formula(conversion)})" for unit, conversion in metric.alternatives.items()
        )
        cells = [f"`{metric.name}`", f"`{metric.unit}`", alternatives, _range(metric), metric.loinc or ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_events(catalog: Catalog) -> str:
    """The event types, alphabetically, in one paragraph."""
    return ", ".join(f"`{name}`" for name in sorted(catalog.event_types)) + "."


def _formula(conversion: Conversion) -> str:
    """``x`` in the alternative unit to the canonical one, as a vendor would write it."""
    scale = f"× {conversion.scale:.6g}" if conversion.scale >= 1 else f"÷ {1 / conversion.scale:.6g}"
    if not conversion.shift:
        return f"x {scale}"
    sign = "−" if conversion.shift < 0 else "+"
    return f"(x {sign} {abs(conversion.shift):g}) {scale}"


def _range(metric: Metric) -> str:
    return f"{metric.low:g} to {metric.high:g}"


def _rendered(catalog: Catalog) -> dict[str, str]:
    return {"metrics": render_metrics(catalog), "events": render_events(catalog)}


def _pattern(section: str) -> re.Pattern[str]:
    begin, end = rf"<!-- catalog:{section} begin[^>]*-->\n", rf"\n<!-- catalog:{section} end -->"
    return re.compile(f"({begin})(.*?)({end})", re.S)


def doc_sections(text: str) -> dict[str, str]:
    """The doc's text between each pair of catalog markers."""
    found = {}
    for section in SECTIONS:
        match = _pattern(section).search(text)
        assert match, f"{DOC.name}: markers <!-- catalog:{section} begin/end --> missing"
        found[section] = match.group(2)
    return found


def test_device_protocol_doc_lists_exactly_the_catalogs_metrics_and_events() -> None:
    expected = _rendered(load_catalog())
    actual = doc_sections(DOC.read_text(encoding="utf-8"))
    for section in SECTIONS:
        assert actual[section] == expected[section], (
            f"{DOC} disagrees with devices/catalog.toml ({section}); "
            "rewrite it with: .venv/bin/python -m tests.docs.test_device_protocol"
        )


def test_a_catalog_change_is_caught(tmp_path: Path) -> None:
    catalog = load_catalog()
    fewer = Catalog(
        metrics={k: v for k, v in catalog.metrics.items() if k != "spo2"}, event_types=catalog.event_types
    )
    assert render_metrics(fewer) != render_metrics(catalog)
    assert "`spo2` | `%` |  | 50 to 100 | 59408-5 |" in render_metrics(catalog)
    assert "`mg/dL` (x ÷ 18.016)" in render_metrics(catalog)
    assert "`[degF]` ((x − 32) ÷ 1.8)" in render_metrics(catalog)


def write_doc() -> None:
    """Rewrite the doc's catalog sections from the packaged catalog."""
    text = DOC.read_text(encoding="utf-8")
    for section, body in _rendered(load_catalog()).items():
        match = _pattern(section).search(text)
        assert match, f"{DOC.name}: markers <!-- catalog:{section} begin/end --> missing"
        text = text[: match.start(2)] + body + text[match.end(2) :]
    DOC.write_text(text, encoding="utf-8")
    print(f"rewrote the catalog sections of {DOC}")


if __name__ == "__main__":
    write_doc()

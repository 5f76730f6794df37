"""``eldercare elders set-profile`` and the profile part of ``elders show --personal``.

An elder's profile is personal data (``elder_profiles``): who they are, where home is, their
medications, allergies, emergency contacts and family doctor, all of which the hotlines get
in the request body (each channel what its role needs). It is printed only when asked for,
and what a change prints names the fields changed, never their values.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from eldercare.gateway.care_commands import _connect, _updated_by, fail
from eldercare.gateway.store.profiles import Contact, FamilyDoctor, Location, Profile

#: What an empty value of an option means: clear the field (or empty the list).
CLEARS = "''"

Name = Annotated[str | None, typer.Option(help=f"full name ({CLEARS} clears)")]
Sex = Annotated[str | None, typer.Option(metavar="F|M", help=f"F or M ({CLEARS} clears)")]
BirthYear = Annotated[int | None, typer.Option(help="year of birth, e.g. 1941")]
Phone = Annotated[str | None, typer.Option(help=f"the elder's phone number ({CLEARS} clears)")]
Address = Annotated[str | None, typer.Option(help=f"home address ({CLEARS} clears)")]
Where = Annotated[
    str | None,
    typer.Option(
        metavar="LAT,LON",
        help=f"home position in WGS 84 degrees, e.g. 29.306,120.075 ({CLEARS} clears); an alert"
        " raised by an event with the device's position sends that one instead",
    ),
]
Medications = Annotated[
    list[str] | None,
    typer.Option(
        "--medication",
        metavar="TEXT",
        help=f"a medication as prescribed, e.g. 'amlodipine 5mg daily' (repeat; replaces the list;"
        f" one {CLEARS} empties it)",
    ),
]
Allergies = Annotated[
    list[str] | None,
    typer.Option(
        "--allergy", metavar="TEXT", help=f"an allergy (repeat; replaces the list; one {CLEARS} empties it)"
    ),
]
Contacts = Annotated[
    list[str] | None,
    typer.Option(
        "--contact",
        metavar="NAME|RELATION|PHONE",
        help=f"an emergency contact, first to call first (repeat; replaces the list; one {CLEARS}"
        " empties it)",
    ),
]
UpdatedBy = Annotated[str | None, typer.Option("--by", help="who sets the profile (default cli:<user>)")]
Doctor = Annotated[
    str | None,
    typer.Option("--family-doctor", metavar="NAME|CLINIC|PHONE", help=f"the family doctor ({CLEARS} clears)"),
]


def parse_location(text: str) -> Location | None:
    """``--location``: "LAT,LON" in degrees; empty clears. ValueError saying what is wrong."""
    if not text.strip():
        return None
    parts = [p.strip() for p in text.split(",")]
    try:
        if len(parts) != 2:
            raise ValueError
        lat, lon = float(parts[0]), float(parts[1])
    except ValueError:
        raise ValueError(f"--location {text!r}: write LAT,LON in degrees, e.g. 29.306,120.075") from None
    return Location(lat, lon)


def parse_parts(text: str, option: str, names: tuple[str, str, str]) -> tuple[str, str, str]:
    """``--contact`` / ``--family-doctor``: three parts separated by ``|``, each trimmed."""
    parts = tuple(p.strip() for p in text.split("|"))
    if len(parts) != 3 or not all(parts):
        raise ValueError(f"{option} {text!r}: write {'|'.join(n.upper() for n in names)}, each part given")
    return parts[0], parts[1], parts[2]


def parse_list(values: list[str], option: str) -> list[str]:
    """A repeated option's values; one empty value alone empties the list."""
    if len(values) == 1 and not values[0].strip():
        return []
    if any(not v.strip() for v in values):
        raise ValueError(f"{option}: an empty value empties the list and goes alone")
    return [v.strip() for v in values]


def profile_changes(
    *,
    name: str | None = None,
    sex: str | None = None,
    birth_year: int | None = None,
    phone: str | None = None,
    address: str | None = None,
    location: str | None = None,
    medications: list[str] | None = None,
    allergies: list[str] | None = None,
    contacts: list[str] | None = None,
    family_doctor: str | None = None,
) -> dict[str, Any]:
    """The fields the options name, as ``set_profile`` takes them (an empty text clears one).

    ValueError for text that cannot be read; ``set_profile`` checks the values themselves.
    """
    changes: dict[str, Any] = {}
    for field, text in (("name", name), ("phone", phone), ("address", address)):
        if text is not None:
            changes[field] = text.strip() or None
    if sex is not None:
        changes["sex"] = sex.strip().upper() or None
    if birth_year is not None:
        changes["birth_year"] = birth_year
    if location is not None:
        changes["location"] = parse_location(location)
    if medications is not None:
        changes["medications"] = parse_list(medications, "--medication")
    if allergies is not None:
        changes["allergies"] = parse_list(allergies, "--allergy")
    if contacts is not None:
        changes["emergency_contacts"] = [
            Contact(*parse_parts(text, "--contact", ("name", "relation", "phone")))
            for text in parse_list(contacts, "--contact")
        ]
    if family_doctor is not None:
        changes["family_doctor"] = (
            FamilyDoctor(*parse_parts(family_doctor, "--family-doctor", ("name", "clinic", "phone")))
            if family_doctor.strip()
            else None
        )
    return changes


def elders_set_profile(
    elder_id: str,
    name: Name = None,
    sex: Sex = None,
    birth_year: BirthYear = None,
    phone: Phone = None,
    address: Address = None,
    location: Where = None,
    medication: Medications = None,
    allergy: Allergies = None,
    contact: Contacts = None,
    family_doctor: Doctor = None,
    by: UpdatedBy = None,
) -> None:
    """Set an elder's personal profile: only the fields given change (personal data: the
    hotlines get it when an alert is dispatched; nothing of it is printed here)."""
    from eldercare.gateway.store.profiles import check_value, set_profile

    try:
        changes = profile_changes(
            name=name,
            sex=sex,
            birth_year=birth_year,
            phone=phone,
            address=address,
            location=location,
            medications=medication,
            allergies=allergy,
            contacts=contact,
            family_doctor=family_doctor,
        )
        for field, value in changes.items():
            check_value(field, value)
    except ValueError as exc:
        raise fail(str(exc), 2) from None
    if not changes:
        raise fail("nothing to set: give at least one field (see --help)", 2)
    with _connect() as conn:
        if not set_profile(conn, elder_id, changes, _updated_by(by)):
            raise fail(f"no elder {elder_id} (register it with `eldercare elders add`)")
    typer.echo(f"profile of {elder_id}: set {', '.join(_changed(changes))}")


def _changed(changes: dict[str, Any]) -> list[str]:
    """What a change names: the fields, with how many entries a list has, never a value."""
    out = []
    for field, value in changes.items():
        label = field.replace("_", " ")
        if isinstance(value, list):
            out.append(f"{label} ({len(value)})")
        else:
            out.append(label if value is not None else f"{label} (cleared)")
    return out


def profile_lines(profile: Profile | None) -> list[str]:
    """An elder's profile, line by line, as ``elders show --personal`` prints it."""
    if profile is None:
        return ["no personal profile (set one with `eldercare elders set-profile`)"]
    p = profile
    location = f"{p.location.lat},{p.location.lon}" if p.location else "not set"
    contacts = [f"emergency contact: {c.name} ({c.relation}) {c.phone}" for c in p.emergency_contacts]
    doctor = p.family_doctor
    lines = [
        f"name: {p.name or 'not set'}",
        f"sex: {p.sex or 'not set'}",
        f"birth year: {p.birth_year or 'not set'}",
        f"phone: {p.phone or 'not set'}",
        f"address: {p.address or 'not set'}",
        f"home location: {location}",
        f"medications: {'; '.join(p.medications) or 'none known'}",
        f"allergies: {'; '.join(p.allergies) or 'none known'}",
        *(contacts or ["emergency contacts: none"]),
        f"family doctor: {f'{doctor.name}, {doctor.clinic}, {doctor.phone}' if doctor else 'not set'}",
    ]
    updated = p.updated_at.isoformat(timespec="seconds") if p.updated_at else "?"
    lines.append(f"profile updated {updated} by {p.updated_by or 'unknown'}")
    return lines

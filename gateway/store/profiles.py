"""Elders' personal profiles (``elder_profiles``): who they are, where home is, their care details.

Personal data. The dispatcher reads it into the hotlines' request body (``dispatches.documents``)
and authorised people see it with ``eldercare elders show --personal``; it is never logged and
never put in care plans. Each value is checked here, whoever writes it (the CLI today).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import tuple_row
from psycopg.types.json import Jsonb

#: Digits with the spaces, dashes and brackets people write them with, an optional leading +.
_PHONE = re.compile(r"\+?[0-9 ()-]{3,32}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
#: Longest accepted text of each kind (characters).
MAX_LENGTH = {"name": 100, "address": 300, "item": 200, "relation": 50, "clinic": 200}
#: Most entries in a list (medications, allergies, contacts).
MAX_ITEMS = 50
SEXES = ("F", "M")
EARLIEST_BIRTH_YEAR = 1900


@dataclass(frozen=True, slots=True)
class Location:
    """A position in WGS 84 degrees."""

    lat: float
    lon: float


@dataclass(frozen=True, slots=True)
class Contact:
    """An emergency contact: who, what they are to the elder, their phone."""

    name: str
    relation: str
    phone: str


@dataclass(frozen=True, slots=True)
class FamilyDoctor:
    """The elder's family doctor: name, clinic (community health centre), phone."""

    name: str
    clinic: str
    phone: str


@dataclass(frozen=True, slots=True)
class Profile:
    """An elder's profile as stored; lists empty when nothing is known."""

    elder_id: str
    name: str | None = None
    sex: str | None = None
    birth_year: int | None = None
    phone: str | None = None
    address: str | None = None
    location: Location | None = None
    medications: tuple[str, ...] = ()
    allergies: tuple[str, ...] = ()
    emergency_contacts: tuple[Contact, ...] = ()
    family_doctor: FamilyDoctor | None = None
    updated_at: datetime | None = None
    updated_by: str | None = None

    def as_data(self) -> dict[str, Any]:
        """The profile in the request body's shape (``elder``), plus when and by whom it changed."""
        return {
            "name": self.name,
            "sex": self.sex,
            "birth_year": self.birth_year,
            "phone": self.phone,
            "address": self.address,
            "location": None if self.location is None else _as_dict(self.location),
            "medications": list(self.medications),
            "allergies": list(self.allergies),
            "emergency_contacts": [_as_dict(c) for c in self.emergency_contacts],
            "family_doctor": None if self.family_doctor is None else _as_dict(self.family_doctor),
            "updated_at": self.updated_at.isoformat(timespec="seconds") if self.updated_at else None,
            "updated_by": self.updated_by,
        }


#: The fields ``set_profile`` changes (None clears one; a list field takes a sequence).
FIELDS = (
    "name",
    "sex",
    "birth_year",
    "phone",
    "address",
    "location",
    "medications",
    "allergies",
    "emergency_contacts",
    "family_doctor",
)


def check_text(value: str, what: str, limit: int) -> str:
    """``value`` if it is a non-empty line of at most ``limit`` characters, else ValueError."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{what} is empty")
    if _CONTROL.search(value):
        raise ValueError(f"{what} has a line break or another control character")
    if len(value) > limit:
        raise ValueError(f"{what} is longer than {limit} characters")
    return value


def check_phone(value: str, what: str = "phone") -> str:
    """``value`` if it reads as a phone number (3 digits at least), else ValueError."""
    if not (isinstance(value, str) and _PHONE.fullmatch(value) and sum(c.isdigit() for c in value) >= 3):
        raise ValueError(f"{what} is not a phone number (digits, spaces, - ( ), a leading +)")
    return value


def check_value(field: str, value: Any, *, today: datetime | None = None) -> Any:
    """``value`` as ``set_profile`` stores it for ``field`` (None clears it; a list field's
    sequence becomes a tuple, None an empty one); ValueError saying what is wrong."""
    if field not in FIELDS:
        raise ValueError(f"no profile field {field!r}")
    if field in _LISTS:
        items = tuple(value or ())
        if len(items) > MAX_ITEMS:
            raise ValueError(f"{field.replace('_', ' ')}: more than {MAX_ITEMS} entries")
        for item in items:
            if field == "emergency_contacts":
                check_contact(item)
            else:
                check_text(item, _LISTS[field], MAX_LENGTH["item"])
        return items
    if value is None:
        return None
    if field == "sex" and value not in SEXES:
        raise ValueError(f"sex is one of {', '.join(SEXES)}, not {value!r}")
    if field == "birth_year":
        this_year = (today or datetime.now(UTC)).year
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError("birth year is a whole number")
        if not EARLIEST_BIRTH_YEAR <= value <= this_year:
            raise ValueError(f"birth year {value} is not from {EARLIEST_BIRTH_YEAR} to {this_year}")
    if field in ("name", "address"):
        check_text(value, field, MAX_LENGTH[field])
    if field == "phone":
        check_phone(value)
    if field == "location":
        check_location(value)
    if field == "family_doctor":
        check_family_doctor(value)
    return value


#: The list fields, and what one entry is called in a message.
_LISTS = {"medications": "medication", "allergies": "allergy", "emergency_contacts": "emergency contact"}


def check_location(value: Location) -> Location:
    """``value`` if it is a Location within WGS 84's ranges, else ValueError."""
    if not isinstance(value, Location):
        raise ValueError("location: a Location or None")
    for name, degrees, limit in (("latitude", value.lat, 90), ("longitude", value.lon, 180)):
        number = isinstance(degrees, int | float) and not isinstance(degrees, bool)
        if not (number and math.isfinite(degrees) and -limit <= degrees <= limit):
            raise ValueError(f"{name} {degrees!r} is not a number from {-limit} to {limit}")
    return value


def check_contact(value: Contact) -> Contact:
    """``value`` if it is a Contact with a name, a relation and a phone number, else ValueError."""
    if not isinstance(value, Contact):
        raise ValueError("emergency contact: a Contact")
    check_text(value.name, "emergency contact name", MAX_LENGTH["name"])
    check_text(value.relation, "emergency contact relation", MAX_LENGTH["relation"])
    check_phone(value.phone, "emergency contact phone")
    return value


def check_family_doctor(value: FamilyDoctor) -> FamilyDoctor:
    """``value`` if it is a FamilyDoctor with a name, a clinic and a phone number, else ValueError."""
    if not isinstance(value, FamilyDoctor):
        raise ValueError("family doctor: a FamilyDoctor or None")
    check_text(value.name, "family doctor name", MAX_LENGTH["name"])
    check_text(value.clinic, "family doctor clinic", MAX_LENGTH["clinic"])
    check_phone(value.phone, "family doctor phone")
    return value


def set_profile(conn: psycopg.Connection, elder_id: str, changes: Mapping[str, Any], updated_by: str) -> bool:
    """Change the named fields of an elder's profile (creating it if need be), the others kept;
    False if there is no such elder. Every value is checked first (ValueError, nothing stored)."""
    columns: dict[str, Any] = {}
    for field, raw in changes.items():
        value = check_value(field, raw)
        if field == "location":
            columns["latitude"] = None if value is None else float(value.lat)
            columns["longitude"] = None if value is None else float(value.lon)
        elif field in ("medications", "allergies"):
            columns[field] = list(value)
        elif field == "emergency_contacts":
            columns[field] = Jsonb([_as_dict(c) for c in value])
        elif field == "family_doctor":
            columns[field] = None if value is None else Jsonb(_as_dict(value))
        else:
            columns[field] = value
    columns["updated_by"] = updated_by
    names = [*columns, "updated_at"]
    # VALUES, not INSERT ... SELECT: a NULL parameter takes its column's type there.
    query = sql.SQL(
        "INSERT INTO elder_profiles (elder_id, {names}) VALUES (%s, {values}, now())"
        " ON CONFLICT (elder_id) DO UPDATE SET {updates}"
    ).format(
        names=sql.SQL(", ").join(map(sql.Identifier, names)),
        values=sql.SQL(", ").join(sql.Placeholder() * len(columns)),
        updates=sql.SQL(", ").join(sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(n)) for n in names),
    )
    with conn.transaction():
        known = conn.execute("SELECT 1 FROM elders WHERE elder_id = %s FOR KEY SHARE", (elder_id,))
        if known.fetchone() is None:
            return False
        conn.execute(query, [elder_id, *columns.values()])
        return True


_PROFILE_SQL = """
SELECT name, sex, birth_year, phone, address, latitude, longitude, medications, allergies,
       emergency_contacts, family_doctor, updated_at, updated_by
FROM elder_profiles WHERE elder_id = %s
"""


def get_profile(conn: psycopg.Connection, elder_id: str) -> Profile | None:
    """An elder's profile, or None if none is kept (or there is no such elder)."""
    with conn.cursor(row_factory=tuple_row) as cur:
        cur.execute(_PROFILE_SQL, (elder_id,))
        row = cur.fetchone()
    if row is None:
        return None
    (name, sex, birth_year, phone, address, lat, lon, medications, allergies, contacts, doctor, at, by) = row
    return Profile(
        elder_id,
        name,
        sex,
        birth_year,
        phone,
        address,
        None if lat is None else Location(lat, lon),
        tuple(medications),
        tuple(allergies),
        tuple(Contact(**_strings(c, Contact)) for c in contacts),
        None if doctor is None else FamilyDoctor(**_strings(doctor, FamilyDoctor)),
        at,
        by,
    )


def _as_dict(value: Location | Contact | FamilyDoctor) -> dict[str, Any]:
    return {f.name: getattr(value, f.name) for f in fields(value)}


def _strings(stored: Mapping[str, Any], kind: type[Contact | FamilyDoctor]) -> dict[str, str]:
    """A stored object's fields of ``kind`` as text (a missing one empty)."""
    return {f.name: str(stored.get(f.name, "")) for f in fields(kind)}


__all__ = [
    "FIELDS",
    "Contact",
    "FamilyDoctor",
    "Location",
    "Profile",
    "check_contact",
    "check_family_doctor",
    "check_location",
    "check_phone",
    "check_text",
    "check_value",
    "get_profile",
    "set_profile",
]

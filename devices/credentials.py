"""Device MQTT credentials: issue a password, hash it as mosquitto 2.0 does, verify it.

A device's password is shown once at registration and kept only as a hash. The hash is in
the format of ``mosquitto_passwd`` (mosquitto 2.0, its default ``sha512-pbkdf2``)::

    $7$<iterations>$<base64 salt>$<base64 PBKDF2-HMAC-SHA512(password, salt, iterations)>

with a 12-byte salt and a 64-byte key, so a password file rendered from stored hashes is
read by the broker as if ``mosquitto_passwd -b`` had written it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable

#: mosquitto_passwd's defaults (mosquitto 2.0: PW_DEFAULT_ITERATIONS, SALT_LEN).
ITERATIONS = 101
SALT_BYTES = 12
_PBKDF2_ID = "7"
_SHA512_ID = "6"  # mosquitto 1.x format (`-H sha512`): one round of SHA-512; verified only

#: What an MQTT user name may be in our password files: device/hub ids
#: (``[A-Za-z0-9._-]{3,64}``) and service accounts such as ``eldercare-gateway``.
_USERNAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


def new_password(nbytes: int = 24) -> str:
    """A new random device password (URL-safe text, ``nbytes`` of entropy)."""
    return secrets.token_urlsafe(nbytes)


def hash_password(password: str, *, salt: bytes | None = None, iterations: int = ITERATIONS) -> str:
    """Hash ``password`` in mosquitto_passwd's ``$7$`` (PBKDF2-HMAC-SHA512) format."""
    if salt is None:
        salt = secrets.token_bytes(SALT_BYTES)
    if iterations < 1:
        raise ValueError("iterations must be positive")
    key = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations)
    return f"${_PBKDF2_ID}${iterations}${_b64(salt)}${_b64(key)}"


def verify_password(password: str, hashed: str) -> bool:
    """True if ``password`` matches a mosquitto ``$7$`` (or legacy ``$6$``) hash."""
    parts = hashed.split("$")
    try:
        if len(parts) == 5 and parts[0] == "" and parts[1] == _PBKDF2_ID:
            iterations = int(parts[2])
            salt, expected = _unb64(parts[3]), _unb64(parts[4])
            key = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations)
        elif len(parts) == 4 and parts[0] == "" and parts[1] == _SHA512_ID:
            salt, expected = _unb64(parts[2]), _unb64(parts[3])
            key = hashlib.sha512(password.encode("utf-8") + salt).digest()
        else:
            return False
    except (ValueError, binascii.Error):
        return False
    return hmac.compare_digest(key, expected)


def is_password_hash(hashed: str) -> bool:
    """True if ``hashed`` looks like a hash mosquitto 2.0 accepts (not a plain password)."""
    parts = hashed.split("$")
    if len(parts) == 5 and parts[:2] == ["", _PBKDF2_ID] and parts[2].isdigit():
        encoded = parts[3:]
    elif len(parts) == 4 and parts[:2] == ["", _SHA512_ID]:
        encoded = parts[2:]
    else:
        return False
    try:
        return all(_unb64(value) for value in encoded)
    except (ValueError, binascii.Error):
        return False


def check_username(username: str) -> str:
    """Return ``username`` if it can stand in a password file and an ACL pattern, else raise."""
    if not _USERNAME.fullmatch(username):
        raise ValueError(f"MQTT user name must be 1-64 chars of [A-Za-z0-9._-], got {username!r}")
    return username


def render_password_file(entries: Iterable[tuple[str, str]]) -> str:
    """A mosquitto password file from ``(username, hash)`` pairs (sorted, one per line).

    A user listed twice keeps its last hash. Plain passwords are refused: the file must
    never hold one.
    """
    users: dict[str, str] = {}
    for username, hashed in entries:
        check_username(username)
        if not is_password_hash(hashed):
            raise ValueError(f"not a mosquitto password hash for user {username!r}")
        users[username] = hashed
    return "".join(f"{name}:{users[name]}\n" for name in sorted(users))


def parse_password_file(text: str) -> dict[str, str]:
    """The ``{username: hash}`` entries of a mosquitto password file."""
    users: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        username, sep, hashed = line.partition(":")
        if sep:
            users[username] = hashed
    return users


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)

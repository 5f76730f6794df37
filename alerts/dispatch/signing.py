"""Standard Webhooks v1 signatures: what ``webhook-signature`` carries for one request.

``v1,<base64 HMAC-SHA256(key, "<webhook-id>.<webhook-timestamp>.<raw body>")>``, where a
channel's secret is ``whsec_<base64 key>``. Our own code on purpose: the simulated hotlines
verify with the ``standardwebhooks`` library, so a mismatch between the two shows in tests.

While a secret is being rotated a channel holds several (``Channel.secret`` may list them,
separated by spaces): every one signs, and the signatures go out space-separated, so the
receiver accepts the request whichever of them it already has.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from collections.abc import Iterable

PREFIX = "whsec_"
#: Key length of a new secret: Standard Webhooks asks for 24 to 64 bytes; 32 is SHA-256's size.
KEY_BYTES = 32


class SecretError(ValueError):
    """A channel secret that is not ``whsec_<base64 key>`` (the text never includes the key)."""


def new_secret() -> str:
    """A fresh random channel secret, ``whsec_<base64 of 32 random bytes>``."""
    return PREFIX + base64.b64encode(os.urandom(KEY_BYTES)).decode("ascii")


def secret_key(secret: str) -> bytes:
    """The HMAC key of one ``whsec_<base64 key>`` secret (the prefix is optional, padding too)."""
    text = secret.strip().removeprefix(PREFIX)
    try:
        key = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise SecretError("webhook secret is not whsec_<base64 key>") from None
    if not key:
        raise SecretError("webhook secret is empty")
    return key


def secrets_of(secret: str | Iterable[str]) -> list[str]:
    """The secrets in ``secret``: one, several separated by whitespace, or an iterable of them."""
    texts = [secret] if isinstance(secret, str) else list(secret)
    return [part for text in texts for part in text.split()]


def sign(secret: str | Iterable[str], msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value: ``v1,<b64>``, one per secret, space-separated.

    Raises ``SecretError`` when there is no secret or one is not ``whsec_<base64 key>``.
    """
    keys = [secret_key(text) for text in secrets_of(secret)]
    if not keys:
        raise SecretError("no webhook secret")
    signed = f"{msg_id}.{int(timestamp)}.".encode() + body
    return " ".join(
        "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode("ascii")
        for key in keys
    )

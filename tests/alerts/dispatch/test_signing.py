"""Our Standard Webhooks signatures, judged by the ``standardwebhooks`` library a hotline uses."""

from __future__ import annotations

import base64
import time
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from eldercare.alerts.dispatch.signing import SecretError, new_secret, secret_key, sign

BODY = '{"dispatch_id":"d-1","attempt":1,"channel":"120","alert":{"title":"跌倒未起身"}}'.encode()


def headers(msg_id: str, timestamp: int, signature: str) -> dict[str, str]:
    return {"webhook-id": msg_id, "webhook-timestamp": str(timestamp), "webhook-signature": signature}


def test_our_signature_verifies_with_the_library() -> None:
    secret = new_secret()
    now = int(time.time())
    signature = sign(secret, "d-1", now, BODY)
    assert signature.startswith("v1,")
    assert Webhook(secret).verify(BODY, headers("d-1", now, signature))["channel"] == "120"


def test_the_library_signs_what_we_sign() -> None:
    """Byte for byte the same value, for the spec's own example of a secret."""
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    ours = sign(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, b'{"test": 2432232314}')
    theirs = Webhook(secret).sign(
        "msg_p5jXN8AQM9LWM0D4loKWxJek", datetime.fromtimestamp(1614265330, UTC), '{"test": 2432232314}'
    )
    assert ours == theirs == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


@given(
    msg_id=st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=40),
    body=st.text(max_size=300).map(str.encode),
)
def test_any_id_and_utf8_body_verifies(msg_id: str, body: bytes) -> None:
    secret = "whsec_" + base64.b64encode(b"k" * 32).decode()
    now = int(time.time())
    Webhook(secret).verify(body, headers(msg_id, now, sign(secret, msg_id, now, body)), json_parse=False)


def test_a_wrong_secret_does_not_verify() -> None:
    now = int(time.time())
    sent = headers("d-1", now, sign(new_secret(), "d-1", now, BODY))
    with pytest.raises(WebhookVerificationError, match="No matching signature"):
        Webhook(new_secret()).verify(BODY, sent)


@pytest.mark.parametrize(
    ("body", "msg_id", "moved_s"),
    [
        pytest.param(BODY.replace(b"120", b"121"), "d-1", 0, id="a changed body"),
        pytest.param(BODY, "d-2", 0, id="another webhook-id"),
        pytest.param(BODY, "d-1", 1, id="another timestamp"),
    ],
)
def test_a_changed_request_does_not_verify(body: bytes, msg_id: str, moved_s: int) -> None:
    secret = new_secret()
    now = int(time.time())
    signature = sign(secret, "d-1", now, BODY)
    with pytest.raises(WebhookVerificationError, match="No matching signature"):
        Webhook(secret).verify(body, headers(msg_id, now + moved_s, signature))


def test_a_stale_timestamp_does_not_verify() -> None:
    """Six minutes old: outside the spec's five-minute replay window, signature right or not."""
    secret = new_secret()
    then = int(time.time()) - 360
    with pytest.raises(WebhookVerificationError, match="too old"):
        Webhook(secret).verify(BODY, headers("d-1", then, sign(secret, "d-1", then, BODY)))


def test_during_rotation_both_secrets_sign_and_either_verifies() -> None:
    old, new = new_secret(), new_secret()
    now = int(time.time())
    signature = sign(f"{old} {new}", "d-1", now, BODY)
    assert len(signature.split(" ")) == 2
    assert sign([old, new], "d-1", now, BODY) == signature
    for secret in (old, new):
        Webhook(secret).verify(BODY, headers("d-1", now, signature))
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(BODY, headers("d-1", now, signature))


def test_new_secrets_are_whsec_32_random_bytes() -> None:
    a, b = new_secret(), new_secret()
    assert a.startswith("whsec_") and a != b
    assert len(secret_key(a)) == 32


def test_a_secret_without_prefix_or_padding_is_the_same_key() -> None:
    secret = new_secret()
    bare = secret.removeprefix("whsec_").rstrip("=")
    assert secret_key(bare) == secret_key(secret)


@pytest.mark.parametrize("secret", ["", "   ", "whsec_", "whsec_not base64!", "whsec_@@@@"])
def test_no_or_a_malformed_secret_is_refused_without_showing_it(secret: str) -> None:
    with pytest.raises(SecretError) as refused:
        sign(secret, "d-1", 0, BODY)
    assert "base64!" not in str(refused.value) and "@@@@" not in str(refused.value)

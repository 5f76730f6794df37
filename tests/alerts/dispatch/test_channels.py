"""The channels file: checked at start-up, secrets from the environment, who acknowledges."""

from __future__ import annotations

from pathlib import Path

import pytest
import trustme

from eldercare.alerts.dispatch.channels import ChannelsError, channels_from, load_channels

EXAMPLE = """
[channels.120]
kind = "webhook"
url = "https://dispatch.example.cn/eldercare"
secret_env = "SECRET_120"
api_key_env = "KEY_120"
timeout = 3.0

[channels.family]
kind = "sms_gateway"
url = "https://sms.example.cn/hooks"
secret = "whsec_c2VjcmV0"
fields = ["alert", "elder.name"]
"""


def test_a_channels_file_is_read_with_its_secrets_from_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "channels.toml"
    path.write_text(EXAMPLE, encoding="utf-8")
    channels = load_channels(path, {"SECRET_120": "whsec_MTIw", "KEY_120": "k-120"})
    c120 = channels.by_name["120"]
    assert (c120.kind, c120.secret, c120.timeout_s, c120.fields) == (
        "webhook",
        "whsec_MTIw",
        3.0,
        frozenset(),
    )
    assert channels.by_name["family"].fields == {"alert", "elder.name"}
    assert channels.notify_only == {"family"}  # family contacts are told, not asked to act
    assert channels.channel_for_key("k-120") == "120"
    assert channels.channel_for_key("k-12") is None
    assert channels.channel_for_key("") is None  # family has no key: an empty one matches nothing


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ({"120": {"kind": "fax", "url": "x"}}, "channels.120.kind"),
        ({"120": {"kind": "webhook"}}, "channels.120.url"),
        ({"120": {"kind": "webhook", "url": "x", "colour": "red"}}, "channels.120.colour"),
        ({"120": {"kind": "webhook", "url": "x", "timeout": 0}}, "channels.120.timeout"),
        ({"120": {"kind": "webhook", "url": "x", "secret": "a", "secret_env": "B"}}, "secret or secret_env"),
        ({"120": {"kind": "webhook", "url": "x", "secret_env": "MISSING"}}, "the environment has no MISSING"),
        ({"bad name": {"kind": "webhook", "url": "x"}}, "bad name"),
    ],
)
def test_a_wrong_channels_file_says_where_and_why(entries: dict, message: str) -> None:
    with pytest.raises(ChannelsError, match=message.replace(".", r"\.")):
        channels_from({"channels": entries}, environ={})


def test_a_family_channel_may_be_made_to_acknowledge_and_a_hotline_not() -> None:
    channels = channels_from(
        {
            "channels": {
                "family": {"kind": "webhook", "url": "x", "acknowledges": True},
                "12320": {"kind": "webhook", "url": "y", "acknowledges": False},
            }
        },
        environ={},
    )
    assert channels.notify_only == {"12320"}


def test_an_unreadable_file_names_itself(tmp_path: Path) -> None:
    path = tmp_path / "channels.toml"
    path.write_text("[channels.120\n", encoding="utf-8")
    with pytest.raises(ChannelsError, match=r"channels\.toml"):
        load_channels(path, {})


def test_a_relative_ca_file_is_taken_from_the_channels_files_folder(tmp_path: Path) -> None:
    (tmp_path / "ca").mkdir()
    trustme.CA().cert_pem.write_to_path(str(tmp_path / "ca" / "120-root.pem"))
    path = tmp_path / "channels.toml"
    path.write_text(
        EXAMPLE.replace("timeout = 3.0", 'timeout = 3.0\nca_file = "ca/120-root.pem"'), encoding="utf-8"
    )
    channels = load_channels(path, {"SECRET_120": "whsec_MTIw", "KEY_120": "k-120"})
    assert channels.by_name["120"].ca_file == str(tmp_path / "ca" / "120-root.pem")
    assert channels.by_name["family"].ca_file == ""  # the public CAs


@pytest.mark.parametrize(
    ("url", "ca_file", "message"),
    [
        ("https://h.example.cn/", "missing.pem", "cannot read .*missing.pem"),
        ("https://h.example.cn/", "not-pem.pem", "not-pem.pem is not a bundle of PEM certificates"),
        ("http://h.example.cn/", "ca.pem", "ca_file is for https:// channels only"),
    ],
)
def test_a_ca_file_that_cannot_serve_is_refused_at_start_up(
    tmp_path: Path, url: str, ca_file: str, message: str
) -> None:
    trustme.CA().cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    (tmp_path / "not-pem.pem").write_text("-----BEGIN CERTIFICATE-----\nnot one\n", encoding="utf-8")
    entry = {"kind": "webhook", "url": url, "ca_file": ca_file}
    with pytest.raises(ChannelsError, match=f"channels.120.*{message}"):
        channels_from({"channels": {"120": entry}}, environ={}, base=tmp_path)

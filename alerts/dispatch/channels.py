"""The deployment's channels, as data: a TOML file of who is reached how, checked at start-up.

```toml
[channels.120]
kind = "webhook"
url = "https://dispatch.example-120.cn/eldercare"
secret = "whsec_..."          # or secret_env = "ELDERCARE_SECRET_120"
api_key_env = "ELDERCARE_ACK_KEY_120"
timeout = 5.0                 # seconds
fields = []                   # empty: everything (120 gets the whole body)
ca_file = "ca/120-root.pem"   # its certificate's private CA (PEM), trusted instead of the public ones

[channels.family]
kind = "sms_gateway"
url = "https://sms.example.cn/hooks/eldercare"
secret_env = "ELDERCARE_SECRET_FAMILY"
acknowledges = false          # told, but its ack does not stop escalation
```

Secrets and API keys are best given through the environment (``secret_env``, ``api_key_env``)
so the file itself holds none. A route's channel that no file configures is skipped and said
once in the log. ``ca_file`` (https:// channels only) is for hotlines whose certificate comes
from a private or government CA: a relative path is taken from the channels file's folder, and
the bundle must load at start-up. Only its CAs are trusted for that channel.
"""

from __future__ import annotations

import hmac
import os
import ssl
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

from eldercare.alerts.dispatch.adapter import Channel, ChannelKind

#: Channels whose acknowledgement does not stop escalation unless the file says otherwise:
#: family contacts are told (the spec's "notify"), the hotlines are asked to act.
NOTIFY_ONLY_BY_DEFAULT = frozenset({"family"})

ChannelName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")]


class ChannelsError(Exception):
    """A channels file that cannot be used, with where and why."""


class _ChannelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: ChannelKind
    url: str
    secret: str = ""
    secret_env: str = ""
    api_key: str = ""
    api_key_env: str = ""
    timeout: float = Field(5.0, gt=0, le=60)
    fields: tuple[str, ...] = ()
    acknowledges: bool | None = None
    account: str = ""
    receiver: str = ""
    prefix: str = ""
    ca_file: str = ""

    @model_validator(mode="after")
    def _one_source(self) -> _ChannelEntry:
        if self.secret and self.secret_env:
            raise ValueError("give secret or secret_env, not both")
        if self.api_key and self.api_key_env:
            raise ValueError("give api_key or api_key_env, not both")
        if self.ca_file and not self.url.startswith("https://"):
            raise ValueError("ca_file is for https:// channels only")
        return self


class _ChannelsFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    channels: dict[ChannelName, _ChannelEntry]


@dataclass(frozen=True, slots=True)
class Channels:
    """The configured channels: how to reach each, who acknowledges, each one's ack key."""

    by_name: Mapping[str, Channel]
    notify_only: frozenset[str]
    api_keys: Mapping[str, str]  # channel -> the key its acknowledgements carry

    def channel_for_key(self, key: str) -> str | None:
        """The channel whose API key this is (constant-time per comparison)."""
        found = None
        for name, expected in self.api_keys.items():
            if expected and hmac.compare_digest(expected.encode(), key.encode()):
                found = name
        return found


def ca_context(ca_file: str) -> ssl.SSLContext:
    """A TLS client context that trusts the CAs of this PEM bundle, and them only.

    Raises OSError when the file cannot be read and ssl.SSLError when it holds no certificate.
    """
    return ssl.create_default_context(cafile=ca_file)


def channels_from(
    data: Mapping[str, object], environ: Mapping[str, str] | None = None, *, base: Path | None = None
) -> Channels:
    """Channels from parsed TOML (ChannelsError says which channel and field is wrong).

    ``base``: the folder a relative ``ca_file`` is taken from (the channels file's; the working
    directory when None).
    """
    env = os.environ if environ is None else environ
    try:
        parsed = _ChannelsFile.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ChannelsError(f"{where}: {first['msg']}") from None
    by_name: dict[str, Channel] = {}
    keys: dict[str, str] = {}
    notify_only = set()
    for name, entry in parsed.channels.items():
        secret = _from_env(env, entry.secret_env, f"channels.{name}.secret_env") or entry.secret
        keys[name] = _from_env(env, entry.api_key_env, f"channels.{name}.api_key_env") or entry.api_key
        ca_file = _ca_file(entry.ca_file, base, f"channels.{name}.ca_file")
        by_name[name] = Channel(
            name=name,
            kind=entry.kind,
            url=entry.url,
            secret=secret,
            timeout_s=entry.timeout,
            fields=frozenset(entry.fields),
            account=entry.account,
            receiver=entry.receiver,
            prefix=entry.prefix,
            ca_file=ca_file,
        )
        acknowledges = entry.acknowledges
        if acknowledges is None:
            acknowledges = name not in NOTIFY_ONLY_BY_DEFAULT
        if not acknowledges:
            notify_only.add(name)
    return Channels(by_name, frozenset(notify_only), keys)


def load_channels(path: Path, environ: Mapping[str, str] | None = None) -> Channels:
    """Read and check a channels file."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ChannelsError(f"{path}: {exc}") from None
    try:
        return channels_from(data, environ, base=path.parent)
    except ChannelsError as exc:
        raise ChannelsError(f"{path}: {exc}") from None


def _from_env(env: Mapping[str, str], name: str, where: str) -> str:
    if not name:
        return ""
    value = env.get(name, "")
    if not value:
        raise ChannelsError(f"{where}: the environment has no {name}")
    return value


def _ca_file(given: str, base: Path | None, where: str) -> str:
    """The absolute path of a channel's CA bundle, once it has loaded ("" when none is given)."""
    if not given:
        return ""
    path = Path(given).expanduser()
    if not path.is_absolute() and base is not None:
        path = base / path
    path = path.absolute()
    try:
        ca_context(str(path))
    except ssl.SSLError:  # an OSError too: first
        raise ChannelsError(f"{where}: {path} is not a bundle of PEM certificates") from None
    except OSError as exc:
        raise ChannelsError(f"{where}: cannot read {path}: {exc.strerror or exc}") from None
    return str(path)

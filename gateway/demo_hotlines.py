"""The demo's hotlines: simulated 120, 12349, 12320, SMS gateway and family-doctor servers, a
channels file pointing at them, a dispatcher and the acknowledgement API, in the demo's process.

What the simulated homes raise (an SOS, a fall without recovery) is then delivered as the
contract says (signed webhooks, verified by the simulated hotlines with ``standardwebhooks``),
acknowledged a few seconds later through the API, and shown in the demo's live view. The
channels file goes into the data folder, readable by its owner only (it holds the secrets the
simulator generated for this run).
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from eldercare.gateway.settings import Settings
from eldercare.simulators.hotlines import GATEWAY_CHANNELS, HotlineSimulator

CHANNELS_FILE = "channels.toml"
#: Seconds before a simulated hotline acknowledges (an operator picking up).
ACK_DELAY_S = 3.0


@dataclass(frozen=True)
class DemoHotlines:
    simulator: HotlineSimulator
    api_url: str
    channels_file: Path


def channels_toml(simulator: HotlineSimulator) -> str:
    """A channels file with every channel at its simulated hotline, secrets inline."""
    out = []
    for channel, (kind, hotline) in GATEWAY_CHANNELS.items():
        out.append(
            f'[channels."{channel}"]\nkind = "{kind}"\nurl = "{simulator.url(hotline)}"\n'
            f'secret = "{simulator.secret(hotline)}"\napi_key = "{simulator.api_key(hotline)}"\n'
        )
    return "\n".join(out)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def demo_hotlines(settings: Settings, data_dir: Path) -> Iterator[DemoHotlines]:
    """Start the simulated hotlines, the acknowledgement API and a dispatcher; stop them after."""
    from eldercare.gateway.runner import start_api, start_dispatcher

    with HotlineSimulator(ack_delay_s=ACK_DELAY_S) as simulator:
        path = data_dir / CHANNELS_FILE
        path.touch(mode=0o600)
        path.chmod(0o600)
        path.write_text(channels_toml(simulator), encoding="utf-8")
        port = _free_port()
        api_url = f"http://127.0.0.1:{port}"
        roles = settings.model_copy(
            update={"channels_file": path, "api_host": "127.0.0.1", "api_port": port, "ack_base_url": api_url}
        )
        api_thread, server = start_api(roles)
        stop = threading.Event()
        dispatcher = start_dispatcher(roles, stop)
        try:
            yield DemoHotlines(simulator, api_url, path)
        finally:
            stop.set()
            dispatcher.join(30)
            server.should_exit = True
            api_thread.join(15)

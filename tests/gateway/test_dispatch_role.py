"""`eldercare serve --role dispatch`: the dispatcher as an operator runs it, against real HTTP."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from eldercare.alerts.dispatch.channels import channels_from
from eldercare.alerts.dispatch.dispatcher import Dispatcher
from eldercare.alerts.rules import load_rule_set
from eldercare.gateway.broker import free_port
from eldercare.simulators.hotlines import HotlineSimulator
from tests.alerts.dispatch.outbox import Clock, dispatch_id, raise_alert, rows
from tests.waiting import wait_for


@pytest.fixture(scope="module")
def simulator() -> Iterator[HotlineSimulator]:
    with HotlineSimulator(ack_delay_s=600.0) as sim:
        yield sim


def serve(
    db_url: str, tmp_path: Path, channels: str | None, roles: tuple[str, ...] = ("dispatch",), **env_: str
) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ELDERCARE_")}
    env.update(ELDERCARE_DATABASE_URL=db_url, ELDERCARE_METRICS_PORT="0", ELDERCARE_LOG_FORMAT="json", **env_)
    if channels is not None:
        path = tmp_path / "channels.toml"
        path.write_text(channels, encoding="utf-8")
        env["ELDERCARE_CHANNELS_FILE"] = str(path)
    code = "from eldercare.gateway.cli import main; main()"
    return subprocess.Popen(
        [sys.executable, "-c", code, "serve", *(a for r in roles for a in ("--role", r))],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def hotline_12349(sim: HotlineSimulator, *more: str) -> str:
    """A channels file with the simulated 12349, its secret from SECRET_12349."""
    lines = [
        "[channels.12349]",
        'kind = "webhook"',
        f'url = "{sim.url("12349")}"',
        'secret_env = "SECRET_12349"',
    ]
    return "\n".join([*lines, *more]) + "\n"


def test_the_dispatch_and_api_roles_deliver_what_the_rules_raise_take_the_ack_and_stop_cleanly(
    db_url: str, simulator: HotlineSimulator, tmp_path: Path
) -> None:
    channels = hotline_12349(simulator, 'api_key_env = "KEY_12349"')
    simulator.set_acks("12349", delay_s=0.1, statuses=["accepted"])
    port = str(free_port())
    secrets = {"SECRET_12349": simulator.secret("12349"), "KEY_12349": simulator.api_key("12349")}
    proc = serve(
        db_url,
        tmp_path,
        channels,
        ("dispatch", "api"),
        ELDERCARE_API_PORT=port,
        ELDERCARE_ACK_BASE_URL=f"http://127.0.0.1:{port}",
        **secrets,
    )
    try:
        before = len(simulator.received("12349"))
        alert_id = raise_alert(db_url, route="hotline", severity="urgent")
        wait_for(lambda: len(simulator.received("12349")) > before, 30, "the 12349 hotline to be called")
        [got] = simulator.received("12349")[before:]
        assert got.answer == 202 and got.refused is None
        state = "SELECT state FROM alerts WHERE id = %s"
        wait_for(lambda: rows(db_url, state, alert_id) == [("acknowledged",)], 20, "12349's acknowledgement")
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert '"dispatcher started"' in out and '"dispatch delivered"' in out and '"dispatcher stopped"' in out
    assert "测试乙" not in out and "13800000000" not in out  # no personal data in the logs


def test_the_dispatch_role_without_channels_says_so_in_one_line(db_url: str, tmp_path: Path) -> None:
    proc = serve(db_url, tmp_path, None)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "ELDERCARE_CHANNELS_FILE" in out and "Traceback" not in out


def test_a_wrong_channels_file_is_one_line_not_a_traceback(db_url: str, tmp_path: Path) -> None:
    proc = serve(db_url, tmp_path, '[channels.120]\nkind = "fax"\nurl = "x"\n')
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "channels.120.kind" in out and "Traceback" not in out, out


def test_a_dispatcher_killed_between_claim_and_outcome_loses_nothing(
    db_url: str, simulator: HotlineSimulator, tmp_path: Path
) -> None:
    """kill -9 mid-delivery: the lease runs out, another dispatcher delivers, same id."""
    channels = hotline_12349(simulator, "timeout = 2.0")
    simulator.set_mode("12349", "slow", delay_s=1.5)  # the attempt is in flight when we kill
    before = len(simulator.received("12349"))
    proc = serve(db_url, tmp_path, channels, SECRET_12349=simulator.secret("12349"))
    try:
        alert_id = raise_alert(db_url, route="hotline", severity="urgent")
        claimed = "SELECT attempts, state, claimed_until IS NOT NULL FROM dispatches WHERE alert_id = %s"
        wait_for(
            lambda: rows(db_url, claimed, alert_id) == [(1, "pending", True)], 30, "the dispatch claimed"
        )
        time.sleep(0.3)
    finally:
        proc.kill()
        proc.communicate(timeout=30)
    simulator.set_mode("12349", "ok")
    assert rows(db_url, claimed, alert_id) == [(1, "pending", True)]  # no outcome was recorded
    later = Clock()
    later.ahead = 60.0  # past the dead dispatcher's lease (3 x 2 s + 10 s)
    other = Dispatcher(
        db_url,
        channels_from(
            {
                "channels": {
                    "12349": {
                        "kind": "webhook",
                        "url": simulator.url("12349"),
                        "secret": simulator.secret("12349"),
                    }
                }
            },
            environ={},
        ),
        load_rule_set(),
        ack_base_url="http://127.0.0.1:9",
        name="survivor",
        clock=later,
    )

    async def deliver() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(other.run(stop))
        try:
            async with asyncio.timeout(20):
                while rows(db_url, "SELECT state FROM dispatches WHERE alert_id = %s", alert_id) != [
                    ("delivered",)
                ]:
                    await asyncio.sleep(0.05)
        finally:
            stop.set()
            await task

    asyncio.run(deliver())
    got = simulator.received("12349")[before:]
    assert got and {r.webhook_id for r in got} == {str(dispatch_id(db_url, alert_id, "12349"))}
    assert any(r.answer == 202 for r in got)
    assert rows(db_url, "SELECT number, outcome, dispatcher FROM dispatch_attempts") == [
        (2, "delivered", "survivor")
    ]

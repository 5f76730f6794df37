"""``eldercare simulate``: simulated counterparts of the gateway's partners, to run it against.

``eldercare simulate hotlines`` serves the five simulated hotlines (``simulators/hotlines.py``)
until Ctrl-C, prints where each listens and where its control endpoint is, and, on request,
writes each hotline's URL, webhook secret and API key to a JSON file for the gateway.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, cast

import typer
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from eldercare.simulators.hotline_app import AckStatus
    from eldercare.simulators.hotlines import HotlineSimulator

out = Console(soft_wrap=True)  # a URL is never broken over two lines
console = Console(stderr=True, soft_wrap=True)

simulate_app = typer.Typer(help="Simulated partners to run the gateway against.", no_args_is_help=True)

#: hotline_app.AckStatus, spelt out: the simulators (FastAPI, standardwebhooks: the "demo"
#: extra) are imported only when a simulation runs, not with every ``eldercare`` command.
ACK_STATUSES: tuple[str, ...] = ("accepted", "en_route", "on_scene", "closed", "declined")


def _pairs(values: list[str] | None, option: str) -> dict[str, str]:
    """``NAME=VALUE`` options as a dict; exit with one clear line on a malformed one."""
    result: dict[str, str] = {}
    for value in values or []:
        name, equals, text = value.partition("=")
        if not equals or not name or not text:
            console.print(f"[red]error:[/] {option} takes HOTLINE=VALUE (got {name or '?'}=...)")
            raise typer.Exit(2)
        result[name] = text
    return result


def read_secrets_file(path: Path) -> tuple[dict[str, str], dict[str, str]]:
    """Secrets and API keys per hotline from a JSON file.

    Either what ``--write-secrets`` writes (``{"hotlines": {name: {"secret", "api_key", ...}}}``,
    so a simulator started again keeps its secrets) or a plain ``{name: "whsec_..."}``.
    """
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    entries = data.get("hotlines", data)
    if not isinstance(entries, dict):
        raise ValueError('"hotlines" is not a JSON object')
    secrets: dict[str, str] = {}
    api_keys: dict[str, str] = {}
    for name, entry in entries.items():
        if isinstance(entry, str):
            secrets[name] = entry
        elif isinstance(entry, dict):
            if isinstance(entry.get("secret"), str):
                secrets[name] = entry["secret"]
            if isinstance(entry.get("api_key"), str):
                api_keys[name] = entry["api_key"]
        else:
            raise ValueError(f"hotline {name!r}: a secret string or an object with secret and api_key")
    return secrets, api_keys


def write_secrets_file(path: Path, document: dict[str, Any]) -> None:
    """Write ``document`` as JSON readable by its owner only (it holds secrets), all at once.

    Written beside and renamed into place, so a reader never sees half a file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as file:
        json.dump(document, file, indent=2)
        file.write("\n")
    os.chmod(partial, 0o600)  # a file left over from before keeps its old mode through O_CREAT
    os.replace(partial, path)


@simulate_app.command("hotlines")
def hotlines(
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[
        int,
        typer.Option(help="the control endpoint's port; the hotlines take the next ones (0: any free ports)"),
    ] = 8900,
    secrets_file: Annotated[
        Path | None,
        typer.Option(
            help='JSON secrets to use: {"120": "whsec_...", ...}, or a file --write-secrets wrote;'
            " hotlines not in it get generated ones"
        ),
    ] = None,
    secret: Annotated[list[str] | None, typer.Option(help="HOTLINE=whsec_... (repeat)")] = None,
    api_key: Annotated[
        list[str] | None, typer.Option(help="HOTLINE=KEY, the Bearer key its acks carry (repeat)")
    ] = None,
    write_secrets: Annotated[
        Path | None,
        typer.Option(
            help="write each hotline's url, secret and api_key here as JSON (mode 0600), for the gateway"
        ),
    ] = None,
    show_secrets: Annotated[
        bool, typer.Option(help="print the generated secrets and API keys (given ones are never printed)")
    ] = False,
    ack_delay: Annotated[float, typer.Option(help="seconds before each acknowledgement")] = 2.0,
    ack_status: Annotated[
        list[str] | None,
        typer.Option(help=f"acknowledgement statuses in order (repeat; {', '.join(ACK_STATUSES)})"),
    ] = None,
    hotline: Annotated[
        list[str] | None, typer.Option(help="only these hotlines (repeat; default: all five)")
    ] = None,
) -> None:
    """Serve the simulated hotlines (120, 12349, 12320, sms, family_doctor) until Ctrl-C."""
    from eldercare.gateway.logs import configure_logging

    try:
        from eldercare.simulators.hotlines import HOTLINES, HotlineSimulator
    except ImportError as exc:
        extra = "pip install 'eldercare-gateway[demo]'"
        console.print(f"[red]error:[/] the simulators need the demo extra ({extra}): {exc}")
        raise typer.Exit(2) from None

    names = hotline or list(HOTLINES)
    if bad := [name for name in names if name not in HOTLINES]:
        console.print(f"[red]error:[/] --hotline: {bad[0]!r} is none of {', '.join(HOTLINES)}")
        raise typer.Exit(2)
    statuses: list[AckStatus] = []
    for status in ack_status or ["accepted"]:
        if status not in ACK_STATUSES:
            console.print(f"[red]error:[/] --ack-status: {status!r} is none of {', '.join(ACK_STATUSES)}")
            raise typer.Exit(2)
        statuses.append(cast("AckStatus", status))
    secrets: dict[str, str] = {}
    api_keys: dict[str, str] = {}
    if secrets_file is not None:
        try:
            secrets, api_keys = read_secrets_file(secrets_file)
        except (OSError, ValueError) as exc:
            console.print(f"[red]error:[/] --secrets-file {secrets_file}: {exc}")
            raise typer.Exit(2) from None
    sources = {name: f"secrets file {secrets_file}" for name in secrets}
    given = _pairs(secret, "--secret")
    secrets.update(given)
    sources.update({name: "--secret" for name in given})
    api_keys.update(_pairs(api_key, "--api-key"))
    if unknown := sorted((set(secrets) | set(api_keys)) - set(HOTLINES)):
        console.print(f"[yellow]note:[/] no such hotline, ignored: {', '.join(unknown)}")

    configure_logging("INFO", "console")
    # uvicorn says "Started server process" for each of the six servers, and again at each
    # down/up of a hotline: the table below says it once.
    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
    simulator = HotlineSimulator(
        names,
        host=host,
        port=port,
        secrets=secrets,
        api_keys=api_keys,
        ack_delay_s=ack_delay,
        ack_statuses=statuses,
    )
    try:
        simulator.start()
    except OSError as exc:
        console.print(f"[red]error:[/] cannot listen on {host} (ports from {port}): {exc.strerror or exc}")
        raise typer.Exit(1) from None
    try:
        _describe(simulator, sources, show_secrets)
        if write_secrets is not None:
            write_secrets_file(
                write_secrets, {"control_url": simulator.control_url, "hotlines": simulator.channels()}
            )
            out.print(f"URLs, secrets and API keys written to {write_secrets}")
        out.print("Ctrl-C to stop.")
        _wait_for_a_stop_signal()
    finally:
        simulator.stop()


def _describe(simulator: HotlineSimulator, sources: dict[str, str], show_secrets: bool) -> None:
    """Where each hotline listens and where its secret came from; the secrets only if asked."""
    table = Table("hotline", "URL", "secret", "API key")
    for name in simulator.hotlines:
        secret = "generated" if name in simulator.generated_secrets else f"from {sources[name]}"
        key = "generated" if name in simulator.generated_api_keys else "given"
        table.add_row(name, simulator.url(name), secret, key)
    out.print(table)
    out.print(f"control: {simulator.control_url}/<hotline> (GET: state and log; POST: mode)")
    if show_secrets:
        # Plain lines, not table cells: a narrow terminal must not cut a secret short.
        for name in simulator.hotlines:
            if name in simulator.generated_secrets:
                print(f"{name} secret: {simulator.secret(name)}")
            if name in simulator.generated_api_keys:
                print(f"{name} api key: {simulator.api_key(name)}")


def _wait_for_a_stop_signal() -> None:
    stop = threading.Event()

    def _stop(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    while not stop.wait(1.0):
        pass

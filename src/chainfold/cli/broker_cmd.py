"""``chainfold broker``: keep the embedded broker running across commands, or stop it."""

from __future__ import annotations

import click

from ..log.broker import EmbeddedBroker
from .common import cli, emit_json, run, stderr


@cli.group()
def broker() -> None:
    """The embedded pulsar-lite broker (started on demand by every command without --service-url)."""


def _data_dir(fn):
    return click.option("--data-dir", default=".chainfold", show_default=True, envvar="CHAINFOLD_DATA_DIR",
                        type=click.Path(file_okay=False))(fn)


@broker.command("start")
@_data_dir
def broker_start(data_dir: str) -> None:
    """Start the embedded broker and keep it running (pinned) until `chainfold broker stop`."""

    def body() -> int:
        url = EmbeddedBroker(data_dir).acquire(pinned=True)
        print(url)
        return 0

    run(body)


@broker.command("stop")
@_data_dir
def broker_stop(data_dir: str) -> None:
    """Stop the embedded broker of DATA_DIR."""

    def body() -> int:
        stopped = EmbeddedBroker(data_dir).stop()
        stderr.print("stopped" if stopped else "no embedded broker running")
        return 0

    run(body)


@broker.command("status")
@_data_dir
def broker_status(data_dir: str) -> None:
    """Print the embedded broker's state as JSON (null when none is running)."""

    def body() -> int:
        emit_json(EmbeddedBroker(data_dir).running())
        return 0

    run(body)

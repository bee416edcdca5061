"""``chainfold rewind``: put a stopped worker back at an entry (docs/cli.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from rich.markup import escape

from ..errors import ChainfoldError
from ..log.pulsar import open_log
from ..ops.rewind import parse_to, rewind as rewind_log
from ..replay.model import load_model
from .common import broker_options, cli, emit_json, json_option, run, snapshots_option, stdout
from .progress import progress

_LOCATORS = ("file", "path", "line", "stream", "event_id", "message_id", "subscription", "consumers")


def error_document(exc: ChainfoldError) -> dict[str, Any]:
    """``{"error": message}`` plus what locates the problem, for ``--json`` failures (docs/cli.md)."""
    doc: dict[str, Any] = {"error": str(exc)}
    for k in _LOCATORS:
        v = getattr(exc, k, None)
        if v not in (None, []):
            doc["file" if k == "path" else k] = v
    return doc


@cli.command()
@click.argument("topic")
@click.option("--model", "-m", "model_ref", required=True, metavar="M", help="package.module:attribute or file.py:attribute")
@click.option("--subscription", required=True, metavar="NAME", help="The worker's subscription, whose cursor moves.")
@click.option("--to", "to", required=True, metavar="INDEX|divergence:DIR",
              help="Entry index the worker handles next, or divergence:DIR for the first divergence "
                   "reconcile names from a Tracker directory.")
@click.option("--state-out", required=True, metavar="FILE", type=click.Path(dir_okay=False),
              help="Where the state export (docs/worker-evidence.md) as of the entry before goes; the worker resumes from it.")
@snapshots_option
@broker_options
@json_option
def rewind(topic: str, model_ref: str, subscription: str, to: str, state_out: str, snapshots_dir: str, broker,
           as_json: bool) -> None:
    """Put a stopped worker back at entry INDEX of TOPIC: write the state as of entry INDEX-1 to FILE
    (from the newest valid snapshot before it) and move subscription NAME's cursor so that its next
    message is entry INDEX. Refuses (exit 2) while a consumer is connected, where the broker can tell."""

    def body() -> int:
        try:
            model = load_model(model_ref)
            target = parse_to(to)
            with open_log(topic, broker) as log, progress(f"rewind {log.topic}") as update:
                report = rewind_log(log, model, subscription=subscription, to=target, state_out=state_out,
                                    snapshots_root=Path(snapshots_dir), admin_url=broker.admin_url,
                                    on_progress=update)
        except ChainfoldError as exc:
            if as_json:
                emit_json(error_document(exc))
            raise
        doc = report.to_json()
        if as_json:
            emit_json(doc)
        else:
            print_rewind(doc)
        return 0

    run(body)


def print_rewind(doc: dict[str, Any]) -> None:
    d = doc["divergence"]
    if d:
        stdout.print(f"first divergence: entry {d['index']}, event {escape(str(d['event_id']))}, "
                     f"message {escape(str(d['message_id']))}")
    rp = doc["replayed"]
    src = f"snapshot at {rp['from_snapshot']:,} entries" if rp["from_snapshot"] is not None else "the start of the log"
    stdout.print(f"[green]rewound[/] subscription {escape(doc['subscription'])} of {escape(doc['topic'])}: "
                 f"next message is entry {doc['position']:,} ({escape(doc['message_id'])})")
    stdout.print(f"state as of entry {doc['position'] - 1:,} → {escape(doc['state_out'])} "
                 f"({doc['streams']:,} streams; folded {rp['events']:,} entries from {src})")
    stdout.print(f"consumer check: {escape(doc['consumer_check']['result'])}")
    for n in doc["notes"]:
        stdout.print(f"[yellow]note:[/] {escape(n)}")

"""``chainfold rebuild``: fold the log from the newest valid snapshot."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import click

from ..store.atomic import atomic_write
from ..replay.model import load_model
from ..replay.notes import model_notes
from ..log.pulsar import open_log
from ..ops.rebuild import DEFAULT_SNAPSHOT_EVERY, RebuildOptions, rebuild as rebuild_log
from .common import (Engine, allow_partial_option, broker_options, cli, emit_json, engine_options, esc, json_option,
                     on_model_error_option, output_dir_exists, print_history, print_skipped, run, snapshots_option,
                     stderr, stdout, with_skipped)
from .progress import progress
from .publish import _parse_until


def write_state_export(path: str, states: dict) -> None:
    """Write a state export (docs/worker-evidence.md) crash-safe; ``-`` writes to stdout."""
    text = json.dumps(states, indent=1, sort_keys=True) + "\n"
    if path == "-":
        sys.stdout.write(text)
        return
    atomic_write(Path(path), text.encode())


@cli.command()
@click.argument("topic")
@click.option("--model", "-m", "model_ref", required=True, metavar="M",
              help="package.module:attribute or path/to/file.py:attribute")
@click.option("--full", is_flag=True, help="Ignore snapshots: fold the whole log.")
@click.option("--out", "-o", metavar="FILE", help="Write the state export (docs/worker-evidence.md#state-export) "
              "here; '-' = stdout.")
@click.option("--until", metavar="ID|TIME", help="Stop after this message id, or before entries published after TIME.")
@click.option("--snapshot-every", type=click.IntRange(min=0), default=DEFAULT_SNAPSHOT_EVERY, show_default=True,
              help="Take a snapshot every N entries (0: only at the end).")
@click.option("--keep", type=click.IntRange(min=1), default=3, show_default=True, help="Snapshots kept per topic.")
@click.option("--no-snapshots", is_flag=True, help="Write no snapshots.")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Worker processes: one per partition, or key shards of one topic (then only the "
                   "final snapshot is taken).")
@engine_options
@on_model_error_option
@allow_partial_option
@snapshots_option
@broker_options
@json_option
def rebuild(topic: str, model_ref: str, full: bool, out: str | None, until: str | None, snapshot_every: int,
            keep: int, no_snapshots: bool, workers: int, engine: Engine, on_model_error: str,
            allow_partial_history: bool, snapshots_dir: str, broker, as_json: bool) -> None:
    """Rebuild every stream's state by folding TOPIC from the newest valid snapshot (or from the
    start with --full). Duplicated event ids fold once; malformed entries are reported, not folded.
    Exit 1 when events were skipped (--on-model-error skip-event or skip-stream); exit 3 when
    history is gone from the log (docs/cli.md#history): then no state export is written."""

    def body() -> int:
        output_dir_exists("--out", out)
        model = load_model(model_ref)
        until_id, until_time = _parse_until(until)
        options = RebuildOptions(snapshots_root=Path(snapshots_dir), full=full, until=until_id, until_time=until_time,
                                 snapshot_every=snapshot_every if not no_snapshots else 0, keep=keep,
                                 write_snapshots=not no_snapshots, on_model_error=on_model_error,  # type: ignore[arg-type]
                                 allow_partial_history=allow_partial_history)
        engine.refuse_workers(workers)
        if engine.spark:
            from ..engines.distributed import distributed_rebuild

            with open_log(topic, broker) as log, engine.distribution(log, broker) as dist, \
                    progress(f"rebuild {log.topic} (spark)") as update:
                result = distributed_rebuild(dist, log, model_ref, options, on_progress=update)
        elif workers > 1:
            from ..log.broker import resolve_url
            from ..engines.parallel import PulsarSource, parallel_rebuild

            source = PulsarSource(topic, dataclasses.replace(broker, service_url=resolve_url(broker)))
            with progress(f"rebuild {topic} ({workers} workers)") as update:
                result = parallel_rebuild(source, model_ref, options, workers=workers, on_progress=update)
        else:
            with open_log(topic, broker) as log, progress(f"rebuild {log.topic}") as update:
                result = rebuild_log(log, model, options, on_progress=update)
        problem = result.history.problem()
        if out and problem is None:
            write_state_export(out, result.folder.rendered())
        doc = result.to_json()
        doc["notes"] = list(doc.get("notes") or []) + model_notes(model, result.folder.states)
        if problem is not None:
            doc = {"error": problem + ("; no state export written" if out else ""), "exit_code": 3, **doc}
        if as_json:
            emit_json(doc)
        elif out != "-":
            print_rebuild(doc)
        else:  # the state export is on stdout: the notes go beside it
            for n in doc["notes"]:
                stderr.print(f"[yellow]note:[/] {esc(n)}")
            if doc["skipped"]:
                stderr.print(f"[bold red]{len(doc['skipped']):,} event(s) skipped[/] (--on-model-error "
                             f"{doc['on_model_error']}): see --json")
        if problem is not None:
            stderr.print(f"[bold red]error:[/] {esc(doc['error'])}")
            return 3
        return with_skipped(0, doc["skipped"])

    run(body, as_json=as_json)


def print_rebuild(doc: dict) -> None:
    rp = doc["replayed"]
    snap = doc["snapshot"]
    for r in doc["rejected_snapshots"]:
        stdout.print(f"[yellow]rejected[/] {esc(r['path'])}: {esc(r['reason'])}")
    if snap:
        stdout.print(f"from snapshot {esc(snap['path'])} ({snap['entries']:,} entries)")
    else:
        stdout.print("from the start of the log (no snapshot used)")
    secs = doc["seconds"] or 1e-9
    stdout.print(f"folded {rp['events']:,} entries in {doc['seconds']:.2f}s ({rp['events'] / secs:,.0f}/s): "
                 f"{doc['applied']:,} events applied, {doc['streams']:,} streams; "
                 f"{len(doc['duplicates'])} duplicate(s), {len(doc['malformed'])} malformed entr(ies)")
    for m in doc["malformed"][:20]:
        stdout.print(f"  [red]malformed[/] {esc(m['message_id'])}: {esc(m['reason'])}")
    if len(doc["malformed"]) > 20:
        stdout.print(f"  ... and {len(doc['malformed']) - 20} more (see --json)")
    print_skipped(doc["skipped"])
    lg = doc["log"]
    stdout.print(f"log: {lg['events']:,} entries, {lg['segments']:,} segments, head {lg['head']}")
    print_history(doc)
    for w in doc["snapshots_written"][-1:]:
        stdout.print(f"snapshot written: {esc(w)}")
    for n in doc["notes"]:
        stdout.print(f"[yellow]note:[/] {esc(n)}")

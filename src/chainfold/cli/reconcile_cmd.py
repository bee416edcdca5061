"""``chainfold reconcile``: compare a worker's evidence with the log; repair what diverged."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.markup import escape
from rich.table import Table

from ..errors import BadInput, HistoryUnrecoverable
from ..replay.fold import load_model
from ..log.pulsar import open_log
from ..ops.corrections import producer_name_for, publish_corrections as publish, write_corrections
from ..ops.reconcile import load_processed, load_state_export, load_tracker, reconcile as reconcile_log
from .common import broker_options, cli, emit_json, json_option, run, snapshots_option, stderr, stdout
from .progress import progress
from .rebuild_cmd import write_state_export


@cli.command()
@click.argument("topic")
@click.option("--model", "-m", "model_ref", required=True, metavar="M", help="package.module:attribute or file.py:attribute")
@click.option("--state", "state_path", required=True, type=click.Path(dir_okay=False),
              help="The worker's state export (SPEC §3): {stream: state}.")
@click.option("--processed", "processed_path", type=click.Path(dir_okay=False, allow_dash=True),
              help="The worker's processed log (JSON Lines {id, message_id?}), in handling order.")
@click.option("--checkpoints", "checkpoints_path", type=click.Path(dir_okay=False),
              help="The worker's tracker checkpoints (chainfold.Tracker's checkpoints.jsonl).")
@click.option("--repair", "repair_out", metavar="OUT", type=click.Path(dir_okay=False),
              help="Replay the divergent streams, validate, write the corrected state export to OUT.")
@click.option("--corrections", "corrections_out", metavar="FILE", type=click.Path(dir_okay=False),
              help="With --repair: where the corrections go (JSON Lines); default OUT's name + .corrections.jsonl.")
@click.option("--publish-corrections", metavar="TOPIC2", help="With --repair: also publish the corrections to TOPIC2.")
@snapshots_option
@broker_options
@json_option
def reconcile(topic: str, model_ref: str, state_path: str, processed_path: str | None, checkpoints_path: str | None,
              repair_out: str | None, corrections_out: str | None, publish_corrections: str | None,
              snapshots_dir: str, broker, as_json: bool) -> None:
    """Find what the worker that folded TOPIC missed, doubled, reordered or got wrong, from its state
    export and its processed log and/or tracker checkpoints. Exit 0 consistent (or repaired),
    1 divergent, 2 bad input, 3 unrecoverable."""

    def body() -> int:
        model = load_model(model_ref)
        state = load_state_export(state_path)
        processed = load_processed(processed_path) if processed_path else None
        tracker = load_tracker(checkpoints_path) if checkpoints_path else None
        if publish_corrections and not repair_out:
            raise BadInput("--publish-corrections needs --repair OUT")
        with open_log(topic, broker) as log:
            try:
                with progress(f"reconcile {log.topic}") as update:
                    report = reconcile_log(log, model, snapshots_root=Path(snapshots_dir), state=state,
                                           state_path=state_path, processed=processed, tracker=tracker,
                                           repair=bool(repair_out), on_progress=update)
            except HistoryUnrecoverable as exc:
                if not as_json:
                    raise
                emit_json(unrecoverable_report(log.topic, str(exc), processed, tracker))
                stderr.print(f"[bold red]error:[/] {exc}")
                return 3
            doc = report.to_json()
            if repair_out and report.repaired_states is not None:
                write_state_export(repair_out, report.repaired_states)
                cpath = corrections_out or str(Path(repair_out).with_suffix("")) + ".corrections.jsonl"
                write_corrections(cpath, report.corrections)
                doc["repair"] = {"state": repair_out, "corrections": cpath, "streams": len(report.corrections)}
                if publish_corrections:
                    target = type(log)(log.client, publish_corrections, producer_name=producer_name_for(log.topic))
                    try:
                        published = publish(target, report.corrections)
                    finally:
                        target.close()
                    doc["repair"]["published_to"] = target.topic
                    doc["repair"]["publish"] = published.to_json()
        if as_json:
            emit_json(doc)
        else:
            print_reconcile(doc)
        return {"consistent": 0, "repaired": 0, "divergent": 1, "unrecoverable": 3}[doc["verdict"]]

    run(body)


def unrecoverable_report(topic: str, reason: str, processed, tracker) -> dict:
    """The SPEC §4 report when the log no longer holds the history the worker's evidence covers."""
    return {
        "verdict": "unrecoverable",
        "topic": topic,
        "log": {"events": None, "segments": None, "head": None},
        "processed": {"events": len(processed.ids) if processed else (tracker.size if tracker else 0)},
        "first_divergence": None,
        "missing": [],
        "duplicates": [],
        "out_of_order": [],
        "malformed": [],
        "divergent_streams": [],
        "replayed": {"from_snapshot": None, "events": 0},
        "error": reason,
    }


def _short(v: object, width: int = 60) -> str:
    s = json.dumps(v, sort_keys=True) if not isinstance(v, str) else v
    return s if len(s) <= width else s[: width - 1] + "…"


def print_reconcile(doc: dict) -> None:
    colour = {"consistent": "green", "repaired": "green", "divergent": "bold red"}.get(doc["verdict"], "bold red")
    lg = doc["log"]
    stdout.print(f"[{colour}]{doc['verdict'].upper()}[/] {doc['topic']}: {lg['events']:,} log entries, "
                 f"{doc['processed']['events']:,} handled by the worker")
    fd = doc["first_divergence"]
    if fd:
        stdout.print(f"first divergence: entry {fd['index']} (segment {fd['segment']}), event {fd['event_id']}, "
                     f"message {fd['message_id']}")
    kinds = Table(title="faults", title_justify="left")
    kinds.add_column("kind")
    kinds.add_column("count", justify="right")
    kinds.add_column("examples")
    for key, label in (("missing", "missed"), ("duplicates", "duplicated"), ("out_of_order", "out of order"),
                       ("malformed", "malformed entries (message ids)")):
        items = doc[key]
        kinds.add_row(label, str(len(items)), ", ".join(map(str, items[:4])) + (" …" if len(items) > 4 else ""))
    stdout.print(kinds)
    ds = doc["divergent_streams"]
    if ds:
        t = Table(title=f"divergent streams ({len(ds)})", title_justify="left")
        t.add_column("stream")
        t.add_column("expected")
        t.add_column("actual")
        t.add_column("difference")
        for d in ds[:30]:
            t.add_row(d["stream"], _short(d["expected"]), _short(d["actual"]), _short(d.get("delta")))
        stdout.print(t)
        if len(ds) > 30:
            stdout.print(f"… and {len(ds) - 30} more (see --json)")
    rp = doc["replayed"]
    src = f"snapshot at {rp['from_snapshot']:,} entries" if rp["from_snapshot"] is not None else "the start of the log"
    stdout.print(f"replayed {rp['events']:,} entries from {src}")
    if "repair" in doc:
        r = doc["repair"]
        stdout.print(f"[green]repaired[/] {r['streams']} stream(s), validated against a fresh rebuild: "
                     f"state → {r['state']}, corrections → {r['corrections']}")
        if "publish" in r:
            pb = r["publish"]
            stdout.print(f"corrections published to {escape(pb['topic'])}: {pb['published']} sent, "
                         f"{pb['already_published']} already there (exactly once per idempotency key)")
    for n in doc.get("notes", []):
        stdout.print(f"[yellow]note:[/] {n}")

"""``chainfold reconcile``: compare a worker's evidence with the log; repair what diverged."""

from __future__ import annotations

import contextlib
from pathlib import Path

import click

from ..store.atomic import atomic_write
from ..errors import BadInput, HistoryUnrecoverable
from ..replay.model import load_model
from ..log.pulsar import open_log
from ..ops.corrections import producer_name_for, publish_corrections as publish, write_corrections
from ..ops.reconcile import load_processed, load_state_export, load_tracker, reconcile as reconcile_log
from .common import (Engine, allow_partial_option, broker_options, cli, emit_json, engine_options, esc, json_option,
                     on_model_error_option,
                     output_dir_exists, run, snapshots_option, stderr, with_skipped)
from .progress import progress
from .reconcile_view import print_reconcile
from .rebuild_cmd import write_state_export


@cli.command()
@click.argument("topic")
@click.option("--model", "-m", "model_ref", required=True, metavar="M", help="package.module:attribute or file.py:attribute")
@click.option("--state", "state_path", required=True, type=click.Path(dir_okay=False),
              help="The worker's state export {stream: state} (docs/worker-evidence.md#state-export).")
@click.option("--processed", "processed_path", type=click.Path(dir_okay=False, allow_dash=True),
              help="The worker's processed log (JSON Lines {id, message_id?}), in handling order.")
@click.option("--checkpoints", "checkpoints_path", type=click.Path(dir_okay=False),
              help="The worker's tracker checkpoints (chainfold.Tracker's checkpoints.jsonl).")
@click.option("--repair", "repair_out", metavar="OUT", type=click.Path(dir_okay=False),
              help="Replay the divergent streams, validate, write the corrected state export to OUT "
                   "(always, also when consistent; OUT's directory must exist).")
@click.option("--corrections", "corrections_out", metavar="FILE", type=click.Path(dir_okay=False),
              help="With --repair: where the corrections go (JSON Lines); default OUT's name + .corrections.jsonl.")
@click.option("--publish-corrections", metavar="TOPIC2", help="With --repair: also publish the corrections to TOPIC2.")
@click.option("--evidence-out", "evidence_out", metavar="DIR", type=click.Path(file_okay=False),
              help="With --repair: write fresh tracker evidence for the repaired worker to DIR (a new "
                   "directory): what a correct worker would have recorded (docs/incidents.md).")
@click.option("--html", "html_out", metavar="FILE", type=click.Path(dir_okay=False),
              help="Also write the report as one self-contained HTML page (docs/cli.md#the-html-report).")
@engine_options
@on_model_error_option
@allow_partial_option
@snapshots_option
@broker_options
@json_option
def reconcile(topic: str, model_ref: str, state_path: str, processed_path: str | None, checkpoints_path: str | None,
              repair_out: str | None, corrections_out: str | None, publish_corrections: str | None,
              evidence_out: str | None, html_out: str | None, engine: Engine, on_model_error: str,
              allow_partial_history: bool, snapshots_dir: str, broker, as_json: bool) -> None:
    """Find what the worker that folded TOPIC missed, doubled, reordered or got wrong, from its state
    export and its processed log and/or tracker checkpoints. Exit 0 consistent (or repaired),
    1 divergent (or events skipped by --on-model-error), 2 bad input, 3 unrecoverable (history gone
    from the log, docs/cli.md#history)."""

    def body() -> int:
        for option, path in (("--repair", repair_out), ("--corrections", corrections_out),
                             ("--evidence-out", evidence_out), ("--html", html_out)):
            output_dir_exists(option, path)
        model = load_model(model_ref)
        state = load_state_export(state_path)
        processed = load_processed(processed_path) if processed_path else None
        tracker = load_tracker(checkpoints_path) if checkpoints_path else None
        if publish_corrections and not repair_out:
            raise BadInput("--publish-corrections needs --repair OUT")
        if evidence_out and not repair_out:
            raise BadInput("--evidence-out needs --repair OUT")
        with open_log(topic, broker) as log, (engine.distribution(log, broker) if engine.spark
                                              else contextlib.nullcontext()) as dist:
            hooks = {}
            if dist is not None:
                from ..engines.distributed import distributed_reconcile_engine

                hooks = distributed_reconcile_engine(dist)
            try:
                with progress(f"reconcile {log.topic}") as update:
                    report = reconcile_log(log, model, snapshots_root=Path(snapshots_dir), state=state,
                                           state_path=state_path, processed=processed, tracker=tracker,
                                           repair=bool(repair_out), allow_partial_history=allow_partial_history,
                                           on_progress=update,
                                           on_model_error=on_model_error, **hooks)  # type: ignore[arg-type]
            except HistoryUnrecoverable as exc:
                doc = unrecoverable_report(log.topic, str(exc), processed, tracker, exc)
                if html_out:
                    write_html_report(html_out, doc)
                if not as_json:
                    raise
                emit_json(doc)
                stderr.print(f"[bold red]error:[/] {esc(exc)}")
                return 3
            doc = report.to_json()
            if repair_out and report.repaired_states is None:
                doc["notes"].append(f"{repair_out} not written: the repair did not validate")
            if repair_out and report.repaired_states is not None:
                write_state_export(repair_out, report.repaired_states)
                cpath = corrections_out or str(Path(repair_out).with_suffix("")) + ".corrections.jsonl"
                write_corrections(cpath, report.corrections)
                doc["repair"] = {"state": repair_out, "corrections": cpath, "streams": len(report.corrections)}
                if evidence_out:
                    from ..ops.evidence import write_reference_evidence

                    doc["repair"]["evidence"] = write_reference_evidence(log, evidence_out,
                                                                         entries=doc["log"]["events"])
                if publish_corrections:
                    target = type(log)(log.client, publish_corrections, producer_name=producer_name_for(log.topic))
                    try:
                        published = publish(target, report.corrections)
                    finally:
                        target.close()
                    doc["repair"]["published_to"] = target.topic
                    doc["repair"]["publish"] = published.to_json()
        if html_out:
            write_html_report(html_out, doc)
            doc["html"] = html_out
        if as_json:
            emit_json(doc)
        else:
            print_reconcile(doc)
        if doc["verdict"] == "unrecoverable" and doc.get("error"):
            stderr.print(f"[bold red]error:[/] {esc(doc['error'])}")
        code = {"consistent": 0, "repaired": 0, "divergent": 1, "unrecoverable": 3}[doc["verdict"]]
        return with_skipped(code, doc["skipped"])

    run(body, as_json=as_json)


def write_html_report(path: str, doc: dict) -> None:
    """The report as one self-contained HTML page, written crash-safe."""
    from ..report_html import render_report

    atomic_write(Path(path), render_report(doc).encode("utf-8"))


def unrecoverable_report(topic: str, reason: str, processed, tracker, exc: HistoryUnrecoverable | None = None) -> dict:
    """The reconcile report (docs/cli.md#reconcile) when the log no longer holds the history the
    worker's evidence covers (and no snapshot covers the loss)."""
    details = exc.details if exc is not None else {}
    return {
        "verdict": "unrecoverable",
        "topic": topic,
        "log": {"events": None, "segments": None, "head": None},
        "processed": {"events": len(processed) if processed is not None else (tracker.size if tracker else None)},
        "first_divergence": None,
        "missing": [],
        "duplicates": [],
        "out_of_order": [],
        "malformed": [],
        "divergent_streams": [],
        "replayed": {"from_snapshot": None, "events": 0},
        "unknown_ids": [],
        "unknown_streams": [],
        "skipped": [],
        **details,
        "error": reason,
        **({"message_id": exc.message_id} if exc is not None and exc.message_id else {}),
    }



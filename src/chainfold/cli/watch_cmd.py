"""``chainfold watch``: follow a log (and a worker's evidence) live; report divergence (docs/cli.md)."""

from __future__ import annotations

import os
from pathlib import Path

import click

from ..errors import ChainfoldError
from ..log.pulsar import open_log
from ..ops.rebuild import DEFAULT_SNAPSHOT_EVERY
from ..ops.watch import WatchOptions, WatchRun
from ..replay.model import load_model
from ..watch.output import StderrStatus, StopOnSignals, WatchLines
from .common import allow_partial_option, broker_options, cli, error_json, esc, run, snapshots_option, stderr

WATCH_RETRY_SECONDS = 5.0
"""How long the log's reader retries a broker that went away before watch reports it (an ``error``
line) and retries on its own, for as long as it runs (``CHAINFOLD_RETRY_SECONDS`` overrides)."""


@cli.command()
@click.argument("topic")
@click.option("--model", "-m", "model_ref", required=True, metavar="M",
              help="package.module:attribute or path/to/file.py:attribute")
@click.option("--evidence", type=click.Path(file_okay=False), metavar="DIR",
              help="The worker's Tracker directory (it may not exist yet): compare its handling with the log.")
@click.option("--fail-on", "fail_on", type=click.Choice(["divergence"]),
              help="Exit 1 once a divergence is reported (after the checkpoints and a snapshot are written).")
@click.option("--metrics-port", type=click.IntRange(0, 65535), metavar="P",
              help="Serve Prometheus metrics at http://HOST:P/metrics (0: a free port, printed on stderr).")
@click.option("--metrics-host", default="127.0.0.1", show_default=True, metavar="HOST",
              help="Address the metrics endpoint listens on.")
@click.option("--on-model-error", type=click.Choice(["stop", "skip-event", "skip-stream"]), default="stop",
              show_default=True, help="When the model's apply raises: stop (exit 2), or skip the event or its stream "
              "(an error line per skipped event; exit 1 when stopped).")
@click.option("--snapshot-every", type=click.IntRange(min=0), default=DEFAULT_SNAPSHOT_EVERY, show_default=True,
              help="Take a snapshot every N entries (0: not by count).")
@click.option("--snapshot-seconds", type=click.FloatRange(min=0), default=300.0, show_default=True,
              help="Take a snapshot every S seconds when entries came in (0: not by time).")
@click.option("--keep", type=click.IntRange(min=1), default=3, show_default=True, help="Snapshots kept per topic.")
@click.option("--progress-seconds", type=click.FloatRange(min=0.05), default=1.0, show_default=True,
              help="Seconds between progress lines.")
@allow_partial_option
@snapshots_option
@broker_options
def watch(topic: str, model_ref: str, evidence: str | None, fail_on: str | None, metrics_port: int | None,
          metrics_host: str, on_model_error: str, snapshot_every: int, snapshot_seconds: float, keep: int,
          progress_seconds: float, allow_partial_history: bool, snapshots_dir: str, broker) -> None:
    """Follow TOPIC as it grows: hash it (recording checkpoints), fold it with the model, take
    periodic snapshots; with --evidence, compare a worker's handling with the log as both grow and
    report the first divergence within seconds. JSON lines on stdout (progress, divergence,
    malformed, duplicate, error); runs until SIGINT/SIGTERM (exit 0, checkpoints and a snapshot
    written)."""
    metrics = None
    lines = WatchLines()

    def body() -> int:
        nonlocal metrics
        model = load_model(model_ref)
        options = WatchOptions(snapshots_root=Path(snapshots_dir), evidence=Path(evidence) if evidence else None,
                               fail_on_divergence=fail_on == "divergence", on_model_error=on_model_error,  # type: ignore[arg-type]
                               snapshot_every=snapshot_every, snapshot_seconds=snapshot_seconds, keep=keep,
                               progress_seconds=progress_seconds, allow_partial_history=allow_partial_history)
        server = None
        if metrics_port is not None:
            from ..watch.metrics import WatchMetrics

            metrics = lines.metrics = WatchMetrics()
            server = metrics.serve(metrics_port, metrics_host)
            stderr.print(f"chainfold: metrics at {esc(server.url)}")
        retry = float(os.environ.get("CHAINFOLD_RETRY_SECONDS", WATCH_RETRY_SECONDS))
        try:
            with open_log(topic, broker, retry_seconds=retry) as log, StderrStatus() as status:
                w = WatchRun(log, model, options, lines, status=status.update if status.enabled else None)
                with StopOnSignals(w.stop):
                    result = w.run()
        finally:
            if server is not None:
                server.close()
        snap = f"; snapshot {esc(result.snapshot)}" if result.snapshot else ""
        stderr.print(f"chainfold: watch ended: {result.log_entries:,} entries, head {result.head}{snap}",
                     soft_wrap=True)
        return result.exit_code

    def guarded() -> int:
        try:
            return body()
        except ChainfoldError as exc:  # the one line a program reading stdout sees, then exit as every command
            doc = error_json(exc)
            lines.error(doc.pop("error"), **doc)
            raise

    run(guarded)

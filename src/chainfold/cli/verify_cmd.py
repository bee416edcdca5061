"""``chainfold verify`` and ``chainfold prove``."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.table import Table

from ..ops import proofs
from ..errors import BadInput
from ..log.pulsar import open_log
from ..hashing.stage import DEFAULT_SEGMENT_SIZE
from ..ops.verify import VerifyOptions, compare_logs, verify_log
from .common import broker_options, cli, emit_json, json_option, run, snapshots_option, stdout
from .progress import progress


def _pow2(ctx: click.Context, param: click.Parameter, value: int) -> int:
    if value < 1 or value & (value - 1):
        raise click.BadParameter("must be a power of two")
    return value


segment_option = click.option("--segment-size", type=int, default=DEFAULT_SEGMENT_SIZE, show_default=True,
                              callback=_pow2, help="Entries per segment (a power of two) for a log with no "
                              "recorded checkpoints; otherwise the recorded size is used.")


@cli.command()
@click.argument("topic")
@click.option("--against", metavar="OTHER", help="Compare with another log (e.g. a copy in another cluster).")
@click.option("--against-service-url", metavar="URL", help="Broker of OTHER, if not the same.")
@click.option("--reset", is_flag=True, help="Discard the recorded checkpoints and record the log as it is now.")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Worker processes: one per partition, or ranges of the recorded segments of one topic.")
@segment_option
@snapshots_option
@broker_options
@json_option
def verify(topic: str, against: str | None, against_service_url: str | None, reset: bool, workers: int,
           segment_size: int, snapshots_dir: str, broker, as_json: bool) -> None:
    """Recompute the hashes over TOPIC and compare them with the checkpoints recorded on earlier reads
    and with the snapshots' recorded chains (or with another log, --against). Names the first entry
    that differs. Exit 0 intact, 1 mismatch."""

    def body() -> int:
        from ..store.snapshots import topic_dir

        with open_log(topic, broker) as log:
            options = VerifyOptions(record_dir=topic_dir(Path(snapshots_dir), log.topic), snapshots_root=Path(snapshots_dir),
                                    segment_size=segment_size, reset=reset)
            with progress(f"verify {log.topic}") as update:
                if against:
                    if against_service_url:
                        import dataclasses

                        other_opts = dataclasses.replace(broker, service_url=against_service_url)
                        other = open_log(against, other_opts)
                    else:
                        other = type(log)(log.client, against)
                    try:
                        report = compare_logs(log, other, segment_size=segment_size, on_progress=update)
                    finally:
                        other.close()
                elif workers > 1:
                    import dataclasses

                    from ..log.broker import resolve_url
                    from ..engines.parallel import PulsarSource, parallel_verify

                    source = PulsarSource(topic, dataclasses.replace(broker, service_url=resolve_url(broker)))
                    report = parallel_verify(source, options, workers=workers, on_progress=update)
                else:
                    report = verify_log(log, options, on_progress=update)
        doc = report.to_json()
        if as_json:
            emit_json(doc)
        else:
            _print_verify(doc)
        return 0 if report.intact else 1

    run(body)


def _print_verify(doc: dict) -> None:
    lg = doc["log"]
    colour = "green" if doc["verdict"] == "intact" else "bold red"
    stdout.print(f"[{colour}]{doc['verdict'].upper()}[/] {doc['topic']}"
                 + (f" against {doc['against']}" if doc.get("against") else ""))
    stdout.print(f"  {lg['events']:,} entries in {lg['segments']:,} segments, head {lg['head']}")
    fm = doc["first_mismatch"]
    if fm:
        t = Table("first mismatch", "value", show_header=False)
        for k in ("index", "segment", "partition", "message_id", "event_id", "reason"):
            if k in fm:
                t.add_row(k, str(fm[k]))
        stdout.print(t)
    if doc.get("checkpoints_recorded"):
        stdout.print(f"  recorded {doc['checkpoints_recorded']} new checkpoint(s)")
    if doc.get("snapshots_checked"):
        stdout.print(f"  checked {doc['snapshots_checked']} snapshot position(s)")
    for n in doc.get("notes", []):
        stdout.print(f"  note: {n}")


@cli.command()
@click.argument("topic", required=False)
@click.argument("event_id", required=False)
@click.option("--consistency", "old_size", type=int, metavar="OLD_SIZE",
              help="Prove that the log at OLD_SIZE entries is a prefix of the log today.")
@click.option("--verify", "verify_file", type=click.Path(dir_okay=False, allow_dash=True),
              help="Check a proof document (from this command) offline; exit 0 valid, 1 invalid.")
@click.option("--partition", type=int, help="Partition of a partitioned topic.")
@broker_options
def prove(topic: str | None, event_id: str | None, old_size: int | None, verify_file: str | None,
          partition: int | None, broker) -> None:
    """Print an RFC 9162 proof as JSON: inclusion of EVENT_ID in TOPIC at its current size, or
    (--consistency OLD_SIZE) that TOPIC's first OLD_SIZE entries are unchanged. --verify FILE checks one."""

    def body() -> int:
        if verify_file:
            try:
                text = click.open_file(verify_file).read()
                doc = json.loads(text)
            except (OSError, ValueError) as exc:
                raise BadInput(f"cannot read proof {verify_file}: {exc}") from None
            ok, what = proofs.check(doc)
            emit_json({"valid": ok, "checked": what})
            return 0 if ok else 1
        if not topic:
            raise BadInput("give TOPIC (and EVENT_ID or --consistency OLD_SIZE), or --verify FILE")
        with open_log(topic, broker) as log, progress("hashing") as update:
            if old_size is not None:
                doc = proofs.consistency(log, old_size, partition=partition, on_progress=update)
            elif event_id:
                doc = proofs.inclusion(log, event_id, partition=partition, on_progress=update)
            else:
                raise BadInput("give EVENT_ID or --consistency OLD_SIZE")
        emit_json(doc)
        return 0

    run(body)

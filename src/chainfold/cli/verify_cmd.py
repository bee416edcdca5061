"""``chainfold verify`` and ``chainfold prove``."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path

import click
from rich.table import Table

from ..ops import proofs
from ..errors import BadInput
from ..log.pulsar import open_log
from ..hashing.stage import DEFAULT_SEGMENT_SIZE
from ..ops.verify import VerifyOptions, compare_logs, verify_log
from ..envelope import json_error
from .common import (Engine, allow_partial_option, broker_options, cli, emit_json, engine_options, esc, json_option,
                     print_history, run, snapshots_option, stderr, stdout)
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
@engine_options
@segment_option
@allow_partial_option
@snapshots_option
@broker_options
@json_option
def verify(topic: str, against: str | None, against_service_url: str | None, reset: bool, workers: int,
           engine: Engine, segment_size: int, allow_partial_history: bool, snapshots_dir: str, broker,
           as_json: bool) -> None:
    """Recompute the hashes over TOPIC and compare them with the checkpoints recorded on earlier reads
    and with the snapshots' recorded chains (or with another log, --against). Names the first entry
    that differs; checks every stream's seq for gaps and counts malformed entries. Exit 0 intact,
    1 mismatch, 3 history gone (entries lost or seq gaps, docs/cli.md#history).

    Without --against, verify records what it read (checkpoints and leaf hashes) in TOPIC's folder
    under --snapshots, creating it when there is something to record, and says so: that record is
    what the next verify compares the log with. See docs/cli.md#verify."""

    def body() -> int:
        from ..store.snapshots import topic_dir

        record_dir: Path | None = None
        existed = False
        engine.refuse_workers(workers)
        with open_log(topic, broker) as log, (engine.distribution(log, broker) if engine.spark
                                              else contextlib.nullcontext()) as dist:
            options = VerifyOptions(record_dir=topic_dir(Path(snapshots_dir), log.topic), snapshots_root=Path(snapshots_dir),
                                    segment_size=segment_size, reset=reset, allow_partial_history=allow_partial_history)
            if not against:
                record_dir = topic_dir(Path(snapshots_dir), log.topic)
                existed = _has_record(record_dir)
            with progress(f"verify {log.topic}") as update:
                if against:
                    if against_service_url:
                        other_opts = dataclasses.replace(broker, service_url=against_service_url)
                        other = open_log(against, other_opts)
                    else:
                        other = type(log)(log.client, against)
                    try:
                        scan = None
                        if dist is not None:
                            from ..engines.distributed import distributed_scanner
                            from ..engines.spark import pulsar_distribution
                            from ..log.broker import resolve_url

                            # another broker (--against-service-url): its ranges probed, not planned from our admin API
                            theirs = dataclasses.replace(broker, service_url=against_service_url or resolve_url(broker),
                                                         admin_url=None if against_service_url else broker.admin_url)
                            scan = distributed_scanner({log.topic: dist, other.topic: pulsar_distribution(
                                dist.cluster, other.topic, theirs, other.client, theirs.admin_url)})
                        report = compare_logs(log, other, segment_size=segment_size, on_progress=update, scan=scan)
                    finally:
                        other.close()
                elif dist is not None:
                    from ..engines.distributed import distributed_verify

                    report = distributed_verify(dist, log, options, on_progress=update)
                elif workers > 1:
                    from ..log.broker import resolve_url
                    from ..engines.parallel import PulsarSource, parallel_verify

                    source = PulsarSource(topic, dataclasses.replace(broker, service_url=resolve_url(broker)))
                    report = parallel_verify(source, options, workers=workers, on_progress=update)
                else:
                    report = verify_log(log, options, on_progress=update)
        doc = report.to_json()
        if record_dir is not None and _has_record(record_dir) and (not existed or doc.get("checkpoints_recorded")):
            doc["recorded_in"] = str(record_dir)
            doc["record_created"] = not existed
        if as_json:
            emit_json(doc)
        else:
            _print_verify(doc)
        if doc.get("error"):
            stderr.print(f"[bold red]error:[/] {esc(doc['error'])}")
        return report.exit_code

    run(body, as_json=as_json)


def _print_verify(doc: dict) -> None:
    lg = doc["log"]
    colour = "green" if doc["verdict"] == "intact" else "bold red"
    verdict = doc["verdict"].upper()
    if doc["verdict"] != "intact" and not doc["first_mismatch"] and doc.get("history", "complete") != "complete":
        verdict = f"HISTORY {doc['history'].upper()}"  # the hashes agree; events are gone from the log
    stdout.print(f"[{colour}]{verdict}[/] {esc(doc['topic'])}"
                 + (f" against {esc(doc['against'])}" if doc.get("against") else ""))
    stdout.print(f"  {lg['events']:,} entries in {lg['segments']:,} segments, head {lg['head']}")
    if lg.get("root"):
        stdout.print(f"  RFC 9162 root {lg['root']}")
    fm = doc["first_mismatch"]
    if fm:
        t = Table("first mismatch", "value", show_header=False)
        for k in ("index", "segment", "partition", "message_id", "event_id", "reason"):
            if k in fm:
                t.add_row(k, esc(fm[k]))
        stdout.print(t)
    rec = doc.get("recorded_in")
    if rec and doc.get("checkpoints_recorded"):
        stdout.print(f"  recorded {doc['checkpoints_recorded']} new checkpoint(s) in {esc(rec)} "
                     "(later verifies compare the log with them)")
    elif rec and doc.get("record_created"):
        stdout.print(f"  recorded the log's hashes in {esc(rec)} (later verifies compare the log with them)")
    if doc.get("snapshots_checked"):
        stdout.print(f"  checked {doc['snapshots_checked']} snapshot position(s)")
    if doc.get("malformed_entries"):
        first = doc.get("malformed_first") or []
        stdout.print(f"  [yellow]{doc['malformed_entries']:,} malformed entr(ies)[/]: not events, never folded"
                     + (f" (the first at message {esc(first[0])}; `chainfold read` shows why)" if first else ""))
    print_history(doc)
    for n in doc.get("notes", []):
        stdout.print(f"  note: {esc(n)}")


def _by_id_or_index(event_id: str | None, index: int | None) -> None:
    if event_id is not None and index is not None:
        raise BadInput("give EVENT_ID or --index N, not both")


@cli.command()
@click.argument("topic", required=False)
@click.argument("event_id", required=False)
@click.option("--index", type=click.IntRange(min=0), metavar="N",
              help="Prove the entry at log position N (0-based) instead of an event id.")
@click.option("--from", "old_size", type=click.IntRange(min=1), metavar="OLD",
              help="Consistency: prove that the log's first OLD entries are a prefix of the log at --to "
                   "NEW entries (default: its size today).")
@click.option("--consistency", "consistency_size", type=click.IntRange(min=1), metavar="OLD_SIZE",
              help="The same as --from OLD_SIZE (against the log today).")
@click.option("--to", "new_size", type=click.IntRange(min=1), metavar="NEW",
              help="The log size to prove in (default: today's): the tree of its first NEW entries.")
@click.option("--verify", "verify_file", type=click.Path(dir_okay=False, allow_dash=True),
              help="Check a proof document (from this command) offline; exit 0 valid, 1 invalid, "
                   "2 not a proof document.")
@click.option("--partition", type=int, help="Partition of a partitioned topic.")
@broker_options
@json_option
def prove(topic: str | None, event_id: str | None, index: int | None, old_size: int | None,
          consistency_size: int | None, new_size: int | None, verify_file: str | None, partition: int | None,
          broker, as_json: bool) -> None:
    """Write an RFC 9162 proof document (JSON, on stdout): inclusion of EVENT_ID (or --index N) in
    TOPIC, or consistency (--from OLD [--to NEW]) between two sizes of TOPIC. --verify FILE checks a
    proof document offline, without a broker. Formats: docs/formats.md#proofs."""

    def body() -> int:
        if verify_file:
            return _verify_proof(verify_file, as_json)
        if not topic:
            raise BadInput("give TOPIC and EVENT_ID, --index N or --from OLD; or --verify FILE")
        _by_id_or_index(event_id, index)
        if old_size is not None and consistency_size is not None:
            raise BadInput("--consistency OLD_SIZE is --from OLD_SIZE: give one of them")
        old = old_size if old_size is not None else consistency_size
        with open_log(topic, broker) as log, progress("hashing") as update:
            if old is not None:
                if event_id is not None or index is not None:
                    raise BadInput("a consistency proof (--from) takes no EVENT_ID or --index")
                doc = proofs.consistency(log, old, new_size, partition=partition, on_progress=update)
            elif event_id is not None or index is not None:
                doc = proofs.inclusion(log, event_id, index=index, size=new_size, partition=partition,
                                       on_progress=update)
            else:
                raise BadInput("give EVENT_ID, --index N or --from OLD")
        emit_json(doc)
        if doc["type"] == "inclusion":
            stderr.print(f"inclusion of entry {doc['index']} (event {esc(doc['event_id'])}, message "
                         f"{esc(doc['message_id'])}) in the log of {doc['size']} entries, root {doc['root']}")
        else:
            stderr.print(f"consistency: the log of {doc['old_size']} entries (root {doc['old_root']}) is a "
                         f"prefix of the log of {doc['size']} (root {doc['root']})")
        return 0

    run(body, as_json=as_json)


def _verify_proof(path: str, as_json: bool) -> int:
    try:
        with click.open_file(path) as f:
            text = f.read()
    except OSError as exc:
        raise BadInput(f"cannot read proof {path}: {exc.strerror or exc}") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadInput(f"proof {path}: {json_error(exc)}") from None
    ok, what = proofs.check(doc)
    if as_json:
        emit_json({"valid": ok, "checked": what})
    else:
        stdout.print(("[green]VALID[/] " if ok else "[bold red]INVALID[/] ") + esc(what))
    return 0 if ok else 1


def _has_record(folder: Path) -> bool:
    """Whether the topic's folder holds a hash record (it may hold only publish's seq index)."""
    return folder.is_dir() and any(folder.glob("leaves*.bin"))

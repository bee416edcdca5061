"""``chainfold publish`` and ``chainfold read``: events into the log and entries out of it."""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import click

from ..errors import BadInput
from ..jsonl import check_events_file, entry_to_json
from ..log import EventLog, MessageId
from ..log.publish import publish_file
from ..log.pulsar import open_log
from ..log.seqindex import SeqIndex
from ..store.snapshots import topic_dir
from .common import broker_options, cli, emit_json, esc, json_option, run, snapshots_option, stderr


@cli.command()
@click.argument("topic")
@click.argument("file", type=click.Path(dir_okay=True, allow_dash=True))
@broker_options
@snapshots_option
@json_option
@click.option("--producer-name", help="Exactly-once publishing: events whose id the log already holds are "
              "not sent again (re-running an interrupted publish appends only what is missing), and "
              "messages carry sequence ids so broker deduplication drops in-flight re-sends. Reads the "
              "whole log to find them.")
@click.option("--exclusive", is_flag=True, help="Exclusive producer: refuse to run beside another writer.")
def publish(topic: str, file: str, broker, snapshots_dir: str, as_json: bool, producer_name: str | None,
            exclusive: bool) -> None:
    """Append the JSON Lines events of FILE ("-" = stdin) to TOPIC.

    Each line is {"id", "stream", "type", "data", "time"?}. The whole file is checked first; one bad
    line refuses it (exit 2, naming the line) and nothing is appended. Each event gets the next seq of
    its stream, found from the seq index in the snapshot store (SNAPSHOTS/<topic>/seqs.json) and the
    log's tail. Publishing the same file twice stores the events twice; folds count each id once.
    Memory does not grow with the file.
    """

    def body() -> int:
        t0 = time.monotonic()
        with check_events_file(file) as checked:
            with open_log(topic, broker, producer_name=producer_name, exclusive=exclusive) as log:
                index = SeqIndex(topic_dir(snapshots_dir, log.topic))
                report = publish_file(log, checked, index=index)
                topic_name = log.topic
        dt = time.monotonic() - t0
        summary = {
            "topic": topic_name,
            "events": report.events,
            "published": report.published,
            "skipped_already_stored": report.skipped,
            "first": str(report.first) if report.first else None,
            "last": str(report.last) if report.last else None,
            "seqs_from": report.seqs_from,
            "entries_read": report.read,
            "seconds": round(dt, 3),
        }
        if as_json:
            emit_json(summary)
        else:
            extra = f" ({report.skipped} already stored)" if report.skipped else ""
            stderr.print(f"published {report.published} events to {esc(topic_name)}{extra} in {dt:.2f}s")
        return 0

    run(body, as_json=as_json)


def _parse_until(text: str | None) -> tuple[MessageId | None, int | None]:
    """``--until``: a message id, or a time (ms since the epoch, or ISO 8601)."""
    if text is None:
        return None, None
    if ":" in text and "T" not in text and "-" not in text.split(":", 1)[0]:
        return MessageId.parse(text), None
    if text.isdigit():
        return None, int(text)
    try:
        t = _dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise BadInput(f"--until: not a message id, ms timestamp or ISO time: {text!r}") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=_dt.timezone.utc)
    return None, int(t.timestamp() * 1000)


class _Stop(BaseException):
    """SIGINT or SIGTERM while ``read --follow`` waits: stop reading and end cleanly."""


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[None]:
    def stop(signum: int, frame: object) -> None:
        raise _Stop(signum)

    old = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    except _Stop:
        pass
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _empty_note(log: EventLog) -> str:
    """What to say when a whole topic reads as empty."""
    exists = log.exists()
    if exists is None:
        return (f"{log.topic} holds no entries: it is empty or does not exist (this broker cannot tell "
                "which; give --admin-url to ask Apache Pulsar's admin API)")
    return f"{log.topic} exists and holds no entries"


@cli.command()
@click.argument("topic")
@broker_options
@click.option("--from", "from_", metavar="ID", help="Start at this message id (inclusive).")
@click.option("--after", metavar="ID", help="Start strictly after this message id.")
@click.option("--until", metavar="ID|TIME", help="Stop after this message id, or before entries published later than TIME.")
@click.option("--count", "-c", type=click.IntRange(min=0), help="Stop after N entries.")
@click.option("--partition", type=int, help="Read only this partition of a partitioned topic.")
@click.option("--raw", is_flag=True, help="Add every entry's stored payload in base64 (payload_base64), valid ones too.")
@click.option("--follow", "-f", is_flag=True,
              help="Keep reading as the topic grows; Ctrl-C or SIGTERM ends it (exit 0).")
def read(topic: str, broker, from_: str | None, after: str | None, until: str | None,
         count: int | None, partition: int | None, raw: bool, follow: bool) -> None:
    """Print TOPIC's entries as JSON Lines: message id, key, publish and event time, and the event
    (or why the entry is malformed, with its payload in base64).

    A topic the broker's admin API (--admin-url) does not list is refused without being created;
    a topic that reads as empty is said to be so on stderr.
    """

    def body() -> int:
        start = MessageId.parse(from_) if from_ else None
        aft = MessageId.parse(after) if after else None
        until_id, until_time = _parse_until(until)
        t0 = time.monotonic()
        with open_log(topic, broker) as log:
            if log.exists() is False:
                raise BadInput(f"no such topic: {log.topic} (the admin API does not list it; nothing was created)")
            parts = log.partitions()
            if partition is not None:
                if not 0 <= partition < len(parts) or len(parts) == 1:
                    raise BadInput(f"{log.topic} has no partition {partition}")
                parts = [parts[partition]]
            if follow and len(parts) != 1:
                raise BadInput(f"--follow reads one partition; {log.topic} has {len(parts)}: give --partition")
            tally = _Tally()
            with _stop_on_signals() if follow else contextlib.nullcontext():
                _print_entries(log, parts, dict(start=start, after=aft, until=until_id, until_time=until_time,
                                                follow=follow), count, raw, tally)
            n, dropped = tally.entries, tally.redelivered
            whole = not (start or aft or until or count is not None)
            if n == 0 and whole and not follow:
                stderr.print(esc(_empty_note(log)), soft_wrap=True)
        dt = time.monotonic() - t0
        stderr.print(f"read {n} entries in {dt:.2f}s ({n / dt if dt else 0:,.0f}/s); "
                     f"{dropped} redeliveries dropped")
        return 0

    run(body)


@dataclass
class _Tally:
    entries: int = 0
    redelivered: int = 0


def _print_entries(log: EventLog, parts: list[str], kw: dict, count: int | None, raw: bool, tally: _Tally) -> None:
    """Write the entries of ``parts`` to stdout as JSON Lines, counting them in ``tally`` (which
    stays right when a signal stops a ``--follow``)."""
    out = sys.stdout
    dumps = json.dumps
    follow = kw["follow"]
    remaining = count
    for p in parts:
        if remaining is not None and remaining <= 0:
            break
        reader = log.read(p, limit=remaining, **kw)
        try:
            for entry in reader:
                out.write(dumps(entry_to_json(entry, raw=raw)) + "\n")
                tally.entries += 1
                if follow:
                    out.flush()
        finally:
            reader.close()
            tally.redelivered += reader.redelivered
            if remaining is not None:
                remaining -= reader.count
            out.flush()

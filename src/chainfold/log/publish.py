"""Publishing a checked events file (``chainfold publish``): numbered per stream, exactly once per
event id with a producer name, sent while it is read.

Memory does not grow with the file or the log: the file was checked by a first pass that kept only
its ids, sorted on disk (:func:`chainfold.jsonl.check_events_file`); the second pass reads it again
and sends each event as it is read (:meth:`~chainfold.log.EventLog.append_stream`). What grows is
O(streams): the next ``seq`` of each stream.

Numbering (gapless per stream, docs/formats.md) continues from the highest ``seq`` per stream in the log,
which the seq index (:mod:`chainfold.log.seqindex`) gives at the cost of the log's tail. The index
is saved with the state the publish started from (not including what it sends: the next publish
reads that as its tail), so it never claims entries that were not read.

With a producer name (exactly once per event id, see :meth:`chainfold.log.pulsar.PulsarLog.append`),
the ids the log already holds are found by reading the whole log (O(history) time) into sorted runs
on disk and merge-joining them with the file's ids: the lines to skip come out sorted, and memory
stays O(streams).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from ..envelope import Event, encode
from ..jsonl import CheckedFile, iter_checked_events
from ..sortedruns import SortedRuns, join_keys
from . import EventLog, MessageId
from .seqindex import SeqIndex, SeqState, read_forward

__all__ = ["PublishReport", "publish_file"]


@dataclass
class PublishReport:
    """What :func:`publish_file` did."""

    events: int
    """Events in the file."""
    published: int
    skipped: int
    """Events not sent because the log already held their id (producer name only)."""
    first: MessageId | None
    last: MessageId | None
    seqs_from: str
    """``index`` (the seq index and the log's tail) or ``scan`` (the whole log read)."""
    read: int
    """Log entries read to number the events (the tail, or the whole log)."""


def publish_file(elog: EventLog, checked: CheckedFile, *, index: SeqIndex | None = None) -> PublishReport:
    """Send the events of ``checked`` to ``elog`` in file order, each with the next ``seq`` of its
    stream; see the module docstring. ``index`` (the topic's seq index) is read and then saved."""
    producer = getattr(elog, "producer_name", None)
    skip: Iterator[int] = iter(())
    runs: list[SortedRuns] = []
    try:
        if producer:
            state, skip = _already_stored(elog, checked, runs)
        else:
            state = (index or SeqIndex.none()).current(elog)
        seqs = dict(state.streams)
        counter = [0]

        def items() -> Iterator[tuple[bytes, str | None, int | None]]:
            next_skip = next(skip, None)
            for line, ev in iter_checked_events(checked):
                if line == next_skip:
                    next_skip = next(skip, None)
                    continue
                n = seqs[ev.stream] = seqs.get(ev.stream, 0) + 1
                counter[0] += 1
                yield encode(ev._replace(seq=n)), ev.stream, ev.time

        if producer:
            base = max(elog.last_sequence_id(), 0)  # type: ignore[attr-defined]
            sent = elog.append_stream(items(), sequence_ids=_count_from(base + 1))  # type: ignore[call-arg]
        else:
            sent = elog.append_stream(items())
        if index is not None:
            index.save(elog.topic, state)
    finally:
        for r in runs:
            r.close()
    return PublishReport(checked.events, sent.count, checked.events - counter[0], sent.first, sent.last,
                         state.source, state.tail)


def _count_from(n: int) -> Iterator[int]:
    while True:
        yield n
        n += 1


def _already_stored(elog: EventLog, checked: CheckedFile, runs: list[SortedRuns]) -> tuple[SeqState, Iterator[int]]:
    """Read the whole log: its seq state, and the file lines (ascending) whose id it already holds."""
    logged = SortedRuns(checked.ids.run_size)
    runs.append(logged)

    def note(ev: Event) -> None:
        logged.add(ev.id.encode("utf-8"), 0)

    state = read_forward(elog, SeqState(), each=note)
    lines = SortedRuns(checked.ids.run_size)
    runs.append(lines)
    for _key, line in join_keys(checked.ids.merged(), logged.merged()):
        lines.add(line.to_bytes(8, "big"), 0)
    return state, (int.from_bytes(k, "big") for k, _ in lines.merged())

"""The source stage: where a replay's entries come from.

:class:`Source` reads the entries of one partition between two positions (a :class:`Span`) and
hands them on in batches (lists of entries, in log order, each message id once). Every replay
(verify, rebuild, reconcile, the parallel engine's workers) starts here; a Spark task reads a fixed
``[start, until]`` span, and ``watch`` a span that follows the log as it grows.

Batches keep the per-entry cost of the stages after it low (one loop per stage over a list, no
call per entry between stages); their size bounds what a batch holds, never what is read.

A source that follows the log hands control back to its consumer regularly, so one thread can
follow the log and do other work between batches (``watch`` polls a worker's evidence there): each
time its reader reaches the end of the log it yields an empty batch (an *idle poll*), and while
entries trickle in, a batch is handed on once it is ``max_wait`` seconds old even if not full.
It reads with ordinary readers, one after the other, each strictly after the last entry yielded
(the log's readers end at the end of the log as the broker sees it), so nothing is read twice or
skipped between them, on either broker.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from itertools import islice

from ..errors import InvalidArgument
from . import Entry, EventLog, LogReader, Position

__all__ = ["Span", "Source", "DEFAULT_BATCH"]

DEFAULT_BATCH = 1024
"""Entries per batch: a segment's worth by default."""


@dataclass(frozen=True)
class Span:
    """Which entries of ``partition``: from the start, or strictly ``after`` one position, or from
    ``start`` (inclusive); up to ``until`` (inclusive), or before the first entry published after
    ``until_time`` (ms), or ``limit`` entries; otherwise to the end of the log as it is when the
    reader gets there. With ``follow``, the end of the log is not the end: the source waits for
    more (``watch``) until it is stopped."""

    partition: str
    after: Position | None = None
    start: Position | None = None
    until: Position | None = None
    until_time: int | None = None
    limit: int | None = None
    follow: bool = False

    def __post_init__(self) -> None:
        if self.after is not None and self.start is not None:
            raise InvalidArgument("a span starts either after a position or at one, not both")
        if self.follow and (self.until is not None or self.until_time is not None or self.limit is not None):
            raise InvalidArgument("a span that follows the log has no end")

    @property
    def bounded(self) -> bool:
        """Whether the span stops before the end of the log (so entries after it are not gone)."""
        return self.until is not None or self.until_time is not None or self.limit is not None


class Source:
    """Source stage: the entries of ``span`` from ``elog``, in batches of at most ``batch_size``.

    Contract: iterating yields non-empty lists of entries of the span's partition, in log order,
    each message id at most once (the log's reader drops redeliveries, docs/formats.md), until the span
    ends; then :attr:`read` entries were yielded, :attr:`last` is the position of the last one and
    :attr:`redelivered` counts the redeliveries dropped. Broker failures surface as
    :class:`~chainfold.errors.BrokerUnavailable` (the reader retries first).

    A span that ``follow``\\ s the log never ends by itself: each time the log's end is reached
    the source yields an empty list (an idle poll), waits ``poll_seconds`` and reads on strictly
    after :attr:`last`; a batch is yielded when it holds ``batch_size`` entries or is ``max_wait``
    seconds old. It ends after :meth:`stop` is called (at the next batch or idle poll), with every
    entry it read yielded. A consumer that gets an empty list may do other work before asking for
    the next batch: nothing is read meanwhile.
    """

    def __init__(self, elog: EventLog, span: Span, *, batch_size: int = DEFAULT_BATCH,
                 poll_seconds: float = 0.5, max_wait: float = 0.25) -> None:
        if batch_size < 1:
            raise InvalidArgument(f"batch_size must be >= 1, not {batch_size!r}")
        if poll_seconds < 0 or max_wait < 0:
            raise InvalidArgument("poll_seconds and max_wait must be >= 0")
        self.elog = elog
        self.span = span
        self.batch_size = batch_size
        self.poll_seconds = poll_seconds
        self.max_wait = max_wait
        self.read = 0
        self.last: Position | None = None
        self.redelivered = 0
        self._stopped = threading.Event()

    def stop(self) -> None:
        """End a following source at its next poll (thread-safe)."""
        self._stopped.set()

    def _reader(self, span: Span) -> LogReader:
        return self.elog.read(span.partition, after=span.after, start=span.start, until=span.until,
                              until_time=span.until_time, limit=span.limit)

    @property
    def stopped(self) -> bool:
        """Whether :meth:`stop` was called."""
        return self._stopped.is_set()

    def __iter__(self) -> Iterator[list[Entry]]:
        if self.span.follow:
            return self._follow()
        n = self.batch_size
        return self._batches(self.span, lambda it: list(islice(it, n)))

    def _batches(self, span: Span, cut: Callable[[Iterator[Entry]], list[Entry]]) -> Iterator[list[Entry]]:
        """One reader's entries of ``span`` in batches (``cut`` takes the next one), counted; the
        reader closed at the end."""
        reader = self._reader(span)
        try:
            it = iter(reader)
            while batch := cut(it):
                self.read += len(batch)
                self.last = batch[-1].message_id
                yield batch
        finally:
            self.redelivered += reader.redelivered
            reader.close()

    def _follow(self) -> Iterator[list[Entry]]:
        span = self.span
        cut = self._timed_cut()
        while not self._stopped.is_set():
            for batch in self._batches(span, cut):
                yield batch
                if self._stopped.is_set():
                    return
            yield []  # the end of the log as it is now: an idle poll
            if self._stopped.wait(self.poll_seconds):
                return
            if self.last is not None:  # go on strictly after what was read
                span = replace(span, after=self.last, start=None)

    def _timed_cut(self) -> Callable[[Iterator[Entry]], list[Entry]]:
        """Takes the next batch from an iterator: ``batch_size`` entries, or fewer once the first
        of them is ``max_wait`` seconds old (checked as each entry arrives), or what is left."""
        n, wait, clock = self.batch_size, self.max_wait, time.monotonic

        def cut(it: Iterator[Entry]) -> list[Entry]:
            batch: list[Entry] = []
            append = batch.append
            due = 0.0
            for e in it:
                if not batch:
                    due = clock() + wait
                append(e)
                if len(batch) >= n or clock() >= due:
                    break
            return batch

        return cut

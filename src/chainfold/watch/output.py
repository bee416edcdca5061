"""What ``chainfold watch`` says, and how it is stopped.

* :class:`WatchLines`: the JSON lines on stdout (docs/cli.md): one object per line, each with
  ``kind`` and ``time`` (ms since the epoch), written whole and flushed at once, from any thread.
  It also updates :class:`~chainfold.watch.metrics.WatchMetrics`, so metrics and lines agree.
* :class:`StderrStatus`: one live status line on stderr when stderr is a terminal; nothing
  otherwise (stdout carries the lines a program reads; a log file gets no spinner frames).
* :class:`StopOnSignals`: SIGINT and SIGTERM call a stop callback once (watch then records its
  checkpoints and a snapshot and exits 0); a second signal ends the process at once.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from types import FrameType
from typing import Any, TextIO

from rich.console import Console
from rich.markup import escape

from ..replay.decode import SeqGap
from .compare import LiveDivergence
from .metrics import WatchMetrics

__all__ = ["WatchLines", "StderrStatus", "StopOnSignals", "KINDS"]

KINDS = ("progress", "divergence", "malformed", "duplicate", "error")


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class WatchLines:
    """Writes watch's JSON lines to ``out`` (default stdout); :attr:`counts` per kind.

    Each method writes one line and returns the object written. ``clock`` gives the ``time`` key
    (ms since the epoch). When ``out`` is a closed pipe (nobody reads any more), writing never
    raises in the middle of the caller's work: :attr:`broken` becomes true, the lines are dropped,
    and watch stops at its next tick (cleanly: checkpoints and a snapshot).
    """

    def __init__(self, out: TextIO | None = None, *, metrics: WatchMetrics | None = None,
                 clock: Callable[[], int] = _now_ms) -> None:
        self.out = out if out is not None else sys.stdout
        self.metrics = metrics
        self.clock = clock
        self.counts: Counter[str] = Counter()
        self.broken = False
        self._lock = threading.Lock()

    def _write(self, kind: str, fields: dict[str, Any]) -> dict[str, Any]:
        obj = {"kind": kind, "time": self.clock(), **fields}
        text = json.dumps(obj, ensure_ascii=False) + "\n"
        with self._lock:
            self.counts[kind] += 1
            if self.broken:
                return obj
            try:
                self.out.write(text)
                self.out.flush()
            except (BrokenPipeError, ValueError):  # the reader went away (ValueError: out closed)
                self.broken = True
        return obj

    def progress(self, *, log_entries: int, worker_entries: int | None, lag: int | None,
                 head: str | None = None) -> dict[str, Any]:
        """Entries read from the log, events the worker handled, entries it is behind (``None``:
        no evidence followed); ``head``: the log's head over those entries (hex), as verify gives it."""
        if self.metrics is not None:
            self.metrics.set_entries_read(log_entries)
            if worker_entries is not None:
                self.metrics.worker_entries.set(worker_entries)
            if lag is not None:
                self.metrics.worker_lag.set(lag)
        more = {"head": head} if head is not None else {}
        return self._write("progress", {"log_entries": log_entries, "worker_entries": worker_entries, "lag": lag,
                                        **more})

    def divergence(self, d: LiveDivergence) -> dict[str, Any]:
        """The first divergence: the keys of reconcile's ``first_divergence``, and the place in the
        worker's handling order (``worker_position``) and what differed there (``reason``)."""
        if self.metrics is not None:
            self.metrics.divergences.inc()
        return self._write("divergence", {**d.to_json(), "worker_position": d.position, "reason": d.reason})

    def malformed(self, message_id: str, reason: str) -> dict[str, Any]:
        if self.metrics is not None:
            self.metrics.malformed.inc()
        return self._write("malformed", {"message_id": message_id, "reason": reason})

    def duplicate(self, event_id: str, message_id: str) -> dict[str, Any]:
        if self.metrics is not None:
            self.metrics.duplicates.inc()
        return self._write("duplicate", {"event_id": event_id, "message_id": message_id})

    def error(self, message: str, **more: Any) -> dict[str, Any]:
        """Something watch cannot do right now (broker gone, evidence unreadable): it says so and
        goes on retrying; ``more`` adds what locates the problem (``file``, ``line``, ...)."""
        return self._write("error", {"message": message, **more})

    def seq_gap(self, gap: SeqGap) -> dict[str, Any]:
        """Events missing from the log itself (docs/cli.md#history): an ``error`` line with
        ``history: "gaps"`` and the gap as verify's ``seq_gaps`` name it, plus its log ``index``."""
        if self.metrics is not None:
            self.metrics.seq_gaps.inc()
        return self.error(f"events are missing from the log itself: stream {gap.stream!r} has seq {gap.found_seq} "
                          f"where {gap.expected_seq} was due, at message {gap.message_id}",
                          history="gaps", **gap.to_json(), index=gap.index)

    def truncated(self, message: str, truncation: dict[str, Any]) -> dict[str, Any]:
        """Recorded entries gone from the log (docs/cli.md#history): an ``error`` line with
        ``history: "truncated"`` and ``truncated`` as verify's report names it."""
        if self.metrics is not None:
            self.metrics.truncations.inc()
        return self.error(message, history="truncated", truncated=truncation,
                          message_id=truncation.get("first_available"))

    def checkpoint_recorded(self, at: float | None = None) -> None:
        """Watch recorded a checkpoint (no line; the metric's timestamp)."""
        if self.metrics is not None:
            self.metrics.last_checkpoint.set(time.time() if at is None else at)


class StderrStatus:
    """A one-line live status on stderr, only when stderr is a terminal (``update(text)``)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        stream = stream if stream is not None else sys.stderr
        self.enabled = bool(getattr(stream, "isatty", lambda: False)())
        self._status: Any = None
        if self.enabled:
            self._status = Console(file=stream).status("")

    def __enter__(self) -> StderrStatus:
        if self._status is not None:
            self._status.start()
        return self

    def update(self, text: str) -> None:
        if self._status is not None:
            self._status.update(escape(text))

    def __exit__(self, *exc: object) -> None:
        if self._status is not None:
            self._status.stop()


class StopOnSignals:
    """Within the block, the first SIGINT or SIGTERM calls ``stop(signum)`` (and is kept in
    :attr:`received`); a second one restores the default action and delivers itself again (the
    process ends at once). The previous handlers come back on exit. Main thread only (Python
    delivers signals there)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, stop: Callable[[int], None]) -> None:
        self.stop = stop
        self.received: int | None = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:
            for s, h in self._old.items():
                signal.signal(s, h if s != signum else signal.SIG_DFL)
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            os.kill(os.getpid(), signum)
            return
        self.received = signum
        self.stop(signum)

    def __enter__(self) -> StopOnSignals:
        for s in self.SIGNALS:
            self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()

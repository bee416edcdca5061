"""pulsar-client's logger for the clients chainfold creates: it bounds what a client holds ahead of
its readers, and it hears what the broker said when a request fails.

Why a logger. A Pulsar consumer grants the broker one flow-control permit per *message* it hands to
the application. Apache Pulsar also counts permits per message, so the receiver queue bounds what the
client holds. pulsar-lite 0.2.0 (the embedded broker) counts them per *entry*: a batch of up to ~1000
messages costs one permit, so every message a reader consumes lets the broker push one more batch, and
a reader slower than the broker receives the whole topic into client memory (686 MB at 1M events,
6.3 GB at 10M). No reader setting changes that (``benchmarks/bounded_read.py`` measures smaller
receiver queues, readers re-created in windows and smaller producer batches). What the client does
not read from its socket, though, the broker cannot push: TCP fills up and pulsar-lite stops
dispatching to a connection whose write buffer is full. pulsar-client reads the socket on its I/O
thread, and the only Python code that thread runs is the client's logger, which it calls once per
entry received (``Received a message from the server for consumer``). So :class:`ReadGate` counts
entries received there and, while more than ``limit`` entries received are not yet consumed by a
reader, makes the I/O thread wait (the GIL released) until the reader catches up. Readers report the
entries they consume (:meth:`ReadGate.consumed`) and call :meth:`ReadGate.resync` whenever their
queue runs dry (entries the client drops itself, such as re-deliveries of acknowledged batches, are
never consumed), so the gate cannot stall a reader. The answer to a request (creating or closing a
reader, "is more coming?") travels behind the entries on the same connection, so every synchronous
request runs inside :meth:`ReadGate.open`, which lets the I/O thread through until it returns. The wait costs read rate (the I/O thread takes
the GIL for each log line); ``benchmarks/RESULTS.md`` ("Bounded reading") has the numbers.

One logger per process. pulsar-client takes its logger factory from the first client a process
creates and uses it for every later client (``LogUtils::setLoggerFactory`` keeps the first), so the
gate is a process-wide singleton (:func:`the_gate`), given to every client chainfold creates that
should be bounded (and by :func:`chainfold.log.broker.pulsar_logger`), and its accounting is
process-wide: entries received by any client, entries consumed by any gated reader. It waits only
while a gated reader is iterating; a request lets through up to ``limit`` more entries (its answer
may be queued behind them), and no wait lasts longer than a few seconds without a reader making
progress, so a consumer chainfold does not drive can be slowed, never stalled.

Broker errors. pulsar-client maps most broker errors to ``UnknownError``; the text the broker sent
("Topic has no messages") reaches only the log. :func:`server_said` tells whether a broker answered
with a given text since a moment, which lets a reader tell an empty topic from a failure.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from collections.abc import Iterator

__all__ = ["ReadGate", "the_gate", "server_said", "DEFAULT_READ_AHEAD"]

DEFAULT_READ_AHEAD = 400
"""Entries a gated client may hold ahead of its readers (chainfold's producer batches up to 1000
messages per entry, so at most ~400k messages, ~250-350 MB; 100 holds less but makes pulsar-lite
re-deliver far more under back-pressure: ``benchmarks/RESULTS.md`` "Bounded reading")."""

_RECEIVED = "Received a message from the server for consumer"
_SERVER_ERROR = "Received error response from server"
_recent_errors: collections.deque[tuple[float, str]] = collections.deque(maxlen=64)


def server_said(text: str, since: float) -> bool:
    """Whether a broker answered a request with an error containing ``text`` at or after ``since``
    (``time.monotonic()``), as heard by a :class:`ReadGate` logger of this process."""
    return any(t >= since and text in msg for t, msg in list(_recent_errors))


class ReadGate(logging.Logger):
    """pulsar-client's logger; see the module docstring. ``limit=None`` only observes (broker
    errors, forwarding). Records at or above the level of ``forward`` are passed on to it."""

    def __init__(self, limit: int | None = None, forward: logging.Logger | None = None) -> None:
        super().__init__("chainfold.pulsar.gate", logging.DEBUG)
        self.limit = limit
        self._forward = forward
        self._cond = threading.Condition()
        self._received = 0
        self._consumed = 0
        self._readers = 0
        self._requests = 0
        self._open_valve = False
        self.waits = 0
        """How many times an I/O thread waited for a reader (for tests and benchmarks)."""
        self.entries_received = 0

    # -- the I/O threads ----------------------------------------------------------------------------

    def log(self, level: int, msg: object, *args: object, **kwargs: object) -> None:  # type: ignore[override]
        text = msg if isinstance(msg, str) else str(msg)
        if level == logging.DEBUG:
            if text.find(_RECEIVED) >= 0:
                self._admit()
        elif level >= logging.WARNING and text.find(_SERVER_ERROR) >= 0:
            _recent_errors.append((time.monotonic(), text))
        fwd = self._forward
        if fwd is not None and fwd.isEnabledFor(level):
            fwd.log(level, text)

    def _admit(self) -> None:
        with self._cond:
            self._received += 1
            self.entries_received += 1
            if self.limit is None:
                return
            waited, progress = 0.0, self._consumed
            while (self._readers and not self._open_valve
                   and self._received - self._consumed > self.limit * (2 if self._requests else 1)):
                if waited >= (_REQUEST_VALVE if self._requests else _STALL_VALVE):
                    self._open_valve = True  # nobody makes progress: let entries through until somebody does
                    return
                self.waits += 1
                self._cond.wait(0.25)
                waited = 0.0 if self._consumed != progress else waited + 0.25
                progress = self._consumed

    # -- readers ------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        """A gated reader iterates: the I/O threads may wait for it (and for any other)."""
        with self._cond:
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._consumed = self._received
                self._cond.notify_all()

    def consumed(self) -> None:
        """A reader took the first message of an entry from its queue."""
        with self._cond:
            self._consumed += 1
            self._open_valve = False
            if self._received - self._consumed <= (self.limit or 0) // 2:
                self._cond.notify_all()

    def resync(self) -> None:
        """A reader's queue is empty (or the reader closed): nothing received is waiting any more."""
        with self._cond:
            self._consumed = self._received
            self._open_valve = False
            self._cond.notify_all()

    @contextlib.contextmanager
    def open(self) -> Iterator[None]:
        """A synchronous request to a broker: its answer may be queued behind entries, so up to
        ``limit`` more are let through until it returns."""
        with self._cond:
            self._requests += 1
            self._cond.notify_all()
        try:
            yield
        finally:
            with self._cond:
                self._requests -= 1


_REQUEST_VALVE = 2.0  # seconds an I/O thread waits while a request is pending before letting entries through
_STALL_VALVE = 10.0  # seconds without any reader progress before it lets entries through
_THE_GATE: ReadGate | None = None
_THE_GATE_LOCK = threading.Lock()


def the_gate(forward: logging.Logger | None = None) -> ReadGate:
    """The process's gate (created on first use, observing only until :meth:`configure`)."""
    global _THE_GATE
    with _THE_GATE_LOCK:
        if _THE_GATE is None:
            _THE_GATE = ReadGate(None, forward)
        return _THE_GATE

"""The Pulsar-backed :class:`~chainfold.log.EventLog` (pulsar-client), for pulsar-lite and Apache Pulsar.

Writing uses a batching producer, blocks when its queue is full and checks every send's result.
With a ``producer_name`` each message carries an explicit sequence id, so a broker with
deduplication enabled (Apache Pulsar) drops a retried publish instead of storing it twice; with
``exclusive=True`` the producer fences every other writer out of the topic.

Reading follows the contract in :mod:`chainfold.log`. A broker that goes away mid-read is retried
with backoff for ``retry_seconds``; the reader is re-created after the last entry yielded, so nothing
is lost or repeated. Past the budget, :class:`~chainfold.errors.BrokerUnavailable` names the last
message id read, and a rerun resumes from the newest snapshot.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator
from operator import itemgetter

import pulsar
import _pulsar

from .broker import BrokerOptions
from .readgate import ReadGate, server_said
from ..errors import BadInput, BrokerUnavailable, MalformedEnvelope
from ..envelope import Event, decode, encode
from . import (AppendReport, Entry, EventLog, LogReader, MessageId, Sent, decoded, full_topic_name, partition_index,
               require_history, stamp_seqs)
from .seqindex import SeqIndex

__all__ = ["PulsarLog", "open_log", "message_id_of"]

log = logging.getLogger("chainfold.log")

_Timeout = _pulsar.Timeout
_PulsarException = _pulsar.PulsarException
_CONNECTION_ERRORS = (_pulsar.ConnectError, _pulsar.NotConnected, _pulsar.AlreadyClosed, _Timeout,
                      _pulsar.ServiceUnitNotReady, _pulsar.LookupError)
_READ_TIMEOUT_MS = 100  # then ask the broker whether more is coming (the end of the log costs this)
_RECEIVER_QUEUE = 5000
"""Receiver queue of every reader: the messages (Apache Pulsar) or entries (pulsar-lite, see
:mod:`chainfold.log.readgate`) the broker may push ahead of the reader. Chosen by measurement
(``benchmarks/bounded_read.py``, ``benchmarks/RESULTS.md`` "Bounded reading")."""
_STALL_TIMEOUTS = 10  # read timeouts in a row, with messages available, before re-creating the reader
_NO_MESSAGES = "Topic has no messages"  # pulsar-lite's answer to getLastMessageId on an empty topic
_CONFIRM_MS = 250  # how long a fresh reader waits for a first message before a topic counts as empty


def _retry_seconds() -> float:
    return float(os.environ.get("CHAINFOLD_RETRY_SECONDS", "60"))


class _PulsarEntry(tuple):
    """A log entry read from Pulsar, with the attributes of :class:`~chainfold.log.Entry`.

    The payload is taken from the message at once; the message id, key and times only when asked
    for, since a replay needs them for a few entries only (segment bounds, malformed entries,
    duplicates) and each costs several calls into pulsar-client. ``str(entry)`` is its message id,
    so the entry can stand in where only that text is needed (checkpoints' ``first``/``last``).
    """

    __slots__ = ()

    payload = property(itemgetter(0), doc="The payload bytes, exactly as stored.")

    @property
    def message_id(self) -> MessageId:
        mid = self[2]
        return MessageId(mid.ledger_id(), mid.entry_id(), mid.partition(), mid.batch_index())

    @property
    def key(self) -> str | None:
        return self[1].partition_key() or None

    @property
    def publish_time(self) -> int:
        return self[1].publish_timestamp()

    @property
    def event_time(self) -> int | None:
        return self[1].event_timestamp() or None

    event = Entry.event

    def to_entry(self) -> Entry:
        """The plain :class:`~chainfold.log.Entry`."""
        return Entry(self.message_id, self.key, self.publish_time, self.event_time, self.payload)

    def __str__(self) -> str:
        return str(self.message_id)

    def __repr__(self) -> str:
        return repr(self.to_entry())


_new_entry = tuple.__new__


def message_id_of(native: object) -> MessageId:
    """The :class:`~chainfold.log.MessageId` (position) of a message id of pulsar-client."""
    return MessageId(native.ledger_id(), native.entry_id(), native.partition(), native.batch_index())  # type: ignore[attr-defined]


def _native(m: MessageId | None, partition: int) -> object | None:
    """The pulsar-client message id of ``m`` (compared natively: ledger, entry, batch)."""
    return None if m is None else pulsar.MessageId(partition, m.ledger, m.entry, m.batch)._msg_id


_CONNECTION_RESULTS = frozenset(getattr(pulsar.Result, n) for n in (
    "ConnectError", "NotConnected", "AlreadyClosed", "Timeout", "ServiceUnitNotReady", "LookupError"))


class _Question:
    """"Is more coming?" asked of a reader without waiting (``has_message_available_async``)."""

    def __init__(self, reader: pulsar.Reader) -> None:
        self.asked_at = time.monotonic()
        self.done = threading.Event()
        self.more = False
        self.error: BaseException | None = None
        self.connection_error = False
        self.unknown_error = False
        try:
            reader._reader.has_message_available_async(self._answer)
        except _PulsarException as exc:
            self.error = exc
            self.connection_error = isinstance(exc, _CONNECTION_ERRORS)
            self.unknown_error = isinstance(exc, _pulsar.UnknownError)
            self.done.set()

    def _answer(self, res: object, more: bool) -> None:  # on the client's thread
        if res == pulsar.Result.Ok:
            self.more = bool(more)
        else:
            self.error = RuntimeError(f"Pulsar error: {res}")
            self.connection_error = res in _CONNECTION_RESULTS
            self.unknown_error = res == pulsar.Result.UnknownError
        self.done.set()


class _PulsarReader(LogReader):
    """Entries of one partition. Redeliveries are told apart by comparing message ids inside
    pulsar-client (one call per message), and entries are :class:`_PulsarEntry` (lazy metadata).

    A reader that receives nothing while the broker says messages are available is re-created
    after the last entry yielded: pulsar-lite can leave a reader subscribed right after another
    one closed without ever dispatching to it.
    """

    def __init__(self, client: pulsar.Client, topic: str, retry_seconds: float,
                 gate: ReadGate | None = None, *, receiver_queue: int | None = None, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self._client = client
        self._queue = receiver_queue
        self._topic = topic
        self._partition = partition_index(topic)
        self._retry = retry_seconds
        self._gate = gate
        self._reader: pulsar.Reader | None = None
        self._question: _Question | None = None
        self._open_error: BaseException | None = None
        self._last_native: object | None = None
        self.reconnects = 0
        self.stalls = 0

    @property  # type: ignore[override]
    def last(self) -> MessageId | None:
        """The message id of the last entry yielded."""
        n = self._last_native
        if n is None:
            return None
        return MessageId(n.ledger_id(), n.entry_id(), n.partition(), n.batch_index())

    @last.setter
    def last(self, value: MessageId | None) -> None:
        self._last_native = _native(value, self._partition) if value is not None else None

    def _open(self) -> None:
        p = self._partition
        last = self.last
        if last is not None:  # resume strictly after what was yielded
            m = last
            start, inclusive = pulsar.MessageId(p, m.ledger, m.entry, m.batch), False
        elif self.after is not None:
            m = self.after
            start, inclusive = pulsar.MessageId(p, m.ledger, m.entry, m.batch), False
        elif self.start is not None:
            m = self.start
            start, inclusive = pulsar.MessageId(p, m.ledger, m.entry, m.batch), True
        else:
            start, inclusive = pulsar.MessageId.earliest, False
        queue = _RECEIVER_QUEUE if self.limit is None else max(100, min(self.limit, _RECEIVER_QUEUE))
        if self._queue is not None:
            queue = self._queue
        with self._unblocked():
            self._reader = self._client.create_reader(
                self._topic, start, receiver_queue_size=queue, start_message_id_inclusive=inclusive
            )

    def _unblocked(self) -> contextlib.AbstractContextManager[None]:
        """A synchronous request: its answer must get past the read-ahead bound."""
        return self._gate.open() if self._gate is not None else contextlib.nullcontext()

    def close(self) -> None:
        r, self._reader = self._reader, None
        self._question = None
        if r is not None:
            try:
                with self._unblocked():
                    r.close()
            except _PulsarException:
                pass
            if self._gate is not None:
                self._gate.resync()  # what it held is dropped with it

    def _is_empty(self, q: _Question, reader: pulsar.Reader) -> bool:
        """Whether a failed "is more coming?" before the first entry means the topic holds nothing.

        Apache Pulsar answers that question with False on an empty topic; pulsar-lite fails it
        (``UnknownError``) with a text, "Topic has no messages", that reaches only the client's log.
        A failure of the broker must never pass for an empty topic (a resumed rebuild would replay
        nothing), so empty only on positive evidence: that text, heard by this process's
        :class:`ReadGate` logger; or, for an ``UnknownError`` without it, a fresh reader that confirms
        it (:meth:`_holds_nothing`). Anything else is a failure: retried, then :class:`BrokerUnavailable`.
        """
        if server_said(_NO_MESSAGES, q.asked_at):
            log.debug("%s: the broker says it holds no messages", self._topic)
            return True
        return q.unknown_error and self._holds_nothing(reader)

    def _recover(self, exc: BaseException, deadline: float | None) -> float:
        """Back off and re-create the reader; raise BrokerUnavailable past the retry budget."""
        now = time.monotonic()
        if deadline is None:
            deadline = now + self._retry
            log.warning("reading %s failed after %s: %s; retrying for %.0fs",
                        self._topic, self.last, exc, self._retry)
        if now >= deadline:
            raise BrokerUnavailable(
                f"reading {self._topic} failed (the broker went away or kept failing); last entry read: {self.last} "
                f"({self.count} entries this run): {exc}"
            ) from exc
        self.close()
        time.sleep(min(1.0, max(0.0, deadline - now)))
        self.reconnects += 1
        try:
            self._open()
            self._open_error = None
        except _PulsarException as err:
            self._open_error = err  # the next read fails again and comes back here
        if self._open_error is None and time.monotonic() > deadline:
            # opening waited out the outage: the caller still hears that it outlasted the budget
            self.close()
            raise BrokerUnavailable(
                f"reading {self._topic} failed for longer than {self._retry:.0f}s (the broker went away; it "
                f"answers again); last entry read: {self.last} ({self.count} entries this run): {exc}"
            ) from exc
        return deadline

    def _reopen(self, deadline: float | None) -> float | None:
        self.close()
        try:
            self._open()
            self._open_error = None
        except _PulsarException as exc:
            self._open_error = exc
            deadline = self._recover(exc, deadline)
        return deadline

    def _dry(self, reader: pulsar.Reader, deadline: float | None, nothing_yet: bool) -> tuple[bool, float | None]:
        """The queue ran dry: is more coming? ``(True, _)`` at the end of the log; otherwise the
        reader is kept, re-created (stalled) or recovered.

        The question is asked asynchronously and the reader goes on reading meanwhile: with a
        read-ahead bound, its answer may wait behind entries that only reading lets through. A reader
        that lost its connection while the question waits is a failure (retried, then
        :class:`BrokerUnavailable`), so a following reader notices a broker that went away."""
        if self._gate is not None:
            self._gate.resync()  # nothing received is waiting in the queue
        q = self._question
        if q is None:
            self._question = _Question(reader)
            return False, deadline
        if not q.done.is_set():
            if not reader.is_connected():  # the broker went away: the question would wait for its timeout
                self._question = None
                return False, self._recover(ConnectionError("the reader lost its connection to the broker"),
                                            deadline)
            return False, deadline
        self._question = None
        if q.error is None:  # the broker answered: no failure in progress
            if not q.more:
                return not self.follow, None
            self._idle += 1
            if self._idle >= _STALL_TIMEOUTS:  # messages are there, but none arrive: re-create the reader
                log.info("%s: reader stalled after %s; re-creating it", self._topic, self.last)
                self._idle = 0
                self.stalls += 1
                return False, self._reopen(None)
            return False, None
        if q.connection_error:
            return False, self._recover(q.error, deadline)
        if nothing_yet and self._is_empty(q, reader):
            return not self.follow, deadline  # established, not assumed: see _is_empty
        return False, self._recover(q.error, deadline)

    def _holds_nothing(self, reader: pulsar.Reader) -> bool:
        """Whether an ``UnknownError`` answer to ``has_message_available`` before any entry was
        received means that the partition holds no message at all (without the broker's own words).

        pulsar-lite cannot answer getLastMessageId on a partition that holds nothing ("Topic has no
        messages"), and pulsar-client surfaces that only as ``UnknownError``; Apache Pulsar answers
        it. A failure of the broker must never pass for an empty topic (a resumed rebuild would
        replay nothing), so "empty" needs all of: that exact error, a connected reader, and a second,
        fresh reader from the earliest position that receives nothing within ``_CONFIRM_MS`` and
        then gets the same answer (or, on a broker that answers, "no message available"). A
        partition that holds messages delivers one to the fresh reader or answers the question.
        Anything else is a failure: the caller retries, then raises BrokerUnavailable.
        """
        if not reader.is_connected():
            return False
        try:
            with self._unblocked():
                probe = self._client.create_reader(self._topic, pulsar.MessageId.earliest, receiver_queue_size=1)
        except _PulsarException:
            return False
        try:
            try:
                probe.read_next(_CONFIRM_MS)
                return False  # a message: the partition is not empty
            except _Timeout:
                pass
            try:
                with self._unblocked():
                    empty = not probe.has_message_available()
            except _pulsar.UnknownError:
                empty = True
            if empty:
                log.debug("%s: holds no message (confirmed by a fresh reader)", self._topic)
            return empty
        except _PulsarException:
            return False
        finally:
            try:
                with self._unblocked():
                    probe.close()
            except _PulsarException:
                pass

    def _raw(self) -> Iterator[Entry]:  # pragma: no cover - __iter__ reads directly
        return iter(self)

    def __iter__(self) -> Iterator[Entry]:  # type: ignore[override]
        # LogReader.__iter__'s contract, fused with the reading loop: this runs once per message.
        p = self._partition
        start = _native(self.start, p)
        until = _native(self.until, p)
        before = _native(self.before, p)
        until_time = self.until_time
        limit = self.limit
        if limit is not None and limit <= 0:
            return
        last = _native(self.after, p)  # the filter: nothing at or before it is yielded
        got = self._last_native
        count = self.count
        new = _new_entry
        E = _PulsarEntry
        deadline: float | None = None
        gate = self._gate
        entry = -1  # entry id of the last message taken from the queue (for the gate)
        self._idle = 0

        def sync() -> None:
            self._last_native = got
            self.count = count

        reading = gate.reading() if gate is not None else contextlib.nullcontext()
        try:
            reading.__enter__()
            try:
                self._open()
            except _PulsarException as exc:
                self._open_error = exc
                deadline = self._recover(exc, deadline)
            while True:
                reader = self._reader
                if reader is None:
                    sync()
                    deadline = self._recover(self._open_error or RuntimeError("cannot open a reader"), deadline)
                    continue
                read_next = reader._reader.read_next
                try:
                    while True:
                        m = read_next(_READ_TIMEOUT_MS)
                        self._idle = 0
                        mid = m.message_id()
                        if gate is not None and mid.entry_id() != entry:
                            entry = mid.entry_id()
                            gate.consumed()
                        if last is not None and mid <= last:
                            if count:  # before the first yield it is positioning, not redelivery
                                self.redelivered += 1
                            continue
                        if start is not None and mid < start:
                            continue
                        if until is not None and mid > until:  # also when ``until`` is at or before ``after``
                            return
                        if before is not None and mid >= before:
                            return
                        if until_time is not None and m.publish_timestamp() > until_time:
                            return
                        last = got = self._last_native = mid
                        count += 1
                        self.count = count
                        yield new(E, (m.data(), m, mid))
                        deadline = None
                        if until is not None and mid >= until:
                            return
                        if limit is not None and count >= limit:
                            return
                except _Timeout:
                    sync()
                    done, deadline = self._dry(reader, deadline, got is None)
                    if done:
                        return
                except _PulsarException as exc:
                    sync()
                    deadline = self._recover(exc, deadline)
        finally:
            sync()
            self.close()
            reading.__exit__(None, None, None)


class _SendTracker:
    """The results of a producer's sends: count, first and last message ids, errors; every id only
    when asked to keep them. Callbacks run on the client's thread."""

    def __init__(self, ids: list[MessageId | None] | None) -> None:
        self.ids = ids
        self.lock = threading.Lock()
        self.done = 0
        self.errors: list[str] = []
        self.first: tuple[int, MessageId] | None = None
        self.last: tuple[int, MessageId] | None = None

    def callback(self, i: int):  # -> Callable[[pulsar.Result, pulsar.MessageId], None]
        if self.ids is not None:
            self.ids.append(None)

        def cb(res, mid) -> None:
            with self.lock:
                self.done += 1
                if res != pulsar.Result.Ok:
                    self.errors.append(f"message {i}: {res}")
                    return
                m = MessageId(mid.ledger_id(), mid.entry_id(), mid.partition(), mid.batch_index())
                if self.ids is not None:
                    self.ids[i] = m
                if self.first is None or i < self.first[0]:
                    self.first = (i, m)
                if self.last is None or i > self.last[0]:
                    self.last = (i, m)

        return cb

    def wait(self, sent: int, topic: str) -> Sent:
        """Wait for every result (30 s after the flush at most); raise BrokerUnavailable on any error."""
        deadline = time.monotonic() + 30
        while self.done < sent and not self.errors and time.monotonic() < deadline:
            time.sleep(0.01)
        if self.errors:
            raise BrokerUnavailable(f"publish to {topic}: {len(self.errors)} message(s) not stored, first: {self.errors[0]}")
        if self.done < sent:
            raise BrokerUnavailable(f"publish to {topic}: {sent - self.done} message(s) not confirmed")
        return Sent(sent, self.first[1] if self.first else None, self.last[1] if self.last else None)


class PulsarLog(EventLog):
    """An event log on a persistent Pulsar topic, through a ``pulsar.Client`` the caller owns.

    ``gate`` is the client's :class:`~chainfold.log.readgate.ReadGate` logger when it has one
    (:func:`open_log` gives one on the embedded broker): readers then bound what the client holds.
    ``admin_url`` (the broker's admin REST API) lets :meth:`exists` answer without creating the topic.
    ``receiver_queue`` sets how many messages (Apache Pulsar) or entries (pulsar-lite counts permits
    per entry) a reader may have pushed ahead of it; by default a whole-topic reader gets a large
    queue, and a reader of a short fixed range (a Spark task's) wants a small one, since whatever
    lies past its end is read for nothing.
    """

    def __init__(
        self,
        client: pulsar.Client,
        topic: str,
        *,
        producer_name: str | None = None,
        exclusive: bool = False,
        retry_seconds: float | None = None,
        gate: ReadGate | None = None,
        admin_url: str | None = None,
        admin_token: str | None = None,
        receiver_queue: int | None = None,
    ) -> None:
        self.client = client
        self.topic = require_history(full_topic_name(topic))
        self.gate = gate
        self.admin_url = admin_url
        self.admin_token = admin_token
        self.receiver_queue = receiver_queue
        self.producer_name = producer_name
        self.exclusive = exclusive
        self.retry_seconds = _retry_seconds() if retry_seconds is None else retry_seconds
        self._producer: pulsar.Producer | None = None
        self._partitions: list[str] | None = None
        self._owns_client = False

    def partitions(self) -> list[str]:
        if self._partitions is None:
            try:
                with self._request():
                    self._partitions = list(self.client.get_topic_partitions(self.topic))
            except _PulsarException as exc:
                raise BrokerUnavailable(f"cannot look up {self.topic}: {exc}") from exc
        return self._partitions

    def exists(self) -> bool | None:
        """Asked of the broker's admin REST API (``admin_url``), which lists a namespace's topics
        without creating any. Without it None: a Pulsar lookup cannot tell, and reading would
        create the topic (Apache Pulsar with auto-creation on; pulsar-lite always)."""
        if not self.admin_url:
            return None
        from .broker import topic_listed

        return topic_listed(self.admin_url, self.topic, token=self.admin_token)

    def read(self, partition: str | None = None, **kw: object) -> LogReader:  # type: ignore[override]
        parts = self.partitions()
        if partition is None:
            if len(parts) != 1:
                raise BadInput(f"{self.topic} has {len(parts)} partitions: name one")
            partition = parts[0]
        elif partition not in parts:
            raise BadInput(f"no partition {partition!r} in {self.topic}")
        return _PulsarReader(self.client, partition, self.retry_seconds, self.gate,
                             receiver_queue=self.receiver_queue, **kw)

    def producer(self) -> pulsar.Producer:
        """The topic's batching producer (created on first use)."""
        if self._producer is None:
            kw: dict[str, object] = dict(
                batching_enabled=True,
                batching_max_messages=1000,
                batching_max_allowed_size_in_bytes=512 * 1024,
                batching_max_publish_delay_ms=5,
                block_if_queue_full=True,
                max_pending_messages=10000,
                send_timeout_millis=30000,
            )
            if self.producer_name:
                kw["producer_name"] = self.producer_name
            if self.exclusive:
                kw["access_mode"] = pulsar.ProducerAccessMode.Exclusive
            try:
                with self._request():
                    self._producer = self.client.create_producer(self.topic, **kw)
            except _pulsar.ProducerFenced as exc:
                raise BadInput(f"{self.topic} already has an exclusive writer: {exc}") from exc
            except _pulsar.ProducerBusy as exc:
                raise BadInput(f"{self.topic} already has an exclusive writer: {exc}") from exc
            except _PulsarException as exc:
                raise BrokerUnavailable(f"cannot create a producer on {self.topic}: {exc}") from exc
        return self._producer

    def append(self, events: Iterable[Event], *, assign_seq: bool = True, index: SeqIndex | None = None) -> AppendReport:
        """Append events (see :meth:`EventLog.append`).

        With a ``producer_name`` the append is exactly-once per event id: events whose id the log
        already holds are not sent again (so re-running an interrupted publish of the same input
        appends only what is missing), and every message carries a sequence id above the broker's
        last one for that producer name, so broker deduplication (Apache Pulsar) drops a message the
        client re-sends after a reconnect. Sequence ids alone cannot decide what to skip: with
        batching, the broker records one sequence id per batch. Finding what the log holds reads the
        whole log, keeping only the ids of ``events`` and the highest seq of their streams (memory
        O(len(events)), not O(history) nor O(the log's streams)).
        """
        events = list(events)
        if not self.producer_name:
            return super().append(events, assign_seq=assign_seq, index=index)
        wanted = {ev.id for ev in events}
        present: set[str] = set()
        seqs: dict[str, int] = dict.fromkeys({ev.stream for ev in events}, 0)
        for ev in decoded(self.read_all()):
            if ev.id in wanted:
                present.add(ev.id)
            if ev.seq is not None and ev.stream in seqs and ev.seq > seqs[ev.stream]:
                seqs[ev.stream] = ev.seq
        rest = [ev for ev in events if ev.id not in present]
        report = AppendReport(skipped=len(events) - len(rest))
        if report.skipped:
            log.info("producer %s: the log already holds %d of %d events; sending the rest",
                     self.producer_name, report.skipped, len(events))
        if assign_seq:
            rest = stamp_seqs(rest, seqs, report)
        base = max(self.last_sequence_id(), 0)
        report.message_ids = self.append_payloads(
            ((encode(ev), ev.stream, ev.time) for ev in rest),
            sequence_ids=range(base + 1, base + 1 + len(rest)),
        )
        return report

    def last_sequence_id(self) -> int:
        """The broker's last persisted sequence id for this producer name (-1 if none)."""
        with self._request():
            return int(self.producer().last_sequence_id())

    def _request(self) -> contextlib.AbstractContextManager[None]:
        """Synchronous requests (lookups, producers, sends) must get past the read-ahead bound."""
        return self.gate.open() if self.gate is not None else contextlib.nullcontext()

    def append_payloads(
        self,
        items: Iterable[tuple[bytes, str | None, int | None]],
        *,
        sequence_ids: Iterable[int] | None = None,
    ) -> list[MessageId]:
        """Append raw payloads; see :meth:`EventLog.append_payloads`.

        ``sequence_ids`` (>= 1, increasing) are sent as the messages' sequence ids: with broker
        deduplication, a message whose sequence id the broker already persisted for this producer
        name is dropped by the broker. Its place in the returned list is then ``None``-like
        (``MessageId(-1, -1)``).
        """
        ids: list[MessageId | None] = []
        self._send(items, sequence_ids, ids)
        return ids  # type: ignore[return-value]

    def append_stream(
        self,
        items: Iterable[tuple[bytes, str | None, int | None]],
        *,
        sequence_ids: Iterable[int] | None = None,
    ) -> Sent:
        """:meth:`append_payloads` for inputs of any length: only the count and the first and last
        message ids are kept, so memory does not grow with the input (the producer's queue bounds
        what is in flight)."""
        return self._send(items, sequence_ids, None)

    def _send(self, items: Iterable[tuple[bytes, str | None, int | None]], sequence_ids: Iterable[int] | None,
              ids: list[MessageId | None] | None) -> Sent:
        """Send every item, checking each result; ``ids`` (if given) gets every message id."""
        with self._request():
            producer = self.producer()
            track = _SendTracker(ids)
            seq_iter = iter(sequence_ids) if sequence_ids is not None else None
            i = 0
            for payload, key, event_time in items:
                kw: dict[str, object] = {}
                if key:
                    kw["partition_key"] = key
                if event_time:
                    kw["event_timestamp"] = event_time
                if seq_iter is not None:
                    kw["sequence_id"] = next(seq_iter)
                try:
                    producer.send_async(payload, track.callback(i), **kw)
                except _PulsarException as exc:
                    raise BrokerUnavailable(f"publish to {self.topic} failed at message {i}: {exc}") from exc
                i += 1
            try:
                producer.flush()
            except _PulsarException as exc:
                raise BrokerUnavailable(f"publish to {self.topic} failed while flushing: {exc}") from exc
            return track.wait(i, self.topic)

    def close(self) -> None:
        p, self._producer = self._producer, None
        if p is not None:
            try:
                p.close()
            except _PulsarException:
                pass
        if self._owns_client:
            self._owns_client = False
            try:
                self.client.close()
            except _PulsarException:
                pass


def open_log(topic: str, opts: BrokerOptions, **kw: object) -> PulsarLog:
    """Connect (starting the embedded broker if no URL is set) and open ``topic``.

    The broker must answer within ``opts.connect_timeout`` (:func:`~chainfold.log.broker.first_lookup`),
    else :class:`BrokerUnavailable` names its address. With a read-ahead bound
    (:func:`~chainfold.log.broker.read_ahead_limit`) the client gets a :class:`ReadGate` logger.
    The returned log owns its client: closing the log closes the client.
    """
    from .broker import check_reachable, connect, first_lookup, pulsar_logger, read_ahead_limit, resolve_url

    name = require_history(full_topic_name(topic))
    url = resolve_url(opts)
    check_reachable(url, opts.connect_timeout)
    parts = first_lookup(opts, url, name)
    gate = pulsar_logger() if read_ahead_limit(opts) else None
    client = connect(opts)  # its logger: the gate, limited, when reading is bounded
    plog = PulsarLog(client, name, gate=gate, admin_url=opts.admin_url, admin_token=opts.auth_token, **kw)  # type: ignore[arg-type]
    plog._partitions = parts
    plog._owns_client = True
    return plog

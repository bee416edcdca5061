"""The event log: an append-only sequence of entries per topic partition.

:class:`EventLog` is the one small interface every source of events implements: append events,
list partitions, read entries lazily from a position. :class:`MemoryLog` is the in-memory
implementation used by fast unit tests; :class:`chainfold.log.pulsar.PulsarLog` is the real one. One
shared test suite (``tests/test_log_contract.py``) runs against both. Where an entry is in its
partition is a :class:`Position`, opaque to everything but the log (:class:`MessageId` for both
logs here); the replay reads through the source stage, :mod:`chainfold.log.source`.

Reading contract (every implementation):

* entries come in broker order, one partition at a time, each message id at most once: a message id
  that is not greater than the last one yielded is a redelivery, dropped and counted in
  :attr:`LogReader.redelivered`;
* ``after`` resumes strictly after a message id, ``start`` at one (inclusive); ``until`` stops after
  the entry with that id (inclusive): no entry past it is ever yielded, so ``until`` at or before
  ``after`` yields nothing; ``until_time`` stops before the first entry published later than that
  time (ms), ``limit`` after that many entries;
* reading ends at the end of the log as the broker sees it while reading; with ``follow`` it goes on
  waiting for entries appended later (until the reader is closed or the iteration stops).
"""

from __future__ import annotations

import itertools
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, runtime_checkable

from ..envelope import Event, decode, encode
from ..errors import BadInput, MalformedEnvelope

if TYPE_CHECKING:
    from .seqindex import SeqIndex

__all__ = [
    "Position",
    "MessageId",
    "Entry",
    "LogReader",
    "AppendReport",
    "Sent",
    "EventLog",
    "decoded",
    "MemoryLog",
    "full_topic_name",
    "partition_index",
    "require_history",
]


@runtime_checkable
class Position(Protocol):
    """Where an entry is in its partition, opaque to everything but the log that made it.

    What chainfold relies on, and every log's positions provide: positions of one partition are
    totally ordered in log order (``<``, ``<=``, ``==``) and hashable; ``str(position)`` is the
    message id text of docs/formats.md (``ledger:entry:partition:batch``) that reports, checkpoints and
    snapshots record; and :meth:`EventLog.position` turns that text back into a position of the
    same log. Nothing else (no ledger arithmetic) is assumed outside the log's own module.
    """

    def __str__(self) -> str: ...

    def __lt__(self, other: Any) -> bool: ...

    def __le__(self, other: Any) -> bool: ...

    def __hash__(self) -> int: ...


class MessageId(NamedTuple):
    """A Pulsar message id: the :class:`Position` of the Pulsar log and of the in-memory log.
    Ordered within one partition; written ``ledger:entry:partition:batch``."""

    ledger: int
    entry: int
    partition: int = -1
    batch: int = -1

    def __str__(self) -> str:
        return f"{self.ledger}:{self.entry}:{self.partition}:{self.batch}"

    @property
    def position(self) -> tuple[int, int, int]:
        """The order key inside a partition: (ledger, entry, batch)."""
        return (self.ledger, self.entry, self.batch)

    @classmethod
    def parse(cls, text: str) -> "MessageId":
        """Parse ``ledger:entry:partition:batch`` (partition and batch default to -1)."""
        parts = text.strip().split(":")
        try:
            if not 2 <= len(parts) <= 4:
                raise ValueError
            nums = [int(p) for p in parts]
        except ValueError:
            raise BadInput(f"not a message id: {text!r} (expected ledger:entry:partition:batch)") from None
        return cls(*nums)


class Entry(NamedTuple):
    """One log entry: a message as stored, with the metadata chainfold uses. ``message_id`` is its
    :class:`Position` (``str()`` of it is the message id, docs/formats.md)."""

    message_id: Position
    key: str | None
    publish_time: int
    event_time: int | None
    payload: bytes

    def event(self) -> Event:
        """Decode the payload; raises :class:`MalformedEnvelope` carrying this entry's message id."""
        try:
            return decode(self.payload)
        except MalformedEnvelope as exc:
            exc.message_id = str(self.message_id)
            raise MalformedEnvelope(exc.reason, str(self.message_id)) from None


class Sent(NamedTuple):
    """What :meth:`EventLog.append_stream` sent: how many, and the first and last message ids."""

    count: int
    first: MessageId | None
    last: MessageId | None


@dataclass
class AppendReport:
    """What :meth:`EventLog.append` did: message ids and seqs of the events sent, in input order,
    and how many leading events were not sent because the broker already held them."""

    message_ids: list[MessageId] = field(default_factory=list)
    seqs: list[int] = field(default_factory=list)
    skipped: int = 0


class LogReader:
    """An iterator over entries of one partition that also counts dropped redeliveries.

    Implementations provide :meth:`_raw`, a generator of entries that may contain redeliveries; this
    class filters them by message id and applies the stop conditions.
    """

    def __init__(
        self,
        *,
        after: MessageId | None = None,
        start: MessageId | None = None,
        until: MessageId | None = None,
        until_time: int | None = None,
        limit: int | None = None,
        follow: bool = False,
    ) -> None:
        if after is not None and start is not None:
            raise BadInput("give either 'after' or 'start', not both")
        self.follow = follow
        self.after = after
        self.start = start
        self.until = until
        self.until_time = until_time
        self.limit = limit
        self.redelivered = 0
        self.count = 0
        self.last: MessageId | None = None

    def _raw(self) -> Iterator[Entry]:  # pragma: no cover - abstract
        raise NotImplementedError

    def close(self) -> None:
        """Release broker resources (readers). Idempotent."""

    def __iter__(self) -> Iterator[Entry]:
        after = self.after.position if self.after is not None else None
        start = self.start.position if self.start is not None else None
        until = self.until.position if self.until is not None else None
        until_time = self.until_time
        limit = self.limit
        last = after
        if limit is not None and limit <= 0:
            return
        try:
            for entry in self._raw():
                mid = entry.message_id
                pos = (mid.ledger, mid.entry, mid.batch)
                if last is not None and pos <= last:
                    if self.count:  # before the first yield it is positioning, not redelivery
                        self.redelivered += 1
                    continue
                if start is not None and pos < start:
                    continue
                if until is not None and pos > until:  # also when ``until`` lies at or before ``after``
                    return
                if until_time is not None and entry.publish_time > until_time:
                    return
                last = pos
                self.last = mid
                self.count += 1
                yield entry
                if until is not None and pos >= until:
                    return
                if limit is not None and self.count >= limit:
                    return
        finally:
            self.close()


class EventLog(ABC):
    """An append-only event log on one topic (possibly partitioned)."""

    topic: str

    @abstractmethod
    def partitions(self) -> list[str]:
        """Names of the topic's partitions in order; ``[topic]`` when it is not partitioned."""

    @abstractmethod
    def read(
        self,
        partition: str | None = None,
        *,
        after: Position | None = None,
        start: Position | None = None,
        until: Position | None = None,
        until_time: int | None = None,
        limit: int | None = None,
    ) -> LogReader:
        """Entries of one partition (default: the only one) as a lazy, resumable iterator."""

    @abstractmethod
    def append_payloads(self, items: Iterable[tuple[bytes, str | None, int | None]]) -> list[MessageId]:
        """Append raw payloads ``(payload, key, event_time)``, in order; returns their message ids.

        Nothing is validated: this is how foreign producers' entries (or faults, in tests) arrive.
        Raises :class:`~chainfold.errors.BrokerUnavailable` if any append fails.
        """

    def close(self) -> None:
        """Release connections. Idempotent."""

    def exists(self) -> bool | None:
        """Whether the topic exists, asked without creating it; None when the log cannot tell (then
        a topic that reads as empty may also not exist). Commands that read history call it first."""
        return None

    def position(self, text: str) -> Position:
        """The position whose message id text (``str()``) is ``text``, as recorded in checkpoints,
        snapshots and reports; :class:`~chainfold.errors.BadInput` if it is not one."""
        return MessageId.parse(text)

    def __enter__(self) -> "EventLog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- shared behaviour -------------------------------------------------------------------------

    def read_all(self, **kw: object) -> Iterator[Entry]:
        """Entries of every partition, partition after partition."""
        for p in self.partitions():
            yield from self.read(p, **kw)  # type: ignore[arg-type]

    def append_stream(self, items: Iterable[tuple[bytes, str | None, int | None]]) -> Sent:
        """:meth:`append_payloads` for inputs of any length, keeping only the count and the first and
        last message ids (implementations send as they iterate)."""
        count, first, last = 0, None, None
        chunk: list[tuple[bytes, str | None, int | None]] = []
        for item in itertools.chain(items, [None]):  # type: ignore[list-item]
            if item is not None:
                chunk.append(item)
            if len(chunk) >= 10_000 or (item is None and chunk):
                ids = self.append_payloads(chunk)
                count, first, last = count + len(ids), first or ids[0], ids[-1]
                chunk = []
        return Sent(count, first, last)

    def stream_seqs(self, index: "SeqIndex | None" = None) -> dict[str, int]:
        """The highest ``seq`` per stream in the log (malformed entries are skipped): from the seq
        index and the log's tail when ``index`` is given and matches the log, else a read of it all."""
        from .seqindex import SeqIndex

        return (index or SeqIndex.none()).current(self).streams

    def append(self, events: Iterable[Event], *, assign_seq: bool = True, index: "SeqIndex | None" = None) -> AppendReport:
        """Append events in order. With ``assign_seq``, each event gets the next ``seq`` of its
        stream, continuing from what the log already holds (gapless per stream; ``index`` makes
        finding that cost the log's tail, not all of it).

        The message key is the stream and the event timestamp is the event's time. Appending the
        same events twice stores them twice; folds count each event id once.
        """
        events = list(events)
        report = AppendReport()
        if assign_seq:
            events = stamp_seqs(events, self.stream_seqs(index), report)
        report.message_ids = self.append_payloads((encode(ev), ev.stream, ev.time) for ev in events)
        return report


def decoded(entries: Iterable[Entry]) -> Iterator[Event]:
    """The events of well-formed entries (malformed ones skipped)."""
    for entry in entries:
        try:
            yield decode(entry.payload)
        except MalformedEnvelope:
            continue


def stamp_seqs(events: list[Event], seqs: dict[str, int], report: AppendReport) -> list[Event]:
    """The events with the next ``seq`` of their stream, continuing from ``seqs`` (the highest seq
    per stream so far; updated), recorded in ``report.seqs``."""
    stamped = []
    for ev in events:
        n = seqs.get(ev.stream, 0) + 1
        seqs[ev.stream] = n
        stamped.append(ev._replace(seq=n))
        report.seqs.append(n)
    return stamped


_SHORT_TOPIC = re.compile(r"^[A-Za-z0-9_.\-]+$")
_PARTITION_SUFFIX = re.compile(r"-partition-(\d+)$")


def full_topic_name(topic: str) -> str:
    """``NAME`` → ``persistent://public/default/NAME``, as Pulsar does; full names pass through."""
    if "://" in topic:
        return topic
    if "/" in topic:
        parts = topic.split("/")
        if len(parts) == 3:
            return "persistent://" + topic
        raise BadInput(f"not a topic name: {topic!r}")
    if not _SHORT_TOPIC.match(topic):
        raise BadInput(f"not a topic name: {topic!r}")
    return "persistent://public/default/" + topic


def require_history(topic: str) -> str:
    """``topic`` (a full name) unchanged if it keeps history; a ``non-persistent://`` topic keeps none
    (what is published there is gone once delivered), so chainfold refuses it (:class:`BadInput`)."""
    if topic.startswith("non-persistent://"):
        raise BadInput(f"{topic} is a non-persistent topic: it keeps no history to read, verify or rebuild "
                       "(use a persistent:// topic)")
    return topic


def partition_index(partition_topic: str) -> int:
    """The partition number in ``...-partition-N``, or -1 for a non-partitioned topic."""
    m = _PARTITION_SUFFIX.search(partition_topic)
    return int(m.group(1)) if m else -1


from .memory import MemoryLog  # noqa: E402  (the in-memory implementation, for unit tests)

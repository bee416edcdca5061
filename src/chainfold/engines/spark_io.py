"""Reading one topic in parallel: fixed read ranges, planned without a serial pass, read by tasks.

This is the part of the Spark engine (:mod:`chainfold.engines.spark`) that needs no Spark: it
imports pulsar-client only, so it is tested on its own and could serve any engine that reads a
topic in pieces.

Ranges (:class:`ReadRange`)
---------------------------
A range is a fixed interval of one partition's positions ``[start, end)``, a position being
``(ledger, entry, batch)`` ordered as Pulsar orders message ids (batch ``-1`` sorts before the
messages of a batched entry, so ``(L, E, -1)`` means "the whole entry E", as a start and as an end).
The ranges of a plan are contiguous and disjoint in position space, so *every* message of the
partition that exists when the plan is made falls into exactly one range, whatever positions
exist; a range read twice (a Spark task retry) yields the same messages. Each range also names the
position it must reach (``reach``: its planned last entry, or last message) so that a read that
meets the end of the topic first is known to be short (:class:`LogShorterThanPlanned`), never
taken as complete.

Planning, per broker, without reading the log:

* **Recorded checkpoints** (a topic verified or rebuilt before): every full segment's ``first`` and
  ``last`` message ids are known, so runs of whole segments are message-exact ranges whose first
  log index (``k * S``) and message count are known in advance (:func:`plan_recorded`). This is free.
* **Apache Pulsar, never scanned**: the admin API's ``internalStats`` lists the partition's ledgers
  and their entry counts (the open ledger's count is its ``lastConfirmedEntry`` + 1), one HTTP call
  per partition (:func:`layout_from_internal_stats`); partitions of a partitioned topic are
  planned independently (ranges never span partitions).
* **pulsar-lite** (no admin API), or Apache Pulsar without an admin URL: the layout is *probed*
  with non-durable readers (:func:`probe_layout`): the first message id (a reader at ``earliest``),
  then, per ledger, its last entry by exponential and binary search over entry ids, each probe a
  reader created at ``(L, e, -1)`` inclusive asking ``has_message_available()`` (and reading one
  message where a later ledger exists, to see whether it is still in ledger L); then the next
  ledger from a reader at ``(L + 1, 0, -1)``. O(ledgers x log entries) probes of ~1 ms on loopback,
  no payload read beyond one entry per probe. pulsar-lite keeps one ledger (0) for a topic, across
  restarts, with entry ids 0, 1, 2, ... so this is a binary search on one number there.

A layout (:class:`LedgerSpan` list) is split into ranges of about equal entry counts
(:func:`split_layout`); entry-level ranges know their entries but not their messages (a batched
entry holds up to the producer's batch size), so their first log index is found after reading, from
the counts of the ranges before them.

Reading (:class:`RangeReader`)
------------------------------
A task opens its own pulsar-client reader (a non-durable subscription: it disappears when the reader
closes or its connection drops, so nothing is left behind on the broker, even when the task is
killed) at ``start`` inclusive, and yields messages in order until the first message at or past
``end`` (not yielded) or the end of the topic. Redeliveries (a message id not above the last one
yielded) are dropped and counted; batch indexes below a message-exact start are skipped; a broker
that goes away is retried for ``CHAINFOLD_RETRY_SECONDS`` (the log reader's budget, resuming after
the last message yielded), then :class:`~chainfold.errors.BrokerUnavailable`, which fails the task
so that Spark retries it from its fixed start.

Engine design on top of the replay stages
-----------------------------------------
1. **Plan** on the driver: the ranges of every partition (above), in log order.
2. **Read + hash + decode** (one Spark task per range, narrow): read the range, compute leaf hashes
   and, when the range's first log index is known (recorded ranges), its
   :class:`~chainfold.merkle.CompactRange` ``[first, first + n)``; decode envelopes. Output per
   range: a small summary (count, first/last message id, compact range or leaf hashes, malformed
   entries by position, seq evidence) to the driver, and the events keyed by position
   ``(partition, range, offset)`` to the shuffle. Leaf hashes of ranges whose first index is not
   known yet stay in the executors (cached) until the driver knows every range's count: prefix sums
   then give each range its ``[begin, end)`` and a second narrow stage builds the compact ranges
   (32 bytes per event, no second read from the broker).
3. **Hash merge** on the driver: compact ranges are merged in range order into segment roots
   (a segment root is the merge of the pieces inside ``[kS, (k+1)S)``); heads are chained
   sequentially (``head_k`` needs ``head_{k-1}``: O(segments) hashes on the driver, cheap); checked
   against and appended to the record exactly as the local hash stage does.
4. **Dedup** exact across tasks: key events by event id, keep the minimum log position (first entry
   wins, in log order); the losers are the duplicates the report lists, by message id.
5. **Fold**: key the surviving events by stream, sort each stream's events by position
   (``repartitionAndSortWithinPartitions``), fold each stream with the model loaded by name in the
   executor (``load_model`` once per Python worker); ``--on-model-error`` applied per stream exactly
   as locally; states, skipped events and seq gaps return to the driver (or are written as
   snapshot/state-export parts). The driver assembles reports, state exports, recorded checkpoints
   and snapshots with the local engine's code, so their bytes are the local engine's.
6. **Failures**: ranges are fixed, so a retried task reads the same entries; a task that fails
   (broker gone past the retry budget) is retried by Spark (``spark.task.maxFailures``, in local
   mode ``local[N,F]``); when Spark gives up the job fails and chainfold exits 3.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import _pulsar
import pulsar

from ..errors import BadInput, BrokerUnavailable, HistoryUnrecoverable
from ..log import MessageId, full_topic_name, partition_index
from ..log.broker import BrokerOptions, connect
from ..log.pulsar import _PulsarEntry, _PulsarReader, _retry_seconds

__all__ = [
    "Point",
    "LedgerSpan",
    "ReadRange",
    "LogShorterThanPlanned",
    "plan_recorded",
    "split_layout",
    "layout_from_internal_stats",
    "fetch_internal_stats",
    "probe_layout",
    "plan_partition",
    "RangeReader",
    "open_range",
]

log = logging.getLogger("chainfold.engines.spark_io")

_PROBE_TIMEOUT_MS = 5000  # a probe reads a message only where has_message_available() said one is there
_EMPTY_TIMEOUT_MS = 1000  # pulsar-lite's empty topics: how long an earliest reader waits for a first message
_DEFAULT_QUEUE = 1000  # the range reader's receiver queue (see RangeReader)


class LogShorterThanPlanned(HistoryUnrecoverable):
    """A range's read met the end of the topic before the position the plan saw there: entries that
    existed when the plan was made are gone (truncated or rewritten log)."""

    def __init__(self, partition: str, index: int, reach: "Point | None", last: "Point | None") -> None:
        self.partition = partition
        self.index = index
        self.reach = reach
        self.last = last
        super().__init__(
            f"{partition}: range {index} ended at {last} before the planned {reach}: "
            "the log changed after it was planned"
        )


class Point(NamedTuple):
    """A point in a partition's message order: ``(ledger, entry, batch)``, ordered as Pulsar orders
    message ids (the partition aside); batch ``-1`` is before every message of a batched entry (and
    is where a non-batched one is). Range bounds are points; so is every message's place. Written
    ``ledger:entry:batch``."""

    ledger: int
    entry: int
    batch: int = -1

    @classmethod
    def of(cls, mid: MessageId | str) -> "Point":
        """The position of a message id (or its ``ledger:entry:partition:batch`` text)."""
        if isinstance(mid, str):
            mid = MessageId.parse(mid)
        return cls(mid.ledger, mid.entry, mid.batch)

    def next_message(self) -> "Point":
        """The least position after this message's: an exclusive end that keeps this message."""
        return Point(self.ledger, self.entry, self.batch + 1)

    def native(self, partition: int) -> Any:
        """pulsar-client's message id for this position (compares natively, by ledger, entry, batch)."""
        return pulsar.MessageId(partition, self.ledger, self.entry, self.batch)

    def __str__(self) -> str:
        return f"{self.ledger}:{self.entry}:{self.batch}"


class LedgerSpan(NamedTuple):
    """Entries ``first .. first + entries - 1`` of ledger ``ledger``, all present."""

    ledger: int
    first: int
    entries: int


@dataclass(frozen=True)
class ReadRange:
    """Messages of ``partition`` at positions ``[start, end)``: the fixed unit of work of one task.

    ``reach`` is the last point known to hold a message when the range was planned (its last entry
    ``(L, E, -1)``, or the last message's exact point for recorded ranges): a read that ends before
    reaching it is short. It is ``None`` for the one range that may be empty: the rest of an entry
    whose first messages ended the recorded segments. ``entries`` is the planned entry count
    (entry-level ranges), ``messages`` the planned message count (ranges of recorded segments), and
    ``first_index`` the log index of the range's first message where it is known before reading (a
    plan's first range; ranges of recorded segments; the first range after them). ``index`` orders
    the ranges of one partition (log order); a plan's ranges are contiguous: each ``end`` is the
    next ``start``.
    """

    partition: str
    index: int
    start: Point
    end: Point
    reach: Point | None
    entries: int | None = None
    messages: int | None = None
    first_index: int | None = None

    def __post_init__(self) -> None:
        if not (self.start < self.end if self.reach is None else self.start <= self.reach < self.end):
            raise BadInput(f"range {self.index} of {self.partition}: need start <= reach < end, "
                           f"not {self.start}, {self.reach}, {self.end}")


class _RecordedSegment(Protocol):
    """What planning needs of a recorded checkpoint (:class:`chainfold.hashing.chain.Checkpoint`)."""

    segment: int
    size: int
    segment_size: int
    first: str | None
    last: str | None


# --- planning ----------------------------------------------------------------------------------------


def plan_recorded(
    partition: str, checkpoints: Sequence[_RecordedSegment], *, segments_per_range: int
) -> tuple[list[ReadRange], Point | None]:
    """Message-exact ranges over the recorded *full* segments (whole segments per range), and the
    start of what follows them (``None`` when nothing is recorded).

    Uses the recorded segments from 0 up to the first one without message ids (older records may
    lack them); what follows is left to the layout planner.
    """
    if segments_per_range < 1:
        raise BadInput(f"segments_per_range must be >= 1, not {segments_per_range!r}")
    usable = []
    for i, cp in enumerate(checkpoints):
        if cp.segment != i or cp.size != (i + 1) * cp.segment_size or not cp.first or not cp.last:
            break
        usable.append(cp)
    ranges: list[ReadRange] = []
    for j in range(0, len(usable), segments_per_range):
        run = usable[j : j + segments_per_range]
        first, last = run[0], run[-1]
        reach = Point.of(last.last)  # type: ignore[arg-type]
        ranges.append(ReadRange(
            partition, len(ranges), Point.of(first.first), reach.next_message(), reach,  # type: ignore[arg-type]
            messages=last.size - first.segment * first.segment_size,
            first_index=first.segment * first.segment_size,
        ))
    return ranges, (ranges[-1].end if ranges else None)


def split_layout(
    partition: str,
    layout: Sequence[LedgerSpan],
    *,
    entries_per_range: int,
    start: Point | None = None,
    first_index: int | None = None,
    index: int = 0,
) -> list[ReadRange]:
    """Split the entries of ``layout`` (in ledger order) from ``start`` on into ranges of
    ``entries_per_range`` entries (the last one may be shorter; a range may span ledgers).

    ``start`` (default: the first entry) may point inside an entry (after a recorded segment that
    ended inside a batch); the first range then starts there exactly. ``first_index`` is the log
    index of the first message at ``start`` (when known), ``index`` the first range's number.
    """
    if entries_per_range < 1:
        raise BadInput(f"entries_per_range must be >= 1, not {entries_per_range!r}")
    ranges: list[ReadRange] = []
    begin: Point | None = None  # start of the range being filled
    taken = 0  # entries in it
    last = None
    for sp in layout:
        e = sp.first
        stop = sp.first + sp.entries
        if start is not None:
            if (sp.ledger, stop - 1) < (start.ledger, start.entry):
                continue
            if sp.ledger == start.ledger:
                e = max(e, start.entry)
        while e < stop:
            if begin is None:
                begin = Point(sp.ledger, e)
                if start is not None and not ranges:
                    begin = max(start, begin)
            n = min(stop - e, entries_per_range - taken)
            e += n
            taken += n
            last = Point(sp.ledger, e - 1)
            if taken == entries_per_range:
                ranges.append(_entry_range(partition, index + len(ranges), begin, last, taken, first_index, ranges))
                begin, taken = None, 0
    if begin is not None and last is not None:
        ranges.append(_entry_range(partition, index + len(ranges), begin, last, taken, first_index, ranges))
    for i in range(len(ranges) - 1):  # a range ends where the next begins (also across ledgers)
        ranges[i] = dataclasses.replace(ranges[i], end=ranges[i + 1].start)
    return ranges


def _entry_range(partition: str, index: int, begin: Point, last: Point, entries: int,
                 first_index: int | None, before: list[ReadRange]) -> ReadRange:
    # A range that is only the rest of an entry whose first messages were recorded (begin inside
    # it) may hold nothing: the recorded segment may have ended with the entry. It has no reach.
    reach = None if begin > last else last
    return ReadRange(partition, index, begin, Point(last.ledger, last.entry + 1), reach,
                     entries=entries, first_index=None if before else first_index)


def layout_from_internal_stats(stats: dict[str, Any]) -> list[LedgerSpan]:
    """The ledgers holding entries, from Apache Pulsar's ``internalStats`` of one partition.

    Closed ledgers carry their entry count; the open (last) one reports 0 there, and its count is
    ``lastConfirmedEntry`` (``"ledger:entry"``) + 1 when that names it.
    """
    ledgers = stats.get("ledgers") or []
    lce_l, _, lce_e = str(stats.get("lastConfirmedEntry") or "-1:-1").partition(":")
    spans = []
    for i, led in enumerate(ledgers):
        lid, n = int(led["ledgerId"]), int(led.get("entries") or 0)
        if i == len(ledgers) - 1 and n == 0 and int(lce_l) == lid:
            n = int(lce_e) + 1
        if n > 0:
            spans.append(LedgerSpan(lid, 0, n))
    return spans


def fetch_internal_stats(admin_url: str, partition: str, timeout: float = 30.0) -> dict[str, Any]:
    """``GET /admin/v2/persistent/{tenant}/{namespace}/{topic}/internalStats`` for one partition."""
    full = full_topic_name(partition)
    scheme, _, rest = full.partition("://")
    path = "/".join(urllib.parse.quote(p, safe="") for p in rest.split("/"))
    url = f"{admin_url.rstrip('/')}/admin/v2/{scheme}/{path}/internalStats"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return {}  # not created yet: no entries
        raise BrokerUnavailable(f"admin API {url}: HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise BrokerUnavailable(f"admin API {url}: {exc}") from exc


class _Prober:
    """Asks a broker, through short-lived non-durable readers, which positions hold messages."""

    def __init__(self, client: pulsar.Client, partition: str) -> None:
        self.client = client
        self.partition = partition
        self.p = partition_index(partition)
        self.probes = 0

    def _reader(self, at: Point | None) -> pulsar.Reader:
        self.probes += 1
        start = pulsar.MessageId.earliest if at is None else at.native(self.p)
        try:
            return self.client.create_reader(self.partition, start, receiver_queue_size=1,
                                             start_message_id_inclusive=at is not None)
        except _pulsar.PulsarException as exc:
            raise BrokerUnavailable(f"cannot open a reader on {self.partition}: {exc}") from exc

    def available(self, at: Point | None) -> bool:
        """Whether a message exists at or after ``at`` (``None``: anywhere)."""
        r = self._reader(at)
        try:
            return bool(r.has_message_available())
        finally:
            r.close()

    def first_at(self, at: Point | None) -> Point | None:
        """The position of the first message at or after ``at`` (``None``: the first of all)."""
        r = self._reader(at)
        try:
            if not r.has_message_available():
                return None
            m = r.read_next(_PROBE_TIMEOUT_MS).message_id()
            return Point(m.ledger_id(), m.entry_id(), m.batch_index())
        except _pulsar.Timeout as exc:
            raise BrokerUnavailable(f"{self.partition}: a message at or after {at} was announced "
                                    f"but not delivered within {_PROBE_TIMEOUT_MS} ms") from exc
        finally:
            r.close()

    def is_empty(self) -> bool:
        """Whether the partition holds no message. pulsar-lite cannot answer ``has_message_available``
        on a topic that was never written to (it fails); a topic whose earliest reader then receives
        nothing within the probe timeout is empty, one that receives a message is not."""
        try:
            return not self.available(None)
        except _pulsar.PulsarException:
            r = self._reader(None)
            try:
                r.read_next(_EMPTY_TIMEOUT_MS)
                return False
            except _pulsar.Timeout:
                return True
            finally:
                r.close()


def _last_entry(prober: _Prober, ledger: int, first: int, last_ledger: bool) -> int:
    """The last entry id of ``ledger``, given that entry ``first`` exists: exponential then binary
    search. In the last ledger "a message at or after (L, e)" is the test; before it, the first
    message at or after (L, e) must still be in L."""

    def exists(e: int) -> bool:
        at = Point(ledger, e)
        if last_ledger:
            return prober.available(at)
        found = prober.first_at(at)
        return found is not None and found.ledger == ledger

    lo, step = first, 1  # lo exists
    while exists(lo + step):
        lo, step = lo + step, step * 2
    hi = lo + step  # does not exist
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if exists(mid):
            lo = mid
        else:
            hi = mid
    return lo


def probe_layout(client: pulsar.Client, partition: str, *, start: Point | None = None) -> list[LedgerSpan]:
    """The ledgers of ``partition`` holding entries at or after ``start`` (default: all), found
    with non-durable readers (see the module docstring); ``[]`` for an empty partition."""
    prober = _Prober(client, partition)
    t0 = time.monotonic()
    if start is None and prober.is_empty():
        return []
    first = prober.first_at(start)
    spans: list[LedgerSpan] = []
    while first is not None:
        nxt = prober.first_at(Point(first.ledger + 1, 0))
        last = _last_entry(prober, first.ledger, first.entry, nxt is None)
        spans.append(LedgerSpan(first.ledger, first.entry, last - first.entry + 1))
        first = nxt
    log.debug("%s: layout %s from %d probes in %.3fs", partition, spans, prober.probes, time.monotonic() - t0)
    return spans


def plan_partition(
    partition: str,
    *,
    client: pulsar.Client | None = None,
    admin_url: str | None = None,
    recorded: Sequence[_RecordedSegment] = (),
    target_ranges: int = 8,
    min_entries: int = 16,
) -> list[ReadRange]:
    """The ranges of one partition, in log order: recorded segments first (split into about
    ``target_ranges`` runs), then what follows them, from ``internalStats`` when ``admin_url`` is
    given, else probed through ``client``, split into about ``target_ranges`` ranges of at least
    ``min_entries`` entries. Everything in the partition when this returns is covered."""
    if target_ranges < 1:
        raise BadInput(f"target_ranges must be >= 1, not {target_ranges!r}")
    full = [cp for cp in recorded if cp.size == (cp.segment + 1) * cp.segment_size]
    ranges, tail = plan_recorded(partition, full, segments_per_range=max(1, math.ceil(len(full) / target_ranges)))
    if admin_url:
        layout = layout_from_internal_stats(fetch_internal_stats(admin_url, partition))
    elif client is not None:
        layout = probe_layout(client, partition, start=tail)
    else:
        raise BadInput("planning needs a client (to probe) or an admin URL (internalStats)")
    if tail is not None:
        layout = [sp for sp in layout if (sp.ledger, sp.first + sp.entries - 1) >= (tail.ledger, tail.entry)]
    n = sum(sp.entries for sp in layout)
    if n == 0:
        return ranges
    per = max(min_entries, math.ceil(n / target_ranges))
    first_index = ranges[-1].first_index + ranges[-1].messages if ranges else 0  # type: ignore[operator]
    return ranges + split_layout(partition, layout, entries_per_range=per, start=tail,
                                 first_index=first_index, index=len(ranges))


# --- reading -----------------------------------------------------------------------------------------


class _SizedClient:
    """A pulsar client whose readers get ``receiver_queue_size=queue`` (the log reader sizes its
    queue for whole-topic reads; a range reader wants a smaller one, see :class:`RangeReader`)."""

    def __init__(self, client: pulsar.Client, queue: int) -> None:
        self._client = client
        self._queue = queue

    def create_reader(self, topic: str, start: Any, **kw: Any) -> pulsar.Reader:
        kw["receiver_queue_size"] = self._queue
        return self._client.create_reader(topic, start, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


class RangeReader:
    """The messages of one :class:`ReadRange`, in log order, each message id once.

    Iterating yields log entries (:class:`~chainfold.log.Entry` attributes: ``payload``,
    ``message_id``, ...) at positions ``start <= p < end``; the first message at or past ``end`` is
    read but not yielded. Afterwards :attr:`count` is the number yielded, :attr:`last` the last
    message id, :attr:`redelivered` the redeliveries dropped, :attr:`reconnects` the broker
    reconnections, and :attr:`complete` whether the read reached the range's planned end (a message
    at or past ``end`` was seen, or the last message yielded is at or past ``reach``); with
    ``strict`` (default) an incomplete read raises :class:`LogShorterThanPlanned` instead.

    ``receiver_queue``: messages (Apache Pulsar) or entries (pulsar-lite counts permits per entry)
    the broker may push ahead; whatever lies past ``end`` in the queue is read for nothing, so it is
    kept small. The reader is non-durable and closed when iteration ends, however it ends.
    """

    def __init__(self, client: pulsar.Client, rng: ReadRange, *, strict: bool = True,
                 receiver_queue: int = _DEFAULT_QUEUE, retry_seconds: float | None = None) -> None:
        self.rng = rng
        self.strict = strict
        self.count = 0
        self.last: MessageId | None = None
        self.redelivered = 0
        self.reconnects = 0
        self.complete = False
        self._client = _SizedClient(client, max(1, receiver_queue))
        self._retry = _retry_seconds() if retry_seconds is None else retry_seconds

    def __iter__(self) -> Iterator[_PulsarEntry]:
        rng = self.rng
        p = partition_index(rng.partition)
        src = _PulsarReader(self._client, rng.partition, self._retry,  # type: ignore[arg-type]
                            start=MessageId(rng.start.ledger, rng.start.entry, p, rng.start.batch))
        end = rng.end.native(p)._msg_id
        count = 0
        last = None
        try:
            for entry in src:
                mid = entry[2]  # the native message id (see _PulsarEntry): compared without a Python tuple
                if mid >= end:
                    self.complete = True
                    break
                last = mid
                count += 1
                yield entry
        finally:
            src.close()
            self.count = count
            self.redelivered = src.redelivered
            self.reconnects = src.reconnects
            if last is not None:
                self.last = MessageId(last.ledger_id(), last.entry_id(), last.partition(), last.batch_index())
        if not self.complete:
            self.complete = rng.reach is None or (self.last is not None and Point.of(self.last) >= rng.reach)
            if not self.complete and self.strict:
                raise LogShorterThanPlanned(rng.partition, rng.index, rng.reach,
                                            Point.of(self.last) if self.last else None)


@contextlib.contextmanager
def open_range(broker: BrokerOptions, rng: ReadRange, **kw: Any) -> Iterator[RangeReader]:
    """A :class:`RangeReader` on a connection of its own to ``broker`` (whose ``service_url`` must
    be set: a task never starts an embedded broker), closed on exit."""
    if not broker.service_url:
        raise BadInput("a range is read from a broker given by URL (resolve the embedded one first)")
    client = connect(broker)
    try:
        yield RangeReader(client, rng, **kw)
    finally:
        client.close()

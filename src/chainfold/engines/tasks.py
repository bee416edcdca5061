"""What the tasks of a distributed replay do: the replay stages cut into pieces that run where the
data is (a Spark executor; the in-process cluster of the tests), each a plain function of its inputs.

* :func:`read_chunk`: one fixed :class:`~chainfold.engines.spark_io.ReadRange` through the source
  stage, each entry's leaf hash (the hash stage's :func:`~chainfold.hashing.stage.leaf_hashes`) and
  its envelope decoded (the decode stage's :func:`~chainfold.envelope.decode`): a :class:`Chunk`,
  kept by the cluster for the steps below. What the range holds does not depend on when it is read,
  so a retried task makes the same chunk.
* :func:`assemble`: once the driver knows where each chunk begins in its partition (the counts of
  the chunks before it), the chunk's compact ranges cut at segment bounds and at the driver's stops
  (:class:`~chainfold.hashing.stage.Piece`), and the event ids and malformed entries the driver's
  decode bookkeeping needs (:class:`Assembly`): the event ids first seen (:class:`FreshIds`, for the
  driver's dedup index, as columns) and the chunk's own ``seq`` checks (cut at the stops).
* :func:`dedup_pairs`: ``(event id, log position)`` for the shuffle that finds, for every id, its
  first entry in log order (first entry wins) and the later ones (duplicates).
* :func:`fold_items` and :func:`fold_streams`: every well-formed event keyed by stream and ordered
  by log position, folded one stream at a time by the fold stage
  (:class:`~chainfold.replay.fold.FoldStage`, same policies) (:class:`StreamResult`). The per-stream
  ``seq`` check (:class:`~chainfold.replay.decode.SeqGaps`) runs in the task over every well-formed
  entry of the chunk, duplicates included, in log order (as the local decode stage's hook sees
  them), started empty and cut at the driver's stops; the driver continues its own check with each
  (:meth:`~chainfold.replay.decode.SeqGaps.then`, exact), so its state at each snapshot is the
  local engine's.

A log position across partitions (``gpos``) is ``partition number << 40 | index in the partition``:
ordered as the local engine replays a partitioned topic (partition after partition).
"""

from __future__ import annotations

import bisect
import hashlib
import time
from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import groupby
from typing import Any, NamedTuple

import numpy as np

from ..envelope import Event, decode
from ..errors import MalformedEnvelope, ModelError
from ..hashing.stage import Piece
from ..log import EventLog, partition_index
from ..replay.decode import Decoded, SeqGaps
from ..replay.fold import FoldStage, OnModelError, Skipped
from ..replay.model import Model, load_model
from ..replay.pieces import id_keys
from .spark_io import ReadRange, open_range

__all__ = ["GPOS_SHIFT", "gpos", "Chunk", "read_chunk", "Assembly", "FreshIds", "assemble", "dedup_pairs",
           "prior_candidates", "fold_items",
           "StreamResult", "fold_streams", "portable_error"]

GPOS_SHIFT = 40
_LOW = (1 << GPOS_SHIFT) - 1
_sha256 = hashlib.sha256


def gpos(pi: int, index: int) -> int:
    """The position of entry ``index`` of partition number ``pi`` across the topic's partitions."""
    return pi << GPOS_SHIFT | index


# --- read, hash, decode ----------------------------------------------------------------------------


class Events(NamedTuple):
    """The well-formed events of a chunk, column by column: offsets in the chunk, ids, streams,
    payloads and ``seq`` (None: the producer sent none) (columns pickle several times faster than a
    list of event objects, and a payload is decoded again where it is folded: cheaper than pickling
    the decoded event there and back)."""

    offsets: array
    ids: list[str]
    streams: list[str]
    payloads: list[bytes]
    seqs: list[int | None]

    def used(self, used: int) -> int:
        """How many of the events are among the chunk's first ``used`` entries."""
        return bisect.bisect_left(self.offsets, used)


@dataclass
class Chunk:
    """One range as read: ``count`` entries (each message id once), their leaf hashes (32 bytes
    each, concatenated), message ids (``ledger, entry, batch`` per entry), the malformed entries
    (offset, reason) and the well-formed :class:`Events` when decoded, and ``late``: the offset of
    the first entry published after the replay's ``until_time`` (``None``: none is)."""

    partition: str
    pi: int
    ri: int
    count: int
    leaves: bytes
    mids: array
    malformed: list[tuple[int, str]]
    events: Events | None
    late: int | None
    redelivered: int
    reconnects: int
    seconds: float

    def mid(self, offset: int) -> str:
        """The message id text (``ledger:entry:partition:batch``) of the entry at ``offset``."""
        m = self.mids
        return f"{m[3 * offset]}:{m[3 * offset + 1]}:{partition_index(self.partition)}:{m[3 * offset + 2]}"

    def summary(self) -> ChunkSummary:
        used = self.count if self.late is None else self.late
        return ChunkSummary(self.pi, self.ri, self.count, self.late, self.mid(used - 1) if used else None,
                            self.redelivered, self.reconnects, self.seconds)


class ChunkSummary(NamedTuple):
    """What the driver learns of a chunk first: how many entries, where the last one is (the last
    before ``late``, when an entry was published after the replay's time bound)."""

    pi: int
    ri: int
    count: int
    late: int | None
    last: str | None
    redelivered: int
    reconnects: int
    seconds: float


def read_chunk(open_log: Callable[[], EventLog], rng: ReadRange, pi: int, ri: int, *, decode_events: bool = True,
               until_time: int | None = None) -> Chunk:
    """Read ``rng`` (a log of its own from ``open_log``), hash and (``decode_events``) decode it.

    Raises what the read raises: :class:`~chainfold.errors.BrokerUnavailable` past the retry
    budget, :class:`~chainfold.errors.LogShorterThanPlanned` when the range ends before its reach
    (the task fails; the cluster retries it).
    """
    t0 = time.perf_counter()
    sha = _sha256
    hashes: list[bytes] = []
    mids = array("q")
    malformed: list[tuple[int, str]] = []
    events = Events(array("l"), [], [], [], []) if decode_events else None
    late = None
    n = 0
    with open_range(open_log, rng) as reader:
        for batch in reader.batches():
            hashes.extend(sha(b"\x00" + e.payload).digest() for e in batch)
            for e in batch:
                m = e.message_id
                mids.extend((m.ledger, m.entry, m.batch))
            if until_time is not None and late is None:
                late = next((n + k for k, e in enumerate(batch) if e.publish_time > until_time), None)
            if events is not None:
                _decode_into(events, malformed, batch, n)
            n += len(batch)
    return Chunk(rng.partition, pi, ri, n, b"".join(hashes), mids, malformed, events, late, reader.redelivered,
                 reader.reconnects, time.perf_counter() - t0)


def _decode_into(events: Events, malformed: list[tuple[int, str]], batch: Sequence[Any], start: int) -> None:
    offsets, ids, streams, payloads, seqs = events
    for k, e in enumerate(batch, start):
        payload = e.payload
        try:
            ev = decode(payload)
        except MalformedEnvelope as exc:
            malformed.append((k, exc.reason))
            continue
        offsets.append(k)
        ids.append(ev.id)
        streams.append(ev.stream)
        payloads.append(payload)
        seqs.append(ev.seq)


# --- what the driver assembles ---------------------------------------------------------------------


class FreshIds(NamedTuple):
    """The event ids a chunk folds for the first time (not at a duplicate's position), in log
    order, as columns: entry indexes (``int64``), their UTF-8 one after another (``blob``) with
    each one's length in bytes and in characters (``int64``), and their 64-bit keys
    (:func:`~chainfold.replay.pieces.id_keys`, ``uint64``): what the driver's dedup index writes
    as pieces (:meth:`~chainfold.replay.dedup.DedupIndex.add_fresh`) without a Python object per id."""

    indexes: np.ndarray
    blob: bytes
    lengths: np.ndarray
    chars: np.ndarray
    keys: np.ndarray

    @classmethod
    def of(cls, indexes: Sequence[int], ids: Sequence[str]) -> FreshIds:
        n = len(ids)
        text = "".join(ids)
        chars = np.fromiter(map(len, ids), dtype=np.int64, count=n)
        if text.isascii():
            blob, lengths = text.encode("ascii"), chars
        else:
            encoded = [i.encode("utf-8", "surrogatepass") for i in ids]
            blob, lengths = b"".join(encoded), np.fromiter(map(len, encoded), dtype=np.int64, count=n)
        return cls(np.asarray(indexes, dtype=np.int64), blob, lengths, chars, id_keys(ids))


@dataclass
class Assembly:
    """What the driver needs of one chunk, in log order: its pieces (hashes); the ids it folds
    first (:class:`FreshIds`) when asked for; its malformed entries as
    ``(index, message id, reason)`` and its duplicates as ``(index, message id, event id)``;
    ``seq_checks``: the ``seq`` check of its well-formed events (duplicates included), started
    empty, one per run between the driver's stops, as ``(index of the run's first entry, check)``."""

    pi: int
    ri: int
    begin: int
    end: int
    pieces: list[Piece]
    fresh: FreshIds | None
    malformed: list[tuple[int, str, str]]
    duplicates: list[tuple[int, str, str]]
    seq_checks: list[tuple[int, SeqGaps]] = field(default_factory=list)
    rows: tuple[array, list[str], list[str]] | None = None
    """The events folded first as ``(indexes, ids, streams)`` (reconcile's reference), when asked for."""
    leaves: bytes | None = None
    """Their leaf hashes (32 bytes each), when asked for."""


def assemble(chunk: Chunk, begin: int, used: int, segment_size: int, cuts: Sequence[int], carry_from: int, *,
             duplicates: frozenset[int] | set[int] = frozenset(), ids: bool = False, seq_from: int = 0,
             rows: bool = False, leaves: bool = False) -> Assembly:
    """The chunk's first ``used`` entries, which are entries ``begin ..`` of its partition: pieces
    cut at segment bounds and at ``cuts`` (indexes, sorted), carrying their leaf hashes from index
    ``carry_from`` on (whole segments: ``carry_from`` is a multiple of the segment size); the events
    at the positions ``duplicates`` (gpos) are named as duplicates, the others' ids are the fresh
    ones (``ids``); the ``seq`` checks start at index ``seq_from`` (where the driver's starts) and
    are cut at ``cuts``; ``rows`` (and ``leaves``): the fresh events' indexes, ids and streams (and
    leaf hashes) as :attr:`Assembly.rows` (:attr:`Assembly.leaves`)."""
    end = begin + used
    inner = sorted({b for b in cuts if begin < b < end})
    bounds = set(inner)
    S = segment_size
    bounds.update(range((begin // S + 1) * S, end, S))
    pieces = []
    leaves = chunk.leaves
    a = begin
    for b in sorted(bounds) + [end]:
        if b <= a:
            continue
        o, p = a - begin, b - begin
        piece_leaves = [leaves[32 * k : 32 * k + 32] for k in range(o, p)]
        pieces.append(Piece.of(piece_leaves, a, chunk.mid(o), chunk.mid(p - 1), carry=a >= carry_from))
        a = b
    ev = chunk.events
    n = ev.used(used) if ev is not None else 0
    fresh = out_rows = out_leaves = None
    base = gpos(chunk.pi, begin)
    if (ids or rows) and ev is not None:
        kept = [j for j, k in enumerate(ev.offsets[:n]) if base + k not in duplicates]
        indexes = array("q", (begin + ev.offsets[j] for j in kept))
        fresh_ids = [ev.ids[j] for j in kept]
        if ids:
            fresh = FreshIds.of(indexes, fresh_ids)
        if rows:
            out_rows = (indexes, fresh_ids, [ev.streams[j] for j in kept])
        if leaves:
            out_leaves = b"".join(chunk.leaves[32 * ev.offsets[j]:32 * ev.offsets[j] + 32] for j in kept)
    malformed = [(begin + k, chunk.mid(k), reason) for k, reason in chunk.malformed if k < used]
    dups = []
    if duplicates and ev is not None:
        dups = [(begin + k, chunk.mid(k), eid) for k, eid in zip(ev.offsets[:n], ev.ids) if base + k in duplicates]
    return Assembly(chunk.pi, chunk.ri, begin, end, pieces, fresh, malformed, dups,
                    _seq_checks(chunk, begin, n, seq_from, inner), out_rows, out_leaves)


def _seq_checks(chunk: Chunk, begin: int, n: int, seq_from: int, cuts: Sequence[int]) -> list[tuple[int, SeqGaps]]:
    """The ``seq`` checks of the chunk's first ``n`` well-formed events from index ``seq_from``
    on, each started empty, one per run between ``cuts`` (indexes inside the chunk, sorted)."""
    ev = chunk.events
    if ev is None:
        return []
    out = []
    a = bisect.bisect_left(ev.offsets, seq_from - begin, 0, n)
    for b in [*(bisect.bisect_left(ev.offsets, c - begin, 0, n) for c in cuts), n]:
        if b > a:
            check = SeqGaps()
            check(_SeqRun(chunk, begin, ev.offsets[a:b], ev.streams[a:b], ev.seqs[a:b]))  # type: ignore[arg-type]
            out.append((begin + ev.offsets[a], check))
        a = max(a, b)
    return out


class _SeqEvent(NamedTuple):
    stream: str
    seq: int | None


class _SeqRun:
    """A run of a chunk's well-formed events as the :class:`~chainfold.replay.decode.SeqGaps` hook
    reads a decoded batch (``events``, ``message_id(j)``, ``index(j)``)."""

    def __init__(self, chunk: Chunk, begin: int, offsets: Sequence[int], streams: Sequence[str],
                 seqs: Sequence[int | None]) -> None:
        self.chunk, self.begin, self.offsets = chunk, begin, offsets
        self.events = [_SeqEvent(s, q) for s, q in zip(streams, seqs)]

    def message_id(self, j: int) -> str:
        return self.chunk.mid(self.offsets[j])

    def index(self, j: int) -> int:
        return self.begin + self.offsets[j]


# --- dedup -----------------------------------------------------------------------------------------


def dedup_pairs(chunk: Chunk, begin: int, used: int) -> tuple[list[str], array]:
    """The ids and positions (gpos) of the well-formed events among the chunk's first ``used``
    entries, as two columns."""
    ev = chunk.events
    if ev is None:
        return [], array("q")
    n = ev.used(used)
    base = gpos(chunk.pi, begin)
    return ev.ids[:n], array("q", (base + k for k in ev.offsets[:n]))


def prior_candidates(chunk: Chunk, begin: int, used: int, key_filter: Any) -> list[str]:
    """The ids among the chunk's first ``used`` entries that the starting snapshot's dedup index
    may hold: those whose 64-bit key ``key_filter`` (:attr:`~chainfold.replay.dedup.DedupIndex.key_filter`)
    lets through (each id the index holds, and ~1% of the others)."""
    ids, _ = dedup_pairs(chunk, begin, used)
    if not ids:
        return []
    passed = key_filter.maybe(id_keys(ids))
    return [i for i, p in zip(ids, passed.tolist()) if p]


# --- fold ------------------------------------------------------------------------------------------


class _Named(NamedTuple):
    """Stands in for an entry where only its message id is asked for (:class:`Decoded`)."""

    message_id: str


def fold_items(chunk: Chunk, begin: int, used: int, duplicates: frozenset[int] | set[int]
               ) -> Iterator[tuple[str, int, tuple[bytes, str]]]:
    """``(stream, gpos, (payload, message id))`` of every well-formed event among the chunk's
    first ``used`` entries that is not at one of the ``duplicates`` positions (gpos)."""
    ev = chunk.events
    if ev is None:
        return
    base = gpos(chunk.pi, begin)
    mid = chunk.mid
    for k, stream, payload in zip(ev.offsets[:ev.used(used)], ev.streams, ev.payloads):
        g = base + k
        if g not in duplicates:
            yield stream, g, (payload, mid(k))


@dataclass
class StreamResult:
    """One stream folded: its state after every event (``model.dump_state`` of it; ``present``
    False when it has none: every event skipped, or a stream not folded), its state at each stop
    where events of it came before (``cut_states``: ``(stop number, dumped state)``), where its first
    event was applied (``first_applied``, a gpos), how many were applied, the events skipped and the
    error that stopped it (with gpos). (The ``seq`` check runs on the driver, in log order:
    :attr:`Assembly.seqs`.)"""

    stream: str
    present: bool = False
    state: Any = None
    cut_states: list[tuple[int, Any]] = field(default_factory=list)
    first_applied: int | None = None
    applied: int = 0
    skipped: list[tuple[int, Skipped]] = field(default_factory=list)
    error: tuple[int, ModelError] | None = None


_MODELS: dict[str, Model] = {}


def _model(ref: str) -> Model:
    """The model loaded by name, once per Python worker."""
    m = _MODELS.get(ref)
    if m is None:
        m = _MODELS[ref] = load_model(ref)
    return m


def portable_error(exc: ModelError) -> ModelError:
    """``exc`` with a cause that pickles: the user's exception if it does, else a stand-in of the
    same class name and text (the error's message, and so the report, is unchanged)."""
    import pickle

    try:
        pickle.loads(pickle.dumps(exc.cause))
        return exc
    except Exception:  # noqa: BLE001 - whatever the user's exception does when pickled
        return ModelError(exc.stream, exc.event_id, exc.message_id, _Plain.of(exc.cause), index=exc.index)


class _Plain(Exception):
    """A stand-in for an exception that does not pickle: same class name, same text."""

    name = "Exception"

    @classmethod
    def of(cls, exc: BaseException) -> _Plain:
        sub = type(type(exc).__name__, (cls,), {"name": type(exc).__name__})
        return sub(str(exc))

    def __reduce__(self) -> tuple:
        return (_plain, (self.name, str(self)))


def _plain(name: str, text: str) -> _Plain:
    return type(name, (_Plain,), {"name": name})(text)


def fold_streams(items: Iterable[tuple[str, int, Any]], model_ref: str, on_error: OnModelError,
                 cuts: Sequence[int], streams: frozenset[str] | None,
                 resumed: Mapping[str, Sequence[Skipped]] | None = None) -> Iterator[StreamResult]:
    """Fold the events of each stream in ``items`` (sorted by stream, then gpos; a stream's
    starting state, from a snapshot, comes first as ``(stream, -1, ("state", dumped))``).
    ``cuts`` are the driver's stops (gpos, sorted): the state before each is reported.
    ``resumed``: the events the starting snapshot skipped, by stream (under ``skip-stream`` their
    streams stay frozen, as :meth:`~chainfold.replay.fold.FoldStage.resume` keeps them locally)."""
    model = _model(model_ref)
    for stream, group in groupby(items, key=lambda it: it[0]):
        yield _fold_one(stream, [(g, x) for _, g, x in group], model, on_error, cuts, streams,
                        (resumed or {}).get(stream, ()))


def _fold_one(stream: str, items: list[tuple[int, Any]], model: Model, on_error: OnModelError,
              cuts: Sequence[int], streams: frozenset[str] | None, resumed: Sequence[Skipped] = ()) -> StreamResult:
    out = StreamResult(stream)
    states: dict[str, Any] = {}
    if items and items[0][0] < 0:
        states[stream] = model.load_state(items[0][1][1])
        items = items[1:]
    kept = [(g, (decode(payload), mid)) for g, (payload, mid) in items]
    where = {mid: g for g, (_, mid) in kept}
    fold = FoldStage(model, states, streams=streams, on_error=on_error)
    fold.resume(resumed, keep=False)
    for j, run in groupby(kept, key=lambda it: bisect.bisect_right(cuts, it[0])):
        run = list(run)
        before = len(fold.skipped)
        had = stream in states
        try:
            fold.feed(_decoded([x[0] for _, x in run], [g & _LOW for g, _ in run], [x[1] for _, x in run]))
        except ModelError as exc:
            out.error = (where[exc.message_id], portable_error(exc))  # type: ignore[index]
            break
        if not had and stream in states:
            skipped_here = {s.message_id for s in fold.skipped[before:]}
            out.first_applied = next(g for g, x in run if x[1] not in skipped_here)
        if j < len(cuts) and stream in states:
            out.cut_states.append((j, model.dump_state(states[stream])))
    out.skipped = [(where[s.message_id], s) for s in fold.skipped]
    out.applied = fold.applied
    if stream in states:
        out.present, out.state = True, model.dump_state(states[stream])
    return out


def _decoded(events: list[Event], indexes: list[int], mids: list[str]) -> Decoded:
    return Decoded(events, None, indexes, [_Named(m) for m in mids], ())

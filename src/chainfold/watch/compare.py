"""The live comparison: a worker's handling against the reference, as both grow.

The **reference** is what a correct worker handles (docs/worker-evidence.md, as in ``reconcile``): the
log's well-formed entries in log order, each event id once, at its first entry. Position ``p`` of
the reference is the p-th such event (:class:`Expected`: its log index, ids and leaf hash, and,
when the wiring folds, the :func:`~chainfold.tracker.state_digest` of its stream after it). The
worker's handling is what its Tracker wrote: leaf hash ``p`` and, if it gives them, state digest
``p`` (:class:`~chainfold.watch.follow.EvidenceFollower` reads them).

:class:`HandlingComparator` confirms positions in order: position ``p`` agrees when the worker's leaf
is the reference's and, where both sides have a state digest, the digests are equal. The first
position that does not is the **divergence** (:class:`LiveDivergence`), named as reconcile's
``first_divergence`` names it: the log index, segment, event id and message id of the reference
event expected there. A worker that handled something else there (an event skipped, handled
twice, or out of order) differs in its leaf; a worker that handled the right event wrongly
differs in its state digest. Once found, the comparison stops: later positions no longer line up.

Memory is flat in the length of the run: confirmed positions are dropped at once; the reference
positions the worker has not reached yet (its lag) are kept in memory up to ``window`` of them and
spilled, beyond that, to an append-only file read back in order (emptied whenever it is drained);
the worker's positions are read only as far as the reference can use them (:meth:`room`).

Cost: the reference is held in blocks (a batch's log indexes, event ids, and its leaf hashes and
state digests as concatenated 32-byte records: no object per position), and a check compares a
whole run of positions with two byte-string comparisons (leaves, digests); only a run that differs
is searched, with numpy, for its first differing record (for digests: the first where both sides
have one and they differ).
"""

from __future__ import annotations

import os
import struct
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import cbor2
import numpy as np

from ..store.atomic import atomic_write
from ..tracker import NO_DIGEST

__all__ = ["Expected", "LiveDivergence", "HandlingComparator"]

_RECORD = 32
_HEAD = struct.Struct(">Q32s32sIH")
_MAGIC = b"chainfold-watch-comparison\n"


class Expected(NamedTuple):
    """Reference position: the event a correct worker handles there. ``digest`` is the state
    digest of its stream after it (:data:`NO_DIGEST`: not compared). (A named tuple: watch makes
    one per event.)"""

    index: int
    event_id: str
    message_id: str
    leaf: bytes
    digest: bytes = NO_DIGEST


@dataclass(frozen=True, slots=True)
class LiveDivergence:
    """The first place where the worker's handling departs from the reference.

    ``position`` is the place in the worker's handling order (0-based); ``index``, ``segment``,
    ``event_id`` and ``message_id`` name the reference event expected there (for a worker that
    handled more than the whole log: ``index`` is the log's size and the ids are ``None``, as in
    reconcile); ``reason`` says what differed."""

    position: int
    index: int
    segment: int
    event_id: str | None
    message_id: str | None
    reason: str

    def to_json(self) -> dict[str, Any]:
        """The keys of a watch ``divergence`` line (docs/cli.md), without ``kind`` and ``time``."""
        return {"index": self.index, "segment": self.segment, "event_id": self.event_id,
                "message_id": self.message_id}


def _pack(records: Iterable[Expected]) -> bytes:
    parts = []
    for r in records:
        eid, mid = r.event_id.encode("utf-8", "surrogatepass"), r.message_id.encode()
        parts.append(_HEAD.pack(r.index, r.leaf, r.digest, len(eid), len(mid)) + eid + mid)
    return b"".join(parts)


def _unpack(data: bytes, limit: int) -> tuple[list[Expected], int]:
    """Up to ``limit`` whole records from the front of ``data``, and the bytes they took."""
    out: list[Expected] = []
    pos = 0
    hs = _HEAD.size
    while len(out) < limit and pos + hs <= len(data):
        index, leaf, digest, le, lm = _HEAD.unpack_from(data, pos)
        end = pos + hs + le + lm
        if end > len(data):
            break
        out.append(Expected(index, data[pos + hs:pos + hs + le].decode("utf-8", "surrogatepass"),
                            data[pos + hs + le:end].decode(), leaf, digest))
        pos = end
    return out, pos


def _records(data: bytes | bytearray) -> np.ndarray:
    """32-byte records as rows of four 64-bit words."""
    return np.frombuffer(data, dtype=np.uint64).reshape(-1, 4)


def _first_other_leaf(a: bytes | bytearray, b: bytes | bytearray) -> int:
    """The first record where two equal-length runs of records differ (they do somewhere)."""
    return int(np.flatnonzero((_records(a) != _records(b)).any(axis=1))[0])


def _first_other_digest(a: bytes | bytearray, b: bytes | bytearray) -> int | None:
    """The first record where both runs have a digest (not :data:`NO_DIGEST`) and they differ."""
    x, y = _records(a), _records(b)
    bad = np.flatnonzero((x != y).any(axis=1) & x.any(axis=1) & y.any(axis=1))
    return int(bad[0]) if len(bad) else None


class _Block:
    """Consecutive reference positions: their log indexes, event ids and message ids (``None``: all
    unknown, ``""``), leaf hashes and state digests as concatenated 32-byte records. The first
    :attr:`k` were consumed (confirmed); ``len()`` counts the rest."""

    __slots__ = ("indexes", "event_ids", "message_ids", "leaves", "digests", "k")

    def __init__(self, indexes: list[int], event_ids: list[str], leaves: bytes, digests: bytes,
                 message_ids: list[str] | None = None) -> None:
        n = len(indexes)
        if len(event_ids) != n or len(leaves) != n * _RECORD or len(digests) != n * _RECORD \
                or (message_ids is not None and len(message_ids) != n):
            raise ValueError("a reference block needs one index, event id, leaf and digest per position")
        self.indexes, self.event_ids, self.message_ids = indexes, event_ids, message_ids
        self.leaves, self.digests = leaves, digests
        self.k = 0

    @classmethod
    def of(cls, expected: list[Expected]) -> _Block:
        return cls([e.index for e in expected], [e.event_id for e in expected],
                   b"".join(e.leaf for e in expected), b"".join(e.digest for e in expected),
                   [e.message_id for e in expected])

    def __len__(self) -> int:
        return len(self.indexes) - self.k

    def expected(self, i: int) -> Expected:
        """Position ``i`` of the block (counting consumed ones), as an :class:`Expected`."""
        r = slice(i * _RECORD, (i + 1) * _RECORD)
        return Expected(self.indexes[i], self.event_ids[i], self.message_ids[i] if self.message_ids else "",
                        self.leaves[r], self.digests[r])

    def records(self) -> list[Expected]:
        """The positions not consumed."""
        return [self.expected(i) for i in range(self.k, len(self.indexes))]

    def split(self, n: int) -> tuple[_Block, _Block]:
        """The first ``n`` positions not consumed, and the rest, as two blocks."""
        a, m, r = self.k, self.k + n, _RECORD
        mids = self.message_ids
        return (_Block(self.indexes[a:m], self.event_ids[a:m], self.leaves[a * r:m * r], self.digests[a * r:m * r],
                       mids[a:m] if mids else None),
                _Block(self.indexes[m:], self.event_ids[m:], self.leaves[m * r:], self.digests[m * r:],
                       mids[m:] if mids else None))


class _Spill:
    """A FIFO of :class:`Expected` in a file: appended at the end, read from the front in order;
    truncated to empty whenever everything written was read."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._f: Any = None
        self._read = 0  # file offset of the next record to read
        self._end = 0
        self.count = 0

    def append(self, records: list[Expected]) -> None:
        if not records:
            return
        if self._f is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(self.path, "w+b")
        data = _pack(records)
        os.pwrite(self._f.fileno(), data, self._end)
        self._end += len(data)
        self.count += len(records)

    def take(self, n: int) -> list[Expected]:
        """Up to ``n`` records from the front."""
        out: list[Expected] = []
        while len(out) < n and self.count:
            chunk = os.pread(self._f.fileno(), max(1 << 16, 2 * _HEAD.size), self._read)
            records, used = _unpack(chunk, n - len(out))
            if not records:  # one record longer than the chunk
                records, used = _unpack(os.pread(self._f.fileno(), self._end - self._read, self._read), 1)
            out += records
            self._read += used
            self.count -= len(records)
        if not self.count and self._f is not None:
            self._f.truncate(0)
            self._read = self._end = 0
        return out

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
            self.path.unlink(missing_ok=True)


class HandlingComparator:
    """Compares the worker's handling with the reference incrementally (see the module doc).

    Feed the reference with :meth:`add_reference` (and, when ``digests`` is on, each position's
    state digest with :meth:`add_digests`, in the same order, possibly later), the worker's
    positions with :meth:`add_worker` (in order, from position 0 or the ``start`` given), then call
    :meth:`check`. ``segment_size`` is the log's, for naming the segment. Single-threaded.
    """

    def __init__(self, *, segment_size: int = 1024, window: int = 1 << 15, spill_path: str | os.PathLike[str]
                 | None = None, digests: bool = False, start: int = 0) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, not {window!r}")
        self.segment_size = segment_size
        self.window = window
        self.digests = digests
        self.confirmed = start  # positions agreed on
        self.reference_size = start
        self.worker_size = start
        self.last_index: int | None = None  # log index of the last confirmed position's event
        self.divergence: LiveDivergence | None = None
        self._reported = False
        self._mem: deque[_Block] = deque()  # reference positions [confirmed, confirmed + _mem_count)
        self._mem_count = 0
        self._undigested: deque[Expected] = deque()  # newest reference positions, waiting for digests
        self._spill: _Spill | None = _Spill(Path(spill_path)) if spill_path is not None else None
        self._wl = bytearray()  # worker leaves of positions [confirmed, worker_size)
        self._wd = bytearray()  # and their digests
        self._wpos = 0  # offset of position `confirmed` in _wl/_wd

    # --- input ----------------------------------------------------------------------------------------

    def add_reference(self, expected: Iterable[Expected]) -> None:
        """Append reference positions (in reference order)."""
        batch = list(expected)
        self.reference_size += len(batch)
        if self.digests:
            self._undigested.extend(batch)
        elif batch:
            self._enqueue(_Block.of(batch))

    def add_reference_block(self, indexes: list[int], event_ids: list[str], leaves: bytes,
                            digests: bytes | None = None) -> None:
        """Append reference positions given column by column (what :meth:`add_reference` takes, without
        an object per position): their log indexes and event ids, and their leaf hashes and state
        digests as concatenated 32-byte records (``None``: no digests). Message ids are unknown."""
        n = len(indexes)
        block = _Block(indexes, event_ids, leaves, NO_DIGEST * n if digests is None else digests)
        if self.digests:
            self.add_reference(block.records())
            return
        self.reference_size += n
        if n:
            self._enqueue(block)

    def add_digests(self, digests: Iterable[bytes]) -> None:
        """The state digests of the oldest reference positions still without one, in order."""
        done = []
        for d in digests:
            if not self._undigested:
                raise ValueError("more state digests than reference positions")
            e = self._undigested.popleft()
            done.append(Expected(e.index, e.event_id, e.message_id, e.leaf, d))
        if done:
            self._enqueue(_Block.of(done))

    def _enqueue(self, block: _Block) -> None:
        n = len(block)
        if self._spill is not None and (self._spill.count or self._mem_count + n > self.window):
            room = 0 if self._spill.count else min(n, max(0, self.window - self._mem_count))
            if room:
                head, block = block.split(room)
                self._mem.append(head)
                self._mem_count += room
            self._spill.append(block.records())
        else:
            self._mem.append(block)
            self._mem_count += n

    def add_worker(self, start: int, leaves: bytes, digests: bytes | None = None) -> None:
        """The worker's handling positions ``start, start+1, ...``: leaf hashes (and state digests,
        :data:`NO_DIGEST` where none) as concatenated 32-byte records. ``start`` must be
        :attr:`worker_size` (positions come in order, each once)."""
        if start != self.worker_size:
            raise ValueError(f"worker positions from {start}, expected {self.worker_size}")
        n = len(leaves) // _RECORD
        if digests is None:
            digests = NO_DIGEST * n
        if len(leaves) % _RECORD or len(digests) != len(leaves):
            raise ValueError("leaves and digests must be the same number of 32-byte records")
        if self.divergence is not None:
            self.worker_size += n
            return
        self._wl += leaves
        self._wd += digests
        self.worker_size += n

    def room(self) -> int:
        """How many more worker positions the comparison can use now (so the caller reads no further)."""
        if self.divergence is not None:
            return 0
        return max(0, self.reference_size + self.window - self.worker_size)

    # --- comparison -----------------------------------------------------------------------------------

    def check(self, *, log_entries: int | None = None, reference_complete: bool = False) -> LiveDivergence | None:
        """Confirm what both sides have; return the divergence the first time it is found.

        ``reference_complete``: the log was read to its end (``log_entries`` entries) *after* the
        worker's evidence given so far was read, so every event the worker could have handled is in
        the reference; then a worker with more positions than the reference handled something the
        reference does not have there (a second copy at the end): divergence at the log's end.
        """
        if self.divergence is None:
            self._advance()
            if (self.divergence is None and reference_complete and log_entries is not None
                    and self.confirmed == self.reference_size and self.worker_size > self.reference_size
                    and not self._undigested):
                self.divergence = LiveDivergence(self.confirmed, log_entries, log_entries // self.segment_size,
                                                 None, None, "the worker handled more events than the log holds")
        if self.divergence is not None and not self._reported:
            self._reported = True
            return self.divergence
        return None

    def _advance(self) -> None:
        """Confirm positions run by run: a reference block against the worker's records read."""
        wl, wd, mem = self._wl, self._wd, self._mem
        off = self._wpos
        end = len(wl)
        try:
            while off < end:
                if not mem:
                    if self._spill is None or not self._spill.count:
                        break
                    self._enqueue_front(self._spill.take(max(1, self.window // 2)))
                blk = mem[0]
                n = min(len(blk), (end - off) // _RECORD)
                a, nb = blk.k * _RECORD, n * _RECORD
                w = wl[off:off + nb]
                other = n if w == blk.leaves[a:a + nb] else _first_other_leaf(w, blk.leaves[a:a + nb])
                mb = other * _RECORD  # digests count where the leaves agree
                wdig, rdig = wd[off:off + mb], blk.digests[a:a + mb]
                wrong_state = None if wdig == rdig else _first_other_digest(wdig, rdig)
                agreed = other if wrong_state is None else wrong_state
                self._consume(blk, agreed)
                off += agreed * _RECORD
                if wrong_state is not None:
                    self.divergence = self._diverged(self.confirmed, blk.expected(blk.k),
                                                     "the worker's state after this event differs")
                    return
                if other < n:
                    e = blk.expected(blk.k)
                    self.divergence = self._diverged(self.confirmed, e, "the worker handled another event here "
                                                     + self._guess(off, e))
                    return
                if not len(blk):
                    mem.popleft()
        finally:
            if off > 1 << 20 or off == end:  # drop what is confirmed (amortized)
                del wl[:off]
                del wd[:off]
                off = 0
            self._wpos = off

    def _consume(self, blk: _Block, n: int) -> None:
        """The next ``n`` positions of the front block agree."""
        if n:
            blk.k += n
            self._mem_count -= n
            self.confirmed += n
            self.last_index = blk.indexes[blk.k - 1]

    def _enqueue_front(self, records: list[Expected]) -> None:
        """Positions taken back from the spill (they come before nothing in memory: it is empty)."""
        if records:
            self._mem.append(_Block.of(records))
            self._mem_count += len(records)

    def _guess(self, off: int, e: Expected) -> str:
        nxt = self._reference_after_next()
        if nxt is not None and self._wl[off:off + _RECORD] == nxt:
            return "(the next one: this event was skipped)"
        return "(skipped, handled again or out of order)"

    def _reference_after_next(self) -> bytes | None:
        """The leaf of the reference position after the first unconfirmed one (if in memory)."""
        skip = 1
        for blk in self._mem:
            if len(blk) > skip:
                i = blk.k + skip
                return blk.leaves[i * _RECORD:(i + 1) * _RECORD]
            skip -= len(blk)
        return None

    def _diverged(self, position: int, e: Expected, reason: str) -> LiveDivergence:
        return LiveDivergence(position, e.index, e.index // self.segment_size, e.event_id, e.message_id, reason)

    def lag(self, log_entries: int) -> int:
        """Log entries after the last event the worker handled in agreement with the reference
        (0 when it handled everything read so far; after a divergence: reference positions it has
        not reached)."""
        if self.divergence is not None:
            return max(0, self.reference_size - self.worker_size)
        if self.confirmed >= self.reference_size:
            return 0
        return max(0, log_entries - (self.last_index + 1 if self.last_index is not None else 0))

    # --- persistence ----------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the comparison's state atomically (what is confirmed, the divergence if any, and the
        reference positions not confirmed yet), for :meth:`load` in a later run: watch does it on
        SIGTERM beside its snapshot, between batches, when every reference position has its digest
        (``ValueError`` otherwise). The worker's positions read but not confirmed yet are kept
        too (at most about ``window``), so the follower's state saved at the same moment
        (:meth:`~chainfold.watch.follow.EvidenceFollower.state`) continues it."""
        if self._undigested:
            raise ValueError(f"{len(self._undigested)} reference position(s) still wait for their state digest")
        d = self.divergence
        head = cbor2.dumps({
            "version": 1, "segment_size": self.segment_size, "digests": self.digests, "confirmed": self.confirmed,
            "reference_size": self.reference_size, "last_index": self.last_index,
            "worker_leaves": bytes(self._wl[self._wpos:]), "worker_digests": bytes(self._wd[self._wpos:]),
            "divergence": None if d is None else [d.position, d.index, d.segment, d.event_id, d.message_id, d.reason],
        })
        chunks = [_MAGIC, len(head).to_bytes(4, "big"), head, _pack(r for blk in self._mem for r in blk.records())]
        if self._spill is not None and self._spill.count:
            chunks.append(os.pread(self._spill._f.fileno(), self._spill._end - self._spill._read, self._spill._read))
        atomic_write(Path(path), b"".join(chunks))

    @classmethod
    def load(cls, path: str | os.PathLike[str], **kw: Any) -> HandlingComparator:
        """A comparator that continues a :meth:`save`\\ d one (``kw``: ``window``, ``spill_path``);
        ``ValueError`` if the file is not one."""
        data = Path(path).read_bytes()
        if not data.startswith(_MAGIC):
            raise ValueError(f"{path}: not a saved comparison")
        n = int.from_bytes(data[len(_MAGIC):len(_MAGIC) + 4], "big")
        body = len(_MAGIC) + 4 + n
        doc = cbor2.loads(data[len(_MAGIC) + 4:body])
        if doc.get("version") != 1:
            raise ValueError(f"{path}: unsupported comparison state version {doc.get('version')!r}")
        c = cls(segment_size=doc["segment_size"], digests=doc["digests"], start=doc["confirmed"], **kw)
        c.last_index = doc["last_index"]
        c.add_worker(c.confirmed, doc["worker_leaves"], doc["worker_digests"])
        while body < len(data):
            records, used = _unpack(data[body:body + (1 << 20)], 1 << 14)
            if not records:
                records, used = _unpack(data[body:], 1)
                if not records:
                    raise ValueError(f"{path}: torn record at byte {body}")
            c._enqueue(_Block.of(records))
            body += used
        c.reference_size = doc["reference_size"]
        if c.reference_size != c.confirmed + c._mem_count + (c._spill.count if c._spill else 0):
            raise ValueError(f"{path}: {c.reference_size - c.confirmed} pending positions announced, others found")
        if doc["divergence"] is not None:
            c.divergence = LiveDivergence(*doc["divergence"])
            c._reported = True
        return c

    def close(self) -> None:
        """Remove the spill file."""
        if self._spill is not None:
            self._spill.close()

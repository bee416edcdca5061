"""The worker's handlings joined with reconcile's reference by event id, on disk, in linear time.

Reconcile compares a processed log (event ids in handling order) with the reference (each event id
once, in log order): every handling needs the reference position of its event and whether it is the
event's first handling; the reference events never handled, the ids handled twice and the handlings
of ids the reference does not hold are listed. Index probes for that (one B-tree lookup per
handling) cost more per row as the tables outgrow the page cache: the time grew 5.6 x for 3 x the
events. :class:`HandlingJoin` is a partitioned hash join instead, where every row is read and written
a fixed number of times, sequentially:

1. both sides are split into ``B`` buckets by a hash of the event id (files of marshalled chunks);
2. each bucket is joined in memory (a dict of its reference ids; its handlings walked in handling
   order, so the first handling of an id is the first one met): one annotation per handling
   ``(handling number, reference position or -1, stream number or -1, first)``, written to the
   bucket of its *handling number* (``h // H``);
3. :meth:`HandlingJoin.annotations` reads those back one handling bucket at a time, placing each
   record at its handling number (numpy), so the walk is in handling order without a sort.

Memory: one bucket's ids (``bucket_rows`` by default :data:`BUCKET_ROWS`) and one handling bucket's
annotations, whatever N is, up to ``MAX_BUCKETS x bucket_rows`` rows (past that the buckets grow);
plus the lists it reports (missing events, handlings of unknown ids), which the report holds anyway.
Disk: about 100 bytes per row, in a folder the caller owns and removes.
"""

from __future__ import annotations

import marshal
import struct
from array import array
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np

__all__ = ["BUCKET_ROWS", "MAX_BUCKETS", "HandlingJoin"]

BUCKET_ROWS = 131_072
"""Rows per bucket the join aims at (what one bucket's dict holds)."""
MAX_BUCKETS = 512
"""At most this many buckets (open files) per side."""
_LEN = struct.Struct("<I")  # a chunk's length, before it
_CHUNK_BYTES = 1 << 18  # what the buffers of all buckets of one side hold together, roughly


def _buckets(rows: int, bucket_rows: int) -> int:
    return max(1, min(MAX_BUCKETS, -(-rows // bucket_rows)))


class _Spill:
    """Rows spread over ``n`` bucket files, each written as marshalled chunks (lists of tuples)."""

    def __init__(self, directory: Path, name: str, n: int, row_bytes: int) -> None:
        self.paths = [directory / f"{name}-{b}.bin" for b in range(n)]
        self.files: list[BinaryIO] = [open(p, "wb") for p in self.paths]
        self.buf: list[list[tuple]] = [[] for _ in range(n)]
        self.chunk = max(64, _CHUNK_BYTES // (row_bytes * n))

    def write(self, b: int) -> None:
        """Bucket ``b``'s buffered rows, to its file."""
        data = marshal.dumps(self.buf[b])
        f = self.files[b]
        f.write(_LEN.pack(len(data)))
        f.write(data)
        self.buf[b].clear()

    def close(self) -> None:
        for b, f in enumerate(self.files):
            if self.buf[b]:
                self.write(b)
            f.close()
        self.buf = []

    def read(self, b: int) -> Iterator[tuple]:
        """The rows of bucket ``b``, in the order they were added."""
        with open(self.paths[b], "rb") as f:  # marshal.load(f) reads a file in tiny pieces: slow
            while head := f.read(_LEN.size):
                yield from marshal.loads(f.read(_LEN.unpack(head)[0]))

    def remove(self, b: int) -> None:
        self.paths[b].unlink(missing_ok=True)


class HandlingJoin:
    """The handlings ``(event id, line)`` (handling ``h`` = their order, from 0) joined with the
    reference rows ``(event id, stream number)`` (reference position ``k`` = their order, from 0;
    each id at most once) — see the module doc. After construction:

    ``missing``: ``(k, event id)`` of reference events never handled, in reference order;
    ``twice``: ids handled more than once (held by the reference or not);
    ``unknown``: ``(h, line, event id)`` of handlings of ids the reference does not hold, in handling order;
    :meth:`annotations`: ``(k or -1, stream number or -1, first)`` per handling, in handling order.
    """

    def __init__(self, directory: Path, reference: Iterable[tuple[str, int]], n_reference: int,
                 handlings: Iterable[tuple[str, int]], n_handlings: int, *, bucket_rows: int | None = None) -> None:
        bucket_rows = bucket_rows or BUCKET_ROWS
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.handlings = 0
        nb = _buckets(max(n_reference, n_handlings), bucket_rows)
        self._per_ann = max(1, -(-max(1, n_handlings) // _buckets(n_handlings, bucket_rows)))
        self.missing: list[tuple[int, str]] = []
        self.twice: set[str] = set()
        self.unknown: list[tuple[int, int, str]] = []
        ref = self._split("ref", nb, ((eid, k, sno) for k, (eid, sno) in enumerate(reference)))
        proc = self._split("proc", nb, ((eid, h, line) for h, (eid, line) in enumerate(handlings)))
        self.handlings = proc.count
        self._ann_paths = [self.dir / f"ann-{a}.bin" for a in range(-(-self.handlings // self._per_ann))]
        ann = [open(p, "wb") for p in self._ann_paths]
        try:
            for b in range(nb):
                self._join(ref, proc, b, ann)
        finally:
            for f in ann:
                f.close()
        self.missing.sort()
        self.unknown.sort()

    def _split(self, name: str, nb: int, rows: Iterable[tuple[str, int, int]]) -> _Spill:
        spill = _Spill(self.dir, name, nb, 64)
        bufs, chunk, n = spill.buf, spill.chunk, 0
        try:
            for row in rows:  # _Spill.add, inlined: this runs once per row
                buf = bufs[hash(row[0]) % nb]
                buf.append(row)
                if len(buf) >= chunk:
                    spill.write(hash(row[0]) % nb)
                n += 1
        finally:
            spill.close()
        spill.count = n  # type: ignore[attr-defined]
        return spill

    def _join(self, ref: _Spill, proc: _Spill, b: int, ann: list[BinaryIO]) -> None:
        """Bucket ``b``: its annotations appended to their handling buckets."""
        refs = {row[0]: row for row in ref.read(b)}  # id -> (id, k, stream number)
        ref.remove(b)
        seen: set[str] = set()
        twice = self.twice
        acc = array("q")
        put = acc.extend
        for eid, h, line in proc.read(b):
            first = eid not in seen
            if first:
                seen.add(eid)
            else:
                twice.add(eid)
            r = refs.get(eid)
            if r is None:
                self.unknown.append((h, line, eid))
                put((h, -1, -1, first))
            else:
                put((h, r[1], r[2], first))
        proc.remove(b)
        recs = np.frombuffer(acc, dtype=np.int64).reshape(-1, 4)  # ascending handling numbers
        cuts = np.searchsorted(recs[:, 0], np.arange(0, len(ann) + 1) * self._per_ann)
        for a_no in np.flatnonzero(cuts[1:] > cuts[:-1]):
            recs[cuts[a_no]:cuts[a_no + 1]].tofile(ann[a_no])
        self.missing.extend((r[1], eid) for eid, r in refs.items() if eid not in seen)

    def annotations(self, block: int = 16_384) -> Iterator[tuple[int, int, bool]]:
        """``(k, stream number, first)`` per handling, in handling order (``k`` -1: not in the reference)."""
        for a_no, path in enumerate(self._ann_paths):
            recs = np.fromfile(path, dtype=np.int64).reshape(-1, 4)
            base = a_no * self._per_ann
            placed = np.empty((len(recs), 3), dtype=np.int64)
            placed[recs[:, 0] - base] = recs[:, 1:]
            del recs
            for s in range(0, len(placed), block):
                for k, sno, first in placed[s:s + block].tolist():
                    yield k, sno, bool(first)

    def close(self) -> None:
        """Remove the annotation files (the bucket files are removed as they are joined)."""
        for p in self._ann_paths:
            p.unlink(missing_ok=True)

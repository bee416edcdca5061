"""Sorted runs on disk: sort more ``(key, value)`` pairs than memory holds, then read them back merged.

Pairs (``key`` bytes, ``value`` a non-negative int) are kept in memory up to ``run_size``; then they
are sorted and written as one run to an anonymous temporary file (deleted when closed, even after a
crash). :meth:`SortedRuns.merged` yields every pair in ``(key, value)`` order, merging the runs
(``heapq.merge``) through small read buffers. Memory: ``run_size`` pairs plus one buffer per run;
disk: the pairs. This is what ``publish`` uses to compare sets of event ids that can be larger than
memory (the duplicate-id check of a file, the ids a log already holds): an exact answer, no filter
false positives, at O(n log n) time.
"""

from __future__ import annotations

import heapq
import struct
import tempfile
from collections.abc import Iterable, Iterator

__all__ = ["SortedRuns", "join_keys"]

_HEAD = struct.Struct("<IQ")  # key length, value
_BUFFER = 1 << 16


class SortedRuns:
    """A bag of ``(key, value)`` pairs, spilled to sorted runs on disk beyond ``run_size`` pairs."""

    def __init__(self, run_size: int = 200_000, directory: str | None = None) -> None:
        if run_size < 1:
            raise ValueError("run_size must be >= 1")
        self.run_size = run_size
        self.directory = directory
        self._pending: list[tuple[bytes, int]] = []
        self._runs: list[tempfile._TemporaryFileWrapper] = []  # type: ignore[type-arg]
        self.count = 0

    def add(self, key: bytes, value: int) -> None:
        self._pending.append((key, value))
        self.count += 1
        if len(self._pending) >= self.run_size:
            self._spill()

    def extend(self, pairs: Iterable[tuple[bytes, int]]) -> None:
        for key, value in pairs:
            self.add(key, value)

    @property
    def runs(self) -> int:
        """Runs written to disk so far."""
        return len(self._runs)

    def _spill(self) -> None:
        self._pending.sort()
        f = tempfile.TemporaryFile(dir=self.directory, prefix="chainfold-runs-", buffering=_BUFFER)
        pack = _HEAD.pack
        write = f.write
        for key, value in self._pending:
            write(pack(len(key), value))
            write(key)
        f.flush()
        self._runs.append(f)
        self._pending = []

    @staticmethod
    def _read_run(f: object) -> Iterator[tuple[bytes, int]]:
        """One run's pairs. A run is read by one iterator at a time (the file position is shared)."""
        f.seek(0)  # type: ignore[attr-defined]
        read = f.read  # type: ignore[attr-defined]
        size = _HEAD.size
        unpack = _HEAD.unpack
        while True:
            head = read(size)
            if len(head) < size:
                return
            n, value = unpack(head)
            yield read(n), value

    def merged(self) -> Iterator[tuple[bytes, int]]:
        """Every pair, in ``(key, value)`` order. Pairs added afterwards are not included."""
        self._pending.sort()
        if not self._runs:
            return iter(list(self._pending))
        return heapq.merge(*(self._read_run(f) for f in self._runs), iter(list(self._pending)))

    def close(self) -> None:
        for f in self._runs:
            f.close()
        self._runs = []
        self._pending = []

    def __enter__(self) -> "SortedRuns":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def join_keys(left: Iterator[tuple[bytes, int]], right: Iterator[tuple[bytes, int]]) -> Iterator[tuple[bytes, int]]:
    """The pairs of ``left`` whose key also occurs in ``right``; both sorted by key (merge join)."""
    r = next(right, None)
    for key, value in left:
        while r is not None and r[0] < key:
            r = next(right, None)
        if r is None:
            return
        if r[0] == key:
            yield key, value

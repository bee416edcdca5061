"""Where the tasks of a distributed replay run: the small interface the driver
(:mod:`chainfold.engines.distributed`) is written against, and its in-process implementation.

A :class:`Cluster` reads a plan's ranges in tasks and keeps the :class:`~chainfold.engines.tasks.Chunk`
each task made where it was made (:class:`Chunks`); the driver then asks for what it needs of them,
in the four shapes a replay has:

* ``collect(fn)`` / ``stream(fn)``: ``fn`` of every chunk, in range (log) order; ``stream`` hands
  them over a few at a time, so the driver's memory does not grow with the log;
* ``repeated(pairs, prior)``: a shuffle by key (event id): every key that occurs more than once among
  the chunks' keys and positions (``pairs(chunk)``: two columns) and the ``prior`` keys (position
  -1), with all its positions;
* ``fold(items, start, fold, groups)``: a shuffle by group (stream) into ``groups`` partitions,
  each partition's items sorted by group and position and handed to ``fold``; its results come
  back.

Implementations: :class:`InProcess` (here: every task in this process, one after the other; the
tests' and a debugging aid) and :class:`~chainfold.engines.spark.SparkCluster` (Apache Spark). The
shared contract suite (``tests/test_distributed.py``) runs the driver on both and compares every
output with the local engine's.
"""

from __future__ import annotations

import pickle
import zlib
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from typing import Any, Protocol, TypeVar

from .tasks import Chunk

__all__ = ["Cluster", "Chunks", "Shared", "InProcess", "group_of"]

T = TypeVar("T")


def group_of(key: str, groups: int) -> int:
    """The partition of the fold shuffle that folds ``key``'s group (CRC-32: the same everywhere)."""
    return zlib.crc32(key.encode("utf-8", "surrogatepass")) % groups


class Shared(Protocol):
    """A value sent once to every task that uses it (a Spark broadcast)."""

    @property
    def value(self) -> Any: ...


class Chunks(Protocol):
    """The chunks of one read, kept by the cluster until :meth:`release`."""

    def collect(self, fn: Callable[[Chunk], T]) -> list[T]: ...

    def stream(self, fn: Callable[[Chunk], T]) -> Iterator[T]: ...

    def repeated(self, pairs: Callable[[Chunk], tuple[Sequence[str], Sequence[int]]],
                 prior: Collection[str] = ()) -> list[tuple[str, tuple[int, ...]]]: ...

    def fold(self, items: Callable[[Chunk], Iterable[tuple[str, int, Any]]], start: Sequence[tuple[str, int, Any]],
             fold: Callable[[Iterator[tuple[str, int, Any]]], Iterator[T]], groups: int | None = None) -> list[T]: ...

    def release(self) -> None: ...


class Cluster(Protocol):
    """Runs tasks: ``read(tasks)`` runs each (a callable making one chunk, in plan order);
    ``share(value)`` sends a value to the tasks once; ``parallelism`` is how many run at a time."""

    @property
    def parallelism(self) -> int: ...

    def read(self, tasks: Sequence[Callable[[], Chunk]]) -> Chunks: ...

    def share(self, value: Any) -> Shared: ...


class _Value:
    def __init__(self, value: Any) -> None:
        self.value = value


def _travel(value: T) -> T:
    """``value`` after a trip through pickle, as it would reach another process."""
    return pickle.loads(pickle.dumps(value, protocol=5))


class _LocalChunks:
    def __init__(self, chunks: list[Chunk], groups: int) -> None:
        self._chunks = chunks
        self._groups = groups

    def collect(self, fn: Callable[[Chunk], T]) -> list[T]:
        return [_travel(fn(c)) for c in self._chunks]

    def stream(self, fn: Callable[[Chunk], T]) -> Iterator[T]:
        for c in self._chunks:
            yield _travel(fn(c))

    def repeated(self, pairs: Callable[[Chunk], tuple[Sequence[str], Sequence[int]]],
                 prior: Collection[str] = ()) -> list[tuple[str, tuple[int, ...]]]:
        seen: dict[str, list[int]] = {k: [-1] for k in prior}
        for c in self._chunks:
            ids, positions = pairs(c)
            for k, pos in zip(ids, positions):
                seen.setdefault(k, []).append(pos)
        return [(k, tuple(sorted(v))) for k, v in seen.items() if len(v) > 1]

    def fold(self, items: Callable[[Chunk], Iterable[tuple[str, int, Any]]], start: Sequence[tuple[str, int, Any]],
             fold: Callable[[Iterator[tuple[str, int, Any]]], Iterator[T]], groups: int | None = None) -> list[T]:
        n = groups or self._groups
        parts: list[list[tuple[str, int, Any]]] = [[] for _ in range(n)]
        for c in self._chunks:
            for it in items(c):
                parts[group_of(it[0], n)].append(_travel(it))
        for it in start:
            parts[group_of(it[0], n)].append(it)
        out: list[T] = []
        for part in parts:
            part.sort(key=lambda it: (it[0], it[1]))
            out.extend(_travel(r) for r in fold(iter(part)))
        return out

    def release(self) -> None:
        self._chunks = []


class InProcess:
    """A :class:`Cluster` in this process: tasks run one after the other; everything a task returns
    goes through pickle as it would between processes. ``groups`` is the number of fold partitions
    (several streams share one, as on a real cluster)."""

    def __init__(self, parallelism: int = 2, groups: int = 3) -> None:
        self._parallelism = parallelism
        self._groups = groups

    @property
    def parallelism(self) -> int:
        return self._parallelism

    def read(self, tasks: Sequence[Callable[[], Chunk]]) -> Chunks:
        return _LocalChunks([_travel(t()) for t in tasks], self._groups)

    def share(self, value: Any) -> Shared:
        return _Value(value)

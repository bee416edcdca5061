"""The memory of exactly-once replay: which event ids were already folded.

The decode stage (:class:`~chainfold.replay.decode.Decoder`) asks a :class:`SeenIds` about every
well-formed event, a batch at a time, so each event id is folded once, at its first entry.
:class:`SeenSet` keeps the ids in a Python set (memory grows with the distinct ids: about 100 bytes
each); an index that keeps a bounded part in memory and spills the rest to disk implements the same
protocol and plugs in without touching the stages.

How a snapshot stores the ids (the snapshot sink's hook): the sink calls :meth:`SeenIds.checkpoint`
once per snapshot and stores what it returns. Snapshots (format 2) store the manifest of a
:class:`~chainfold.replay.dedup.DedupIndex`: the immutable pieces beside the snapshots that hold
the ids, so a snapshot costs what changed since the previous one, not the whole history; a rebuild
from a snapshot opens the index of that manifest again (:mod:`chainfold.store.dedup_folder`).
:class:`SeenSet` is the index in memory, for library use and tests (its checkpoint is a frozenset of
every id: it cannot be stored in a snapshot).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

__all__ = ["SeenIds", "SeenSet"]


@runtime_checkable
class SeenIds(Protocol):
    """The event ids folded so far, asked in batches.

    Contract:

    * ``add_new(ids)`` returns one bool per id, in order: True when the id was never seen before
      (it is recorded now), False when it was (a duplicate), including an id that occurs earlier
      in the same batch. Never a false True (a duplicate folded twice), never a false False (a new
      event dropped).
    * ``len()`` is the number of distinct ids recorded.
    * ``checkpoint()`` is what a snapshot stores so that a rebuild from it knows these ids
      (:class:`chainfold.replay.dedup.DedupIndex`: the manifest of its immutable pieces; a
      :class:`SeenSet`: a frozenset of every id). Called between batches; it must not change what
      the index answers.
    """

    def add_new(self, ids: Sequence[str]) -> list[bool]: ...

    def __len__(self) -> int: ...

    def checkpoint(self) -> Any: ...


class SeenSet:
    """:class:`SeenIds` in memory: a set of the ids (about 100 bytes each)."""

    __slots__ = ("ids",)

    def __init__(self, ids: Iterable[str] = ()) -> None:
        self.ids: set[str] = set(ids)

    def add_new(self, ids: Sequence[str]) -> list[bool]:
        s = self.ids
        seen, add = s.__contains__, s.add
        # one comprehension, no call per id but the set's own: `add` returns None, so a new id
        # gives `not None` == True after being added
        return [False if seen(i) else not add(i) for i in ids]

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, event_id: object) -> bool:
        return event_id in self.ids

    def __iter__(self) -> Iterator[str]:
        return iter(self.ids)

    def checkpoint(self) -> frozenset[str]:
        return frozenset(self.ids)


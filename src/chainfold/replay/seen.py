"""The memory of exactly-once replay: which event ids were already folded.

The decode stage (:class:`~chainfold.replay.decode.Decoder`) asks a :class:`SeenIds` about every
well-formed event, a batch at a time, so each event id is folded once, at its first entry.
:class:`SeenSet` keeps the ids in a Python set (memory grows with the distinct ids: about 100 bytes
each); an index that keeps a bounded part in memory and spills the rest to disk implements the same
protocol and plugs in without touching the stages.

How a snapshot stores the ids (the snapshot sink's hook): the sink calls :meth:`SeenIds.checkpoint`
once per snapshot and stores what it returns as the snapshot's ``seen``; a rebuild that starts from
that snapshot makes its index from the stored value again with :func:`restore`. Snapshot format 1
stores every id (a sorted list: :class:`SeenSet`); an index that stores immutable pieces beside the
snapshots returns a description of them instead (with a snapshot format of its own), and
:func:`restore` learns to tell that description apart.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

__all__ = ["SeenIds", "SeenSet", "restore"]


@runtime_checkable
class SeenIds(Protocol):
    """The event ids folded so far, asked in batches.

    Contract:

    * ``add_new(ids)`` returns one bool per id, in order: True when the id was never seen before
      (it is recorded now), False when it was (a duplicate), including an id that occurs earlier
      in the same batch. Never a false True (a duplicate folded twice), never a false False (a new
      event dropped).
    * ``len()`` is the number of distinct ids recorded.
    * ``checkpoint()`` is what a snapshot stores so that a rebuild from it knows these ids (format
      1: a frozenset of every id; :class:`chainfold.replay.dedup.DedupIndex`: the manifest of its
      immutable pieces). Called by the snapshot sink only, between batches; it must not change what
      the index answers.
    """

    def add_new(self, ids: Sequence[str]) -> list[bool]: ...

    def __len__(self) -> int: ...

    def checkpoint(self) -> Any: ...


class SeenSet:
    """:class:`SeenIds` in memory: a set of the ids (snapshot format 1 stores them all)."""

    __slots__ = ("ids",)

    def __init__(self, ids: Iterable[str] = ()) -> None:
        self.ids: set[str] = set(ids)

    @classmethod
    def from_snapshot(cls, stored: Iterable[str]) -> SeenSet:
        """The index of a snapshot's ``seen`` (what :meth:`checkpoint` returned when it was taken)."""
        return cls(stored)

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


def restore(stored: object) -> SeenIds:
    """The index of the ids a snapshot stored (what :meth:`SeenIds.checkpoint` returned when it was
    taken). Format 1 stores the ids themselves: a :class:`SeenSet`. (A snapshot format that stores
    a :class:`~chainfold.replay.dedup.DedupIndex` manifest restores it with ``DedupIndex.open``
    in the snapshots' folder: the next step of the history-scale work.)"""
    return SeenSet.from_snapshot(stored)  # type: ignore[arg-type]

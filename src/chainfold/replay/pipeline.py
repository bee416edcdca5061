"""One pass over a partition: the stages wired together.

    source (log/source.py) → hash (hashing/stage.py) → decode + dedup (replay/decode.py)
                           → fold (replay/fold.py)     → snapshots (store/sink.py, from a stop)

:func:`run_pass` drives the source's batches through whichever stages a command needs (verify:
hash only; rebuild: all; the parallel engine's readers and fold workers: some), and pauses between
batches at exact entry counts (:class:`Stops`) for what must see a consistent state of every stage:
progress, periodic snapshots, the chain state at a snapshot's position.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

from ..hashing.stage import HashStage
from ..log import Entry
from .decode import Decoded, Decoder
from .fold import FoldStage

__all__ = ["Stops", "run_pass", "Hook"]

Hook = Callable[[int, Entry], None]
"""``hook(entries read in this pass, the last of them)``."""


class _Tap(Protocol):
    def __call__(self, decoded: Decoded, leaves: list[bytes] | None) -> None: ...


class Stops:
    """Where a pass pauses: after every ``n`` entries (:meth:`every`) and after exactly ``count``
    entries (:meth:`at`), counted from the start of the pass. Hooks run between batches, when
    every stage has taken exactly that many entries."""

    def __init__(self) -> None:
        self._every: list[tuple[int, Hook]] = []
        self._at: dict[int, list[Hook]] = {}

    def every(self, n: int, hook: Hook) -> Stops:
        if n > 0:
            self._every.append((n, hook))
        return self

    def at(self, count: int, hook: Hook) -> Stops:
        if count > 0:
            self._at.setdefault(count, []).append(hook)
        return self

    def next_after(self, n: int) -> int:
        """The next count after ``n`` with something to do (-1: none)."""
        cands = [(n // k + 1) * k for k, _ in self._every]
        cands += [c for c in self._at if c > n]
        return min(cands) if cands else -1

    def reached(self, n: int, last: Entry) -> None:
        for c in (self._at.get(n) or ()):
            c(n, last)
        for k, hook in self._every:
            if not n % k:
                hook(n, last)


def run_pass(batches: Iterable[list[Entry]], *, start: int, hasher: HashStage | None = None,
             forward: Callable[[list[Entry], int], None] | None = None, decoder: Decoder | None = None,
             fold: FoldStage | None = None, tap: _Tap | None = None, stops: Stops | None = None) -> int:
    """Feed every batch through the stages given, in order: hash; ``forward(entries, log index of
    the first)`` (to stages in other processes: the parallel engine's router); decode, giving its
    result (and the batch's leaf hashes) to ``tap`` and then to ``fold``. ``start`` is the log index of the first entry (stages
    name entries by index). Batches are cut at the ``stops`` so that hooks see exact counts.
    Returns the number of entries read."""
    n = 0
    next_stop = stops.next_after(0) if stops is not None else -1
    for batch in batches:
        while batch:
            part = batch
            if 0 < next_stop < n + len(batch):
                part, batch = batch[: next_stop - n], batch[next_stop - n:]
            else:
                batch = []
            leaves = hasher.feed(part) if hasher is not None else None
            if forward is not None:
                forward(part, start + n)
            if decoder is not None:
                decoded = decoder.feed(part, start + n)
                if tap is not None:
                    tap(decoded, leaves)
                if fold is not None:
                    fold.feed(decoded)
            n += len(part)
            if n == next_stop:
                assert stops is not None
                stops.reached(n, part[-1])
                next_stop = stops.next_after(n)
    return n

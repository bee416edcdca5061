"""The snapshot sink: where a replay's snapshots are written.

A :class:`SnapshotSink` turns the state of a replay (the fold stage's states, the decode stage's
seen ids, each partition's chain position) into a :class:`~chainfold.store.snapshots.Snapshot` in
the topic's :class:`~chainfold.store.snapshots.SnapshotStore`: every N entries from a stop of the
pass, and once at the end.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

from ..errors import InvalidArgument
from ..hashing.chain import ChainBuilder
from ..replay.decode import Decoder, SeqGaps
from ..replay.fold import FoldStage
from .snapshots import PartitionPosition, Snapshot, SnapshotStore

__all__ = ["SnapshotSink"]


class SnapshotSink:
    """Snapshot sink of one replay of ``partitions`` (see the module doc).

    Contract: :meth:`take` writes one snapshot covering, for each partition, the position given
    for it (the one being replayed), else the position :meth:`done` recorded for it, else where the
    replay started (``start``'s position, or nothing). States go through ``model.dump_state``; the
    seen ids are the manifest :meth:`~chainfold.replay.dedup.DedupIndex.checkpoint` returns (the
    decode stage's index must be a writer of the store's dedup folder), and once the snapshot is
    written the pieces no remaining snapshot names are collected; ``stats`` count the malformed and
    duplicated entries since the start of the log (those still in the decoder's lists, plus
    :attr:`forgotten`: what a long-running replay reported and then dropped from them, so it keeps
    no list that grows with the log); the fold stage's policy and the events it skipped (since the
    start of the log: it resumed with the start's) go with them; ``seqs`` (the seq check, if any) is
    stored so that a rebuild from the snapshot continues it. :attr:`written` lists the paths. The
    caller makes the hash record durable first (a snapshot is checked against it).
    """

    def __init__(self, store: SnapshotStore, fold: FoldStage, decoder: Decoder, partitions: list[str],
                 segment_size: int, start: Snapshot | None = None, *, seqs: SeqGaps | None = None) -> None:
        self.store = store
        self.fold = fold
        self.decoder = decoder
        self.seqs = seqs
        self.partitions = partitions
        self.segment_size = segment_size
        self.start = start
        self.positions: dict[str, PartitionPosition] = {p.partition: p for p in start.partitions} if start else {}
        self.entries = start.entries if start is not None else 0  # covered by the last snapshot
        self.written: list[str] = []
        self.forgotten = {"malformed": 0, "duplicates": 0}

    def done(self, position: PartitionPosition) -> None:
        """Partition ``position.partition`` was replayed to ``position``."""
        self.positions[position.partition] = position

    def covered(self) -> int:
        """Entries covered by the positions recorded with :meth:`done` (and the start's)."""
        return sum(p.entries for p in self.positions.values())

    def take(self, current: PartitionPosition | None = None) -> Path:
        """Write a snapshot now (``current``: the position of the partition being replayed)."""
        positions = dict(self.positions)
        if current is not None:
            positions[current.partition] = current
        empty = ChainBuilder(self.segment_size).state()
        ordered = tuple(positions.get(p) or PartitionPosition(p, 0, None, empty) for p in self.partitions)
        base = self.start.stats if self.start is not None else {}
        model = self.fold.model
        seen = self.decoder.seen
        manifest = seen.checkpoint()
        if not isinstance(manifest, Mapping):
            raise InvalidArgument("a snapshot stores a dedup index manifest: the decode stage's SeenIds must be "
                                  f"a DedupIndex (in the store's dedup folder), not {type(seen).__name__}")
        snap = Snapshot(
            topic=self.store.topic,
            partitions=ordered,
            model_name=model.name,
            model_fingerprint=model.fingerprint,
            segment_size=self.segment_size,
            states={s: model.dump_state(v) for s, v in self.fold.states.items()},
            dedup=manifest,
            created=int(time.time() * 1000),
            stats={"malformed": len(self.decoder.malformed) + self.forgotten["malformed"] + base.get("malformed", 0),
                   "duplicates": len(self.decoder.duplicates) + self.forgotten["duplicates"]
                   + base.get("duplicates", 0)},
            on_model_error=self.fold.on_error,
            skipped=tuple(self.fold.skipped),
            **({"seqs": self.seqs.state()} if self.seqs is not None else {}),
        )
        path = self.store.write(snap)
        collect = getattr(seen, "collect_garbage", None)
        if collect is not None:  # pieces no snapshot left names any more (pruned ones')
            collect(self.store.manifests())
        self.entries = snap.entries
        self.written.append(str(path))
        return path

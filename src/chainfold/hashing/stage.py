"""The hash stage: where hashes are made.

:class:`HashStage` takes one partition's entries in log order (batches from the source stage) and
computes the chained checkpoints of docs/formats.md: leaves → segment roots → heads, in O(log n) hashes
held (:class:`~chainfold.hashing.chain.ChainBuilder`). Each completed segment is compared with the
checkpoint recorded for it earlier (:class:`~chainfold.hashing.record.RecordCheck`), and while the
log agrees with its record, segments not recorded before are recorded
(:class:`~chainfold.hashing.record.RecordWriter`), so later runs can tell whether the log changed
underneath them. :func:`leaf_hashes` is the one place entries' leaf hashes are computed.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ..errors import SegmentSizeMismatch
from ..log import Entry, EventLog, Position
from ..log.source import Source, Span
from .chain import ChainBuilder, Checkpoint
from .record import Mismatch, PartitionRecord, RecordCheck, RecordWriter, open_record

__all__ = ["DEFAULT_SEGMENT_SIZE", "leaf_hashes", "HashStage", "PartitionScan", "topic_head", "positions_at"]

log = logging.getLogger("chainfold.hashing.stage")

DEFAULT_SEGMENT_SIZE = 1024

_sha256 = hashlib.sha256


def leaf_hashes(entries: Iterable[Entry]) -> list[bytes]:
    """The RFC 9162 leaf hash of each entry's payload, SHA-256(0x00 || payload), in order."""
    sha = _sha256
    return [sha(b"\x00" + e.payload).digest() for e in entries]


@dataclass
class PartitionScan:
    """What a pass over one partition found: the chain at its end, the checkpoints of the segments
    it completed, the record it was compared with, the first mismatch, and what was read."""

    partition: str
    chain: ChainBuilder
    checkpoints: list[Checkpoint] = field(default_factory=list)
    recorded: list[Checkpoint] = field(default_factory=list)
    mismatch: Mismatch | None = None
    last: Position | None = None
    redelivered: int = 0
    read: int = 0
    recorded_new: int = 0
    record_error: str | None = None
    probed: dict[int, dict] = field(default_factory=dict)

    @property
    def entries(self) -> int:
        return self.chain.size

    @property
    def segments(self) -> int:
        s = self.chain.segment_size
        return (self.chain.size + s - 1) // s

    @property
    def head(self) -> bytes:
        """Head over the whole partition: the provisional head when the last segment is partial."""
        p = self.chain.pending()
        return p.head if p is not None else self.chain.head

    def all_checkpoints(self) -> list[Checkpoint]:
        """The completed segments' checkpoints and the provisional one of the partial segment."""
        p = self.chain.pending()
        return self.checkpoints + ([p] if p is not None else [])


def topic_head(scans: list[PartitionScan]) -> bytes:
    """The log's head: the partition's head, or for a partitioned topic a digest over the
    partitions' sizes and heads in partition order: SHA-256(0x03 || (uint64_be(n_p) || head_p)...)."""
    if len(scans) == 1:
        return scans[0].head
    h = _sha256(b"\x03")
    for s in scans:
        h.update(s.entries.to_bytes(8, "big") + s.head)
    return h.digest()


class HashStage:
    """Hash stage of one partition (see the module doc).

    Contract: :meth:`feed` every entry from the chain's position on, in log order; completed
    segments are checked against the record as they complete (the first mismatch is kept) and,
    while there is none and ``write`` is set, recorded. :meth:`flush` makes what was recorded so
    far durable (before a snapshot refers to it); :meth:`finish` checks the partial last segment,
    notices recorded entries that are gone, records the provisional checkpoint and returns the
    :class:`PartitionScan`. Build it with :meth:`open`.
    """

    def __init__(self, partition: str, chain: ChainBuilder, *, record: PartitionRecord | None = None,
                 recorded: list[Checkpoint] | None = None, write: bool = True,
                 segment: tuple[list[bytes], list[Entry]] = ([], []), record_error: str | None = None) -> None:
        self.chain = chain
        recorded = recorded or []
        self.scan = PartitionScan(partition, chain, recorded=recorded, record_error=record_error)
        self.check = RecordCheck(record, recorded, chain.segment_size)
        self.writer = RecordWriter(record, recorded, chain.segment_size) if record is not None and write else None
        self.start = chain.size
        # the current segment's leaves and entries: to check it against the record when it ends,
        # to record its leaves, and to name a mismatching entry
        self.seg_leaves, self.seg_entries = segment

    @classmethod
    def open(cls, elog: EventLog, partition: str, *, record: PartitionRecord | None = None,
             chain: ChainBuilder | None = None, segment_size: int = DEFAULT_SEGMENT_SIZE,
             write: bool = True) -> HashStage:
        """The stage for ``partition``, continuing ``chain`` (a snapshot's) or from the start.

        The segment size is the record's when there is one (a snapshot chain with another one is
        refused: :class:`~chainfold.errors.SegmentSizeMismatch`). A corrupt record is neither
        trusted nor extended (``record_error`` says why). When resuming inside a segment, its first
        part is read again so the segment is complete (and checked) again; if those entries
        changed or are gone, nothing is recorded.
        """
        recorded, record_error = open_record(record)
        if record_error is not None:
            write = False
        if recorded:
            if chain is not None and chain.segment_size != recorded[0].segment_size:
                raise SegmentSizeMismatch("snapshot chain and recorded checkpoints", chain.segment_size,
                                          recorded[0].segment_size)
            segment_size = recorded[0].segment_size
        if chain is None:
            chain = ChainBuilder(segment_size)
        segment = _reread_segment(elog, partition, chain)
        if segment is None:
            write = False
            segment = ([], [])
        return cls(partition, chain, record=record, recorded=recorded, write=write, segment=segment,
                   record_error=record_error)

    def feed(self, entries: Sequence[Entry]) -> list[bytes]:
        """Hash the next entries (any number), closing and checking the segments they complete;
        their leaf hashes."""
        chain = self.chain
        i, n = 0, len(entries)
        out: list[bytes] = []
        while i < n:
            chunk = entries[i : i + chain.room()] if i or n > chain.room() else entries
            leaves = leaf_hashes(chunk)
            self.seg_leaves.extend(leaves)
            self.seg_entries.extend(chunk)
            # message ids are made for the chunk's ends only (two per segment or batch)
            cp = chain.add_leaves(leaves, chunk[0].message_id, chunk[-1].message_id)
            if cp is not None:
                self._close(cp)
            out = leaves if not out else out + leaves
            i += len(chunk)
        return out

    def _close(self, cp: Checkpoint) -> None:
        self.scan.checkpoints.append(cp)
        self.check.segment(cp, self.seg_leaves, self.seg_entries)
        if self.writer is not None and self.check.mismatch is None:
            self.writer.add(cp, self.seg_leaves)
        self.seg_leaves = []
        self.seg_entries = []

    def flush(self) -> None:
        """Make the segments recorded so far durable."""
        if self.writer is not None:
            self.writer.flush()

    def finish(self, source: Source | None = None, *, read_to_end: bool = True) -> PartitionScan:
        """End of the pass: the partial segment, gone entries, the provisional record; the scan.
        ``source`` (the stage's source) gives what was read; ``read_to_end`` is false for a pass
        told to stop early."""
        scan = self.scan
        if source is not None:
            scan.read, scan.last, scan.redelivered = source.read, source.last, source.redelivered
        self.check.end(self.chain.size, self.seg_leaves, self.seg_entries, read_to_end)
        scan.mismatch = self.check.mismatch
        if self.writer is not None:
            self.writer.flush()
            pending = self.chain.pending()
            if scan.mismatch is None and pending is not None:
                self.writer.provisional(pending, self.seg_leaves)
            scan.recorded_new = self.writer.written
        return scan


def _reread_segment(elog: EventLog, partition: str, chain: ChainBuilder) -> tuple[list[bytes], list[Entry]] | None:
    """The leaves and entries of the current segment before ``chain``'s position (read again from
    the log: a snapshot stores the chain, not the entries); None if the log no longer holds them
    as they were."""
    offset = chain.size % chain.segment_size
    if not offset:
        return [], []
    first = chain.state()["first"]
    entries: list[Entry] = []
    if first is not None:
        for batch in Source(elog, Span(partition, start=elog.position(first), limit=offset)):
            entries.extend(batch)
    leaves = leaf_hashes(entries)
    again = ChainBuilder(chain.segment_size)
    if leaves:
        again.add_leaves(leaves)
    if len(entries) != offset or again.state()["segment_frontier"] != chain.state()["segment_frontier"]:
        log.warning("%s: entries before the snapshot position in segment %d changed or are gone",
                    partition, chain.size // chain.segment_size)
        return None
    return leaves, entries


def positions_at(elog: EventLog, scan: PartitionScan, indexes: Iterable[int]) -> dict[int, Position]:
    """The positions of the entries at log ``indexes`` of ``scan``'s partition, read again from
    the log: one read, from the first entry of the segment that holds the lowest index (its
    position is in the scan's checkpoints). Indexes that cannot be reached are left out. (Replay
    stages name entries by index where keeping every position would cost memory per entry.)"""
    wanted = sorted(set(indexes))
    if not wanted:
        return {}
    S = scan.chain.segment_size
    firsts = {cp.segment: cp.first for cp in scan.all_checkpoints() if cp.first is not None}
    k = wanted[0] // S
    first = firsts.get(k)
    if first is None:
        return {}
    out: dict[int, Position] = {}
    pos = k * S
    todo = set(wanted)
    span = Span(scan.partition, start=elog.position(first), limit=wanted[-1] - pos + 1)
    for batch in Source(elog, span):
        for e in batch:
            if pos in todo:
                out[pos] = e.message_id
            pos += 1
    return out

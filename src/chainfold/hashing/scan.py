"""One pass over the log: hash every entry, check it against what was recorded, fold it.

Every command that reads the log (verify, rebuild, reconcile, bench) goes through
:func:`scan_partition`. For one partition it

* computes the chained checkpoints (docs/formats.md) as entries stream past (O(log n) hashes held),
* compares each completed segment with the checkpoint recorded for it earlier
  (:class:`PartitionRecord`), and on the first difference locates the first differing entry,
* records checkpoints (and leaf hashes) of segments not recorded before, so later runs can tell
  whether the log changed underneath them,
* feeds the entries to a :class:`~chainfold.replay.fold.Folder` when one is given.

A partition's record lives in the topic's folder of the snapshot store:
``checkpoints[-pN].jsonl`` (+ ``.partial``), and ``leaves[-pN].bin`` (32-byte leaf hashes in log
order), which lets verify name the exact first entry that differs from what was recorded.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .chain import ChainBuilder, Checkpoint, find_divergence
from .checkpoints import CheckpointFile
from ..envelope import decode
from ..errors import CheckpointCorrupt, MalformedEnvelope
from ..replay.fold import Folder
from ..log import Entry, EventLog, MessageId, partition_index

__all__ = ["PartitionRecord", "Mismatch", "PartitionScan", "scan_partition", "topic_head", "DEFAULT_SEGMENT_SIZE"]

log = logging.getLogger("chainfold.hashing.scan")

DEFAULT_SEGMENT_SIZE = 1024
_HASH = 32


def _suffix(partition: str) -> str:
    i = partition_index(partition)
    return "" if i < 0 else f"-p{i}"


class PartitionRecord:
    """What chainfold recorded about one partition: checkpoints and leaf hashes, as files."""

    def __init__(self, directory: str | os.PathLike[str], partition: str) -> None:
        self.dir = Path(directory)
        self.partition = partition
        sfx = _suffix(partition)
        self.checkpoints = CheckpointFile(self.dir / f"checkpoints{sfx}.jsonl")
        self.leaves_path = self.dir / f"leaves{sfx}.bin"

    def load(self) -> list[Checkpoint]:
        """Recorded checkpoints: full segments, then at most one provisional one.

        Raises :class:`CheckpointCorrupt` (with the path) when the record cannot be trusted.
        """
        return self.checkpoints.load_all()

    def leaves(self, start: int, count: int) -> list[bytes] | None:
        """Recorded leaf hashes of entries ``start .. start+count-1``, or None if not all recorded."""
        try:
            with open(self.leaves_path, "rb") as f:
                f.seek(start * _HASH)
                data = f.read(count * _HASH)
        except OSError:
            return None
        if len(data) != count * _HASH:
            return None
        return [data[i : i + _HASH] for i in range(0, len(data), _HASH)]

    def write_leaves(self, start: int, leaves: list[bytes]) -> None:
        """Write leaf hashes from entry ``start`` on, replacing anything recorded past it."""
        self.dir.mkdir(parents=True, exist_ok=True)
        mode = "r+b" if self.leaves_path.exists() else "wb"
        with open(self.leaves_path, mode) as f:
            size = f.seek(0, os.SEEK_END)
            if size < start * _HASH:
                return  # a gap: leaves before ``start`` were never recorded; keep what is there
            f.seek(start * _HASH)
            f.write(b"".join(leaves))
            f.truncate()
            f.flush()
            os.fsync(f.fileno())

    def reset(self) -> None:
        """Forget everything recorded (``verify --reset`` after a legitimate rewrite of the log)."""
        for p in (self.checkpoints.path, Path(str(self.checkpoints.path) + ".partial"), self.leaves_path):
            try:
                p.unlink()
            except FileNotFoundError:
                pass


@dataclass(frozen=True)
class Mismatch:
    """The first entry where the log differs from a reference (recorded checkpoints, another log)."""

    index: int
    segment: int
    message_id: str | None
    event_id: str | None
    reason: str
    comparisons: int = 0

    def to_json(self) -> dict:
        return {"index": self.index, "segment": self.segment, "message_id": self.message_id,
                "event_id": self.event_id}


@dataclass
class PartitionScan:
    """The outcome of scanning one partition."""

    partition: str
    chain: ChainBuilder
    checkpoints: list[Checkpoint] = field(default_factory=list)
    recorded: list[Checkpoint] = field(default_factory=list)
    mismatch: Mismatch | None = None
    last: MessageId | None = None
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


def topic_head(scans: list[PartitionScan]) -> bytes:
    """The log's head: the partition's head, or for a partitioned topic a digest over the
    partitions' sizes and heads in partition order: SHA-256(0x03 || (uint64_be(n_p) || head_p)...)."""
    if len(scans) == 1:
        return scans[0].head
    h = hashlib.sha256(b"\x03")
    for s in scans:
        h.update(s.entries.to_bytes(8, "big") + s.head)
    return h.digest()


_RECORD_BATCH = 64  # segments recorded per write + fsync


class _Segments:
    """The current segment while scanning: its leaf hashes and entries, and the chain they go into
    (read by :meth:`chainfold.replay.fold.Folder.feed`, which hashes and folds in one loop)."""

    __slots__ = ("chain", "leaves", "entries", "close_segment", "lazy_ids")

    def __init__(self, chain: ChainBuilder) -> None:
        self.chain = chain
        self.leaves: list[bytes] = []
        self.entries: list[Entry] = []
        self.close_segment: Callable[[Checkpoint], None] = lambda cp: None
        self.lazy_ids = False  # entries' str() is their message id (cheaper than .message_id)


def _hash_only(reader: Iterable[Entry], seg: _Segments, next_stop: int,
               on_stop: Callable[[int, Entry], int]) -> None:
    """The scan without a fold: hash every entry into ``seg``."""
    sha = hashlib.sha256
    add_leaf = seg.chain.add_leaf
    leaves_add = seg.leaves.append
    entries_add = seg.entries.append
    close_segment = seg.close_segment
    lazy = seg.lazy_ids
    n = 0
    for e in reader:
        leaf = sha(b"\x00" + e.payload).digest()
        leaves_add(leaf)
        entries_add(e)
        cp = add_leaf(leaf, e if lazy else e.message_id)
        if cp is not None:
            close_segment(cp)
        n += 1
        if n == next_stop:
            next_stop = on_stop(n, e)


def _event_id(payload: bytes) -> str | None:
    try:
        return decode(payload).id
    except MalformedEnvelope:
        return None


def scan_partition(
    elog: EventLog,
    partition: str,
    *,
    record: PartitionRecord | None = None,
    chain: ChainBuilder | None = None,
    after: MessageId | None = None,
    folder: Folder | None = None,
    segment_size: int = DEFAULT_SEGMENT_SIZE,
    until: MessageId | None = None,
    until_time: int | None = None,
    write_record: bool = True,
    probes: list[int] | None = None,
    every: tuple[int, Callable[[ChainBuilder, MessageId], None]] | None = None,
    trace: Callable[[int, Entry, object], object] | None = None,
    on_progress: Callable[[int], None] | None = None,
    progress_every: int = 16384,
) -> PartitionScan:
    """Scan one partition from the start (or from ``chain``'s position, after ``after``).

    ``chain`` resumes the hash chain of a snapshot whose last covered entry is ``after``. With a
    ``record``, completed segments are compared with the recorded checkpoints and, while the log
    agrees with them and ``write_record`` is set, new segments are recorded. A
    :class:`CheckpointCorrupt` record is reported in ``record_error`` and neither trusted nor
    extended. ``probes`` lists partition sizes at which to capture ``chain.state()`` into
    ``PartitionScan.probed`` (to check snapshots' recorded chain states against the log).
    ``every=(N, hook)`` calls ``hook(chain, last message id)`` after every N entries, once the fold
    has applied them (rebuild takes its periodic snapshots there).
    """
    recorded: list[Checkpoint] = []
    record_error = None
    if record is not None:
        try:
            recorded = record.load()
        except CheckpointCorrupt as exc:
            record_error = str(exc)
            write_record = False
            log.warning("%s", exc)
    if recorded:
        segment_size = recorded[0].segment_size
    if chain is None:
        chain = ChainBuilder(segment_size)
        after = None
    elif recorded and chain.segment_size != segment_size:
        raise ValueError("snapshot chain and recorded checkpoints use different segment sizes")
    S = chain.segment_size
    scan = PartitionScan(partition, chain, recorded=recorded, record_error=record_error)
    full_recorded = [c for c in recorded if c.full]
    n_full_recorded = len(full_recorded)

    # The current segment's entries (for leaves and for naming a mismatching entry). When resuming
    # inside a segment, re-read its first part so the segment is complete (and checked) again.
    seg = _Segments(chain)
    seg_entries = seg.entries
    seg_leaves = seg.leaves
    offset = chain.size % S
    if offset:
        st = chain.state()
        first = st.get("first")
        refill = ChainBuilder(S)
        if first is not None:
            for e in elog.read(partition, start=MessageId.parse(first), limit=offset):
                seg_entries.append(e)
                seg_leaves.append(hashlib.sha256(b"\x00" + e.payload).digest())
                refill.add_leaf(seg_leaves[-1], e.message_id)
        if len(seg_entries) != offset or refill.state()["segment_frontier"] != st["segment_frontier"]:
            log.warning("%s: entries before the snapshot position in segment %d changed or are gone",
                        partition, chain.size // S)
            seg_entries.clear()
            seg_leaves.clear()
            write_record = False

    cps = scan.checkpoints
    mismatch: Mismatch | None = None
    n_file = n_full_recorded  # full segments in the checkpoint file
    # Segments to record, written (and fsynced) together every _RECORD_BATCH segments.
    unwritten_cps: list[Checkpoint] = []
    unwritten_leaves: list[bytes] = []

    def name(index: int, k: int, ents: list[Entry], reason: str, comparisons: int) -> Mismatch:
        j = index - k * S
        if 0 <= j < len(ents):
            e = ents[j]
            return Mismatch(index, k, str(e.message_id), _event_id(e.payload), reason, comparisons)
        return Mismatch(index, k, None, None, reason, comparisons)

    def first_difference(k: int, leaves: list[bytes], ents: list[Entry], reason: str) -> Mismatch:
        """First entry of segment k whose leaf differs from the recorded one (linear in one segment;
        used where no full checkpoint exists on both sides)."""
        rec = recorded[k]
        rec_leaves = record.leaves(k * S, rec.size - k * S) if record is not None else None
        index = k * S
        if rec_leaves is None:
            return name(index, k, ents, reason + " (recorded leaves unavailable: naming the segment)", 0)
        i = 0
        while i < len(leaves) and i < len(rec_leaves) and leaves[i] == rec_leaves[i]:
            i += 1
        return name(index + i, k, ents, reason, i + 1)

    def locate(k: int, cp: Checkpoint, leaves: list[bytes], ents: list[Entry]) -> Mismatch:
        """First differing entry in full segment k, by descending the two segment trees."""
        reason = f"segment {k} differs from the checkpoint recorded for it"
        rec = recorded[k]
        rec_leaves = record.leaves(k * S, S) if record is not None else None
        if rec_leaves is None or len(leaves) != S:
            return first_difference(k, leaves, ents, reason)
        try:
            d = find_divergence(recorded[: k + 1], recorded[:k] + [cp], lambda _k: rec_leaves, lambda _k: leaves)
        except ValueError:  # recorded leaves disagree with their own checkpoint: not trustworthy
            return name(k * S, k, ents, reason + " (recorded leaves do not match their checkpoint)", 0)
        if d is None:
            return name(k * S, k, ents, reason, 0)
        assert rec.head != cp.head
        return name(d.index, k, ents, reason, d.comparisons)

    def flush_record() -> None:
        nonlocal n_file
        if unwritten_cps and record is not None:
            record.write_leaves(unwritten_cps[0].segment * S, unwritten_leaves)
            record.checkpoints.append(unwritten_cps)
            n_file += len(unwritten_cps)
            scan.recorded_new += len(unwritten_cps)
        unwritten_cps.clear()
        unwritten_leaves.clear()

    def close_segment(cp: Checkpoint) -> None:
        nonlocal mismatch
        k = cp.segment
        cps.append(cp)
        if mismatch is None and k < len(recorded):
            rec = recorded[k]
            if rec.full:
                if rec.head != cp.head:
                    mismatch = locate(k, cp, seg_leaves, seg_entries)
            else:  # a provisional record of this segment: what it covered must be a prefix
                m = first_difference(k, seg_leaves, seg_entries, f"segment {k} differs from the provisional checkpoint recorded for it")
                if m.index < rec.size:
                    mismatch = m
        if write_record and mismatch is None and record is not None and k == n_file + len(unwritten_cps):
            unwritten_cps.append(cp)
            unwritten_leaves.extend(seg_leaves)
            if len(unwritten_cps) >= _RECORD_BATCH:
                flush_record()
        seg_leaves.clear()
        seg_entries.clear()

    seg.close_segment = close_segment

    # What happens between entries, at given counts: progress, probes, periodic hooks.
    start_size = chain.size
    every_n, every_hook = every if every is not None else (0, None)
    pending_probes = sorted(p - start_size for p in set(probes or ()) if p > start_size)
    if probes and start_size in probes:
        scan.probed[start_size] = chain.state()
    report_every = progress_every if on_progress is not None else 0

    def next_stop_after(n: int) -> int:
        cands = [c for c in (
            (n // report_every + 1) * report_every if report_every else 0,
            (n // every_n + 1) * every_n if every_n else 0,
            pending_probes[0] if pending_probes else 0,
        ) if c > n]
        return min(cands) if cands else -1

    def on_stop(n: int, e: Entry) -> int:
        while pending_probes and pending_probes[0] <= n:
            if pending_probes.pop(0) == n:
                scan.probed[start_size + n] = chain.state()
        if report_every and not n % report_every:
            on_progress(n)  # type: ignore[misc]
        if every_n and not n % every_n:
            flush_record()
            every_hook(chain, e.message_id)  # type: ignore[misc]
        return next_stop_after(n)

    reader = elog.read(partition, after=after, until=until, until_time=until_time)
    seg.lazy_ids = bool(getattr(reader, "lazy_ids", False))
    try:
        if folder is not None:
            folder.index = chain.size  # indexes in reports are positions in this partition
            folder.feed(reader, trace=trace, hasher=seg, stops=(next_stop_after(0), on_stop))
        else:
            _hash_only(reader, seg, next_stop_after(0), on_stop)
    finally:
        n = chain.size - start_size
        scan.redelivered = reader.redelivered
        scan.read = n
        if reader.last is not None:
            scan.last = reader.last
        flush_record()
        if on_progress is not None:
            on_progress(n)

    if seg.lazy_ids:  # the chain holds the last entries as their ids: keep just the text
        chain = scan.chain = ChainBuilder.from_state(chain.state())

    # The end of the log: check the partial segment, and notice recorded entries that are gone.
    size = chain.size
    pend = chain.pending()
    k = size // S
    if mismatch is None and recorded and k < len(recorded):
        rec = recorded[k]
        m = first_difference(k, seg_leaves, seg_entries,
                             f"segment {k} differs from the checkpoint recorded for it")
        if m.index < min(size, rec.size):
            mismatch = m
        elif until is None and until_time is None and (size < rec.size or len(recorded) > k + 1):
            # (a scan told to stop early did not read to the end: what follows is not gone)
            mismatch = Mismatch(size, k, None, None, f"entries recorded earlier are gone (log ends at {size})",
                                m.comparisons)
    scan.mismatch = mismatch
    if write_record and mismatch is None and record is not None and pend is not None:
        k = pend.segment
        if k == n_file and len(seg_leaves) == pend.size - k * S and (not recorded or recorded[-1].size <= pend.size):
            record.write_leaves(k * S, seg_leaves)
            record.checkpoints.write_provisional(pend)
    return scan

"""What chainfold recorded about a partition's hashes, and how the log is checked against it.

A partition's record lives in the topic's folder of the snapshot store: ``checkpoints[-pN].jsonl``
(+ ``.partial``, a :class:`~chainfold.hashing.checkpoints.CheckpointFile`) and ``leaves[-pN].bin``
(32-byte leaf hashes in log order), which lets verify name the exact first entry that differs
from what was recorded. :class:`RecordCheck` compares segments with it as the hash stage
completes them; :class:`RecordWriter` extends it with segments not recorded before.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..envelope import decode
from ..errors import CheckpointCorrupt, MalformedEnvelope, RootMismatch
from ..log import Entry, partition_index
from .chain import Checkpoint, first_difference_in_segment
from .checkpoints import CheckpointFile

__all__ = ["PartitionRecord", "Mismatch", "RecordCheck", "RecordWriter", "open_record"]

log = logging.getLogger("chainfold.hashing.record")

_HASH = 32
_RECORD_BATCH = 64  # segments recorded per write + fsync


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
        for p in (self.checkpoints.path, self.checkpoints.partial_path, self.leaves_path):
            p.unlink(missing_ok=True)


def open_record(record: PartitionRecord | None) -> tuple[list[Checkpoint], str | None]:
    """The recorded checkpoints, or ``([], why)`` when the record is corrupt: then it is neither
    trusted nor extended (the caller reports ``why``)."""
    if record is None:
        return [], None
    try:
        return record.load(), None
    except CheckpointCorrupt as exc:
        log.warning("%s", exc)
        return [], str(exc)


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


def _event_id(payload: bytes) -> str | None:
    try:
        return decode(payload).id
    except MalformedEnvelope:
        return None


def name_entry(index: int, segment: int, entries: Sequence[Entry], first_index: int, reason: str,
               comparisons: int = 0) -> Mismatch:
    """The mismatch at ``index``, naming its entry when ``entries`` (starting at log index
    ``first_index``) hold it."""
    j = index - first_index
    if 0 <= j < len(entries) and entries[j] is not None:  # None: a lost entry known by its recorded leaf
        e = entries[j]
        return Mismatch(index, segment, str(e.message_id), _event_id(e.payload), reason, comparisons)
    return Mismatch(index, segment, None, None, reason, comparisons)


class RecordCheck:
    """Compares a partition's segments with the checkpoints ``recorded`` for it (and the recorded
    leaf hashes in ``record``, to name the exact entry); holds the first mismatch found."""

    def __init__(self, record: PartitionRecord | None, recorded: list[Checkpoint], segment_size: int) -> None:
        self.record = record
        self.recorded = recorded
        self.S = segment_size
        self.mismatch: Mismatch | None = None

    def _first_difference(self, k: int, leaves: list[bytes], entries: Sequence[Entry], reason: str) -> Mismatch:
        """First entry of segment k whose leaf differs from the recorded one (linear in one segment;
        used where no full checkpoint exists on both sides)."""
        S = self.S
        rec = self.recorded[k]
        rec_leaves = self.record.leaves(k * S, rec.size - k * S) if self.record is not None else None
        if rec_leaves is None:
            return name_entry(k * S, k, entries, k * S, reason + " (recorded leaves unavailable: naming the segment)")
        i = 0
        while i < len(leaves) and i < len(rec_leaves) and leaves[i] == rec_leaves[i]:
            i += 1
        return name_entry(k * S + i, k, entries, k * S, reason, i + 1)

    def _locate(self, cp: Checkpoint, leaves: list[bytes], entries: Sequence[Entry]) -> Mismatch:
        """First differing entry in full segment ``cp.segment``, by descending the two segment trees."""
        k, S = cp.segment, self.S
        reason = f"segment {k} differs from the checkpoint recorded for it"
        rec_leaves = self.record.leaves(k * S, S) if self.record is not None else None
        if rec_leaves is None or len(leaves) != S:
            return self._first_difference(k, leaves, entries, reason)
        try:
            index, comparisons = first_difference_in_segment(self.recorded[k], cp, rec_leaves, leaves)
        except RootMismatch:  # recorded leaves disagree with their own checkpoint: not trustworthy
            return name_entry(k * S, k, entries, k * S, reason + " (recorded leaves do not match their checkpoint)")
        return name_entry(index, k, entries, k * S, reason, comparisons)

    def segment(self, cp: Checkpoint, leaves: list[bytes], entries: Sequence[Entry]) -> None:
        """Check completed segment ``cp`` (its ``leaves`` and ``entries``) against the record."""
        k = cp.segment
        if self.mismatch is not None or k >= len(self.recorded):
            return
        rec = self.recorded[k]
        if rec.full:
            if rec.head != cp.head:
                self.mismatch = self._locate(cp, leaves, entries)
        else:  # a provisional record of this segment: what it covered must be a prefix
            m = self._first_difference(k, leaves, entries,
                                       f"segment {k} differs from the provisional checkpoint recorded for it")
            if m.index < rec.size:
                self.mismatch = m

    def end(self, size: int, leaves: list[bytes], entries: Sequence[Entry], read_to_end: bool) -> None:
        """At the end of the log (``size`` entries, the partial segment's ``leaves`` and
        ``entries``): check the partial segment, and notice recorded entries that are gone (only
        when the pass ``read_to_end``: one told to stop early did not see what follows)."""
        k = size // self.S
        if self.mismatch is not None or not self.recorded or k >= len(self.recorded):
            return
        rec = self.recorded[k]
        m = self._first_difference(k, leaves, entries, f"segment {k} differs from the checkpoint recorded for it")
        if m.index < min(size, rec.size):
            self.mismatch = m
        elif read_to_end and (size < rec.size or len(self.recorded) > k + 1):
            self.mismatch = Mismatch(size, k, None, None, f"entries recorded earlier are gone (log ends at {size})",
                                     m.comparisons)


class RecordWriter:
    """Extends a partition's record with the segments that follow the recorded full ones: their
    checkpoints and leaf hashes, written (and fsynced) together every ``_RECORD_BATCH`` segments
    and on :meth:`flush`; :meth:`provisional` records the partial segment at the end."""

    def __init__(self, record: PartitionRecord, recorded: list[Checkpoint], segment_size: int) -> None:
        self.record = record
        self.recorded = recorded
        self.S = segment_size
        self.in_file = sum(1 for c in recorded if c.full)  # full segments in the checkpoint file
        self.written = 0
        self._cps: list[Checkpoint] = []
        self._leaves: list[bytes] = []

    def add(self, cp: Checkpoint, leaves: list[bytes]) -> None:
        """Record full segment ``cp`` if it is the next one the file lacks."""
        if cp.segment != self.in_file + len(self._cps):
            return
        self._cps.append(cp)
        self._leaves.extend(leaves)
        if len(self._cps) >= _RECORD_BATCH:
            self.flush()

    def flush(self) -> None:
        """Write the segments added so far, durably."""
        if self._cps:
            self.record.write_leaves(self._cps[0].segment * self.S, self._leaves)
            self.record.checkpoints.append(self._cps)
            self.in_file += len(self._cps)
            self.written += len(self._cps)
        self._cps.clear()
        self._leaves.clear()

    def provisional(self, pending: Checkpoint, leaves: list[bytes]) -> None:
        """Record the provisional checkpoint of the partial last segment (with its ``leaves``),
        if it follows the recorded full segments and covers at least what was recorded before."""
        self.flush()
        k = pending.segment
        if k == self.in_file and len(leaves) == pending.size - k * self.S and (
                not self.recorded or self.recorded[-1].size <= pending.size):
            self.record.write_leaves(k * self.S, leaves)
            self.record.checkpoints.write_provisional(pending)

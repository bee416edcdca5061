"""``rebuild``: fold the log from the newest valid snapshot, so cost grows with the tail.

A snapshot is used only if its checksum holds, it was taken with the same model code, and its
recorded chain agrees with the checkpoints recorded for the log at its position (and the log
still holds the entry it ends at). Each rejected snapshot is reported with its reason and the next
older one is tried. While folding, a snapshot is taken every ``snapshot_every`` entries and at the
end; a model error stops the rebuild before any snapshot past the failing entry.

When the log no longer holds its beginning (retention, a lost ledger), a valid snapshot at or after
the loss is used and the report says that earlier history could not be re-verified; without one the
rebuild fails with :class:`~chainfold.errors.HistoryUnrecoverable`, naming the gap.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import merkle
from ..hashing.chain import ChainBuilder, Checkpoint
from ..errors import CheckpointCorrupt, HistoryUnrecoverable, SnapshotRejected
from ..replay.fold import Folder, Model
from ..log import EventLog, MessageId
from ..hashing.scan import DEFAULT_SEGMENT_SIZE, PartitionRecord, PartitionScan, scan_partition, topic_head
from ..store.snapshots import PartitionPosition, Snapshot, SnapshotStore, topic_dir

__all__ = ["RebuildResult", "rebuild", "DEFAULT_SNAPSHOT_EVERY"]

log = logging.getLogger("chainfold.ops.rebuild")

DEFAULT_SNAPSHOT_EVERY = 100_000


@dataclass
class RebuildResult:
    """What a rebuild did. ``folder.states`` are the rebuilt states; ``to_json()`` is its report."""

    topic: str
    model: Model
    folder: Folder
    scans: list[PartitionScan] = field(default_factory=list)
    snapshot: Snapshot | None = None
    snapshot_path: str | None = None
    rejected: list[tuple[str, str]] = field(default_factory=list)
    written: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    workers: int = 1
    worker_peak_rss: list[int] = field(default_factory=list)
    """Peak resident memory (bytes) of each worker process, when rebuilt in parallel."""

    @property
    def from_snapshot(self) -> int | None:
        return self.snapshot.entries if self.snapshot is not None else None

    def to_json(self) -> dict[str, Any]:
        f = self.folder
        return {
            "topic": self.topic,
            "model": self.model.name,
            "log": {
                "events": sum(s.entries for s in self.scans),
                "segments": sum(s.segments for s in self.scans),
                "head": topic_head(self.scans).hex() if self.scans else None,
            },
            "snapshot": None if self.snapshot is None else {
                "path": self.snapshot_path, "entries": self.snapshot.entries,
            },
            "rejected_snapshots": [{"path": p, "reason": r} for p, r in self.rejected],
            "replayed": {"from_snapshot": self.from_snapshot, "events": sum(s.read for s in self.scans)},
            "applied": f.applied,
            "streams": len(f.states),
            "malformed": [{"message_id": m.message_id, "index": m.index, "reason": m.reason} for m in f.malformed],
            "duplicates": [{"event_id": d.event_id, "message_id": d.message_id, "index": d.index}
                           for d in f.duplicates],
            "log_mismatch": next((dict(s.mismatch.to_json(), reason=s.mismatch.reason, partition=s.partition)
                                  for s in self.scans if s.mismatch), None),
            "snapshots_written": self.written,
            "redeliveries_dropped": sum(s.redelivered for s in self.scans),
            "notes": self.notes,
            "seconds": round(self.seconds, 3),
            **({"workers": self.workers} if self.workers > 1 else {}),
        }


def _check_against_record(pos: PartitionPosition, recorded: list[Checkpoint], record: PartitionRecord) -> str | None:
    """Why the snapshot's chain at ``pos`` disagrees with the recorded checkpoints, or None."""
    if not recorded:
        return None
    st = pos.chain
    S = st["segment_size"]
    if recorded[0].segment_size != S:
        return f"segment size {S} differs from the recorded {recorded[0].segment_size}"
    n = pos.entries
    k = n // S
    if k > 0 and k - 1 < len(recorded):
        rec = recorded[k - 1]
        if rec.full and rec.head != st["head"]:
            return f"its chain head at segment {k - 1} disagrees with the log's recorded checkpoint"
    if n % S and k < len(recorded) and recorded[k].size >= n:
        leaves = record.leaves(k * S, n - k * S)
        if leaves is not None:
            b = ChainBuilder(S)
            for leaf in leaves:
                b.add_leaf(leaf)
            if b.state()["segment_frontier"] != list(st["segment_frontier"]):
                return f"its chain inside segment {k} disagrees with the log's recorded leaves"
    return None


def _earliest(elog: EventLog, part: str) -> MessageId | None:
    for e in elog.read(part, limit=1):
        return e.message_id
    return None


def _holds(elog: EventLog, part: str, mid: MessageId, leaf: bytes | None) -> bool:
    """Does the log still hold entry ``mid`` (with the payload whose leaf hash is ``leaf``)?"""
    for e in elog.read(part, start=mid, limit=1):
        if e.message_id.position != mid.position:
            return False
        return leaf is None or hashlib.sha256(b"\x00" + e.payload).digest() == leaf
    return False


def _remaining_agrees(elog: EventLog, part: str, recorded: list[Checkpoint], earliest: MessageId | None) -> bool | None:
    """Does what the log still holds agree with what was recorded for it?

    Checks the first recorded full segment that starts at or after the log's earliest entry: the
    log must still hold it with the recorded root. None when no recorded segment lets us tell.
    """
    if earliest is None:
        return None
    for cp in recorded:
        if cp.first is None:
            continue
        first = MessageId.parse(cp.first)
        if first.position < earliest.position:
            continue
        count = cp.size - cp.segment * cp.segment_size  # a provisional checkpoint covers a prefix
        leaves = []
        for e in elog.read(part, start=first, limit=count):
            if not leaves and e.message_id.position != first.position:
                return False
            leaves.append(merkle.leaf_hash(e.payload))
        return len(leaves) == count and merkle.root(leaves) == cp.root
    return None


def _prepare(
    elog: EventLog,
    model: Model,
    *,
    snapshots_root: Path,
    full: bool = False,
    until: MessageId | None = None,
    until_time: int | None = None,
    snapshot_every: int = DEFAULT_SNAPSHOT_EVERY,
    keep: int = 3,
    write_snapshots: bool = True,
    segment_size: int = DEFAULT_SEGMENT_SIZE,
    streams: frozenset[str] | None = None,
    max_snapshot_entries: int | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> _Replay:
    """Everything :func:`rebuild` decides before folding: records, the snapshot to start from
    (or why each was rejected), lost history."""
    t0 = time.monotonic()
    parts = elog.partitions()
    tdir = topic_dir(snapshots_root, elog.topic)
    records = {p: PartitionRecord(tdir, p) for p in parts}
    recorded: dict[str, list[Checkpoint]] = {}
    notes: list[str] = []
    for p, rec in records.items():
        try:
            recorded[p] = rec.load()
        except CheckpointCorrupt as exc:
            recorded[p] = []
            notes.append(f"{exc}; not trusted (run `chainfold verify --reset` to re-record)")
    seg = next((r[0].segment_size for r in recorded.values() if r), segment_size)
    store = SnapshotStore(snapshots_root, elog.topic, keep=keep)
    folder = Folder(model, streams=streams)
    result = RebuildResult(elog.topic, model, folder, notes=notes)
    partial_fold = streams is not None
    if until is not None or until_time is not None or partial_fold:
        write_snapshots = False

    # History that is gone: the log now starts after where the record says it started.
    earliest = {p: _earliest(elog, p) for p in parts}
    gaps: dict[str, str] = {}
    rewritten: set[str] = set()
    for p in parts:
        rec = recorded[p]
        if rec and rec[0].first is not None:
            first = MessageId.parse(rec[0].first)
            e = earliest[p]
            if e is None or e.position > first.position:
                if _remaining_agrees(elog, p, rec, e) is False:
                    # not lost history: the log now holds other entries than the ones recorded
                    rewritten.add(p)
                    notes.append(f"{p}: the log no longer matches its recorded checkpoints (rewritten?)")
                else:
                    gaps[p] = f"{p}: the log now starts at {e} but entry 0 was {first} when recorded"

    chosen: Snapshot | None = None
    passed_over: set[str] = set()  # snapshots past where this replay must start: expected, not faults
    if not full and until_time is None:
        for info, cand in store.candidates(model):
            path = str(info.path)
            if isinstance(cand, SnapshotRejected):
                result.rejected.append((path, cand.reason))
                continue
            reason = None
            if [pos.partition for pos in cand.partitions] != parts:
                reason = f"taken of partitions {[pos.partition for pos in cand.partitions]}, the log has {parts}"
            elif max_snapshot_entries is not None and cand.entries > max_snapshot_entries:
                reason = f"covers {cand.entries} entries, past the replay start {max_snapshot_entries}"
                passed_over.add(path)
            else:
                for pos in cand.partitions:
                    reason = _check_against_record(pos, recorded[pos.partition], records[pos.partition])
                    if reason:
                        break
                    if pos.message_id is None:
                        if pos.entries:
                            reason = "no message id recorded for its position"
                            break
                        continue
                    mid = MessageId.parse(pos.message_id)
                    if until is not None and mid.position > until.position:
                        reason = f"covers entries past --until {until}"
                        passed_over.add(path)
                        break
                    e = earliest[pos.partition]
                    if e is not None and e.position <= mid.position and not _holds(
                            elog, pos.partition, mid, pos.chain.get("last_leaf")):
                        reason = f"the log no longer holds entry {mid} as it was when the snapshot was taken"
                        break
                    if (e is None or e.position > mid.position) and pos.partition in rewritten:
                        reason = "the log was rewritten after the snapshot's position"
                        break
                    if e is None or e.position > mid.position:
                        notes.append(f"{pos.partition}: the log starts after the snapshot's position ({mid}); "
                                     "entries between may be gone")
            if reason:
                result.rejected.append((path, reason))
                continue
            chosen = cand
            result.snapshot_path = path
            break
    for path, reason in result.rejected:
        # passed over by request (a replay that must start before a given entry, --until) is
        # expected, not a problem with the snapshot: logged quietly; anything else stays a warning
        expected = path in passed_over
        log.log(logging.INFO if expected else logging.WARNING, "snapshot %s %s: %s", path,
                "not used" if expected else "rejected", reason)

    if gaps:
        covered = chosen is not None and all(
            pos.message_id is not None and earliest[pos.partition] is not None
            and earliest[pos.partition].position <= MessageId.parse(pos.message_id).position
            or pos.partition not in gaps
            for pos in chosen.partitions
        )
        if chosen is None or not covered:
            raise HistoryUnrecoverable(
                "history is gone and no valid snapshot covers the gap: " + "; ".join(gaps.values())
            )
        notes.append("entries before the snapshot are gone from the log: earlier history could not be "
                     "re-verified (" + "; ".join(gaps.values()) + ")")

    positions: dict[str, PartitionPosition] = {}
    if chosen is not None:
        result.snapshot = chosen
        folder.states = {s: model.load_state(v) for s, v in chosen.states.items()}
        if partial_fold:
            folder.states = {s: v for s, v in folder.states.items() if s in streams}
        folder.seen = set(chosen.seen)
        folder.index = chosen.entries
        positions = {pos.partition: pos for pos in chosen.partitions}
        log.info("using snapshot %s (%d entries)", result.snapshot_path, chosen.entries)

    return _Replay(
        t0=t0, elog=elog, model=model, parts=parts, records=records, seg=seg, store=store, folder=folder,
        result=result, chosen=chosen, positions=positions, write_snapshots=write_snapshots,
        snapshot_every=snapshot_every, until=until, until_time=until_time, on_progress=on_progress,
    )


@dataclass
class _Replay:
    """A rebuild between deciding where to start and the end: what folding needs, and the final
    snapshot. :func:`rebuild` folds serially; :func:`chainfold.engines.parallel.parallel_rebuild` in
    worker processes."""

    t0: float
    elog: EventLog
    model: Model
    parts: list[str]
    records: dict[str, PartitionRecord]
    seg: int
    store: SnapshotStore
    folder: Folder
    result: RebuildResult
    chosen: Snapshot | None
    positions: dict[str, PartitionPosition]
    write_snapshots: bool
    snapshot_every: int
    until: MessageId | None
    until_time: int | None
    on_progress: Callable[[int], None] | None
    done_positions: dict[str, PartitionPosition] = field(default_factory=dict)
    last_total: int = 0

    def __post_init__(self) -> None:
        self.done_positions = dict(self.positions)
        self.last_total = self.chosen.entries if self.chosen is not None else 0

    def take_snapshot(self, current: str, chain: ChainBuilder, last: MessageId | None) -> None:
        """Write a snapshot of the folder's states, ``current`` being at ``chain`` after ``last``."""
        folder, model, chosen, seg = self.folder, self.model, self.chosen, self.seg
        cur = dict(self.done_positions)
        st = chain.state()
        cur[current] = PartitionPosition(current, chain.size, str(last) if last is not None else None, st)
        ordered = tuple(cur.get(p) or PartitionPosition(p, 0, None, ChainBuilder(seg).state()) for p in self.parts)
        snap = Snapshot(
            topic=self.elog.topic,
            partitions=ordered,
            model_name=model.name,
            model_fingerprint=model.fingerprint,
            segment_size=seg,
            states={s: model.dump_state(v) for s, v in folder.states.items()},
            seen=frozenset(folder.seen),
            created=int(time.time() * 1000),
            stats={"malformed": len(folder.malformed) + (chosen.stats.get("malformed", 0) if chosen else 0),
                   "duplicates": len(folder.duplicates) + (chosen.stats.get("duplicates", 0) if chosen else 0)},
        )
        path = self.store.write(snap)
        self.last_total = snap.entries
        self.result.written.append(str(path))

    def start_of(self, p: str) -> tuple[ChainBuilder | None, MessageId | None]:
        """Where folding partition ``p`` starts: the snapshot's chain and last message id, or nothing."""
        pos = self.positions.get(p)
        chain = ChainBuilder.from_state(pos.chain) if pos is not None and pos.entries else None
        after = MessageId.parse(pos.message_id) if pos is not None and pos.message_id else None
        return chain, after

    def scanned(self, p: str, scan: PartitionScan) -> None:
        """Record that partition ``p`` was folded to the end of ``scan``."""
        pos = self.positions.get(p)
        self.result.scans.append(scan)
        self.done_positions[p] = PartitionPosition(
            p, scan.chain.size, str(scan.last) if scan.last is not None else (pos.message_id if pos else None),
            scan.chain.state(),
        )
        if scan.mismatch is not None:
            self.result.notes.append(
                f"{p}: the log differs from its recorded checkpoints at entry {scan.mismatch.index} "
                f"({scan.mismatch.reason}); run `chainfold verify` for details")

    def fold_serially(self) -> None:
        """Fold partition by partition, snapshotting every ``snapshot_every`` entries."""
        progress_base = 0
        on_progress = self.on_progress
        for p in self.parts:
            chain, after = self.start_of(p)
            base = progress_base

            def progress(n: int, base: int = base) -> None:
                if on_progress is not None:
                    on_progress(base + n)

            hook = None
            if self.write_snapshots and self.snapshot_every > 0:
                def hook(chain: ChainBuilder, last: MessageId, p: str = p) -> None:
                    self.take_snapshot(p, chain, last)

            scan = scan_partition(
                self.elog, p, record=self.records[p], chain=chain, after=after, folder=self.folder,
                segment_size=self.seg, until=self.until, until_time=self.until_time, on_progress=progress,
                every=(self.snapshot_every, hook) if hook is not None else None,
                write_record=self.until is None and self.until_time is None,
            )
            self.scanned(p, scan)
            progress_base += scan.read

    def finish(self) -> RebuildResult:
        """The snapshot at the end (unless the last periodic one is there already), and the result."""
        scans = self.result.scans
        total = sum(pos.entries for pos in self.done_positions.values())
        if self.write_snapshots and sum(s.read for s in scans) > 0 and total != self.last_total:
            ordered_last = self.parts[-1]
            last_scan = scans[-1]
            last_mid = self.done_positions[ordered_last].message_id
            self.take_snapshot(ordered_last, last_scan.chain, last_scan.last or (
                MessageId.parse(last_mid) if last_mid else None))
        self.result.seconds = time.monotonic() - self.t0
        return self.result


def rebuild(
    elog: EventLog,
    model: Model,
    *,
    snapshots_root: Path,
    full: bool = False,
    until: MessageId | None = None,
    until_time: int | None = None,
    snapshot_every: int = DEFAULT_SNAPSHOT_EVERY,
    keep: int = 3,
    write_snapshots: bool = True,
    segment_size: int = DEFAULT_SEGMENT_SIZE,
    streams: frozenset[str] | None = None,
    max_snapshot_entries: int | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> RebuildResult:
    """Rebuild the states of ``elog`` with ``model``; see the module docstring.

    ``streams`` restricts folding to those streams (targeted repair); snapshots are then neither
    written nor required to be complete for other streams. ``max_snapshot_entries`` ignores
    snapshots covering more entries (repair replays from before a divergence).
    """
    replay = _prepare(
        elog, model, snapshots_root=snapshots_root, full=full, until=until, until_time=until_time,
        snapshot_every=snapshot_every, keep=keep, write_snapshots=write_snapshots,
        segment_size=segment_size, streams=streams, max_snapshot_entries=max_snapshot_entries,
        on_progress=on_progress,
    )
    replay.fold_serially()
    return replay.finish()


def states_digest(states: dict[str, Any]) -> str:
    """A short digest of rendered states, for comparing two rebuilds by eye."""
    import json

    return hashlib.sha256(json.dumps(states, sort_keys=True).encode()).hexdigest()[:16]

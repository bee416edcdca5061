"""``rebuild``: fold the log from the newest valid snapshot, so cost grows with the tail.

A snapshot is used only if its checksum holds, it was taken with the same model code, and its
recorded chain agrees with the checkpoints recorded for the log at its position (and the log
still holds the entry it ends at). Each rejected snapshot is reported with its reason and the next
older one is tried. While folding, a snapshot is taken every ``snapshot_every`` entries and at the
end.

What a model error does is ``on_model_error`` (replay/fold.py): ``stop`` ends the rebuild with
:class:`~chainfold.errors.ModelError` before any snapshot or state past the failing entry;
``skip-event`` and ``skip-stream`` fold on, list what they left out in the result's ``skipped``,
and record it in every snapshot taken. A snapshot that skipped events starts only a rebuild under
its own policy (any other rejects it with the reason).

When the log no longer holds its beginning (retention, a lost ledger), a valid snapshot at or after
the loss is used and the report says that earlier history could not be re-verified; without one the
rebuild fails with :class:`~chainfold.errors.HistoryUnrecoverable`, naming the gap (unless
``allow_partial_history``: then the log is folded from where it starts now). Every stream's ``seq``
is checked for gaps on the way (:mod:`chainfold.ops.history`); the result's ``history`` says what
was found, and :meth:`History.problem` whether the rebuild must not count as done.

The work is in three steps any engine reuses: :func:`plan_rebuild` (records, lost history, the
snapshot to start from), a :class:`RebuildRun` (the stages, folding partition by partition, the
snapshot sink) and :meth:`RebuildRun.finish` (the final snapshot and the result).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .. import merkle
from ..errors import DedupIndexBusy, HistoryUnrecoverable, SnapshotRejected
from ..hashing.chain import ChainBuilder, Checkpoint
from ..hashing.record import PartitionRecord, open_record
from ..hashing.stage import DEFAULT_SEGMENT_SIZE, HashStage, PartitionScan, leaf_hashes, topic_head
from ..log import Entry, EventLog, MessageId, Position
from ..log.source import Source, Span
from ..replay.decode import SeqGaps
from ..replay.fold import Folder, OnModelError, check_policy
from ..replay.model import Model
from ..replay.dedup import DEFAULT_MEMORY_BYTES, DedupIndex
from ..replay.pipeline import Stops, run_pass
from ..store.sink import SnapshotSink
from ..store.snapshots import PartitionPosition, Snapshot, SnapshotStore, topic_dir
from .history import REWRITTEN, History, Truncation, earliest as _earliest, locate_truncation, shifted_stage

__all__ = ["RebuildOptions", "RebuildResult", "RebuildPlan", "RebuildRun", "plan_rebuild", "rebuild", "run_plan",
           "DEFAULT_SNAPSHOT_EVERY"]

log = logging.getLogger("chainfold.ops.rebuild")

DEFAULT_SNAPSHOT_EVERY = 100_000
PROGRESS_EVERY = 16384


@dataclass(frozen=True)
class RebuildOptions:
    """How to rebuild: one record for every engine (serial, processes, Spark).

    ``snapshots_root`` holds the snapshots and the log's recorded checkpoints. ``full`` ignores
    snapshots. ``until`` (a position, inclusive) or ``until_time`` (ms) stop early: then nothing is
    recorded and no snapshot written. ``snapshot_every`` entries a snapshot is taken (0: only at the
    end), ``keep`` are kept, none with ``write_snapshots=False``. ``segment_size`` is for a log with
    nothing recorded. ``streams`` folds only those streams (targeted repair: no snapshots written);
    ``max_snapshot_entries`` ignores snapshots covering more entries (repair replays from before a
    divergence). ``on_model_error`` is what a model error does (``stop``, ``skip-event``,
    ``skip-stream``; see the module doc). ``dedup_memory`` bounds the bytes of event ids the dedup
    index keeps in memory (per process) before it spills them beside the snapshots.
    divergence). ``allow_partial_history``: the log is known to start mid-history (a truncation no
    snapshot covers is folded from where the log starts now; seq gaps are accepted).
    ``prefer_full``: from the start of the log unless it lost entries, then from the newest valid
    snapshot that covers the loss (reconcile's reference).
    """

    snapshots_root: Path
    full: bool = False
    until: Position | None = None
    until_time: int | None = None
    snapshot_every: int = DEFAULT_SNAPSHOT_EVERY
    keep: int = 3
    write_snapshots: bool = True
    segment_size: int = DEFAULT_SEGMENT_SIZE
    streams: frozenset[str] | None = None
    max_snapshot_entries: int | None = None
    on_model_error: OnModelError = "stop"
    dedup_memory: int = DEFAULT_MEMORY_BYTES
    allow_partial_history: bool = False
    prefer_full: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "snapshots_root", Path(self.snapshots_root))
        check_policy(self.on_model_error)

    @classmethod
    def of(cls, options: RebuildOptions | None = None, **changes: Any) -> RebuildOptions:
        """``options`` with ``changes`` (keyword fields), or new options from the keywords alone."""
        if options is None:
            return cls(**changes)
        return replace(options, **changes) if changes else options

    @property
    def bounded(self) -> bool:
        """Whether the rebuild stops before the end of the log."""
        return self.until is not None or self.until_time is not None

    @property
    def takes_snapshots(self) -> bool:
        return self.write_snapshots and not self.bounded and self.streams is None


OPTION_NAMES = frozenset(f.name for f in fields(RebuildOptions))


@dataclass
class RebuildResult:
    """What a rebuild did. ``folder.states`` are the rebuilt states; ``to_json()`` is its report.
    Where it started and what it decided before folding is its :class:`RebuildPlan`."""

    plan: RebuildPlan
    folder: Folder
    scans: list[PartitionScan] = field(default_factory=list)
    written: list[str] = field(default_factory=list)
    seconds: float = 0.0
    workers: int = 1
    worker_peak_rss: list[int] = field(default_factory=list)
    """Peak resident memory (bytes) of each worker process, when rebuilt in parallel."""

    @property
    def topic(self) -> str:
        return self.plan.elog.topic

    @property
    def model(self) -> Model:
        return self.plan.model

    @property
    def snapshot(self) -> Snapshot | None:
        """The snapshot the rebuild started from (None: the start of the log)."""
        return self.plan.snapshot

    @property
    def snapshot_path(self) -> str | None:
        return self.plan.snapshot_path

    @property
    def rejected(self) -> list[tuple[str, str]]:
        """The snapshots not used, and why."""
        return self.plan.rejected

    @property
    def notes(self) -> list[str]:
        return self.plan.notes

    @property
    def from_snapshot(self) -> int | None:
        return self.snapshot.entries if self.snapshot is not None else None

    @property
    def history(self) -> History:
        """What the rebuild found about the log's history (truncations, seq gaps)."""
        return History(self.folder.seqs, self.plan.truncations, self.plan.options.allow_partial_history)

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
            "on_model_error": self.plan.options.on_model_error,
            "skipped": [k.to_json() for k in f.skipped],
            "malformed": [{"message_id": m.message_id, "index": m.index, "reason": m.reason} for m in f.malformed],
            "duplicates": [{"event_id": d.event_id, "message_id": d.message_id, "index": d.index}
                           for d in f.duplicates],
            "log_mismatch": next((dict(s.mismatch.to_json(), reason=s.mismatch.reason, partition=s.partition)
                                  for s in self.scans if s.mismatch), None),
            "snapshots_written": self.written,
            "redeliveries_dropped": sum(s.redelivered for s in self.scans),
            **self.history.to_json(),
            "notes": self.notes + self.history.notes(),
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
            b.add_leaves(leaves)
            if b.state()["segment_frontier"] != list(st["segment_frontier"]):
                return f"its chain inside segment {k} disagrees with the log's recorded leaves"
    return None


def _read(elog: EventLog, span: Span) -> list[Entry]:
    return [e for batch in Source(elog, span) for e in batch]


def _holds(elog: EventLog, part: str, pos: Position, leaf: bytes | None) -> bool:
    """Does the log still hold the entry at ``pos`` (with the payload whose leaf hash is ``leaf``)?"""
    found = _read(elog, Span(part, start=pos, limit=1))
    if not found or found[0].message_id != pos:
        return False
    return leaf is None or leaf_hashes(found) == [leaf]


@dataclass
class RebuildPlan:
    """What a rebuild decides before folding: the partitions' records, the snapshot it starts
    from (``snapshot``, or None: the start of the log), what was rejected and why, and notes."""

    elog: EventLog
    model: Model
    options: RebuildOptions
    parts: list[str]
    records: dict[str, PartitionRecord]
    recorded: dict[str, list[Checkpoint]]
    segment_size: int
    store: SnapshotStore
    notes: list[str] = field(default_factory=list)
    snapshot: Snapshot | None = None
    snapshot_path: str | None = None
    rejected: list[tuple[str, str]] = field(default_factory=list)
    passed_over: set[str] = field(default_factory=set)
    """Rejected snapshots that are past where this replay must start: expected, not faults."""
    truncations: list[Truncation] = field(default_factory=list)
    """Partitions that lost recorded entries (and the snapshot that covers each, if one does)."""
    started: float = field(default_factory=time.monotonic)

    def truncation(self, partition: str) -> Truncation | None:
        return next((t for t in self.truncations if t.partition == partition), None)


def plan_rebuild(elog: EventLog, model: Model, options: RebuildOptions) -> RebuildPlan:
    """Load the records, notice lost or rewritten history, choose the snapshot to start from."""
    parts = elog.partitions()
    tdir = topic_dir(options.snapshots_root, elog.topic)
    records = {p: PartitionRecord(tdir, p) for p in parts}
    recorded: dict[str, list[Checkpoint]] = {}
    notes: list[str] = []
    for p, rec in records.items():
        recorded[p], error = open_record(rec)
        if error is not None:
            notes.append(f"{error}; not trusted (run `chainfold verify --reset` to re-record)")
    seg = next((r[0].segment_size for r in recorded.values() if r), options.segment_size)
    plan = RebuildPlan(elog, model, options, parts, records, recorded, seg,
                       SnapshotStore(options.snapshots_root, elog.topic, keep=options.keep), notes)
    earliest = {p: _earliest(elog, p) for p in parts}
    gaps, rewritten = _lost_history(plan, earliest)
    if not options.full and options.until_time is None and (gaps or not options.prefer_full):
        _choose_snapshot(plan, earliest, rewritten)
    for path, reason in plan.rejected:
        # passed over by request (a replay that must start before a given entry, --until) is
        # expected, not a problem with the snapshot: logged quietly; anything else stays a warning
        expected = path in plan.passed_over
        log.log(logging.INFO if expected else logging.WARNING, "snapshot %s %s: %s", path,
                "not used" if expected else "rejected", reason)
    if gaps:
        _check_gaps(plan, gaps, earliest)
    if plan.snapshot is not None:
        log.info("using snapshot %s (%d entries)", plan.snapshot_path, plan.snapshot.entries)
    return plan


def _lost_history(plan: RebuildPlan, earliest: dict[str, Position | None]) -> tuple[dict[str, str], set[str]]:
    """Partitions whose log now starts after where the record says it started: lost history
    (``gaps``: why; the :class:`Truncation` goes into ``plan.truncations``) or, when what the log
    holds disagrees with the record, rewritten."""
    gaps: dict[str, str] = {}
    rewritten: set[str] = set()
    for p in plan.parts:
        t = locate_truncation(plan.elog, p, plan.recorded[p], plan.records[p], earliest[p])
        if t == REWRITTEN:
            # not lost history: the log now holds other entries than the ones recorded
            rewritten.add(p)
            plan.notes.append(f"{p}: the log no longer matches its recorded checkpoints (rewritten?)")
        elif isinstance(t, Truncation):
            plan.truncations.append(t)
            gaps[p] = f"{p}: the log now starts at {t.first_available} but entry 0 was {t.recorded_first} when recorded"
    return gaps, rewritten


def _choose_snapshot(plan: RebuildPlan, earliest: dict[str, Position | None], rewritten: set[str]) -> None:
    """The newest snapshot that is valid for this log (each rejection recorded with its reason)."""
    for info, cand in plan.store.candidates(plan.model):
        path = str(info.path)
        if isinstance(cand, SnapshotRejected):
            plan.rejected.append((path, cand.reason))
            continue
        notes: list[str] = []
        why = _unusable(plan, cand, earliest, rewritten, notes)
        if why is not None:
            plan.rejected.append((path, why[0]))
            if why[1]:
                plan.passed_over.add(path)
            continue
        plan.notes.extend(notes)
        plan.snapshot, plan.snapshot_path = cand, path
        return


def _unusable(plan: RebuildPlan, cand: Snapshot, earliest: dict[str, Position | None], rewritten: set[str],
              notes: list[str]) -> tuple[str, bool] | None:
    """Why snapshot ``cand`` cannot start this rebuild, and whether that is expected (it is past
    where the replay must start); None if it can (``notes`` then say what to know)."""
    opts = plan.options
    if [pos.partition for pos in cand.partitions] != plan.parts:
        return f"taken of partitions {[pos.partition for pos in cand.partitions]}, the log has {plan.parts}", False
    conflict = cand.policy_conflict(opts.on_model_error)
    if conflict is not None:
        return conflict, False
    if opts.max_snapshot_entries is not None and cand.entries > opts.max_snapshot_entries:
        return f"covers {cand.entries} entries, past the replay start {opts.max_snapshot_entries}", True
    for pos in cand.partitions:
        reason = _check_against_record(pos, plan.recorded[pos.partition], plan.records[pos.partition])
        if reason:
            return reason, False
        if pos.message_id is None:
            if pos.entries:
                return "no message id recorded for its position", False
            continue
        at = plan.elog.position(pos.message_id)
        if opts.until is not None and opts.until < at:
            return f"covers entries past --until {opts.until}", True
        e = earliest[pos.partition]
        if e is not None and e <= at and not _holds(plan.elog, pos.partition, at, pos.chain.get("last_leaf")):
            return f"the log no longer holds entry {at} as it was when the snapshot was taken", False
        if (e is None or at < e) and pos.partition in rewritten:
            return "the log was rewritten after the snapshot's position", False
        if e is None or at < e:
            notes.append(f"{pos.partition}: the log starts after the snapshot's position ({at}); "
                         "entries between may be gone")
    return None


def _check_gaps(plan: RebuildPlan, gaps: dict[str, str], earliest: dict[str, Position | None]) -> None:
    """History is gone: fine when the chosen snapshot covers every gap (a note says what could not
    be re-verified; each :class:`Truncation` names the snapshot), or when the log is known to start
    mid-history (``allow_partial_history``: folded from where it starts now); else
    :class:`~chainfold.errors.HistoryUnrecoverable`, naming the first entry the log holds."""
    chosen = plan.snapshot
    for t in plan.truncations:
        pos = chosen.position(t.partition) if chosen is not None else None
        if pos is None or pos.message_id is None:
            continue
        e = earliest[t.partition]
        if (pos.entries >= t.index) if t.index is not None else (e is not None and e <= plan.elog.position(pos.message_id)):
            t.covered_by = plan.snapshot_path
    history = History(SeqGaps(), plan.truncations, plan.options.allow_partial_history)
    if history.covered:
        plan.notes.append("entries before the snapshot are gone from the log: earlier history could not be "
                          "re-verified (" + "; ".join(gaps.values()) + ")")
        return
    problem = history.problem()
    if problem is not None:
        first = next(t for t in plan.truncations if t.covered_by is None)
        raise HistoryUnrecoverable(problem, message_id=first.first_available, partition=first.partition,
                                   details=history.to_json())
    if chosen is not None and not all(t.covered_by for t in plan.truncations):
        # a snapshot from before the loss cannot be continued across it: fold from where the log starts
        plan.rejected.append((plan.snapshot_path or "", "the log lost entries after its position"))
        plan.snapshot, plan.snapshot_path = None, None
    plan.notes.append("folded from where the log starts now (" + "; ".join(gaps.values()) + ")")


class RebuildRun:
    """A rebuild between its plan and its result: the folder (decode and fold stages) starting from
    the plan's snapshot, the snapshot sink, and what each partition's pass found. The serial rebuild
    runs :meth:`partition` for each partition; the parallel engine folds elsewhere and reports its
    passes with :meth:`scanned`; both end with :meth:`finish`, or :meth:`close` on the way out.

    The decode stage's index of folded event ids is a :class:`~chainfold.replay.dedup.DedupIndex`
    from the snapshot's manifest: the writer of the topic's dedup folder when the rebuild takes
    snapshots, else a reader of its own (:mod:`chainfold.store.dedup_folder`). When another process
    is taking this topic's snapshots, this one takes none and says so in its notes."""

    def __init__(self, plan: RebuildPlan, on_progress: Callable[[int], None] | None = None) -> None:
        self.plan = plan
        self.on_progress = on_progress
        opts, model, snap = plan.options, plan.model, plan.snapshot
        self.dedup = plan.store.dedup
        self.dedup.memory_bytes = opts.dedup_memory
        states = None
        if snap is not None:
            states = snap.restore_states(model)
            if opts.streams is not None:
                states = {s: v for s, v in states.items() if s in opts.streams}
        self.seen, writes = self._index(snap.dedup if snap is not None else None)
        folder = Folder(model, states, self.seen, index=snap.entries if snap is not None else 0, streams=opts.streams,
                        on_error=opts.on_model_error, seqs=SeqGaps.restore(snap.seqs) if snap is not None else None)
        if snap is not None:
            folder.fold.resume(k for k in snap.skipped if opts.streams is None or k.stream in opts.streams)
        self.folder = folder
        self.result = RebuildResult(plan, folder)
        self.sink = SnapshotSink(plan.store, folder.fold, folder.decoder, plan.parts, plan.segment_size, snap,
                                 seqs=folder.seqs) if writes else None
        self.start = {pos.partition: pos for pos in snap.partitions} if snap is not None else {}
        self._read = 0

    def _index(self, manifest: dict[str, Any] | None) -> tuple[DedupIndex, bool]:
        """The index of the ids folded up to the start, and whether snapshots are written with it."""
        if self.plan.options.takes_snapshots:
            try:
                return self.dedup.writer(manifest), True
            except DedupIndexBusy:
                self.plan.notes.append("no snapshots written: another chainfold process is taking snapshots of "
                                       f"this topic (its dedup index {self.dedup.dir} is in use)")
        return self.dedup.reader(manifest), False

    def close(self) -> None:
        """Release the dedup index (its folder's lock; a reader's scratch folder is removed)."""
        close = getattr(self.seen, "close", None)
        if close is not None:
            close()

    def start_of(self, p: str) -> tuple[ChainBuilder | None, Position | None]:
        """Where partition ``p``'s pass starts: the snapshot's chain and position, or nothing."""
        pos = self.start.get(p)
        chain = ChainBuilder.from_state(pos.chain) if pos is not None and pos.entries else None
        after = self.plan.elog.position(pos.message_id) if pos is not None and pos.message_id else None
        return chain, after

    def lost_start(self, p: str) -> bool:
        """Whether partition ``p`` is folded from where it starts now after losing entries that no
        snapshot covers (then each stream's first ``seq`` there is where its check starts)."""
        return self.plan.truncation(p) is not None and self.start_of(p)[0] is None

    def hash_stage(self, p: str, stage: type[HashStage] = HashStage) -> HashStage:
        """The hash stage of partition ``p``'s pass (records only a rebuild that reads to the end);
        ``stage`` may be a subclass (the distributed engine's :class:`~chainfold.hashing.stage.PieceStage`),
        used where ``p`` lost no entries. A partition that lost entries and is folded from where it
        starts now is hashed at the recorded positions of what it still holds (or, when the record
        cannot place them, not compared with the record at all)."""
        chain, _ = self.start_of(p)
        plan = self.plan
        t = plan.truncation(p)
        write = not plan.options.bounded
        if t is not None and chain is not None:
            t.checked_from = chain.size
        if t is not None and chain is None:
            if t.index is None:
                return HashStage.open(plan.elog, p, segment_size=plan.segment_size, write=False)
            return shifted_stage(plan.elog, p, t, record=plan.records[p], recorded=plan.recorded[p], write=write)
        return stage.open(plan.elog, p, record=plan.records[p], chain=chain, segment_size=plan.segment_size,
                          write=write)

    def source(self, p: str) -> Source:
        opts = self.plan.options
        return Source(self.plan.elog, Span(p, after=self.start_of(p)[1], until=opts.until, until_time=opts.until_time))

    def partition(self, p: str) -> None:
        """Fold partition ``p`` here, snapshotting every ``snapshot_every`` entries."""
        hasher, source, base = self.hash_stage(p), self.source(p), self._read
        self.folder.seqs.lost_start = self.lost_start(p)
        stops = Stops()
        if self.on_progress is not None:
            progress = self.on_progress
            stops.every(PROGRESS_EVERY, lambda n, _e: progress(base + n))
        if self.sink is not None and self.plan.options.snapshot_every > 0:
            sink = self.sink

            def snapshot(_n: int, last: Entry) -> None:
                hasher.flush()  # the record the snapshot will be checked against, first
                sink.take(PartitionPosition(p, hasher.chain.size, str(last.message_id), hasher.chain.state()))

            stops.every(self.plan.options.snapshot_every, snapshot)
        try:
            run_pass(source, start=hasher.chain.size, hasher=hasher, decoder=self.folder.decoder,
                     fold=self.folder.fold, stops=stops)
        finally:
            hasher.flush()
            if self.on_progress is not None:
                self.on_progress(base + source.read)
        self.scanned(p, hasher.finish(source, read_to_end=not self.plan.options.bounded))

    def scanned(self, p: str, scan: PartitionScan) -> None:
        """Record that partition ``p`` was folded to the end of ``scan``."""
        start = self.start.get(p)
        self.result.scans.append(scan)
        self._read += scan.read
        last = str(scan.last) if scan.last is not None else (start.message_id if start else None)
        if self.sink is not None:
            self.sink.done(PartitionPosition(p, scan.chain.size, last, scan.chain.state()))
        if scan.mismatch is not None:
            self.result.notes.append(
                f"{p}: the log differs from its recorded checkpoints at entry {scan.mismatch.index} "
                f"({scan.mismatch.reason}); run `chainfold verify` for details")

    def finish(self) -> RebuildResult:
        """The snapshot at the end (unless the last periodic one is there already), and the result."""
        sink = self.sink
        if len(self.plan.parts) > 1:
            # a snapshot's skipped events (of every partition) came first: the report lists them in
            # log order, partition by partition, as a fold from the start of the log does
            self.folder.skipped.sort(key=lambda k: (MessageId.parse(k.message_id).partition, k.index))
        if sink is not None and self._read > 0 and sink.covered() != sink.entries:
            sink.take()
        if sink is not None:
            self.result.written = sink.written
        self.close()
        self.result.seconds = time.monotonic() - self.plan.started
        return self.result


def rebuild(elog: EventLog, model: Model, options: RebuildOptions | None = None, /, *,
            on_progress: Callable[[int], None] | None = None, **changes: Any) -> RebuildResult:
    """Rebuild the states of ``elog`` with ``model``; see the module docstring.

    ``options`` (:class:`RebuildOptions`), or its fields as keywords (``snapshots_root=...,
    full=True``); ``on_progress(entries read)`` is called as the rebuild goes.
    """
    return run_plan(plan_rebuild(elog, model, RebuildOptions.of(options, **changes)), on_progress)


def run_plan(plan: RebuildPlan, on_progress: Callable[[int], None] | None = None) -> RebuildResult:
    """The local engine's replay of ``plan``, partition after partition (:func:`rebuild`'s pass)."""
    run = RebuildRun(plan, on_progress)
    try:
        for p in plan.parts:
            run.partition(p)
        return run.finish()
    finally:
        run.close()


def states_digest(states: dict[str, Any]) -> str:
    """A short digest of rendered states, for comparing two rebuilds by eye."""
    import json

    return hashlib.sha256(json.dumps(states, sort_keys=True).encode()).hexdigest()[:16]

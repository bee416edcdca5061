"""The driver of a distributed replay (``--engine spark``): plan, run the stages' heavy parts as
tasks on a :class:`~chainfold.engines.cluster.Cluster`, and assemble the result with the local
engine's own code, so that reports, state exports, recorded checkpoints and snapshots are the local
engine's, byte for byte (timings aside).

What runs where
---------------
1. **Plan** (here): the local plan (records, lost history, the snapshot to start from:
   :func:`~chainfold.ops.rebuild.plan_rebuild`), then each partition's fixed read ranges from where
   its pass starts (:mod:`.spark_io`: recorded segments are free, the rest probed or from
   ``internalStats``).
2. **Read, hash, decode** (tasks, one per range): :func:`~chainfold.engines.tasks.read_chunk`. The
   cluster keeps the chunks; the driver learns each one's entry count, and so where each begins in
   its partition (prefix sums: entry-level ranges cannot know it before they are read).
3. **Dedup** (a shuffle by event id): an id's first entry in log order wins; its later entries, and
   every entry of an id the starting snapshot had folded, are the duplicates.
4. **Fold** (a shuffle by stream, each stream's events sorted by log position): the model, loaded by
   name in each executor, folds one stream at a time with the fold stage and its
   ``--on-model-error`` policy; each stream's state at every stop the driver will snapshot at and
   its skipped events come back.
5. **Assemble** (here, the chunks streamed back in log order): each chunk's compact ranges
   (:class:`~chainfold.hashing.stage.Piece`, cut at segment bounds and stops) go into the local hash
   stage (:class:`~chainfold.hashing.stage.PieceStage`: segment roots, chained heads, checked
   against and written into the record by the local code); the ids each chunk folds first come as
   columns (:class:`~chainfold.engines.tasks.FreshIds`) and are written into the dedup index as the
   pieces the local decode stage's batches make it spill (:class:`_IdWriter`), which is what a
   snapshot names; each chunk's own ``seq`` check (duplicates included, cut at the stops) continues
   the driver's (:meth:`~chainfold.replay.decode.SeqGaps.then`: exact); at each stop the local
   snapshot sink writes the snapshot. The local engine takes its snapshots at the same entry
   counts, so the files hold the same bytes (``created`` aside). Reconcile's reference is the same
   replay, the chunks' first-seen events written into its database (:func:`distributed_reference`).

What differs from the local engine, and why results do not: events are folded per stream in
executors instead of all streams in one loop (a stream's state depends only on its own events in
log order, and the fold stage applies the same policies per stream); dedup is a shuffle instead of a
set (first entry in log order wins either way; the shuffle compares full ids, so each id the
driver writes into its dedup index is new there); hashing is split into per-range compact ranges merged here
(RFC 9162 subtrees merge exactly; a segment root is the merge of its pieces).

What runs the local engine's pass instead (same results, no cluster): a partition that lost entries
before its first (rebuild, verify and reconcile's reference: hashed at shifted positions, the seq
check starting mid-history).
"""

from __future__ import annotations

import bisect
import functools
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..errors import ModelError, WorkerFailed
from ..hashing.chain import Checkpoint
from ..hashing.record import PartitionRecord
from ..hashing.stage import DEFAULT_SEGMENT_SIZE, HashStage, PartitionScan, PieceStage
from ..log import EventLog, Position
from ..log.source import DEFAULT_BATCH, Span
from ..ops.rebuild import RebuildOptions, RebuildPlan, RebuildResult, RebuildRun, plan_rebuild, run_plan
from ..ops.reference import Passes, Reference
from ..ops.verify import VerifyOptions, VerifyReport, hash_partition, verify_log
from ..replay.decode import Decoder, Duplicate, Malformed, SeqGaps
from ..replay.dedup import DedupIndex, memory_cost
from ..replay.fold import OnModelError, Skipped
from ..replay.model import Model, load_model
from ..store.snapshots import PartitionPosition
from .cluster import Cluster, Chunks
from .spark_io import Point, ReadRange, clip_ranges
from .tasks import (GPOS_SHIFT, Assembly, Chunk, ChunkSummary, StreamResult, assemble, dedup_pairs, fold_items,
                    fold_streams, gpos, prior_candidates, read_chunk, FreshIds)

__all__ = ["Planner", "Distribution", "distributed_rebuild", "distributed_verify", "distributed_scan",
           "distributed_reconcile_engine", "distributed_reference", "distributed_scanner", "DistributedRebuild",
           "executor_ref"]

log = logging.getLogger("chainfold.engines.distributed")

_NEVER = 1 << 62
_FOLD_GROUP = 500_000  # events per partition of the fold shuffle, at most about (a task sorts them in memory)
_LOW = (1 << GPOS_SHIFT) - 1


class Planner(Protocol):
    """Plans one partition's read ranges (:func:`~chainfold.engines.spark_io.plan_partition` with a
    way to see the partition's layout): from the start, or after ``after`` (a position covering
    ``after_index`` entries); ``recorded`` are the partition's recorded checkpoints."""

    def __call__(self, partition: str, *, recorded: Sequence[Checkpoint], after: Point | None, after_index: int,
                 target_ranges: int) -> list[ReadRange]: ...


@dataclass(frozen=True)
class Distribution:
    """How a distributed replay runs: on ``cluster``; tasks open the log with ``open_log`` (a
    picklable callable, e.g. :class:`~chainfold.engines.pool.PulsarSource`: each task a connection
    of its own); ``planner`` plans the ranges, about ``ranges_per_slot`` per task slot of the cluster
    (at least ``min_entries`` entries each)."""

    cluster: Cluster
    open_log: Callable[[], EventLog]
    planner: Planner
    ranges_per_slot: int = 4

    def target_ranges(self, partitions: int) -> int:
        return max(1, -(-self.cluster.parallelism * self.ranges_per_slot // max(1, partitions)))


# --- the read: chunks and where each begins ---------------------------------------------------------


@dataclass
class _Part:
    """One partition's share of a read: its pass starts at entry ``start``; its ranges, and for each
    where it begins and how many of its entries the replay uses (all, unless a time bound ends it)."""

    pi: int
    name: str
    start: int
    ranges: list[ReadRange]
    begins: list[int] = field(default_factory=list)
    used: list[int] = field(default_factory=list)
    last: str | None = None
    redelivered: int = 0

    @property
    def read(self) -> int:
        return sum(self.used)

    @property
    def end(self) -> int:
        return self.start + self.read


class _Totals:
    """What a partition's pass read, as :meth:`~chainfold.hashing.stage.HashStage.finish` asks a source."""

    def __init__(self, read: int, last: Position | None, redelivered: int) -> None:
        self.read, self.last, self.redelivered = read, last, redelivered


class _Phases:
    """Wall time of each phase of a distributed replay, logged (``-v``) as each ends."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.t = time.monotonic()
        self.seconds: dict[str, float] = {}

    def done(self, phase: str) -> None:
        now = time.monotonic()
        self.seconds[phase] = round(now - self.t, 3)
        log.info("%s: %s took %.2fs", self.what, phase, now - self.t)
        self.t = now


class _Read:
    """The chunks of every range (:func:`~chainfold.engines.tasks.read_chunk`, in tasks) and where
    each begins in its partition (from the counts of the chunks before it)."""

    def __init__(self, dist: Distribution, parts: list[_Part], *, decode: bool, until_time: int | None = None) -> None:
        self.parts = parts
        tasks = [functools.partial(read_chunk, dist.open_log, rng, p.pi, ri, decode_events=decode, until_time=until_time)
                 for p in parts for ri, rng in enumerate(p.ranges)]
        self.chunks: Chunks = dist.cluster.read(tasks)
        summaries: list[ChunkSummary] = self.chunks.collect(Chunk.summary)
        by_part: dict[int, list[ChunkSummary]] = {}
        for s in summaries:
            by_part.setdefault(s.pi, []).append(s)
        for p in parts:
            b, ended = p.start, False
            for s in sorted(by_part.get(p.pi, []), key=lambda s: s.ri):
                n = 0 if ended else (s.count if s.late is None else s.late)
                ended = ended or s.late is not None
                p.begins.append(b)
                p.used.append(n)
                b += n
                p.redelivered += s.redelivered
                if n:
                    p.last = s.last
        self.where = {(p.pi, ri): (b, n) for p in parts for ri, (b, n) in enumerate(zip(p.begins, p.used))}

    def release(self) -> None:
        self.chunks.release()


def _plan_parts(dist: Distribution, parts: Sequence[str], starts: dict[str, tuple[int, Position | None]],
                recorded: dict[str, list[Checkpoint]], until: Position | None = None) -> list[_Part]:
    """Every partition's ranges from where its pass starts (``starts``: entries covered and the
    position of the last of them), cut after ``until``."""
    target = dist.target_ranges(len(parts))
    out = []
    for pi, p in enumerate(parts):
        index, after = starts.get(p, (0, None))
        ranges = dist.planner(p, recorded=recorded.get(p, []), after=Point.of(str(after)) if after is not None else None,
                              after_index=index, target_ranges=target)
        if until is not None:
            ranges = clip_ranges(ranges, Point.of(str(until)))
        out.append(_Part(pi, p, index, ranges))
    return out


def _assembly_of(chunk: Chunk, where: Any, layout: Any, duplicates: Any, ids: bool, rows: bool = False,
                 leaves: bool = False) -> Assembly:
    """The task that assembles one chunk (see :func:`~chainfold.engines.tasks.assemble`): where it
    begins from ``where``, its partition's segment size, stops and first unrecorded index from
    ``layout``, the duplicates' positions from ``duplicates`` (shared values)."""
    begin, used = where.value[(chunk.pi, chunk.ri)]
    segment_size, cuts, carry_from, seq_from = layout.value[chunk.pi]
    return assemble(chunk, begin, used, segment_size, cuts, carry_from, duplicates=duplicates.value if duplicates else (),
                    ids=ids, seq_from=seq_from, rows=rows, leaves=leaves)


def _in_run(fn: Callable[..., Any], where: Any) -> Callable[[Chunk], Any]:
    """``fn(chunk, begin, used, ...)`` for a chunk, with where it begins from ``where`` (shared)."""

    def call(chunk: Chunk) -> Any:
        begin, used = where.value[(chunk.pi, chunk.ri)]
        return fn(chunk, begin, used)

    return call


def _candidates(chunk: Chunk, where: Any, key_filter: Any) -> list[str]:
    begin, used = where.value[(chunk.pi, chunk.ri)]
    return prior_candidates(chunk, begin, used, key_filter.value)


def _fold_inputs(chunk: Chunk, where: Any, duplicates: Any) -> Any:
    begin, used = where.value[(chunk.pi, chunk.ri)]
    return fold_items(chunk, begin, used, duplicates.value)


# --- the driver's decode bookkeeping ---------------------------------------------------------------


class _IdWriter:
    """Writes the event ids first seen (the dedup shuffle's winners, :class:`~chainfold.engines.tasks.FreshIds`),
    in log order, into the driver's dedup index as the pieces the local decode stage's calls make:
    the local stage calls ``add_new`` once per batch (``DEFAULT_BATCH`` entries from the pass start,
    cut at the stops), and the index spills what it holds in memory after a batch that takes it past
    its bound (:func:`~chainfold.replay.dedup.memory_cost`), and at each snapshot (its checkpoint).
    Here the same cuts are found from the ids' lengths, and each piece is written in one call
    (:meth:`~chainfold.replay.dedup.DedupIndex.add_fresh`): no Python object per id on the driver.
    The pieces, and so the snapshots that name them, are the local engine's bytes."""

    def __init__(self, index: DedupIndex) -> None:
        self.index = index
        self.limit = index.memory_bytes
        self.pending: list[tuple[bytes, np.ndarray, np.ndarray]] = []
        self.memory = 0
        self.batch_end = -1
        self.start = 0
        self.stops = np.zeros(0, dtype=np.int64)
        self.chunk(None)

    def part(self, start: int, stops: Sequence[int]) -> None:
        """A partition's pass begins at entry ``start`` (its batches from there, cut at ``stops``)."""
        self.end_batch()
        self.start, self.stops = start, np.asarray(stops, dtype=np.int64)

    def chunk(self, fresh: FreshIds | None) -> None:
        """The next chunk's ids, taken in order by :meth:`upto`."""
        self.fresh, self.taken, self.byte = fresh, 0, 0

    def upto(self, index: int) -> None:
        """The chunk's ids at entries before ``index`` not taken yet, batch by batch."""
        f, i = self.fresh, self.taken
        if f is None:
            return
        j = int(np.searchsorted(f.indexes, index))
        if j <= i:
            return
        idx = f.indexes[i:j]
        ends = self.start + ((idx - self.start) // DEFAULT_BATCH + 1) * DEFAULT_BATCH
        if self.stops.size:
            nxt = np.searchsorted(self.stops, idx, side="right")
            ends = np.where(nxt < self.stops.size, np.minimum(ends, self.stops[np.minimum(nxt, self.stops.size - 1)]),
                            ends)
        firsts = np.flatnonzero(np.r_[True, ends[1:] != ends[:-1]])
        chars = np.add.reduceat(f.chars[i:j], firsts).tolist()
        offsets = np.zeros(j - i + 1, dtype=np.int64)
        np.cumsum(f.lengths[i:j], out=offsets[1:])
        bounds = [*firsts.tolist(), j - i]
        for g, end in enumerate(ends[firsts].tolist()):
            if end != self.batch_end:
                self.end_batch()
                self.batch_end = end
            a, b = bounds[g], bounds[g + 1]
            self.memory += memory_cost(chars[g], b - a)
            self.pending.append((f.blob[self.byte + int(offsets[a]):self.byte + int(offsets[b])],
                                 f.lengths[i + a:i + b], f.keys[i + a:i + b]))
        self.taken, self.byte = j, self.byte + int(offsets[-1])

    def end_batch(self) -> None:
        """The local batch ends: its ``add_new`` spills when the index passed its bound."""
        if self.memory > self.limit:
            self.spill()
        self.batch_end = -1

    def checkpoint(self) -> None:
        """Before a snapshot: the index's checkpoint spills everything in memory."""
        self.end_batch()
        self.spill()

    def spill(self) -> None:
        if self.pending:
            lengths = np.concatenate([p[1] for p in self.pending])
            offsets = np.zeros(lengths.size + 1, dtype=np.int64)
            np.cumsum(lengths, out=offsets[1:])
            self.index.add_fresh(b"".join(p[0] for p in self.pending), offsets,
                                 np.concatenate([p[2] for p in self.pending]))
        self.pending, self.memory = [], 0


# --- rebuild -------------------------------------------------------------------------------------------


@dataclass
class _Outcome:
    """The fold's results gathered: states at each stop, final states, the first error."""

    results: list[StreamResult]
    cuts: list[int]
    at_cut: list[list[tuple[str, Any]]] = field(default_factory=list)
    error: tuple[int, ModelError] | None = None
    skipped: list[tuple[int, Skipped]] = field(default_factory=list)
    """Every event the fold skipped, with its gpos, in log order."""

    def __post_init__(self) -> None:
        self.at_cut = [[] for _ in self.cuts]
        for r in self.results:
            for j, dumped in r.cut_states:
                self.at_cut[j].append((r.stream, dumped))
            if r.error is not None and (self.error is None or r.error[0] < self.error[0]):
                self.error = r.error
        self.skipped = sorted((x for r in self.results for x in r.skipped), key=lambda x: x[0])
        self._skipped_at = [g for g, _ in self.skipped]

    def skipped_before(self, g: int) -> list[Skipped]:
        """The events skipped before position ``g`` (gpos), in log order."""
        return [sk for _, sk in self.skipped[: bisect.bisect_left(self._skipped_at, g)]]


class DistributedRebuild:
    """One replay of ``plan`` on a cluster (see the module doc): :meth:`run` returns the local
    engine's :class:`~chainfold.ops.rebuild.RebuildResult`, or raises its :class:`ModelError`.
    ``model_ref`` is the name executors load the model by (``plan.model`` is the driver's); a
    model error is handled by the plan's ``on_model_error``."""

    def __init__(self, dist: Distribution, plan: RebuildPlan, model_ref: str, *,
                 on_progress: Callable[[int], None] | None = None, run: RebuildRun | None = None) -> None:
        self.dist = dist
        self.model_ref = model_ref
        self.model: Model = plan.model
        self.on_error: OnModelError = plan.options.on_model_error
        self.plan = plan
        self.run_ = run if run is not None else RebuildRun(plan, on_progress)
        self.on_progress = on_progress
        self.ids: _IdWriter | None = None

    @property
    def options(self) -> RebuildOptions:
        return self.plan.options

    def _parts(self) -> list[_Part]:
        starts = {}
        for p in self.plan.parts:
            chain, after = self.run_.start_of(p)
            starts[p] = (chain.size if chain is not None else 0, after)
        return _plan_parts(self.dist, self.plan.parts, starts, self.plan.recorded, self.options.until)

    def _stops(self, part: _Part) -> list[int]:
        """Where the local pass over ``part`` takes its periodic snapshots (entry indexes)."""
        every = self.options.snapshot_every
        if self.run_.sink is None or every <= 0:
            return []
        return [part.start + n for n in range(every, part.read + 1, every)]

    rows = False
    """Whether the tasks send the events first seen (:attr:`~chainfold.engines.tasks.Assembly.rows`)."""
    leaves = False
    """Whether they send those events' leaf hashes too."""

    def run(self) -> RebuildResult:
        try:
            self.replay()
            sink = self.run_.sink
            if self.ids is not None and sink is not None and sink.covered() != sink.entries:
                self.ids.checkpoint()  # the snapshot at the end (finish) checkpoints the index
            result = self.run_.finish()
            self.phases.done("assembly")
            return result
        finally:
            self.run_.close()  # the dedup index's folder (after finish(): already closed)

    def replay(self) -> None:
        """Plan, read, dedup, fold, and the local pass from what the tasks made: the run's folder,
        hash stages and snapshots as the local pass leaves them (``finish`` not called)."""
        self.phases = _Phases(f"replay of {self.plan.elog.topic}")
        parts = self._parts()
        self.phases.done(f"planning {sum(len(p.ranges) for p in parts)} ranges")
        read = _Read(self.dist, parts, decode=True, until_time=self.options.until_time)
        self.phases.done("read, hash, decode")
        try:
            self._run(read)
        finally:
            read.release()

    def taken(self, part: _Part, a: Assembly) -> None:
        """Each chunk's assembly once the local pass went past it (for subclasses; nothing here)."""

    def scanned(self, part: _Part, scan: PartitionScan) -> None:
        """A partition's pass ended (the local engine's bookkeeping)."""
        self.run_.scanned(part.name, scan)

    def _prior(self, read: _Read, where: Any) -> list[str]:
        """The read's event ids that the starting snapshot had folded (in its dedup index): the
        index's key filter goes to the tasks, which send back the ids it lets through (those, and
        ~1% of the others); the index here tells them apart exactly."""
        seen = self.run_.seen
        if self.plan.snapshot is None or not len(seen):
            return []
        key_filter = getattr(seen, "key_filter", None)
        if key_filter is None:
            raise WorkerFailed("the snapshot's dedup index holds ids outside its pieces: a bug; rerun with --engine local")
        shared = self.dist.cluster.share(key_filter)
        candidates = [i for part in read.chunks.collect(functools.partial(_candidates, where=where, key_filter=shared))
                      for i in part]
        return [i for i, held in zip(candidates, seen.holds(candidates)) if held]

    def _run(self, read: _Read) -> None:
        cluster, plan, phases = self.dist.cluster, self.plan, self.phases
        stops = {p.pi: self._stops(p) for p in read.parts}
        cuts = sorted(gpos(pi, c) for pi, cs in stops.items() for c in cs)
        where = cluster.share(read.where)
        snap = plan.snapshot
        repeated = read.chunks.repeated(_in_run(dedup_pairs, where), self._prior(read, where))
        losers = cluster.share(frozenset(g for _, positions in repeated for g in positions[1:] if g >= 0))
        phases.done("dedup")
        start = []
        if snap is not None:
            only = self.options.streams
            start = [(s, -1, ("state", v)) for s, v in snap.states.items() if only is None or s in only]
        resumed: dict[str, list[Skipped]] = {}
        for k in self.run_.folder.fold.skipped:  # the snapshot's (RebuildRun resumed them)
            resumed.setdefault(k.stream, []).append(k)
        fold = functools.partial(fold_streams, model_ref=self.model_ref, on_error=self.on_error, cuts=cuts,
                                 streams=self.options.streams, resumed=resumed)
        total = sum(p.read for p in read.parts)
        groups = -(-total // _FOLD_GROUP) if total > _FOLD_GROUP * 2 * cluster.parallelism else None
        outcome = _Outcome(read.chunks.fold(functools.partial(_fold_inputs, where=where, duplicates=losers), start,
                                            fold, groups), cuts)
        phases.done("fold")
        stages = {p.pi: self.run_.hash_stage(p.name, PieceStage) for p in read.parts}
        ends = {p.pi: p.end for p in read.parts}
        if outcome.error is not None:  # the local pass stops at the end of the batch holding the failing entry
            g = outcome.error[0]
            part = read.parts[g >> GPOS_SHIFT]
            ends[part.pi] = min(_batch_end(part.start, stops[part.pi], g & _LOW), part.end)
        layout = cluster.share({p.pi: (stages[p.pi].chain.segment_size, sorted(set(stops[p.pi]) | {ends[p.pi]}),
                                       _carry_from(stages[p.pi]), 0) for p in read.parts})
        self.ids = _IdWriter(self.run_.seen) if self.run_.sink is not None else None  # what a snapshot stores
        items = read.chunks.stream(functools.partial(_assembly_of, where=where, layout=layout, duplicates=losers,
                                                     ids=self.ids is not None, rows=self.rows, leaves=self.leaves))
        self._assemble(read, items, stages, stops, ends, outcome, self.ids)

    def _assemble(self, read: _Read, items: Iterator[Assembly], stages: dict[int, PieceStage],
                  stops: dict[int, list[int]], ends: dict[int, int], outcome: _Outcome, ids: _IdWriter | None) -> None:
        """The local pass, partition after partition, from the tasks' pieces, ids and checks."""
        run, model = self.run_, self.model
        decoder = run.folder.decoder
        states = run.folder.fold.states
        started = dict(states)  # the snapshot's streams, in the order the fold stage holds them
        resumed = list(run.folder.fold.skipped)  # the snapshot's skipped events come first
        error = outcome.error
        cut_no = 0
        done = 0
        seqs = run.folder.seqs
        for part in read.parts:
            if error is not None and part.pi > error[0] >> GPOS_SHIFT:
                break
            if run.lost_start(part.name):
                raise WorkerFailed(f"{part.name} lost entries before its first: a bug (the local engine rebuilds it)")
            stage = stages[part.pi]
            end = ends[part.pi]
            failing = error is not None and part.pi == error[0] >> GPOS_SHIFT
            snap_until = error[0] & _LOW if failing else end  # type: ignore[index]
            if ids is not None:
                ids.part(part.start, stops[part.pi])
            for _ in part.ranges:
                a = next(items)
                if ids is not None:
                    ids.chunk(a.fresh)
                bad, dups, checks = _Queue(a.malformed), _Queue(a.duplicates), _Queue(a.seq_checks)
                for piece in a.pieces:
                    if piece.begin >= end:
                        break
                    stage.feed_piece(piece)
                    if ids is not None:
                        ids.upto(piece.end)
                    for _, check in checks.upto(piece.end):
                        seqs.then(check)
                    decoder.malformed.extend(Malformed(i, m, r) for i, m, r in bad.upto(piece.end))
                    decoder.duplicates.extend(Duplicate(i, m, e) for i, m, e in dups.upto(piece.end))
                    while cut_no < len(outcome.cuts) and outcome.cuts[cut_no] == gpos(part.pi, piece.end) \
                            and piece.end <= snap_until:
                        if ids is not None:
                            ids.checkpoint()
                        for s, dumped in outcome.at_cut[cut_no]:
                            states[s] = model.load_state(dumped)
                        run.folder.fold.skipped[:] = resumed + outcome.skipped_before(outcome.cuts[cut_no])
                        stage.flush()
                        run.sink.take(PartitionPosition(part.name, stage.chain.size, piece.last, stage.chain.state()))  # type: ignore[union-attr]
                        cut_no += 1
                self.taken(part, a)
                done += a.end - a.begin
                if self.on_progress is not None:
                    self.on_progress(done)
            if failing:  # the model failed (stop): what the local pass did before it raised
                stage.flush()
                raise error[1]  # type: ignore[index]
            if ids is not None:
                ids.end_batch()
            stage.flush()
            last = self.plan.elog.position(part.last) if part.last is not None else None
            self.scanned(part, stage.finish(_Totals(part.read, last, part.redelivered),
                                            read_to_end=not self.options.bounded))
        self._final_states(outcome, started, resumed)

    def _final_states(self, outcome: _Outcome, started: dict[str, Any], resumed: list[Skipped]) -> None:
        """The folded states in the order the local fold stage would hold them (the snapshot's
        streams first, then each stream as its first event was applied), skipped events, counts."""
        folder, model = self.run_.folder, self.model
        fold = folder.fold
        final = {r.stream: r for r in outcome.results}
        states: dict[str, Any] = {}
        for s, v in started.items():
            r = final.get(s)
            states[s] = model.load_state(r.state) if r is not None and r.present else v
        fresh = sorted((r.first_applied, r.stream) for r in outcome.results
                       if r.present and r.stream not in states and r.first_applied is not None)
        for _, s in fresh:
            states[s] = model.load_state(final[s].state)
        fold.states.clear()
        fold.states.update(states)
        fold.applied = sum(r.applied for r in outcome.results)
        fold.skipped[:] = resumed + [sk for _, sk in outcome.skipped]


def _carry_from(stage: PieceStage) -> int:
    """The first entry index whose leaf hashes the record will want written (segments past the
    recorded ones), or never when the stage records nothing."""
    w = stage.writer
    return w.in_file * stage.chain.segment_size if w is not None else _NEVER


def _batch_end(start: int, stops: Sequence[int], index: int) -> int:
    """The end of the local pass's batch that holds entry ``index``: batches are ``DEFAULT_BATCH``
    entries from the pass ``start``, cut at the ``stops``."""
    end = start + ((index - start) // DEFAULT_BATCH + 1) * DEFAULT_BATCH
    j = bisect.bisect_right(stops, index)
    return min(end, stops[j]) if j < len(stops) else end


class _Queue:
    """Items sorted by their first field (an entry index), taken in order up to an index."""

    def __init__(self, items: Sequence[tuple[Any, ...]]) -> None:
        self.items = items
        self.i = 0

    def upto(self, index: int) -> Sequence[tuple[Any, ...]]:
        i = j = self.i
        items = self.items
        while j < len(items) and items[j][0] < index:
            j += 1
        self.i = j
        return items[i:j]


def distributed_rebuild(dist: Distribution, elog: EventLog, model_ref: str, options: RebuildOptions | None = None,
                        /, *, on_progress: Callable[[int], None] | None = None, **changes: Any) -> RebuildResult:
    """:func:`chainfold.ops.rebuild.rebuild` on a cluster: the same result (see the module doc).
    ``elog`` is the driver's view of the log (planning reads a few entries); ``model_ref`` names the
    model (every executor loads it by that name)."""
    opts = RebuildOptions.of(options, **changes)
    plan = plan_rebuild(elog, load_model(model_ref), opts)
    if plan.truncations:
        # lost history: the local engine's pass (hashing at shifted positions, the seq check
        # starting mid-history) gives the report; the cluster is not used
        log.info("%s lost entries before its first: rebuilt by the local engine", elog.topic)
        return run_plan(plan, on_progress)
    return DistributedRebuild(dist, plan, executor_ref(model_ref), on_progress=on_progress).run()


def executor_ref(model_ref: str) -> str:
    """The name executors load the model by: a model file's path made absolute (executors do not
    run in the driver's folder), a module path as it is."""
    target, sep, attr = model_ref.partition(":")
    if target.endswith(".py") or "/" in target:
        return str(Path(target).resolve()) + sep + attr
    return model_ref


# --- verify ----------------------------------------------------------------------------------------


def distributed_scan(dist: Distribution, elog: EventLog, partitions: Sequence[str], *,
                     records: dict[str, PartitionRecord | None], segment_size: int = DEFAULT_SEGMENT_SIZE,
                     write: bool = True, probes: dict[str, Sequence[int]] | None = None,
                     on_progress: Callable[[int], None] | None = None,
                     decoder: Decoder | None = None) -> list[PartitionScan]:
    """Hash ``partitions`` of ``elog`` from the start on the cluster: what
    :func:`~chainfold.ops.verify.hash_partition` gives for each (checked against, and with
    ``write`` recorded into, ``records``; chain states captured at the ``probes`` sizes). With
    ``decoder`` (verify's :func:`~chainfold.ops.verify.seq_decoder`), the entries are decoded in
    the tasks and the driver feeds it in log order: malformed entries, and every well-formed one
    to its ``seq`` check (from its ``first`` index on)."""
    stages = {p: PieceStage.open(elog, p, record=records.get(p), segment_size=segment_size, write=write)
              for p in partitions}
    recorded = {p: stages[p].scan.recorded for p in partitions}
    parts = _plan_parts(dist, partitions, {}, recorded)
    if not any(p.ranges for p in parts):
        return [stages[p].finish(_Totals(0, None, 0)) for p in partitions]
    read = _Read(dist, parts, decode=decoder is not None)
    try:
        wanted = {p.pi: sorted({s for s in (probes or {}).get(p.name, ()) if 0 < s <= p.read}) for p in parts}
        seq_from = getattr(decoder, "first", 0)
        layout = dist.cluster.share({p.pi: (stages[p.name].chain.segment_size, wanted[p.pi], _carry_from(stages[p.name]),
                                            seq_from) for p in parts})
        items = read.chunks.stream(functools.partial(_assembly_of, where=dist.cluster.share(read.where), layout=layout,
                                                     duplicates=None, ids=False))
        scans, done = [], 0
        for part in parts:
            stage = stages[part.name]
            if 0 in (probes or {}).get(part.name, ()):
                stage.scan.probed[0] = stage.chain.state()
            marks = set(wanted[part.pi])
            for _ in part.ranges:
                a = next(items)
                for piece in a.pieces:
                    stage.feed_piece(piece)
                    if piece.end in marks:
                        stage.scan.probed[piece.end] = stage.chain.state()
                if decoder is not None:
                    _decode_seqs(decoder, a)
                done += a.end - a.begin
                if on_progress is not None:
                    on_progress(done)
            stage.flush()
            last = elog.position(part.last) if part.last is not None else None
            scans.append(stage.finish(_Totals(part.read, last, part.redelivered)))
        return scans
    finally:
        read.release()


def _decode_seqs(decoder: Decoder, a: Assembly) -> None:
    """What verify's decode stage records of chunk ``a`` (entries before its ``first`` skipped: the
    tasks left them out of ``a.seq_checks``): its ``seq`` check (verify's hook is a
    :class:`~chainfold.replay.decode.SeqGaps`) continued with the chunk's."""
    first = getattr(decoder, "first", 0)
    decoder.malformed.extend(Malformed(i, m, r) for i, m, r in a.malformed if i >= first)
    seqs = decoder.well_formed
    if seqs is not None:
        if not isinstance(seqs, SeqGaps) or seqs.lost_start:
            raise WorkerFailed("verify's seq check on a cluster continues a SeqGaps from its start: a bug")
        for _, check in a.seq_checks:
            seqs.then(check)


def distributed_scanner(dists: dict[str, Distribution]) -> Callable[..., PartitionScan]:
    """The ``scan`` of :func:`chainfold.ops.verify.compare_logs` on a cluster: each topic hashed by
    its :class:`Distribution` (``dists``, by full topic name), nothing recorded."""

    def scan(elog: EventLog, partition: str, *, segment_size: int = DEFAULT_SEGMENT_SIZE,
             on_progress: Callable[[int], None] | None = None, decoder: Decoder | None = None) -> PartitionScan:
        return distributed_scan(dists[elog.topic], elog, [partition], records={partition: None},
                                segment_size=segment_size, write=False, on_progress=on_progress, decoder=decoder)[0]

    return scan


def distributed_verify(dist: Distribution, elog: EventLog, options: VerifyOptions | None = None, /, *,
                       on_progress: Callable[[int], None] | None = None, **changes: Any) -> VerifyReport:
    """:func:`chainfold.ops.verify.verify_log` on a cluster: the same report. Each partition is
    hashed and decoded by the cluster; one that lost recorded entries (hashed at shifted positions)
    goes through the local engine's pass."""
    opts = VerifyOptions(**changes) if options is None else options

    def hash_part(elog: EventLog, part: str, *, record: PartitionRecord | None, segment_size: int,
                  probes: Sequence[int], on_progress: Callable[[int], None] | None, hasher: HashStage | None,
                  decoder: Decoder | None) -> PartitionScan:
        if hasher is not None:
            log.info("%s lost entries before its first: verified by the local engine", part)
            return hash_partition(elog, Span(part), record=record, segment_size=segment_size, probes=probes,
                                  on_progress=on_progress, hasher=hasher, decoder=decoder)
        return distributed_scan(dist, elog, [part], records={part: record}, segment_size=segment_size,
                                probes={part: probes}, on_progress=on_progress, decoder=decoder)[0]

    return verify_log(elog, opts, on_progress=on_progress, hash_part=hash_part)


# --- reconcile -------------------------------------------------------------------------------------


class _ReferencePass(DistributedRebuild):
    """Reconcile's reference from a distributed replay: the replay of the reference's plan, its
    events first seen (the rows of :class:`~chainfold.ops.reference.ReferenceDB`, in log order, with
    their leaf hashes when asked for) sent by the tasks and written here as the local pass's tap
    writes them; the expected states, findings and history are the replay's."""

    rows = True

    def __init__(self, dist: Distribution, reference: Reference, run: RebuildRun, model_ref: str, *,
                 leaves: bool, on_progress: Callable[[int], None] | None) -> None:
        super().__init__(dist, run.plan, model_ref, on_progress=on_progress, run=run)
        self.reference = reference
        self.leaves = leaves
        names = reference.stream_names
        names.extend(sorted(run.folder.states))  # the snapshot's streams are the log's too
        self.numbers = {s: i for i, s in enumerate(names)}
        self.j = 0
        self.out = None
        if leaves:
            reference.leaves_path = Path(reference.workdir.name) / "leaves.bin"

    def fill(self) -> None:
        try:
            if self.leaves:
                self.out = open(self.reference.leaves_path, "wb")  # type: ignore[arg-type]
            self.replay()
        finally:
            if self.out is not None:
                self.out.close()
        self.reference.db.seal()
        self.phases.done("reference")

    def taken(self, part: _Part, a: Assembly) -> None:
        if a.rows is None:
            return
        numbers, names = self.numbers, self.reference.stream_names
        indexes, ids, streams = a.rows
        snos = []
        for s in streams:
            n = numbers.get(s)
            if n is None:
                n = numbers[s] = len(names)
                names.append(s)
            snos.append(n)
        j = self.j
        self.reference.db.add(zip(ids, [part.pi] * len(ids), range(j, j + len(ids)), indexes, snos))
        self.j = j + len(ids)
        if self.out is not None and a.leaves:
            self.out.write(a.leaves)

    def scanned(self, part: _Part, scan: PartitionScan) -> None:
        ref, decoder = self.reference, self.run_.folder.decoder
        ref.malformed_in += [part.pi] * (len(decoder.malformed) - len(ref.malformed_in))
        ref.duplicates_in += [part.pi] * (len(decoder.duplicates) - len(ref.duplicates_in))
        ref.counts.append(self.j)
        self.j = 0
        ref.scans.append(scan)
        if scan.record_error:
            ref.notes.append(scan.record_error + "; not trusted")
        if scan.mismatch is not None:
            ref.notes.append(f"{part.name}: the log differs from its recorded checkpoints at entry "
                             f"{scan.mismatch.index}: {scan.mismatch.reason}")


def distributed_reference(dist: Distribution, model_ref: str) -> Passes:
    """The passes of :func:`chainfold.ops.reference.build_reference` on a cluster (its ``passes``):
    the reference's events, expected states and history from a distributed replay of its plan
    (:class:`_ReferencePass`), the same as the local pass's. A log that lost entries before its
    first is left to the local pass (as :func:`distributed_rebuild` does)."""

    def passes(reference: Reference, run: RebuildRun, leaves: bool, on_progress: Callable[[int], None] | None) -> bool:
        if run.plan.truncations:
            log.info("%s lost entries before its first: its reference is built by the local engine", reference.topic)
            return False
        _ReferencePass(dist, reference, run, model_ref, leaves=leaves, on_progress=on_progress).fill()
        return True

    return passes


def distributed_reconcile_engine(dist: Distribution) -> dict[str, Any]:
    """The engine's part of :func:`chainfold.ops.reconcile.reconcile` on ``dist``: the reference's
    passes (:func:`distributed_reference`; the reference itself, on disk, from a covering snapshot,
    with the history checks, is :func:`chainfold.ops.reference.build_reference`'s) and the
    repair's replay (``rebuild``). The model is loaded by its name in the executors."""

    def rebuild(elog: EventLog, model: Model, options: RebuildOptions | None = None, /, **kw: Any) -> RebuildResult:
        return distributed_rebuild(dist, elog, model.name, options, **kw)

    def passes(reference: Reference, run: RebuildRun, leaves: bool, on_progress: Callable[[int], None] | None) -> bool:
        return distributed_reference(dist, executor_ref(run.plan.model.name))(reference, run, leaves, on_progress)

    return {"rebuild": rebuild, "passes": passes}

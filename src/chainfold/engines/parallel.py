"""Replay in several worker processes, merged into the result a serial replay gives.

The same stages as a serial replay, wired across processes (:mod:`chainfold.engines.pool`):

* **A partitioned topic**: one worker per partition (``workers`` at a time); each runs the whole
  pass over its partition (source → hash → decode → fold) and records its checkpoints.
* **One topic, rebuild**: the streams are sharded on the message key
  (:func:`~chainfold.replay.decode.shard_of`; a stream is its key, so streams never span shards and
  the states combine without conflict). Two ways to share the topic out (``split``):

  - ``"fanout"`` (default): this process runs the source and hash stages (checking against the
    recorded checkpoints and recording new ones) and forwards each payload, undecoded, to the fold
    worker of its key's shard, which runs the decode and fold stages. Message ids are not sent: a
    worker names a malformed or duplicated entry by its log position, and this process looks the
    ids up afterwards (one read, from the first such entry).
  - ``"readers"``: every worker reads the whole topic; its decode stage skips the other shards'
    entries without decoding them; worker 0 also hashes and records.

  An entry without a key is decoded by every worker and folded by its stream's shard only (and
  reported as malformed by shard 0 only).
* **One topic, verify**: the recorded full segments are split into ranges, one per worker; each
  worker hashes its range only (from the recorded ``last`` message id of the segment before it),
  continuing the chain from the recorded checkpoints. The entries after the recorded ones are then
  hashed, checked and recorded here. A verify with nothing recorded yet runs serially.

The result equals the serial one. Where the parallel replay cannot guarantee that (an entry whose
key and stream fall in different shards, one event id folded in two shards or partitions, a stream
in two partitions, a range that does not match its recorded segments), the work is done again
serially and a note says why. A parallel rebuild takes no periodic snapshots: only the one at the
end. Model errors are handled in each worker's fold stage by the same policy (``on_model_error``);
the events they skip are merged in log order, as a serial fold lists them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import pickle
from array import array
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from ..errors import ChainfoldError, InvalidArgument, ModelError, WorkerFailed
from ..hashing.chain import ChainBuilder, Checkpoint
from ..hashing.record import PartitionRecord
from ..hashing.stage import HashStage, PartitionScan, positions_at
from ..log import Entry, EventLog
from ..log.source import Source, Span
from ..ops.rebuild import RebuildOptions, RebuildResult, RebuildRun, plan_rebuild, rebuild
from ..ops.history import History, Truncation, earliest, locate_truncation
from ..ops.verify import (VerifyOptions, VerifyReport, conclude_partition, hash_partition, prepare_record, seq_decoder,
                          snapshot_probes, verify_log)
from ..replay.decode import Routed, SeqGaps, Shard, unresolved_index
from ..replay.fold import Folder, OnModelError
from ..replay.model import load_model
from ..replay.pipeline import Stops, run_pass
from ..store.dedup_folder import DedupFolder, Scratch
from ..store.snapshots import SnapshotStore, topic_dir
from .pool import (LogSource, Outcome, PulsarSource, as_source, context, peak_rss, peaks, publish_progress, run_task,
                   run_tasks)

__all__ = ["LogSource", "PulsarSource", "parallel_rebuild", "parallel_verify", "peak_rss"]

log = logging.getLogger("chainfold.engines.parallel")

PROGRESS_EVERY = 16384


def _progress(task: int) -> Stops:
    return Stops().every(PROGRESS_EVERY, lambda n, _e: publish_progress(task, n))


# --- rebuild ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _IndexSpec:
    """Where a worker keeps the event ids it folds: a dedup index of its own in ``folder``, on top
    of the snapshot's ``manifest`` (pieces in the topic's dedup folder)."""

    topic_dir: str
    memory_bytes: int
    folder: str
    manifest: dict[str, Any] | None

    def open(self) -> Any:
        return DedupFolder(self.topic_dir, self.memory_bytes).on(self.folder, self.manifest)


@dataclass
class _FoldTask:
    """Fold one partition (``shard=None``) or one key shard of it, from the snapshot if any; the
    task with ``hasher`` also hashes, checks against the record and records."""

    task: int
    source: LogSource
    model: str
    options: RebuildOptions
    snapshot_path: str | None
    partition: str
    segment_size: int
    shard: tuple[int, int] | None
    hasher: bool
    index: _IndexSpec

    def _start(self, elog: EventLog, model: Any) -> tuple[Folder, ChainBuilder | None, Any]:
        """The folder (this shard's states; the event ids of the snapshot under its own index),
        chain and position."""
        opts, sh = self.options, self.shard
        if self.snapshot_path is None:
            return Folder(model, seen=self.index.open(), streams=opts.streams, shard=sh,
                          on_error=opts.on_model_error), None, None
        snap = SnapshotStore(opts.snapshots_root, elog.topic).load(self.snapshot_path)

        def mine(s: str) -> bool:
            return (sh is None or Shard(*sh).of(s) == sh[0]) and (opts.streams is None or s in opts.streams)

        states = {s: model.load_state(v) for s, v in snap.states.items() if mine(s)}
        pos = next(p for p in snap.partitions if p.partition == self.partition)
        chain = ChainBuilder.from_state(pos.chain) if pos.entries else None
        after = elog.position(pos.message_id) if pos.message_id else None
        folder = Folder(model, states, self.index.open(), streams=opts.streams, shard=sh,
                        on_error=opts.on_model_error, seqs=SeqGaps.restore(snap.seqs).fork())
        folder.fold.resume((k for k in snap.skipped if mine(k.stream)), keep=False)  # the caller lists them
        return folder, chain, after

    def _hasher(self, elog: EventLog, chain: ChainBuilder | None) -> HashStage | None:
        if not self.hasher:
            return None
        record = PartitionRecord(topic_dir(self.options.snapshots_root, elog.topic), self.partition)
        return HashStage.open(elog, self.partition, record=record, chain=chain, segment_size=self.segment_size,
                              write=not self.options.bounded)

    def __call__(self) -> Outcome:
        return run_task(self.task, self.source, self._fold)

    def _fold(self, elog: EventLog, out: Outcome) -> None:
        opts = self.options
        folder, chain, after = self._start(elog, load_model(self.model))
        try:
            before = dict(folder.states)
            hasher = self._hasher(elog, chain)
            source = Source(elog, Span(self.partition, after=after, until=opts.until, until_time=opts.until_time))
            folder.index = chain.size if chain is not None else 0
            try:
                run_pass(source, start=folder.index, hasher=hasher, decoder=folder.decoder, fold=folder.fold,
                         stops=_progress(self.task))
                if hasher is not None:
                    out.scan = hasher.finish(source, read_to_end=not opts.bounded)
            except ModelError as exc:
                out.failed(exc)
            finally:
                if hasher is not None:
                    hasher.flush()
            out.read = source.read
            out.take(folder, before)
        finally:
            folder.seen.close()  # type: ignore[attr-defined]


def parallel_rebuild(source: EventLog | LogSource, model: str, options: RebuildOptions | None = None, /, *,
                     workers: int, split: str = "fanout", on_progress: Callable[[int], None] | None = None,
                     **changes: Any) -> RebuildResult:
    """:func:`chainfold.ops.rebuild.rebuild` in ``workers`` processes (see the module docstring).

    ``model`` is a model reference (``package.module:attr`` or ``file.py:attr``): each worker loads
    it. ``options`` (or its fields as keywords) as for :func:`~chainfold.ops.rebuild.rebuild`.
    ``split`` says how one topic is shared out: ``"fanout"`` (this process reads and hashes,
    ``workers`` processes decode and fold their key shards) or ``"readers"`` (every worker reads
    the topic and folds its key shard; worker 0 hashes). The result is the serial one; periodic
    snapshots are not taken, only the final one.
    """
    if split not in ("fanout", "readers"):
        raise InvalidArgument(f"split must be 'fanout' or 'readers', not {split!r}")
    opts = RebuildOptions.of(options, **changes)
    source = as_source(source)
    if workers <= 1:
        with contextlib.closing(source()) as elog:
            return rebuild(elog, load_model(model), opts, on_progress=on_progress)
    elog = source()
    try:
        loaded = load_model(model)
        run = RebuildRun(plan_rebuild(elog, loaded, opts), on_progress)

        def serially(why: str) -> RebuildResult:
            log.warning("parallel rebuild of %s not possible (%s): rebuilding serially", elog.topic, why)
            run.close()  # its dedup index: the serial rebuild opens its own
            result = rebuild(elog, loaded, opts, on_progress=on_progress)
            result.notes.append(f"rebuilt serially: {why}")
            return result

        try:
            if any(run.lost_start(p) for p in run.plan.parts):
                return serially("the log lost entries no snapshot covers (folded from where it starts now)")
            if len(run.plan.parts) == 1 and split == "fanout":
                return _fan_out(run, elog, model, workers, serially)
            return _fold_in_tasks(run, source, model, workers, serially)
        finally:
            run.close()
    finally:
        elog.close()


def _index_specs(run: RebuildRun, scratch: Scratch, n: int) -> list[_IndexSpec]:
    """Where each of ``n`` workers keeps the ids it folds: a folder of its own in ``scratch``."""
    snap = run.plan.snapshot
    tdir = str(run.dedup.dir.parent)
    return [_IndexSpec(tdir, run.dedup.memory_bytes, str(scratch.path / f"w{i}"), snap.dedup if snap else None)
            for i in range(n)]


def _absorb_ids(run: RebuildRun, specs: list[_IndexSpec], outcomes: list[Outcome]) -> bool:
    """Add the ids the workers folded to the run's index; False when one was folded by two."""
    return run.seen.absorb([(spec.folder, o.dedup) for spec, o in zip(specs, outcomes) if o.dedup is not None])


def _fold_in_tasks(run: RebuildRun, source: LogSource, model: str, workers: int,
                   serially: Callable[[str], RebuildResult]) -> RebuildResult:
    """One task per partition, or (one partition, ``readers``) one per key shard."""
    with Scratch(run.dedup.scratch_dir) as scratch:
        plan = run.plan
        parts = plan.parts
        common = dict(source=source, model=model, options=plan.options, snapshot_path=plan.snapshot_path,
                      segment_size=plan.segment_size)
        specs = _index_specs(run, scratch, len(parts) if len(parts) > 1 else workers)
        if len(parts) > 1:
            tasks = [_FoldTask(i, partition=p, shard=None, hasher=True, index=specs[i], **common)
                     for i, p in enumerate(parts)]
        else:
            tasks = [_FoldTask(i, partition=parts[0], shard=(i, workers), hasher=i == 0, index=specs[i], **common)
                     for i in range(workers)]
        outcomes = run_tasks(tasks, workers, run.on_progress, max if len(parts) == 1 else sum)
        errors = sorted(((parts.index(t.partition), o.error_index, o.error) for t, o in zip(tasks, outcomes)
                         if o.error is not None), key=lambda x: (x[0], x[1]))
        if errors:
            raise errors[0][2]  # type: ignore[misc]
        why = _conflicts(outcomes) or (None if _absorb_ids(run, specs, outcomes) else _TWICE)
    if why:
        return serially(why)
    folder = run.folder
    for o in outcomes:
        _absorb(folder, o)
    for p in parts:
        mine = [(t, o) for t, o in zip(tasks, outcomes) if t.partition == p]
        folder.malformed.extend(sorted((m for _, o in mine for m in o.malformed), key=lambda m: m.index))
        folder.duplicates.extend(sorted((d for _, o in mine for d in o.duplicates), key=lambda d: d.index))
        folder.skipped.extend(sorted((k for _, o in mine for k in o.skipped), key=lambda k: k.index))
        folder.seqs.join([o.seqs for _, o in mine if o.seqs is not None])
        folder.index = max(o.index for _, o in mine)
        scan = next(o.scan for t, o in mine if t.hasher)
        run.scanned(p, scan)
    result = run.finish()
    result.workers = min(workers, len(tasks))
    result.worker_peak_rss = peaks(outcomes)
    return result


def _absorb(folder: Folder, o: Outcome, load: Callable[[Any], Any] | None = None) -> None:
    """Merge a worker's states and counts into ``folder`` (its ids: :func:`_absorb_ids`)."""
    folder.states.update({s: load(v) for s, v in o.states.items()} if load else o.states)
    folder.fold.applied += o.applied


_TWICE = "one event id was folded in two shards or partitions"


def _conflicts(outcomes: list[Outcome]) -> str | None:
    """Why merging the workers' folds would differ from a serial fold, or None (one event id
    folded by two workers is found while their ids are merged: :func:`_absorb_ids`)."""
    misrouted = sum(o.misrouted for o in outcomes)
    if misrouted:
        return f"{misrouted} entr(ies) with a message key of another shard than their stream"
    streams: set[str] = set()
    for o in outcomes:
        if not streams.isdisjoint(o.states):
            return "a stream was folded by two workers (a stream in two partitions)"
        streams.update(o.states)
    return None


# --- rebuild, fanned out ---------------------------------------------------------------------------

_END = b""


class _Router:
    """Sends each entry, undecoded, as a :class:`~chainfold.replay.decode.Routed` batch to the fold
    worker of its key's shard; an entry without a key goes to every worker (only its stream's shard
    folds it). The ``forward`` stage of a fanned-out pass."""

    def __init__(self, conns: list[Any]) -> None:
        self.conns = conns
        self.shard = Shard(0, len(conns))
        self.index = 0

    def _send(self, s: int, indexes: Any, payloads: list[bytes], keys: list[str | None] | None) -> None:
        if payloads:
            self.conns[s].send_bytes(pickle.dumps((indexes, payloads, keys), protocol=5))

    def __call__(self, entries: list[Entry], start: int) -> None:
        n = len(self.conns)
        self.index = start + len(entries)
        if n == 1:
            self._send(0, array("q", range(start, self.index)), [e.payload for e in entries], None)
            return
        idx: list[array] = [array("q") for _ in range(n)]
        pays: list[list[bytes]] = [[] for _ in range(n)]
        keys: list[list[str | None]] = [[] for _ in range(n)]
        of = self.shard.of
        for i, e in enumerate(entries, start):
            key = e.key
            for s in (range(n) if key is None else (of(key),)):
                idx[s].append(i)
                pays[s].append(e.payload)
                keys[s].append(key)
        for s in range(n):
            self._send(s, idx[s], pays[s], keys[s])


def _fold_worker(conn: Any, model_ref: str, shard: tuple[int, int], streams: frozenset[str] | None,
                 on_error: OnModelError) -> None:
    """A fold worker of a fanned-out rebuild: the starting states of its shard, where to keep its
    event ids, the snapshot's skipped events of its shard and its streams' highest seqs, then routed
    batches, then the end; answers with its :class:`~chainfold.engines.pool.Outcome` (the events it
    skipped itself, its seq check)."""
    out = Outcome(shard[0])
    try:
        model = load_model(model_ref)
        dumped, spec, skipped, highest = pickle.loads(conn.recv_bytes())
        states = {s: model.load_state(v) for s, v in dumped.items()}
        before = dict(states)
        folder = Folder(model, states, spec.open(), streams=streams, shard=shard, on_error=on_error,
                        seqs=SeqGaps(highest))
        folder.fold.resume(skipped, keep=False)
        try:
            while (msg := conn.recv_bytes()) != _END:
                if out.error is not None:
                    continue  # keep draining: the reader must not block
                try:
                    folder.feed_routed(Routed(*pickle.loads(msg)))
                except ModelError as exc:
                    out.failed(exc)
            out.take(folder, before, dump=model.dump_state)
        finally:
            folder.seen.close()  # type: ignore[attr-defined]
    except ChainfoldError as exc:
        out.failed(exc)
    conn.send_bytes(pickle.dumps(out.finish(), protocol=5))
    conn.close()


@contextlib.contextmanager
def _fold_workers(run: RebuildRun, model_ref: str, specs: list[_IndexSpec]):  # type: ignore[no-untyped-def]
    """A fold process per spec, each given its shard's states and where to keep its event ids;
    yields their connections, and on leaving collects nothing but makes sure they are gone."""
    workers = len(specs)
    ctx = context()
    folder, model = run.folder, run.plan.model
    procs, conns = [], []
    try:
        for i in range(workers):
            mine, theirs = ctx.Pipe()
            opts = run.plan.options
            proc = ctx.Process(target=_fold_worker, args=(theirs, model_ref, (i, workers), opts.streams,
                                                          opts.on_model_error), daemon=True)
            proc.start()
            theirs.close()
            procs.append(proc)
            conns.append(mine)
        shard = Shard(0, workers)
        for i, conn in enumerate(conns):
            dumped = {s: model.dump_state(v) for s, v in folder.states.items() if shard.of(s) == i}
            skipped = [k for k in folder.skipped if shard.of(k.stream) == i]
            highest = {s: v for s, v in folder.seqs.highest.items() if shard.of(s) == i}
            conn.send_bytes(pickle.dumps((dumped, specs[i], skipped, highest), protocol=5))
        yield conns
    finally:
        for conn in conns:
            conn.close()
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()


def _fan_out(run: RebuildRun, elog: EventLog, model_ref: str, workers: int,
             serially: Callable[[str], RebuildResult]) -> RebuildResult:
    """Rebuild one topic: read and hash here, decode and fold in ``workers`` shard processes."""
    p = run.plan.parts[0]
    with Scratch(run.dedup.scratch_dir) as scratch:
        specs = _index_specs(run, scratch, workers)
        scan, outcomes, routed_to = _route(run, model_ref, specs)
        _raise_first_error(elog, scan, outcomes)
        why = _conflicts(outcomes) or (None if _absorb_ids(run, specs, outcomes) else _TWICE)
    if why:
        return serially(why)
    _merge_routed(run, elog, scan, outcomes)
    run.folder.index = routed_to
    run.scanned(p, scan)
    result = run.finish()
    result.workers = workers
    result.worker_peak_rss = peaks(outcomes)
    return result


def _route(run: RebuildRun, model_ref: str, specs: list[_IndexSpec]) -> tuple[PartitionScan, list[Outcome], int]:
    """Read and hash the one partition here, routing its entries to a fold process per spec: the
    scan, the workers' outcomes and the log index after the last entry routed."""
    p = run.plan.parts[0]
    with _fold_workers(run, model_ref, specs) as conns:
        hasher, source = run.hash_stage(p), run.source(p)
        router = _Router(conns)
        stops = Stops()
        if run.on_progress is not None:
            stops.every(PROGRESS_EVERY, lambda n, _e: run.on_progress(n))  # type: ignore[misc]
        try:
            run_pass(source, start=hasher.chain.size, hasher=hasher, forward=router, stops=stops)
        finally:
            hasher.flush()
        scan = hasher.finish(source, read_to_end=not run.plan.options.bounded)
        for conn in conns:
            conn.send_bytes(_END)
        outcomes: list[Outcome] = []
        for conn in conns:
            try:
                outcomes.append(pickle.loads(conn.recv_bytes()))
            except EOFError:
                raise WorkerFailed("a fold worker of the parallel rebuild died") from None
    return scan, outcomes, router.index


def _names(elog: EventLog, scan: PartitionScan, names: list[str]) -> dict[str, str]:
    """Message ids for ``@index`` names (one read of the log)."""
    at = positions_at(elog, scan, [i for i in map(unresolved_index, names) if i is not None])
    return {f"@{i}": str(pos) for i, pos in at.items()}


def _raise_first_error(elog: EventLog, scan: PartitionScan, outcomes: list[Outcome]) -> None:
    errors = sorted(((o.error_index, o.error) for o in outcomes if o.error is not None), key=lambda x: x[0])
    if not errors:
        return
    exc = errors[0][1]
    if isinstance(exc, ModelError) and exc.message_id and exc.message_id.startswith("@"):
        mid = _names(elog, scan, [exc.message_id]).get(exc.message_id, exc.message_id)
        raise ModelError(exc.stream, exc.event_id, mid, exc.cause, index=exc.index)
    raise exc  # type: ignore[misc]


def _merge_routed(run: RebuildRun, elog: EventLog, scan: PartitionScan, outcomes: list[Outcome]) -> None:
    """Merge the fold workers' results, naming their malformed and duplicated entries."""
    folder, model = run.folder, run.plan.model
    names = _names(elog, scan, [m.message_id for o in outcomes for m in o.malformed]
                   + [d.message_id for o in outcomes for d in o.duplicates]
                   + [k.message_id for o in outcomes for k in o.skipped]
                   + [g.message_id for o in outcomes if o.seqs is not None for g in o.seqs.gaps])
    for o in outcomes:
        _absorb(folder, o, model.load_state)
        if o.seqs is not None:
            o.seqs.gaps = [dataclasses.replace(g, message_id=names.get(g.message_id, g.message_id)) for g in o.seqs.gaps]
    folder.seqs.join([o.seqs for o in outcomes if o.seqs is not None])
    folder.malformed.extend(sorted((dataclasses.replace(m, message_id=names.get(m.message_id, m.message_id))
                                    for o in outcomes for m in o.malformed), key=lambda m: m.index))
    folder.duplicates.extend(sorted((dataclasses.replace(d, message_id=names.get(d.message_id, d.message_id))
                                     for o in outcomes for d in o.duplicates), key=lambda d: d.index))
    folder.skipped.extend(sorted((dataclasses.replace(k, message_id=names.get(k.message_id, k.message_id))
                                  for o in outcomes for k in o.skipped), key=lambda k: k.index))


# --- verify ----------------------------------------------------------------------------------------


@dataclass
class _VerifyTask:
    """Hash one partition, or segments ``[first, end)`` of the only one (``end`` recorded)."""

    task: int
    source: LogSource
    options: VerifyOptions
    partition: str
    segment_size: int
    probes: list[int]
    recorded: list[Checkpoint] | None  # the recorded full segments, for a range
    first: int = 0
    end: int = 0

    def _span(self, elog: EventLog) -> tuple[Span, ChainBuilder | None]:
        rec = self.recorded
        if rec is None:  # a whole partition
            return Span(self.partition), None
        chain = ChainBuilder.after_segments(rec[: self.first]) if self.first else ChainBuilder(self.segment_size)
        after = elog.position(rec[self.first - 1].last) if self.first else None  # type: ignore[arg-type]
        return Span(self.partition, after=after, until=elog.position(rec[self.end - 1].last)), chain  # type: ignore[arg-type]

    def __call__(self) -> Outcome:
        return run_task(self.task, self.source, self._hash)

    def _hash(self, elog: EventLog, out: Outcome) -> None:
        span, chain = self._span(elog)
        out.seqs = SeqGaps()  # this range's check, started empty: combined in log order (SeqGaps.then)
        decoder = seq_decoder(out.seqs)
        out.scan = hash_partition(elog, span, record=self.options.record(self.partition), chain=chain,
                                  segment_size=self.segment_size, write=self.recorded is None,
                                  probes=self.probes, on_progress=lambda n: publish_progress(self.task, n),
                                  decoder=decoder)
        out.read = out.scan.read
        out.malformed = decoder.malformed


def _merge_scans(part: str, scans: list[PartitionScan]) -> PartitionScan:
    """One scan of the whole partition from consecutive scans of its ranges (the last one holds the
    chain at the end of the log)."""
    last = scans[-1]
    merged = PartitionScan(part, last.chain, recorded=last.recorded, record_error=last.record_error)
    for s in scans:
        merged.checkpoints.extend(s.checkpoints)
        merged.probed.update(s.probed)
        merged.redelivered += s.redelivered
        merged.read += s.read
        merged.recorded_new += s.recorded_new
    merged.mismatch = next((s.mismatch for s in scans if s.mismatch is not None), None)
    merged.last = last.last if last.last is not None else next(
        (s.last for s in reversed(scans) if s.last is not None), None)
    return merged


def _scans(outcomes: list[Outcome], report: VerifyReport) -> list[PartitionScan]:
    """The tasks' scans, in order; their seq checks and malformed entries go into ``report``."""
    for o in outcomes:
        if o.error is not None:
            raise o.error
    for o in outcomes:
        if o.seqs is not None:
            report.history.seqs.then(o.seqs)
        report.malformed.extend(o.malformed)
    return [o.scan for o in outcomes]


def _truncated(elog: EventLog, opts: VerifyOptions, parts: list[str]) -> str | None:
    """The first partition that lost recorded entries (verified serially), or None."""
    for p in parts:
        record = opts.record(p)
        recorded = record.load() if record is not None and not opts.reset else []
        if isinstance(locate_truncation(elog, p, recorded, record, earliest(elog, p)), Truncation):
            return p
    return None


def parallel_verify(source: EventLog | LogSource, options: VerifyOptions | None = None, /, *, workers: int,
                    on_progress: Callable[[int], None] | None = None, **changes: Any) -> VerifyReport:
    """:func:`chainfold.ops.verify.verify_log` in ``workers`` processes (see the module docstring).
    ``options`` (:class:`~chainfold.ops.verify.VerifyOptions`) or its fields as keywords."""
    opts = VerifyOptions(**changes) if options is None else options
    source = as_source(source)
    elog = source()
    try:
        if workers <= 1:
            return verify_log(elog, opts, on_progress=on_progress)
        parts = elog.partitions()
        lost = _truncated(elog, opts, parts)
        if lost is not None:
            serial = verify_log(elog, opts, on_progress=on_progress)
            serial.notes.append(f"verified serially: {lost} lost recorded entries")
            return serial
        report = VerifyReport(elog.topic, [], history=History(allow_partial=opts.allow_partial_history))
        probes = snapshot_probes(opts.snapshots_root, elog.topic)
        recorded = {}
        for part in parts:
            record = prepare_record(opts, part, report)
            recorded[part] = record.load() if record is not None else []
        if len(parts) > 1:
            tasks = [_VerifyTask(i, source, opts, p, opts.segment_size, [e for e, _, _ in probes.get(p, [])], None)
                     for i, p in enumerate(parts)]
            outcomes = run_tasks(tasks, workers, on_progress, sum)
            for p, scan in zip(parts, _scans(outcomes, report)):
                conclude_partition(report, p, scan, probes.get(p, []))
            report.workers = min(workers, len(tasks))
            report.worker_peak_rss = peaks(outcomes)
            return report
        return _verify_ranges(elog, source, replace(opts, reset=False), report, recorded[parts[0]],
                              probes.get(parts[0], []), workers, on_progress)
    finally:
        elog.close()


def _verify_ranges(elog: EventLog, source: LogSource, opts: VerifyOptions, report: VerifyReport,
                   recorded: list[Checkpoint], mine: list[tuple[int, dict, str]], workers: int,
                   on_progress: Callable[[int], None] | None) -> VerifyReport:
    """Verify one partition: its recorded full segments in ``workers`` ranges, then the rest here."""
    part = elog.partitions()[0]
    full = [c for c in recorded if c.full]
    S = full[0].segment_size if full else opts.segment_size
    n_ranges = min(workers, len(full))
    if n_ranges < 2:  # nothing (or too little) recorded to split by: one pass
        serial = verify_log(elog, opts, on_progress=on_progress)
        serial.notes[:0] = report.notes
        return serial
    bounds = [len(full) * i // n_ranges for i in range(n_ranges + 1)]
    tasks = []
    for i in range(n_ranges):
        lo, hi = bounds[i] * S, bounds[i + 1] * S
        tasks.append(_VerifyTask(i, source, opts, part, S, [e for e, _, _ in mine if lo < e <= hi or e == lo == 0],
                                 full, bounds[i], bounds[i + 1]))
    outcomes = run_tasks(tasks, n_ranges, on_progress, sum)
    scans = _scans(outcomes, report)
    odd = next((f"range {i} read {s.read} entries, {(t.end - t.first) * S} recorded"
                for i, (s, t) in enumerate(zip(scans, tasks)) if s.mismatch is not None or s.read != (t.end - t.first) * S),
               None)
    if odd is not None:  # the log differs from its record: name the first difference exactly
        log.info("verify %s: %s; verifying serially", elog.topic, odd)
        return verify_log(elog, opts, on_progress=on_progress)
    # The entries after the recorded segments: hashed, checked and recorded here.
    done = len(full) * S
    decoder = seq_decoder(report.history.seqs)  # continues the ranges' combined check
    decoder.index = done
    tail = hash_partition(elog, Span(part, after=elog.position(full[-1].last)),  # type: ignore[arg-type]
                          record=opts.record(part), chain=ChainBuilder.after_segments(full), segment_size=S,
                          probes=[e for e, _, _ in mine if e > done],
                          on_progress=(lambda n: on_progress(done + n)) if on_progress is not None else None,
                          decoder=decoder)
    report.malformed.extend(decoder.malformed)
    conclude_partition(report, part, _merge_scans(part, scans + [tail]), mine)
    report.workers = n_ranges
    report.worker_peak_rss = peaks(outcomes)
    return report

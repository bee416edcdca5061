"""Replay in several worker processes, merged into the result a serial replay gives.

* **A partitioned topic**: one worker per partition (``workers`` at a time); each folds and hashes
  its partition, and records its checkpoints (every partition has its own record).
* **One topic, rebuild**: the streams are sharded on the message key (:func:`chainfold.replay.fold.shard_of`;
  a stream is its key, so streams never span shards and the states combine without conflict).
  Two ways to share the topic out (``split``):

  - ``"fanout"`` (default): this process reads the topic once, hashes it, checks it against the
    recorded checkpoints and records new ones (:func:`chainfold.hashing.scan.scan_partition`), and sends
    each payload, undecoded, to the fold worker of its key's shard; the workers decode and fold.
    Message ids are not sent: a worker names a malformed or duplicated entry by its log position,
    and this process looks the ids up afterwards (one read, from the first such entry).
  - ``"readers"``: every worker reads the whole topic and skips the other shards' entries without
    decoding them; worker 0 also hashes and records.

  An entry without a key is decoded by every worker and folded by its stream's shard only (and
  reported as malformed by shard 0 only).
* **One topic, verify**: the recorded full segments are split into ranges, one per worker; each
  worker reads its range only (from the recorded ``last`` message id of the segment before it),
  continuing the chain from the recorded checkpoints. The entries after the recorded ones are then
  hashed, checked and recorded here. A verify with nothing recorded yet runs serially.

Each worker opens its own broker connection (workers are started with ``forkserver``, never forked
from a process holding a pulsar client). The result equals the serial one. Where the parallel
replay cannot guarantee that (an entry whose key and stream fall in different shards, one event id
folded in two shards or partitions, a stream in two partitions, a range that does not match its
recorded segments), the work is done again serially and a note says why. A parallel rebuild takes
no periodic snapshots: only the one at the end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import multiprocessing
import os
import pickle
import resource
from array import array
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..log.broker import BrokerOptions
from ..hashing.chain import ZERO_HEAD, ChainBuilder, Checkpoint
from ..errors import ChainfoldError, ModelError
from ..replay.fold import Duplicate, Folder, Malformed, load_model, shard_of, unresolved_index
from ..log import EventLog, MessageId
from ..merkle import CompactRange
from ..ops.rebuild import RebuildResult, _prepare, rebuild
from ..hashing.scan import DEFAULT_SEGMENT_SIZE, PartitionRecord, PartitionScan, scan_partition
from ..store.snapshots import SnapshotStore, topic_dir
from ..ops.verify import VerifyReport, _snapshot_probes, conclude_partition, verify_log

__all__ = ["LogSource", "PulsarSource", "parallel_rebuild", "parallel_verify", "chain_at", "peak_rss"]

log = logging.getLogger("chainfold.engines.parallel")

LogSource = Callable[[], EventLog]
"""A picklable callable that opens the log, called once in each worker (and in the caller)."""


@dataclass(frozen=True)
class PulsarSource:
    """Opens ``topic`` on the broker of ``broker`` (each call: a new connection)."""

    topic: str
    broker: BrokerOptions

    def __call__(self) -> EventLog:
        from ..log.pulsar import open_log

        return open_log(self.topic, self.broker)


@dataclass(frozen=True)
class _Given:
    """A log that travels to the workers by pickling (an in-memory log, in tests)."""

    elog: EventLog

    def __call__(self) -> EventLog:
        return self.elog


def _as_source(source: EventLog | LogSource) -> LogSource:
    if isinstance(source, EventLog):
        try:
            pickle.dumps(source)
        except Exception as exc:
            raise TypeError(f"{type(source).__name__} cannot be sent to worker processes; pass a "
                            "LogSource such as PulsarSource(topic, broker)") from exc
        return _Given(source)
    return source


def peak_rss() -> int:
    """This process's peak resident memory in bytes (``VmHWM``; ``ru_maxrss`` where there is none)."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# --- the worker pool ------------------------------------------------------------------------------

_progress: Any = None  # per-task entry counters, shared with the parent (set in each worker)


def _init_worker(counters: Any) -> None:
    global _progress
    _progress = counters


def _context() -> multiprocessing.context.BaseContext:
    methods = multiprocessing.get_all_start_methods()
    if "forkserver" in methods:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["chainfold.engines.parallel"])
        return ctx
    return multiprocessing.get_context("spawn")


@dataclass
class _Outcome:
    """What one worker task sends back."""

    task: int
    pid: int = 0
    peak_rss: int = 0
    scan: PartitionScan | None = None
    states: dict[str, Any] = field(default_factory=dict)  # streams this task folded into
    seen: set[str] = field(default_factory=set)  # event ids this task folded
    malformed: list[Malformed] = field(default_factory=list)
    duplicates: list[Duplicate] = field(default_factory=list)
    applied: int = 0
    index: int = 0
    misrouted: int = 0
    read: int = 0
    error: ChainfoldError | None = None
    error_index: int = 0


def _portable(exc: ChainfoldError) -> ChainfoldError:
    """``exc`` if it survives pickling, else a plain error with its message and exit code."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        if isinstance(exc, ModelError):
            cause: BaseException = exc.cause
            try:
                pickle.loads(pickle.dumps(cause))
            except Exception:
                cause = RuntimeError(f"{type(exc.cause).__name__}: {exc.cause}")
            return _ModelErrorCopy(exc.stream, exc.event_id, exc.message_id, cause)
        err = ChainfoldError(str(exc))
        err.exit_code = exc.exit_code
        return err


class _ModelErrorCopy(ModelError):
    """A :class:`ModelError` that pickles (its constructor takes several arguments)."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_ModelErrorCopy, (self.stream, self.event_id, self.message_id, self.cause))


def _run(tasks: Sequence[Any], workers: int, on_progress: Callable[[int], None] | None,
         progress_of: Callable[[list[int]], int]) -> list[_Outcome]:
    """Run ``tasks`` (each a callable returning an :class:`_Outcome`) in up to ``workers`` processes."""
    ctx = _context()
    counters = ctx.Array("q", len(tasks), lock=False)
    outcomes: list[_Outcome] = []
    with ProcessPoolExecutor(max_workers=max(1, min(workers, len(tasks))), mp_context=ctx,
                             initializer=_init_worker, initargs=(counters,)) as pool:
        futures = [pool.submit(_call, task) for task in tasks]
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=0.25, return_when=FIRST_EXCEPTION)
            if on_progress is not None:
                on_progress(progress_of(list(counters)))
            for f in done:
                exc = f.exception()
                if exc is not None:
                    pool.shutdown(wait=False, cancel_futures=True)
                    raise exc
        outcomes = [f.result() for f in futures]
    if on_progress is not None:
        on_progress(progress_of([o.read for o in outcomes]))
    return outcomes


def _call(task: Callable[[], _Outcome]) -> _Outcome:
    out = task()
    out.pid = os.getpid()
    out.peak_rss = peak_rss()
    if out.error is not None:
        out.error = _portable(out.error)
    return out


def _counter(task: int, every: int = 16384) -> tuple[int, Callable[[int, Any], int]]:
    """``stops`` for :meth:`Folder.feed`: publish the entries read every ``every`` entries."""

    def stop(n: int, entry: Any) -> int:
        if _progress is not None:
            _progress[task] = n
        return n + every

    return every, stop


def _peaks(outcomes: list[_Outcome]) -> list[int]:
    by_pid: dict[int, int] = {}
    for o in outcomes:
        by_pid[o.pid] = max(by_pid.get(o.pid, 0), o.peak_rss)
    return list(by_pid.values())


# --- rebuild ---------------------------------------------------------------------------------------


@dataclass
class _FoldTask:
    """Fold one partition (``shard=None``) or one key shard of it, from the snapshot if any."""

    task: int
    source: LogSource
    model: str
    snapshots_root: str
    snapshot_path: str | None
    partition: str
    segment_size: int
    shard: tuple[int, int] | None
    hasher: bool  # hash, check against the record and record (one task per partition does)
    write_record: bool
    until: MessageId | None
    until_time: int | None
    streams: frozenset[str] | None

    def __call__(self) -> _Outcome:
        out = _Outcome(self.task)
        elog = self.source()
        try:
            model = load_model(self.model)
            states: dict[str, Any] = {}
            seen: set[str] = set()
            chain = after = None
            if self.snapshot_path is not None:
                snap = SnapshotStore(self.snapshots_root, elog.topic).load(self.snapshot_path)
                sh = self.shard
                states = {s: model.load_state(v) for s, v in snap.states.items()
                          if (sh is None or shard_of(s, sh[1]) == sh[0])
                          and (self.streams is None or s in self.streams)}
                seen = set(snap.seen)
                pos = next(p for p in snap.partitions if p.partition == self.partition)
                if pos.entries:
                    chain = ChainBuilder.from_state(pos.chain)
                if pos.message_id:
                    after = MessageId.parse(pos.message_id)
            before = dict(states)
            known = frozenset(seen)
            folder = Folder(model, states=states, seen=seen, streams=self.streams, shard=self.shard)
            try:
                if self.hasher:
                    record = PartitionRecord(topic_dir(Path(self.snapshots_root), elog.topic), self.partition)
                    progress = _counter(self.task)[1]
                    out.scan = scan_partition(
                        elog, self.partition, record=record, chain=chain, after=after, folder=folder,
                        segment_size=self.segment_size, until=self.until, until_time=self.until_time,
                        write_record=self.write_record, on_progress=lambda n: progress(n, None),
                    )
                    out.read = out.scan.read
                else:
                    folder.index = chain.size if chain is not None else 0
                    start = folder.index
                    reader = elog.read(self.partition, after=after, until=self.until, until_time=self.until_time)
                    folder.feed(reader, stops=_counter(self.task))
                    out.read = folder.index - start
            except ModelError as exc:
                out.error = exc
                out.error_index = folder.index
            out.states = {s: v for s, v in folder.states.items() if before.get(s, _NONE) is not v}
            out.seen = folder.seen - known if known else folder.seen
            out.malformed = folder.malformed
            out.duplicates = folder.duplicates
            out.applied = folder.applied
            out.index = folder.index
            out.misrouted = folder.misrouted
        except ChainfoldError as exc:
            if out.error is None:
                out.error = exc
        finally:
            elog.close()
        if _progress is not None:
            _progress[self.task] = out.read
        return out


_NONE = object()


def parallel_rebuild(
    source: EventLog | LogSource,
    model: str,
    *,
    workers: int,
    snapshots_root: Path,
    full: bool = False,
    until: MessageId | None = None,
    until_time: int | None = None,
    keep: int = 3,
    write_snapshots: bool = True,
    segment_size: int = DEFAULT_SEGMENT_SIZE,
    streams: frozenset[str] | None = None,
    on_progress: Callable[[int], None] | None = None,
    split: str = "fanout",
) -> RebuildResult:
    """:func:`chainfold.ops.rebuild.rebuild` in ``workers`` processes (see the module docstring).

    ``model`` is a model reference (``package.module:attr`` or ``file.py:attr``): each worker loads
    it. ``split`` says how one topic is shared out: ``"fanout"`` (this process reads and hashes,
    ``workers`` processes decode and fold their key shards) or ``"readers"`` (every worker reads
    the topic and folds its key shard; worker 0 hashes). The result is the serial one; periodic
    snapshots are not taken, only the final one.
    """
    if split not in ("fanout", "readers"):
        raise ValueError(f"split must be 'fanout' or 'readers', not {split!r}")
    source = _as_source(source)
    if workers <= 1:
        with contextlib.closing(source()) as elog:
            return rebuild(elog, load_model(model), snapshots_root=snapshots_root, full=full, until=until,
                           until_time=until_time, keep=keep, write_snapshots=write_snapshots,
                           segment_size=segment_size, streams=streams, on_progress=on_progress)
    elog = source()
    try:
        loaded = load_model(model)
        replay = _prepare(
            elog, loaded, snapshots_root=snapshots_root, full=full, until=until, until_time=until_time,
            snapshot_every=0, keep=keep, write_snapshots=write_snapshots, segment_size=segment_size,
            streams=streams, max_snapshot_entries=None, on_progress=on_progress,
        )
        parts = replay.parts
        snapshot_path = replay.result.snapshot_path if replay.chosen is not None else None
        write_record = until is None and until_time is None

        def _serially(why: str) -> RebuildResult:
            log.warning("parallel rebuild of %s not possible (%s): rebuilding serially", elog.topic, why)
            result = rebuild(elog, loaded, snapshots_root=snapshots_root, full=full, until=until,
                             until_time=until_time, keep=keep, write_snapshots=write_snapshots,
                             segment_size=segment_size, streams=streams, on_progress=on_progress)
            result.notes.append(f"rebuilt serially: {why}")
            return result

        if len(parts) == 1 and split == "fanout":
            return _fan_out(replay, elog, model, workers, write_record, streams, _serially)

        tasks: list[_FoldTask] = []
        if len(parts) > 1:
            for p in parts:
                tasks.append(_FoldTask(len(tasks), source, model, str(snapshots_root), snapshot_path, p,
                                       replay.seg, None, True, write_record, until, until_time, streams))
        else:
            for i in range(workers):
                tasks.append(_FoldTask(len(tasks), source, model, str(snapshots_root), snapshot_path, parts[0],
                                       replay.seg, (i, workers), i == 0, write_record, until, until_time, streams))
        sharded = len(parts) == 1
        outcomes = _run(tasks, workers, on_progress, max if sharded else sum)

        errors = sorted(((parts.index(t.partition), o.error_index, o.error) for t, o in zip(tasks, outcomes)
                         if o.error is not None), key=lambda x: (x[0], x[1]))
        if errors:
            raise errors[0][2]
        why = _conflicts(outcomes)
        if why:
            return _serially(why)

        folder = replay.folder
        for t, o in zip(tasks, outcomes):
            folder.states.update(o.states)
            folder.seen |= o.seen
            folder.applied += o.applied
        for p in parts:
            mine = [o for t, o in zip(tasks, outcomes) if t.partition == p]
            folder.malformed.extend(sorted((m for o in mine for m in o.malformed), key=lambda m: m.index))
            folder.duplicates.extend(sorted((d for o in mine for d in o.duplicates), key=lambda d: d.index))
            folder.index = max(o.index for o in mine)
            hasher = next(o for t, o in zip(tasks, outcomes) if t.partition == p and t.hasher)
            assert hasher.scan is not None
            replay.scanned(p, hasher.scan)
        result = replay.finish()
        result.workers = min(workers, len(tasks))
        result.worker_peak_rss = _peaks(outcomes)
        return result
    finally:
        elog.close()


_BATCH = 2048  # entries per message to a fold worker
_END = b""


class _Router:
    """The reading side of a fanned-out rebuild, in the place of the :class:`~chainfold.replay.fold.Folder`
    that :func:`~chainfold.hashing.scan.scan_partition` feeds: it hashes each entry (as ``Folder.feed``
    does) and sends ``(index, payload, key)`` to the fold worker of the key's shard, in batches;
    an entry without a key goes to every worker (only its stream's shard folds it)."""

    def __init__(self, conns: list[Any]) -> None:
        self.conns = conns
        self.index = 0

    def feed(self, entries: Any, *, trace: Any = None, hasher: Any = None,
             stops: tuple[int, Callable[[int, Any], int]] | None = None) -> None:
        if trace is not None:
            raise ValueError("a fanned-out rebuild cannot trace")
        conns = self.conns
        n_shards = len(conns)
        one = n_shards == 1
        idx: list[array] = [array("q") for _ in conns]
        pays: list[list[bytes]] = [[] for _ in conns]
        keys: list[list[str | None]] = [[] for _ in conns]
        shard_cache: dict[str, int] = {}
        sha = hashlib.sha256
        add_leaf = hasher.chain.add_leaf
        leaves_add = hasher.leaves.append
        entries_add = hasher.entries.append
        close_segment = hasher.close_segment
        lazy = hasher.lazy_ids
        next_stop, on_stop = stops if stops is not None else (-1, None)
        dumps = pickle.dumps
        index = self.index
        n = 0

        def send(s: int) -> None:
            conns[s].send_bytes(dumps((idx[s], pays[s], None if one else keys[s]), protocol=5))
            idx[s] = array("q")
            pays[s] = []
            keys[s] = []

        try:
            for entry in entries:
                payload = entry.payload
                n += 1
                leaf = sha(b"\x00" + payload).digest()
                leaves_add(leaf)
                entries_add(entry)
                cp = add_leaf(leaf, entry if lazy else entry.message_id)
                if cp is not None:
                    close_segment(cp)
                if one:
                    s = 0
                else:
                    key = entry.key
                    if key is None:
                        for t in range(n_shards):
                            idx[t].append(index)
                            pays[t].append(payload)
                            keys[t].append(None)
                            if len(idx[t]) >= _BATCH:
                                send(t)
                        index += 1
                        if n == next_stop:
                            next_stop = on_stop(n, entry)  # type: ignore[misc]
                        continue
                    s = shard_cache.get(key)  # type: ignore[assignment]
                    if s is None:
                        if len(shard_cache) > 100_000:
                            shard_cache.clear()
                        s = shard_cache[key] = shard_of(key, n_shards)
                    keys[s].append(key)
                ix = idx[s]
                ix.append(index)
                pays[s].append(payload)
                if len(ix) >= _BATCH:
                    send(s)
                index += 1
                if n == next_stop:
                    next_stop = on_stop(n, entry)  # type: ignore[misc]
        finally:
            self.index = index
            for s in range(n_shards):
                if idx[s]:
                    send(s)


def _fold_worker(conn: Any, model_ref: str, shard: tuple[int, int] | None, streams: frozenset[str] | None) -> None:
    """A fold worker of a fanned-out rebuild: the starting states and seen ids, then batches of
    ``(index, payload, key)``, then the end; answers with its :class:`_Outcome`."""
    from itertools import repeat

    out = _Outcome(shard[0] if shard else 0)
    try:
        model = load_model(model_ref)
        dumped, seen = pickle.loads(conn.recv_bytes())
        states = {s: model.load_state(v) for s, v in dumped.items()}
        before = dict(states)
        known = frozenset(seen)
        folder = Folder(model, states=states, seen=seen, streams=streams, shard=shard)
        while True:
            msg = conn.recv_bytes()
            if msg == _END:
                break
            if out.error is not None:
                continue  # keep draining: the reader must not block
            idx, payloads, keys = pickle.loads(msg)
            try:
                folder.feed(zip(idx, payloads, keys if keys is not None else repeat(None)), routed=True)
            except ModelError as exc:
                out.error = exc
                out.error_index = folder.index
        out.states = {s: model.dump_state(v) for s, v in folder.states.items() if before.get(s, _NONE) is not v}
        out.seen = folder.seen - known if known else folder.seen
        out.malformed = folder.malformed
        out.duplicates = folder.duplicates
        out.applied = folder.applied
        out.misrouted = folder.misrouted
    except ChainfoldError as exc:
        out.error = exc
    out.pid = os.getpid()
    out.peak_rss = peak_rss()
    if out.error is not None:
        out.error = _portable(out.error)
    conn.send_bytes(pickle.dumps(out, protocol=5))
    conn.close()


def _fan_out(replay: Any, elog: EventLog, model_ref: str, workers: int, write_record: bool,
             streams: frozenset[str] | None, serially: Callable[[str], RebuildResult]) -> RebuildResult:
    """Rebuild one topic: read and hash here, decode and fold in ``workers`` shard processes."""
    ctx = _context()
    model = replay.model
    folder = replay.folder
    p = replay.parts[0]
    shards = [(i, workers) if workers > 1 else None for i in range(workers)]
    procs, conns = [], []
    try:
        for sh in shards:
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(target=_fold_worker, args=(theirs, model_ref, sh, streams), daemon=True)
            proc.start()
            theirs.close()
            procs.append(proc)
            conns.append(mine)
        for sh, conn in zip(shards, conns):
            dumped = {s: model.dump_state(v) for s, v in folder.states.items()
                      if sh is None or shard_of(s, sh[1]) == sh[0]}
            conn.send_bytes(pickle.dumps((dumped, folder.seen), protocol=5))
        chain, after = replay.start_of(p)
        start_first = chain.state().get("first") if chain is not None else None
        router = _Router(conns)
        scan = scan_partition(
            elog, p, record=replay.records[p], chain=chain, after=after, folder=router,  # type: ignore[arg-type]
            segment_size=replay.seg, until=replay.until, until_time=replay.until_time,
            on_progress=replay.on_progress, write_record=write_record,
        )
        for conn in conns:
            conn.send_bytes(_END)
        outcomes: list[_Outcome] = []
        for conn in conns:
            try:
                outcomes.append(pickle.loads(conn.recv_bytes()))
            except EOFError:
                raise RuntimeError("a fold worker of the parallel rebuild died") from None
    finally:
        for conn in conns:
            conn.close()
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()

    ids = _IndexResolver(elog, p, scan, start_first)
    errors = sorted((o.error_index, o.error) for o in outcomes if o.error is not None)
    if errors:
        exc = errors[0][1]
        if isinstance(exc, ModelError) and exc.message_id and exc.message_id.startswith("@"):
            raise _ModelErrorCopy(exc.stream, exc.event_id, ids.resolve([exc.message_id])[exc.message_id], exc.cause)
        raise exc  # type: ignore[misc]
    why = _conflicts(outcomes)
    if why:
        return serially(why)
    names = ids.resolve([m.message_id for o in outcomes for m in o.malformed]
                        + [d.message_id for o in outcomes for d in o.duplicates])
    for o in outcomes:
        folder.states.update({s: model.load_state(v) for s, v in o.states.items()})
        folder.seen |= o.seen
        folder.applied += o.applied
    folder.malformed.extend(sorted((dataclasses.replace(m, message_id=names.get(m.message_id, m.message_id))
                                    for o in outcomes for m in o.malformed), key=lambda m: m.index))
    folder.duplicates.extend(sorted((dataclasses.replace(d, message_id=names.get(d.message_id, d.message_id))
                                     for o in outcomes for d in o.duplicates), key=lambda d: d.index))
    folder.index = router.index
    replay.scanned(p, scan)
    result = replay.finish()
    result.workers = workers
    result.worker_peak_rss = _peaks(outcomes)
    return result


class _IndexResolver:
    """Message ids of entries known by log position only (``@index``): one read, from the first
    entry of the segment of the lowest position asked for."""

    def __init__(self, elog: EventLog, part: str, scan: PartitionScan, start_first: str | None) -> None:
        self.elog = elog
        self.part = part
        S = scan.chain.segment_size
        self.S = S
        self.firsts: dict[int, str] = {cp.segment: cp.first for cp in scan.checkpoints if cp.first is not None}
        pend = scan.chain.pending()
        if pend is not None and pend.first is not None:
            self.firsts[pend.segment] = pend.first
        self.start_first = start_first
        self.start_segment = (scan.chain.size - scan.read) // S

    def resolve(self, names: list[str]) -> dict[str, str]:
        wanted = sorted({i for i in (unresolved_index(n) for n in names) if i is not None})
        if not wanted:
            return {}
        k = wanted[0] // self.S
        first = self.firsts.get(k) or (self.start_first if k == self.start_segment else None)
        if first is None:
            return {}
        out: dict[str, str] = {}
        pos = k * self.S
        todo = set(wanted)
        for e in self.elog.read(self.part, start=MessageId.parse(first), limit=wanted[-1] - pos + 1):
            if pos in todo:
                out[f"@{pos}"] = str(e.message_id)
            pos += 1
        return out


def _conflicts(outcomes: list[_Outcome]) -> str | None:
    """Why merging the workers' folds would differ from a serial fold, or None."""
    misrouted = sum(o.misrouted for o in outcomes)
    if misrouted:
        return f"{misrouted} entr(ies) with a message key of another shard than their stream"
    streams: set[str] = set()
    for o in outcomes:
        if not streams.isdisjoint(o.states):
            return "a stream was folded by two workers (a stream in two partitions)"
        streams.update(o.states)
    ids: set[str] = set()
    total = 0
    for o in outcomes:
        total += len(o.seen)
        ids |= o.seen
        if len(ids) != total:
            return "one event id was folded in two shards or partitions"
    return None


# --- verify ----------------------------------------------------------------------------------------


@dataclass
class _VerifyTask:
    """Hash one partition, or segments ``[first, end)`` of the only one (``end`` recorded)."""

    task: int
    source: LogSource
    record_dir: str | None
    partition: str
    segment_size: int
    probes: list[int]
    recorded: list[Checkpoint] | None  # the recorded full segments, for a range
    first: int = 0
    end: int | None = None

    def __call__(self) -> _Outcome:
        out = _Outcome(self.task)
        elog = self.source()
        try:
            record = PartitionRecord(self.record_dir, self.partition) if self.record_dir is not None else None
            progress = _counter(self.task)[1]
            if self.recorded is None:  # a whole partition
                out.scan = scan_partition(elog, self.partition, record=record, segment_size=self.segment_size,
                                          probes=self.probes, on_progress=lambda n: progress(n, None))
            else:
                rec = self.recorded
                chain = chain_at(rec, self.first, self.segment_size)
                after = MessageId.parse(rec[self.first - 1].last) if self.first else None  # type: ignore[arg-type]
                until = MessageId.parse(rec[self.end - 1].last)  # type: ignore[arg-type,index]
                out.scan = scan_partition(elog, self.partition, record=record, chain=chain, after=after,
                                          until=until, segment_size=self.segment_size, write_record=False,
                                          probes=self.probes, on_progress=lambda n: progress(n, None))
            out.read = out.scan.read
        except ChainfoldError as exc:
            out.error = exc
        finally:
            elog.close()
        if _progress is not None:
            _progress[self.task] = out.read
        return out


def chain_at(recorded: list[Checkpoint], k: int, segment_size: int) -> ChainBuilder:
    """The chain after the first ``k`` recorded full segments, rebuilt from their checkpoints."""
    if k == 0:
        return ChainBuilder(segment_size)
    shift = segment_size.bit_length() - 1
    cr = CompactRange()
    for cp in recorded[:k]:
        cr.append_subtree(shift, cp.root)
    st = ChainBuilder(segment_size).state()
    st.update(size=k * segment_size, head=recorded[k - 1].head if k else ZERO_HEAD, segment_frontier=[],
              log_frontier=cr.frontier, first=recorded[k - 1].first, last=recorded[k - 1].last, last_leaf=None)
    return ChainBuilder.from_state(st)


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


def parallel_verify(
    source: EventLog | LogSource,
    record_dir: Path | None,
    *,
    workers: int,
    snapshots_root: Path | None = None,
    segment_size: int = DEFAULT_SEGMENT_SIZE,
    reset: bool = False,
    on_progress: Callable[[int], None] | None = None,
) -> VerifyReport:
    """:func:`chainfold.ops.verify.verify_log` in ``workers`` processes (see the module docstring)."""
    source = _as_source(source)
    elog = source()
    try:
        if workers <= 1:
            return verify_log(elog, record_dir, snapshots_root=snapshots_root, segment_size=segment_size,
                              reset=reset, on_progress=on_progress)
        parts = elog.partitions()
        report = VerifyReport(elog.topic, [])
        probes = _snapshot_probes(snapshots_root, elog.topic)
        recorded: dict[str, list[Checkpoint]] = {}
        for part in parts:
            record = PartitionRecord(record_dir, part) if record_dir is not None else None
            if record is not None and reset:
                record.reset()
                report.notes.append(f"{part}: recorded checkpoints reset")
            recorded[part] = record.load() if record is not None else []  # corrupt: bad input, as serially
        rd = str(record_dir) if record_dir is not None else None

        if len(parts) > 1:
            tasks = [_VerifyTask(i, source, rd, p, segment_size, [e for e, _, _ in probes.get(p, [])], None)
                     for i, p in enumerate(parts)]
            outcomes = _run(tasks, workers, on_progress, sum)
            for o in outcomes:
                if o.error is not None:
                    raise o.error
            for p, o in zip(parts, outcomes):
                assert o.scan is not None
                conclude_partition(report, p, o.scan, probes.get(p, []))
            report.workers = min(workers, len(tasks))
            report.worker_peak_rss = _peaks(outcomes)
            return report

        part = parts[0]
        full = [c for c in recorded[part] if c.full]
        S = full[0].segment_size if full else segment_size
        n_ranges = min(workers, len(full))
        if n_ranges < 2:  # nothing (or too little) recorded to split by: one pass
            serial = verify_log(elog, record_dir, snapshots_root=snapshots_root, segment_size=segment_size,
                                on_progress=on_progress)
            serial.notes[:0] = report.notes
            return serial
        bounds = [len(full) * i // n_ranges for i in range(n_ranges + 1)]
        mine = probes.get(part, [])
        tasks = []
        for i in range(n_ranges):
            lo, hi = bounds[i] * S, bounds[i + 1] * S
            tasks.append(_VerifyTask(i, source, rd, part, S, [e for e, _, _ in mine if lo < e <= hi or e == lo == 0],
                                     full, bounds[i], bounds[i + 1]))
        outcomes = _run(tasks, workers, on_progress, sum)
        for o in outcomes:
            if o.error is not None:
                raise o.error
        scans = [o.scan for o in outcomes]
        expected = [(t.end - t.first) * S for t in tasks]  # type: ignore[operator]
        odd = next((f"range {i} read {s.read} entries, {e} recorded" for i, (s, e) in enumerate(zip(scans, expected))
                    if s is not None and (s.mismatch is not None or s.read != e)), None)
        if odd is not None:  # the log differs from its record: name the first difference exactly
            log.info("verify %s: %s; verifying serially", elog.topic, odd)
            return verify_log(elog, record_dir, snapshots_root=snapshots_root, segment_size=segment_size,
                              on_progress=on_progress)
        # The entries after the recorded segments: hashed, checked and recorded here.
        R = len(full)
        done = R * S
        tail = scan_partition(elog, part, record=PartitionRecord(record_dir, part) if record_dir is not None else None,
                              chain=chain_at(full, R, S), after=MessageId.parse(full[R - 1].last),  # type: ignore[arg-type]
                              segment_size=S, probes=[e for e, _, _ in mine if e > done],
                              on_progress=(lambda n: on_progress(done + n)) if on_progress is not None else None)
        merged = _merge_scans(part, [s for s in scans if s is not None] + [tail])
        conclude_partition(report, part, merged, mine)
        report.workers = n_ranges
        report.worker_peak_rss = _peaks(outcomes)
        return report
    finally:
        elog.close()


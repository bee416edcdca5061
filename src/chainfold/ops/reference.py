"""Reconcile's reference, kept on disk: what a correct worker handles, and the worker's handling beside it.

The reference is the log's well-formed entries in log order, each event id once (at its first
entry): per partition, the sequence of (event id, log index, stream). Held in memory it costs about
a kilobyte per event with its indexes (1.2 GB at a million events), so it goes where memory does not
grow with the log: an SQLite database in a temporary folder (:class:`ReferenceDB`), written in
batches as the pass goes (``ref``: one row per reference event, in (partition, position) order) and
indexed once at the end (by event id, for the lookups of the few events a report names). The
worker's processed log is joined with it by event id in a partitioned hash join on disk
(:class:`~chainfold.ops.reference_join.HandlingJoin`: every row read and written a fixed number of
times, so the time is linear in the entries; index probes per handling were not); Python walks the
result in handling order keeping only per-partition and per-stream counters. Memory grows with
streams and with what is reported, never with entries.

:func:`build_reference` is one pass over the log (source → hash → decode → fold, the decode stage
tapped for the reference): from the start of the log, or, when the log lost its first entries
(retention, truncation), from the newest valid snapshot that covers the loss, as ``rebuild`` would.
The expected states are the fold's (one per stream); the event ids already folded are deduplicated
with the bounded :class:`~chainfold.replay.dedup.DedupIndex` (a reader of the topic's dedup folder,
from the snapshot's manifest when the reference starts at one). A model error is handled by the
fold's policy (``on_error``: ``stop`` raises, the skip policies list the events in
``folder.skipped``); skipped events stay reference events (the worker must still handle them).
"""

from __future__ import annotations

import bisect
import itertools
import sqlite3
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from ..hashing.stage import PartitionScan
from ..log import EventLog
from ..replay.decode import Decoded
from ..replay.fold import Folder, OnModelError
from ..replay.model import Model
from ..replay.pipeline import Stops, run_pass
from .history import History
from .rebuild import RebuildOptions, RebuildRun, plan_rebuild
from .reference_join import HandlingJoin

__all__ = ["CACHE_MB", "ReferenceDB", "Reference", "Handling", "Passes", "build_reference"]

CACHE_MB = 32
"""SQLite page cache of the reference database (what its index build and lookups hold in memory)."""

_FLUSH = 20_000  # rows buffered before an insert


class ReferenceDB:
    """The reference as a table in an SQLite file in ``directory``.

    ``ref(id, pi, j, idx, sno)``: reference event ``j`` of partition number ``pi``, at log index
    ``idx``, of stream number ``sno``; rows are added in (pi, j) order, so the row id of event
    ``(pi, j)`` is ``base[pi] + j + 1``. Call :meth:`seal` between the inserts and the queries.
    """

    def __init__(self, directory: Path) -> None:
        self.path = directory / "reference.sqlite"
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        for pragma in ("journal_mode=OFF", "synchronous=OFF", "temp_store=FILE", f"cache_size={-CACHE_MB * 1024}",
                       "locking_mode=EXCLUSIVE"):
            self.db.execute(f"PRAGMA {pragma}")
        self.db.execute("CREATE TABLE ref (id TEXT NOT NULL, pi INTEGER NOT NULL, j INTEGER NOT NULL, "
                        "idx INTEGER NOT NULL, sno INTEGER NOT NULL)")
        self.db.execute("BEGIN")
        self._ref: list[tuple[str, int, int, int, int]] = []
        self.sealed = False

    def add(self, rows: Iterable[tuple[str, int, int, int, int]]) -> None:
        """Reference rows ``(id, pi, j, idx, sno)``, in order."""
        self._ref.extend(rows)
        if len(self._ref) >= _FLUSH:
            self._flush()

    def _flush(self) -> None:
        if self._ref:
            self.db.executemany("INSERT INTO ref VALUES (?, ?, ?, ?, ?)", self._ref)
            self._ref.clear()

    def seal(self) -> None:
        """Commit and index (each table sorted once, on disk)."""
        if self.sealed:
            return
        self._flush()
        self.db.execute("COMMIT")
        self.db.execute("CREATE UNIQUE INDEX ref_id ON ref(id)")
        self.sealed = True

    def rows(self, sql: str, args: tuple = ()) -> Iterator[tuple]:
        """The rows of a query, one at a time."""
        self.seal()
        yield from self.db.execute(sql, args)

    def ids_and_streams(self) -> Iterator[tuple[str, int]]:
        """``(event id, stream number)`` of every reference event, in reference order."""
        return self.rows("SELECT id, sno FROM ref ORDER BY rowid")

    def one(self, sql: str, args: tuple = ()) -> tuple | None:
        self.seal()
        return self.db.execute(sql, args).fetchone()

    def close(self) -> None:
        self.db.close()


class Handling(NamedTuple):
    """One handling, in handling order: the reference position of its event (partition number
    ``pi``, position ``j``; ``pi`` None, ``j`` and ``sno`` -1 when the reference does not hold it),
    its stream number, its event id when the reference does not hold it (else None:
    :meth:`Reference.event_id` names it), and whether it is the event's first handling."""

    pi: int | None
    j: int
    sno: int
    event_id: str | None
    first: bool


@dataclass
class Reference:
    """What a correct worker handles (docs/worker-evidence.md), on disk (see the module doc): per
    partition the pass over it (``scans``: hashes, checked against and recorded into the log's
    record) and how many reference events it holds (``counts``); the expected states (``folder``);
    the streams (numbered in order of first appearance); the history found; where the reference
    starts (``from_snapshot``: the entries a snapshot covered, when the log lost its start)."""

    topic: str
    partitions: list[str]
    folder: Folder
    db: ReferenceDB
    workdir: tempfile.TemporaryDirectory[str]
    history: History
    run: RebuildRun
    """The rebuild run whose stages make the pass (it owns the dedup index)."""
    scans: list[PartitionScan] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    stream_names: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    malformed_in: list[int] = field(default_factory=list)
    """The partition number of each of ``folder.malformed`` (and ``duplicates_in`` of its duplicates)."""
    duplicates_in: list[int] = field(default_factory=list)
    snapshot_path: str | None = None
    from_snapshot: int | None = None
    leaves_path: Path | None = None
    """The reference events' leaf hashes (32 bytes each, in order), when tracker evidence needs them."""
    join: HandlingJoin | None = None
    """The worker's handlings joined with the reference (:meth:`load_handling`)."""

    def __enter__(self) -> Reference:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Remove the reference's files."""
        self.db.close()
        if self.join is not None:
            self.join.close()
        self.run.close()  # the dedup index: its scratch folder and the topic folder's lock
        self.workdir.cleanup()

    def __len__(self) -> int:
        return sum(self.counts)

    def base(self, pi: int) -> int:
        return sum(self.counts[:pi])

    def event(self, pi: int, j: int) -> tuple[str, int] | None:
        """``(event id, log index)`` of reference event ``j`` of partition ``pi``."""
        if not 0 <= j < self.counts[pi]:
            return None
        row = self.db.one("SELECT id, idx FROM ref WHERE rowid = ?", (self.base(pi) + j + 1,))
        return (row[0], row[1]) if row else None

    def locate(self, event_id: str) -> tuple[int, int] | None:
        """``(partition number, log index)`` of the event's first entry, or None."""
        row = self.db.one("SELECT pi, idx FROM ref WHERE id = ?", (event_id,))
        return (row[0], row[1]) if row else None

    def in_log_order(self, event_ids: Iterable[str]) -> list[str]:
        """Those of ``event_ids`` the reference holds, once each, in reference order."""
        self.db.seal()
        self.db.db.execute("CREATE TEMP TABLE IF NOT EXISTS pick (id TEXT)")
        self.db.db.execute("DELETE FROM pick")
        self.db.db.executemany("INSERT INTO pick VALUES (?)", ((e,) for e in event_ids))
        out = [r[0] for r in self.db.rows("SELECT DISTINCT r.id, r.rowid FROM pick p JOIN ref r ON r.id = p.id "
                                          "ORDER BY r.rowid")]
        self.db.db.execute("DELETE FROM pick")
        return out

    # --- the worker's handling, beside the reference ------------------------------------------------

    def load_handling(self, rows: Iterable[tuple[str, int]], count: int) -> None:
        """Join the worker's ``count`` handlings ``(event id, line)`` with the reference (the first
        call only; :class:`~chainfold.ops.reference_join.HandlingJoin`)."""
        if self.join is None:
            self.join = HandlingJoin(Path(self.workdir.name) / "join", self.db.ids_and_streams(), len(self),
                                     rows, count)

    def _joined(self) -> HandlingJoin:
        if self.join is None:
            raise RuntimeError("load_handling first")
        return self.join

    def missing(self) -> Iterator[str]:
        """Reference events never handled, in reference order."""
        return (eid for _, eid in self._joined().missing)

    def handled_twice(self) -> set[str]:
        """Event ids handled more than once (known to the reference or not)."""
        return self._joined().twice

    def not_in_reference(self) -> Iterator[tuple[int, str]]:
        """``(line, event id)`` of handlings of events the reference does not hold, in handling order."""
        return ((line, eid) for _, line, eid in self._joined().unknown)

    def handlings(self) -> Iterator[Handling]:
        """Every handling, in handling order (see :class:`Handling`)."""
        join = self._joined()
        unknown = iter(join.unknown)
        ends = list(itertools.accumulate(self.counts))
        single = len(ends) == 1
        for h, (k, sno, first) in enumerate(join.annotations()):
            if k < 0:
                u = next(unknown)
                assert u[0] == h
                yield Handling(None, -1, -1, u[2], first)
            elif single:
                yield Handling(0, k, sno, None, first)
            else:
                pi = bisect.bisect_right(ends, k)
                yield Handling(pi, k - (ends[pi - 1] if pi else 0), sno, None, first)

    def event_id(self, h: Handling) -> str:
        """The event id of a handling."""
        if h.event_id is not None:
            return h.event_id
        at = self.event(h.pi, h.j)  # type: ignore[arg-type]
        assert at is not None
        return at[0]

    def leaves(self, start: int, count: int) -> list[bytes]:
        """Leaf hashes of reference events ``start .. start+count-1`` (single partition)."""
        if self.leaves_path is None:
            return []
        with open(self.leaves_path, "rb") as f:
            f.seek(start * 32)
            data = f.read(count * 32)
        return [data[i:i + 32] for i in range(0, len(data), 32)]


Passes = Callable[[Reference, RebuildRun, bool, Callable[[int], None] | None], bool]
"""An engine's passes over the partitions (the Spark engine's: :func:`chainfold.engines.distributed.distributed_reference`):
given the reference as :func:`build_reference` opened it, the run whose stages make the pass,
whether the leaf hashes are wanted and the progress callback, it fills in what :func:`_passes`
does (the rows in (partition, position) order, stream numbers from the snapshot's streams on,
``counts``, ``scans``, ``notes``, ``malformed_in``, ``duplicates_in``, the folder's states and
findings, ``leaves_path``) and seals the database, or answers False to leave the passes to this
process."""


class _Tap:
    """The decode stage's tap of one partition's pass: every event it passes on is the reference's
    next one (written to the database; its leaf hash to the leaves file when asked)."""

    def __init__(self, reference: Reference, pi: int, numbers: dict[str, int], leaves: Any) -> None:
        self.ref = reference
        self.pi = pi
        self.j = 0
        self.numbers = numbers
        self.leaves = leaves

    def __call__(self, d: Decoded, leaves: list[bytes] | None) -> None:
        if not d.events:
            return
        numbers, names = self.numbers, self.ref.stream_names
        rows = []
        pi, j = self.pi, self.j
        for k, ev in enumerate(d.events):
            sno = numbers.get(ev.stream)
            if sno is None:
                sno = numbers[ev.stream] = len(names)
                names.append(ev.stream)
            rows.append((ev.id, pi, j + k, d.index(k), sno))
        self.j = j + len(rows)
        self.ref.db.add(rows)
        if self.leaves is not None and leaves is not None:
            start = d.index(0) - d.offset(0)  # the log index of the batch's first entry
            self.leaves.write(b"".join(leaves[d.index(k) - start] for k in range(len(d.events))))


def build_reference(elog: EventLog, model: Model, snapshots_root: Path, *, leaves: bool = False,
                    allow_partial_history: bool = False, on_progress: Callable[[int], None] | None = None,
                    on_error: OnModelError = "stop", passes: Passes | None = None) -> Reference:
    """One pass over the log (see the module doc): the reference on disk, the expected states and
    the history. :class:`~chainfold.errors.HistoryUnrecoverable` when the log lost entries and no
    valid snapshot covers the loss (unless ``allow_partial_history``: then from where the log starts
    now). A model error is handled by ``on_error`` (see the module doc). Close the reference (or use
    it as a context manager) to remove its files. ``passes``: an engine's passes over the
    partitions instead of this process's (see :data:`Passes`)."""
    plan = plan_rebuild(elog, model, RebuildOptions(snapshots_root, write_snapshots=False, prefer_full=True,
                                                    allow_partial_history=allow_partial_history,
                                                    on_model_error=on_error))
    run = RebuildRun(plan)
    try:
        workdir = tempfile.TemporaryDirectory(prefix="chainfold-reconcile-")
        db = ReferenceDB(Path(workdir.name))
    except BaseException:
        run.close()
        raise
    folder = run.folder
    reference = Reference(elog.topic, plan.parts, folder, db, workdir,
                          History(folder.seqs, plan.truncations, allow_partial_history), run, notes=list(plan.notes),
                          snapshot_path=plan.snapshot_path,
                          from_snapshot=plan.snapshot.entries if plan.snapshot is not None else None)
    try:
        if passes is None or not passes(reference, run, leaves, on_progress):
            _passes(reference, run, leaves, on_progress)
    except BaseException:
        reference.close()
        raise
    return reference


def _passes(reference: Reference, run: RebuildRun, leaves: bool, on_progress: Callable[[int], None] | None) -> None:
    """The pass over each partition, tapped. The streams of the snapshot it starts from (if any)
    are the log's streams too."""
    reference.stream_names.extend(sorted(reference.folder.states))
    numbers = {s: i for i, s in enumerate(reference.stream_names)}
    decoder = reference.folder.decoder
    done = 0
    out = None
    if leaves:
        reference.leaves_path = Path(reference.workdir.name) / "leaves.bin"
        out = open(reference.leaves_path, "wb")
    try:
        for pi, p in enumerate(reference.partitions):
            tap = _Tap(reference, pi, numbers, out)
            hasher, source = run.hash_stage(p), run.source(p)
            reference.folder.seqs.lost_start = run.lost_start(p)
            stops = Stops()
            if on_progress is not None:
                stops.every(16384, lambda n, _e, b=done: on_progress(b + n))  # type: ignore[misc]
            try:
                run_pass(source, start=hasher.chain.size, hasher=hasher, decoder=decoder, fold=reference.folder.fold,
                         tap=tap, stops=stops)
            finally:
                hasher.flush()
            scan = hasher.finish(source)
            done += scan.read
            reference.malformed_in += [pi] * (len(decoder.malformed) - len(reference.malformed_in))
            reference.duplicates_in += [pi] * (len(decoder.duplicates) - len(reference.duplicates_in))
            reference.counts.append(tap.j)
            reference.scans.append(scan)
            if scan.record_error:
                reference.notes.append(scan.record_error + "; not trusted")
            if scan.mismatch is not None:
                reference.notes.append(f"{p}: the log differs from its recorded checkpoints at entry "
                                       f"{scan.mismatch.index}: {scan.mismatch.reason}")
    finally:
        if out is not None:
            out.close()
    reference.db.seal()

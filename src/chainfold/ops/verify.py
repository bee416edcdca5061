"""``verify``: recompute the hashes over a log and compare them with what was recorded.

Three references, each optional:

* the checkpoints (and leaf hashes) chainfold recorded for the topic on earlier reads: entries lost,
  altered, inserted or reordered since then are found, the first one named exactly;
* the chain states recorded in the topic's snapshots (a snapshot is evidence of the log it folded);
* another log (``--against``): two copies of a log compared by their checkpoints, bisecting over
  heads and descending one segment's tree, then reading only that segment from each side.

A first verify of a topic records its checkpoints and reports ``intact``. Verify is the source and
hash stages (:func:`hash_partition`) and, for the history check, the decode stage without
deduplication: every stream's ``seq`` is checked for gaps and malformed entries are counted
(:mod:`chainfold.ops.history`). A partition that lost its first entries (retention, truncation) is
hashed at the recorded positions of what it still holds and checked against the record there; the
report says what is gone and what can no longer be verified.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import RootMismatch, SnapshotRejected
from ..hashing.chain import ChainBuilder, Checkpoint, find_divergence
from ..hashing.record import Mismatch, PartitionRecord, name_entry, open_record
from ..hashing.stage import DEFAULT_SEGMENT_SIZE, HashStage, PartitionScan, leaf_hashes, topic_head
from ..log import Entry, EventLog
from ..log.source import Source, Span
from ..replay.decode import Decoded, Decoder, Malformed, SeqGaps
from ..replay.pipeline import Stops, run_pass
from .history import (History, SeqStart, Truncation, earliest, forget_seq_start, load_seq_start, locate_truncation,
                      save_seq_start, shifted_stage)

__all__ = ["VerifyOptions", "VerifyReport", "verify_log", "compare_logs", "hash_partition", "snapshot_probes",
           "conclude_partition", "seq_decoder", "truncated_stage"]

log = logging.getLogger("chainfold.ops.verify")

PROGRESS_EVERY = 16384

Probes = dict[str, list[tuple[int, dict, str]]]
"""``{partition: [(entries, chain state, snapshot path)]}``: what the topic's snapshots recorded."""


@dataclass(frozen=True)
class VerifyOptions:
    """How to verify (every engine): ``record_dir`` holds the recorded checkpoints (None: compare
    with nothing, record nothing); ``snapshots_root`` the snapshots whose chain states are checked
    too; ``segment_size`` is for a log with nothing recorded; ``reset`` discards the record first;
    ``allow_partial_history``: the log is known to start mid-history (lost entries and seq gaps are
    reported, not failures)."""

    record_dir: Path | None = None
    snapshots_root: Path | None = None
    segment_size: int = DEFAULT_SEGMENT_SIZE
    reset: bool = False
    allow_partial_history: bool = False

    def record(self, partition: str) -> PartitionRecord | None:
        return PartitionRecord(self.record_dir, partition) if self.record_dir is not None else None


@dataclass
class VerifyReport:
    """The verify report (docs/cli.md): ``to_json()`` has every key docs/cli.md lists as always present."""

    topic: str
    scans: list[PartitionScan]
    mismatch: Mismatch | None = None
    mismatch_partition: str | None = None
    against: str | None = None
    notes: list[str] = field(default_factory=list)
    snapshots_checked: int = 0
    comparisons: int = 0
    workers: int = 1
    worker_peak_rss: list[int] = field(default_factory=list)
    """Peak resident memory (bytes) of each worker process, when verified in parallel."""
    history: History = field(default_factory=History)
    malformed: list[Malformed] = field(default_factory=list)
    malformed_before: int = 0
    """Malformed entries before the decoded part (counted by the snapshot the seq check started from)."""
    seq_from: SeqStart | None = None

    @property
    def intact(self) -> bool:
        """The log agrees with everything recorded and its history is whole (or accepted as partial)."""
        return self.mismatch is None and self.history.problem() is None

    @property
    def exit_code(self) -> int:
        """0 intact; 1 the log differs from the record; 3 history is gone (docs/cli.md#history)."""
        if self.mismatch is not None:
            return 1
        return 0 if self.intact else 3

    def root(self) -> str | None:
        """The RFC 9162 root over every entry of a non-partitioned topic (None for a partitioned one)."""
        return self.scans[0].chain.log_root().hex() if len(self.scans) == 1 else None

    def to_json(self) -> dict[str, Any]:
        fm = None
        if self.mismatch is not None:
            fm = self.mismatch.to_json()
            fm["reason"] = self.mismatch.reason
            if len(self.scans) > 1:
                fm["partition"] = self.mismatch_partition
        out: dict[str, Any] = {
            "verdict": "intact" if self.intact else "mismatch",
            "topic": self.topic,
            "log": {
                "events": sum(s.entries for s in self.scans),
                "segments": sum(s.segments for s in self.scans),
                "head": topic_head(self.scans).hex(),
                "root": self.root(),
            },
            "first_mismatch": fm,
        }
        problem = self.history.problem() if self.mismatch is None else None
        if problem is not None:
            out = {"error": problem, "exit_code": 3, **out}
        if len(self.scans) > 1:
            out["partitions"] = [
                {"partition": s.partition, "events": s.entries, "segments": s.segments, "head": s.head.hex()}
                for s in self.scans
            ]
        if self.against is not None:
            out["against"] = self.against
        out["checkpoints_recorded"] = sum(s.recorded_new for s in self.scans)
        out["snapshots_checked"] = self.snapshots_checked
        out["redeliveries_dropped"] = sum(s.redelivered for s in self.scans)
        out["malformed_entries"] = self.malformed_before + len(self.malformed)
        out["malformed_first"] = [m.message_id for m in self.malformed[:10]]
        out.update(self.history.to_json())
        sf = self.seq_from
        out["seq_checked_from"] = None if sf is None else {"path": sf.path, "entries": sf.entries}
        out["notes"] = self.notes + self.history.notes()
        if self.workers > 1:
            out["workers"] = self.workers
        return out


def snapshot_probes(snapshots_root: Path | None, topic: str, starts: list[SeqStart] | None = None) -> Probes:
    """The chain states the topic's valid snapshots recorded, per partition (newest first); the
    snapshots of a one-partition topic are also added to ``starts`` (if given)."""
    if snapshots_root is None:
        return {}
    from ..store.snapshots import SnapshotStore

    store = SnapshotStore(snapshots_root, topic)
    probes: Probes = {}
    for info in store.list():
        try:
            snap = store.load(info.path)
        except SnapshotRejected as exc:
            log.info("%s", exc)
            continue
        for pos in snap.partitions:
            probes.setdefault(pos.partition, []).append((pos.entries, pos.chain, str(info.path)))
        if starts is not None and len(snap.partitions) == 1:
            pos = snap.partitions[0]
            starts.append(SeqStart(str(info.path), pos.entries, dict(pos.chain), snap.seqs,
                                   int(snap.stats.get("malformed", 0))))
    return probes


class _AllNew:
    """Deduplication left out: verify checks ``seq`` over every well-formed entry, not events."""

    def add_new(self, ids: Sequence[str]) -> list[bool]:
        return [True] * len(ids)

    def __len__(self) -> int:
        return 0

    def checkpoint(self) -> None:
        return None


@dataclass
class _DecoderFrom(Decoder):
    """The decode stage from log index ``first`` on (what comes before is known from a snapshot)."""

    first: int = 0

    def feed(self, entries: Sequence[Entry], start: int) -> Decoded:
        skip = min(len(entries), max(0, self.first - start))
        if skip:
            self.index = start + skip
            if skip == len(entries):
                return Decoded([], None, range(start, start), entries, [])
            entries, start = entries[skip:], start + skip
        return super().feed(entries, start)


def seq_decoder(seqs: SeqGaps, first: int = 0) -> Decoder:
    """The decode stage as verify runs it: malformed entries listed, ``seq`` checked, nothing
    deduplicated; entries before log index ``first`` are not decoded."""
    return _DecoderFrom(_AllNew(), well_formed=seqs, first=first)  # type: ignore[arg-type]


def hash_partition(elog: EventLog, span: Span, *, record: PartitionRecord | None = None,
                   chain: ChainBuilder | None = None, segment_size: int = DEFAULT_SEGMENT_SIZE,
                   write: bool = True, probes: Iterable[int] = (),
                   on_progress: Callable[[int], None] | None = None, hasher: HashStage | None = None,
                   decoder: Decoder | None = None) -> PartitionScan:
    """One pass over ``span`` (source → hash stage, and the ``decoder`` if given), continuing
    ``chain`` if given, compared with (and, with ``write``, recording into) ``record``; or through
    ``hasher``, a hash stage made by the caller. ``probes`` are partition sizes at which the chain
    state is captured into ``PartitionScan.probed``."""
    if hasher is None:
        hasher = HashStage.open(elog, span.partition, record=record, chain=chain, segment_size=segment_size,
                                write=write)
    start = hasher.chain.size
    probed = hasher.scan.probed
    stops = Stops()
    for size in sorted(set(probes)):
        if size == start:
            probed[size] = hasher.chain.state()
        elif size > start:
            stops.at(size - start, lambda n, _e: probed.__setitem__(start + n, hasher.chain.state()))
    if on_progress is not None:
        stops.every(PROGRESS_EVERY, lambda n, _e: on_progress(n))  # type: ignore[misc]
    source = Source(elog, span)
    try:
        run_pass(source, start=start, hasher=hasher, decoder=decoder, stops=stops)
    finally:
        hasher.flush()
        if on_progress is not None:
            on_progress(source.read)
    return hasher.finish(source, read_to_end=not span.bounded)


PartitionHasher = Callable[..., PartitionScan]
"""``hash_part(elog, partition, *, record, segment_size, probes, on_progress, hasher, decoder)``: one
partition's pass as :func:`hash_partition` makes it over the whole partition (an engine's)."""


def _hash_whole(elog: EventLog, partition: str, **kw: Any) -> PartitionScan:
    return hash_partition(elog, Span(partition), **kw)


def verify_log(elog: EventLog, options: VerifyOptions | None = None, /, *,
               on_progress: Callable[[int], None] | None = None, hash_part: PartitionHasher | None = None,
               **changes: Any) -> VerifyReport:
    """Hash every partition of ``elog``, comparing with the record in ``options.record_dir`` (and
    recording what is new while the log agrees), and with the chain states recorded in snapshots;
    check every stream's ``seq`` and count malformed entries.

    ``options`` (:class:`VerifyOptions`) or its fields as keywords. Raises
    :class:`~chainfold.errors.CheckpointCorrupt` (naming the file) when a record cannot be trusted;
    ``reset=True`` discards the record and records the log as it is now. ``hash_part`` is the
    engine's pass over one partition (:data:`PartitionHasher`; here by default).
    """
    opts = VerifyOptions(**changes) if options is None else options
    hash_part = hash_part or _hash_whole
    report = _verify(elog, opts, on_progress, seq_starts=True, hash_part=hash_part)
    sf = report.seq_from
    if sf is not None and not _agrees(report.scans[0], sf.entries, sf.chain):
        # the state the seq check started from is not this log's: check every entry after all
        again = _verify(elog, replace(opts, reset=False), on_progress, seq_starts=False, hash_part=hash_part)
        again.notes[:0] = [n for n in report.notes if n not in again.notes]
        return again
    return report


def _agrees(scan: PartitionScan, entries: int, chain: dict) -> bool:
    got = scan.probed.get(entries)
    return got is not None and got["head"] == chain.get("head") and got["segment_frontier"] == chain.get(
        "segment_frontier")


def _verify(elog: EventLog, opts: VerifyOptions, on_progress: Callable[[int], None] | None, *,
            seq_starts: bool, hash_part: PartitionHasher) -> VerifyReport:
    report = VerifyReport(elog.topic, [], history=History(allow_partial=opts.allow_partial_history))
    starts: list[SeqStart] = []
    probes = snapshot_probes(opts.snapshots_root, elog.topic, starts)
    parts = elog.partitions()
    decoder = seq_decoder(report.history.seqs)
    done = 0
    for part in parts:
        record = prepare_record(opts, part, report)
        mine = probes.get(part, [])
        hasher = truncated_stage(elog, part, record, report)
        report.history.seqs.lost_start = hasher is not None  # streams' first seqs there follow lost ones
        start = None
        if seq_starts and len(parts) == 1 and hasher is None:
            start = _newest([*starts, load_seq_start(opts.record_dir)])
        if start is not None:
            decoder = start_seq_check(report, start)
        scan = hash_part(elog, part, record=record, segment_size=opts.segment_size,
                         probes=[e for e, _, _ in mine] + ([start.entries] if start else []),
                         on_progress=_offset(on_progress, done), hasher=hasher, decoder=decoder)
        done += scan.read
        conclude_partition(report, part, scan, mine)
    report.malformed = decoder.malformed
    if len(parts) == 1 and opts.record_dir is not None and report.mismatch is None and not report.history.truncations \
            and (report.seq_from is None or _agrees(report.scans[0], report.seq_from.entries, report.seq_from.chain)):
        save_seq_start(opts.record_dir, report.scans[0].chain.state(), report.history.seqs,
                       report.malformed_before + len(report.malformed))
    return report


def _newest(starts: list[SeqStart | None]) -> SeqStart | None:
    return max((s for s in starts if s is not None), key=lambda s: s.entries, default=None)


def start_seq_check(report: VerifyReport, start: SeqStart) -> Decoder:
    """Continue the seq check from ``start`` (a snapshot, or what the last verify left beside the
    record), decoding only the entries after it: the cheap path for a log read before. :func:`conclude_partition` then checks that the log's
    chain at the snapshot's position is the snapshot's; if it is not, the log is reported as
    differing (exit 1) and a note says the seq check before that position rests on nothing."""
    report.history.seqs = SeqGaps.restore(start.seqs)
    report.malformed_before = start.malformed
    report.seq_from = start
    return seq_decoder(report.history.seqs, start.entries)


def truncated_stage(elog: EventLog, part: str, record: PartitionRecord | None,
                    report: VerifyReport) -> HashStage | None:
    """The hash stage for ``part`` when it lost recorded entries (the :class:`Truncation` goes into
    the report): at the recorded positions of what it still holds, or, when the record cannot place
    them, compared with nothing. None when ``part`` starts where it was recorded to start."""
    recorded, _ = open_record(record)
    t = locate_truncation(elog, part, recorded, record, earliest(elog, part)) if recorded else None
    if not isinstance(t, Truncation):
        return None
    report.history.truncations.append(t)
    if t.index is None or record is None:
        return HashStage.open(elog, part, segment_size=recorded[0].segment_size, write=False)
    return shifted_stage(elog, part, t, record=record, recorded=recorded)


def prepare_record(opts: VerifyOptions, part: str, report: VerifyReport) -> PartitionRecord | None:
    """The record of ``part``: reset when asked (noted in ``report``); a corrupt one is bad input
    (exit 2): never trusted, never overwritten."""
    record = opts.record(part)
    if record is not None and opts.reset:
        record.reset()
        forget_seq_start(opts.record_dir)
        report.notes.append(f"{part}: recorded checkpoints reset")
    elif record is not None:
        record.load()
    return record


def _offset(on_progress: Callable[[int], None] | None, base: int) -> Callable[[int], None] | None:
    return None if on_progress is None else (lambda n: on_progress(base + n))


def conclude_partition(report: VerifyReport, part: str, scan: PartitionScan,
                       probes: list[tuple[int, dict, str]]) -> None:
    """Add partition ``part``'s scan to ``report``: its mismatch, and how the chain states that
    snapshots recorded (``probes``, see :func:`snapshot_probes`) compare with the log."""
    report.scans.append(scan)
    if scan.record_error:
        report.notes.append(scan.record_error)
    if scan.mismatch is not None and report.mismatch is None:
        report.mismatch = scan.mismatch
        report.mismatch_partition = part
        report.comparisons = scan.mismatch.comparisons
    trunc = next((t for t in report.history.truncations if t.partition == part), None)
    sf = report.seq_from
    if sf is not None and not _agrees(scan, sf.entries, sf.chain):
        report.notes.append(f"{sf.path} holds the seq check up to entry {sf.entries} of another log (its chain "
                            "disagrees with this one there): every entry was checked instead")
    for entries, state, path in probes:
        report.snapshots_checked += 1
        got = scan.probed.get(entries)
        if trunc is not None and (trunc.index is None or entries < trunc.index):
            report.notes.append(f"snapshot {path} ends at entry {entries}, in the part of {part} that is gone: "
                                "it cannot be checked against the log")
            continue
        if trunc is not None and got is not None and got["head"] == state.get("head") \
                and got["segment_frontier"] == state.get("segment_frontier"):
            trunc.covered_by = trunc.covered_by or path  # probes come newest first
            continue
        if got is None:
            m = Mismatch(scan.entries, scan.entries // scan.chain.segment_size, None, None,
                         f"snapshot {path} covers {entries} entries; the log now has {scan.entries}")
        elif got["head"] != state.get("head") or got["segment_frontier"] != state.get("segment_frontier"):
            k = entries // scan.chain.segment_size
            m = Mismatch(k * scan.chain.segment_size, k, None, None,
                         f"snapshot {path} recorded another chain at entry {entries}")
        else:
            continue
        report.notes.append(m.reason)
        if report.mismatch is None or m.index < report.mismatch.index:
            if report.mismatch is None or report.mismatch_partition == part:
                report.mismatch = m
                report.mismatch_partition = part


def _segment(elog: EventLog, part: str, cp: Checkpoint) -> list[Entry]:
    """The entries of segment ``cp`` (read again from the log)."""
    if cp.first is None:
        return []
    span = Span(part, start=elog.position(cp.first), limit=cp.size - cp.segment * cp.segment_size)
    return [e for batch in Source(elog, span) for e in batch]


def _compare_partition(left: EventLog, lp: str, ls: PartitionScan, right: EventLog, rp: str,
                       rs: PartitionScan) -> Mismatch | None:
    """Where partition ``lp`` of ``left`` first differs from ``rp`` of ``right``, by their checkpoints."""
    lcps, rcps = ls.all_checkpoints(), rs.all_checkpoints()
    read: dict[str, list[Entry]] = {}

    def leaves(side: str, elog: EventLog, part: str, cps: list[Checkpoint]) -> Callable[[int], list[bytes]]:
        def of(k: int) -> list[bytes]:
            read[side] = _segment(elog, part, cps[k])
            return leaf_hashes(read[side])
        return of

    try:
        d = find_divergence(lcps, rcps, leaves("l", left, lp, lcps), leaves("r", right, rp, rcps))
    except RootMismatch as exc:  # a segment changed between the two reads
        return Mismatch(0, 0, None, None, f"log changed while comparing: {exc}")
    if d is None:
        return None
    k, S = d.segment, ls.chain.segment_size
    entries = read.get("l")
    if entries is None and k < len(lcps):
        entries = _segment(left, lp, lcps[k])
    return name_entry(d.index, k, entries or [], k * S, f"{left.topic} and {right.topic} differ from entry {d.index}",
                      d.comparisons)


def _scan(elog: EventLog, partition: str, *, segment_size: int = DEFAULT_SEGMENT_SIZE,
          on_progress: Callable[[int], None] | None = None, decoder: Decoder | None = None) -> PartitionScan:
    return hash_partition(elog, Span(partition), segment_size=segment_size, write=False, on_progress=on_progress,
                          decoder=decoder)


def compare_logs(left: EventLog, right: EventLog, *, segment_size: int = DEFAULT_SEGMENT_SIZE,
                 on_progress: Callable[[int], None] | None = None,
                 scan: Callable[..., PartitionScan] | None = None) -> VerifyReport:
    """Compare two logs partition by partition (``verify TOPIC --against OTHER``).

    Both are hashed once; the first divergent entry is then found from the two checkpoint
    sequences by bisection over heads and descent inside one segment, reading only that segment
    again from each side. The mismatch names the entry of ``left`` (the topic being verified).
    ``scan(log, partition, segment_size=, on_progress=, decoder=)`` hashes one partition, recording
    nothing, and feeds ``decoder`` when given (``left``'s seq check) (the engine's: here by default,
    a cluster's with the distributed engine).
    """
    scan = scan or _scan
    lparts, rparts = left.partitions(), right.partitions()
    report = VerifyReport(left.topic, [], against=right.topic)
    if len(lparts) != len(rparts):
        report.notes.append(f"{left.topic} has {len(lparts)} partitions, {right.topic} has {len(rparts)}")
    decoder = seq_decoder(report.history.seqs)  # the history of the log verified (``left``)
    done = 0
    for i, lp in enumerate(lparts):
        ls = scan(left, lp, segment_size=segment_size, on_progress=_offset(on_progress, done), decoder=decoder)
        report.malformed = decoder.malformed
        done += ls.entries
        report.scans.append(ls)
        if report.mismatch is not None:
            continue
        if i >= len(rparts):
            if ls.entries:
                report.mismatch = Mismatch(0, 0, None, None, f"no partition {i} in {right.topic}")
                report.mismatch_partition = lp
            continue
        rs = scan(right, rparts[i], segment_size=segment_size)
        m = _compare_partition(left, lp, ls, right, rparts[i], rs)
        if m is not None and m.reason.startswith("log changed"):
            report.notes.append(f"{lp}: {m.reason}")
        if m is not None:
            report.mismatch, report.mismatch_partition, report.comparisons = m, lp, m.comparisons
    return report

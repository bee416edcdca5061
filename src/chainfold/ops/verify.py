"""``verify``: recompute the hashes over a log and compare them with what was recorded.

Three references, each optional:

* the checkpoints (and leaf hashes) chainfold recorded for the topic on earlier reads: entries lost,
  altered, inserted or reordered since then are found, the first one named exactly;
* the chain states recorded in the topic's snapshots (a snapshot is evidence of the log it folded);
* another log (``--against``): two copies of a log compared by their checkpoints, bisecting over
  heads and descending one segment's tree, then reading only that segment from each side.

A first verify of a topic records its checkpoints and reports ``intact``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..hashing.chain import ChainBuilder, Checkpoint, find_divergence
from ..envelope import decode
from ..errors import MalformedEnvelope, SnapshotRejected
from ..log import EventLog, MessageId
from ..hashing.scan import DEFAULT_SEGMENT_SIZE, Mismatch, PartitionRecord, PartitionScan, scan_partition, topic_head

__all__ = ["VerifyReport", "verify_log", "compare_logs"]

log = logging.getLogger("chainfold.ops.verify")


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

    @property
    def intact(self) -> bool:
        return self.mismatch is None

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
            },
            "first_mismatch": fm,
        }
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
        out["notes"] = self.notes
        if self.workers > 1:
            out["workers"] = self.workers
        return out


def _snapshot_probes(snapshots_root: Path | None, topic: str) -> dict[str, list[tuple[int, dict, str]]]:
    """``{partition: [(entries, chain state, snapshot path)]}`` from the topic's valid snapshots."""
    if snapshots_root is None:
        return {}
    from ..store.snapshots import SnapshotStore

    store = SnapshotStore(snapshots_root, topic)
    probes: dict[str, list[tuple[int, dict, str]]] = {}
    for info in store.list():
        try:
            snap = store.load(info.path)
        except SnapshotRejected as exc:
            log.info("%s", exc)
            continue
        for pos in snap.partitions:
            probes.setdefault(pos.partition, []).append((pos.entries, pos.chain, str(info.path)))
    return probes


def verify_log(
    elog: EventLog,
    record_dir: Path | None,
    *,
    snapshots_root: Path | None = None,
    segment_size: int = DEFAULT_SEGMENT_SIZE,
    reset: bool = False,
    on_progress: Callable[[int], None] | None = None,
) -> VerifyReport:
    """Scan every partition of ``elog``, comparing with the record in ``record_dir`` (and recording
    what is new while the log agrees), and with the chain states recorded in snapshots.

    Raises :class:`~chainfold.errors.CheckpointCorrupt` (naming the file) when a record cannot be
    trusted; ``reset=True`` discards the record and records the log as it is now.
    """
    scans: list[PartitionScan] = []
    report = VerifyReport(elog.topic, scans)
    probes = _snapshot_probes(snapshots_root, elog.topic)
    done = 0
    for part in elog.partitions():
        record = PartitionRecord(record_dir, part) if record_dir is not None else None
        if record is not None and reset:
            record.reset()
            report.notes.append(f"{part}: recorded checkpoints reset")
        elif record is not None:
            record.load()  # a corrupt record is bad input (exit 2): never trusted, never overwritten
        mine = probes.get(part, [])
        base = done

        def progress(n: int, base: int = base) -> None:
            if on_progress is not None:
                on_progress(base + n)

        scan = scan_partition(elog, part, record=record, segment_size=segment_size,
                              probes=[p for p, _, _ in mine], on_progress=progress)
        done += scan.entries
        conclude_partition(report, part, scan, mine)
    return report


def conclude_partition(report: VerifyReport, part: str, scan: PartitionScan,
                       probes: list[tuple[int, dict, str]]) -> None:
    """Add partition ``part``'s scan to ``report``: its mismatch, and how the chain states that
    snapshots recorded (``probes``, see :func:`_snapshot_probes`) compare with the log."""
    report.scans.append(scan)
    if scan.record_error:
        report.notes.append(scan.record_error)
    if scan.mismatch is not None and report.mismatch is None:
        report.mismatch = scan.mismatch
        report.mismatch_partition = part
        report.comparisons = scan.mismatch.comparisons
    for entries, state, path in probes:
        report.snapshots_checked += 1
        got = scan.probed.get(entries)
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


def _segment_leaves(elog: EventLog, part: str, cp: Checkpoint) -> tuple[list[bytes], list[Any]]:
    import hashlib

    count = cp.size - cp.segment * cp.segment_size
    leaves, entries = [], []
    if cp.first is None:
        return leaves, entries
    for e in elog.read(part, start=MessageId.parse(cp.first), limit=count):
        leaves.append(hashlib.sha256(b"\x00" + e.payload).digest())
        entries.append(e)
    return leaves, entries


def compare_logs(
    left: EventLog,
    right: EventLog,
    *,
    segment_size: int = DEFAULT_SEGMENT_SIZE,
    on_progress: Callable[[int], None] | None = None,
) -> VerifyReport:
    """Compare two logs partition by partition (``verify TOPIC --against OTHER``).

    Both are hashed once; the first divergent entry is then found from the two checkpoint
    sequences by bisection over heads and descent inside one segment, reading only that segment
    again from each side. The mismatch names the entry of ``left`` (the topic being verified).
    """
    lparts, rparts = left.partitions(), right.partitions()
    scans: list[PartitionScan] = []
    report = VerifyReport(left.topic, scans, against=right.topic)
    if len(lparts) != len(rparts):
        report.notes.append(f"{left.topic} has {len(lparts)} partitions, {right.topic} has {len(rparts)}")
    done = 0
    for i, lp in enumerate(lparts):
        ls = scan_partition(left, lp, segment_size=segment_size, write_record=False,
                            on_progress=(lambda n, b=done: on_progress(b + n)) if on_progress else None)
        done += ls.entries
        scans.append(ls)
        if i >= len(rparts):
            if report.mismatch is None and ls.entries:
                report.mismatch = Mismatch(0, 0, None, None, f"no partition {i} in {right.topic}")
                report.mismatch_partition = lp
            continue
        rp = rparts[i]
        rs = scan_partition(right, rp, segment_size=segment_size, write_record=False)
        lcps = ls.checkpoints + ([ls.chain.pending()] if ls.chain.pending() else [])
        rcps = rs.checkpoints + ([rs.chain.pending()] if rs.chain.pending() else [])
        cache: dict[str, tuple[list[bytes], list[Any]]] = {}

        def lleaves(k: int) -> list[bytes]:
            cache["l"] = _segment_leaves(left, lp, lcps[k])
            return cache["l"][0]

        def rleaves(k: int) -> list[bytes]:
            cache["r"] = _segment_leaves(right, rp, rcps[k])
            return cache["r"][0]

        try:
            d = find_divergence(lcps, rcps, lleaves, rleaves)
        except ValueError as exc:  # a segment changed between the two reads
            report.notes.append(f"{lp}: log changed while comparing ({exc})")
            d = None
            if report.mismatch is None:
                report.mismatch = Mismatch(0, 0, None, None, f"log changed while comparing: {exc}")
                report.mismatch_partition = lp
        if d is None or report.mismatch is not None:
            continue
        s = ls.chain.segment_size
        j = d.index - d.segment * s
        mid = eid = None
        ents = cache.get("l", (None, None))[1]
        if ents is None and d.segment < len(lcps):
            ents = _segment_leaves(left, lp, lcps[d.segment])[1]
        if ents is not None and 0 <= j < len(ents):
            e = ents[j]
            mid = str(e.message_id)
            try:
                eid = decode(e.payload).id
            except MalformedEnvelope:
                eid = None
        report.mismatch = Mismatch(d.index, d.segment, mid, eid,
                                   f"{left.topic} and {right.topic} differ from entry {d.index}", d.comparisons)
        report.mismatch_partition = lp
        report.comparisons = d.comparisons
    return report

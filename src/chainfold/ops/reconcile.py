"""``reconcile``: what a real-time worker missed, doubled, reordered or got wrong, and the repair.

The reference is what a correct worker handles (docs/worker-evidence.md): the log's well-formed entries in log
order, each event id once, at its first entry. chainfold compares the worker's evidence with it:

* a **processed log** (ids in handling order) gives the exact first divergence, and the missing,
  duplicated and out-of-order events;
* **tracker checkpoints** (:class:`~chainfold.tracker.Tracker`) give the first divergence by
  bisection over the chained heads: O(log n) comparisons, no scan of the worker's side; with the
  tracker's leaf hashes the exact event, without them its segment;
* the **state export** gives the streams whose state is wrong, expected against actual.

``repair`` replays only the divergent streams from the newest valid snapshot before the first
divergence (pure folds, nothing published), checks the result against a fresh rebuild of those
streams from the start of the log, and returns the corrected state export and the corrections.
"""

from __future__ import annotations

import json
import logging
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..envelope import json_error
from ..errors import BadInput, HistoryUnrecoverable, MalformedInputLine, RootMismatch
from ..hashing.chain import ChainBuilder, Checkpoint, bisect_heads, first_difference_in_segment
from ..hashing.checkpoints import CheckpointFile
from ..hashing.record import PartitionRecord
from ..hashing.stage import DEFAULT_SEGMENT_SIZE, HashStage, PartitionScan, positions_at, topic_head
from ..jsonl import iter_json_lines
from ..log import EventLog, MessageId
from ..log.source import Source, Span
from ..replay.decode import Decoded
from ..replay.fold import Folder
from ..replay.model import Model, render_json
from ..replay.pipeline import Stops, run_pass
from ..store.snapshots import topic_dir
from .corrections import make_corrections
from .positions import report_positions
from ..tracker import leaves_path_for

__all__ = [
    "Processed",
    "load_processed",
    "load_state_export",
    "load_tracker",
    "TrackerEvidence",
    "ReconcileReport",
    "Evidence",
    "Reference",
    "build_reference",
    "check_evidence",
    "diff_processed",
    "diff_tracker",
    "diff_handling",
    "diff_states",
    "repair_states",
    "reconcile",
]

log = logging.getLogger("chainfold.ops.reconcile")

_LOW = (1 << 40) - 1


# --- inputs ------------------------------------------------------------------------------------------


@dataclass
class Processed:
    """A processed log (docs/worker-evidence.md): event ids in handling order, with their line numbers."""

    path: str
    ids: list[str]
    lines: list[int]
    message_ids: list[str | None]


def load_processed(path: str) -> Processed:
    """Read a processed log; a line that is not ``{"id": str, "message_id"?: str}`` is refused."""
    ids: list[str] = []
    lines: list[int] = []
    mids: list[str | None] = []
    name = "<stdin>" if path == "-" else path
    for lineno, obj in iter_json_lines(path):
        if not isinstance(obj, dict):
            raise MalformedInputLine(name, lineno, f"expected a JSON object, got {type(obj).__name__}")
        eid = obj.get("id")
        if not isinstance(eid, str) or not eid:
            raise MalformedInputLine(name, lineno, "'id' must be a non-empty string")
        mid = obj.get("message_id")
        if mid is not None:
            if not isinstance(mid, str):
                raise MalformedInputLine(name, lineno, "'message_id' must be a string")
            try:
                MessageId.parse(mid)
            except BadInput:
                raise MalformedInputLine(name, lineno, f"'message_id' {mid!r} is not ledger:entry:partition:batch") from None
        ids.append(eid)
        lines.append(lineno)
        mids.append(mid)
    return Processed(name, ids, lines, mids)


def load_state_export(path: str) -> dict[str, Any]:
    """Read a state export (docs/worker-evidence.md): one JSON object ``{stream id: state}``."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except OSError as exc:
        raise BadInput(f"cannot read {path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise MalformedInputLine(path, exc.lineno, json_error(exc)) from None
    except UnicodeDecodeError as exc:
        raise MalformedInputLine(path, 0, f"not UTF-8 text: {exc.reason}") from None
    if not isinstance(doc, dict):
        raise MalformedInputLine(path, 1, f"a state export is one JSON object {{stream: state}}, not {type(doc).__name__}")
    return doc


def _key_line(path: str, key: str) -> int:
    """The line of a state export on which its top-level key ``key`` stands (1 if it cannot be told)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError):
        return 1
    dec = json.JSONDecoder()
    ws = " \t\n\r"
    i = len(text) - len(text.lstrip(ws))
    if not text.startswith("{", i):
        return 1
    i += 1
    try:
        while True:
            while i < len(text) and text[i] in ws + ",":
                i += 1
            if i >= len(text) or text[i] == "}":
                return 1
            k, end = dec.raw_decode(text, i)
            if k == key:
                return text.count("\n", 0, i) + 1
            i = end
            while i < len(text) and text[i] in ws + ":":
                i += 1
            _, i = dec.raw_decode(text, i)
    except ValueError:
        return 1


@dataclass
class TrackerEvidence:
    """Tracker checkpoints (full segments, then at most one provisional) and, if present, leaves."""

    path: str
    checkpoints: list[Checkpoint]
    leaves_path: Path | None

    def leaves(self, start: int, count: int) -> list[bytes] | None:
        if self.leaves_path is None:
            return None
        with open(self.leaves_path, "rb") as f:
            f.seek(start * 32)
            data = f.read(count * 32)
        if len(data) != count * 32:
            return None
        return [data[i:i + 32] for i in range(0, len(data), 32)]

    @property
    def size(self) -> int:
        return self.checkpoints[-1].size if self.checkpoints else 0


def load_tracker(path: str) -> TrackerEvidence:
    """Read tracker checkpoints (a checkpoint file, docs/formats.md; ``CheckpointCorrupt`` if untrustworthy)."""
    p = Path(path)
    cf = CheckpointFile(p)
    lp = leaves_path_for(p)
    # a worker that handled less than one segment has only the provisional checkpoint (PATH.partial)
    if not (p.exists() or cf.partial_path.exists()):
        raise BadInput(f"cannot read {path}: no such file")
    cps = cf.load_all()
    return TrackerEvidence(path, cps, lp if lp.exists() else None)


# --- the report --------------------------------------------------------------------------------------


@dataclass
class ReconcileReport:
    """Everything reconcile found; ``to_json()`` has every key docs/cli.md lists as always present."""

    topic: str
    verdict: str
    scans: list[PartitionScan]
    processed_events: int
    first_divergence: dict[str, Any] | None
    missing: list[str]
    duplicates: list[str]
    out_of_order: list[str]
    malformed: list[str]
    divergent_streams: list[dict[str, Any]]
    replayed: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    repaired_states: dict[str, Any] | None = None
    corrections: list[dict[str, Any]] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        out = {
            "verdict": self.verdict,
            "topic": self.topic,
            "log": {
                "events": sum(s.entries for s in self.scans),
                "segments": sum(s.segments for s in self.scans),
                "head": topic_head(self.scans).hex() if self.scans else None,
            },
            "processed": {"events": self.processed_events},
            "first_divergence": self.first_divergence,
            "missing": self.missing,
            "duplicates": self.duplicates,
            "out_of_order": self.out_of_order,
            "malformed": self.malformed,
            "divergent_streams": self.divergent_streams,
            "replayed": self.replayed,
        }
        out.update(self.details)
        out["notes"] = self.notes
        out["seconds"] = round(self.seconds, 3)
        return out


# --- the reference -----------------------------------------------------------------------------------


class PartitionReference:
    """The reference sequence of one partition, in log order, kept compact (about 30 bytes per
    event besides the id strings): log positions in a typed array, streams numbered, leaf hashes
    only when tracker evidence needs them. Message ids are not kept: the one a report names is read
    again (:func:`~chainfold.hashing.stage.positions_at`)."""

    def __init__(self, partition: str, stream_names: list[str], stream_numbers: dict[str, int], leaves: bool) -> None:
        self.partition = partition
        self.index = array("q")
        self.ids: list[str] = []
        self.stream_no = array("l")
        self.leaves: list[bytes] | None = [] if leaves else None
        self._names = stream_names
        self._numbers = stream_numbers

    def stream(self, j: int) -> str:
        return self._names[self.stream_no[j]]

    def add(self, d: Decoded, leaves: list[bytes] | None) -> None:
        """The decode stage's tap: every event it passes on is the reference's next one (``leaves``:
        the hash stage's leaf hashes of the batch)."""
        numbers, names = self._numbers, self._names
        for j, ev in enumerate(d.events):
            self.index.append(d.index(j))
            self.ids.append(ev.id)
            sno = numbers.get(ev.stream)
            if sno is None:
                sno = numbers[ev.stream] = len(names)
                names.append(ev.stream)
            self.stream_no.append(sno)
        if self.leaves is not None and leaves is not None and d.events:
            start = d.index(0) - d.offset(0)  # the log index of the batch's first entry
            self.leaves.extend(leaves[d.index(j) - start] for j in range(len(d.events)))

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class Reference:
    """What a correct worker handles (docs/worker-evidence.md): per partition, the reference sequence and the pass
    over it (hashes, checked against and recorded into the log's record); the expected states."""

    topic: str
    refs: list[PartitionReference]
    scans: list[PartitionScan]
    folder: Folder
    stream_names: list[str]
    notes: list[str] = field(default_factory=list)
    where: dict[str, int] = field(default_factory=dict)
    """event id → position in its partition's reference, plus the partition number << 40."""
    malformed_in: list[int] = field(default_factory=list)
    """The partition number of each of ``folder.malformed`` (and ``duplicates_in`` of its duplicates)."""
    duplicates_in: list[int] = field(default_factory=list)

    def locate(self) -> None:
        for pi, ref in enumerate(self.refs):
            base = pi << 40
            self.where.update(zip(ref.ids, range(base, base + len(ref.ids))))


_LOW = (1 << 40) - 1


def build_reference(elog: EventLog, model: Model, snapshots_root: Path, *, leaves: bool = False,
                    on_progress: Callable[[int], None] | None = None) -> Reference:
    """One pass over the whole log (source → hash → decode → fold, the decode stage tapped for the
    reference). :class:`HistoryUnrecoverable` when the log no longer holds its recorded start."""
    tdir = topic_dir(snapshots_root, elog.topic)
    names: list[str] = []
    numbers: dict[str, int] = {}
    reference = Reference(elog.topic, [], [], Folder(model), names)
    done = 0
    for p in elog.partitions():
        ref = PartitionReference(p, names, numbers, leaves)
        hasher = HashStage.open(elog, p, record=PartitionRecord(tdir, p))
        source = Source(elog, Span(p))
        stops = Stops()
        if on_progress is not None:
            stops.every(16384, lambda n, _e, b=done: on_progress(b + n))  # type: ignore[misc]
        try:
            run_pass(source, start=0, hasher=hasher, decoder=reference.folder.decoder, fold=reference.folder.fold,
                     tap=ref.add, stops=stops)
        finally:
            hasher.flush()
        scan = hasher.finish(source)
        done += scan.entries
        decoder = reference.folder.decoder
        reference.malformed_in += [len(reference.refs)] * (len(decoder.malformed) - len(reference.malformed_in))
        reference.duplicates_in += [len(reference.refs)] * (len(decoder.duplicates) - len(reference.duplicates_in))
        reference.refs.append(ref)
        reference.scans.append(scan)
        _note_record(reference, p, scan)
        _check_start(elog, p, scan, ref)
    reference.locate()
    return reference


def _note_record(reference: Reference, p: str, scan: PartitionScan) -> None:
    if scan.record_error:
        reference.notes.append(scan.record_error + "; not trusted")
    if scan.mismatch is not None:
        reference.notes.append(f"{p}: the log differs from its recorded checkpoints at entry {scan.mismatch.index}: "
                               f"{scan.mismatch.reason}")


def _check_start(elog: EventLog, p: str, scan: PartitionScan, ref: PartitionReference) -> None:
    """The reference must start where the record says the log started."""
    recorded = scan.recorded
    if not (recorded and recorded[0].first is not None and scan.entries and len(ref)):
        return
    first = [e for batch in Source(elog, Span(p, limit=1)) for e in batch]
    if first and elog.position(recorded[0].first) < first[0].message_id:
        raise HistoryUnrecoverable(
            f"{p}: the log now starts at {first[0].message_id} but started at {recorded[0].first} when recorded: "
            "the reference for the worker's history is gone"
        )


@dataclass
class Evidence:
    """What the worker left behind (docs/worker-evidence.md): its state export (read from ``state_path``) and,
    optionally, its processed log and tracker checkpoints."""

    state: dict[str, Any]
    state_path: str = "state"
    processed: Processed | None = None
    tracker: TrackerEvidence | None = None


def _more(items: list[str]) -> str:
    if len(items) <= 1:
        return ""
    return f" (and {len(items) - 1} more: " + ", ".join(items[1:6]) + (" ..." if len(items) > 6 else "") + ")"


def check_evidence(reference: Reference, evidence: Evidence) -> None:
    """The evidence names only what the log has: :class:`MalformedInputLine` for an event id the
    log never held (with the processed log's line) or a stream it never had (the export's line)."""
    processed = evidence.processed
    if processed is not None:
        unknown = [(line, eid) for eid, line in zip(processed.ids, processed.lines) if eid not in reference.where]
        if unknown:
            line, eid = unknown[0]
            raise MalformedInputLine(processed.path, line, f"unknown event id {eid!r}: not in {reference.topic}"
                                     + _more([repr(u[1]) for u in unknown]))
    log_streams = set(reference.stream_names)
    strangers = [s for s in evidence.state if s not in log_streams]  # in the export's order
    if strangers:
        raise MalformedInputLine(evidence.state_path, _key_line(evidence.state_path, strangers[0]),
                                 f"stream {strangers[0]!r} is not in {reference.topic}: the log never had it"
                                 + _more(list(map(repr, strangers))))


@dataclass(frozen=True)
class Divergence:
    """Where the worker's handling first departs from the reference: entry ``j`` of partition
    ``pi``'s reference (or, past its end, the log's end and ``event_id`` the extra event)."""

    pi: int
    j: int
    index: int
    event_id: str | None


def _divergence(reference: Reference, pi: int, j: int, extra: str | None = None) -> Divergence:
    ref = reference.refs[pi]
    if j < len(ref.ids):
        return Divergence(pi, j, ref.index[j], ref.ids[j])
    return Divergence(pi, j, reference.scans[pi].entries, extra)


def _divergence_json(elog: EventLog, reference: Reference, d: Divergence) -> dict[str, Any]:
    scan = reference.scans[d.pi]
    S = scan.chain.segment_size
    mid = None
    if d.j < len(reference.refs[d.pi].ids):
        mid = positions_at(elog, scan, [d.index]).get(d.index)
    out: dict[str, Any] = {"index": d.index, "segment": d.index // S, "event_id": d.event_id,
                           "message_id": None if mid is None else str(mid)}
    if len(reference.refs) > 1:
        out["partition"] = reference.refs[d.pi].partition
    return out


@dataclass
class ProcessedDiff:
    """The processed log against the reference."""

    first: Divergence | None
    missing: list[str]
    duplicated: set[str]
    out_of_order: list[str]


def diff_processed(reference: Reference, processed: Processed) -> ProcessedDiff:
    """The first divergence (per partition, the first place the handling departs from the
    reference), the events never handled, those handled twice, and those whose first handling came
    after a later event (in log order) of the same stream."""
    where, refs = reference.where, reference.refs
    handled: dict[str, int] = {}
    for eid in processed.ids:
        handled[eid] = handled.get(eid, 0) + 1
    missing = [eid for ref in refs for eid in ref.ids if eid not in handled]
    first = None
    per_part: list[list[str]] = [[] for _ in refs]
    for eid in processed.ids:
        per_part[where[eid] >> 40].append(eid)
    for pi, (ref, w) in enumerate(zip(refs, per_part)):
        ids, j, n = ref.ids, 0, min(len(w), len(ref.ids))
        while j < n and w[j] == ids[j]:
            j += 1
        if first is None and (j < len(w) or j < len(ids)):
            first = _divergence(reference, pi, j, w[j] if j < len(w) else None)
    out_of_order: list[str] = []
    max_pos: dict[int, int] = {}
    firsts: set[str] = set()
    for eid in processed.ids:
        if eid in firsts:
            continue
        firsts.add(eid)
        w = where[eid]
        stream = refs[w >> 40].stream_no[w & _LOW]
        if (w & _LOW) < max_pos.get(stream, -1):
            out_of_order.append(eid)
        else:
            max_pos[stream] = w & _LOW
    return ProcessedDiff(first, missing, {e for e, c in handled.items() if c > 1}, out_of_order)


@dataclass
class TrackerDiff:
    """Tracker checkpoints against the reference's: the first divergence, and how it was found."""

    first: Divergence | None
    info: dict[str, Any]
    notes: list[str]


def diff_tracker(reference: Reference, tracker: TrackerEvidence) -> TrackerDiff:
    """Bisection over the heads of the reference's checkpoints and the tracker's
    (:func:`~chainfold.hashing.chain.bisect_heads`), then, with the tracker's leaf hashes, the
    exact entry (:func:`~chainfold.hashing.chain.first_difference_in_segment`); without them, the
    segment's start. Single-partition logs only."""
    if len(reference.refs) > 1:
        return TrackerDiff(None, {}, ["tracker checkpoints are compared with a single-partition log only; "
                                      "this topic is partitioned"])
    ref = reference.refs[0]
    S = tracker.checkpoints[0].segment_size if tracker.checkpoints else DEFAULT_SEGMENT_SIZE
    leaves = ref.leaves or []
    b = ChainBuilder(S)
    ref_cps = [cp for k in range(0, len(leaves), S) if (cp := b.add_leaves(leaves[k:k + S])) is not None]
    if b.pending() is not None:
        ref_cps.append(b.pending())  # type: ignore[arg-type]
    wcps = tracker.checkpoints
    k, comparisons = bisect_heads(ref_cps, wcps)
    info: dict[str, Any] = {"checkpoints": len(wcps), "events": tracker.size, "comparisons": comparisons,
                            "exact": None}
    if k == min(len(ref_cps), len(wcps)) and len(ref_cps) == len(wcps):
        return TrackerDiff(None, info, [])
    notes: list[str] = []
    if k < len(ref_cps) and k < len(wcps):
        j, exact = k * S, False
        wl = tracker.leaves(k * S, wcps[k].size - k * S)
        if wl is not None:
            try:
                j, more = first_difference_in_segment(ref_cps[k], wcps[k], leaves[k * S: ref_cps[k].size], wl)
                exact, info["comparisons"] = True, comparisons + more
            except RootMismatch as exc:
                notes.append(f"{tracker.path}: tracker leaves do not match its checkpoints ({exc})")
    else:  # one side ends: the other goes on past the shorter one's size
        short = ref_cps if len(ref_cps) < len(wcps) else wcps
        j, exact = (short[-1].size if short else 0), True
    info["exact"] = exact
    if not exact:
        notes.append(f"{tracker.path}: no leaf hashes beside the checkpoints; the first divergence is "
                     f"named by its segment ({k}) start")
    return TrackerDiff(_divergence(reference, 0, j), info, notes)


def _delta(expected: Any, actual: Any) -> Any:
    """Numeric difference expected - actual, field by field where both are numbers; else None."""
    num = (int, float)
    if isinstance(expected, num) and isinstance(actual, num) and not isinstance(expected, bool) \
            and not isinstance(actual, bool):
        return expected - actual
    if isinstance(expected, dict) and isinstance(actual, dict):
        d = {k: _delta(expected.get(k), actual.get(k)) for k in sorted(set(expected) | set(actual), key=str)}
        d = {k: v for k, v in d.items() if v not in (None, 0, {})}
        return d or None
    if isinstance(expected, dict) and actual is None:
        return _delta(expected, {k: 0 if isinstance(v, num) and not isinstance(v, bool) else None
                                 for k, v in expected.items()})
    return None


@dataclass
class Handling:
    """How the worker's handling departs from the reference, by all the evidence given."""

    first: Divergence | None = None
    missing: list[str] = field(default_factory=list)
    duplicated: set[str] = field(default_factory=set)
    out_of_order: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)


def diff_handling(reference: Reference, evidence: Evidence) -> Handling:
    """The processed log's diff and the tracker's, together: the first divergence is the processed
    log's when there is one (a note says where the tracker places it if elsewhere)."""
    out = Handling()
    if evidence.processed is not None:
        pd = diff_processed(reference, evidence.processed)
        out = Handling(pd.first, pd.missing, pd.duplicated, pd.out_of_order, {"tracker": None})
    if evidence.tracker is not None:
        td = diff_tracker(reference, evidence.tracker)
        reference.notes.extend(td.notes)
        if td.info:
            out.details["tracker"] = td.info
        if out.first is None:
            out.first = td.first
        elif td.first is not None and out.first.index != td.first.index:
            reference.notes.append(f"tracker checkpoints place the first divergence at entry {td.first.index}, "
                                   f"the processed log at {out.first.index}")
    return out


def diff_states(reference: Reference, state: dict[str, Any]) -> list[dict[str, Any]]:
    """Streams whose exported state differs from the expected one: expected, actual, and the
    difference (field by field for numbers)."""
    expected = reference.folder.rendered()
    out = []
    for s in sorted(set(expected) | set(state)):
        exp = expected.get(s)
        act = render_json(state.get(s)) if s in state else None
        if exp != act:
            out.append({"stream": s, "expected": exp, "actual": act, "delta": _delta(exp, act)})
    return out


def positions(reference: Reference, report: ReconcileReport) -> dict[str, Any]:
    """Where the entries the report lists sit in the log (for reports that draw it)."""
    where, refs, folder = reference.where, reference.refs, reference.folder

    def locate(eid: str) -> tuple[int, int] | None:
        w = where.get(eid)
        return None if w is None else (w >> 40, refs[w >> 40].index[w & _LOW])

    scans = reference.scans
    return report_positions(
        partitions=[r.partition for r in refs], entries=[sc.entries for sc in scans],
        segment_size=scans[0].chain.segment_size if scans else DEFAULT_SEGMENT_SIZE, locate=locate,
        missing=report.missing, duplicates=report.duplicates, out_of_order=report.out_of_order,
        malformed=list(zip(reference.malformed_in, folder.malformed)),
        stored_again=list(zip(reference.duplicates_in, folder.duplicates)))


def repair_states(elog: EventLog, model: Model, snapshots_root: Path, reference: Reference,
                  report: ReconcileReport, state: dict[str, Any]) -> None:
    """Replay only the divergent streams from the newest valid snapshot before the first
    divergence, check the result against the reference (a fresh rebuild from the start of the
    log), and put the corrected states and the corrections in ``report``."""
    from .rebuild import rebuild

    first, divergent, notes = report.first_divergence, report.divergent_streams, report.notes
    if not divergent:
        if first is not None:
            # the worker's handling diverged, yet every state is right (e.g. a duplicate whose second
            # application changed nothing): the export is already the corrected state
            notes.append("the worker's handling diverged but every stream's state is right: nothing to replay")
            report.repaired_states = dict(sorted((s, render_json(v)) for s, v in state.items()))
            report.verdict = "repaired"
            report.details["validated"] = {"streams": len(reference.folder.states),
                                           "against": "fresh rebuild from the start of the log"}
        return
    expected = reference.folder.rendered()
    streams = frozenset(d["stream"] for d in divergent)
    limit = first["index"] if first is not None and len(reference.refs) == 1 else None
    rb = rebuild(elog, model, snapshots_root=snapshots_root, streams=streams, max_snapshot_entries=limit,
                 write_snapshots=False)
    replayed_states = rb.folder.rendered()
    report.replayed = {"from_snapshot": rb.from_snapshot, "events": sum(s.read for s in rb.scans)}
    if rb.rejected:
        report.details["rejected_snapshots"] = [{"path": p, "reason": r} for p, r in rb.rejected]
    bad = [s for s in streams if replayed_states.get(s) != expected.get(s)]
    if bad:
        notes.append("repair did not validate: the replay of " + ", ".join(sorted(bad)[:5])
                     + " differs from a fresh rebuild")
        return
    repaired = {s: render_json(v) for s, v in state.items()}
    for s in streams:
        if s in replayed_states:
            repaired[s] = replayed_states[s]
        else:
            repaired.pop(s, None)
    report.repaired_states = dict(sorted(repaired.items()))
    report.corrections = make_corrections(elog.topic, divergent)
    report.verdict = "repaired"
    report.details["validated"] = {"streams": len(streams), "against": "fresh rebuild from the start of the log"}


def reconcile(
    elog: EventLog,
    model: Model,
    *,
    snapshots_root: Path,
    state: dict[str, Any],
    state_path: str = "state",
    processed: Processed | None = None,
    tracker: TrackerEvidence | None = None,
    repair: bool = False,
    on_progress: Callable[[int], None] | None = None,
) -> ReconcileReport:
    """Compare a worker's evidence with the log; with ``repair``, compute the corrected states.

    Raises :class:`MalformedInputLine` / :class:`BadInput` for evidence naming events or streams
    the log never had, and :class:`HistoryUnrecoverable` when the log no longer holds its start.
    """
    t0 = time.monotonic()
    evidence = Evidence(state, state_path, processed, tracker)
    reference = build_reference(elog, model, snapshots_root, leaves=tracker is not None, on_progress=on_progress)
    check_evidence(reference, evidence)
    handling = diff_handling(reference, evidence)
    divergent = diff_states(reference, state)
    folder = reference.folder
    order = {eid: reference.where[eid] for eid in handling.duplicated | {d.event_id for d in folder.duplicates}
             if eid in reference.where}
    first = handling.first
    report = ReconcileReport(
        elog.topic, "divergent" if first is not None or divergent else "consistent", reference.scans,
        len(processed.ids) if processed is not None else (tracker.size if tracker else 0),
        None if first is None else _divergence_json(elog, reference, first), handling.missing,
        sorted(order, key=lambda e: order[e]), handling.out_of_order, [m.message_id for m in folder.malformed],
        divergent, {"from_snapshot": None, "events": sum(s.read for s in reference.scans)}, reference.notes,
        details=handling.details,
    )
    report.details["positions"] = positions(reference, report)
    if repair:
        repair_states(elog, model, snapshots_root, reference, report, state)
    report.seconds = time.monotonic() - t0
    return report


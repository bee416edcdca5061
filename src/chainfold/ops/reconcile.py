"""``reconcile``: what a real-time worker missed, doubled, reordered or got wrong, and the repair.

The reference is what a correct worker handles (docs/worker-evidence.md): the log's well-formed entries in log
order, each event id once, at its first entry. chainfold compares the worker's evidence with it:

* a **processed log** (ids in handling order) gives the exact first divergence, and the missing,
  duplicated and out-of-order events;
* **tracker checkpoints** (:class:`~chainfold.tracker.Tracker`) give the first divergence by
  bisection over the chained heads: O(log n) comparisons, no scan of the worker's side; with the
  tracker's leaf hashes the exact event, without them its segment;
* the **state export** gives the streams whose state is wrong, expected against actual.

Everything the evidence gets wrong is a finding, never bad input: event ids the log does not hold
(``unknown_ids``), streams it never had (``unknown_streams``), streams missing from the export.

``repair`` replays only the divergent streams from the newest valid snapshot before the first
divergence (pure folds, nothing published), checks the result against a fresh rebuild of those
streams from the start of the log, and returns the corrected state export and the corrections;
when no stream is wrong, the corrected export is the reference's states (the export as it is).
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..envelope import json_error
from ..errors import BadInput, MalformedInputLine, RootMismatch
from ..hashing.chain import ChainBuilder, Checkpoint, bisect_heads, first_difference_in_segment
from ..hashing.checkpoints import CheckpointFile
from ..hashing.stage import DEFAULT_SEGMENT_SIZE, PartitionScan, positions_at, topic_head
from ..jsonl import iter_json_lines
from ..log import EventLog, MessageId
from ..replay.fold import OnModelError
from ..replay.model import Model, render_json
from ..statediff import state_delta
from .corrections import make_corrections
from .positions import report_positions
from .reference import Passes, Reference, build_reference
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
    "compare",
    "unknown_ids",
    "check_evidence",
    "diff_processed",
    "diff_tracker",
    "diff_handling",
    "diff_states",
    "repair_states",
    "reconcile",
]

log = logging.getLogger("chainfold.ops.reconcile")

# --- inputs ------------------------------------------------------------------------------------------


@dataclass
class Processed:
    """A processed log (docs/worker-evidence.md), validated whole but not held: its lines are read
    again when compared (:meth:`rows`), so memory does not grow with it. ``path`` names it in
    messages; ``events`` counts its lines (handlings). Standard input is kept in a temporary file."""

    path: str
    file: str
    events: int
    spool: Any = None  # the temporary file holding standard input, removed with this object

    def rows(self) -> Iterator[tuple[str, int, str | None]]:
        """``(event id, line, message id or None)`` per handling, in handling order."""
        with open(self.file, encoding="utf-8") as f:
            for lineno, text in enumerate(f, 1):
                if text.strip():
                    obj = json.loads(text)
                    yield obj["id"], lineno, obj.get("message_id")

    @property
    def ids(self) -> list[str]:
        """Every handled id, in order (a list as long as the file: for small logs and tests)."""
        return [eid for eid, _, _ in self.rows()]

    def __len__(self) -> int:
        return self.events


def _check_line(name: str, lineno: int, obj: Any) -> None:
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


def load_processed(path: str) -> Processed:
    """Check a processed log whole (one pass, O(1) memory); a line that is not ``{"id": str,
    "message_id"?: str}`` is refused (:class:`MalformedInputLine`). ``-`` reads standard input
    (kept in a temporary file for the comparison)."""
    name = "<stdin>" if path == "-" else path
    spool = None
    if path == "-":
        spool = tempfile.NamedTemporaryFile("w+", encoding="utf-8", prefix="chainfold-processed-", suffix=".jsonl")
    n = written = 0
    for lineno, obj in iter_json_lines(path):
        _check_line(name, lineno, obj)
        n += 1
        if spool is not None:  # line for line, blank ones too: reports name the input's line numbers
            spool.write("\n" * (lineno - 1 - written) + json.dumps(obj) + "\n")
            written = lineno
    if spool is not None:
        spool.flush()
    return Processed(name, spool.name if spool is not None else path, n, spool)


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
    processed_events: int | None
    """Events the worker handled, by its processed log or tracker checkpoints; None (unknown) with neither."""
    first_divergence: dict[str, Any] | None
    missing: list[str]
    duplicates: list[str]
    out_of_order: list[str]
    malformed: list[str]
    divergent_streams: list[dict[str, Any]]
    replayed: dict[str, Any]
    unknown_ids: list[str] = field(default_factory=list)
    unknown_streams: list[str] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
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
            "unknown_ids": self.unknown_ids,
            "unknown_streams": self.unknown_streams,
            "skipped": self.skipped,
        }
        out.update(self.details)
        out["notes"] = self.notes
        out["seconds"] = round(self.seconds, 3)
        return out


# --- the reference: ops/reference.py --------------------------------------------------------------


@dataclass
class Evidence:
    """What the worker left behind (docs/worker-evidence.md): its state export (read from ``state_path``) and,
    optionally, its processed log and tracker checkpoints."""

    state: dict[str, Any]
    state_path: str = "state"
    processed: Processed | None = None
    tracker: TrackerEvidence | None = None


@dataclass
class Unknown:
    """What the evidence names that the log never had: event ids in the processed log (each once, in
    handling order) and streams in the state export (sorted)."""

    ids: list[str] = field(default_factory=list)
    streams: list[str] = field(default_factory=list)


def check_evidence(reference: Reference, evidence: Evidence) -> Unknown:
    """The event ids and streams the evidence names that the log does not hold: findings about the
    worker (it handled events from elsewhere, or keeps streams that were never in this log), not bad
    input."""
    out = Unknown()
    processed = evidence.processed
    if processed is not None:
        out.ids = list(dict.fromkeys(eid for _, eid in unknown_ids(reference, processed)))
    log_streams = set(reference.stream_names)
    out.streams = sorted(s for s in evidence.state if s not in log_streams)
    return out


@dataclass(frozen=True)
class Divergence:
    """Where the worker's handling first departs from the reference: entry ``j`` of partition
    ``pi``'s reference (or, past its end, the log's end and ``event_id`` the extra event)."""

    pi: int
    j: int
    index: int
    event_id: str | None


def _divergence(reference: Reference, pi: int, j: int, extra: str | None = None) -> Divergence:
    at = reference.event(pi, j)
    if at is not None:
        return Divergence(pi, j, at[1], at[0])
    return Divergence(pi, j, reference.scans[pi].entries, extra)


def _divergence_json(elog: EventLog, reference: Reference, d: Divergence) -> dict[str, Any]:
    scan = reference.scans[d.pi]
    S = scan.chain.segment_size
    mid = None
    if d.j < reference.counts[d.pi]:
        mid = positions_at(elog, scan, [d.index]).get(d.index)
    out: dict[str, Any] = {"index": d.index, "segment": d.index // S, "event_id": d.event_id,
                           "message_id": None if mid is None else str(mid)}
    if len(reference.partitions) > 1:
        out["partition"] = reference.partitions[d.pi]
    return out


def load_handling(reference: Reference, processed: Processed) -> None:
    """Put the processed log beside the reference (once per reference)."""
    reference.load_handling(((eid, line) for eid, line, _ in processed.rows()), processed.events)


def unknown_ids(reference: Reference, processed: Processed) -> list[tuple[int, str]]:
    """``(line, event id)`` of the handlings of ids the log does not hold (in handling order). Ids
    of events before the reference's start (in a snapshot's seen ids, when the log lost its first
    entries) are not unknown: they are counted in :func:`handled_before_start`."""
    load_handling(reference, processed)
    seen = reference.folder.decoder.seen
    return [(line, eid) for line, eid in reference.not_in_reference() if eid not in seen]  # type: ignore[operator]


def handled_before_start(reference: Reference, processed: Processed) -> dict[str, Any] | None:
    """What of the worker's handling can no longer be checked, when the reference starts at a
    snapshot (the log lost what was before it): the handlings of events the snapshot had folded."""
    if reference.from_snapshot is None:
        return None
    load_handling(reference, processed)
    seen = reference.folder.decoder.seen
    n, first, last = 0, None, None
    for line, eid in reference.not_in_reference():
        if eid in seen:  # type: ignore[operator]
            n += 1
            first = line if first is None else first
            last = line
    return {"handled": n, "lines": None if first is None else [first, last]}


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
    after a later event (in log order) of the same stream. One walk over the handlings in order
    (joined with the reference on disk), keeping counters per partition and per stream."""
    load_handling(reference, processed)
    missing = list(reference.missing())
    parts = len(reference.partitions)
    handled = [0] * parts  # handlings of each partition's events so far: the position compared next
    departs: list[tuple[int, str] | None] = [None] * parts
    out_of_order: list[str] = []
    max_pos: dict[int, int] = {}
    seen = reference.folder.decoder.seen
    for h in reference.handlings():
        pi = h.pi
        if pi is None:  # an event the reference does not hold
            if parts > 1 or h.event_id in seen:  # type: ignore[operator]  (before a snapshot start: not checked)
                continue
            pi = 0  # an id the log does not hold departs from the reference where it was handled
        t = handled[pi]
        if departs[pi] is None and h.j != t:
            departs[pi] = (t, reference.event_id(h))
        handled[pi] = t + 1
        if h.first and h.pi is not None:
            if h.j < max_pos.get(h.sno, -1):
                out_of_order.append(reference.event_id(h))
            else:
                max_pos[h.sno] = h.j
    first = None
    for pi in range(parts):
        at = departs[pi]
        if at is None and handled[pi] != reference.counts[pi]:
            at = (handled[pi], None)  # the handling stopped short of the reference
        if at is not None:
            first = _divergence(reference, pi, at[0], at[1])
            break
    return ProcessedDiff(first, missing, set(reference.handled_twice()), out_of_order)


@dataclass
class TrackerDiff:
    """Tracker checkpoints against the reference's: the first divergence, and how it was found."""

    first: Divergence | None
    info: dict[str, Any]
    notes: list[str]


def _reference_checkpoints(reference: Reference, S: int) -> list[Checkpoint]:
    """The checkpoints (segment size ``S``) over the reference's leaf hashes, read from disk a
    segment at a time."""
    b = ChainBuilder(S)
    cps = []
    for k in range(0, len(reference), S):
        cp = b.add_leaves(reference.leaves(k, S))
        if cp is not None:
            cps.append(cp)
    if b.pending() is not None:
        cps.append(b.pending())  # type: ignore[arg-type]
    return cps


def diff_tracker(reference: Reference, tracker: TrackerEvidence) -> TrackerDiff:
    """Bisection over the heads of the reference's checkpoints and the tracker's
    (:func:`~chainfold.hashing.chain.bisect_heads`), then, with the tracker's leaf hashes, the
    exact entry (:func:`~chainfold.hashing.chain.first_difference_in_segment`); without them, the
    segment's start. Single-partition logs, with a reference from the start of the log, only."""
    if len(reference.partitions) > 1:
        return TrackerDiff(None, {}, ["tracker checkpoints are compared with a single-partition log only; "
                                      "this topic is partitioned"])
    if reference.from_snapshot is not None:
        return TrackerDiff(None, {}, ["tracker checkpoints cover the worker's handling from the start of the log, "
                                      "which the log no longer holds: they cannot be compared"])
    S = tracker.checkpoints[0].segment_size if tracker.checkpoints else DEFAULT_SEGMENT_SIZE
    ref_cps = _reference_checkpoints(reference, S)
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
                j, more = first_difference_in_segment(ref_cps[k], wcps[k], reference.leaves(k * S, ref_cps[k].size - k * S),
                                                      wl)
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
    """Streams whose exported state differs from the expected one (a stream missing from the export
    too, actual null; and one the log never had, expected null): expected, actual, and the
    difference (:func:`~chainfold.statediff.state_delta`)."""
    expected = reference.folder.rendered()
    out = []
    for s in sorted(set(expected) | set(state)):
        exp = expected.get(s)
        act = render_json(state.get(s)) if s in state else None
        if exp != act:
            out.append({"stream": s, "expected": exp, "actual": act, "delta": state_delta(exp, act)})
    return out


def positions(reference: Reference, report: ReconcileReport) -> dict[str, Any]:
    """Where the entries the report lists sit in the log (for reports that draw it)."""
    scans, folder = reference.scans, reference.folder
    return report_positions(
        partitions=list(reference.partitions), entries=[sc.entries for sc in scans],
        segment_size=scans[0].chain.segment_size if scans else DEFAULT_SEGMENT_SIZE, locate=reference.locate,
        missing=report.missing, duplicates=report.duplicates, out_of_order=report.out_of_order,
        malformed=list(zip(reference.malformed_in, folder.malformed)),
        stored_again=list(zip(reference.duplicates_in, folder.duplicates)))


def repair_states(elog: EventLog, model: Model, snapshots_root: Path, reference: Reference,
                  report: ReconcileReport, state: dict[str, Any], *, rebuild: Callable[..., Any] | None = None) -> None:
    """Replay only the divergent streams from the newest valid snapshot before the first
    divergence, check the result against the reference (a fresh rebuild from the start of the
    log), and put the corrected states and the corrections in ``report``. ``rebuild`` is the
    engine's (:func:`chainfold.ops.rebuild.rebuild` by default)."""
    if rebuild is None:
        from .rebuild import rebuild

    first, divergent, notes = report.first_divergence, report.divergent_streams, report.notes
    if not divergent:
        # every stream's state is right: the export is already the correct one (the reference's)
        report.repaired_states = reference.folder.rendered()
        if report.verdict != "consistent":
            # the worker's handling diverged, yet every state is right (e.g. a duplicate whose second
            # application changed nothing, an id the log does not hold that changed nothing)
            notes.append("the worker's handling diverged but every stream's state is right: nothing to replay")
            report.verdict = "repaired"
            report.details["validated"] = {"streams": len(reference.folder.states), "against": _against(reference)}
        return
    expected = reference.folder.rendered()
    streams = frozenset(d["stream"] for d in divergent)
    limit = first["index"] if first is not None and len(reference.partitions) == 1 else None
    rb = rebuild(elog, model, snapshots_root=snapshots_root, streams=streams, max_snapshot_entries=limit,
                 write_snapshots=False, on_model_error=reference.folder.fold.on_error,
                 allow_partial_history=reference.history.allow_partial)
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
    report.details["validated"] = {"streams": len(streams), "against": _against(reference)}


def _against(reference: Reference) -> str:
    """What a repair was validated against: the reference's fold."""
    if reference.snapshot_path is None:
        return "fresh rebuild from the start of the log"
    return f"fresh rebuild from snapshot {reference.snapshot_path} (the log lost what was before it)"


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
    allow_partial_history: bool = False,
    on_progress: Callable[[int], None] | None = None,
    on_model_error: OnModelError = "stop",
    rebuild: Callable[..., Any] | None = None,
    passes: Passes | None = None,
) -> ReconcileReport:
    """Compare a worker's evidence with the log; with ``repair``, compute the corrected states.

    What the worker got wrong is a finding, never an error: event ids and streams the log never had
    are listed (``unknown_ids``, ``unknown_streams``) and make the verdict "divergent". A model
    error is handled by ``on_model_error`` (``stop`` raises :class:`~chainfold.errors.ModelError`;
    the skip policies list the events in ``skipped``). :class:`HistoryUnrecoverable` when the log
    lost entries and no valid snapshot covers the loss (unless ``allow_partial_history``). A log
    with seq gaps gives the verdict ``unrecoverable`` (with every finding) unless
    ``allow_partial_history``. ``rebuild`` is the engine's replay for the repair and ``passes`` its
    passes over the log for the reference (:func:`~chainfold.ops.reference.build_reference`); the
    distributed engine passes its own.
    """
    t0 = time.monotonic()
    evidence = Evidence(state, state_path, processed, tracker)
    with build_reference(elog, model, snapshots_root, leaves=tracker is not None,
                         allow_partial_history=allow_partial_history, on_progress=on_progress,
                         on_error=on_model_error, passes=passes) as reference:
        report = compare(elog, reference, evidence)
        if repair and report.verdict != "unrecoverable":
            repair_states(elog, model, snapshots_root, reference, report, state, rebuild=rebuild)
    report.seconds = time.monotonic() - t0
    return report


def compare(elog: EventLog, reference: Reference, evidence: Evidence) -> ReconcileReport:
    """The report: the evidence against the reference (see :func:`reconcile`)."""
    unknown = check_evidence(reference, evidence)
    handling = diff_handling(reference, evidence)
    divergent = diff_states(reference, evidence.state)
    folder = reference.folder
    first = handling.first
    wrong = first is not None or divergent or unknown.ids or unknown.streams
    report = ReconcileReport(
        elog.topic, "divergent" if wrong else "consistent", reference.scans, _processed_count(evidence),
        None if first is None else _divergence_json(elog, reference, first), handling.missing,
        reference.in_log_order(handling.duplicated | {d.event_id for d in folder.duplicates}), handling.out_of_order,
        [m.message_id for m in folder.malformed], divergent,
        {"from_snapshot": reference.from_snapshot, "events": sum(s.read for s in reference.scans)},
        unknown.ids, unknown.streams, [k.to_json() for k in folder.skipped], reference.notes,
        details=handling.details,
    )
    _history(reference, report, evidence.processed)
    report.details["positions"] = positions(reference, report)
    return report


def _processed_count(evidence: Evidence) -> int | None:
    """Events the worker handled: its processed log's lines, else its tracker's count; None (unknown)
    when it gave neither (a state export alone says nothing about how many it handled)."""
    if evidence.processed is not None:
        return len(evidence.processed)
    if evidence.tracker is not None:
        return evidence.tracker.size
    return None


def _history(reference: Reference, report: ReconcileReport, processed: Processed | None) -> None:
    """The history part of the report: seq gaps, lost entries, and what of the worker's handling
    can no longer be checked when the reference starts at a snapshot."""
    history = reference.history
    report.details.update(history.to_json())
    report.notes.extend(history.notes())
    if reference.from_snapshot is not None:
        unchecked: dict[str, Any] = {"snapshot": reference.snapshot_path, "entries": reference.from_snapshot,
                                     "handled": None, "lines": None}
        if processed is not None:
            unchecked.update(handled_before_start(reference, processed) or {})
        report.details["history_unchecked"] = unchecked
        report.notes.append(
            f"the log lost its first entries: the reference starts at snapshot {reference.snapshot_path} "
            f"({reference.from_snapshot:,} entries); the worker's handling before it cannot be checked"
            + (f" ({unchecked['handled']:,} handling(s), lines {unchecked['lines'][0]}..{unchecked['lines'][1]})"
               if unchecked.get("lines") else ""))
    problem = history.problem()
    if problem is not None:
        report.verdict = "unrecoverable"
        report.details["error"] = problem

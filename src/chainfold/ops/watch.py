"""``watch``: follow a log as it grows and a worker's evidence with it; report divergence live.

Watch is rebuild's stages, following (docs/cli.md, ``chainfold watch``)::

    source (Span(after=P, follow=True)) → hash (records checkpoints) → decode + dedup → fold
                                                                      ↘ tap ↘ state digests
                                                  reference positions → HandlingComparator
    ticks (between batches, and on each idle poll of the source):
        EvidenceFollower → comparator → ``divergence``; ``progress``; the record made durable;
        periodic snapshots through the snapshot sink, the comparison state saved beside them

* **Start.** Rebuild's plan (:func:`~chainfold.ops.rebuild.plan_rebuild`) picks the newest valid
  snapshot: its states, seen ids and chain; the hash stage continues the recorded checkpoints from
  its position. With ``evidence``, the comparison state saved with a snapshot (one file per
  evidence directory, tagged with the snapshot's position) continues the comparator and the
  follower; when no snapshot matches it, the replay starts at the log's beginning (the reference
  holds every event the worker will be compared on).
* **Reference.** After each batch is folded, its first-seen well-formed events become reference
  positions, one block per batch (log indexes, event ids, the leaf hashes from the hash stage; the
  message id is looked up for a divergence only). While the worker gives state
  digests, the fold stage's model also digests each applied event's rendered stream state
  (:func:`~chainfold.tracker.state_digest`): a mis-handled event (right event, wrong state) is
  named exactly. Malformed entries and duplicates become lines at once (the tap after decoding).
* **Ticks.** The source hands control back after every batch (at most ``max_wait`` old) and on
  every idle poll; then every stage has taken exactly the entries read. A tick polls the evidence
  (at most what the comparator can use), compares, and, at an idle poll, first compares with the
  reference known complete (what the worker handled by the last poll is all in the log read since:
  a worker with more positions handled something the log does not hold there).
* **Broker failures.** The log's reader retries briefly; past that, :class:`BrokerUnavailable`
  becomes an ``error`` line, watch keeps ticking (the evidence is still compared) and opens a new
  source strictly after the last entry every stage took, backing off: nothing is counted twice.
* **Stop.** :meth:`WatchRun.stop` (SIGINT/SIGTERM in the CLI), or a divergence with
  ``fail_on_divergence``: the source ends after the current batch, the record is made durable, a
  snapshot is taken at that exact position with the comparison state beside it, the provisional
  checkpoint recorded, and a last ``progress`` line written.

* **History.** Lost history is reported as verify reports it (docs/cli.md#history), on ``error``
  lines with a ``history`` key: recorded entries gone from the log, at start (the plan found them:
  covered by the snapshot watch starts from, or accepted with ``allow_partial_history``; otherwise
  the plan fails with :class:`~chainfold.errors.HistoryUnrecoverable`); each seq gap when its entry
  is decoded (the seq check of rebuild, continued from the snapshot; gaps found before this run are
  said once, as a count and the first).

Memory is flat in the length of the run: the stages hold O(segment) entries, the comparator spills
what the worker has not reached, the evidence follower holds offsets, and reported malformed
entries, duplicates and skipped events are dropped once written (the snapshots still count them).
The seen ids and the states grow with distinct ids and streams, as in rebuild, and the seq gaps
with the gaps found (the snapshots carry them).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import cbor2

from ..envelope import Event
from ..errors import BadInput, BrokerUnavailable, CheckpointCorrupt, InvalidArgument, ModelError
from ..hashing.record import open_record
from ..hashing.stage import HashStage
from ..log import Entry, EventLog, Position
from ..log.source import Source, Span
from ..replay.decode import Decoded
from ..replay.fold import FoldStage, OnModelError
from ..replay.model import Model
from ..replay.pipeline import run_pass
from ..store.atomic import atomic_write
from ..store.snapshots import PartitionPosition, topic_dir
from ..tracker import NO_DIGEST, plain_state_digest, state_digest
from ..watch.compare import HandlingComparator, LiveDivergence
from ..watch.follow import EvidenceFollower
from ..watch.output import WatchLines
from .rebuild import DEFAULT_SNAPSHOT_EVERY, RebuildOptions, RebuildPlan, RebuildRun, plan_rebuild

__all__ = ["WatchOptions", "WatchResult", "WatchRun", "watch", "ComparisonStore"]

log = logging.getLogger("chainfold.ops.watch")

_EVIDENCE_POLL = 0.05  # seconds between evidence polls while entries flow (idle polls always poll)


@dataclass(frozen=True)
class WatchOptions:
    """How to watch. ``snapshots_root`` holds snapshots and the recorded checkpoints (as rebuild's);
    ``evidence`` is the worker's Tracker directory (None: follow the log only). A snapshot is taken
    every ``snapshot_every`` entries (0: never by count) and, when entries came in since the last
    one, every ``snapshot_seconds`` (0: never by time); ``keep`` are kept. ``poll_seconds``: the
    wait between idle polls of the log; ``max_wait``: how old a batch may get before it is folded;
    ``progress_seconds``: between ``progress`` lines; ``retry_max_seconds``: the longest wait
    between attempts while the broker is gone; ``window``: reference positions the comparator keeps
    in memory before it spills; ``allow_partial_history``: the log is known to start mid-history (lost
    recorded entries no snapshot covers are reported, and the log followed from where it starts now,
    instead of failing with :class:`~chainfold.errors.HistoryUnrecoverable`)."""

    snapshots_root: Path
    evidence: Path | None = None
    fail_on_divergence: bool = False
    on_model_error: OnModelError = "stop"
    snapshot_every: int = DEFAULT_SNAPSHOT_EVERY
    snapshot_seconds: float = 300.0
    keep: int = 3
    poll_seconds: float = 0.25
    max_wait: float = 0.25
    progress_seconds: float = 1.0
    retry_max_seconds: float = 15.0
    window: int = 1 << 15
    allow_partial_history: bool = False

    def __post_init__(self) -> None:
        if self.on_model_error not in ("stop", "skip-event", "skip-stream"):
            raise InvalidArgument(f"on_model_error must be stop, skip-event or skip-stream, not {self.on_model_error!r}")
        object.__setattr__(self, "snapshots_root", Path(self.snapshots_root))
        if self.evidence is not None:
            object.__setattr__(self, "evidence", Path(self.evidence))


@dataclass
class WatchResult:
    """How a watch ended. ``exit_code``: 0 stopped, 1 a divergence with ``fail_on_divergence`` (or
    events skipped by a skip policy), 2 the model failed with ``on_model_error="stop"``."""

    exit_code: int
    log_entries: int
    head: str | None
    divergence: LiveDivergence | None = None
    worker_entries: int | None = None
    snapshot: str | None = None
    skipped: int = 0
    lines: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class _Tag:
    entries: int
    message_id: str | None
    follower: dict[str, Any]
    comparison: str


class ComparisonStore:
    """The comparison state of one evidence directory, saved beside the topic's snapshots: the
    comparator (``watch-<key>-<entries>.comparison``) and, written last and atomically, a tag
    (``watch-<key>.cbor``) naming it with the snapshot position it belongs to and the follower's
    state. ``<key>`` is a digest of the evidence directory's absolute path."""

    def __init__(self, directory: Path, evidence: Path) -> None:
        self.dir = directory
        self.evidence = str(evidence.resolve())
        self.key = hashlib.sha256(self.evidence.encode("utf-8", "surrogatepass")).hexdigest()[:16]
        self.tag_path = directory / f"watch-{self.key}.cbor"
        self.spill_path = directory / f"watch-{self.key}.spill"

    def load(self) -> _Tag | None:
        """The saved tag, or None (none saved, or unreadable: then the comparison starts afresh)."""
        try:
            doc = cbor2.loads(self.tag_path.read_bytes())
            if doc.get("version") != 1 or doc.get("evidence") != self.evidence:
                return None
            return _Tag(doc["entries"], doc["message_id"], doc["follower"], doc["comparison"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, AttributeError, cbor2.CBORDecodeError) as exc:
            log.warning("%s: not a saved comparison (%s); comparing from the start of the log", self.tag_path, exc)
            return None

    def open(self, tag: _Tag, window: int) -> tuple[HandlingComparator, EvidenceFollower] | None:
        try:
            cmp = HandlingComparator.load(self.dir / tag.comparison, window=window, spill_path=self.spill_path)
            return cmp, EvidenceFollower.from_state(self.evidence, tag.follower, processed=False)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("%s: cannot continue the saved comparison (%s); comparing from the start of the log",
                        self.dir / tag.comparison, exc)
            return None

    def save(self, entries: int, message_id: str | None, cmp: HandlingComparator, follower: EvidenceFollower) -> None:
        name = f"watch-{self.key}-{entries:012d}.comparison"
        cmp.save(self.dir / name)
        atomic_write(self.tag_path, cbor2.dumps({"version": 1, "evidence": self.evidence, "entries": entries,
                                                 "message_id": message_id, "follower": follower.state(),
                                                 "comparison": name}))
        for old in self.dir.glob(f"watch-{self.key}-*.comparison"):
            if old.name != name:
                old.unlink(missing_ok=True)


class _Reference:
    """The fold stage, feeding the comparator: after each batch is folded, its first-seen events
    become reference positions (log index, event id, the leaf hash the hash stage computed, and the
    state digest of the event's stream after it: the model's rendered state,
    :func:`~chainfold.tracker.state_digest`), handed over as one block
    (:meth:`~chainfold.watch.compare.HandlingComparator.add_reference_block`: no object per event).
    :data:`NO_DIGEST` for an event not applied (a skip policy) and while ``on`` is off (the worker
    gives no digests: nothing to compare them with). Message ids are not made per event (each costs
    calls into the Pulsar client): watch names the entry of a divergence when it reports it."""

    def __init__(self, fold: FoldStage, comparator: HandlingComparator) -> None:
        self.fold = fold
        self.comparator = comparator
        self.plain = fold.model
        applied: list[Event] = []
        digests: list[bytes] = []
        apply, render = self.plain.apply, self.plain.render
        raw_render = getattr(self.plain.obj, "render", None)
        plain_digest, add_digest, add_applied = plain_state_digest, digests.append, applied.append

        def apply_and_digest(state: Any, ev: Event) -> Any:
            new = apply(state, ev)
            # a flat rendered state is digested as it is (render_json would copy it unchanged)
            d = plain_digest(ev.stream, new if raw_render is None else raw_render(new))
            add_digest(d if d is not None else state_digest(ev.stream, render(new)))
            add_applied(ev)
            return new

        self.digesting: Model = copy.copy(self.plain)
        self.digesting.apply = apply_and_digest
        self._applied, self._digests = applied, digests
        self._leaves: list[bytes] = []
        self.on = False
        self.switch(True)

    def switch(self, on: bool) -> None:
        if on != self.on:
            self.on = on
            self.fold.model = self.digesting if on else self.plain

    def tap(self, decoded: Decoded, leaves: list[bytes] | None) -> None:
        """The batch's leaf hashes (the pipeline's tap, before the fold)."""
        self._leaves = leaves or []

    def feed(self, decoded: Decoded) -> None:
        applied, digests = self._applied, self._digests
        applied.clear()
        digests.clear()
        self.fold.feed(decoded)
        events = decoded.events
        if not events:
            return
        offsets, leaves = decoded.offsets(), self._leaves
        self.comparator.add_reference_block(
            decoded.indexes(), [ev.id for ev in events],
            b"".join(leaves) if len(leaves) == len(events) and type(offsets) is range
            else b"".join([leaves[k] for k in offsets]),
            self._batch_digests(events) if self.on else None)

    def _batch_digests(self, events: list[Event]) -> bytes:
        """The state digest of each event, in order (:data:`NO_DIGEST` where the fold did not apply it)."""
        applied, digests = self._applied, self._digests
        if len(applied) == len(events):  # every event applied, in order
            return b"".join(digests)
        out, k, n = [], 0, len(applied)
        for ev in events:
            if k < n and applied[k] is ev:
                out.append(digests[k])
                k += 1
            else:
                out.append(NO_DIGEST)
        return b"".join(out)


class WatchRun:
    """One watch of ``elog`` with ``model`` (see the module doc): build it, then :meth:`run`;
    :meth:`stop` from a signal handler or another thread ends it cleanly. Lines go to ``lines``;
    ``status(text)``, if given, gets a one-line summary with each progress line."""

    def __init__(self, elog: EventLog, model: Model, options: WatchOptions, lines: WatchLines, *,
                 status: Any = None) -> None:
        parts = elog.partitions()
        if len(parts) != 1:
            raise BadInput(f"{elog.topic} has {len(parts)} partitions; watch follows one log order (a "
                           "non-partitioned topic, or one partition of a partitioned topic by its full name)")
        self.elog, self.model, self.options, self.lines, self.status = elog, model, options, lines, status
        self.partition = parts[0]
        tdir = topic_dir(options.snapshots_root, elog.topic)
        self.saved = ComparisonStore(tdir, options.evidence) if options.evidence is not None else None
        plan, resumed = self._plan()
        self.plan = plan
        run = RebuildRun(plan)
        self.fold = run.folder.fold
        self.fold.on_error = options.on_model_error
        self.decoder = run.folder.decoder
        self.seqs = run.folder.seqs  # the seq check (a snapshot's, continued): its gaps stay for the snapshots
        self.seqs.lost_start = run.lost_start(self.partition)
        self._gaps_said = self._gaps_before = len(self.seqs.gaps)
        self.sink = run.sink
        self.hasher: HashStage = run.hash_stage(self.partition)
        self.after: Position | None = run.start_of(self.partition)[1]
        self.comparator: HandlingComparator | None = None
        self.follower: EvidenceFollower | None = None
        self.reference: _Reference | None = None
        if options.evidence is not None:
            tdir.mkdir(parents=True, exist_ok=True)
            assert self.saved is not None
            self.comparator, self.follower = resumed or (
                HandlingComparator(segment_size=self.hasher.chain.segment_size, window=options.window,
                                   spill_path=self.saved.spill_path),
                EvidenceFollower(options.evidence, processed=False))
            self.reference = _Reference(self.fold, self.comparator)
        self.divergence = self.comparator.divergence if self.comparator is not None else None
        self.exit_code = 0
        self.skipped = 0
        self._stop = threading.Event()
        self._source: Source | None = None
        self._failures = 0
        self._mismatch_reported = False
        now = time.monotonic()
        self._next_poll = self._next_progress = now
        self._snapshot_at = (now, self.hasher.chain.size)

    # --- start ------------------------------------------------------------------------------------------

    def _plan(self) -> tuple[RebuildPlan, tuple[HandlingComparator, EvidenceFollower] | None]:
        """Rebuild's plan; with evidence, from the snapshot the saved comparison belongs to, else
        from the beginning of the log."""
        o = self.options
        opts = RebuildOptions(snapshots_root=o.snapshots_root, snapshot_every=0, keep=o.keep,
                              on_model_error=o.on_model_error, allow_partial_history=o.allow_partial_history)
        if self.saved is None:
            return plan_rebuild(self.elog, self.model, opts), None
        tag = self.saved.load()
        if tag is not None:
            plan = plan_rebuild(self.elog, self.model, replace(opts, max_snapshot_entries=tag.entries))
            snap = plan.snapshot
            at = (snap.entries, snap.partitions[0].message_id) if snap is not None else (0, None)
            if at == (tag.entries, tag.message_id):
                resumed = self.saved.open(tag, o.window)
                if resumed is not None:
                    return plan, resumed
            else:
                log.warning("the comparison saved at entry %d has no valid snapshot there; comparing from the "
                            "start of the log", tag.entries)
        return plan_rebuild(self.elog, self.model, replace(opts, full=True)), None

    # --- the run ----------------------------------------------------------------------------------------

    def stop(self, *_: object) -> None:
        """End the watch after the current batch (thread- and signal-safe)."""
        self._stop.set()
        src = self._source
        if src is not None:
            src.stop()

    def run(self) -> WatchResult:
        """Follow until stopped; the result (lines were written as it went)."""
        o = self.options
        self._report_history()
        if self.divergence is not None:  # found by an earlier run (the saved comparison): said again
            self._diverged(self.divergence)
        try:
            while not self._stop.is_set():
                source = self._source = Source(self.elog, Span(self.partition, after=self.after, follow=True),
                                               poll_seconds=o.poll_seconds, max_wait=o.max_wait)
                if self._stop.is_set():
                    source.stop()
                try:
                    run_pass(self._ticking(source), start=self.hasher.chain.size, hasher=self.hasher,
                             decoder=self.decoder, fold=self.reference or self.fold, tap=self._tap)
                except BrokerUnavailable as exc:
                    self._broker_failed(exc)
        except ModelError as exc:
            self.lines.error(f"the model failed: {exc}; stopped (--on-model-error stop): no snapshot past it",
                             stream=exc.stream, event_id=exc.event_id, message_id=exc.message_id)
            self.exit_code = 2
            self.hasher.flush()
            if self.comparator is not None:
                self.comparator.close()
            return self._result(None)
        return self._finish()

    def _ticking(self, source: Source) -> Iterator[list[Entry]]:
        """The source's batches, with a tick before each and at each idle poll, when every stage
        has taken exactly the entries handed on so far."""
        for batch in source:
            self._tick(idle=not batch)
            if self.lines.broken:  # nobody reads the lines any more: stop as on SIGTERM
                self.stop()
            if self._stop.is_set():
                source.stop()
            if batch:
                self._failures = 0
                yield batch
                self.after = batch[-1].message_id  # run_pass asks for the next batch once this one is through

    def _tap(self, decoded: Decoded, leaves: list[bytes] | None) -> None:
        """After the decode stage: lines for its findings; the batch's leaves for the reference."""
        self._report_decoder()
        if len(self.seqs.gaps) > self._gaps_said:
            self._report_gaps()
        if self.reference is not None:
            self.reference.tap(decoded, leaves)

    def _report_decoder(self) -> None:
        """A line per malformed entry and duplicate the decoder found; then they are forgotten (the
        sink still counts them)."""
        d, lines = self.decoder, self.lines
        for kind, found, write in (("malformed", d.malformed, lambda m: lines.malformed(m.message_id, m.reason)),
                                   ("duplicates", d.duplicates, lambda x: lines.duplicate(x.event_id, x.message_id))):
            if not found:
                continue
            for item in found:
                write(item)
            if self.sink is not None:
                self.sink.forgotten[kind] += len(found)
            found.clear()

    # --- history (docs/cli.md#history) -----------------------------------------------------------------

    def _report_history(self) -> None:
        """At start: recorded entries gone from the log (covered by the snapshot watch starts from,
        or accepted with ``allow_partial_history``), and the seq gaps found before this run."""
        for t in self.plan.truncations:
            how = (f"; watch continues from the snapshot that covers the loss ({t.covered_by})" if t.covered_by else
                   "; followed from where the log starts now (--allow-partial-history)")
            self.lines.truncated(t.describe() + how, t.to_json())
        if self._gaps_before:
            g = self.seqs.gaps[0]
            self.lines.error(f"events are missing from the log itself: {self._gaps_before} seq gap(s) found before "
                             f"this run (before the snapshot it continues from), the first in stream {g.stream!r} at "
                             f"message {g.message_id}", history="gaps", **g.to_json(), index=g.index,
                             seq_gaps_before=self._gaps_before)

    def _report_gaps(self) -> None:
        """A line per seq gap found since the last call (the gaps stay in the check: snapshots keep them)."""
        gaps = self.seqs.gaps
        for g in gaps[self._gaps_said:]:
            self.lines.seq_gap(g)
        self._gaps_said = len(gaps)

    def _tick(self, idle: bool) -> None:
        now = time.monotonic()
        if self.comparator is not None:
            if idle:  # the log's end was reached after every evidence poll so far
                self._compare(reference_complete=True)
            if idle or now >= self._next_poll:
                self._next_poll = now + _EVIDENCE_POLL
                self._poll_evidence()
                self._compare(reference_complete=False)
        self._report_skipped()
        if self.hasher.check.mismatch is not None and not self._mismatch_reported:
            m = self.hasher.check.mismatch
            self._mismatch_reported = True
            self.lines.error(f"the log differs from its recorded checkpoints at entry {m.index}: {m.reason} "
                             "(run `chainfold verify` for details)", index=m.index, message_id=m.message_id)
        if now >= self._next_progress:
            self._next_progress = now + self.options.progress_seconds
            self._progress()
        if self._snapshot_due(now):
            self._snapshot()

    # --- the evidence -------------------------------------------------------------------------------

    def _poll_evidence(self) -> None:
        cmp, follower = self.comparator, self.follower
        assert cmp is not None and follower is not None
        room = cmp.room()
        if room <= 0:
            return
        try:
            b = follower.poll(min(room, follower.max_leaves))
        except CheckpointCorrupt as exc:
            self.lines.error(f"the worker's evidence cannot be followed: {exc}; the log is still followed, the "
                             "worker no longer compared", file=exc.path, line=exc.line)
            self._drop_evidence()
            return
        if b.count:
            cmp.add_worker(b.start, b.leaves, b.digests)
        for problem in b.problems:
            self.lines.error(problem)
        if self.reference is not None:  # digest only what can be compared: a worker that gives states
            self.reference.switch(not (follower.positions > 0 and not follower.states_path.exists()))

    def _drop_evidence(self) -> None:
        if self.comparator is not None:
            self.comparator.close()
        if self.reference is not None:
            self.reference.switch(False)
        self.comparator = self.follower = self.reference = None

    def _compare(self, *, reference_complete: bool) -> None:
        assert self.comparator is not None
        d = self.comparator.check(log_entries=self.hasher.chain.size, reference_complete=reference_complete)
        if d is None:
            return
        if d.event_id is not None and not d.message_id:
            # named in the comparator too, so the saved comparison keeps the message id
            d = self.comparator.divergence = replace(d, message_id=self._message_id_at(d.index))
        self._diverged(d)

    def _diverged(self, d: LiveDivergence) -> None:
        self.divergence = d
        self.lines.divergence(d)
        if self.options.fail_on_divergence:
            self.exit_code = 1
            self.stop()

    def _message_id_at(self, index: int) -> str | None:
        """The message id of log entry ``index`` (already read): from the hash stage's current
        segment, else read again from the first entry of its segment as recorded."""
        h = self.hasher
        seg_start = h.chain.size - len(h.seg_entries)
        if seg_start <= index < h.chain.size:
            return str(h.seg_entries[index - seg_start].message_id)
        S = h.chain.segment_size
        h.flush()
        recorded, _ = open_record(self.plan.records[self.partition])
        k = index // S
        first = recorded[k].first if k < len(recorded) else None
        span = Span(self.partition, start=self.elog.position(first), limit=index - k * S + 1) if first else \
            Span(self.partition, limit=index + 1)  # nothing recorded there: count from the start
        try:
            last = [e for batch in Source(self.elog, span) for e in batch[-1:]]
        except BrokerUnavailable as exc:
            log.warning("cannot name the message id of entry %d now: %s", index, exc)
            return None
        return str(last[-1].message_id) if last else None

    def _report_skipped(self) -> None:
        skipped = self.fold.skipped
        if not skipped:
            return
        for s in skipped:
            self.lines.error(f"the model failed on event {s.event_id!r} of stream {s.stream!r}: {s.error}; skipped "
                             f"(--on-model-error {self.fold.on_error})", stream=s.stream, event_id=s.event_id,
                             message_id=s.message_id)
        self.skipped += len(skipped)
        skipped.clear()

    # --- progress, record, snapshots ------------------------------------------------------------------

    def head(self) -> str | None:
        """The log's head over the entries read (the provisional head inside a segment), hex."""
        chain = self.hasher.chain
        if not chain.size:
            return None
        p = chain.pending()
        return (p.head if p is not None else chain.head).hex()

    def _progress(self) -> None:
        h = self.hasher
        before = h.writer.written if h.writer is not None else 0
        h.flush()
        if h.writer is not None and h.writer.written > before:
            self.lines.checkpoint_recorded()
        h.scan.checkpoints.clear()  # the pass keeps no list of every segment
        n = h.chain.size
        worker = self.follower.positions if self.follower is not None else None
        lag = self.comparator.lag(n) if self.comparator is not None else None
        self.lines.progress(log_entries=n, worker_entries=worker, lag=lag, head=self.head())
        if self.status is not None:
            who = "" if worker is None else f", worker {worker:,} (lag {lag:,})"
            state = ", DIVERGED" if self.divergence is not None else ""
            self.status(f"watch {self.elog.topic}: {n:,} entries{who}{state}")

    def _snapshot_due(self, now: float) -> bool:
        o, (t, n) = self.options, self._snapshot_at
        size = self.hasher.chain.size
        if self.sink is None or size == n:
            return False
        return (o.snapshot_every > 0 and size - n >= o.snapshot_every) or (
            o.snapshot_seconds > 0 and now - t >= o.snapshot_seconds)

    def _snapshot(self, *, final: bool = False) -> str | None:
        """A snapshot at the position every stage has reached (unless the last one is there), and the
        comparison state beside it (also then, at the end: the worker may have moved on)."""
        h, sink = self.hasher, self.sink
        n = h.chain.size
        self._snapshot_at = (time.monotonic(), n)
        if sink is None:
            return None
        h.flush()  # the record the snapshot is checked against, first
        mid = str(self.after) if self.after is not None else None
        path = None
        if n and n != sink.entries:
            path = str(sink.take(PartitionPosition(self.partition, n, mid, h.chain.state())))
            del sink.written[:-1]
        if (path is not None or final) and self.saved is not None and self.comparator is not None:
            assert self.follower is not None
            self.saved.save(n, mid, self.comparator, self.follower)
        return path

    def _broker_failed(self, exc: BrokerUnavailable) -> None:
        """An ``error`` line; ticks (the evidence is still compared) during a growing backoff."""
        self._failures += 1
        delay = min(self.options.retry_max_seconds, 2.0 ** (self._failures - 1))
        self.lines.error(f"broker unavailable: {exc}; retrying in {delay:.0f} s", retry_seconds=delay)
        until = time.monotonic() + delay
        while not self._stop.is_set() and time.monotonic() < until:
            self._tick(idle=False)
            self._stop.wait(min(0.1, max(0.0, until - time.monotonic())))

    def _finish(self) -> WatchResult:
        path = self._snapshot(final=True)
        self.hasher.finish(read_to_end=False)
        self._report_skipped()
        self._progress()
        if self.skipped and self.exit_code == 0:
            self.exit_code = 1  # poison events: skipped events make the exit code 1 (docs/cli.md)
        if self.comparator is not None:
            self.comparator.close()
        return self._result(path)

    def _result(self, snapshot: str | None) -> WatchResult:
        return WatchResult(self.exit_code, self.hasher.chain.size, self.head(), self.divergence,
                           self.follower.positions if self.follower is not None else None,
                           snapshot or (self.sink.written[-1] if self.sink is not None and self.sink.written else None),
                           self.skipped, dict(self.lines.counts))


def watch(elog: EventLog, model: Model, options: WatchOptions, lines: WatchLines | None = None) -> WatchResult:
    """Watch ``elog`` until stopped (use :class:`WatchRun` to stop it from elsewhere); see the module doc."""
    return WatchRun(elog, model, options, lines if lines is not None else WatchLines()).run()

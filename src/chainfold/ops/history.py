"""History: whether the log still holds everything that happened (docs/cli.md#history).

Two kinds of evidence that events are missing, each reported by verify, rebuild and reconcile:

* **Truncation** (:class:`Truncation`, :func:`locate_truncation`): entries that chainfold recorded
  (checkpoints and leaf hashes of an earlier read) are gone from the start of a partition: retention
  or a truncated ledger. The first entry the log still holds is found in the record (by message id,
  then by its leaf hash inside the recorded segment), so what remains is hashed *at its recorded
  positions* (:func:`shifted_stage`) and checked against the record as before; the recorded segments
  before it can no longer be verified against the log.
* **seq gaps** (:class:`~chainfold.replay.decode.SeqGaps`): the envelope's per-stream ``seq`` is
  gapless; a stream whose first event in the log has ``seq`` above 1, or that jumps, lost events
  from the log itself. This needs no record at all: it catches a log that was truncated before
  chainfold ever read it.

:class:`History` is the part of a report that says which (``history``: ``complete``, ``truncated``
or ``gaps``) and whether that makes the command fail: a log with lost history is never reported as
intact or consistent with exit 0 unless a valid snapshot covers the loss (then the work is done
from it and the report says so) or the user said the log is known to start mid-history
(``allow_partial``, ``--allow-partial-history``).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cbor2

from ..hashing.chain import ChainBuilder, Checkpoint
from ..hashing.record import PartitionRecord
from ..hashing.stage import HashStage, leaf_hashes
from ..log import Entry, EventLog, Position
from ..log.source import Source, Span
from ..replay.decode import SeqGaps
from ..store.atomic import atomic_write

__all__ = ["Truncation", "History", "locate_truncation", "earliest", "shifted_stage", "REWRITTEN", "SeqStart",
           "load_seq_start", "save_seq_start", "forget_seq_start"]

log = logging.getLogger("chainfold.ops.history")

REWRITTEN = "rewritten"
"""What :func:`locate_truncation` returns when the log starts later than recorded but what it holds
there is not what was recorded (rewritten, not truncated)."""


@dataclass
class Truncation:
    """Partition ``partition`` lost its first entries: it now starts at ``first_available``, which
    was entry ``index`` when recorded (None: every recorded entry is gone, so where the log now
    starts cannot be placed); ``recorded_first`` was entry 0. ``covered_by``: the valid snapshot
    that covers the loss, if one does."""

    partition: str
    first_available: str
    recorded_first: str
    index: int | None
    segment_size: int
    recorded_entries: int
    covered_by: str | None = None
    checked_from: int | None = None
    """The recorded position from which what the log holds was hashed and checked against the
    record (``index`` for verify, the snapshot's position for a replay from it)."""

    @property
    def lost(self) -> int | None:
        """Entries gone (None when it cannot be told)."""
        return self.index

    def unverifiable_segments(self) -> list[int] | None:
        """``[first, last]``: the recorded segments that can no longer be verified against the log
        (the last one only in part when the loss ends inside it), or None when nothing is."""
        end = self.index if self.index is not None else self.recorded_entries
        if end <= 0:
            return None
        return [0, (end - 1) // self.segment_size]

    def describe(self) -> str:
        segs = self.unverifiable_segments()
        where = (f"entries 0..{self.index - 1} (segments {segs[0]}..{segs[1]}" if self.index and segs else
                 f"every recorded entry ({self.recorded_entries}, segments {segs[0]}..{segs[1]}" if segs else "")
        partial = "" if self.index is None or self.index % self.segment_size == 0 or not segs else \
            ", the last one in part"
        return (f"{self.partition}: entries before message id {self.first_available} are gone from the log "
                f"(retention or truncation; entry 0 was {self.recorded_first} when recorded): "
                + (where + partial + ") can no longer be verified against the log" if where else "nothing lost"))

    def to_json(self) -> dict[str, Any]:
        return {"partition": self.partition, "first_available": self.first_available,
                "first_available_index": self.index, "recorded_first": self.recorded_first,
                "entries_lost": self.lost, "unverifiable_segments": self.unverifiable_segments(),
                "checked_from": self.checked_from, "covered_by_snapshot": self.covered_by}


@dataclass
class History:
    """The history part of a report (docs/cli.md#history): the seq check and the truncations."""

    seqs: SeqGaps = field(default_factory=SeqGaps)
    truncations: list[Truncation] = field(default_factory=list)
    allow_partial: bool = False
    checked: bool = True
    """False when the seq check did not run over the whole log (then no gaps are claimed)."""

    @property
    def state(self) -> str:
        if self.truncations:
            return "truncated"
        return "gaps" if self.seqs.gaps else "complete"

    @property
    def covered(self) -> bool:
        """Every truncation is covered by a valid snapshot."""
        return all(t.covered_by is not None for t in self.truncations)

    def problem(self) -> str | None:
        """Why the command must not report the log as intact or consistent (exit 3), or None."""
        if self.allow_partial:
            return None
        out = []
        uncovered = [t for t in self.truncations if t.covered_by is None]
        if uncovered:
            out.append("history is gone and no valid snapshot covers the gap: "
                       + "; ".join(t.describe() for t in uncovered))
        gaps = self.seqs.gaps
        if gaps and not self.truncations:
            g = gaps[0]
            out.append(f"events are missing from the log itself: {len(gaps)} seq gap(s), the first in stream "
                       f"{g.stream!r} at message {g.message_id} (seq {g.found_seq} where {g.expected_seq} was due)")
        if not out:
            return None
        return "; ".join(out) + " (--allow-partial-history accepts a log known to start mid-history)"

    def notes(self) -> list[str]:
        """Sentences for the report's notes (what ``truncated`` and ``seq_gaps`` do not say)."""
        out = []
        if self.allow_partial and self.state != "complete":
            out.append("history " + self.state + ": accepted, the log is known to start mid-history "
                       "(--allow-partial-history)")
        if self.seqs.unverifiable:
            out.append(f"{self.seqs.unverifiable} event(s) without seq could not be checked for gaps")
        return out

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "history": self.state,
            "seq_gaps": [g.to_json() for g in self.seqs.gaps],
            "seq_unverifiable": self.seqs.unverifiable,
        }
        if self.truncations:
            out["truncated"] = [t.to_json() for t in self.truncations]
        if self.allow_partial:
            out["allow_partial_history"] = True
        return out


def _read(elog: EventLog, span: Span) -> list[Entry]:
    return [e for batch in Source(elog, span) for e in batch]


def earliest(elog: EventLog, partition: str) -> Position | None:
    """The position of the first entry ``partition`` holds now (None: it holds none)."""
    first = _read(elog, Span(partition, limit=1))
    return first[0].message_id if first else None


def locate_truncation(elog: EventLog, partition: str, recorded: list[Checkpoint], record: PartitionRecord | None,
                      first: Position | None) -> Truncation | str | None:
    """Whether ``partition`` (whose first entry now is at ``first``) lost entries that were
    recorded: None when it still starts where it was recorded to start (or nothing tells),
    :data:`REWRITTEN` when it starts later but holds other entries there than the recorded ones,
    else the :class:`Truncation`, with the recorded index of ``first`` when the record places it.

    Placing it: the recorded segment whose message ids span ``first``; inside it, the offset from
    which the log's entries equal the recorded leaf hashes (one read of at most one segment)."""
    if not recorded or recorded[0].first is None or first is None:
        return None  # (a partition emptied is the hash stage's finding: recorded entries are gone)
    S = recorded[0].segment_size
    total = recorded[-1].size
    start = elog.position(recorded[0].first)
    if not start < first:
        return None
    seg = next((cp for cp in recorded if cp.last is not None and not elog.position(cp.last) < first), None)
    trunc = Truncation(partition, str(first), recorded[0].first, None, S, total)
    if seg is None:
        return trunc  # every recorded entry is gone
    k = seg.segment
    m = seg.size - k * S  # entries recorded in segment k
    rec = record.leaves(k * S, m) if record is not None else None
    if rec is None:
        return trunc
    have = leaf_hashes(_read(elog, Span(partition, start=first, limit=m)))
    if not have:
        return REWRITTEN
    for o in range(m):
        if rec[o] == have[0] and rec[o:o + len(have)] == have[:m - o]:
            trunc.index = k * S + o
            return trunc
    return REWRITTEN


def shifted_stage(elog: EventLog, partition: str, trunc: Truncation, *, record: PartitionRecord,
                  recorded: list[Checkpoint], write: bool = True) -> HashStage:
    """The hash stage of a truncated partition, at the recorded position of its first remaining
    entry (``trunc.index``): the chain is rebuilt from the recorded segments before it and the
    recorded leaves of its segment's lost part, so each later segment is checked against (and
    recorded into) the record at the same positions as before the loss."""
    assert trunc.index is not None
    trunc.checked_from = trunc.index
    S = trunc.segment_size
    k, o = divmod(trunc.index, S)
    full = [cp for cp in recorded if cp.full][:k]
    chain = ChainBuilder.after_segments(full) if full else ChainBuilder(S)
    lost: list[bytes] = []
    if o:
        lost = record.leaves(k * S, o) or []
        chain.add_leaves(lost, recorded[k].first)
    return HashStage(partition, chain, record=record, recorded=recorded, write=write,
                     segment=(list(lost), [None] * len(lost)))  # type: ignore[list-item]


# --- where a seq check can start without decoding what came before ----------------------------------


@dataclass(frozen=True)
class SeqStart:
    """A point of a one-partition log where the seq check's state is known: after ``entries``
    entries, where the hash chain's state is ``chain``, the check stood at ``seqs``
    (:meth:`SeqGaps.state`) with ``malformed`` entries counted before. From a snapshot (``path``),
    or from what the last verify left beside the record (:func:`save_seq_start`). Sound only if the
    log there is what was checked then: the caller checks the chain state at ``entries`` too (same
    bytes, same findings)."""

    path: str
    entries: int
    chain: dict
    seqs: dict
    malformed: int


SEQ_FILE = "history.cbor"


def save_seq_start(record_dir: Path, chain: dict, seqs: SeqGaps, malformed: int) -> None:
    """Leave the seq check's state at the end of the log beside its record (one-partition topics),
    so the next verify decodes only the entries that came since; crash-safe, checksummed. Nothing
    for an empty log (nothing to resume from: no file or folder is created)."""
    if not chain["size"]:
        return
    body = cbor2.dumps({"entries": chain["size"], "chain": dict(chain), "seqs": seqs.state(), "malformed": malformed},
                       canonical=True)
    atomic_write(Path(record_dir) / SEQ_FILE,
                 cbor2.dumps({"format": 1, "body": body, "sha256": hashlib.sha256(body).digest()}, canonical=True))


def forget_seq_start(record_dir: Path | None) -> None:
    """Remove what :func:`save_seq_start` left (the record is being reset)."""
    if record_dir is not None:
        (Path(record_dir) / SEQ_FILE).unlink(missing_ok=True)


def load_seq_start(record_dir: Path | None) -> SeqStart | None:
    """What :func:`save_seq_start` left, or None (missing, or unreadable: then the check starts over)."""
    if record_dir is None:
        return None
    path = Path(record_dir) / SEQ_FILE
    try:
        env = cbor2.loads(path.read_bytes())
        body = env["body"]
        if env["format"] != 1 or hashlib.sha256(body).digest() != env["sha256"]:
            raise ValueError("checksum mismatch")
        d = cbor2.loads(body)
        SeqGaps.restore(d["seqs"])
        return SeqStart(str(path), int(d["entries"]), dict(d["chain"]), d["seqs"], int(d["malformed"]))
    except FileNotFoundError:
        return None
    except Exception as exc:  # noqa: BLE001 - whatever is wrong with it, the check starts from the log's start
        log.warning("%s: not used (%s): the seq check starts at the beginning of the log", path, exc)
        return None

"""Following a worker's Tracker directory while the worker writes it.

:class:`EvidenceFollower` reads what a :class:`~chainfold.tracker.Tracker` appended since the last
poll: leaf hashes, state digests, full checkpoints and processed-log lines. Each poll costs
O(what is new) (files are read from saved offsets, never from the start) and the follower holds
O(1) state between polls (offsets, the last checkpoint, a chain builder's frontier), so it can
follow a worker for as long as it runs.

Reading rule (the Tracker's order of writes is digests, leaves, checkpoints, processed log; see
:mod:`chainfold.tracker`): a poll reads in the reverse order (processed log, checkpoints, leaves,
digests) and takes only complete lines and whole 32-byte records. So:

* every checkpoint a poll returns lies within the leaves read so far or in the same poll (unless
  ``max_leaves`` cut the poll short: then within the leaves the next polls return);
* every leaf comes with its state digest, or :data:`~chainfold.tracker.NO_DIGEST` when the worker
  gave none for it (a leaf written without a digest never gets one later);
* a torn tail (a crash mid-write) is never consumed; the worker's restarted Tracker cuts it and
  appends after it, and the follower simply goes on: a restart is invisible here.

What the follower checks: the checkpoints chain (each head from the previous head, size and root)
and, as the leaves arrive, that each checkpoint's head is the one its leaves give (the evidence
reconcile reads agrees with the evidence watch compares). A file that shrinks below what was read
was rewritten or replaced: :class:`~chainfold.errors.CheckpointCorrupt`. A processed-log line that
is not an object with a string ``id`` is skipped and named in :attr:`EvidenceBatch.problems`.
"""

from __future__ import annotations

import json
import os
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CheckpointCorrupt
from ..hashing.chain import ZERO_HEAD, ChainBuilder, Checkpoint, chain_head
from ..tracker import NO_DIGEST, leaves_path_for, states_path_for

__all__ = ["EvidenceFollower", "EvidenceBatch", "ProcessedLine", "MAX_LINE"]

MAX_LINE = 1 << 20
"""A processed-log or checkpoint line longer than this (bytes, without a newline yet) is not
evidence: the follower refuses the file rather than buffer it."""

_RECORD = 32


@dataclass(frozen=True, slots=True)
class ProcessedLine:
    """One processed-log line: its 1-based line number, event id, message id and handling time
    (ms since the epoch; ``None`` unless the Tracker writes ``handling_times``)."""

    line: int
    event_id: str
    message_id: str | None
    time: int | None


@dataclass(frozen=True)
class EvidenceBatch:
    """What one poll found. ``leaves`` and ``digests`` are concatenated 32-byte records of the
    handling positions ``start, start+1, ...`` (the same count; a digest is :data:`NO_DIGEST` where
    the worker gave none); ``checkpoints`` the new full checkpoints (chain-checked); ``processed``
    the new processed-log lines; ``problems`` what was skipped, as messages."""

    start: int
    leaves: bytes = b""
    digests: bytes = b""
    checkpoints: tuple[Checkpoint, ...] = ()
    processed: tuple[ProcessedLine, ...] = ()
    problems: tuple[str, ...] = ()

    @property
    def count(self) -> int:
        """Handling positions in this batch."""
        return len(self.leaves) // _RECORD

    def leaf(self, k: int) -> bytes:
        """Leaf hash of position ``start + k``."""
        return self.leaves[k * _RECORD:(k + 1) * _RECORD]

    def digest(self, k: int) -> bytes:
        """State digest of position ``start + k`` (:data:`NO_DIGEST`: none given)."""
        return self.digests[k * _RECORD:(k + 1) * _RECORD]

    def __bool__(self) -> bool:
        return bool(self.leaves or self.checkpoints or self.processed or self.problems)


@dataclass
class _Lines:
    """A JSON Lines file read incrementally: byte offset and line number of what was consumed."""

    path: Path
    offset: int = 0
    line: int = 0

    def read(self, max_bytes: int) -> list[bytes]:
        """The complete new lines (without newlines), at most about ``max_bytes`` of them."""
        data = _read_from(self.path, self.offset, max_bytes)
        cut = data.rfind(b"\n")
        if cut < 0:
            if len(data) >= MAX_LINE:
                raise CheckpointCorrupt(str(self.path), self.line + 1,
                                        f"no line end within {MAX_LINE} bytes: not evidence")
            return []
        lines = data[:cut].split(b"\n")
        self.offset += cut + 1
        self.line += len(lines)
        return lines


def _read_from(path: Path, offset: int, max_bytes: int) -> bytes:
    """Up to ``max_bytes`` of ``path`` from ``offset`` (b"" if it does not exist);
    :class:`CheckpointCorrupt` if the file is now shorter than ``offset``."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        if offset:
            raise CheckpointCorrupt(str(path), None, f"gone after {offset} bytes were read: the evidence was "
                                    "removed or replaced") from None
        return b""
    with f:
        size = os.fstat(f.fileno()).st_size
        if size < offset:
            raise CheckpointCorrupt(str(path), None, f"shrank from at least {offset} to {size} bytes: the evidence "
                                    "was rewritten or replaced, it cannot be followed")
        if size == offset:
            return b""
        return os.pread(f.fileno(), min(max_bytes, size - offset), offset)


class EvidenceFollower:
    """Follows the Tracker directory ``directory`` (which may not exist yet) as it grows.

    :meth:`poll` returns an :class:`EvidenceBatch` of what is new (empty while there is nothing, or
    no directory yet), at most ``max_leaves`` positions per call (a caller that lags asks again).
    ``verify`` (default on) checks each checkpoint against the leaves it covers; ``processed=False``
    leaves the processed log unread (a caller that compares leaves needs no ids). Not thread-safe:
    one caller polls.
    """

    def __init__(self, directory: str | os.PathLike[str], *, max_leaves: int = 1 << 16,
                 max_line_bytes: int = 8 << 20, verify: bool = True, processed: bool = True) -> None:
        if max_leaves < 1:
            raise ValueError(f"max_leaves must be >= 1, not {max_leaves!r}")
        self.dir = Path(directory)
        cpath = self.dir / "checkpoints.jsonl"
        self.leaves_path = leaves_path_for(cpath)
        self.states_path = states_path_for(cpath)
        self.max_leaves = max_leaves
        self.max_line_bytes = max_line_bytes
        self.reads_processed = processed
        self._processed = _Lines(self.dir / "processed.jsonl")
        self._checkpoints = _Lines(cpath)
        self.positions = 0  # handling positions read (leaves)
        self.last_checkpoint: Checkpoint | None = None
        self._verifying = verify
        self._builder: ChainBuilder | None = None  # made once the segment size is known
        self._unverified: deque[Checkpoint] = deque()  # checkpoints beyond the leaves verified so far
        self._computed: deque[Checkpoint] = deque()  # segments the leaves closed before their line was read
        self._verified_through = -1

    # --- what is there --------------------------------------------------------------------------------

    @property
    def exists(self) -> bool:
        """Whether the directory exists yet."""
        return self.dir.is_dir()

    def available(self) -> int:
        """Handling positions on disk now (whole leaves), without reading them: a stat."""
        try:
            return self.leaves_path.stat().st_size // _RECORD
        except FileNotFoundError:
            return 0

    @property
    def processed_lines(self) -> int:
        """Processed-log lines read so far."""
        return self._processed.line

    # --- polling --------------------------------------------------------------------------------------

    def poll(self, max_leaves: int | None = None) -> EvidenceBatch:
        """Read what is new (see the module doc for the order and what is checked)."""
        start = self.positions
        if not self.exists:
            return EvidenceBatch(start)
        problems: list[str] = []
        processed = self._read_processed(problems) if self.reads_processed else []
        checkpoints = self._read_checkpoints()
        leaves = self._read_leaves(max_leaves or self.max_leaves)
        digests = self._read_digests(start, len(leaves) // _RECORD)
        self.positions += len(leaves) // _RECORD
        if self._verifying:
            self._check(checkpoints, start, leaves)
        return EvidenceBatch(start, leaves, digests, tuple(checkpoints), tuple(processed), tuple(problems))

    def _read_processed(self, problems: list[str]) -> list[ProcessedLine]:
        out: list[ProcessedLine] = []
        first = self._processed.line + 1
        for n, raw in enumerate(self._processed.read(self.max_line_bytes), start=first):
            rec = _processed_line(n, raw)
            if isinstance(rec, str):
                problems.append(f"{self._processed.path}:{n}: {rec}: line skipped")
            else:
                out.append(rec)
        return out

    def _read_checkpoints(self) -> list[Checkpoint]:
        out: list[Checkpoint] = []
        path = str(self._checkpoints.path)
        first = self._checkpoints.line + 1
        for n, raw in enumerate(self._checkpoints.read(self.max_line_bytes), start=first):
            try:
                cp = Checkpoint.from_json(json.loads(raw))
            except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
                raise CheckpointCorrupt(path, n, str(exc)) from None
            prev = self.last_checkpoint
            if not cp.full:
                raise CheckpointCorrupt(path, n, f"segment {cp.segment} is not full ({cp.size} entries)")
            if cp.segment != (prev.segment + 1 if prev else 0):
                raise CheckpointCorrupt(path, n, f"segment {cp.segment} where {prev.segment + 1 if prev else 0} "
                                        "was expected")
            if prev is not None and cp.segment_size != prev.segment_size:
                raise CheckpointCorrupt(path, n, f"segment_size {cp.segment_size} after {prev.segment_size}")
            if cp.head != chain_head(prev.head if prev else ZERO_HEAD, cp.size, cp.root):
                raise CheckpointCorrupt(path, n, "head does not chain from the previous head, size and root")
            self.last_checkpoint = cp
            out.append(cp)
        return out

    def _read_leaves(self, max_leaves: int) -> bytes:
        data = _read_from(self.leaves_path, self.positions * _RECORD, max_leaves * _RECORD)
        return data[: len(data) - len(data) % _RECORD]

    def _read_digests(self, start: int, count: int) -> bytes:
        """Digests of positions [start, start+count): read after the leaves, so a missing one is none."""
        if not count:
            return b""
        data = _read_from(self.states_path, start * _RECORD, count * _RECORD) if self.states_path.exists() else b""
        data = data[: len(data) - len(data) % _RECORD]
        return data + NO_DIGEST * (count - len(data) // _RECORD)

    # --- persistence ----------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """Where the follower is (CBOR-encodable), for :meth:`from_state` in a later run."""
        b = self._builder
        return {
            "version": 1, "positions": self.positions, "reads_processed": self.reads_processed,
            "processed": [self._processed.offset, self._processed.line],
            "checkpoints": [self._checkpoints.offset, self._checkpoints.line],
            "last_checkpoint": None if self.last_checkpoint is None else self.last_checkpoint.to_cbor(),
            "verifying": self._verifying, "builder": None if b is None else b.state(),
            "unverified": [cp.to_cbor() for cp in self._unverified],
            "computed": [cp.to_cbor() for cp in self._computed], "verified_through": self._verified_through,
        }

    @classmethod
    def from_state(cls, directory: str | os.PathLike[str], state: dict[str, Any], **kw: Any) -> EvidenceFollower:
        """A follower that continues where :meth:`state` was taken (``ValueError`` if it is not one)."""
        if state.get("version") != 1:
            raise ValueError(f"unsupported follower state version {state.get('version')!r}")
        kw.setdefault("processed", state.get("reads_processed", True))
        f = cls(directory, verify=state["verifying"], **kw)
        f.positions = state["positions"]
        f._processed.offset, f._processed.line = state["processed"]
        f._checkpoints.offset, f._checkpoints.line = state["checkpoints"]
        if state["last_checkpoint"] is not None:
            f.last_checkpoint = Checkpoint.from_cbor(state["last_checkpoint"])
        if state["builder"] is not None:
            f._builder = ChainBuilder.from_state(state["builder"])
        f._unverified.extend(Checkpoint.from_cbor(c) for c in state["unverified"])
        f._computed.extend(Checkpoint.from_cbor(c) for c in state["computed"])
        f._verified_through = state["verified_through"]
        return f

    # --- verification ---------------------------------------------------------------------------------

    def _check(self, checkpoints: list[Checkpoint], start: int, leaves: bytes) -> None:
        """Feed the leaves read through a chain builder and match its segments with the checkpoints.

        The builder needs the segment size, which the first checkpoint line (or the provisional
        checkpoint beside it) tells; leaves read before that are fed once it is known, from the file."""
        self._unverified.extend(checkpoints)
        if self._builder is None:
            size = self._segment_size()
            if size is None:
                return
            self._builder = ChainBuilder(size)
        b = self._builder
        if b.size < start:  # catch up on leaves read before the segment size was known
            while b.size < start:
                chunk = _read_from(self.leaves_path, b.size * _RECORD, min(start - b.size, 1 << 16) * _RECORD)
                self._feed(b, chunk[: len(chunk) - len(chunk) % _RECORD])
        self._feed(b, leaves)
        self._match()

    def _feed(self, b: ChainBuilder, leaves: bytes) -> None:
        """The leaves into the builder, up to a segment at a time (a call per segment, not per leaf)."""
        records = [leaves[k:k + _RECORD] for k in range(0, len(leaves), _RECORD)]
        i, n, computed = 0, len(records), self._computed
        while i < n:
            j = i + min(b.room(), n - i)
            cp = b.add_leaves(records[i:j])
            if cp is not None:
                computed.append(cp)
            i = j

    def _segment_size(self) -> int | None:
        if self.last_checkpoint is not None:
            return self.last_checkpoint.segment_size
        try:
            raw = self._checkpoints.path.with_name("checkpoints.jsonl.partial").read_bytes()
            return Checkpoint.from_json(json.loads(raw)).segment_size
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _match(self) -> None:
        while self._unverified and self._computed:
            want, got = self._unverified.popleft(), self._computed.popleft()
            if want.head != got.head:
                raise CheckpointCorrupt(str(self._checkpoints.path), want.segment + 1,
                                        f"segment {want.segment}'s head is not the one its leaf hashes in "
                                        f"{self.leaves_path} give: the worker's evidence disagrees with itself")
            self._verified_through = want.segment
        while len(self._computed) > 64:  # the worker writes no checkpoint lines: keep a bounded tail
            self._computed.popleft()

    @property
    def verified_through(self) -> int:
        """The last segment whose checkpoint was checked against its leaves (-1: none yet)."""
        return self._verified_through


def _processed_line(n: int, raw: bytes) -> ProcessedLine | str:
    """A processed-log line, or why it is not one."""
    try:
        obj: Any = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        return f"not JSON ({exc})"
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}"
    eid, mid, t = obj.get("id"), obj.get("message_id"), obj.get("time")
    if not isinstance(eid, str) or not eid:
        return "'id' must be a non-empty string"
    if mid is not None and not isinstance(mid, str):
        return "'message_id' must be a string"
    if t is not None and (type(t) is not int or t < 0):
        t = None
    return ProcessedLine(n, eid, mid, t)

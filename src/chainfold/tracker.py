"""``Tracker``: the evidence a real-time worker leaves behind, for ``chainfold reconcile``.

Add it to an existing consumer loop in three lines::

    tracker = chainfold.Tracker("worker-evidence/")          # once
    ...
    msg = consumer.receive()
    state = apply(state, decode(msg.data()))                  # the worker's own fold
    tracker.handled(msg.data(), msg.message_id())             # after handling, before the ack
    consumer.acknowledge(msg)
    ...
    tracker.close()                                           # on shutdown (flushes)

Per event it costs one SHA-256 of the payload, on average one more for the tree, and buffered
appends: no I/O on the hot path. Every ``flush_every`` events (and on :meth:`flush`/:meth:`close`)
the buffers are written and fsynced, so a worker that crashes leaves evidence up to its last flush.

Files in the tracker's directory (a reopened tracker continues them):

* ``checkpoints.jsonl`` (+ ``checkpoints.jsonl.partial``): checkpoints (docs/formats.md) over the payloads
  handled, in handling order: what ``reconcile --checkpoints`` reads;
* ``checkpoints.leaves``: the 32-byte leaf hashes, so reconcile can name the exact first divergent
  event without the worker's payloads;
* ``processed.jsonl`` (optional): the processed log (docs/worker-evidence.md), ``{"id", "message_id"}`` per line.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any

from .hashing.chain import ChainBuilder, Checkpoint
from .hashing.checkpoints import CheckpointFile
from .envelope import decode
from .errors import MalformedEnvelope

__all__ = ["Tracker", "leaves_path_for"]


def leaves_path_for(checkpoints_path: str | os.PathLike[str]) -> Path:
    """The leaf-hash sidecar of a tracker checkpoint file: ``X.jsonl`` → ``X.leaves``."""
    return Path(checkpoints_path).with_suffix(".leaves")


def _mid_text(message_id: Any) -> str | None:
    if message_id is None:
        return None
    if isinstance(message_id, str):
        return message_id
    # pulsar.MessageId or chainfold.MessageId
    try:
        return f"{message_id.ledger_id()}:{message_id.entry_id()}:{message_id.partition()}:{message_id.batch_index()}"
    except AttributeError:
        return str(message_id)


class Tracker:
    """Keeps a worker's own hash chain over what it handled, and writes it durably.

    ``handled(payload, message_id)`` is the one call per event. Thread-safe (one lock).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        segment_size: int = 1024,
        processed_log: bool = True,
        flush_every: int = 1024,
    ) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.checkpoints = CheckpointFile(self.dir / "checkpoints.jsonl")
        self.leaves_path = leaves_path_for(self.checkpoints.path)
        self.processed_path = self.dir / "processed.jsonl" if processed_log else None
        self.flush_every = flush_every
        self._lock = threading.Lock()
        self._full: list[Checkpoint] = []
        self._leaves: list[bytes] = []
        self._lines: list[str] = []
        self._since_flush = 0
        self._chain = self._resume(segment_size)

    def _resume(self, segment_size: int) -> ChainBuilder:
        """Continue the chain of an earlier run from its files (checkpoints, then leaves)."""
        full = self.checkpoints.load()
        seg = full[0].segment_size if full else segment_size
        chain = ChainBuilder(seg)
        size_full = full[-1].size if full else 0
        leaves = b""
        if self.leaves_path.exists():
            leaves = self.leaves_path.read_bytes()
        n_leaves = len(leaves) // 32
        if n_leaves < size_full:
            raise ValueError(f"{self.leaves_path}: {n_leaves} leaves but {size_full} checkpointed entries")
        # re-add every recorded leaf: O(n) once at start-up, and it proves the files agree
        for i in range(n_leaves):
            cp = chain.add_leaf(leaves[i * 32:(i + 1) * 32])
            if cp is not None and cp.segment < len(full) and cp.head != full[cp.segment].head:
                raise ValueError(f"{self.checkpoints.path}: segment {cp.segment} disagrees with {self.leaves_path}")
            if cp is not None and cp.segment >= len(full):
                self._full.append(cp)  # checkpointed leaves whose checkpoint line was not written yet
        with open(self.leaves_path, "ab") as f:
            f.truncate(n_leaves * 32)
        return chain

    @property
    def size(self) -> int:
        """Events handled (and tracked) so far, across runs."""
        return self._chain.size

    def handled(self, payload: bytes, message_id: Any = None, event_id: str | None = None) -> None:
        """Record that the worker handled this message (its payload bytes exactly as received)."""
        leaf = hashlib.sha256(b"\x00" + payload).digest()
        with self._lock:
            cp = self._chain.add_leaf(leaf, _mid_text(message_id))
            self._leaves.append(leaf)
            if cp is not None:
                self._full.append(cp)
            if self.processed_path is not None:
                if event_id is None:
                    try:
                        event_id = decode(payload).id
                    except MalformedEnvelope:
                        event_id = None
                # a payload that is not an event has no id: it is in the checkpoints (reconcile sees the
                # divergence there) but gets no processed-log line, which would be refused as input
                if event_id is not None:
                    self._lines.append(json.dumps({"id": event_id, "message_id": _mid_text(message_id)}))
            self._since_flush += 1
            if self._since_flush >= self.flush_every:
                self._flush_locked()

    def flush(self) -> None:
        """Write and fsync everything buffered (leaves first, then checkpoints and processed log)."""
        with self._lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        if self._leaves:
            with open(self.leaves_path, "ab") as f:
                f.write(b"".join(self._leaves))
                f.flush()
                os.fsync(f.fileno())
            self._leaves.clear()
        if self._full:
            self.checkpoints.append(self._full)
            self._full.clear()
        pend = self._chain.pending()
        if pend is not None:
            self.checkpoints.write_provisional(pend)
        else:
            self.checkpoints.clear_provisional()
        if self._lines and self.processed_path is not None:
            with open(self.processed_path, "a") as f:
                f.write("\n".join(self._lines) + "\n")
                f.flush()
                os.fsync(f.fileno())
            self._lines.clear()
        self._since_flush = 0

    def close(self) -> None:
        """Flush; the tracker may be reopened later on the same directory."""
        self.flush()

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

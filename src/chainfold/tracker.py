"""``Tracker``: the evidence a real-time worker leaves behind, for ``chainfold reconcile`` and ``watch``.

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
appends: no I/O on the hot path. The buffers are written and fsynced every ``flush_every`` events,
at most ``flush_interval`` seconds after the first event that was not yet written, and on
:meth:`flush`/:meth:`close`. With a time bound (the default), a small daemon thread does those
writes, so the worker's thread never waits for an fsync (unless the thread falls
``8 * flush_every`` events behind), and a worker that goes quiet still shows what it handled:
what ``chainfold watch`` needs to see a divergence within seconds. Without one
(``flush_interval=None``), ``handled`` writes every ``flush_every``-th event itself.
A worker that crashes leaves evidence up to its last flush. A worker that commits its own state
should flush at its commit points instead (``flush_every`` huge, ``flush_interval=None``) and
commit on a time bound, as :mod:`chainfold.worker` does, so state and evidence always agree.

Files in the tracker's directory (a reopened tracker continues them):

* ``checkpoints.jsonl`` (+ ``checkpoints.jsonl.partial``): checkpoints (docs/formats.md) over the payloads
  handled, in handling order: what ``reconcile --checkpoints`` reads;
* ``checkpoints.leaves``: the 32-byte leaf hashes, so reconcile can name the exact first divergent
  event without the worker's payloads;
* ``checkpoints.states`` (only once the worker passes ``state=``): one 32-byte :func:`state_digest`
  per handled event, of its stream's state after it (32 zero bytes: not given), so a mishandled
  event (right event, wrong state) is found at the exact event;
* ``processed.jsonl`` (optional): the processed log (docs/worker-evidence.md), ``{"id", "message_id"}``
  per line, plus ``"time"`` (ms since the epoch, when it was handled) with ``handling_times=True``.

Order of writes, and how to read the files while the worker runs. A flush writes, each appended
and fsynced before the next starts: (1) state digests (when the worker gives them), (2) leaves,
(3) full checkpoints, (4) the provisional checkpoint (atomic replace), (5) processed-log lines. A
reader that follows the files (:class:`chainfold.watch.follow.EvidenceFollower`) reads them in the
reverse order (processed log, checkpoints, leaves, state digests) and trusts only complete lines
(ending in a newline) and whole 32-byte records. Then what it read of a later-written file is
covered by what it read of an earlier-written one: every checkpoint's size lies within the leaves
read, and for every leaf read either its state digest was read too or the worker gave none for it
(a leaf beyond the digests read has no digest, and never will: a worker that starts giving states
later gets :data:`NO_DIGEST` records for the events before). Nothing complete is ever rewritten: a
reopened tracker only cuts a torn tail (digests beyond the leaves, a partial leaf record, a
processed-log line without its newline) before it appends.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from json.encoder import encode_basestring_ascii as _json_str
from pathlib import Path
from typing import Any

import orjson

from .hashing.chain import ChainBuilder, Checkpoint
from .hashing.checkpoints import CheckpointFile
from .envelope import decode
from .errors import CheckpointCorrupt, InvalidArgument, MalformedEnvelope
from .merkle import leaf_hash

__all__ = ["Tracker", "leaves_path_for", "states_path_for", "state_digest", "plain_state_digest", "NO_DIGEST"]

log = logging.getLogger("chainfold.tracker")

NO_DIGEST = bytes(32)
"""The state-digest record of an event whose state the worker did not give."""

_UNSET: Any = object()
_BACKLOG = 8  # buffered flush_every's after which handled() flushes itself (the flusher lags)


def leaves_path_for(checkpoints_path: str | os.PathLike[str]) -> Path:
    """The leaf-hash sidecar of a tracker checkpoint file: ``X.jsonl`` → ``X.leaves``."""
    return Path(checkpoints_path).with_suffix(".leaves")


def states_path_for(checkpoints_path: str | os.PathLike[str]) -> Path:
    """The state-digest sidecar of a tracker checkpoint file: ``X.jsonl`` → ``X.states``."""
    return Path(checkpoints_path).with_suffix(".states")


def state_digest(stream: str, state: Any) -> bytes:
    """SHA-256(0x03 || UTF-8 stream id || 0x00 || canonical JSON of ``state``): 32 bytes.

    ``state`` is the stream's state *as rendered to JSON* (the model's ``render``, as in a state
    export: dicts with string keys, lists, strings, numbers, booleans, null); canonical JSON is
    ``json.dumps(state, sort_keys=True, separators=(",", ":"), ensure_ascii=False)``. A worker and
    ``watch`` that render the same state get the same digest; never :data:`NO_DIGEST`.
    """
    fast = plain_state_digest(stream, state)
    if fast is not None:
        return fast
    text = _canonical(state)
    return _sha256(_stream_prefix(stream) + text.encode("utf-8", "surrogatepass")).digest()


_PLAIN_VALUES = frozenset({str, int, bool, type(None)})
_ORJSON_SORTED = orjson.OPT_SORT_KEYS | orjson.OPT_PASSTHROUGH_SUBCLASS
_sha256 = hashlib.sha256
_prefixes: dict[str, bytes] = {}  # b"\x03" + stream + b"\x00" of recent streams
_PREFIXES_MAX = 1 << 16


def _stream_prefix(stream: str) -> bytes:
    p = b"\x03" + stream.encode("utf-8", "surrogatepass") + b"\x00"
    if len(_prefixes) >= _PREFIXES_MAX:
        _prefixes.clear()  # bounded: the streams in use come back at once
    _prefixes[stream] = p
    return p


def plain_state_digest(stream: str, state: Any) -> bytes | None:
    """:func:`state_digest` of a *flat* state: a ``dict`` (exactly) with ``str`` keys and ``str``,
    ``int``, ``bool`` or ``None`` values (exact types), the common rendered state; ``None`` for
    anything else (then render it and call :func:`state_digest`).

    Such a dict is already JSON as :func:`~chainfold.replay.model.render_json` renders it (it
    returns a copy with the same items), so it can be digested without rendering; its canonical JSON
    comes from orjson (sorted keys, UTF-8, no whitespace), byte for byte the ``json.dumps`` text of
    the definition for these types (floats, whose text differs, are not taken; orjson refuses a key
    that is not exactly a ``str``, an integer beyond 64 bits and a lone surrogate: then ``None``).
    About 3x cheaper per event than rendering and ``json.dumps``.
    """
    if type(state) is not dict or not _PLAIN_VALUES.issuperset(map(type, state.values())):
        return None
    try:
        text = orjson.dumps(state, option=_ORJSON_SORTED)
    except TypeError:  # orjson.JSONEncodeError: a key not exactly a str, a huge int, a lone surrogate
        return None
    return _sha256((_prefixes.get(stream) or _stream_prefix(stream)) + text).digest()


def _not_json(value: Any) -> Any:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _canonical_json() -> Any:
    """``json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)`` as one
    prebuilt C encoder (json.dumps builds an encoder per call: most of a digest's cost), or
    json.dumps itself where the C accelerator is missing."""
    from json import encoder

    make = encoder.c_make_encoder
    if make is None:  # pragma: no cover - CPython always has it
        return lambda v: json.dumps(v, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    enc = make(None, _not_json, encoder.encode_basestring, None, ":", ",", True, False, True)
    return lambda v: "".join(enc(v, 0))


_canonical = _canonical_json()


def _mid_text(position: Any) -> str | None:
    """The message id text of what a worker passes: a :class:`~chainfold.log.Position` (or its
    text), or the message id object of the Pulsar client the worker consumes with."""
    if position is None:
        return None
    if isinstance(position, str):
        return position
    if hasattr(position, "ledger_id"):  # pulsar-client's own message id
        from .log.pulsar import message_id_of

        return str(message_id_of(position))
    return str(position)


def _line(rec: tuple[str, str | None, int | None]) -> str:
    """A processed-log line: ``json.dumps({"id": ..., "message_id": ...[, "time": ...]})``, built
    without a dict and an encoder per event."""
    eid, mid, t = rec
    text = '{"id": ' + _json_str(eid) + ', "message_id": ' + ("null" if mid is None else _json_str(mid))
    return text + "}" if t is None else f'{text}, "time": {t}}}'


def _append_durably(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


class Tracker:
    """Keeps a worker's own hash chain over what it handled, and writes it durably.

    ``handled(payload, message_id)`` is the one call per event. Thread-safe: one lock guards the
    buffers (held for a few appends per event), another orders the flushes, whose writes run
    outside the first so a flush never stalls ``handled`` for an fsync.

    ``flush_interval`` (seconds, ``None``: no time bound) starts one daemon thread on the first
    event; ``close()`` stops it. If a background flush fails (disk full), the next ``handled`` or
    ``flush`` raises that error: the evidence is no longer being written and the worker must know.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        segment_size: int = 1024,
        processed_log: bool = True,
        flush_every: int = 1024,
        flush_interval: float | None = 1.0,
        handling_times: bool = False,
    ) -> None:
        if flush_interval is not None and not flush_interval > 0:
            raise InvalidArgument(f"flush_interval must be > 0 seconds or None, not {flush_interval!r}")
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.checkpoints = CheckpointFile(self.dir / "checkpoints.jsonl")
        self.leaves_path = leaves_path_for(self.checkpoints.path)
        self.states_path = states_path_for(self.checkpoints.path)
        self.processed_path = self.dir / "processed.jsonl" if processed_log else None
        self.flush_every = flush_every
        self.flush_interval = flush_interval
        self.handling_times = handling_times
        self._lock = threading.Lock()
        self._io_lock = threading.Lock()  # orders whole flushes; taken before _lock, never after
        self._wake = threading.Condition(self._lock)
        self._full: list[Checkpoint] = []
        self._leaves: list[bytes] = []
        self._digests: list[bytes] | None = None  # None until the first state digest
        self._lines: list[tuple[str, str | None, int | None]] = []  # processed-log records
        self._since_flush = 0
        self._deadline: float | None = None  # when the oldest unwritten event must be written
        self._flusher: threading.Thread | None = None
        self._flusher_pid = 0
        self._closed = False
        self._failed: BaseException | None = None
        self._chain = self._resume(segment_size)
        self._written = self._chain.size  # leaves on disk
        self._repair_tails()

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
            raise CheckpointCorrupt(str(self.leaves_path), None,
                                    f"{n_leaves} leaves but {size_full} checkpointed entries in {self.checkpoints.path}")
        # re-add every recorded leaf: O(n) once at start-up, and it proves the files agree
        hashes = [leaves[i * 32:(i + 1) * 32] for i in range(n_leaves)]
        i = 0
        while i < n_leaves:
            cp = chain.add_leaves(hashes[i:i + chain.room()])
            i = chain.size
            if cp is not None and cp.segment < len(full) and cp.head != full[cp.segment].head:
                raise CheckpointCorrupt(str(self.checkpoints.path), cp.segment + 1,
                                        f"segment {cp.segment} disagrees with the leaf hashes in {self.leaves_path}")
            if cp is not None and cp.segment >= len(full):
                self._full.append(cp)  # checkpointed leaves whose checkpoint line was not written yet
        with open(self.leaves_path, "ab") as f:
            f.truncate(n_leaves * 32)
        return chain

    def _repair_tails(self) -> None:
        """Cut what a crash left half-written, so appends continue on whole records and lines:
        the state digests to the leaves' count (padded with :data:`NO_DIGEST` where a crash lost
        some), the processed log to its last complete line."""
        n = self._chain.size
        if self.states_path.exists():
            have = min(self.states_path.stat().st_size // 32, n)
            with open(self.states_path, "r+b") as f:
                f.truncate(have * 32)
                f.seek(0, os.SEEK_END)
                f.write(NO_DIGEST * (n - have))
                f.flush()
                os.fsync(f.fileno())
            self._digests = []
        if self.processed_path is not None and self.processed_path.exists():
            with open(self.processed_path, "r+b") as f:
                end = f.seek(0, os.SEEK_END)
                if end:
                    f.seek(max(0, end - 1))
                    if f.read(1) != b"\n":
                        keep = self._last_line_end(f, end)
                        log.warning("%s: dropping a torn last line (%d bytes) left by a crash",
                                    self.processed_path, end - keep)
                        f.truncate(keep)
                        os.fsync(f.fileno())

    @staticmethod
    def _last_line_end(f: Any, end: int) -> int:
        """Offset just past the last newline before ``end`` (0 if none)."""
        pos = end
        while pos > 0:
            step = min(pos, 65536)
            pos -= step
            f.seek(pos)
            cut = f.read(step).rfind(b"\n")
            if cut >= 0:
                return pos + cut + 1
        return 0

    @property
    def size(self) -> int:
        """Events handled (and tracked) so far, across runs."""
        return self._chain.size

    def handled(self, payload: bytes, message_id: Any = None, event_id: str | None = None, *,
                state: Any = _UNSET, stream: str | None = None) -> None:
        """Record that the worker handled this message (its payload bytes exactly as received).

        ``event_id`` spares a decode when the worker knows it. ``state``: the stream's state after
        this event, rendered to JSON (see :func:`state_digest`); then ``stream`` is its stream id
        (decoded from the payload when not given). Raises the error of a failed background flush.
        """
        if self._failed is not None:
            raise self._failed
        leaf = leaf_hash(payload)
        digest = None
        if state is not _UNSET:
            if stream is None:
                stream = self._decoded(payload, "stream")
            digest = NO_DIGEST if stream is None else state_digest(stream, state)
        mid = message_id if message_id is None or type(message_id) is str else _mid_text(message_id)
        line = None
        if self.processed_path is not None:
            if event_id is None:
                event_id = self._decoded(payload, "id")
            # a payload that is not an event has no id: it is in the checkpoints (reconcile sees the
            # divergence there) but gets no processed-log line, which would be refused as input
            if event_id is not None:  # formatted at the flush (_line), off the hot path
                line = (event_id, mid, time.time_ns() // 1_000_000 if self.handling_times else None)
        due = False
        with self._lock:
            cp = self._chain.add_leaf(leaf, mid)
            self._leaves.append(leaf)
            if digest is not None and self._digests is None:
                self._digests = [NO_DIGEST] * (len(self._leaves) - 1)
            if self._digests is not None:
                self._digests.append(digest or NO_DIGEST)
            if cp is not None:
                self._full.append(cp)
            if line is not None:
                self._lines.append(line)
            self._since_flush += 1
            if self.flush_interval is None:
                due = self._since_flush >= self.flush_every
            elif self._since_flush >= self.flush_every:
                # the flusher writes it now, off this thread; if it cannot keep up, write here
                due = self._since_flush >= _BACKLOG * self.flush_every
                if self._deadline is None or self._deadline > 0:
                    self._deadline = 0.0
                    self._wake_flusher()
            elif self._deadline is None:
                self._deadline = time.monotonic() + self.flush_interval
                self._wake_flusher()
        if due:
            self.flush()

    @staticmethod
    def _decoded(payload: bytes, attr: str) -> str | None:
        try:
            return getattr(decode(payload), attr)
        except MalformedEnvelope:
            return None

    # --- the time bound ------------------------------------------------------------------------------

    def _wake_flusher(self) -> None:
        """Start the flusher thread (again after a fork), or wake it for the new deadline. Under _lock."""
        if self._flusher is None or self._flusher_pid != os.getpid() or not self._flusher.is_alive():
            self._flusher_pid = os.getpid()
            self._flusher = threading.Thread(target=self._run_flusher, name="chainfold-tracker-flush",
                                             daemon=True)
            self._flusher.start()
        else:
            self._wake.notify()

    def _run_flusher(self) -> None:
        while True:
            with self._lock:
                while not self._closed:
                    if self._deadline is None:
                        self._wake.wait()
                        continue
                    left = self._deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._wake.wait(left)
                if self._closed:
                    return
            try:
                self.flush()
            except BaseException as exc:  # keep it for the worker's next call; stop flushing
                log.error("tracker %s: background flush failed: %s", self.dir, exc)
                self._failed = exc
                return

    # --- writing -------------------------------------------------------------------------------------

    def flush(self) -> None:
        """Write and fsync everything buffered, in the order of the module doc (digests, leaves, ...)."""
        if self._failed is not None:
            raise self._failed
        with self._io_lock:
            with self._lock:
                leaves, self._leaves = self._leaves, []
                digests = self._digests
                if digests is not None:
                    self._digests = []
                full, self._full = self._full, []
                lines, self._lines = self._lines, []
                pend = self._chain.pending()
                start = self._written
                self._written += len(leaves)
                self._since_flush = 0
                self._deadline = None
            try:
                self._write(start, leaves, digests, full, pend, lines)
            except BaseException as exc:
                self._failed = exc  # buffers are gone: the files end at the last good flush
                raise

    def _write(self, start: int, leaves: list[bytes], digests: list[bytes] | None, full: list[Checkpoint],
               pend: Checkpoint | None, lines: list[tuple[str, str | None, int | None]]) -> None:
        if digests:  # before the leaves: a reader that sees a leaf without its digest knows there is none
            have = self.states_path.stat().st_size // 32 if self.states_path.exists() else 0
            # digests began in this batch: the events written before get "no digest" records
            _append_durably(self.states_path, NO_DIGEST * (start - have) + b"".join(digests))
        if leaves:
            _append_durably(self.leaves_path, b"".join(leaves))
        if full:
            self.checkpoints.append(full)
        if leaves or full:
            if pend is not None:
                self.checkpoints.write_provisional(pend)
            else:
                self.checkpoints.clear_provisional()
        if lines and self.processed_path is not None:
            _append_durably(self.processed_path, ("\n".join(map(_line, lines)) + "\n").encode())

    def close(self) -> None:
        """Stop the flusher thread and flush; the tracker may be reopened later on the same directory."""
        with self._lock:
            self._closed = True
            self._wake.notify_all()
            t = self._flusher
        if t is not None and t is not threading.current_thread() and self._flusher_pid == os.getpid():
            t.join(timeout=30)
        self.flush()

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

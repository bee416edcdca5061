"""Checkpoints over the log: per-segment Merkle roots chained into heads (docs/formats.md).

The log is cut into segments of ``S = 2**k`` entries. Each segment gets an RFC 9162 root over its
leaf hashes, and a head that chains it to everything before::

    head_-1 = 32 zero bytes
    head_k  = SHA-256(0x02 || head_(k-1) || uint64_be(n_k) || root_k)     n_k = entries through segment k

:class:`ChainBuilder` computes them as entries stream past, in O(log n) memory, and also keeps the
whole-log RFC 9162 root (full segment roots are nodes of that tree, because S is a power of two).
:func:`find_divergence` finds the first entry where two checkpointed sequences differ with
O(log n) hash comparisons: bisection over the cumulative heads, then a descent of one segment's tree.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidArgument, RootMismatch, SegmentSizeMismatch
from ..merkle import EMPTY_ROOT, HASH_SIZE, CompactRange, leaf_hash

__all__ = [
    "ZERO_HEAD",
    "chain_head",
    "Checkpoint",
    "ChainBuilder",
    "Divergence",
    "bisect_heads",
    "first_difference_in_segment",
    "find_divergence",
]

ZERO_HEAD = bytes(32)
"""head_-1: the head before the first segment."""

_sha256 = hashlib.sha256
_MAX_UINT64 = (1 << 64) - 1
_STATE_VERSION = 1


def chain_head(prev_head: bytes, size: int, root: bytes) -> bytes:
    """SHA-256(0x02 || prev_head || uint64_be(size) || root): the head of a segment."""
    return _sha256(b"\x02" + prev_head + size.to_bytes(8, "big") + root).digest()


def _text(position: object) -> str | None:
    return None if position is None else str(position)


def _is_pow2(v: object) -> bool:
    return type(v) is int and v >= 1 and v & (v - 1) == 0


def _fold(hashes: Sequence[bytes]) -> bytes:
    if not hashes:
        return EMPTY_ROOT
    r = hashes[-1]
    for i in range(len(hashes) - 2, -1, -1):
        r = _sha256(b"\x01" + hashes[i] + r).digest()
    return r


def _hex_hash(d: Mapping[str, Any], key: str) -> bytes:
    v = d[key]
    if type(v) is not str or len(v) != 2 * HASH_SIZE or v != v.lower():
        raise InvalidArgument(f"{key} must be {2 * HASH_SIZE} lowercase hex digits")
    try:
        return bytes.fromhex(v)
    except ValueError:
        raise InvalidArgument(f"{key} is not hex") from None


_KEYS = ("segment", "size", "segment_size", "root", "head", "first", "last")


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """The checkpoint of one segment (docs/formats.md).

    ``size`` is n_k, the number of entries covered from the start of the log through this segment;
    ``root`` the RFC 9162 root of the segment's leaves; ``head`` the chained head. ``first`` and
    ``last`` are the message ids (``ledger:entry:partition:batch``) of the segment's first and last
    entries, ``None`` when unknown (a worker's tracker may not know them). A checkpoint of a partial
    (last) segment is provisional: its head is computed as if the segment ended there.

    Construction checks the shape (types, 32-byte hashes, ``segment*S < size <= (segment+1)*S``,
    ``S`` a power of two) and raises :class:`~chainfold.errors.InvalidArgument` (a ``ValueError``);
    it cannot check the chain, which needs the previous head.
    """

    segment: int
    size: int
    segment_size: int
    root: bytes
    head: bytes
    first: str | None
    last: str | None

    def __post_init__(self) -> None:
        for name in ("segment", "size"):
            v = getattr(self, name)
            if type(v) is not int or not 0 <= v <= _MAX_UINT64:
                raise InvalidArgument(f"{name} must be an unsigned 64-bit int, not {v!r}")
        if not _is_pow2(self.segment_size):
            raise InvalidArgument(f"segment_size must be a power of two >= 1, not {self.segment_size!r}")
        s = self.segment_size
        if not self.segment * s < self.size <= (self.segment + 1) * s:
            raise InvalidArgument(
                f"size {self.size} does not end inside segment {self.segment} of {s} entries"
            )
        for name in ("root", "head"):
            v = getattr(self, name)
            if type(v) is not bytes or len(v) != HASH_SIZE:
                raise InvalidArgument(f"{name} must be {HASH_SIZE} bytes")
        for name in ("first", "last"):
            v = getattr(self, name)
            if v is not None and type(v) is not str:
                raise InvalidArgument(f"{name} must be a message id string or null, not {v!r}")

    @property
    def full(self) -> bool:
        """True when the segment is complete (its head is final, not provisional)."""
        return self.size == (self.segment + 1) * self.segment_size

    @property
    def start(self) -> int:
        """Index of the segment's first entry."""
        return self.segment * self.segment_size

    def to_json(self) -> dict[str, Any]:
        """The JSON form (docs/formats.md): hashes as lowercase hex, keys in the documented order."""
        return {
            "segment": self.segment,
            "size": self.size,
            "segment_size": self.segment_size,
            "root": self.root.hex(),
            "head": self.head.hex(),
            "first": self.first,
            "last": self.last,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Checkpoint:
        """Parse and validate the JSON form; ``ValueError`` with the reason if it is not one.

        Exactly the documented keys are accepted: a missing or unknown key is an error.
        """
        if not isinstance(d, Mapping):
            raise InvalidArgument(f"a checkpoint is a JSON object, not {type(d).__name__}")
        missing = [k for k in _KEYS if k not in d]
        if missing:
            raise InvalidArgument(f"missing key(s) {', '.join(missing)}")
        extra = sorted(str(k) for k in d if k not in _KEYS)
        if extra:
            raise InvalidArgument(f"unknown key(s) {', '.join(extra)}")
        return cls(
            segment=d["segment"],
            size=d["size"],
            segment_size=d["segment_size"],
            root=_hex_hash(d, "root"),
            head=_hex_hash(d, "head"),
            first=d["first"],
            last=d["last"],
        )

    def to_cbor(self) -> dict[str, Any]:
        """The CBOR form (docs/formats.md): like :meth:`to_json` with raw 32-byte hashes."""
        return {
            "segment": self.segment,
            "size": self.size,
            "segment_size": self.segment_size,
            "root": self.root,
            "head": self.head,
            "first": self.first,
            "last": self.last,
        }

    @classmethod
    def from_cbor(cls, d: Mapping[str, Any]) -> Checkpoint:
        """Parse and validate the CBOR form; ``ValueError`` with the reason if it is not one."""
        if not isinstance(d, Mapping):
            raise InvalidArgument(f"a checkpoint is a map, not {type(d).__name__}")
        if set(d) != set(_KEYS):
            raise InvalidArgument(f"keys must be exactly {', '.join(_KEYS)}")
        return cls(**{k: d[k] for k in _KEYS})


class ChainBuilder:
    """Computes checkpoints as entries stream past, holding O(log n) hashes.

    Feed every log entry in order: :meth:`add_leaves` takes the leaf hashes of consecutive entries
    that stay inside the current segment (what the hash stage does, a chunk at a time), with the
    message ids of the first and last of them; :meth:`add_leaf` and :meth:`add` take one entry.
    Each returns the :class:`Checkpoint` of the segment when the entries complete it, else
    ``None``. Completed checkpoints are not kept: collect them. :meth:`pending` gives the
    provisional checkpoint of the partial last segment, :meth:`log_root` the RFC 9162 root of the
    whole log, and :meth:`state` / :meth:`from_state` persist and resume exactly.

    The current segment and the full segment roots are :class:`~chainfold.merkle.CompactRange`
    values (``[kS, n)`` and ``[0, kS)``), so the segment roots are nodes of the whole log's tree.
    The builder does not deduplicate: dropping redelivered messages (docs/formats.md) is the reader's job.
    """

    __slots__ = ("_seg", "_size", "_mask", "_shift", "_segment_size", "_head", "_log", "_first", "_last",
                 "_last_leaf")

    def __init__(self, segment_size: int = 1024) -> None:
        if not _is_pow2(segment_size):
            raise InvalidArgument(f"segment_size must be a power of two >= 1, not {segment_size!r}")
        self._segment_size = segment_size
        self._mask = segment_size - 1
        self._shift = segment_size.bit_length() - 1
        self._size = 0
        self._seg = CompactRange(0)  # the current (partial) segment [kS, size)
        self._log = CompactRange(0)  # full segment roots: [0, kS), nodes of height log2(S)
        self._head = ZERO_HEAD
        self._first: object = None  # positions of the current segment's first and last entries
        self._last: object = None
        self._last_leaf: bytes | None = None  # leaf hash of the last entry (lets a resume check the log)

    def add_leaves(self, leaves: list[bytes], first: object = None, last: object = None) -> Checkpoint | None:
        """Add the leaf hashes of the next entries, all inside the current segment (at most
        :meth:`room` of them; :class:`~chainfold.errors.InvalidArgument` otherwise). ``first`` and
        ``last`` are the positions of the first and last of them (message ids, or anything whose
        ``str()`` is one: checkpoints and states hold the text). The segment's checkpoint when
        they complete it."""
        n = len(leaves)
        if not n:
            return None
        in_seg = self._size & self._mask
        if n > self._segment_size - in_seg:
            raise InvalidArgument(f"{n} leaves do not fit in the {self._segment_size - in_seg} left in the segment")
        if not in_seg:
            self._first = first
        self._last = last
        self._last_leaf = leaves[-1]
        self._seg.extend(leaves)
        self._size += n
        if self._size & self._mask:
            return None
        return self._close()

    def add_leaf(self, leaf_hash: bytes, message_id: object = None) -> Checkpoint | None:
        """Add the next entry by its leaf hash (32 bytes, not checked); its segment's checkpoint
        if it completes it."""
        return self.add_leaves([leaf_hash], message_id, message_id)

    def add(self, payload: bytes, message_id: object = None) -> Checkpoint | None:
        """Add the next entry by its payload bytes (see :meth:`add_leaf`)."""
        return self.add_leaves([leaf_hash(payload)], message_id, message_id)

    def room(self) -> int:
        """How many entries the current segment still takes."""
        return self._segment_size - (self._size & self._mask)

    def _close(self) -> Checkpoint:
        segment_root = self._seg.root()  # a full segment is one subtree: its root
        size = self._size
        self._seg = CompactRange(size)
        head = chain_head(self._head, size, segment_root)
        self._head = head
        self._log.append_subtree(self._shift, segment_root)
        return Checkpoint(
            segment=(size - 1) >> self._shift,
            size=size,
            segment_size=self._segment_size,
            root=segment_root,
            head=head,
            first=_text(self._first),
            last=_text(self._last),
        )

    @property
    def size(self) -> int:
        """Number of entries added."""
        return self._size

    @property
    def segment_size(self) -> int:
        return self._segment_size

    @property
    def head(self) -> bytes:
        """Head of the last completed segment (:data:`ZERO_HEAD` before any)."""
        return self._head

    def pending(self) -> Checkpoint | None:
        """Provisional checkpoint of the partial last segment; ``None`` if it is empty."""
        if not self._size & self._mask:
            return None
        segment_root = self._seg.root()
        return Checkpoint(
            segment=self._size >> self._shift,
            size=self._size,
            segment_size=self._segment_size,
            root=segment_root,
            head=chain_head(self._head, self._size, segment_root),
            first=_text(self._first),
            last=_text(self._last),
        )

    def log_root(self) -> bytes:
        """RFC 9162 root over every entry added (equals ``merkle.root`` of all leaf hashes)."""
        whole = self._log.copy()
        whole.merge(self._seg)
        return whole.root()

    def state(self) -> dict[str, Any]:
        """Everything needed to resume exactly: CBOR-encodable (ints, bytes, str, None, lists)."""
        return {
            "version": _STATE_VERSION,
            "size": self._size,
            "segment_size": self._segment_size,
            "head": self._head,
            "segment_frontier": self._seg.hashes,
            "log_frontier": self._log.hashes,
            "first": _text(self._first),
            "last": _text(self._last),
            "last_leaf": self._last_leaf,
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> ChainBuilder:
        """Resume from :meth:`state`; :class:`~chainfold.errors.InvalidArgument` if the state is
        inconsistent."""
        try:
            if state["version"] != _STATE_VERSION:
                raise InvalidArgument(f"unsupported state version {state['version']!r}")
            b = cls(state["segment_size"])
            size = state["size"]
            head = state["head"]
            seg = list(state["segment_frontier"])
            log = list(state["log_frontier"])
            first = state["first"]
            last = state["last"]
        except (KeyError, TypeError) as exc:
            raise InvalidArgument(f"bad chain state: {exc!r}") from None
        if type(size) is not int or not 0 <= size <= _MAX_UINT64:
            raise InvalidArgument(f"bad size {size!r}")
        if type(head) is not bytes or len(head) != HASH_SIZE:
            raise InvalidArgument("head must be 32 bytes")
        if (size >> b._shift == 0) != (head == ZERO_HEAD):
            raise InvalidArgument("head must be zero exactly when no segment is complete")
        in_seg = size & b._mask
        if len(seg) != bin(in_seg).count("1"):
            raise InvalidArgument(f"segment frontier must hold {bin(in_seg).count('1')} hashes, not {len(seg)}")
        for name, v in (("first", first), ("last", last)):
            if v is not None and type(v) is not str:
                raise InvalidArgument(f"{name} must be a string or None")
        b._seg = CompactRange.from_hashes(size - in_seg, size, seg)
        b._log = CompactRange.from_frontier(size - in_seg, log)
        b._size = size
        b._head = head
        b._first = first
        b._last = last
        last_leaf = state.get("last_leaf")
        if last_leaf is not None and (type(last_leaf) is not bytes or len(last_leaf) != HASH_SIZE):
            raise InvalidArgument("last_leaf must be 32 bytes")
        b._last_leaf = last_leaf
        return b

    @classmethod
    def after_segments(cls, checkpoints: Sequence[Checkpoint]) -> ChainBuilder:
        """The chain right after the full segments ``checkpoints`` (0, 1, ..., k-1), rebuilt from
        their roots and last head alone: where a hash pass over segments k, k+1, ... starts."""
        if not checkpoints:
            raise InvalidArgument("after_segments needs at least one checkpoint (else: ChainBuilder(S))")
        s = checkpoints[0].segment_size
        b = cls(s)
        for cp in checkpoints:
            if not cp.full or cp.segment_size != s or cp.segment != b._size >> b._shift:
                raise InvalidArgument(f"segment {cp.segment} does not continue full segments 0..{cp.segment - 1}")
            b._log.append_subtree(b._shift, cp.root)
            b._size = cp.size
        last = checkpoints[-1]
        b._seg = CompactRange(b._size)
        b._head, b._first, b._last = last.head, last.first, last.last
        return b


# --- divergence --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Divergence:
    """The first entry index where two sequences differ, its segment, and the hash comparisons spent.

    For a dropped entry this is where it should have been; when one sequence is a strict prefix of
    the other, it is the shorter one's length.
    """

    index: int
    segment: int
    comparisons: int


def _levels(leaves: Sequence[bytes]) -> list[list[bytes]]:
    """levels[h][j] = root of the perfect subtree of leaves [j*2^h, (j+1)*2^h), where complete."""
    levels = [list(leaves)]
    cur = levels[0]
    while len(cur) > 1:
        cur = [_sha256(b"\x01" + cur[i] + cur[i + 1]).digest() for i in range(0, len(cur) - 1, 2)]
        levels.append(cur)
    return levels


def _levels_root(levels: list[list[bytes]], count: int) -> bytes:
    frontier = []
    pos = 0
    for h in range(count.bit_length() - 1, -1, -1):
        if count >> h & 1:
            frontier.append(levels[h][pos >> h])
            pos += 1 << h
    return _fold(frontier)


def _segment_tree(cp: Checkpoint, leaves: Sequence[bytes], side: str) -> list[list[bytes]]:
    count = cp.size - cp.start
    if len(leaves) != count:
        raise RootMismatch(side, cp.segment, cp.root, b"", f"{len(leaves)} leaves given, the checkpoint covers {count}")
    levels = _levels(leaves)
    calculated = _levels_root(levels, count)
    if calculated != cp.root:
        raise RootMismatch(side, cp.segment, cp.root, calculated)
    return levels


def _check_sequence(cps: Sequence[Checkpoint], side: str) -> int | None:
    if not cps:
        return None
    s = cps[0].segment_size
    if cps[0].segment != 0 or cps[-1].segment != len(cps) - 1:
        raise InvalidArgument(f"{side} checkpoints must be segments 0..{len(cps) - 1} in order")
    if cps[-1].segment_size != s:
        raise SegmentSizeMismatch(f"{side} checkpoints", s, cps[-1].segment_size)
    return s


def bisect_heads(left: Sequence[Checkpoint], right: Sequence[Checkpoint]) -> tuple[int, int]:
    """The first segment k whose heads differ (``min(len(left), len(right))`` if none of the
    segments both sides have does), and the head comparisons spent: a bisection, since a head
    covers everything before it (once two heads differ, every later pair does)."""
    comparisons = 0
    lo, hi = 0, min(len(left), len(right))
    while lo < hi:
        mid = (lo + hi) >> 1
        comparisons += 1
        if left[mid].head != right[mid].head:
            hi = mid
        else:
            lo = mid + 1
    return lo, comparisons


def first_difference_in_segment(
    left: Checkpoint, right: Checkpoint, left_leaves: Sequence[bytes], right_leaves: Sequence[bytes]
) -> tuple[int, int]:
    """Where two versions of one segment first differ: (index of the entry, hash comparisons).

    The leaves of each side must be the ones its checkpoint was made of
    (:class:`~chainfold.errors.RootMismatch` otherwise). The two trees are descended comparing
    left children: at most log2(S) comparisons. The segments must differ (else the index is the
    end of the shorter one).
    """
    s = left.segment_size
    if right.segment_size != s:
        raise SegmentSizeMismatch(f"segment {left.segment}", s, right.segment_size)
    llev = _segment_tree(left, left_leaves, "left")
    rlev = _segment_tree(right, right_leaves, "right")
    ln, rn = left.size - left.start, right.size - right.start
    comparisons = 0
    h = s.bit_length() - 1
    pos = 0  # invariant: the first difference within the segment lies in [pos, pos + 2**h)
    while h:
        h -= 1
        mid = pos + (1 << h)
        if mid <= ln and mid <= rn:
            comparisons += 1
            if llev[h][pos >> h] == rlev[h][pos >> h]:
                pos = mid
        # else one side ends inside the left half, so the difference is there: go left, no comparison
    return left.start + pos, comparisons


def find_divergence(
    left: Sequence[Checkpoint],
    right: Sequence[Checkpoint],
    left_leaves: Callable[[int], Sequence[bytes]],
    right_leaves: Callable[[int], Sequence[bytes]],
) -> Divergence | None:
    """The first index where the two checkpointed leaf sequences differ; ``None`` if they are equal.

    ``left`` and ``right`` are the checkpoints of segments 0, 1, ... in order (the last one may be
    provisional); ``*_leaves(k)`` returns the leaf hashes of segment k on that side and is called at
    most once per side, for the one segment that holds the divergence. Both sides must use the same
    segment size (:class:`~chainfold.errors.SegmentSizeMismatch`); leaves that do not match their
    checkpoint raise :class:`~chainfold.errors.RootMismatch` (both are ``ValueError`` too).

    :func:`bisect_heads` finds the segment, :func:`first_difference_in_segment` the entry in it.
    ``comparisons`` counts the hash comparisons of both (at most ceil(log2(segments + 1)) +
    log2(S)); checking the supplied leaves against their checkpoint roots is not counted.
    """
    ls = _check_sequence(left, "left")
    rs = _check_sequence(right, "right")
    if ls is not None and rs is not None and ls != rs:
        raise SegmentSizeMismatch("find_divergence", ls, rs)
    s = ls or rs
    if s is None:
        return None
    k, comparisons = bisect_heads(left, right)
    if k == min(len(left), len(right)):
        if len(left) == len(right):
            return None
        shorter = left if len(left) < len(right) else right
        index = shorter[-1].size if shorter else 0
        return Divergence(index=index, segment=index // s, comparisons=comparisons)
    index, more = first_difference_in_segment(left[k], right[k], left_leaves(k), right_leaves(k))
    return Divergence(index=index, segment=k, comparisons=comparisons + more)

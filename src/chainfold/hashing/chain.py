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

from ..merkle import EMPTY_ROOT, HASH_SIZE, CompactRange

__all__ = [
    "ZERO_HEAD",
    "chain_head",
    "Checkpoint",
    "ChainBuilder",
    "Divergence",
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
        raise ValueError(f"{key} must be {2 * HASH_SIZE} lowercase hex digits")
    try:
        return bytes.fromhex(v)
    except ValueError:
        raise ValueError(f"{key} is not hex") from None


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
    ``S`` a power of two) and raises ``ValueError``; it cannot check the chain, which needs the
    previous head.
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
                raise ValueError(f"{name} must be an unsigned 64-bit int, not {v!r}")
        if not _is_pow2(self.segment_size):
            raise ValueError(f"segment_size must be a power of two >= 1, not {self.segment_size!r}")
        s = self.segment_size
        if not self.segment * s < self.size <= (self.segment + 1) * s:
            raise ValueError(
                f"size {self.size} does not end inside segment {self.segment} of {s} entries"
            )
        for name in ("root", "head"):
            v = getattr(self, name)
            if type(v) is not bytes or len(v) != HASH_SIZE:
                raise ValueError(f"{name} must be {HASH_SIZE} bytes")
        for name in ("first", "last"):
            v = getattr(self, name)
            if v is not None and type(v) is not str:
                raise ValueError(f"{name} must be a message id string or null, not {v!r}")

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
            raise ValueError(f"a checkpoint is a JSON object, not {type(d).__name__}")
        missing = [k for k in _KEYS if k not in d]
        if missing:
            raise ValueError(f"missing key(s) {', '.join(missing)}")
        extra = sorted(str(k) for k in d if k not in _KEYS)
        if extra:
            raise ValueError(f"unknown key(s) {', '.join(extra)}")
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
            raise ValueError(f"a checkpoint is a map, not {type(d).__name__}")
        if set(d) != set(_KEYS):
            raise ValueError(f"keys must be exactly {', '.join(_KEYS)}")
        return cls(**{k: d[k] for k in _KEYS})


class ChainBuilder:
    """Computes checkpoints as entries stream past, holding O(log n) hashes.

    Feed every log entry in order with :meth:`add` (payload bytes) or :meth:`add_leaf` (its leaf
    hash); each returns the :class:`Checkpoint` of a segment when that segment completes, else
    ``None``. Completed checkpoints are not kept: collect them. :meth:`pending` gives the provisional
    checkpoint of the partial last segment, :meth:`log_root` the RFC 9162 root of the whole log, and
    :meth:`state` / :meth:`from_state` persist and resume exactly.

    The builder does not deduplicate: dropping redelivered messages (docs/formats.md) is the reader's job.
    """

    __slots__ = ("_seg", "_size", "_mask", "_shift", "_segment_size", "_head", "_log", "_first", "_last", "_last_leaf")

    def __init__(self, segment_size: int = 1024) -> None:
        if not _is_pow2(segment_size):
            raise ValueError(f"segment_size must be a power of two >= 1, not {segment_size!r}")
        self._segment_size = segment_size
        self._mask = segment_size - 1
        self._shift = segment_size.bit_length() - 1
        self._size = 0
        self._seg: list[bytes] = []  # frontier of the current (partial) segment
        self._log = CompactRange()  # full segment roots, as nodes of height log2(S)
        self._head = ZERO_HEAD
        self._first: str | None = None
        self._last: str | None = None
        self._last_leaf: bytes | None = None  # leaf hash of the last entry (lets a resume check the log)

    # The two hot-path methods repeat the same few lines on purpose: one call per entry, no more.

    def add(self, payload: bytes, message_id: str | None = None) -> Checkpoint | None:
        """Add the next entry (its payload bytes); the segment's checkpoint if this completes it."""
        sha = _sha256
        seg = self._seg
        n = self._size & self._mask  # entries already in the current segment
        if not n:
            self._first = message_id
        self._last = message_id
        self._size += 1
        h = self._last_leaf = sha(b"\x00" + payload).digest()
        while n & 1:  # merge equal-height subtrees: one node hash per trailing one bit
            h = sha(b"\x01" + seg.pop() + h).digest()
            n >>= 1
        seg.append(h)
        if self._size & self._mask:
            return None
        return self._close()

    def add_leaf(self, leaf_hash: bytes, message_id: str | None = None) -> Checkpoint | None:
        """Like :meth:`add`, with the entry's precomputed leaf hash (32 bytes, not checked)."""
        sha = _sha256
        seg = self._seg
        n = self._size & self._mask
        if not n:
            self._first = message_id
        self._last = message_id
        self._size += 1
        h = self._last_leaf = leaf_hash
        while n & 1:
            h = sha(b"\x01" + seg.pop() + h).digest()
            n >>= 1
        seg.append(h)
        if self._size & self._mask:
            return None
        return self._close()

    def _close(self) -> Checkpoint:
        seg = self._seg
        segment_root = seg[0]  # a full segment's frontier is its root
        seg.clear()
        size = self._size
        head = chain_head(self._head, size, segment_root)
        self._head = head
        self._log.append_subtree(self._shift, segment_root)
        return Checkpoint(
            segment=(size - 1) >> self._shift,
            size=size,
            segment_size=self._segment_size,
            root=segment_root,
            head=head,
            first=None if self._first is None else str(self._first),
            last=None if self._last is None else str(self._last),
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
        segment_root = _fold(self._seg)
        return Checkpoint(
            segment=self._size >> self._shift,
            size=self._size,
            segment_size=self._segment_size,
            root=segment_root,
            head=chain_head(self._head, self._size, segment_root),
            first=None if self._first is None else str(self._first),
            last=None if self._last is None else str(self._last),
        )

    def log_root(self) -> bytes:
        """RFC 9162 root over every entry added (equals ``merkle.root`` of all leaf hashes)."""
        # Full segments are subtrees of height log2(S) >= every subtree of the partial segment,
        # so the two frontiers side by side are the whole log's frontier.
        return _fold(self._log.frontier + self._seg)

    def state(self) -> dict[str, Any]:
        """Everything needed to resume exactly: CBOR-encodable (ints, bytes, str, None, lists)."""
        return {
            "version": _STATE_VERSION,
            "size": self._size,
            "segment_size": self._segment_size,
            "head": self._head,
            "segment_frontier": list(self._seg),
            "log_frontier": self._log.frontier,
            "first": None if self._first is None else str(self._first),
            "last": None if self._last is None else str(self._last),
            "last_leaf": self._last_leaf,
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> ChainBuilder:
        """Resume from :meth:`state`; ``ValueError`` if the state is inconsistent."""
        try:
            if state["version"] != _STATE_VERSION:
                raise ValueError(f"unsupported state version {state['version']!r}")
            b = cls(state["segment_size"])
            size = state["size"]
            head = state["head"]
            seg = list(state["segment_frontier"])
            log = list(state["log_frontier"])
            first = state["first"]
            last = state["last"]
        except (KeyError, TypeError) as exc:
            raise ValueError(f"bad chain state: {exc!r}") from None
        if type(size) is not int or not 0 <= size <= _MAX_UINT64:
            raise ValueError(f"bad size {size!r}")
        if type(head) is not bytes or len(head) != HASH_SIZE:
            raise ValueError("head must be 32 bytes")
        if (size >> b._shift == 0) != (head == ZERO_HEAD):
            raise ValueError("head must be zero exactly when no segment is complete")
        in_seg = size & b._mask
        if len(seg) != bin(in_seg).count("1"):
            raise ValueError(f"segment frontier must hold {bin(in_seg).count('1')} hashes, not {len(seg)}")
        for h in seg:
            if type(h) is not bytes or len(h) != HASH_SIZE:
                raise ValueError("segment frontier hashes must be 32 bytes")
        for name, v in (("first", first), ("last", last)):
            if v is not None and type(v) is not str:
                raise ValueError(f"{name} must be a string or None")
        b._log = CompactRange.from_frontier(size - in_seg, log)
        b._size = size
        b._head = head
        b._seg = seg
        b._first = first
        b._last = last
        last_leaf = state.get("last_leaf")
        if last_leaf is not None and (type(last_leaf) is not bytes or len(last_leaf) != HASH_SIZE):
            raise ValueError("last_leaf must be 32 bytes")
        b._last_leaf = last_leaf
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


def _segment_tree(
    cp: Checkpoint, leaves_of: Callable[[int], Sequence[bytes]], k: int, side: str
) -> tuple[list[list[bytes]], int]:
    leaves = leaves_of(k)
    count = cp.size - cp.start
    if len(leaves) != count:
        raise ValueError(f"{side} segment {k}: {len(leaves)} leaves given, the checkpoint covers {count}")
    levels = _levels(leaves)
    if _levels_root(levels, count) != cp.root:
        raise ValueError(f"{side} segment {k}: the leaves given do not match the checkpoint root")
    return levels, count


def _check_sequence(cps: Sequence[Checkpoint], side: str) -> int | None:
    if not cps:
        return None
    s = cps[0].segment_size
    if cps[0].segment != 0 or cps[-1].segment != len(cps) - 1:
        raise ValueError(f"{side} checkpoints must be segments 0..{len(cps) - 1} in order")
    if cps[-1].segment_size != s:
        raise ValueError(f"{side} checkpoints mix segment sizes")
    return s


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
    segment size (``ValueError`` otherwise, or when the leaves given do not match their checkpoint).

    Heads are cumulative, so the first segment whose head differs is found by bisection; inside it,
    the tree is descended comparing left-child hashes. ``comparisons`` counts the hash comparisons
    of both phases (at most ceil(log2(segments + 1)) + log2(S)); checking the supplied leaves
    against their checkpoint roots is not counted.
    """
    ls = _check_sequence(left, "left")
    rs = _check_sequence(right, "right")
    if ls is not None and rs is not None and ls != rs:
        raise ValueError(f"segment sizes differ: {ls} on the left, {rs} on the right")
    s = ls or rs
    if s is None:
        return None
    comparisons = 0
    common = min(len(left), len(right))
    lo, hi = 0, common
    while lo < hi:  # first k < common whose heads differ (differing is monotone: heads chain)
        mid = (lo + hi) >> 1
        comparisons += 1
        if left[mid].head != right[mid].head:
            hi = mid
        else:
            lo = mid + 1
    k = lo
    if k == common:
        if len(left) == len(right):
            return None
        shorter = left if len(left) < len(right) else right
        index = shorter[-1].size if shorter else 0
        return Divergence(index=index, segment=index // s, comparisons=comparisons)

    llev, ln = _segment_tree(left[k], left_leaves, k, "left")
    rlev, rn = _segment_tree(right[k], right_leaves, k, "right")
    # Invariant: the first difference within the segment lies in [pos, pos + 2**h).
    h = s.bit_length() - 1
    pos = 0
    while h:
        h -= 1
        mid = pos + (1 << h)
        if mid <= ln and mid <= rn:
            comparisons += 1
            if llev[h][pos >> h] == rlev[h][pos >> h]:
                pos = mid
        # else one side ends inside the left half, so the difference is there: go left, no comparison
    index = k * s + pos
    return Divergence(index=index, segment=k, comparisons=comparisons)

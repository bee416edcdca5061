"""RFC 9162 Merkle tree hashes over the log (docs/formats.md): hasher, roots, proofs, compact ranges.

The tree is the one of RFC 9162 §2.1 (identical to RFC 6962), with SHA-256::

    leaf = SHA-256(0x00 || data)            leaf_hash
    node = SHA-256(0x01 || left || right)   node_hash
    MTH(D[0:n]) splits at the largest power of two k < n; MTH([]) = SHA-256(b"")

Every function taking ``leaves`` takes *leaf hashes* (the output of :func:`leaf_hash`), never raw
payloads. Builders (:func:`root`, :func:`inclusion_proof`, :func:`consistency_proof`) raise
:class:`~chainfold.errors.InvalidArgument` (a ``ValueError``) on bad arguments; verifiers
(:func:`verify_inclusion`, :func:`verify_consistency`) never raise: any malformed input makes them
return ``False``.

:class:`CompactRange` is the incremental form: the roots of the perfect subtrees covering leaves
``[begin, end)``, enough to append, to merge with the adjacent range and to compute the root in
O(log n) memory. The per-segment hashing of :mod:`chainfold.hashing.chain` is built on it, and
ranges hashed apart (by tasks of a distributed engine) merge into the ranges of whole segments.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence

from .errors import InvalidArgument

__all__ = [
    "HASH_SIZE",
    "EMPTY_ROOT",
    "leaf_hash",
    "node_hash",
    "root",
    "inclusion_proof",
    "consistency_proof",
    "verify_inclusion",
    "verify_consistency",
    "decompose",
    "CompactRange",
]

HASH_SIZE = 32
_sha256 = hashlib.sha256
EMPTY_ROOT: bytes = _sha256(b"").digest()
"""MTH of the empty tree: SHA-256 of the empty string."""


def leaf_hash(data: bytes) -> bytes:
    """SHA-256(0x00 || data): the hash of one log entry's payload."""
    return _sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """SHA-256(0x01 || left || right): the hash of an interior node."""
    return _sha256(b"\x01" + left + right).digest()


def _fold(hashes: Sequence[bytes]) -> bytes:
    """The root over a frontier (perfect-subtree roots, left to right, strictly decreasing sizes)."""
    if not hashes:
        return EMPTY_ROOT
    sha = _sha256
    r = hashes[-1]
    for i in range(len(hashes) - 2, -1, -1):
        r = sha(b"\x01" + hashes[i] + r).digest()
    return r


def root(leaves: Sequence[bytes]) -> bytes:
    """MTH over ``leaves`` (leaf hashes). ``root([]) == SHA-256(b"")``.

    Pairing level by level and carrying an odd last node up unchanged builds exactly the RFC 9162
    tree (split at the largest power of two below n), with n - 1 node hashes.
    """
    level = list(leaves)
    if not level:
        return EMPTY_ROOT
    sha = _sha256
    while len(level) > 1:
        n = len(level)
        nxt = [sha(b"\x01" + level[i] + level[i + 1]).digest() for i in range(0, n - 1, 2)]
        if n & 1:
            nxt.append(level[-1])
        level = nxt
    return level[0]


def _split(n: int) -> int:
    """The largest power of two strictly below ``n`` (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


def _check_leaves(leaves: Sequence[bytes]) -> int:
    n = len(leaves)
    for h in leaves:
        if type(h) is not bytes or len(h) != HASH_SIZE:
            raise InvalidArgument("leaves must be 32-byte leaf hashes")
    return n


def inclusion_proof(leaves: Sequence[bytes], index: int) -> list[bytes]:
    """The audit path of leaf ``index`` in the tree over ``leaves`` (RFC 9162 §2.1.3.1), leaf to root.

    Raises :class:`~chainfold.errors.InvalidArgument` unless ``0 <= index < len(leaves)``.
    """
    n = _check_leaves(leaves)
    if type(index) is not int or not 0 <= index < n:
        raise InvalidArgument(f"index {index!r} out of range for a tree of size {n}")
    path: list[bytes] = []
    lo, hi, m = 0, n, index
    while hi - lo > 1:
        k = _split(hi - lo)
        if m < k:
            path.append(root(leaves[lo + k : hi]))
            hi = lo + k
        else:
            path.append(root(leaves[lo : lo + k]))
            lo, m = lo + k, m - k
    path.reverse()
    return path


def consistency_proof(leaves: Sequence[bytes], old_size: int) -> list[bytes]:
    """The proof that the tree over ``leaves[:old_size]`` is a prefix of the tree over ``leaves``.

    RFC 9162 §2.1.4.1 (SUBPROOF). Raises :class:`~chainfold.errors.InvalidArgument` unless ``0 < old_size <= len(leaves)``;
    ``old_size == len(leaves)`` gives the empty proof.
    """
    n = _check_leaves(leaves)
    if type(old_size) is not int or not 0 < old_size <= n:
        raise InvalidArgument(f"old_size {old_size!r} out of range for a tree of size {n}")
    proof: list[bytes] = []
    lo, hi, m, complete = 0, n, old_size, True
    while m != hi - lo:
        k = _split(hi - lo)
        if m <= k:
            proof.append(root(leaves[lo + k : hi]))
            hi = lo + k
        else:
            proof.append(root(leaves[lo : lo + k]))
            lo, m, complete = lo + k, m - k, False
    if not complete:
        proof.append(root(leaves[lo:hi]))
    proof.reverse()
    return proof


# --- verifiers: return False on anything malformed, never raise -----------------------------------


def _is_size(v: object) -> bool:
    return type(v) is int and v >= 0  # bool is not a size


def _is_hash(v: object) -> bool:
    return type(v) is bytes and len(v) == HASH_SIZE


def _hash_list(proof: object) -> list[bytes] | None:
    if type(proof) not in (list, tuple):
        return None
    for p in proof:  # type: ignore[union-attr]
        if type(p) is not bytes or len(p) != HASH_SIZE:
            return None
    return list(proof)  # type: ignore[arg-type]


def verify_inclusion(leaf: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes) -> bool:
    """True iff ``proof`` proves that ``leaf`` is entry ``index`` of the tree of ``size`` with ``root``.

    ``leaf`` is the *leaf hash* (:func:`leaf_hash` of the payload), as in the RFC 9162 test vectors,
    not the payload. All hashes must be 32-byte ``bytes``; ``proof`` a list or tuple. Returns False,
    never raises, for anything malformed (wrong proof length, bad types, index >= size, ...).
    """
    if not (_is_hash(leaf) and _is_hash(root) and _is_size(index) and _is_size(size)):
        return False
    path = _hash_list(proof)
    if path is None or index >= size:
        return False
    fn, sn = index, size - 1
    inner = (fn ^ sn).bit_length()  # levels where the sibling is a full subtree
    if len(path) != inner + bin(fn >> inner).count("1"):
        return False
    sha = _sha256
    r = leaf
    for p in path:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = sha(b"\x01" + p + r).digest()
            while not fn & 1 and fn:
                fn >>= 1
                sn >>= 1
        else:
            r = sha(b"\x01" + r + p).digest()
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> bool:
    """True iff ``proof`` proves tree (``old_size``, ``old_root``) a prefix of (``new_size``, ``new_root``).

    RFC 9162 §2.1.4.2. ``old_size == 0`` is refused (a check from the empty tree proves nothing), as
    is ``old_size > new_size``. Equal sizes need an empty proof and equal roots. All hashes must be
    32-byte ``bytes``. Returns False, never raises, for anything malformed.
    """
    if not (_is_size(old_size) and _is_size(new_size) and _is_hash(old_root) and _is_hash(new_root)):
        return False
    path = _hash_list(proof)
    if path is None or old_size == 0 or old_size > new_size:
        return False
    if old_size == new_size:
        return not path and old_root == new_root
    # Expected length: the inclusion path of leaf old_size-1, minus the levels inside the old tree's
    # rightmost perfect subtree, plus that subtree's root unless it is the whole old tree.
    shift = (old_size & -old_size).bit_length() - 1
    fn, sn = old_size - 1, new_size - 1
    inner = (fn ^ sn).bit_length()
    seeded = old_size != 1 << shift
    if len(path) != int(seeded) + inner - shift + bin(fn >> inner).count("1"):
        return False
    if not seeded:
        path.insert(0, old_root)
    fn >>= shift
    sn >>= shift
    sha = _sha256
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = sha(b"\x01" + c + fr).digest()
            sr = sha(b"\x01" + c + sr).digest()
            while not fn & 1 and fn:
                fn >>= 1
                sn >>= 1
        else:
            sr = sha(b"\x01" + sr + c).digest()
        fn >>= 1
        sn >>= 1
    return sn == 0 and fr == old_root and sr == new_root


# --- compact ranges --------------------------------------------------------------------------------


def decompose(begin: int, end: int) -> list[int]:
    """Heights of the perfect subtrees that exactly cover leaves ``[begin, end)``, left to right.

    Each subtree of height h covers ``[m * 2**h, (m+1) * 2**h)`` for some m (it is a node of the
    RFC 9162 tree over any log that long). Heights first rise from ``begin`` and then fall towards
    ``end``; for ``begin == 0`` they only fall (one per set bit of ``end``).
    """
    heights: list[int] = []
    while begin < end:
        h = (begin & -begin).bit_length() - 1 if begin else (end - begin).bit_length() - 1
        while begin + (1 << h) > end:
            h -= 1
        heights.append(h)
        begin += 1 << h
    return heights


Visit = Callable[[int, int, bytes], None]
"""``visit(height, index, hash)``: called for every node a :class:`CompactRange` learns: each leaf
appended (height 0) and each node it hashes; ``index`` counts nodes of that height from the left."""


class CompactRange:
    """The Merkle tree nodes that cover leaves ``[begin, end)``: O(log n) hashes, mergeable.

    ``hashes`` are the roots of the perfect subtrees that exactly cover the range, left to right
    (their heights are :func:`decompose` ``(begin, end)``). A range grows at its end, leaf by leaf
    (:meth:`append`, :meth:`extend`) or by whole subtrees (:meth:`append_subtree`), and absorbs the
    range that starts where it ends (:meth:`merge`), so ranges built independently (per segment,
    per task) combine into the range of them all. :meth:`root` is the RFC 9162 root of an
    *aligned* range, one whose subtrees shrink from left to right so that its leaves form a tree of
    their own: any ``[0, n)`` (the root equals :func:`root` over all the leaves) and any part of a
    segment that starts the segment, ``[k * S, k * S + m)`` with ``m <= S``. ``visit`` callbacks report every node
    learnt, as transparency-dev/merkle's ``compact.Range`` does: the nodes of height ``log2(S)``
    are the segment roots. Hashes are not checked on the hot path: pass 32-byte hashes.
    """

    __slots__ = ("_begin", "_end", "_hashes")

    def __init__(self, begin: int = 0) -> None:
        if type(begin) is not int or begin < 0:
            raise InvalidArgument(f"begin must be a non-negative int, not {begin!r}")
        self._begin = begin
        self._end = begin
        self._hashes: list[bytes] = []

    @classmethod
    def from_hashes(cls, begin: int, end: int, hashes: Iterable[bytes]) -> CompactRange:
        """The range ``[begin, end)`` with the given subtree roots (:attr:`hashes`);
        :class:`~chainfold.errors.InvalidArgument` if they cannot cover it."""
        hs = list(hashes)
        for v in (begin, end):
            if type(v) is not int or v < 0:
                raise InvalidArgument(f"range bounds must be non-negative ints, not {v!r}")
        if end < begin:
            raise InvalidArgument(f"a range cannot end ({end}) before it begins ({begin})")
        want = len(decompose(begin, end))
        if len(hs) != want:
            raise InvalidArgument(f"a range [{begin}, {end}) has {want} subtree hashes, not {len(hs)}")
        for h in hs:
            if type(h) is not bytes or len(h) != HASH_SIZE:
                raise InvalidArgument("subtree hashes must be 32-byte bytes")
        cr = cls(begin)
        cr._end = end
        cr._hashes = hs
        return cr

    @classmethod
    def from_frontier(cls, size: int, hashes: Iterable[bytes]) -> CompactRange:
        """The range ``[0, size)`` from a saved :attr:`size` and :attr:`frontier`."""
        if type(size) is not int or size < 0:
            raise InvalidArgument(f"size must be a non-negative int, not {size!r}")
        return cls.from_hashes(0, size, hashes)

    @property
    def begin(self) -> int:
        """Index of the first leaf covered."""
        return self._begin

    @property
    def end(self) -> int:
        """Index after the last leaf covered."""
        return self._end

    @property
    def size(self) -> int:
        """Number of leaves covered."""
        return self._end - self._begin

    @property
    def hashes(self) -> list[bytes]:
        """A copy of the subtree roots covering the range, left to right."""
        return list(self._hashes)

    frontier = hashes

    def _push(self, height: int, node: bytes, visit: Visit | None) -> None:
        """Add the node of ``height`` that starts at :attr:`end`, hashing it with every left
        neighbour it completes a subtree with (those inside the range)."""
        hashes = self._hashes
        begin = self._begin
        e = self._end >> height
        self._end += 1 << height
        sha = _sha256
        while e & 1 and (e - 1) << height >= begin:
            node = sha(b"\x01" + hashes.pop() + node).digest()
            e >>= 1
            height += 1
            if visit is not None:
                visit(height, e, node)
        hashes.append(node)

    def append(self, leaf_hash: bytes, visit: Visit | None = None) -> None:
        """Add one leaf hash at :attr:`end`."""
        self.extend((leaf_hash,), visit)

    def extend(self, leaf_hashes: Iterable[bytes], visit: Visit | None = None) -> None:
        """Append each of ``leaf_hashes`` in order.

        This loop is the one per-entry tree-hashing loop of chainfold (every replay runs through
        it): while the range stays inside the aligned block that ``begin`` starts (always, for a
        range from 0 and for a segment), the trailing one bits of the leaf count say which nodes
        complete, with no bounds to check; otherwise (or with ``visit``) each leaf goes the
        general way.
        """
        begin = self._begin
        block = begin & -begin
        if visit is not None or (begin and not isinstance(leaf_hashes, (list, tuple))) \
                or (begin and self._end - begin + len(leaf_hashes) > block):  # type: ignore[arg-type]
            for h in leaf_hashes:
                if visit is not None:
                    visit(0, self._end, h)
                self._push(0, h, visit)
            return
        hashes = self._hashes
        pop, push = hashes.pop, hashes.append
        sha = _sha256
        n = self._end - begin
        for h in leaf_hashes:
            m = n
            n += 1
            while m & 1:  # one node hash per trailing one bit of the count before this leaf
                h = sha(b"\x01" + pop() + h).digest()
                m >>= 1
            push(h)
        self._end = begin + n

    def append_subtree(self, height: int, subtree_root: bytes, visit: Visit | None = None) -> None:
        """Add the root of a perfect subtree of ``2**height`` leaves at :attr:`end`.

        The subtree must be a node of the whole tree: :attr:`end` must be a multiple of
        ``2**height`` (:class:`~chainfold.errors.InvalidArgument` otherwise). Full segment roots
        are pushed this way.
        """
        if type(height) is not int or height < 0:
            raise InvalidArgument(f"height must be a non-negative int, not {height!r}")
        if type(subtree_root) is not bytes or len(subtree_root) != HASH_SIZE:
            raise InvalidArgument("subtree_root must be 32-byte bytes")
        if self._end & ((1 << height) - 1):
            raise InvalidArgument(f"a subtree of height {height} cannot start at index {self._end}")
        self._push(height, subtree_root, visit)

    def merge(self, other: CompactRange, visit: Visit | None = None) -> None:
        """Absorb ``other``, the range that starts where this one ends: this range then covers
        ``[begin, other.end)``. Nodes that now complete are hashed (and visited)."""
        if not isinstance(other, CompactRange):
            raise InvalidArgument(f"not a CompactRange: {other!r}")
        if other._begin != self._end:
            raise InvalidArgument(f"ranges are not adjacent: [{self._begin}, {self._end}) and "
                                  f"[{other._begin}, {other._end})")
        for height, node in zip(decompose(other._begin, other._end), list(other._hashes)):
            self._push(height, node, visit)

    @property
    def aligned(self) -> bool:
        """Whether the range's subtrees shrink from left to right, so that its leaves form an RFC
        9162 tree of their own (see the class doc)."""
        hs = decompose(self._begin, self._end)
        return all(a > b for a, b in zip(hs, hs[1:]))

    def root(self) -> bytes:
        """The RFC 9162 root over the leaves of an aligned range (``SHA-256(b"")`` when empty);
        :class:`~chainfold.errors.InvalidArgument` for a range that is not aligned."""
        if not self.aligned:
            raise InvalidArgument(f"[{self._begin}, {self._end}) is not an aligned range: it has no root of its own")
        return _fold(self._hashes)

    def copy(self) -> CompactRange:
        """An independent copy."""
        cr = CompactRange(self._begin)
        cr._end = self._end
        cr._hashes = list(self._hashes)
        return cr

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CompactRange):
            return NotImplemented
        return (self._begin, self._end, self._hashes) == (other._begin, other._end, other._hashes)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"CompactRange([{self._begin}, {self._end}), {len(self._hashes)} hashes)"

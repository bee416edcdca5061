"""RFC 9162 Merkle tree hashes over the log (docs/formats.md): hasher, roots, proofs, compact ranges.

The tree is the one of RFC 9162 §2.1 (identical to RFC 6962), with SHA-256::

    leaf = SHA-256(0x00 || data)            leaf_hash
    node = SHA-256(0x01 || left || right)   node_hash
    MTH(D[0:n]) splits at the largest power of two k < n; MTH([]) = SHA-256(b"")

Every function taking ``leaves`` takes *leaf hashes* (the output of :func:`leaf_hash`), never raw
payloads. Builders (:func:`root`, :func:`inclusion_proof`, :func:`consistency_proof`) raise
``ValueError`` on bad arguments; verifiers (:func:`verify_inclusion`, :func:`verify_consistency`)
never raise: any malformed input makes them return ``False``.

:class:`CompactRange` is the incremental form: the roots of the perfect subtrees covering
``[0, size)`` (one per set bit of ``size``), enough to append and to compute the root in
O(log n) memory. It is what the per-segment hashing of :mod:`chainfold.hashing.chain` is built on.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

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
            raise ValueError("leaves must be 32-byte leaf hashes")
    return n


def inclusion_proof(leaves: Sequence[bytes], index: int) -> list[bytes]:
    """The audit path of leaf ``index`` in the tree over ``leaves`` (RFC 9162 §2.1.3.1), leaf to root.

    Raises ``ValueError`` unless ``0 <= index < len(leaves)``.
    """
    n = _check_leaves(leaves)
    if type(index) is not int or not 0 <= index < n:
        raise ValueError(f"index {index!r} out of range for a tree of size {n}")
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

    RFC 9162 §2.1.4.1 (SUBPROOF). Raises ``ValueError`` unless ``0 < old_size <= len(leaves)``;
    ``old_size == len(leaves)`` gives the empty proof.
    """
    n = _check_leaves(leaves)
    if type(old_size) is not int or not 0 < old_size <= n:
        raise ValueError(f"old_size {old_size!r} out of range for a tree of size {n}")
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


class CompactRange:
    """The Merkle tree over ``[0, size)`` held as its frontier: O(log n) hashes.

    The frontier is the list of roots of the perfect subtrees that cover ``[0, size)``, left to
    right, one per set bit of ``size`` from the highest down (so ``len(frontier) == popcount(size)``).
    :meth:`append` adds one leaf hash (amortised one node hash); :meth:`append_subtree` adds the root
    of a whole perfect subtree of ``2**height`` leaves as one node; :meth:`root` is the RFC 9162 root
    of everything appended, equal to :func:`root` over all the leaves. Hashes are not checked on the
    hot path: pass 32-byte leaf hashes.
    """

    __slots__ = ("_size", "_hashes")

    def __init__(self) -> None:
        self._size = 0
        self._hashes: list[bytes] = []

    @classmethod
    def from_frontier(cls, size: int, hashes: Iterable[bytes]) -> CompactRange:
        """Resume from a saved :attr:`size` and :attr:`frontier`; ``ValueError`` if they cannot match."""
        hs = list(hashes)
        if type(size) is not int or size < 0:
            raise ValueError(f"size must be a non-negative int, not {size!r}")
        if len(hs) != bin(size).count("1"):
            want = bin(size).count("1")
            raise ValueError(f"a range of size {size} has {want} frontier hashes, not {len(hs)}")
        for h in hs:
            if type(h) is not bytes or len(h) != HASH_SIZE:
                raise ValueError("frontier hashes must be 32-byte bytes")
        cr = cls()
        cr._size = size
        cr._hashes = hs
        return cr

    @property
    def size(self) -> int:
        """Number of leaves covered."""
        return self._size

    @property
    def frontier(self) -> list[bytes]:
        """A copy of the frontier: perfect-subtree roots, left to right."""
        return list(self._hashes)

    def append(self, leaf_hash: bytes) -> None:
        """Add one leaf hash at index :attr:`size`."""
        hashes = self._hashes
        n = self._size
        self._size = n + 1
        h = leaf_hash
        if n & 1:
            sha = _sha256
            while n & 1:  # merge equal-height subtrees: one node hash per trailing one bit
                h = sha(b"\x01" + hashes.pop() + h).digest()
                n >>= 1
        hashes.append(h)

    def extend(self, leaf_hashes: Iterable[bytes]) -> None:
        """Append each of ``leaf_hashes`` in order."""
        append = self.append
        for h in leaf_hashes:
            append(h)

    def append_subtree(self, height: int, subtree_root: bytes) -> None:
        """Add the root of a perfect subtree of ``2**height`` leaves at :attr:`size`.

        The subtree must be a node of the whole tree: :attr:`size` must be a multiple of
        ``2**height`` (``ValueError`` otherwise). This is how full segment roots are pushed.
        """
        if type(height) is not int or height < 0:
            raise ValueError(f"height must be a non-negative int, not {height!r}")
        if type(subtree_root) is not bytes or len(subtree_root) != HASH_SIZE:
            raise ValueError("subtree_root must be 32-byte bytes")
        n = self._size
        if n & ((1 << height) - 1):
            raise ValueError(f"a subtree of height {height} cannot start at index {n}")
        self._size = n + (1 << height)
        n >>= height
        hashes = self._hashes
        h = subtree_root
        while n & 1:
            h = _sha256(b"\x01" + hashes.pop() + h).digest()
            n >>= 1
        hashes.append(h)

    def root(self) -> bytes:
        """The RFC 9162 root over all leaves appended so far (``SHA-256(b"")`` when empty)."""
        return _fold(self._hashes)

    def copy(self) -> CompactRange:
        """An independent copy."""
        cr = CompactRange()
        cr._size = self._size
        cr._hashes = list(self._hashes)
        return cr

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CompactRange):
            return NotImplemented
        return self._size == other._size and self._hashes == other._hashes

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"CompactRange(size={self._size}, frontier={len(self._hashes)} hashes)"

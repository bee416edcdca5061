"""Exact deduplication by event id in bounded memory, stored as immutable pieces for snapshots.

:class:`DedupIndex` is an exact set of event ids (arbitrary text). It keeps the ids added since its
last spill in memory (a ``set``, up to ``memory_bytes``); past that it *spills* them to disk as one
immutable **piece**: a file in the index's folder named by the SHA-256 of its bytes. Each piece
holds its ids sorted by a 64-bit key (xxh3 of the UTF-8 id), the full ids beside the keys, and
binary fuse filters (``pyfusefilter``, 8-bit fingerprints, ~1.2 bytes per id, false positive rate
1/256 per piece) that stay in memory. A batch's ids that are not in memory are asked of every
piece's filter at once (numpy); only a filter hit reads the piece (two ``pread``: the 130 entries
around the key, then the id's bytes) and compares the *full id*, so a collision of keys never makes a new id a duplicate and a filter never makes one
missed. A new id costs a hash and one filter probe per piece; a duplicate of a spilled id costs a
read of the piece (two system calls, a few microseconds). Pieces of similar size are merged
(tiered compaction, fan-in :data:`TIER_FANOUT`), so their number grows with the log of the ids.

Snapshots: :meth:`DedupIndex.checkpoint` spills what is in memory (cost O(ids added since the last
checkpoint), plus now and then a merge of pieces) and returns a small **manifest** (JSON- and
CBOR-able)::

    {"format": 1, "count": <ids>, "pieces": [{"sha256": <hex>, "count": <ids>, "bytes": <size>}, ...]}

:meth:`DedupIndex.open` reopens a manifest in O(pieces) Python work: it reads each piece's filters
and small tables (~1.2 bytes per id) and, unless ``verify=False``, streams its bytes through SHA-256
(no id becomes a Python object). A missing, truncated or altered piece raises
:class:`~chainfold.errors.DedupPieceDamaged`; a set is never silently partial.

Pieces are written crash-safely (a hidden temp file, fsync, rename to ``<sha256>.piece``, fsync of the
folder) and never changed; only :meth:`DedupIndex.collect_garbage` (or :func:`collect_garbage`)
deletes them, and never one that a manifest it is given, or the live index, references. One live
index per folder: the folder is locked (``.lock``, ``flock``) while an index is open.

What grows with the number of ids N: the filters (~1.2 bytes per id, in memory), the fences
(8 bytes per 128 ids, in memory), the number of pieces (log N: the cost of a new id's lookup), and
the disk (~17 bytes + the id's UTF-8 length per id, plus pieces kept for older manifests until
they are collected). The in-memory buffer does not. Not thread-safe.

Piece file (little-endian)::

    header  64 bytes: b"CFDDUP\\x00\\x01", count, bits, array_length, segment_length,
            segment_length_mask, segment_count_length, blob_length (u64/u32, see _HEADER)
    seeds   2**bits u64      fuse filter seed of each block
    starts  2**bits + 1 u64  index of each block's first key (blocks split the key space by its top bits)
    fences  ceil(count / 128) u64: every 128th key
    entries count + 1 pairs (key, offset) u64: sorted by key (ties by the id's bytes); id i is
            blob[offset[i]:offset[i + 1]]; the last pair is (2**64 - 1, blob length)
    filters 2**bits * array_length bytes: one binary fuse 8 filter per block, same geometry
    blob    the ids, UTF-8 (surrogates passed through), in key order
"""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import os
import re
import secrets
import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xxhash
from pyfusefilter.pyfusefilter import ffi as _ffi, lib as _fuse

from ..errors import DedupIndexBusy, DedupManifestInvalid, DedupPieceDamaged
from ..store.atomic import fsync_dir

__all__ = [
    "DEFAULT_MEMORY_BYTES",
    "MANIFEST_FORMAT",
    "TIER_FANOUT",
    "DedupIndex",
    "collect_garbage",
    "id_keys",
    "manifest_digests",
]

DEFAULT_MEMORY_BYTES = 32 << 20
"""Default bound of the in-memory part (estimated bytes of the buffered ids)."""

MANIFEST_FORMAT = 1
"""Version of the manifest and piece format written and read."""

TIER_FANOUT = 4
"""Pieces of one size tier that are merged into one (tier t holds pieces of ~BASE * 4**t ids)."""

_TIER_BASE = 1 << 10
_BLOCK_KEYS = 1 << 15  # target ids per filter block: bounds the memory a merge or a filter build needs
_FENCE = 128  # one key in memory per 128 (1/16 byte per id): a lookup searches 128 entries (2 KiB)
_ID_OVERHEAD = 96  # estimated bytes per buffered id beyond its length (str object + set slot)
_READ_CHUNK = 1 << 20

_MAGIC = b"CFDDUP\x00\x01"
_HEADER = struct.Struct("<8sQIIIIIIQ16x")  # magic, count, bits, array_length, segment_length, mask,
assert _HEADER.size == 64  # segment_count_length, reserved, blob_length, padding
_PIECE_NAME = re.compile(r"^([0-9a-f]{64})\.piece$")
_TEMP_NAME = re.compile(r"^\.piece-(\d{1,10})-[0-9a-f]{16}\.tmp$")

_U64 = np.dtype("<u8")
_M1 = np.uint64(0xFF51AFD7ED558CCD)
_M2 = np.uint64(0xC4CEB9FE1A85EC53)
_LOW32 = np.uint64(0xFFFFFFFF)
_S18, _S32, _S33 = np.uint64(18), np.uint64(32), np.uint64(33)
_LAST_KEY = 0xFFFFFFFFFFFFFFFF


# --- keys --------------------------------------------------------------------------------------------


def _utf8(s: str) -> bytes:
    return s.encode("utf-8", "surrogatepass")


_key_of = xxhash.xxh3_64_intdigest  # UTF-8 bytes -> 64-bit key (tests swap in a colliding one)


def id_keys(ids: Sequence[str]) -> np.ndarray:
    """The 64-bit keys of ``ids`` (xxh3-64 of the UTF-8 bytes, lone surrogates passed through), as
    a ``uint64`` array. Stable across processes and versions; distinct ids may share a key."""
    h = _key_of
    try:
        return np.fromiter(map(h, map(str.encode, ids)), dtype=np.uint64, count=len(ids))
    except UnicodeEncodeError:
        return np.fromiter(map(h, map(_utf8, ids)), dtype=np.uint64, count=len(ids))
    except TypeError:
        bad = next(s for s in ids if not isinstance(s, str))
        raise TypeError(f"event ids are text, not {type(bad).__name__}: {bad!r}") from None


def _sorted_order(keys: np.ndarray, id_bytes: Any) -> np.ndarray:
    """Indices that sort by key, ties (distinct ids of one key) by the ids' bytes (``id_bytes(i)``)."""
    order = np.argsort(keys, kind="stable")
    sk = keys[order]
    ties = np.flatnonzero(sk[1:] == sk[:-1]).tolist()
    g = 0
    while g < len(ties):  # groups of equal keys: [ties[g], ties[h] + 1]
        h = g
        while h + 1 < len(ties) and ties[h + 1] == ties[h] + 1:
            h += 1
        a, b = ties[g], ties[h] + 2
        order[a:b] = sorted(order[a:b].tolist(), key=id_bytes)
        g = h + 1
    return order


# --- filters -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Geometry:
    """The binary fuse 8 geometry shared by every block of a piece (``binary_fuse8_allocate(size)``)."""

    size: int
    segment_length: int
    segment_length_mask: int
    segment_count_length: int
    array_length: int

    @classmethod
    def for_size(cls, size: int) -> _Geometry:
        f = _ffi.new("binary_fuse8_t *")
        if not _fuse.binary_fuse8_allocate(size, f):
            raise MemoryError("cannot allocate a fuse filter")
        try:
            return cls(size, f.SegmentLength, f.SegmentLengthMask, f.SegmentCountLength, f.ArrayLength)
        finally:
            _fuse.binary_fuse8_free(f)


def _padding(keys: np.ndarray, n: int) -> np.ndarray:
    """``n`` deterministic keys not in ``keys`` (sorted, distinct). A block's filter is built for the
    geometry's size, the largest block's: padding keys only add false positives, which the full-id
    comparison rejects."""
    out = np.zeros(0, dtype=np.uint64)
    start = 0
    while out.size < n:
        want = n - out.size
        candidates = _splitmix(np.arange(start, start + want + 16, dtype=np.uint64))
        start += want + 16
        if keys.size:
            at = np.minimum(np.searchsorted(keys, candidates), keys.size - 1)
            candidates = candidates[keys[at] != candidates]
        out = np.unique(np.concatenate((out, candidates)))
    return out[:n]


def _splitmix(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _build_filter(keys: np.ndarray, geometry: _Geometry) -> tuple[int, bytes]:
    """(seed, fingerprints) of a binary fuse 8 filter over the distinct ``keys`` (sorted)."""
    if keys.size > 1:
        keys = keys[np.concatenate(([True], keys[1:] != keys[:-1]))]
    keys = np.concatenate((keys, _padding(keys, geometry.size - keys.size)))
    f = _ffi.new("binary_fuse8_t *")
    if not _fuse.binary_fuse8_allocate(geometry.size, f):
        raise MemoryError("cannot allocate a fuse filter")
    try:
        if geometry.size and not _fuse.binary_fuse8_populate(
                _ffi.cast("uint64_t *", _ffi.from_buffer(keys)), geometry.size, f):
            raise MemoryError("cannot build a fuse filter")
        if f.ArrayLength != geometry.array_length:
            raise AssertionError("fuse filter geometry differs from the piece's")
        return int(f.Seed), bytes(_ffi.buffer(f.Fingerprints, f.ArrayLength))
    finally:
        _fuse.binary_fuse8_free(f)


def _mixed(keys: np.ndarray, seed: np.ndarray | np.uint64) -> tuple[np.ndarray, np.ndarray]:
    """``binary_fuse_mix_split(key, seed)`` and its 8-bit fingerprint, for every key at once."""
    with np.errstate(over="ignore"):
        h = keys + seed
        h ^= h >> _S33
        h *= _M1
        h ^= h >> _S33
        h *= _M2
        h ^= h >> _S33
    return h, (h ^ (h >> _S32)).astype(np.uint8)


# --- pieces ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    """Where each section of a piece starts (byte offsets), from its header fields."""

    count: int
    bits: int
    array_length: int
    blob_length: int

    @property
    def blocks(self) -> int:
        return 1 << self.bits

    def sections(self) -> tuple[int, int, int, int, int, int, int]:
        """(seeds, starts, fences, entries, filters, blob, end)."""
        seeds = _HEADER.size
        starts = seeds + 8 * self.blocks
        fences = starts + 8 * (self.blocks + 1)
        entries = fences + 8 * (-(-self.count // _FENCE))
        filters = entries + 16 * (self.count + 1)
        blob = filters + self.blocks * self.array_length
        return seeds, starts, fences, entries, filters, blob, blob + self.blob_length


def _bits_for(count: int) -> int:
    """Top key bits that split ``count`` ids into blocks of about :data:`_BLOCK_KEYS` at most."""
    return max(0, (max(count, 1) - 1).bit_length() - _BLOCK_KEYS.bit_length() + 1)


def _block_bounds(bits: int) -> np.ndarray:
    """The first key of every block (uint64): block b holds the keys in ``[bounds[b], bounds[b+1])``."""
    b = np.arange(1 << bits, dtype=np.uint64)
    return b << np.uint64(64 - bits) if bits else b


class _PieceWriter:
    """Writes one piece block by block, crash-safely, and names it by its SHA-256."""

    def __init__(self, directory: Path, block_counts: np.ndarray) -> None:
        self.directory = directory
        self.bits = int(block_counts.size).bit_length() - 1
        self.count = int(block_counts.sum())
        self.geometry = _Geometry.for_size(int(block_counts.max()))
        lay = _Layout(self.count, self.bits, self.geometry.array_length, 0)
        _, _, _, self.entries_at, self.filters_at, self.blob_at, _ = lay.sections()
        self.array_length = lay.array_length
        self.starts = np.concatenate(([0], np.cumsum(block_counts))).astype(_U64)
        self.seeds = np.zeros(block_counts.size, dtype=_U64)
        self.block = 0
        self.blob_length = 0
        self.fences: list[np.ndarray] = []
        self.tmp = directory / f".piece-{os.getpid()}-{secrets.token_hex(8)}.tmp"
        self.fd = os.open(self.tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)

    def add_block(self, keys: np.ndarray, offsets: np.ndarray, blob: bytes) -> None:
        """The next block's keys (sorted), offsets into ``blob`` (``len(keys) + 1``, from 0) and ids."""
        b = self.block
        start = int(self.starts[b])
        if keys.size != int(self.starts[b + 1]) - start:
            raise AssertionError("block size differs from the announced one")
        seed, fingerprints = _build_filter(keys, self.geometry)
        self.seeds[b] = seed
        entries = np.empty((keys.size, 2), dtype=_U64)
        entries[:, 0] = keys
        entries[:, 1] = offsets[:-1]
        entries[:, 1] += np.uint64(self.blob_length)
        os.pwrite(self.fd, entries.tobytes(), self.entries_at + 16 * start)
        os.pwrite(self.fd, fingerprints, self.filters_at + b * self.array_length)
        os.pwrite(self.fd, blob, self.blob_at + self.blob_length)
        self.fences.append(keys[-start % _FENCE::_FENCE].copy())  # not a view: it would keep the block alive
        self.blob_length += len(blob)
        self.block += 1

    def finish(self) -> tuple[str, int, bool]:
        """Header and tables written, fsynced, renamed: ``(digest, size, whether that piece existed)``."""
        if self.block != self.seeds.size:
            raise AssertionError("piece finished before its last block")
        g = self.geometry
        head = _HEADER.pack(_MAGIC, self.count, self.bits, g.array_length, g.segment_length,
                            g.segment_length_mask, g.segment_count_length, 0, self.blob_length)
        sentinel = np.array([_LAST_KEY, self.blob_length], dtype=_U64)  # entry `count`: end of the last id
        os.pwrite(self.fd, sentinel.tobytes(), self.entries_at + 16 * self.count)
        fences = np.concatenate(self.fences or [np.zeros(0, _U64)]).astype(_U64)
        os.pwrite(self.fd, head + self.seeds.tobytes() + self.starts.tobytes() + fences.tobytes(), 0)
        os.fsync(self.fd)
        size = self.blob_at + self.blob_length
        digest = _file_digest(self.fd, size)
        os.close(self.fd)
        self.fd = -1
        target = self.directory / f"{digest}.piece"
        existed = target.exists()
        os.replace(self.tmp, target)
        fsync_dir(self.directory)
        return digest, size, existed

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.tmp.unlink(missing_ok=True)


def _file_digest(fd: int, size: int) -> str:
    sha = hashlib.sha256()
    buf = bytearray(_READ_CHUNK)
    view = memoryview(buf)
    pos = 0
    while pos < size:
        n = os.preadv(fd, [view[: min(_READ_CHUNK, size - pos)]], pos)
        if n <= 0:
            break
        sha.update(view[:n])
        pos += n
    return sha.hexdigest()


class _Piece:
    """An open piece: filters, seeds, block starts and fences in memory; entries and ids read on
    demand with ``pread`` (not mapped: what lookups read never counts in the process's memory)."""

    def __init__(self, directory: Path, digest: str, *, count: int | None = None, size: int | None = None,
                 verify: bool = True) -> None:
        self.digest = digest
        self.path = path = directory / f"{digest}.piece"
        try:
            self.fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise DedupPieceDamaged(str(path), "missing") from None
        try:
            self._load(count, size, verify)
        except BaseException:
            os.close(self.fd)
            raise

    def _damaged(self, reason: str) -> DedupPieceDamaged:
        return DedupPieceDamaged(str(self.path), reason)

    def _load(self, count: int | None, size: int | None, verify: bool) -> None:
        actual = os.fstat(self.fd).st_size
        if size is not None and actual != size:
            raise self._damaged(f"{actual} bytes, the manifest says {size}")
        head = os.pread(self.fd, _HEADER.size, 0)
        if len(head) < _HEADER.size:
            raise self._damaged("truncated header")
        magic, n, bits, alen, slen, smask, sclen, _, blen = _HEADER.unpack(head)
        if magic != _MAGIC:
            raise self._damaged("not a dedup piece (bad magic)")
        if count is not None and n != count:
            raise self._damaged(f"header says {n} ids, the manifest says {count}")
        if bits > 40:
            raise self._damaged(f"header says 2**{bits} blocks")
        lay = _Layout(n, bits, alen, blen)
        seeds, starts, fences, self.entries_at, filters, self.blob_at, end = lay.sections()
        if end != actual:
            raise self._damaged(f"{actual} bytes, its header describes {end}")
        if verify and _file_digest(self.fd, actual) != self.digest:
            raise self._damaged("content does not match its SHA-256 name")
        self.count, self.size, self.bits = n, actual, bits
        self.segment_length, self.mask, self.scl = np.uint64(slen), np.uint64(smask), np.uint64(sclen)
        self.array_length = alen
        self.seeds = self._array(seeds, lay.blocks, _U64)
        self.starts = self._array(starts, lay.blocks + 1, _U64)
        self.fences = self._array(fences, -(-n // _FENCE), _U64)
        self.filters = self._array(filters, lay.blocks * alen, np.uint8)
        if int(self.starts[-1]) != n or (self.starts[1:] < self.starts[:-1]).any():
            raise self._damaged("block table inconsistent")
        first = self.seeds[0]
        self.uniform_seed = int(first) if (self.seeds == first).all() else None
        self.shift = np.uint64(64 - bits)

    def _array(self, offset: int, n: int, dtype: Any) -> np.ndarray:
        return np.frombuffer(self._read(offset, n * np.dtype(dtype).itemsize), dtype=dtype)

    def _read(self, offset: int, nbytes: int) -> bytes:
        data = os.pread(self.fd, nbytes, offset)
        if len(data) != nbytes:
            raise self._damaged("truncated")
        return data

    @property
    def memory_bytes(self) -> int:
        """Bytes this piece holds in memory (filters and tables)."""
        return self.filters.nbytes + self.fences.nbytes + self.seeds.nbytes + self.starts.nbytes

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # lookups

    def maybe(self, keys: np.ndarray, mixed: dict[int, tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
        """The filters' answer per key (False: surely absent). ``mixed`` caches the seeded hash."""
        block = keys >> self.shift if self.bits else None
        seed = self.uniform_seed
        if seed is not None:
            if seed not in mixed:
                mixed[seed] = _mixed(keys, np.uint64(seed))
            h, f = mixed[seed]
        else:
            h, f = _mixed(keys, self.seeds[block])
        scl, length, mask, fp = self.scl, self.segment_length, self.mask, self.filters
        with np.errstate(over="ignore"):
            h0 = ((h >> _S32) * scl + (((h & _LOW32) * scl) >> _S32)) >> _S32  # mulhi(h, scl)
            h1 = (h0 + length) ^ ((h >> _S18) & mask)
            h2 = (h0 + (length << np.uint64(1))) ^ (h & mask)
            if block is not None:
                base = block * np.uint64(self.array_length)
                h0 += base
                h1 += base
                h2 += base
            return (f ^ fp[h0] ^ fp[h1] ^ fp[h2]) == 0

    def entries(self, i: int, j: int) -> np.ndarray:
        """Entries ``[i, j)`` as a (j - i, 2) array of (key, offset of the id in the blob); ``j`` may
        be ``count + 1`` (the sentinel entry: the blob's end)."""
        return np.frombuffer(self._read(self.entries_at + 16 * i, 16 * (j - i)), dtype=_U64).reshape(-1, 2)

    def _windows(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For each key, the stretch of entries where its lower bound lies: ``(first index, (len,
        _FENCE + 2, 2) array)`` (the fences, in memory, say which stretch; one ``pread`` each; rows
        past the end read as 2**64 - 1)."""
        lo = np.maximum(np.searchsorted(self.fences, keys, "left").astype(np.int64) - 1, 0) * _FENCE
        size, end = 16 * (_FENCE + 2), self.entries_at + 16 * (self.count + 1)
        fd, at = self.fd, self.entries_at
        data = b"".join([os.pread(fd, min(size, end - at - 16 * i), at + 16 * i).ljust(size, b"\xff")
                         for i in lo.tolist()])
        return lo, np.frombuffer(data, dtype=_U64).reshape(lo.size, _FENCE + 2, 2)

    def lower_bounds(self, keys: np.ndarray) -> np.ndarray:
        """For each key, the index of the first entry whose key is >= it."""
        lo, w = self._windows(keys)
        return lo + (w[:, :_FENCE, 0] < keys[:, None]).sum(axis=1)

    def find(self, keys: np.ndarray, wanted: list[bytes]) -> np.ndarray:
        """Whether the piece holds each id ``wanted[j]`` (UTF-8) of key ``keys[j]``: the full ids
        are compared, every id of an equal key in turn."""
        lo, w = self._windows(keys)
        pos = (w[:, :_FENCE, 0] < keys[:, None]).sum(axis=1)
        rows = np.arange(keys.size)
        out = np.zeros(keys.size, dtype=bool)
        hit = np.flatnonzero((lo + pos < self.count) & (w[rows, pos, 0] == keys))
        for j, i, start, end in zip(hit.tolist(), (lo + pos)[hit].tolist(), w[hit, pos[hit], 1].tolist(),
                                    w[hit, pos[hit] + 1, 1].tolist()):
            out[j] = self._holds_from(i, start, end, wanted[j])
        return out

    def _holds_from(self, i: int, start: int, end: int, wanted: bytes) -> bool:
        """Whether entry ``i`` (id at ``blob[start:end]``), or a later one of the same key, is ``wanted``."""
        if end - start == len(wanted) and self._read(self.blob_at + start, end - start) == wanted:
            return True
        e = self.entries(i, min(i + _FENCE, self.count) + 1)  # another id of the same key (rare)
        for k in range(1, len(e) - 1):
            if e[k, 0] != e[0, 0]:
                return False
            start, end = int(e[k, 1]), int(e[k + 1, 1])
            if end - start == len(wanted) and self._read(self.blob_at + start, end - start) == wanted:
                return True
        return i + len(e) - 1 < self.count and self._holds_from(i + len(e) - 2, int(e[-2, 1]), int(e[-1, 1]), wanted)

    def read_run(self, i: int, j: int) -> tuple[np.ndarray, np.ndarray, bytes]:
        """Keys, offsets (from 0) and ids of entries ``[i, j)``."""
        e = self.entries(i, j + 1)
        start, end = int(e[0, 1]), int(e[-1, 1])
        return e[:-1, 0].copy(), e[:, 1] - np.uint64(start), self._read(self.blob_at + start, end - start)


# --- building pieces ---------------------------------------------------------------------------------


def _gather(blob: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, bytes]:
    """Concatenate ``blob[starts[k] : starts[k] + lengths[k]]`` for every k: (offsets, bytes).

    One index array of the output's length (int32 where it fits), built as a running sum of steps:
    1 inside an id, a jump at the start of each id.
    """
    offsets = np.zeros(lengths.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    total = int(offsets[-1])
    if not total:
        return offsets, b""
    full = lengths > 0
    src, size = starts[full], lengths[full]
    step = np.ones(total, dtype=np.int32 if blob.size < 1 << 31 else np.int64)
    previous_end = np.concatenate(([0], src[:-1] + size[:-1]))
    step[offsets[:-1][full]] = src - previous_end + 1
    np.cumsum(step, out=step)
    step -= 1
    return offsets, blob[step].tobytes()


def _merge_runs(runs: list[tuple[np.ndarray, np.ndarray, bytes]]) -> tuple[np.ndarray, np.ndarray, bytes]:
    """One sorted run (keys, offsets, blob) of several disjoint sorted runs."""
    runs = [r for r in runs if r[0].size]
    if len(runs) == 1:
        return runs[0]
    if not runs:
        return np.zeros(0, _U64), np.zeros(1, np.int64), b""
    keys = np.concatenate([r[0] for r in runs])
    blob = np.frombuffer(b"".join(r[2] for r in runs), dtype=np.uint8)
    shift = np.cumsum([0] + [len(r[2]) for r in runs[:-1]])
    starts = np.concatenate([r[1][:-1].astype(np.int64) + s for r, s in zip(runs, shift)])
    lengths = np.concatenate([np.diff(r[1].astype(np.int64)) for r in runs])
    order = _sorted_order(keys, lambda i: blob[starts[i]:starts[i] + lengths[i]].tobytes())
    offsets, merged = _gather(blob, starts[order], lengths[order])
    return keys[order], offsets, merged


def _write_piece(directory: Path, block_counts: np.ndarray,
                 blocks: Iterator[tuple[np.ndarray, np.ndarray, bytes]]) -> tuple[str, int, bool]:
    writer = _PieceWriter(directory, block_counts)
    try:
        for block in blocks:
            writer.add_block(*block)
        return writer.finish()
    except BaseException:
        writer.abort()
        raise


def _spill_blocks(encoded: list[bytes], keys: np.ndarray) -> tuple[np.ndarray, Iterator[Any]]:
    """Block counts and blocks of a piece of the ids ``encoded`` (UTF-8, with their ``keys``)."""
    order = _sorted_order(keys, encoded.__getitem__)
    keys = keys[order]
    bits = _bits_for(len(encoded))
    cuts = np.searchsorted(keys, _block_bounds(bits)[1:], "left") if bits else np.zeros(0, np.int64)
    edges = np.concatenate(([0], cuts, [len(encoded)])).astype(np.int64)
    order_list = order.tolist()

    def blocks() -> Iterator[tuple[np.ndarray, np.ndarray, bytes]]:
        for a, b in itertools.pairwise(edges.tolist()):
            part = [encoded[i] for i in order_list[a:b]]
            offsets = np.zeros(b - a + 1, dtype=np.int64)
            np.cumsum(np.fromiter(map(len, part), dtype=np.int64, count=b - a), out=offsets[1:])
            yield keys[a:b], offsets, b"".join(part)

    return np.diff(edges), blocks()


# --- the index ---------------------------------------------------------------------------------------


def manifest_digests(manifest: Mapping[str, Any]) -> list[str]:
    """The piece digests a manifest names, in order (:class:`DedupManifestInvalid` if it is not a
    format-:data:`MANIFEST_FORMAT` manifest)."""
    return [p["sha256"] for p in _check_manifest(manifest)]


def _check_manifest(manifest: Any) -> list[dict[str, Any]]:
    if not isinstance(manifest, Mapping):
        raise DedupManifestInvalid(f"a manifest is a map, not {type(manifest).__name__}")
    if manifest.get("format") != MANIFEST_FORMAT:
        raise DedupManifestInvalid(f"format {manifest.get('format')!r}, this version reads {MANIFEST_FORMAT}")
    pieces = manifest.get("pieces")
    if not isinstance(pieces, list):
        raise DedupManifestInvalid("'pieces' must be a list")
    out, seen = [], set()
    for p in pieces:
        if not isinstance(p, Mapping) or set(p) != {"sha256", "count", "bytes"}:
            raise DedupManifestInvalid(f"a piece entry must have sha256, count, bytes: {p!r}")
        digest, count, size = p["sha256"], p["count"], p["bytes"]
        if type(digest) is not str or not _PIECE_NAME.match(f"{digest}.piece"):
            raise DedupManifestInvalid(f"not a SHA-256 hex digest: {digest!r}")
        if type(count) is not int or count < 1 or type(size) is not int or size < _HEADER.size:
            raise DedupManifestInvalid(f"bad count or size in {p!r}")
        if digest in seen:
            raise DedupManifestInvalid(f"piece {digest} listed twice")
        seen.add(digest)
        out.append({"sha256": digest, "count": count, "bytes": size})
    if manifest.get("count") != sum(p["count"] for p in out):
        raise DedupManifestInvalid("'count' is not the sum of the pieces' counts")
    return out


def _lock(directory: Path) -> int:
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise DedupIndexBusy(str(directory)) from None
    return fd


def _tier(count: int) -> int:
    t = 0
    while count >= _TIER_BASE * TIER_FANOUT ** (t + 1):
        t += 1
    return t


class DedupIndex:
    """An exact set of event ids, in bounded memory, persisted as immutable pieces (module doc).

    Not thread-safe. One open index per folder (:class:`~chainfold.errors.DedupIndexBusy`).
    Use :meth:`open`; close with :meth:`close` (or ``with``).
    """

    def __init__(self, directory: Path, lock_fd: int, pieces: list[_Piece], memory_bytes: int) -> None:
        self.directory = directory
        self.memory_bytes = memory_bytes
        self._lock_fd = lock_fd
        self._pieces = pieces
        self._mem: set[str] = set()
        self._mem_bytes = 0
        self._handed_out = {p.digest for p in pieces}  # in a manifest given out: never deleted here
        self._created: set[str] = set()  # written by this index, new in the folder

    @classmethod
    def open(cls, directory: str | os.PathLike[str], manifest: Mapping[str, Any] | None = None, *,
             memory_bytes: int = DEFAULT_MEMORY_BYTES, verify: bool = True) -> DedupIndex:
        """The set ``manifest`` describes (empty when ``None``), in ``directory`` (created if needed).

        Cost O(pieces) Python work, plus reading each piece's filters (~1.2 bytes per id) and, with
        ``verify`` (the default), hashing its bytes. Raises :class:`DedupManifestInvalid` for a
        manifest this version did not write, :class:`DedupPieceDamaged` for a missing, truncated or
        altered piece, :class:`DedupIndexBusy` when another open index holds the folder.
        ``memory_bytes`` bounds the in-memory part (see :meth:`add_new`).
        """
        if type(memory_bytes) is not int or memory_bytes < 0:
            raise ValueError(f"memory_bytes must be an int >= 0, not {memory_bytes!r}")
        entries = _check_manifest(manifest) if manifest is not None else []
        path = Path(directory)
        fd = _lock(path)
        pieces: list[_Piece] = []
        try:
            for e in entries:
                pieces.append(_Piece(path, e["sha256"], count=e["count"], size=e["bytes"], verify=verify))
        except BaseException:
            for p in pieces:
                p.close()
            os.close(fd)
            raise
        return cls(path, fd, pieces, memory_bytes)

    def __enter__(self) -> DedupIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the folder. Ids added since the last checkpoint are dropped (pieces spilled since
        stay on disk until collected)."""
        for p in self._pieces:
            p.close()
        self._pieces = []
        self._mem = set()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    # --- the set ---------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._mem) + sum(p.count for p in self._pieces)

    def __contains__(self, event_id: object) -> bool:
        if type(event_id) is not str:
            return False
        return event_id in self._mem or bool(self._in_pieces([event_id])[0])

    def add_new(self, ids: Sequence[str]) -> list[bool]:
        """Record ``ids`` in order; for each, True if it was not in the set (it is now), False if it
        was, or if it occurs earlier in ``ids``. Exact: same answers as a Python ``set``.

        When the in-memory part then exceeds ``memory_bytes`` (estimated: id length + 96 bytes each),
        it is spilled to a new piece (so the bound is exceeded by at most one batch). ``TypeError``
        for an id that is not a ``str``.
        """
        mem = self._mem
        out = [s not in mem for s in ids]
        fresh = list(itertools.compress(ids, out))
        if not fresh:
            return out
        distinct = set(fresh)
        if self._pieces:
            candidates = list(distinct)
            found = self._in_pieces(candidates)
            known = set(itertools.compress(candidates, found.tolist())) if found.any() else None
        else:
            known = None
            if set(map(type, distinct)) != {str}:
                bad = next(s for s in distinct if type(s) is not str)
                raise TypeError(f"event ids are text, not {type(bad).__name__}: {bad!r}")
        if len(distinct) != len(fresh):  # an id twice in the batch: one by one
            out = []
            append, add = out.append, mem.add
            for s in ids:
                if s in mem or (known and s in known):
                    append(False)
                else:
                    add(s)
                    append(True)
        elif known:  # duplicates of spilled ids
            out = [f and s not in known for f, s in zip(out, ids)]
            distinct -= known
            mem.update(distinct)
        else:
            mem.update(fresh)
        if known:
            distinct -= known
        self._mem_bytes += sum(map(len, distinct)) + _ID_OVERHEAD * len(distinct)
        if self._mem_bytes > self.memory_bytes:
            self._spill()
        return out

    def _in_pieces(self, ids: list[str]) -> np.ndarray:
        """Whether each of ``ids`` (distinct, none in memory) is in a piece."""
        keys = id_keys(ids)
        found = np.zeros(len(ids), dtype=bool)
        mixed: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for piece in self._pieces:
            hits = np.flatnonzero(piece.maybe(keys, mixed) & ~found)
            if hits.size:
                found[hits] = piece.find(keys[hits], [_utf8(ids[i]) for i in hits.tolist()])
        return found

    # --- spills, checkpoints, compaction -----------------------------------------------------------

    def _spill(self) -> None:
        if not self._mem:
            return
        try:
            encoded = [s.encode() for s in self._mem]
        except UnicodeEncodeError:
            encoded = [_utf8(s) for s in self._mem]
        keys = np.fromiter(map(_key_of, encoded), dtype=np.uint64, count=len(encoded))
        counts, blocks = _spill_blocks(encoded, keys)
        self._add_piece(_write_piece(self.directory, counts, blocks))
        self._mem = set()  # only now: until the piece is durable, the ids are in memory
        self._mem_bytes = 0
        self._compact()

    def _add_piece(self, written: tuple[str, int, bool]) -> None:
        digest, size, existed = written
        self._pieces.append(_Piece(self.directory, digest, size=size, verify=False))
        if not existed:
            self._created.add(digest)

    def checkpoint(self) -> dict[str, Any]:
        """Make every id added so far durable and return the manifest of the whole set (module doc).

        Writes what is in memory as one new piece (O(ids added since the last checkpoint); a merge
        of pieces may follow, amortised O(log) rewrites per id). The manifest references the
        pieces by SHA-256; they are never deleted while a manifest passed to
        :meth:`collect_garbage` names them.
        """
        self._spill()
        self._handed_out.update(p.digest for p in self._pieces)
        pieces = [{"sha256": p.digest, "count": p.count, "bytes": p.size} for p in self._pieces]
        return {"format": MANIFEST_FORMAT, "count": sum(p["count"] for p in pieces), "pieces": pieces}

    def _compact(self) -> None:
        """Merge :data:`TIER_FANOUT` pieces of one size tier into one, while any tier has that many."""
        while True:
            tiers: dict[int, list[_Piece]] = {}
            for p in self._pieces:
                tiers.setdefault(_tier(p.count), []).append(p)
            full = [ps for t, ps in sorted(tiers.items()) if len(ps) >= TIER_FANOUT]
            if not full:
                return
            self._merge(full[0][:TIER_FANOUT])

    def _merge(self, pieces: Sequence[_Piece]) -> None:
        """Replace ``pieces`` (live pieces of this index) by one piece of their union. Reads and
        writes block by block: memory bounded by one block of each (~64k ids), not the pieces."""
        total = sum(p.count for p in pieces)
        bits = _bits_for(total)
        bounds = _block_bounds(bits)
        cuts = [[0, *p.lower_bounds(bounds[1:]).tolist(), p.count] for p in pieces]
        counts = np.array([sum(c[b + 1] - c[b] for c in cuts) for b in range(1 << bits)], dtype=np.int64)

        def blocks() -> Iterator[tuple[np.ndarray, np.ndarray, bytes]]:
            for b in range(1 << bits):
                yield _merge_runs([p.read_run(c[b], c[b + 1]) for p, c in zip(pieces, cuts)])

        written = _write_piece(self.directory, counts, blocks())
        gone = {p.digest for p in pieces}
        self._pieces = [p for p in self._pieces if p.digest not in gone]
        for p in pieces:
            p.close()
            if p.digest in self._created and p.digest not in self._handed_out:
                (self.directory / f"{p.digest}.piece").unlink(missing_ok=True)
                self._created.discard(p.digest)
        self._add_piece(written)

    def collect_garbage(self, keep: Iterable[Mapping[str, Any]]) -> list[str]:
        """Delete the pieces in the folder that neither a manifest in ``keep`` nor this index uses,
        and temp files (left by a writer that died: only the index holding the folder's lock writes). Returns the names deleted. Every manifest is checked
        first (:class:`DedupManifestInvalid`): nothing is deleted on a bad one."""
        return _collect(self.directory, keep, {p.digest for p in self._pieces})

    @property
    def stats(self) -> dict[str, int]:
        """Sizes: ids in memory and in pieces, pieces, bytes of filters in memory, bytes on disk."""
        return {
            "memory_ids": len(self._mem),
            "memory_bytes": self._mem_bytes,
            "piece_ids": sum(p.count for p in self._pieces),
            "pieces": len(self._pieces),
            "filter_bytes": sum(p.memory_bytes for p in self._pieces),
            "disk_bytes": sum(p.size for p in self._pieces),
        }


def _collect(directory: Path, keep: Iterable[Mapping[str, Any]], live: set[str]) -> list[str]:
    used = set(live)
    for manifest in list(keep):
        used.update(manifest_digests(manifest))
    removed = []
    for path in sorted(directory.iterdir()):
        m = _PIECE_NAME.match(path.name)
        t = _TEMP_NAME.match(path.name)
        if (m and m.group(1) not in used) or t:  # a temp file: its writer died (the folder is locked)
            path.unlink(missing_ok=True)
            removed.append(path.name)
    if removed:
        fsync_dir(directory)
    return removed


def collect_garbage(directory: str | os.PathLike[str], keep: Iterable[Mapping[str, Any]]) -> list[str]:
    """:meth:`DedupIndex.collect_garbage` for a folder no index has open (it is locked meanwhile:
    :class:`DedupIndexBusy` if one has)."""
    path = Path(directory)
    if not path.is_dir():
        return []
    fd = _lock(path)
    try:
        return _collect(path, keep, set())
    finally:
        os.close(fd)

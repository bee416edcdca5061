"""The immutable pieces a :class:`~chainfold.replay.dedup.DedupIndex` is stored as, and the filter in
front of them.

A **piece** is a file named by the SHA-256 of its bytes, holding a set of event ids sorted by a
64-bit key (xxh3 of the UTF-8 id), the full ids beside the keys, and binary fuse filters
(``pyfusefilter``, 8-bit fingerprints, ~1.2 bytes per id, false positive rate 1/256) that are kept
in memory while the piece is open. Lookups read the rest with ``pread`` (never mapped: what they
read never counts in the process's memory) and always compare the *full id*, so a collision of
keys never makes a new id a duplicate.

:class:`KeyFilter` is the one filter an index asks first about every key of a batch, whatever the
number of pieces: a Bloom filter over the keys of all of them, in memory only (rebuilt from the
pieces' keys when an index opens, ~1.5-1.9 bytes per id), one 64-bit word read per key. Only the few
keys it lets through are asked of each piece's fuse filter (one C call per key and piece), and only
the keys a fuse filter lets through cost a read of the piece.

Piece file (little-endian)::

    header  64 bytes: b"CFDDUP\\x00\\x02", count, bits, array_length, segment_length,
            segment_length_mask, segment_count_length, blob_length (u64/u32, see _HEADER)
    seeds   2**bits u64      fuse filter seed of each block
    starts  2**bits + 1 u64  index of each block's first key (blocks split the key space by its top bits)
    fences  ceil(count / 128) u64: every 128th key
    entries count pairs (key, ref) u64, sorted by key (ties by the id's bytes); the id of an entry
            is blob[ref >> 24 : (ref >> 24) + (ref & 0xFFFFFF)] (ids up to 16 MiB - 1 bytes)
    filters 2**bits * array_length bytes: one binary fuse 8 filter per block, same geometry
    blob    the ids, UTF-8 (surrogates passed through), in the order they were written

The ids stay where they were first written: a spill writes them as they came, a merge copies the
pieces' blobs one after another and merges only their entries (16 bytes per id).

Pieces are written crash-safely (a hidden temp file, fsync, rename to ``<sha256>.piece``, fsync of
the folder) and never changed.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import os
import re
import secrets
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xxhash
from pyfusefilter.pyfusefilter import ffi as _ffi, lib as _fuse

from ..errors import DedupPieceDamaged
from ..store.atomic import fsync_dir

__all__ = ["KeyFilter", "MAX_ID_BYTES", "Overlap", "Piece", "PIECE_NAME", "TEMP_NAME", "id_keys", "write_merge",
           "write_spill"]

_BLOCK_KEYS = 1 << 15  # target ids per filter block: bounds the memory a merge or a filter build needs
_FENCE = 128  # one key in memory per 128 (1/16 byte per id): a lookup searches 128 entries (2 KiB)
_READ_CHUNK = 1 << 20

_MAGIC = b"CFDDUP\x00\x02"
_HEADER = struct.Struct("<8sQIIIIIIQ16x")  # magic, count, bits, array_length, segment_length, mask,
assert _HEADER.size == 64  # segment_count_length, reserved, blob_length, padding
PIECE_NAME = re.compile(r"^([0-9a-f]{64})\.piece$")
TEMP_NAME = re.compile(r"^\.piece-(\d{1,10})-[0-9a-f]{16}\.tmp$")

_U64 = np.dtype("<u8")
_M1 = np.uint64(0xFF51AFD7ED558CCD)
_M2 = np.uint64(0xC4CEB9FE1A85EC53)
_LOW32 = np.uint64(0xFFFFFFFF)
_S18, _S32, _S33 = np.uint64(18), np.uint64(32), np.uint64(33)
_LEN_BITS = 24
MAX_ID_BYTES = (1 << _LEN_BITS) - 1
"""The longest id a piece holds, in UTF-8 bytes."""
_S24 = np.uint64(_LEN_BITS)


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


def _sorted_order(keys: np.ndarray, id_bytes: Any, kind: str = "stable") -> np.ndarray:
    """Indices that sort by key, ties (distinct ids of one key) by the ids' bytes (``id_bytes(i)``).
    ``kind="stable"`` (timsort) is fastest on a few sorted runs, ``"quicksort"`` on random keys:
    either way the order is the same (ids are distinct)."""
    order = np.argsort(keys, kind=kind)
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
        filters = entries + 16 * self.count
        blob = filters + self.blocks * self.array_length
        return seeds, starts, fences, entries, filters, blob, blob + self.blob_length


def _bits_for(count: int) -> int:
    """Top key bits that split ``count`` ids into blocks of about :data:`_BLOCK_KEYS` at most."""
    return max(0, (max(count, 1) - 1).bit_length() - _BLOCK_KEYS.bit_length() + 1)


def _block_bounds(bits: int) -> np.ndarray:
    """The first key of every block (uint64): block b holds the keys in ``[bounds[b], bounds[b+1])``."""
    b = np.arange(1 << bits, dtype=np.uint64)
    return b << np.uint64(64 - bits) if bits else b


def refs(offsets: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Entry refs of ids at ``offsets`` in the blob, of ``lengths`` bytes."""
    return (offsets.astype(np.uint64) << _S24) | lengths.astype(np.uint64)


class _PieceWriter:
    """Writes one piece, crash-safely, and names it by its SHA-256: the blob (:meth:`write_blob`, in
    any pieces) and the entries block by block (:meth:`add_block`), then :meth:`finish`."""

    def __init__(self, directory: Path, block_counts: np.ndarray, blob_length: int) -> None:
        self.directory = directory
        self.bits = int(block_counts.size).bit_length() - 1
        self.count = int(block_counts.sum())
        self.geometry = _Geometry.for_size(int(block_counts.max()))
        self.blob_length = blob_length
        lay = _Layout(self.count, self.bits, self.geometry.array_length, blob_length)
        _, _, _, self.entries_at, self.filters_at, self.blob_at, _ = lay.sections()
        self.array_length = lay.array_length
        self.starts = np.concatenate(([0], np.cumsum(block_counts))).astype(_U64)
        self.seeds = np.zeros(block_counts.size, dtype=_U64)
        self.block = 0
        self.fences: list[np.ndarray] = []
        self.tmp = directory / f".piece-{os.getpid()}-{secrets.token_hex(8)}.tmp"
        self.fd = os.open(self.tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)

    def write_blob(self, data: bytes | memoryview, at: int) -> None:
        """Bytes of the blob, at offset ``at`` in it."""
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, self.blob_at + at)
            view, at = view[n:], at + n

    def add_block(self, keys: np.ndarray, entry_refs: np.ndarray) -> None:
        """The next block's keys (sorted) and the refs of their ids in the blob."""
        b = self.block
        start = int(self.starts[b])
        if keys.size != int(self.starts[b + 1]) - start:
            raise AssertionError("block size differs from the announced one")
        seed, fingerprints = _build_filter(keys, self.geometry)
        self.seeds[b] = seed
        entries = np.empty((keys.size, 2), dtype=_U64)
        entries[:, 0] = keys
        entries[:, 1] = entry_refs
        os.pwrite(self.fd, entries.tobytes(), self.entries_at + 16 * start)
        os.pwrite(self.fd, fingerprints, self.filters_at + b * self.array_length)
        self.fences.append(keys[-start % _FENCE::_FENCE].copy())  # not a view: it would keep the block alive
        self.block += 1

    def finish(self) -> tuple[str, int, bool]:
        """Header and tables written, fsynced, renamed: ``(digest, size, whether that piece existed)``."""
        if self.block != self.seeds.size:
            raise AssertionError("piece finished before its last block")
        g = self.geometry
        head = _HEADER.pack(_MAGIC, self.count, self.bits, g.array_length, g.segment_length,
                            g.segment_length_mask, g.segment_count_length, 0, self.blob_length)
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


class Piece:
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
            raise self._damaged("not a dedup piece of this version (bad magic)")
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
        self.count, self.size, self.bits, self.blob_length = n, actual, bits, blen
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
        self._geometry = (slen, smask, sclen)
        self._filters_c: Any = None  # the C view of the filters, made on the first single-key probe
        self._structs: dict[int, Any] = {}

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

    def maybe_one(self, key: int) -> bool:
        """The filter's answer for one key, in C (``binary_fuse8_contain``): for the few keys the
        :class:`KeyFilter` lets through, cheaper than :meth:`maybe`'s numpy calls."""
        block = key >> (64 - self.bits) if self.bits else 0
        f = self._structs.get(block)
        if f is None:
            f = self._struct(block)
        return bool(_fuse.binary_fuse8_contain(key, f))

    def _struct(self, block: int) -> Any:
        if self._filters_c is None:
            self._filters_c = _ffi.from_buffer("uint8_t[]", self.filters)
        slen, smask, sclen = self._geometry
        f = self._structs[block] = _ffi.new("binary_fuse8_t *")
        f.Seed = int(self.seeds[block])
        f.SegmentLength, f.SegmentLengthMask, f.SegmentCountLength = slen, smask, sclen
        f.ArrayLength = self.array_length
        f.Fingerprints = self._filters_c + block * self.array_length
        return f

    def entries(self, i: int, j: int) -> np.ndarray:
        """Entries ``[i, j)`` as a (j - i, 2) array of (key, ref of the id in the blob)."""
        return np.frombuffer(self._read(self.entries_at + 16 * i, 16 * (j - i)), dtype=_U64).reshape(-1, 2)

    def id_bytes(self, ref: int) -> bytes:
        """The UTF-8 bytes of the id at ``ref`` (one read)."""
        length = ref & MAX_ID_BYTES
        return self._read(self.blob_at + (ref >> _LEN_BITS), length) if length else b""

    def _windows(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For each key, the stretch of entries where its lower bound lies: ``(first index, (len,
        _FENCE + 1, 2) array)`` (the fences, in memory, say which stretch; one ``pread`` each; rows
        past the end read as 2**64 - 1)."""
        lo = np.maximum(np.searchsorted(self.fences, keys, "left").astype(np.int64) - 1, 0) * _FENCE
        size, end = 16 * (_FENCE + 1), self.entries_at + 16 * self.count
        fd, at = self.fd, self.entries_at
        data = b"".join([os.pread(fd, min(size, end - at - 16 * i), at + 16 * i).ljust(size, b"\xff")
                         for i in lo.tolist()])
        return lo, np.frombuffer(data, dtype=_U64).reshape(lo.size, _FENCE + 1, 2)

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
        for j, i in zip(hit.tolist(), (lo + pos)[hit].tolist()):
            out[j] = self._holds_from(i, int(keys[j]), wanted[j])
        return out

    def _holds_from(self, i: int, key: int, wanted: bytes) -> bool:
        """Whether entry ``i`` or a later one of the same ``key`` is the id ``wanted``."""
        while i < self.count:
            e = self.entries(i, min(i + _FENCE, self.count))
            for k, ref in e.tolist():
                if k != key:
                    return False
                if ref & MAX_ID_BYTES == len(wanted) and self.id_bytes(ref) == wanted:
                    return True
            i += len(e)
        return False

    def read_run(self, i: int, j: int) -> tuple[np.ndarray, np.ndarray]:
        """Keys and refs of entries ``[i, j)``."""
        e = self.entries(i, j)
        return e[:, 0].copy(), e[:, 1].copy()

    def keys(self, chunk: int = 1 << 16) -> Iterator[np.ndarray]:
        """Every key, in order, ``chunk`` at a time (one read each)."""
        for i in range(0, self.count, chunk):
            yield self.entries(i, min(i + chunk, self.count))[:, 0].copy()

    def ids(self) -> Iterator[str]:
        """Every id, in the order written (one read of the blob and of the entries)."""
        refs = np.sort(self.entries(0, self.count)[:, 1]).tolist()
        blob = self._read(self.blob_at, self.blob_length)
        for ref in refs:
            at = ref >> _LEN_BITS
            yield blob[at: at + (ref & MAX_ID_BYTES)].decode("utf-8", "surrogatepass")

    def copy_blob(self, writer: _PieceWriter, at: int) -> None:
        """Copy this piece's blob into ``writer``'s at offset ``at``, a chunk at a time."""
        for pos in range(0, self.blob_length, _READ_CHUNK):
            writer.write_blob(self._read(self.blob_at + pos, min(_READ_CHUNK, self.blob_length - pos)), at + pos)


# --- the filter in front of every piece ---------------------------------------------------------------


@functools.cache
def _bit_masks() -> np.ndarray:
    """65536 words of 4 distinct bits each (deterministic): the bits a key sets in its word."""
    bits = (_splitmix(np.arange(1 << 19, dtype=np.uint64)) >> np.uint64(58)).reshape(-1, 4)
    ordered = np.sort(bits, axis=1)
    distinct = (ordered[:, 1:] != ordered[:, :-1]).all(axis=1)
    masks = np.bitwise_or.reduce(np.uint64(1) << bits[distinct], axis=1)
    return masks[: 1 << 16].copy()


class KeyFilter:
    """A Bloom filter over 64-bit keys, one 64-bit word per key (the word chosen by the key's top
    32 bits, 4 bits in it by its low 16): no false negatives; a false positive rate of ~1% at
    :data:`BITS` bits per key (its ``capacity``), ~0.2% at half of it. Memory: ``capacity * BITS / 8``
    bytes. In memory only; :meth:`add` and :meth:`maybe` take numpy arrays of keys."""

    BITS = 12

    def __init__(self, capacity: int) -> None:
        self.capacity = max(int(capacity), 1 << 16)
        self.words = np.zeros(-(-self.capacity * self.BITS // 64), dtype=np.uint64)
        self._n = np.uint64(self.words.size)
        self._masks = _bit_masks()

    def _where(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with np.errstate(over="ignore"):
            return ((keys >> _S32) * self._n) >> _S32, self._masks[keys & np.uint64(0xFFFF)]

    def add(self, keys: np.ndarray) -> None:
        """Add ``keys``; fastest sorted (as a piece holds them): one OR per word touched."""
        if not keys.size:
            return
        idx, mask = self._where(keys)
        if (idx[1:] >= idx[:-1]).all():
            first = np.flatnonzero(np.concatenate(([True], idx[1:] != idx[:-1])))
            self.words[idx[first]] |= np.bitwise_or.reduceat(mask, first)
        else:
            np.bitwise_or.at(self.words, idx, mask)

    def maybe(self, keys: np.ndarray) -> np.ndarray:
        """Per key: False when it was surely never added."""
        idx, mask = self._where(keys)
        return (self.words[idx] & mask) == mask

    @property
    def memory_bytes(self) -> int:
        return self.words.nbytes


# --- building pieces ---------------------------------------------------------------------------------


def _cut(keys: np.ndarray) -> np.ndarray:
    """Block edges (indices) of sorted ``keys``: blocks split the key space by its top bits."""
    n = keys.size
    bits = _bits_for(n)
    cuts = np.searchsorted(keys, _block_bounds(bits)[1:], "left") if bits else np.zeros(0, np.int64)
    return np.concatenate(([0], cuts, [n])).astype(np.int64)


def write_spill(directory: Path, blob: bytes, offsets: np.ndarray, keys: np.ndarray) -> tuple[str, int, bool]:
    """Write a piece of the ids in ``blob`` (UTF-8, one after another from ``offsets[k]`` to
    ``offsets[k + 1]``, with their ``keys``): ``(digest, size, whether it existed)``. The blob is
    written as it is; only the entries are sorted (by key, ties by the ids' bytes)."""
    lengths = np.diff(offsets)
    if lengths.size and int(lengths.max()) > MAX_ID_BYTES:
        raise ValueError(f"an event id longer than {MAX_ID_BYTES} bytes cannot be indexed")
    view = memoryview(blob)
    order = _sorted_order(keys, lambda i: bytes(view[offsets[i]:offsets[i + 1]]), "quicksort")
    keys, entry_refs = keys[order], refs(offsets[:-1], lengths)[order]
    edges = _cut(keys)
    writer = _PieceWriter(directory, np.diff(edges), len(blob))
    try:
        writer.write_blob(blob, 0)
        for a, b in itertools.pairwise(edges.tolist()):
            writer.add_block(keys[a:b], entry_refs[a:b])
        return writer.finish()
    except BaseException:
        writer.abort()
        raise


class Overlap(Exception):
    """Two of the pieces given to :func:`write_merge` (``unique=True``) hold the same id."""


def write_merge(directory: Path, pieces: Sequence[Piece], *, unique: bool = False) -> tuple[str, int, bool]:
    """Write one piece holding the union of ``pieces`` (disjoint sets, in any folders): their blobs
    copied one after another, their entries merged block by block (memory: one block of each).
    With ``unique``, :class:`Overlap` (and nothing written) when an id is in two of them."""
    total = sum(p.count for p in pieces)
    bounds = _block_bounds(_bits_for(total))
    cuts = [[0, *p.lower_bounds(bounds[1:]).tolist(), p.count] for p in pieces]
    counts = np.array([sum(c[b + 1] - c[b] for c in cuts) for b in range(bounds.size)], dtype=np.int64)
    shifts = np.cumsum([0] + [p.blob_length for p in pieces]).tolist()
    writer = _PieceWriter(directory, counts, shifts[-1])
    try:
        for p, at in zip(pieces, shifts):
            p.copy_blob(writer, at)
        for b in range(bounds.size):
            runs = [(p, *p.read_run(c[b], c[b + 1])) for p, c in zip(pieces, cuts)]
            writer.add_block(*_merge_runs(runs, shifts, unique))
        return writer.finish()
    except BaseException:
        writer.abort()
        raise


def _merge_runs(runs: list[tuple[Piece, np.ndarray, np.ndarray]], shifts: list[int],
                unique: bool) -> tuple[np.ndarray, np.ndarray]:
    """Keys and refs (into the merged blob) of one block, from each piece's run of it."""
    keys = np.concatenate([k for _, k, _ in runs])
    origin = np.repeat(np.arange(len(runs)), [k.size for _, k, _ in runs])
    moved = np.concatenate([r + (np.uint64(s) << _S24) for (_, _, r), s in zip(runs, shifts)])
    source = np.concatenate([r for _, _, r in runs])

    def id_bytes(i: int) -> bytes:
        return runs[int(origin[i])][0].id_bytes(int(source[i]))

    order = _sorted_order(keys, id_bytes)
    keys, moved = keys[order], moved[order]
    if unique:
        for i in np.flatnonzero(keys[1:] == keys[:-1]).tolist():  # equal ids sit side by side
            a, b = id_bytes(int(order[i])), id_bytes(int(order[i + 1]))
            if a == b:
                raise Overlap(a.decode("utf-8", "surrogatepass"))
    return keys, moved

"""Exact deduplication by event id in bounded memory, stored as immutable pieces for snapshots.

:class:`DedupIndex` is an exact set of event ids (arbitrary text). It keeps the ids added since its
last spill in memory (a ``set``, up to ``memory_bytes``); past that it *spills* them to disk as one
immutable **piece** (:mod:`chainfold.replay.pieces`): a file in the index's folder named by the
SHA-256 of its bytes, the ids sorted by a 64-bit key beside their full text. While nothing is on
disk, the index is a plain set. Once something is, each batch's keys are asked of one
:class:`~chainfold.replay.pieces.KeyFilter` over every piece (one numpy pass per batch, whatever
the number of pieces); the few it lets through are asked of each piece's own fuse filter, and only
those that pass read the piece and compare the *full id*: a collision of keys never makes a new id
a duplicate, and no filter ever makes one missed. Pieces of similar size are merged (tiered
compaction, fan-in :data:`TIER_FANOUT`), so their number grows with the log of the ids.

Snapshots: :meth:`DedupIndex.checkpoint` spills what is in memory (cost O(ids added since the last
checkpoint), plus now and then a merge of pieces) and returns a small **manifest** (JSON- and
CBOR-able)::

    {"format": 1, "count": <ids>, "pieces": [{"sha256": <hex>, "count": <ids>, "bytes": <size>}, ...]}

:meth:`DedupIndex.open` reopens a manifest: O(pieces) Python work, plus reading each piece's filters
and keys (the key filter is rebuilt from them: ~24 bytes read per id, no id becomes a Python
object) and, unless ``verify=False``, streaming its bytes through SHA-256. A missing, truncated or
altered piece raises :class:`~chainfold.errors.DedupPieceDamaged`; a set is never silently partial.
An index can also start on top of another folder's manifest (``base``): those pieces are only read,
and :meth:`~DedupIndex.checkpoint` describes the index's own pieces (what it added) only.

Pieces are never changed; only :meth:`DedupIndex.collect_garbage` (or :func:`collect_garbage`)
deletes them, and never one that a manifest it is given, or the live index, references. One live
index per folder: the folder is locked (``.lock``, ``flock``) while an index is open.

What grows with the number of ids N: the key filter (1.5-1.9 bytes per id) and the pieces' fuse
filters (~1.2 bytes per id) and fences (1/16 byte per id), all in memory; the number of pieces
(log N); the disk (~17 bytes + the id's UTF-8 length per id, plus pieces kept for older manifests
until they are collected). The in-memory buffer does not. Not thread-safe.
"""

from __future__ import annotations

import fcntl
import itertools
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DedupIndexBusy, DedupManifestInvalid, InvalidArgument
from ..store.atomic import fsync_dir
from . import pieces as _p
from .pieces import PIECE_NAME, TEMP_NAME, KeyFilter, Overlap, Piece, id_keys, write_merge, write_spill

__all__ = [
    "DEFAULT_MEMORY_BYTES",
    "MANIFEST_FORMAT",
    "TIER_FANOUT",
    "DedupIndex",
    "check_pieces",
    "collect_garbage",
    "id_keys",
    "lock_folder",
    "manifest_digests",
    "memory_cost",
]

DEFAULT_MEMORY_BYTES = 32 << 20
"""Default bound of the in-memory part (estimated bytes of the buffered ids)."""

MANIFEST_FORMAT = 1
"""Version of the manifest and piece format written and read."""

TIER_FANOUT = 4
"""Pieces of one size tier that are merged into one (tier t holds pieces of ~BASE * 4**t ids)."""

_TIER_BASE = 1 << 10
_ID_OVERHEAD = 120  # estimated bytes per buffered id beyond its length (str object, set slot, list slot, key)
_FEW = 48  # keys past the key filter, at most, asked of the pieces' filters one by one (in C)
_HEADER_SIZE = 64
_FILTER_HEADROOM = 4  # the key filter is made for the ids on disk + 1/4 more (then made anew, larger)


def memory_cost(chars: int, ids: int) -> int:
    """What ``ids`` new ids of ``chars`` characters in all add to an index's in-memory estimate
    (the quantity :attr:`DedupIndex.memory_bytes` bounds): an engine that deduplicates elsewhere
    and writes with :meth:`DedupIndex.add_fresh` cuts its pieces where :meth:`DedupIndex.add_new`
    would have spilled."""
    return chars + _ID_OVERHEAD * ids


def _not_text(ids: Iterable[object]) -> TypeError:
    bad = next(s for s in ids if not isinstance(s, str))
    return TypeError(f"event ids are text, not {type(bad).__name__}: {bad!r}")


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
        if type(digest) is not str or not PIECE_NAME.match(f"{digest}.piece"):
            raise DedupManifestInvalid(f"not a SHA-256 hex digest: {digest!r}")
        if type(count) is not int or count < 1 or type(size) is not int or size < _HEADER_SIZE:
            raise DedupManifestInvalid(f"bad count or size in {p!r}")
        if digest in seen:
            raise DedupManifestInvalid(f"piece {digest} listed twice")
        seen.add(digest)
        out.append({"sha256": digest, "count": count, "bytes": size})
    if manifest.get("count") != sum(p["count"] for p in out):
        raise DedupManifestInvalid("'count' is not the sum of the pieces' counts")
    return out


def lock_folder(directory: Path) -> int:
    """Lock ``directory`` (created if needed) for one open index: the file descriptor holding
    the lock (close it to release), or :class:`~chainfold.errors.DedupIndexBusy`."""
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


def check_pieces(directory: str | os.PathLike[str], manifest: Mapping[str, Any], *,
                 known_good: Iterable[str] = ()) -> set[str]:
    """Check that every piece ``manifest`` names is in ``directory``, whole and unaltered (its
    SHA-256), except the digests in ``known_good``; the digests checked. Raises
    :class:`~chainfold.errors.DedupManifestInvalid` or :class:`~chainfold.errors.DedupPieceDamaged`."""
    skip = set(known_good)
    done = set()
    for e in _check_manifest(manifest):
        if e["sha256"] in skip:
            continue
        Piece(Path(directory), e["sha256"], count=e["count"], size=e["bytes"], verify=True).close()
        done.add(e["sha256"])
    return done


def _open_pieces(directory: Path, manifest: Mapping[str, Any] | None, verify: bool) -> list[Piece]:
    out: list[Piece] = []
    try:
        for e in _check_manifest(manifest) if manifest is not None else []:
            out.append(Piece(directory, e["sha256"], count=e["count"], size=e["bytes"], verify=verify))
    except BaseException:
        for p in out:
            p.close()
        raise
    return out


class DedupIndex:
    """An exact set of event ids, in bounded memory, persisted as immutable pieces (module doc).

    Not thread-safe. One open index per folder (:class:`~chainfold.errors.DedupIndexBusy`).
    Use :meth:`open`; close with :meth:`close` (or ``with``).
    """

    def __init__(self, directory: Path, lock_fd: int, pieces: list[Piece], base: list[Piece],
                 memory_bytes: int) -> None:
        self.directory = directory
        self.memory_bytes = memory_bytes
        self._lock_fd = lock_fd
        self._pieces = pieces  # this folder's: merged, checkpointed, collected
        self._base = base  # another folder's, only read
        self._mem: set[str] = set()
        self._order: list[str] = []  # the ids of _mem, in the order added (spills read them in order)
        self._keys: list[np.ndarray] = []  # their keys, where known: all but the first _unkeyed
        self._unkeyed = 0
        self._mem_bytes = 0
        self._handed_out = {p.digest for p in pieces}  # in a manifest given out: never deleted here
        self._created: set[str] = set()  # written by this index, new in the folder
        self._filter: KeyFilter | None = None  # over the keys of every piece; None while there are none
        self._on_disk = 0  # ids in pieces (base and own)
        self._closed_len: int | None = None
        self.after_close: list[Callable[[], None]] = []
        """Called once the index is closed (e.g. removing the scratch folder it was in)."""
        self._refilter()

    @classmethod
    def open(cls, directory: str | os.PathLike[str], manifest: Mapping[str, Any] | None = None, *,
             memory_bytes: int = DEFAULT_MEMORY_BYTES, verify: bool = True,
             base: tuple[str | os.PathLike[str], Mapping[str, Any]] | None = None) -> DedupIndex:
        """The set ``manifest`` describes (empty when ``None``), in ``directory`` (created if needed).

        ``base`` = ``(folder, manifest)``: also every id of that manifest, read from that folder and
        never changed there (a replay that writes no snapshot, a worker of a parallel one).

        Cost O(pieces) Python work, plus reading each piece's filters and keys and, with ``verify``
        (the default), hashing its bytes. Raises :class:`DedupManifestInvalid` for a manifest this
        version did not write, :class:`DedupPieceDamaged` for a missing, truncated or altered piece,
        :class:`DedupIndexBusy` when another open index holds the folder. ``memory_bytes`` bounds
        the in-memory part (see :meth:`add_new`).
        """
        if type(memory_bytes) is not int or memory_bytes < 0:
            raise ValueError(f"memory_bytes must be an int >= 0, not {memory_bytes!r}")
        if manifest is not None:
            _check_manifest(manifest)
        path = Path(directory)
        fd = lock_folder(path)
        try:
            under = _open_pieces(Path(base[0]), base[1], verify) if base is not None else []
            try:
                own = _open_pieces(path, manifest, verify)
                return cls(path, fd, own, under, memory_bytes)
            except BaseException:
                for p in under:
                    p.close()
                raise
        except BaseException:
            os.close(fd)
            raise

    def __enter__(self) -> DedupIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the folder. Ids added since the last checkpoint are dropped (pieces spilled since
        stay on disk until collected). ``len`` stays what it was."""
        if self._closed_len is None:
            self._closed_len = len(self)
        for p in self._pieces + self._base:
            p.close()
        self._pieces, self._base, self._filter = [], [], None
        self._mem, self._order, self._keys = set(), [], []
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
        while self.after_close:
            self.after_close.pop(0)()

    @property
    def closed(self) -> bool:
        return self._closed_len is not None

    # --- the set ---------------------------------------------------------------------------------

    def __len__(self) -> int:
        if self._closed_len is not None:
            return self._closed_len
        return len(self._mem) + self._on_disk

    def __contains__(self, event_id: object) -> bool:
        if type(event_id) is not str:
            return False
        if event_id in self._mem:
            return True
        if self._filter is None:
            return False
        keys = id_keys([event_id])
        return bool(self._filter.maybe(keys)[0]) and event_id in self._in_pieces([event_id], keys, np.zeros(1, np.int64))

    def __iter__(self) -> Iterator[str]:
        """Every id: those in memory, then those of each piece (reads every piece: for tests and tools)."""
        self._check_open()
        yield from list(self._order)
        for p in self._base + self._pieces:
            yield from p.ids()

    def holds(self, ids: Sequence[str]) -> list[bool]:
        """For each of ``ids``, whether the set holds it; records nothing (unlike :meth:`add_new`).
        One key-filter pass for the batch, as :meth:`add_new` makes."""
        self._check_open()
        found: set[str] = set()
        if self._filter is not None and len(ids):
            try:
                keys = id_keys(ids)
            except TypeError:
                raise _not_text(ids) from None
            passed = np.flatnonzero(self._filter.maybe(keys))
            if passed.size:
                found = self._in_pieces(ids, keys, passed)
        mem = self._mem
        return [s in mem or s in found for s in ids]

    @property
    def key_filter(self) -> KeyFilter | None:
        """The filter over the keys of every id in a piece (None while no piece holds any): an id
        whose key it rejects is surely on disk nowhere. For engines that sift ids where they are
        (a Spark executor) before asking :meth:`holds` about the few it lets through."""
        return self._filter

    def add_new(self, ids: Sequence[str]) -> list[bool]:
        """Record ``ids`` in order; for each, True if it was not in the set (it is now), False if it
        was, or if it occurs earlier in ``ids``. Exact: same answers as a Python ``set``.

        When the in-memory part then exceeds ``memory_bytes`` (estimated: id length + 120 bytes each),
        it is spilled to a new piece (so the bound is exceeded by at most one batch). ``TypeError``
        for an id that is not a ``str``.
        """
        self._check_open()
        if self._filter is None:  # nothing on disk: a set
            try:
                length = sum(map(str.__len__, ids))
            except TypeError:
                raise _not_text(ids) from None
            return self._remember(ids, None, None, length)
        try:
            keys = id_keys(ids)
        except TypeError:
            raise _not_text(ids) from None
        passed = np.flatnonzero(self._filter.maybe(keys))
        return self._remember(ids, keys, self._in_pieces(ids, keys, passed) if passed.size else None, None)

    def _remember(self, ids: Sequence[str], keys: np.ndarray | None, known: set[str] | None,
                  length: int | None) -> list[bool]:
        """Answer the batch from memory (and ``known``: its ids found on disk), adding the new ids."""
        mem = self._mem
        before = len(mem)
        seen, add = mem.__contains__, mem.add
        # one comprehension, no call per id but the set's own (`add` returns None: `not None` is True)
        if known:
            out = [False if seen(s) or s in known else not add(s) for s in ids]
        else:
            out = [False if seen(s) else not add(s) for s in ids]
        new = len(mem) - before
        if not new:
            return out
        if new == len(ids):
            fresh, fresh_keys = ids, keys
        else:
            fresh = list(itertools.compress(ids, out))
            fresh_keys = keys[np.fromiter(out, dtype=bool, count=len(out))] if keys is not None else None
            length = None
        self._order.extend(fresh)
        if fresh_keys is None:
            self._unkeyed += new
        else:
            self._keys.append(fresh_keys)
        self._mem_bytes += memory_cost(length if length is not None else sum(map(len, fresh)), new)
        if self._mem_bytes > self.memory_bytes:
            self._spill()
        return out

    def add_fresh(self, blob: bytes, offsets: np.ndarray, keys: np.ndarray) -> None:
        """Record ids known to be new (in no piece of the index, none twice: deduplicated elsewhere,
        e.g. by a Spark shuffle) as one piece, the piece a spill of exactly those ids, added in that
        order, writes (then compacted as after a spill). ``blob``: their UTF-8 (surrogates passed
        through) one after another, id ``k`` from ``offsets[k]`` to ``offsets[k + 1]``; ``keys``:
        :func:`id_keys` of them. Nothing about newness is checked (a bulk path: no Python object
        per id). :class:`~chainfold.errors.InvalidArgument` while ids added by :meth:`add_new` are
        still in memory (a spill would write those too)."""
        self._check_open()
        if self._order:
            raise InvalidArgument(f"the dedup index in {self.directory} holds ids in memory: checkpoint first")
        if not len(keys):
            return
        self._add_piece(write_spill(self.directory, blob, offsets, keys), keys)
        self._compact()

    def _in_pieces(self, ids: Sequence[str], keys: np.ndarray, passed: np.ndarray) -> set[str]:
        """Which of ``ids[j]`` for ``j`` in ``passed`` (past the key filter) a piece holds."""
        found: set[str] = set()
        if passed.size <= _FEW:
            pairs = list(zip(passed.tolist(), keys[passed].tolist()))
            asks = [(p, [j for j, k in pairs if p.maybe_one(k)]) for p in self._base + self._pieces]
        else:
            mixed: dict[int, tuple[np.ndarray, np.ndarray]] = {}
            sub = keys[passed]
            asks = [(p, passed[p.maybe(sub, mixed)].tolist()) for p in self._base + self._pieces]
        for piece, js in asks:
            js = [j for j in js if ids[j] not in found]
            if js:
                held = piece.find(keys[js], [_p._utf8(ids[j]) for j in js])
                found.update(ids[j] for j, h in zip(js, held.tolist()) if h)
        return found

    def _check_open(self) -> None:
        if self._closed_len is not None:
            raise InvalidArgument(f"the dedup index in {self.directory} is closed")

    # --- spills, checkpoints, compaction -----------------------------------------------------------

    def _spill(self) -> None:
        if not self._order:
            return
        ids = self._order
        n = len(ids)
        text = "".join(ids)
        if text.isascii():  # the common case: one encode, lengths from the text
            blob, lengths = text.encode("ascii"), np.fromiter(map(len, ids), dtype=np.int64, count=n)
        else:
            encoded = [_p._utf8(s) for s in ids]
            blob, lengths = b"".join(encoded), np.fromiter(map(len, encoded), dtype=np.int64, count=n)
        del text
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        parts = self._keys
        if self._unkeyed:
            parts = [id_keys(ids[: self._unkeyed]), *parts]
        keys = np.concatenate(parts) if len(parts) != 1 else parts[0]
        self._add_piece(write_spill(self.directory, blob, offsets, keys), keys)
        # only now: until the piece is durable, the ids are in memory
        self._mem, self._order, self._keys, self._unkeyed, self._mem_bytes = set(), [], [], 0, 0
        self._compact()

    def _add_piece(self, written: tuple[str, int, bool], keys: np.ndarray | None, *, new_ids: bool = True) -> None:
        """Open a piece just written; ``new_ids``: its ids were not on disk before (``keys``: theirs,
        if known), so the key filter learns them."""
        digest, size, existed = written
        piece = Piece(self.directory, digest, size=size, verify=False)
        self._pieces.append(piece)
        if not existed:
            self._created.add(digest)
        if new_ids:
            self._on_disk += piece.count
            if self._filter is None or self._on_disk > self._filter.capacity:
                self._refilter()
            else:
                for chunk in [keys] if keys is not None else piece.keys():
                    self._filter.add(chunk)

    def _refilter(self) -> None:
        """The key filter made anew, for the ids on disk and a quarter more, from every piece's keys.
        (A quarter, not twice as many: the filter is most of what an index's memory grows by, ~1.9
        bytes per id right after it is made instead of 3; being made anew every 25% of growth reads
        each key ~5 times over a log's life instead of ~2.)"""
        pieces = self._base + self._pieces
        self._on_disk = sum(p.count for p in pieces)
        if not pieces:
            self._filter = None
            return
        self._filter = KeyFilter(self._on_disk + self._on_disk // _FILTER_HEADROOM)
        for p in pieces:
            for chunk in p.keys():
                self._filter.add(chunk)

    def checkpoint(self) -> dict[str, Any]:
        """Make every id added so far durable and return the manifest of the index's own pieces
        (module doc; a ``base`` is not in it).

        Writes what is in memory as one new piece (O(ids added since the last checkpoint); a merge
        of pieces may follow, amortised O(log) rewrites per id). The manifest references the
        pieces by SHA-256; they are never deleted while a manifest passed to
        :meth:`collect_garbage` names them.
        """
        self._check_open()
        self._spill()
        self._handed_out.update(p.digest for p in self._pieces)
        return _manifest(self._pieces)

    def absorb(self, sources: Iterable[tuple[str | os.PathLike[str], Mapping[str, Any]]]) -> bool:
        """Add the ids of other indexes' checkpoints (each ``(folder, manifest)``) as one new piece
        of their union, read and written block by block. They must hold none of this index's ids
        (not checked); when two of them hold the same id, nothing is added and the answer is False
        (the parallel engine then replays serially). Cost O(their ids), memory one block of each."""
        self._check_open()
        opened: list[Piece] = []
        try:
            for folder, manifest in sources:
                opened += _open_pieces(Path(folder), manifest, verify=False)
            if not opened:
                return True
            try:
                written = write_merge(self.directory, opened, unique=True)
            except Overlap:
                return False
        finally:
            for p in opened:
                p.close()
        self._add_piece(written, None)
        self._compact()
        return True

    def _compact(self) -> None:
        """Merge :data:`TIER_FANOUT` pieces of one size tier into one, while any tier has that many."""
        while True:
            tiers: dict[int, list[Piece]] = {}
            for p in self._pieces:
                tiers.setdefault(_tier(p.count), []).append(p)
            full = [ps for t, ps in sorted(tiers.items()) if len(ps) >= TIER_FANOUT]
            if not full:
                return
            self._merge(full[0][:TIER_FANOUT])

    def _merge(self, pieces: Sequence[Piece]) -> None:
        """Replace ``pieces`` (own pieces of this index) by one piece of their union."""
        written = write_merge(self.directory, pieces)
        gone = {p.digest for p in pieces}
        self._pieces = [p for p in self._pieces if p.digest not in gone]
        for p in pieces:
            p.close()
            if p.digest in self._created and p.digest not in self._handed_out:
                (self.directory / f"{p.digest}.piece").unlink(missing_ok=True)
                self._created.discard(p.digest)
        self._add_piece(written, None, new_ids=False)

    def collect_garbage(self, keep: Iterable[Mapping[str, Any]]) -> list[str]:
        """Delete the pieces in the folder that neither a manifest in ``keep`` nor this index uses,
        and temp files (left by a writer that died: only the index holding the folder's lock
        writes). Returns the names deleted. Every manifest is checked first
        (:class:`DedupManifestInvalid`): nothing is deleted on a bad one."""
        return _collect(self.directory, keep, {p.digest for p in self._pieces})

    @property
    def stats(self) -> dict[str, int]:
        """Sizes: ids in memory and in pieces, pieces, bytes of filters in memory, bytes on disk."""
        pieces = self._base + self._pieces
        return {
            "memory_ids": len(self._mem),
            "memory_bytes": self._mem_bytes,
            "piece_ids": sum(p.count for p in pieces),
            "pieces": len(pieces),
            "base_pieces": len(self._base),
            "filter_bytes": sum(p.memory_bytes for p in pieces) + (self._filter.memory_bytes if self._filter else 0),
            "disk_bytes": sum(p.size for p in self._pieces),
        }


def _manifest(pieces: Sequence[Piece]) -> dict[str, Any]:
    entries = [{"sha256": p.digest, "count": p.count, "bytes": p.size} for p in pieces]
    return {"format": MANIFEST_FORMAT, "count": sum(e["count"] for e in entries), "pieces": entries}


def _collect(directory: Path, keep: Iterable[Mapping[str, Any]], live: set[str]) -> list[str]:
    used = set(live)
    for manifest in list(keep):
        used.update(manifest_digests(manifest))
    removed = []
    for path in sorted(directory.iterdir()):
        m = PIECE_NAME.match(path.name)
        t = TEMP_NAME.match(path.name)
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
    fd = lock_folder(path)
    try:
        return _collect(path, keep, set())
    finally:
        os.close(fd)

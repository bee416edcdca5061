"""The dedup index (chainfold.replay.dedup): exactly a set, across spills, merges, checkpoints,
reopens, damage and kill -9."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from pyfusefilter.pyfusefilter import ffi, lib

from chainfold.errors import (ChainfoldError, DedupIndexBusy, DedupIndexError, DedupManifestInvalid,
                              DedupPieceDamaged)
from chainfold.replay import dedup, pieces
from chainfold.replay.dedup import DedupIndex, collect_garbage, manifest_digests

ALPHABET = "ab\x00é\ud800😀"
ids_strategy = st.text(alphabet=ALPHABET, min_size=0, max_size=4)


def _weak_key(data: bytes) -> int:
    """A key with many collisions (8 values), to prove exactness does not rest on the hash."""
    return (zlib.crc32(data) & 7) * 0x2000000000000001


@pytest.fixture(params=["xxh3", "colliding"])
def keys(request, monkeypatch):
    if request.param == "colliding":
        monkeypatch.setattr(pieces, "_key_of", _weak_key)
    return request.param


class Reference:
    def __init__(self) -> None:
        self.seen: set[str] = set()

    def add_new(self, ids: list[str]) -> list[bool]:
        out = []
        for s in ids:
            out.append(s not in self.seen)
            self.seen.add(s)
        return out


ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.lists(ids_strategy, max_size=30)),
        st.tuples(st.just("checkpoint"), st.none()),
        st.tuples(st.just("reopen"), st.none()),
        st.tuples(st.just("back"), st.none()),  # reopen an earlier manifest (a rebuild from an older snapshot)
    ),
    max_size=25,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(program=ops, memory=st.sampled_from([0, 200, 2000, dedup.DEFAULT_MEMORY_BYTES]))
def test_index_is_exactly_a_set(keys, program, memory):
    with tempfile.TemporaryDirectory() as d:
        ref = Reference()
        ix = DedupIndex.open(d, memory_bytes=memory)
        saved: list[tuple[dict, set[str]]] = [({"format": 1, "count": 0, "pieces": []}, set())]
        try:
            for op, arg in program:
                if op == "add":
                    assert ix.add_new(arg) == ref.add_new(arg)
                elif op == "checkpoint":
                    saved.append((ix.checkpoint(), set(ref.seen)))
                    ix.collect_garbage([m for m, _ in saved])
                else:
                    manifest, content = saved[-1] if op == "reopen" else saved[len(saved) // 2]
                    ix.close()
                    ix = DedupIndex.open(d, manifest, memory_bytes=memory)
                    ref.seen = set(content)
                assert len(ix) == len(ref.seen)
            for s in ref.seen:
                assert s in ix
            for s in ["zz", "a" * 5, "\ud800\ud800\ud800\ud800\ud800"]:
                assert (s in ix) == (s in ref.seen)
        finally:
            ix.close()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=st.lists(ids_strategy, max_size=200), cuts=st.lists(st.integers(0, 200), max_size=10),
       memory=st.sampled_from([0, 300, 5000]))
def test_any_batch_split_gives_the_same_answers(keys, ids, cuts, memory):
    expected = Reference().add_new(ids)
    bounds = sorted({0, len(ids), *(c for c in cuts if c <= len(ids))})
    with tempfile.TemporaryDirectory() as d, DedupIndex.open(d, memory_bytes=memory) as ix:
        got = []
        for a, b in zip(bounds, bounds[1:]):
            got += ix.add_new(ids[a:b])
        assert got == expected


def test_many_spills_and_merges_stay_exact(tmp_path, keys):
    rng = np.random.default_rng(5)
    ref = Reference()
    with DedupIndex.open(tmp_path, memory_bytes=20_000) as ix:
        for _ in range(300):
            batch = [f"id-{x}" for x in rng.integers(0, 20_000, 100).tolist()]
            assert ix.add_new(batch) == ref.add_new(batch)
        assert ix.stats["pieces"] < 3 * 8  # merged: a handful per size tier
        manifest = ix.checkpoint()
    with DedupIndex.open(tmp_path, manifest) as ix:
        assert len(ix) == len(ref.seen)
        probe = [f"id-{x}" for x in range(20_000)]
        assert ix.add_new(probe) == [s not in ref.seen for s in probe]


def test_the_key_filter_grows_with_the_ids_on_disk_and_no_faster(tmp_path, monkeypatch):
    """The key filter is the part of an index's memory that grows with the ids: made for the ids on
    disk plus a quarter, so it is never below them (no key past its capacity) and never above 1.25x
    (beyond its floor), across spills, merges and a reopen; and it still lets every stored id through."""
    monkeypatch.setattr(pieces.KeyFilter, "__init__", _small_floor_init)
    ids = [f"k-{i}" for i in range(6_000)]

    def check(ix: DedupIndex) -> None:
        f, on_disk = ix.key_filter, ix.stats["piece_ids"]
        assert f is not None and on_disk <= f.capacity <= max(64, on_disk + on_disk // 4)

    with DedupIndex.open(tmp_path, memory_bytes=3_000) as ix:
        for a in range(0, len(ids), 250):
            ix.add_new(ids[a:a + 250])
            if ix.key_filter is not None:
                check(ix)
        manifest = ix.checkpoint()
    with DedupIndex.open(tmp_path, manifest) as ix:
        check(ix)
        assert ix.key_filter.maybe(pieces.id_keys(ids)).all()
        assert ix.add_new(ids) == [False] * len(ids)


def _small_floor_init(self: pieces.KeyFilter, capacity: int) -> None:
    """KeyFilter.__init__ with a floor of 64 keys instead of 65536 (so a test's few ids pass it)."""
    self.capacity = max(int(capacity), 64)
    self.words = np.zeros(-(-self.capacity * self.BITS // 64), dtype=np.uint64)
    self._n = np.uint64(self.words.size)
    self._masks = pieces._bit_masks()


def test_long_and_odd_ids(tmp_path):
    odd = ["", "\x00", "x" * 100_000, "é" * 5000, "\ud800", "\udfff\ud800", "a\x00b"]
    with DedupIndex.open(tmp_path, memory_bytes=0) as ix:
        assert ix.add_new(odd) == [True] * len(odd)
        assert ix.add_new(odd + ["y" * 100_000]) == [False] * len(odd) + [True]
        manifest = ix.checkpoint()
    with DedupIndex.open(tmp_path, manifest) as ix:
        assert all(s in ix for s in odd)
        assert "x" * 99_999 not in ix


def test_ids_must_be_text(tmp_path):
    with DedupIndex.open(tmp_path) as ix:
        with pytest.raises(TypeError):
            ix.add_new([b"bytes"])
        ix.add_new(["a"])
        ix.checkpoint()
        with pytest.raises(TypeError):
            ix.add_new([5])
        assert 5 not in ix


def test_numpy_filter_query_matches_the_library():
    rng = np.random.default_rng(3)
    for n in (1, 2, 7, 1000, 70_000):
        members = np.unique(rng.integers(0, 2**64, n, dtype=np.uint64))
        geometry = pieces._Geometry.for_size(members.size + 3)
        seed, fingerprints = pieces._build_filter(members, geometry)
        probes = np.concatenate((members, rng.integers(0, 2**64, 3000, dtype=np.uint64)))
        f = ffi.new("binary_fuse8_t *")
        assert lib.binary_fuse8_allocate(geometry.size, f)
        f.Seed = seed
        ffi.memmove(f.Fingerprints, fingerprints, len(fingerprints))
        expected = [bool(lib.binary_fuse8_contain(int(k), f)) for k in probes]
        lib.binary_fuse8_free(f)
        h, fp = pieces._mixed(probes, np.uint64(seed))
        piece = type("P", (), {})()
        piece.shift, piece.bits, piece.uniform_seed, piece.array_length = np.uint64(64), 0, seed, geometry.array_length
        piece.scl = np.uint64(geometry.segment_count_length)
        piece.segment_length = np.uint64(geometry.segment_length)
        piece.mask = np.uint64(geometry.segment_length_mask)
        piece.filters = np.frombuffer(fingerprints, dtype=np.uint8)
        got = pieces.Piece.maybe(piece, probes, {}).tolist()
        assert got == expected
        assert all(got[: members.size])  # no false negative


# --- damage --------------------------------------------------------------------------------------------


def _one_piece(tmp_path: Path) -> tuple[dict, Path]:
    with DedupIndex.open(tmp_path) as ix:
        ix.add_new([f"e{i}" for i in range(5000)])
        manifest = ix.checkpoint()
    (digest,) = manifest_digests(manifest)
    return manifest, tmp_path / f"{digest}.piece"


@pytest.mark.parametrize("where", ["header", "middle", "last"])
def test_an_altered_piece_is_refused(tmp_path, where):
    manifest, path = _one_piece(tmp_path)
    data = bytearray(path.read_bytes())
    at = {"header": 9, "middle": len(data) // 2, "last": len(data) - 1}[where]
    data[at] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(DedupPieceDamaged) as e:
        DedupIndex.open(tmp_path, manifest)
    assert e.value.path == str(path) and isinstance(e.value, ChainfoldError)


def test_a_truncated_or_missing_piece_is_refused(tmp_path):
    manifest, path = _one_piece(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(DedupPieceDamaged, match="bytes"):
        DedupIndex.open(tmp_path, manifest)
    path.unlink()
    with pytest.raises(DedupPieceDamaged, match="missing"):
        DedupIndex.open(tmp_path, manifest)
    # the folder is not left locked by a failed open
    DedupIndex.open(tmp_path).close()


@pytest.mark.parametrize("bad", [
    None, [], {"format": 2, "count": 0, "pieces": []}, {"format": 1, "count": 1, "pieces": []},
    {"format": 1, "count": 1, "pieces": [{"sha256": "x" * 64, "count": 1, "bytes": 100}]},
    {"format": 1, "count": 1, "pieces": [{"sha256": "0" * 64, "count": 1}]},
])
def test_a_bad_manifest_is_refused_and_deletes_nothing(tmp_path, bad):
    manifest, path = _one_piece(tmp_path)
    if bad is not None:
        with pytest.raises(DedupManifestInvalid):
            DedupIndex.open(tmp_path, bad)
    with pytest.raises(DedupManifestInvalid):
        collect_garbage(tmp_path, [manifest, bad])
    assert path.exists()


def test_one_open_index_per_folder(tmp_path):
    with DedupIndex.open(tmp_path):
        with pytest.raises(DedupIndexBusy) as e:
            DedupIndex.open(tmp_path)
        assert isinstance(e.value, DedupIndexError)
        with pytest.raises(DedupIndexBusy):
            collect_garbage(tmp_path, [])


# --- incremental checkpoints and garbage collection --------------------------------------------------


def test_checkpoints_reference_earlier_pieces_and_write_only_the_new_ids(tmp_path):
    with DedupIndex.open(tmp_path) as ix:
        ix.add_new([f"a{i}" for i in range(1000)])
        m1 = ix.checkpoint()
        ix.add_new([f"b{i}" for i in range(10)])
        m2 = ix.checkpoint()
        assert ix.checkpoint() == m2  # nothing new: nothing written
    d1, d2 = manifest_digests(m1), manifest_digests(m2)
    assert d2[: len(d1)] == d1 and len(d2) == len(d1) + 1
    assert m2["pieces"][-1]["count"] == 10


def test_gc_keeps_every_piece_a_kept_manifest_references(tmp_path):
    kept: list[tuple[dict, int]] = []
    with DedupIndex.open(tmp_path, memory_bytes=0) as ix:
        for round_ in range(40):
            ix.add_new([f"r{round_}-{i}" for i in range(50)])
            kept.append((ix.checkpoint(), len(ix)))
            kept = kept[-3:]  # the store keeps the newest 3 snapshots
            ix.collect_garbage([m for m, _ in kept])
    referenced = {d for m, _ in kept for d in manifest_digests(m)}
    on_disk = {p.name.split(".")[0] for p in tmp_path.glob("*.piece")}
    assert on_disk == referenced
    for manifest, n in kept:
        with DedupIndex.open(tmp_path, manifest) as ix:
            assert len(ix) == n and "r0-0" in ix and f"r{n // 50}-0" not in ix
    assert collect_garbage(tmp_path, [kept[-1][0]])  # the older ones' own pieces go
    with DedupIndex.open(tmp_path, kept[-1][0]) as ix:
        assert len(ix) == kept[-1][1]


def test_gc_removes_temp_files_of_dead_writers(tmp_path):
    manifest, path = _one_piece(tmp_path)
    stale = tmp_path / ".piece-12345-0123456789abcdef.tmp"
    stale.write_bytes(b"partial")
    (tmp_path / "notes.txt").write_text("not ours")
    assert collect_garbage(tmp_path, [manifest]) == [stale.name]
    assert path.exists() and (tmp_path / "notes.txt").exists()


# --- kill -9 -------------------------------------------------------------------------------------------

CHILD = r"""
import json, sys
from pathlib import Path
from chainfold.replay.dedup import DedupIndex
from chainfold.store.atomic import atomic_write
here, total, batch = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
ids = [f"ev-{(i * 7919) % (total * 3 // 4):x}" for i in range(total)]  # a quarter are repeats
state = here / "state.json"
st = json.loads(state.read_text()) if state.exists() else {"pos": 0, "kept": []}
ix = DedupIndex.open(here / "ix", st["kept"][-1] if st["kept"] else None, memory_bytes=3000)
print("open", flush=True)
for b in range(st["pos"], total, batch):
    ix.add_new(ids[b:b + batch])
    if (b // batch) % 2:
        kept = (st["kept"] + [ix.checkpoint()])[-2:]
        st = {"pos": b + batch, "kept": kept}
        atomic_write(state, json.dumps(st).encode())
        ix.collect_garbage(kept)
ix.close()
"""


def _ids(total: int) -> list[str]:
    return [f"ev-{(i * 7919) % (total * 3 // 4):x}" for i in range(total)]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_kill_9_during_spills_and_checkpoints_then_resume(tmp_path, seed):
    total, batch = 16000, 40
    rng = np.random.default_rng(seed)
    ids = _ids(total)

    def start(folder: Path) -> subprocess.Popen[str]:
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(folder), str(total), str(batch)],
                                 stdout=subprocess.PIPE, text=True)
        assert child.stdout is not None
        child.stdout.readline()  # imports done, index open: what follows is all work
        return child

    (calm_dir := tmp_path / "calm").mkdir()
    began = time.monotonic()
    assert start(calm_dir).wait(timeout=600) == 0
    calm = time.monotonic() - began  # the waits scale with this machine's speed now
    tmp_path = tmp_path / "killed"
    tmp_path.mkdir()
    kills = 0
    while True:
        child = start(tmp_path)
        try:
            child.wait(timeout=float(rng.uniform(0.1, 0.6)) * calm)
        except subprocess.TimeoutExpired:
            child.send_signal(signal.SIGKILL)
            child.wait()
            kills += 1
        else:
            assert child.returncode == 0
        state = json.loads((tmp_path / "state.json").read_text()) if (tmp_path / "state.json").exists() else None
        if state:  # every kept manifest opens to exactly the ids before its position
            for i, manifest in enumerate(state["kept"]):
                with DedupIndex.open(tmp_path / "ix", manifest) as ix:
                    pos = state["pos"] - (batch * 2 if i < len(state["kept"]) - 1 else 0)
                    assert len(ix) == len(set(ids[:pos]))
                    assert ix.add_new(ids[:pos]) == [False] * pos
        if child.returncode == 0 and state and state["pos"] >= total - batch:
            break
        assert kills < 60, "the child never finished"
    assert kills >= 1
    with DedupIndex.open(tmp_path / "ix", state["kept"][-1]) as ix:
        rest = ids[state["pos"]:]
        assert ix.add_new(rest) == Reference().add_new(ids)[state["pos"]:]
        assert len(ix) == len(set(ids))
    leftovers = [p.name for p in (tmp_path / "ix").iterdir() if p.name.endswith(".tmp")]
    collect_garbage(tmp_path / "ix", state["kept"])
    assert not [p for p in (tmp_path / "ix").iterdir() if p.name.endswith(".tmp")], leftovers

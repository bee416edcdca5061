"""History-scale replay (issue 11): the dedup index inside rebuild, snapshot format 2.

Replay with duplicates equals replay without, across spills of the dedup index (a tiny memory
bound), snapshot boundaries and restarts; a snapshot whose dedup piece is missing or damaged is
refused (never silently partial); pieces no kept snapshot names are collected; kill -9 during a
spill or a snapshot, then a rerun, ends where an uninterrupted run does."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chainfold import Folder, load_model
from chainfold.envelope import Event, event_from_json
from chainfold.examples import accounts
from chainfold.log import MemoryLog
from chainfold.ops.rebuild import rebuild
from chainfold.replay.dedup import DedupIndex, manifest_digests
from chainfold.store.snapshots import SnapshotStore

MODEL = load_model("chainfold.examples.accounts")
TOPIC = "persistent://public/default/history"
TINY = 1500  # bytes of ids in memory: a spill every few dozen events


def reference(log: MemoryLog) -> Folder:
    """The fold everything must equal: the whole log, each id once, in memory."""
    folder = Folder(MODEL)
    for p in log.partitions():
        folder.index = 0
        folder.feed(log.read(p))
    return folder


def with_duplicates(events: list[Event], picks: list[tuple[int, int]]) -> list[Event]:
    """``events`` with copies of earlier ones inserted: (where, which earlier one) pairs."""
    out = list(events)
    for where, which in sorted(picks, reverse=True):
        at = where % (len(events) + 1)
        if at:
            out.insert(at, events[which % at])
    return out


def pieces_in(store: SnapshotStore) -> set[str]:
    return {p.name[:-6] for p in store.dedup.dir.glob("*.piece")}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(20, 260), seed=st.integers(0, 9), picks=st.lists(st.tuples(st.integers(0, 10**6),
       st.integers(0, 10**6)), max_size=40), every=st.integers(3, 70), keep=st.integers(1, 3),
       cuts=st.lists(st.integers(1, 10**6), max_size=4), partitions=st.sampled_from([0, 2]))
def test_replay_with_duplicates_equals_replay_without(tmp_path_factory, n, seed, picks, every, keep, cuts, partitions):
    events = [event_from_json(d) for d in accounts.generate(n, 9, seed)]
    logged = with_duplicates(events, picks)
    plain, dup = MemoryLog(TOPIC, partitions=partitions), MemoryLog(TOPIC, partitions=partitions)
    plain.append(events, assign_seq=False)
    roots = tmp_path_factory.mktemp("h")
    # the log grows in steps; after each, a rebuild from the newest snapshot (a restart)
    bounds = sorted({c % (len(logged) + 1) for c in cuts} | {len(logged)})
    done = 0
    for b in bounds:
        dup.append(logged[done:b], assign_seq=False)
        done = b
        result = rebuild(dup, MODEL, snapshots_root=roots, snapshot_every=every, keep=keep, dedup_memory=TINY)
    want = reference(plain)
    assert result.folder.states == want.states
    assert rebuild(plain, MODEL, snapshots_root=tmp_path_factory.mktemp("p"), dedup_memory=TINY).folder.states \
        == want.states
    store = SnapshotStore(roots, TOPIC)
    newest = store.load(store.list()[0].path)
    assert newest.stats["duplicates"] == len(logged) - len(events)  # every copy seen, over all the restarts
    assert newest.dedup["count"] == len(events)
    # the full replay agrees, and only pieces the kept snapshots name are left
    full = rebuild(dup, MODEL, snapshots_root=roots, full=True, write_snapshots=False, dedup_memory=TINY)
    assert full.folder.states == want.states and len(full.folder.duplicates) == len(logged) - len(events)
    assert pieces_in(store) == {d for m in store.manifests() for d in manifest_digests(m)}
    assert not any(store.dedup.scratch_dir.iterdir())  # readers leave nothing behind


def _log(n: int = 3000, more: int = 0) -> tuple[MemoryLog, list[Event]]:
    """``n`` events, then copies of 300 early ones (ids long spilled); ``more`` events kept back."""
    events = [event_from_json(d) for d in accounts.generate(n + more, 20, 5)]
    log = MemoryLog(TOPIC)
    log.append(events[:n])
    log.append(events[100:400], assign_seq=False)
    return log, events[n:]


def test_the_index_spills_beside_the_snapshots_and_snapshots_share_pieces(tmp_path: Path) -> None:
    log, _ = _log()
    r = rebuild(log, MODEL, snapshots_root=tmp_path, snapshot_every=500, keep=3)
    assert len(r.folder.duplicates) == 300 and r.folder.states == reference(log).states
    store = SnapshotStore(tmp_path, TOPIC)
    manifests = [store.load(i.path).dedup for i in store.list()]
    assert [m["count"] for m in manifests] == [3000, 3000, 2500]
    assert set(manifest_digests(manifests[2])) & set(manifest_digests(manifests[0]))  # shared, not rewritten
    assert pieces_in(store) == {d for m in manifests for d in manifest_digests(m)}  # pruned ones' collected
    # a snapshot file holds the manifest, not the ids: its size does not grow with them
    assert all(i.size_bytes < 20_000 for i in store.list())


@pytest.mark.parametrize("damage", ["flip", "truncate", "missing"])
def test_a_snapshot_whose_dedup_piece_is_damaged_is_refused(tmp_path: Path, damage: str) -> None:
    log, more = _log(more=50)
    rebuild(log, MODEL, snapshots_root=tmp_path, snapshot_every=1000, keep=3, dedup_memory=TINY)
    store = SnapshotStore(tmp_path, TOPIC)
    infos = store.list()
    assert [i.entries for i in infos] == [3300, 3000, 2000]
    newest, oldest = store.load(infos[0].path), store.load(infos[2].path)
    only_newer = set(manifest_digests(newest.dedup)) - set(manifest_digests(oldest.dedup))
    piece = store.dedup.dir / f"{sorted(only_newer)[0]}.piece"
    if damage == "flip":
        data = bytearray(piece.read_bytes())
        data[len(data) // 2] ^= 1
        piece.write_bytes(bytes(data))
    elif damage == "truncate":
        piece.write_bytes(piece.read_bytes()[:-7])
    else:
        piece.unlink()
    log.append(more)
    r = rebuild(log, MODEL, snapshots_root=tmp_path, dedup_memory=TINY)
    assert [p for p, _ in r.rejected] == [str(infos[0].path), str(infos[1].path)]  # both name the piece
    for _, reason in r.rejected:
        assert reason.startswith("its dedup index is damaged: dedup piece")
        assert {"flip": "does not match its SHA-256", "truncate": "bytes, the manifest says",
                "missing": "missing"}[damage] in reason
    assert r.from_snapshot == 2000  # the next older one, whole
    assert r.folder.states == reference(log).states and len(r.folder.duplicates) == 300
    summary = SnapshotStore(tmp_path, TOPIC).inspect(infos[0].path)  # still there, still refused
    assert summary["valid"] is False and "dedup piece" in summary["reason"]


def test_a_second_writer_of_the_same_topic_takes_no_snapshots(tmp_path: Path) -> None:
    log, _ = _log(600)
    store = SnapshotStore(tmp_path, TOPIC)
    with store.dedup.writer(None):  # another process taking this topic's snapshots
        r = rebuild(log, MODEL, snapshots_root=tmp_path)
    assert r.written == [] and any("another chainfold process is taking snapshots" in n for n in r.notes)
    assert r.folder.states == reference(log).states


def test_closing_a_rebuild_releases_the_index(tmp_path: Path) -> None:
    log, _ = _log(600)
    r = rebuild(log, MODEL, snapshots_root=tmp_path, dedup_memory=TINY)
    assert r.folder.seen.closed and len(r.folder.seen) == 600  # type: ignore[attr-defined]
    with DedupIndex.open(SnapshotStore(tmp_path, TOPIC).dedup.dir):  # the folder is free again
        pass


# --- kill -9 --------------------------------------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import sys
    from chainfold import load_model
    from chainfold.envelope import event_from_json
    from chainfold.examples import accounts
    from chainfold.log import MemoryLog
    from chainfold.ops.rebuild import rebuild

    root, n = sys.argv[1], int(sys.argv[2])
    events = [event_from_json(d) for d in accounts.generate(n, 30, 11)]
    log = MemoryLog("persistent://public/default/history")
    log.append(events)
    log.append(events[::7], assign_seq=False)
    print("start", flush=True)
    r = rebuild(log, load_model("chainfold.examples.accounts"), snapshots_root=root, snapshot_every=700, keep=2,
                dedup_memory=2500)
    print("done", r.from_snapshot, flush=True)
    """
)


def _run_child(root: Path, n: int) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", CHILD, str(root), str(n)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _newest(root: Path) -> dict[str, Any]:
    store = SnapshotStore(root, TOPIC)
    snap = store.load(store.list()[0].path)
    with DedupIndex.open(store.dedup.dir, snap.dedup) as index:
        ids = sorted(index)
    return {"entries": snap.entries, "states": snap.states, "stats": snap.stats, "ids": ids}


def _kill_when(proc: subprocess.Popen[str], folder: Path, pattern: str, deadline: float) -> bool:
    """SIGKILL ``proc`` as soon as a file matching ``pattern`` appears in ``folder`` (mid-write)."""
    while time.monotonic() < deadline and proc.poll() is None:
        if folder.is_dir() and any(folder.glob(pattern)):
            proc.send_signal(signal.SIGKILL)
            return True
    return False


@pytest.mark.parametrize("where", ["spill", "snapshot", "anywhere"])
def test_kill_9_during_a_spill_or_a_snapshot_then_rerun_is_an_uninterrupted_run(tmp_path: Path, where: str) -> None:
    n = 9000
    calm = tmp_path / "calm"
    proc = _run_child(calm, n)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "start"
    began = time.monotonic()
    assert proc.wait(timeout=600) == 0, proc.stderr.read() if proc.stderr else ""
    calm_s = time.monotonic() - began  # kill times scale with this machine's speed
    want = _newest(calm)
    root = tmp_path / "killed"
    topic_dir = SnapshotStore(root, TOPIC).dir
    kills, rng_times = 0, iter(calm_s * f for f in (0.15, 0.15, 0.2, 0.25, 0.3, 0.1, 0.2))
    for _ in range(7):
        proc = _run_child(root, n)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "start"
        deadline = time.monotonic() + 60
        if where == "spill":
            landed = _kill_when(proc, topic_dir / "dedup", ".piece-*.tmp", deadline)
        elif where == "snapshot":
            landed = _kill_when(proc, topic_dir, ".snap-*", deadline)
        else:
            time.sleep(next(rng_times))
            landed = proc.poll() is None
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += landed
        if proc.returncode == 0:
            break
    assert kills >= 2, "no kill landed mid-run"
    proc = _run_child(root, n)  # and once more, to the end
    assert proc.wait(timeout=600) == 0, proc.stderr.read() if proc.stderr else ""
    got = _newest(root)
    assert got == want
    # what the dead runs left (temp files, unnamed pieces) is cleared by the next snapshot's collection
    store = SnapshotStore(root, TOPIC)
    assert pieces_in(store) == {d for m in store.manifests() for d in manifest_digests(m)}
    assert not list(store.dedup.dir.glob(".piece-*.tmp"))
    assert not [p for p in store.dedup.scratch_dir.iterdir()] if store.dedup.scratch_dir.exists() else True

"""The snapshot store: exact round trips, every corruption rejected with its reason (never loaded
wrong), keep-K pruning, crash safety under SIGKILL mid-write, and the ``snapshots`` command."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import cbor2
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import chainfold.cli.snapshots_cmd  # noqa: F401  (registers the command until cli/__init__ imports it)
from chainfold import merkle
from chainfold.hashing.chain import ChainBuilder
from chainfold.cli import common
from chainfold.envelope import event_from_json
from chainfold.errors import BadInput, SnapshotRejected
from chainfold.examples import accounts
from chainfold import Folder, load_model
from chainfold.log import MemoryLog
from chainfold.replay.dedup import DedupIndex
from chainfold.store.codec import FORMAT_1_REFUSED
from chainfold.store.snapshots import (
    FORMAT,
    PartitionPosition,
    Snapshot,
    SnapshotInfo,
    SnapshotStore,
    streams_root,
    topic_dir,
)

TOPIC = "persistent://public/default/snaps"
EMPTY = {"format": 1, "count": 0, "pieces": []}  # the manifest of no event ids
COUNTERS = load_model("chainfold.examples.counters")
ACCOUNTS = load_model("chainfold.examples.accounts")


# --- fixtures: a real fold of a real (in-memory, partitioned) log --------------------------------------


def folded(model=ACCOUNTS, n_events: int = 400, n_streams: int = 25, seed: int = 7,
           topic: str = TOPIC) -> tuple[Folder, list[PartitionPosition]]:
    """Fold generated account events from a 2-partition log; positions with chain states."""
    log = MemoryLog(topic, partitions=2)
    log.append(event_from_json(d) for d in accounts.generate(n_events, n_streams, seed))
    # a malformed entry and a duplicated event, as real logs have
    log.append_payloads([(b"\xff not cbor", "acct-0001", None)])
    first = next(e for p in log.partitions() for e in log.entries(p))
    log.append_payloads([(first.payload, first.key, first.event_time)])
    folder = Folder(model)
    positions = []
    for p in log.partitions():
        chain = ChainBuilder(segment_size=16)
        for e in log.read(p):
            chain.add(e.payload, str(e.message_id))
        folder.index = 0
        folder.feed(log.read(p))
        positions.append(PartitionPosition.at(p, chain))
    return folder, positions


def manifest_of(store: SnapshotStore, ids) -> dict:
    """The ids as a dedup index in ``store``'s dedup folder: its manifest."""
    with store.dedup.writer(None) as index:
        index.add_new(sorted(ids))
        return index.checkpoint()


def take(folder: Folder, positions: list[PartitionPosition], *, created: int = 1_700_000_000_000,
         topic: str = TOPIC, model=None, dedup=EMPTY) -> Snapshot:
    return Snapshot.capture(
        model or folder.model, topic=topic, partitions=positions, states=folder.states, dedup=dedup,
        segment_size=16, created=created,
        stats={"malformed": len(folder.malformed), "duplicates": len(folder.duplicates)},
    )


def fold_hashing(folder: Folder, chain: ChainBuilder, entries) -> None:
    """Fold the entries and feed them to ``chain`` (positions and chain states for snapshots)."""
    entries = list(entries)
    for e in entries:
        chain.add(e.payload, str(e.message_id))
    folder.feed(entries)


@pytest.fixture
def store(tmp_path: Path) -> SnapshotStore:
    return SnapshotStore(tmp_path / "snapshots", TOPIC)


@pytest.fixture(scope="module")
def sample() -> tuple[Folder, list[PartitionPosition]]:
    return folded()


@pytest.fixture
def written(store: SnapshotStore, sample) -> tuple[Snapshot, Path]:
    snap = take(*sample)
    return snap, store.write(snap)


def reason_of(store: SnapshotStore, path: Path) -> str:
    with pytest.raises(SnapshotRejected) as exc:
        store.load(path)
    assert exc.value.path == str(path)
    return exc.value.reason


def rewrite_body(path: Path, change) -> None:
    """Decode the body, let ``change`` alter it, re-encode with a *correct* checksum."""
    env = cbor2.loads(path.read_bytes())
    body = cbor2.loads(env["body"])
    change(body)
    raw = cbor2.dumps(body, canonical=True)
    env["body"] = raw
    env["sha256"] = _sha(raw)
    path.write_bytes(cbor2.dumps(env, canonical=True))


def _sha(b: bytes) -> bytes:
    return hashlib.sha256(b).digest()


# --- where ----------------------------------------------------------------------------------------------


def test_topic_dir_is_readable_safe_and_unambiguous(tmp_path: Path) -> None:
    assert topic_dir(tmp_path, "orders") == tmp_path / "public.default.orders"
    assert topic_dir(tmp_path, "persistent://public/default/orders") == tmp_path / "public.default.orders"
    assert topic_dir(tmp_path, "acme/prod/orders") == tmp_path / "acme.prod.orders"
    np = topic_dir(tmp_path, "non-persistent://public/default/orders").name
    assert np.startswith("np~") and np != "public.default.orders"
    names = [
        "persistent://a.b/c/d", "persistent://a/b.c/d", "persistent://a/b/c.d", "persistent://a/b/c%2ed",
        "persistent://a/b/Orders", "persistent://a/b/orders", "persistent://a/b/ORDERS",
        "non-persistent://a/b/orders", "persistent://np~a/b/orders", "persistent://a/b/x/y",
        "persistent://a/b/" + "x" * 300, "persistent://a/b/" + "x" * 301, "persistent://a/b/é",
    ]
    dirs = [topic_dir(tmp_path, n).name for n in names]
    assert len({d.lower() for d in dirs}) == len(names)  # distinct even on case-insensitive file systems
    for d in dirs:
        assert len(d) <= 200 and "/" not in d and d not in (".", "..") and not d.startswith(".")
        assert all(c.isascii() and (c.isalnum() or c in "._-%~") for c in d)


# --- round trip -------------------------------------------------------------------------------------------


def test_round_trip_is_exact(store: SnapshotStore, sample) -> None:
    folder, positions = sample
    manifest = manifest_of(store, folder.seen)
    snap = take(folder, positions, dedup=manifest)
    path = store.write(snap)
    assert path.parent == store.dir and path.name == "snap-000000000402-1700000000000.cbor"
    back = store.load(path)
    assert back == snap
    assert back.entries == 402 == sum(p.entries for p in positions)
    assert back.streams_root == snap.streams_root == streams_root(snap.states)
    assert back.dedup == manifest and back.stats == {"malformed": 1, "duplicates": 1}
    assert manifest["count"] == len(folder.seen) and len(manifest["pieces"]) == 1
    with DedupIndex.open(store.dedup.dir, back.dedup) as index:  # the ids, from the pieces beside it
        assert sorted(index) == sorted(folder.seen)
    assert back.restore_states(ACCOUNTS) == folder.states
    assert back.model_fingerprint == ACCOUNTS.fingerprint and back.segment_size == 16
    # the chain continues exactly where it stopped
    for pos, orig in zip(back.partitions, positions):
        assert pos == orig and pos.builder().state() == orig.chain
        assert pos.message_id == orig.chain["last"] and pos.head == orig.chain["head"]
    # the files are the canonical CBOR of the documented maps
    raw = path.read_bytes()
    env = cbor2.loads(raw)
    assert set(env) == {"format", "body", "sha256"} and env["format"] == FORMAT == 2
    assert cbor2.dumps(env, canonical=True) == raw
    assert _sha(env["body"]) == env["sha256"]
    body = cbor2.loads(env["body"])
    assert cbor2.dumps(body, canonical=True) == env["body"]
    assert body["dedup"] == manifest and "seen" not in body and body["entries"] == 402
    assert body["seqs"] == snap.seqs and set(body["seqs"]) == {"highest", "gaps", "unverifiable"}
    assert body["partitions"][0] == {"partition": positions[0].partition, "entries": positions[0].entries,
                                     "message_id": positions[0].message_id, "chain": positions[0].chain}
    leaves = [merkle.leaf_hash(cbor2.dumps([s, body["states"][s]], canonical=True)) for s in sorted(body["states"])]
    assert body["streams_root"] == merkle.root(leaves)


def test_resuming_from_a_snapshot_folds_like_one_go(tmp_path: Path) -> None:
    """Snapshot half-way, load, fold the rest: the same states as folding everything."""
    events = [event_from_json(d) for d in accounts.generate(300, 12, 3)]
    log = MemoryLog(TOPIC)
    log.append(events[:150])
    store = SnapshotStore(tmp_path, TOPIC)
    f1 = Folder(COUNTERS, seen=store.dedup.writer(None))
    chain = ChainBuilder(16)
    fold_hashing(f1, chain, log.read())
    pos = PartitionPosition.at(log.partitions()[0], chain)
    path = store.write(Snapshot.capture(COUNTERS, topic=TOPIC, partitions=[pos], states=f1.states,
                                        dedup=f1.seen.checkpoint(), segment_size=16))
    f1.seen.close()
    log.append(events[150:] + events[:5])  # the tail repeats five old events: not folded again
    snap = store.load(path)
    p = snap.partitions[0]
    f2 = Folder(COUNTERS, states=snap.restore_states(COUNTERS), seen=store.dedup.reader(snap.dedup),
                index=snap.entries)
    chain2 = p.builder()
    from chainfold.log import MessageId

    fold_hashing(f2, chain2, log.read(after=MessageId.parse(p.message_id)))
    whole = Folder(COUNTERS)
    full_chain = ChainBuilder(16)
    fold_hashing(whole, full_chain, log.read())
    assert f2.states == whole.states and len(f2.duplicates) == 5
    assert chain2.state() == full_chain.state()
    f2.seen.close()
    assert not any(store.dedup.scratch_dir.iterdir())  # the reader's scratch folder is gone


def test_empty_snapshot_round_trips(store: SnapshotStore) -> None:
    pos = PartitionPosition.at(TOPIC, ChainBuilder(16))
    snap = Snapshot(TOPIC, (pos,), "m", "f" * 64, 16, {}, EMPTY, created=5)
    back = store.load(store.write(snap))
    assert back == snap and back.entries == 0 and back.streams_root == merkle.root([])


def test_states_that_are_not_cbor_are_refused_on_write(store: SnapshotStore, sample) -> None:
    folder, positions = sample
    snap = Snapshot(TOPIC, tuple(positions), "m", "f" * 64, 16, {"s": object()}, EMPTY)
    with pytest.raises(BadInput, match="stream 's'"):
        store.write(snap)
    assert store.list() == [] and not store.dir.exists()  # refused before anything is written


def test_invalid_snapshots_are_refused_at_construction(sample) -> None:
    folder, positions = sample
    with pytest.raises(ValueError, match="chain state covers"):
        PartitionPosition(TOPIC, 3, None, ChainBuilder(16).state())
    with pytest.raises(ValueError, match="segment size"):
        Snapshot(TOPIC, tuple(positions), "m", "f", 1024, {}, EMPTY)
    with pytest.raises(ValueError, match="twice"):
        Snapshot(TOPIC, (positions[0], positions[0]), "m", "f", 16, {}, EMPTY)
    with pytest.raises(ValueError, match="dedup index manifest"):
        Snapshot(TOPIC, tuple(positions), "m", "f", 16, {}, frozenset())  # format 1's ids: not a manifest


def test_writing_into_another_topics_store_is_refused(tmp_path: Path, sample) -> None:
    with pytest.raises(ValueError, match="does not belong"):
        SnapshotStore(tmp_path, "other").write(take(*sample))


# --- every corruption is rejected with its reason -----------------------------------------------------


@pytest.mark.parametrize("cut", [0, 1, 2, 7, 0.25, 0.5, 0.9, -33, -32, -1])
def test_truncated_files_are_rejected(store: SnapshotStore, written, cut) -> None:
    _, path = written
    data = path.read_bytes()
    n = int(len(data) * cut) if isinstance(cut, float) else cut % len(data)
    path.write_bytes(data[:n])
    assert reason_of(store, path) == "truncated or not a snapshot file"


def test_trailing_bytes_and_foreign_files_are_rejected(store: SnapshotStore, written) -> None:
    _, path = written
    data = path.read_bytes()
    path.write_bytes(data + b"\x00")
    assert reason_of(store, path) == "truncated or not a snapshot file"
    for junk in (b"", b"hello", json.dumps({"format": 1}).encode(), cbor2.dumps({"format": 1, "body": b""}),
                 cbor2.dumps([1, 2, 3])):
        path.write_bytes(junk)
        assert reason_of(store, path) == "truncated or not a snapshot file"
    assert "cannot read" in reason_of(store, store.dir / "snap-000000000001-0000000000001.cbor")


def test_other_format_versions_are_rejected(store: SnapshotStore, written) -> None:
    _, path = written
    env = cbor2.loads(path.read_bytes())
    for fmt in (3, 0, True, 2.0, "2"):
        path.write_bytes(cbor2.dumps({**env, "format": fmt}, canonical=True))
        assert "not supported" in reason_of(store, path)


def test_format_1_snapshots_are_refused_with_what_to_do(store: SnapshotStore, written) -> None:
    """A snapshot of an older chainfold (every event id in every file) is never misread."""
    _, path = written
    env = cbor2.loads(path.read_bytes())
    body = cbor2.loads(env["body"])
    body["seen"] = sorted(["e1", "e2"])
    del body["dedup"]
    raw = cbor2.dumps(body, canonical=True)
    path.write_bytes(cbor2.dumps({"format": 1, "body": raw, "sha256": _sha(raw)}, canonical=True))
    assert reason_of(store, path) == FORMAT_1_REFUSED == "format 1, written by an older chainfold: rebuild --full once"
    [(_, rejected)] = list(store.candidates(ACCOUNTS))
    assert isinstance(rejected, SnapshotRejected) and rejected.reason == FORMAT_1_REFUSED
    assert store.inspect(path)["reason"] == FORMAT_1_REFUSED


def test_every_single_bit_flip_is_rejected(store: SnapshotStore, tmp_path: Path) -> None:
    """Exhaustive on a small snapshot: each of its bits flipped in turn, none loads."""
    folder, positions = folded(n_events=30, n_streams=4)
    path = store.write(take(folder, positions))
    data = path.read_bytes()
    assert len(data) < 12_000
    for i in range(len(data)):
        for bit in range(8):
            path.write_bytes(data[:i] + bytes([data[i] ^ (1 << bit)]) + data[i + 1 :])
            with pytest.raises(SnapshotRejected):
                store.load(path)
    path.write_bytes(data)
    store.load(path)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_one_altered_byte_anywhere_is_rejected(written, data) -> None:
    _, path = written
    store = SnapshotStore(path.parent.parent, TOPIC)
    raw = path.read_bytes()
    i = data.draw(st.integers(0, len(raw) - 1), label="position")
    b = data.draw(st.integers(0, 255).filter(lambda v: v != raw[i]), label="new byte")
    bad = path.with_name("snap-000000000402-1700000000001.cbor")
    bad.write_bytes(raw[:i] + bytes([b]) + raw[i + 1 :])
    with pytest.raises(SnapshotRejected) as exc:
        store.load(bad)
    assert exc.value.reason  # always a reason, and never a snapshot
    bad.unlink()


def test_checksum_mismatch_names_the_body(store: SnapshotStore, written) -> None:
    _, path = written
    env = cbor2.loads(path.read_bytes())
    body = bytearray(env["body"])
    body[len(body) // 2] ^= 0x01
    path.write_bytes(cbor2.dumps({**env, "body": bytes(body)}, canonical=True))
    assert reason_of(store, path) == "checksum mismatch: body altered"


def test_altered_streams_root_is_rejected(store: SnapshotStore, written) -> None:
    _, path = written

    def bump_root(body):
        body["streams_root"] = bytes(32)

    rewrite_body(path, bump_root)
    assert reason_of(store, path).startswith("streams_root mismatch")


def test_altered_state_with_a_fixed_up_checksum_is_rejected(store: SnapshotStore, written) -> None:
    _, path = written

    def rob(body):
        s = sorted(body["states"])[3]
        body["states"][s]["balance"] += 1_000_000

    rewrite_body(path, rob)
    assert reason_of(store, path).startswith("streams_root mismatch")


def test_a_snapshot_of_another_topic_is_rejected(tmp_path: Path, sample) -> None:
    other = SnapshotStore(tmp_path, "persistent://public/default/other")
    folder, _ = sample
    _, positions = folded(topic=other.topic)
    path = other.write(take(folder, positions, topic=other.topic))
    mine = SnapshotStore(tmp_path, TOPIC)
    mine.dir.mkdir(parents=True)
    moved = mine.dir / path.name
    moved.write_bytes(path.read_bytes())
    assert reason_of(mine, moved) == f"taken of topic {other.topic}, not {TOPIC}"
    [(info, rejected)] = list(mine.candidates(ACCOUNTS))
    assert isinstance(rejected, SnapshotRejected) and rejected.reason.startswith("taken of topic")


def test_a_renamed_file_is_rejected(store: SnapshotStore, written) -> None:
    _, path = written
    moved = path.rename(path.with_name("snap-000000999999-1700000000000.cbor"))
    assert "file name says 999999 entries" in reason_of(store, moved)


def test_malformed_body_behind_a_good_checksum_is_rejected(store: SnapshotStore, written) -> None:
    _, path = written
    rewrite_body(path, lambda b: b.update(entries=b["entries"] + 1))
    assert "not the sum over partitions" in reason_of(store, path)
    rewrite_body(path, lambda b: b.update(dedup={"format": 1, "count": 3, "pieces": []}))
    assert "dedup: 'count' is not the sum" in reason_of(store, path)
    rewrite_body(path, lambda b: b.pop("dedup"))
    assert "does not have the snapshot fields" in reason_of(store, path)


def test_bad_chain_state_behind_a_good_checksum_is_rejected(store: SnapshotStore, written) -> None:
    _, path = written
    rewrite_body(path, lambda b: b["partitions"][0]["chain"].update(head=b"short"))
    assert "bad chain state" in reason_of(store, path)


# --- candidates: newest first, lazily, with the model checked --------------------------------------------


def test_candidates_newest_first_lazily_with_reasons(store: SnapshotStore, sample) -> None:
    folder, positions = sample
    store.keep = 10
    old = store.write(take(folder, positions, created=1))
    mid_folder, mid_pos = folded(n_events=600)
    mid = store.write(take(mid_folder, mid_pos, created=2))
    other_model = store.write(take(*folded(COUNTERS, n_events=700), created=3))
    newest_folder, newest_pos = folded(n_events=800)
    newest = store.write(take(newest_folder, newest_pos, created=4))
    newest.write_bytes(newest.read_bytes()[:100])  # torn

    loads = []
    real_load = store.load
    store.load = lambda p: loads.append(Path(p)) or real_load(p)  # type: ignore[method-assign]
    it = store.candidates(ACCOUNTS)
    info, r = next(it)
    assert info.path == newest and isinstance(r, SnapshotRejected) and r.reason == "truncated or not a snapshot file"
    info, r = next(it)
    assert info.path == other_model and isinstance(r, SnapshotRejected)
    assert r.reason.startswith("taken with other model code (fingerprint ")
    info, r = next(it)
    assert info.path == mid and isinstance(r, Snapshot) and r.entries == 602
    assert loads == [newest, other_model, mid]  # the oldest one is not read until asked for
    assert [i.path for i, _ in it] == [old]


# --- listing and pruning -------------------------------------------------------------------------------


def test_list_is_cheap_sorted_and_ignores_other_files(store: SnapshotStore, sample) -> None:
    folder, positions = sample
    store.keep = 10
    a = store.write(take(folder, positions, created=10))
    b = store.write(take(folder, positions, created=20))
    c = store.write(take(*folded(n_events=100), created=30))
    store.dir.joinpath("checkpoints.jsonl").write_text("{}\n")
    store.dir.joinpath("checkpoints.jsonl.partial").write_text("{}\n")
    store.dir.joinpath(f".{a.name}.123.abcdef0123456789.tmp").write_bytes(b"partial")
    store.dir.joinpath("snap-notes.txt").write_text("hi")
    infos = store.list()
    assert [i.path for i in infos] == [b, a, c]
    assert infos[0] == SnapshotInfo(b, 402, 20, b.stat().st_size)
    assert SnapshotStore(store.root, "never-written").list() == []


def test_same_coverage_twice_is_kept_twice(store: SnapshotStore, sample) -> None:
    snap = take(*sample)
    first = store.write(snap)
    second = store.write(snap)  # same entries, same created ms: a new name, nothing replaced
    assert first != second and second.name == first.name.replace(".cbor", "-1.cbor")
    assert [i.path for i in store.list()] == [second, first]
    assert store.load(first) == store.load(second) == snap


def test_keep_k_prunes_to_the_newest(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path, TOPIC, keep=3)
    store.dir.mkdir(parents=True)
    checkpoint = store.dir / "checkpoints.jsonl"
    checkpoint.write_text("{}\n")
    snaps = {}
    for n in (100, 200, 300, 400, 500):
        folder, positions = folded(n_events=n, n_streams=5)
        snaps[n] = take(folder, positions, created=n)
        path = store.write(snaps[n])
        assert len(store.list()) == min(3, n // 100)
        assert store.list()[0].path == path
    assert [i.entries for i in store.list()] == [502, 402, 302]
    # an older snapshot written now is kept (never delete what was just written), the newest 3 too
    late = store.write(snaps[100])
    assert [i.entries for i in store.list()] == [502, 402, 302, 102] and late.exists()
    # the next write prunes it again, and the oldest of the newest
    folder, positions = folded(n_events=600, n_streams=5)
    store.write(take(folder, positions, created=600))
    assert [i.entries for i in store.list()] == [602, 502, 402]
    assert checkpoint.read_text() == "{}\n"  # other files in the folder are never touched
    with pytest.raises(ValueError):
        SnapshotStore(tmp_path, TOPIC, keep=0)


def test_stale_temp_files_are_cleaned_by_the_next_write(store: SnapshotStore, sample) -> None:
    store.dir.mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = store.dir / f".snap-000000000001-0000000000001.cbor.{dead_pid}.0123456789abcdef.tmp"
    stale.write_bytes(b"\xa3dbody" + b"\x00" * 50)
    live = store.dir / f".snap-000000000001-0000000000001.cbor.{os.getppid()}.0123456789abcdef.tmp"
    live.write_bytes(b"\x00")  # a live writer's (our parent's pid): left alone
    assert store.list() == []
    store.write(take(*sample))
    assert not stale.exists() and live.exists() and len(store.list()) == 1


# --- crash safety ----------------------------------------------------------------------------------------

_WRITER = textwrap.dedent(
    """
    import os, sys, time
    from chainfold.hashing.chain import ChainBuilder
    from chainfold.store.snapshots import PartitionPosition, Snapshot, SnapshotStore

    root, topic, n_streams, slow = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "slow"
    if slow:  # widen the window between the temp file's data and its rename
        real_fsync = os.fsync
        os.fsync = lambda fd: (time.sleep(0.5), real_fsync(fd))[1]
    chain = ChainBuilder(16)
    for i in range(n_streams):
        chain.add(b"e%d" % i, "1:%d:-1:-1" % i)
    states = {"s-%07d" % i: {"events": i, "types": {"Deposited": i % 7}, "amount": i * 3} for i in range(n_streams)}
    snap = Snapshot(topic, (PartitionPosition.at(topic, chain),), "big", "f" * 64, 16, states,
                    {"format": 1, "count": 0, "pieces": []}, created=int(time.time() * 1000))
    store = SnapshotStore(root, topic, keep=50)
    print("writing", flush=True)
    store.write(snap)
    print("written", flush=True)
    """
)


def test_sigkill_mid_write_leaves_older_snapshots_intact(tmp_path: Path, sample) -> None:
    root = tmp_path / "snapshots"
    store = SnapshotStore(root, TOPIC, keep=50)
    folder, positions = sample
    before = [store.write(take(folder, positions, created=c)) for c in (1, 2)]
    before_infos = store.list()
    rng = random.Random(1234)
    # kill as soon as the temp file appears (mid-write), inside a slowed fsync (data written, not yet
    # renamed), and at random moments of the write call (encoding, writing, renaming, pruning)
    plan = ["on-temp", "on-temp-slow", rng.uniform(0.0, 0.8), rng.uniform(0.8, 2.0)]
    left_partial = 0
    for attempt in plan:
        slow = attempt == "on-temp-slow"
        proc = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(root), TOPIC, "300000", "slow" if slow else "fast"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "writing", proc.stderr.read() if proc.stderr else ""
            if isinstance(attempt, float):
                time.sleep(attempt)
            else:
                deadline = time.monotonic() + 20
                while not any(n.endswith(".tmp") for n in os.listdir(store.dir)):
                    assert time.monotonic() < deadline and proc.poll() is None, "the writer never made a temp file"
                    time.sleep(0.0005)
                if slow:
                    time.sleep(0.1)  # inside the (slowed) fsync: the temp file is complete but unnamed
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()  # reaped: its pid is no longer alive
        temps = [n for n in os.listdir(store.dir) if n.endswith(".tmp")]
        left_partial += bool(temps)
        infos = store.list()
        assert all(t not in {i.path.name for i in infos} for t in temps)
        for t in temps:  # even read directly, a temp file is rejected or is the complete snapshot
            try:
                assert len(store.load(store.dir / t).states) == 300_000
            except SnapshotRejected as exc:
                assert exc.reason == "truncated or not a snapshot file"
        # what was there is there, and whatever is listed loads: a complete new snapshot at most
        assert set(before_infos) <= set(infos)
        for info in infos:
            snap = store.load(info.path)
            assert snap.model_name in ("big", ACCOUNTS.name)
            if snap.model_name == "big":
                assert len(snap.states) == 300_000
        for path in before:
            assert store.load(path) == take(folder, positions, created=int(path.stem.rsplit("-", 1)[1]))
    assert left_partial >= 2  # the kills did land mid-write
    # the next write removes the dead writers' temp files
    store.write(take(folder, positions, created=3))
    assert not [n for n in os.listdir(store.dir) if n.endswith(".tmp")]


# --- inspect and the command -----------------------------------------------------------------------------


def test_inspect_describes_valid_and_rejected_files(store: SnapshotStore, sample, written) -> None:
    snap, path = written
    s = store.inspect(path)
    json.dumps(s)  # JSON-ready
    assert s["valid"] is True and s["reason"] is None
    assert s["topic"] == TOPIC and s["entries"] == 402 and s["streams"] == len(snap.states)
    assert s["seen"] == snap.dedup["count"] and s["streams_root"] == snap.streams_root.hex()
    assert s["model"] == ACCOUNTS.name and s["fingerprint"] == ACCOUNTS.fingerprint
    assert s["created"] == "2023-11-14T22:13:20.000Z" and s["size_bytes"] == path.stat().st_size
    p0 = s["partitions"][0]
    assert p0["message_id"] == snap.partitions[0].message_id
    assert p0["chain_head"] == snap.partitions[0].head.hex()
    assert store.inspect(path, model=COUNTERS)["model_matches"] is False
    assert store.inspect(path, model=COUNTERS)["valid"] is False
    rewrite_body(path, lambda b: b.update(streams_root=bytes(32)))
    s = store.inspect(path)
    assert s["valid"] is False and s["reason"].startswith("streams_root mismatch") and s["streams"] == len(snap.states)
    path.write_bytes(path.read_bytes()[:50])
    s = store.inspect(path)
    assert s["valid"] is False and s["entries"] == 402 and s["reason"] == "truncated or not a snapshot file"


@pytest.fixture
def invoke(monkeypatch: pytest.MonkeyPatch):
    """Run the CLI in-process: ``run()`` ends the process with os._exit, so exit through SystemExit."""

    def fake_exit(code: int) -> None:
        raise SystemExit(code)

    monkeypatch.setattr(common, "exit_process", fake_exit)

    def call(*args: str):
        return CliRunner().invoke(common.cli, list(args), catch_exceptions=False)

    return call


def test_cli_lists_and_inspects(invoke, store: SnapshotStore, sample) -> None:
    folder, positions = sample
    good = store.write(take(folder, positions, created=1))
    bad = store.write(take(folder, positions, created=2))
    bad.write_bytes(bad.read_bytes()[:-5])
    root = str(store.root)

    r = invoke("snapshots", "snaps", "--snapshots", root, "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["topic"] == TOPIC and [s["path"] for s in out["snapshots"]] == [str(bad), str(good)]
    assert [s["valid"] for s in out["snapshots"]] == [False, True]

    r = invoke("snapshots", "snaps", "--snapshots", root, "--json", "--model", "chainfold.examples.counters")
    assert [s["model_matches"] for s in json.loads(r.stdout)["snapshots"]] == [False, False]

    r = invoke("snapshots", "snaps", "--snapshots", root)
    assert r.exit_code == 0
    assert good.name in r.stdout and "truncated or not a snapshot file" in r.stdout

    r = invoke("snapshots", "snaps", "--snapshots", root, "--inspect", good.name, "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["valid"] is True
    r = invoke("snapshots", "snaps", "--snapshots", root, "--inspect", str(bad))
    assert r.exit_code == 1 and "truncated" in r.stdout
    r = invoke("snapshots", "snaps", "--snapshots", root, "--inspect", "nope.cbor")
    assert r.exit_code == 2

    r = invoke("snapshots", "empty", "--snapshots", root)
    assert r.exit_code == 0 and "no snapshots" in r.stdout

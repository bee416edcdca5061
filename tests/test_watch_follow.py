"""EvidenceFollower: a real Tracker writes while the follower reads."""

from __future__ import annotations

import random
import threading
from pathlib import Path

import cbor2
import pytest

from chainfold.errors import CheckpointCorrupt
from chainfold.merkle import leaf_hash
from chainfold.tracker import NO_DIGEST, Tracker, state_digest
from chainfold.watch.follow import EvidenceFollower

from .test_tracker import payloads


def drain(f: EvidenceFollower, into: dict) -> None:
    b = f.poll()
    assert b.start == len(into["leaves"]) // 32
    into["leaves"] += b.leaves
    into["digests"] += b.digests
    into["cps"] += b.checkpoints
    into["lines"] += b.processed
    into["problems"] += b.problems


def fresh() -> dict:
    return {"leaves": b"", "digests": b"", "cps": [], "lines": [], "problems": []}


def test_waits_for_the_directory_then_reads_increments(tmp_path: Path) -> None:
    d = tmp_path / "not-yet"
    f = EvidenceFollower(d)
    assert not f.exists and not f.poll() and f.available() == 0
    ps = payloads(11)
    got = fresh()
    t = Tracker(d, segment_size=4, flush_interval=None, handling_times=True)
    for i, p in enumerate(ps):
        t.handled(p, f"1:{i}:-1:-1", state={"i": i})
        if i % 3 == 2:
            t.flush()
            drain(f, got)
    t.close()
    drain(f, got)
    assert got["leaves"] == b"".join(leaf_hash(p) for p in ps)
    assert got["digests"][32:64] == state_digest("s1", {"i": 1})
    assert [c.segment for c in got["cps"]] == [0, 1] and f.verified_through == 1
    assert [ln.event_id for ln in got["lines"]] == [f"e{i}" for i in range(11)]
    assert [ln.line for ln in got["lines"]] == list(range(1, 12))
    assert got["lines"][3].message_id == "1:3:-1:-1" and got["lines"][3].time is not None
    assert not f.poll()


def test_a_worker_restart_is_invisible(tmp_path: Path) -> None:
    f = EvidenceFollower(tmp_path)
    got = fresh()
    ps = payloads(20)
    t = Tracker(tmp_path, segment_size=4, flush_interval=None)
    for p in ps[:7]:
        t.handled(p, None)
    t.flush()
    drain(f, got)
    for p in ps[7:9]:
        t.handled(p, None)  # handled, never flushed: lost in the crash
    # the crash tore the next write: half a leaf, half a line
    with open(tmp_path / "checkpoints.leaves", "ab") as fh:
        fh.write(b"\x07" * 20)
    with open(tmp_path / "processed.jsonl", "a") as fh:
        fh.write('{"id": "e7"')
    drain(f, got)
    assert len(got["leaves"]) == 7 * 32 and len(got["lines"]) == 7  # torn tails not consumed
    t = Tracker(tmp_path, segment_size=4, flush_interval=None)  # the restarted worker
    for p in ps[7:]:
        t.handled(p, None)
    t.close()
    drain(f, got)
    assert got["leaves"] == b"".join(leaf_hash(p) for p in ps)
    assert [ln.event_id for ln in got["lines"]] == [f"e{i}" for i in range(20)]
    assert got["problems"] == [] and f.verified_through == 4


def test_bad_processed_lines_are_named_and_skipped(tmp_path: Path) -> None:
    (tmp_path / "processed.jsonl").write_text('{"id": "a"}\nnot json\n[1]\n{"id": ""}\n{"id": "b", "message_id": "1:1:-1:-1"}\n')
    b = EvidenceFollower(tmp_path).poll()
    assert [ln.event_id for ln in b.processed] == ["a", "b"]
    assert [p.split(":")[1] for p in b.problems] == ["2", "3", "4"]


def test_rewritten_evidence_is_refused(tmp_path: Path) -> None:
    t = Tracker(tmp_path, flush_interval=None)
    for p in payloads(5):
        t.handled(p, None)
    t.close()
    f = EvidenceFollower(tmp_path)
    f.poll()
    (tmp_path / "checkpoints.leaves").write_bytes(b"")
    with pytest.raises(CheckpointCorrupt, match="shrank"):
        f.poll()


def test_checkpoints_that_disagree_with_their_leaves_are_refused(tmp_path: Path) -> None:
    t = Tracker(tmp_path, segment_size=4, flush_interval=None)
    for p in payloads(8):
        t.handled(p, None)
    t.close()
    leaves = bytearray((tmp_path / "checkpoints.leaves").read_bytes())
    leaves[5 * 32] ^= 1  # segment 1's leaves no longer give its checkpoint's head
    (tmp_path / "checkpoints.leaves").write_bytes(bytes(leaves))
    with pytest.raises(CheckpointCorrupt, match="segment 1's head"):
        EvidenceFollower(tmp_path).poll()


def test_max_leaves_bounds_one_poll_and_state_continues(tmp_path: Path) -> None:
    t = Tracker(tmp_path, segment_size=8, flush_interval=None)
    ps = payloads(50)
    for p in ps:
        t.handled(p, None, state={"k": 1}, stream="s")
    t.close()
    f = EvidenceFollower(tmp_path, max_leaves=7)
    got = fresh()
    drain(f, got)
    assert len(got["leaves"]) == 7 * 32
    f2 = EvidenceFollower.from_state(tmp_path, cbor2.loads(cbor2.dumps(f.state())), max_leaves=7)
    while (b := f2.poll()).count:
        assert b.start == len(got["leaves"]) // 32
        got["leaves"] += b.leaves
        got["digests"] += b.digests
    assert got["leaves"] == b"".join(leaf_hash(p) for p in ps)
    assert got["digests"] == state_digest("s", {"k": 1}) * 50
    assert f2.verified_through == 5


def test_reading_while_a_tracker_writes_never_sees_a_torn_state(tmp_path: Path) -> None:
    """The reading rule: checkpoints within the leaves read, digests present for every leaf read
    once the worker gives them, processed lines never ahead of the leaves."""
    t = Tracker(tmp_path, segment_size=16, flush_interval=0.002, flush_every=37)
    ps = payloads(3000)
    stop = threading.Event()

    def worker() -> None:
        rnd = random.Random(5)
        for i, p in enumerate(ps):
            t.handled(p, None, state={"i": i}, stream="s")
            if rnd.random() < 0.01:
                t.flush()
        t.close()
        stop.set()

    th = threading.Thread(target=worker)
    f = EvidenceFollower(tmp_path)  # no cap: a capped poll leaves checkpoints ahead of its leaves
    got = fresh()
    th.start()
    while True:
        done = stop.is_set()
        drain(f, got)
        n = len(got["leaves"]) // 32
        assert all(c.size <= n for c in got["cps"])
        assert len(got["lines"]) <= n
        if done and not f.poll():
            break
    th.join()
    assert got["leaves"] == b"".join(leaf_hash(p) for p in ps)
    assert got["digests"] == b"".join(state_digest("s", {"i": i}) for i in range(3000))
    assert NO_DIGEST not in {got["digests"][k:k + 32] for k in range(0, len(got["digests"]), 32)}
    assert len(got["lines"]) == 3000

"""The Tracker's durability contract: time-bound flushes, the order of writes, torn tails, digests."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import chainfold.tracker as tracker_mod
from chainfold.envelope import Event, encode
from chainfold.hashing.checkpoints import CheckpointFile
from chainfold.tracker import NO_DIGEST, Tracker, state_digest


def payloads(n: int, start: int = 0) -> list[bytes]:
    return [encode(Event(f"e{i}", f"s{i % 3}", None, "T", 1_700_000_000_000 + i, {"i": i}))
            for i in range(start, start + n)]


def leaves_on_disk(d: Path) -> int:
    p = d / "checkpoints.leaves"
    return p.stat().st_size // 32 if p.exists() else 0


def wait_for(cond, timeout: float = 10.0) -> bool:
    """Poll ``cond`` until true or ``timeout`` (a generous bound: a contract, not a timing)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


def test_a_quiet_worker_s_evidence_is_written_on_the_time_bound(tmp_path: Path) -> None:
    t = Tracker(tmp_path, segment_size=8, flush_interval=0.2)
    for p in payloads(5):
        t.handled(p, None)
    assert leaves_on_disk(tmp_path) == 0  # nothing on the hot path
    # no further call: only the flusher thread can write it
    processed = tmp_path / "processed.jsonl"  # written last (the order of writes)
    assert wait_for(lambda: processed.exists() and len(processed.read_text().splitlines()) == 5)
    assert leaves_on_disk(tmp_path) == 5
    assert CheckpointFile(tmp_path / "checkpoints.jsonl").load_provisional().size == 5
    # a second burst arms the bound again
    for p in payloads(4, 5):
        t.handled(p, None)
    assert wait_for(lambda: len(processed.read_text().splitlines()) == 9)
    assert len(CheckpointFile(tmp_path / "checkpoints.jsonl").load()) == 1
    t.close()
    assert not t._flusher.is_alive()


def test_without_a_time_bound_nothing_is_written_before_flush(tmp_path: Path) -> None:
    t = Tracker(tmp_path, flush_interval=None)
    for p in payloads(10):
        t.handled(p, None)
    time.sleep(0.3)
    assert leaves_on_disk(tmp_path) == 0 and t._flusher is None
    t.flush()
    assert leaves_on_disk(tmp_path) == 10
    t.close()


def test_flush_every_still_flushes_by_count(tmp_path: Path) -> None:
    t = Tracker(tmp_path, flush_every=4, flush_interval=None)
    for p in payloads(9):
        t.handled(p, None)
    assert leaves_on_disk(tmp_path) == 8
    t.close()
    assert leaves_on_disk(tmp_path) == 9


def test_a_failed_background_flush_is_raised_to_the_worker(tmp_path: Path, monkeypatch) -> None:
    def broken(path: Path, data: bytes) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tracker_mod, "_append_durably", broken)
    t = Tracker(tmp_path, flush_interval=0.05)
    t.handled(payloads(1)[0], None)
    assert wait_for(lambda: t._failed is not None)
    with pytest.raises(OSError, match="No space"):
        t.handled(payloads(1, 1)[0], None)
    with pytest.raises(OSError):
        t.flush()


def test_handling_times_and_state_digests(tmp_path: Path) -> None:
    t = Tracker(tmp_path, segment_size=4, flush_interval=None, handling_times=True)
    ps = payloads(6)
    t0 = time.time_ns() // 1_000_000
    for i, p in enumerate(ps):
        if i < 2:
            t.handled(p, f"1:{i}:-1:-1", f"e{i}")  # no state yet: digests begin later
        else:
            t.handled(p, f"1:{i}:-1:-1", f"e{i}", state={"n": i})  # stream decoded from the payload
    t.close()
    lines = [json.loads(x) for x in (tmp_path / "processed.jsonl").read_text().splitlines()]
    assert [x["id"] for x in lines] == [f"e{i}" for i in range(6)]
    assert all(t0 <= x["time"] <= time.time_ns() // 1_000_000 for x in lines)
    states = (tmp_path / "checkpoints.states").read_bytes()
    assert len(states) == 6 * 32
    assert states[:64] == NO_DIGEST * 2
    assert states[64:96] == state_digest("s2", {"n": 2})
    # reopened without states: the records stay aligned with the leaves
    t = Tracker(tmp_path, segment_size=4, flush_interval=None)
    t.handled(payloads(1, 6)[0], None)
    t.close()
    assert (tmp_path / "checkpoints.states").read_bytes()[6 * 32:] == NO_DIGEST


def test_state_digest_is_canonical() -> None:
    a = state_digest("s", {"b": 1, "a": [1, 2.5, "é"]})
    assert a == state_digest("s", {"a": [1, 2.5, "é"], "b": 1})
    assert a != state_digest("t", {"b": 1, "a": [1, 2.5, "é"]})
    assert len(a) == 32 and a != NO_DIGEST


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=8), _json)
def test_state_digest_is_the_documented_formula(stream: str, state: object) -> None:
    """The prebuilt encoder gives exactly json.dumps(sort_keys, compact, ensure_ascii=False)."""
    import hashlib

    text = json.dumps(state, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    want = hashlib.sha256(b"\x03" + stream.encode("utf-8", "surrogatepass") + b"\x00"
                          + text.encode("utf-8", "surrogatepass")).digest()
    assert state_digest(stream, state) == want


def test_reopen_cuts_torn_tails_and_continues(tmp_path: Path) -> None:
    t = Tracker(tmp_path, segment_size=4, flush_interval=None)
    for p in payloads(6):
        t.handled(p, None, state={"x": 1}, stream="s")
    t.close()
    # a crash mid-flush: digests beyond the leaves, half a leaf, half a processed line
    with open(tmp_path / "checkpoints.states", "ab") as f:
        f.write(b"\x01" * 40)
    with open(tmp_path / "checkpoints.leaves", "ab") as f:
        f.write(b"\x02" * 7)
    with open(tmp_path / "processed.jsonl", "a") as f:
        f.write('{"id": "e6", "mess')
    t = Tracker(tmp_path, segment_size=4, flush_interval=None)
    assert t.size == 6
    assert (tmp_path / "checkpoints.states").stat().st_size == 6 * 32
    assert (tmp_path / "checkpoints.leaves").stat().st_size == 6 * 32
    for p in payloads(3, 6):
        t.handled(p, None, state={"x": 1}, stream="s")
    t.close()
    lines = (tmp_path / "processed.jsonl").read_text().splitlines()
    assert [json.loads(x)["id"] for x in lines] == [f"e{i}" for i in range(9)]
    assert len(CheckpointFile(tmp_path / "checkpoints.jsonl").load()) == 2


def test_concurrent_handlers_and_flusher_lose_nothing(tmp_path: Path) -> None:
    t = Tracker(tmp_path, segment_size=16, flush_interval=0.01, flush_every=50)
    ps = payloads(2000)

    def work(k: int) -> None:
        for p in ps[k::4]:
            t.handled(p, None)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    t.close()
    assert leaves_on_disk(tmp_path) == 2000
    cps = CheckpointFile(tmp_path / "checkpoints.jsonl").load()
    assert cps[-1].size == 2000
    ids = [json.loads(x)["id"] for x in (tmp_path / "processed.jsonl").read_text().splitlines()]
    assert sorted(ids) == sorted(f"e{i}" for i in range(2000))
    # the files agree with each other: a reopened tracker re-derives the chain from the leaves
    assert Tracker(tmp_path, flush_interval=None).size == 2000


def test_a_forked_child_gets_its_own_flusher(tmp_path: Path) -> None:
    t = Tracker(tmp_path / "parent", flush_interval=0.05)
    t.handled(payloads(1)[0], None)
    assert wait_for(lambda: leaves_on_disk(tmp_path / "parent") == 1)
    pid = os.fork()
    if pid == 0:  # the child writes its own evidence with the inherited tracker's settings
        code = 1
        try:
            c = Tracker(tmp_path / "child", flush_interval=0.05)
            c.handled(payloads(1)[0], None)
            code = 0 if wait_for(lambda: leaves_on_disk(tmp_path / "child") == 1, 5) else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    t.close()


def test_with_a_time_bound_the_count_flush_runs_in_the_flusher(tmp_path: Path) -> None:
    t = Tracker(tmp_path, flush_every=4, flush_interval=60.0)  # the count, not the minute, triggers it
    for p in payloads(9):
        t.handled(p, None)
    assert wait_for(lambda: leaves_on_disk(tmp_path) >= 8)
    t.close()
    assert leaves_on_disk(tmp_path) == 9

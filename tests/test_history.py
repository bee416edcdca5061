"""History (docs/cli.md#history): seq gaps and lost entries, in verify, rebuild and reconcile (memory log;
the same on real brokers in test_history_broker.py).

Every expectation is computed here from the events as built (which streams start where, which
entries were cut), never from chainfold's own output."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chainfold import merkle, rebuild, reconcile, verify
from chainfold.engines.parallel import parallel_rebuild, parallel_verify
from chainfold.envelope import Event, encode
from chainfold.errors import HistoryUnrecoverable
from chainfold.examples import accounts
from chainfold.log import MemoryLog
from chainfold.ops.reconcile import load_processed
from chainfold.replay.decode import Decoded, SeqGap, SeqGaps
from chainfold.replay.model import load_model
from chainfold.store.snapshots import SnapshotStore

from .test_reconcile import gen_events

MODEL = load_model("chainfold.examples.accounts")


def gen(n: int, streams: int, seed: int = 3) -> list[Event]:
    """Events with their true per-stream seqs (1, 2, ... in each stream)."""
    return gen_events(n, streams, seed)


def log_of(events: list[Event | bytes], name: str = "t") -> MemoryLog:
    log = MemoryLog(name)
    add(log, events)
    return log


def add(log: MemoryLog, events: list[Event | bytes]) -> list[str]:
    rows = [(e, None, None) if isinstance(e, bytes) else (encode(e), e.stream, e.time) for e in events]
    return [str(m) for m in log.append_payloads(rows)]


def fold(events: list[Event]) -> dict[str, Any]:
    states: dict[str, Any] = {}
    for ev in events:
        states[ev.stream] = accounts.apply(states.get(ev.stream) or accounts.initial(ev.stream), ev)
    return {s: accounts.render(v) for s, v in sorted(states.items())}


def expected_gaps(events: list[Event], mids: list[str]) -> list[dict[str, Any]]:
    """The seq rule, written out plainly over (event, message id) in log order."""
    top: dict[str, int] = {}
    out = []
    for ev, mid in zip(events, mids):
        if ev.seq is None:
            continue
        t = top.get(ev.stream, 0)
        if ev.seq > t + 1:
            out.append({"stream": ev.stream, "expected_seq": t + 1, "found_seq": ev.seq, "message_id": mid})
        top[ev.stream] = max(t, ev.seq)
    return out


# --- the rule ----------------------------------------------------------------------------------------


def decoded(events: list[Event], start: int = 0) -> Decoded:
    return Decoded(events, None, range(start, start + len(events)), None, [b""] * len(events))


def test_the_seq_rule_exactly() -> None:
    def ev(stream: str, seq: int | None) -> Event:
        return Event(f"{stream}{seq}", stream, seq, "T", 1, {})

    seqs = SeqGaps()
    seqs(decoded([ev("a", 1), ev("a", 2), ev("a", 4), ev("b", 3), ev("c", 1), ev("c", 2), ev("c", 2), ev("c", 1),
                  ev("c", 3), ev("d", None), ev("a", 4), ev("a", 7), ev("a", 5)]))
    assert seqs.gaps == [SeqGap("a", 3, 4, "@2", 2), SeqGap("b", 1, 3, "@3", 3), SeqGap("a", 5, 7, "@11", 11)]
    assert seqs.unverifiable == 1 and seqs.highest == {"a": 7, "b": 3, "c": 3}
    assert SeqGaps.restore(seqs.state()) == seqs


stream_events = st.lists(st.tuples(st.sampled_from("abcde"), st.one_of(st.none(), st.integers(1, 12))), max_size=60)


@settings(max_examples=200, deadline=None)
@given(items=stream_events, cuts=st.lists(st.integers(0, 60), max_size=4))
def test_ranges_checked_apart_combine_into_the_whole(items: list[tuple[str, int | None]], cuts: list[int]) -> None:
    """A log checked in ranges, each from an empty state (parallel verify), gives the same gaps as
    one check of the whole; so does a check split by streams (shards) and joined."""
    evs = [Event(f"e{i}", s, q, "T", 1, {}) for i, (s, q) in enumerate(items)]
    whole = SeqGaps()
    whole(decoded(evs))
    bounds = sorted({0, len(evs), *(c for c in cuts if c <= len(evs))})
    merged = SeqGaps()
    for lo, hi in zip(bounds, bounds[1:]):
        part = SeqGaps()
        part(decoded(evs[lo:hi], lo))
        merged.then(part)
    assert merged == whole
    joined = SeqGaps()
    forks = []
    for shard in ("ab", "cde"):
        f = joined.fork()
        f(Decoded([e for e in evs if e.stream in shard], [k for k, e in enumerate(evs) if e.stream in shard],
                  range(len(evs)), None, [b""] * len(evs)))
        forks.append(f)
    joined.join(forks)
    assert joined == whole


# --- seq gaps in the reports -------------------------------------------------------------------------


def started_late(n: int = 600, streams: int = 6, cut: int = 4) -> tuple[list[Event], list[Event]]:
    """The events, and those a log holds that lost each stream's first ``cut`` events before anyone read it."""
    evs = gen(n, streams)
    return evs, [e for e in evs if e.seq > cut]


def test_verify_names_every_stream_that_starts_late_and_exits_3(tmp_path: Path) -> None:
    _, held = started_late()
    log = log_of(held)
    mids = [str(e.message_id) for e in log.entries()]
    report = verify(log, record_dir=tmp_path)
    doc = report.to_json()
    assert doc["verdict"] == "mismatch" and doc["first_mismatch"] is None and report.exit_code == 3
    assert doc["history"] == "gaps" and doc["seq_gaps"] == expected_gaps(held, mids)
    assert len(doc["seq_gaps"]) == 6 and {g["found_seq"] for g in doc["seq_gaps"]} == {5}
    assert doc["error"].startswith("events are missing from the log itself: 6 seq gap(s)")
    # told that the log starts mid-history: reported, not a failure
    ok = verify(log, record_dir=tmp_path, allow_partial_history=True).to_json()
    assert ok["verdict"] == "intact" and "error" not in ok and ok["seq_gaps"] == doc["seq_gaps"]


def test_verify_counts_malformed_entries_and_gives_the_log_root(tmp_path: Path) -> None:
    evs = gen(100, 4)
    items: list[Event | bytes] = [*evs[:10], b"", *evs[10:50], b'{"id": "x"}', *evs[50:]]
    log = log_of(items)
    doc = verify(log, record_dir=tmp_path).to_json()
    payloads = [e.payload for e in log.entries()]
    assert doc["verdict"] == "intact" and doc["history"] == "complete" and doc["seq_gaps"] == []
    assert doc["malformed_entries"] == 2
    assert doc["malformed_first"] == [str(log.entries()[10].message_id), str(log.entries()[51].message_id)]
    assert doc["log"]["root"] == merkle.root([merkle.leaf_hash(p) for p in payloads]).hex()


def test_foreign_events_without_seq_are_unverifiable_not_gaps(tmp_path: Path) -> None:
    evs = gen(50, 3)
    foreign = [e._replace(seq=None) for e in gen(20, 2, seed=9)]
    log = log_of([*evs, *foreign])
    doc = verify(log, record_dir=tmp_path).to_json()
    assert doc["verdict"] == "intact" and doc["seq_gaps"] == [] and doc["seq_unverifiable"] == 20


def test_a_dropped_event_is_a_gap_in_rebuild_and_the_check_continues_across_a_snapshot(tmp_path: Path) -> None:
    evs = gen(400, 5)
    log = log_of(evs[:200])
    first = rebuild(log, MODEL, snapshots_root=tmp_path, snapshot_every=0)
    assert first.history.state == "complete" and first.history.problem() is None and first.written
    # after the snapshot: one event never reaches the log
    lost = evs[300]
    tail = [e for e in evs[200:] if e.id != lost.id]
    mids = add(log, tail)
    after = rebuild(log, MODEL, snapshots_root=tmp_path, write_snapshots=False)
    assert after.snapshot is not None and after.from_snapshot == 200
    nxt = next(k for k, e in enumerate(tail) if e.stream == lost.stream and e.seq == lost.seq + 1)
    gap = {"stream": lost.stream, "expected_seq": lost.seq, "found_seq": lost.seq + 1, "message_id": mids[nxt]}
    assert after.to_json()["seq_gaps"] == [gap] and after.history.state == "gaps"
    assert after.history.problem() is not None
    # the same gap from the start of the log, and from a snapshot taken after it
    full = rebuild(log, MODEL, snapshots_root=tmp_path, full=True)
    assert full.to_json()["seq_gaps"] == [gap]
    again = rebuild(log, MODEL, snapshots_root=tmp_path, write_snapshots=False)
    assert again.from_snapshot == len(log.entries()) and again.to_json()["seq_gaps"] == [gap]
    assert rebuild(log, MODEL, snapshots_root=tmp_path, allow_partial_history=True,
                   write_snapshots=False).history.problem() is None


def test_parallel_engines_report_the_serial_gaps(tmp_path: Path) -> None:
    _, held = started_late(900, 7, cut=2)
    held = [e for e in held if e.seq != 9]  # and a jump inside every stream
    log = log_of(held)
    serial_v = verify(log, record_dir=tmp_path / "a", segment_size=64).to_json()
    verify(log, record_dir=tmp_path / "b", segment_size=64)  # recorded: the next one splits into ranges
    par_v = parallel_verify(log, record_dir=tmp_path / "b", workers=3).to_json()
    assert par_v["seq_gaps"] == serial_v["seq_gaps"] == expected_gaps(held, [str(e.message_id) for e in log.entries()])
    assert par_v.get("workers") == 3
    serial_r = rebuild(log, MODEL, snapshots_root=tmp_path / "c", write_snapshots=False).to_json()
    for split in ("fanout", "readers"):
        par_r = parallel_rebuild(log, "chainfold.examples.accounts", snapshots_root=tmp_path / split, workers=2,
                                 split=split, write_snapshots=False).to_json()
        assert par_r["seq_gaps"] == serial_r["seq_gaps"] == serial_v["seq_gaps"]


# --- lost entries ------------------------------------------------------------------------------------


def truncated_world(tmp_path: Path, *, cut: int = 1500, more: int = 500) -> tuple[MemoryLog, list[Event], list[str]]:
    """3,000 events read by chainfold (record, snapshots at 1,000, 2,000, 3,000), then the first
    ``cut`` entries gone (retention), then ``more`` events; the events and message ids as they were."""
    evs = gen(3000 + more, 10)
    log = log_of(evs[:3000])
    rebuild(log, MODEL, snapshots_root=tmp_path, snapshot_every=1000, keep=5)
    mids = [str(e.message_id) for e in log.entries()]
    mids += add(log, evs[3000:])  # (the memory log numbers entries by position: add before cutting)
    del log._parts[log.partitions()[0]][:cut]
    return log, evs, mids


def test_verify_names_what_is_gone_and_checks_the_rest_at_its_recorded_positions(tmp_path: Path) -> None:
    log, evs, mids = truncated_world(tmp_path)
    snaps = {i.entries: str(i.path) for i in SnapshotStore(tmp_path, log.topic).list()}
    doc = verify(log, record_dir=tmp_path / "public.default.t", snapshots_root=tmp_path).to_json()
    assert doc["truncated"] == [{
        "partition": log.partitions()[0], "first_available": mids[1500], "first_available_index": 1500,
        "recorded_first": mids[0], "entries_lost": 1500, "unverifiable_segments": [0, 1],
        "checked_from": 1500, "covered_by_snapshot": snaps[3000]}]
    assert doc["history"] == "truncated" and doc["seq_gaps"] == [] and doc["first_mismatch"] is None
    assert doc["verdict"] == "intact" and doc["log"]["events"] == 3500 and "error" not in doc
    assert any("in the part of" in n and snaps[1000] in n for n in doc["notes"])
    # the root is over the recorded positions: the lost leaves are the recorded ones
    assert doc["log"]["root"] == merkle.root([merkle.leaf_hash(encode(e)) for e in evs]).hex()
    # no snapshot covers the loss: history unrecoverable, exit 3, nothing called tampering
    for p in snaps.values():
        os.unlink(p)
    report = verify(log, record_dir=tmp_path / "public.default.t", snapshots_root=tmp_path)
    bare = report.to_json()
    assert report.exit_code == 3 and bare["verdict"] == "mismatch" and bare["first_mismatch"] is None
    assert bare["error"].startswith("history is gone and no valid snapshot covers the gap: ")
    assert f"entries before message id {mids[1500]} are gone" in bare["error"]
    assert bare["truncated"][0]["covered_by_snapshot"] is None
    # a change in what is left is still named exactly, at its recorded position
    entries = log._parts[log.partitions()[0]]
    entries[2100 - 1500] = entries[2100 - 1500]._replace(payload=encode(evs[2100]._replace(data={"amount": 1})))
    tampered = verify(log, record_dir=tmp_path / "public.default.t", snapshots_root=tmp_path)
    assert tampered.exit_code == 1 and tampered.mismatch.index == 2100
    assert tampered.to_json()["first_mismatch"]["message_id"] == mids[2100]


def test_rebuild_over_lost_entries(tmp_path: Path) -> None:
    log, evs, mids = truncated_world(tmp_path)
    res = rebuild(log, MODEL, snapshots_root=tmp_path, write_snapshots=False)
    doc = res.to_json()
    assert res.from_snapshot == 3000 and res.folder.rendered() == fold(evs)
    assert doc["history"] == "truncated" and doc["truncated"][0]["first_available"] == mids[1500]
    assert doc["truncated"][0]["covered_by_snapshot"] == res.snapshot_path and doc["seq_gaps"] == []
    assert res.history.problem() is None
    with pytest.raises(HistoryUnrecoverable) as info:
        rebuild(log, MODEL, snapshots_root=tmp_path, full=True, write_snapshots=False)
    err = info.value
    assert err.message_id == mids[1500] and err.details["history"] == "truncated"
    assert str(err).startswith("history is gone and no valid snapshot covers the gap")
    part = rebuild(log, MODEL, snapshots_root=tmp_path, full=True, write_snapshots=False,
                   allow_partial_history=True)
    pd = part.to_json()
    assert part.folder.rendered() == fold(evs[1500:]) and pd["log_mismatch"] is None
    assert pd["history"] == "truncated" and pd["seq_gaps"] == [] and pd["log"]["events"] == 3500


def worker_files(tmp_path: Path, handled: list[Event], state: dict[str, Any]) -> tuple[str, str]:
    proc = tmp_path / "processed.jsonl"
    proc.write_text("".join(json.dumps({"id": e.id}) + "\n" for e in handled))
    st_path = tmp_path / "state.json"
    st_path.write_text(json.dumps(state))
    return str(proc), str(st_path)


def test_reconcile_starts_from_the_snapshot_that_covers_lost_entries(tmp_path: Path) -> None:
    log, evs, mids = truncated_world(tmp_path / "s")
    proc, st_path = worker_files(tmp_path, evs, fold(evs))
    report = reconcile(log, MODEL, snapshots_root=tmp_path / "s", state=fold(evs), state_path=st_path,
                       processed=load_processed(proc)).to_json()
    assert report["verdict"] == "consistent" and report["replayed"]["from_snapshot"] == 3000
    assert report["history"] == "truncated" and report["truncated"][0]["first_available"] == mids[1500]
    assert report["history_unchecked"]["handled"] == 3000 and report["history_unchecked"]["lines"] == [1, 3000]
    # a worker that missed one event after the snapshot and got its stream wrong
    missed = evs[3200]
    handled = [e for e in evs if e.id != missed.id]
    wrong = fold(handled)
    proc, st_path = worker_files(tmp_path, handled, wrong)
    bad = reconcile(log, MODEL, snapshots_root=tmp_path / "s", state=wrong, state_path=st_path,
                    processed=load_processed(proc)).to_json()
    assert bad["verdict"] == "divergent" and bad["missing"] == [missed.id]
    assert bad["first_divergence"] == {"index": 3200, "segment": 3, "event_id": missed.id, "message_id": mids[3200]}
    right = fold(evs)
    assert [d["stream"] for d in bad["divergent_streams"]] == sorted(s for s in right if right[s] != wrong.get(s))
    # the snapshots gone too: unrecoverable
    for info in SnapshotStore(tmp_path / "s", log.topic).list():
        os.unlink(info.path)
    with pytest.raises(HistoryUnrecoverable):
        reconcile(log, MODEL, snapshots_root=tmp_path / "s", state=wrong, processed=load_processed(proc))


def test_reconcile_over_seq_gaps_is_unrecoverable_unless_allowed(tmp_path: Path) -> None:
    _, held = started_late(300, 3)
    log = log_of(held)
    proc, st_path = worker_files(tmp_path, held, fold(held))
    report = reconcile(log, MODEL, snapshots_root=tmp_path, state=fold(held), state_path=st_path,
                       processed=load_processed(proc)).to_json()
    assert report["verdict"] == "unrecoverable" and report["history"] == "gaps" and len(report["seq_gaps"]) == 3
    assert report["missing"] == [] and report["divergent_streams"] == [] and "error" in report
    ok = reconcile(log, MODEL, snapshots_root=tmp_path / "x", state=fold(held), state_path=st_path,
                   processed=load_processed(proc), allow_partial_history=True).to_json()
    assert ok["verdict"] == "consistent" and ok["seq_gaps"] == report["seq_gaps"]


def test_verify_continues_the_seq_check_from_a_snapshot_that_matches_the_log(tmp_path: Path) -> None:
    """The cheap path: a snapshot whose chain agrees with the log gives the seq state (and the
    malformed count) before it, so only the entries after it are decoded; same findings."""
    evs = gen(600, 5)
    held: list[Event | bytes] = [e for e in evs if e.id != evs[100].id]  # a gap before the snapshot
    held.insert(50, b"junk")
    log = log_of(held[:400])
    rebuild(log, MODEL, snapshots_root=tmp_path, snapshot_every=0)
    add(log, [e for e in held[400:] if not isinstance(e, bytes) and e.id != evs[500].id])  # and one after
    record = tmp_path / "public.default.t"
    fast = verify(log, record_dir=record, snapshots_root=tmp_path).to_json()
    slow = verify(log, record_dir=tmp_path / "other").to_json()
    assert fast["seq_checked_from"]["entries"] == 400 and slow["seq_checked_from"] is None
    assert fast["seq_gaps"] == slow["seq_gaps"] and len(fast["seq_gaps"]) == 2
    assert fast["malformed_entries"] == slow["malformed_entries"] == 1
    # the next verify starts where the last one ended (its state beside the record): nothing to decode
    n = len(log.entries())
    again = verify(log, record_dir=tmp_path / "other").to_json()
    assert again["seq_checked_from"] == {"path": str(tmp_path / "other" / "history.cbor"), "entries": n}
    assert again["seq_gaps"] == slow["seq_gaps"] and again["malformed_entries"] == 1
    # a snapshot that disagrees with the log is no ground for the check: said, and exit 1
    entries = log._parts[log.partitions()[0]]
    entries[10] = entries[10]._replace(payload=encode(evs[10]._replace(data={"amount": 7})))
    bad = verify(log, record_dir=tmp_path / "third", snapshots_root=tmp_path)
    assert bad.exit_code == 1 and any("every entry was checked instead" in n for n in bad.to_json()["notes"])
    assert bad.to_json()["seq_checked_from"] is None
    assert verify(log, record_dir=tmp_path / "other").exit_code == 1  # and the record disagrees too


def test_reconcile_from_a_snapshot_lists_unknown_ids_and_skips_poison_events(tmp_path: Path) -> None:
    """Issues 14 and 16 together: the reference starts at the snapshot that covers lost entries, an id
    the log never held is a finding (ids the snapshot folded are not: they are history_unchecked), and
    the reference fold handles a model error by the policy given."""
    from chainfold.errors import ModelError

    from .test_poison import foreign

    evs = gen(3500, 10)
    log = log_of(evs[:3000])
    rebuild(log, MODEL, snapshots_root=tmp_path / "s", snapshot_every=1000, keep=5)
    bad_mid = add(log, [*evs[3000:], foreign("bad-1", evs[0].stream)])[-1]
    del log._parts[log.partitions()[0]][:1500]  # retention
    ids = [e.id for e in evs[:3101]] + ["ghost-1"] + [e.id for e in evs[3101:]] + ["bad-1"]
    proc = tmp_path / "processed.jsonl"
    proc.write_text("".join(json.dumps({"id": i}) + "\n" for i in ids))
    state = {**fold(evs), "ghost-stream": {"balance": 5}}
    with pytest.raises(ModelError):
        reconcile(log, MODEL, snapshots_root=tmp_path / "s", state=state, processed=load_processed(str(proc)))
    report = reconcile(log, MODEL, snapshots_root=tmp_path / "s", state=state, processed=load_processed(str(proc)),
                       on_model_error="skip-event", repair=True)
    doc = report.to_json()
    assert doc["unknown_ids"] == ["ghost-1"] and doc["unknown_streams"] == ["ghost-stream"]
    assert [(k["event_id"], k["message_id"]) for k in doc["skipped"]] == [("bad-1", bad_mid)]
    assert doc["replayed"]["from_snapshot"] == 3000 and doc["history"] == "truncated" and doc["missing"] == []
    assert doc["history_unchecked"]["handled"] == 3000 and doc["processed"]["events"] == len(ids)
    assert doc["first_divergence"]["index"] == 3101
    assert [(d["stream"], d["expected"]) for d in doc["divergent_streams"]] == [("ghost-stream", None)]
    assert doc["verdict"] == "repaired" and report.repaired_states == fold(evs)

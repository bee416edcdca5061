"""The distributed engine's driver (chainfold.engines.distributed) gives the local engine's results,
on the in-process cluster (chainfold.engines.cluster.InProcess) with the in-memory log: reports,
states, recorded checkpoints and leaf hashes, snapshots (``created`` aside), errors. The same
driver on Spark: test_spark_engine.py.

Also the parts it is made of: ``ChainBuilder.add_range`` and ``PieceStage`` (compact ranges merged
into the local hash stage) against the local hash stage, and the seen ids fed in the local decode
stage's batches (what a snapshot stores depends on them)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chainfold.engines.cluster import InProcess
from chainfold.engines.distributed import (Distribution, distributed_rebuild, distributed_reconcile_engine,
                                           distributed_scanner, distributed_verify)
from chainfold.engines.spark_io import LedgerSpan, plan_partition
from chainfold.envelope import Event, encode
from chainfold.errors import HistoryUnrecoverable, InvalidArgument, ModelError
from chainfold.hashing.chain import ChainBuilder
from chainfold.hashing.record import PartitionRecord
from chainfold.hashing.stage import HashStage, Piece, PieceStage, leaf_hashes
from chainfold.log import Entry, MemoryLog
from chainfold.log.source import Source, Span
from chainfold.merkle import CompactRange
from chainfold.ops.rebuild import rebuild
from chainfold.ops.reconcile import load_processed, load_tracker, reconcile
from chainfold.ops.verify import VerifyOptions, compare_logs, verify_log
from chainfold.replay.dedup import DedupIndex
from chainfold.replay.model import load_model
from chainfold.store.snapshots import topic_dir
from chainfold.tracker import Tracker

from .distributed_cases import MODEL, POISON_MODEL, assert_same_store, events, messy, normalized
from .test_reconcile import gen_events

# --- the in-memory log on the in-process cluster ---------------------------------------------------


def memory_planner(elog: MemoryLog, min_entries: int = 1):
    """Plans ranges of an in-memory log, its layout read from its entries (a test's stand-in for
    probing a broker)."""

    def plan(partition, *, recorded, after, after_index, target_ranges):
        def layout(_start):
            spans: list[LedgerSpan] = []
            for e in elog.entries(partition):
                m = e.message_id
                if spans and spans[-1].ledger == m.ledger and spans[-1].first + spans[-1].entries == m.entry:
                    spans[-1] = spans[-1]._replace(entries=spans[-1].entries + 1)
                else:
                    spans.append(LedgerSpan(m.ledger, m.entry, 1))
            return spans

        return plan_partition(partition, layout=layout, recorded=recorded, after=after, after_index=after_index,
                              target_ranges=target_ranges, min_entries=min_entries)

    return plan


def dist_of(elog: MemoryLog, parallelism: int = 2, groups: int = 3) -> Distribution:
    return Distribution(InProcess(parallelism, groups), lambda: elog, memory_planner(elog))


def both_rebuilds(elog: MemoryLog, tmp: Path, model: str = MODEL, **opts: Any) -> tuple[Any, Any]:
    a = rebuild(elog, load_model(model), snapshots_root=tmp / "local", **opts)
    b = distributed_rebuild(dist_of(elog), elog, model, snapshots_root=tmp / "dist", **opts)
    return a, b


def assert_same_rebuild(a: Any, b: Any, tmp: Path, topic: str) -> None:
    roots = (tmp / "local", tmp / "dist")
    assert normalized(a.to_json(), roots) == normalized(b.to_json(), roots)
    assert a.folder.rendered() == b.folder.rendered()
    assert list(a.folder.states) == list(b.folder.states)  # the order the fold stage holds them in
    if b.written or b.snapshot is not None:  # else the driver does not gather the seen ids: nothing stores them
        assert len(a.folder.seen) == len(b.folder.seen)  # the ids themselves: the snapshots' manifests, below
    assert a.folder.fold.skipped == b.folder.fold.skipped
    assert_same_store(tmp / "local", tmp / "dist", topic)


# --- the parts -------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 300), seg=st.sampled_from([1, 2, 8, 64]), cuts=st.lists(st.integers(1, 299), max_size=8))
def test_add_range_gives_what_add_leaves_gives(n: int, seg: int, cuts: list[int]) -> None:
    leaves = leaf_hashes(Entry(None, None, 0, None, b"%d" % i) for i in range(n))  # type: ignore[arg-type]
    a, b = ChainBuilder(seg), ChainBuilder(seg)
    got_a = [cp for i in range(0, n, seg) if (cp := a.add_leaves(leaves[i:i + seg], f"f{i}", f"l{i}")) is not None]
    bounds = sorted({c for c in cuts if c < n} | set(range(seg, n, seg)) | {n})
    got_b, lo = [], 0
    for hi in bounds:
        if hi > lo:
            cr = CompactRange(lo)
            cr.extend(leaves[lo:hi])
            first = f"f{lo}" if lo % seg == 0 else None
            cp = b.add_range(cr, first, f"l{(hi - 1) // seg * seg}", leaves[hi - 1])
            if cp is not None:
                got_b.append(cp)
            lo = hi
    assert got_a == got_b
    assert a.state() == b.state()
    with pytest.raises(InvalidArgument):  # not where the chain is
        b.add_range(CompactRange.from_hashes(n + 1, n + 2, [bytes(32)]), None, None, None)


def _entries(n: int, tag: bytes = b"") -> MemoryLog:
    elog = MemoryLog("pieces")
    elog.append_payloads([(tag + b"entry-%d" % i, None, None) for i in range(n)])
    return elog


def _pieces(elog: MemoryLog, seg: int, cuts: list[int], start: int = 0, carry_from: int = 0) -> list[Piece]:
    entries = elog.entries()[start:]
    leaves = leaf_hashes(entries)
    end = start + len(entries)
    bounds = sorted({c for c in cuts if start < c < end} | set(range((start // seg + 1) * seg, end, seg)) | {end})
    out, lo = [], start
    for hi in bounds:
        if hi > lo:
            out.append(Piece.of(leaves[lo - start:hi - start], lo, str(entries[lo - start].message_id),
                                str(entries[hi - 1 - start].message_id), carry=lo >= carry_from))
            lo = hi
    return out


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 200), more=st.integers(0, 100), seg=st.sampled_from([4, 16]),
       cuts=st.lists(st.integers(1, 299), max_size=5), tamper=st.one_of(st.none(), st.integers(0, 199)),
       carry=st.booleans())
def test_piece_stage_checks_and_records_like_the_hash_stage(tmp_path_factory: pytest.TempPathFactory, n: int,
                                                            more: int, seg: int, cuts: list[int],
                                                            tamper: int | None, carry: bool) -> None:
    """Record the first ``n`` entries, then (maybe after altering one of them) check and extend
    the record with ``more``: the piece-fed stage finds the same mismatch, names the same entry
    and writes the same files as the entry-fed one, whether or not the pieces carry their leaves."""
    root = tmp_path_factory.mktemp("pieces")
    elog = _entries(n)
    runs: list[Any] = []
    for side in ("local", "pieces"):
        record = PartitionRecord(root / side, elog.topic)
        stage = HashStage.open(elog, elog.topic, record=record, segment_size=seg)
        for b in Source(elog, Span(elog.topic)):
            stage.feed(b)
        stage.finish()
    if tamper is not None and tamper < n:
        elog._parts[elog.topic][tamper] = elog.entries()[tamper]._replace(payload=b"altered")
    elog.append_payloads([(b"later-%d" % i, None, None) for i in range(more)])
    for side in ("local", "pieces"):
        record = PartitionRecord(root / side, elog.topic)
        if side == "local":
            stage = HashStage.open(elog, elog.topic, record=record, segment_size=seg)
            for b in Source(elog, Span(elog.topic)):
                stage.feed(b)
            scan = stage.finish(read_to_end=True)
        else:
            stage = PieceStage.open(elog, elog.topic, record=record, segment_size=seg)
            carry_from = stage.writer.in_file * seg if carry and stage.writer else 1 << 60
            for piece in _pieces(elog, seg, cuts, carry_from=carry_from):
                stage.feed_piece(piece)
            scan = stage.finish(read_to_end=True)
        runs.append((scan.mismatch, scan.checkpoints, scan.recorded_new, scan.head,
                     {p.name: p.read_bytes() for p in sorted((root / side).iterdir())}))
    assert runs[0] == runs[1]


@pytest.mark.parametrize("memory", [0, 20_000, 150_000, 300_000, 1 << 25])
def test_dedup_pieces_are_cut_where_the_local_index_spills(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            memory: int) -> None:
    """A snapshot stores the manifest the dedup index's ``checkpoint()`` returns, which depends on
    where it spilled and what each piece holds: the driver writes the ids first seen
    (``add_fresh``, no ``add_new``) cut where the local decode stage's batches make the index spill
    (bounds from every batch to several batches per piece, or none between snapshots), and
    checkpoints at the same points, from a snapshot too (ids it holds are duplicates)."""
    calls: list[Any] = []
    checkpoint = DedupIndex.checkpoint

    def spy_checkpoint(self):  # type: ignore[no-untyped-def]
        manifest = checkpoint(self)
        calls.append(("checkpoint", len(self), manifest))
        return manifest

    monkeypatch.setattr(DedupIndex, "checkpoint", spy_checkpoint)
    elog = MemoryLog("spy")
    messy(elog, 2600)
    elog.append([Event(f"id-{'é' * (i % 7)}-{i}", f"acct-{i % 50:04d}", None, "deposit", 1, {"amount": 1})
                 for i in range(3000)])  # ids of many lengths, some not ASCII
    logs: dict[str, list[Any]] = {}

    def run(side: str) -> None:
        calls.clear()
        opts = dict(snapshots_root=tmp_path / side, snapshot_every=4000, dedup_memory=memory)
        if side == "local":
            rebuild(elog, load_model(MODEL), **opts)
        else:
            distributed_rebuild(dist_of(elog), elog, MODEL, **opts)
        logs.setdefault(side, []).extend(calls)

    run("local")
    run("dist")
    elog.append([Event(f"x{i}", "acct-0001", None, "deposit", 1, {"amount": 1}) for i in range(1300)])
    elog.append(events(2600)[:5], assign_seq=False)  # duplicates of events before the snapshot
    run("local")
    run("dist")
    assert logs["local"] == logs["dist"]
    assert sum(c[0] == "checkpoint" for c in logs["local"]) >= 3
    assert_same_store(tmp_path / "local", tmp_path / "dist", elog.topic)


# --- rebuild ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("partitions", [0, 3])
@pytest.mark.parametrize("every", [0, 500])
def test_rebuild_gives_the_local_result(tmp_path: Path, partitions: int, every: int) -> None:
    elog = MemoryLog("rb", partitions=partitions)
    messy(elog, 3000)
    a, b = both_rebuilds(elog, tmp_path, snapshot_every=every)
    assert a.to_json()["duplicates"] and a.to_json()["malformed"]
    assert_same_rebuild(a, b, tmp_path, elog.topic)
    # again, from the snapshots, after more events and duplicates of events the snapshot covers
    elog.append(events(200, seed=7))
    elog.append(events(3000)[100:130], assign_seq=False)
    a, b = both_rebuilds(elog, tmp_path, snapshot_every=every)
    assert a.to_json()["snapshot"] is not None and len(a.to_json()["duplicates"]) >= 30
    assert_same_rebuild(a, b, tmp_path, elog.topic)
    a, b = both_rebuilds(elog, tmp_path, snapshot_every=every, full=True)
    assert_same_rebuild(a, b, tmp_path, elog.topic)


def test_rebuild_of_some_streams_and_bounded_rebuilds(tmp_path: Path) -> None:
    elog = MemoryLog("bounded")
    messy(elog, 2500)
    entries = elog.entries()
    streams = frozenset({"acct-0003", "acct-0007"})
    for i, opts in enumerate([dict(streams=streams, write_snapshots=False), dict(until=entries[1234].message_id),
                              dict(until_time=entries[2000].publish_time), dict(until=entries[0].message_id)]):
        a, b = both_rebuilds(elog, tmp_path / str(i), **opts)  # type: ignore[arg-type]
        assert_same_rebuild(a, b, tmp_path / str(i), elog.topic)


def _poison(tmp_path: Path) -> str:
    path = tmp_path / "poison_model.py"
    path.write_text(POISON_MODEL)
    return f"{path}:"


def test_a_model_error_stops_where_the_local_rebuild_stops(tmp_path: Path) -> None:
    """With ``stop``, the first event the model fails on in log order stops the rebuild: the same
    error, the same snapshots before it, the same segments recorded (through the end of the local
    batch that held it)."""
    model = _poison(tmp_path)
    elog = MemoryLog("poison", partitions=2)
    evs = [Event(f"e{i}", f"s{i % 9}", None, "t", 1, {"poison": i in (2345, 2400, 2900)}) for i in range(3000)]
    elog.append(evs)
    errors = []
    for side, run in (("local", lambda o: rebuild(elog, load_model(model), **o)),
                      ("dist", lambda o: distributed_rebuild(dist_of(elog), elog, model, **o))):
        with pytest.raises(ModelError) as err:
            run(dict(snapshots_root=tmp_path / side, snapshot_every=300))
        errors.append((str(err.value), err.value.stream, err.value.event_id, err.value.message_id, err.value.index))
    assert errors[0] == errors[1]
    assert_same_store(tmp_path / "local", tmp_path / "dist", elog.topic)


@pytest.mark.parametrize("policy", ["skip-event", "skip-stream"])
@pytest.mark.parametrize("partitions", [0, 2])
def test_skip_policies_give_the_local_result(tmp_path: Path, policy: str, partitions: int) -> None:
    """``--on-model-error skip-event|skip-stream``: the same ``skipped`` (in log order), states,
    and snapshots recording the skipped events at each stop; then from such a snapshot (under
    skip-stream its streams stay frozen), with more poison events and duplicates of earlier ones."""
    model = _poison(tmp_path)
    elog = MemoryLog("skips", partitions=partitions)
    poison = {3, 700, 1234, 2345, 2400, 2900, 3300}
    evs = [Event(f"e{i}", f"s{i % 9}", None, "t", 1, {"poison": i in poison}) for i in range(3600)]
    elog.append(evs[:2500])
    a, b = both_rebuilds(elog, tmp_path, model, snapshot_every=300, on_model_error=policy)
    assert len(a.to_json()["skipped"]) >= 5
    assert_same_rebuild(a, b, tmp_path, elog.topic)
    elog.append(evs[2500:])
    elog.append(evs[690:710], assign_seq=False)
    a, b = both_rebuilds(elog, tmp_path, model, snapshot_every=300, on_model_error=policy)
    assert a.to_json()["snapshot"] is not None and a.to_json()["duplicates"]
    assert_same_rebuild(a, b, tmp_path, elog.topic)
    a, b = both_rebuilds(elog, tmp_path, model, snapshot_every=0, on_model_error=policy, write_snapshots=False,
                         streams=frozenset({"s0", "s3"}))
    assert_same_rebuild(a, b, tmp_path, elog.topic)


# --- verify ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("partitions", [0, 3])
def test_verify_gives_the_local_report(tmp_path: Path, partitions: int) -> None:
    elog = MemoryLog("vf", partitions=partitions)
    messy(elog, 2000)
    rebuild(elog, load_model(MODEL), snapshots_root=tmp_path / "local", snapshot_every=700)
    rebuild(elog, load_model(MODEL), snapshots_root=tmp_path / "dist", snapshot_every=700)

    def both() -> None:
        out = []
        for side in ("local", "dist"):
            opts = VerifyOptions(record_dir=topic_dir(tmp_path / side, elog.topic), snapshots_root=tmp_path / side,
                                 segment_size=64)
            report = verify_log(elog, opts) if side == "local" else distributed_verify(dist_of(elog), elog, opts)
            out.append(normalized(report.to_json(), (tmp_path / "local", tmp_path / "dist")))
        assert out[0] == out[1]
        assert_same_store(tmp_path / "local", tmp_path / "dist", elog.topic)

    both()
    elog.append(events(300, seed=3))
    both()
    part = elog.partitions()[-1]
    entries = elog._parts[part]
    entries[777] = entries[777]._replace(payload=encode(events(1, seed=11)[0]))  # an entry altered
    both()


def test_verify_against_a_copy_with_a_dropped_entry(tmp_path: Path) -> None:
    left, right = MemoryLog("left"), MemoryLog("right")
    evs = messy(left, 2500)
    right.append_payloads((e.payload, e.key, e.event_time) for i, e in enumerate(left.entries()) if i != 1700)
    scan = distributed_scanner({left.topic: dist_of(left), right.topic: dist_of(right)})
    a = compare_logs(left, right, segment_size=64)
    b = compare_logs(left, right, segment_size=64, scan=scan)
    assert a.to_json()["first_mismatch"]["index"] == 1700 and evs
    assert normalized(a.to_json()) == normalized(b.to_json())


# --- reconcile -------------------------------------------------------------------------------------


@pytest.mark.parametrize("partitions", [0, 3])
def test_reconcile_of_a_divergent_worker_gives_the_local_report(tmp_path: Path, partitions: int) -> None:
    elog = MemoryLog("rc", partitions=partitions)
    evs = messy(elog, 2000)
    model = load_model(MODEL)
    expected = rebuild(elog, model, snapshots_root=tmp_path / "x", write_snapshots=False).folder.rendered()
    state = dict(expected)
    state["acct-0003"] = {"balance": -1}
    del state["acct-0005"]
    state["never-in-the-log"] = {"balance": 3}
    ids = [e.id for e in evs if e.id != evs[33].id]
    ids.insert(7, evs[2].id)
    ids.insert(50, "an-id-from-elsewhere")
    ids[100], ids[101] = ids[101], ids[100]
    path = tmp_path / "processed.jsonl"
    path.write_text("".join(json.dumps({"id": i}) + "\n" for i in ids))
    processed = load_processed(str(path))
    out = []
    for side in ("local", "dist"):
        hooks = distributed_reconcile_engine(dist_of(elog)) if side == "dist" else {}
        rebuild(elog, model, snapshots_root=tmp_path / side, snapshot_every=600)
        r = reconcile(elog, model, snapshots_root=tmp_path / side, state=state, processed=processed, repair=True,
                      **hooks)
        out.append((normalized(r.to_json(), (tmp_path / "local", tmp_path / "dist")), r.repaired_states, r.corrections))
    doc = out[0][0]
    assert doc["verdict"] == "repaired" and doc["missing"] == [evs[33].id]
    assert doc["unknown_ids"] == ["an-id-from-elsewhere"] and doc["unknown_streams"] == ["never-in-the-log"]
    assert out[0] == out[1]
    assert_same_store(tmp_path / "local", tmp_path / "dist", elog.topic)


def test_reconcile_with_tracker_evidence_builds_its_reference_on_the_cluster(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The reference (its events, leaf hashes for the tracker's checkpoints, expected states and
    history) comes from the distributed replay, never the local pass, and gives the local report."""
    import chainfold.ops.reference as reference_mod

    elog = MemoryLog("rt")
    messy(elog, 1500)
    model = load_model(MODEL)
    entries = [e for batch in Source(elog, Span(elog.topic)) for e in batch]
    with Tracker(tmp_path / "evidence", segment_size=8) as t:
        for k, e in enumerate(entries):
            if k != 700:  # the worker missed one entry
                t.handled(e.payload, str(e.message_id))
    expected = rebuild(elog, model, snapshots_root=tmp_path / "x", write_snapshots=False).folder.rendered()
    processed = load_processed(str(tmp_path / "evidence" / "processed.jsonl"))
    local_passes = reference_mod._passes
    out = []
    for side in ("local", "dist"):
        hooks = distributed_reconcile_engine(dist_of(elog)) if side == "dist" else {}
        if side == "dist":
            monkeypatch.setattr(reference_mod, "_passes", lambda *a: pytest.fail("the local pass built the reference"))
        r = reconcile(elog, model, snapshots_root=tmp_path / side, state=dict(expected), processed=processed,
                      tracker=load_tracker(str(tmp_path / "evidence" / "checkpoints.jsonl")), repair=True, **hooks)
        monkeypatch.setattr(reference_mod, "_passes", local_passes)
        out.append((normalized(r.to_json(), (tmp_path / "local", tmp_path / "dist")), r.repaired_states))
    assert out[0][0]["first_divergence"] is not None
    assert out[0] == out[1]


@pytest.mark.parametrize("policy", ["skip-event", "skip-stream"])
def test_reconcile_under_a_skip_policy_gives_the_local_report(tmp_path: Path, policy: str) -> None:
    """The reference and the repair's replay skip the same events as the local engine's; the state
    export alone (no processed log): ``processed_events`` null on both."""
    model_ref = _poison(tmp_path)
    model = load_model(model_ref)
    elog = MemoryLog("rcskip", partitions=2)
    elog.append([Event(f"e{i}", f"s{i % 7}", None, "t", 1, {"poison": i in (40, 900, 1500)}) for i in range(2000)])
    expected = rebuild(elog, model, snapshots_root=tmp_path / "x", write_snapshots=False,
                       on_model_error=policy).folder.rendered()
    state = dict(expected)
    state["s2"] = {"n": 1}
    out = []
    for side in ("local", "dist"):
        hooks = distributed_reconcile_engine(dist_of(elog)) if side == "dist" else {}
        rebuild(elog, model, snapshots_root=tmp_path / side, snapshot_every=600, on_model_error=policy)
        r = reconcile(elog, model, snapshots_root=tmp_path / side, state=state, repair=True, on_model_error=policy,
                      **hooks)
        out.append((normalized(r.to_json(), (tmp_path / "local", tmp_path / "dist")), r.repaired_states))
    doc = out[0][0]
    assert doc["skipped"] and doc["processed"]["events"] is None and doc["verdict"] == "repaired"
    assert out[0] == out[1]
    assert_same_store(tmp_path / "local", tmp_path / "dist", elog.topic)


# --- any log ---------------------------------------------------------------------------------------


_payloads = st.one_of(
    st.tuples(st.integers(0, 60), st.integers(0, 7)).map(lambda t: ("event", t)),
    st.tuples(st.integers(0, 60), st.integers(0, 7)).map(lambda t: ("again", t)),
    st.just(("malformed", (0, 0))),
    st.tuples(st.integers(0, 60), st.integers(0, 7)).map(lambda t: ("seq", t)),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(items=st.lists(_payloads, max_size=400), partitions=st.sampled_from([0, 2]),
       every=st.sampled_from([0, 1, 37, 100]), ranges=st.integers(1, 6), split=st.integers(1, 300))
def test_any_log_any_split(tmp_path_factory: pytest.TempPathFactory, items: list[tuple[str, tuple[int, int]]],
                           partitions: int, every: int, ranges: int, split: int) -> None:
    """Any mix of events, re-sent events, malformed entries and events whose seqs leave gaps, split
    into any ranges, rebuilt in two runs (the second from a snapshot, after more entries): the local
    result (its seq gaps too), files and all."""
    tmp = tmp_path_factory.mktemp("any")
    elog = MemoryLog("any", partitions=partitions)

    def add(part: list[tuple[str, tuple[int, int]]]) -> None:
        for kind, (i, s) in part:
            if kind == "malformed":
                elog.append_payloads([(b"\xff junk", f"s{s}", None)])
            elif kind == "seq":  # a producer's own seq: gaps, repeats, lower ones
                elog.append([Event(f"id{i}", f"s{s}", i % 9 + 1, kind, 1, {"amount": i})], assign_seq=False)
            else:
                elog.append([Event(f"id{i}", f"s{s}", None, kind, 1, {"amount": i})], assign_seq=kind == "event")

    add(items[:split])
    dist = Distribution(InProcess(ranges, 2), lambda: elog, memory_planner(elog))
    for _ in range(2):
        a = rebuild(elog, load_model(MODEL), snapshots_root=tmp / "local", snapshot_every=every, segment_size=16)
        b = distributed_rebuild(dist, elog, MODEL, snapshots_root=tmp / "dist", snapshot_every=every, segment_size=16)
        assert_same_rebuild(a, b, tmp, elog.topic)
        add(items[split:])


def test_groups_of_the_fold_shuffle_hold_many_streams() -> None:
    from chainfold.engines.cluster import group_of

    groups = {group_of(f"acct-{i:04d}", 3) for i in range(100)}
    assert groups == {0, 1, 2}
    assert list(itertools.islice((group_of("x", 5) for _ in range(3)), 3)) == [group_of("x", 5)] * 3


# --- history (seq gaps, lost entries) -----------------------------------------------------------------


def _gappy(elog: MemoryLog, n: int, seed: int) -> None:
    """Events with true per-stream seqs, some never published (gaps), some re-sent (lower seqs,
    duplicates), some from a foreign producer (no seq), a malformed entry."""
    evs = gen_events(n, 7, seed)
    rows = []
    for i, e in enumerate(evs):
        if i % 97 == 13:
            continue  # lost before anyone read it: a gap in its stream
        rows.append(e)
        if i % 89 == 5:
            rows.append(evs[i // 2])  # an earlier event re-sent
        if i % 71 == 3:
            rows.append(e._replace(id=f"foreign-{seed}-{i}", seq=None))
    elog.append_payloads([(encode(e), e.stream, e.time) for e in rows] + [(b"\xff junk", "s0", None)])


@pytest.mark.parametrize("partitions", [0, 2])
@pytest.mark.parametrize("allow", [False, True])
def test_seq_gaps_in_rebuild_and_verify_give_the_local_reports(tmp_path: Path, partitions: int, allow: bool) -> None:
    """seq gaps, re-sent and foreign events: the rebuild reports (and the snapshots' seq state), then
    verify twice (the second resumes the seq check where the first left it) equal the local ones."""
    elog = MemoryLog("gaps", partitions=partitions)
    _gappy(elog, 1500, seed=1)
    for run in range(2):
        a, b = both_rebuilds(elog, tmp_path, snapshot_every=400, allow_partial_history=allow)
        assert a.to_json()["seq_gaps"] and a.to_json()["seq_unverifiable"]
        assert (a.history.problem() is None) == allow
        assert_same_rebuild(a, b, tmp_path, elog.topic)
        for _ in range(2):
            out = []
            for side in ("local", "dist"):
                opts = VerifyOptions(record_dir=topic_dir(tmp_path / side, elog.topic), snapshots_root=tmp_path / side,
                                     segment_size=64, allow_partial_history=allow)
                report = verify_log(elog, opts) if side == "local" else distributed_verify(dist_of(elog), elog, opts)
                out.append((normalized(report.to_json(), (tmp_path / "local", tmp_path / "dist")), report.exit_code))
            assert out[0] == out[1] and out[0][0]["seq_gaps"]
            assert_same_store(tmp_path / "local", tmp_path / "dist", elog.topic)
        _gappy(elog, 300, seed=2 + run)


def test_lost_entries_give_the_local_reports(tmp_path: Path) -> None:
    """A partition that lost its first entries (the local engine's pass on both sides): rebuild
    from a covering snapshot, --full refused the same way, verify at shifted positions."""
    elog = MemoryLog("lost")
    elog.append_payloads([(encode(e), e.stream, e.time) for e in gen_events(1200, 5, 4)])
    both_rebuilds(elog, tmp_path, snapshot_every=500, segment_size=64)
    for side in ("local", "dist"):
        opts = VerifyOptions(record_dir=topic_dir(tmp_path / side, elog.topic), segment_size=64)
        verify_log(elog, opts)
    del elog._parts[elog.partitions()[0]][:300]
    elog.append_payloads([(encode(e), e.stream, e.time) for e in gen_events(200, 5, 5)])
    a, b = both_rebuilds(elog, tmp_path, snapshot_every=500, segment_size=64)
    assert a.to_json()["truncated"]
    assert_same_rebuild(a, b, tmp_path, elog.topic)
    errors = []
    for side in ("local", "dist"):
        with pytest.raises(HistoryUnrecoverable) as exc:
            if side == "local":
                rebuild(elog, load_model(MODEL), snapshots_root=tmp_path / side, full=True, segment_size=64)
            else:
                distributed_rebuild(dist_of(elog), elog, MODEL, snapshots_root=tmp_path / side, full=True,
                                    segment_size=64)
        errors.append((str(exc.value), exc.value.details))
    assert errors[0] == errors[1]
    out = []
    for side in ("local", "dist"):
        opts = VerifyOptions(record_dir=topic_dir(tmp_path / side, elog.topic), snapshots_root=tmp_path / side,
                             segment_size=64)
        report = verify_log(elog, opts) if side == "local" else distributed_verify(dist_of(elog), elog, opts)
        out.append((normalized(report.to_json(), (tmp_path / "local", tmp_path / "dist")), report.exit_code))
    assert out[0] == out[1] and out[0][0]["truncated"]

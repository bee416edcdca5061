"""The replay stages, each against its contract, on the in-memory log: source (spans, batches,
following), hash (one pass == any batching), decode + dedup (malformed, duplicates inside and
across batches, shards), fold (error policies), the pipeline's stops, and the snapshot sink."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chainfold import ChainBuilder, MemoryLog, ModelError, load_model
from chainfold.envelope import Event, encode, event_from_json
from chainfold.errors import InvalidArgument
from chainfold.examples import accounts
from chainfold.hashing.stage import HashStage
from chainfold.log.source import Source, Span
from chainfold.replay.decode import Decoder, Routed, Shard
from chainfold.replay.fold import FoldStage
from chainfold.replay.pipeline import Stops, run_pass
from chainfold.replay.seen import SeenSet
from chainfold.store.sink import SnapshotSink
from chainfold.store.snapshots import SnapshotStore

COUNTERS = load_model("chainfold.examples.counters")


def ev(i: int, stream: str = "s", typ: str = "Added") -> Event:
    return Event(f"e{i}", stream, None, typ, 1_700_000_000_000 + i, {"n": i})


def log_of(n: int, **kw: object) -> MemoryLog:
    log = MemoryLog("stages", **kw)  # type: ignore[arg-type]
    log.append([ev(i, f"s{i % 3}") for i in range(n)], assign_seq=False)
    return log


# --- source ----------------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 60), st.integers(1, 17), st.data())
def test_source_yields_the_span_in_order_in_batches(n: int, batch: int, data: st.DataObject) -> None:
    log = log_of(n, redeliver_every=7)
    entries = log.entries()
    a = data.draw(st.integers(0, n))
    b = data.draw(st.integers(a, n))
    span = Span(log.partitions()[0], after=entries[a - 1].message_id if a else None,
                until=entries[b - 1].message_id if b > a else None)
    src = Source(log, span, batch_size=batch)
    batches = list(src)
    got = [e for x in batches for e in x]
    want = entries[a:b] if b > a else entries[a:]
    assert got == want and all(0 < len(x) <= batch for x in batches)
    assert src.read == len(got) and src.last == (got[-1].message_id if got else None)


def test_a_following_source_waits_for_more_until_stopped() -> None:
    log = log_of(5)
    src = Source(log, Span(log.partitions()[0], follow=True), batch_size=100, poll_seconds=0.05)
    seen: list[str] = []

    def grow() -> None:
        for i in range(5, 12):
            time.sleep(0.02)
            log.append([ev(i)], assign_seq=False)

    t = threading.Thread(target=grow)
    t.start()
    for batch in src:
        seen += [e.event().id for e in batch]
        if len(seen) >= 12:
            src.stop()
    t.join()
    assert seen == [f"e{i}" for i in range(12)]  # each entry once, in order, across the reads
    with pytest.raises(InvalidArgument):
        Span("p", follow=True, limit=3)


# --- hash ------------------------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 80), st.lists(st.integers(1, 20), min_size=1, max_size=10), st.sampled_from([1, 4, 16]))
def test_hashing_in_any_batches_gives_the_checkpoints_of_one_entry_at_a_time(n, sizes, seg) -> None:
    log = log_of(n)
    entries = log.entries()
    one = ChainBuilder(seg)
    cps = [cp for e in entries if (cp := one.add(e.payload, str(e.message_id))) is not None]
    stage = HashStage(log.partitions()[0], ChainBuilder(seg))
    i = k = 0
    while i < n:
        stage.feed(entries[i:i + sizes[k % len(sizes)]])
        i += sizes[k % len(sizes)]
        k += 1
    scan = stage.finish()
    assert scan.checkpoints == cps and scan.chain.state() == one.state() and scan.head == (
        one.pending().head if one.pending() else one.head)


# --- decode + dedup ---------------------------------------------------------------------------------------


def test_decoder_reports_malformed_and_duplicates_and_passes_first_copies_on() -> None:
    log = MemoryLog("dec")
    log.append([ev(0), ev(1)], assign_seq=False)
    log.append_payloads([(b"\xff junk", "s", None)])
    log.append([ev(1), ev(2), ev(2), ev(0)], assign_seq=False)  # a duplicate inside the batch too
    d = Decoder()
    out = d.feed(log.entries(), 10)
    assert [e.id for e in out.events] == ["e0", "e1", "e2"]
    assert [out.index(j) for j in range(3)] == [10, 11, 14]
    assert [(m.index, m.message_id) for m in d.malformed] == [(12, str(log.entries()[2].message_id))]
    assert [(x.index, x.event_id) for x in d.duplicates] == [(13, "e1"), (15, "e2"), (16, "e0")]
    assert len(d.seen) == 3 and d.index == 17
    again = d.feed(log.entries()[:2], 17)  # across batches: seen before
    assert again.events == [] and [x.event_id for x in d.duplicates[-2:]] == ["e0", "e1"]


def test_routed_batches_name_entries_by_index() -> None:
    d = Decoder()
    out = d.feed_routed(Routed([5, 9], [encode(ev(1)), b"\x00"], None))
    assert [e.id for e in out.events] == ["e1"] and out.message_id(0) == "@5"
    assert [(m.index, m.message_id) for m in d.malformed] == [(9, "@9")]


def test_shards_split_the_streams_and_count_misrouted_entries() -> None:
    log = MemoryLog("shard")
    log.append([ev(i, f"acct-{i % 7}") for i in range(40)], assign_seq=False)
    log.append_payloads([(encode(ev(99, "acct-1")), "acct-2", None)])  # keyed to another stream
    whole = Decoder().feed(log.entries(), 0)
    parts = [Decoder(shard=Shard(i, 3)) for i in range(3)]
    got = sorted(e.id for p in parts for e in p.feed(log.entries(), 0).events)
    same = Shard(0, 3).of("acct-1") == Shard(0, 3).of("acct-2")  # then its key's shard folds it after all
    assert got == sorted(e.id for e in whole.events if same or e.id != "e99")
    assert sum(p.misrouted for p in parts) == (0 if same else 1)


# --- fold ---------------------------------------------------------------------------------------------------


class _Picky:
    """A model that cannot fold type Bad."""

    @staticmethod
    def initial(stream: str) -> int:
        return 0

    @staticmethod
    def apply(state: int, event: Event) -> int:
        if event.type == "Bad":
            raise ValueError("bad amount")
        return state + 1


def _decoded(events: list[Event]):
    log = MemoryLog("fold")
    log.append(events, assign_seq=False)
    return Decoder().feed(log.entries(), 0)


@pytest.mark.parametrize("policy, states, skipped", [
    ("skip-event", {"a": 2, "b": 2}, ["e1"]),
    ("skip-stream", {"a": 1, "b": 2}, ["e1", "e3"]),  # e3: a later event of the stopped stream
])
def test_fold_error_policies(policy: str, states: dict, skipped: list[str]) -> None:
    model = load_model(_Picky())
    batch = _decoded([ev(0, "a"), ev(1, "a", "Bad"), ev(2, "b"), ev(3, "a"), ev(4, "b")])
    fold = FoldStage(model, on_error=policy)  # type: ignore[arg-type]
    fold.feed(batch)
    assert fold.states == states and [s.event_id for s in fold.skipped] == skipped
    assert fold.skipped[0].error == "ValueError: bad amount" and fold.skipped[0].index == 1


def test_fold_stops_by_default_naming_the_event() -> None:
    batch = _decoded([ev(0, "a"), ev(1, "a", "Bad")])
    fold = FoldStage(load_model(_Picky()))
    with pytest.raises(ModelError) as exc:
        fold.feed(batch)
    assert (exc.value.stream, exc.value.event_id, exc.value.index) == ("a", "e1", 1)
    assert exc.value.message_id == batch.message_id(1) and fold.states == {"a": 1}


# --- pipeline stops and the snapshot sink --------------------------------------------------------------------


def test_stops_see_exact_counts_whatever_the_batches(tmp_path: Path) -> None:
    log = MemoryLog("stops")
    log.append([event_from_json(d) for d in accounts.generate(1000, 20, 1)])
    model = load_model("chainfold.examples.accounts")
    store = SnapshotStore(tmp_path, log.topic, keep=10)
    decoder, fold = Decoder(store.dedup.writer(None)), FoldStage(model)
    hasher = HashStage(log.partitions()[0], ChainBuilder(64))
    sink = SnapshotSink(store, fold, decoder, log.partitions(), 64)
    at: list[tuple[int, int, int]] = []

    def snap(n: int, last) -> None:
        at.append((n, hasher.chain.size, fold.applied))
        sink.take()

    stops = Stops().every(300, snap).at(777, lambda n, _e: at.append((n, hasher.chain.size, -1)))
    n = run_pass(Source(log, Span(log.partitions()[0]), batch_size=128), start=0, hasher=hasher,
                 decoder=decoder, fold=fold, stops=stops)
    assert n == 1000 and at == [(300, 300, 300), (600, 600, 600), (777, 777, -1), (900, 900, 900)]
    assert [i.entries for i in store.list()] == [0, 0, 0]  # no position given: partitions not done yet
    assert len(sink.written) == 3 and sink.entries == 0
    assert [store.load(p).dedup["count"] for p in sink.written] == [300, 600, 900]  # the ids folded by then
    decoder.seen.close()


def test_seen_set_answers_batches_in_order() -> None:
    s = SeenSet(["a"])
    assert s.add_new(["a", "b", "b", "c"]) == [False, True, False, True]
    assert len(s) == 3 and s.checkpoint() == frozenset("abc")


def test_the_seq_hook_sees_every_well_formed_entry_before_dedup() -> None:
    from chainfold.replay.decode import SeqGap, SeqGaps

    log = MemoryLog("seq")
    evs = [Event(f"e{i}", "a", i, "T", 1, {}) for i in (1, 2, 4)] + [Event("x1", "b", 3, "T", 1, {})]
    log.append(evs, assign_seq=False)
    log.append([Event("e2", "a", 2, "T", 1, {}), Event("n", "c", None, "T", 1, {})], assign_seq=False)
    gaps = SeqGaps()
    d = Decoder(well_formed=gaps)
    out = d.feed(log.entries(), 0)
    mids = [str(e.message_id) for e in log.entries()]
    assert gaps.gaps == [SeqGap("a", 3, 4, mids[2], 2), SeqGap("b", 1, 3, mids[3], 3)]  # the re-sent e2 is no gap
    assert gaps.unverifiable == 1 and [e.id for e in out.events] == ["e1", "e2", "e4", "x1", "n"]

"""Poison events (``--on-model-error``): what rebuild does with an event its model cannot fold, on
the in-memory log. Expectations are computed here with ``accounts.apply`` directly (no Folder).

A foreign producer (no chainfold writer, no ``seq``) sends ``{"amount": 1.5}`` where the accounts
model wants an integer: ``stop`` names it and writes nothing past it; ``skip-event`` folds the
stream on without it; ``skip-stream`` keeps the stream at its last good state. Either skip policy
gives the states of folding the log without the events it lists (a hypothesis property), records
them in its snapshots, and a snapshot that skipped events starts only a rebuild under its policy.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from chainfold import load_model, rebuild
from chainfold.engines.parallel import parallel_rebuild
from chainfold.envelope import Event, event_from_json
from chainfold.errors import ModelError
from chainfold.examples import accounts
from chainfold.log import MemoryLog
from chainfold.replay.fold import Folder, Skipped
from chainfold.store.snapshots import SnapshotStore

MODEL_REF = "chainfold.examples.accounts"
MODEL = load_model(MODEL_REF)


def foreign(eid: str, stream: str, amount: Any = 1.5, etype: str = "Deposited") -> bytes:
    """A foreign producer's envelope: canonical CBOR, no ``seq``, an amount the model refuses."""
    return cbor2.dumps({"id": eid, "stream": stream, "type": etype, "time": 1_700_000_000_000,
                        "data": {"amount": amount}}, canonical=True)


ERROR = "ValueError: Deposited event {!r}: 'amount' must be an integer (minor units), got float 1.5"


class Poisoned:
    """A log of accounts events with foreign bad events inserted, and what each policy must give."""

    def __init__(self, n: int = 400, streams: int = 6, bad_at: tuple[int, ...] = (150,), seed: int = 3,
                 log: Any = None) -> None:
        self.events = [event_from_json(d) for d in accounts.generate(n, streams, seed)]
        self.log = log if log is not None else MemoryLog("poison")
        self.order: list[tuple[str, Any]] = []  # ("event", Event) | ("bad", (id, stream)), in log order
        start = 0
        for k, at in enumerate(bad_at):
            self._append(self.events[start:at])
            eid, stream = f"foreign-{k + 1}", self.events[at].stream  # a stream with events after it
            self.log.append_payloads([(foreign(eid, stream), stream, 1_700_000_000_000)])
            self.order.append(("bad", (eid, stream)))
            start = at
        self._append(self.events[start:])
        self.mids = message_ids(self.log)

    def _append(self, evs: list[Event]) -> None:
        if evs:
            self.log.append(evs)
            self.order += [("event", ev) for ev in evs]

    def expected(self, policy: str) -> tuple[dict[str, Any], list[dict[str, str]]]:
        """(the rendered states, the skipped list) ``policy`` must give, by plain code."""
        states: dict[str, Any] = {}
        skipped: list[dict[str, str]] = []
        frozen: dict[str, str] = {}
        for kind, item in self.order:
            if kind == "bad":
                eid, stream = item
                if stream in frozen:
                    skipped.append(self._skip(eid, stream, frozen[stream]))
                    continue
                skipped.append(self._skip(eid, stream, ERROR.format(eid)))
                if policy == "skip-stream":
                    frozen[stream] = f"stream {stream!r} skipped since event {eid!r} failed"
                continue
            if item.stream in frozen:
                skipped.append(self._skip(item.id, item.stream, frozen[item.stream]))
                continue
            states[item.stream] = accounts.apply(states.get(item.stream) or accounts.initial(item.stream), item)
        return {s: accounts.render(v) for s, v in sorted(states.items())}, skipped

    def _skip(self, eid: str, stream: str, error: str) -> dict[str, str]:
        return {"event_id": eid, "message_id": self.mids[eid], "stream": stream, "error": error}


def message_ids(log: Any) -> dict[str, str]:
    """event id → message id of its (first) entry, read back from the log."""
    from chainfold.envelope import decode

    out: dict[str, str] = {}
    for e in log.read_all():
        out.setdefault(decode(e.payload).id, str(e.message_id))
    return out


@pytest.fixture
def poisoned() -> Poisoned:
    return Poisoned(bad_at=(150, 290))


def test_stop_names_the_event_and_writes_no_snapshot_past_it(tmp_path: Path, poisoned: Poisoned) -> None:
    with pytest.raises(ModelError) as ei:
        rebuild(poisoned.log, MODEL, snapshots_root=tmp_path, snapshot_every=100)
    e = ei.value
    assert (e.stream, e.event_id, e.message_id, e.index) == (
        poisoned.events[150].stream, "foreign-1", poisoned.mids["foreign-1"], 150)
    assert [i.entries for i in SnapshotStore(tmp_path, poisoned.log.topic).list()] == [100]


@pytest.mark.parametrize("policy", ["skip-event", "skip-stream"])
def test_skip_policies_report_exactly_what_they_left_out(tmp_path: Path, poisoned: Poisoned, policy: str) -> None:
    states, skipped = poisoned.expected(policy)
    r = rebuild(poisoned.log, MODEL, snapshots_root=tmp_path, on_model_error=policy)
    doc = r.to_json()
    assert doc["skipped"] == skipped and doc["on_model_error"] == policy
    assert r.folder.rendered() == states
    assert doc["applied"] == 400 - len([k for k in skipped if not k["event_id"].startswith("foreign")])
    if policy == "skip-event":
        assert [k["event_id"] for k in skipped] == ["foreign-1", "foreign-2"]
    else:  # the stream's later events are listed too, each saying why
        assert len(skipped) > 2 and all(k["stream"] == skipped[0]["stream"] for k in skipped[:2])
    # the final snapshot records the policy and every skipped event
    (snap_path,) = r.written
    snap = SnapshotStore(tmp_path, poisoned.log.topic).load(snap_path)
    assert snap.on_model_error == policy and [k.to_json() for k in snap.skipped] == skipped


def test_a_snapshot_that_skipped_events_serves_only_its_policy(tmp_path: Path, poisoned: Poisoned) -> None:
    first = rebuild(poisoned.log, MODEL, snapshots_root=tmp_path, on_model_error="skip-event", snapshot_every=200)
    assert len(first.written) == 3  # at 200 (foreign-1 skipped before it), 400 and the end (402)
    # the same policy starts from it, and reports what a fold from the start reports
    again = rebuild(poisoned.log, MODEL, snapshots_root=tmp_path, on_model_error="skip-event", write_snapshots=False)
    assert again.from_snapshot == 402 and again.to_json()["skipped"] == first.to_json()["skipped"]
    assert again.folder.rendered() == first.folder.rendered() and again.rejected == []
    # another policy: both snapshots rejected, each with the reason
    other = rebuild(poisoned.log, MODEL, snapshots_root=tmp_path, on_model_error="skip-stream", write_snapshots=False)
    assert other.from_snapshot is None
    assert [r for _, r in other.rejected] == [
        f"it skipped {n} event(s) the model failed on under --on-model-error skip-event (first: event "
        f"'foreign-1', message {poisoned.mids['foreign-1']}); this fold runs with --on-model-error skip-stream"
        for n in (2, 2, 1)]
    assert other.to_json()["skipped"] == poisoned.expected("skip-stream")[1]
    with pytest.raises(ModelError):
        rebuild(poisoned.log, MODEL, snapshots_root=tmp_path, write_snapshots=False)  # stop: from the start


def test_a_snapshot_that_skipped_nothing_serves_every_policy(tmp_path: Path, poisoned: Poisoned) -> None:
    rebuild(poisoned.log, MODEL, snapshots_root=tmp_path, on_model_error="skip-stream", snapshot_every=100, keep=10)
    store = SnapshotStore(tmp_path, poisoned.log.topic)
    early = [i for i in store.list() if i.entries == 100]
    assert early and store.load(early[0].path).skipped == ()
    for i in store.list():
        if i.entries != 100:
            store.storage.delete(i.path.name)
    r = rebuild(poisoned.log, MODEL, snapshots_root=tmp_path, on_model_error="skip-event", write_snapshots=False)
    assert r.from_snapshot == 100 and r.to_json()["skipped"] == poisoned.expected("skip-event")[1]


@pytest.mark.parametrize("policy", ["skip-event", "skip-stream"])
@pytest.mark.parametrize("split", ["fanout", "readers"])
def test_parallel_rebuild_skips_what_the_serial_one_skips(tmp_path: Path, poisoned: Poisoned, policy: str,
                                                           split: str) -> None:
    serial = rebuild(poisoned.log, MODEL, snapshots_root=tmp_path / "a", on_model_error=policy, snapshot_every=200)
    par = parallel_rebuild(poisoned.log, MODEL_REF, workers=2, snapshots_root=tmp_path / "b",
                           on_model_error=policy, split=split)
    assert par.workers == 2 and not any("serially" in n for n in par.notes)
    assert par.to_json()["skipped"] == serial.to_json()["skipped"] == poisoned.expected(policy)[1]
    assert par.folder.rendered() == serial.folder.rendered()
    # from the periodic snapshot at 200 (foreign-1 skipped before it, foreign-2 after), with more events
    more = [event_from_json(d) for d in accounts.generate(150, 6, 11)]
    poisoned.log.append([ev._replace(id="more-" + ev.id) for ev in more])
    for store in ("a", "b"):
        shutil.rmtree(tmp_path / store)
    rebuild(poisoned.log, MODEL, snapshots_root=tmp_path / "a", on_model_error=policy, snapshot_every=200)
    for i in SnapshotStore(tmp_path / "a", poisoned.log.topic).list():
        if i.entries != 200:
            i.path.unlink()
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    serial = rebuild(poisoned.log, MODEL, snapshots_root=tmp_path / "a", on_model_error=policy, write_snapshots=False)
    par = parallel_rebuild(poisoned.log, MODEL_REF, workers=2, snapshots_root=tmp_path / "b", on_model_error=policy,
                           split=split, write_snapshots=False)
    full = rebuild(poisoned.log, MODEL, snapshots_root=tmp_path / "c", on_model_error=policy, full=True)
    assert serial.from_snapshot == par.from_snapshot == 200
    assert par.to_json()["skipped"] == serial.to_json()["skipped"] == full.to_json()["skipped"]
    assert par.folder.rendered() == serial.folder.rendered() == full.folder.rendered()


def test_a_partitioned_topic_lists_skipped_events_partition_by_partition(tmp_path: Path) -> None:
    log = MemoryLog("parts", partitions=2)
    evs = [event_from_json(d) for d in accounts.generate(300, 8, 4)]
    log.append(evs)
    by_part = {p: [e for e in log.entries(p)] for p in log.partitions()}
    streams = {p: decode_stream(by_part[p][-1].payload) for p in log.partitions()}
    for p in log.partitions():  # one bad event early in each partition (its stream keeps it there)
        log.append_payloads([(foreign(f"bad-{p[-1]}", streams[p]), streams[p], 1)])
    full = rebuild(log, MODEL, snapshots_root=tmp_path / "full", on_model_error="skip-event", full=True)
    assert [k["event_id"] for k in full.to_json()["skipped"]] == ["bad-0", "bad-1"]
    # a snapshot, then another bad event in partition 0: listed after partition 0's, before partition 1's
    log.append_payloads([(foreign("bad-late", streams[log.partitions()[0]]), streams[log.partitions()[0]], 1)])
    again = rebuild(log, MODEL, snapshots_root=tmp_path / "full", on_model_error="skip-event")
    assert again.from_snapshot is not None
    assert [k["event_id"] for k in again.to_json()["skipped"]] == ["bad-0", "bad-late", "bad-1"]
    par = parallel_rebuild(log, MODEL_REF, workers=2, snapshots_root=tmp_path / "par", on_model_error="skip-event")
    assert par.to_json()["skipped"] == again.to_json()["skipped"]


def decode_stream(payload: bytes) -> str:
    from chainfold.envelope import decode

    return decode(payload).stream


# --- the property: skipping == folding the log without the skipped events ---------------------------


class Capped:
    """A model whose failures depend on the state: a total that refuses to pass 10 (and non-integers)."""

    @staticmethod
    def initial(stream: str) -> int:
        return 0

    @staticmethod
    def apply(state: int, event: Any) -> int:
        v = event.data.get("v")
        if type(v) is not int:
            raise ValueError(f"v must be an integer, got {v!r}")
        if state + v > 10:
            raise ValueError(f"total {state + v} over 10")
        return state + v


CAPPED = load_model(Capped())

_event = st.tuples(st.sampled_from("abc"), st.one_of(st.integers(-3, 6), st.just(1.5)))


def _log_of(items: list[tuple[str, Any]]) -> tuple[MemoryLog, list[Event]]:
    log = MemoryLog("prop")
    evs = [Event(f"e{i}", s, None, "Add", i, {"v": v}) for i, (s, v) in enumerate(items)]
    log.append(evs, assign_seq=False)
    return log, evs


def _plain_fold(evs: list[Event]) -> dict[str, int]:
    states: dict[str, int] = {}
    for ev in evs:
        states[ev.stream] = Capped.apply(states.get(ev.stream, 0), ev)  # raises if the property fails
    return states


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(items=st.lists(_event, max_size=40), policy=st.sampled_from(["skip-event", "skip-stream"]),
       every=st.integers(1, 12), split=st.integers(0, 40))
def test_skipping_equals_folding_the_log_without_the_skipped_events(tmp_path: Path, items, policy: str, every: int,
                                                                    split: int) -> None:
    log, evs = _log_of(items)
    f = Folder(CAPPED, on_error=policy)  # type: ignore[arg-type]
    f.feed(log.entries())
    left_out = {k.event_id for k in f.skipped}
    assert f.states == _plain_fold([e for e in evs if e.id not in left_out])
    if policy == "skip-event":  # exactly the events that fail on the state before them
        assert all(k.error != "" and not k.error.startswith("stream ") for k in f.skipped)
    else:  # a stream's events from its first failure on
        for s in {k.stream for k in f.skipped}:
            ids = [e.id for e in evs if e.stream == s]
            first = next(i for i, e in enumerate(ids) if e in left_out)
            assert [e for e in ids if e in left_out] == ids[first:]
    # in two rounds through snapshots (every `every` entries), the log growing in between: the same
    d = tmp_path / f"s{len(list(tmp_path.iterdir()))}"
    head, tail = evs[:split], evs[split:]
    log2 = MemoryLog("prop")
    log2.append(head, assign_seq=False)
    rebuild(log2, CAPPED, snapshots_root=d, on_model_error=policy, snapshot_every=every)
    log2.append(tail, assign_seq=False)
    r = rebuild(log2, CAPPED, snapshots_root=d, on_model_error=policy, snapshot_every=every)
    assert r.folder.states == f.states
    assert [k.to_json() for k in r.folder.skipped] == [k.to_json() for k in f.skipped]
    assert r.to_json()["skipped"] == [Skipped.to_json(k) for k in f.skipped]

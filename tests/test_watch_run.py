"""The watch wiring (:mod:`chainfold.ops.watch`) on the in-memory log, with an in-process worker
writing real Tracker evidence: each fault named as reconcile names it, the evidence directory
waited for, a stopped watch continued from its snapshot and saved comparison, a broker failure
reported and resumed without counting an entry twice, poison-event policies, and memory that does
not grow with the run. (The real command on real brokers: tests/test_watch_live.py.)"""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from chainfold.envelope import decode, encode
from chainfold.errors import BrokerUnavailable, MalformedEnvelope
from chainfold.examples import accounts
from chainfold.log import Entry, LogReader, MemoryLog
from chainfold.log.source import Source, Span
from chainfold.ops.rebuild import rebuild
from chainfold.ops.reconcile import load_tracker, reconcile
from chainfold.ops.verify import verify_log
from chainfold.ops.watch import WatchOptions, WatchResult, WatchRun
from chainfold.replay.model import load_model
from chainfold.tracker import Tracker
from chainfold.watch.output import WatchLines

MODEL = load_model("chainfold.examples.accounts")


def make_log(n: int, *, malformed_at: tuple[int, ...] = (), copies_at: dict[int, int] | None = None,
             log: MemoryLog | None = None, story: int | None = None) -> MemoryLog:
    """``n`` accounts events (the first of a ``story`` of that many, so a test can append the rest
    with every stream's seq continuing); a malformed entry after event k for k in ``malformed_at``,
    and after event k a second copy of event j for k: j in ``copies_at``."""
    log = log or MemoryLog("watched")
    events = accounts.generate_events(story or n, 12, 3)[:n]
    for i, ev in enumerate(events):
        log.append_payloads([(encode(ev), ev.stream, ev.time)])
        if i in malformed_at:
            log.append_payloads([(b"\xa0not an event", None, None)])
        if copies_at and i in copies_at:
            c = events[copies_at[i]]
            log.append_payloads([(encode(c), c.stream, c.time)])
    return log


def reference(log: MemoryLog) -> list[tuple[int, str, str]]:
    """(log index, event id, message id) of the first entry of each well-formed event id, in order."""
    out, seen = [], set()
    for i, e in enumerate(log.read()):
        try:
            ev = decode(e.payload)
        except MalformedEnvelope:
            continue
        if ev.id not in seen:
            seen.add(ev.id)
            out.append((i, ev.id, str(e.message_id)))
    return out


def work(log: MemoryLog, evidence: Path, *, skip: set[str] = frozenset(), double: set[str] = frozenset(),
         mishandle: set[str] = frozenset(), extra_at_end: bool = False, memory: dict[str, Any] | None = None,
         start: int = 0, stop: int | None = None) -> dict[str, Any]:
    """A worker over entries ``start:stop`` of the log: dedups by id, applies the model, tracks each
    handling with its rendered state; the faults as named. Returns what it remembers (states and
    ids seen), for a later call to continue."""
    memory = memory if memory is not None else {"states": {}, "seen": set()}
    states: dict[str, Any] = memory["states"]
    seen: set[str] = memory["seen"]
    entries = list(log.read())[start:stop]
    with Tracker(evidence, flush_interval=0.05, handling_times=True) as tracker:
        def handle(e: Entry, ev: Any, wrong: bool = False) -> None:
            st = states.get(ev.stream) or accounts.initial(ev.stream)
            new = accounts.apply(st, ev._replace(type="Deposited") if wrong and ev.type == "Withdrawn" else ev)
            states[ev.stream] = accounts.render(new)
            tracker.handled(e.payload, e.message_id, ev.id, state=states[ev.stream], stream=ev.stream)

        for e in entries:
            try:
                ev = decode(e.payload)
            except MalformedEnvelope:
                continue
            if ev.id in seen or ev.id in skip:
                continue
            seen.add(ev.id)
            handle(e, ev, wrong=ev.id in mishandle)
            if ev.id in double:
                handle(e, ev)
        if extra_at_end:
            e = entries[-1]
            handle(e, decode(e.payload))
    return memory


class Watching:
    """A WatchRun in a thread, its lines in memory."""

    def __init__(self, log: MemoryLog, tmp: Path, *, evidence: bool = True, **opts: Any) -> None:
        self.out = io.StringIO()
        self.lines = WatchLines(self.out)
        options = WatchOptions(snapshots_root=tmp / "snapshots", evidence=tmp / "evidence" if evidence else None,
                               poll_seconds=0.02, max_wait=0.02, progress_seconds=0.05, **opts)
        self.run = WatchRun(log, MODEL, options, self.lines)
        self.result: WatchResult | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._go, daemon=True)
        self.thread.start()

    def _go(self) -> None:
        try:
            self.result = self.run.run()
        except BaseException as exc:  # noqa: BLE001 - the test reports it
            self.error = exc

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in map(json.loads, self.out.getvalue().splitlines()) if o["kind"] == kind]

    def wait_for(self, test, timeout: float = 30) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.thread.is_alive():
            got = test(self)
            if got:
                return got
            time.sleep(0.02)
        return test(self)

    def settled(self, log_entries: int, worker: int | None) -> bool:
        p = self.of("progress")
        return bool(p) and p[-1]["log_entries"] == log_entries and p[-1]["worker_entries"] == worker

    def stop(self) -> WatchResult:
        self.run.stop()
        self.thread.join(30)
        assert self.error is None, self.error
        assert self.result is not None
        return self.result


@pytest.mark.parametrize("fault", ["skip", "double", "extra"])
def test_each_handling_fault_is_named_as_reconcile_names_it(tmp_path: Path, fault: str) -> None:
    log = make_log(900, malformed_at=(10, 400), copies_at={300: 5})
    ref = reference(log)
    target = ref[520][1]
    w = Watching(log, tmp_path)
    work(log, tmp_path / "evidence", skip={target} if fault == "skip" else set(),
         double={target} if fault == "double" else set(), extra_at_end=fault == "extra")
    [d] = w.wait_for(lambda w: w.of("divergence"))
    w.stop()
    p = {"skip": 520, "double": 521, "extra": len(ref)}[fault]
    if fault == "extra":  # a handling beyond the reference: at the log's end, as reconcile says
        assert (d["index"], d["event_id"], d["message_id"]) == (903, None, None)
    else:
        assert (d["index"], d["event_id"], d["message_id"]) == ref[p]
    assert d["segment"] == d["index"] // 1024 and d["worker_position"] == p
    rep = reconcile(log, MODEL, snapshots_root=tmp_path / "rec", state={},
                    tracker=load_tracker(str(tmp_path / "evidence" / "checkpoints.jsonl")))
    first = rep.to_json()["first_divergence"]
    assert {k: first[k] for k in ("index", "segment", "event_id", "message_id")} == \
        {k: d[k] for k in ("index", "segment", "event_id", "message_id")}


def test_a_mishandled_event_is_named_by_its_state_digest(tmp_path: Path) -> None:
    log = make_log(700)
    ref = reference(log)
    events = [decode(e.payload) for e in log.read()]
    target = next(ev.id for ev in events[300:] if ev.type == "Withdrawn")
    w = Watching(log, tmp_path)
    work(log, tmp_path / "evidence", mishandle={target})
    [d] = w.wait_for(lambda w: w.of("divergence"))
    w.stop()
    p = next(k for k, r in enumerate(ref) if r[1] == target)
    assert (d["index"], d["event_id"], d["message_id"]) == ref[p] and "state" in d["reason"]


def test_a_faithful_worker_shows_nothing_and_malformed_and_duplicates_are_reported(tmp_path: Path) -> None:
    log = make_log(1500, malformed_at=(3, 1400), copies_at={700: 2, 1000: 700})
    w = Watching(log, tmp_path / "w")  # the evidence directory does not exist yet: watch waits for it
    time.sleep(0.3)
    assert not (tmp_path / "w" / "evidence").exists() and w.thread.is_alive()
    work(log, tmp_path / "w" / "evidence")
    assert w.wait_for(lambda w: w.settled(1504, 1500)), w.of("progress")[-1:]
    res = w.stop()
    assert res.exit_code == 0 and res.divergence is None and not w.of("divergence") and not w.of("error")
    assert [m["message_id"] for m in w.of("malformed")] == ["0:4:-1:-1", "0:1404:-1:-1"]
    assert [d["event_id"] for d in w.of("duplicate")] == ["evt-3-3", "evt-3-701"]
    assert w.of("progress")[-1]["lag"] == 0
    # memory: the reported findings and the segment list are dropped once written
    assert not w.run.decoder.malformed and not w.run.decoder.duplicates and not w.run.hasher.scan.checkpoints
    snap = rebuild(log, MODEL, snapshots_root=tmp_path / "w" / "snapshots", write_snapshots=False)
    assert snap.from_snapshot == 1504 and snap.to_json()["replayed"]["events"] == 0
    store_stats = snap.snapshot.stats
    assert store_stats == {"malformed": 2, "duplicates": 2}


def test_a_stopped_watch_continues_its_comparison_from_the_snapshot(tmp_path: Path) -> None:
    log = make_log(800, story=1200)
    w = Watching(log, tmp_path)
    memory = work(log, tmp_path / "evidence", stop=500)  # the worker handled 500, then watch stopped
    assert w.wait_for(lambda w: w.settled(800, 500))
    res = w.stop()
    assert res.exit_code == 0 and res.snapshot is not None and res.worker_entries == 500
    more = accounts.generate_events(1200, 12, 3)[800:]
    log.append(more, assign_seq=False)
    w2 = Watching(log, tmp_path)
    assert w2.run.plan.snapshot is not None and w2.run.plan.snapshot.entries == 800
    ref = reference(log)
    work(log, tmp_path / "evidence", start=500, memory=memory, skip={ref[1000][1]})
    [d] = w2.wait_for(lambda w: w.of("divergence"))
    w2.stop()
    assert (d["index"], d["event_id"], d["message_id"]) == ref[1000]
    assert w2.of("progress")[-1]["log_entries"] == 1200
    # started again, it says so at once (the saved comparison holds the divergence)
    w3 = Watching(log, tmp_path, fail_on_divergence=True)
    w3.thread.join(30)
    assert w3.result is not None and w3.result.exit_code == 1
    assert [{k: x[k] for k in d if k != "time"} for x in w3.of("divergence")] == [{k: d[k] for k in d if k != "time"}]


class FlakyLog(MemoryLog):
    """A memory log whose reader fails once, after ``after`` entries of one read, like a broker that
    went away past the reader's retries."""

    def __init__(self, topic: str, fail_after: int) -> None:
        super().__init__(topic)
        self.fail_after = fail_after
        self.failed = False

    def read(self, partition: str | None = None, **kw: Any) -> LogReader:
        inner = super().read(partition, **kw)
        if self.failed or kw.get("after") is None:
            return inner
        log = self

        class Failing(LogReader):
            def __iter__(self) -> Iterator[Entry]:
                for k, e in enumerate(inner):
                    if k == log.fail_after and not log.failed:
                        log.failed = True
                        raise BrokerUnavailable("broker went away (test)")
                    yield e

        return Failing()


def test_a_broker_failure_is_reported_and_nothing_is_counted_twice(tmp_path: Path) -> None:
    log = make_log(300, log=FlakyLog("flaky", fail_after=50), story=900)
    w = Watching(log, tmp_path, evidence=False)
    assert w.wait_for(lambda w: w.settled(300, None))
    log.append(accounts.generate_events(900, 12, 3)[300:], assign_seq=False)  # read after entry 300: fails at 350
    assert w.wait_for(lambda w: w.settled(900, None), 60), (w.of("error"), w.of("progress")[-1:])
    res = w.stop()
    assert log.failed and [e["message"].startswith("broker unavailable") for e in w.of("error")] == [True]
    fresh = verify_log(log, record_dir=tmp_path / "fresh")
    assert res.log_entries == 900 and res.head == fresh.to_json()["log"]["head"]


def test_a_model_error_stops_with_exit_2_and_no_snapshot_past_it(tmp_path: Path) -> None:
    log = make_log(200)
    log.append_payloads([(encode(accounts.generate_events(1, 1, 9)[0]._replace(id="bad", type="Withdrawn",
                                                                              data={"amount": "x"})), "s", None)])
    w = Watching(log, tmp_path, evidence=False)
    w.thread.join(30)
    assert w.result is not None and w.result.exit_code == 2
    [e] = w.of("error")
    assert e["event_id"] == "bad" and e["message_id"] == "0:200:-1:-1"
    assert not list((tmp_path / "snapshots").rglob("snap-*.cbor"))


def test_skip_event_reports_each_skipped_event_and_ends_with_exit_1(tmp_path: Path) -> None:
    log = make_log(200)
    bad = accounts.generate_events(1, 1, 9)[0]._replace(id="bad", type="Withdrawn", data={"amount": "x"})
    log.append_payloads([(encode(bad), bad.stream, None)])
    w = Watching(log, tmp_path, evidence=False, on_model_error="skip-event")
    assert w.wait_for(lambda w: w.of("error") and w.settled(201, None))
    res = w.stop()
    [e] = w.of("error")
    assert e["event_id"] == "bad" and res.exit_code == 1 and res.skipped == 1
    assert list((tmp_path / "snapshots").rglob("snap-000000000201-*.cbor"))


def test_the_comparator_spills_what_the_worker_has_not_reached(tmp_path: Path) -> None:
    log = make_log(3000)
    w = Watching(log, tmp_path, window=256)
    assert w.wait_for(lambda w: w.settled(3000, 0))
    cmp = w.run.comparator
    assert cmp is not None and len(cmp._mem) <= 256 and cmp.reference_size == 3000
    work(log, tmp_path / "evidence")
    assert w.wait_for(lambda w: w.settled(3000, 3000))
    assert w.stop().divergence is None


def test_a_following_source_hands_back_control_when_idle_and_cuts_slow_batches() -> None:
    log = make_log(5)
    src = Source(log, Span(log.partitions()[0], follow=True), batch_size=100, poll_seconds=0.01, max_wait=0.05)
    it = iter(src)
    assert len(next(it)) == 5 and next(it) == []  # the whole log, then an idle poll
    assert next(it) == []  # nothing new: idle again

    def trickle() -> None:
        for ev in accounts.generate_events(40, 3, 4):
            log.append([ev._replace(id="t-" + ev.id)], assign_seq=False)
            time.sleep(0.005)

    t = threading.Thread(target=trickle)
    t.start()
    got: list[int] = []
    while sum(got) < 40:
        got.append(len(next(it)))
    t.join()
    src.stop()
    assert list(it) in ([], [[]])
    assert sum(got) == 40 and max(got) < 40  # cut by age, not only by size or the log's end


def test_watch_stops_cleanly_when_nobody_reads_its_lines(tmp_path: Path) -> None:
    log = make_log(300)
    w = Watching(log, tmp_path, evidence=False)
    assert w.wait_for(lambda w: w.settled(300, None))
    w.out.close()  # the reading end went away: the next line cannot be written
    w.thread.join(30)
    assert w.error is None and w.result is not None and w.result.exit_code == 0
    assert w.lines.broken and list((tmp_path / "snapshots").rglob("snap-000000000300-*.cbor"))

"""reconcile on the in-memory log: every fault kind alone and together, against expectations computed
here, independently (the reference and the states by plain code and ``accounts.apply``; no Folder,
rebuild or reconcile).

A worker is simulated as what it leaves behind: the ids it handled in handling order (a processed
log), the states it computed (a state export), and optionally a :class:`~chainfold.tracker.Tracker`
fed with the payloads it handled.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cbor2
import pytest

from chainfold.envelope import Event, encode
from chainfold.errors import BadInput, MalformedInputLine
from chainfold.examples import accounts
from chainfold.replay.model import load_model
from chainfold.ops.corrections import correction_key
from chainfold.log import MemoryLog
from chainfold import reconcile
from chainfold.ops import reference_join
from chainfold.ops.reconcile import load_processed, load_state_export, load_tracker
from chainfold.tracker import Tracker

MODEL = load_model("chainfold.examples.accounts")
SPEC_KEYS = ("verdict", "log", "processed", "first_divergence", "missing", "duplicates", "out_of_order",
             "malformed", "divergent_streams", "replayed")
S = 1024  # the log's segment size (chainfold's default)


# --- the log and a simulated worker ------------------------------------------------------------------


def gen_events(n: int, streams: int, seed: int) -> list[Event]:
    seqs: dict[str, int] = {}
    out = []
    for d in accounts.generate(n, streams, seed):
        seqs[d["stream"]] = seqs.get(d["stream"], 0) + 1
        out.append(Event(d["id"], d["stream"], seqs[d["stream"]], d["type"], d["time"], d["data"]))
    return out


MALFORMED = [
    b"not cbor \xff",
    json.dumps({"id": "j1", "stream": "acct-0001", "type": "Deposited", "data": {}}).encode(),
    cbor2.dumps({"id": "x1", "type": "Deposited", "time": 1, "data": {}}, canonical=True),  # no stream
    cbor2.dumps([1, 2, 3]),
]


@dataclass
class World:
    """A log (as built, entry by entry) with its events; payloads exactly as stored."""

    log: MemoryLog
    events: list[Event]
    entries: list[tuple[str, Any, bytes, str]] = field(default_factory=list)  # (kind, event|None, payload, mid)

    def payload_of(self, eid: str) -> bytes:
        return next(p for k, e, p, _ in self.entries if k == "event" and e.id == eid)

    def mid_of(self, eid: str) -> str:
        return next(m for k, e, _, m in self.entries if k == "event" and e.id == eid)


def build(n: int = 400, streams: int = 12, seed: int = 7, *, malformed_at: tuple[int, ...] = (),
          dup_at: tuple[tuple[int, int], ...] = (), log: Any = None, chunk: int | None = None) -> World:
    """``malformed_at``: log positions (in the event sequence) before which a malformed entry goes;
    ``dup_at``: (position, i): before event ``position``, event ``i`` is stored again. ``log``: the
    (empty) log to fill, a fresh MemoryLog by default; ``chunk``: append that many at a time."""
    evs = gen_events(n, streams, seed)
    items: list[tuple[str, Any, bytes]] = []
    mal = iter(MALFORMED * 10)
    for pos, ev in enumerate(evs):
        for _ in range(malformed_at.count(pos)):
            items.append(("malformed", None, next(mal)))
        for p, i in dup_at:
            if p == pos:
                items.append(("event", evs[i], encode(evs[i])))
        items.append(("event", ev, encode(ev)))
    log = log if log is not None else MemoryLog("accounts")
    rows = [(p, e.stream if e else None, e.time if e else None) for _, e, p in items]
    step = chunk or len(rows) or 1
    mids = [m for i in range(0, len(rows), step) for m in log.append_payloads(rows[i:i + step])]
    w = World(log, evs)
    w.entries = [(k, e, p, str(m)) for (k, e, p), m in zip(items, mids)]
    return w


def fold(events: list[Event], mishandled: set[str] = frozenset()) -> dict[str, Any]:
    """The worker's (or the reference's) fold: ``accounts.apply`` in the order given; a mishandled
    Withdrawn is applied as a deposit."""
    states: dict[str, Any] = {}
    for ev in events:
        st = states.get(ev.stream) or accounts.initial(ev.stream)
        if ev.id in mishandled:
            ev = ev._replace(type="Deposited")
        states[ev.stream] = accounts.apply(st, ev)
    return {s: accounts.render(v) for s, v in sorted(states.items())}


@dataclass
class Worker:
    handled: list[Event]
    state: dict[str, Any]


def simulate(w: World, *, skip: set[str] = frozenset(), twice: dict[str, int] | None = None,
             swap: tuple[str, str] | None = None, mishandle: set[str] = frozenset()) -> Worker:
    """A worker reading the log: it handles each event id once (a correct worker), except: ``skip``
    ids are dropped, ``twice`` ids are handled again ``k`` events later (a redelivery), ``swap`` ids
    are handled in swapped order, ``mishandle`` ids are applied wrongly."""
    order: list[Event] = []
    seen: set[str] = set()
    for kind, ev, _, _ in w.entries:
        if kind != "event" or ev.id in seen:
            continue
        seen.add(ev.id)
        if ev.id not in skip:
            order.append(ev)
    if swap:
        a, b = (next(i for i, e in enumerate(order) if e.id == x) for x in swap)
        order[a], order[b] = order[b], order[a]
    for eid, k in (twice or {}).items():
        i = next(i for i, e in enumerate(order) if e.id == eid)
        order.insert(min(len(order), i + 1 + k), order[i])
    return Worker(order, fold(order, set(mishandle)))


def write_worker(tmp: Path, w: World, wk: Worker, *, tracker_segment: int | None = None) -> dict[str, str]:
    paths = {"state": str(tmp / "state.json"), "processed": str(tmp / "processed.jsonl")}
    Path(paths["state"]).write_text(json.dumps(wk.state, indent=1))
    Path(paths["processed"]).write_text("".join(
        json.dumps({"id": e.id, "message_id": w.mid_of(e.id)}) + "\n" for e in wk.handled))
    if tracker_segment:
        with Tracker(tmp / "evidence", segment_size=tracker_segment, processed_log=False) as t:
            for e in wk.handled:
                t.handled(w.payload_of(e.id), w.mid_of(e.id), e.id)
        paths["checkpoints"] = str(tmp / "evidence" / "checkpoints.jsonl")
    return paths


# --- the expected report, computed independently --------------------------------------------------


def _mth(leaves: list[bytes]) -> bytes:
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return leaves[0]
    k = 1 << ((len(leaves) - 1).bit_length() - 1)
    return hashlib.sha256(b"\x01" + _mth(leaves[:k]) + _mth(leaves[k:])).digest()


def log_head(payloads: list[bytes], seg: int = S) -> bytes:
    head = bytes(32)
    for k in range(0, max(1, math.ceil(len(payloads) / seg))):
        part = payloads[k * seg:(k + 1) * seg]
        root = _mth([hashlib.sha256(b"\x00" + p).digest() for p in part])
        n = k * seg + len(part)
        head = hashlib.sha256(b"\x02" + head + n.to_bytes(8, "big") + root).digest()
    return head


def expected_report(w: World, wk: Worker | None, handled_ids: list[str] | None = None) -> dict[str, Any]:
    ref: list[tuple[int, Event, str]] = []  # (log index, event, message id)
    seen: set[str] = set()
    log_dups: set[str] = set()
    malformed = []
    for i, (kind, ev, _, mid) in enumerate(w.entries):
        if kind == "malformed":
            malformed.append(mid)
        elif ev.id in seen:
            log_dups.add(ev.id)
        else:
            seen.add(ev.id)
            ref.append((i, ev, mid))
    ref_ids = [e.id for _, e, _ in ref]
    pos = {e.id: j for j, (_, e, _) in enumerate(ref)}
    handled = handled_ids if handled_ids is not None else [e.id for e in wk.handled] if wk else []
    counts: dict[str, int] = {}
    for h in handled:
        counts[h] = counts.get(h, 0) + 1
    missing = [i for i in ref_ids if i not in counts]
    dups = sorted({i for i, c in counts.items() if c > 1} | log_dups, key=pos.__getitem__)
    ooo, top, firsts = [], {}, set()
    for h in handled:
        if h in firsts:
            continue
        firsts.add(h)
        st = ref[pos[h]][1].stream
        if pos[h] < top.get(st, -1):
            ooo.append(h)
        else:
            top[st] = pos[h]
    first = None
    j = 0
    while j < min(len(handled), len(ref_ids)) and handled[j] == ref_ids[j]:
        j += 1
    if j < len(ref_ids):
        idx, ev, mid = ref[j]
        first = {"index": idx, "segment": idx // S, "event_id": ev.id, "message_id": mid}
    elif j < len(handled):
        first = {"index": len(w.entries), "segment": len(w.entries) // S, "event_id": handled[j],
                 "message_id": None}
    want_states = fold([e for _, e, _ in ref])
    actual = wk.state if wk else {}
    divergent = {s: (want_states.get(s), actual.get(s)) for s in sorted(set(want_states) | set(actual))
                 if want_states.get(s) != actual.get(s)}
    return {"first_divergence": first, "missing": missing, "duplicates": dups, "out_of_order": ooo,
            "malformed": malformed, "divergent": divergent, "states": want_states,
            "verdict": "divergent" if first or divergent else "consistent",
            "log_events": len(w.entries), "processed": len(handled)}


def check(report: Any, exp: dict[str, Any]) -> dict[str, Any]:
    """Compare a report (or its JSON) with the expectation; every SPEC §4 key must be present."""
    doc = report if isinstance(report, dict) else report.to_json()
    for k in SPEC_KEYS:
        assert k in doc, k
    assert set(doc["log"]) >= {"events", "segments", "head"} and set(doc["replayed"]) >= {"from_snapshot", "events"}
    assert doc["verdict"] == exp["verdict"]
    assert doc["log"]["events"] == exp["log_events"]
    assert doc["log"]["segments"] == math.ceil(exp["log_events"] / S)
    assert doc["processed"]["events"] == exp["processed"]
    assert doc["first_divergence"] == exp["first_divergence"]
    assert doc["missing"] == exp["missing"]
    assert doc["duplicates"] == exp["duplicates"]
    assert doc["out_of_order"] == exp["out_of_order"]
    assert doc["malformed"] == exp["malformed"]
    got = {d["stream"]: (d["expected"], d["actual"]) for d in doc["divergent_streams"]}
    assert got == exp["divergent"]
    assert [d["stream"] for d in doc["divergent_streams"]] == sorted(got)
    json.dumps(doc)  # the report is JSON
    return doc


def run(w: World, paths: dict[str, str], tmp: Path, *, processed: bool = True, tracker: bool = False,
        repair: bool = False):
    return reconcile(
        w.log, MODEL, snapshots_root=tmp / "snapshots", state=load_state_export(paths["state"]),
        state_path=paths["state"], processed=load_processed(paths["processed"]) if processed else None,
        tracker=load_tracker(paths["checkpoints"]) if tracker else None, repair=repair,
    )


# --- the faults --------------------------------------------------------------------------------------


def same_stream_pair(w: World, after: int = 50) -> tuple[str, str]:
    """Two consecutive events of one stream, the first a deposit and the second a withdrawal (so
    swapping them changes the state: the withdrawal may be refused), after position ``after``."""
    last: dict[str, Event] = {}
    for ev in w.events[after:]:
        prev = last.get(ev.stream)
        if prev is not None and prev.type == "Deposited" and ev.type == "Withdrawn" \
                and ev.data["amount"] > 0:
            return prev.id, ev.id
        last[ev.stream] = ev
    raise AssertionError("no deposit/withdrawal pair")


def withdrawals(w: World, start: int, count: int) -> set[str]:
    return set([e.id for e in w.events[start:] if e.type == "Withdrawn"][:count])


CASES = ["clean", "skip", "twice", "reorder", "mishandle", "log-noise", "all"]


def scenario(name: str) -> tuple[World, dict[str, Any]]:
    noisy = name in ("log-noise", "all")
    w = build(malformed_at=(3, 150, 150, 399) if noisy else (), dup_at=((200, 10), (300, 250)) if noisy else ())
    kw: dict[str, Any] = {}
    if name in ("skip", "all"):
        kw["skip"] = {w.events[i].id for i in (40, 41, 333)}
    if name in ("twice", "all"):
        kw["twice"] = {w.events[60].id: 0, w.events[120].id: 25}
    if name in ("reorder", "all"):
        kw["swap"] = same_stream_pair(w, 90)
    if name in ("mishandle", "all"):
        kw["mishandle"] = withdrawals(w, 200, 4)
    return w, kw


@pytest.fixture(params=[None, 7], ids=["buckets-default", "buckets-of-7"])
def join_buckets(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reconcile's handling join with its default bucket size, and with buckets of 7 rows (many
    buckets and handling buckets even on these small logs)."""
    if request.param is not None:
        monkeypatch.setattr(reference_join, "BUCKET_ROWS", request.param)


@pytest.mark.parametrize("name", CASES)
def test_each_fault_alone_and_all_together(tmp_path: Path, name: str, join_buckets: None) -> None:
    w, kw = scenario(name)
    wk = simulate(w, **kw)
    paths = write_worker(tmp_path, w, wk)
    exp = expected_report(w, wk)
    doc = check(run(w, paths, tmp_path), exp)
    if name == "clean" or name == "log-noise":
        assert doc["verdict"] == "consistent" and doc["first_divergence"] is None
    if name == "log-noise":
        assert doc["duplicates"] == [w.events[10].id, w.events[250].id] and len(doc["malformed"]) == 4
    if name == "skip":
        assert doc["missing"] == sorted(kw["skip"], key=lambda e: int(e.rsplit("-", 1)[1]))
        assert doc["first_divergence"]["event_id"] == w.events[40].id
    if name == "twice":
        assert set(doc["duplicates"]) == set(kw["twice"]) and doc["missing"] == []
        assert doc["first_divergence"]["event_id"] == w.events[61].id  # where the second handling sits
    if name == "reorder":
        a, b = kw["swap"]
        assert doc["out_of_order"] == [a] and doc["missing"] == [] and doc["duplicates"] == []
        assert doc["first_divergence"]["event_id"] == a
    if name == "mishandle":
        # state wrong, handling order right: no first divergence, but divergent streams
        assert doc["first_divergence"] is None and doc["verdict"] == "divergent" and doc["divergent_streams"]
        assert {d["stream"] for d in doc["divergent_streams"]} == {e.stream for e in w.events if e.id in kw["mishandle"]}
    if name == "all":
        assert doc["missing"] and doc["duplicates"] and doc["out_of_order"] and doc["malformed"]


@pytest.mark.parametrize("name", [c for c in CASES if c not in ("clean", "log-noise")])
def test_repair_gives_the_reference_states(tmp_path: Path, name: str) -> None:
    w, kw = scenario(name)
    wk = simulate(w, **kw)
    paths = write_worker(tmp_path, w, wk)
    exp = expected_report(w, wk)
    report = run(w, paths, tmp_path, repair=True)
    doc = report.to_json()
    if exp["divergent"]:
        assert doc["verdict"] == "repaired"
        assert report.repaired_states == exp["states"]
        assert {c["stream"] for c in report.corrections} == set(exp["divergent"])
        assert all(c["idempotency_key"] == correction_key(w.log.topic, c["stream"], c["actual"], c["expected"])
                   for c in report.corrections)
        assert all(set(c) == {"stream", "expected", "actual", "delta", "idempotency_key"} for c in report.corrections)
        assert doc["replayed"]["events"] > 0
    else:  # handling diverged, every state right: the export already is the corrected state
        assert doc["verdict"] == "repaired" and report.repaired_states == exp["states"]
        assert not report.corrections


def test_log_head_matches_an_independent_computation(tmp_path: Path) -> None:
    w, kw = scenario("all")
    wk = simulate(w, **kw)
    doc = run(w, write_worker(tmp_path, w, wk), tmp_path).to_json()
    assert doc["log"]["head"] == log_head([p for _, _, p, _ in w.entries]).hex()


def test_worker_that_ends_early_or_handles_extra(tmp_path: Path) -> None:
    w = build(n=300)
    ids = [e.id for e in w.events]
    # stopped after 200 events: the rest is missing, the divergence is at the 201st
    wk = Worker(w.events[:200], fold(w.events[:200]))
    exp = expected_report(w, wk)
    assert exp["first_divergence"]["event_id"] == ids[200]
    check(run(w, write_worker(tmp_path, w, wk), tmp_path), exp)
    # everything, then the last event once more
    wk = Worker(w.events + [w.events[-1]], fold(w.events + [w.events[-1]]))
    exp = expected_report(w, wk)
    assert exp["first_divergence"]["index"] == len(w.entries)
    check(run(w, write_worker(tmp_path, w, wk), tmp_path), exp)


# --- tracker checkpoints -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["skip", "twice", "reorder", "all"])
@pytest.mark.parametrize("seg", [16, 64])
def test_tracker_checkpoints_alone_find_the_same_first_divergence(tmp_path: Path, name: str, seg: int) -> None:
    w, kw = scenario(name)
    wk = simulate(w, **kw)
    paths = write_worker(tmp_path, w, wk, tracker_segment=seg)
    exp = expected_report(w, wk)
    doc = run(w, paths, tmp_path, processed=False, tracker=True).to_json()
    assert doc["first_divergence"]["index"] == exp["first_divergence"]["index"]
    assert doc["first_divergence"]["event_id"] == exp["first_divergence"]["event_id"]
    assert doc["processed"]["events"] == len(wk.handled)
    t = doc["tracker"]
    assert t["exact"] is True
    n = len(wk.handled)
    assert t["comparisons"] <= 2 * math.log2(n) + 4
    # with both kinds of evidence they agree (no note about a disagreement)
    doc2 = run(w, paths, tmp_path, processed=True, tracker=True).to_json()
    assert doc2["first_divergence"] == exp["first_divergence"]
    assert not any("tracker checkpoints place" in note for note in doc2["notes"])


def test_tracker_comparisons_are_logarithmic_on_a_long_log(tmp_path: Path) -> None:
    w = build(n=6000, streams=40, seed=3)
    skip = {w.events[4321].id}
    wk = simulate(w, skip=skip)
    paths = write_worker(tmp_path, w, wk, tracker_segment=16)  # 375 segments
    doc = run(w, paths, tmp_path, processed=False, tracker=True).to_json()
    assert doc["first_divergence"]["event_id"] == w.events[4321].id
    assert doc["tracker"]["comparisons"] <= 2 * math.log2(len(wk.handled)) + 4


def test_tracker_without_leaves_names_the_segment(tmp_path: Path) -> None:
    w, kw = scenario("skip")
    wk = simulate(w, **kw)
    paths = write_worker(tmp_path, w, wk, tracker_segment=16)
    (tmp_path / "evidence" / "checkpoints.leaves").unlink()
    doc = run(w, paths, tmp_path, processed=False, tracker=True).to_json()
    j = 40 // 16 * 16  # the skipped event is the 41st handled: segment 2 of the tracker
    assert doc["first_divergence"]["event_id"] == w.events[j].id
    assert doc["tracker"]["exact"] is False and any("no leaf hashes" in n for n in doc["notes"])


def test_consistent_tracker(tmp_path: Path) -> None:
    w, kw = scenario("log-noise")
    wk = simulate(w)
    paths = write_worker(tmp_path, w, wk, tracker_segment=32)
    doc = run(w, paths, tmp_path, processed=False, tracker=True).to_json()
    assert doc["verdict"] == "consistent" and doc["first_divergence"] is None


# --- bad inputs --------------------------------------------------------------------------------------


def _bad(tmp_path: Path, w: World, *, processed: str | None = None, state: str | None = None):
    good = write_worker(tmp_path, w, simulate(w))
    if processed is not None:
        Path(good["processed"]).write_text(processed)
    if state is not None:
        Path(good["state"]).write_text(state)
    with pytest.raises(BadInput) as ei:
        run(w, good, tmp_path)
    return ei.value


def test_bad_json_in_processed_log(tmp_path: Path) -> None:
    w = build(n=50, streams=3)
    lines = [json.dumps({"id": e.id}) for e in w.events[:5]]
    lines[2] = '{"id": "evt-7-3"'
    e = _bad(tmp_path, w, processed="\n".join(lines) + "\n")
    assert isinstance(e, MalformedInputLine) and e.line == 3 and "bad JSON" in e.reason
    assert e.path.endswith("processed.jsonl") and "processed.jsonl:3" in str(e)


@pytest.mark.parametrize("line, reason", [
    ('["evt-7-1"]', "expected a JSON object"),
    ('{"message_id": "0:1:-1:-1"}', "'id'"),
    ('{"id": "evt-7-2", "message_id": "nope"}', "message_id"),
])
def test_bad_lines_in_processed_log(tmp_path: Path, line: str, reason: str) -> None:
    w = build(n=50, streams=3)
    e = _bad(tmp_path, w, processed=json.dumps({"id": "evt-7-1"}) + "\n" + line + "\n")
    assert isinstance(e, MalformedInputLine) and e.line == 2 and reason in e.reason


def test_unknown_event_ids_are_findings(tmp_path: Path) -> None:
    """Ids the log does not hold are what the worker did wrong: listed once each, in handling order;
    on one partition the handling departs from the reference where the first of them was handled."""
    w = build(n=50, streams=3)
    wk = simulate(w)
    paths = write_worker(tmp_path, w, wk)
    ids = [e.id for e in w.events]
    handled = ids[:2] + ["evt-nope"] + ids[2:] + ["evt-nope", "evt-other"]
    Path(paths["processed"]).write_text("".join(json.dumps({"id": i}) + "\n" for i in handled))
    doc = run(w, paths, tmp_path).to_json()
    assert doc["verdict"] == "divergent" and doc["unknown_ids"] == ["evt-nope", "evt-other"]
    assert doc["first_divergence"] == {"index": 2, "segment": 0, "event_id": ids[2], "message_id": w.mid_of(ids[2])}
    assert doc["processed"] == {"events": 53}
    assert doc["missing"] == [] and doc["duplicates"] == [] and doc["out_of_order"] == []
    assert doc["unknown_streams"] == [] and doc["divergent_streams"] == [] and doc["skipped"] == []
    # repaired: every state is right, so the export is the corrected one
    report = run(w, paths, tmp_path, repair=True)
    assert report.verdict == "repaired" and report.repaired_states == wk.state and report.corrections == []


def test_streams_the_log_never_had_are_findings(tmp_path: Path) -> None:
    w = build(n=50, streams=3)
    wk = simulate(w)
    wk.state["acct-9999"] = accounts.initial("acct-9999")
    wk.state["acct-0000x"] = {"balance": 5}
    doc = run(w, write_worker(tmp_path, w, wk), tmp_path).to_json()
    assert doc["verdict"] == "divergent" and doc["unknown_streams"] == ["acct-0000x", "acct-9999"]
    assert doc["first_divergence"] is None and doc["unknown_ids"] == []
    init = accounts.initial("acct-9999")
    assert doc["divergent_streams"] == [
        {"stream": "acct-0000x", "expected": None, "actual": {"balance": 5}, "delta": {"balance": -5}},
        # zero counters against nothing differ by nothing; the status and the null fields are what is there
        {"stream": "acct-9999", "expected": None, "actual": init, "delta": {"status": [None, "new"]}},
    ]
    report = run(w, write_worker(tmp_path, w, wk), tmp_path, repair=True)
    assert report.verdict == "repaired" and report.repaired_states == fold(w.events)
    assert [c["stream"] for c in report.corrections] == ["acct-0000x", "acct-9999"]


@pytest.mark.parametrize("text, reason", [("[1, 2]", "one JSON object"), ('"x"', "one JSON object"),
                                          ('{"a": 1,\n', "bad JSON")])
def test_bad_state_export(tmp_path: Path, text: str, reason: str) -> None:
    p = tmp_path / "state.json"
    p.write_text(text)
    with pytest.raises(MalformedInputLine) as ei:
        load_state_export(str(p))
    assert ei.value.path == str(p) and ei.value.line >= 1 and reason in ei.value.reason


def test_state_export_missing_a_stream_is_divergent(tmp_path: Path) -> None:
    w = build(n=100, streams=5)
    wk = simulate(w)
    del wk.state["acct-0002"]
    exp = expected_report(w, wk)
    doc = check(run(w, write_worker(tmp_path, w, wk), tmp_path), exp)
    assert [d["stream"] for d in doc["divergent_streams"]] == ["acct-0002"]
    assert doc["divergent_streams"][0]["actual"] is None


def test_random_faults_against_the_independent_expectation(tmp_path: Path, join_buckets: None) -> None:
    rnd = random.Random(11)
    for trial in range(12):
        w = build(n=rnd.randint(50, 300), streams=rnd.randint(1, 9), seed=trial,
                  malformed_at=tuple(rnd.randrange(50) for _ in range(rnd.randint(0, 2))),
                  dup_at=tuple((rnd.randrange(30, 50), rnd.randrange(30)) for _ in range(rnd.randint(0, 2))))
        ids = [e.id for e in w.events]
        kw: dict[str, Any] = {"skip": set(rnd.sample(ids, rnd.randint(0, 3))),
                              "twice": {i: rnd.randint(0, 5) for i in rnd.sample(ids, rnd.randint(0, 2))}}
        wk = simulate(w, **kw)
        d = tmp_path / str(trial)
        d.mkdir()
        check(run(w, write_worker(d, w, wk), d), expected_report(w, wk))


def test_worker_that_tracks_a_malformed_entry(tmp_path: Path) -> None:
    """A worker that hands a malformed payload to its tracker: the processed log stays readable (no
    line for it: it has no event id) and the checkpoints show the divergence at that point."""
    w = build(n=60, streams=3, malformed_at=(20,))
    wk = simulate(w)
    with Tracker(tmp_path / "evidence", segment_size=8) as t:
        for kind, ev, payload, mid in w.entries:
            t.handled(payload, mid)
    lines = (tmp_path / "evidence" / "processed.jsonl").read_text().splitlines()
    assert [json.loads(x)["id"] for x in lines] == [e.id for e in w.events]
    paths = write_worker(tmp_path, w, wk)
    paths["processed"] = str(tmp_path / "evidence" / "processed.jsonl")
    paths["checkpoints"] = str(tmp_path / "evidence" / "checkpoints.jsonl")
    doc = run(w, paths, tmp_path, processed=False, tracker=True).to_json()
    assert doc["first_divergence"]["event_id"] == w.events[20].id  # the malformed entry sits before it
    assert run(w, paths, tmp_path).to_json()["verdict"] == "consistent"

"""HandlingComparator: the live comparison against an oracle over whole sequences, against
reconcile's first_divergence on the same evidence, fed in any interleaving, spilled, saved and loaded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chainfold.examples import accounts
from chainfold.merkle import leaf_hash
from chainfold.ops.reconcile import load_tracker, reconcile
from chainfold.tracker import NO_DIGEST, Tracker, state_digest
from chainfold.watch.compare import Expected, HandlingComparator
from chainfold.watch.follow import EvidenceFollower

from .test_reconcile import MODEL, World, build, simulate


def reference(w: World, *, digests: bool) -> list[Expected]:
    """The reference of ``w``: first entries of well-formed events, in log order, with the state
    digest of the stream after each (folded here with accounts.apply)."""
    out, seen, states = [], set(), {}
    for i, (kind, ev, payload, mid) in enumerate(w.entries):
        if kind != "event" or ev.id in seen:
            continue
        seen.add(ev.id)
        st_ = states[ev.stream] = accounts.apply(states.get(ev.stream) or accounts.initial(ev.stream), ev)
        d = state_digest(ev.stream, accounts.render(st_)) if digests else NO_DIGEST
        out.append(Expected(i, ev.id, mid, leaf_hash(payload), d))
    return out


def worker_records(w: World, handled: list, mishandled: set[str]) -> tuple[bytes, bytes]:
    states: dict[str, Any] = {}
    leaves, digests = [], []
    for ev in handled:
        e = ev._replace(type="Deposited") if ev.id in mishandled else ev
        states[ev.stream] = accounts.apply(states.get(ev.stream) or accounts.initial(ev.stream), e)
        leaves.append(leaf_hash(w.payload_of(ev.id)))
        digests.append(state_digest(ev.stream, accounts.render(states[ev.stream])))
    return b"".join(leaves), b"".join(digests)


def oracle(ref: list[Expected], leaves: bytes, digests: bytes, log_entries: int) -> tuple[int, int] | None:
    """(position, log index) of the first divergence, by a plain scan of both whole sequences."""
    n = len(leaves) // 32
    for p in range(min(n, len(ref))):
        if leaves[p * 32:(p + 1) * 32] != ref[p].leaf:
            return p, ref[p].index
        w = digests[p * 32:(p + 1) * 32]
        if w != NO_DIGEST and ref[p].digest != NO_DIGEST and w != ref[p].digest:
            return p, ref[p].index
    if n > len(ref):
        return len(ref), log_entries
    return None


def feed(c: HandlingComparator, ref: list[Expected], leaves: bytes, digests: bytes, cuts: list[int],
         *, log_entries: int) -> Any:
    """Feed both sides in chunks that interleave as ``cuts`` say; digests one chunk late."""
    r = w = 0
    found = None
    late: list[bytes] = []
    n = len(leaves) // 32
    for k, cut in enumerate(cuts + [1 << 30] * 4):
        if k % 2 == 0 and r < len(ref):
            part = ref[r:r + cut]
            c.add_reference(part)
            if c.digests:
                c.add_digests(late)
                late = [e.digest for e in part]
            r += len(part)
        elif w < n:
            m = min(cut, c.room() or 1, n - w)
            c.add_worker(w, leaves[w * 32:(w + m) * 32], digests[w * 32:(w + m) * 32])
            w += m
        found = c.check() or found
    if c.digests:
        c.add_digests(late)
    return c.check(log_entries=log_entries, reference_complete=True) or found


fault = st.sampled_from(["none", "skip", "twice", "swap", "mishandle", "extra-at-end"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=fault, at=st.integers(0, 150), seed=st.integers(0, 3), digests=st.booleans(),
       cuts=st.lists(st.integers(1, 40), min_size=1, max_size=30), window=st.sampled_from([1, 3, 64, 1 << 15]))
def test_finds_what_a_scan_of_both_sequences_finds(tmp_path: Path, kind: str, at: int, seed: int, digests: bool,
                                                   cuts: list[int], window: int) -> None:
    w = build(160, 6, seed, malformed_at=(5, 40), dup_at=((30, 2), (90, 50)))
    eid = w.events[at].id
    other = w.events[min(at + 7, 159)].id
    wk = simulate(w, skip={eid} if kind == "skip" else frozenset(),
                  twice={eid: 3} if kind == "twice" else None,
                  swap=(eid, other) if kind == "swap" and eid != other else None)
    handled = list(wk.handled) + ([wk.handled[-1]] if kind == "extra-at-end" else [])
    mis = {eid} if kind == "mishandle" and w.events[at].type == "Withdrawn" else set()
    leaves, wd = worker_records(w, handled, mis)
    ref = reference(w, digests=digests)
    spill = tmp_path / f"spill-{kind}-{at}-{window}"
    c = HandlingComparator(segment_size=64, window=window, spill_path=spill, digests=digests)
    got = feed(c, ref, leaves, wd, cuts, log_entries=len(w.entries))
    want = oracle(ref, leaves, wd if digests else NO_DIGEST * (len(leaves) // 32), len(w.entries))
    if want is None:
        assert got is None and c.confirmed == len(ref)
    else:
        assert got is not None and (got.position, got.index) == want
        assert got.segment == want[1] // 64
        if want[0] < len(ref):
            assert (got.event_id, got.message_id) == (ref[want[0]].event_id, ref[want[0]].message_id)
    c.close()
    assert not spill.exists()


def test_names_the_divergence_as_reconcile_does(tmp_path: Path) -> None:
    """Real Tracker evidence, read by the follower while it grows, compared live: the same entry
    as reconcile --checkpoints names."""
    w = build(900, 20, 3, malformed_at=(10, 400), dup_at=((100, 7), (500, 499)))
    for case, kw in {"skip": {"skip": {w.events[613].id}}, "twice": {"twice": {w.events[200].id: 5}},
                     "swap": {"swap": (w.events[700].id, w.events[702].id)}}.items():
        wk = simulate(w, **kw)
        ev = tmp_path / case
        f = EvidenceFollower(ev, max_leaves=50)
        c = HandlingComparator(segment_size=1024, window=16, spill_path=tmp_path / f"{case}.spill")
        ref = reference(w, digests=False)
        c.add_reference(ref[:300])
        found = None
        with Tracker(ev, segment_size=64, flush_interval=None) as t:
            for k, e in enumerate(wk.handled):
                t.handled(w.payload_of(e.id), w.mid_of(e.id), e.id)
                if k % 97 == 0:
                    t.flush()
                    b = f.poll(max_leaves=c.room())
                    c.add_worker(b.start, b.leaves, b.digests)
                    found = c.check() or found
        c.add_reference(ref[300:])
        while (b := f.poll(max_leaves=c.room())).count:
            c.add_worker(b.start, b.leaves, b.digests)
            found = c.check() or found
        found = c.check(log_entries=len(w.entries), reference_complete=True) or found
        rep = reconcile(w.log, MODEL, snapshots_root=tmp_path / f"snaps-{case}", state=wk.state,
                        tracker=load_tracker(str(ev / "checkpoints.jsonl")))
        assert rep.first_divergence is not None
        assert found is not None, case
        assert found.to_json() == {k: rep.first_divergence[k] for k in ("index", "segment", "event_id", "message_id")}


def test_save_and_load_continue_the_comparison(tmp_path: Path) -> None:
    w = build(300, 8, 1, dup_at=((50, 3),))
    wk = simulate(w, skip={w.events[260].id})
    ref = reference(w, digests=True)
    leaves, wd = worker_records(w, wk.handled, set())
    c = HandlingComparator(segment_size=64, window=10, spill_path=tmp_path / "a.spill", digests=True)
    c.add_reference(ref[:200])
    c.add_digests(e.digest for e in ref[:200])
    c.add_worker(0, leaves[:120 * 32], wd[:120 * 32])
    assert c.check() is None and c.confirmed == 120
    c.add_worker(120, leaves[120 * 32:220 * 32], wd[120 * 32:220 * 32])  # beyond the reference
    assert c.check() is None and c.confirmed == 200 and c.worker_size == 220
    c.save(tmp_path / "cmp")
    c.close()
    d = HandlingComparator.load(tmp_path / "cmp", window=10, spill_path=tmp_path / "b.spill")
    assert (d.confirmed, d.worker_size, d.reference_size) == (200, 220, 200)
    d.add_reference(ref[200:])
    d.add_digests(e.digest for e in ref[200:])
    d.add_worker(220, leaves[220 * 32:], wd[220 * 32:])
    got = d.check()
    assert got is not None and got.event_id == w.events[260].id and got.position == 260
    assert "skipped" in got.reason


def test_lag_is_counted_in_log_entries(tmp_path: Path) -> None:
    w = build(100, 4, 2, malformed_at=(20,))
    ref = reference(w, digests=False)
    c = HandlingComparator(segment_size=64)
    c.add_reference(ref)
    assert c.lag(len(w.entries)) == len(w.entries)
    c.add_worker(0, b"".join(e.leaf for e in ref[:30]))
    c.check()
    assert c.lag(len(w.entries)) == len(w.entries) - (ref[29].index + 1)
    c.add_worker(30, b"".join(e.leaf for e in ref[30:]))
    c.check()
    assert c.lag(len(w.entries)) == 0

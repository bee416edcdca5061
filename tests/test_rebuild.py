"""rebuild: snapshot + tail equals the whole fold; duplicates fold once; bad snapshots are rejected."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chainfold.envelope import Event, encode
from chainfold.errors import HistoryUnrecoverable, ModelError
from chainfold.examples import accounts, counters, orders
from chainfold.replay.model import load_model
from chainfold.log import MemoryLog
from chainfold import rebuild
from chainfold.store.snapshots import SnapshotStore

from chainfold.examples import es_accounts

MODELS = {"accounts": accounts, "orders": orders, "counters": counters, "es_accounts": es_accounts.model}
GEN = {"accounts": accounts, "orders": orders, "counters": accounts}
REFS = {"es_accounts": "chainfold.examples.es_accounts:model"}


def events_for(name: str, n: int, streams: int, seed: int) -> list[Event]:
    if name == "es_accounts":
        return es_accounts.generate_events(n, streams, seed)
    gen = GEN[name].generate(n, streams, seed)
    return [Event(d["id"], d["stream"], None, d["type"], d["time"], d["data"]) for d in gen]


def reference(model_mod, evs: list[Event]) -> dict:
    """Independent fold: the model applied per stream, each id once, in log order."""
    states: dict = {}
    seen = set()
    for ev in evs:
        if ev.id in seen:
            continue
        seen.add(ev.id)
        states[ev.stream] = model_mod.apply(states.get(ev.stream, model_mod.initial(ev.stream)), ev)
    return {s: model_mod.render(v) for s, v in sorted(states.items())}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(sorted(MODELS)), n=st.integers(1, 300), k=st.integers(1, 300),
       seed=st.integers(0, 10_000), seg=st.sampled_from([1, 4, 16]))
def test_snapshot_plus_tail_equals_full_fold(tmp_path_factory, name: str, n: int, k: int, seed: int, seg: int) -> None:
    root = tmp_path_factory.mktemp("snaps")
    model = load_model(REFS.get(name, f"chainfold.examples.{name}"))
    evs = events_for(name, n, 5, seed)
    log = MemoryLog("t")
    log.append(evs[:k], assign_seq=name != "es_accounts")
    first = rebuild(log, model, snapshots_root=root, snapshot_every=0, segment_size=seg)
    assert first.written  # a snapshot at the split
    log.append(evs[k:], assign_seq=name != "es_accounts")
    second = rebuild(log, model, snapshots_root=root, snapshot_every=0)
    full = rebuild(log, model, snapshots_root=root, full=True, write_snapshots=False)
    assert second.snapshot is not None and second.from_snapshot == min(k, n)
    assert second.folder.rendered() == full.folder.rendered() == reference(MODELS[name], log_events(log))


def log_events(log: MemoryLog) -> list[Event]:
    from chainfold.envelope import decode

    return [decode(e.payload) for e in log.entries()]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(2, 200), seed=st.integers(0, 1000), dups=st.lists(st.integers(0, 199), max_size=20))
def test_duplicates_fold_once(tmp_path_factory, n: int, seed: int, dups: list[int]) -> None:
    root = tmp_path_factory.mktemp("snaps")
    model = load_model("chainfold.examples.accounts")
    evs = events_for("accounts", n, 4, seed)
    clean = MemoryLog("clean")
    clean.append(evs, assign_seq=False)
    noisy = MemoryLog("noisy")
    with_dups = list(evs)
    for d in dups:
        i = d % n
        first = with_dups.index(evs[i])
        with_dups.insert(min(len(with_dups), first + 1 + d % 5), evs[i])  # a later copy of event i
    noisy.append(with_dups, assign_seq=False)
    a = rebuild(clean, model, snapshots_root=root, write_snapshots=False)
    b = rebuild(noisy, model, snapshots_root=root, snapshot_every=7)
    assert a.folder.rendered() == b.folder.rendered()
    assert len(b.folder.duplicates) == len(with_dups) - n
    c = rebuild(noisy, model, snapshots_root=root)  # from the snapshot: still once
    assert c.folder.rendered() == a.folder.rendered()


def _setup(tmp_path: Path, n: int = 500):
    model = load_model("chainfold.examples.accounts")
    log = MemoryLog("t")
    log.append(events_for("accounts", n, 10, 1))
    r = rebuild(log, model, snapshots_root=tmp_path, snapshot_every=100, keep=10)
    return model, log, r


def test_each_bad_snapshot_is_rejected_with_its_reason(tmp_path: Path) -> None:
    model, log, r = _setup(tmp_path)
    store = SnapshotStore(tmp_path, log.topic)
    infos = store.list()
    assert len(infos) == 5
    newest, second, third = infos[0].path, infos[1].path, infos[2].path
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])  # truncated
    b = bytearray(second.read_bytes())
    b[len(b) // 2] ^= 0x40
    second.write_bytes(bytes(b))  # one flipped byte
    other = load_model("chainfold.examples.counters")
    res = rebuild(log, model, snapshots_root=tmp_path, write_snapshots=False)
    reasons = [reason for _, reason in res.rejected]
    assert len(reasons) == 2 and res.snapshot is not None
    assert res.snapshot_path == str(third)
    full = rebuild(log, model, snapshots_root=tmp_path, full=True, write_snapshots=False)
    assert res.folder.rendered() == full.folder.rendered()
    res2 = rebuild(log, other, snapshots_root=tmp_path, write_snapshots=False)
    assert res2.snapshot is None and any("other model" in r for _, r in res2.rejected)


def test_snapshot_whose_head_disagrees_with_the_log_is_rejected(tmp_path: Path) -> None:
    model, log, r = _setup(tmp_path)
    # the same topic name, other content: the recorded checkpoints disagree with the snapshots
    log2 = MemoryLog("t")
    log2.append(events_for("accounts", 500, 10, 2))
    import shutil

    from chainfold.store.snapshots import topic_dir

    d = topic_dir(tmp_path, log.topic)
    for f in d.glob("checkpoints*"):
        pass
    res = rebuild(log2, model, snapshots_root=tmp_path, write_snapshots=False)
    assert res.snapshot is None
    assert res.rejected and all("disagrees" in why or "no longer holds" in why for _, why in res.rejected)
    full = rebuild(log2, model, snapshots_root=tmp_path, full=True, write_snapshots=False)
    assert res.folder.rendered() == full.folder.rendered()
    shutil.rmtree(d)


def test_model_error_stops_with_ids_and_writes_no_snapshot_past_it(tmp_path: Path) -> None:
    model = load_model("chainfold.examples.accounts")
    log = MemoryLog("t")
    evs = events_for("accounts", 300, 5, 3)
    bad = Event("bad-1", evs[0].stream, None, "Deposited", 1, {"amount": "lots"})
    log.append(evs[:250] + [bad] + evs[250:])
    with pytest.raises(ModelError) as info:
        rebuild(log, model, snapshots_root=tmp_path, snapshot_every=100)
    err = info.value
    assert err.event_id == "bad-1" and err.stream == evs[0].stream and err.message_id
    infos = SnapshotStore(tmp_path, log.topic).list()
    assert infos and max(i.entries for i in infos) <= 250


def test_history_gone_uses_a_snapshot_or_is_unrecoverable(tmp_path: Path) -> None:
    model, log, r = _setup(tmp_path)
    # retention removed the first 150 entries: snapshots at 200..500 still cover the gap
    part = log.partitions()[0]
    entries = log._parts[part]
    del entries[:150]
    res = rebuild(log, model, snapshots_root=tmp_path, write_snapshots=False)
    assert res.snapshot is not None and any("could not be re-verified" in n for n in res.notes)
    for info in SnapshotStore(tmp_path, log.topic).list():
        os.unlink(info.path)
    with pytest.raises(HistoryUnrecoverable) as info:
        rebuild(log, model, snapshots_root=tmp_path, write_snapshots=False)
    assert "0:150:-1:-1" in str(info.value) and "0:0:-1:-1" in str(info.value)


def test_rewritten_log_is_not_mistaken_for_lost_history(tmp_path: Path) -> None:
    """The log now starts later than recorded (like a retention loss) but what it still holds is not
    what was recorded: snapshots are rejected and the fold is of the log as it is."""
    model = load_model("chainfold.examples.accounts")
    log = MemoryLog("t")
    log.append(events_for("accounts", 3000, 10, 1))
    rebuild(log, model, snapshots_root=tmp_path, snapshot_every=1000, keep=10)
    part = log.partitions()[0]
    other = MemoryLog("o")
    other.append(events_for("accounts", 4000, 10, 9))
    log._parts[part] = other.entries()[1500:]  # ids 0:1500.. like after retention, other payloads
    res = rebuild(log, model, snapshots_root=tmp_path, write_snapshots=False)
    assert res.snapshot is None and len(res.rejected) == 3
    assert any("rewritten" in n for n in res.notes)
    plain = MemoryLog("p")
    plain.append_payloads((e.payload, e.key, e.event_time) for e in other.entries()[1500:])
    full = rebuild(plain, model, snapshots_root=tmp_path / "other", full=True, write_snapshots=False)
    assert res.folder.rendered() == full.folder.rendered()


def test_everything_recorded_gone_is_unrecoverable_until_reset(tmp_path: Path) -> None:
    model = load_model("chainfold.examples.accounts")
    log = MemoryLog("t")
    log.append(events_for("accounts", 3000, 10, 1))
    rebuild(log, model, snapshots_root=tmp_path, snapshot_every=1000)
    part = log.partitions()[0]
    log._parts[part] = [e._replace(message_id=e.message_id._replace(ledger=7)) for e in log.entries()[2900:]]
    with pytest.raises(HistoryUnrecoverable) as info:
        rebuild(log, model, snapshots_root=tmp_path, write_snapshots=False)
    assert "7:2900:-1:-1" in str(info.value) and "0:0:-1:-1" in str(info.value)

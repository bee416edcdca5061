"""Parallel rebuild and verify give the serial results: on the in-memory log (sent to the workers)
and on a real broker, with duplicates, malformed entries (with and without a key), keyless events,
snapshots, and a log that changed since it was recorded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from chainfold.log.broker import BrokerOptions
from chainfold.envelope import Event, encode, event_from_json
from chainfold.errors import ModelError
from chainfold.examples import accounts
from chainfold import Folder, load_model, rebuild, verify
from chainfold.replay.decode import shard_of
from chainfold.log import EventLog, MemoryLog
from chainfold.engines.parallel import PulsarSource, parallel_rebuild, parallel_verify
from chainfold.hashing.record import PartitionRecord
from chainfold.store.snapshots import topic_dir

from .conftest import unique_topic

MODEL = "chainfold.examples.accounts"
SEG = 64
SPLITS = ["fanout", "readers"]


def events(n: int = 3000, streams: int = 40, seed: int = 5) -> list[Event]:
    return [event_from_json(d) for d in accounts.generate(n, streams, seed)]


def messy(log: EventLog, n: int = 3000) -> None:
    """Accounts events, then duplicates (keyed and keyless), malformed entries (keyed, keyless),
    keyless events, more events."""
    evs = events(n)
    half = n // 2
    log.append(evs[:half])
    log.append(evs[10:20], assign_seq=False)  # duplicates of early events, with their keys
    log.append_payloads([
        (b"\xa1\x62id\x61x", "acct-0001", None),  # malformed, keyed
        (b"not cbor at all", None, None),  # malformed, keyless
        (encode(evs[30]), None, None),  # a duplicate without a key
        (b"\x01", "acct-0002", 1),  # malformed, keyed, another shard probably
    ])
    log.append(evs[half:-5])
    # the last few events without a message key: every worker decodes them, one folds each
    log.append_payloads((encode(ev._replace(seq=None)), None, ev.time) for ev in evs[-5:])


def summary(result: Any) -> dict[str, Any]:
    j = result.to_json()
    return {
        "states": result.folder.rendered(),
        "applied": j["applied"],
        "streams": j["streams"],
        "malformed": j["malformed"],
        "duplicates": j["duplicates"],
        "log": j["log"],
        "replayed": j["replayed"],
        "seen": sorted(result.folder.seen),
        "index": result.folder.index,
    }


def verify_summary(report: Any) -> dict[str, Any]:
    j = report.to_json()
    return {k: j[k] for k in ("verdict", "log", "first_mismatch", "snapshots_checked")}


def test_shards_partition_the_streams() -> None:
    keys = [f"acct-{i:04d}" for i in range(1000)]
    for n in (2, 3, 4):
        shards = [shard_of(k, n) for k in keys]
        assert set(shards) == set(range(n))
        assert all(shards.count(i) > 1000 / n / 2 for i in range(n))
    assert shard_of("acct-0001", 4) == shard_of("acct-0001", 4)  # stable (not Python's hash)


def test_sharded_folders_together_fold_what_one_folder_does() -> None:
    log = MemoryLog("m")
    messy(log)
    model = load_model(MODEL)
    whole = Folder(model)
    whole.feed(log.read())
    parts = [Folder(model, shard=(i, 3)) for i in range(3)]
    for f in parts:
        f.feed(log.read())
    merged = {}
    for f in parts:
        assert not set(merged) & set(f.states)
        merged.update(f.states)
        assert f.index == whole.index and f.misrouted == 0
    assert merged == whole.states
    assert sum(f.applied for f in parts) == whole.applied
    assert sorted((m.index, m.message_id, m.reason) for f in parts for m in f.malformed) == \
        [(m.index, m.message_id, m.reason) for m in whole.malformed]
    assert sorted(d.index for f in parts for d in f.duplicates) == [d.index for d in whole.duplicates]


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("workers", [2, 3])
def test_parallel_rebuild_equals_serial_on_memory_log(tmp_path: Path, workers: int, split: str) -> None:
    log = MemoryLog("m")
    messy(log)
    serial = rebuild(log, load_model(MODEL), snapshots_root=tmp_path / "a", full=True)
    par = parallel_rebuild(log, MODEL, workers=workers, snapshots_root=tmp_path / "b", full=True, split=split)
    assert par.workers == workers and len(par.worker_peak_rss) >= 1
    assert summary(par) == summary(serial)
    assert len(serial.folder.malformed) == 3 and len(serial.folder.duplicates) == 11
    # both recorded the same checkpoints
    p = log.partitions()[0]
    a = PartitionRecord(topic_dir(tmp_path / "a", log.topic), p).load()
    b = PartitionRecord(topic_dir(tmp_path / "b", log.topic), p).load()
    assert a == b and a


@pytest.mark.parametrize("split", SPLITS)
def test_parallel_rebuild_from_a_snapshot_equals_serial(tmp_path: Path, split: str) -> None:
    log = MemoryLog("m")
    messy(log, 2000)
    model = load_model(MODEL)
    # a snapshot part-way (the periodic one), then more events after it
    first = rebuild(log, model, snapshots_root=tmp_path / "s", full=True, snapshot_every=1500)
    assert first.written
    log.append(events(600, 40, seed=9))
    import shutil

    shutil.copytree(tmp_path / "s", tmp_path / "p")
    serial = rebuild(log, model, snapshots_root=tmp_path / "s", write_snapshots=False)
    par = parallel_rebuild(log, MODEL, workers=2, snapshots_root=tmp_path / "p", write_snapshots=False, split=split)
    assert serial.snapshot is not None and par.snapshot is not None
    assert par.from_snapshot == serial.from_snapshot
    assert summary(par) == summary(serial)


def test_parallel_rebuild_writes_the_final_snapshot(tmp_path: Path) -> None:
    log = MemoryLog("m")
    messy(log, 1000)
    par = parallel_rebuild(log, MODEL, workers=2, snapshots_root=tmp_path)
    assert len(par.written) == 1
    again = rebuild(log, load_model(MODEL), snapshots_root=tmp_path, write_snapshots=False)
    assert again.from_snapshot == log_size(log)
    assert again.folder.rendered() == par.folder.rendered()


def log_size(log: MemoryLog) -> int:
    return sum(len(log.entries(p)) for p in log.partitions())


@pytest.mark.parametrize("split", SPLITS)
def test_a_key_of_another_shard_than_its_stream_makes_it_serial(tmp_path: Path, split: str) -> None:
    log = MemoryLog("m")
    evs = events(400)
    log.append(evs[:300])
    # a foreign producer keyed an event by something else than its stream
    odd = evs[300]._replace(seq=None)
    key = next(k for k in (f"k{i}" for i in range(100)) if shard_of(k, 2) != shard_of(odd.stream, 2))
    log.append_payloads([(encode(odd), key, odd.time)])
    log.append(evs[301:])
    serial = rebuild(log, load_model(MODEL), snapshots_root=tmp_path / "a", full=True)
    par = parallel_rebuild(log, MODEL, workers=2, snapshots_root=tmp_path / "b", full=True, split=split)
    assert summary(par) == summary(serial)
    assert any("serially" in n for n in par.notes)


@pytest.mark.parametrize("split", SPLITS)
def test_one_event_id_in_two_shards_makes_it_serial(tmp_path: Path, split: str) -> None:
    log = MemoryLog("m")
    evs = events(400)
    log.append(evs)
    a = next(ev for ev in evs if shard_of(ev.stream, 2) == 0)
    b_stream = next(ev.stream for ev in evs if shard_of(ev.stream, 2) == 1)
    clash = Event(a.id, b_stream, None, "Deposited", 1, {"amount": 100})
    log.append_payloads([(encode(clash), b_stream, 1)])
    serial = rebuild(log, load_model(MODEL), snapshots_root=tmp_path / "a", full=True)
    par = parallel_rebuild(log, MODEL, workers=2, snapshots_root=tmp_path / "b", full=True, split=split)
    assert summary(par) == summary(serial)
    assert [d["event_id"] for d in par.to_json()["duplicates"]] == [a.id]


@pytest.mark.parametrize("split", SPLITS)
def test_a_model_error_in_a_worker_is_raised_like_serially(tmp_path: Path, split: str) -> None:
    log = MemoryLog("m")
    evs = events(300)
    log.append(evs[:200])
    bad = Event("broken-1", evs[0].stream, None, "Deposited", 1, {"amount": "ten"})
    log.append_payloads([(encode(bad), bad.stream, 1)])
    log.append(evs[200:])
    with pytest.raises(ModelError) as serial:
        rebuild(log, load_model(MODEL), snapshots_root=tmp_path / "a", full=True)
    with pytest.raises(ModelError) as par:
        parallel_rebuild(log, MODEL, workers=2, snapshots_root=tmp_path / "b", full=True, split=split)
    assert str(par.value) == str(serial.value)
    assert par.value.event_id == "broken-1"


def test_parallel_rebuild_of_a_partitioned_topic(tmp_path: Path) -> None:
    log = MemoryLog("m", partitions=3)
    messy(log, 1500)
    serial = rebuild(log, load_model(MODEL), snapshots_root=tmp_path / "a", full=True)
    par = parallel_rebuild(log, MODEL, workers=2, snapshots_root=tmp_path / "b", full=True)
    assert summary(par) == summary(serial)
    assert len(par.scans) == 3


@pytest.mark.parametrize("workers", [2, 4])
def test_parallel_verify_equals_serial(tmp_path: Path, workers: int) -> None:
    log = MemoryLog("m")
    messy(log, 3000)
    rec_a, rec_b = tmp_path / "a", tmp_path / "b"
    first_a = verify(log, record_dir=rec_a, segment_size=SEG)
    first_b = parallel_verify(log, record_dir=rec_b, workers=workers, segment_size=SEG)  # nothing recorded: serial
    assert verify_summary(first_a) == verify_summary(first_b)
    log.append(events(700, 40, seed=11))  # new entries after the recorded ones
    again_a = verify(log, record_dir=rec_a, segment_size=SEG)
    again_b = parallel_verify(log, record_dir=rec_b, workers=workers, segment_size=SEG)
    assert again_b.workers == workers
    assert verify_summary(again_b) == verify_summary(again_a)
    assert again_b.to_json()["checkpoints_recorded"] == again_a.to_json()["checkpoints_recorded"] > 0
    p = log.partitions()[0]
    assert PartitionRecord(rec_a, p).load() == PartitionRecord(rec_b, p).load()


def test_parallel_verify_names_the_first_changed_entry(tmp_path: Path) -> None:
    ps = [encode(Event(f"e{i}", f"s{i % 7}", i // 7 + 1, "T", 1_700_000_000_000 + i, {"i": i})) for i in range(2000)]
    original = MemoryLog("m")
    original.append_payloads((p, f"s{i % 7}", None) for i, p in enumerate(ps))
    rec_a, rec_b = tmp_path / "a", tmp_path / "b"
    verify(original, record_dir=rec_a, segment_size=SEG)
    verify(original, record_dir=rec_b, segment_size=SEG)
    changed = list(ps)
    changed[1234] = encode(Event("e1234", "s2", 1, "T", 1, {"i": -1}))
    faulty = MemoryLog("m")
    faulty.append_payloads((p, f"s{i % 7}", None) for i, p in enumerate(changed))
    serial = verify(faulty, record_dir=rec_a, segment_size=SEG)
    par = parallel_verify(faulty, record_dir=rec_b, workers=3, segment_size=SEG)
    assert not par.intact and par.mismatch.index == serial.mismatch.index == 1234
    assert verify_summary(par) == verify_summary(serial)


def test_parallel_verify_of_a_partitioned_topic_checks_snapshots(tmp_path: Path) -> None:
    log = MemoryLog("m", partitions=2)
    messy(log, 1500)
    rebuild(log, load_model(MODEL), snapshots_root=tmp_path / "s", full=True)
    d = topic_dir(tmp_path / "s", log.topic)
    serial = verify(log, record_dir=d, snapshots_root=tmp_path / "s", segment_size=SEG)
    par = parallel_verify(log, record_dir=d, workers=2, snapshots_root=tmp_path / "s", segment_size=SEG)
    assert verify_summary(par) == verify_summary(serial) and par.snapshots_checked == 2


# --- on a real broker -----------------------------------------------------------------------------


@pytest.mark.broker
@pytest.mark.parametrize("split", SPLITS)
def test_parallel_rebuild_and_verify_on_the_broker(broker_url: str, tmp_path: Path, split: str) -> None:
    from chainfold.log.pulsar import open_log

    topic = unique_topic("par")
    opts = BrokerOptions(service_url=broker_url)
    with open_log(topic, opts) as log:
        messy(log, 4000)
    source = PulsarSource(topic, opts)
    with source() as log:
        serial = rebuild(log, load_model(MODEL), snapshots_root=tmp_path / "a", full=True)
        vs = verify(log, record_dir=topic_dir(tmp_path / "a", log.topic), segment_size=1024)
    par = parallel_rebuild(source, MODEL, workers=2, snapshots_root=tmp_path / "b", full=True, split=split)
    assert summary(par) == summary(serial)
    assert len(serial.folder.malformed) == 3 and len(serial.folder.duplicates) == 11
    vp = parallel_verify(source, record_dir=topic_dir(tmp_path / "b", par.topic), workers=2)
    assert vp.workers == 2 and vp.intact
    assert verify_summary(vp) == verify_summary(vs)


@pytest.mark.broker
def test_cli_workers_option(cli, tmp_path: Path) -> None:
    import json


    topic = unique_topic("parcli")
    lines = "\n".join(json.dumps(d) for d in accounts.generate(3000, 30, 3)) + "\n"
    assert cli("publish", topic, "-", input=lines).returncode == 0
    one = cli("rebuild", topic, "--model", MODEL, "--json", "--no-snapshots")
    two = cli("rebuild", topic, "--model", MODEL, "--json", "--no-snapshots", "--workers", "2", "--full")
    assert one.returncode == 0 and two.returncode == 0, two.stderr
    a, b = json.loads(one.stdout), json.loads(two.stdout)
    assert b["workers"] == 2 and a["applied"] == b["applied"] == 3000 and a["log"] == b["log"]
    for _ in range(2):
        v = cli("verify", topic, "--json", "--workers", "2")
        assert v.returncode == 0, v.stderr
        assert json.loads(v.stdout)["verdict"] == "intact"

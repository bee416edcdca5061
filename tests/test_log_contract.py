"""The log contract, run against every EventLog implementation (memory and Pulsar)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from chainfold.envelope import Event, decode, encode
from chainfold.errors import MalformedEnvelope
from chainfold.log import EventLog, MemoryLog, MessageId


def _events(n: int, streams: int = 3, prefix: str = "e") -> list[Event]:
    return [Event(f"{prefix}{i}", f"s{i % streams}", None, "T", 1_700_000_000_000 + i, {"i": i}) for i in range(n)]


def test_append_then_read_in_order(make_log: Callable[..., EventLog]) -> None:
    log = make_log()
    evs = _events(50)
    report = log.append(evs)
    assert len(report.message_ids) == 50
    entries = list(log.read())
    assert [decode(e.payload).id for e in entries] == [e.id for e in evs]
    assert [e.message_id for e in entries] == report.message_ids
    ids = [e.message_id.position for e in entries]
    assert ids == sorted(ids) and len(set(ids)) == 50
    for e in entries:
        ev = decode(e.payload)
        assert e.key == ev.stream and e.event_time == ev.time


def test_seq_is_gapless_per_stream_and_continues(make_log: Callable[..., EventLog]) -> None:
    log = make_log()
    log.append(_events(10))
    log.append(_events(5, prefix="x"))
    per: dict[str, list[int]] = {}
    for e in log.read():
        ev = decode(e.payload)
        per.setdefault(ev.stream, []).append(ev.seq)
    for seqs in per.values():
        assert seqs == list(range(1, len(seqs) + 1))


def test_resume_after_and_at(make_log: Callable[..., EventLog]) -> None:
    log = make_log()
    log.append(_events(30))
    all_ids = [e.message_id for e in log.read()]
    mid = all_ids[12]
    assert [e.message_id for e in log.read(after=mid)] == all_ids[13:]
    assert [e.message_id for e in log.read(start=mid)] == all_ids[12:]
    assert [e.message_id for e in log.read(until=all_ids[4])] == all_ids[:5]
    assert [e.message_id for e in log.read(after=all_ids[2], limit=3)] == all_ids[3:6]
    assert list(log.read(after=all_ids[-1])) == []


def test_until_never_passed_even_at_or_before_the_resume_point(make_log: Callable[..., EventLog]) -> None:
    """``until`` is inclusive and never passed: a reader resuming at or after it yields nothing
    (a snapshot ending exactly at ``rebuild --until`` must not fold one entry more)."""
    log = make_log()
    log.append(_events(30))
    ids = [e.message_id for e in log.read()]
    assert [e.message_id for e in log.read(after=ids[9], until=ids[12])] == ids[10:13]
    assert [e.message_id for e in log.read(after=ids[11], until=ids[12])] == ids[12:13]
    for after, until in ((12, 12), (12, 11), (20, 3)):
        reader = log.read(after=ids[after], until=ids[until])
        assert list(reader) == [] and reader.count == 0, (after, until)
    assert [e.message_id for e in log.read(start=ids[12], until=ids[12])] == ids[12:13]
    assert list(log.read(start=ids[12], until=ids[11])) == []
    assert list(log.read(after=ids[-1], until=ids[-1])) == []


def test_until_time(make_log: Callable[..., EventLog]) -> None:
    log = make_log()
    log.append(_events(5))
    entries = list(log.read())
    cut = entries[2].publish_time
    got = list(log.read(until_time=cut))
    assert all(e.publish_time <= cut for e in got) and len(got) >= 3 if len({e.publish_time for e in entries}) > 1 else True


def test_empty_log_reads_nothing(make_log: Callable[..., EventLog]) -> None:
    log = make_log()
    reader = log.read()
    assert list(reader) == [] and reader.count == 0


def test_malformed_entries_are_yielded_with_their_id(make_log: Callable[..., EventLog]) -> None:
    log = make_log()
    log.append(_events(2))
    bad = log.append_payloads([(b"not cbor \xff", "s0", None), (encode(_events(1)[0])[:-3], None, 7)])
    log.append(_events(2, prefix="z"))
    entries = list(log.read())
    assert len(entries) == 6
    broken = []
    for e in entries:
        try:
            e.event()
        except MalformedEnvelope as exc:
            assert exc.message_id == str(e.message_id)
            broken.append(e.message_id)
    assert broken == bad


def test_message_id_text_round_trip() -> None:
    m = MessageId(12, 0, -1, -1)
    assert str(m) == "12:0:-1:-1" and MessageId.parse(str(m)) == m
    assert MessageId.parse("3:4") == MessageId(3, 4, -1, -1)


def test_memory_redelivery_is_filtered_and_counted() -> None:
    log = MemoryLog(redeliver_every=3)
    log.append(_events(20))
    reader = log.read()
    ids = [e.message_id for e in reader]
    assert len(ids) == len(set(ids)) == 20
    assert reader.redelivered > 0


def test_memory_partitioned_topic_reads_partition_by_partition() -> None:
    log = MemoryLog("p", partitions=3)
    log.append(_events(60, streams=7))
    parts = log.partitions()
    assert len(parts) == 3 and parts[0].endswith("-partition-0")
    seen = []
    for i, p in enumerate(parts):
        for e in log.read(p):
            assert e.message_id.partition == i
            seen.append(decode(e.payload))
    assert sorted(ev.id for ev in seen) == sorted(f"e{i}" for i in range(60))
    # a stream never spans partitions; order inside a stream is kept
    where: dict[str, set[str]] = {}
    for p in parts:
        for e in log.read(p):
            where.setdefault(decode(e.payload).stream, set()).add(p)
    assert all(len(v) == 1 for v in where.values())
    with pytest.raises(Exception):
        log.read()


def test_append_stream_sends_in_order_keeping_only_the_ends(make_log: Callable[..., EventLog]) -> None:
    log = make_log()
    evs = _events(25)
    sent = log.append_stream((encode(ev), ev.stream, ev.time) for ev in evs)
    entries = list(log.read())
    assert sent.count == 25 and [decode(e.payload).id for e in entries] == [e.id for e in evs]
    assert (sent.first, sent.last) == (entries[0].message_id, entries[-1].message_id)


def test_follow_sees_entries_appended_later(make_log: Callable[..., EventLog]) -> None:
    import threading

    log = make_log()
    log.append(_events(3))
    reader = log.read(follow=True, limit=8)
    got: list[str] = []
    t = threading.Thread(target=lambda: got.extend(decode(e.payload).id for e in reader))
    t.start()
    import time

    time.sleep(0.5)
    log.append(_events(5, prefix="later"))
    t.join(timeout=60)
    assert not t.is_alive()
    assert got == [f"e{i}" for i in range(3)] + [f"later{i}" for i in range(5)]


def test_exists_never_claims_a_topic_is_missing_without_knowing(make_log: Callable[..., EventLog]) -> None:
    log = make_log()
    log.append(_events(1))
    assert log.exists() in (True, None)

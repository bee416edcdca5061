"""Read ranges for the Spark engine (chainfold.engines.spark_io): planning without a serial pass and
task-side range readers, against the serial read of the same log.

The contract under test: for any plan, the ranges' messages, concatenated in range order, are the
serial read of the partition exactly (same message ids, same payloads, no gap, no overlap), with
batched and non-batched entries, message-exact ranges from recorded checkpoints (boundaries inside
batches), a tail appended after recording, appends and a broker restart between planning and
reading. Pure planning is property-tested; reading runs on pulsar-lite, and on Apache Pulsar (with
partitions and internalStats) in its tier.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pulsar
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chainfold.engines.spark_io import (
    LedgerSpan,
    LogShorterThanPlanned,
    Point,
    RangeReader,
    ReadRange,
    fetch_internal_stats,
    layout_from_internal_stats,
    plan_partition,
    plan_recorded,
    probe_layout,
    split_layout,
)
from chainfold.hashing.chain import ChainBuilder
from chainfold.log import full_topic_name
from chainfold.log.broker import EmbeddedBroker, client_logger
from chainfold.log.pulsar import PulsarLog

from .conftest import APACHE, unique_topic

# --- planning, pure ----------------------------------------------------------------------------------


def _entries(layout: list[LedgerSpan]) -> list[tuple[int, int]]:
    return [(sp.ledger, e) for sp in layout for e in range(sp.first, sp.first + sp.entries)]


def _layout(parts: list[tuple[int, int, int]]) -> list[LedgerSpan]:
    """(ledger gap, first entry, entries) -> spans of increasing ledgers."""
    ledger, spans = 0, []
    for gap, first, n in parts:
        ledger += gap + 1
        spans.append(LedgerSpan(ledger, first, n))
    return spans


layouts = st.lists(st.tuples(st.integers(0, 30), st.integers(0, 5), st.integers(1, 40)),
                   min_size=1, max_size=5).map(_layout)


@settings(max_examples=200, deadline=None)
@given(layout=layouts, per=st.integers(1, 50), cut=st.integers(0, 200), batch=st.integers(-1, 3))
def test_split_layout_covers_every_entry_once(layout: list[LedgerSpan], per: int, cut: int, batch: int) -> None:
    entries = _entries(layout)
    start = None
    if cut < len(entries):
        start = Point(*entries[cut], batch)
        entries = entries[cut:]
    ranges = split_layout("p", layout, entries_per_range=per, start=start, first_index=5)
    assert [r.index for r in ranges] == list(range(len(ranges)))
    assert all(a.end == b.start for a, b in zip(ranges, ranges[1:])), "ranges are contiguous"
    for led, e in entries:  # every message position of every entry (from start on): in one range
        for pos in (Point(led, e, -1), Point(led, e, 0), Point(led, e, 9)):
            if start is None or pos >= start:
                assert sum(r.start <= pos < r.end for r in ranges) == 1, f"{pos} not in exactly one range"
    assert sum(r.entries for r in ranges) == len(entries)  # type: ignore[misc]
    assert all(r.entries <= per for r in ranges)  # type: ignore[operator]
    if ranges:
        assert ranges[0].start == (start or Point(*entries[0]))
        assert ranges[-1].end == Point(entries[-1][0], entries[-1][1] + 1)
        assert ranges[0].first_index == 5 and all(r.first_index is None for r in ranges[1:])


def test_internal_stats_layout_counts_the_open_ledger() -> None:
    stats = {
        "lastConfirmedEntry": "31:4",
        "ledgers": [{"ledgerId": 12, "entries": 100}, {"ledgerId": 20, "entries": 0},
                    {"ledgerId": 31, "entries": 0}],
    }
    assert layout_from_internal_stats(stats) == [LedgerSpan(12, 0, 100), LedgerSpan(31, 0, 5)]
    # after a restart the new ledger is open and empty: the last confirmed entry is in the old one
    stats = {"lastConfirmedEntry": "12:99", "ledgers": [{"ledgerId": 12, "entries": 100}, {"ledgerId": 40, "entries": 0}]}
    assert layout_from_internal_stats(stats) == [LedgerSpan(12, 0, 100)]
    assert layout_from_internal_stats({}) == []
    assert layout_from_internal_stats({"lastConfirmedEntry": "-1:-1", "ledgers": []}) == []


def _record(ids: list[str], payloads: list[bytes], segment_size: int):
    chain = ChainBuilder(segment_size)
    cps = [cp for cp in (chain.add(p, i) for p, i in zip(payloads, ids)) if cp is not None]
    return cps


def test_recorded_ranges_are_message_exact() -> None:
    ids = [f"3:{e}:-1:{b}" for e in range(10) for b in range(7)]  # 70 messages, batches of 7
    cps = _record(ids, [i.encode() for i in ids], 8)  # 8 full segments, boundaries inside batches
    ranges, tail = plan_recorded("p", cps, segments_per_range=3)
    assert [(r.first_index, r.messages) for r in ranges] == [(0, 24), (24, 24), (48, 16)]
    pos = [Point.of(i) for i in ids]
    for r in ranges:
        inside = [i for i, p in enumerate(pos) if r.start <= p < r.end]
        assert inside == list(range(r.first_index, r.first_index + r.messages))  # type: ignore[operator]
    assert tail == Point.of(ids[63]).next_message() == Point(3, 9, 1)
    assert plan_recorded("p", [], segments_per_range=1) == ([], None)


# --- reading, on a real broker -----------------------------------------------------------------------


def _fill(plog: PulsarLog, client: pulsar.Client, batched: int, single: int, seed: int = 0) -> None:
    """``batched`` messages through the batching producer, then ``single`` without batching, then a
    few more batched ones: entries of one message and entries of many."""
    plog.append_payloads([(b"b%d-%d" % (seed, i), f"k{i % 5}", None) for i in range(batched)])
    p = client.create_producer(plog.topic, batching_enabled=False)
    for i in range(single):
        p.send(b"s%d-%d" % (seed, i), partition_key=f"k{i % 5}")
    p.close()
    plog.append_payloads([(b"c%d-%d" % (seed, i), f"k{i % 5}", None) for i in range(batched // 3)])


def _serial(plog: PulsarLog, partition: str | None = None) -> list[tuple[str, bytes]]:
    return [(str(e.message_id), e.payload) for e in plog.read(partition)]


def _read_all(client: pulsar.Client, ranges: list[ReadRange], receiver_queue: int | None = None
              ) -> list[tuple[str, bytes]]:
    out: list[tuple[str, bytes]] = []
    for r in ranges:
        reader = RangeReader(PulsarLog(client, r.partition, receiver_queue=receiver_queue), r)
        part = [(str(e.message_id), e.payload) for e in reader]
        assert reader.complete and reader.count == len(part)
        if r.messages is not None:
            assert len(part) == r.messages, r
        out += part
    return out


def _assert_same(got: list[tuple[str, bytes]], want: list[tuple[str, bytes]]) -> None:
    assert len({i for i, _ in got}) == len(got), "a message read twice"
    assert len(got) == len(want)
    assert got == want


@pytest.mark.broker
@pytest.mark.parametrize("target, min_entries", [(1, 1), (3, 1), (7, 2), (1000, 1)])
def test_probed_ranges_read_like_the_serial_read(pulsar_client, target: int, min_entries: int) -> None:
    plog = PulsarLog(pulsar_client, unique_topic("ranges"))
    _fill(plog, pulsar_client, 3000, 25)
    ranges = plan_partition(plog.topic, client=pulsar_client, target_ranges=target, min_entries=min_entries)
    assert len(ranges) >= min(target, 2)
    assert ranges[0].first_index == 0
    _assert_same(_read_all(pulsar_client, ranges, receiver_queue=10), _serial(plog))


@pytest.mark.broker
def test_recorded_ranges_and_tail_read_like_the_serial_read(pulsar_client) -> None:
    plog = PulsarLog(pulsar_client, unique_topic("recorded"))
    _fill(plog, pulsar_client, 2000, 10)
    serial = _serial(plog)
    cps = _record([i for i, _ in serial], [p for _, p in serial], 64)  # segment ends inside batches
    _fill(plog, pulsar_client, 700, 5, seed=1)  # the tail nobody recorded
    serial = _serial(plog)
    ranges = plan_partition(plog.topic, client=pulsar_client, recorded=cps, target_ranges=4, min_entries=1)
    recorded = [r for r in ranges if r.messages is not None]
    assert len(recorded) == 4 and recorded[-1].first_index + recorded[-1].messages == len(cps) * 64
    assert ranges[len(recorded)].first_index == len(cps) * 64  # the tail's first index is known too
    _assert_same(_read_all(pulsar_client, ranges), serial)


@pytest.mark.broker
def test_a_range_reads_the_same_after_appends(pulsar_client) -> None:
    """Fixed ranges: a task retried after the log grew reads exactly what the first attempt read."""
    plog = PulsarLog(pulsar_client, unique_topic("fixed"))
    _fill(plog, pulsar_client, 1500, 3)
    ranges = plan_partition(plog.topic, client=pulsar_client, target_ranges=3, min_entries=1)
    first = [_read_all(pulsar_client, [r]) for r in ranges]
    _fill(plog, pulsar_client, 1500, 3, seed=2)
    assert [_read_all(pulsar_client, [r]) for r in ranges] == first


@pytest.mark.broker
def test_a_range_past_the_end_is_short_not_complete(pulsar_client) -> None:
    plog = PulsarLog(pulsar_client, unique_topic("short"))
    _fill(plog, pulsar_client, 300, 2)
    (rng,) = plan_partition(plog.topic, client=pulsar_client, target_ranges=1)
    beyond = ReadRange(rng.partition, 0, rng.start, Point(rng.end.ledger, rng.end.entry + 5),
                       Point(rng.end.ledger, rng.end.entry + 3))
    with pytest.raises(LogShorterThanPlanned) as err:
        list(RangeReader(PulsarLog(pulsar_client, beyond.partition), beyond))
    assert err.value.exit_code == 3 and err.value.reach == beyond.reach
    reader = RangeReader(PulsarLog(pulsar_client, beyond.partition), beyond, strict=False)
    assert [(str(e.message_id), e.payload) for e in reader] == _serial(plog)
    assert not reader.complete


@pytest.mark.broker
def test_an_empty_topic_has_no_ranges(pulsar_client) -> None:
    assert plan_partition(full_topic_name(unique_topic("empty")), client=pulsar_client) == []


@pytest.mark.broker
@pytest.mark.skipif(APACHE, reason="restarts its own embedded broker (Apache Pulsar: test_apache_restart_between_plan_and_read)")
def test_embedded_broker_restart_between_plan_and_read() -> None:
    data = Path(tempfile.mkdtemp(prefix="chainfold-spark-io-"))
    broker = EmbeddedBroker(data)
    try:
        client = pulsar.Client(broker.acquire(pinned=True), logger=client_logger())
        plog = PulsarLog(client, unique_topic("restart"))
        _fill(plog, client, 2500, 5)
        want = _serial(plog)
        ranges = plan_partition(plog.topic, client=client, target_ranges=4, min_entries=1)
        client.close()
        broker.stop()
        broker = EmbeddedBroker(data)
        client = pulsar.Client(broker.acquire(pinned=True), logger=client_logger())
        plog = PulsarLog(client, plog.topic)
        _fill(plog, client, 500, 2, seed=3)  # more after the restart: not in the planned ranges
        _assert_same(_read_all(client, ranges), want)
        client.close()
    finally:
        broker.stop()
        shutil.rmtree(data, ignore_errors=True)


# --- Apache Pulsar: partitions, internalStats, several ledgers ----------------------------------------


def _admin() -> str:
    admin = os.environ.get("CHAINFOLD_TEST_ADMIN_URL")
    if not admin:
        pytest.skip("needs CHAINFOLD_TEST_ADMIN_URL (set by scripts/test-apache)")
    return admin


def _subscriptions(admin: str, partition: str) -> dict:
    import json
    import urllib.request

    rest = full_topic_name(partition).replace("://", "/")
    with urllib.request.urlopen(f"{admin}/admin/v2/{rest}/stats", timeout=30) as resp:
        return json.loads(resp.read()).get("subscriptions", {})


def _left_subscriptions(admin: str, partition: str, wait: float = 15.0) -> list[str]:
    """Readers' subscriptions still on ``partition`` once the broker has had ``wait`` seconds to drop
    those of closed readers (a busy broker takes a moment after the close)."""
    deadline = time.monotonic() + wait
    while True:
        left = [s for s in _subscriptions(admin, partition) if s != "pulsar.dedup"]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


@pytest.mark.apache
def test_apache_partitioned_topic_by_internal_stats_and_by_probing(pulsar_client) -> None:
    from .test_apache import create_partitioned_topic

    admin = _admin()
    topic = unique_topic("sparkparts")
    create_partitioned_topic(topic, 3)
    plog = PulsarLog(pulsar_client, topic)
    plog.append_payloads([(b"m%d" % i, f"s{i % 11}", None) for i in range(6000)])
    for part in plog.partitions():
        want = _serial(plog, part)
        stats_layout = layout_from_internal_stats(fetch_internal_stats(admin, part))
        assert stats_layout == probe_layout(pulsar_client, part)
        for kw in ({"admin_url": admin}, {"client": pulsar_client}):
            ranges = plan_partition(part, target_ranges=4, min_entries=1, **kw)  # type: ignore[arg-type]
            _assert_same(_read_all(pulsar_client, ranges), want)
        assert not _left_subscriptions(admin, part), "a reader left a subscription"


@pytest.mark.apache
def test_apache_restart_between_plan_and_read(pulsar_client) -> None:
    """Plan, restart the broker (the topic gets a new ledger), append, plan again across both
    ledgers with both planners, and read the first plan and the second one."""
    from .test_apache import _broker_cmd

    admin = _admin()
    plog = PulsarLog(pulsar_client, unique_topic("sparkrestart"))
    _fill(plog, pulsar_client, 3000, 10)
    want = _serial(plog)
    before = plan_partition(plog.topic, admin_url=admin, target_ranges=4, min_entries=1)
    _broker_cmd("restart")
    _assert_same(_read_all(pulsar_client, before), want)
    _fill(plog, pulsar_client, 1000, 4, seed=4)
    layout = layout_from_internal_stats(fetch_internal_stats(admin, plog.topic))
    assert len(layout) >= 2, f"expected a second ledger after the restart: {layout}"
    assert layout == probe_layout(pulsar_client, plog.topic)
    for kw in ({"admin_url": admin}, {"client": pulsar_client}):
        ranges = plan_partition(plog.topic, target_ranges=5, min_entries=1, **kw)  # type: ignore[arg-type]
        _assert_same(_read_all(pulsar_client, ranges), _serial(plog))


# --- the extra is optional ---------------------------------------------------------------------------


def test_spark_engine_without_pyspark_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    from chainfold.engines.spark import SparkUnavailable, require_pyspark, spark_session

    monkeypatch.setitem(sys.modules, "pyspark", None)  # import pyspark -> ImportError
    with pytest.raises(SparkUnavailable, match=r"install chainfold\[spark\]") as err:
        require_pyspark()
    assert err.value.exit_code == 2 and err.value.missing == "pyspark"
    with pytest.raises(SparkUnavailable):
        with spark_session("local[1]"):
            pass  # pragma: no cover


def test_chainfold_imports_no_pyspark() -> None:
    import subprocess

    code = ("import sys, chainfold, chainfold.cli, chainfold.engines.parallel, chainfold.engines.spark_io, "
            "chainfold.engines.distributed, chainfold.engines.cluster, chainfold.engines.tasks, "
            "chainfold.engines.spark; print(any(m == 'pyspark' or m.startswith('pyspark.') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"

"""The live harness on a real broker: a publisher at a controlled rate, the real worker with faults,
and a stage-free stand-in for watch (the log's own reader, the evidence follower and the live
comparator) that must name the first divergence exactly and within 10 s of its handling.

The stand-in exists only to prove the harness and the parts watch will be wired from; watch itself
composes the replay stages (see :mod:`chainfold.watch`)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from chainfold.envelope import decode
from chainfold.errors import ChainfoldError, MalformedEnvelope
from chainfold.examples import accounts
from chainfold.log.pulsar import PulsarLog
from chainfold.merkle import leaf_hash
from chainfold.tracker import state_digest
from chainfold.watch.compare import Expected, HandlingComparator, LiveDivergence
from chainfold.watch.follow import EvidenceFollower
from chainfold.watch.live import (ApacheBroker, Publisher, WorkerRun, detection_latency, fault_positions,
                                  first_fault_position, live_events)

from .conftest import unique_topic

pytestmark = pytest.mark.broker


class StandIn(threading.Thread):
    """Follows the log and the evidence every ``poll`` seconds; keeps the reference ids in order."""

    def __init__(self, elog: PulsarLog, evidence: Path, poll: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.elog, self.poll = elog, poll
        self.follower = EvidenceFollower(evidence)
        self.cmp = HandlingComparator()
        self.entries = 0
        self.ids: list[str] = []
        self.found: LiveDivergence | None = None
        self.found_ms: int | None = None
        self.error: BaseException | None = None
        self.broker_errors: list[str] = []
        self._halt = threading.Event()
        self._last = None
        self._states: dict[str, Any] = {}

    def stop(self) -> None:
        self._halt.set()

    def _read_log(self) -> None:
        batch = []
        seen = set(self.ids)
        reader = self.elog.read(after=self._last)
        try:
            for entry in reader:
                self._last = entry.message_id
                i = self.entries
                self.entries += 1
                try:
                    ev = decode(entry.payload)
                except MalformedEnvelope:
                    continue
                if ev.id in seen:
                    continue
                seen.add(ev.id)
                self.ids.append(ev.id)
                st = self._states[ev.stream] = accounts.apply(
                    self._states.get(ev.stream) or accounts.initial(ev.stream), ev)
                batch.append(Expected(i, ev.id, str(entry.message_id), leaf_hash(entry.payload),
                                      state_digest(ev.stream, accounts.render(st))))
        finally:
            reader.close()
            self.cmp.add_reference(batch)  # what was read before a broker failure counts, once

    def run(self) -> None:
        try:
            while not self._halt.is_set() and self.found is None:
                b = self.follower.poll(max_leaves=self.cmp.room())  # the evidence first, then the log
                self.cmp.add_worker(b.start, b.leaves, b.digests)
                try:
                    self._read_log()
                except ChainfoldError as exc:  # the broker went away: say so, retry at the next poll
                    self.broker_errors.append(str(exc))
                d = self.cmp.check(log_entries=self.entries, reference_complete=True)
                if d is not None:
                    self.found, self.found_ms = d, time.time_ns() // 1_000_000
                self._halt.wait(self.poll)
        except BaseException as exc:
            self.error = exc


def scene(tmp_path: Path, pulsar_client, broker_url: str, faults: list[str], n: int, rate: float):
    topic = unique_topic("live")
    elog = PulsarLog(pulsar_client, topic)
    events = live_events(n, 40, seed=5)
    elog.append(events[:20], assign_seq=False)  # the topic exists before the worker subscribes
    pub = Publisher(elog, events[20:], rate=rate)
    worker = WorkerRun(topic=topic, service_url=broker_url, evidence=tmp_path / "evidence",
                       state=tmp_path / "state.json", faults=faults, commit_seconds=0.5, idle=4.0,
                       log_path=tmp_path / "worker.log")
    watch = StandIn(elog, tmp_path / "evidence")
    return elog, events, pub, worker, watch


def shut_down(pub: Publisher, watch: StandIn, worker: WorkerRun, wait: float = 60) -> None:
    pub.stop()
    watch.stop()
    worker.join(wait)
    worker.kill()


@pytest.mark.parametrize("kind", ["skip", "mishandle", "crash-before-ack"])
def test_the_first_divergence_is_named_exactly_and_promptly(tmp_path: Path, pulsar_client, broker_url: str,
                                                            kind: str) -> None:
    n = 1200
    events = live_events(n, 40, seed=5)
    fault = {"skip": f"skip:{events[700].id}", "mishandle": "mishandle:Withdrawn:500:700",
             "crash-before-ack": "crash-before-ack:800"}[kind]
    elog, events, pub, worker, watch = scene(tmp_path, pulsar_client, broker_url, [fault], n, rate=400)
    watch.start()
    worker.supervise()
    pub.start()
    try:
        deadline = time.monotonic() + 120
        while watch.found is None and watch.error is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert watch.error is None, watch.error
        assert watch.found is not None, f"no divergence found: {(tmp_path / 'worker.log').read_text()[-2000:]}"
    finally:
        shut_down(pub, watch, worker)
    pub.join(30)
    assert pub.error is None
    p = first_fault_position(worker.evidence)
    d = watch.found
    assert d.position == p, (d, fault_positions(worker.evidence))
    assert d.event_id == watch.ids[p] and d.index == next(
        i for i, e in enumerate(events) if e.id == d.event_id)  # nothing but events in this log
    meta = worker.meta()
    if kind == "skip":
        assert d.event_id == events[700].id and "skipped" in d.reason
    elif kind == "mishandle":
        assert d.event_id == meta["mishandled"][0] and "state" in d.reason
    else:
        assert meta["crashes"] == [800] and worker.runs[0] != 0
    latency = detection_latency(worker.evidence, p, watch.found_ms)
    assert latency is not None and latency <= 10.0, latency  # SPEC: within 10 s of the handling


def test_a_faithful_worker_shows_no_divergence(tmp_path: Path, pulsar_client, broker_url: str) -> None:
    n = 1500
    elog, events, pub, worker, watch = scene(tmp_path, pulsar_client, broker_url, [], n, rate=600)
    watch.start()
    worker.supervise()
    pub.start()
    try:
        deadline = time.monotonic() + 120
        while watch.cmp.confirmed < n and watch.found is None and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        shut_down(pub, watch, worker)
    assert watch.error is None and watch.found is None
    assert watch.cmp.confirmed == n == watch.follower.positions
    assert watch.cmp.lag(watch.entries) == 0


@pytest.mark.apache
def test_the_harness_survives_an_apache_pulsar_restart(tmp_path: Path, pulsar_client, broker_url: str) -> None:
    """Apache Pulsar killed and restarted under the running publisher, worker and stand-in: nothing
    is counted twice, nothing diverges, everything is confirmed."""
    broker = ApacheBroker.from_env()
    if broker is None:
        pytest.skip("needs the Apache tier's broker (scripts/test-apache)")
    n = 3000
    elog, events, pub, worker, watch = scene(tmp_path, pulsar_client, broker_url, [], n, rate=300)
    worker.idle = 90.0  # rides out the restart instead of stopping as idle
    watch.start()
    worker.supervise()
    pub.start()
    try:
        while watch.cmp.confirmed < 600:
            time.sleep(0.1)
        took = broker.kill_and_restart()
        deadline = time.monotonic() + 300
        while watch.cmp.confirmed < n and watch.found is None and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        shut_down(pub, watch, worker, wait=0)
    assert pub.error is None, pub.error
    assert watch.error is None and watch.found is None, (watch.error, watch.found)
    assert watch.cmp.confirmed == n and watch.entries == n, (watch.cmp.confirmed, watch.entries, took)

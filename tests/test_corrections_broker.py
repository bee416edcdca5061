"""Corrections exactly once on TOPIC2 (issue 16, SPEC §4 "Corrections"), through the real CLI on a
real broker: a retry, a rerun after the CLI was SIGKILLed while publishing 2,000 corrections, and a
rerun after the log grew in an unrelated stream each leave every idempotency key once on TOPIC2.

Runs on pulsar-lite (the session broker) and, through ``scripts/test-apache``, on Apache Pulsar with
broker deduplication on; the last test shows that broker dropping a correction the client re-sends.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from chainfold.envelope import decode, event_from_json
from chainfold.examples import accounts
from chainfold.log.pulsar import PulsarLog
from chainfold.ops.corrections import CORRECTION_TYPE, correction_key, producer_name_for

from .conftest import unique_topic

pytestmark = pytest.mark.broker

MODEL = "chainfold.examples.accounts"
CORRECTION_KEYS = {"stream", "expected", "actual", "delta", "idempotency_key"}


def fold(rows: list[dict[str, Any]]) -> dict[str, Any]:
    states: dict[str, Any] = {}
    for r in rows:
        ev = event_from_json(r)
        states[ev.stream] = accounts.apply(states.get(ev.stream) or accounts.initial(ev.stream), ev)
    return dict(sorted(states.items()))


def world(pulsar_client, tmp_path: Path, *, events: int, streams: int, wrong: int, seed: int = 11):
    """A topic with ``events`` account events; a worker export in which the first ``wrong`` streams
    are short by 5 in balance. Returns (topic, rows, expected states, export path)."""
    topic = unique_topic("corr")
    rows = accounts.generate(events, streams, seed)
    log = PulsarLog(pulsar_client, topic)
    try:
        log.append([event_from_json(r) for r in rows])
    finally:
        log.close()
    expected = fold(rows)
    export = {s: dict(st, balance=st["balance"] - 5) if i < wrong else st
              for i, (s, st) in enumerate(expected.items())}
    state = tmp_path / "state.json"
    state.write_text(json.dumps(export, indent=1, sort_keys=True))
    return topic, rows, expected, state


def reconcile_args(topic: str, state: Path, out: Path, topic2: str) -> list[str]:
    return ["reconcile", topic, "--model", MODEL, "--state", str(state), "--repair", str(out),
            "--publish-corrections", topic2, "--json"]


def topic2_events(pulsar_client, topic2: str) -> list[Any]:
    log = PulsarLog(pulsar_client, topic2)
    try:
        return [decode(e.payload) for e in log.read()]
    finally:
        log.close()


def assert_each_key_once(events: list[Any], corrections: list[dict[str, Any]]) -> None:
    counts = Counter(ev.id for ev in events)
    twice = [k for k, n in counts.items() if n > 1]
    assert not twice, f"{len(twice)} key(s) stored more than once on TOPIC2, e.g. {twice[:3]}"
    assert set(counts) == {c["idempotency_key"] for c in corrections}
    by_key = {c["idempotency_key"]: c for c in corrections}
    for ev in events:  # each envelope: id = key, data = the correction, one seq per stream
        assert ev.type == CORRECTION_TYPE and ev.data == by_key[ev.id] and ev.stream == ev.data["stream"]
        assert ev.seq == 1


def read_corrections(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [json.loads(x) for x in Path(doc["repair"]["corrections"]).read_text().splitlines()]


def test_retry_publishes_each_key_once(cli, pulsar_client, broker_url, tmp_path: Path) -> None:
    topic, _, expected, state = world(pulsar_client, tmp_path, events=300, streams=12, wrong=3)
    topic2 = unique_topic("corr-out")
    r1 = cli(*reconcile_args(topic, state, tmp_path / "fixed.json", topic2))
    assert r1.returncode == 0, r1.stderr
    doc1 = json.loads(r1.stdout)
    corrections = read_corrections(doc1)
    assert len(corrections) == 3 and all(set(c) == CORRECTION_KEYS for c in corrections)
    for c in corrections:  # the key is exactly the documented function of the correction
        assert c["idempotency_key"] == correction_key(topic, c["stream"], c["actual"], c["expected"])
        assert c["expected"] == expected[c["stream"]] and c["delta"] == {"balance": 5}
    assert doc1["repair"]["publish"] == {"topic": f"persistent://public/default/{topic2}",
                                         "producer_name": producer_name_for(topic),
                                         "published": 3, "already_published": 0}

    r2 = cli(*reconcile_args(topic, state, tmp_path / "fixed.json", topic2))  # the same command again
    assert r2.returncode == 0, r2.stderr
    doc2 = json.loads(r2.stdout)
    assert read_corrections(doc2) == corrections
    assert doc2["repair"]["publish"]["published"] == 0 and doc2["repair"]["publish"]["already_published"] == 3
    events = topic2_events(pulsar_client, topic2)
    assert len(events) == 3
    assert_each_key_once(events, corrections)

    # the consumer-side example brings a copy of the worker's figures in line, each key once: a
    # second subscription receives every correction again and applies none
    from chainfold.examples.apply_corrections import CorrectionApplier

    figures = tmp_path / "figures.json"
    CorrectionApplier(json.loads(state.read_text())).save(figures)
    for sub, applied in (("downstream", 3), ("downstream-replay", 0)):
        r = subprocess.run([sys.executable, "-m", "chainfold.examples.apply_corrections", "--figures", str(figures),
                            "--topic", topic2, "--subscription", sub, "--service-url", broker_url,
                            "--idle-ms", "1500"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout) == {"received": 3, "applied": applied, "conflicts": []}
    assert json.loads(figures.read_text())["figures"] == expected


def test_unrelated_log_growth_keeps_the_key(cli, pulsar_client, tmp_path: Path) -> None:
    topic, rows, expected, state = world(pulsar_client, tmp_path, events=300, streams=12, wrong=1)
    topic2 = unique_topic("corr-out")
    r1 = cli(*reconcile_args(topic, state, tmp_path / "fixed.json", topic2))
    assert r1.returncode == 0, r1.stderr
    (before,) = read_corrections(json.loads(r1.stdout))

    # one more event in another (correct) stream, which the worker handled too
    other = sorted(expected)[-1]
    assert other != before["stream"]
    ev = event_from_json({"id": "evt-late-1", "stream": other, "type": "Deposited", "data": {"amount": 700},
                          "time": rows[-1]["time"] + 1})
    log = PulsarLog(pulsar_client, topic)
    try:
        log.append([ev])
    finally:
        log.close()
    export = json.loads(state.read_text())
    export[other] = accounts.apply(export[other], ev._replace(seq=1))
    state.write_text(json.dumps(export, indent=1, sort_keys=True))

    r2 = cli(*reconcile_args(topic, state, tmp_path / "fixed.json", topic2))
    assert r2.returncode == 0, r2.stderr
    doc2 = json.loads(r2.stdout)
    assert doc2["log"]["head"] != json.loads(r1.stdout)["log"]["head"]  # the log did grow
    assert read_corrections(doc2) == [before]  # the same correction, under the same key
    assert doc2["repair"]["publish"]["published"] == 0
    events = topic2_events(pulsar_client, topic2)
    assert len(events) == 1
    assert_each_key_once(events, [before])


def _kill_while_publishing(broker_url: str, pulsar_client, args: list[str], cwd: Path, total: int) -> int:
    """Start the CLI, SIGKILL it as soon as TOPIC2 holds a first correction; how many it holds then."""
    import pulsar

    topic2 = args[args.index("--publish-corrections") + 1]
    reader = pulsar_client.create_reader(topic2, pulsar.MessageId.earliest)
    env = {**os.environ, "CHAINFOLD_SERVICE_URL": broker_url}
    proc = subprocess.Popen([sys.executable, "-m", "chainfold", *args], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                reader.read_next(20)
            except pulsar.Timeout:
                continue
            proc.send_signal(signal.SIGKILL)
            break
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
        reader.close()
    time.sleep(0.5)  # whatever the broker had received is stored by now
    return len(topic2_events(pulsar_client, topic2))


def test_rerun_after_sigkill_mid_publish_each_key_once(cli, pulsar_client, broker_url, tmp_path: Path) -> None:
    n = 2000
    topic, _, _, state = world(pulsar_client, tmp_path, events=2 * n, streams=n, wrong=n, seed=12)
    # the kill must land inside the publish: try a fresh TOPIC2 until it does (it takes one try here)
    for attempt in range(4):
        topic2 = unique_topic("corr-kill")
        args = reconcile_args(topic, state, tmp_path / "fixed.json", topic2)
        stored = _kill_while_publishing(broker_url, pulsar_client, args, tmp_path, n)
        print(f"attempt {attempt + 1}: SIGKILL with {stored} of {n} corrections on TOPIC2")
        if 0 < stored < n:
            break
    else:
        pytest.fail(f"could not SIGKILL the CLI mid-publish in 4 tries (last: {stored} of {n} stored)")

    r = cli(*args)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["repair"]["publish"]["already_published"] == stored
    assert doc["repair"]["publish"]["published"] == n - stored
    corrections = read_corrections(doc)
    events = topic2_events(pulsar_client, topic2)
    assert len(events) == n
    assert_each_key_once(events, corrections)
    # and once more: nothing new
    r = cli(*args)
    assert r.returncode == 0 and json.loads(r.stdout)["repair"]["publish"]["published"] == 0, r.stderr
    assert len(topic2_events(pulsar_client, topic2)) == n


@pytest.mark.apache
def test_broker_dedup_drops_a_resent_correction(cli, pulsar_client, tmp_path: Path) -> None:
    """Apache Pulsar (deduplication on): corrections carry the producer name and sequence ids, so a
    correction the client re-sends with its sequence id (a retry in flight) is dropped by the broker."""
    topic, _, _, state = world(pulsar_client, tmp_path, events=300, streams=12, wrong=4)
    topic2 = unique_topic("corr-dedup")
    r = cli(*reconcile_args(topic, state, tmp_path / "fixed.json", topic2))
    assert r.returncode == 0, r.stderr
    again = PulsarLog(pulsar_client, topic2, producer_name=producer_name_for(topic))
    try:
        last_seq = again.last_sequence_id()
        assert last_seq >= 1, "the broker recorded no sequence id for the corrections' producer"
        first = next(iter(again.read(limit=1)))
        ev = decode(first.payload)
        dup = again.append_payloads([(first.payload, ev.stream, ev.time)], sequence_ids=[last_seq])
        assert (dup[0].ledger, dup[0].entry) == (-1, -1), f"the broker stored a re-sent correction: {dup}"
    finally:
        again.close()
    assert len(topic2_events(pulsar_client, topic2)) == 4


def test_exactly_once_append_numbers_only_the_streams_it_appends(pulsar_client) -> None:
    """An append with a producer name reads the whole log but keeps the highest seq of the streams it
    appends to only (its memory does not grow with the log's other streams): those continue their
    numbering, a new stream starts at 1, and ids already stored are skipped."""
    from chainfold.envelope import Event

    topic = unique_topic("corr-seqs")
    log = PulsarLog(pulsar_client, topic, producer_name="seq-test")
    try:
        old = [Event(f"e{i}", f"s{i % 5}", None, "T", 1, {}) for i in range(20)]  # s0..s4 at seq 4
        log.append(old)
        new = [Event("n1", "s1", None, "T", 1, {}), Event("n2", "fresh", None, "T", 1, {}),
               Event("e3", "s3", None, "T", 1, {}), Event("n3", "s1", None, "T", 1, {})]
        report = log.append(new)
        assert report.skipped == 1
        stored = {ev.id: (ev.stream, ev.seq) for ev in (decode(e.payload) for e in log.read_all())}
    finally:
        log.close()
    assert stored["n1"] == ("s1", 5) and stored["n3"] == ("s1", 6) and stored["n2"] == ("fresh", 1)
    assert len(stored) == 23

"""``chainfold rewind`` end to end with the demo's real worker (issue 14 §2, SPEC §4 "Rewind a worker").

The worker (``python -m chainfold.worker``, a durable subscription with acks) skips events; the CLI
rewinds its subscription to the first divergence reconcile names from the worker's Tracker
directory and writes the state as of the entry before; the worker resumes from that file on the same
subscription, and its final state equals a full rebuild. On pulsar-lite (the session broker) and,
through ``scripts/test-apache``, on Apache Pulsar, where a connected worker is also refused.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from chainfold.examples import accounts
from chainfold.log import MessageId
from chainfold.log.pulsar import PulsarLog

from .conftest import APACHE, unique_topic
from .test_reconcile import fold
from .test_reconcile_broker import publish

pytestmark = pytest.mark.broker

MODEL = "chainfold.examples.accounts"
SUB = "accounts-worker"


def worker(broker_url: str, topic: str, state: Path, evidence: Path, *faults: str, idle: float = 1.0,
           background: bool = False) -> Any:
    args = [sys.executable, "-m", "chainfold.worker", "--topic", topic, "--service-url", broker_url,
            "--evidence", str(evidence), "--state", str(state), "--idle", str(idle), "--subscription", SUB]
    for f in faults:
        args += ["--faults", f]
    if background:
        return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    r = subprocess.run(args, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def reference_fold(w, upto: int) -> dict[str, Any]:
    """The correct states over log entries ``0 .. upto-1``: each event id once, malformed skipped."""
    seen: set[str] = set()
    evs = []
    for kind, ev, _, _ in w.entries[:upto]:
        if kind == "event" and ev.id not in seen:
            seen.add(ev.id)
            evs.append(ev)
    return fold(evs)


def test_rewind_to_the_first_divergence_and_resume(cli, pulsar_client, broker_url, tmp_path: Path) -> None:
    w = publish(pulsar_client, n=1200, streams=25, seed=8, malformed_at=(100,), dup_at=((1100, 1050),))
    topic = w.log.topic
    # snapshots every 64 entries, so the rewind starts from one and folds only the few entries after
    r = cli("rebuild", topic, "--model", MODEL, "--snapshot-every", "64", "--keep", "100", "--json")
    assert r.returncode == 0, r.stderr

    first = tmp_path / "first"
    run1 = worker(broker_url, topic, first / "state.json", first / "evidence", "skip-every:173")
    assert run1["skipped"]
    r = cli("reconcile", topic, "--model", MODEL, "--state", str(first / "state.json"),
            "--processed", str(first / "evidence" / "processed.jsonl"), "--json")
    assert r.returncode == 1, r.stderr
    divergence = json.loads(r.stdout)["first_divergence"]
    index = divergence["index"]

    state = tmp_path / "rewound.json"
    r = cli("rewind", topic, "--model", MODEL, "--subscription", SUB, "--to", f"divergence:{first / 'evidence'}",
            "--state-out", str(state), "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    print(f"rewind: requested {doc['requested']}, position {doc['position']}, seek {doc['seek_seconds']} s, "
          f"consumer check: {doc['consumer_check']}")
    assert doc["divergence"] == divergence and doc["requested"] == index
    # Apache Pulsar: the cursor stands at entry index, also inside a producer batch; pulsar-lite
    # acknowledges batches whole: there the position is the first message of index's batch
    batch = int(w.entries[index][3].split(":")[3])
    position = index if APACHE else index - max(batch, 0)
    assert doc["position"] == position and doc["message_id"] == w.entries[position][3]
    assert 0 < doc["replayed"]["from_snapshot"] <= position and doc["replayed"]["events"] < 64
    expected_then = reference_fold(w, position)
    assert json.loads(state.read_text()) == expected_then and doc["streams"] == len(expected_then)
    assert doc["consumer_check"]["exclusive_subscription"] is APACHE

    # the worker resumes from FILE on the same subscription (fresh evidence: the old chain covers a
    # handling the rewind discarded), handles entries position.. in order, and ends right
    second = tmp_path / "second"
    run2 = worker(broker_url, topic, state, second / "evidence")
    assert run2["received"] == len(w.entries) - position and run2["skipped"] == []
    r = cli("rebuild", topic, "--model", MODEL, "--full", "--no-snapshots", "--out", str(tmp_path / "full.json"))
    assert r.returncode == 0, r.stderr
    full = json.loads((tmp_path / "full.json").read_text())
    assert json.loads(state.read_text()) == full == reference_fold(w, len(w.entries))
    w.log.close()


def test_rewind_to_an_index_human_output_and_refusals(cli, pulsar_client, broker_url, tmp_path: Path) -> None:
    w = publish(pulsar_client, n=300, streams=6, seed=9)
    topic = w.log.topic
    ok = tmp_path / "ok"
    worker(broker_url, topic, ok / "state.json", ok / "evidence", idle=0.8)

    # rewind to the start: empty state, the worker handles everything again
    state = tmp_path / "from-start.json"
    r = cli("rewind", topic, "--model", MODEL, "--subscription", SUB, "--to", "0", "--state-out", str(state))
    assert r.returncode == 0, r.stderr
    assert "next message is entry 0" in r.stdout and "0 streams" in r.stdout, r.stdout
    assert json.loads(state.read_text()) == {}
    again = worker(broker_url, topic, state, tmp_path / "ev2", idle=0.8)
    assert again["received"] == len(w.entries)
    assert json.loads(state.read_text()) == reference_fold(w, len(w.entries))

    n = len(w.entries)
    cases = [
        (["--to", str(n)], f"has {n} entries"),
        (["--to", "-1"], "0 or more"),
        (["--to", "soon"], "an entry index or divergence:EVIDENCE_DIR"),
        (["--to", f"divergence:{ok / 'evidence'}"], "no divergence to rewind to"),
        (["--to", f"divergence:{tmp_path / 'nowhere'}"], "no such directory"),
        (["--to", "5", "--state-out", str(tmp_path / "missing" / "s.json")], "no such directory"),
    ]
    for extra, words in cases:
        args = ["rewind", topic, "--model", MODEL, "--subscription", SUB, "--state-out", str(tmp_path / "s.json"),
                *extra, "--json"]
        r = cli(*args)
        assert r.returncode == 2, (extra, r.returncode, r.stderr)
        doc = json.loads(r.stdout)  # a failing --json command still prints one JSON object
        assert words in doc["error"] and words in r.stderr, (extra, doc)
        assert "Traceback" not in r.stderr
    assert not (tmp_path / "s.json").exists()
    w.log.close()


@pytest.mark.apache
def test_rewind_refuses_while_the_worker_is_connected(cli, pulsar_client, broker_url, tmp_path: Path) -> None:
    """Apache Pulsar tells: an exclusive consumer is refused while the worker is connected, and the
    admin API names it; an unknown subscription is refused too."""
    admin = os.environ.get("CHAINFOLD_TEST_ADMIN_URL")
    w = publish(pulsar_client, n=300, streams=6, seed=10)
    topic = w.log.topic
    d = tmp_path / "w"
    running = worker(broker_url, topic, d / "state.json", d / "evidence", idle=60, background=True)
    try:
        deadline = time.monotonic() + 60
        while not (d / "state.json").exists() and time.monotonic() < deadline:
            time.sleep(0.2)  # the worker has committed once: it is connected
        assert (d / "state.json").exists(), "the worker did not start"
        for extra in ([], ["--admin-url", admin]):
            r = cli("rewind", topic, "--model", MODEL, "--subscription", SUB, "--to", "10",
                    "--state-out", str(tmp_path / "s.json"), *extra, "--json")
            assert r.returncode == 2, r.stderr
            doc = json.loads(r.stdout)
            assert "a consumer is connected to subscription 'accounts-worker'" in doc["error"]
            assert doc["subscription"] == SUB
            if extra:
                assert len(doc["consumers"]) == 1 and doc["consumers"][0]["address"], doc
        assert not (tmp_path / "s.json").exists()
    finally:
        running.terminate()
        running.wait(60)
    r = cli("rewind", topic, "--model", MODEL, "--subscription", "nope", "--to", "10",
            "--state-out", str(tmp_path / "s.json"), "--admin-url", admin, "--json")
    assert r.returncode == 2 and "has no subscription 'nope'" in json.loads(r.stdout)["error"], r.stderr
    r = cli("rewind", topic, "--model", MODEL, "--subscription", SUB, "--to", "10",
            "--state-out", str(tmp_path / "s.json"), "--admin-url", admin, "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["consumer_check"] == {"exclusive_subscription": True, "admin_api": True,
                                     "result": "no consumer connected (the broker granted an exclusive "
                                               "consumer, held during the rewind)"}
    w.log.close()


def first_message(client, topic: str) -> MessageId:
    """The next message of the worker's subscription, as a consumer subscribing now receives it
    (the worker's kind of consumer: Failover, no batch-index acknowledgement; nothing acked)."""
    import pulsar

    c = client.subscribe(topic, SUB, consumer_type=pulsar.ConsumerType.Failover)
    try:
        n = c.receive(timeout_millis=20_000).message_id()
    finally:
        c.close()
    return MessageId(n.ledger_id(), n.entry_id(), n.partition(), n.batch_index())


def test_rewind_into_a_producer_batch(cli, pulsar_client, broker_url, tmp_path: Path) -> None:
    """``chainfold publish`` batches up to 1000 messages per ledger entry. A rewind to a message in
    the middle of a batch makes it the subscription's next message on Apache Pulsar (batch-index
    acknowledgement, enabled by scripts/pulsar-standalone); pulsar-lite acknowledges whole batches,
    so there the rewind goes to the batch's first message and says so. Either way the worker resumes
    from FILE and ends equal to a full rebuild, and its batch is then acknowledged for good."""
    events = accounts.generate(3000, 20, 14)
    (tmp_path / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    topic = unique_topic("rw")
    r = cli("publish", topic, str(tmp_path / "events.jsonl"), "--json")
    assert r.returncode == 0, r.stderr
    log = PulsarLog(pulsar_client, topic)
    ids = [e.message_id for e in log.read()]
    log.close()
    starts = [i for i, m in enumerate(ids) if m.batch <= 0] + [len(ids)]
    sizes = {s: e - s for s, e in zip(starts, starts[1:])}
    start = next(s for s in starts[1:] if sizes.get(s, 0) >= 3)  # a batch of 3 or more, not the first
    index = start + sizes[start] // 2
    assert ids[index].batch == index - start > 0
    run = tmp_path / "run"
    assert worker(broker_url, topic, run / "state.json", run / "evidence", idle=1.5)["received"] == len(ids)
    # snapshots every `start` entries: one ends exactly at entry start-1, right before the batch
    r = cli("rebuild", topic, "--model", MODEL, "--snapshot-every", str(start), "--keep", "100", "--json")
    assert r.returncode == 0, r.stderr

    state = tmp_path / "rewound.json"
    r = cli("rewind", topic, "--model", MODEL, "--subscription", SUB, "--to", str(index), "--state-out", str(state),
            "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    print(f"rewind into a batch of {sizes[start]} at message {index - start}: position {doc['position']}, "
          f"batch {doc['batch']}, seek {doc['seek_seconds']} s, {doc['seconds']} s; notes {doc['notes']}")
    position = index if APACHE else start
    assert doc["requested"] == index and doc["position"] == position
    assert doc["message_id"] == str(ids[position]) and first_message(pulsar_client, topic) == ids[position]
    assert doc["batch"] == {"entry": f"{ids[index].ledger}:{ids[index].entry}", "index": index - start,
                            "acknowledged": index - start if APACHE else 0}
    if not APACHE:
        assert "acknowledged the whole batch" in doc["notes"][0] and f"entry {start}" in doc["notes"][0]
    # the state as of entry position-1, from the newest snapshot at or before it (snapshots end at multiples
    # of start; a batch longer than start puts a later one before the position)
    newest = position // start * start
    assert doc["replayed"] == {"from_snapshot": newest, "events": position - newest}
    r = cli("rebuild", topic, "--model", MODEL, "--full", "--no-snapshots", "--out", str(tmp_path / "full.json"))
    assert r.returncode == 0, r.stderr
    resumed = worker(broker_url, topic, state, tmp_path / "ev2", idle=1.5)
    assert resumed["received"] == len(ids) - position
    assert json.loads(state.read_text()) == json.loads((tmp_path / "full.json").read_text())
    # the worker acknowledged the rest of the batch: a restart receives nothing again
    assert worker(broker_url, topic, state, tmp_path / "ev2", idle=1.5)["received"] == 0

    # a rewind to a batch's first message, where a snapshot ends exactly at the entry before: the
    # fold starts from that snapshot and folds nothing more (the reader must not pass --until)
    r = cli("rewind", topic, "--model", MODEL, "--subscription", SUB, "--to", str(start), "--state-out", str(state),
            "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["position"] == start and doc["batch"] is None and not any("batch" in n for n in doc["notes"])
    assert doc["replayed"] == {"from_snapshot": start, "events": 0}
    assert first_message(pulsar_client, topic) == ids[start]
    resumed = worker(broker_url, topic, state, tmp_path / "ev3", idle=1.5)
    assert resumed["received"] == len(ids) - start
    assert json.loads(state.read_text()) == json.loads((tmp_path / "full.json").read_text())

"""Poison events end to end on a real broker: a foreign producer's ``{"amount": 1.5}`` in an accounts
topic; ``chainfold rebuild`` and ``chainfold reconcile`` (subprocesses) under each
``--on-model-error`` policy, serial and with ``--workers 2``, with the exact reports expected
(computed in ``test_poison`` by plain code)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from chainfold.log.pulsar import PulsarLog

from .conftest import unique_topic
from .test_poison import ERROR, Poisoned

pytestmark = pytest.mark.broker

MODEL = "chainfold.examples.accounts"


@pytest.fixture
def poisoned(pulsar_client) -> Poisoned:
    p = Poisoned(bad_at=(150, 290), log=PulsarLog(pulsar_client, unique_topic("poison")))
    yield p
    p.log.close()


def run_json(cli, *args: str) -> tuple[int, dict[str, Any], str]:
    r = cli(*args, "--json")
    lines = r.stdout.strip()
    doc = json.loads(lines)  # exactly one JSON document, whatever the exit code
    return r.returncode, doc, r.stderr


def stop_error(p: Poisoned) -> dict[str, Any]:
    stream = p.events[150].stream
    mid = p.mids["foreign-1"]
    return {"error": f"model failed on stream {stream!r}, event 'foreign-1' (message {mid}): " + ERROR.format("foreign-1"),
            "exit_code": 2, "stream": stream, "event_id": "foreign-1", "message_id": mid}


def snapshots(cli, topic: str) -> list[dict[str, Any]]:
    code, doc, err = run_json(cli, "snapshots", topic)
    assert code == 0, err
    return doc["snapshots"] if isinstance(doc, dict) else doc


def test_rebuild_under_each_policy(cli, poisoned: Poisoned, tmp_path: Path) -> None:
    t = poisoned.log.topic
    # stop (the default): exit 2, one JSON error document naming it, no state, no snapshot past it
    code, doc, err = run_json(cli, "rebuild", t, "--model", MODEL, "--out", "s.json", "--snapshot-every", "100")
    assert code == 2 and doc == stop_error(poisoned), err
    assert not (tmp_path / "s.json").exists()
    assert [s["entries"] for s in snapshots(cli, t)] == [100]

    # skip-event: states written, every skipped event listed, exit 1; the final snapshot records them
    states, skipped = poisoned.expected("skip-event")
    code, doc, err = run_json(cli, "rebuild", t, "--model", MODEL, "--out", "s.json", "--on-model-error", "skip-event")
    assert code == 1, err
    assert doc["skipped"] == skipped and doc["on_model_error"] == "skip-event"
    assert doc["snapshot"]["entries"] == 100 and doc["rejected_snapshots"] == []  # skipped nothing: any policy
    assert json.loads((tmp_path / "s.json").read_text()) == states
    (written,) = doc["snapshots_written"]
    code, info, err = run_json(cli, "snapshots", t, "--inspect", written)
    assert code == 0 and (info["on_model_error"], info["skipped"], info["entries"]) == ("skip-event", 2, 402), err

    # the same policy starts from that snapshot and reports what a fold from the start reports
    code, doc, err = run_json(cli, "rebuild", t, "--model", MODEL, "--on-model-error", "skip-event", "--no-snapshots")
    assert code == 1 and doc["snapshot"]["entries"] == 402 and doc["skipped"] == skipped, err

    # skip-stream: that snapshot is rejected (with the reason), the fold starts from the one at 100
    states2, skipped2 = poisoned.expected("skip-stream")
    code, doc, err = run_json(cli, "rebuild", t, "--model", MODEL, "--out", "s2.json", "--on-model-error", "skip-stream",
                              "--no-snapshots")
    assert code == 1, err
    assert doc["rejected_snapshots"] == [{"path": written, "reason": (
        "it skipped 2 event(s) the model failed on under --on-model-error skip-event (first: event 'foreign-1', "
        f"message {poisoned.mids['foreign-1']}); this fold runs with --on-model-error skip-stream")}]
    assert doc["snapshot"]["entries"] == 100 and doc["skipped"] == skipped2
    assert json.loads((tmp_path / "s2.json").read_text()) == states2

    # stop again: the snapshot that skipped events is not used, the fold stops at the same event
    code, doc, err = run_json(cli, "rebuild", t, "--model", MODEL, "--no-snapshots")
    assert code == 2 and doc == stop_error(poisoned), err

    # for people: the skipped events, each with its ids and the model's error
    r = cli("rebuild", t, "--model", MODEL, "--on-model-error", "skip-event", "--no-snapshots")
    assert r.returncode == 1, r.stderr
    assert "2 event(s) skipped" in r.stdout and f"skipped foreign-2 (stream {poisoned.events[290].stream}" in r.stdout


@pytest.mark.parametrize("policy", ["skip-event", "skip-stream"])
def test_two_workers_report_what_one_does(cli, poisoned: Poisoned, policy: str) -> None:
    t = poisoned.log.topic
    states, skipped = poisoned.expected(policy)
    reports = []
    for w in ("1", "2"):
        code, doc, err = run_json(cli, "rebuild", t, "--model", MODEL, "--on-model-error", policy, "--full",
                                  "--no-snapshots", "--workers", w, "--out", f"w{w}.json")
        assert code == 1, err
        reports.append(doc)
    one, two = reports
    assert two.get("workers") == 2 and not any("serially" in n for n in two["notes"])
    keys = ("skipped", "applied", "streams", "malformed", "duplicates", "log", "replayed", "on_model_error")
    assert {k: two[k] for k in keys} == {k: one[k] for k in keys}
    assert one["skipped"] == skipped


@pytest.mark.parametrize("policy", ["stop", "skip-event", "skip-stream"])
def test_reconcile_under_each_policy(cli, poisoned: Poisoned, tmp_path: Path, policy: str) -> None:
    """The worker logged and went on (Kafka Streams' log-and-continue): its export is the skip-event
    fold and its processed log lists every event it was handed, the bad ones included."""
    t = poisoned.log.topic
    export, _ = poisoned.expected("skip-event")
    (tmp_path / "state.json").write_text(json.dumps(export))
    ids = [item.id if kind == "event" else item[0] for kind, item in poisoned.order]
    (tmp_path / "processed.jsonl").write_text("".join(json.dumps({"id": i}) + "\n" for i in ids))
    args = ("reconcile", t, "--model", MODEL, "--state", "state.json", "--processed", "processed.jsonl")
    if policy == "stop":
        code, doc, err = run_json(cli, *args)
        assert code == 2 and doc == stop_error(poisoned), err
        code, doc, err = run_json(cli, *args, "--repair", "out.json")
        assert code == 2 and doc == stop_error(poisoned) and not (tmp_path / "out.json").exists(), err
        return
    states, skipped = poisoned.expected(policy)
    code, doc, err = run_json(cli, *args, "--on-model-error", policy)
    assert code == 1, err  # events were skipped: never exit 0
    assert doc["skipped"] == skipped
    assert (doc["first_divergence"], doc["missing"], doc["duplicates"], doc["out_of_order"], doc["unknown_ids"],
            doc["unknown_streams"], doc["processed"]) == (None, [], [], [], [], [], {"events": 402})
    if policy == "skip-event":
        assert doc["verdict"] == "consistent" and doc["divergent_streams"] == []
    else:  # the frozen streams kept their last good state; the worker folded on
        frozen = sorted({poisoned.events[150].stream, poisoned.events[290].stream})
        assert doc["verdict"] == "divergent" and len(frozen) == 2
        assert [(d["stream"], d["expected"], d["actual"]) for d in doc["divergent_streams"]] == [
            (s, states[s], export[s]) for s in frozen]
    # the repair writes the state under the policy, and still exits 1 (events were skipped)
    code, doc, err = run_json(cli, *args, "--on-model-error", policy, "--repair", "out.json")
    assert code == 1 and doc["skipped"] == skipped, err
    assert doc["verdict"] == ("consistent" if policy == "skip-event" else "repaired")
    assert json.loads((tmp_path / "out.json").read_text()) == states

"""Reconcile reports every worker mistake (the CLI, a subprocess, on a real broker): ids and streams
the log never had, a stream missing from the export and non-numeric differences are findings with
exact expected reports; ``--repair OUT`` always writes OUT and never creates its directory; after a
repair the incident closes with ``reconcile --state REPAIRED`` alone, whose report does not claim
to know how many events the worker handled. Expectations come from ``test_reconcile``'s independent
fold."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from chainfold.examples import accounts
from chainfold.ops.corrections import correction_key

from .test_reconcile import expected_report
from .test_reconcile_broker import publish

pytestmark = pytest.mark.broker

MODEL = "chainfold.examples.accounts"


def reconcile(cli, topic: str, *args: str, as_json: bool = True) -> tuple[int, Any, str]:
    r = cli("reconcile", topic, "--model", MODEL, *args, *(("--json",) if as_json else ()))
    return r.returncode, (json.loads(r.stdout) if as_json else r.stdout), r.stderr


def write(path: Path, value: Any) -> str:
    path.write_text(json.dumps(value, indent=1))
    return str(path)


def processed(path: Path, ids: list[str]) -> str:
    path.write_text("".join(json.dumps({"id": i}) + "\n" for i in ids))
    return str(path)


def test_every_worker_mistake_is_a_finding_then_repaired_and_closed(cli, pulsar_client, tmp_path: Path) -> None:
    w = publish(pulsar_client, n=200, streams=5, seed=8)
    t = w.log.topic
    exp = expected_report(w, None)
    states = exp["states"]
    ids = [e.id for e in w.events]
    # the worker handled two events the log does not hold (one of them twice), lost a stream from its
    # export, keeps one the log never had, and closed an account the log says is open (and lost 25)
    handled = ids[:10] + ["evt-ghost"] + ids[10:] + ["evt-ghost-2", "evt-ghost"]
    lost, wrong = "acct-0002", "acct-0004"
    assert states[wrong]["status"] == "open"
    export = {s: v for s, v in states.items() if s != lost}
    export[wrong] = dict(states[wrong], status="closed", balance=states[wrong]["balance"] - 25)
    export["acct-ghost"] = accounts.initial("acct-ghost")
    state, proc = write(tmp_path / "state.json", export), processed(tmp_path / "processed.jsonl", handled)

    code, doc, err = reconcile(cli, t, "--state", state, "--processed", proc)
    assert code == 1, err
    mid10 = w.mid_of(ids[10])
    lost_state = states[lost]
    lost_delta = {k: v for k, v in lost_state.items() if isinstance(v, int) and v} | {
        k: [v, None] for k, v in lost_state.items() if isinstance(v, str)}
    want = {
        "verdict": "divergent",
        "processed": {"events": 203},
        "first_divergence": {"index": 10, "segment": 0, "event_id": ids[10], "message_id": mid10},
        "missing": [], "duplicates": [], "out_of_order": [], "malformed": [], "skipped": [],
        "unknown_ids": ["evt-ghost", "evt-ghost-2"],
        "unknown_streams": ["acct-ghost"],
        "divergent_streams": [
            {"stream": lost, "expected": lost_state, "actual": None, "delta": lost_delta},
            {"stream": wrong, "expected": states[wrong], "actual": export[wrong],
             "delta": {"balance": 25, "status": ["open", "closed"]}},
            {"stream": "acct-ghost", "expected": None, "actual": export["acct-ghost"],
             "delta": {"status": [None, "new"]}},
        ],
    }
    assert {k: doc[k] for k in want} == want
    assert lost_delta["status"] == ["open", None] and lost_delta["balance"] == lost_state["balance"]

    # for people: the faults table names them
    code, text, err = reconcile(cli, t, "--state", state, "--processed", proc, as_json=False)
    assert code == 1 and "unknown event ids" in text and "evt-ghost, evt-ghost-2" in text and "acct-ghost" in text

    # the repair: every stream as the log says, the ghost gone; one correction each, delta as reported
    code, doc, err = reconcile(cli, t, "--state", state, "--processed", proc, "--repair", "repaired.json")
    assert code == 0 and doc["verdict"] == "repaired", err
    assert json.loads((tmp_path / "repaired.json").read_text()) == states
    corrections = [json.loads(x) for x in (tmp_path / "repaired.corrections.jsonl").read_text().splitlines()]
    assert corrections == [dict(d, idempotency_key=correction_key(t, d["stream"], d["actual"], d["expected"]))
                           for d in want["divergent_streams"]]

    # closing the incident: the repaired state alone (the old processed log is rotated away) is consistent,
    # and the report does not pretend to know how many events the worker handled
    code, doc, err = reconcile(cli, t, "--state", "repaired.json")
    assert code == 0, err
    assert (doc["verdict"], doc["processed"], doc["divergent_streams"], doc["unknown_ids"], doc["unknown_streams"]) \
        == ("consistent", {"events": None}, [], [], [])
    code, text, err = reconcile(cli, t, "--state", "repaired.json", as_json=False)
    assert code == 0 and "CONSISTENT" in text and "handled by the worker unknown" in text
    assert "0 handled" not in text
    w.log.close()


def test_repair_out_is_written_when_consistent_and_its_directory_never_created(cli, pulsar_client,
                                                                               tmp_path: Path) -> None:
    w = publish(pulsar_client, n=80, streams=3, seed=2)
    t = w.log.topic
    states = expected_report(w, None)["states"]
    state = write(tmp_path / "state.json", states)
    proc = processed(tmp_path / "processed.jsonl", [e.id for e in w.events])
    code, doc, err = reconcile(cli, t, "--state", state, "--processed", proc, "--repair", "out.json")
    assert code == 0 and doc["verdict"] == "consistent", err
    assert doc["repair"] == {"state": "out.json", "corrections": "out.corrections.jsonl", "streams": 0}
    assert json.loads((tmp_path / "out.json").read_text()) == states
    assert (tmp_path / "out.corrections.jsonl").read_text() == ""
    code, text, err = reconcile(cli, t, "--state", state, "--repair", "out2.json", as_json=False)
    assert code == 0 and "nothing to repair" in text and (tmp_path / "out2.json").exists(), err

    # a directory that does not exist: exit 2 naming it, before any work; nothing is created
    for option, target, directory in (("--repair", "nodir/out.json", "nodir"),
                                      ("--html", "nodir2/deeper/r.html", "nodir2/deeper")):
        extra = ("--repair", "out3.json") if option == "--html" else ()
        code, doc, err = reconcile(cli, t, "--state", state, option, target, *extra)
        assert code == 2, err
        assert doc == {"error": f"{option} {target}: directory {directory} does not exist (create it first)",
                       "exit_code": 2, "file": directory}
        assert not (tmp_path / directory.split("/")[0]).exists() and not (tmp_path / "out3.json").exists()
    code, doc, err = reconcile(cli, t, "--state", state, "--repair", "out.json", "--corrections", "x/c.jsonl")
    assert code == 2 and doc["file"] == "x" and "--corrections x/c.jsonl" in doc["error"], err
    r = cli("rebuild", t, "--model", MODEL, "--out", "nowhere/s.json", "--json")
    assert r.returncode == 2 and json.loads(r.stdout)["file"] == "nowhere" and not (tmp_path / "nowhere").exists()

    # a file that is not a state export at all is still bad input (exit 2), one JSON document
    (tmp_path / "bad.json").write_text("[1, 2, 3]\n")
    code, doc, err = reconcile(cli, t, "--state", "bad.json")
    assert code == 2 and doc["file"] == "bad.json" and doc["line"] == 1 and "one JSON object" in doc["error"]
    w.log.close()

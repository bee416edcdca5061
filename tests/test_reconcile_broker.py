"""reconcile end to end on a real broker: the real worker (``python -m chainfold.worker``, a Pulsar
subscription with acks) crashes before acking, skips and mishandles; the CLI (a subprocess) finds it
all and repairs it. Expectations are computed here, independently (see ``test_reconcile``).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from chainfold.examples import accounts
from chainfold.log.pulsar import PulsarLog
from chainfold.worker import CRASH_EXIT

from .conftest import unique_topic
from .test_reconcile import SPEC_KEYS, Worker, World, build, check, expected_report

pytestmark = pytest.mark.broker

MODEL = "chainfold.examples.accounts"


def publish(pulsar_client, n: int = 1200, streams: int = 25, seed: int = 5, **kw: Any) -> World:
    """The world's log on the broker, appended 50 entries at a time (a service publishing live)."""
    return build(n, streams, seed, log=PulsarLog(pulsar_client, unique_topic("rec")), chunk=50, **kw)


def run_worker(broker_url: str, w: World, d: Path, *faults: str, idle: float = 1.0,
               subscription: str = "accounts-worker") -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "chainfold.worker", "--topic", w.log.topic, "--service-url", broker_url,
            "--evidence", str(d / "evidence"), "--state", str(d / "state.json"), "--idle", str(idle),
            "--subscription", subscription]
    for f in faults:
        args += ["--faults", f]
    return subprocess.run(args, capture_output=True, text=True, timeout=120)


def read_worker(d: Path, w: World) -> tuple[list[str], dict[str, Any], dict[str, Any]]:
    """What the worker left: handled ids (its processed log), its state export, its bookkeeping."""
    ids = [json.loads(x)["id"] for x in (d / "evidence" / "processed.jsonl").read_text().splitlines() if x.strip()]
    return ids, json.loads((d / "state.json").read_text()), json.loads((d / "evidence" / "worker.json").read_text())


def simulate_worker(w: World, handled: list[str], mishandled_at: list[int]) -> dict[str, Any]:
    """The state the worker must have computed: accounts.apply over what it handled, in handling
    order, every handling applied (duplicates too), a mishandled Withdrawn applied as a deposit."""
    by_id = {e.id: e for e in w.events}
    wrong = set(mishandled_at)
    states: dict[str, Any] = {}
    for i, eid in enumerate(handled):
        ev = by_id[eid]
        st = states.get(ev.stream) or accounts.initial(ev.stream)
        if i in wrong:
            assert ev.type == "Withdrawn"
            ev = ev._replace(type="Deposited")
        states[ev.stream] = accounts.apply(st, ev)
    return dict(sorted(states.items()))


def reconcile_cli(cli, w: World, d: Path, *extra: str) -> tuple[int, dict[str, Any] | None, str]:
    r = cli("reconcile", w.log.topic, "--model", MODEL, "--state", str(d / "state.json"), *extra, "--json")
    doc = json.loads(r.stdout) if r.stdout.strip() else None
    return r.returncode, doc, r.stderr


def test_real_worker_crash_skip_mishandle_detected_and_repaired(cli, pulsar_client, broker_url, tmp_path: Path) -> None:
    w = publish(pulsar_client, malformed_at=(100, 700), dup_at=((900, 30), (1000, 600)))
    faults = "crash-before-ack:650;skip-every:173;mishandle:Withdrawn:300:330"
    r1 = run_worker(broker_url, w, tmp_path, faults)
    assert r1.returncode == CRASH_EXIT, r1.stderr
    assert r1.stdout == ""  # the crash leaves no summary; and pulsar-client logs never reach stdout
    r2 = run_worker(broker_url, w, tmp_path, faults)  # restarted: same subscription, state, evidence
    assert r2.returncode == 0, r2.stderr
    summary = json.loads(r2.stdout)
    assert summary["run"] == 2 and summary["received_total"] >= len(w.entries)

    handled, export, meta = read_worker(tmp_path, w)
    assert meta["crashes"] == [650] and meta["skipped"] and meta["mishandled"]
    # the crash produced genuine duplicates: handled (and tracked) twice, applied twice in the state
    dups = {i for i in handled if handled.count(i) > 1}
    assert dups and export == simulate_worker(w, handled, meta["mishandled_at"])

    exp = expected_report(w, Worker([], export), handled_ids=handled)
    ev = str(tmp_path / "evidence")
    code, doc, err = reconcile_cli(cli, w, tmp_path, "--processed", ev + "/processed.jsonl",
                                   "--checkpoints", ev + "/checkpoints.jsonl")
    assert code == 1, err
    check(doc, exp)
    assert doc["verdict"] == "divergent" and doc["tracker"]["exact"] is True
    assert set(doc["missing"]) == set(meta["skipped"]) - set(handled)
    assert len(doc["malformed"]) == 2 and {w.events[30].id, w.events[600].id} <= set(doc["duplicates"])

    # tracker checkpoints alone: the same first divergence, in O(log n) comparisons
    code, doc2, err = reconcile_cli(cli, w, tmp_path, "--checkpoints", ev + "/checkpoints.jsonl")
    assert code == 1, err
    assert doc2["first_divergence"] == exp["first_divergence"]
    assert doc2["tracker"]["comparisons"] <= 2 * math.log2(len(handled)) + 4

    # repair: exit 0, verdict repaired, the corrected export is the reference fold
    out = tmp_path / "repaired.json"
    code, doc3, err = reconcile_cli(cli, w, tmp_path, "--processed", ev + "/processed.jsonl", "--repair", str(out))
    assert code == 0, err
    for k in SPEC_KEYS:
        assert k in doc3
    assert doc3["verdict"] == "repaired"
    assert json.loads(out.read_text()) == exp["states"]
    corrections = [json.loads(x) for x in Path(doc3["repair"]["corrections"]).read_text().splitlines()]
    assert sorted(c["stream"] for c in corrections) == sorted(exp["divergent"])

    # the repaired export reconciles clean against the log (state only)
    r = cli("reconcile", w.log.topic, "--model", MODEL, "--state", str(out), "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["verdict"] == "consistent", r.stderr
    w.log.close()


def test_fault_free_worker_is_consistent(cli, pulsar_client, broker_url, tmp_path: Path) -> None:
    w = publish(pulsar_client, n=600, streams=10, malformed_at=(10,), dup_at=((400, 5),))
    r = run_worker(broker_url, w, tmp_path, idle=0.8)
    assert r.returncode == 0, r.stderr
    handled, export, _ = read_worker(tmp_path, w)
    exp = expected_report(w, Worker([], export), handled_ids=handled)
    assert exp["verdict"] == "consistent"
    ev = str(tmp_path / "evidence")
    code, doc, err = reconcile_cli(cli, w, tmp_path, "--processed", ev + "/processed.jsonl",
                                   "--checkpoints", ev + "/checkpoints.jsonl")
    assert code == 0, err
    check(doc, exp)
    assert doc["malformed"] and doc["duplicates"] == [w.events[5].id]
    # a worker that skips one event: exit 1 (no repair asked)
    d2 = tmp_path / "skipping"
    r = run_worker(broker_url, w, d2, f"skip:{w.events[300].id}", idle=0.8, subscription="second")
    assert r.returncode == 0, r.stderr
    code, doc, err = reconcile_cli(cli, w, d2, "--processed", str(d2 / "evidence" / "processed.jsonl"))
    assert code == 1 and doc["missing"] == [w.events[300].id], err
    assert doc["first_divergence"]["event_id"] == w.events[300].id
    w.log.close()


def test_files_not_in_their_format_exit_2_naming_file_line_reason(cli, pulsar_client, tmp_path: Path) -> None:
    w = publish(pulsar_client, n=120, streams=4)
    good = {s: v for s, v in expected_report(w, None)["states"].items()}
    state = tmp_path / "state.json"
    state.write_text(json.dumps(good, indent=1, sort_keys=True))
    proc = tmp_path / "processed.jsonl"

    proc.write_text(json.dumps({"id": w.events[0].id}) + "\n" + '{"id": "evt-5-2",\n')
    r = cli("reconcile", w.log.topic, "--model", MODEL, "--state", str(state), "--processed", str(proc))
    assert r.returncode == 2 and "processed.jsonl:2" in r.stderr and "bad JSON" in r.stderr, r.stderr

    # (ids and streams the log never had are findings, not bad input: tests/test_reconcile_findings.py)
    state.write_text("[1, 2, 3]\n")
    r = cli("reconcile", w.log.topic, "--model", MODEL, "--state", str(state))
    assert r.returncode == 2 and "state.json:1" in r.stderr and "one JSON object" in r.stderr, r.stderr
    w.log.close()


def test_demo_json(broker_url: str, tmp_path: Path) -> None:
    # imports the command module, in case the CLI does not list it yet
    code = "import chainfold.cli.demo_cmd, chainfold.cli as c; c.main()"
    r = subprocess.run([sys.executable, "-c", code, "demo", "--events", "3000", "--json", "--seed", "4",
                        "--workdir", str(tmp_path / "demo")], capture_output=True, text=True, timeout=180,
                       env={**os.environ, "CHAINFOLD_SERVICE_URL": broker_url}, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)  # stdout is the report and nothing else
    for k in SPEC_KEYS:
        assert k in doc
    assert doc["verdict"] == "repaired" and doc["demo"]["ok"] is True
    assert doc["demo"]["validation"] == {"rebuild_equals_repaired": True, "streams_compared": 200,
                                         "verify": "intact", "repaired_reconciles": "consistent"}
    assert doc["log"]["events"] == 3005 and len(doc["malformed"]) == 2
    assert doc["missing"] and doc["duplicates"] and doc["divergent_streams"]
    assert "1. publish" in r.stderr and "5. validate" in r.stderr  # the story went to stderr

"""History on real brokers, through the CLI (docs/cli.md#history).

* seq gaps (both brokers): a foreign producer writes envelopes with the seqs it chooses, as a log
  that lost events before anyone read it would hold them;
* lost entries (Apache Pulsar: its admin API truncates a topic): 5,000 events over two ledgers,
  ``rebuild`` (snapshot at 5,000), the first ledger truncated, 500 more events; then rebuild, rebuild
  --full, verify and reconcile, with a local record and snapshots, without snapshots, and with
  nothing recorded at all.

Every expectation comes from the events as written here, never from chainfold's own output.
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from chainfold.envelope import Event, encode
from chainfold.log.pulsar import PulsarLog
from chainfold.store.snapshots import topic_dir

from .conftest import unique_topic
from .test_history import fold, gen

MODEL = "chainfold.examples.accounts"


def publish(pulsar_client, topic: str, events: list[Event]) -> list[str]:
    """Append envelopes exactly as given (their seqs included), as a foreign producer would."""
    log = PulsarLog(pulsar_client, topic)
    try:
        return [str(m) for m in log.append_payloads([(encode(e), e.stream, e.time) for e in events])]
    finally:
        log.close()


def run_json(cli, *args: str, expect: int) -> dict:
    r = cli(*args, "--json")
    assert r.returncode == expect, f"exit {r.returncode}, expected {expect}\nstdout: {r.stdout}\nstderr: {r.stderr}"
    return json.loads(r.stdout)  # one JSON object, also when the command fails


def first_seq_gaps(held: list[Event], mids: list[str]) -> list[dict[str, Any]]:
    """Each stream whose first event held has seq > 1: the gap, in log order."""
    seen: set[str] = set()
    out = []
    for ev, mid in zip(held, mids):
        if ev.stream not in seen:
            seen.add(ev.stream)
            if ev.seq > 1:
                out.append({"stream": ev.stream, "expected_seq": 1, "found_seq": ev.seq, "message_id": mid})
    return out


def worker(tmp: Path, handled: list[Event], state: dict[str, Any]) -> tuple[str, str]:
    proc, st = tmp / "processed.jsonl", tmp / "state.json"
    proc.write_text("".join(json.dumps({"id": e.id}) + "\n" for e in handled))
    st.write_text(json.dumps(state))
    return str(proc), str(st)


# --- seq gaps, both brokers ------------------------------------------------------------------------


@pytest.mark.broker
def test_seq_gaps_from_a_foreign_producer(cli, pulsar_client, tmp_path: Path) -> None:
    topic = unique_topic("gaps")
    evs = gen(400, 8)
    lost = {evs[5].id, evs[200].id}  # a stream's first event, and one in the middle of another
    held = [e for e in evs if e.id not in lost and not (e.stream == evs[7].stream and e.seq <= 3)]
    held.append(Event("foreign-1", "other", None, "Deposited", 1, {"amount": 1}))  # no seq: unverifiable
    mids = publish(pulsar_client, topic, held)
    top: dict[str, int] = {}
    gaps = []
    for ev, mid in zip(held, mids):
        if ev.seq is None:
            continue
        if ev.seq > top.get(ev.stream, 0) + 1:
            gaps.append({"stream": ev.stream, "expected_seq": top.get(ev.stream, 0) + 1, "found_seq": ev.seq,
                         "message_id": mid})
        top[ev.stream] = max(top.get(ev.stream, 0), ev.seq)
    assert len(gaps) >= 2

    v = run_json(cli, "verify", topic, expect=3)
    assert v["verdict"] == "mismatch" and v["first_mismatch"] is None and v["history"] == "gaps"
    assert v["seq_gaps"] == gaps and v["seq_unverifiable"] == 1 and v["malformed_entries"] == 0
    assert v["error"].startswith(f"events are missing from the log itself: {len(gaps)} seq gap(s)")
    human = cli("verify", topic)
    assert human.returncode == 3 and "HISTORY GAPS" in human.stdout and "INTACT" not in human.stdout

    rb = run_json(cli, "rebuild", topic, "-m", MODEL, "--full", "--out", "state.json", expect=3)
    assert rb["history"] == "gaps" and rb["seq_gaps"] == gaps and "no state export written" in rb["error"]
    assert not (tmp_path / "state.json").exists()
    again = run_json(cli, "rebuild", topic, "-m", MODEL, expect=3)  # from the snapshot the first one wrote
    assert again["snapshot"] is not None and again["seq_gaps"] == gaps
    ok = run_json(cli, "rebuild", topic, "-m", MODEL, "--full", "--allow-partial-history", "--out", "state.json",
                  expect=0)
    assert ok["seq_gaps"] == gaps and json.loads((tmp_path / "state.json").read_text()) == fold(held)

    proc, st = worker(tmp_path, held, fold(held))
    rc = run_json(cli, "reconcile", topic, "-m", MODEL, "--state", st, "--processed", proc, expect=3)
    assert rc["verdict"] == "unrecoverable" and rc["seq_gaps"] == gaps and rc["missing"] == []
    rc_ok = run_json(cli, "reconcile", topic, "-m", MODEL, "--state", st, "--processed", proc,
                     "--allow-partial-history", expect=0)
    assert rc_ok["verdict"] == "consistent" and rc_ok["seq_gaps"] == gaps


@pytest.mark.broker
def test_verify_counts_malformed_entries_and_prints_the_root(cli, pulsar_client) -> None:
    topic = unique_topic("mal")
    evs = gen(50, 3)
    log = PulsarLog(pulsar_client, topic)
    try:
        log.append_payloads([(encode(e), e.stream, e.time) for e in evs[:20]])
        bad = [str(m) for m in log.append_payloads([(b'{"id": "j"}', None, None), (b"", None, None)])]
        log.append_payloads([(encode(e), e.stream, e.time) for e in evs[20:]])
    finally:
        log.close()
    v = run_json(cli, "verify", topic, expect=0)
    assert v["verdict"] == "intact" and v["malformed_entries"] == 2 and v["malformed_first"] == bad
    assert len(v["log"]["root"]) == 64 and v["history"] == "complete"
    human = cli("verify", topic)
    assert human.returncode == 0 and "2 malformed entr(ies)" in human.stdout and v["log"]["root"] in human.stdout


# --- lost entries, Apache Pulsar -------------------------------------------------------------------


def _admin(method: str, path: str) -> None:
    admin = os.environ.get("CHAINFOLD_TEST_ADMIN_URL")
    if not admin:
        pytest.skip("needs CHAINFOLD_TEST_ADMIN_URL (set by scripts/test-apache)")
    req = urllib.request.Request(f"{admin.rstrip('/')}/admin/v2/persistent/public/default/{path}", method=method)
    with urllib.request.urlopen(req, timeout=60) as resp:
        assert resp.status in (200, 204), resp.status


@pytest.fixture(scope="module")
def truncated(pulsar_client, tmp_path_factory) -> dict[str, Any]:
    """5,000 events in two ledgers (the topic is unloaded between them, which closes the first),
    rebuilt once (record and a snapshot at 5,000), the first ledger truncated away, 500 more."""
    if not os.environ.get("CHAINFOLD_TEST_ADMIN_URL"):
        pytest.skip("needs Apache Pulsar's admin API (scripts/test-apache)")
    from .conftest import run_cli

    topic = unique_topic("trunc")
    work = tmp_path_factory.mktemp("trunc")
    evs = gen(5500, 50)
    mids = publish(pulsar_client, topic, evs[:2500])
    _admin("PUT", f"{topic}/unload")
    mids += publish(pulsar_client, topic, evs[2500:5000])
    assert mids[2499].split(":")[0] != mids[2500].split(":")[0], "expected a second ledger"
    env = {"CHAINFOLD_SERVICE_URL": os.environ["CHAINFOLD_TEST_SERVICE_URL"]}
    r = run_cli("rebuild", topic, "-m", MODEL, "--snapshots", str(work / "snaps"), env=env)
    assert r.returncode == 0, r.stderr
    _admin("DELETE", f"{topic}/truncate")
    mids += publish(pulsar_client, topic, evs[5000:])
    snap = next((topic_dir(work / "snaps", topic)).glob("snap-*.cbor"))
    return {"topic": topic, "work": work, "events": evs, "mids": mids, "snap": str(snap)}


def _in(tmp_path: Path, world: dict[str, Any], *, snapshots: bool) -> str:
    """A copy of the world's record (with or without its snapshots) for one test to use."""
    dst = tmp_path / "snaps"
    shutil.copytree(world["work"] / "snaps", dst)
    if not snapshots:
        for p in dst.rglob("snap-*.cbor"):
            p.unlink()
    return str(dst)


def _truncated_json(world: dict[str, Any], snaps: str | None, checked_from: int) -> dict[str, Any]:
    mids = world["mids"]
    name = Path(world["snap"]).name
    return {"partition": f"persistent://public/default/{world['topic']}", "first_available": mids[2500],
            "first_available_index": 2500, "recorded_first": mids[0], "entries_lost": 2500,
            "unverifiable_segments": [0, 2], "checked_from": checked_from,
            "covered_by_snapshot": None if snaps is None else str(Path(snaps) / Path(world["snap"]).parent.name / name)}


@pytest.mark.apache
def test_rebuild_after_truncation(cli, truncated, tmp_path: Path) -> None:
    w = truncated
    snaps = _in(tmp_path, w, snapshots=True)
    rb = run_json(cli, "rebuild", w["topic"], "-m", MODEL, "--snapshots", snaps, "--out", "state.json", expect=0)
    assert rb["snapshot"]["entries"] == 5000 and rb["replayed"]["events"] == 500
    assert rb["history"] == "truncated" and rb["seq_gaps"] == []
    assert rb["truncated"] == [_truncated_json(w, snaps, 5000)]
    assert json.loads((tmp_path / "state.json").read_text()) == fold(w["events"])
    full = run_json(cli, "rebuild", w["topic"], "-m", MODEL, "--snapshots", snaps, "--full", expect=3)
    assert full["error"].startswith("history is gone and no valid snapshot covers the gap")
    assert full["message_id"] == w["mids"][2500] and full["history"] == "truncated"
    assert full["truncated"] == [dict(_truncated_json(w, None, None), covered_by_snapshot=None)]


@pytest.mark.apache
def test_verify_after_truncation(cli, truncated, tmp_path: Path) -> None:
    w = truncated
    snaps = _in(tmp_path, w, snapshots=True)
    v = run_json(cli, "verify", w["topic"], "--snapshots", snaps, expect=0)
    assert v["verdict"] == "intact" and v["first_mismatch"] is None and v["history"] == "truncated"
    assert v["truncated"] == [_truncated_json(w, snaps, 2500)] and v["seq_gaps"] == []
    assert v["log"]["events"] == 5500
    human = cli("verify", w["topic"], "--snapshots", snaps)
    assert human.returncode == 0 and f"entries before message id {w['mids'][2500]} are gone" in human.stdout
    assert "differs from the checkpoint" not in human.stdout
    bare = _in(tmp_path / "b", w, snapshots=False)
    v3 = run_json(cli, "verify", w["topic"], "--snapshots", bare, expect=3)
    assert v3["verdict"] == "mismatch" and v3["first_mismatch"] is None
    assert v3["truncated"] == [dict(_truncated_json(w, None, 2500), covered_by_snapshot=None)]
    assert v3["error"].startswith("history is gone and no valid snapshot covers the gap")
    human3 = cli("verify", w["topic"], "--snapshots", bare)
    assert human3.returncode == 3 and "HISTORY TRUNCATED" in human3.stdout and "MISMATCH" not in human3.stdout


@pytest.mark.apache
def test_reconcile_after_truncation(cli, truncated, tmp_path: Path) -> None:
    w = truncated
    evs, mids = w["events"], w["mids"]
    snaps = _in(tmp_path, w, snapshots=True)
    proc, st = worker(tmp_path, evs, fold(evs))
    ok = run_json(cli, "reconcile", w["topic"], "-m", MODEL, "--state", st, "--processed", proc, "--snapshots", snaps,
                  expect=0)
    assert ok["verdict"] == "consistent" and ok["replayed"]["from_snapshot"] == 5000
    assert ok["history"] == "truncated" and ok["truncated"] == [_truncated_json(w, snaps, 5000)]
    assert ok["history_unchecked"] == {"snapshot": _truncated_json(w, snaps, 0)["covered_by_snapshot"],
                                       "entries": 5000, "handled": 5000, "lines": [1, 5000]}
    missed = evs[5123]
    handled = [e for e in evs if e.id != missed.id]
    proc, st = worker(tmp_path, handled, fold(handled))
    bad = run_json(cli, "reconcile", w["topic"], "-m", MODEL, "--state", st, "--processed", proc, "--snapshots", snaps,
                   expect=1)
    assert bad["missing"] == [missed.id]
    assert bad["first_divergence"] == {"index": 5123, "segment": 5, "event_id": missed.id, "message_id": mids[5123]}
    right, wrong = fold(evs), fold(handled)
    assert [d["stream"] for d in bad["divergent_streams"]] == sorted(s for s in right if right[s] != wrong.get(s))
    bare = _in(tmp_path / "b", w, snapshots=False)
    gone = run_json(cli, "reconcile", w["topic"], "-m", MODEL, "--state", st, "--processed", proc,
                    "--snapshots", bare, expect=3)
    assert gone["verdict"] == "unrecoverable" and gone["history"] == "truncated"
    assert gone["message_id"] == mids[2500]


@pytest.mark.apache
def test_truncation_without_a_local_record_is_caught_by_seq(cli, truncated, tmp_path: Path) -> None:
    w = truncated
    held, mids = w["events"][2500:], w["mids"][2500:]
    gaps = first_seq_gaps(held, mids)
    assert gaps and all(g["found_seq"] > 1 for g in gaps)
    rb = run_json(cli, "rebuild", w["topic"], "-m", MODEL, "--snapshots", "empty", "--full", expect=3)
    assert rb["history"] == "gaps" and rb["seq_gaps"] == gaps and rb["applied"] == 3000
    v = run_json(cli, "verify", w["topic"], "--snapshots", "empty2", expect=3)
    assert v["history"] == "gaps" and v["seq_gaps"] == gaps and v["log"]["events"] == 3000
    ok = run_json(cli, "verify", w["topic"], "--snapshots", "empty3", "--allow-partial-history", expect=0)
    assert ok["verdict"] == "intact" and ok["seq_gaps"] == gaps

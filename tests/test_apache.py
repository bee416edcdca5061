"""What only Apache Pulsar can show: partitioned topics, broker deduplication, exclusive producers,
a broker killed and restarted under a running rebuild, and verify catching a fault on a real log.

Run by ``scripts/test-apache``, which starts an Apache Pulsar standalone broker and sets
``CHAINFOLD_TEST_SERVICE_URL`` and ``CHAINFOLD_TEST_ADMIN_URL`` (and ``CHAINFOLD_TEST_PULSAR_*``,
so the restart test can kill and restart the same broker). Skipped on pulsar-lite.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from chainfold.envelope import decode, encode, event_from_json
from chainfold.examples import accounts
from chainfold.log.pulsar import PulsarLog
from chainfold.store.snapshots import topic_dir

from .conftest import ROOT, unique_topic

pytestmark = pytest.mark.apache

MODEL = "chainfold.examples.accounts"


# -- helpers ---------------------------------------------------------------------------------------


def create_partitioned_topic(topic: str, partitions: int) -> None:
    """Create ``public/default/TOPIC`` with N partitions through the admin REST API."""
    admin = os.environ.get("CHAINFOLD_TEST_ADMIN_URL")
    if not admin:
        pytest.skip("needs CHAINFOLD_TEST_ADMIN_URL (the broker's admin URL; set by scripts/test-apache)")
    req = urllib.request.Request(
        f"{admin.rstrip('/')}/admin/v2/persistent/public/default/{topic}/partitions",
        data=str(partitions).encode(), method="PUT", headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.status in (200, 204), resp.status


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_rows(cli, topic: str) -> list[dict]:
    r = cli("read", topic)
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.splitlines()]


def fold_independently(events: list[dict]) -> dict[str, Any]:
    """The accounts states, folded here by hand: each event applied in input order to its stream,
    with the seq it gets in the log (1-based, per stream). No chainfold fold machinery involved."""
    states: dict[str, Any] = {}
    seqs: dict[str, int] = defaultdict(int)
    for e in events:
        s = e["stream"]
        seqs[s] += 1
        ev = SimpleNamespace(id=e["id"], stream=s, seq=seqs[s], type=e["type"], time=e["time"], data=e["data"])
        states[s] = accounts.apply(states[s] if s in states else accounts.initial(s), ev)
    return {s: accounts.render(st) for s, st in states.items()}


def to_events(rows: list[dict]):
    return [event_from_json(r) for r in rows]


def run_json(cli, *args: str, expect: int = 0, **kw: Any) -> dict:
    r = cli(*args, "--json", **kw)
    assert r.returncode == expect, f"exit {r.returncode}, expected {expect}\nstdout: {r.stdout}\nstderr: {r.stderr}"
    return json.loads(r.stdout)


# -- a. a partitioned topic, end to end through the CLI --------------------------------------------


def test_partitioned_topic_end_to_end(cli, tmp_path: Path) -> None:
    topic = unique_topic("part")
    create_partitioned_topic(topic, 3)
    events = accounts.generate(4000, 60, seed=3)
    f = write_jsonl(tmp_path / "accounts.jsonl", events)
    summary = run_json(cli, "publish", topic, str(f))
    assert summary["published"] == 4000

    rows = read_rows(cli, topic)
    assert len(rows) == 4000
    assert sorted(r["event"]["id"] for r in rows) == sorted(e["id"] for e in events)  # every event once
    assert {r["partition"] for r in rows} == {0, 1, 2}
    partition_of: dict[str, set[int]] = defaultdict(set)
    seqs: dict[str, list[int]] = defaultdict(list)
    for r in rows:
        ev = r["event"]
        partition_of[ev["stream"]].add(r["partition"])
        seqs[ev["stream"]].append(ev["seq"])
        assert r["key"] == ev["stream"]
    assert all(len(p) == 1 for p in partition_of.values()), "a stream spread over partitions"
    assert all(s == list(range(1, len(s) + 1)) for s in seqs.values()), "seq not gapless in read order"
    order = {e["id"]: i for i, e in enumerate(events)}
    per_stream_ids = defaultdict(list)
    for r in rows:
        per_stream_ids[r["event"]["stream"]].append(order[r["event"]["id"]])
    assert all(ix == sorted(ix) for ix in per_stream_ids.values()), "a stream's events out of input order"

    report = run_json(cli, "verify", topic)
    assert report["verdict"] == "intact" and report["first_mismatch"] is None
    assert report["log"]["events"] == 4000
    assert [p["partition"] for p in report["partitions"]] == [
        f"persistent://public/default/{topic}-partition-{i}" for i in range(3)
    ]
    assert sum(p["events"] for p in report["partitions"]) == 4000

    expected = fold_independently(events)
    rb = run_json(cli, "rebuild", topic, "--model", MODEL, "--out", "state.json")
    assert rb["applied"] == 4000 and rb["streams"] == 60
    state = json.loads((tmp_path / "state.json").read_text())
    assert state == expected

    rec = run_json(cli, "reconcile", topic, "--model", MODEL, "--state", "state.json")
    assert rec["verdict"] == "consistent", rec
    assert rec["divergent_streams"] == [] and rec["log"]["events"] == 4000

    wrong = json.loads(json.dumps(expected))
    victim = sorted(wrong)[7]
    wrong[victim]["balance"] += 1
    (tmp_path / "wrong.json").write_text(json.dumps(wrong))
    rec = run_json(cli, "reconcile", topic, "--model", MODEL, "--state", "wrong.json", expect=1)
    assert rec["verdict"] == "divergent"
    assert [d["stream"] for d in rec["divergent_streams"]] == [victim]
    d = rec["divergent_streams"][0]
    assert d["expected"] == expected[victim] and d["actual"] == wrong[victim]


# -- b. broker deduplication: a retried publish is exactly-once ------------------------------------


# pulsar-client (C++ core, 3.x) sends a batch with only its first message's sequence id, so the
# broker's last sequence id for a producer is the first of its last batch: sequence ids cannot say
# which events of an interrupted publish are stored. PulsarLog.append(producer_name=...) therefore
# skips by event id, and uses sequence ids only so the broker drops batches the client re-sends.


def _assert_once_and_gapless(rows: list[dict], events: list[dict]) -> None:
    ids = [r["event"]["id"] for r in rows]
    assert len(ids) == len(set(ids)), "an event id is stored twice"
    assert sorted(ids) == sorted(e["id"] for e in events)
    seqs: dict[str, list[int]] = defaultdict(list)
    for r in rows:
        seqs[r["event"]["stream"]].append(r["event"]["seq"])
    assert all(s == list(range(1, len(s) + 1)) for s in seqs.values()), "seq has a gap or repeat"


def test_republish_with_producer_name_appends_nothing(cli, tmp_path: Path) -> None:
    topic = unique_topic("dedup")
    events = accounts.generate(2000, 25, seed=5)
    f = write_jsonl(tmp_path / "ev.jsonl", events)
    first = run_json(cli, "publish", topic, str(f), "--producer-name", "P")
    assert first["published"] == 2000
    second = run_json(cli, "publish", topic, str(f), "--producer-name", "P")
    assert second["published"] == 0 and second["skipped_already_stored"] == 2000
    rows = read_rows(cli, topic)
    assert len(rows) == 2000
    _assert_once_and_gapless(rows, events)


def test_publish_resumes_after_a_crash_exactly_once(cli, tmp_path: Path, pulsar_client) -> None:
    topic = unique_topic("crash")
    events = accounts.generate(3000, 40, seed=6)
    f = write_jsonl(tmp_path / "ev.jsonl", events)
    k = 1234
    # the first run "crashed" after the broker had stored the first k events
    log = PulsarLog(pulsar_client, topic, producer_name="P")
    log.append(to_events(events[:k]))
    log.close()
    assert len(read_rows(cli, topic)) == k

    r = run_json(cli, "publish", topic, str(f), "--producer-name", "P")
    rows = read_rows(cli, topic)
    _assert_once_and_gapless(rows, events)
    assert [row["event"]["id"] for row in rows] == [e["id"] for e in events]  # one partition: input order
    assert r["skipped_already_stored"] == k and r["published"] == len(events) - k


def test_resent_sequence_id_is_dropped_by_the_broker(pulsar_client) -> None:
    """A client retrying in flight resends its last message with the same sequence id: the broker
    must not store it (PulsarLog.append_payloads reports MessageId(-1, -1) for it)."""
    topic = unique_topic("resend")
    events = accounts.generate(3000, 40, seed=9)
    k = 1234
    log = PulsarLog(pulsar_client, topic, producer_name="P")
    log.append(to_events(events[:k]))
    log.close()
    again = PulsarLog(pulsar_client, topic, producer_name="P")  # a new session of the same producer
    try:
        last_seq = again.last_sequence_id()  # what the broker recorded: the last batch's sequence id
        assert last_seq > 0
        payload = next(iter(again.read(start=None, limit=1))).payload
        dup = again.append_payloads([(payload, events[0]["stream"], events[0]["time"])], sequence_ids=[last_seq])
        assert (dup[0].ledger, dup[0].entry) == (-1, -1), f"the broker stored a resent sequence id: {dup}"
        assert sum(1 for _ in again.read()) == k
    finally:
        again.close()


# -- c. exclusive producers --------------------------------------------------------------------------


def test_second_exclusive_writer_is_refused(cli, tmp_path: Path, pulsar_client) -> None:
    topic = unique_topic("excl")
    events = accounts.generate(100, 5, seed=7)
    holder = PulsarLog(pulsar_client, topic, exclusive=True)
    try:
        holder.append(to_events(events[:5]))
        holder.producer()  # held open
        f = write_jsonl(tmp_path / "ev.jsonl", events[5:])
        for extra in (["--exclusive"], []):
            r = cli("publish", topic, str(f), *extra)
            assert r.returncode == 2, (extra, r.returncode, r.stderr)
            assert "exclusive writer" in r.stderr and topic in r.stderr
            assert "Traceback" not in r.stderr
        assert len(read_rows(cli, topic)) == 5  # nothing appended
    finally:
        holder.close()
    # once the holder is gone, the exclusive publish goes through
    r = cli("publish", topic, str(f), "--exclusive")
    assert r.returncode == 0, r.stderr
    rows = read_rows(cli, topic)
    assert [row["event"]["id"] for row in rows] == [e["id"] for e in events]


# -- d. the broker killed and restarted under a long rebuild -----------------------------------------

BIG = 150_000


def _standalone() -> list[str]:
    """``pulsar-standalone`` with the test broker's data dir and ports, for ``kill``/``restart``."""
    need = ("CHAINFOLD_TEST_PULSAR_DATA", "CHAINFOLD_TEST_PULSAR_PORT", "CHAINFOLD_TEST_PULSAR_HTTP_PORT")
    if not all(os.environ.get(v) for v in need):
        pytest.skip("needs a broker this test may kill and restart: run via scripts/test-apache")
    script = os.environ.get("CHAINFOLD_TEST_PULSAR_SCRIPT") or str(ROOT / "scripts" / "pulsar-standalone")
    return [script, "--data", os.environ["CHAINFOLD_TEST_PULSAR_DATA"],
            "--port", os.environ["CHAINFOLD_TEST_PULSAR_PORT"],
            "--http-port", os.environ["CHAINFOLD_TEST_PULSAR_HTTP_PORT"]]


def _broker_cmd(cmd: str) -> float:
    """Run ``pulsar-standalone CMD`` on the test broker; return the seconds it took."""
    script, *opts = _standalone()
    t0 = time.monotonic()
    r = subprocess.run([script, cmd, *opts], capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, f"pulsar-standalone {cmd} failed:\n{r.stderr[-3000:]}"
    return time.monotonic() - t0


@pytest.fixture(scope="module")
def big_topic(pulsar_client) -> tuple[str, dict[str, Any]]:
    """A 150k-event accounts topic and its states folded by hand."""
    _standalone()
    topic = unique_topic("big")
    rows = accounts.generate(BIG, 500, seed=11)
    log = PulsarLog(pulsar_client, topic)
    log.append(to_events(rows))
    log.close()
    return topic, fold_independently(rows)


def _rebuild_through_broker_kill(broker_url: str, topic: str, cwd: Path, retry_seconds: str | None,
                                 *, restart_at_once: bool) -> tuple[int, str, float]:
    """Start a rebuild (snapshot every 20000 entries), SIGKILL the broker once the first snapshot is
    written, restart it at once or only after the rebuild has exited; return the rebuild's exit code,
    its stderr and the seconds it ran after the kill."""
    env = {**os.environ, "CHAINFOLD_SERVICE_URL": broker_url}
    if retry_seconds is not None:
        env["CHAINFOLD_RETRY_SECONDS"] = retry_seconds
    err_path = cwd / "rebuild.err"
    with (cwd / "rebuild.out").open("w") as out_f, err_path.open("w") as err_f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "chainfold", "rebuild", topic, "--model", MODEL, "--snapshot-every", "20000",
             "--out", "s1.json", "--json"],
            cwd=cwd, env=env, stdout=out_f, stderr=err_f,
        )
        restarted = False
        try:
            snaps = topic_dir(cwd / "snapshots", topic)
            deadline = time.monotonic() + 120
            while not list(snaps.glob("snap-*")):
                assert proc.poll() is None, f"rebuild ended before its first snapshot: {err_path.read_text()}"
                assert time.monotonic() < deadline, "no snapshot within 120 s"
                time.sleep(0.02)
            _broker_cmd("kill")
            killed = time.monotonic()
            assert proc.poll() is None, "the rebuild finished before the broker was killed: use a longer log"
            if restart_at_once:
                _broker_cmd("restart")
                restarted = True
            wait = 600 if restart_at_once else 180
            try:
                code = proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                pytest.fail(f"the rebuild still ran {wait} s after the broker was killed "
                            f"(CHAINFOLD_RETRY_SECONDS={retry_seconds}): {err_path.read_text()[-3000:]}")
            ran = time.monotonic() - killed
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if not restarted:
                _broker_cmd("restart")
    return code, err_path.read_text(), ran


def _full_rebuild(cli, topic: str, out: str) -> dict:
    run_json(cli, "rebuild", topic, "--model", MODEL, "--full", "--no-snapshots", "--out", out, timeout=600)
    return json.loads(Path(out).read_text())


@pytest.mark.slow
def test_rebuild_survives_broker_kill_and_restart(cli, broker_url: str, big_topic, tmp_path: Path) -> None:
    """Default retry budget: the rebuild rides out the restart (exit 0), or gives up naming the
    broker (exit 3) and a rerun resumes from its newest snapshot. Either way: the right state."""
    topic, expected = big_topic
    code, err, _ = _rebuild_through_broker_kill(broker_url, topic, tmp_path, None, restart_at_once=True)
    assert code in (0, 3), f"exit {code}: {err[-3000:]}"
    if code == 0:
        report = json.loads((tmp_path / "rebuild.out").read_text())
    else:
        assert "broker" in err and "Traceback" not in err, err[-3000:]
        report = run_json(cli, "rebuild", topic, "--model", MODEL, "--out", "s1.json", timeout=600)
        assert report["snapshot"] is not None, report
    assert report["replayed"]["events"] + (report["replayed"]["from_snapshot"] or 0) == BIG
    assert report["log"]["events"] == BIG and report["applied"] >= 1
    s1 = json.loads((tmp_path / "s1.json").read_text())
    s2 = _full_rebuild(cli, topic, str(tmp_path / "s2.json"))
    assert s1 == s2 == expected


@pytest.mark.slow
def test_rebuild_past_its_retry_budget_exits_3_then_resumes_from_snapshot(
    cli, broker_url: str, big_topic, tmp_path: Path
) -> None:
    """The broker stays down longer than the retry budget: the rebuild gives up with exit 3 and a
    message naming the broker; once the broker is back, a rerun starts from the newest snapshot and
    gets the same state."""
    topic, expected = big_topic
    code, err, ran = _rebuild_through_broker_kill(broker_url, topic, tmp_path, "2", restart_at_once=False)
    assert code == 3, f"exit {code} after {ran:.1f}s: {err[-3000:]}"
    assert "broker" in err and "Traceback" not in err, err[-3000:]
    assert not (tmp_path / "s1.json").exists()  # no state export from a failed rebuild
    report = run_json(cli, "rebuild", topic, "--model", MODEL, "--out", "s1.json", timeout=600)
    assert report["snapshot"] is not None and report["replayed"]["from_snapshot"] >= 20000, report
    assert report["replayed"]["events"] == BIG - report["replayed"]["from_snapshot"]
    s1 = json.loads((tmp_path / "s1.json").read_text())
    s2 = _full_rebuild(cli, topic, str(tmp_path / "s2.json"))
    assert s1 == s2 == expected


# -- e. verify catches a dropped entry on the real broker ---------------------------------------------


def test_verify_against_names_the_dropped_entry(cli, pulsar_client) -> None:
    orig, same, copy = unique_topic("orig"), unique_topic("same"), unique_topic("copy")
    rows = accounts.generate(3000, 30, seed=8)
    src = PulsarLog(pulsar_client, orig)
    src.append(to_events(rows))
    entries = list(src.read())
    src.close()
    assert len(entries) == 3000
    dropped = 1500  # inside segment 1 (1024 entries per segment)
    for name, skip in ((same, None), (copy, dropped)):
        dst = PulsarLog(pulsar_client, name)
        dst.append_payloads([(e.payload, e.key, e.event_time) for i, e in enumerate(entries) if i != skip])
        dst.close()

    report = run_json(cli, "verify", same, "--against", orig)
    assert report["verdict"] == "intact" and report["first_mismatch"] is None

    report = run_json(cli, "verify", copy, "--against", orig, expect=1)
    assert report["verdict"] == "mismatch"
    fm = report["first_mismatch"]
    assert fm["index"] == dropped and fm["segment"] == dropped // 1024, fm
    assert fm["event_id"] in (decode(entries[dropped].payload).id, decode(entries[dropped + 1].payload).id, None)

"""publish and read through the CLI, against a real broker process."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pulsar
import pytest

from chainfold.envelope import decode
from chainfold.log.pulsar import PulsarLog

from .conftest import run_cli, unique_topic

pytestmark = pytest.mark.broker


def _write(path: Path, rows: list[object]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _ev(i: int, stream: str | None = None) -> dict:
    return {"id": f"e{i}", "stream": stream or f"s{i % 5}", "type": "Deposited", "data": {"amount": i},
            "time": 1_700_000_000_000 + i}


def test_publish_and_read_round_trip(cli, tmp_path: Path) -> None:
    topic = unique_topic()
    f = _write(tmp_path / "ev.jsonl", [_ev(i) for i in range(20)])
    r = cli("publish", topic, str(f), "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["published"] == 20 and summary["topic"].endswith("/" + topic)
    r = cli("read", topic)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["event"]["id"] for row in rows] == [f"e{i}" for i in range(20)]
    assert all(row["key"] == row["event"]["stream"] for row in rows)
    assert all(row["event_time"] == row["event"]["time"] for row in rows)
    mid = rows[9]["message_id"]
    r = cli("read", topic, "--after", mid, "--count", "3")
    assert [json.loads(x)["event"]["id"] for x in r.stdout.splitlines()] == ["e10", "e11", "e12"]
    r = cli("read", topic, "--from", mid, "--until", rows[11]["message_id"])
    assert [json.loads(x)["event"]["id"] for x in r.stdout.splitlines()] == ["e9", "e10", "e11"]


@pytest.mark.parametrize(
    "bad, line, reason",
    [
        ("{not json", 2, "bad JSON"),
        (json.dumps({"id": "x", "type": "T", "data": {}}), 2, "missing 'stream'"),
        (json.dumps({"id": "x", "stream": "s", "data": {}}), 2, "missing 'type'"),
        (json.dumps({"id": "x", "stream": "s", "type": "T"}), 2, "missing 'data'"),
        (json.dumps({"id": "x", "stream": "s", "type": "T", "data": [], "time": 1}), 2, "'data'"),
        (json.dumps(_ev(0)), 2, "duplicate id 'e0'"),
    ],
)
def test_bad_input_is_refused_whole(cli, tmp_path: Path, bad: str, line: int, reason: str) -> None:
    topic = unique_topic()
    f = _write(tmp_path / "bad.jsonl", [_ev(0), bad, _ev(2)])
    r = cli("publish", topic, str(f))
    assert r.returncode == 2
    assert f"bad.jsonl:{line}" in r.stderr and reason in r.stderr
    r = cli("read", topic)
    assert r.returncode == 0 and r.stdout == ""  # nothing was appended


def test_publish_from_stdin(cli) -> None:
    topic = unique_topic()
    r = cli("publish", topic, "-", input="".join(json.dumps(_ev(i)) + "\n" for i in range(3)))
    assert r.returncode == 0, r.stderr
    assert len(cli("read", topic).stdout.splitlines()) == 3


def test_malformed_entries_are_reported_not_dropped(cli, pulsar_client, broker_url) -> None:
    topic = unique_topic()
    log = PulsarLog(pulsar_client, topic)
    log.append_payloads([(b"\x00garbage", "k", None), (json.dumps(_ev(1)).encode(), "s1", None)])
    log.close()
    r = cli("read", topic)
    rows = [json.loads(x) for x in r.stdout.splitlines()]
    assert len(rows) == 2 and all("malformed" in row and row["message_id"] for row in rows)
    assert "after the CBOR item" in rows[0]["malformed"]
    assert rows[1]["malformed"].startswith("looks like JSON, expected a CBOR map")


def test_unreachable_broker_exits_3_quickly(tmp_path: Path) -> None:
    t0 = time.monotonic()
    r = run_cli("read", "t", "--service-url", "pulsar://127.0.0.1:1", cwd=tmp_path)
    assert r.returncode == 3 and "unreachable" in r.stderr
    assert time.monotonic() - t0 < 20
    f = _write(tmp_path / "ev.jsonl", [_ev(0)])
    r = run_cli("publish", "t", str(f), "--service-url", "pulsar://127.0.0.1:1", cwd=tmp_path)
    assert r.returncode == 3


def test_usage_errors_exit_2(cli, tmp_path: Path) -> None:
    assert cli("publish", "t", str(tmp_path / "missing.jsonl")).returncode == 2
    assert cli("read", "t", "--from", "nonsense").returncode == 2
    assert cli("frobnicate").returncode == 2


def test_embedded_broker_starts_reuses_and_leaves_nothing(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "CHAINFOLD_SERVICE_URL"}
    env.pop("CHAINFOLD_SERVICE_URL", None)
    data = tmp_path / "data"
    f = _write(tmp_path / "ev.jsonl", [_ev(i) for i in range(5)])
    import subprocess
    import sys

    def chainfold(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "chainfold", *args, "--data-dir", str(data)],
                              capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)

    assert chainfold("publish", "emb", str(f)).returncode == 0
    r = chainfold("read", "emb")
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 5
    assert not (data / "broker.json").exists()  # stopped when the command ended
    # a pinned broker is reused and survives commands
    r = subprocess.run([sys.executable, "-m", "chainfold", "broker", "start", "--data-dir", str(data)],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("pulsar://")
    st = json.loads((data / "broker.json").read_text())
    assert chainfold("read", "emb").returncode == 0
    assert json.loads((data / "broker.json").read_text())["pid"] == st["pid"]
    subprocess.run([sys.executable, "-m", "chainfold", "broker", "stop", "--data-dir", str(data)],
                   env=env, timeout=60, check=True, capture_output=True)
    assert not (data / "broker.json").exists()
    from chainfold.log.broker import _alive

    assert not _alive(st["pid"])  # gone (or a zombie left to its new parent)


@pytest.mark.slow
def test_100k_events_read_back_identical_and_resumable(pulsar_client, tmp_path: Path, cli) -> None:
    topic = unique_topic("big")
    n = 100_000
    f = tmp_path / "big.jsonl"
    with f.open("w") as out:
        for i in range(n):
            out.write(json.dumps(_ev(i, f"s{i % 500}")) + "\n")
    r = cli("publish", topic, str(f), "--json", timeout=600)
    assert r.returncode == 0, r.stderr
    log = PulsarLog(pulsar_client, topic)
    ids = []
    mids = []
    reader = log.read()
    for e in reader:
        ids.append(decode(e.payload).id)
        mids.append(e.message_id)
    assert ids == [f"e{i}" for i in range(n)]
    assert len(set(mids)) == n
    half = mids[n // 2]
    tail = [decode(e.payload).id for e in log.read(after=half)]
    assert tail == ids[n // 2 + 1:]
    r = cli("read", topic, "--after", str(mids[-11]))
    assert [json.loads(x)["event"]["id"] for x in r.stdout.splitlines()] == ids[-10:]


def test_redelivered_non_batched_messages_are_filtered(pulsar_client) -> None:
    """pulsar-lite re-delivers non-batched messages to readers; each id must come out once."""
    topic = unique_topic("nb")
    producer = pulsar_client.create_producer(f"persistent://public/default/{topic}", batching_enabled=False)
    for i in range(300):
        producer.send(json.dumps({"i": i}).encode(), partition_key="k")
    producer.close()
    log = PulsarLog(pulsar_client, topic)
    reader = log.read()
    got = [json.loads(e.payload)["i"] for e in reader]
    assert got == list(range(300))

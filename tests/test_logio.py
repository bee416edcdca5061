"""The log layer's edges: brokers that do not answer, topics without history or that do not exist,
``read --raw/--follow``, empty topics told positively, the read-ahead bound, streaming publish and
the seq index. CLI through subprocesses, against the session's real broker."""

from __future__ import annotations

import base64
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pulsar
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chainfold.envelope import decode
from chainfold.errors import BrokerUnavailable, MalformedInputLine
from chainfold.jsonl import check_events_file
from chainfold.log import MessageId
from chainfold.log.pulsar import PulsarLog
from chainfold.log.broker import pulsar_logger
from chainfold.log.seqindex import SeqIndex
from chainfold.sortedruns import SortedRuns, join_keys

from .conftest import APACHE, run_cli, unique_topic


def _ev(i: int, stream: str | None = None, prefix: str = "e") -> dict:
    return {"id": f"{prefix}{i}", "stream": stream or f"s{i % 5}", "type": "Deposited", "data": {"amount": i},
            "time": 1_700_000_000_000 + i}


def _write(path: Path, rows: list[object]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _rows(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


# --- a broker that accepts the connection and never answers -----------------------------------------


@pytest.fixture
def silent_port() -> int:
    """A loopback port that accepts connections and never says anything."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(srv.accept()[0])
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield srv.getsockname()[1]
    stop.set()
    t.join()
    for c in held:
        c.close()
    srv.close()


@pytest.mark.parametrize("command", [["read", "t"], ["verify", "t"]])
def test_silent_broker_exits_3_naming_it(silent_port: int, tmp_path: Path, command: list[str]) -> None:
    url = f"pulsar://127.0.0.1:{silent_port}"
    t0 = time.monotonic()
    r = run_cli(*command, "--service-url", url, cwd=tmp_path, timeout=60)
    assert r.returncode == 3, r.stderr
    assert url in r.stderr and "did not answer" in r.stderr
    assert time.monotonic() - t0 < 20  # was 22.7 s ending in "Pulsar error: TimeOut"


def test_silent_broker_publish_exits_3(silent_port: int, tmp_path: Path) -> None:
    f = _write(tmp_path / "ev.jsonl", [_ev(0)])
    r = run_cli("publish", "t", str(f), "--service-url", f"pulsar://127.0.0.1:{silent_port}", cwd=tmp_path)
    assert r.returncode == 3 and f"127.0.0.1:{silent_port}" in r.stderr


# --- topics without history, missing topics ----------------------------------------------------------


@pytest.mark.broker
@pytest.mark.parametrize("command", [
    ["read"], ["verify"], ["rebuild", "--model", "chainfold.examples.accounts"], ["publish", "FILE"],
])
def test_non_persistent_topics_are_refused(cli, tmp_path: Path, command: list[str]) -> None:
    f = _write(tmp_path / "ev.jsonl", [_ev(0)])
    args = [str(f) if a == "FILE" else a for a in command]
    r = cli(args[0], "non-persistent://public/default/np", *args[1:])
    assert r.returncode == 2, r.stderr
    assert "non-persistent" in r.stderr and "no history" in r.stderr


@pytest.mark.broker
def test_read_of_a_missing_topic_says_so(cli) -> None:
    r = cli("read", unique_topic("typo"))
    assert r.returncode == 0 and r.stdout == ""
    assert "holds no entries" in r.stderr and "does not exist" in r.stderr


@pytest.mark.apache
def test_read_of_a_missing_topic_on_apache_is_refused_and_not_created(cli) -> None:
    import os

    admin = os.environ["CHAINFOLD_TEST_ADMIN_URL"]
    name = unique_topic("typo")
    r = cli("read", name, "--admin-url", admin)
    assert r.returncode == 2 and "no such topic" in r.stderr
    from chainfold.log.broker import topic_listed

    assert topic_listed(admin, f"persistent://public/default/{name}") is False


# --- read --raw, --follow ----------------------------------------------------------------------------


@pytest.mark.broker
def test_read_raw_gives_every_stored_payload(cli, tmp_path: Path) -> None:
    topic = unique_topic("raw")
    assert cli("publish", topic, str(_write(tmp_path / "ev.jsonl", [_ev(i) for i in range(3)]))).returncode == 0
    rows = _rows(cli("read", topic, "--raw").stdout)
    assert len(rows) == 3
    for row in rows:
        ev = decode(base64.b64decode(row["payload_base64"]))
        assert ev.id == row["event"]["id"] and ev.seq == row["event"]["seq"]
    assert all("payload_base64" not in row for row in _rows(cli("read", topic).stdout))


@pytest.mark.broker
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_read_follow_sees_new_entries_and_stops_cleanly(broker_url: str, tmp_path: Path, sig: int) -> None:
    topic = unique_topic("follow")
    env = {"CHAINFOLD_SERVICE_URL": broker_url}
    first = _write(tmp_path / "a.jsonl", [_ev(i) for i in range(3)])
    assert run_cli("publish", topic, str(first), env=env, cwd=tmp_path).returncode == 0
    import os

    proc = subprocess.Popen([sys.executable, "-m", "chainfold", "read", topic, "--follow"], cwd=tmp_path,
                            env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)  # type: ignore[union-attr]
    reader.start()
    try:
        _wait(lambda: len(lines) >= 3)
        later = _write(tmp_path / "b.jsonl", [_ev(i, prefix="later") for i in range(4)])
        assert run_cli("publish", topic, str(later), env=env, cwd=tmp_path).returncode == 0
        _wait(lambda: len(lines) >= 7)
    finally:
        proc.send_signal(sig)
        code = proc.wait(timeout=30)
    reader.join(timeout=10)
    assert code == 0, proc.stderr.read()  # type: ignore[union-attr]
    ids = [json.loads(x)["event"]["id"] for x in lines]
    assert ids == [f"e{i}" for i in range(3)] + [f"later{i}" for i in range(4)]


def _wait(cond, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.05)


# --- an empty topic is told positively (issue 10's reader risk) --------------------------------------


@pytest.mark.broker
def test_empty_topic_is_empty_through_the_brokers_answer(pulsar_client) -> None:
    """pulsar-lite's "Topic has no messages" is heard by chainfold's logger (the session client's);
    Apache Pulsar answers "no more messages" directly. Either way the read ends empty at once,
    resumed or not."""
    log = PulsarLog(pulsar_client, unique_topic("empty"), retry_seconds=30)
    for kw in ({}, {"after": MessageId(7, 3, -1, -1)}):
        reader = log.read(**kw)  # type: ignore[arg-type]
        assert list(reader) == [] and reader.reconnects == 0


@pytest.mark.broker
def test_without_the_brokers_words_a_fresh_reader_establishes_empty(pulsar_client, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the broker's own words (a client with another logger), pulsar-lite's UnknownError is
    confirmed by a fresh reader from the earliest position before the topic counts as empty."""
    import chainfold.log.pulsar as cfp

    monkeypatch.setattr(cfp, "server_said", lambda text, since: False)
    log = PulsarLog(pulsar_client, unique_topic("resume"), retry_seconds=30)
    for kw in ({}, {"after": MessageId(7, 3, -1, -1)}):
        reader = log.read(**kw)  # type: ignore[arg-type]
        assert list(reader) == [] and reader.reconnects == 0


def test_a_failed_question_is_empty_only_on_evidence() -> None:
    """Only "Topic has no messages" heard from the broker, or an UnknownError a fresh reader
    confirms, makes a failed "is more coming?" an empty topic; any other failure is retried."""
    from chainfold.log.pulsar import _PulsarReader, _Question

    class Answer(_Question):
        def __init__(self, unknown: bool) -> None:  # an answer as the client's thread leaves it
            self.asked_at = time.monotonic() + 3600  # nothing heard after this moment
            self.unknown_error = unknown

    confirmed: list[bool] = []
    r = _PulsarReader(None, "persistent://public/default/x", 1.0)  # type: ignore[arg-type]
    r._holds_nothing = lambda reader: confirmed.append(True) or True  # type: ignore[method-assign]
    assert r._is_empty(Answer(unknown=False), None) is False and confirmed == []  # type: ignore[arg-type]
    assert r._is_empty(Answer(unknown=True), None) is True and confirmed == [True]  # type: ignore[arg-type]


# --- the read-ahead bound ------------------------------------------------------------------------------


@pytest.mark.broker
def test_read_gate_bounds_what_the_client_holds_and_loses_nothing(pulsar_client) -> None:
    topic = unique_topic("gate")
    src = PulsarLog(pulsar_client, topic)
    for c in range(10):  # separate appends: many entries (batches)
        src.append_payloads([(f"p{c}-{i}".encode(), "k", None) for i in range(200)])
    gate = pulsar_logger()  # the process's gate: the session client made it pulsar-client's logger
    old, gate.limit = gate.limit, 2  # type: ignore[attr-defined]
    received = gate.entries_received  # type: ignore[attr-defined]
    try:
        log = PulsarLog(pulsar_client, topic, gate=gate)  # type: ignore[arg-type]
        got = []
        reader = log.read()
        for e in reader:
            got.append(e.payload)
            if len(got) % 200 == 1:
                inner = list(log.read(limit=3))  # a second reader on the same client: no deadlock
                assert len(inner) == 3
                time.sleep(0.05)  # a slow consumer: the broker would push everything ahead
        assert got == [f"p{c}-{i}".encode() for c in range(10) for i in range(200)]
        assert gate.entries_received - received >= 10  # type: ignore[attr-defined]
    finally:
        gate.limit = old  # type: ignore[attr-defined]


# --- streaming publish ------------------------------------------------------------------------------------


def _ids_file(tmp_path: Path, ids: list[str]) -> Path:
    return _write(tmp_path / "ids.jsonl", [{"id": x, "stream": "s", "type": "T", "data": {}} for x in ids])


def test_duplicate_ids_found_across_runs_on_disk(tmp_path: Path) -> None:
    ids = [f"id{i}" for i in range(500)]
    ids[400] = "id37"
    with pytest.raises(MalformedInputLine, match=r"ids.jsonl:401: duplicate id 'id37' \(first on line 38\)"):
        check_events_file(str(_ids_file(tmp_path, ids)), run_size=16)
    with check_events_file(str(_ids_file(tmp_path, ids[:400])), run_size=16) as ok:
        assert ok.events == 400 and ok.ids.runs == 25


def test_the_first_bad_line_wins(tmp_path: Path) -> None:
    rows: list[object] = [{"id": f"x{i}", "stream": "s", "type": "T", "data": {}} for i in range(50)]
    rows[30] = rows[3]  # duplicate on line 31
    rows[40] = "not json"  # bad JSON on line 41
    with pytest.raises(MalformedInputLine, match=r":31: duplicate id"):
        check_events_file(str(_write(tmp_path / "a.jsonl", rows)), run_size=8)
    rows[20] = "{"  # now an earlier bad line
    with pytest.raises(MalformedInputLine, match=r":21: bad JSON"):
        check_events_file(str(_write(tmp_path / "a.jsonl", rows)), run_size=8)


@given(st.lists(st.tuples(st.binary(max_size=6), st.integers(0, 50)), max_size=120), st.integers(1, 9))
@settings(max_examples=150, deadline=None)
def test_sorted_runs_merge_and_join_like_sorting_in_memory(pairs: list[tuple[bytes, int]], run_size: int) -> None:
    with SortedRuns(run_size) as runs, SortedRuns(run_size) as other:
        runs.extend(pairs)
        other.extend((k, 0) for k, _ in pairs[::3])
        assert list(runs.merged()) == sorted(pairs)
        assert list(runs.merged()) == sorted(pairs)  # can be read again
        want = {k for k, _ in pairs[::3]}
        assert list(join_keys(runs.merged(), other.merged())) == [p for p in sorted(pairs) if p[0] in want]


@pytest.mark.broker
def test_publish_numbers_from_the_seq_index_and_reads_only_the_tail(cli, tmp_path: Path) -> None:
    topic = unique_topic("seqidx")
    a = _write(tmp_path / "a.jsonl", [_ev(i) for i in range(20)])
    b = _write(tmp_path / "b.jsonl", [_ev(i, prefix="b") for i in range(10)])
    c = _write(tmp_path / "c.jsonl", [_ev(i, prefix="c") for i in range(5)])
    first = json.loads(cli("publish", topic, str(a), "--json").stdout)
    assert first["seqs_from"] == "scan" and first["published"] == 20
    second = json.loads(cli("publish", topic, str(b), "--json").stdout)
    assert second["seqs_from"] == "index" and second["entries_read"] == 20  # the tail since the index
    third = json.loads(cli("publish", topic, str(c), "--json").stdout)
    assert third["seqs_from"] == "index" and third["entries_read"] == 10
    _assert_gapless(cli("read", topic).stdout, 35)


@pytest.mark.broker
@pytest.mark.parametrize("damage", ["other entry", "missing entry", "garbage"])
def test_a_seq_index_that_does_not_match_the_log_is_not_trusted(cli, tmp_path: Path, damage: str) -> None:
    topic = unique_topic("seqbad")
    cli("publish", topic, str(_write(tmp_path / "a.jsonl", [_ev(i) for i in range(12)])))
    cli("publish", topic, str(_write(tmp_path / "b.jsonl", [_ev(i, prefix="b") for i in range(3)])))
    [path] = list((tmp_path / "snapshots").glob("*/seqs.json"))
    doc = json.loads(path.read_text())
    (part, pos), = doc["partitions"].items()
    if damage == "other entry":
        pos["payload_sha256"] = "0" * 64
        doc["streams"] = {s: 1 for s in doc["streams"]}  # would renumber from 2 if trusted
    elif damage == "missing entry":
        pos["message_id"] = "999:0:-1:-1"
    path.write_text("{not json" if damage == "garbage" else json.dumps(doc))
    out = json.loads(cli("publish", topic, str(_write(tmp_path / "c.jsonl", [_ev(i, prefix="c") for i in range(5)])),
                         "--json").stdout)
    assert out["seqs_from"] == "scan" and out["entries_read"] == 15
    _assert_gapless(cli("read", topic).stdout, 20)


def _assert_gapless(out: str, n: int) -> None:
    rows = _rows(out)
    assert len(rows) == n
    per: dict[str, list[int]] = {}
    for row in rows:
        per.setdefault(row["event"]["stream"], []).append(row["event"]["seq"])
    assert all(seqs == list(range(1, len(seqs) + 1)) for seqs in per.values())


@pytest.mark.broker
def test_producer_name_publishes_only_what_is_missing(cli, tmp_path: Path) -> None:
    topic = unique_topic("once")
    rows = [_ev(i) for i in range(30)]
    half = cli("publish", topic, str(_write(tmp_path / "half.jsonl", rows[:12])), "--producer-name", "P", "--json")
    assert json.loads(half.stdout)["published"] == 12
    full = json.loads(cli("publish", topic, str(_write(tmp_path / "all.jsonl", rows)), "--producer-name", "P",
                          "--json").stdout)
    assert full["published"] == 18 and full["skipped_already_stored"] == 12
    read = _rows(cli("read", topic).stdout)
    assert [r["event"]["id"] for r in read] == [r["id"] for r in rows]
    _assert_gapless(cli("read", topic).stdout, 30)


@pytest.mark.broker
def test_bad_stdin_appends_nothing_and_good_stdin_is_published_whole(cli) -> None:
    topic = unique_topic("stdin")
    bad = "".join(json.dumps(_ev(i)) + "\n" for i in range(50)) + "{broken\n"
    r = cli("publish", topic, "-", input=bad)
    assert r.returncode == 2 and "<stdin>:51" in r.stderr
    good = "".join(json.dumps(_ev(i)) + "\n" for i in range(50))
    assert cli("publish", topic, "-", input=good).returncode == 0
    assert len(_rows(cli("read", topic).stdout)) == 50


def test_seq_index_of_no_directory_reads_everything() -> None:
    from chainfold.log import MemoryLog
    from chainfold.envelope import Event

    log = MemoryLog("m")
    log.append([Event(f"e{i}", f"s{i % 2}", None, "T", 1, {}) for i in range(6)])
    state = SeqIndex.none().current(log)
    assert state.streams == {"s0": 3, "s1": 3} and state.tail == 6 and state.source == "scan"

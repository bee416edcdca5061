"""What a person running chainfold sees: escaped ids, readable reports, clear reasons, progress off a
terminal, proofs by index and between past sizes, verify's record, quiet expected rejections, model
notes, a demo that fits 100 columns. CLI runs are subprocesses against the session's real broker."""

from __future__ import annotations

import io
import json
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
from rich.console import Console

from chainfold import merkle
from chainfold.cli.progress import ProgressLines
from chainfold.envelope import decode

from .conftest import ROOT, run_cli, unique_topic

HOSTILE_STREAM = "<img src=x onerror=alert(1)>[bold]x[/] :-1:"
HOSTILE_ID = "</script><script>alert(1)</script>"


# --- a reconcile scenario with every kind of fault, hostile names included ---------------------------


@dataclass
class Scenario:
    topic: str
    dir: Path
    report: dict
    html: Path
    result: object  # the reconcile CompletedProcess


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _accounts_events() -> list[dict]:
    streams = ["acct-1", "acct-2", HOSTILE_STREAM]
    evs: list[dict] = []
    t = 1_700_000_000_000
    for s in streams:
        evs.append({"id": f"open-{s}", "stream": s, "type": "Opened", "data": {"owner": "Ada"}, "time": t})
    for i in range(24):
        s = streams[i % 3]
        eid = HOSTILE_ID if i == 7 else f"evt-{i}"
        evs.append({"id": eid, "stream": s, "type": "Deposited", "data": {"amount": 100 + i}, "time": t + i})
    return evs


def build_scenario(cli, pulsar_client, tmp: Path) -> Scenario:
    """Publish accounts events (a malformed entry and an event stored twice among them), fold them,
    and reconcile a worker that missed one event, handled one twice and one out of order, and whose
    state is wrong for two streams (one with a hostile name)."""
    topic = unique_topic("opx")
    evs = _accounts_events()
    r = cli("publish", topic, str(_write_jsonl(tmp / "ev.jsonl", evs[:10])))
    assert r.returncode == 0, r.stderr
    producer = pulsar_client.create_producer(f"persistent://public/default/{topic}", batching_enabled=False)
    producer.send(json.dumps({"id": "foreign-1", "stream": "acct-1"}).encode())  # a foreign producer's JSON
    producer.close()
    r = cli("publish", topic, str(_write_jsonl(tmp / "ev2.jsonl", evs[10:])))
    assert r.returncode == 0, r.stderr
    r = cli("publish", topic, str(_write_jsonl(tmp / "again.jsonl", [evs[4]])))  # a retry: stored twice
    assert r.returncode == 0, r.stderr
    r = cli("rebuild", topic, "--model", "chainfold.examples.accounts", "--out", str(tmp / "expected.json"),
            "--no-snapshots")
    assert r.returncode == 0, r.stderr
    state = json.loads((tmp / "expected.json").read_text())
    state["acct-2"]["balance"] += 500
    state[HOSTILE_STREAM]["deposits"] -= 1
    (tmp / "state.json").write_text(json.dumps(state))
    ids = [e["id"] for e in evs]
    handled = [i for i in ids if i != HOSTILE_ID]  # missed
    handled.insert(handled.index("evt-9") + 1, "evt-9")  # handled twice
    a, b = handled.index("evt-12"), handled.index("evt-15")  # same stream (acct-1): out of order
    handled[a], handled[b] = handled[b], handled[a]
    _write_jsonl(tmp / "processed.jsonl", [{"id": i} for i in handled])
    html = tmp / "report.html"
    res = cli("reconcile", topic, "--model", "chainfold.examples.accounts", "--state", str(tmp / "state.json"),
              "--processed", str(tmp / "processed.jsonl"), "--html", str(html), "--json")
    assert res.returncode == 1, res.stderr
    return Scenario(topic, tmp, json.loads(res.stdout), html, res)


@pytest.mark.broker
def test_reconcile_report_has_positions_of_every_finding(cli, pulsar_client, tmp_path: Path) -> None:
    sc = build_scenario(cli, pulsar_client, tmp_path)
    doc = sc.report
    assert doc["missing"] == [HOSTILE_ID] and doc["out_of_order"] == ["evt-12"]
    assert set(doc["duplicates"]) == {"evt-9", "evt-1"} and len(doc["malformed"]) == 1
    pos = doc["positions"]
    rows = [json.loads(x) for x in cli("read", sc.topic).stdout.splitlines()]
    index_of = {}
    for i, row in enumerate(rows):
        if "event" in row:
            index_of.setdefault(row["event"]["id"], i)
    assert pos["missing"] == [index_of[HOSTILE_ID]]
    assert pos["out_of_order"] == [index_of["evt-12"]]
    assert pos["duplicates"] == [index_of[e] for e in doc["duplicates"]]
    assert pos["malformed"] == [next(i for i, r in enumerate(rows) if "malformed" in r)]
    assert [a["index"] for a in pos["stored_again"]] == [len(rows) - 1]
    assert pos["entries"] == [len(rows)] and pos["segment_size"] == 1024
    assert doc["first_divergence"]["index"] == index_of[HOSTILE_ID]
    assert doc["html"] == str(sc.html) and sc.html.exists()


@pytest.mark.broker
def test_human_output_shows_ids_literally_never_as_emoji_or_markup(cli, pulsar_client, tmp_path: Path) -> None:
    sc = build_scenario(cli, pulsar_client, tmp_path)
    r = cli("reconcile", sc.topic, "--model", "chainfold.examples.accounts", "--state", str(tmp_path / "state.json"),
            "--processed", str(tmp_path / "processed.jsonl"), env={"COLUMNS": "200"})
    assert r.returncode == 1, r.stderr
    mid = sc.report["malformed"][0]
    assert mid.endswith(":-1:-1")  # not batched: the id that rich once turned into "…-1👎"
    assert mid in r.stdout and "👎" not in r.stdout
    assert HOSTILE_STREAM in r.stdout  # markup-looking text printed as it is
    acct2 = next(d for d in sc.report["divergent_streams"] if d["stream"] == "acct-2")
    e = acct2["expected"]["balance"]
    assert f"balance: {e:,} → {e + 500:,} (+500)" in r.stdout
    rb = cli("rebuild", sc.topic, "--model", "chainfold.examples.accounts", "--no-snapshots",
             env={"COLUMNS": "200"})
    assert rb.returncode == 0, rb.stderr
    assert f"malformed {mid}: looks like JSON, expected a CBOR map" in rb.stdout
    assert "👎" not in rb.stdout + rb.stderr


def test_terminal_report_lists_field_changes_and_escapes(monkeypatch: pytest.MonkeyPatch) -> None:
    from chainfold.cli import reconcile_view

    out = io.StringIO()
    monkeypatch.setattr(reconcile_view, "stdout", Console(file=out, width=100, emoji=False, highlight=False,
                                                          soft_wrap=True, color_system=None))
    doc = {
        "verdict": "divergent", "topic": "persistent://public/default/[red]t[/]",
        "log": {"events": 10, "segments": 1, "head": "00"}, "processed": {"events": 9},
        "first_divergence": {"index": 3, "segment": 0, "event_id": HOSTILE_ID, "message_id": "6:3:-1:-1"},
        "missing": [HOSTILE_ID], "duplicates": [], "out_of_order": [], "malformed": ["6:3:-1:-1"],
        "divergent_streams": [
            {"stream": HOSTILE_STREAM, "expected": {"balance": 120, "n": 2, "status": "open"},
             "actual": {"balance": 95, "n": 2, "status": "open"}, "delta": {"balance": 25}},
            {"stream": "acct-2", "expected": {"balance": 1}, "actual": None, "delta": None},
        ],
        "replayed": {"from_snapshot": None, "events": 10}, "notes": ["a [b]note[/b]"],
    }
    reconcile_view.print_reconcile(doc)
    text = out.getvalue()
    assert "balance: 120 → 95 (-25)" in text  # the changed field, not the whole state as JSON
    assert "status" not in text.split("divergent streams")[1]  # equal fields are left out
    assert "balance: 1 → (absent)" in text
    assert max(len(line) for line in text.splitlines()) <= 100
    wide = io.StringIO()  # wide enough for every id on one line: each is printed literally
    monkeypatch.setattr(reconcile_view, "stdout", Console(file=wide, width=200, emoji=False, highlight=False,
                                                          soft_wrap=True, color_system=None))
    reconcile_view.print_reconcile(doc)
    text = wide.getvalue()
    assert HOSTILE_STREAM in text and HOSTILE_ID in text and "6:3:-1:-1" in text and "👎" not in text
    assert "[red]t[/]" in text and "a [b]note[/b]" in text


def test_progress_lines_when_stderr_is_not_a_terminal() -> None:
    out = io.StringIO()
    with ProgressLines("verify t", total=1000, out=out, interval=0.05) as update:
        update(250)
        time.sleep(0.3)
        update(500)
        time.sleep(0.12)
    lines = out.getvalue().splitlines()
    assert len(lines) >= 3, lines
    assert lines[0].startswith("chainfold: verify t: 250 of 1,000 entries (25%), ") and "/s" in lines[0]
    assert "ETA" in lines[0]
    assert lines[-1].endswith("done") and "500 of 1,000" in lines[-1]
    quiet = io.StringIO()
    with ProgressLines("short", out=quiet, interval=5) as update:
        update(3)
    assert quiet.getvalue() == ""  # a short command stays quiet


@pytest.mark.broker
def test_long_commands_print_progress_lines_in_a_pipe(cli, tmp_path: Path) -> None:
    topic = unique_topic()
    evs = [{"id": f"e{i}", "stream": f"s{i % 7}", "type": "T", "data": {}, "time": i} for i in range(3000)]
    assert cli("publish", topic, str(_write_jsonl(tmp_path / "ev.jsonl", evs))).returncode == 0
    r = cli("verify", topic, "--json", env={"CHAINFOLD_PROGRESS_SECONDS": "0.05"})
    assert r.returncode == 0, r.stderr
    lines = [x for x in r.stderr.splitlines() if x.startswith(f"chainfold: verify persistent://public/default/{topic}: ")]
    assert lines and lines[-1].endswith("done") and "3,000 entries" in lines[-1], r.stderr
    assert json.loads(r.stdout)["log"]["events"] == 3000  # stdout stays clean JSON


@pytest.mark.broker
def test_prove_by_index_between_past_sizes_and_verify_exit_codes(cli, tmp_path: Path) -> None:
    topic = unique_topic()
    evs = [{"id": f"e{i}", "stream": "s", "type": "T", "data": {"i": i}, "time": i} for i in range(6)]
    assert cli("publish", topic, str(_write_jsonl(tmp_path / "ev.jsonl", evs))).returncode == 0
    payloads = _payloads(cli, topic)
    leaves = [merkle.leaf_hash(p) for p in payloads]

    r = cli("prove", topic, "--index", "2", "--to", "4", "--json")
    assert r.returncode == 0, r.stderr
    inc = json.loads(r.stdout)
    assert (inc["index"], inc["size"], inc["event_id"]) == (2, 4, "e2")
    assert inc["root"] == merkle.root(leaves[:4]).hex()
    assert "inclusion of entry 2" in r.stderr
    by_id = json.loads(cli("prove", topic, "e2").stdout)
    assert by_id["index"] == 2 and by_id["size"] == 6 and by_id["root"] == merkle.root(leaves).hex()

    r = cli("prove", topic, "--from", "2", "--to", "5")
    assert r.returncode == 0, r.stderr
    cons = json.loads(r.stdout)
    assert (cons["old_size"], cons["size"]) == (2, 5)
    assert cons["old_root"] == merkle.root(leaves[:2]).hex() and cons["root"] == merkle.root(leaves[:5]).hex()
    assert merkle.verify_consistency(2, 5, merkle.root(leaves[:2]), merkle.root(leaves[:5]),
                                     [bytes.fromhex(h) for h in cons["proof"]])

    for name, doc in (("inc", inc), ("cons", cons)):
        p = tmp_path / f"{name}.json"
        p.write_text(json.dumps(doc))
        ok = cli("prove", "--verify", str(p))
        assert ok.returncode == 0 and ok.stdout.startswith("VALID"), ok.stdout + ok.stderr
        bad = dict(doc, root=merkle.root(leaves).hex() if doc["root"] != merkle.root(leaves).hex() else "00" * 32)
        p.write_text(json.dumps(bad))
        r = cli("prove", "--verify", str(p), "--json")
        assert r.returncode == 1 and json.loads(r.stdout)["valid"] is False

    for text in ("{}", "[]", "not json", json.dumps({"type": "inclusion", "proof": ["zz"], "root": "00"})):
        p = tmp_path / "bad.json"
        p.write_text(text)
        r = cli("prove", "--verify", str(p), "--json")
        assert r.returncode == 2, (text, r.stdout, r.stderr)
        assert "error" in json.loads(r.stdout)

    r = cli("prove", topic, "--index", "6", "--json")
    assert r.returncode == 2 and "no entry 6" in json.loads(r.stdout)["error"]
    r = cli("prove", topic, "--from", "5", "--to", "3")
    assert r.returncode == 2


def _payloads(cli, topic: str) -> list[bytes]:
    import base64

    from chainfold.envelope import encode, event_from_json

    out = []
    for line in cli("read", topic).stdout.splitlines():
        row = json.loads(line)
        out.append(base64.b64decode(row["payload_base64"]) if "payload_base64" in row
                   else encode(event_from_json(row["event"])))
    return out


@pytest.mark.broker
def test_verify_records_only_when_there_is_something_and_says_where(cli, tmp_path: Path) -> None:
    empty = unique_topic()
    r = cli("verify", empty)
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "snapshots").exists()  # nothing to record: nothing created
    topic = unique_topic()
    evs = [{"id": f"e{i}", "stream": "s", "type": "T", "data": {}, "time": i} for i in range(5)]
    assert cli("publish", topic, str(_write_jsonl(tmp_path / "ev.jsonl", evs))).returncode == 0
    r = cli("verify", topic)
    folder = f"snapshots/public.default.{topic}"
    assert r.returncode == 0 and f"recorded the log's hashes in {folder}" in r.stdout.replace("\n  ", " "), r.stdout
    assert (tmp_path / folder / "leaves.bin").exists()
    r = cli("verify", topic, "--json")
    doc = json.loads(r.stdout)
    assert "recorded_in" not in doc  # nothing new recorded the second time


@pytest.mark.broker
def test_expected_snapshot_rejections_are_quiet(cli, tmp_path: Path) -> None:
    topic = unique_topic()
    evs = [{"id": f"e{i}", "stream": f"s{i % 3}", "type": "T", "data": {"amount": i}, "time": i} for i in range(60)]
    assert cli("publish", topic, str(_write_jsonl(tmp_path / "ev.jsonl", evs))).returncode == 0
    r = cli("rebuild", topic, "--model", "chainfold.examples.counters", "--snapshot-every", "10",
            "--out", str(tmp_path / "expected.json"))
    assert r.returncode == 0, r.stderr
    state = json.loads((tmp_path / "expected.json").read_text())
    state["s1"]["amount"] += 1
    (tmp_path / "state.json").write_text(json.dumps(state))
    _write_jsonl(tmp_path / "processed.jsonl", [{"id": e["id"]} for e in evs if e["id"] != "e4"])
    r = cli("reconcile", topic, "--model", "chainfold.examples.counters", "--state", str(tmp_path / "state.json"),
            "--processed", str(tmp_path / "processed.jsonl"), "--repair", str(tmp_path / "fixed.json"), "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["verdict"] == "repaired" and doc["first_divergence"]["index"] == 4
    assert any("past the replay start" in x["reason"] for x in doc.get("rejected_snapshots", []))
    assert "WARNING" not in r.stderr and "rejected" not in r.stderr, r.stderr
    # a real problem stays visible: a snapshot of other model code
    r = cli("rebuild", topic, "--model", "chainfold.examples.accounts", "--no-snapshots")
    assert "WARNING" in r.stderr and "taken with other model code" in r.stderr


@pytest.mark.broker
def test_snapshots_inspect_is_a_readable_table(cli, tmp_path: Path) -> None:
    topic = unique_topic()
    evs = [{"id": f"e{i}", "stream": "s", "type": "T", "data": {}, "time": i} for i in range(4)]
    assert cli("publish", topic, str(_write_jsonl(tmp_path / "ev.jsonl", evs))).returncode == 0
    assert cli("rebuild", topic, "--model", "chainfold.examples.counters").returncode == 0
    snap = next((tmp_path / "snapshots").glob("*/snap-*.cbor"))
    r = cli("snapshots", topic, "--inspect", snap.name, env={"COLUMNS": "120"})
    assert r.returncode == 0, r.stderr
    assert "{'" not in r.stdout and "malformed 0, duplicates 0" in r.stdout
    assert "last message id" in r.stdout and "valid" in r.stdout
    doc = json.loads(cli("snapshots", topic, "--inspect", snap.name, "--json").stdout)
    assert doc["valid"] is True and doc["entries"] == 4


@pytest.mark.broker
def test_accounts_without_opened_get_a_note_not_silence(cli, tmp_path: Path) -> None:
    topic = unique_topic()
    evs = [{"id": f"d{i}", "stream": "acct-1", "type": "Deposited", "data": {"amount": 100}, "time": i}
           for i in range(5)]
    assert cli("publish", topic, str(_write_jsonl(tmp_path / "ev.jsonl", evs))).returncode == 0
    r = cli("rebuild", topic, "--model", "chainfold.examples.accounts", "--no-snapshots", env={"COLUMNS": "300"})
    assert r.returncode == 0, r.stderr
    assert "1 account(s) were never opened, so their 5 money event(s) were refused" in r.stdout
    assert "docs/models.md#accounts" in r.stdout
    r = cli("rebuild", topic, "--model", "chainfold.examples.accounts", "--no-snapshots", "--out", "-")
    assert json.loads(r.stdout)["acct-1"]["balance"] == 0 and "never opened" in r.stderr
    doc = json.loads(cli("rebuild", topic, "--model", "chainfold.examples.accounts", "--no-snapshots",
                         "--json").stdout)
    assert any("never opened" in n for n in doc["notes"])


def test_bad_json_reasons_and_failing_json_commands(tmp_path: Path) -> None:
    f = tmp_path / "ev.jsonl"
    f.write_text('{"id": "a", "stream": "s\tx", "type": "T", "data": {}}\n')  # a raw tab inside a string
    r = run_cli("publish", "t", str(f), cwd=tmp_path)
    assert r.returncode == 2 and "bad JSON: Invalid control character at column" in r.stderr
    assert "at at" not in r.stderr
    st = tmp_path / "state.json"
    st.write_text('{"s": {"a": 1},\n "t": [1, 2,]}\n')
    r = run_cli("reconcile", "t", "--model", "chainfold.examples.counters", "--state", str(st), "--json",
                cwd=tmp_path)
    assert r.returncode == 2
    doc = json.loads(r.stdout)  # one JSON object, naming the file and the line
    assert doc["file"] == str(st) and doc["line"] == 2 and doc["error"].startswith(f"{st}:2: bad JSON")


def test_pip_install_is_quiet_about_the_license() -> None:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["project"]["license"] == "Apache-2.0"  # an SPDX expression, not a deprecated table
    req = next(r for r in meta["build-system"]["requires"] if r.startswith("setuptools"))
    assert req == "setuptools>=77"  # the first setuptools that reads SPDX license strings


@pytest.mark.broker
def test_demo_fits_a_100_column_terminal(cli, tmp_path: Path) -> None:
    wd = tmp_path / "demo"
    r = cli("demo", "--events", "2000", "--streams", "40", "--seed", "5", "--workdir", str(wd),
            env={"COLUMNS": "100"}, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert max(len(x) for x in lines) <= 100, [x for x in lines if len(x) > 100]
    assert not any(x.lstrip().startswith('{"') for x in lines)  # no JSON blobs for people
    assert "→" in r.stdout and "divergent streams" in r.stdout
    assert (wd / "reconcile-report.html").exists() and str(wd / "reconcile-report.html") in r.stdout


def test_decode_says_what_a_foreign_payload_is() -> None:
    from chainfold.errors import MalformedEnvelope

    for payload, reason in ((b"", "empty payload"), (b'{"id": 1}', "looks like JSON"), (b"plain", "looks like text")):
        with pytest.raises(MalformedEnvelope) as info:
            decode(payload)
        assert info.value.reason.startswith(reason)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))

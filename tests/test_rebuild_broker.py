"""rebuild on a real broker: 200k events, snapshots, a 20k tail read alone, corrupt snapshots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chainfold.examples import accounts
from chainfold.store.snapshots import SnapshotStore

from .conftest import unique_topic

pytestmark = [pytest.mark.broker, pytest.mark.slow]


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _rebuild(cli, topic: str, out: Path, *extra: str) -> dict:
    r = cli("rebuild", topic, "--model", "chainfold.examples.accounts", "--out", str(out), "--json", *extra,
            timeout=900)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_200k_then_20k_tail_equals_full_and_bad_snapshots_are_skipped(cli, tmp_path: Path) -> None:
    topic = unique_topic("rb")
    first = accounts.generate(200_000, 1000, 1)
    more = accounts.generate(20_000, 1000, 2)
    assert cli("publish", topic, str(_write(tmp_path / "a.jsonl", first)), timeout=900).returncode == 0
    r1 = _rebuild(cli, topic, tmp_path / "s1.json", "--snapshot-every", "50000", "--keep", "10")
    assert r1["replayed"]["events"] == 200_000 and len(r1["snapshots_written"]) == 4

    assert cli("publish", topic, str(_write(tmp_path / "b.jsonl", more)), timeout=900).returncode == 0
    tail = _rebuild(cli, topic, tmp_path / "tail.json", "--no-snapshots")
    assert tail["snapshot"]["entries"] == 200_000 and tail["replayed"] == {"from_snapshot": 200_000, "events": 20_000}
    full = _rebuild(cli, topic, tmp_path / "full.json", "--full", "--no-snapshots")
    assert full["replayed"]["events"] == 220_000
    expected = (tmp_path / "full.json").read_text()
    assert (tmp_path / "tail.json").read_text() == expected

    # independent fold of the generated events: the same states
    states: dict = {}
    for d in first + more:
        from chainfold.envelope import Event

        ev = Event(d["id"], d["stream"], None, d["type"], d["time"], d["data"])
        states[ev.stream] = accounts.apply(states.get(ev.stream, accounts.initial(ev.stream)), ev)
    assert json.loads(expected) == {s: accounts.render(v) for s, v in states.items()}

    # corrupt the newest snapshots one way each: truncated, one flipped byte; the next older is used
    store = SnapshotStore(tmp_path / "snapshots", f"persistent://public/default/{topic}")
    infos = store.list()
    assert [i.entries for i in infos[:4]] == [200_000, 150_000, 100_000, 50_000]
    data = infos[0].path.read_bytes()
    infos[0].path.write_bytes(data[: len(data) - 100])
    b = bytearray(infos[1].path.read_bytes())
    b[len(b) // 3] ^= 0x01
    infos[1].path.write_bytes(bytes(b))
    r = _rebuild(cli, topic, tmp_path / "r.json", "--no-snapshots")
    reasons = [x["reason"] for x in r["rejected_snapshots"]]
    assert len(reasons) == 2 and "truncated" in reasons[0] and "checksum" in reasons[1]
    assert r["snapshot"]["entries"] == 100_000 and r["replayed"]["events"] == 120_000
    assert (tmp_path / "r.json").read_text() == expected

    # a snapshot of another model's code is never used
    other = tmp_path / "other_model.py"
    other.write_text("from chainfold.examples.accounts import initial, apply, render\nversion = 'other'\n")
    r = cli("rebuild", topic, "--model", f"{other}", "--out", str(tmp_path / "o.json"), "--json", "--no-snapshots",
            timeout=900)
    doc = json.loads(r.stdout)
    assert doc["snapshot"] is None and any("other model code" in x["reason"] for x in doc["rejected_snapshots"])
    assert (tmp_path / "o.json").read_text() == expected

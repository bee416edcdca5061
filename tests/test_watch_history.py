"""``chainfold watch`` reports lost history (docs/cli.md#history) as it follows a log, on real brokers.

* seq gaps (both brokers): a foreign producer appends envelopes with the seqs it chooses, some
  missing, before and while watch follows the topic: one ``error`` line with ``history: "gaps"`` per
  gap, as verify's ``seq_gaps`` names it, when the entry is read; metrics agree; a watch restarted
  from its snapshot says the earlier gaps once (a count and the first) and no gap twice.
* lost entries (Apache Pulsar: its admin API truncates the first ledger): watch starting from a
  snapshot that covers the loss says so (``history: "truncated"``, verify's ``truncated`` entry)
  and follows on; with nothing covering it watch fails as rebuild does (exit 3, one ``error`` line)
  unless ``--allow-partial-history``; with nothing recorded at all, the seq check names every
  stream that starts late.

Every expectation comes from the events as written here.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest

from chainfold.envelope import Event
from chainfold.watch.live import WatchProcess

from .conftest import unique_topic
from .test_history import gen
from .test_history_broker import _in, _truncated_json, first_seq_gaps, publish, truncated  # noqa: F401 (fixture)

MODEL = "chainfold.examples.accounts"


def expected_gaps(held: list[Event], mids: list[str], start: int = 0) -> list[dict[str, Any]]:
    top: dict[str, int] = {}
    out = []
    for k, (ev, mid) in enumerate(zip(held, mids)):
        if ev.seq is None:
            continue
        if ev.seq > top.get(ev.stream, 0) + 1:
            out.append({"stream": ev.stream, "expected_seq": top.get(ev.stream, 0) + 1, "found_seq": ev.seq,
                        "message_id": mid, "index": start + k})
        top[ev.stream] = max(top.get(ev.stream, 0), ev.seq)
    return out


def gap_lines(w: WatchProcess) -> list[dict[str, Any]]:
    return [{k: x[k] for k in ("stream", "expected_seq", "found_seq", "message_id", "index")}
            for x in w.of("error") if x.get("history") == "gaps" and "seq_gaps_before" not in x]


def watch(tmp: Path, url: str, topic: str, *args: str, name: str = "watch") -> WatchProcess:
    return WatchProcess(topic, url, ["--model", MODEL, "--progress-seconds", "0.3", *args],
                        log_path=tmp / f"{name}.log", cwd=tmp).start()


def read_to(n: int):
    return lambda w: (w.last_progress() or {}).get("log_entries") == n


@pytest.mark.broker
def test_seq_gaps_are_reported_as_they_are_read(broker_url: str, pulsar_client, tmp_path: Path) -> None:
    topic = unique_topic("wgaps")
    evs = gen(600, 8)
    lost = {evs[5].id, evs[200].id, evs[450].id}  # a stream's first event, and two in the middle
    held = [e for e in evs if e.id not in lost]
    first, later = held[:300], held[300:]
    mids = publish(pulsar_client, topic, first)
    snaps = str(tmp_path / "snaps")
    w = watch(tmp_path, broker_url, topic, "--snapshots", snaps, "--metrics-port", "0")
    try:
        assert w.wait_for(read_to(300), 60), (tmp_path / "watch.log").read_text()
        mids += publish(pulsar_client, topic, later)  # a gap arrives while watch follows
        assert w.wait_for(read_to(len(held)), 60)
        want = expected_gaps(held, mids)
        assert len(want) >= 3 and gap_lines(w) == want
        line = next(x for x in w.of("error") if x.get("history") == "gaps")
        assert line["message"].startswith("events are missing from the log itself: stream ")
        import urllib.request
        assert w.metrics_url is not None
        text = urllib.request.urlopen(w.metrics_url, timeout=10).read().decode()
        assert f"chainfold_watch_seq_gaps_total {float(len(want))}" in text
        assert w.stop(signal.SIGTERM) == 0
    finally:
        w.kill()
    # restarted from its snapshot: the earlier gaps said once, as a count and the first; none twice
    mids += publish(pulsar_client, topic, [Event("late", "new-stream", 2, "Opened", 1, {"owner": "x"})])
    again = watch(tmp_path, broker_url, topic, "--snapshots", snaps, name="again")
    try:
        assert again.wait_for(read_to(len(held) + 1), 60), (tmp_path / "again.log").read_text()
        before = [x for x in again.of("error") if "seq_gaps_before" in x]
        assert len(before) == 1 and before[0]["seq_gaps_before"] == len(want)
        assert before[0]["message_id"] == want[0]["message_id"]
        assert gap_lines(again) == [{"stream": "new-stream", "expected_seq": 1, "found_seq": 2,
                                     "message_id": mids[-1], "index": len(held)}]
        assert again.stop(signal.SIGTERM) == 0
    finally:
        again.kill()


def the_history_line(tmp: Path, topic: str, *args: str, name: str) -> dict[str, Any]:
    """Watch ``topic`` until it read all 5,500 entries (at their recorded positions); its one
    history line (after SIGTERM, exit 0)."""
    import os

    w = watch(tmp, os.environ["CHAINFOLD_TEST_SERVICE_URL"], topic, *args, name=name)
    try:
        assert w.wait_for(read_to(5500), 120), (tmp / f"{name}.log").read_text()
        lines = [x for x in w.of("error") if x.get("history")]
        assert len(lines) == 1 and lines[0]["history"] == "truncated"  # and no seq gap: the loss is known
        assert w.stop(signal.SIGTERM) == 0
        return lines[0]
    finally:
        w.kill()


@pytest.mark.apache
def test_watch_from_a_snapshot_that_covers_lost_entries(truncated, tmp_path: Path) -> None:  # noqa: F811
    t = truncated
    snaps = _in(tmp_path, t, snapshots=True)
    line = the_history_line(tmp_path, t["topic"], "--snapshots", snaps, name="watch")
    assert line["truncated"] == _truncated_json(t, snaps, 5000) and line["message_id"] == t["mids"][2500]
    assert "watch continues from the snapshot that covers the loss" in line["message"]


@pytest.mark.apache
def test_watch_over_lost_entries_nothing_covers(truncated, tmp_path: Path) -> None:  # noqa: F811
    import os

    t = truncated
    bare = _in(tmp_path, t, snapshots=False)
    w = watch(tmp_path, os.environ["CHAINFOLD_TEST_SERVICE_URL"], t["topic"], "--snapshots", bare)
    assert w.wait(120) == 3
    assert [x["kind"] for x in w.lines] == ["error"]
    err = w.lines[0]
    assert err["message"].startswith("history is gone and no valid snapshot covers the gap")
    assert err["history"] == "truncated" and err["message_id"] == t["mids"][2500]

    line = the_history_line(tmp_path, t["topic"], "--snapshots", bare, "--allow-partial-history", name="partial")
    assert line["truncated"] == dict(_truncated_json(t, None, 2500), covered_by_snapshot=None)
    assert "followed from where the log starts now" in line["message"]


@pytest.mark.apache
def test_watch_without_a_record_names_every_stream_that_starts_late(truncated, tmp_path: Path) -> None:  # noqa: F811
    import os

    t = truncated
    url = os.environ["CHAINFOLD_TEST_SERVICE_URL"]
    held, mids = t["events"][2500:], t["mids"][2500:]
    want = [dict(g, index=k) for g, k in zip(first_seq_gaps(held, mids), (
        next(i for i, (e, m) in enumerate(zip(held, mids)) if m == g["message_id"]) for g in first_seq_gaps(held, mids)))]
    w = watch(tmp_path, url, t["topic"], "--snapshots", str(tmp_path / "empty"))
    try:
        assert w.wait_for(read_to(3000), 120), (tmp_path / "watch.log").read_text()
        assert want and gap_lines(w) == want
        assert w.stop(signal.SIGTERM) == 0
    finally:
        w.kill()

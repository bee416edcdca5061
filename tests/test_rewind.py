"""rewind's library parts on the in-memory log: finding entry INDEX (with and without the recorded
checkpoints), the first divergence from Tracker evidence, ``--to`` parsing. The whole command, with
a real subscription and the real worker, is in ``test_rewind_broker.py``."""

from __future__ import annotations

from pathlib import Path

import pytest

from chainfold.errors import BadInput
from chainfold.replay.model import load_model
from chainfold.log import MemoryLog, MessageId
from chainfold.ops.rebuild import rebuild
from chainfold.ops.rewind import divergence_index, locate, parse_to
from chainfold.tracker import Tracker

from .test_reconcile import build

MODEL = load_model("chainfold.examples.accounts")


def test_locate_with_and_without_the_record(tmp_path: Path) -> None:
    w = build(3000, 10, seed=2)
    mids = [MessageId.parse(m) for *_, m in w.entries]
    bare = {i: locate(w.log, i, snapshots_root=tmp_path / "none") for i in (0, 1, 1023, 1024, 2500, len(mids) - 1)}
    rebuild(w.log, MODEL, snapshots_root=tmp_path / "s")  # records checkpoints (segment firsts)
    for i, t in bare.items():
        assert locate(w.log, i, snapshots_root=tmp_path / "s") == t
        assert t.requested == t.batch_start == i and t.message_id == mids[i]  # the memory log does not batch
        assert t.in_batch == 0 and t.entry == mids[i]._replace(batch=-1)
        assert t.before(i) == (mids[i - 1] if i else None)


def test_locate_refuses_what_the_log_does_not_hold(tmp_path: Path) -> None:
    w = build(50, 3, seed=2)
    with pytest.raises(BadInput, match="has 50 entries"):
        locate(w.log, 50, snapshots_root=tmp_path)
    with pytest.raises(BadInput, match="0 or more"):
        locate(w.log, -1, snapshots_root=tmp_path)
    with pytest.raises(BadInput, match="partitions"):
        locate(MemoryLog("p", partitions=2), 0, snapshots_root=tmp_path)


def test_first_divergence_from_tracker_evidence(tmp_path: Path) -> None:
    w = build(400, 6, seed=4)
    skipped = w.events[123].id
    ev = tmp_path / "evidence"
    tracker = Tracker(ev, processed_log=True)
    for kind, e, payload, mid in w.entries:
        if kind == "event" and e.id != skipped:
            tracker.handled(payload, mid, e.id)
    tracker.close()
    fd = divergence_index(w.log, MODEL, snapshots_root=tmp_path / "s", evidence=ev)
    assert fd["index"] == 123 and fd["event_id"] == skipped
    (ev / "processed.jsonl").unlink()  # the checkpoints alone name the same entry
    assert divergence_index(w.log, MODEL, snapshots_root=tmp_path / "s", evidence=ev)["index"] == 123
    with pytest.raises(BadInput, match="no Tracker evidence"):
        divergence_index(w.log, MODEL, snapshots_root=tmp_path / "s", evidence=tmp_path)


def test_parse_to() -> None:
    assert parse_to("17") == 17 and parse_to("divergence:ev/dir") == "ev/dir"
    for bad in ("divergence:", "x", "1.5"):
        with pytest.raises(BadInput):
            parse_to(bad)

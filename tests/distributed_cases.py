"""Shared by the distributed engine's tests (in-process cluster: test_distributed.py; Spark:
test_spark_engine.py): logs with faults, the local and distributed runs of one command, and how
their outputs are compared (byte for byte, timings removed)."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from chainfold.envelope import Event, encode, event_from_json
from chainfold.examples import accounts
from chainfold.log import EventLog
from chainfold.store import codec
from chainfold.store.snapshots import topic_dir

MODEL = "chainfold.examples.accounts"

POISON_MODEL = '''
"""Counts events per stream; fails on events whose data says so (a poison event)."""
version = "1"


def initial(stream):
    return {"n": 0}


def apply(state, event):
    if event.data.get("poison"):
        raise ValueError(f"cannot fold {event.id}")
    return {"n": state["n"] + 1}
'''


def events(n: int = 3000, streams: int = 40, seed: int = 5) -> list[Event]:
    return [event_from_json(d) for d in accounts.generate(n, streams, seed)]


def messy(log: EventLog, n: int = 3000, seed: int = 5) -> list[Event]:
    """Accounts events with faults: duplicates of earlier events (keyed and keyless), malformed
    entries (keyed, keyless), events without ``seq``; returns the events."""
    evs = events(n, seed=seed)
    half = n // 2
    log.append(evs[:half])
    log.append(evs[10:20], assign_seq=False)
    log.append_payloads([
        (b"\xa1\x62id\x61x", "acct-0001", None),
        (b"not cbor at all", None, None),
        (encode(evs[30]), None, None),
        (b"\x01", "acct-0002", 1),
    ])
    log.append(evs[half:-5])
    log.append_payloads((encode(ev._replace(seq=None)), ev.stream, ev.time) for ev in evs[-5:])
    return evs


_SNAP = re.compile(r"snap-(\d+)(?:-\d+)*\.cbor$")
_SNAP_ANYWHERE = re.compile(r"snap-(\d+)-\d+(?:-\d+)?\.cbor")


def normalized(doc: dict[str, Any], roots: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A report without what differs between any two runs: ``seconds``; a snapshot file's creation
    time (in its name) and folder; the redeliveries a reader happened to drop; each store's root
    (``roots``: replaced by ``ROOT``)."""
    text = json.dumps(doc, sort_keys=True)
    for r in roots:
        text = text.replace(str(r), "ROOT")
    text = _SNAP_ANYWHERE.sub(r"snap-\1.cbor", text)
    d = json.loads(text)
    d.pop("seconds", None)
    d.pop("redeliveries_dropped", None)

    def name(path: str) -> str:
        m = _SNAP.search(path)
        return m.group(1) if m else path

    if isinstance(d.get("snapshots_written"), list):
        d["snapshots_written"] = [name(p) for p in d["snapshots_written"]]
    if isinstance(d.get("snapshot"), dict):
        d["snapshot"]["path"] = name(d["snapshot"]["path"])
    for r in d.get("rejected_snapshots") or []:
        r["path"] = name(r["path"])
    return d


def record_files(root: Path, topic: str) -> dict[str, bytes]:
    """The topic's recorded checkpoints and leaf hashes, by file name."""
    d = topic_dir(root, topic)
    if not d.exists():
        return {}
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.name.startswith(("checkpoints", "leaves"))}


def snapshot_bodies(root: Path, topic: str) -> list[dict[str, Any]]:
    """Every snapshot's body (checked), ``created`` removed, by coverage."""
    d = topic_dir(root, topic)
    out = []
    for p in sorted(d.glob("snap-*.cbor")) if d.exists() else []:
        body = dict(codec.open_body(p.read_bytes()))
        body.pop("created")
        out.append(body)
    return out


def dedup_pieces(root: Path, topic: str) -> list[str]:
    """The names of the pieces in the topic's dedup folder (what the snapshots' manifests name,
    and nothing else once the sink has collected the garbage), and anything else left there."""
    d = topic_dir(root, topic) / "dedup"
    return sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.name != ".lock") if d.exists() else []


def assert_same_store(a: Path, b: Path, topic: str) -> None:
    """Two stores hold the same record files, the same snapshots (``created`` aside; their dedup
    manifests name pieces by SHA-256) and the same dedup pieces."""
    ra, rb = record_files(a, topic), record_files(b, topic)
    assert ra.keys() == rb.keys()
    for k in ra:
        assert ra[k] == rb[k], f"{k} differs"
    assert snapshot_bodies(a, topic) == snapshot_bodies(b, topic)
    assert dedup_pieces(a, topic) == dedup_pieces(b, topic)


def copy_store(src: Path, dst: Path) -> Path:
    if dst.exists():
        shutil.rmtree(dst)
    if src.exists():
        shutil.copytree(src, dst)
    else:
        dst.mkdir(parents=True)
    return dst


def twice(local: Callable[[Path], Any], distributed: Callable[[Path], Any], roots: tuple[Path, Path]) -> tuple[Any, Any]:
    """Run the same command locally in store ``roots[0]`` and distributed in ``roots[1]`` (each
    store then holds what its engine wrote)."""
    return local(roots[0]), distributed(roots[1])

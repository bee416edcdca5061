"""The seq index: each stream's highest ``seq`` as of a known position of the log, so that a publish
reads only the log's tail to number its events (docs/formats.md: ``seq`` is gapless per stream).

The index is one small JSON file (``seqs.json``) in the topic's folder of the snapshot store
(``--snapshots DIR``, the folder :func:`chainfold.store.snapshots.topic_dir` names)::

    {"format": "chainfold-seq-index/1",
     "topic": "persistent://public/default/NAME",
     "partitions": {"<partition>": {"message_id": "ledger:entry:partition:batch",
                                    "payload_sha256": "<hex of that entry's payload>"}},
     "streams": {"<stream>": <highest seq in the log up to those positions>}}

It is trusted only after a check against the log: for every partition it names, the entry at its
message id must still be there with the same payload (retention, a truncated or re-created topic, or
another log under the same name fail this). Then entries after those positions (the tail: what was
appended since) are read forward. A missing, unreadable or failing index falls back to reading the
whole log, and says why in the log. Memory is O(streams); time O(tail).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..envelope import Event, decode
from ..errors import MalformedEnvelope
from . import EventLog, MessageId

__all__ = ["SeqIndex", "SeqState", "read_forward", "FORMAT", "FILE_NAME"]

log = logging.getLogger("chainfold.log.seqindex")

FORMAT = "chainfold-seq-index/1"
FILE_NAME = "seqs.json"


@dataclass
class SeqState:
    """Highest seq per stream over the log up to ``positions`` (per partition: message id and
    payload SHA-256 of the last entry read; absent for a partition read while empty)."""

    streams: dict[str, int] = field(default_factory=dict)
    positions: dict[str, tuple[str, str]] = field(default_factory=dict)
    tail: int = 0
    """Entries read to bring the state up to date (the whole log when the index was not used)."""
    source: str = "scan"
    """``index`` (checked, then the tail read) or ``scan`` (the whole log read)."""


class SeqIndex:
    """The seq index of one topic in ``directory`` (the topic's snapshot folder); ``None``: no index
    (:meth:`current` then reads the whole log)."""

    def __init__(self, directory: str | Path | None) -> None:
        self.path = Path(directory) / FILE_NAME if directory is not None else None

    @classmethod
    def none(cls) -> "SeqIndex":
        return cls(None)

    def load(self, topic: str) -> SeqState | None:
        """The stored state, or None (with the reason logged) if absent or not this topic's."""
        if self.path is None:
            return None
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.info("seq index %s unreadable (%s): reading the whole log", self.path, exc)
            return None
        try:
            if doc["format"] != FORMAT or doc["topic"] != topic:
                raise ValueError(f"format {doc.get('format')!r}, topic {doc.get('topic')!r}")
            positions = {p: (str(v["message_id"]), str(v["payload_sha256"])) for p, v in doc["partitions"].items()}
            streams = {str(s): int(n) for s, n in doc["streams"].items()}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            log.info("seq index %s not usable (%s): reading the whole log", self.path, exc)
            return None
        return SeqState(streams, positions, source="index")

    def save(self, topic: str, state: SeqState) -> None:
        """Write ``state`` crash-safely (a torn write leaves the previous index or none)."""
        from ..store.atomic import atomic_write

        if self.path is None:
            return
        doc = {
            "format": FORMAT,
            "topic": topic,
            "partitions": {p: {"message_id": m, "payload_sha256": h} for p, (m, h) in sorted(state.positions.items())},
            "streams": state.streams,
        }
        atomic_write(self.path, json.dumps(doc, separators=(",", ":"), sort_keys=True).encode("utf-8"))

    def current(self, elog: EventLog) -> SeqState:
        """The highest seq per stream of ``elog`` now: the stored state if the log still holds its
        positions, brought up to date by reading the tail; else a read of the whole log."""
        state = self.load(elog.topic)
        if state is not None:
            bad = _check_positions(elog, state)
            if bad is None:
                return read_forward(elog, state)
            log.info("seq index %s does not match the log (%s): reading the whole log", self.path, bad)
        return read_forward(elog, SeqState())


def _check_positions(elog: EventLog, state: SeqState) -> str | None:
    """Why the log does not hold the state's positions (None when it does)."""
    parts = set(elog.partitions())
    for part, (mid, sha) in state.positions.items():
        if part not in parts:
            return f"no partition {part}"
        entry = next(iter(elog.read(part, start=MessageId.parse(mid), limit=1)), None)
        if entry is None or str(entry.message_id) != mid:
            return f"{part} no longer holds entry {mid}"
        if hashlib.sha256(entry.payload).hexdigest() != sha:
            return f"{part}: entry {mid} is not the one indexed"
    return None


def read_forward(elog: EventLog, state: SeqState | None = None,
                 each: Callable[[Event], None] | None = None) -> SeqState:
    """``state`` (default: nothing read yet) brought up to the end of every partition by reading
    the entries after its positions; ``each`` is called with every well-formed event read."""
    state = state or SeqState()
    streams = dict(state.streams)
    positions = dict(state.positions)
    tail = 0
    for part in elog.partitions():
        after = MessageId.parse(positions[part][0]) if part in positions else None
        last = None
        for entry in elog.read(part, after=after):
            tail += 1
            last = entry
            try:
                ev = decode(entry.payload)
            except MalformedEnvelope:
                continue
            if each is not None:
                each(ev)
            if ev.seq is not None and ev.seq > streams.get(ev.stream, 0):
                streams[ev.stream] = ev.seq
        if last is not None:
            positions[part] = (str(last.message_id), hashlib.sha256(last.payload).hexdigest())
    return SeqState(streams, positions, tail, state.source)

"""Fresh evidence for a repaired worker: what a correct worker would have left behind.

After ``reconcile --repair``, the worker's processed log and tracker checkpoints still describe its
faulty handling; a worker that resumed with the repaired state and kept appending to them would be
reported divergent at the same place forever. :func:`write_reference_evidence` writes, into a new
directory, the evidence of a correct worker that handled the log's first ``entries`` entries: the
reference sequence (well-formed entries in log order, each event id once, at its first entry),
through :class:`~chainfold.tracker.Tracker` itself, so the worker can reopen a Tracker on it and go
on. See docs/incidents.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..envelope import decode
from ..errors import BadInput, MalformedEnvelope
from ..log import EventLog
from ..tracker import Tracker

__all__ = ["write_reference_evidence"]


def write_reference_evidence(elog: EventLog, directory: str | Path, *, entries: int,
                             segment_size: int = 1024) -> dict[str, Any]:
    """Write the reference handling of ``elog``'s first ``entries`` entries as tracker evidence in
    ``directory`` (which must not hold evidence already). Returns ``{"dir", "events", "entries",
    "resume_after"}``: ``resume_after`` is the message id of the last entry covered, the one after
    which the repaired worker must resume.

    Raises :class:`BadInput` for a partitioned topic (a tracker follows one partition) or a
    directory that already holds evidence, and when the log holds fewer than ``entries`` entries.
    """
    parts = elog.partitions()
    if len(parts) != 1:
        raise BadInput(f"{elog.topic} is partitioned: fresh tracker evidence is written for one partition only")
    d = Path(directory)
    if d.exists() and any(d.iterdir()):
        raise BadInput(f"{d} is not empty: fresh evidence goes into a new directory (keep the old one with the incident)")
    seen: set[str] = set()
    read = events = 0
    last = None
    with Tracker(d, segment_size=segment_size) as tracker:
        for entry in elog.read(parts[0], limit=entries):
            read += 1
            last = entry.message_id
            try:
                eid = decode(entry.payload).id
            except MalformedEnvelope:
                continue  # a correct worker does not handle a malformed entry
            if eid in seen:
                continue  # nor a second copy of an event id
            seen.add(eid)
            tracker.handled(entry.payload, entry.message_id, eid)
            events += 1
    if read < entries:
        raise BadInput(f"{elog.topic} holds {read} entries, fewer than the {entries} reconciled")
    return {"dir": str(d), "events": events, "entries": read, "resume_after": str(last) if last else None}

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

from ..errors import BadInput
from ..log import EventLog
from ..log.source import Source, Span
from ..replay.decode import Decoder
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
    decoder = Decoder()  # the reference: no malformed entry, each event id once (at its first entry)
    read = events = 0
    last = None
    with Tracker(d, segment_size=segment_size) as tracker:
        for batch in Source(elog, Span(parts[0], limit=entries)):
            decoded = decoder.feed(batch, read)
            read += len(batch)
            last = batch[-1].message_id
            for j, ev in enumerate(decoded.events):
                tracker.handled(decoded.payload(j), decoded.message_id(j), ev.id)
            events += len(decoded.events)
    if read < entries:
        raise BadInput(f"{elog.topic} holds {read} entries, fewer than the {entries} reconciled")
    return {"dir": str(d), "events": events, "entries": read, "resume_after": str(last) if last else None}

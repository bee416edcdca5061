"""Where the entries a reconcile report lists sit in the log: the report's ``positions`` detail.

The report's lists name events by id (``missing``, ``duplicates``, ``out_of_order``) and malformed
entries by message id. ``positions`` adds, for each item of those lists and in the same order, its
log index (0-based, every entry counted: the index ``first_divergence`` uses), so that a reader can
draw the log and mark where each one sits (``reconcile --html``). For a partitioned topic each
position is ``[partition number, index in that partition]``; ``partitions`` and ``entries`` name the
partitions and their sizes, ``segment_size`` the log's segment size.

``stored_again`` lists the later copies of event ids the log holds more than once (the first copy is
the one folded; ``duplicates`` gives its position).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ..replay.decode import Duplicate, Malformed

__all__ = ["report_positions"]


def report_positions(
    *,
    partitions: Sequence[str],
    entries: Sequence[int],
    segment_size: int,
    locate: Callable[[str], tuple[int, int] | None],
    missing: Sequence[str],
    duplicates: Sequence[str],
    out_of_order: Sequence[str],
    malformed: Sequence[tuple[int, Malformed]],
    stored_again: Sequence[tuple[int, Duplicate]],
) -> dict[str, Any]:
    """The ``positions`` detail. ``locate(event_id)`` gives ``(partition number, index)`` of the
    event's first entry (None if the log does not hold it); ``malformed`` and ``stored_again`` are
    the decode stage's records with the number of their partition (their ``index`` is the position
    in that partition)."""
    single = len(partitions) == 1

    def pos(where: tuple[int, int] | None) -> Any:
        if where is None:
            return None
        return where[1] if single else [where[0], where[1]]

    def of_entry(k: int, index: int) -> Any:
        return index if single else [k, index]

    return {
        "segment_size": segment_size,
        "partitions": list(partitions),
        "entries": list(entries),
        "missing": [pos(locate(e)) for e in missing],
        "duplicates": [pos(locate(e)) for e in duplicates],
        "out_of_order": [pos(locate(e)) for e in out_of_order],
        "malformed": [of_entry(k, m.index) for k, m in malformed],
        "stored_again": [{"index": of_entry(k, d.index), "event_id": d.event_id,
                          "message_id": d.message_id} for k, d in stored_again],
    }

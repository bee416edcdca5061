"""JSON Lines in and out: the events file of ``publish`` and the entries of ``read``.

Inputs are validated whole before anything is done with them: one bad line refuses the file,
naming the line and the reason (:class:`~chainfold.errors.MalformedInputLine`). A file too large
for memory is checked in a first pass that holds nothing but its event ids, sorted on disk
(:func:`check_events_file`), and read again to be sent (:func:`iter_checked_events`).
"""

from __future__ import annotations

import base64
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

from .envelope import Event, decode, event_from_json, event_to_json, parse_json_line
from .errors import BadInput, MalformedEnvelope, MalformedInputLine
from .log import Entry
from .sortedruns import SortedRuns

__all__ = ["open_input", "iter_json_lines", "read_events", "entry_to_json", "CheckedFile", "check_events_file",
           "iter_checked_events"]


def open_input(path: str) -> IO[str]:
    """Open a text input; ``-`` is stdin. Raises :class:`BadInput` if it cannot be read."""
    if path == "-":
        return sys.stdin
    try:
        return open(path, encoding="utf-8")
    except OSError as exc:
        raise BadInput(f"cannot read {path}: {exc.strerror}") from None


def iter_json_lines(path: str, *, name: str | None = None) -> Iterator[tuple[int, Any]]:
    """``(line number, parsed value)`` for each non-blank line; bad JSON raises MalformedInputLine
    (naming the file as ``name``, default the path or ``<stdin>``)."""
    f = open_input(path)
    name = name or ("<stdin>" if path == "-" else path)
    try:
        for lineno, text in enumerate(f, 1):
            if not text.strip():
                continue
            yield lineno, parse_json_line(text, path=name, line=lineno)
    except UnicodeDecodeError as exc:
        raise MalformedInputLine(name, 0, f"not UTF-8 text: {exc.reason}") from None
    finally:
        if f is not sys.stdin:
            f.close()


def read_events(path: str) -> tuple[list[Event], list[int]]:
    """Validate a JSON Lines events file (``publish``, docs/cli.md); return the events and their line numbers.

    Refused whole on the first bad line: bad JSON, missing or mistyped keys, or an ``id`` that
    already appeared earlier in the file (both lines named).
    """
    name = "<stdin>" if path == "-" else path
    now = int(time.time() * 1000)
    events: list[Event] = []
    lines: list[int] = []
    first_line: dict[str, int] = {}
    for lineno, obj in iter_json_lines(path):
        ev = event_from_json(obj, path=name, line=lineno, now_ms=now)
        if ev.id in first_line:
            raise MalformedInputLine(name, lineno, f"duplicate id {ev.id!r} (first on line {first_line[ev.id]})")
        first_line[ev.id] = lineno
        events.append(ev)
        lines.append(lineno)
    return events, lines


@dataclass
class CheckedFile:
    """An events file that passed :func:`check_events_file`. ``path`` is what the second pass reads
    (stdin is spooled to a temp file, removed by :meth:`close`); ``ids`` holds ``(id, line)`` of every
    event, sorted on disk."""

    name: str
    path: str
    events: int
    now_ms: int
    ids: SortedRuns
    stat: tuple[int, int] | None = None
    spooled: bool = False

    def close(self) -> None:
        self.ids.close()
        if self.spooled:
            try:
                os.unlink(self.path)
            except OSError:
                pass

    def __enter__(self) -> "CheckedFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _first_duplicate(ids: SortedRuns) -> tuple[int, str, int] | None:
    """``(line, id, first line)`` of the earliest line repeating an earlier line's id, if any."""
    best: tuple[int, str, int] | None = None
    prev_key, prev_line = None, 0
    for key, line in ids.merged():
        if key == prev_key:
            if best is None or line < best[0]:
                best = (line, key.decode("utf-8"), prev_line)
        else:
            prev_key, prev_line = key, line
    return best


def check_events_file(path: str, *, run_size: int = 100_000) -> CheckedFile:
    """First pass over a JSON Lines events file (docs/cli.md ``publish``; ``-`` is stdin): every line
    validated, events counted, ids checked unique. Memory does not grow with the file: ids go to
    sorted runs on disk (:class:`~chainfold.sortedruns.SortedRuns`). Refused whole on the first bad
    line (:class:`MalformedInputLine`): bad JSON, missing or mistyped keys, or an ``id`` that appeared
    on an earlier line (both lines named)."""
    name = "<stdin>" if path == "-" else path
    now = int(time.time() * 1000)
    ids = SortedRuns(run_size)
    spool = None
    try:
        source = path
        if path == "-":  # stdin cannot be read twice: keep a copy for the second pass
            spool = tempfile.NamedTemporaryFile("wb", prefix="chainfold-publish-", suffix=".jsonl", delete=False)
            shutil.copyfileobj(sys.stdin.buffer, spool, 1 << 20)
            spool.close()
            source = spool.name
        stat = None if spool else _stat(path)
        n = 0
        try:
            for lineno, obj in iter_json_lines(source, name=name):
                ev = event_from_json(obj, path=name, line=lineno, now_ms=now)
                ids.add(ev.id.encode("utf-8"), lineno)
                n += 1
        except MalformedInputLine as bad:
            dup = _first_duplicate(ids)
            if dup is not None and dup[0] < bad.line:
                raise MalformedInputLine(name, dup[0], f"duplicate id {dup[1]!r} (first on line {dup[2]})") from None
            raise
        dup = _first_duplicate(ids)
        if dup is not None:
            raise MalformedInputLine(name, dup[0], f"duplicate id {dup[1]!r} (first on line {dup[2]})")
        return CheckedFile(name, source, n, now, ids, stat, spooled=spool is not None)
    except BaseException:
        ids.close()
        if spool is not None:
            os.unlink(spool.name)
        raise


def _stat(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns) if os.path.isfile(path) else None


def iter_checked_events(checked: CheckedFile) -> Iterator[tuple[int, Event]]:
    """Second pass: ``(line, event)`` of a checked file, in file order. Raises :class:`BadInput` if the
    file changed since it was checked (size or modification time)."""
    if checked.stat is not None and _stat(checked.path) != checked.stat:
        raise BadInput(f"{checked.name} changed since it was checked: nothing more is sent")
    for lineno, obj in iter_json_lines(checked.path, name=checked.name):
        yield lineno, event_from_json(obj, path=checked.name, line=lineno, now_ms=checked.now_ms)


def entry_to_json(entry: Entry, *, topic: str | None = None, raw: bool = False) -> dict[str, Any]:
    """One entry as ``chainfold read`` prints it (like kcat -J): metadata plus the event, or the
    reason it is malformed and its payload in base64 (with ``raw``, every entry's payload)."""
    out: dict[str, Any] = {}
    if topic is not None:
        out["topic"] = topic
    mid = entry.message_id
    out.update(
        message_id=str(mid),
        partition=mid.partition,
        key=entry.key,
        publish_time=entry.publish_time,
        event_time=entry.event_time,
        size=len(entry.payload),
    )
    try:
        out["event"] = event_to_json(decode(entry.payload))
    except MalformedEnvelope as exc:
        out["malformed"] = exc.reason
        raw = True
    if raw:
        out["payload_base64"] = base64.b64encode(entry.payload).decode()
    return out

"""JSON Lines in and out: the events file of ``publish`` and the entries of ``read``.

Inputs are validated whole before anything is done with them: one bad line refuses the file,
naming the line and the reason (:class:`~chainfold.errors.MalformedInputLine`).
"""

from __future__ import annotations

import base64
import sys
import time
from collections.abc import Iterator
from typing import IO, Any

from .envelope import Event, decode, event_from_json, event_to_json, parse_json_line
from .errors import BadInput, MalformedEnvelope, MalformedInputLine
from .log import Entry

__all__ = ["open_input", "iter_json_lines", "read_events", "entry_to_json"]


def open_input(path: str) -> IO[str]:
    """Open a text input; ``-`` is stdin. Raises :class:`BadInput` if it cannot be read."""
    if path == "-":
        return sys.stdin
    try:
        return open(path, encoding="utf-8")
    except OSError as exc:
        raise BadInput(f"cannot read {path}: {exc.strerror}") from None


def iter_json_lines(path: str) -> Iterator[tuple[int, Any]]:
    """``(line number, parsed value)`` for each non-blank line; bad JSON raises MalformedInputLine."""
    f = open_input(path)
    name = "<stdin>" if path == "-" else path
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
    """Validate a JSON Lines events file (SPEC §4 ``publish``); return the events and their line numbers.

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

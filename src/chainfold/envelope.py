"""Where bytes become events: the format-1 event envelope of docs/formats.md.

One event is one Pulsar message whose payload is a CBOR map in deterministic encoding
(RFC 8949 §4.2.1). :func:`encode` always produces the same bytes for the same event;
:func:`decode` accepts any CBOR map with the required keys and types and raises
:class:`~chainfold.errors.MalformedEnvelope` for anything else, saying what is wrong.
"""

from __future__ import annotations

import io
import json
import threading
import time as _time
from typing import Any, NamedTuple

import cbor2

from .errors import MalformedEnvelope, MalformedInputLine

__all__ = ["FORMAT", "Event", "encode", "decode", "event_from_json", "event_to_json"]

FORMAT = 1
_MAX_UINT64 = (1 << 64) - 1

_dumps = cbor2.dumps
_load = cbor2.load
_BytesIO = io.BytesIO
_new_event = tuple.__new__
_local = threading.local()


def _decoder() -> cbor2.CBORDecoder:
    dec = _local.__dict__.get("dec")
    if dec is None:
        dec = _local.dec = cbor2.CBORDecoder(io.BytesIO(b""), allow_duplicate_keys=False)
    return dec


class Event(NamedTuple):
    """One event, as a model sees it (docs/formats.md, docs/models.md). Immutable.

    ``seq`` is the 1-based position in its stream; ``None`` when a foreign producer did not set it.
    ``time`` is milliseconds since the Unix epoch.
    """

    id: str
    stream: str
    seq: int | None
    type: str
    time: int
    data: dict[Any, Any]


def encode(event: Event) -> bytes:
    """The canonical CBOR payload of ``event``: equal events always give equal bytes."""
    m: dict[str, Any] = {
        "id": event.id,
        "stream": event.stream,
        "type": event.type,
        "time": event.time,
        "data": event.data,
    }
    if event.seq is not None:
        m["seq"] = event.seq
    return _dumps(m, canonical=True)


def _is_uint(v: object) -> bool:
    return type(v) is int and 0 <= v <= _MAX_UINT64  # bool is not an integer here


def decode(payload: bytes) -> Event:
    """Decode one payload; raise :class:`MalformedEnvelope` (without message id) if it is not one.

    Keys other than those of the envelope (docs/formats.md) are tolerated and ignored. Bytes after the map, and a key
    repeated inside it, make the payload malformed.
    """
    # The hot path of every replay: one C call decodes, the checks are one expression, and the
    # event is built without the named tuple's Python-level constructor. Anything unusual goes to
    # :func:`_decode_checked`, which says what is wrong.
    fp = _BytesIO(payload)
    try:
        m = _load(fp, allow_duplicate_keys=False)
    except Exception:
        return _decode_checked(payload)
    if type(m) is dict and fp.tell() == len(payload):
        try:
            eid = m["id"]
            stream = m["stream"]
            etype = m["type"]
            etime = m["time"]
            data = m["data"]
        except KeyError:
            return _decode_checked(payload)
        seq = m.get("seq")
        if (type(eid) is str and eid and type(stream) is str and stream and type(etype) is str and etype
                and type(etime) is int and 0 <= etime <= _MAX_UINT64 and type(data) is dict
                and (seq is None or (type(seq) is int and 1 <= seq <= _MAX_UINT64))):
            return _new_event(Event, (eid, stream, seq, etype, etime, data))
    return _decode_checked(payload)


def _decode_checked(payload: bytes) -> Event:
    """:func:`decode` the slow way, naming what is wrong with a malformed payload."""
    if not payload:
        raise MalformedEnvelope("empty payload")
    dec = _local.__dict__.get("dec") or _decoder()
    fp = dec.fp = _BytesIO(payload)
    try:
        m = dec.decode()
    except Exception as exc:  # cbor2 raises several types, and ValueError/TypeError/etc.
        raise MalformedEnvelope(_foreign(payload) or f"not CBOR: {exc}") from None
    if fp.tell() != len(payload) or type(m) is not dict:
        foreign = _foreign(payload)
        if foreign:
            raise MalformedEnvelope(foreign)
    if fp.tell() != len(payload):
        raise MalformedEnvelope(f"{len(payload) - fp.tell()} byte(s) after the CBOR item")
    if type(m) is not dict:
        raise MalformedEnvelope(f"not a CBOR map but {type(m).__name__}")
    try:
        eid = m["id"]
        stream = m["stream"]
        etype = m["type"]
        etime = m["time"]
        data = m["data"]
    except KeyError as exc:
        raise MalformedEnvelope(f"missing key {exc.args[0]!r}") from None
    seq = m.get("seq")
    if type(eid) is not str or not eid:
        raise MalformedEnvelope("'id' must be non-empty text")
    if type(stream) is not str or not stream:
        raise MalformedEnvelope("'stream' must be non-empty text")
    if type(etype) is not str or not etype:
        raise MalformedEnvelope("'type' must be non-empty text")
    if not _is_uint(etime):
        raise MalformedEnvelope("'time' must be an unsigned integer (ms since the epoch)")
    if type(data) is not dict:
        raise MalformedEnvelope("'data' must be a map")
    if seq is not None and not (_is_uint(seq) and seq >= 1):
        raise MalformedEnvelope("'seq' must be an unsigned integer >= 1")
    return Event(eid, stream, seq, etype, etime, data)


def _foreign(payload: bytes) -> str | None:
    """What a payload that is not a CBOR envelope looks like, when it is recognisably something else
    (JSON or plain text, as a producer that does not use chainfold's writer sends); else None."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        return None
    stripped = text.strip()
    try:
        json.loads(stripped)
    except ValueError:
        pass
    else:
        return "looks like JSON, expected a CBOR map (the event envelope, docs/formats.md)"
    if stripped and stripped.isprintable():
        preview = stripped if len(stripped) <= 40 else stripped[:39] + "…"
        return f"looks like text ({preview!r}), expected a CBOR map (the event envelope, docs/formats.md)"
    return None


def json_error(exc: json.JSONDecodeError) -> str:
    """``bad JSON: <what> at column <n>`` for a JSON parse error (callers name the file and line);
    some of json's messages end in "at" themselves ("Invalid control character at")."""
    msg = exc.msg[:-3] if exc.msg.endswith(" at") else exc.msg
    return f"bad JSON: {msg} at column {exc.colno}"


def event_to_json(event: Event) -> dict[str, Any]:
    """The event as a JSON object (the shape ``chainfold publish`` reads and ``read`` writes)."""
    out: dict[str, Any] = {"id": event.id, "stream": event.stream}
    if event.seq is not None:
        out["seq"] = event.seq
    out.update(type=event.type, time=event.time, data=event.data)
    return out


def event_from_json(obj: Any, *, path: str = "-", line: int = 0, now_ms: int | None = None) -> Event:
    """Validate one parsed JSON Lines input object (``publish``, docs/cli.md) and make an :class:`Event`.

    ``id``, ``stream``, ``type`` and ``data`` are required; ``time`` defaults to now. A ``seq`` in the
    input is checked for type but the writer assigns the real one. Raises :class:`MalformedInputLine`.
    """

    def bad(reason: str) -> MalformedInputLine:
        return MalformedInputLine(path, line, reason)

    if not isinstance(obj, dict):
        raise bad(f"expected a JSON object, got {type(obj).__name__}")
    for key in ("id", "stream", "type"):
        if key not in obj:
            raise bad(f"missing {key!r}")
        if not isinstance(obj[key], str) or not obj[key]:
            raise bad(f"{key!r} must be a non-empty string")
    if "data" not in obj:
        raise bad("missing 'data'")
    if not isinstance(obj["data"], dict):
        raise bad("'data' must be a JSON object")
    if "time" in obj and obj["time"] is not None:
        t = obj["time"]
        if not _is_uint(t):
            raise bad("'time' must be a non-negative integer (ms since the epoch)")
    else:
        t = now_ms if now_ms is not None else int(_time.time() * 1000)
    seq = obj.get("seq")
    if seq is not None and not (_is_uint(seq) and seq >= 1):
        raise bad("'seq' must be an integer >= 1")
    unknown = set(obj) - {"id", "stream", "seq", "type", "time", "data"}
    if unknown:
        raise bad(f"unknown key(s) {', '.join(sorted(unknown))}")
    return Event(obj["id"], obj["stream"], seq, obj["type"], t, obj["data"])


def parse_json_line(text: str, *, path: str, line: int) -> Any:
    """``json.loads`` that reports failures as :class:`MalformedInputLine`."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise MalformedInputLine(path, line, json_error(exc)) from None

"""Snapshot files as bytes (format :data:`FORMAT`): pure functions, no files, no clock.

A snapshot file is a CBOR map::

    {"format": 2, "body": <bytes: canonical CBOR of the body map>, "sha256": <bytes: SHA-256 of body>}

    body = {"topic", "partitions": [{"partition", "entries", "message_id", "chain"}, ...],
            "model_name", "model_fingerprint", "segment_size", "states": {stream: state},
            "dedup": manifest of the event ids folded, "created": ms, "stats": {...},
            "streams_root": Merkle root over the states, "entries": sum over partitions,
            "on_model_error": "stop" | "skip-event" | "skip-stream",
            "skipped": [{"index", "message_id", "stream", "event_id", "error"}, ...]}

``on_model_error`` is the policy the fold ran under and ``skipped`` the events the model failed on
that it left out (in log order), so that a snapshot never covers a skipped event silently.

``dedup`` is a :class:`~chainfold.replay.dedup.DedupIndex` manifest: the SHA-256, count and size of
each immutable piece (beside the snapshots) that holds the ids, so the checksum covers the pieces'
digests and a snapshot costs O(streams + ids since the previous one). Format 1 stored every id in
every snapshot (``seen``); it is refused with a reason, never misread.

``streams_root`` is the RFC 9162 root (:func:`chainfold.merkle.root`) over one leaf per stream,
streams sorted by id: ``leaf_hash(canonical CBOR of [stream, state])``. :func:`encode` computes it
from the same bytes it writes for the states; :func:`check_streams_root` checks it after loading,
on top of the checksum that :func:`open_body` checks.

What a :class:`~chainfold.store.snapshots.Snapshot` is made of (and how its fields are checked)
is :mod:`chainfold.store.snapshots`' business; here the body is a map of plain values.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import io
from collections.abc import Iterator, Mapping
from typing import Any

import cbor2

from ..errors import BadInput, ChainfoldError
from ..merkle import HASH_SIZE, root as merkle_root

__all__ = ["FORMAT", "FORMAT_1_REFUSED", "BODY_KEYS", "Undecodable", "encode", "open_body", "streams_root", "check_streams_root",
           "gc_paused"]

FORMAT = 2
"""Version of the snapshot file format written and read (2: the dedup manifest instead of every id,
``seqs`` the seq check's state, the poison policy and skipped events)."""

FORMAT_1_REFUSED = "format 1, written by an older chainfold: rebuild --full once"
"""Why a format-1 snapshot (every id in every file) is not used."""

BODY_KEYS = frozenset({
    "topic", "partitions", "model_name", "model_fingerprint", "segment_size", "states", "dedup",
    "created", "stats", "streams_root", "entries", "on_model_error", "skipped", "seqs",
})
_ENVELOPE_KEYS = frozenset({"format", "body", "sha256"})
NOT_SNAPSHOT = "truncated or not a snapshot file"

_sha256 = hashlib.sha256


class Undecodable(ChainfoldError):
    """Bytes that are not a valid snapshot file: ``reason``, and the ``body`` map when the envelope
    and checksum were fine (so a summary can still be shown)."""

    def __init__(self, reason: str, body: dict[str, Any] | None = None) -> None:
        self.reason = reason
        self.body = body
        super().__init__(reason)


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic GC: decoding or encoding a snapshot allocates millions of objects and no
    cycles, and collections triggered meanwhile would re-scan the whole heap again and again."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _encode(value: Any) -> bytes:
    return cbor2.dumps(value, canonical=True)


def _head(major: int, n: int) -> bytes:
    """The CBOR head of major type ``major`` with argument ``n``, shortest form."""
    mt = major << 5
    if n < 24:
        return bytes([mt | n])
    if n < 1 << 8:
        return bytes([mt | 24, n])
    if n < 1 << 16:
        return bytes([mt | 25]) + n.to_bytes(2, "big")
    if n < 1 << 32:
        return bytes([mt | 26]) + n.to_bytes(4, "big")
    return bytes([mt | 27]) + n.to_bytes(8, "big")


def _encoded_states(states: Mapping[str, Any]) -> dict[str, tuple[bytes, bytes]]:
    """stream → (canonical CBOR of the stream id, canonical CBOR of its state)."""
    dumps = cbor2.dumps
    out = {}
    for stream, state in states.items():
        if type(stream) is not str:
            raise BadInput(f"stream ids are text, not {stream!r}")
        try:
            out[stream] = (dumps(stream), dumps(state, canonical=True))
        except (cbor2.CBOREncodeError, TypeError, ValueError, OverflowError) as exc:
            raise BadInput(f"the state of stream {stream!r} cannot be stored as CBOR: {exc}") from None
    return out


def _root_of_encoded(enc: Mapping[str, tuple[bytes, bytes]]) -> bytes:
    sha = _sha256
    return merkle_root([sha(b"\x00\x82" + k + v).digest() for k, v in (enc[s] for s in sorted(enc))])


def streams_root(states: Mapping[str, Any]) -> bytes:
    """Merkle root over the states: one leaf per stream, streams sorted by id (code point order),
    ``leaf_hash(canonical CBOR of [stream, state])``; ``merkle.root([])`` when there are none.

    :class:`~chainfold.errors.BadInput` if a state is not CBOR-encodable.
    """
    return _root_of_encoded(_encoded_states(states))


def check_streams_root(states: Mapping[str, Any], expected: bytes) -> bool:
    """Whether ``states`` (as decoded from a snapshot) hash to ``expected``.

    Fast path first: the plain (non-canonical) encoding of values decoded from canonical CBOR is
    usually byte-identical to their canonical encoding, and if the root it gives matches, it *is*
    the canonical root (a match with different bytes would be a SHA-256 collision). Only on a
    mismatch, or when plain encoding fails (floats, sets, tags, ...), is the canonical encoding
    computed to decide. :class:`~chainfold.errors.BadInput` if a state cannot be encoded at all.
    """
    sha = _sha256
    dumps = cbor2.dumps
    try:
        leaves = [sha(b"\x00" + dumps([s, states[s]])).digest() for s in sorted(states)]
    except (cbor2.CBOREncodeError, TypeError, ValueError, OverflowError):
        leaves = None  # decided by the canonical encoding below
    if leaves is not None and merkle_root(leaves) == expected:
        return True
    return streams_root(states) == expected


def encode(fields: Mapping[str, Any]) -> tuple[list[bytes], bytes]:
    """The file's bytes, as chunks to write in order, and the streams root computed on the way.

    ``fields`` are the body's fields except ``streams_root``. Each state is encoded once: the same
    bytes go into its streams-root leaf and into the body's ``states`` map, which is assembled here
    in canonical key order (bytewise on the encoded keys). :class:`~chainfold.errors.BadInput` if
    a value cannot be encoded as CBOR.
    """
    with gc_paused():
        enc = _encoded_states(fields["states"])
        root = _root_of_encoded(enc)
        pairs = sorted(enc.values())  # canonical order: by encoded key
        states_bytes = _head(5, len(pairs)) + b"".join([k + v for k, v in pairs])
        del enc, pairs
        rest = {k: v for k, v in fields.items() if k != "states"}
        rest["streams_root"] = root
        try:
            items = [(_encode(k), _encode(v)) for k, v in rest.items()]
        except (cbor2.CBOREncodeError, TypeError, ValueError, OverflowError) as exc:
            raise BadInput(f"snapshot of {fields.get('topic')} cannot be stored as CBOR: {exc}") from None
        items.append((_encode("states"), states_bytes))
        items.sort(key=lambda kv: kv[0])
        body = _head(5, len(items)) + b"".join([k + v for k, v in items])
    # the canonical CBOR of {"body": body, "format": FORMAT, "sha256": SHA-256(body)}, body not copied
    prefix = _head(5, 3) + _encode("body") + _head(2, len(body))
    suffix = _encode("format") + _encode(FORMAT) + _encode("sha256") + _encode(_sha256(body).digest())
    return [prefix, body, suffix], root


def _decode_exact(data: bytes) -> Any:
    """One CBOR item that spans all of ``data``, strictly (no duplicate keys, no indefinite lengths)."""
    fp = io.BytesIO(data)
    value = cbor2.CBORDecoder(fp, allow_duplicate_keys=False, allow_indefinite=False).decode()
    if fp.tell() != len(data):
        raise ValueError("trailing bytes")
    return value


def open_body(data: bytes) -> dict[str, Any]:
    """The verified body map of a snapshot file's bytes (format, checksum, exactly the body keys);
    :class:`Undecodable` says why not. (Callers decoding large snapshots pause the GC: :func:`gc_paused`.)"""
    try:
        env = _decode_exact(data)
    except Exception:  # noqa: BLE001 - any decoder failure (cut short, garbage, absurd lengths, bad tags) is a rejection with a reason
        raise Undecodable(NOT_SNAPSHOT) from None
    if not isinstance(env, dict) or set(env) != _ENVELOPE_KEYS:
        raise Undecodable(NOT_SNAPSHOT)
    fmt = env["format"]
    if type(fmt) is int and fmt == 1:
        raise Undecodable(FORMAT_1_REFUSED)
    if type(fmt) is not int or fmt != FORMAT:
        raise Undecodable(f"format {fmt!r} is not supported (this chainfold reads format {FORMAT})")
    body, digest = env["body"], env["sha256"]
    if type(body) is not bytes or type(digest) is not bytes or len(digest) != HASH_SIZE:
        raise Undecodable(NOT_SNAPSHOT)
    if _sha256(body).digest() != digest:
        raise Undecodable("checksum mismatch: body altered")
    try:
        fields = _decode_exact(body)
    except Exception as exc:  # noqa: BLE001 - as above: the checksum held, the body still does not decode
        raise Undecodable(f"body is not CBOR: {exc}") from None
    if not isinstance(fields, dict) or set(fields) != BODY_KEYS:
        got = sorted(map(str, fields)) if isinstance(fields, dict) else type(fields).__name__
        raise Undecodable(f"body does not have the snapshot fields (got {got})")
    return fields

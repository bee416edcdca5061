"""Snapshots: the folded states of a topic at a known log position, so a rebuild replays only the tail.

One file per snapshot, in one folder per topic (:func:`topic_dir`) under the store's root (default
``snapshots/``). A :class:`Snapshot` records, for every partition, how many entries it covers, the
last message id covered and the :class:`~chainfold.hashing.chain.ChainBuilder` state there (so the hash
chain continues without re-reading); the model's name and code fingerprint; the states per stream
(as ``model.dump_state`` gives them); and the event ids already folded (so a duplicate of an old
event in the tail is not folded twice).

File format (version :data:`FORMAT`), a CBOR map::

    {"format": 1, "body": <bytes: canonical CBOR of the body map>, "sha256": <bytes: SHA-256 of body>}

    body = {"topic", "partitions": [{"partition", "entries", "message_id", "chain"}, ...],
            "model_name", "model_fingerprint", "segment_size", "states": {stream: state},
            "seen": [event ids, sorted], "created": ms, "stats": {...},
            "streams_root": Merkle root over the states, "entries": sum over partitions}

``streams_root`` is the RFC 9162 root (:func:`chainfold.merkle.root`) over one leaf per stream,
streams sorted by id: ``leaf_hash(canonical CBOR of [stream, state])``. It is computed when writing
and checked when loading, on top of the checksum of the body.

Files are named ``snap-<entries:012d>-<created ms:013d>[-<n>].cbor``, so a listing orders by
coverage without opening them. They are written crash-safely: a hidden temp file in the same folder
(``.snap-...tmp``, never listed), fsynced, renamed into place, folder fsynced. A temp file left by a
writer that died is removed by the next write. A file that is truncated, altered, of another topic
or of another model is never loaded: it comes back as a :class:`~chainfold.errors.SnapshotRejected`
with the reason, and the caller moves on to the next older one (:meth:`SnapshotStore.candidates`).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import hashlib
import io
import os
import re
import secrets
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import cbor2

from ..hashing.chain import ChainBuilder
from .atomic import fsync_dir
from ..errors import BadInput, SnapshotRejected
from ..replay.fold import Model, render_json
from ..log import full_topic_name
from ..merkle import HASH_SIZE, root as merkle_root

__all__ = [
    "FORMAT",
    "PartitionPosition",
    "Snapshot",
    "SnapshotInfo",
    "SnapshotStore",
    "topic_dir",
    "streams_root",
]

FORMAT = 1
"""Version of the snapshot file format written and read."""

_NAME = re.compile(r"^snap-(\d{1,20})-(\d{1,20})(?:-(\d{1,6}))?\.cbor$")
_TEMP = re.compile(r"^\.snap-.*\.(\d{1,10})\.[0-9a-f]{8,32}\.tmp$")
_STALE_TEMP_SECONDS = 24 * 3600  # a temp file of a live other process is left alone unless this old

_NOT_SNAPSHOT = "truncated or not a snapshot file"
_BODY_KEYS = frozenset({
    "topic", "partitions", "model_name", "model_fingerprint", "segment_size", "states", "seen",
    "created", "stats", "streams_root", "entries",
})
_POSITION_KEYS = frozenset({"partition", "entries", "message_id", "chain"})
_ENVELOPE_KEYS = frozenset({"format", "body", "sha256"})

_sha256 = hashlib.sha256
_in_progress: set[str] = set()  # temp files this process is writing right now (never cleaned up)


# --- where -------------------------------------------------------------------------------------------

_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")
_MAX_DIR_NAME = 200


def _escape(text: str) -> str:
    """Percent-encode (lowercase hex, UTF-8) every character outside ``[A-Za-z0-9_-]``."""
    out = []
    for ch in text:
        if ch in _SAFE:
            out.append(ch)
        else:
            out.extend(f"%{b:02x}" for b in ch.encode("utf-8"))
    return "".join(out)


def topic_dir(root: str | os.PathLike[str], topic: str) -> Path:
    """The folder of ``topic``'s snapshots (and checkpoints) under ``root``.

    ``persistent://public/default/NAME`` (or ``NAME``) → ``root/public.default.NAME``; a
    non-persistent topic gets the prefix ``np~``. Each path part is percent-encoded outside
    ``[A-Za-z0-9_-]`` (so ``.`` only ever separates parts, and the name is unambiguous); a name with
    upper-case letters gets ``~`` and 8 hex digits of its SHA-256 appended, so that two topics
    differing only in case stay apart on case-insensitive file systems; an overlong name is cut and
    given 16 hex digits of its hash.
    """
    full = full_topic_name(topic)
    scheme, sep, rest = full.partition("://")
    if not sep or not rest or scheme not in ("persistent", "non-persistent"):
        raise BadInput(f"not a topic name: {topic!r}")
    name = ".".join(_escape(part) for part in rest.split("/"))
    if scheme == "non-persistent":
        name = "np~" + name
    digest = _sha256(full.encode("utf-8")).hexdigest()
    if len(name) > _MAX_DIR_NAME:
        name = name[: _MAX_DIR_NAME - 17] + "~" + digest[:16]
    elif name != name.lower():
        name += "~" + digest[:8]
    return Path(root) / name


# --- what --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PartitionPosition:
    """How far a snapshot covers one partition.

    ``entries`` is the number of the partition's entries covered (malformed and duplicated ones
    included); ``message_id`` the id of the last one (``ledger:entry:partition:batch``; ``None``
    when nothing is covered); ``chain`` the :meth:`ChainBuilder.state` after that entry, so hashing
    continues from there: ``chain["size"]`` must equal ``entries`` (``ValueError`` otherwise).
    """

    partition: str
    entries: int
    message_id: str | None
    chain: dict[str, Any]

    def __post_init__(self) -> None:
        if type(self.partition) is not str or not self.partition:
            raise ValueError(f"partition must be a topic name, not {self.partition!r}")
        if type(self.entries) is not int or self.entries < 0:
            raise ValueError(f"entries must be an int >= 0, not {self.entries!r}")
        if self.message_id is not None and type(self.message_id) is not str:
            raise ValueError(f"message_id must be a string or None, not {self.message_id!r}")
        if not isinstance(self.chain, Mapping):
            raise ValueError("chain must be a ChainBuilder state (a mapping)")
        if self.chain.get("size") != self.entries:
            raise ValueError(
                f"partition {self.partition}: chain state covers {self.chain.get('size')!r} entries, "
                f"the position says {self.entries}"
            )

    @classmethod
    def at(cls, partition: str, chain: ChainBuilder, message_id: str | None = None) -> PartitionPosition:
        """The position of ``chain`` (a builder fed every entry of ``partition`` so far).

        ``message_id`` defaults to the last message id the builder was given.
        """
        state = chain.state()
        return cls(partition, chain.size, message_id if message_id is not None else state["last"], state)

    def builder(self) -> ChainBuilder:
        """A :class:`ChainBuilder` resumed at this position (``ValueError`` if the state is bad)."""
        return ChainBuilder.from_state(self.chain)

    @property
    def head(self) -> bytes:
        """The chain head recorded at this position (of the last complete segment)."""
        return self.chain["head"]

    def _to_cbor(self) -> dict[str, Any]:
        return {"partition": self.partition, "entries": self.entries, "message_id": self.message_id,
                "chain": dict(self.chain)}


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic GC: decoding or encoding a snapshot allocates millions of objects and no
    cycles, and collections triggered meanwhile would re-scan the whole heap again and again."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


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


def _check_streams_root(states: Mapping[str, Any], expected: bytes) -> bool:
    """Whether ``states`` (as decoded from a snapshot) hash to ``expected``.

    Fast path first: the plain (non-canonical) encoding of values decoded from canonical CBOR is
    usually byte-identical to their canonical encoding, and if the root it gives matches, it *is*
    the canonical root (a match with different bytes would be a SHA-256 collision). Only on a
    mismatch (floats, sets, ...) is the canonical encoding computed to decide.
    """
    sha = _sha256
    dumps = cbor2.dumps
    try:
        leaves = [sha(b"\x00" + dumps([s, states[s]])).digest() for s in sorted(states)]
    except Exception:
        leaves = None
    if leaves is not None and merkle_root(leaves) == expected:
        return True
    return streams_root(states) == expected


@dataclass(frozen=True)
class Snapshot:
    """The folded states of ``topic`` at ``partitions``' positions (see the module doc).

    ``states`` maps stream id → ``model.dump_state(state)`` (CBOR-encodable); ``seen`` holds the
    event ids already folded. Construction takes copies of ``states`` (shallow) and ``seen``, so the
    folder may go on folding. ``entries`` (sum over partitions) and ``streams_root`` are derived.
    """

    topic: str
    partitions: tuple[PartitionPosition, ...]
    model_name: str
    model_fingerprint: str
    segment_size: int
    states: dict[str, Any]
    seen: frozenset[str]
    created: int = field(default_factory=_now_ms)
    stats: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if type(self.topic) is not str:
            raise ValueError(f"topic must be a string, not {self.topic!r}")
        set_(self, "topic", full_topic_name(self.topic))
        parts = tuple(self.partitions)
        if not all(isinstance(p, PartitionPosition) for p in parts):
            raise ValueError("partitions must be PartitionPosition values")
        if len({p.partition for p in parts}) != len(parts):
            raise ValueError("a partition appears twice")
        set_(self, "partitions", parts)
        for name in ("model_name", "model_fingerprint"):
            if type(getattr(self, name)) is not str:
                raise ValueError(f"{name} must be a string")
        s = self.segment_size
        if type(s) is not int or s < 1 or s & (s - 1):
            raise ValueError(f"segment_size must be a power of two >= 1, not {s!r}")
        for p in parts:
            if p.chain.get("segment_size") != s:
                raise ValueError(f"partition {p.partition}: chain segment size differs from {s}")
        if not isinstance(self.states, Mapping):
            raise ValueError("states must be a mapping stream -> state")
        set_(self, "states", dict(self.states))
        if type(self.seen) is not frozenset:
            set_(self, "seen", frozenset(self.seen))
        if type(self.created) is not int or self.created < 0:
            raise ValueError(f"created must be ms since the epoch, not {self.created!r}")
        if not isinstance(self.stats, Mapping):
            raise ValueError("stats must be a mapping")
        set_(self, "stats", dict(self.stats))

    @classmethod
    def capture(
        cls,
        model: Model,
        *,
        topic: str,
        partitions: tuple[PartitionPosition, ...] | list[PartitionPosition],
        states: Mapping[str, Any],
        seen: frozenset[str] | set[str],
        segment_size: int,
        stats: Mapping[str, Any] | None = None,
        created: int | None = None,
    ) -> Snapshot:
        """A snapshot of live states: each goes through ``model.dump_state``; model name and
        fingerprint are taken from ``model``."""
        dump = model.dump_state
        return cls(
            topic=topic,
            partitions=tuple(partitions),
            model_name=model.name,
            model_fingerprint=model.fingerprint,
            segment_size=segment_size,
            states={s: dump(v) for s, v in states.items()},
            seen=frozenset(seen),
            created=_now_ms() if created is None else created,
            stats=dict(stats or {}),
        )

    def restore_states(self, model: Model) -> dict[str, Any]:
        """The states as the model folds them (``model.load_state`` of each stored value)."""
        load = model.load_state
        return {s: load(v) for s, v in self.states.items()}

    @property
    def entries(self) -> int:
        """Entries covered, over all partitions."""
        return sum(p.entries for p in self.partitions)

    @cached_property
    def streams_root(self) -> bytes:
        """Merkle root over the states (see :func:`streams_root`)."""
        return streams_root(self.states)

    def position(self, partition: str) -> PartitionPosition | None:
        """The position in ``partition``, or ``None`` if the snapshot does not cover it."""
        for p in self.partitions:
            if p.partition == partition:
                return p
        return None


@dataclass(frozen=True)
class SnapshotInfo:
    """A snapshot file as listed (from its name and size only; not opened)."""

    path: Path
    entries: int
    created: int
    size_bytes: int


# --- bytes ------------------------------------------------------------------------------------------


def _encode_body(snap: Snapshot) -> bytes:
    """The canonical CBOR of the body map; also caches ``snap.streams_root``.

    Each state is encoded once: the same bytes go into its streams-root leaf and into the body's
    ``states`` map, which is assembled here in canonical key order (bytewise on the encoded keys).
    """
    enc = _encoded_states(snap.states)
    root = _root_of_encoded(enc)
    snap.__dict__["streams_root"] = root  # the cached_property, computed from the same bytes
    pairs = sorted(enc.values())  # canonical order: by encoded key
    states_bytes = _head(5, len(pairs)) + b"".join([k + v for k, v in pairs])
    del enc, pairs
    fields = {
        "topic": snap.topic,
        "partitions": [p._to_cbor() for p in snap.partitions],
        "model_name": snap.model_name,
        "model_fingerprint": snap.model_fingerprint,
        "segment_size": snap.segment_size,
        "seen": sorted(snap.seen),
        "created": snap.created,
        "stats": snap.stats,
        "streams_root": root,
        "entries": snap.entries,
    }
    try:
        items = [(_encode(k), _encode(v)) for k, v in fields.items()]
    except (cbor2.CBOREncodeError, TypeError, ValueError, OverflowError) as exc:
        raise BadInput(f"snapshot of {snap.topic} cannot be stored as CBOR: {exc}") from None
    items.append((_encode("states"), states_bytes))
    items.sort(key=lambda kv: kv[0])
    return _head(5, len(items)) + b"".join([k + v for k, v in items])


def _envelope_parts(body: bytes) -> tuple[bytes, bytes]:
    """The file's bytes before and after ``body``: the canonical CBOR of the envelope map
    ``{"body": body, "format": FORMAT, "sha256": SHA-256(body)}`` is ``prefix + body + suffix``."""
    prefix = _head(5, 3) + _encode("body") + _head(2, len(body))
    suffix = _encode("format") + _encode(FORMAT) + _encode("sha256") + _encode(_sha256(body).digest())
    return prefix, suffix


class _Reject(Exception):
    def __init__(self, reason: str, body: dict[str, Any] | None = None) -> None:
        self.reason = reason
        self.body = body


def _decode_exact(data: bytes) -> Any:
    """One CBOR item that spans all of ``data``, strictly (no duplicate keys, no indefinite lengths)."""
    fp = io.BytesIO(data)
    value = cbor2.CBORDecoder(fp, allow_duplicate_keys=False, allow_indefinite=False).decode()
    if fp.tell() != len(data):
        raise ValueError("trailing bytes")
    return value


def _open_envelope(data: bytes) -> dict[str, Any]:
    """The verified body map of a snapshot file's bytes; :class:`_Reject` says why not."""
    try:
        env = _decode_exact(data)
    except Exception:  # any decoder failure: cut short, garbage, absurd lengths, bad tags
        raise _Reject(_NOT_SNAPSHOT) from None
    if not isinstance(env, dict) or set(env) != _ENVELOPE_KEYS:
        raise _Reject(_NOT_SNAPSHOT)
    fmt = env["format"]
    if type(fmt) is not int or fmt != FORMAT:
        raise _Reject(f"format {fmt!r} is not supported (this chainfold reads format {FORMAT})")
    body, digest = env["body"], env["sha256"]
    if type(body) is not bytes or type(digest) is not bytes or len(digest) != HASH_SIZE:
        raise _Reject(_NOT_SNAPSHOT)
    if _sha256(body).digest() != digest:
        raise _Reject("checksum mismatch: body altered")
    try:
        fields = _decode_exact(body)
    except Exception as exc:
        raise _Reject(f"body is not CBOR: {exc}") from None
    if not isinstance(fields, dict) or set(fields) != _BODY_KEYS:
        got = sorted(map(str, fields)) if isinstance(fields, dict) else type(fields).__name__
        raise _Reject(f"body does not have the snapshot fields (got {got})")
    return fields


def _snapshot_of(fields: dict[str, Any]) -> Snapshot:
    """Build the snapshot from a verified body (``_Reject`` on a field of the wrong shape)."""
    try:
        parts = fields["partitions"]
        if type(parts) is not list:
            raise ValueError("partitions must be a list")
        positions = []
        for p in parts:
            if not isinstance(p, dict) or set(p) != _POSITION_KEYS:
                raise ValueError(f"a partition position has keys {sorted(map(str, p)) if isinstance(p, dict) else p!r}")
            pos = PartitionPosition(p["partition"], p["entries"], p["message_id"], p["chain"])
            try:
                pos.builder()
            except ValueError as exc:
                raise ValueError(f"partition {pos.partition}: bad chain state: {exc}") from None
            positions.append(pos)
        states = fields["states"]
        if type(states) is not dict or not all(type(k) is str for k in states):
            raise ValueError("states must be a map with text keys")
        seen = fields["seen"]
        if type(seen) is not list or not all(type(e) is str for e in seen):
            raise ValueError("seen must be a list of event ids")
        root = fields["streams_root"]
        if type(root) is not bytes or len(root) != HASH_SIZE:
            raise ValueError("streams_root must be 32 bytes")
        if type(fields["stats"]) is not dict:
            raise ValueError("stats must be a map")
        snap = Snapshot(
            topic=fields["topic"],
            partitions=tuple(positions),
            model_name=fields["model_name"],
            model_fingerprint=fields["model_fingerprint"],
            segment_size=fields["segment_size"],
            states=states,
            seen=frozenset(seen),
            created=fields["created"],
            stats=fields["stats"],
        )
        if snap.topic != fields["topic"]:
            raise ValueError(f"topic {fields['topic']!r} is not a full topic name")
        if fields["entries"] != snap.entries:
            raise ValueError(f"entries {fields['entries']!r} is not the sum over partitions ({snap.entries})")
    except (ValueError, TypeError, BadInput) as exc:
        raise _Reject(f"bad snapshot body: {exc}", fields) from None
    return snap


# --- the store ---------------------------------------------------------------------------------------


def _parse_name(name: str) -> tuple[int, int, int] | None:
    """(entries, created, n) from a snapshot file name, or None if it is not one."""
    m = _NAME.match(name)
    if m is None:
        return None
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


def _iso(ms: int) -> str:
    try:
        t = _dt.datetime.fromtimestamp(ms / 1000, tz=_dt.timezone.utc)
    except (OverflowError, OSError, ValueError):
        return str(ms)
    return t.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, another user's
    except OSError:
        return False
    return True


class SnapshotStore:
    """The snapshots of one topic: the folder :func:`topic_dir` ``(root, topic)``.

    ``keep`` is how many snapshots :meth:`write` leaves (the newest, by entries covered then
    creation time); it never deletes the one it just wrote. Only files named like snapshots
    (``snap-*.cbor``) and this module's own temp files are ever touched: the folder is shared with
    checkpoint files. One writer at a time per topic is assumed; concurrent readers are fine.
    """

    def __init__(self, root: str | os.PathLike[str], topic: str, keep: int = 3) -> None:
        if type(keep) is not int or keep < 1:
            raise ValueError(f"keep must be an int >= 1, not {keep!r}")
        self.root = Path(root)
        self.topic = full_topic_name(topic)
        self.dir = topic_dir(self.root, self.topic)
        self.keep = keep

    def __repr__(self) -> str:
        return f"SnapshotStore({str(self.root)!r}, {self.topic!r}, keep={self.keep})"

    # --- listing ----------------------------------------------------------------------------------

    def _scan(self) -> list[tuple[tuple[int, int, int], SnapshotInfo]]:
        out = []
        try:
            it = os.scandir(self.dir)
        except (FileNotFoundError, NotADirectoryError):
            return []
        with it:
            for e in it:
                key = _parse_name(e.name)
                if key is None:
                    continue
                try:
                    if not e.is_file(follow_symlinks=False):
                        continue
                    size = e.stat(follow_symlinks=False).st_size
                except OSError:  # removed meanwhile
                    continue
                out.append((key, SnapshotInfo(Path(e.path), key[0], key[1], size)))
        out.sort(key=lambda kv: kv[0], reverse=True)
        return out

    def list(self) -> list[SnapshotInfo]:
        """The snapshot files, newest (most entries, then latest created) first. Cheap: names and
        sizes only, nothing is opened or checked."""
        return [info for _, info in self._scan()]

    # --- reading ----------------------------------------------------------------------------------

    def _read(self, path: Path) -> tuple[dict[str, Any], Snapshot]:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise _Reject(f"{_NOT_SNAPSHOT}: cannot read it ({exc.strerror or exc})") from None
        with _gc_paused():
            fields = _open_envelope(data)
            snap = _snapshot_of(fields)
        key = _parse_name(path.name)
        if key is not None and key[0] != snap.entries:
            raise _Reject(f"file name says {key[0]} entries, the body covers {snap.entries}", fields)
        if snap.topic != self.topic:
            raise _Reject(f"taken of topic {snap.topic}, not {self.topic}", fields)
        root = fields["streams_root"]
        try:
            ok = _check_streams_root(snap.states, root)
        except BadInput as exc:
            raise _Reject(f"bad snapshot body: {exc}", fields) from None
        if not ok:
            raise _Reject("streams_root mismatch: the states do not hash to the recorded root", fields)
        snap.__dict__["streams_root"] = root  # cached_property: already verified
        return fields, snap

    def load(self, path: str | os.PathLike[str]) -> Snapshot:
        """Read and verify one snapshot file.

        Raises :class:`SnapshotRejected` (``path``, ``reason``) when the file is unreadable,
        truncated or not CBOR, of another format version, fails its checksum or its streams root,
        or was taken of another topic. The model is not checked here (see :meth:`candidates`).
        """
        p = Path(path)
        try:
            return self._read(p)[1]
        except _Reject as r:
            raise SnapshotRejected(str(p), r.reason) from None

    def candidates(self, model: Model) -> Iterator[tuple[SnapshotInfo, Snapshot | SnapshotRejected]]:
        """Newest first, each snapshot loaded and checked against ``model``, or the rejection.

        Lazy: a snapshot is read only when the iteration reaches it, so a caller that accepts the
        first good one reads no more. A snapshot taken with other model code (another fingerprint)
        is rejected.
        """
        for info in self.list():
            try:
                snap = self.load(info.path)
            except SnapshotRejected as exc:
                yield info, exc
                continue
            if snap.model_fingerprint != model.fingerprint:
                yield info, SnapshotRejected(
                    str(info.path),
                    f"taken with other model code (fingerprint {snap.model_fingerprint[:16]}, "
                    f"{snap.model_name}; this model's is {model.fingerprint[:16]})",
                )
                continue
            yield info, snap

    def inspect(self, path: str | os.PathLike[str], *, model: Model | None = None) -> dict[str, Any]:
        """A JSON-ready summary of one snapshot file, valid or not (``valid``, ``reason``).

        With ``model``, also ``model_matches`` (its fingerprint is the snapshot's); a mismatch makes
        the snapshot invalid for that model, as in :meth:`candidates`.
        """
        p = Path(path)
        key = _parse_name(p.name)
        try:
            size: int | None = p.stat().st_size
        except OSError:
            size = None
        out: dict[str, Any] = {
            "path": str(p),
            "size_bytes": size,
            "valid": True,
            "reason": None,
            "topic": None,
            "entries": key[0] if key else None,
            "created": _iso(key[1]) if key else None,
            "created_ms": key[1] if key else None,
        }
        fields: dict[str, Any] | None
        try:
            fields, _ = self._read(p)
        except _Reject as r:
            out["valid"] = False
            out["reason"] = r.reason
            fields = r.body
        if fields is not None:
            out.update(_summary(fields))
        if model is not None:
            matches = out.get("fingerprint") == model.fingerprint
            out["model_matches"] = matches
            if out["valid"] and not matches:
                out["valid"] = False
                out["reason"] = (f"taken with other model code (fingerprint {str(out['fingerprint'])[:16]}; "
                                 f"this model's is {model.fingerprint[:16]})")
        return out

    # --- writing ----------------------------------------------------------------------------------

    def write(self, snap: Snapshot) -> Path:
        """Store ``snap`` crash-safely, then prune to the newest ``keep``; the new file's path.

        Temp file in the folder, written, flushed and fsynced, renamed into place, folder fsynced:
        a crash at any moment leaves either no new snapshot or a complete one, and older snapshots
        untouched. An existing snapshot is never overwritten (same entries and creation time get a
        ``-n`` suffix). ``ValueError`` if ``snap`` is of another topic; :class:`BadInput` if a state
        cannot be encoded as CBOR.
        """
        if not isinstance(snap, Snapshot):
            raise TypeError(f"not a Snapshot: {snap!r}")
        if snap.topic != self.topic:
            raise ValueError(f"a snapshot of {snap.topic} does not belong in the store of {self.topic}")
        with _gc_paused():
            body = _encode_body(snap)
        prefix, suffix = _envelope_parts(body)
        created_dir = not self.dir.is_dir()
        self.dir.mkdir(parents=True, exist_ok=True)
        if created_dir:
            fsync_dir(self.dir.parent)
        self._clean_temp()
        base = f"snap-{snap.entries:012d}-{snap.created:013d}"
        final = self.dir / f"{base}.cbor"
        n = 0
        while final.exists():
            n += 1
            final = self.dir / f"{base}-{n}.cbor"
        tmp = self.dir / f".{final.name}.{os.getpid()}.{secrets.token_hex(8)}.tmp"
        _in_progress.add(tmp.name)
        try:
            with open(tmp, "xb") as f:
                f.write(prefix)
                view = memoryview(body)
                step = 1 << 22
                for i in range(0, len(view), step):
                    f.write(view[i : i + step])
                f.write(suffix)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            _in_progress.discard(tmp.name)
        fsync_dir(self.dir)
        self._prune(keep_path=final)
        return final

    def _prune(self, keep_path: Path) -> None:
        removed = False
        for i, (_, info) in enumerate(self._scan()):
            if i < self.keep or info.path.name == keep_path.name:
                continue
            try:
                info.path.unlink()
                removed = True
            except FileNotFoundError:
                pass
        if removed:
            fsync_dir(self.dir)

    def _clean_temp(self) -> None:
        """Remove temp files of writers that died (their process is gone, or they are very old)."""
        now = time.time()
        try:
            it = os.scandir(self.dir)
        except OSError:
            return
        with it:
            for e in it:
                m = _TEMP.match(e.name)
                if m is None or e.name in _in_progress:
                    continue
                pid = int(m.group(1))
                if pid != os.getpid() and _pid_alive(pid):
                    try:
                        if now - e.stat(follow_symlinks=False).st_mtime < _STALE_TEMP_SECONDS:
                            continue
                    except OSError:
                        continue
                try:
                    os.unlink(e.path)
                except OSError:
                    pass


def _summary(fields: dict[str, Any]) -> dict[str, Any]:
    """The JSON-ready description of a (checksum-verified) body, tolerant of odd field shapes."""

    def hexa(v: Any) -> Any:
        return v.hex() if isinstance(v, bytes) else v

    parts = []
    for p in fields.get("partitions") or []:
        if not isinstance(p, dict):
            continue
        chain = p.get("chain") if isinstance(p.get("chain"), dict) else {}
        item: dict[str, Any] = {
            "partition": p.get("partition"),
            "entries": p.get("entries"),
            "message_id": p.get("message_id"),
            "chain_head": hexa(chain.get("head")),
            "provisional_head": None,
            "log_root": None,
        }
        try:
            b = ChainBuilder.from_state(chain)
            pending = b.pending()
            item["provisional_head"] = pending.head.hex() if pending else None
            item["log_root"] = b.log_root().hex()
        except Exception:
            pass
        parts.append(item)
    states = fields.get("states")
    seen = fields.get("seen")
    created = fields.get("created")
    return {
        "topic": fields.get("topic"),
        "entries": fields.get("entries"),
        "created": _iso(created) if type(created) is int else created,
        "created_ms": created,
        "model": fields.get("model_name"),
        "fingerprint": fields.get("model_fingerprint"),
        "segment_size": fields.get("segment_size"),
        "partitions": parts,
        "streams": len(states) if isinstance(states, dict) else None,
        "seen": len(seen) if isinstance(seen, list) else None,
        "streams_root": hexa(fields.get("streams_root")),
        "stats": render_json(fields.get("stats")),
    }

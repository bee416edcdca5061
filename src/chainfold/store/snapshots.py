"""Snapshots: the folded states of a topic at a known log position, so a rebuild replays only the tail.

A :class:`Snapshot` records, for every partition, how many entries it covers, the last message id
covered and the :class:`~chainfold.hashing.chain.ChainBuilder` state there (so the hash chain
continues without re-reading); the model's name and code fingerprint; the states per stream (as
``model.dump_state`` gives them); the manifest of the dedup index of the event ids already
folded (so a duplicate of an old event in the tail is not folded twice): its pieces live beside the
snapshots (:mod:`chainfold.store.dedup_folder`), shared by every snapshot that names them, so a
snapshot costs O(streams + ids since the previous one) to write and O(streams) to read; and the
events the model failed on that the fold left out, with the policy that left them out
(``on_model_error``, ``skipped``: a snapshot never covers a skipped event silently, and a rebuild
under another policy does not start from one that skipped any).

:class:`SnapshotStore` holds one topic's snapshots: in a :class:`~chainfold.store.storage.SnapshotStorage`
(by default :class:`~chainfold.store.storage.LocalStorage`, the topic's folder :func:`topic_dir`
under the store's root, default ``snapshots/``), as bytes of the format of
:mod:`chainfold.store.codec`. Files are named ``snap-<entries:012d>-<created ms:013d>[-<n>].cbor``,
so a listing orders by coverage without opening them; they are written atomically (a crash leaves
no snapshot or a complete one); the newest ``keep`` are kept. A file that is truncated, altered, of
another topic or of another model, or whose dedup pieces are missing or damaged, is never loaded:
it comes back as a :class:`~chainfold.errors.SnapshotRejected` with the reason, and the caller moves
on to the next older one (:meth:`SnapshotStore.candidates`).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from ..errors import BadInput, DedupIndexError, DedupManifestInvalid, InvalidArgument, SnapshotRejected
from ..hashing.chain import ChainBuilder
from ..log import full_topic_name
from ..merkle import HASH_SIZE
from ..replay.dedup import manifest_digests
from ..replay.fold import ON_MODEL_ERROR, Skipped
from ..replay.decode import SeqGaps
from ..replay.model import Model, render_json
from . import codec
from .codec import FORMAT, Undecodable, streams_root
from .dedup_folder import DedupFolder
from .storage import LocalStorage, SnapshotStorage

__all__ = [
    "FORMAT",
    "PartitionPosition",
    "Snapshot",
    "SnapshotInfo",
    "SnapshotStore",
    "topic_dir",
    "streams_root",
]

_NAME = re.compile(r"^snap-(\d{1,20})-(\d{1,20})(?:-(\d{1,6}))?\.cbor$")
_POSITION_KEYS = frozenset({"partition", "entries", "message_id", "chain"})

_sha256 = hashlib.sha256


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


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
            raise InvalidArgument(f"partition must be a topic name, not {self.partition!r}")
        if type(self.entries) is not int or self.entries < 0:
            raise InvalidArgument(f"entries must be an int >= 0, not {self.entries!r}")
        if self.message_id is not None and type(self.message_id) is not str:
            raise InvalidArgument(f"message_id must be a string or None, not {self.message_id!r}")
        if not isinstance(self.chain, Mapping):
            raise InvalidArgument("chain must be a ChainBuilder state (a mapping)")
        if self.chain.get("size") != self.entries:
            raise InvalidArgument(
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


@dataclass(frozen=True)
class Snapshot:
    """The folded states of ``topic`` at ``partitions``' positions (see the module doc).

    ``states`` maps stream id → ``model.dump_state(state)`` (CBOR-encodable); ``dedup`` is the
    manifest of the event ids already folded (:meth:`chainfold.replay.dedup.DedupIndex.checkpoint`);
    ``skipped`` the events the model failed on that the fold left out under the policy
    ``on_model_error`` (replay/fold.py), in log order. Construction takes copies of ``states``
    (shallow) and ``dedup``, so the folder may go on folding. ``entries`` (sum over partitions) and
    ``streams_root`` are derived.
    """

    topic: str
    partitions: tuple[PartitionPosition, ...]
    model_name: str
    model_fingerprint: str
    segment_size: int
    states: dict[str, Any]
    dedup: dict[str, Any]
    created: int = field(default_factory=_now_ms)
    stats: dict[str, Any] = field(default_factory=dict)
    on_model_error: str = "stop"
    skipped: tuple[Skipped, ...] = ()
    seqs: dict[str, Any] = field(default_factory=lambda: SeqGaps().state())
    """The seq check where the snapshot stands (:meth:`SeqGaps.state`): each stream's highest
    ``seq``, the gaps found before, the events without ``seq``; a rebuild from the snapshot
    continues the check from there (docs/cli.md#history)."""

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if type(self.topic) is not str:
            raise InvalidArgument(f"topic must be a string, not {self.topic!r}")
        set_(self, "topic", full_topic_name(self.topic))
        parts = tuple(self.partitions)
        if not all(isinstance(p, PartitionPosition) for p in parts):
            raise InvalidArgument("partitions must be PartitionPosition values")
        if len({p.partition for p in parts}) != len(parts):
            raise InvalidArgument("a partition appears twice")
        set_(self, "partitions", parts)
        for name in ("model_name", "model_fingerprint"):
            if type(getattr(self, name)) is not str:
                raise InvalidArgument(f"{name} must be a string")
        s = self.segment_size
        if type(s) is not int or s < 1 or s & (s - 1):
            raise InvalidArgument(f"segment_size must be a power of two >= 1, not {s!r}")
        for p in parts:
            if p.chain.get("segment_size") != s:
                raise InvalidArgument(f"partition {p.partition}: chain segment size differs from {s}")
        if not isinstance(self.states, Mapping):
            raise InvalidArgument("states must be a mapping stream -> state")
        set_(self, "states", dict(self.states))
        try:
            manifest_digests(self.dedup)
        except DedupManifestInvalid as exc:
            raise InvalidArgument(f"dedup must be a dedup index manifest: {exc.reason}") from None
        set_(self, "dedup", dict(self.dedup))
        if type(self.created) is not int or self.created < 0:
            raise InvalidArgument(f"created must be ms since the epoch, not {self.created!r}")
        if not isinstance(self.stats, Mapping):
            raise InvalidArgument("stats must be a mapping")
        set_(self, "stats", dict(self.stats))
        if self.on_model_error not in ON_MODEL_ERROR:
            raise InvalidArgument(f"on_model_error must be one of {', '.join(ON_MODEL_ERROR)}, not {self.on_model_error!r}")
        set_(self, "skipped", tuple(self.skipped))
        if not all(isinstance(k, Skipped) for k in self.skipped):
            raise InvalidArgument("skipped must be Skipped values")
        try:
            SeqGaps.restore(self.seqs)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None

    @classmethod
    def capture(
        cls,
        model: Model,
        *,
        topic: str,
        partitions: tuple[PartitionPosition, ...] | list[PartitionPosition],
        states: Mapping[str, Any],
        dedup: Mapping[str, Any],
        segment_size: int,
        stats: Mapping[str, Any] | None = None,
        created: int | None = None,
        on_model_error: str = "stop",
        skipped: tuple[Skipped, ...] | list[Skipped] = (),
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
            dedup=dict(dedup),
            created=_now_ms() if created is None else created,
            stats=dict(stats or {}),
            on_model_error=on_model_error,
            skipped=tuple(skipped),
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

    def fields(self) -> dict[str, Any]:
        """The body's fields for :func:`chainfold.store.codec.encode` (all but ``streams_root``)."""
        return {
            "topic": self.topic,
            "partitions": [p._to_cbor() for p in self.partitions],
            "model_name": self.model_name,
            "model_fingerprint": self.model_fingerprint,
            "segment_size": self.segment_size,
            "states": self.states,
            "dedup": self.dedup,
            "created": self.created,
            "stats": self.stats,
            "seqs": self.seqs,
            "entries": self.entries,
            "on_model_error": self.on_model_error,
            "skipped": [k.record() for k in self.skipped],
        }

    def policy_conflict(self, on_model_error: str) -> str | None:
        """Why this snapshot cannot start a fold under ``on_model_error``, or None.

        A snapshot that skipped nothing holds what every policy folds up to its position (no model
        error happened before it), so it serves any policy; one that skipped events holds states
        only its own policy gives.
        """
        if not self.skipped or self.on_model_error == on_model_error:
            return None
        first = self.skipped[0]
        return (f"it skipped {len(self.skipped)} event(s) the model failed on under --on-model-error "
                f"{self.on_model_error} (first: event {first.event_id!r}, message {first.message_id}); "
                f"this fold runs with --on-model-error {on_model_error}")

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


# --- from a body ------------------------------------------------------------------------------------


def _snapshot_of(fields: dict[str, Any]) -> Snapshot:
    """Build the snapshot from a verified body (:class:`~chainfold.store.codec.Undecodable` on a
    field of the wrong shape)."""
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
            except InvalidArgument as exc:
                raise ValueError(f"partition {pos.partition}: bad chain state: {exc}") from None
            positions.append(pos)
        states = fields["states"]
        if type(states) is not dict or not all(type(k) is str for k in states):
            raise ValueError("states must be a map with text keys")
        try:
            manifest_digests(fields["dedup"])
        except DedupManifestInvalid as exc:
            raise ValueError(f"dedup: {exc.reason}") from None
        root = fields["streams_root"]
        if type(root) is not bytes or len(root) != HASH_SIZE:
            raise ValueError("streams_root must be 32 bytes")
        if type(fields["stats"]) is not dict:
            raise ValueError("stats must be a map")
        if type(fields["skipped"]) is not list:
            raise ValueError("skipped must be a list")
        skipped = tuple(Skipped.from_record(r) for r in fields["skipped"])
        snap = Snapshot(
            topic=fields["topic"],
            partitions=tuple(positions),
            model_name=fields["model_name"],
            model_fingerprint=fields["model_fingerprint"],
            segment_size=fields["segment_size"],
            states=states,
            dedup=fields["dedup"],
            created=fields["created"],
            stats=fields["stats"],
            on_model_error=fields["on_model_error"],
            skipped=skipped,
            seqs=fields["seqs"],
        )
        if snap.topic != fields["topic"]:
            raise ValueError(f"topic {fields['topic']!r} is not a full topic name")
        if fields["entries"] != snap.entries:
            raise ValueError(f"entries {fields['entries']!r} is not the sum over partitions ({snap.entries})")
    except (ValueError, TypeError, BadInput, InvalidArgument) as exc:
        raise Undecodable(f"bad snapshot body: {exc}", fields) from None
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


class SnapshotStore:
    """The snapshots of one topic, in ``storage`` (default: the folder :func:`topic_dir`
    ``(root, topic)`` on this machine).

    ``keep`` is how many snapshots :meth:`write` leaves (the newest, by entries covered then
    creation time); it never deletes the one it just wrote. Only names of snapshots
    (``snap-*.cbor``) are ever touched: the folder is shared with checkpoint files. One writer at
    a time per topic is assumed; concurrent readers are fine. :attr:`dedup` is where the pieces of
    the snapshots' dedup indexes are (``dedup/`` in the same folder).
    """

    def __init__(self, root: str | os.PathLike[str], topic: str, keep: int = 3,
                 storage: SnapshotStorage | None = None) -> None:
        if type(keep) is not int or keep < 1:
            raise InvalidArgument(f"keep must be an int >= 1, not {keep!r}")
        self.root = Path(root)
        self.topic = full_topic_name(topic)
        self.storage = storage if storage is not None else LocalStorage(topic_dir(self.root, self.topic), "snap-")
        self.dir = self.storage.locate("")
        self.keep = keep
        self.dedup = DedupFolder(self.dir)
        self._manifests: dict[str, dict[str, Any]] = {}  # file name -> its dedup manifest, once read

    def __repr__(self) -> str:
        return f"SnapshotStore({str(self.root)!r}, {self.topic!r}, keep={self.keep})"

    # --- listing ----------------------------------------------------------------------------------

    def _scan(self) -> list[tuple[tuple[int, int, int], SnapshotInfo]]:
        out = []
        for f in self.storage.list():
            key = _parse_name(f.name)
            if key is not None:
                out.append((key, SnapshotInfo(self.storage.locate(f.name), key[0], key[1], f.size)))
        out.sort(key=lambda kv: kv[0], reverse=True)
        return out

    def list(self) -> list[SnapshotInfo]:
        """The snapshot files, newest (most entries, then latest created) first. Cheap: names and
        sizes only, nothing is opened or checked."""
        return [info for _, info in self._scan()]

    # --- reading ----------------------------------------------------------------------------------

    def _bytes(self, path: Path) -> bytes:
        """A snapshot's bytes: from the storage when ``path`` names a snapshot in it, else the file."""
        try:
            if path.parent == self.dir and _parse_name(path.name) is not None:
                return self.storage.read(path.name)
            return path.read_bytes()
        except OSError as exc:
            raise Undecodable(f"{codec.NOT_SNAPSHOT}: cannot read it ({exc.strerror or exc})") from None

    def _read(self, path: Path) -> tuple[dict[str, Any], Snapshot]:
        data = self._bytes(path)
        with codec.gc_paused():
            fields = codec.open_body(data)
            snap = _snapshot_of(fields)
        key = _parse_name(path.name)
        if key is not None and key[0] != snap.entries:
            raise Undecodable(f"file name says {key[0]} entries, the body covers {snap.entries}", fields)
        if snap.topic != self.topic:
            raise Undecodable(f"taken of topic {snap.topic}, not {self.topic}", fields)
        if key is not None:
            self._manifests[path.name] = snap.dedup
        root = fields["streams_root"]
        try:
            ok = codec.check_streams_root(snap.states, root)
        except BadInput as exc:
            raise Undecodable(f"bad snapshot body: {exc}", fields) from None
        if not ok:
            raise Undecodable("streams_root mismatch: the states do not hash to the recorded root", fields)
        snap.__dict__["streams_root"] = root  # cached_property: already verified
        return fields, snap

    def load(self, path: str | os.PathLike[str]) -> Snapshot:
        """Read and verify one snapshot (a path listed by :meth:`list`, or any file).

        Raises :class:`SnapshotRejected` (``path``, ``reason``) when the file is unreadable,
        truncated or not CBOR, of another format version, fails its checksum or its streams root,
        or was taken of another topic. The model is not checked here (see :meth:`candidates`).
        """
        p = Path(path)
        try:
            return self._read(p)[1]
        except Undecodable as r:
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
            damaged = self._pieces_damaged(snap.dedup)
            if damaged is not None:
                yield info, SnapshotRejected(str(info.path), damaged)
                continue
            yield info, snap

    def _pieces_damaged(self, manifest: dict[str, Any], where: Path | None = None) -> str | None:
        """Why the dedup pieces ``manifest`` names are unusable (missing, truncated, altered), or
        None. They are beside the snapshot file (in ``where``, default this store's folder)."""
        folder = self.dedup if where is None or where == self.dir else DedupFolder(where)
        try:
            folder.check(manifest)
        except DedupIndexError as exc:
            return f"its dedup index is damaged: {exc}"
        return None

    def manifests(self) -> list[dict[str, Any]]:
        """The dedup manifests of the snapshot files there now (each file read once; one that does
        not read is left out: it is never used, so its pieces need not be kept)."""
        out = []
        for info in self.list():
            m = self._manifests.get(info.path.name)
            if m is None:
                try:
                    m = self._read(info.path)[1].dedup
                except Undecodable:
                    continue
            out.append(m)
        return out

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
            fields, snap = self._read(p)
            damaged = self._pieces_damaged(snap.dedup, p.parent)
            if damaged is not None:
                out["valid"], out["reason"] = False, damaged
        except Undecodable as r:
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
        """Store ``snap`` atomically, then prune to the newest ``keep``; the new file's path.

        A crash at any moment leaves either no new snapshot or a complete one, and older snapshots
        untouched. An existing snapshot is never overwritten (same entries and creation time get a
        ``-n`` suffix). :class:`~chainfold.errors.InvalidArgument` if ``snap`` is of another topic;
        :class:`BadInput` if a state cannot be encoded as CBOR.
        """
        if not isinstance(snap, Snapshot):
            raise InvalidArgument(f"not a Snapshot: {snap!r}")
        if snap.topic != self.topic:
            raise InvalidArgument(f"a snapshot of {snap.topic} does not belong in the store of {self.topic}")
        chunks, root = codec.encode(snap.fields())
        snap.__dict__["streams_root"] = root  # the cached_property, computed from the same bytes
        taken = {f.name for f in self.storage.list()}
        base = f"snap-{snap.entries:012d}-{snap.created:013d}"
        name = f"{base}.cbor"
        n = 0
        while name in taken:
            n += 1
            name = f"{base}-{n}.cbor"
        self.storage.write(name, chunks)
        self._manifests[name] = snap.dedup
        self._prune(keep=name)
        return self.storage.locate(name)

    def _prune(self, keep: str) -> None:
        for i, (_, info) in enumerate(self._scan()):
            if i >= self.keep and info.path.name != keep:
                self.storage.delete(info.path.name)
                self._manifests.pop(info.path.name, None)


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
        except InvalidArgument:
            b = None  # an invalid chain state: the summary shows what is there, without derived hashes
        if b is not None:
            pending = b.pending()
            item["provisional_head"] = pending.head.hex() if pending else None
            item["log_root"] = b.log_root().hex()
        parts.append(item)
    states = fields.get("states")
    dedup = fields.get("dedup")
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
        "seen": dedup.get("count") if isinstance(dedup, dict) else None,
        "dedup_pieces": len(dedup["pieces"]) if isinstance(dedup, dict) and isinstance(dedup.get("pieces"), list) else None,
        "streams_root": hexa(fields.get("streams_root")),
        "stats": render_json(fields.get("stats")),
        "on_model_error": fields.get("on_model_error"),
        "skipped": len(skipped) if isinstance(skipped := fields.get("skipped"), list) else None,
        "seq": _seq_summary(fields.get("seqs")),
    }


def _seq_summary(seqs: Any) -> dict[str, Any] | None:
    """Streams with a known highest seq, gaps and events without seq recorded in a body."""
    try:
        s = SeqGaps.restore(seqs)
    except ValueError:
        return None
    return {"streams": len(s.highest), "gaps": len(s.gaps), "unverifiable": s.unverifiable}

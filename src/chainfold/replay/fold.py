"""Where the fold is: models (docs/models.md) and the engine that folds log entries into states per stream.

A model is any object with ``initial(stream)`` and a pure ``apply(state, event)``; optionally
``render(state)`` (how a state appears in reports and exports), ``version`` (explicit model version),
and ``dump_state``/``load_state`` (how a state goes into a snapshot; identity by default).

:class:`Folder` is the replay engine: it decodes entries, reports malformed ones with their message
id (never folding them), folds each event id once (at its first entry), and keeps one state per
stream. Its memory grows with the number of streams and with the number of distinct event ids (the
set that makes replay idempotent), never with the payloads.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import json
import sys
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..envelope import Event, decode
from ..errors import MalformedEnvelope, ModelError, ModelNotFound
from ..log import Entry

__all__ = ["Model", "load_model", "Folder", "Malformed", "Duplicate", "render_json", "shard_of"]

def render_json(value: Any) -> Any:
    """A JSON-compatible copy of a rendered state (tuples → lists, bytes → hex, keys → str)."""
    if isinstance(value, dict):
        return {str(k): render_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [render_json(v) for v in value]
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).hex()
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


class Model:
    """A loaded model: the user's object plus defaults for the optional members.

    ``fingerprint`` identifies the model's code (and explicit ``version``): a snapshot taken with a
    different fingerprint is never used.
    """

    def __init__(self, obj: Any, *, name: str, source: bytes | None = None) -> None:
        if not callable(getattr(obj, "initial", None)) or not callable(getattr(obj, "apply", None)):
            raise ModelNotFound(f"{name} is not a model: it needs initial(stream) and apply(state, event)")
        self.obj = obj
        self.name = name
        self.initial: Callable[[str], Any] = obj.initial
        self.apply: Callable[[Any, Event], Any] = obj.apply
        self._render = getattr(obj, "render", None)
        self._dump = getattr(obj, "dump_state", None)
        self._load = getattr(obj, "load_state", None)
        self.version = str(getattr(obj, "version", "") or "")
        h = hashlib.sha256()
        h.update(source if source is not None else _source_of(obj))
        h.update(b"\x00version:" + self.version.encode())
        self.fingerprint = h.hexdigest()

    def render(self, state: Any) -> Any:
        """The state as JSON (the model's ``render`` if it has one)."""
        return render_json(self._render(state) if self._render is not None else state)

    def dump_state(self, state: Any) -> Any:
        """The state as a CBOR-encodable value, for snapshots."""
        return self._dump(state) if self._dump is not None else state

    def load_state(self, value: Any) -> Any:
        """Inverse of :meth:`dump_state`."""
        return self._load(value) if self._load is not None else value


def _source_of(obj: Any) -> bytes:
    """The code a model's behaviour comes from: its module's source file (or the object's source)."""
    mod = inspect.getmodule(obj) if not inspect.ismodule(obj) else obj
    parts: list[bytes] = []
    for candidate in (mod, type(obj) if not inspect.ismodule(obj) else None):
        if candidate is None:
            continue
        try:
            parts.append(inspect.getsource(candidate).encode())
            break
        except (OSError, TypeError):
            continue
    if not parts:
        parts.append(repr(obj).encode())
    return b"\n".join(parts)


def load_model(ref: str | Any) -> Model:
    """Load a model from ``package.module:attribute``, ``path/to/file.py:attribute``, a module path
    (``package.module``, whose functions are the model) or an object that already is one.

    Raises :class:`ModelNotFound` saying what could not be loaded.
    """
    if not isinstance(ref, str):
        return Model(ref, name=getattr(ref, "__name__", type(ref).__name__))
    target, _, attr = ref.partition(":")
    if target.endswith(".py") or "/" in target:
        path = Path(target)
        if not path.is_file():
            raise ModelNotFound(f"model file not found: {target}")
        modname = "chainfold_model_" + hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
        spec = importlib.util.spec_from_file_location(modname, path)
        if spec is None or spec.loader is None:
            raise ModelNotFound(f"cannot import {target}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[modname] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            raise ModelNotFound(f"importing {target} failed: {type(exc).__name__}: {exc}") from exc
    else:
        try:
            module = importlib.import_module(target)
        except Exception as exc:
            raise ModelNotFound(f"cannot import {target!r}: {type(exc).__name__}: {exc}") from exc
    if attr:
        try:
            obj = getattr(module, attr)
        except AttributeError:
            raise ModelNotFound(f"{target} has no attribute {attr!r}") from None
    else:
        obj = module
    try:
        source = Path(inspect.getfile(module)).read_bytes()
    except (OSError, TypeError):
        source = None
    if attr and not inspect.ismodule(obj):
        source = (source or b"") + b"\x00attr:" + attr.encode()
    return Model(obj, name=ref, source=source)


@dataclass(frozen=True, slots=True)
class Malformed:
    """A log entry that is not an event: never folded, always reported."""

    index: int
    message_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class Duplicate:
    """A log entry whose event id was already folded at an earlier entry."""

    index: int
    message_id: str
    event_id: str


_MISSING = object()


def unresolved_index(message_id: str) -> int | None:
    """The log position in a ``@index`` placeholder of a routed fold (see :meth:`Folder.feed`), or None."""
    return int(message_id[1:]) if message_id.startswith("@") else None


def shard_of(key: str, shards: int) -> int:
    """The shard (0 .. shards-1) of a message key or stream id: CRC-32 of its UTF-8 bytes, mod
    ``shards``. Stable across processes and versions (unlike ``hash``)."""
    return zlib.crc32(key.encode("utf-8", "surrogatepass")) % shards


@dataclass
class Folder:
    """Folds entries into one state per stream; each event id once; malformed entries reported.

    ``states`` and ``seen`` may come from a snapshot. ``streams`` restricts folding to those
    streams (others are decoded, deduplicated and counted, not applied). ``index`` is the log
    position of the next entry fed (entries covered so far).

    ``shard=(i, n)`` folds only the streams of shard ``i`` of ``n`` (:func:`shard_of`), for
    parallel replay: an entry whose message key belongs to another shard is skipped without
    decoding its payload; an entry without a key is decoded and folded only if its stream is in
    the shard (and reported as malformed by shard 0 only). An entry whose key and stream fall in
    different shards cannot be folded by either alone: it is counted in ``misrouted`` (the caller
    then replays serially).
    """

    model: Model
    states: dict[str, Any] = field(default_factory=dict)
    seen: set[str] = field(default_factory=set)
    index: int = 0
    applied: int = 0
    streams: frozenset[str] | None = None
    malformed: list[Malformed] = field(default_factory=list)
    duplicates: list[Duplicate] = field(default_factory=list)
    shard: tuple[int, int] | None = None
    misrouted: int = 0

    def feed(self, entries: Iterable[Entry], *, on_entry: Callable[[Entry], Any] | None = None,
             trace: Callable[[int, Entry, Event], Any] | None = None, hasher: Any = None,
             stops: tuple[int, Callable[[int, Entry], int]] | None = None, routed: bool = False) -> None:
        """Fold ``entries`` in order. ``on_entry(entry)`` is called for every entry first;
        ``trace(index, entry, event)`` for every event folded at its first entry (the reference
        sequence reconcile compares a worker with), whether or not its stream is selected.

        ``hasher`` and ``stops`` are :func:`chainfold.hashing.scan.scan_partition`'s, which folds and hashes
        in this one loop (it runs once per entry of every replay): ``hasher`` adds each entry's leaf
        hash to the chain before the entry is folded; ``stops=(n, callback)`` calls
        ``callback(entries fed so far, entry)`` once ``n`` entries are fed and folded, and again at
        the count it returns (-1: never).

        ``routed=True`` takes ``(index, payload, key)`` triples instead of entries (what a parallel
        rebuild's reader sends a fold worker, with the log positions of the entries): message ids
        are then unknown, and reports name an entry ``@index`` (:func:`unresolved_index`) for the
        reader to resolve.

        Raises :class:`ModelError` when the model raises; ``index`` then points at the failing entry.
        """
        states = self.states
        states_get = states.get
        seen = self.seen
        seen_add = seen.add
        initial = self.model.initial
        apply = self.model.apply
        only = self.streams
        index = self.index
        applied = self.applied
        malformed_add = self.malformed.append
        duplicates_add = self.duplicates.append
        missing = _MISSING
        hashing = hasher is not None
        if hashing:
            sha = hashlib.sha256
            add_leaf = hasher.chain.add_leaf
            leaves_add = hasher.leaves.append
            entries_add = hasher.entries.append
            close_segment = hasher.close_segment
            lazy = hasher.lazy_ids
        next_stop, on_stop = stops if stops is not None else (-1, None)
        sharded = self.shard is not None
        if sharded:
            mine, n_shards = self.shard  # type: ignore[misc]
            shard_cache: dict[str, int] = {}
        n = 0
        key = None
        try:
            for entry in entries:
                if routed:
                    index, payload, key = entry
                else:
                    payload = entry.payload
                n += 1
                if hashing:
                    leaf = sha(b"\x00" + payload).digest()
                    leaves_add(leaf)
                    entries_add(entry)
                    cp = add_leaf(leaf, entry if lazy else entry.message_id)
                    if cp is not None:
                        close_segment(cp)
                if on_entry is not None:
                    on_entry(entry)
                if sharded:
                    if not routed:
                        key = entry.key
                    if key is not None:
                        s = shard_cache.get(key)
                        if s is None:
                            if len(shard_cache) > 100_000:
                                shard_cache.clear()
                            s = shard_cache[key] = shard_of(key, n_shards)
                        if s != mine:  # another worker's: not even decoded
                            index += 1
                            if n == next_stop:
                                next_stop = on_stop(n, entry)
                            continue
                try:
                    ev = decode(payload)
                except MalformedEnvelope as exc:
                    if not sharded or key is not None or mine == 0:
                        malformed_add(Malformed(index, f"@{index}" if routed else str(entry.message_id), exc.reason))
                else:
                    stream = ev.stream
                    if sharded and (stream != key) and shard_of(stream, n_shards) != mine:
                        if key is not None:
                            self.misrouted += 1
                    else:
                        eid = ev.id
                        if eid in seen:
                            duplicates_add(Duplicate(index, f"@{index}" if routed else str(entry.message_id), eid))
                        else:
                            seen_add(eid)
                            if trace is not None:
                                trace(index, entry, ev)
                            if only is None or stream in only:
                                state = states_get(stream, missing)
                                try:
                                    if state is missing:
                                        state = initial(stream)
                                    states[stream] = apply(state, ev)
                                except Exception as exc:
                                    seen.discard(eid)
                                    raise ModelError(stream, eid, f"@{index}" if routed else str(entry.message_id),
                                                     exc) from exc
                                applied += 1
                index += 1
                if n == next_stop:
                    next_stop = on_stop(n, entry)
        finally:
            self.index = index
            self.applied = applied

    def rendered(self) -> dict[str, Any]:
        """The state export (docs/worker-evidence.md): ``{stream: rendered state}``, streams sorted."""
        render = self.model.render
        return {s: render(self.states[s]) for s in sorted(self.states)}


def state_export_json(states: dict[str, Any]) -> str:
    """Serialise a state export deterministically (sorted keys, one object)."""
    return json.dumps(states, sort_keys=True, separators=(",", ":"))

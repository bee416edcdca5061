"""Fold ``eventsourcing`` aggregates from the log: snapshots, hash chains and replay for them too.

An ``eventsourcing`` domain event becomes one chainfold :class:`~chainfold.envelope.Event`
(:func:`to_event`, :func:`events_from_aggregate`), and :class:`AggregateModel` turns such events
back into the domain events and lets them mutate the aggregate, exactly as the library's own
repository reconstructs it. Mapping of one domain event (envelope keys, docs/formats.md)::

    id      "<originator_id>:<originator_version>"     deterministic: republishing is idempotent
    stream  str(originator_id)
    seq     originator_version (shifted to start at 1 if the aggregate's INITIAL_VERSION is not 1)
    type    the event class's topic, get_topic(type(event)), e.g. "mymodule:Dog.Registered"
    time    the event's timestamp in whole milliseconds since the epoch (naive = UTC)
    data    the event's attributes except originator_id (which is the stream), including
            originator_version and the full-precision timestamp, plus "class_version" when the
            class has one > 1 (as eventsourcing's Mapper stores it), transcoded (below)

``data`` keeps ``originator_version`` although ``seq`` repeats it, because ``seq`` belongs to the
log: chainfold's writer assigns it, and a duplicated entry shifts the seqs after it, while the
aggregate's version must come from the event itself. ``time`` is only to the millisecond, so the
exact timestamp stays in ``data``.

Values that are not plain JSON/CBOR (UUID, datetime, Decimal, and whatever else a transcoding is
registered for) are written as ``{"_type_": name, "_data_": value}``, the convention of
eventsourcing's ``JSONTranscoder``: every value in ``data`` is exactly what that transcoder would
store for it (``data`` is the Mapper's stored state plus ``originator_version``), so it is valid
JSON (JSON Lines, state exports) and canonical CBOR alike.
:class:`CBORTranscoder` is that transcoding as an eventsourcing ``Transcoder`` writing canonical
CBOR bytes, usable by eventsourcing applications themselves
(``TRANSCODER_TOPIC=chainfold.es:CBORTranscoder``).

:class:`AggregateModel` is a pure model (docs/models.md): ``apply`` never changes the aggregate it is
given. It copies the aggregate first (:func:`copy_aggregate`, a deep copy that shares only
immutable values) and mutates the copy. Only the event classes of the aggregate class (and any
given in ``topics``) are accepted as event types: a log entry can never make the model import or
instantiate anything else.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import sys
from collections.abc import Mapping
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal
from enum import Enum
from fractions import Fraction
from typing import Any
from uuid import UUID

import cbor2
from eventsourcing.domain import BaseAggregate, CanInitAggregate, CanMutateAggregate, Snapshot
from eventsourcing.persistence import (
    DatetimeAsISO,
    DecimalAsStr,
    Transcoder,
    Transcoding,
    TranscodingNotRegisteredError,
    UUIDAsHex,
    find_id_convertor,
    str_to_uuid_convertor,
)
from eventsourcing.utils import get_topic

from .envelope import Event

__all__ = [
    "CBORTranscoder",
    "AggregateModel",
    "to_event",
    "events_from_aggregate",
    "event_id",
    "timestamp_ms",
    "copy_aggregate",
]

MAPPING_VERSION = "1"
"""Version of the domain event <-> envelope mapping above (part of every AggregateModel version)."""

_UUID_CACHE_SIZE = 1 << 16
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MS = timedelta(milliseconds=1)

# Exact types that are CBOR and JSON values as they are.
_PLAIN = frozenset({str, int, float, bool, type(None)})
# Exact types whose values never change: shared, never copied, by copy_aggregate.
_IMMUTABLE = frozenset(
    {str, int, float, bool, type(None), bytes, complex, UUID, datetime, date, time, timedelta,
     Decimal, Fraction, range, type}
)


class CBORTranscoder(Transcoder):
    """An eventsourcing ``Transcoder`` that writes deterministic CBOR (RFC 8949 §4.2.1).

    The interface of ``JSONTranscoder``: :meth:`register` a ``Transcoding``; :meth:`encode` to
    bytes, :meth:`decode` back. The standard transcodings (``UUIDAsHex``, ``DecimalAsStr``,
    ``DatetimeAsISO``) are registered on construction, because ``Application`` registers them
    only on ``JSONTranscoder`` instances; register your own after construction (e.g. in an
    overridden ``Application.construct_transcoder``).

    A transcoded object is written ``{"_type_": name, "_data_": value}`` as by ``JSONTranscoder``,
    so :meth:`to_value` gives exactly the structure ``JSONTranscoder`` would write as JSON: tuples
    become lists; subclasses of str, int and float (e.g. enums with those mixins) become their
    plain values; dict keys must be plain (str, int, float, bool, None). Unlike JSON, ``bytes``
    stay bytes (unless a transcoding for bytes is registered). Any other type without a
    registered transcoding raises ``TranscodingNotRegisteredError``.
    """

    def __init__(self) -> None:
        self.types: dict[type, Transcoding] = {}
        self.names: dict[str, Transcoding] = {}
        for transcoding in (UUIDAsHex(), DecimalAsStr(), DatetimeAsISO()):
            self.register(transcoding)

    def register(self, transcoding: Transcoding) -> None:
        """Registers given transcoding with the transcoder."""
        self.types[transcoding.type] = transcoding
        self.names[transcoding.name] = transcoding

    def encode(self, obj: Any) -> bytes:
        """``obj`` as canonical CBOR bytes: equal objects always give equal bytes."""
        return cbor2.dumps(self.to_value(obj), canonical=True)

    def decode(self, data: bytes) -> Any:
        """Decodes bytes previously encoded (also decodes any CBOR written by others)."""
        return self.from_value(cbor2.loads(data))

    def to_value(self, obj: Any) -> Any:
        """``obj`` as plain values (dict, list, str, int, float, bool, None, bytes), with
        registered types transcoded. Always builds new containers."""
        t = type(obj)
        if t in _PLAIN:
            return obj
        if t is dict:
            plain = _PLAIN
            return {
                k if type(k) in plain else self._key(k): v if type(v) in plain else self.to_value(v)
                for k, v in obj.items()
            }
        if t is list or t is tuple:
            return [self.to_value(v) for v in obj]
        # Subclasses of JSON's own types are written as JSON writes them (before transcodings).
        if isinstance(obj, str):
            return str.__str__(obj)
        if isinstance(obj, int):
            return int.__int__(obj)
        if isinstance(obj, float):
            return float.__float__(obj)
        if isinstance(obj, dict):
            return {self._key(k): self.to_value(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [self.to_value(v) for v in obj]
        transcoding = self.types.get(t)
        if transcoding is not None:
            return {"_type_": transcoding.name, "_data_": self.to_value(transcoding.encode(obj))}
        if t is bytes:
            return obj
        msg = (
            f"Object of type {t} is not serializable. Please define and register"
            " a custom transcoding for this type."
        )
        raise TranscodingNotRegisteredError(msg)

    def _key(self, key: Any) -> Any:
        if type(key) in _PLAIN or type(key) is bytes:
            return key
        if isinstance(key, str):
            return str.__str__(key)
        if isinstance(key, int):
            return int.__int__(key)
        if isinstance(key, float):
            return float.__float__(key)
        raise TypeError(f"dict keys must be str, int, float, bool, None or bytes, not {type(key).__name__}")

    def from_value(self, value: Any) -> Any:
        """Inverse of :meth:`to_value`: maps ``{"_type_", "_data_"}`` back to objects (inner ones
        first). Always builds new containers, so the result shares nothing mutable with ``value``."""
        t = type(value)
        if t is dict:
            plain = _PLAIN
            d = {k: v if type(v) in plain else self.from_value(v) for k, v in value.items()}
            if len(d) == 2 and "_type_" in d and "_data_" in d:
                name = d["_type_"]
                try:
                    transcoding = self.names[name]
                except (KeyError, TypeError):
                    msg = (
                        f"Data serialized with name '{name}' is not deserializable."
                        " Please register a custom transcoding for this type."
                    )
                    raise TranscodingNotRegisteredError(msg) from None
                return transcoding.decode(d["_data_"])
            return d
        if t is list or t is tuple:
            return [self.from_value(v) for v in value]
        return value


_DEFAULT_TRANSCODER = CBORTranscoder()


def event_id(originator_id: Any, originator_version: int) -> str:
    """The chainfold event id of a domain event: ``"<originator_id>:<originator_version>"``."""
    return f"{originator_id}:{originator_version}"


def timestamp_ms(timestamp: datetime) -> int:
    """Whole milliseconds since the Unix epoch (floor); a naive datetime is taken as UTC."""
    if timestamp.tzinfo is None:
        timestamp = timestamp.replace(tzinfo=timezone.utc)
    ms = (timestamp - _EPOCH) // _MS
    if ms < 0:
        raise ValueError(f"timestamp {timestamp.isoformat()} is before the Unix epoch")
    return ms


def to_event(
    domain_event: Any, *, transcoder: CBORTranscoder | None = None, initial_version: int = 1
) -> Event:
    """One ``eventsourcing`` domain event as a chainfold :class:`Event` (mapping in the module doc).

    ``initial_version`` is the aggregate class's ``INITIAL_VERSION``, so that ``seq`` starts at 1.
    """
    tr = transcoder or _DEFAULT_TRANSCODER
    state = dict(vars(domain_event))
    originator_id = state.pop("originator_id")
    version = state["originator_version"]
    class_version = getattr(type(domain_event), "class_version", 1)
    if class_version > 1:
        state["class_version"] = class_version
    timestamp = state.get("timestamp")
    if not isinstance(timestamp, datetime):
        raise ValueError(f"{type(domain_event).__qualname__} event has no datetime 'timestamp'")
    seq = version - initial_version + 1
    return Event(
        event_id(originator_id, version),
        str(originator_id),
        seq if seq >= 1 else None,
        get_topic(type(domain_event)),
        timestamp_ms(timestamp),
        tr.to_value(state),
    )


def events_from_aggregate(aggregate: Any, *, transcoder: CBORTranscoder | None = None) -> list[Event]:
    """Collect the aggregate's pending events (``aggregate.collect_events()``, so they are taken
    from it, as ``Application.save`` would) and map each with :func:`to_event`."""
    initial_version = getattr(type(aggregate), "INITIAL_VERSION", 1)
    return [
        to_event(e, transcoder=transcoder, initial_version=initial_version)
        for e in aggregate.collect_events()
    ]


def _copy_value(v: Any, memo: dict[int, Any]) -> Any:
    t = type(v)
    if t in _IMMUTABLE:
        return v
    done = memo.get(id(v))
    if done is not None:
        return done
    if t is dict:
        d: dict[Any, Any] = {}
        memo[id(v)] = d
        for k, x in v.items():
            d[k if type(k) in _IMMUTABLE else _copy_value(k, memo)] = _copy_value(x, memo)
        return d
    if t is list:
        out: list[Any] = []
        memo[id(v)] = out
        out.extend(_copy_value(x, memo) for x in v)
        return out
    if t is set:
        s = {x if type(x) in _IMMUTABLE else _copy_value(x, memo) for x in v}
        memo[id(v)] = s
        return s
    if t is tuple or t is frozenset:
        items = [_copy_value(x, memo) for x in v]
        if all(a is b for a, b in zip(items, v)):
            return v
        r = t(items)
        memo[id(v)] = r
        return r
    if isinstance(v, Enum):
        return v
    return copy.deepcopy(v, memo)


def copy_aggregate(aggregate: Any) -> Any:
    """A copy of ``aggregate`` that shares no mutable value with it (as ``copy.deepcopy``, but
    immutable values such as UUIDs, datetimes, Decimals, strings and numbers are shared instead of
    copied, which makes it several times faster), with an empty list of pending events."""
    memo: dict[int, Any] = {}
    src = aggregate.__dict__
    state = {}
    for k, v in src.items():
        state[k] = v if type(v) in _IMMUTABLE else _copy_value(v, memo)
    if "_pending_events" in state:
        state["_pending_events"] = []
    new = object.__new__(type(aggregate))
    object.__setattr__(new, "__dict__", state)
    return new


def _jsonable(v: Any) -> Any:
    t = type(v)
    if t in _PLAIN:
        return v
    if isinstance(v, Mapping):
        return {str(_jsonable(k)): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (set, frozenset)):
        items = [_jsonable(x) for x in v]
        return sorted(items, key=repr)
    if isinstance(v, Enum):
        return _jsonable(v.value)
    if isinstance(v, (datetime, date, time)):
        return v.isoformat()
    if isinstance(v, (bytes, bytearray)):
        return bytes(v).hex()
    if isinstance(v, str):
        return str.__str__(v)
    if isinstance(v, int):
        return int.__int__(v)
    if isinstance(v, float):
        return float.__float__(v)
    return str(v)  # UUID, Decimal, timedelta, ...


def _event_classes(aggregate_cls: type) -> dict[str, type]:
    """Topic -> class of every domain event class reachable as an attribute of the aggregate class."""
    found: dict[str, type] = {}
    for name in dir(aggregate_cls):
        value = getattr(aggregate_cls, name, None)
        if isinstance(value, type) and issubclass(value, CanMutateAggregate):
            found[get_topic(value)] = value
    return found


def _source_hash(cls: type) -> str:
    module = sys.modules.get(cls.__module__)
    try:
        source = inspect.getsource(module) if module is not None else None
    except (OSError, TypeError):
        source = None
    if source is None:
        return ""
    return hashlib.sha256(source.encode()).hexdigest()[:16]


class AggregateModel:
    """A chainfold model (docs/models.md) whose states are instances of an ``eventsourcing`` aggregate class.

    ``initial(stream)`` is ``None`` (no aggregate yet); ``apply`` turns the envelope back into the
    domain event and calls ``domain_event.mutate()`` on a copy of the aggregate (so the given
    state is never changed); ``render`` gives the aggregate's public attributes as JSON, plus
    ``id``, ``version``, ``created_on`` and ``modified_on``; ``dump_state``/``load_state`` go
    through the aggregate's ``Snapshot`` class (``Snapshot.take`` / ``Snapshot.mutate``), so
    chainfold snapshots hold aggregates exactly as eventsourcing snapshots do (upcasting included).

    ``topics`` adds event classes by topic (e.g. the old topic of a renamed event class). The
    ``transcoder`` must have the transcodings the events were written with (default: a
    :class:`CBORTranscoder` with the standard ones).

    Errors (raised from ``apply``; the fold reports them with the event id): ``ValueError`` for an
    event type that is not an event of this aggregate, a first event that does not create the
    aggregate, a created event on an existing aggregate, or a stream that is not a valid id; the
    library's ``OriginatorVersionError`` for an event out of sequence.
    """

    def __init__(
        self,
        aggregate_cls: type[BaseAggregate[Any]],
        *,
        transcoder: CBORTranscoder | None = None,
        topics: Mapping[str, type] | None = None,
    ) -> None:
        if not (isinstance(aggregate_cls, type) and issubclass(aggregate_cls, BaseAggregate)):
            raise TypeError(f"{aggregate_cls!r} is not an eventsourcing aggregate class")
        self.aggregate_cls = aggregate_cls
        self.transcoder = transcoder or _DEFAULT_TRANSCODER
        self.topic = get_topic(aggregate_cls)
        self.event_classes: dict[str, type] = _event_classes(aggregate_cls)
        self.event_classes.update(topics or {})
        self.snapshot_class: type = getattr(aggregate_cls, "Snapshot", None) or Snapshot
        h = _source_hash(aggregate_cls)
        self.version = f"{MAPPING_VERSION}:{self.topic}" + (f":{h}" if h else "")
        """Explicit model version: the mapping version, the aggregate's topic and a hash of the
        source of the module defining it (so snapshots are rebuilt when that code changes)."""
        self._resolved: dict[str, tuple[type, Any, int, bool]] = {}
        self._uuids: dict[str, UUID] = {}  # stream -> UUID: parsing is a third of to_domain_event

    def __repr__(self) -> str:
        return f"AggregateModel({self.aggregate_cls.__qualname__})"

    # -- the model protocol ------------------------------------------------------------------

    def initial(self, stream: str) -> None:
        """No aggregate before the first event of a stream."""
        return None

    def apply(self, state: Any, event: Any) -> Any:
        """The aggregate after ``event``: a new object; ``state`` is left as it was."""
        domain_event, creates = self._to_domain_event(event)
        if state is None:
            if not creates:
                raise ValueError(
                    f"event {event.id!r} ({event.type}) is the first of stream {event.stream!r}"
                    f" but does not create a {self.aggregate_cls.__qualname__}"
                )
            topic = domain_event.__dict__.get("originator_topic")
            if topic != self.topic:
                raise ValueError(
                    f"event {event.id!r} creates {topic!r}, not {self.topic!r}"
                )
            return domain_event.mutate(None)
        if creates:
            raise ValueError(
                f"event {event.id!r} ({event.type}) would create stream {event.stream!r} again"
                f" (the aggregate is at version {state.version})"
            )
        return domain_event.mutate(copy_aggregate(state))

    def render(self, state: Any) -> Any:
        """JSON: ``id``, ``version``, ``created_on``, ``modified_on`` and the public attributes
        (UUIDs, Decimals as strings; datetimes in ISO 8601; sets as sorted lists)."""
        if state is None:
            return None
        out: dict[str, Any] = {
            "id": str(state.id),
            "version": state.version,
            "created_on": _jsonable(state.created_on),
            "modified_on": _jsonable(state.modified_on),
        }
        for key, value in vars(state).items():
            if not key.startswith("_"):
                out[key] = _jsonable(value)
        return out

    def dump_state(self, state: Any) -> Any:
        """The aggregate as a CBOR (and JSON) value, via ``Snapshot.take``:
        ``{"topic", "originator_id", "originator_version", "state"}`` (no timestamp: the same
        aggregate always dumps to the same value)."""
        if state is None:
            return None
        snapshot = self.snapshot_class.take(state)
        tr = self.transcoder
        return {
            "topic": snapshot.topic,
            "originator_id": tr.to_value(snapshot.originator_id),
            "originator_version": snapshot.originator_version,
            "state": tr.to_value(snapshot.state),
        }

    def load_state(self, value: Any) -> Any:
        """Inverse of :meth:`dump_state` (through ``Snapshot.mutate``, which upcasts old states)."""
        if value is None:
            return None
        if not isinstance(value, dict) or set(value) != {
            "topic", "originator_id", "originator_version", "state"
        }:
            raise ValueError("not a dumped aggregate state")
        if value["topic"] != self.topic:
            raise ValueError(f"dumped state is a {value['topic']!r}, not a {self.topic!r}")
        tr = self.transcoder
        snapshot = object.__new__(self.snapshot_class)
        object.__setattr__(
            snapshot,
            "__dict__",
            {
                "originator_id": tr.from_value(value["originator_id"]),
                "originator_version": value["originator_version"],
                "timestamp": None,
                "topic": value["topic"],
                "state": tr.from_value(value["state"]),
            },
        )
        return snapshot.mutate(None)

    # -- envelope -> domain event ------------------------------------------------------------

    def to_domain_event(self, event: Any) -> Any:
        """The ``eventsourcing`` domain event an envelope carries (inverse of :func:`to_event`)."""
        return self._to_domain_event(event)[0]

    def _resolve(self, topic: str) -> tuple[type, Any, int, bool]:
        info = self._resolved.get(topic)
        if info is None:
            cls = self.event_classes.get(topic)
            if cls is None:
                raise ValueError(
                    f"event type {topic!r} is not an event of {self.aggregate_cls.__qualname__}"
                )
            info = (
                cls,
                find_id_convertor(cls, str),
                getattr(cls, "class_version", 1),
                issubclass(cls, CanInitAggregate),
            )
            self._resolved[topic] = info
        return info

    def _to_domain_event(self, event: Any) -> tuple[Any, bool]:
        cls, convert_id, class_version, creates = self._resolve(event.type)
        state = self.transcoder.from_value(event.data)
        if type(state) is not dict:
            raise ValueError(f"event {event.id!r}: data is not the state of a domain event")
        if "originator_version" not in state:
            if event.seq is None:
                raise ValueError(f"event {event.id!r} has neither data.originator_version nor seq")
            state["originator_version"] = event.seq
        stream = event.stream
        originator_id = self._uuids.get(stream) if convert_id is str_to_uuid_convertor else None
        if originator_id is None:
            try:
                originator_id = convert_id(stream)
            except ValueError:
                raise ValueError(f"stream {stream!r} is not a valid id for {cls.__qualname__}") from None
            if convert_id is str_to_uuid_convertor:
                if len(self._uuids) >= _UUID_CACHE_SIZE:
                    self._uuids.clear()
                self._uuids[stream] = originator_id
        state["originator_id"] = originator_id
        from_version = state.pop("class_version", 1)
        while from_version < class_version:
            getattr(cls, f"upcast_v{from_version}_v{from_version + 1}")(state)
            from_version += 1
        domain_event = object.__new__(cls)
        object.__setattr__(domain_event, "__dict__", state)
        return domain_event, creates

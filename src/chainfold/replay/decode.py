"""The decode stage: where bytes become events, malformed entries are reported and duplicates dropped.

:class:`Decoder` takes a batch of entries (from the source and hash stages) and passes on the
well-formed events whose id was never seen before, in log order (:class:`Decoded`), for the fold.
A payload that is not an envelope (docs/formats.md) is a :class:`Malformed` entry (reported with its message
id, never folded); an event whose id was folded at an earlier entry is a :class:`Duplicate`. Which
ids were seen is a :class:`~chainfold.replay.seen.SeenIds`, asked once per batch.

For replay in several processes, a decoder can serve one :class:`Shard` of the streams (entries
keyed to another shard are not even decoded), and can take :class:`Routed` batches: entries sent
to a worker process without their message ids, named ``@index`` until the sender resolves them
(:func:`unresolved_index`).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from ..envelope import Event, decode
from ..errors import MalformedEnvelope
from ..log import Entry
from .seen import SeenIds, SeenSet

__all__ = ["Malformed", "Duplicate", "Decoded", "Routed", "Shard", "Decoder", "SeqGap", "SeqGaps", "shard_of",
           "unresolved_index"]


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


def shard_of(key: str, shards: int) -> int:
    """The shard (0 .. shards-1) of a message key or stream id: CRC-32 of its UTF-8 bytes, mod
    ``shards``. Stable across processes and versions (unlike ``hash``)."""
    return zlib.crc32(key.encode("utf-8", "surrogatepass")) % shards


def unresolved_index(message_id: str) -> int | None:
    """The log position in an ``@index`` placeholder of a routed batch, or None."""
    return int(message_id[1:]) if message_id.startswith("@") else None


class Routed(NamedTuple):
    """Entries of one partition sent to a fold worker: their log indexes and payloads, and their
    message keys when the worker serves a shard (else None). Message ids stay with the sender."""

    indexes: Sequence[int]
    payloads: list[bytes]
    keys: list[str | None] | None


class Decoded:
    """A batch after the decode stage: ``events``, the well-formed events seen for the first time,
    in log order; :meth:`index`, :meth:`message_id` and :meth:`payload` tell where event ``j`` came
    from."""

    __slots__ = ("events", "_at", "_indexes", "_entries", "_payloads")

    def __init__(self, events: list[Event], at: list[int] | None, indexes: Sequence[int],
                 entries: Sequence[Entry] | None, payloads: Sequence[bytes]) -> None:
        self.events = events
        self._at = at  # offset in the batch of each event; None: event j is entry j
        self._indexes = indexes
        self._entries = entries
        self._payloads = payloads

    def offset(self, j: int) -> int:
        """Where in the batch event ``j`` was (its entry's position in the list fed)."""
        return j if self._at is None else self._at[j]

    def index(self, j: int) -> int:
        """Log index of event ``j``."""
        return self._indexes[self.offset(j)]

    def offsets(self) -> Sequence[int]:
        """:meth:`offset` of every event, in order (one call for a whole batch)."""
        return range(len(self.events)) if self._at is None else self._at

    def indexes(self) -> list[int]:
        """:meth:`index` of every event, in order (one call for a whole batch)."""
        ix = self._indexes
        return list(ix[:len(self.events)]) if self._at is None else [ix[k] for k in self._at]

    def message_id(self, j: int) -> str:
        """Message id of event ``j`` (``@index`` in a routed batch)."""
        k = self.offset(j)
        return f"@{self._indexes[k]}" if self._entries is None else str(self._entries[k].message_id)

    def payload(self, j: int) -> bytes:
        """The payload event ``j`` was decoded from."""
        return self._payloads[self.offset(j)]


class Shard:
    """Shard ``index`` of ``count``: the streams (and message keys) that :func:`shard_of` puts there."""

    def __init__(self, index: int, count: int) -> None:
        self.index = index
        self.count = count
        self._cache: dict[str, int] = {}

    def of(self, key: str) -> int:
        s = self._cache.get(key)
        if s is None:
            if len(self._cache) > 100_000:
                self._cache.clear()
            s = self._cache[key] = shard_of(key, self.count)
        return s


@dataclass
class Decoder:
    """Decode stage (see the module doc).

    Contract: :meth:`feed` takes the entries at log indexes ``start, start+1, ...`` and returns
    the events to fold; every entry is accounted for: a malformed one in :attr:`malformed`, a
    duplicate in :attr:`duplicates`, the rest in the result (recorded in :attr:`seen`). With a
    ``shard``, only entries of that shard are: an entry keyed to another shard is skipped undecoded;
    an entry without a key is decoded, passed on only if its stream is in the shard, and reported
    as malformed by shard 0 only; an entry whose key and stream fall in different shards cannot be
    folded by either alone and is counted in :attr:`misrouted` (the caller then replays serially).
    :attr:`index` is the log index after the last entry fed.
    """

    seen: SeenIds = field(default_factory=SeenSet)
    shard: Shard | None = None
    well_formed: Callable[[Decoded], None] | None = None
    """Called with every batch's well-formed events, duplicates included, before deduplication
    (what a per-stream ``seq`` check needs: :class:`SeqGaps`)."""
    malformed: list[Malformed] = field(default_factory=list)
    duplicates: list[Duplicate] = field(default_factory=list)
    misrouted: int = 0
    index: int = 0

    def feed(self, entries: Sequence[Entry], start: int) -> Decoded:
        """Decode ``entries`` (log indexes from ``start``)."""
        self.index = start + len(entries)
        indexes = range(start, start + len(entries))
        payloads = [e.payload for e in entries]
        if self.shard is None:
            return self._decode(payloads, indexes, None, entries)
        keys = [e.key for e in entries]
        mine = self._keyed_here(keys)
        if len(mine) != len(entries):
            return self._decode([payloads[k] for k in mine], [indexes[k] for k in mine], [keys[k] for k in mine],
                                [entries[k] for k in mine])
        return self._decode(payloads, indexes, keys, entries)

    def feed_routed(self, batch: Routed) -> Decoded:
        """Decode a routed batch (message ids unknown: reports name entries ``@index``)."""
        if len(batch.indexes):
            self.index = batch.indexes[-1] + 1
        return self._decode(batch.payloads, batch.indexes, batch.keys, None)

    def _keyed_here(self, keys: list[str | None]) -> list[int]:
        """Offsets of the entries this shard decodes: keyless ones, and those keyed to it."""
        assert self.shard is not None
        of, mine = self.shard.of, self.shard.index
        return [k for k, key in enumerate(keys) if key is None or of(key) == mine]

    def _decode(self, payloads: Sequence[bytes], indexes: Sequence[int], keys: Sequence[str | None] | None,
                entries: Sequence[Entry] | None) -> Decoded:
        events: list[Event] = []
        append = events.append
        at: list[int] | None = None
        for k, payload in enumerate(payloads):
            try:
                ev = decode(payload)
            except MalformedEnvelope as exc:
                if at is None:
                    at = list(range(k))  # every entry before this one was an event
                if self.shard is None or keys is None or keys[k] is not None or self.shard.index == 0:
                    name = f"@{indexes[k]}" if entries is None else str(entries[k].message_id)
                    self.malformed.append(Malformed(indexes[k], name, exc.reason))
                continue
            if at is not None:
                at.append(k)
            append(ev)
        if self.shard is not None and events:
            events, at = self._in_shard(events, at, keys)
        decoded = Decoded(events, at, indexes, entries, payloads)
        if self.well_formed is not None:
            self.well_formed(decoded)
        return self._first_seen(decoded) if events else decoded

    def _in_shard(self, events: list[Event], at: list[int] | None,
                  keys: Sequence[str | None] | None) -> tuple[list[Event], list[int] | None]:
        """The events whose stream is in the shard; those keyed here with a stream elsewhere are
        counted as misrouted."""
        assert self.shard is not None
        of, mine = self.shard.of, self.shard.index
        kept, kept_at = [], []
        for j, ev in enumerate(events):
            k = j if at is None else at[j]
            key = keys[k] if keys is not None else None
            if ev.stream != key and of(ev.stream) != mine:
                if key is not None:
                    self.misrouted += 1
                continue
            kept.append(ev)
            kept_at.append(k)
        return kept, kept_at

    def _first_seen(self, d: Decoded) -> Decoded:
        """The batch without the events whose id was seen before (reported as duplicates)."""
        new = self.seen.add_new([ev.id for ev in d.events])
        if all(new):
            return d
        kept, kept_at = [], []
        for j, (ev, first) in enumerate(zip(d.events, new)):
            if first:
                kept.append(ev)
                kept_at.append(d.offset(j))
            else:
                self.duplicates.append(Duplicate(d.index(j), d.message_id(j), ev.id))
        return Decoded(kept, kept_at, d._indexes, d._entries, d._payloads)



@dataclass(frozen=True, slots=True)
class SeqGap:
    """Events missing from the log itself: stream ``stream`` jumps to ``found_seq`` where
    ``expected_seq`` was due, at log index ``index`` (docs/cli.md, history)."""

    stream: str
    expected_seq: int
    found_seq: int
    message_id: str
    index: int = -1

    def to_json(self) -> dict[str, Any]:
        return {"stream": self.stream, "expected_seq": self.expected_seq, "found_seq": self.found_seq,
                "message_id": self.message_id}


@dataclass
class SeqGaps:
    """The per-stream ``seq`` check, as a :attr:`Decoder.well_formed` hook: over a stream's
    well-formed entries in log order, a first ``seq`` above 1 or one more than 1 above the highest
    seen before it is a gap (a repeated or lower one, as a re-sent copy carries, is not); entries
    without ``seq`` cannot be checked and are counted. Memory: one int per stream (and the gaps).

    A check can resume where another stopped (:meth:`state`, :meth:`restore`: what a snapshot
    stores), and checks of consecutive ranges of a log, each started empty, combine into the check
    of the whole (:meth:`then`)."""

    highest: dict[str, int] = field(default_factory=dict)
    gaps: list[SeqGap] = field(default_factory=list)
    unverifiable: int = 0
    lost_start: bool = False
    """While set, a stream seen for the first time starts its check at its first ``seq``: the part
    of the log being read is known to have lost its first entries (reported as a truncation)."""

    def __call__(self, d: Decoded) -> None:
        highest = self.highest
        lost_start = self.lost_start
        for j, ev in enumerate(d.events):
            seq = ev.seq
            if seq is None:
                self.unverifiable += 1
                continue
            top = highest.get(ev.stream, 0)
            if not top and lost_start:
                highest[ev.stream] = seq
                continue
            if seq > top:
                if seq > top + 1:
                    self.gaps.append(SeqGap(ev.stream, top + 1, seq, d.message_id(j), d.index(j)))
                highest[ev.stream] = seq

    def state(self) -> dict[str, Any]:
        """What a snapshot stores to resume the check (plain values, CBOR- and JSON-able)."""
        return {"highest": dict(self.highest), "unverifiable": self.unverifiable,
                "gaps": [[g.stream, g.expected_seq, g.found_seq, g.message_id, g.index] for g in self.gaps]}

    @classmethod
    def restore(cls, state: Mapping[str, Any] | None) -> SeqGaps:
        """The check as :meth:`state` left it (``None``: a fresh one). ``ValueError`` when
        ``state`` does not have that shape."""
        if state is None:
            return cls()
        try:
            highest, unverifiable, gaps = state["highest"], state["unverifiable"], state["gaps"]
        except (KeyError, TypeError):
            raise ValueError("seq state must have highest, unverifiable and gaps") from None
        if not (isinstance(highest, dict) and all(type(k) is str and type(v) is int and v >= 1
                                                   for k, v in highest.items())):
            raise ValueError("seq state: highest must map streams to seqs")
        if type(unverifiable) is not int or unverifiable < 0 or not isinstance(gaps, list):
            raise ValueError("seq state: bad unverifiable count or gaps")
        out = []
        for g in gaps:
            if not (isinstance(g, list) and len(g) == 5 and type(g[0]) is str and type(g[1]) is int
                    and type(g[2]) is int and type(g[3]) is str and type(g[4]) is int):
                raise ValueError(f"seq state: bad gap {g!r}")
            out.append(SeqGap(*g))
        return cls(dict(highest), out, unverifiable)

    def fork(self) -> SeqGaps:
        """A check that continues this one for some of the streams (a shard or a partition folded
        in another process): the highest seqs, no gaps yet; brought back with :meth:`join`."""
        return SeqGaps(dict(self.highest))

    def join(self, forks: Sequence[SeqGaps], key: Callable[[SeqGap], Any] | None = None) -> None:
        """Take back the :meth:`fork` checks of disjoint sets of streams: their highest seqs,
        their gaps (sorted by ``key``, default the log index) and their unchecked events."""
        new: list[SeqGap] = []
        for f in forks:
            for s, top in f.highest.items():
                if top > self.highest.get(s, 0):
                    self.highest[s] = top
            new.extend(f.gaps)
            self.unverifiable += f.unverifiable
        new.sort(key=key or (lambda g: g.index))
        self.gaps.extend(new)

    def then(self, later: SeqGaps) -> None:
        """Continue this check with ``later``, the check of the entries that follow, started
        empty (a range checked in another process): its gaps are kept where they are gaps after
        what this check saw, with the seq then due. Exact: a gap after this check's entries is a
        gap of the range alone too (its highest before is never higher)."""
        before = self.highest
        for g in later.gaps:
            top = max(before.get(g.stream, 0), g.expected_seq - 1)
            if g.found_seq > top + 1:
                self.gaps.append(g if top + 1 == g.expected_seq else
                                 SeqGap(g.stream, top + 1, g.found_seq, g.message_id, g.index))
        merged = dict(before)
        for s, top in later.highest.items():
            if top > merged.get(s, 0):
                merged[s] = top
        self.highest = merged
        self.unverifiable += later.unverifiable

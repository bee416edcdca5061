"""The fold stage: where the fold happens, one state per stream, the model applied in log order.

:class:`FoldStage` takes the events the decode stage passes on (each event id once, in log order)
and applies the model (:mod:`chainfold.replay.model`) to each stream's state. Its memory grows
with the number of streams, never with the events.

What happens when the model raises is a policy (``on_error``; docs/cli.md, poison events): ``stop``
(the default: :class:`~chainfold.errors.ModelError` names the stream, event and message id),
``skip-event`` (the stream folds on without that event) or ``skip-stream`` (the stream keeps its
last good state and folds none of its later events); every event left out is listed in
:attr:`FoldStage.skipped`. Either skip policy gives the states of folding the log without the
events it lists. The policy lives here, so every engine that folds (serial, worker processes,
Spark executors) applies it identically; the commands report ``skipped`` (:meth:`Skipped.to_json`),
exit 1, and snapshots record it (:meth:`Skipped.record`, :meth:`FoldStage.resume`).

:class:`Folder` is the convenience the library offers for folding entries directly: the decode
stage and the fold stage together.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import islice
from typing import Any, Literal

from ..errors import InvalidArgument, ModelError
from ..log import Entry
from .decode import Decoded, Decoder, Duplicate, Malformed, Routed, SeqGaps, Shard
from .model import Model
from .seen import SeenIds, SeenSet

__all__ = ["FoldStage", "Skipped", "OnModelError", "ON_MODEL_ERROR", "check_policy", "Folder", "state_export_json"]

OnModelError = Literal["stop", "skip-event", "skip-stream"]
ON_MODEL_ERROR: tuple[OnModelError, ...] = ("stop", "skip-event", "skip-stream")
"""The policies, the default first (``--on-model-error``; docs/cli.md#poison-events)."""


def check_policy(on_error: str) -> OnModelError:
    """``on_error`` if it names a policy, else :class:`~chainfold.errors.InvalidArgument`."""
    if on_error not in ON_MODEL_ERROR:
        raise InvalidArgument(f"on_error must be stop, skip-event or skip-stream, not {on_error!r}")
    return on_error  # type: ignore[return-value]

_MISSING = object()


@dataclass(frozen=True, slots=True)
class Skipped:
    """An event the model failed on and a skip policy left out."""

    index: int
    message_id: str
    stream: str
    event_id: str
    error: str

    def to_json(self) -> dict[str, str]:
        """As reports list it: ``{"event_id", "message_id", "stream", "error"}``."""
        return {"event_id": self.event_id, "message_id": self.message_id, "stream": self.stream, "error": self.error}

    def record(self) -> dict[str, Any]:
        """As a snapshot stores it: the report's keys and the entry's log ``index`` in its partition."""
        return dict(self.to_json(), index=self.index)

    @classmethod
    def from_record(cls, r: dict[str, Any]) -> Skipped:
        """Back from :meth:`record` (``ValueError`` on a map of another shape)."""
        if not isinstance(r, dict) or set(r) != _RECORD_KEYS or type(r["index"]) is not int or \
                not all(type(r[k]) is str for k in _RECORD_KEYS - {"index"}):
            raise ValueError(f"a skipped event is {{{', '.join(sorted(_RECORD_KEYS))}}}, not {r!r}")
        return cls(r["index"], r["message_id"], r["stream"], r["event_id"], r["error"])


_RECORD_KEYS = frozenset({"index", "message_id", "stream", "event_id", "error"})


class FoldStage:
    """Fold stage (see the module doc).

    Contract: :meth:`feed` applies ``model.apply`` to the events of each decoded batch in order,
    starting each stream from ``model.initial(stream)`` (or from ``states``, e.g. a snapshot's);
    with ``streams``, only those streams are folded (the others are passed over). :attr:`applied`
    counts the events applied. A model that raises is handled by ``on_error``.
    """

    def __init__(self, model: Model, states: dict[str, Any] | None = None, *,
                 streams: frozenset[str] | None = None, on_error: OnModelError = "stop") -> None:
        self.model = model
        self.states: dict[str, Any] = states if states is not None else {}
        self.streams = streams
        self.on_error = check_policy(on_error)
        self.applied = 0
        self.skipped: list[Skipped] = []
        self.frozen: dict[str, str] = {}  # streams skip-stream stopped folding → the event that stopped them

    def _selector(self) -> Callable[[str], bool] | None:
        """Which streams are folded: None for all (the common case, checked once per event)."""
        only, frozen = self.streams, self.frozen
        if only is None and not frozen:
            return None
        if not frozen:
            return only.__contains__  # type: ignore[union-attr]
        return lambda s: (only is None or s in only) and s not in frozen

    def feed(self, batch: Decoded) -> None:
        """Fold the batch's events."""
        j = 0
        while j < len(batch.events):
            j = self._apply(batch, j)

    def _apply(self, batch: Decoded, start: int) -> int:
        """Apply events ``start..``; the position after the last one handled (all of them, or the
        one that failed and was skipped)."""
        states = self.states
        get = states.get
        initial, apply = self.model.initial, self.model.apply
        select = self._selector()
        missing = _MISSING
        events = batch.events if not start else batch.events[start:]
        j = start
        applied = 0
        frozen = self.frozen
        try:
            for ev in events:
                stream = ev.stream
                if select is None or select(stream):
                    state = get(stream, missing)
                    if state is missing:
                        state = initial(stream)
                    states[stream] = apply(state, ev)
                    applied += 1
                elif stream in frozen:
                    self._skip(batch, j, frozen[stream])
                j += 1
        except Exception as exc:  # noqa: BLE001 - whatever the user's model raises is handled by the policy
            self.applied += applied
            self._failed(batch, j, exc)
            return j + 1
        self.applied += applied
        return j

    def _failed(self, batch: Decoded, j: int, exc: Exception) -> None:
        ev = batch.events[j]
        if self.on_error == "stop":
            raise ModelError(ev.stream, ev.id, batch.message_id(j), exc, index=batch.index(j)) from exc
        self._skip(batch, j, f"{type(exc).__name__}: {exc}")
        if self.on_error == "skip-stream":
            self._freeze(ev.stream, ev.id)

    def _freeze(self, stream: str, event_id: str) -> None:
        self.frozen[stream] = f"stream {stream!r} skipped since event {event_id!r} failed"

    def _skip(self, batch: Decoded, j: int, error: str) -> None:
        ev = batch.events[j]
        self.skipped.append(Skipped(batch.index(j), batch.message_id(j), ev.stream, ev.id, error))

    def resume(self, skipped: Iterable[Skipped], *, keep: bool = True) -> None:
        """Go on from a snapshot that skipped ``skipped`` under this stage's policy: under
        ``skip-stream`` their streams stay frozen; with ``keep`` they head :attr:`skipped` (a worker
        that reports only its own skips passes ``keep=False``)."""
        skipped = list(skipped)
        if keep:
            self.skipped[:0] = skipped
        if self.on_error == "skip-stream":
            for sk in skipped:
                if sk.stream not in self.frozen:
                    self._freeze(sk.stream, sk.event_id)

    def rendered(self) -> dict[str, Any]:
        """The state export (docs/worker-evidence.md): ``{stream: rendered state}``, streams sorted."""
        render = self.model.render
        return {s: render(self.states[s]) for s in sorted(self.states)}


_BATCH = 1024


class Folder:
    """Folds log entries into one state per stream: the decode stage and the fold stage together.

    Each event id is folded once (at its first entry); malformed entries are reported, never
    folded. ``states`` and ``seen`` may come from a snapshot; ``streams`` restricts folding to those
    streams; ``shard=(i, n)`` decodes and folds shard ``i`` of ``n`` only (see
    :class:`~chainfold.replay.decode.Decoder`). ``index`` is the log position of the next entry fed.
    ``seqs`` checks every stream's ``seq`` for gaps as the events pass (a fresh
    :class:`~chainfold.replay.decode.SeqGaps` by default; a snapshot's to continue its check).
    """

    def __init__(self, model: Model, states: dict[str, Any] | None = None, seen: SeenIds | Iterable[str] = (), *,
                 index: int = 0, streams: frozenset[str] | None = None, shard: tuple[int, int] | None = None,
                 on_error: OnModelError = "stop", seqs: SeqGaps | None = None) -> None:
        self.model = model
        self.seqs = seqs if seqs is not None else SeqGaps()
        self.decoder = Decoder(seen if isinstance(seen, SeenIds) else SeenSet(seen),
                               shard=Shard(*shard) if shard is not None else None, index=index,
                               well_formed=self.seqs)
        self.fold = FoldStage(model, states, streams=streams, on_error=on_error)

    @property
    def states(self) -> dict[str, Any]:
        return self.fold.states

    @states.setter
    def states(self, value: dict[str, Any]) -> None:
        self.fold.states = value

    @property
    def seen(self) -> SeenIds:
        return self.decoder.seen

    @property
    def index(self) -> int:
        return self.decoder.index

    @index.setter
    def index(self, value: int) -> None:
        self.decoder.index = value

    def feed(self, entries: Iterable[Entry]) -> None:
        """Fold ``entries`` (the next ones of the partition, in log order)."""
        it = iter(entries)
        while batch := list(islice(it, _BATCH)):
            self.feed_batch(batch)

    def feed_batch(self, entries: list[Entry]) -> Decoded:
        """Fold one batch; the decoded events (for callers that look at them too)."""
        decoded = self.decoder.feed(entries, self.decoder.index)
        self.fold.feed(decoded)
        return decoded

    def feed_routed(self, batch: Routed) -> None:
        """Fold a routed batch (see :class:`~chainfold.replay.decode.Routed`)."""
        self.fold.feed(self.decoder.feed_routed(batch))

    @property
    def malformed(self) -> list[Malformed]:
        return self.decoder.malformed

    @property
    def duplicates(self) -> list[Duplicate]:
        return self.decoder.duplicates

    @property
    def applied(self) -> int:
        return self.fold.applied

    @property
    def misrouted(self) -> int:
        return self.decoder.misrouted

    @property
    def skipped(self) -> list[Skipped]:
        return self.fold.skipped

    def rendered(self) -> dict[str, Any]:
        """The state export (docs/worker-evidence.md): ``{stream: rendered state}``, streams sorted."""
        return self.fold.rendered()


def state_export_json(states: dict[str, Any]) -> str:
    """Serialise a state export deterministically (sorted keys, one object)."""
    return json.dumps(states, sort_keys=True, separators=(",", ":"))

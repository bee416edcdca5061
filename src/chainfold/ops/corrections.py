"""Corrections: what a repair tells downstream consumers, each exactly once (docs/corrections.md).

A correction says "stream S of TOPIC was in state ACTUAL where the log says EXPECTED":
``{"stream", "expected", "actual", "delta", "idempotency_key"}``. ``delta`` is expected - actual,
field by field where both are numbers (``None`` when nothing numeric differs).

The idempotency key is a function of what the correction *is*, never of where the log happened to
end when it was computed::

    key = hex(SHA-256(CBOR_det(["chainfold/correction/1", TOPIC, STREAM, ACTUAL, EXPECTED])))

``CBOR_det`` is CBOR in deterministic encoding (RFC 8949 §4.2.1, ``cbor2.dumps(..., canonical=True)``,
the encoding of envelopes, docs/formats.md), ``TOPIC`` the source topic's full name
(``persistent://tenant/namespace/name``, without a partition suffix), ``ACTUAL`` / ``EXPECTED`` the
JSON values of the states as reports show them (``null`` for a stream one side does not have).
Deterministic CBOR rather than canonical JSON (RFC 8785) because JCS cannot encode integers beyond
2^53 exactly, and states hold such numbers (nanosecond timestamps, large counters). The same
divergence therefore always gets the same key: on a retry, on a rerun, after unrelated streams grew.

Published (``--publish-corrections TOPIC2``), each correction is one envelope (docs/formats.md) on TOPIC2:
``id`` = the key, ``stream`` = the corrected stream (also the message key), ``type`` =
``"Correction"``, ``data`` = the correction, ``seq`` = the next in that stream on TOPIC2.
Publishing is exactly once per key: :func:`publish_corrections` goes through
:meth:`chainfold.log.pulsar.PulsarLog.append` with a producer name, which reads TOPIC2 and skips
every key it already holds (a retry, a rerun after a crash), and sends the rest with increasing
sequence ids so a broker with deduplication (Apache Pulsar) drops what the client re-sends after a
reconnect. The producer name is fixed per source topic (:func:`producer_name_for`), so the broker's
sequence ids continue across runs, and two reconciles of one topic cannot publish at once (Apache
Pulsar refuses the second producer of a name).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cbor2

from ..envelope import Event
from ..errors import InvalidArgument
from ..log import EventLog, full_topic_name
from ..store.atomic import atomic_write

__all__ = [
    "KEY_FORMAT",
    "CORRECTION_TYPE",
    "correction_key",
    "make_correction",
    "make_corrections",
    "correction_events",
    "write_corrections",
    "producer_name_for",
    "PublishReport",
    "publish_corrections",
]

KEY_FORMAT = "chainfold/correction/1"
"""The first element of the keyed array: names this definition of the key (bump to change it)."""

CORRECTION_TYPE = "Correction"
"""The envelope ``type`` of a published correction."""


def correction_key(topic: str, stream: str, actual: Any, expected: Any) -> str:
    """The idempotency key of the correction of ``stream`` in ``topic`` from ``actual`` to ``expected``.

    64 lowercase hex digits; see the module docstring for the exact encoding. ``topic`` may be a
    short name (it is expanded as Pulsar does); a partition suffix must not be given.
    """
    keyed = [KEY_FORMAT, full_topic_name(topic), stream, actual, expected]
    return hashlib.sha256(cbor2.dumps(keyed, canonical=True)).hexdigest()


def make_correction(topic: str, stream: str, expected: Any, actual: Any, delta: Any) -> dict[str, Any]:
    """One correction record (docs/corrections.md): ``{"stream", "expected", "actual", "delta", "idempotency_key"}``."""
    return {"stream": stream, "expected": expected, "actual": actual, "delta": delta,
            "idempotency_key": correction_key(topic, stream, actual, expected)}


def make_corrections(topic: str, divergent: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The corrections for reconcile's ``divergent_streams`` entries (``stream, expected, actual, delta``)."""
    return [make_correction(topic, d["stream"], d["expected"], d["actual"], d.get("delta")) for d in divergent]


def correction_events(corrections: Iterable[Mapping[str, Any]], *, time_ms: int | None = None) -> list[Event]:
    """The envelopes (docs/formats.md) of ``corrections`` (``seq`` is left to the appending log)."""
    t = int(time.time() * 1000) if time_ms is None else time_ms
    return [Event(c["idempotency_key"], c["stream"], None, CORRECTION_TYPE, t, dict(c)) for c in corrections]


def write_corrections(path: str | Path, corrections: Iterable[Mapping[str, Any]]) -> None:
    """The corrections as JSON Lines (sorted keys), written crash-safe."""
    atomic_write(Path(path), "".join(json.dumps(c, sort_keys=True) + "\n" for c in corrections).encode())


def producer_name_for(source_topic: str) -> str:
    """The producer name corrections of ``source_topic`` are published under (stable across runs)."""
    digest = hashlib.sha256(full_topic_name(source_topic).encode()).hexdigest()[:16]
    return f"chainfold-corrections-{digest}"


@dataclass(frozen=True)
class PublishReport:
    """What :func:`publish_corrections` did."""

    topic: str
    producer_name: str
    published: int
    """Corrections sent (and confirmed by the broker) in this call."""
    already_published: int
    """Corrections whose key TOPIC2 already held: not sent again."""

    def to_json(self) -> dict[str, Any]:
        return {"topic": self.topic, "producer_name": self.producer_name, "published": self.published,
                "already_published": self.already_published}


def publish_corrections(target: EventLog, corrections: list[Mapping[str, Any]]) -> PublishReport:
    """Publish ``corrections`` to ``target`` exactly once per key.

    ``target`` must be a log whose ``append`` skips ids it already holds: a
    :class:`~chainfold.log.pulsar.PulsarLog` opened with ``producer_name`` (see
    :func:`producer_name_for`). Cost: one read of the whole target topic per call (time O(TOPIC2);
    memory O(len(corrections)): only their keys and their streams' seqs are kept), then one send per
    correction not yet there. Raises
    :class:`~chainfold.errors.BrokerUnavailable` if a send is not confirmed; a rerun then sends
    only what is missing.
    """
    name = getattr(target, "producer_name", None)
    if not name:
        raise InvalidArgument("publish_corrections needs a log that appends each id once (a PulsarLog with producer_name)")
    if not corrections:  # nothing to send: TOPIC2 is not read (nor created)
        return PublishReport(target.topic, name, 0, 0)
    report = target.append(correction_events(corrections))
    return PublishReport(target.topic, name, len(corrections) - report.skipped, report.skipped)

"""The exception tree of chainfold.

Every error chainfold raises on purpose derives from :class:`ChainfoldError`, and each is named for
the rule that broke. Each class carries the evidence as attributes, and ``exit_code`` says how the
CLI ends when the error reaches it (docs/cli.md: 2 usage or bad input, 3 broker unreachable or history
unrecoverable)::

    ChainfoldError
    ├── BadInput                      exit 2
    │   ├── MalformedEnvelope         a payload that is not an envelope (docs/formats.md)
    │   ├── MalformedInputLine        a JSON Lines input line that cannot be accepted
    │   ├── ModelNotFound             --model names nothing loadable
    │   ├── ModelError                a model raised while folding an event
    │   ├── CheckpointCorrupt         a checkpoint file that is truncated or fails its chain
    │   └── SubscriptionInUse         rewind: a consumer is connected to the subscription
    ├── SnapshotRejected              a snapshot that cannot be used (kept as a reason, never fatal)
    ├── DedupIndexError               a dedup index's files cannot be used (replay/dedup.py)
    │   ├── DedupManifestInvalid      a manifest this version did not write
    │   ├── DedupPieceDamaged         a piece a manifest names is missing, truncated or altered
    │   └── DedupIndexBusy            another open index holds the folder
    ├── BrokerUnavailable             exit 3
    └── HistoryUnrecoverable          exit 3
"""

from __future__ import annotations

__all__ = [
    "ChainfoldError",
    "BadInput",
    "MalformedEnvelope",
    "MalformedInputLine",
    "ModelNotFound",
    "ModelError",
    "CheckpointCorrupt",
    "SubscriptionInUse",
    "SnapshotRejected",
    "DedupIndexError",
    "DedupManifestInvalid",
    "DedupPieceDamaged",
    "DedupIndexBusy",
    "BrokerUnavailable",
    "HistoryUnrecoverable",
]


class ChainfoldError(Exception):
    """Root of every error chainfold raises on purpose."""

    exit_code: int = 2


class BadInput(ChainfoldError):
    """Input that chainfold refuses: usage errors, bad files, bad payloads (exit 2)."""

    exit_code = 2


class MalformedEnvelope(BadInput):
    """A payload is not a format-1 event envelope (docs/formats.md).

    ``reason`` says what is wrong; ``message_id`` is filled in by callers that know where the payload
    came from (a log entry), so the report can name it.
    """

    def __init__(self, reason: str, message_id: str | None = None) -> None:
        self.reason = reason
        self.message_id = message_id
        where = f" (message {message_id})" if message_id else ""
        super().__init__(f"malformed envelope{where}: {reason}")


class MalformedInputLine(BadInput):
    """A line of a JSON Lines input file (events, processed log) cannot be accepted."""

    def __init__(self, path: str, line: int, reason: str) -> None:
        self.path = path
        self.line = line
        self.reason = reason
        super().__init__(f"{path}:{line}: {reason}")


class ModelNotFound(BadInput):
    """The ``--model`` reference cannot be loaded or does not satisfy the model protocol."""


class ModelError(BadInput):
    """A model's ``apply`` raised on an event; folding stopped there."""

    def __init__(self, stream: str, event_id: str, message_id: str | None, cause: BaseException) -> None:
        self.stream = stream
        self.event_id = event_id
        self.message_id = message_id
        self.cause = cause
        super().__init__(
            f"model failed on stream {stream!r}, event {event_id!r}"
            f" (message {message_id}): {type(cause).__name__}: {cause}"
        )


class CheckpointCorrupt(BadInput):
    """A checkpoint file is truncated, unparsable, or its chain of heads does not link up."""

    def __init__(self, path: str, line: int | None, reason: str) -> None:
        self.path = path
        self.line = line
        self.reason = reason
        where = f"{path}:{line}" if line is not None else path
        super().__init__(f"corrupt checkpoint file {where}: {reason}")


class SubscriptionInUse(BadInput):
    """A consumer is connected to the subscription a rewind would move: the worker must stop first.

    ``consumers`` lists what the broker said about them (name, address, connected since), when the
    broker's admin API could tell.
    """

    def __init__(self, topic: str, subscription: str, consumers: list[dict[str, object]] | None = None) -> None:
        self.topic = topic
        self.subscription = subscription
        self.consumers = consumers or []
        who = ", ".join(f"{c.get('consumerName')} at {c.get('address')}" for c in self.consumers)
        super().__init__(
            f"a consumer is connected to subscription {subscription!r} of {topic}"
            + (f" ({who})" if who else "") + ": stop the worker before rewinding it"
        )


class SnapshotRejected(ChainfoldError):
    """A snapshot cannot be used; ``reason`` says why. Rebuild tries the next older one."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"snapshot {path} rejected: {reason}")


class DedupIndexError(ChainfoldError):
    """The files of a deduplication index (:mod:`chainfold.replay.dedup`) cannot be used as they are.

    A snapshot that references such an index is unusable: callers report it as a
    :class:`SnapshotRejected` with this error's message as the reason.
    """


class DedupManifestInvalid(DedupIndexError):
    """A dedup manifest is not one this version wrote (format, fields, counts); ``reason`` says how."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"invalid dedup manifest: {reason}")


class DedupPieceDamaged(DedupIndexError):
    """A piece of a dedup index is missing, truncated, or does not match its SHA-256 name."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"dedup piece {path}: {reason}")


class DedupIndexBusy(DedupIndexError):
    """Another open dedup index (this process or another) holds ``directory``."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        super().__init__(f"dedup index folder {directory} is in use by another open index")


class BrokerUnavailable(ChainfoldError):
    """The broker cannot be reached, or went away and did not come back within the retry budget."""

    exit_code = 3


class HistoryUnrecoverable(ChainfoldError):
    """The log no longer holds entries that are needed, and no valid snapshot covers the gap."""

    exit_code = 3

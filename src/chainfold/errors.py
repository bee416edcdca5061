"""The exception tree of chainfold.

Every error chainfold raises on purpose derives from :class:`ChainfoldError`, and each is named for
the rule that broke. Each class carries the evidence as attributes, and ``exit_code`` says how the
CLI ends when the error reaches it (docs/cli.md: 2 usage or bad input, 3 broker unreachable or history
unrecoverable)::

    ChainfoldError
    ├── BadInput                      exit 2
    │   ├── InvalidArgument           a call that breaks a documented precondition (also a ValueError)
    │   │   └── SegmentSizeMismatch   two hash sequences cut into segments of different sizes
    │   ├── MalformedEnvelope         a payload that is not an envelope (docs/formats.md)
    │   ├── MalformedInputLine        a JSON Lines input line that cannot be accepted
    │   ├── MissingDirectory          an output file's directory does not exist (never created silently)
    │   ├── ModelNotFound             --model names nothing loadable
    │   ├── ModelError                a model raised while folding an event
    │   ├── CheckpointCorrupt         a checkpoint file that is truncated or fails its chain
    │   ├── SubscriptionInUse         rewind: a consumer is connected to the subscription
    │   └── SparkUnavailable          --engine spark: PySpark or a Java 17+ runtime is missing
    ├── RootMismatch                  leaves that do not hash to the root recorded for them (also a ValueError)
    ├── SnapshotRejected              a snapshot that cannot be used (kept as a reason, never fatal)
    ├── NotDurable                    exit 2: a write that could not be made crash-safe (fsync failed)
    ├── DedupIndexError               a dedup index's files cannot be used (replay/dedup.py)
    │   ├── DedupManifestInvalid      a manifest this version did not write
    │   ├── DedupPieceDamaged         a piece a manifest names is missing, truncated or altered
    │   └── DedupIndexBusy            another open index holds the folder
    ├── BrokerUnavailable             exit 3
    ├── WorkerFailed                  exit 3: a worker process (or a Spark job) of a parallel replay failed
    └── HistoryUnrecoverable          exit 3
        └── LogShorterThanPlanned     a read range ended before the entries planned for it

Errors that replace a ``ValueError`` of earlier versions also derive from ``ValueError``, so code
that caught it goes on working.
"""

from __future__ import annotations

__all__ = [
    "ChainfoldError",
    "BadInput",
    "InvalidArgument",
    "SegmentSizeMismatch",
    "RootMismatch",
    "NotDurable",
    "WorkerFailed",
    "MalformedEnvelope",
    "MalformedInputLine",
    "MissingDirectory",
    "ModelNotFound",
    "ModelError",
    "CheckpointCorrupt",
    "SubscriptionInUse",
    "SparkUnavailable",
    "SnapshotRejected",
    "DedupIndexError",
    "DedupManifestInvalid",
    "DedupPieceDamaged",
    "DedupIndexBusy",
    "BrokerUnavailable",
    "HistoryUnrecoverable",
    "LogShorterThanPlanned",
]


def _restore(cls: type, args: tuple, state: dict) -> "ChainfoldError":
    exc = cls.__new__(cls)
    exc.args = args
    exc.__dict__.update(state)
    return exc


class ChainfoldError(Exception):
    """Root of every error chainfold raises on purpose."""

    exit_code: int = 2

    def __reduce__(self) -> tuple:
        # Pickles with its evidence (attributes), whatever its constructor takes: errors travel
        # back from worker processes.
        return (_restore, (type(self), self.args, self.__dict__))


class BadInput(ChainfoldError):
    """Input that chainfold refuses: usage errors, bad files, bad payloads (exit 2)."""

    exit_code = 2


class InvalidArgument(BadInput, ValueError):
    """An argument breaks the precondition the called function documents (a bad value, not bad
    data from outside): a checkpoint of the wrong shape, a chain state that cannot be resumed, a
    checkpoint that does not continue a file's chain."""


class SegmentSizeMismatch(InvalidArgument):
    """Two sequences of checkpoints (or a chain and a record) use different segment sizes, so they
    cannot be compared segment by segment."""

    def __init__(self, what: str, left: int, right: int) -> None:
        self.left = left
        self.right = right
        super().__init__(f"{what}: segment size {left} on one side, {right} on the other")


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


class MissingDirectory(BadInput):
    """An output named by ``option`` (``target``) would go into ``path``, a directory that does not
    exist: chainfold does not create it, so a typo in a path never scatters files."""

    def __init__(self, option: str, target: str, path: str) -> None:
        self.option = option
        self.target = target
        self.path = path
        super().__init__(f"{option} {target}: directory {path} does not exist (create it first)")


class ModelNotFound(BadInput):
    """The ``--model`` reference cannot be loaded or does not satisfy the model protocol."""


class ModelError(BadInput):
    """A model's ``apply`` raised on an event; folding stopped there. ``index`` is the entry's log
    position (in its partition) when known."""

    def __init__(self, stream: str, event_id: str, message_id: str | None, cause: BaseException,
                 index: int | None = None) -> None:
        self.stream = stream
        self.event_id = event_id
        self.message_id = message_id
        self.cause = cause
        self.index = index
        super().__init__(
            f"model failed on stream {stream!r}, event {event_id!r}"
            f" (message {message_id}): {type(cause).__name__}: {cause}"
        )


class SparkUnavailable(BadInput):
    """``--engine spark`` cannot run here: PySpark (the ``chainfold[spark]`` extra) or a Java 17+
    runtime is missing. ``missing`` names which."""

    def __init__(self, missing: str, detail: str) -> None:
        self.missing = missing
        super().__init__(detail)


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
class RootMismatch(ChainfoldError, ValueError):
    """Leaf hashes given for a segment do not hash to the root recorded for it (so they are not the
    leaves that checkpoint was made of): ``expected`` is the recorded root, ``calculated`` the root
    of the leaves given, ``segment`` the segment and ``side`` which evidence they came from."""

    def __init__(self, side: str, segment: int, expected: bytes, calculated: bytes, reason: str = "") -> None:
        self.side = side
        self.segment = segment
        self.expected = expected
        self.calculated = calculated
        detail = reason or f"root {calculated.hex()[:16]}…, recorded {expected.hex()[:16]}…"
        super().__init__(f"{side} segment {segment}: the leaves given do not match the checkpoint root ({detail})")


class NotDurable(ChainfoldError):
    """A write could not be made crash-safe: writing, fsync or rename failed (``path``, ``cause``)."""

    exit_code = 2

    def __init__(self, path: str, cause: BaseException) -> None:
        self.path = path
        self.cause = cause
        super().__init__(f"cannot write {path} durably: {cause}")


class WorkerFailed(ChainfoldError):
    """A worker process of a parallel replay died without an answer, or a Spark job failed for a
    reason that is not one of chainfold's errors (``detail`` holds what Spark said); a rerun starts
    over."""

    exit_code = 3


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
    """The log no longer holds entries that are needed, and no valid snapshot covers the gap.

    ``message_id``: the first entry the log still holds (of the first partition that lost
    entries), when known; ``partition``; ``details``: the history part of a report
    (``history``, ``truncated``, ``seq_gaps``) for a ``--json`` error object."""

    exit_code = 3

    def __init__(self, message: str, *, message_id: str | None = None, partition: str | None = None,
                 details: dict | None = None) -> None:
        self.message_id = message_id
        self.partition = partition
        self.details = details or {}
        super().__init__(message)


class LogShorterThanPlanned(HistoryUnrecoverable):
    """A read range (a Spark task's fixed unit of work) met the end of its partition before the
    position the plan saw there (``reach``): entries that existed when the plan was made are gone
    (truncated or rewritten log). ``last`` is the last position read, ``index`` the range's number."""

    def __init__(self, partition: str, index: int, reach: object, last: object) -> None:
        super().__init__(
            f"{partition}: range {index} ended at {last} before the planned {reach}: "
            "the log changed after it was planned", partition=partition)
        self.index = index
        self.reach = reach
        self.last = last

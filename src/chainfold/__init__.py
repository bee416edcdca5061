"""chainfold: rebuild event-sourced state from Apache Pulsar, prove it with hash chains, repair only
what diverged.

The data's path, one subpackage each, a stage per step of a replay::

    envelope.py          bytes → events (docs/formats.md)
    log/                 the append-only log (memory, Pulsar); source.py: the source stage
    merkle.py, hashing/  RFC 9162 hashes; hashing/stage.py: the hash stage (chained segments, record)
    replay/              decode.py (decode + dedup stage), fold.py (the fold stage), pipeline.py
    store/               snapshots (storage, codec), sink.py: the snapshot sink
    ops/                 the library's commands: verify, rebuild, reconcile, proofs
    engines/             the same stages in several processes
    cli/                 the command line, a thin layer over the library

The commands of the library are :func:`rebuild`, :func:`verify` and :func:`reconcile`.
"""

from .envelope import Event, decode, encode
from .errors import (
    BadInput,
    BrokerUnavailable,
    ChainfoldError,
    CheckpointCorrupt,
    HistoryUnrecoverable,
    InvalidArgument,
    MalformedEnvelope,
    MalformedInputLine,
    ModelError,
    ModelNotFound,
    NotDurable,
    RootMismatch,
    SegmentSizeMismatch,
    SnapshotRejected,
    WorkerFailed,
)
from .hashing.chain import Checkpoint, ChainBuilder, Divergence, find_divergence
from .log import Entry, EventLog, MemoryLog, MessageId, Position
from .ops.rebuild import RebuildOptions, RebuildResult, rebuild
from .ops.reconcile import ReconcileReport, reconcile
from .ops.verify import VerifyOptions, VerifyReport, verify_log as verify
from .replay.fold import Folder
from .replay.model import Model, load_model
from .tracker import Tracker

__version__ = "0.1.0"

__all__ = [
    "__version__",
    # the library's commands
    "rebuild",
    "verify",
    "reconcile",
    "RebuildOptions",
    "RebuildResult",
    "VerifyOptions",
    "VerifyReport",
    "ReconcileReport",
    # events and the log
    "Event",
    "encode",
    "decode",
    "Entry",
    "EventLog",
    "MemoryLog",
    "Position",
    "MessageId",
    # hashes
    "Checkpoint",
    "ChainBuilder",
    "Divergence",
    "find_divergence",
    # models and folding
    "Folder",
    "Model",
    "load_model",
    # the worker's side
    "Tracker",
    # errors
    "ChainfoldError",
    "BadInput",
    "InvalidArgument",
    "SegmentSizeMismatch",
    "MalformedEnvelope",
    "MalformedInputLine",
    "ModelError",
    "ModelNotFound",
    "CheckpointCorrupt",
    "RootMismatch",
    "SnapshotRejected",
    "NotDurable",
    "BrokerUnavailable",
    "WorkerFailed",
    "HistoryUnrecoverable",
]

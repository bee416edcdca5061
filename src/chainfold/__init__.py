"""chainfold: rebuild event-sourced state from Apache Pulsar, prove it with hash chains, repair only
what diverged.

The data's path, one subpackage each: :mod:`~chainfold.envelope` (bytes → events) →
:mod:`~chainfold.log` (the append-only log: memory, Pulsar) → :mod:`~chainfold.merkle` and
:mod:`~chainfold.hashing` (hashes over the log) → :mod:`~chainfold.replay` (the fold) →
:mod:`~chainfold.store` (snapshots) → :mod:`~chainfold.ops` (verify, rebuild, reconcile) →
:mod:`~chainfold.cli`.
"""

from .hashing.chain import Checkpoint, ChainBuilder, Divergence, find_divergence
from .envelope import Event, decode, encode
from .errors import (
    BadInput,
    BrokerUnavailable,
    ChainfoldError,
    CheckpointCorrupt,
    HistoryUnrecoverable,
    MalformedEnvelope,
    MalformedInputLine,
    ModelError,
    ModelNotFound,
    SnapshotRejected,
)
from .replay.fold import Folder, Model, load_model
from .log import Entry, EventLog, MemoryLog, MessageId
from .tracker import Tracker

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "Event",
    "encode",
    "decode",
    "Entry",
    "EventLog",
    "MemoryLog",
    "MessageId",
    "Checkpoint",
    "ChainBuilder",
    "Divergence",
    "find_divergence",
    "Tracker",
    "Folder",
    "Model",
    "load_model",
    "ChainfoldError",
    "BadInput",
    "MalformedEnvelope",
    "MalformedInputLine",
    "ModelError",
    "ModelNotFound",
    "CheckpointCorrupt",
    "SnapshotRejected",
    "BrokerUnavailable",
    "HistoryUnrecoverable",
]

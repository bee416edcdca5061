"""chainfold: rebuild event-sourced state from Apache Pulsar, prove it with hash chains, repair only
what diverged.

The data's path, one module each: :mod:`~chainfold.envelope` (bytes → events) →
:mod:`~chainfold.log` / :mod:`~chainfold.pulsar_log` (the append-only log) →
:mod:`~chainfold.merkle` / :mod:`~chainfold.chain` / :mod:`~chainfold.checkpoints` (hashes over the log) →
:mod:`~chainfold.fold` (models and the fold) → :mod:`~chainfold.snapshots` → :mod:`~chainfold.reconcile`
→ :mod:`~chainfold.cli`.
"""

from .chain import Checkpoint, ChainBuilder, Divergence, find_divergence
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
from .fold import Folder, Model, load_model
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

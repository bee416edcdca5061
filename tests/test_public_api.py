"""The curated public surface: a change here is a change for users."""

import importlib
import inspect

import chainfold


def test_exported_names() -> None:
    assert set(chainfold.__all__) == {
        "__version__", "rebuild", "verify", "reconcile", "RebuildOptions", "RebuildResult", "VerifyOptions",
        "VerifyReport", "ReconcileReport", "Event", "encode", "decode", "Entry", "EventLog", "MemoryLog",
        "Position", "MessageId", "Checkpoint", "ChainBuilder", "Divergence", "find_divergence", "Folder", "Model",
        "load_model", "Tracker", "ChainfoldError", "BadInput", "InvalidArgument", "SegmentSizeMismatch",
        "MalformedEnvelope", "MalformedInputLine", "ModelError", "ModelNotFound", "CheckpointCorrupt", "RootMismatch",
        "SnapshotRejected", "NotDurable", "BrokerUnavailable", "WorkerFailed", "HistoryUnrecoverable",
    }
    for name in chainfold.__all__:
        assert hasattr(chainfold, name)


def test_the_commands_are_functions_not_modules() -> None:
    # chainfold.rebuild etc. must stay the library's functions (no submodule of that name shadows them)
    for name in ("rebuild", "verify", "reconcile"):
        assert inspect.isfunction(getattr(chainfold, name)), name
    for module in ("chainfold.ops.rebuild", "chainfold.ops.reconcile", "chainfold.ops.verify"):
        importlib.import_module(module)  # importing the modules changes nothing

    for name in ("rebuild", "verify", "reconcile"):
        assert inspect.isfunction(getattr(chainfold, name)), name


def test_every_error_derives_from_the_root() -> None:
    for name in chainfold.__all__:
        obj = getattr(chainfold, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, chainfold.ChainfoldError)

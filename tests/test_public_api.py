"""The curated public surface: a change here is a change for users."""

import chainfold


def test_exported_names() -> None:
    assert set(chainfold.__all__) == {
        "__version__", "Event", "encode", "decode", "Entry", "EventLog", "MemoryLog", "MessageId",
        "Checkpoint", "ChainBuilder", "Divergence", "find_divergence", "Tracker", "Folder", "Model",
        "load_model", "ChainfoldError", "BadInput", "MalformedEnvelope", "MalformedInputLine", "ModelError",
        "ModelNotFound", "CheckpointCorrupt", "SnapshotRejected", "BrokerUnavailable", "HistoryUnrecoverable",
    }
    for name in chainfold.__all__:
        assert hasattr(chainfold, name)


def test_every_error_derives_from_the_root() -> None:
    for name in chainfold.__all__:
        obj = getattr(chainfold, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, chainfold.ChainfoldError)

"""The snapshot storage contract (chainfold.store.storage): one suite that every implementation of
SnapshotStorage must pass. Add an implementation to ``STORAGES`` to run it against this suite."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chainfold.errors import NotDurable
from chainfold.store.storage import LocalStorage, SnapshotStorage, StoredFile


def _local(tmp: Path) -> SnapshotStorage:
    return LocalStorage(tmp / "topic-folder", prefix="snap-")


STORAGES: dict[str, Callable[[Path], SnapshotStorage]] = {"local": _local}


@pytest.fixture(params=sorted(STORAGES))
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> SnapshotStorage:
    return STORAGES[request.param](tmp_path)


def test_an_empty_storage_lists_nothing_and_reads_nothing(storage: SnapshotStorage) -> None:
    assert storage.list() == []
    with pytest.raises(FileNotFoundError):
        storage.read("snap-1.cbor")
    storage.delete("snap-1.cbor")  # deleting a missing name is not an error
    assert storage.list() == []


def test_write_read_list_delete(storage: SnapshotStorage) -> None:
    storage.write("snap-a.cbor", b"first")
    storage.write("snap-b.cbor", [b"in ", b"three ", b"chunks"])
    assert storage.read("snap-a.cbor") == b"first"
    assert storage.read("snap-b.cbor") == b"in three chunks"
    assert sorted(storage.list(), key=lambda f: f.name) == [StoredFile("snap-a.cbor", 5),
                                                            StoredFile("snap-b.cbor", 15)]
    storage.delete("snap-a.cbor")
    assert [f.name for f in storage.list()] == ["snap-b.cbor"]
    with pytest.raises(FileNotFoundError):
        storage.read("snap-a.cbor")


def test_a_write_replaces_the_whole_content(storage: SnapshotStorage) -> None:
    storage.write("snap-x.cbor", b"a much longer first version")
    storage.write("snap-x.cbor", b"short")
    assert storage.read("snap-x.cbor") == b"short"
    assert storage.list() == [StoredFile("snap-x.cbor", 5)]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(["snap-1", "snap-2", "snap-3"]), st.binary(max_size=64)),
                max_size=12))
def test_what_is_read_is_what_was_last_written(storage: SnapshotStorage, writes: list[tuple[str, bytes]]) -> None:
    for f in storage.list():
        storage.delete(f.name)
    last: dict[str, bytes] = {}
    for name, data in writes:
        storage.write(name, data)
        last[name] = data
    assert {f.name: f.size for f in storage.list()} == {n: len(d) for n, d in last.items()}
    for name, data in last.items():
        assert storage.read(name) == data


def test_locate_names_where_a_file_is(storage: SnapshotStorage) -> None:
    storage.write("snap-z.cbor", b"z")
    assert storage.locate("snap-z.cbor").name == "snap-z.cbor"


# --- the local folder ----------------------------------------------------------------------------------


def test_local_storage_lists_only_its_prefix_and_no_temp_files(tmp_path: Path) -> None:
    s = LocalStorage(tmp_path, prefix="snap-")
    s.write("snap-1.cbor", b"1")
    (tmp_path / "checkpoints.jsonl").write_text("{}\n")  # the folder is shared with checkpoint files
    (tmp_path / ".snap-2.cbor.123.0123456789abcdef.tmp").write_bytes(b"partial")
    (tmp_path / "snap-dir").mkdir()
    assert s.list() == [StoredFile("snap-1.cbor", 1)]
    for bad in (".snap-1.cbor", "../snap-1.cbor", "", "a/b"):
        with pytest.raises(FileNotFoundError):
            s.read(bad)


def test_a_write_that_cannot_be_made_durable_says_so(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the folder should be")
    s = LocalStorage(blocker / "sub", prefix="snap-")
    with pytest.raises(NotDurable) as exc:
        s.write("snap-1.cbor", b"x")
    assert exc.value.exit_code == 2 and "not-a-folder" in str(exc.value)


_KILLED_WRITER = textwrap.dedent(
    """
    import os, sys, time
    from chainfold.store.storage import LocalStorage
    real_fsync = os.fsync
    def slow_fsync(fd):
        print("fsync", flush=True)
        time.sleep(30)
        real_fsync(fd)
    os.fsync = slow_fsync
    LocalStorage(sys.argv[1], prefix="snap-").write("snap-1.cbor", b"new " * 100000)
    """
)


def test_a_writer_killed_mid_write_leaves_the_old_content(tmp_path: Path) -> None:
    s = LocalStorage(tmp_path, prefix="snap-")
    s.write("snap-1.cbor", b"old")
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "fsync"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert s.read("snap-1.cbor") == b"old"
    assert s.list() == [StoredFile("snap-1.cbor", 3)]
    assert any(n.endswith(".tmp") for n in os.listdir(tmp_path))  # the dead writer's temp file ...
    s.write("snap-2.cbor", b"next")
    assert not any(n.endswith(".tmp") for n in os.listdir(tmp_path))  # ... is removed by the next write


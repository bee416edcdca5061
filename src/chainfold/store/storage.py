"""Where snapshot files live: the small interface every snapshot storage implements.

:class:`SnapshotStorage` holds named files (bytes) for one topic: list, read, write, delete. It
knows nothing of what is in them (that is :mod:`chainfold.store.codec`) nor which to keep (that is
:class:`chainfold.store.snapshots.SnapshotStore`). :class:`LocalStorage` is the implementation on
a local folder; one contract suite (``tests/test_store_contract.py``) runs against every
implementation.

Contract:

* :meth:`~SnapshotStorage.write` stores the whole content under a name atomically: a reader, or a
  crash, sees the previous content of that name or the new one, never a part of it; an existing
  name is replaced. A write that cannot be made durable raises
  :class:`~chainfold.errors.NotDurable`.
* :meth:`~SnapshotStorage.list` gives the stored names (with sizes), in no particular order: every
  name written and not deleted, and nothing else (no temp files, no other files of the folder
  unless ``prefix`` lets them in).
* :meth:`~SnapshotStorage.read` gives the bytes last written under the name;
  ``FileNotFoundError`` if there is none.
* :meth:`~SnapshotStorage.delete` removes a name; deleting a missing name is not an error.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .atomic import atomic_write, clean_stale_temps, fsync_dir

__all__ = ["StoredFile", "SnapshotStorage", "LocalStorage"]


@dataclass(frozen=True)
class StoredFile:
    """A name in a storage and the size of what is stored under it."""

    name: str
    size: int


class SnapshotStorage(ABC):
    """Named files of one topic's snapshots (see the module doc for the contract)."""

    @abstractmethod
    def list(self) -> list[StoredFile]:
        """The stored names and their sizes, in no particular order."""

    @abstractmethod
    def read(self, name: str) -> bytes:
        """The bytes stored under ``name``; ``FileNotFoundError`` if there are none."""

    @abstractmethod
    def write(self, name: str, data: bytes | Iterable[bytes]) -> None:
        """Store ``data`` (bytes, or chunks in order) under ``name``, atomically and durably."""

    @abstractmethod
    def delete(self, name: str) -> None:
        """Remove ``name`` (nothing happens if it is not stored)."""

    @abstractmethod
    def locate(self, name: str) -> Path:
        """Where ``name`` is (or would be) stored, as reports name it."""


class LocalStorage(SnapshotStorage):
    """Snapshot files in one local folder (created on the first write).

    Only names starting with ``prefix`` are listed, since the folder is shared with checkpoint
    files. Writes go through :func:`~chainfold.store.atomic.atomic_write` (temp file, fsync,
    rename, folder fsync), and each write first removes temp files that writers which died left
    behind.
    """

    def __init__(self, directory: str | os.PathLike[str], prefix: str = "") -> None:
        self.dir = Path(directory)
        self.prefix = prefix

    def __repr__(self) -> str:
        return f"LocalStorage({str(self.dir)!r}, prefix={self.prefix!r})"

    def _path(self, name: str) -> Path:
        if not name or "/" in name or name in (".", "..") or name.startswith("."):
            raise FileNotFoundError(f"not a stored file name: {name!r}")
        return self.dir / name

    def list(self) -> list[StoredFile]:
        out = []
        try:
            it = os.scandir(self.dir)
        except (FileNotFoundError, NotADirectoryError):
            return []
        with it:
            for e in it:
                if not e.name.startswith(self.prefix) or e.name.startswith("."):
                    continue
                try:
                    if not e.is_file(follow_symlinks=False):
                        continue
                    size = e.stat(follow_symlinks=False).st_size
                except OSError:  # removed meanwhile
                    continue
                out.append(StoredFile(e.name, size))
        return out

    def read(self, name: str) -> bytes:
        return self._path(name).read_bytes()

    def write(self, name: str, data: bytes | Iterable[bytes]) -> None:
        path = self._path(name)
        if self.dir.is_dir():
            clean_stale_temps(self.dir, "." + self.prefix)
        atomic_write(path, data)

    def delete(self, name: str) -> None:
        try:
            self._path(name).unlink()
        except FileNotFoundError:
            return
        fsync_dir(self.dir)

    def locate(self, name: str) -> Path:
        return self.dir / name

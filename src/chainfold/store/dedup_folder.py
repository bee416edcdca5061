"""Where a topic's dedup index lives: beside its snapshots, as pieces the snapshots reference.

::

    <topic folder>/dedup/             pieces (``<sha256>.piece``) that snapshots name in their manifest;
                                      locked while a replay that takes snapshots writes there
    <topic folder>/dedup/scratch/<n>/ the index of one replay that writes no snapshot (and of each
                                      worker of a parallel one): on top of a snapshot's pieces, read
                                      in place; removed when the replay ends

A replay that takes snapshots opens the index :meth:`DedupFolder.writer` (one at a time per topic:
:class:`~chainfold.errors.DedupIndexBusy` for a second one); any other replay opens a
:meth:`DedupFolder.reader`, which never changes ``dedup/``. A scratch folder left by a process that
died (its lock is free) is removed by the next one made.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import DedupIndexBusy
from ..replay.dedup import DEFAULT_MEMORY_BYTES, DedupIndex, check_pieces, lock_folder

__all__ = ["DedupFolder", "Scratch"]

_NEW = ".new-"
_STALE_NEW_SECONDS = 3600  # a scratch folder still being made (never locked) after this long: its maker died


class Scratch:
    """A folder of this process's own under ``parent`` (locked for as long as it is open, removed
    on :meth:`close`). Made under a hidden name, locked, then renamed: never seen unlocked."""

    def __init__(self, parent: Path) -> None:
        parent.mkdir(parents=True, exist_ok=True)
        remove_stale(parent)
        made = Path(tempfile.mkdtemp(prefix=_NEW, dir=parent))
        self._fd = lock_folder(made)
        self.path = parent / made.name[len(_NEW):]
        os.rename(made, self.path)

    def close(self) -> None:
        if self._fd >= 0:
            shutil.rmtree(self.path, ignore_errors=True)
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Scratch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def remove_stale(parent: Path) -> list[str]:
    """Remove the scratch folders under ``parent`` whose owner is gone (their lock is free); the
    names removed."""
    removed = []
    for entry in sorted(parent.iterdir()) if parent.is_dir() else []:
        if not entry.is_dir():
            continue
        if entry.name.startswith(_NEW):
            try:
                young = time.time() - entry.stat().st_mtime < _STALE_NEW_SECONDS
            except FileNotFoundError:
                continue
            if not young:
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry.name)
            continue
        try:
            fd = lock_folder(entry)
        except (DedupIndexBusy, FileNotFoundError):
            continue
        try:
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry.name)
        finally:
            os.close(fd)
    return removed


class DedupFolder:
    """The dedup index of one topic's snapshots (see the module doc).

    :meth:`check` verifies a manifest's pieces (each piece once per :class:`DedupFolder`: a piece
    never changes), so opening an index after it needs no second pass over the bytes.
    """

    def __init__(self, topic_dir: str | os.PathLike[str], memory_bytes: int = DEFAULT_MEMORY_BYTES) -> None:
        self.dir = Path(topic_dir) / "dedup"
        self.memory_bytes = memory_bytes
        self._good: set[str] = set()

    def __repr__(self) -> str:
        return f"DedupFolder({str(self.dir)!r})"

    @property
    def scratch_dir(self) -> Path:
        return self.dir / "scratch"

    def check(self, manifest: Mapping[str, Any]) -> None:
        """:class:`~chainfold.errors.DedupIndexError` unless every piece of ``manifest`` is here,
        whole and unaltered (SHA-256)."""
        self._good |= check_pieces(self.dir, manifest, known_good=self._good)

    def writer(self, manifest: Mapping[str, Any] | None) -> DedupIndex:
        """The index of ``manifest`` (None: empty) in ``dedup/`` itself, for a replay that takes
        snapshots. :class:`~chainfold.errors.DedupIndexBusy` while another one is open."""
        return DedupIndex.open(self.dir, manifest, memory_bytes=self.memory_bytes, verify=False)

    def reader(self, manifest: Mapping[str, Any] | None) -> DedupIndex:
        """An index of its own on top of ``manifest``'s pieces (read in place), in a scratch folder
        that is removed when the index is closed."""
        scratch = Scratch(self.scratch_dir)
        try:
            index = self.on(scratch.path / "index", manifest)
        except BaseException:
            scratch.close()
            raise
        index.after_close.append(scratch.close)
        return index

    def on(self, folder: str | os.PathLike[str], manifest: Mapping[str, Any] | None) -> DedupIndex:
        """An empty index in ``folder``, on top of ``manifest``'s pieces (None: of nothing)."""
        base = (self.dir, manifest) if manifest is not None and manifest.get("pieces") else None
        return DedupIndex.open(folder, memory_bytes=self.memory_bytes, verify=False, base=base)

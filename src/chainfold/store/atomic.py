"""Crash-safe writes: the one place chainfold replaces a file atomically.

Every file chainfold writes whole (snapshots, provisional checkpoints, state exports, corrections,
the demo's and the worker's files, the embedded broker's state) goes through :func:`atomic_write`:
a hidden temp file in the same folder, written, flushed and fsynced, renamed over the target, then
the folder fsynced. A crash at any moment leaves the old file or the new one, never a torn one.
A failure of any step raises :class:`~chainfold.errors.NotDurable` naming the file; the temp file
is removed.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import time
from collections.abc import Iterable
from pathlib import Path

from ..errors import NotDurable

__all__ = ["atomic_write", "fsync_dir", "clean_stale_temps", "temp_path"]

_in_progress: set[str] = set()  # temp files this process is writing right now (never cleaned up)
_TEMP = re.compile(r"^\..+\.(\d{1,10})\.[0-9a-f]{8,32}\.tmp$")
_STALE_TEMP_SECONDS = 24 * 3600  # a temp file of a live other process is left alone unless this old
_NO_DIR_FSYNC = (errno.EINVAL, errno.ENOTSUP, errno.EBADF)  # file systems that cannot fsync a folder


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """fsync a folder, so that a rename or a new file in it survives a crash.

    File systems that cannot fsync a folder at all (``EINVAL``/``ENOTSUP``) are accepted as they
    are; any other failure raises :class:`~chainfold.errors.NotDurable`.
    """
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError as exc:
        raise NotDurable(str(directory), exc) from exc
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _NO_DIR_FSYNC:
            raise NotDurable(str(directory), exc) from exc
    finally:
        os.close(fd)


def _make_dirs(directory: Path) -> None:
    """Create ``directory`` and its missing parents, each made durable in its parent."""
    missing = []
    d = directory
    while not d.is_dir():
        missing.append(d)
        if d.parent == d:
            break
        d = d.parent
    for d in reversed(missing):
        try:
            d.mkdir(exist_ok=True)
        except OSError as exc:
            raise NotDurable(str(d), exc) from exc
        fsync_dir(d.parent)


def temp_path(path: Path) -> Path:
    """The hidden temp file :func:`atomic_write` writes ``path`` through:
    ``.NAME.<pid>.<16 hex>.tmp`` beside it (:func:`clean_stale_temps` knows the pattern)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(8)}.tmp")


def atomic_write(path: str | os.PathLike[str], data: bytes | Iterable[bytes]) -> None:
    """Replace ``path`` with ``data`` (bytes, or chunks of bytes written in order) crash-safely:
    temp file, flush, fsync, rename, fsync of the folder (missing folders are created, durably).

    :class:`~chainfold.errors.NotDurable` if any step fails; the target is then untouched.
    """
    path = Path(path)
    _make_dirs(path.parent)
    tmp = temp_path(path)
    _in_progress.add(tmp.name)
    try:
        with open(tmp, "xb") as f:
            for chunk in (data,) if isinstance(data, (bytes, bytearray, memoryview)) else data:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise NotDurable(str(path), exc) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        _in_progress.discard(tmp.name)
    fsync_dir(path.parent)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, another user's
    except OSError:
        return False
    return True


def clean_stale_temps(directory: str | os.PathLike[str], prefix: str = ".") -> int:
    """Remove the temp files of :func:`atomic_write` calls that died (their process is gone, or the
    file is a day old) from ``directory``, those whose name starts with ``prefix``. Temp files this
    process is writing are never touched. Returns how many were removed."""
    now = time.time()
    removed = 0
    try:
        it = os.scandir(directory)
    except OSError:
        return 0
    with it:
        for e in it:
            m = _TEMP.match(e.name)
            if m is None or not e.name.startswith(prefix) or e.name in _in_progress:
                continue
            pid = int(m.group(1))
            if pid != os.getpid() and _pid_alive(pid):
                try:
                    if now - e.stat(follow_symlinks=False).st_mtime < _STALE_TEMP_SECONDS:
                        continue
                except OSError:
                    continue
            try:
                os.unlink(e.path)
                removed += 1
            except FileNotFoundError:
                pass  # another cleaner got there first
    return removed

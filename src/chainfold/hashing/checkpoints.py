"""A durable, append-only record of checkpoints, as files.

Layout of a :class:`CheckpointFile` at ``PATH``:

- ``PATH``: the checkpoints of *full* segments 0, 1, 2, ... one JSON object per line
  (:meth:`Checkpoint.to_json`, docs/formats.md), appended and fsynced, never rewritten in place.
- ``PATH.partial``: at most one provisional checkpoint of the partial segment that follows, replaced
  atomically (temp file, fsync, rename) each time it is written. It is stale, and ignored, once
  ``PATH`` holds that segment in full.

:meth:`CheckpointFile.load` validates everything and raises
:class:`~chainfold.errors.CheckpointCorrupt` with the path and 1-based line number on the first
line that is unparsable, out of sequence, not full, of another segment size, or whose head is not
``chain_head(previous head, size, root)`` (the chain is what catches a flipped byte in a size, root
or head; the ``first``/``last`` message ids are not covered by it). A torn last line after a crash
(no trailing newline) is reported as corrupt, with its line number, like any other;
``truncate_after(k)`` with the last good segment ``k`` recovers from it, since it validates only the
lines it keeps.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from .chain import ZERO_HEAD, Checkpoint, chain_head
from ..errors import CheckpointCorrupt, InvalidArgument
from ..store.atomic import atomic_write, fsync_dir

__all__ = ["CheckpointFile"]

_TAIL_CHUNK = 4096
_TORN = "truncated last line (no trailing newline): torn write?"


def _line(cp: Checkpoint) -> bytes:
    return (json.dumps(cp.to_json(), separators=(",", ":")) + "\n").encode()


def _parse(raw: bytes) -> Checkpoint:
    """One line's checkpoint; ``ValueError`` with the reason."""
    try:
        d = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not JSON: {exc}") from None
    return Checkpoint.from_json(d)


def _links(prev: Checkpoint | None, cp: Checkpoint) -> str | None:
    """Why ``cp`` cannot follow ``prev`` (the last full checkpoint, or None), or None if it can."""
    want_segment = prev.segment + 1 if prev else 0
    if cp.segment != want_segment:
        return f"segment {cp.segment} where segment {want_segment} was expected"
    if prev and cp.segment_size != prev.segment_size:
        return f"segment_size {cp.segment_size} after {prev.segment_size}"
    if cp.head != chain_head(prev.head if prev else ZERO_HEAD, cp.size, cp.root):
        return "head does not chain from the previous head, size and root"
    return None


class CheckpointFile:
    """Append-only file of full-segment checkpoints plus a ``.partial`` sidecar (see module doc).

    One writer at a time. A missing file holds no checkpoints.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.partial_path = self.path.with_name(self.path.name + ".partial")

    def __repr__(self) -> str:
        return f"CheckpointFile({str(self.path)!r})"

    # --- reading -----------------------------------------------------------------------------------

    def _corrupt(self, line: int | None, reason: str, path: Path | None = None) -> CheckpointCorrupt:
        return CheckpointCorrupt(str(path or self.path), line, reason)

    def _read_lines(self, upto: int | None = None) -> list[Checkpoint]:
        """Parse and validate lines 1..upto (all when None)."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        lines = data.split(b"\n")
        torn = lines.pop()  # b"" when the file ends with a newline
        if torn:
            lines.append(torn)
        out: list[Checkpoint] = []
        prev: Checkpoint | None = None
        for i, raw in enumerate(lines, start=1):
            if upto is not None and i > upto:
                break
            if torn and i == len(lines):
                raise self._corrupt(i, _TORN)
            try:
                cp = _parse(raw)
            except ValueError as exc:
                raise self._corrupt(i, str(exc)) from None
            if not cp.full:
                raise self._corrupt(i, f"segment {cp.segment} is not full ({cp.size} entries)")
            why = _links(prev, cp)
            if why:
                raise self._corrupt(i, why)
            out.append(cp)
            prev = cp
        return out

    def load(self) -> list[Checkpoint]:
        """All full-segment checkpoints, validated; :class:`CheckpointCorrupt` on the first bad line."""
        return self._read_lines()

    def _tail(self) -> Checkpoint | None:
        """The last checkpoint of the file, parsed but not chain-checked (O(1) reading)."""
        try:
            f = open(self.path, "rb")
        except FileNotFoundError:
            return None
        with f:
            end = f.seek(0, os.SEEK_END)
            if end == 0:
                return None
            chunk = b""
            start = end
            while True:
                step = min(start, max(_TAIL_CHUNK, len(chunk)))
                start -= step
                f.seek(start)
                chunk = f.read(step) + chunk
                if not chunk.endswith(b"\n"):
                    raise self._corrupt(self._count_lines(), _TORN)
                cut = chunk.rfind(b"\n", 0, len(chunk) - 1)
                if cut >= 0 or start == 0:
                    raw = chunk[cut + 1 : -1]
                    break
        try:
            return _parse(raw)
        except ValueError as exc:
            raise self._corrupt(self._count_lines(), str(exc)) from None

    def _count_lines(self) -> int:
        data = self.path.read_bytes()
        return data.count(b"\n") + (0 if data.endswith(b"\n") else 1)

    def load_provisional(self) -> Checkpoint | None:
        """The provisional checkpoint from ``PATH.partial``, or None if absent or stale.

        It must follow the file's last full checkpoint (next segment, same segment size, head chained
        from the last full head); :class:`CheckpointCorrupt` otherwise.
        """
        return self._provisional(self._tail())

    def _provisional(self, tail: Checkpoint | None) -> Checkpoint | None:
        try:
            data = self.partial_path.read_bytes()
        except FileNotFoundError:
            return None
        if not data.endswith(b"\n") or data.count(b"\n") != 1:
            raise self._corrupt(1, "a provisional file holds exactly one line", self.partial_path)
        try:
            cp = _parse(data[:-1])
        except ValueError as exc:
            raise self._corrupt(1, str(exc), self.partial_path) from None
        if tail is not None and cp.segment <= tail.segment:
            return None  # superseded by full checkpoints
        if cp.full:
            raise self._corrupt(1, f"segment {cp.segment} is full, not provisional", self.partial_path)
        why = _links(tail, cp)
        if why:
            raise self._corrupt(1, why, self.partial_path)
        return cp

    def load_all(self) -> list[Checkpoint]:
        """:meth:`load` plus the provisional checkpoint, if any: a sequence for ``find_divergence``."""
        cps = self.load()
        p = self._provisional(cps[-1] if cps else None)
        return cps + [p] if p else cps

    # --- writing -----------------------------------------------------------------------------------

    def append(self, cps: Iterable[Checkpoint]) -> None:
        """Append full-segment checkpoints, durably (one write, flush, fsync).

        They must continue the file's chain: the next segment numbers, the same segment size, each
        head chained from the previous one (:class:`~chainfold.errors.InvalidArgument` otherwise, and
        nothing is written).
        """
        new = list(cps)
        if not new:
            return
        prev = self._tail()
        for cp in new:
            if not isinstance(cp, Checkpoint):
                raise InvalidArgument(f"not a Checkpoint: {cp!r}")
            if not cp.full:
                raise InvalidArgument(f"segment {cp.segment} is not full: use write_provisional")
            why = _links(prev, cp)
            if why:
                raise InvalidArgument(f"cannot append to {self.path}: {why}")
            prev = cp
        data = b"".join(_line(cp) for cp in new)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        created = not self.path.exists()
        with open(self.path, "ab") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if created:
            fsync_dir(self.path.parent)

    def write_provisional(self, cp: Checkpoint) -> None:
        """Replace ``PATH.partial`` atomically with the provisional checkpoint ``cp``.

        ``cp`` must be partial and follow the file's last full checkpoint (:class:`~chainfold.errors.InvalidArgument` otherwise).
        """
        if not isinstance(cp, Checkpoint) or cp.full:
            raise InvalidArgument("write_provisional takes a checkpoint of a partial segment")
        why = _links(self._tail(), cp)
        if why:
            raise InvalidArgument(f"cannot record provisional checkpoint for {self.path}: {why}")
        atomic_write(self.partial_path, _line(cp))

    def clear_provisional(self) -> None:
        """Remove ``PATH.partial`` if present."""
        self.partial_path.unlink(missing_ok=True)

    def truncate_after(self, segment: int) -> list[Checkpoint]:
        """Keep only the checkpoints of segments ``<= segment`` (``-1``: none), atomically.

        Only the kept lines are read and validated, so this also recovers a file whose later lines
        are corrupt (a torn last line). The provisional sidecar is removed unless it still follows
        the kept checkpoints. Returns the kept checkpoints.
        """
        if type(segment) is not int or segment < -1:
            raise InvalidArgument(f"segment must be an int >= -1, not {segment!r}")
        kept = self._read_lines(upto=segment + 1)
        if not self.path.exists():
            return kept
        atomic_write(self.path, b"".join(_line(cp) for cp in kept))
        try:
            keep_partial = self._provisional(kept[-1] if kept else None) is not None
        except CheckpointCorrupt:
            keep_partial = False
        if not keep_partial:
            self.clear_provisional()
        return kept

"""Progress on stderr for long reads: a live bar on a terminal, a line every few seconds elsewhere.

On a terminal, rich draws a transient spinner with the entries done, the rate and the time spent.
When stderr is not a terminal (a pipe, a log file, CI), a plain line is written every
``CHAINFOLD_PROGRESS_SECONDS`` seconds (default 5) while the command runs::

    chainfold: verify persistent://public/default/t: 1,250,000 entries, 210,344/s, 5.9 s
    chainfold: rebuild ...: 400,000 of 1,000,000 entries (40%), 98,000/s, 4.1 s, ETA 6 s

and one closing line when at least one was written, so a short command stays quiet. The ETA is
shown when the total is known.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import TextIO

from rich.markup import escape
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from .common import stderr

__all__ = ["progress", "ProgressLines", "DEFAULT_INTERVAL"]

DEFAULT_INTERVAL = 5.0


def _interval() -> float:
    try:
        return max(0.05, float(os.environ.get("CHAINFOLD_PROGRESS_SECONDS", DEFAULT_INTERVAL)))
    except ValueError:
        return DEFAULT_INTERVAL


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"
    m, s = divmod(int(seconds), 60)
    return f"{m} min {s:02d} s" if m < 60 else f"{m // 60} h {m % 60:02d} min"


class ProgressLines:
    """Plain progress lines for a stream that is not a terminal, written by a timer thread (so a
    stalled read still shows that it is alive). ``update(n)`` records the entries done."""

    def __init__(self, label: str, total: int | None = None, *, out: TextIO | None = None,
                 interval: float | None = None) -> None:
        self.label = label
        self.total = total
        self.out = out if out is not None else sys.stderr
        self.interval = interval if interval is not None else _interval()
        self.done = 0
        self.lines = 0
        self._t0 = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chainfold-progress", daemon=True)

    def update(self, n: int) -> None:
        self.done = n

    def line(self, *, final: bool = False) -> str:
        dt = time.monotonic() - self._t0
        n = self.done
        rate = n / dt if dt > 0 else 0.0
        if self.total:
            what = f"{n:,} of {self.total:,} entries ({100 * n / self.total:.0f}%)"
        else:
            what = f"{n:,} entries"
        parts = [what, f"{rate:,.0f}/s", _duration(dt)]
        if final:
            parts.append("done")
        elif self.total and rate > 0 and n < self.total:
            parts.append(f"ETA {_duration((self.total - n) / rate)}")
        return f"chainfold: {self.label}: " + ", ".join(parts)

    def _write(self, text: str) -> None:
        try:
            self.out.write(text + "\n")
            self.out.flush()
        except (OSError, ValueError):
            pass

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._write(self.line())
            self.lines += 1

    def __enter__(self) -> Callable[[int], None]:
        self._thread.start()
        return self.update

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        if self.lines and exc_type is None:
            self._write(self.line(final=True))


@contextlib.contextmanager
def progress(label: str, total: int | None = None) -> Iterator[Callable[[int], None]]:
    """A callback ``update(entries_done)`` that shows entries and entries/s while the block runs:
    a transient rich bar on a terminal, :class:`ProgressLines` otherwise."""
    if not sys.stderr.isatty():
        with ProgressLines(label, total) as update:
            yield update
        return
    t0 = time.monotonic()
    with Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"),
                  TextColumn("{task.completed:,.0f} entries"), TextColumn("{task.fields[rate]}"),
                  TimeElapsedColumn(), console=stderr, transient=True) as bar:
        task = bar.add_task(escape(label), total=total, rate="")

        def update(n: int) -> None:
            dt = time.monotonic() - t0
            bar.update(task, completed=n, rate=f"{n / dt:,.0f}/s" if dt > 0 else "")

        yield update

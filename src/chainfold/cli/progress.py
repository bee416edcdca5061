"""Progress on stderr for long reads (only on a terminal; silent in pipes and CI)."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator

from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from .common import stderr


@contextlib.contextmanager
def progress(label: str, total: int | None = None) -> Iterator[Callable[[int], None]]:
    """A callback ``update(entries_done)`` that shows entries and entries/s while the block runs."""
    if not sys.stderr.isatty():
        yield lambda n: None
        return
    t0 = time.monotonic()
    with Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"),
                  TextColumn("{task.completed:,.0f} entries"), TextColumn("{task.fields[rate]}"),
                  TimeElapsedColumn(), console=stderr, transient=True) as bar:
        task = bar.add_task(label, total=total, rate="")

        def update(n: int) -> None:
            dt = time.monotonic() - t0
            bar.update(task, completed=n, rate=f"{n / dt:,.0f}/s" if dt > 0 else "")

        yield update

"""Worker processes for the parallel engine: how the log reaches them, how tasks run, what comes back.

Each worker opens its own broker connection through a picklable :data:`LogSource` (workers are
started with ``forkserver``, never forked from a process holding a pulsar client). A task is a
picklable callable returning an :class:`Outcome`; errors come back inside it (every
:class:`~chainfold.errors.ChainfoldError` pickles with its evidence), and workers publish how many
entries they read for the caller's progress display.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import resource
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any

from ..errors import ChainfoldError, InvalidArgument, ModelError, WorkerFailed
from ..log import EventLog
from ..log.broker import BrokerOptions
from ..replay.decode import Decoder, Duplicate, Malformed, SeqGaps
from ..replay.fold import Folder, Skipped

__all__ = ["LogSource", "PulsarSource", "as_source", "peak_rss", "Outcome", "run_tasks", "publish_progress",
           "context", "peaks", "run_task"]

LogSource = Callable[[], EventLog]
"""A picklable callable that opens the log, called once in each worker (and in the caller)."""


@dataclass(frozen=True)
class PulsarSource:
    """Opens ``topic`` on the broker of ``broker`` (each call: a new connection); its readers get
    ``receiver_queue`` (see :class:`~chainfold.log.pulsar.PulsarLog`) when set."""

    topic: str
    broker: BrokerOptions
    receiver_queue: int | None = None

    def __call__(self) -> EventLog:
        from ..log.pulsar import open_log

        return open_log(self.topic, self.broker, receiver_queue=self.receiver_queue)


@dataclass(frozen=True)
class _Given:
    """A log that travels to the workers by pickling (an in-memory log, in tests)."""

    elog: EventLog

    def __call__(self) -> EventLog:
        return self.elog


def as_source(source: EventLog | LogSource) -> LogSource:
    """``source`` as a :data:`LogSource` (a log is sent to the workers by pickling, if it can be)."""
    if isinstance(source, EventLog):
        try:
            pickle.dumps(source)
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            raise InvalidArgument(f"{type(source).__name__} cannot be sent to worker processes; pass a "
                                  "LogSource such as PulsarSource(topic, broker)") from exc
        return _Given(source)
    return source


def peak_rss() -> int:
    """This process's peak resident memory in bytes (``VmHWM``; ``ru_maxrss`` where there is none)."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


_progress: Any = None  # per-task entry counters, shared with the parent (set in each worker)


def _init_worker(counters: Any) -> None:
    global _progress
    _progress = counters


def publish_progress(task: int, entries: int) -> None:
    """Tell the parent that task ``task`` has read ``entries`` entries (in a worker; else nothing)."""
    if _progress is not None:
        _progress[task] = entries


def context() -> multiprocessing.context.BaseContext:
    """``forkserver`` (preloading chainfold) where there is one, else ``spawn``."""
    methods = multiprocessing.get_all_start_methods()
    if "forkserver" in methods:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["chainfold.engines.parallel"])
        return ctx
    return multiprocessing.get_context("spawn")


_NONE = object()


@dataclass
class Outcome:
    """What one worker task sends back."""

    task: int
    pid: int = 0
    peak_rss: int = 0
    scan: Any = None  # the PartitionScan of a task that hashed
    states: dict[str, Any] = field(default_factory=dict)  # streams this task folded into
    dedup: dict[str, Any] | None = None  # manifest of the event ids this task folded (its own index's)
    malformed: list[Malformed] = field(default_factory=list)
    duplicates: list[Duplicate] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)  # events this task's model failed on, left out
    applied: int = 0
    index: int = 0
    misrouted: int = 0
    read: int = 0
    seqs: SeqGaps | None = None  # the seq check of the streams this task folded (or the range it hashed)
    error: ChainfoldError | None = None
    error_index: int = 0

    def take(self, folder: Folder, before: dict[str, Any], dump: Callable[[Any], Any] | None = None) -> None:
        """What ``folder`` folded since it held the states ``before``; its event ids are those its
        dedup index holds on top of the snapshot's (the manifest of its own pieces)."""
        decoder: Decoder = folder.decoder
        self.states = {s: (dump(v) if dump else v) for s, v in folder.states.items() if before.get(s, _NONE) is not v}
        self.dedup = folder.seen.checkpoint()
        self.malformed = decoder.malformed
        self.duplicates = decoder.duplicates
        self.skipped = folder.skipped
        self.applied = folder.applied
        self.index = decoder.index
        self.misrouted = decoder.misrouted
        self.seqs = folder.seqs

    def failed(self, exc: ChainfoldError) -> None:
        """Record the task's error (the first one), with the log index of a model error."""
        if self.error is None:
            self.error = exc
            self.error_index = exc.index if isinstance(exc, ModelError) and exc.index is not None else self.index

    def finish(self) -> Outcome:
        """Stamp the worker's pid and peak memory; make the error survive pickling."""
        self.pid = os.getpid()
        self.peak_rss = peak_rss()
        if isinstance(self.error, ModelError):
            self.error = _portable(self.error)
        return self


def run_task(task: int, source: LogSource, body: Callable[[EventLog, Outcome], None]) -> Outcome:
    """Task ``task``'s outcome: ``body(log, outcome)`` on a log opened from ``source`` (closed
    after); a chainfold error is kept in the outcome, the entries read are published."""
    out = Outcome(task)
    elog = source()
    try:
        body(elog, out)
    except ChainfoldError as exc:
        out.failed(exc)
    finally:
        elog.close()
    publish_progress(task, out.read)
    return out


def _portable(exc: ModelError) -> ModelError:
    """``exc`` with a cause that survives pickling (the model's exception may not)."""
    try:
        pickle.loads(pickle.dumps(exc.cause))
        return exc
    except Exception:  # noqa: BLE001 - anything the user's exception does when pickled
        cause = ChainfoldError(f"{type(exc.cause).__name__}: {exc.cause}")
        return ModelError(exc.stream, exc.event_id, exc.message_id, cause, index=exc.index)


def run_tasks(tasks: Sequence[Callable[[], Outcome]], workers: int, on_progress: Callable[[int], None] | None,
              progress_of: Callable[[list[int]], int]) -> list[Outcome]:
    """Run ``tasks`` in up to ``workers`` processes; their outcomes in task order."""
    ctx = context()
    counters = ctx.Array("q", len(tasks), lock=False)
    with ProcessPoolExecutor(max_workers=max(1, min(workers, len(tasks))), mp_context=ctx,
                             initializer=_init_worker, initargs=(counters,)) as pool:
        futures = [pool.submit(_call, task) for task in tasks]
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=0.25, return_when=FIRST_EXCEPTION)
            if on_progress is not None:
                on_progress(progress_of(list(counters)))
            for f in done:
                exc = f.exception()
                if exc is not None:
                    pool.shutdown(wait=False, cancel_futures=True)
                    if isinstance(exc, BrokenProcessPool):
                        raise WorkerFailed(f"a worker process died ({exc}); run again, or with fewer workers") from exc
                    raise exc
        outcomes = [f.result() for f in futures]
    if on_progress is not None:
        on_progress(progress_of([o.read for o in outcomes]))
    return outcomes


def _call(task: Callable[[], Outcome]) -> Outcome:
    return task().finish()


def peaks(outcomes: list[Outcome]) -> list[int]:
    """Peak memory of each worker process (one per pid)."""
    by_pid: dict[int, int] = {}
    for o in outcomes:
        by_pid[o.pid] = max(by_pid.get(o.pid, 0), o.peak_rss)
    return list(by_pid.values())

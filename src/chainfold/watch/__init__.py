"""``chainfold watch``: find a worker's divergence while it happens (docs/cli.md).

The parts, each usable and tested alone:

=============  ===============================================================================
follow.py      :class:`EvidenceFollower`: a worker's Tracker directory read as it grows (O(new)
               per poll, O(1) between polls; waits for the directory; a worker restart is
               invisible; torn tails never consumed; checkpoints checked against their leaves)
compare.py     :class:`HandlingComparator`: the worker's handling against the reference, position
               by position (leaf hashes; state digests where both sides have them), memory flat
               in the run's length (a window, then an on-disk FIFO); save/load for a restart
metrics.py     :class:`WatchMetrics`: Prometheus metrics at ``/metrics`` (extra ``chainfold[watch]``)
output.py      :class:`WatchLines` (JSON lines on stdout, metrics updated with them),
               :class:`StderrStatus` (a status line on a terminal only), :class:`StopOnSignals`
live.py        the live scene for tests, benchmarks and a live demo: a publisher at a rate, the
               real worker with faults, detection latency from the evidence, Apache restarts
=============  ===============================================================================

The command itself, :func:`chainfold.ops.watch.watch` (:class:`~chainfold.ops.watch.WatchRun`),
is a wiring of the replay stages (as rebuild's, following the log) with these parts; its docstring
says how: where it starts, how the reference is fed, the ticks between batches and on idle polls,
broker failures, the stop, and why memory stays flat. The CLI is ``cli/watch_cmd.py``.
"""

from .compare import Expected, HandlingComparator, LiveDivergence
from .follow import EvidenceBatch, EvidenceFollower, ProcessedLine
from .output import StderrStatus, StopOnSignals, WatchLines

__all__ = ["EvidenceFollower", "EvidenceBatch", "ProcessedLine", "HandlingComparator", "Expected",
           "LiveDivergence", "WatchLines", "StderrStatus", "StopOnSignals"]

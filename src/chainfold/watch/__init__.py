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

How watch is wired from the replay stages (design; the command composes them, it adds no loop
of its own over entries):

1. **Start.** From the newest valid snapshot (rebuild's choice): the fold's states, the seen ids
   and the position P (log index, message id). The hash stage resumes the recorded checkpoints
   at P. If ``--evidence``: the comparison state saved beside that snapshot (see 5) continues the
   comparator and the follower; without it, the reference is rebuilt from the start of the log
   once (a snapshot alone does not hold the reference positions the worker has not reached).
2. **Follow.** ``Source(Span(partition, after=P, follow=True))`` → hash → decode/dedup → fold,
   with periodic snapshots at exact entry counts (``Stops.every``). A tap after decode turns each
   first-seen event into an :class:`Expected` (log index, ids, leaf hash from the hash stage) for
   :meth:`HandlingComparator.add_reference`; the decoder's new malformed entries and duplicates
   become ``malformed``/``duplicate`` lines. When the worker gives state digests (its evidence has
   ``checkpoints.states``), the model's ``apply`` is wrapped to digest the rendered state of each
   applied event, fed in order to :meth:`HandlingComparator.add_digests` after each batch's fold.
   Between batches *and while the log is idle* (the following source must hand back control on
   each idle poll: an empty batch, or a thread feeding a bounded queue), the loop polls the
   follower (at most :meth:`HandlingComparator.room` positions), calls :meth:`~HandlingComparator.check`
   with ``reference_complete`` when the source reached the log's end after that poll, writes the
   divergence at once (exit 1 with ``--fail-on divergence``) and a ``progress`` line about once a
   second (``log_entries``, the follower's positions, :meth:`HandlingComparator.lag`).
3. **Comparing with flat memory.** The reference is the first entry of each event id in log
   order. Positions are confirmed as soon as both sides have them and dropped; only the
   reference positions the worker has not reached are kept (``window`` in memory, the rest in a
   spill file read back in order), and the worker's positions are read only as far as the
   reference goes. Leaf comparison at the worker's pace is cheaper than building reference
   checkpoints (one 32-byte compare against a SHA-256 per entry), and it names the exact event at
   once, where segment heads would wait for a segment to complete; the follower still checks the
   worker's checkpoints against its leaves, so what reconcile reads agrees with what watch compared.
4. **Broker restart.** The source raises :class:`~chainfold.errors.BrokerUnavailable` once its
   reader's retries are spent: watch writes an ``error`` line, waits (backing off), and opens a new
   source strictly after ``Source.last``, the last entry every stage has taken: no entry is
   counted twice or skipped, and the comparator and follower never notice. The worker's
   restart is invisible to the follower; a missing evidence directory is waited for.
5. **SIGTERM / SIGINT** (:class:`StopOnSignals`): the source is stopped, the current batch
   finishes, the hash stage writes its checkpoints (and the provisional one), the snapshot sink
   takes a snapshot at that exact position, and the comparator's :meth:`~HandlingComparator.save`
   plus the follower's :meth:`~EvidenceFollower.state` go in one file beside the snapshot, tagged
   with its position; metrics server closed; exit 0.
"""

from .compare import Expected, HandlingComparator, LiveDivergence
from .follow import EvidenceBatch, EvidenceFollower, ProcessedLine
from .output import StderrStatus, StopOnSignals, WatchLines

__all__ = ["EvidenceFollower", "EvidenceBatch", "ProcessedLine", "HandlingComparator", "Expected",
           "LiveDivergence", "WatchLines", "StderrStatus", "StopOnSignals"]

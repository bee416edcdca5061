"""A real example worker: the kind of real-time consumer chainfold reconciles, with faults on demand.

It keeps bank-account balances (:mod:`chainfold.examples.accounts`) from a Pulsar subscription
(durable, Failover or Exclusive, from the earliest message), the way payment workers do:

* receive a message, decode it (a malformed payload is logged and acked, never handled), drop an
  event id it already handled in this process (an in-memory idempotency cache: it does not survive
  a restart), apply the event to the account, and tell :class:`~chainfold.tracker.Tracker` it handled
  it: after handling, before the ack;
* every ``flush_every`` messages (and, with ``--commit-seconds S``, at most S seconds after the
  first message not yet committed, so a quiet stream's evidence still shows up for ``chainfold
  watch`` within seconds), commit: write the state export (docs/worker-evidence.md), flush the
  tracker's evidence (checkpoints, leaf hashes, state digests, processed log with handling times)
  and the worker's own bookkeeping, *then* ack the messages of that batch. So the state, the
  evidence and what was handled always agree, and anything not acked is redelivered by the broker
  after a crash: at-least-once delivery. After ``chainfold rewind`` into a producer batch, the
  broker (Apache Pulsar with batch-index acknowledgement) delivers only the batch's later
  messages: the worker acknowledges those cumulatively, so the batch is completed (see
  :class:`_Acker`).

On start it reloads its state export and continues the tracker in the same evidence directory.

Faults, injected on purpose (``--faults``, repeatable; several in one value separated by ``;``);
message counts are 1-based over the worker's whole life (across restarts: they are saved with the
state), redeliveries included:

``crash-before-ack:N``
    after handling the N-th message, commit the state and evidence, then die (``os._exit``) before
    acking. The restarted worker (same subscription, state and evidence) resumes from the committed
    state and the broker redelivers every unacked message, and whole batches whose acks were only
    partial: the worker handles them again (its idempotency cache died with it), so the tracker and
    processed log hold genuine duplicates, applied twice in the state. This is the classic
    "committed but not acknowledged" window of every at-least-once consumer.
``skip:ID1,ID2``, ``skip-every:K``
    the worker drops those events (or every K-th message) silently: acks without handling, as a
    filter bug or a swallowed exception does.
``double:ID1,ID2``
    the worker handles those events twice in a row (a handler retried after it had already
    succeeded): applied twice, tracked twice. The second handling is where it departs from the
    reference.
``mishandle:TYPE:FROM:TO``
    for messages FROM..TO, events of TYPE are applied wrongly (a bad deploy that was later rolled
    back): ``Withdrawn`` as a deposit (a sign error), ``Deposited`` in major instead of minor units,
    ``FeeCharged`` charged twice, ``Opened`` with its currency dropped, ``Closed`` ignored. The
    handling order stays right; only the state is wrong.

Its own bookkeeping, ``worker.json`` in the evidence directory (written with every commit): messages
received so far, runs, crash points, the ids it skipped and mishandled, and places in its handling
order (the tracker's size then): of the mishandled events (``mishandled_at``, so a test can
recompute its state independently), of the skipped ones (``skipped_at``: where the skipped event
should have been), of the second handling of a doubled one (``doubled_at``) and of each crash (``crashed_at``: the place of the first handling after the
restart, a redelivered message handled again).

Run it as ``python -m chainfold.worker --topic T --service-url URL --evidence DIR --state FILE``.
It stops when no message came for ``--idle`` seconds (default 2) or after ``--count`` messages,
commits, acks, and prints a JSON summary of the run on stdout (logs go to stderr). Exit 0; a
crash on purpose exits with :data:`CRASH_EXIT`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .envelope import Event, decode
from .errors import BadInput, ChainfoldError, MalformedEnvelope
from .examples import accounts
from .store.atomic import atomic_write
from .tracker import Tracker

__all__ = ["Faults", "AccountsWorker", "CRASH_EXIT", "main"]

log = logging.getLogger("chainfold.worker")

CRASH_EXIT = 70
"""Exit status of a worker that crashed on purpose (``crash-before-ack``)."""

META_NAME = "worker.json"
"""The worker's own bookkeeping in its evidence directory: message count and the faults it injected."""


# --- faults ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Faults:
    """The faults a worker injects (see the module docstring)."""

    crash_before_ack: int | None = None
    skip_ids: frozenset[str] = frozenset()
    skip_every: int | None = None
    mishandle: tuple[tuple[str, int, int], ...] = ()
    double_ids: frozenset[str] = frozenset()

    @classmethod
    def parse(cls, specs: Iterable[str]) -> "Faults":
        """Parse ``kind:args`` items (each spec may hold several, separated by ``;``)."""
        crash: int | None = None
        skip_ids: set[str] = set()
        skip_every: int | None = None
        mishandle: list[tuple[str, int, int]] = []
        double_ids: set[str] = set()
        for spec in specs:
            for item in (s.strip() for s in spec.split(";")):
                if not item:
                    continue
                kind, _, arg = item.partition(":")
                try:
                    if kind == "crash-before-ack":
                        crash = _positive(arg)
                    elif kind in ("skip", "double"):
                        ids = [x.strip() for x in arg.split(",") if x.strip()]
                        if not ids:
                            raise ValueError("no event ids")
                        (skip_ids if kind == "skip" else double_ids).update(ids)
                    elif kind == "skip-every":
                        skip_every = _positive(arg)
                    elif kind == "mishandle":
                        etype, lo, hi = arg.split(":")
                        if etype not in _MISHANDLERS:
                            raise ValueError(f"no way to mishandle {etype!r} (one of {', '.join(_MISHANDLERS)})")
                        a, b = _positive(lo), _positive(hi)
                        if b < a:
                            raise ValueError(f"{b} < {a}")
                        mishandle.append((etype, a, b))
                    else:
                        raise ValueError("unknown fault (crash-before-ack, skip, skip-every, double, mishandle)")
                except ValueError as exc:
                    raise BadInput(f"--faults {item!r}: {exc}") from None
        return cls(crash, frozenset(skip_ids), skip_every, tuple(mishandle), frozenset(double_ids))

    def skips(self, n: int, event_id: str) -> bool:
        return event_id in self.skip_ids or (self.skip_every is not None and n % self.skip_every == 0)

    def mishandles(self, n: int, etype: str) -> bool:
        return any(t == etype and a <= n <= b for t, a, b in self.mishandle)

    def __str__(self) -> str:
        parts = []
        if self.crash_before_ack is not None:
            parts.append(f"crash-before-ack:{self.crash_before_ack}")
        if self.skip_ids:
            parts.append("skip:" + ",".join(sorted(self.skip_ids)))
        if self.skip_every is not None:
            parts.append(f"skip-every:{self.skip_every}")
        parts += [f"mishandle:{t}:{a}:{b}" for t, a, b in self.mishandle]
        if self.double_ids:
            parts.append("double:" + ",".join(sorted(self.double_ids)))
        return ";".join(parts) or "none"


def _positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise ValueError(f"{n} is not a count >= 1")
    return n


def _as_deposit(state: dict[str, Any], ev: Event) -> dict[str, Any]:
    return accounts.apply(state, ev._replace(type="Deposited"))


def _major_units(state: dict[str, Any], ev: Event) -> dict[str, Any]:
    data = dict(ev.data)
    if type(data.get("amount")) is int:
        data["amount"] //= 100
    return accounts.apply(state, ev._replace(data=data))


def _twice(state: dict[str, Any], ev: Event) -> dict[str, Any]:
    return accounts.apply(accounts.apply(state, ev), ev)


def _no_currency(state: dict[str, Any], ev: Event) -> dict[str, Any]:
    return accounts.apply(state, ev._replace(data={k: v for k, v in ev.data.items() if k != "currency"}))


def _ignored(state: dict[str, Any], ev: Event) -> dict[str, Any]:
    return dict(state, events=state["events"] + 1)


_MISHANDLERS = {
    "Withdrawn": _as_deposit,
    "Deposited": _major_units,
    "FeeCharged": _twice,
    "Opened": _no_currency,
    "Closed": _ignored,
}


# --- the worker ----------------------------------------------------------------------------------------


@dataclass
class RunStats:
    """What one run of the worker did (its JSON summary)."""

    received: int = 0
    handled: int = 0
    malformed: int = 0
    deduplicated: int = 0
    rejected_by_model: int = 0
    skipped: list[str] = field(default_factory=list)
    mishandled: list[str] = field(default_factory=list)
    commits: int = 0


class AccountsWorker:
    """Account balances from a stream of messages; state export and evidence committed together.

    ``handle(payload, message_id)`` is the per-message step (no I/O but buffered tracker appends);
    ``commit()`` writes the state export, the tracker's evidence and the bookkeeping durably; the
    caller acks what was received before a commit only after it.
    """

    def __init__(self, *, state_path: str | os.PathLike[str], evidence_dir: str | os.PathLike[str],
                 faults: Faults = Faults()) -> None:
        self.state_path = Path(state_path)
        self.evidence = Path(evidence_dir)
        self.faults = faults
        self.states: dict[str, dict[str, Any]] = {}
        if self.state_path.exists():
            doc = json.loads(self.state_path.read_text(encoding="utf-8"))
            if not isinstance(doc, dict):
                raise BadInput(f"{self.state_path}: a state export is one JSON object")
            self.states = doc  # accounts states render to themselves
        # flushed at commits only (see commit), so the evidence never runs ahead of the state export
        self.tracker = Tracker(self.evidence, processed_log=True, flush_every=1 << 62, flush_interval=None,
                               handling_times=True)
        self.meta_path = self.evidence / META_NAME
        self.meta: dict[str, Any] = {"received": 0, "runs": 0, "crashes": [], "skipped": [], "mishandled": [],
                                     "mishandled_at": [], "skipped_at": [], "crashed_at": [], "doubled": [],
                                     "doubled_at": []}
        if self.meta_path.exists():
            self.meta.update(json.loads(self.meta_path.read_text(encoding="utf-8")))
        self.meta["runs"] += 1
        self.received: int = self.meta["received"]
        self.seen: set[str] = set()  # the idempotency cache: in memory only, lost on a crash
        self.run = RunStats()

    def handle(self, payload: bytes, message_id: Any = None) -> str:
        """Handle one message; returns what happened: handled, malformed, duplicate, skipped, rejected."""
        self.received += 1
        n = self.received
        self.run.received += 1
        try:
            ev = decode(payload)
        except MalformedEnvelope as exc:
            log.warning("message %s is malformed (%s): acked, not handled", _mid(message_id), exc.reason)
            self.run.malformed += 1
            return "malformed"
        if ev.id in self.seen:
            self.run.deduplicated += 1
            return "duplicate"
        if self.faults.skips(n, ev.id):
            self.run.skipped.append(ev.id)
            self.meta["skipped"].append(ev.id)
            self.meta["skipped_at"].append(self.tracker.size)
            return "skipped"
        state = self.states.get(ev.stream)
        if state is None:
            state = accounts.initial(ev.stream)
        try:
            if self.faults.mishandles(n, ev.type):
                new = _MISHANDLERS[ev.type](state, ev)
                self.run.mishandled.append(ev.id)
                self.meta["mishandled"].append(ev.id)
                self.meta["mishandled_at"].append(self.tracker.size)  # its place in the handling order
            else:
                new = accounts.apply(state, ev)
        except ValueError as exc:  # a broken event: dead-lettered, not handled
            log.error("event %s (message %s) rejected: %s", ev.id, _mid(message_id), exc)
            self.run.rejected_by_model += 1
            return "rejected"
        rendered = self.states[ev.stream] = accounts.render(new)
        self.seen.add(ev.id)
        # after handling, before the ack
        self.tracker.handled(payload, message_id, ev.id, state=rendered, stream=ev.stream)
        self.run.handled += 1
        if ev.id in self.faults.double_ids:  # the handler runs again: applied and tracked a second time
            self.meta["doubled"].append(ev.id)
            self.meta["doubled_at"].append(self.tracker.size)
            again = self.states[ev.stream] = accounts.render(accounts.apply(new, ev))
            self.tracker.handled(payload, message_id, ev.id, state=again, stream=ev.stream)
        return "handled"

    def commit(self) -> None:
        """Write the state export, flush the evidence and bookkeeping: all durable before any ack."""
        atomic_write(self.state_path, (json.dumps(self.states, indent=1, sort_keys=True) + "\n").encode())
        self.tracker.flush()
        self.meta["received"] = self.received
        atomic_write(self.meta_path, json.dumps(self.meta, sort_keys=True).encode())
        self.run.commits += 1

    def crash_due(self) -> bool:
        return self.faults.crash_before_ack is not None and self.received == self.faults.crash_before_ack

    def summary(self) -> dict[str, Any]:
        r = self.run
        return {
            "run": self.meta["runs"], "received": r.received, "handled": r.handled, "malformed": r.malformed,
            "deduplicated": r.deduplicated, "rejected_by_model": r.rejected_by_model, "skipped": r.skipped,
            "mishandled": r.mishandled, "commits": r.commits, "received_total": self.received,
            "tracked_total": self.tracker.size, "streams": len(self.states), "faults": str(self.faults),
            "crashed": False,
        }


def _mid(message_id: Any) -> str:
    try:
        return f"{message_id.ledger_id()}:{message_id.entry_id()}:{message_id.partition()}:{message_id.batch_index()}"
    except AttributeError:
        return str(message_id)


def consume(worker: AccountsWorker, consumer: Any, *, flush_every: int = 100, idle: float = 2.0,
            count: int | None = None, commit_seconds: float | None = None) -> dict[str, Any]:
    """The consumer loop: receive, handle, commit every ``flush_every`` messages (and at most
    ``commit_seconds`` after the first uncommitted one, if given), then ack.

    Returns the run's summary; a due ``crash-before-ack`` ends the process instead.
    """
    import pulsar

    pending: list[Any] = []
    acker = _Acker(consumer)
    last = time.monotonic()
    commit_by = float("inf")  # when the oldest uncommitted message must be committed
    n = 0

    def commit_and_ack() -> None:
        nonlocal commit_by
        worker.commit()
        acker.ack(pending)
        pending.clear()
        commit_by = float("inf")

    # before the first message, wait longer: a failover subscription on Apache Pulsar holds the
    # first delivery back for a second (activeConsumerFailoverDelayTimeMillis)
    wait = max(idle, 10.0)
    while count is None or n < count:
        try:
            msg = consumer.receive(timeout_millis=200)
        except pulsar.Timeout:
            if pending and time.monotonic() >= commit_by:
                commit_and_ack()
            if time.monotonic() - last >= wait:
                break
            continue
        wait = idle
        last = time.monotonic()
        n += 1
        acker.received(msg)
        worker.handle(msg.data(), msg.message_id())
        pending.append(msg)
        if commit_seconds is not None and commit_by == float("inf"):
            commit_by = last + commit_seconds
        if worker.crash_due():
            worker.commit()  # the state and evidence hold this message ...
            worker.meta["crashes"].append(worker.received)
            worker.meta["crashed_at"].append(worker.tracker.size)
            atomic_write(worker.meta_path, json.dumps(worker.meta, sort_keys=True).encode())
            log.error("crash-before-ack: dying after message %d with %d message(s) handled and committed "
                      "but not acked", worker.received, len(pending))
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(CRASH_EXIT)  # ... and is never acked: the broker will redeliver it
        if len(pending) >= flush_every or time.monotonic() >= commit_by:
            commit_and_ack()
    commit_and_ack()
    return worker.summary()


class _Acker:
    """Acknowledges handled messages: one by one, except the messages of a producer batch that the
    broker delivered from a batch index above 0 (the broker keeps batch-index acknowledgements and
    the batch's first messages were acknowledged, as ``chainfold rewind`` into a batch leaves it):
    those cumulatively, the only acknowledgement that completes such a batch for a consumer without
    batch-index acknowledgement (which pulsar-lite 0.2.0 does not support: it acknowledges the whole
    batch). Cumulative is right for this worker: it handles in order, one consumer at a time."""

    def __init__(self, consumer: Any) -> None:
        self.consumer = consumer
        self.partial: set[tuple[int, int]] = set()
        self._entry: tuple[int, int] | None = None

    def received(self, msg: Any) -> None:
        mid = msg.message_id()
        entry = (mid.ledger_id(), mid.entry_id())
        if entry != self._entry and mid.batch_index() > 0:
            self.partial.add(entry)
        self._entry = entry

    def ack(self, pending: list[Any]) -> None:
        for m in pending:
            mid = m.message_id()
            if (mid.ledger_id(), mid.entry_id()) in self.partial:
                self.consumer.acknowledge_cumulative(m)
            else:
                self.consumer.acknowledge(m)


def run_worker(*, topic: str, service_url: str | None, evidence: str, state: str, faults: Faults,
               subscription: str = "accounts-worker", subscription_type: str = "failover",
               flush_every: int = 100, idle: float = 2.0, count: int | None = None,
               data_dir: str | None = None, commit_seconds: float | None = None) -> dict[str, Any]:
    """Subscribe to ``topic`` and run the worker until idle (or ``count`` messages)."""
    import pulsar

    from .log.broker import BrokerOptions, connect
    from .log import full_topic_name

    opts = BrokerOptions.from_env(service_url=service_url, data_dir=data_dir)
    client = connect(opts)
    ctype = {"failover": pulsar.ConsumerType.Failover, "exclusive": pulsar.ConsumerType.Exclusive}[subscription_type]
    worker = AccountsWorker(state_path=state, evidence_dir=evidence, faults=faults)
    log.info("run %d: %s from message %d, faults %s", worker.meta["runs"], full_topic_name(topic),
             worker.received + 1, faults)
    consumer = client.subscribe(full_topic_name(topic), subscription, consumer_type=ctype,
                                initial_position=pulsar.InitialPosition.Earliest, receiver_queue_size=1000)
    try:
        summary = consume(worker, consumer, flush_every=flush_every, idle=idle, count=count,
                          commit_seconds=commit_seconds)
    finally:
        worker.tracker.close()
    try:
        consumer.close()  # flushes the acks
    except Exception as exc:  # pulsar raises its own types
        log.warning("closing the consumer: %s", exc)
    return summary


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m chainfold.worker", description=__doc__.split("\n\n")[0])
    p.add_argument("--topic", required=True)
    p.add_argument("--service-url", default=None, help="pulsar://host:port (default $CHAINFOLD_SERVICE_URL, "
                   "else the embedded broker of --data-dir)")
    p.add_argument("--data-dir", default=None, help="embedded broker data directory (without a service URL)")
    p.add_argument("--evidence", required=True, help="tracker directory (checkpoints, leaves, processed log)")
    p.add_argument("--state", required=True, help="the state export (docs/worker-evidence.md), reloaded at start")
    p.add_argument("--faults", action="append", default=[], metavar="SPEC",
                   help="crash-before-ack:N | skip:ID1,ID2 | skip-every:K | mishandle:TYPE:FROM:TO")
    p.add_argument("--subscription", default="accounts-worker")
    p.add_argument("--subscription-type", choices=("failover", "exclusive"), default="failover")
    p.add_argument("--flush-every", type=int, default=100, help="commit (and ack) every N messages")
    p.add_argument("--commit-seconds", type=float, default=0.0, metavar="S",
                   help="also commit at most S seconds after the first uncommitted message, so a quiet "
                   "stream's evidence is visible to chainfold watch (default 0: only every --flush-every)")
    p.add_argument("--idle", type=float, default=2.0, help="stop after this many seconds without a message")
    p.add_argument("--count", type=int, default=None, help="stop after N messages in this run")
    p.add_argument("-v", "--verbose", action="count", default=0)
    a = p.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING - 10 * a.verbose,
                        format="worker: %(levelname)s %(message)s")
    logging.getLogger("chainfold").setLevel(logging.WARNING - 10 * a.verbose)
    code = 0
    try:
        faults = Faults.parse(a.faults)
        summary = run_worker(topic=a.topic, service_url=a.service_url, evidence=a.evidence, state=a.state,
                             faults=faults, subscription=a.subscription, subscription_type=a.subscription_type,
                             flush_every=max(1, a.flush_every), idle=a.idle, count=a.count, data_dir=a.data_dir,
                             commit_seconds=a.commit_seconds if a.commit_seconds > 0 else None)
        sys.stdout.write(json.dumps(summary) + "\n")
    except ChainfoldError as exc:
        sys.stderr.write(f"worker: error: {exc}\n")
        code = exc.exit_code
    except KeyboardInterrupt:
        code = 130
    from .log.broker import exit_process

    exit_process(code)


if __name__ == "__main__":
    main()

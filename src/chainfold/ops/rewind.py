"""``rewind``: put a stopped worker back at an entry: a state export and its subscription's cursor.

docs/cli.md, "chainfold rewind". For entry ``INDEX`` of a (non-partitioned) topic:

1. **where**: the message ids of entry ``INDEX``, of the first message of its producer batch and of
   the entry before that, found from the log's recorded checkpoints (each names its segment's first
   message id, so at most one segment plus one batch is read) or, without a record, by reading from
   the start;
2. **guard**: an *exclusive* consumer on the subscription. A broker that enforces exclusive
   subscriptions (Apache Pulsar) refuses it while any consumer (the worker) is connected:
   :class:`~chainfold.errors.SubscriptionInUse`; held while the state is folded, it also keeps a
   worker from connecting meanwhile. With an admin URL the broker's topic stats also name the
   connected consumers and say whether the subscription exists. pulsar-lite enforces neither
   exclusive subscriptions nor has an admin API: the report says the check could not be made;
3. **state**: :func:`~chainfold.ops.rebuild.rebuild` with ``until`` entry ``INDEX - 1``, from the
   newest valid snapshot at or before it; checked to have covered exactly ``INDEX`` entries; written
   crash-safe before the cursor moves;
4. **cursor**: the guard seeks to the ledger entry holding entry ``INDEX`` (pulsar-client ``seek``;
   the broker positions cursors on ledger entries, and the client sends no batch index with a seek).
   When ``INDEX`` is message ``b > 0`` of a producer batch, an exclusive consumer with batch-index
   acknowledgement then receives the batch's messages ``0 .. b-1`` and acknowledges them one by one;
5. **check**: a fresh exclusive consumer receives the subscription's next message (and does not
   acknowledge it): the report's ``position`` is what was measured, never assumed.

**Batches.** Pulsar stores a producer's batch as one ledger entry. The cursor stands inside a batch
only where the broker keeps batch-index acknowledgements: Apache Pulsar with
``acknowledgmentAtBatchIndexLevelEnabled=true`` (off by default in 4.0; ``scripts/pulsar-standalone``
turns it on) delivers the batch with its acknowledged messages marked, and every pulsar-client drops
those, so any consumer subscribing afterwards receives entry ``INDEX`` first. Where the check finds
the batch's first message instead (the broker ignored the acknowledgements) or a later entry
(pulsar-lite 0.2.0 acknowledges the whole batch on a batch-index acknowledgement), the rewind goes to
the batch's first message ``INDEX - b``, seeks there again, rewrites the state as of the entry before
it, and says so: ``position`` < ``requested``. The worker then handles ``b`` entries again from a state
that does not contain them: nothing is applied twice. (A seek to a batch message id is no way
around this: pulsar-client 3.x drops the messages up to and including that batch index only in the
consumer that sought, not in the worker's consumer that subscribes later.)

**What the worker needs.** After a rewind into a batch, the worker receives the rest of that batch
only. It must acknowledge it *cumulatively* (as chainfold's worker does) or with batch-index
acknowledgement enabled on its consumer; individual acknowledgements without it never complete that
batch, and the broker delivers its remaining messages again at every restart.

**What a state export cannot carry.** A worker that deduplicates by event id only in memory (as the
demo worker does) re-applies a duplicate whose first copy lies before the position; a worker with
a durable idempotency store does not.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import BadInput, BrokerUnavailable, CheckpointCorrupt, SubscriptionInUse
from ..hashing.record import PartitionRecord
from ..log import EventLog, MessageId, partition_index
from ..replay.model import Model
from ..store.atomic import atomic_write
from ..store.snapshots import topic_dir
from .rebuild import rebuild

__all__ = ["RewindReport", "Target", "locate", "divergence_index", "rewind", "subscription_consumers"]

log = logging.getLogger("chainfold.ops.rewind")

DIVERGENCE_PREFIX = "divergence:"
_GUARD_NAME = "chainfold-rewind"


# --- where -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """Entry ``requested`` (message ``message_id``) and the first message of its producer batch,
    entry ``batch_start`` (``== requested`` unless ``requested`` is message 1 or later of a batch);
    ``ids`` holds the message ids of entries ``batch_start - 1 .. requested`` that the log has."""

    requested: int
    message_id: MessageId
    batch_start: int
    ids: Mapping[int, MessageId]

    @property
    def in_batch(self) -> int:
        """How many messages of its batch come before entry ``requested``."""
        return self.requested - self.batch_start

    @property
    def entry(self) -> MessageId:
        """The ledger entry that holds entry ``requested`` (no batch index): where a seek goes."""
        m = self.message_id
        return MessageId(m.ledger, m.entry, m.partition, -1)

    def before(self, index: int) -> MessageId | None:
        """The message id of the entry before entry ``index`` (``None`` at the start of the log)."""
        return self.ids[index - 1] if index > 0 else None


def _ids(elog: EventLog, partition: str, lo: int, hi: int, record: PartitionRecord | None) -> dict[int, MessageId]:
    """Message ids of entries ``lo..hi`` (inclusive) of ``partition``; short if the log is shorter.

    Starts at the recorded checkpoint of ``lo``'s segment when the log still has it there; else at
    the start of the log.
    """
    start, base = None, 0
    try:
        cps = record.load() if record is not None else []
    except CheckpointCorrupt as exc:
        log.warning("%s; reading from the start of the log", exc)
        cps = []
    for cp in cps:
        first = cp.segment * cp.segment_size
        if first <= lo and cp.first is not None:
            start, base = MessageId.parse(cp.first), first
    out: dict[int, MessageId] = {}
    if start is not None:
        for i, e in enumerate(elog.read(partition, start=start, limit=hi - base + 1), base):
            if i == base and e.message_id.position != start.position:
                log.warning("%s: the log no longer starts segment %d at %s; reading from the start",
                            partition, base, start)
                out.clear()
                break
            if i >= lo:
                out[i] = e.message_id
        else:
            return out
    for i, e in enumerate(elog.read(partition, limit=hi + 1)):
        if i >= lo:
            out[i] = e.message_id
    return out


def locate(elog: EventLog, index: int, *, snapshots_root: Path) -> Target:
    """The rewind target for entry ``index`` (see the module docstring on batches).

    Raises :class:`BadInput` for a partitioned topic or an index outside ``0 .. entries-1``.
    """
    parts = elog.partitions()
    if len(parts) != 1:
        raise BadInput(f"{elog.topic} has {len(parts)} partitions: a rewind moves one cursor over one "
                       "partition's order; rewind a non-partitioned topic")
    if index < 0:
        raise BadInput(f"--to {index}: an entry index is 0 or more")
    p = parts[0]
    record = PartitionRecord(topic_dir(snapshots_root, elog.topic), p)
    at = _ids(elog, p, index, index, record).get(index)
    if at is None:
        size = sum(1 for _ in elog.read(p))
        raise BadInput(f"--to {index}: {elog.topic} has {size} entries (0..{size - 1}); "
                       "a rewind goes to an entry the log holds")
    start = index - max(at.batch, 0)
    ids = _ids(elog, p, max(start - 1, 0), index, record)
    first = ids.get(start)
    if first is None or (first.ledger, first.entry) != (at.ledger, at.entry) or first.batch > 0:
        raise BadInput(f"entry {index} ({at}) is message {at.batch} of a batch, but entry {start} is {first}: "
                       "the log's batches are not where their message ids say")
    pi = partition_index(p)
    return Target(index, at._replace(partition=pi), start, {i: m._replace(partition=pi) for i, m in ids.items()})


def divergence_index(elog: EventLog, model: Model, *, snapshots_root: Path, evidence: str | Path) -> dict[str, Any]:
    """The first divergence that reconcile names from a Tracker directory (processed log and/or
    checkpoints); raises :class:`BadInput` when there is no evidence or no divergence."""
    from .reconcile import load_processed, load_tracker, reconcile

    d = Path(evidence)
    if not d.is_dir():
        raise BadInput(f"--to divergence:{evidence}: no such directory")
    processed_path, checkpoints_path = d / "processed.jsonl", d / "checkpoints.jsonl"
    has_cps = checkpoints_path.exists() or Path(str(checkpoints_path) + ".partial").exists()
    if not processed_path.exists() and not has_cps:
        raise BadInput(f"--to divergence:{evidence}: no Tracker evidence there "
                       "(processed.jsonl or checkpoints.jsonl)")
    report = reconcile(
        elog, model, snapshots_root=snapshots_root, state={},
        processed=load_processed(str(processed_path)) if processed_path.exists() else None,
        tracker=load_tracker(str(checkpoints_path)) if has_cps else None,
    )
    fd = report.first_divergence
    if fd is None or fd.get("message_id") is None:
        n = report.to_json()["log"]["events"]
        what = "matches the log" if fd is None else f"goes past the log's end (entry {fd['index']})"
        raise BadInput(f"--to divergence:{evidence}: the worker's handling {what} ({n} entries): "
                       "no divergence to rewind to")
    return fd


# --- guard and cursor --------------------------------------------------------------------------------


def subscription_consumers(admin_url: str, topic: str, subscription: str) -> list[dict[str, Any]] | None:
    """The consumers connected to ``subscription`` per the broker's admin API (topic stats), or
    ``None`` if the API cannot say. Raises :class:`BadInput` if the topic has no such subscription."""
    kind, _, path = topic.partition("://")
    url = f"{admin_url.rstrip('/')}/admin/v2/{kind}/{urllib.parse.quote(path)}/stats"
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            stats = json.load(resp)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        log.warning("admin API at %s cannot tell the subscription's consumers: %s", admin_url, exc)
        return None
    subs = stats.get("subscriptions") or {}
    if subscription not in subs:
        have = ", ".join(sorted(subs)) or "none"
        raise BadInput(f"{topic} has no subscription {subscription!r} (it has: {have}): "
                       "a rewind moves the cursor of an existing subscription")
    return [{k: c.get(k) for k in ("consumerName", "address", "connectedSince")}
            for c in subs[subscription].get("consumers") or []]


_RECEIVE_MS = 10_000
"""How long the rewind's consumers wait for the subscription's next message."""


def _exclusive(client: Any, topic: str, subscription: str, name: str) -> Any:
    """An exclusive consumer with batch-index acknowledgement on ``subscription``; raises
    :class:`SubscriptionInUse` where the broker refuses it because another consumer is connected."""
    import pulsar

    try:
        return client.subscribe(
            topic, subscription, consumer_type=pulsar.ConsumerType.Exclusive, consumer_name=name,
            receiver_queue_size=1, initial_position=pulsar.InitialPosition.Earliest,
            batch_index_ack_enabled=True)
    except (pulsar.ConsumerBusy, pulsar.ConsumerAssignError) as exc:
        raise SubscriptionInUse(topic, subscription) from exc
    except pulsar.PulsarException as exc:
        raise BrokerUnavailable(f"cannot subscribe to {subscription!r} of {topic}: {exc}") from exc


def _close(consumer: Any) -> None:
    """Close a consumer (which flushes its acknowledgements); a failure is only logged."""
    import pulsar

    try:
        consumer.close()
    except pulsar.PulsarException as exc:
        log.warning("closing the rewind's consumer: %s", exc)


def _receive(consumer: Any, topic: str, subscription: str) -> tuple[Any, MessageId]:
    """The next message of the subscription and its id; :class:`BrokerUnavailable` if none comes."""
    import pulsar

    try:
        msg = consumer.receive(timeout_millis=_RECEIVE_MS)
    except pulsar.PulsarException as exc:  # Timeout included: a rewind target is a message the log holds
        raise BrokerUnavailable(f"subscription {subscription!r} of {topic} delivered no message within "
                                f"{_RECEIVE_MS / 1000:.0f} s after its cursor moved: {exc}") from exc
    n = msg.message_id()
    return msg, MessageId(n.ledger_id(), n.entry_id(), n.partition(), n.batch_index())


def _seek(consumer: Any, topic: str, subscription: str, mid: MessageId) -> float:
    """Move ``consumer``'s subscription cursor so that ledger entry ``mid`` is delivered next (the
    client sends the broker no batch index); returns the seconds it took."""
    import pulsar

    t = time.monotonic()
    try:
        consumer.seek(pulsar.MessageId(mid.partition, mid.ledger, mid.entry, mid.batch))
    except pulsar.PulsarException as exc:
        raise BrokerUnavailable(f"cannot move the cursor of {subscription!r} on {topic} to {mid}: {exc}") from exc
    return time.monotonic() - t


class _Guard:
    """An exclusive consumer on the subscription, held while the rewind folds the state (see the
    module docstring); it moves the cursor to a ledger entry with :meth:`seek`."""

    def __init__(self, client: Any, topic: str, subscription: str) -> None:
        import pulsar

        self.topic, self.subscription = topic, subscription
        self.consumer: Any = _exclusive(client, topic, subscription, _GUARD_NAME)
        # does this broker enforce exclusivity? A second exclusive consumer must be refused.
        self.enforced = True
        try:
            probe = client.subscribe(topic, subscription, consumer_type=pulsar.ConsumerType.Exclusive,
                                     consumer_name=_GUARD_NAME + "-probe", receiver_queue_size=1)
        except pulsar.PulsarException:
            pass
        else:
            self.enforced = False
            probe.close()

    def seek(self, mid: MessageId) -> float:
        """Move the cursor so that ledger entry ``mid`` is delivered next; returns the seconds it took."""
        return _seek(self.consumer, self.topic, self.subscription, mid)

    def close(self) -> None:
        """Release the subscription (idempotent)."""
        c, self.consumer = self.consumer, None
        if c is not None:
            _close(c)


@dataclass
class _Placement:
    """Where the cursor stands after :func:`_place`: ``position`` and ``next_id`` as measured."""

    position: int
    next_id: MessageId
    acknowledged: int
    seek_seconds: float
    notes: list[str] = field(default_factory=list)


def _ack_before(client: Any, topic: str, subscription: str, target: Target) -> int:
    """Acknowledge the messages of ``target``'s batch before it one by one (batch-index
    acknowledgement), the cursor standing at the batch's entry; returns how many."""
    c = _exclusive(client, topic, subscription, _GUARD_NAME + "-ack")
    try:
        for k in range(target.in_batch):
            msg, got = _receive(c, topic, subscription)
            want = target.ids[target.batch_start + k]
            if got.position != want.position:
                raise BadInput(f"subscription {subscription!r} of {topic} delivered {got} where entry "
                               f"{target.batch_start + k} ({want}) was due: did a consumer connect during the "
                               "rewind? Stop it and rewind again")
            c.acknowledge(msg)
    finally:
        _close(c)
    return target.in_batch


def _next_id(client: Any, topic: str, subscription: str) -> MessageId:
    """The subscription's next message as a consumer subscribing now receives it (not acknowledged)."""
    c = _exclusive(client, topic, subscription, _GUARD_NAME + "-check")
    try:
        return _receive(c, topic, subscription)[1]
    finally:
        _close(c)


def _place(guard: _Guard, client: Any, topic: str, subscription: str, target: Target) -> _Placement:
    """Move the cursor so that entry ``target.requested`` comes next, where the broker allows, else
    to the first message of its batch (steps 4 and 5 and "Batches" in the module docstring)."""
    seconds = guard.seek(target.entry)
    guard.close()
    acked = _ack_before(client, topic, subscription, target) if target.in_batch else 0
    nxt = _next_id(client, topic, subscription)
    if nxt.position == target.message_id.position:
        return _Placement(target.requested, nxt, acked, seconds)
    first = target.ids[target.batch_start]
    wrong = BadInput(f"after moving the cursor of subscription {subscription!r} of {topic} to entry "
                     f"{target.requested} ({target.message_id}), its next message is {nxt}: did a consumer "
                     "connect during the rewind? Stop it and rewind again")
    if not acked:
        raise wrong
    where = f"entry {target.requested} is message {target.in_batch} of the batch stored as {target.entry.ledger}:" \
            f"{target.entry.entry}"
    if nxt.position == first.position:
        note = (f"{where}; the broker ignored the acknowledgements of the {acked} message(s) before it (Apache "
                "Pulsar keeps them only with acknowledgmentAtBatchIndexLevelEnabled=true in broker.conf), so "
                f"the rewind goes to the batch's first message, entry {target.batch_start}")
    elif (nxt.ledger, nxt.entry) > (first.ledger, first.entry):
        note = (f"{where}; this broker acknowledged the whole batch on a batch-index acknowledgement "
                f"(pulsar-lite 0.2.0 does), so the rewind goes to the batch's first message, entry "
                f"{target.batch_start}")
        c = _exclusive(client, topic, subscription, _GUARD_NAME)
        try:
            seconds += _seek(c, topic, subscription, target.entry)
        finally:
            _close(c)
        nxt = _next_id(client, topic, subscription)
        if nxt.position != first.position:
            raise wrong
    else:
        raise wrong
    return _Placement(target.batch_start, nxt, 0, seconds, [note])


# --- the command -------------------------------------------------------------------------------------


@dataclass
class RewindReport:
    """What :func:`rewind` did; ``to_json()`` has docs/cli.md's ``position``, ``message_id``, ``streams``
    (``position`` and ``message_id`` as the check after moving the cursor measured them)."""

    topic: str
    subscription: str
    target: Target
    placement: _Placement
    streams: int
    state_out: str
    from_snapshot: int | None
    replayed: int
    consumer_check: dict[str, Any]
    divergence: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        t, pl = self.target, self.placement
        return {
            "position": pl.position,
            "message_id": str(pl.next_id),
            "streams": self.streams,
            "requested": t.requested,
            "batch": {"entry": f"{t.entry.ledger}:{t.entry.entry}", "index": t.in_batch,
                      "acknowledged": pl.acknowledged} if t.in_batch else None,
            "topic": self.topic,
            "subscription": self.subscription,
            "state_out": self.state_out,
            "replayed": {"from_snapshot": self.from_snapshot, "events": self.replayed},
            "consumer_check": self.consumer_check,
            "divergence": self.divergence,
            "seek_seconds": round(pl.seek_seconds, 4),
            "notes": self.notes,
            "seconds": round(self.seconds, 3),
        }


def parse_to(text: str) -> int | str:
    """``--to``: an entry index, or ``divergence:EVIDENCE_DIR`` (returned as the directory)."""
    if text.startswith(DIVERGENCE_PREFIX):
        d = text[len(DIVERGENCE_PREFIX):]
        if not d:
            raise BadInput("--to divergence:EVIDENCE_DIR needs the Tracker directory")
        return d
    try:
        return int(text)
    except ValueError:
        raise BadInput(f"--to {text!r}: an entry index or divergence:EVIDENCE_DIR") from None


def _consumer_check(client: Any, topic: str, subscription: str, admin_url: str | None) -> tuple[_Guard, dict[str, Any]]:
    consumers = subscription_consumers(admin_url, topic, subscription) if admin_url else None
    if consumers:
        raise SubscriptionInUse(topic, subscription, consumers)
    try:
        guard = _Guard(client, topic, subscription)
    except SubscriptionInUse:
        again = subscription_consumers(admin_url, topic, subscription) if admin_url else None
        raise SubscriptionInUse(topic, subscription, again) from None
    check: dict[str, Any] = {"exclusive_subscription": guard.enforced, "admin_api": consumers is not None}
    if guard.enforced:
        check["result"] = "no consumer connected (the broker granted an exclusive consumer, held during the rewind)"
    elif consumers is not None:
        check["result"] = "no consumer connected (admin API)"
    else:
        check["result"] = ("unknown: this broker does not enforce exclusive subscriptions and no admin API "
                           "was given (pulsar-lite): make sure the worker is stopped")
    return guard, check


def rewind(
    elog: EventLog,
    model: Model,
    *,
    subscription: str,
    to: int | str,
    state_out: str | Path,
    snapshots_root: Path,
    admin_url: str | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> RewindReport:
    """Rewind ``subscription`` of ``elog`` to entry ``to`` (an index, or a Tracker directory whose
    first divergence is used) and write the state as of the entry before it to ``state_out``.

    The state file is written before the cursor moves: if moving it fails, the file is there and a
    rerun does the same again. Where the cursor can only go to the first message of the entry's
    batch (module docstring, "Batches"), the file is then rewritten (atomically) for that position.
    """
    t0 = time.monotonic()
    out = Path(state_out)
    if not out.parent.is_dir():
        raise BadInput(f"--state-out {state_out}: no such directory {out.parent}")
    client = getattr(elog, "client", None)
    if client is None:
        raise BadInput("rewind moves a Pulsar subscription: it needs a log on a broker")
    divergence = None
    if isinstance(to, str):
        divergence = divergence_index(elog, model, snapshots_root=snapshots_root, evidence=to)
        to = int(divergence["index"])
    target = locate(elog, to, snapshots_root=snapshots_root)
    guard, check = _consumer_check(client, elog.topic, subscription, admin_url)
    try:
        states, from_snapshot, replayed, notes = _state_before(elog, model, target, target.requested,
                                                               snapshots_root, on_progress)
        atomic_write(out, _export(states))
        placed = _place(guard, client, elog.topic, subscription, target)
    finally:
        guard.close()
    if placed.position != target.requested:
        states, from_snapshot, replayed, notes = _state_before(elog, model, target, placed.position,
                                                               snapshots_root, on_progress)
        atomic_write(out, _export(states))
    notes = placed.notes + notes
    if not check["exclusive_subscription"]:
        notes.append(check["result"])
    report = RewindReport(elog.topic, subscription, target, placed, len(states), str(out), from_snapshot,
                          replayed, check, divergence, notes)
    report.seconds = time.monotonic() - t0
    return report


def _export(states: dict[str, Any]) -> bytes:
    return (json.dumps(states, indent=1, sort_keys=True) + "\n").encode()


def _state_before(elog: EventLog, model: Model, target: Target, index: int, snapshots_root: Path,
                  on_progress: Callable[[int], None] | None) -> tuple[dict[str, Any], int | None, int, list[str]]:
    """The rendered states as of entry ``index - 1`` (rebuild ``until`` that entry), the snapshot
    it started from, how many entries it folded, and the rebuild's notes."""
    before = target.before(index)
    if before is None:
        return {}, None, 0, []
    rb = rebuild(elog, model, snapshots_root=snapshots_root, until=before, write_snapshots=False,
                 on_progress=on_progress)
    covered = sum(s.entries for s in rb.scans)
    if covered != index:
        raise BadInput(f"folding to {before} covered {covered} entries, not {index}: the log "
                       "changed while rewinding, or differs from its recorded checkpoints (run chainfold verify)")
    return rb.folder.rendered(), rb.from_snapshot, sum(s.read for s in rb.scans), list(rb.notes)

"""``rewind``: put a stopped worker back at an entry: a state export and its subscription's cursor.

docs/cli.md, "chainfold rewind". For entry ``INDEX`` of a (non-partitioned) topic:

1. **where**: the message ids of entry ``INDEX`` and of the entry before the rewind position, found
   from the log's recorded checkpoints (each names its segment's first message id, so at most one
   segment plus one batch is read) or, without a record, by reading from the start;
2. **guard**: an *exclusive* consumer on the subscription. A broker that enforces exclusive
   subscriptions (Apache Pulsar) refuses it while any consumer (the worker) is connected:
   :class:`~chainfold.errors.SubscriptionInUse`; held to the end, it also keeps a worker from
   connecting during the rewind. With an admin URL the broker's topic stats also name the connected
   consumers and say whether the subscription exists. pulsar-lite enforces neither exclusive
   subscriptions nor has an admin API: the report says the check could not be made;
3. **state**: :func:`~chainfold.ops.rebuild.rebuild` with ``until`` the entry before the position,
   from the newest valid snapshot that lies before it; checked to have covered exactly that many
   entries; written crash-safe;
4. **cursor**: the guard consumer seeks to the entry at the position (pulsar-client ``seek`` with a
   message id: works alike on Apache Pulsar and pulsar-lite, within milliseconds); the next message
   the subscription delivers is that entry.

**Batches.** Pulsar stores a producer's batch as one ledger entry, and a subscription (without
batch-index acknowledgement, which is off by default and which chainfold's worker does not use)
delivers and acknowledges a batch whole: its cursor cannot stand between two messages of a batch.
When entry ``INDEX`` is message ``b > 0`` of a batch, the rewind goes to the batch's first message,
``INDEX - b``, and the state is taken as of the entry before that; the report gives both
``requested`` and ``position``. The worker then handles ``b`` entries again that it had handled
before the requested one, from a state that does not contain them: nothing is applied twice.

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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import BadInput, BrokerUnavailable, CheckpointCorrupt, SubscriptionInUse
from ..hashing.scan import PartitionRecord
from ..log import EventLog, MessageId, partition_index
from ..replay.fold import Model
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
    """Where a rewind goes: ``position`` (the batch start of ``requested``), its message id, and the
    message id of the entry before it (``None`` at the start of the log)."""

    requested: int
    position: int
    message_id: MessageId
    before: MessageId | None


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
    position = index - max(at.batch, 0)
    ids = _ids(elog, p, max(position - 1, 0), position, record)
    first = ids.get(position)
    if first is None or (first.ledger, first.entry) != (at.ledger, at.entry) or first.batch > 0:
        raise BadInput(f"entry {index} ({at}) is message {at.batch} of a batch, but entry {position} is {first}: "
                       "the log's batches are not where their message ids say")
    return Target(index, position, MessageId(first.ledger, first.entry, partition_index(p), first.batch),
                  ids.get(position - 1) if position > 0 else None)


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


class _Guard:
    """An exclusive consumer on the subscription, held while the rewind runs (see module docstring)."""

    def __init__(self, client: Any, topic: str, subscription: str) -> None:
        import pulsar

        self._pulsar = pulsar
        self.topic, self.subscription = topic, subscription
        try:
            self.consumer = client.subscribe(
                topic, subscription, consumer_type=pulsar.ConsumerType.Exclusive, consumer_name=_GUARD_NAME,
                receiver_queue_size=1, initial_position=pulsar.InitialPosition.Earliest)
        except (pulsar.ConsumerBusy, pulsar.ConsumerAssignError) as exc:
            raise SubscriptionInUse(topic, subscription) from exc
        except pulsar.PulsarException as exc:
            raise BrokerUnavailable(f"cannot subscribe to {subscription!r} of {topic}: {exc}") from exc
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
        """Move the cursor so that entry ``mid`` is delivered next; returns the seconds it took."""
        t = time.monotonic()
        try:
            self.consumer.seek(self._pulsar.MessageId(mid.partition, mid.ledger, mid.entry, mid.batch))
        except self._pulsar.PulsarException as exc:
            raise BrokerUnavailable(f"cannot move the cursor of {self.subscription!r} on {self.topic} "
                                    f"to {mid}: {exc}") from exc
        return time.monotonic() - t

    def close(self) -> None:
        try:
            self.consumer.close()
        except self._pulsar.PulsarException as exc:
            log.warning("closing the rewind's consumer: %s", exc)


# --- the command -------------------------------------------------------------------------------------


@dataclass
class RewindReport:
    """What :func:`rewind` did; ``to_json()`` has docs/cli.md's ``position``, ``message_id``, ``streams``."""

    topic: str
    subscription: str
    target: Target
    streams: int
    state_out: str
    from_snapshot: int | None
    replayed: int
    consumer_check: dict[str, Any]
    seek_seconds: float
    divergence: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        t = self.target
        return {
            "position": t.position,
            "message_id": str(t.message_id),
            "streams": self.streams,
            "requested": t.requested,
            "topic": self.topic,
            "subscription": self.subscription,
            "state_out": self.state_out,
            "replayed": {"from_snapshot": self.from_snapshot, "events": self.replayed},
            "consumer_check": self.consumer_check,
            "divergence": self.divergence,
            "seek_seconds": round(self.seek_seconds, 4),
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

    The state file is written before the cursor moves: if the seek fails (BrokerUnavailable), the
    file is there and a rerun does the same again.
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
    notes: list[str] = []
    if target.position != target.requested:
        notes.append(f"entry {target.requested} is message {target.requested - target.position} of the batch "
                     f"stored as {target.message_id.ledger}:{target.message_id.entry}; a subscription "
                     f"receives batches whole, so the rewind goes to the batch's first message, "
                     f"entry {target.position}")
    guard, check = _consumer_check(client, elog.topic, subscription, admin_url)
    try:
        states, from_snapshot, replayed = _state_before(elog, model, target, snapshots_root, notes, on_progress)
        atomic_write(out, (json.dumps(states, indent=1, sort_keys=True) + "\n").encode())
        seek_seconds = guard.seek(target.message_id)
    finally:
        guard.close()
    if not check["exclusive_subscription"]:
        notes.append(check["result"])
    report = RewindReport(elog.topic, subscription, target, len(states), str(out), from_snapshot, replayed,
                          check, seek_seconds, divergence, notes)
    report.seconds = time.monotonic() - t0
    return report


def _state_before(elog: EventLog, model: Model, target: Target, snapshots_root: Path, notes: list[str],
                  on_progress: Callable[[int], None] | None) -> tuple[dict[str, Any], int | None, int]:
    """The rendered states as of entry ``target.position - 1``: rebuild ``until`` that entry.

    Snapshots covering more than ``position - 1`` entries are not used: a snapshot ending exactly at
    ``before`` would make the reader start after ``until`` and fold one entry too many.
    """
    if target.before is None:
        return {}, None, 0
    rb = rebuild(elog, model, snapshots_root=snapshots_root, until=target.before,
                 max_snapshot_entries=target.position - 1, write_snapshots=False, on_progress=on_progress)
    covered = sum(s.entries for s in rb.scans)
    if covered != target.position:
        raise BadInput(f"folding to {target.before} covered {covered} entries, not {target.position}: the log "
                       "changed while rewinding, or differs from its recorded checkpoints (run chainfold verify)")
    notes.extend(rb.notes)
    return rb.folder.rendered(), rb.from_snapshot, sum(s.read for s in rb.scans)

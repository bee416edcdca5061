"""Inclusion and consistency proofs over a log, as JSON any RFC 9162 verifier can check.

The tree is the RFC 9162 tree over one partition's entries (leaf = SHA-256(0x00 || payload)); the
proof documents carry hex hashes and the entry's payload (base64) so a verifier can recompute the
leaf hash itself.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

from .. import merkle
from ..envelope import decode
from ..errors import BadInput, MalformedEnvelope
from ..hashing.stage import leaf_hashes
from ..log import EventLog
from ..log.source import Source, Span

__all__ = ["inclusion", "consistency", "check"]

ALGORITHM = "RFC9162_SHA256"


def _leaves(elog: EventLog, partition: str, on_progress: Callable[[int], None] | None,
            want: Callable[[int, Any], bool] | None = None, size: int | None = None
            ) -> tuple[list[bytes], dict[str, Any]]:
    """Leaf hashes of the partition's first ``size`` entries (all when None; source stage,
    :func:`leaf_hashes`), and the first entry ``want(index, entry)`` accepts."""
    leaves: list[bytes] = []
    found: dict[str, Any] = {}
    for batch in Source(elog, Span(partition, limit=size)):
        start = len(leaves)
        leaves.extend(leaf_hashes(batch))
        if want is not None and not found:
            found = next(({"index": start + k, "entry": e} for k, e in enumerate(batch) if want(start + k, e)), {})
        if on_progress is not None:
            on_progress(len(leaves))
    return leaves, found


def _find_partition(elog: EventLog, partition: int | None) -> str:
    parts = elog.partitions()
    if partition is None:
        if len(parts) > 1:
            raise BadInput(f"{elog.topic} is partitioned: give --partition")
        return parts[0]
    if not 0 <= partition < len(parts) or len(parts) == 1:
        raise BadInput(f"{elog.topic} has no partition {partition}")
    return parts[partition]


def inclusion(elog: EventLog, event_id: str | None = None, *, index: int | None = None,
              size: int | None = None, partition: int | None = None,
              on_progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Proof that an entry is in the log: the first entry holding ``event_id``, or the entry at
    ``index`` (0-based); in the tree of the log's first ``size`` entries (default: its current size).

    Raises :class:`BadInput` when the event is not in the log (within ``size``), or ``index`` or
    ``size`` is out of range.
    """
    if (event_id is None) == (index is None):
        raise BadInput("give an event id or an index (not both)")
    if index is not None and index < 0:
        raise BadInput(f"--index {index}: must be >= 0")
    if size is not None and size < 1:
        raise BadInput(f"--to {size}: must be >= 1")
    if index is not None or partition is not None or len(elog.partitions()) == 1:
        parts = [_find_partition(elog, partition)]
    else:
        parts = elog.partitions()
        if size is not None:
            raise BadInput(f"{elog.topic} is partitioned: a size (--to) needs --partition")
    for part in parts:
        if index is not None:
            def want(i: int, _e: Any) -> bool:
                return i == index
        else:
            def want(_i: int, e: Any) -> bool:
                try:
                    return decode(e.payload).id == event_id
                except MalformedEnvelope:
                    return False

        leaves, found = _leaves(elog, part, on_progress, want, size)
        if size is not None and len(leaves) < size:
            raise BadInput(f"--to {size}: {part} has {len(leaves)} entries")
        if not found:
            continue
        i, entry = found["index"], found["entry"]
        try:
            eid = decode(entry.payload).id
        except MalformedEnvelope:
            eid = None
        return {
            "type": "inclusion",
            "algorithm": ALGORITHM,
            "topic": elog.topic,
            "partition": part,
            "event_id": eid,
            "message_id": str(entry.message_id),
            "index": i,
            "size": len(leaves),
            "payload_base64": base64.b64encode(entry.payload).decode(),
            "leaf_hash": leaves[i].hex(),
            "root": merkle.root(leaves).hex(),
            "proof": [h.hex() for h in merkle.inclusion_proof(leaves, i)],
        }
    within = f" within its first {size} entries" if size is not None else ""
    if index is not None:
        raise BadInput(f"--index {index}: {elog.topic} has no entry {index}{within}")
    raise BadInput(f"event {event_id!r} is not in {elog.topic}{within}")


def consistency(elog: EventLog, old_size: int, new_size: int | None = None, *, partition: int | None = None,
                on_progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Proof that the log at ``old_size`` entries is a prefix of the log at ``new_size`` entries
    (default: its current size): both past sizes of the same log, as an auditor holding two of its
    roots asks."""
    part = _find_partition(elog, partition)
    if new_size is not None and old_size > new_size:
        raise BadInput(f"--from {old_size} is past --to {new_size}")
    leaves, _ = _leaves(elog, part, on_progress, size=new_size)
    if new_size is not None and len(leaves) < new_size:
        raise BadInput(f"--to {new_size}: the log has {len(leaves)} entries")
    if not 0 < old_size <= len(leaves):
        raise BadInput(f"--from {old_size}: the log has {len(leaves)} entries (need 0 < OLD <= {len(leaves)})")
    return {
        "type": "consistency",
        "algorithm": ALGORITHM,
        "topic": elog.topic,
        "partition": part,
        "old_size": old_size,
        "size": len(leaves),
        "old_root": merkle.root(leaves[:old_size]).hex(),
        "root": merkle.root(leaves).hex(),
        "proof": [h.hex() for h in merkle.consistency_proof(leaves, old_size)],
    }


def _hex(doc: dict[str, Any], key: str) -> bytes:
    v = doc.get(key)
    if not isinstance(v, str):
        raise BadInput(f"not a proof document: {key!r} must be a hex string")
    try:
        return bytes.fromhex(v)
    except ValueError:
        raise BadInput(f"not a proof document: {key!r} is not hex") from None


def _int(doc: dict[str, Any], key: str) -> int:
    v = doc.get(key)
    if type(v) is not int:
        raise BadInput(f"not a proof document: {key!r} must be an integer")
    return v


def check(doc: Any) -> tuple[bool, str]:
    """Check a proof document (as :func:`inclusion` or :func:`consistency` write them) offline.

    Returns ``(valid, what was checked or why it does not hold)``. A document that is not a proof
    document at all (not an object, unknown type, missing keys, hashes that are not hex) raises
    :class:`BadInput`: that is bad input, not an invalid proof.
    """
    if not isinstance(doc, dict):
        raise BadInput("not a proof document: expected a JSON object")
    kind = doc.get("type")
    if kind not in ("inclusion", "consistency"):
        raise BadInput(f"not a proof document: 'type' is {kind!r}, expected 'inclusion' or 'consistency'")
    if not isinstance(doc.get("proof"), list) or not all(isinstance(h, str) for h in doc["proof"]):
        raise BadInput("not a proof document: 'proof' must be a list of hex strings")
    try:
        proof = [bytes.fromhex(h) for h in doc["proof"]]
    except ValueError:
        raise BadInput("not a proof document: 'proof' holds a string that is not hex") from None
    root = _hex(doc, "root")
    size = _int(doc, "size")
    if kind == "inclusion":
        leaf = _hex(doc, "leaf_hash")
        index = _int(doc, "index")
        if "payload_base64" in doc:
            try:
                payload = base64.b64decode(doc["payload_base64"], validate=True)
            except (ValueError, TypeError):
                raise BadInput("not a proof document: 'payload_base64' is not base64") from None
            if merkle.leaf_hash(payload) != leaf:
                return False, "leaf_hash is not the hash of the payload"
        ok = merkle.verify_inclusion(leaf, index, size, proof, root)
        return ok, f"entry {index} in a log of {size} with root {doc['root']}"
    old_size = _int(doc, "old_size")
    ok = merkle.verify_consistency(old_size, size, _hex(doc, "old_root"), root, proof)
    return ok, f"log of {old_size} is a prefix of the log of {size} with root {doc['root']}"

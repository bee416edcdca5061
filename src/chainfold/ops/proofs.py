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
            want: Callable[[int, Any], bool] | None = None) -> tuple[list[bytes], dict[str, Any]]:
    """Every leaf hash of the partition (source stage, :func:`leaf_hashes`), and the first entry
    ``want(index, entry)`` accepts."""
    leaves: list[bytes] = []
    found: dict[str, Any] = {}
    for batch in Source(elog, Span(partition)):
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


def inclusion(elog: EventLog, event_id: str, *, partition: int | None = None,
              on_progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Proof that the first entry holding ``event_id`` is in the log at its current size."""
    parts = [_find_partition(elog, partition)] if partition is not None or len(elog.partitions()) == 1 \
        else elog.partitions()
    for part in parts:
        def want(_i: int, e: Any) -> bool:
            try:
                return decode(e.payload).id == event_id
            except MalformedEnvelope:
                return False

        leaves, found = _leaves(elog, part, on_progress, want)
        if not found:
            continue
        index, entry = found["index"], found["entry"]
        return {
            "type": "inclusion",
            "algorithm": ALGORITHM,
            "topic": elog.topic,
            "partition": part,
            "event_id": event_id,
            "message_id": str(entry.message_id),
            "index": index,
            "size": len(leaves),
            "payload_base64": base64.b64encode(entry.payload).decode(),
            "leaf_hash": leaves[index].hex(),
            "root": merkle.root(leaves).hex(),
            "proof": [h.hex() for h in merkle.inclusion_proof(leaves, index)],
        }
    raise BadInput(f"event {event_id!r} is not in {elog.topic}")


def consistency(elog: EventLog, old_size: int, *, partition: int | None = None,
                on_progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Proof that the log at ``old_size`` entries is a prefix of the log today."""
    part = _find_partition(elog, partition)
    leaves, _ = _leaves(elog, part, on_progress)
    if not 0 < old_size <= len(leaves):
        raise BadInput(f"--consistency {old_size}: the log has {len(leaves)} entries (need 0 < OLD_SIZE <= size)")
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


def _hex(v: Any) -> bytes:
    if not isinstance(v, str):
        raise ValueError("hash is not a hex string")
    return bytes.fromhex(v)


def check(doc: Any) -> tuple[bool, str]:
    """Check a proof document offline; ``(valid, what was checked or why not)``."""
    try:
        if not isinstance(doc, dict):
            return False, "not a proof document (expected a JSON object)"
        proof = [_hex(h) for h in doc["proof"]]
        root = _hex(doc["root"])
        if doc.get("type") == "inclusion":
            leaf = _hex(doc["leaf_hash"])
            if "payload_base64" in doc:
                payload = base64.b64decode(doc["payload_base64"], validate=True)
                if merkle.leaf_hash(payload) != leaf:
                    return False, "leaf_hash is not the hash of the payload"
            ok = merkle.verify_inclusion(leaf, doc["index"], doc["size"], proof, root)
            return ok, f"entry {doc['index']} in a log of {doc['size']} with root {doc['root']}"
        if doc.get("type") == "consistency":
            ok = merkle.verify_consistency(doc["old_size"], doc["size"], _hex(doc["old_root"]), root, proof)
            return ok, f"log of {doc['old_size']} is a prefix of the log of {doc['size']}"
        return False, f"unknown proof type {doc.get('type')!r}"
    except (KeyError, ValueError, TypeError) as exc:
        return False, f"malformed proof document: {exc}"

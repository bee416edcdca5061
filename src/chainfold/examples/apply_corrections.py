"""A downstream consumer that applies chainfold's corrections idempotently (docs/corrections.md).

Downstream of a worker sits a copy of its figures (a reporting table, a ledger): ``{stream: state}``.
When chainfold repairs the worker, ``reconcile --repair OUT --publish-corrections TOPIC2`` sends one
correction per divergent stream. This consumer brings its figures in line, each correction once:

1. a correction whose ``idempotency_key`` it applied before is skipped (a redelivery, a re-sent
   message: the key is the same for the same correction);
2. if the figure still is the state the correction corrects (``actual``), it becomes ``expected``;
3. if the figure moved on since (later events were applied to it correctly) and only numbers differ
   (``delta`` holds numbers only: expected - actual, field by field), the numeric error is added;
4. otherwise (``delta`` holds a non-numeric change, ``[expected, actual]``, and the figure moved on)
   it is a **conflict**: left as it is and reported, for a person to decide.

The figures and the keys applied are saved together in one file, atomically, before the messages
are acknowledged: a crash in between re-delivers them, and step 1 skips them.

Run: ``python -m chainfold.examples.apply_corrections --figures FILE (--topic TOPIC2 | --file JSONL)``.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["CorrectionApplier", "add_delta", "numeric", "main"]


def numeric(delta: Any) -> bool:
    """Is ``delta`` purely numeric: a number, or a dict of numeric deltas (no ``[expected, actual]``
    pair of a non-numeric change anywhere)?"""
    if isinstance(delta, dict):
        return all(numeric(d) for d in delta.values())
    return isinstance(delta, (int, float)) and not isinstance(delta, bool)


def add_delta(value: Any, delta: Any) -> Any:
    """``value`` + ``delta`` where ``delta`` is :func:`numeric`: a number or a dict of numeric deltas
    (missing numbers are 0)."""
    if isinstance(delta, dict):
        out = dict(value) if isinstance(value, dict) else {}
        for k, d in delta.items():
            out[k] = add_delta(out.get(k), d)
        return out
    return (value or 0) + delta


class CorrectionApplier:
    """Figures ``{stream: state}`` and the idempotency keys applied to them."""

    def __init__(self, figures: dict[str, Any] | None = None, applied: Iterable[str] = ()) -> None:
        self.figures: dict[str, Any] = dict(figures or {})
        self.applied: set[str] = set(applied)
        self.conflicts: list[dict[str, Any]] = []

    def apply(self, correction: Mapping[str, Any]) -> str:
        """Apply one correction; returns ``"duplicate"``, ``"set"``, ``"delta"`` or ``"conflict"``."""
        key = correction["idempotency_key"]
        if key in self.applied:
            return "duplicate"
        stream, current = correction["stream"], self.figures.get(correction["stream"])
        if current == correction["actual"]:
            outcome = "set"
            if correction["expected"] is None:
                self.figures.pop(stream, None)
            else:
                self.figures[stream] = correction["expected"]
        elif correction["delta"] is not None and _numbers_only_differ(correction):
            outcome = "delta"
            self.figures[stream] = add_delta(current, correction["delta"])
        else:
            outcome = "conflict"
            self.conflicts.append(dict(correction))
        self.applied.add(key)
        return outcome

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "CorrectionApplier":
        p = Path(path)
        if not p.exists():
            return cls()
        doc = json.loads(p.read_text(encoding="utf-8"))
        return cls(doc["figures"], doc["applied"])

    def save(self, path: str | os.PathLike[str]) -> None:
        """Figures and applied keys together, atomically (temp file, fsync, rename)."""
        p = Path(path)
        tmp = p.with_name(p.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"figures": self.figures, "applied": sorted(self.applied)}, f, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)


def _numbers_only_differ(c: Mapping[str, Any]) -> bool:
    """Is the error purely numeric: ``delta`` numbers only, and ``expected`` == ``actual`` + ``delta``?"""
    return c["actual"] is not None and numeric(c["delta"]) and add_delta(c["actual"], c["delta"]) == c["expected"]


def _from_topic(applier: CorrectionApplier, figures: str, topic: str, service_url: str,
                subscription: str, idle_ms: int) -> int:
    import pulsar

    from chainfold.envelope import decode
    from chainfold.log.broker import pulsar_logger  # keeps pulsar-client's own logs off stdout

    client = pulsar.Client(service_url, logger=pulsar_logger())
    consumer = client.subscribe(topic, subscription, initial_position=pulsar.InitialPosition.Earliest)
    n = 0
    try:
        while True:
            try:
                msg = consumer.receive(idle_ms)
            except pulsar.Timeout:
                break
            applier.apply(decode(msg.data()).data)
            applier.save(figures)  # durable before the ack
            consumer.acknowledge(msg)
            n += 1
    finally:
        consumer.close()
        client.close()
    return n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m chainfold.examples.apply_corrections",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--figures", required=True, help="the consumer's figures + applied keys (JSON; created if missing)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--topic", help="TOPIC2: read the published corrections (a durable subscription)")
    src.add_argument("--file", help="a corrections file (JSON Lines) written by reconcile --repair")
    p.add_argument("--service-url", default=os.environ.get("CHAINFOLD_SERVICE_URL", "pulsar://127.0.0.1:6650"))
    p.add_argument("--subscription", default="apply-corrections")
    p.add_argument("--idle-ms", type=int, default=2000, help="stop after this long without a message")
    a = p.parse_args(argv)
    applier = CorrectionApplier.load(a.figures)
    before = len(applier.applied)
    if a.topic:
        received = _from_topic(applier, a.figures, a.topic, a.service_url, a.subscription, a.idle_ms)
    else:
        lines = [json.loads(x) for x in Path(a.file).read_text(encoding="utf-8").splitlines() if x.strip()]
        received = len(lines)
        for c in lines:
            applier.apply(c)
        applier.save(a.figures)
    print(json.dumps({"received": received, "applied": len(applier.applied) - before,
                      "conflicts": applier.conflicts}))
    return 0


if __name__ == "__main__":
    from chainfold.log.broker import exit_process  # pulsar-client's threads can abort a normal shutdown

    exit_process(main())

"""``chainfold demo --live``: watch catching a worker's fault as it happens, on a real broker.

1. **publish**: a publisher appends account events to a fresh topic at a steady rate, as a
   service does;
2. **the worker** (:mod:`chainfold.worker`, a real Pulsar consumer, as a subprocess) consumes them
   with one fault injected at a known event: it mis-handles a withdrawal (applies it as a deposit),
   skips an event, handles one twice, or crashes between committing and acking (then it is
   restarted and handles the redelivered messages again);
3. **watch** (``chainfold watch --evidence ... --fail-on divergence``, the real command) follows the
   topic and the worker's Tracker evidence; its progress lines and the divergence are narrated as
   they arrive, with how long after the worker handled the event watch reported it.

:func:`run_live_demo` returns a JSON document: ``demo`` (``ok``: the divergence named exactly, within
10 s; the fault, where it was injected, the latency) and ``divergence`` (watch's line).
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.markup import escape

from .errors import BadInput
from .log.broker import BrokerOptions, connect, resolve_url
from .log.pulsar import PulsarLog
from .watch.live import (Publisher, WatchProcess, WorkerRun, detection_latency, first_fault_position,
                         live_events)

__all__ = ["run_live_demo", "FAULTS", "LIVE_EVENTS"]

MODEL = "chainfold.examples.accounts"
LIVE_EVENTS = 3000
FAULTS = ("mishandle", "skip", "double", "crash")


def _fault(kind: str, events: list[Any]) -> tuple[str, str]:
    """The worker's ``--faults`` spec for ``kind`` at about 60 % of the events, and a description."""
    k = len(events) * 3 // 5
    if kind == "mishandle":
        return f"mishandle:Withdrawn:{k}:{len(events)}", f"withdrawals from message {k:,} on applied as deposits"
    if kind == "skip":
        return f"skip:{events[k].id}", f"event {events[k].id} dropped without handling"
    if kind == "double":
        return f"double:{events[k].id}", f"event {events[k].id} handled twice"
    if kind == "crash":
        return f"crash-before-ack:{k}", f"a crash after message {k:,}, committed but not acked"
    raise BadInput(f"unknown fault {kind!r} (one of {', '.join(FAULTS)})")


def run_live_demo(*, events: int = LIVE_EVENTS, streams: int = 100, rate: float = 500.0, fault: str = "mishandle",
                  seed: int = 1, workdir: str | os.PathLike[str], broker: BrokerOptions = BrokerOptions(),
                  narrate: Callable[[str], None] = lambda text: None, timeout: float = 300.0) -> dict[str, Any]:
    """Run the live story (module docstring) in ``workdir``; the result document."""
    if events < 100:
        raise BadInput("the live demo needs at least 100 events")
    wd = Path(workdir)
    wd.mkdir(parents=True, exist_ok=True)
    evidence = wd / "worker-evidence"
    if evidence.exists():
        raise BadInput(f"{wd} already holds a demo run: give a fresh --workdir")
    url = resolve_url(broker)
    client = connect(replace(broker, service_url=url))
    elog = PulsarLog(client, f"live-accounts-{uuid.uuid4().hex[:8]}")
    evs = live_events(events, streams, seed)
    spec, what = _fault(fault, evs)
    doc: dict[str, Any] = {"demo": {"ok": False, "workdir": str(wd), "seed": seed, "events": events,
                                    "rate": rate, "topic": elog.topic, "fault": spec}, "divergence": None}
    watch = WatchProcess(elog.topic, url, ["--model", MODEL, "--evidence", str(evidence), "--snapshots",
                                           str(wd / "snapshots"), "--fail-on", "divergence"],
                         log_path=wd / "watch.log", cwd=wd)
    worker = WorkerRun(topic=elog.topic, service_url=url, evidence=evidence, state=wd / "worker-state.json",
                       faults=[spec], commit_seconds=0.5, idle=4.0, log_path=wd / "worker.log")
    pub = Publisher(elog, evs[20:], rate=rate)
    try:
        elog.append(evs[:20], assign_seq=False)
        narrate(f"[bold]1. watch[/]  chainfold watch {escape(elog.topic)} --evidence {escape(str(evidence))} "
                "--fail-on divergence")
        watch.start()
        if not watch.wait_for(lambda w: w.of("progress"), 120):
            raise BadInput(f"watch did not start:\n{_tail(wd / 'watch.log')}")
        narrate(f"[bold]2. publish[/]  {events:,} account events at {rate:,.0f}/s; [bold]the worker[/] "
                f"consumes them, with a fault: {escape(what)}")
        worker.supervise(timeout=timeout)
        pub.start()
        d = _narrate_until_divergence(watch, narrate, time.monotonic() + timeout)
    finally:
        pub.stop()
        if watch.proc is not None:
            watch.stop()
        worker.join(30)
        worker.kill()
        elog.close()
        client.close()
    p = first_fault_position(evidence)
    doc["divergence"] = d
    latency = detection_latency(evidence, p, d["time"]) if d is not None and p is not None else None
    ok = d is not None and d.get("worker_position") == p and latency is not None and latency <= 10
    doc["demo"].update(ok=ok, fault_position=p, latency_s=latency)
    if d is None:
        narrate(f"[red]no divergence reported[/] (watch: {escape(_tail(wd / 'watch.log', 300))})")
        return doc
    narrate(f"[bold red]3. divergence[/]  log entry {d['index']:,} (segment {d['segment']}), event "
            f"{escape(str(d['event_id']))}, message {escape(str(d['message_id']))}: {escape(d['reason'])}")
    narrate(f"   reported {latency:.2f} s after the worker handled it; watch stopped (exit 1) with its "
            "checkpoints and a snapshot written" if latency is not None else "   (handling time unknown)")
    narrate(f"   next: chainfold reconcile {escape(elog.topic)} --model {MODEL} --state "
            f"{escape(str(wd / 'worker-state.json'))} --checkpoints {escape(str(evidence / 'checkpoints.jsonl'))}")
    return doc


def _narrate_until_divergence(watch: WatchProcess, narrate: Callable[[str], None],
                              deadline: float) -> dict[str, Any] | None:
    """Narrate watch's progress lines (about one a second) until its divergence line, its exit or
    the deadline; the divergence line."""
    shown = 0
    while time.monotonic() < deadline:
        watch.wait_for(lambda w: len(w.lines) > shown, 1.0)
        lines = watch.lines[shown:]
        shown += len(lines)
        for line in lines:
            if line.get("kind") == "divergence":
                return line
            if line.get("kind") == "progress" and line.get("worker_entries"):
                narrate(f"   watch: {line['log_entries']:>7,} log entries, worker at {line['worker_entries']:>7,} "
                        f"(lag {line['lag']:,}): in agreement")
            elif line.get("kind") == "error":
                narrate(f"   watch: [yellow]{escape(line.get('message', ''))}[/]")
        if watch.proc is not None and watch.proc.poll() is not None and shown == len(watch.lines):
            return None
    return None


def _tail(path: Path, n: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""

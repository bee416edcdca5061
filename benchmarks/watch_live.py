"""Live detection: how soon ``chainfold watch`` names a worker's fault, and how fast it follows a log.

**Detection** (default). For each fault (``skip``, ``double``, ``mishandle``, ``crash`` = crash before
ack, then double handling after the restart) and ``--repeat`` times, on a fresh topic: a publisher
appends accounts events at ``--rate``/s, the demo's real worker (``python -m chainfold.worker``,
Tracker evidence, ``--commit-seconds``) consumes them with the fault at about half of them, and
``chainfold watch --evidence ... --fail-on divergence`` (the real command, started first) follows
both. Measured per run:

* **evidence visibility**: for every handled event, from its handling (the Tracker's handling
  times) to the moment an :class:`~chainfold.watch.follow.EvidenceFollower` polling every 50 ms
  reads its leaf: the worker's share of any detection latency;
* **detection latency**: the ``time`` of watch's ``divergence`` line minus the handling time of the
  first divergent event, and whether the line named it exactly (index, event id).

**Following** (``--follow``): a publisher appends ``--events`` as fast as it can (chunks of 500),
watch follows the log alone (``--evidence`` off) and, in a second run, the log and a faithful worker;
watch's entries/s from its ``progress`` lines while the publisher runs, the publisher's rate, and
how long after the last append watch had read everything.

    python benchmarks/watch_live.py [--events 3000] [--rate 500] [--repeat 3] [--faults skip,double,mishandle,crash]
    python benchmarks/watch_live.py --follow [--events 200000]

Broker: ``$CHAINFOLD_SERVICE_URL``, else the embedded broker of ``--data-dir``. Prints a table on
stderr and one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from chainfold.log.broker import BrokerOptions, connect, resolve_url
from chainfold.log.pulsar import PulsarLog
from chainfold.watch.follow import EvidenceFollower
from chainfold.watch.live import (Publisher, WatchProcess, WorkerRun, detection_latency, first_fault_position,
                                  live_events)

MODEL = "chainfold.examples.accounts"


class Visibility(threading.Thread):
    """Polls the evidence every 50 ms; records when each position's leaf became readable."""

    def __init__(self, evidence: Path) -> None:
        super().__init__(daemon=True)
        self.follower = EvidenceFollower(evidence)
        self.seen_ms: list[int] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(0.05):
            b = self.follower.poll()
            self.seen_ms += [time.time_ns() // 1_000_000] * b.count


def _fault(kind: str, events: list[Any]) -> str:
    k = len(events) // 2
    return {"skip": f"skip:{events[k].id}", "double": f"double:{events[k].id}",
            "mishandle": f"mishandle:Withdrawn:{k}:{k + 200}", "crash": f"crash-before-ack:{k}"}[kind]


def new_topic(client: Any, name: str, events: list[Any], work: Path) -> PulsarLog:
    """A fresh topic holding the first 20 events (it exists before anyone reads it)."""
    work.mkdir()
    elog = PulsarLog(client, f"{name}-{uuid.uuid4().hex[:8]}")
    elog.append(events[:20], assign_seq=False)
    return elog


def detection_run(kind: str, a: argparse.Namespace, client: Any, url: str, work: Path) -> dict[str, Any]:
    events = live_events(a.events, 100, seed=3)
    elog = new_topic(client, f"watch-live-{kind}", events, work)
    topic = elog.topic
    evidence = work / "evidence"
    watch = WatchProcess(topic, url, ["--model", MODEL, "--evidence", str(evidence), "--snapshots",
                                      str(work / "snapshots"), "--fail-on", "divergence"],
                         log_path=work / "watch.log", cwd=work).start()
    watch.wait_for(lambda w: w.of("progress"), 60)
    worker = WorkerRun(topic=topic, service_url=url, evidence=evidence, state=work / "state.json",
                       faults=[_fault(kind, events)], commit_seconds=a.commit_seconds, idle=4.0,
                       log_path=work / "worker.log")
    vis = Visibility(evidence)
    pub = Publisher(elog, events[20:], rate=a.rate)
    vis.start()
    worker.supervise()
    pub.start()
    pub.join()
    worker.join(300)  # the worker stops once idle: every event published was handled by then
    if watch.wait_for(lambda w: w.of("divergence"), 15) is None:
        watch.stop()  # nothing to report: the fault left no trace in the handling (see "exact")
    code = watch.wait(timeout=120)
    worker.kill()
    vis.halt.set()
    vis.join()
    with open(evidence / "processed.jsonl") as f:
        handled_ms = [json.loads(line)["time"] for line in f]
    lat = [(s - h) / 1000 for s, h in zip(vis.seen_ms, handled_ms)]
    ds = watch.of("divergence")
    d = ds[0] if ds else None
    p = first_fault_position(evidence)
    elog.close()
    tracked = sum(1 for _ in open(evidence / "processed.jsonl"))
    # the fault is in the handling only if the worker handled something at or after its place (a
    # restarted worker that cannot subscribe, on a loaded broker, leaves a faithful prefix)
    happened = p is not None and tracked > p
    return {"fault": kind, "exit": code, "divergence": d, "fault_position": p, "worker_runs": worker.runs,
            "handled": tracked, "published": a.events, "fault_in_handling": happened,
            "exact": d is not None and d["worker_position"] == p and d["event_id"] == events[d["index"]].id,
            "detection_s": None if d is None or p is None else detection_latency(evidence, p, d["time"]),
            "visibility_s": {"median": round(statistics.median(lat), 3), "max": round(max(lat), 3), "n": len(lat)}}


def detection(a: argparse.Namespace, client: Any, url: str, root: Path) -> dict[str, Any]:
    runs = []
    for r in range(a.repeat):
        for kind in a.faults.split(","):
            run = detection_run(kind.strip(), a, client, url, root / f"{kind}-{r}")
            runs.append(run)
            v, det = run["visibility_s"], run["detection_s"]
            print(f"{run['fault']:<10} in handling={run['fault_in_handling']!s:<5} exact={run['exact']!s:<5} "
                  f"detected after {'-' if det is None else f'{det:.2f} s'}  (evidence visible: median "
                  f"{v['median']:.2f} s, max {v['max']:.2f} s)", file=sys.stderr)
    dets = [r["detection_s"] for r in runs if r["detection_s"] is not None]
    valid = [r for r in runs if r["fault_in_handling"]]
    return {"events": a.events, "rate": a.rate, "commit_seconds": a.commit_seconds, "runs": runs,
            "exact": sum(r["exact"] for r in valid), "of": len(valid),
            "false_reports": sum(r["divergence"] is not None for r in runs if not r["fault_in_handling"]),
            "detection_s": {"median": statistics.median(dets), "max": max(dets)} if dets else None}


def follow_run(with_worker: bool, a: argparse.Namespace, client: Any, url: str, work: Path) -> dict[str, Any]:
    events = live_events(a.events, 1000, seed=4)
    elog = new_topic(client, "watch-follow", events, work)
    topic = elog.topic
    args = ["--model", MODEL, "--snapshots", str(work / "snapshots")]
    worker = None
    if with_worker:
        args += ["--evidence", str(work / "evidence")]
        worker = WorkerRun(topic=topic, service_url=url, evidence=work / "evidence", state=work / "state.json",
                           flush_every=1000, commit_seconds=1.0, idle=6.0, log_path=work / "worker.log")
    watch = WatchProcess(topic, url, args, log_path=work / "watch.log", cwd=work).start()
    watch.wait_for(lambda w: w.of("progress"), 60)
    if worker is not None:
        worker.supervise()
    pub = Publisher(elog, events[20:], rate=1e9, chunk=500)
    t0 = time.monotonic()
    pub.start()
    pub.join()
    t_pub = time.monotonic() - t0
    done = watch.wait_for(lambda w: (w.last_progress() or {}).get("log_entries") == a.events, 1800)
    t_done = time.monotonic() - t0
    watch.stop()
    if worker is not None:
        worker.join(120)
        worker.kill()
    elog.close()
    prog = [x for x in watch.of("progress") if 20 < x["log_entries"] < a.events]
    rate = ((prog[-1]["log_entries"] - prog[0]["log_entries"]) * 1000 / (prog[-1]["time"] - prog[0]["time"])
            if len(prog) >= 2 and prog[-1]["time"] > prog[0]["time"] else None)
    return {"with_worker": with_worker, "events": a.events, "publisher_per_s": round(a.events / t_pub),
            "watch_per_s": None if rate is None else round(rate), "caught_up": bool(done),
            "after_last_append_s": round(t_done - t_pub, 2), "divergences": len(watch.of("divergence"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=None, help="default: 3000 (detection), 200000 (--follow)")
    ap.add_argument("--rate", type=float, default=500.0, help="events/s the publisher appends (detection)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--commit-seconds", type=float, default=1.0, help="the worker's time bound")
    ap.add_argument("--faults", default="skip,double,mishandle,crash")
    ap.add_argument("--follow", action="store_true", help="measure watch's entries/s following a fast publisher")
    ap.add_argument("--data-dir", default=".chainfold-bench")
    ap.add_argument("--keep", metavar="DIR", help="work in DIR/chainfold-watch-live-*, kept (logs, evidence)")
    a = ap.parse_args()
    a.events = a.events or (200_000 if a.follow else 3000)
    opts = BrokerOptions.from_env(data_dir=a.data_dir)
    url = resolve_url(opts)
    client = connect(opts)
    keep = contextlib.nullcontext(tempfile.mkdtemp(prefix="chainfold-watch-live-", dir=a.keep)) if a.keep else None
    with keep or tempfile.TemporaryDirectory(prefix="chainfold-watch-live-") as tmp:
        if a.follow:
            runs = [follow_run(w, a, client, url, Path(tmp) / f"follow-{w}") for w in (False, True)]
            for r in runs:
                print(f"{'log + worker' if r['with_worker'] else 'log only':<13} publisher {r['publisher_per_s']:>8,}/s  "
                      f"watch {r['watch_per_s'] or 0:>8,}/s  all read {r['after_last_append_s']:.1f} s after the "
                      f"last append", file=sys.stderr)
            summary: dict[str, Any] = {"follow": runs}
        else:
            summary = detection(a, client, url, Path(tmp))
    client.close()
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

"""Live detection: how soon a worker's fault is seen, with a publisher appending at a steady rate.

For each fault (``skip``, ``mishandle``, ``crash`` = crash before ack, then double handling after the
restart, and ``none``), on a fresh topic: a publisher appends accounts events at ``--rate``/s, the
demo's real worker (``python -m chainfold.worker``, Tracker evidence, ``--commit-seconds``) consumes
them, and this script measures:

* **evidence visibility**: for every handled event, the time from its handling (the Tracker's
  ``handling_times``) to the moment an :class:`~chainfold.watch.follow.EvidenceFollower` polling
  every 50 ms sees its leaf: the worker's share of any detection latency;
* **detection latency** (with ``chainfold watch`` available): the ``time`` of watch's
  ``divergence`` line minus the handling time of the first divergent event; and watch's entries/s
  from its ``progress`` lines.

    python benchmarks/watch_live.py [--events 6000] [--rate 500] [--faults skip,mishandle,crash,none]

Broker: ``$CHAINFOLD_SERVICE_URL``, else the embedded broker of ``--data-dir``. Prints a table and
one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
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
from chainfold.watch.live import Publisher, WorkerRun, detection_latency, first_fault_position, live_events

MODEL = "chainfold.examples.accounts"


def watch_available() -> bool:
    r = subprocess.run([sys.executable, "-m", "chainfold", "watch", "--help"], capture_output=True)
    return r.returncode == 0


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


class WatchProcess:
    """``chainfold watch`` as a subprocess; its JSON lines collected by a thread."""

    def __init__(self, topic: str, url: str, evidence: Path, cwd: Path) -> None:
        self.lines: list[dict[str, Any]] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "chainfold", "watch", topic, "--model", MODEL, "--evidence", str(evidence),
             "--service-url", url, "--fail-on", "divergence"],
            cwd=cwd, stdout=subprocess.PIPE, stderr=open(cwd / "watch.err", "wb"), text=True)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.lines.append(json.loads(line))
            except ValueError:
                continue

    def divergence(self) -> dict[str, Any] | None:
        return next((x for x in self.lines if x.get("kind") == "divergence"), None)

    def rate(self) -> float | None:
        prog = [x for x in self.lines if x.get("kind") == "progress"]
        if len(prog) < 2 or prog[-1]["time"] == prog[0]["time"]:
            return None
        return (prog[-1]["log_entries"] - prog[0]["log_entries"]) * 1000 / (prog[-1]["time"] - prog[0]["time"])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def one_run(kind: str, a: argparse.Namespace, client: Any, url: str, root: Path, use_watch: bool) -> dict[str, Any]:
    events = live_events(a.events, 100, seed=3)
    k = a.events // 2
    fault = {"skip": [f"skip:{events[k].id}"], "mishandle": [f"mishandle:Withdrawn:{k}:{k + 200}"],
             "crash": [f"crash-before-ack:{k}"], "none": []}[kind]
    topic = f"watch-live-{kind}-{uuid.uuid4().hex[:8]}"
    work = root / kind
    work.mkdir()
    elog = PulsarLog(client, topic)
    elog.append(events[:20], assign_seq=False)
    worker = WorkerRun(topic=topic, service_url=url, evidence=work / "evidence", state=work / "state.json",
                       faults=fault, commit_seconds=a.commit_seconds, idle=6.0, log_path=work / "worker.log")
    vis = Visibility(work / "evidence")
    watch = WatchProcess(topic, url, work / "evidence", work) if use_watch else None
    pub = Publisher(elog, events[20:], rate=a.rate)
    vis.start()
    worker.supervise()
    pub.start()
    pub.join()
    worker.join(120)
    time.sleep(0.5)
    vis.halt.set()
    vis.join()
    out: dict[str, Any] = {"fault": kind, "published": pub.published + 20, "worker_runs": worker.runs}
    handled_ms = []
    with open(work / "evidence" / "processed.jsonl") as f:
        handled_ms = [json.loads(line)["time"] for line in f]
    lat = [(s - h) / 1000 for s, h in zip(vis.seen_ms, handled_ms)]
    out["visibility_s"] = {"median": round(statistics.median(lat), 3), "max": round(max(lat), 3), "n": len(lat)}
    if watch is not None:
        deadline = time.monotonic() + 30
        while kind != "none" and watch.divergence() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        d = watch.divergence()
        p = first_fault_position(work / "evidence")
        out["detection_s"] = None if d is None or p is None else detection_latency(work / "evidence", p, d["time"])
        out["divergence"] = d
        out["watch_entries_per_s"] = watch.rate()
        watch.stop()
    elog.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=6000)
    ap.add_argument("--rate", type=float, default=500.0, help="events/s the publisher appends")
    ap.add_argument("--commit-seconds", type=float, default=1.0, help="the worker's time bound")
    ap.add_argument("--faults", default="skip,mishandle,crash,none")
    ap.add_argument("--data-dir", default=".chainfold-bench")
    a = ap.parse_args()
    opts = BrokerOptions.from_env(data_dir=a.data_dir)
    url = resolve_url(opts)
    client = connect(opts)
    use_watch = watch_available()
    if not use_watch:
        print("chainfold watch is not available yet: measuring evidence visibility only", file=sys.stderr)
    results = []
    with tempfile.TemporaryDirectory(prefix="chainfold-watch-live-") as tmp:
        for kind in a.faults.split(","):
            r = one_run(kind.strip(), a, client, url, Path(tmp), use_watch)
            results.append(r)
            v = r["visibility_s"]
            det = r.get("detection_s")
            print(f"{r['fault']:<10} {r['published']:>7,} events at {a.rate:,.0f}/s  evidence visible after "
                  f"median {v['median']:.2f} s, max {v['max']:.2f} s"
                  + ("" if "detection_s" not in r else f"  detected after {det if det is None else f'{det:.2f} s'}"))
    dets = [r["detection_s"] for r in results if r.get("detection_s") is not None]
    summary: dict[str, Any] = {"events": a.events, "rate": a.rate, "commit_seconds": a.commit_seconds,
                               "runs": results}
    if dets:
        summary["detection_s"] = {"median": statistics.median(dets), "max": max(dets)}
    client.close()
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

"""CPU per event: ``chainfold watch`` against ``chainfold rebuild`` on the same events, side by side.

One topic of ``--events`` accounts events is published once; the demo's real worker handles it once
(faithful), leaving Tracker evidence with state digests. Then, alternating, each in its own process
with fresh snapshot folders:

* ``rebuild``: ``chainfold rebuild TOPIC --model accounts --full``;
* ``watch``: ``chainfold watch TOPIC --model accounts`` (the log only), stopped with SIGTERM once a
  ``progress`` line shows every entry read;
* ``watch+evidence``: the same with ``--evidence`` (the comparison, with state digests);
* with ``--before SRC``, also ``watch+evidence (before)``: the same command run from another
  checkout's code (``PYTHONPATH=SRC/src``, e.g. a worktree of an older commit), in the same rounds:
  a before/after comparison side by side.

CPU = user + system seconds of the process (``resource.getrusage(RUSAGE_CHILDREN)`` around each
run), divided by the events; start-up (about a second of CPU: imports, connecting, planning) is
included for all. Wall time is reported too, and watch's resident memory (``VmRSS``) when it had
read a quarter, half, three quarters and all of the events, and its peak (``VmHWM``): how memory
grows with the events read. Watch's snapshot settings are rebuild's defaults (a
snapshot every 100,000 entries and at the end).

    python benchmarks/watch_cpu.py [--events 200000] [--rounds 3] [--before SRC]

Broker: ``$CHAINFOLD_SERVICE_URL``, else the embedded broker of ``--data-dir``.
"""

from __future__ import annotations

import argparse
import json
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from chainfold.log.broker import BrokerOptions, connect, resolve_url
from chainfold.log.pulsar import PulsarLog
from chainfold.watch.live import WatchProcess, WorkerRun, live_events

MODEL = "chainfold.examples.accounts"


def _children() -> tuple[float, int]:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime, r.ru_maxrss


def rebuild(topic: str, url: str, snaps: Path) -> dict[str, Any]:
    c0, _ = _children()
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "chainfold", "rebuild", topic, "--model", MODEL, "--full",
                        "--service-url", url, "--snapshots", str(snaps), "--json"], capture_output=True, text=True)
    wall = time.monotonic() - t0
    if r.returncode != 0:
        raise SystemExit(f"rebuild failed: {r.stderr[-2000:]}")
    c1, _ = _children()
    return {"cpu_s": c1 - c0, "wall_s": wall, "entries": json.loads(r.stdout)["log"]["events"]}


def watch(topic: str, url: str, snaps: Path, entries: int, evidence: Path | None, work: Path,
          env: dict[str, str] | None = None) -> dict[str, Any]:
    args = ["--model", MODEL, "--snapshots", str(snaps)]
    if evidence is not None:
        args += ["--evidence", str(evidence)]
    c0, _ = _children()
    t0 = time.monotonic()
    w = WatchProcess(topic, url, args, log_path=work / "watch.log", env=env).start()
    rss: dict[str, float] = {}
    for q in (1, 2, 3, 4):
        done = w.wait_for(lambda w: (w.last_progress() or {}).get("log_entries", 0) >= entries * q // 4 and
                          (evidence is None or w.last_progress()["worker_entries"] >= entries * q // 4), 1800)
        rss[f"{q}/4"] = _memory_mb(w, "VmRSS")
    t_read = time.monotonic() - t0
    rss["peak"] = _memory_mb(w, "VmHWM")
    code = w.stop(signal.SIGTERM)
    wall = time.monotonic() - t0
    if not done or code != 0 or w.of("divergence"):
        raise SystemExit(f"watch did not finish cleanly (exit {code}): {(work / 'watch.log').read_text()[-2000:]}")
    c1, _ = _children()
    return {"cpu_s": c1 - c0, "wall_s": wall, "read_s": t_read, "entries": entries, "rss_mb": rss}


def _memory_mb(w: WatchProcess, field: str) -> float:
    """``VmRSS``/``VmHWM`` of the watch process, MB."""
    assert w.proc is not None
    for line in Path(f"/proc/{w.proc.pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--streams", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--data-dir", default=".chainfold-bench")
    ap.add_argument("--before", metavar="SRC", help="also run watch+evidence from this checkout's src/")
    a = ap.parse_args()
    opts = BrokerOptions.from_env(data_dir=a.data_dir)
    url = resolve_url(opts)
    client = connect(opts)
    topic = f"watch-cpu-{uuid.uuid4().hex[:8]}"
    elog = PulsarLog(client, topic)
    events = live_events(a.events, a.streams, seed=11)
    for i in range(0, len(events), 10_000):
        elog.append(events[i:i + 10_000], assign_seq=False)
    results: dict[str, list[dict[str, Any]]] = {"rebuild": [], "watch": [], "watch+evidence": []}
    before = None
    if a.before:
        before = {"PYTHONPATH": str(Path(a.before).resolve() / "src")}
        results["watch+evidence (before)"] = []
    with tempfile.TemporaryDirectory(prefix="chainfold-watch-cpu-") as tmp:
        root = Path(tmp)
        evidence = root / "evidence"
        t0 = time.monotonic()
        worker = WorkerRun(topic=topic, service_url=url, evidence=evidence, state=root / "state.json",
                           flush_every=1000, commit_seconds=1.0, idle=5.0, log_path=root / "worker.log")
        worker.supervise(timeout=3600)
        worker.join()
        print(f"worker handled {a.events:,} events in {time.monotonic() - t0:.1f} s (runs {worker.runs})",
              file=sys.stderr)
        for r in range(a.rounds):
            for name in results:
                snaps = root / f"snaps-{name.replace(' (before)', '-before')}-{r}"
                if name == "rebuild":
                    res = rebuild(topic, url, snaps)
                else:
                    res = watch(topic, url, snaps, a.events, evidence if name.startswith("watch+evidence") else None,
                                root, env=before if name.endswith("(before)") else None)
                res["us_per_event"] = res["cpu_s"] * 1e6 / a.events
                results[name].append(res)
                print(f"round {r + 1} {name:<15} cpu {res['cpu_s']:6.2f} s  wall {res['wall_s']:6.2f} s  "
                      f"{res['us_per_event']:5.1f} µs/event  {res.get('rss_mb', '')}", file=sys.stderr)
    summary = {name: {"us_per_event_median": round(statistics.median(x["us_per_event"] for x in runs), 2),
                      "cpu_s": [round(x["cpu_s"], 2) for x in runs], "wall_s": [round(x["wall_s"], 2) for x in runs],
                      "rss_mb": [x.get("rss_mb") for x in runs]}
               for name, runs in results.items()}
    base = summary["rebuild"]["us_per_event_median"]
    for name in list(summary)[1:]:
        summary[name]["vs_rebuild"] = round(summary[name]["us_per_event_median"] / base, 2)
    elog.close()
    client.close()
    print(json.dumps({"events": a.events, "streams": a.streams, "rounds": a.rounds, "results": summary}))


if __name__ == "__main__":
    main()

"""Memory over a long run: ``chainfold watch --evidence`` following a steady publisher and a real worker.

A publisher appends accounts events at ``--rate``/s (chunks of 50, generated as they go: the
benchmark holds no list of them) for ``--minutes``; the demo's real worker
(``python -m chainfold.worker``, Tracker evidence) consumes them; ``chainfold watch TOPIC --model
accounts --evidence DIR`` (the real command, started first) follows both. Every ``--sample-seconds``
the benchmark records watch's resident memory (``VmRSS`` from ``/proc``), its CPU seconds so far,
the worker's ``VmRSS``, and how far watch has read (its last ``progress`` line): one JSON line per
sample in ``DIR/samples.jsonl`` (readable while it runs) and on stderr. At the end the publisher
stops, watch is given time to read everything, then SIGTERM (exit 0 expected, no ``divergence``).

Printed at the end (one JSON line on stdout): RSS first / at 25 %, 50 %, 75 % / last / max, the
slope of RSS over the second half (MB per hour, least squares), watch's CPU µs per event over the
run, and the events published, read and compared.

    python benchmarks/watch_memory.py [--minutes 60] [--rate 500] [--sample-seconds 30] [--keep DIR]

Broker: ``$CHAINFOLD_SERVICE_URL``, else the embedded broker of ``--data-dir`` (loopback only).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from chainfold.envelope import Event
from chainfold.examples.accounts import iter_events
from chainfold.log.broker import BrokerOptions, connect, resolve_url
from chainfold.log.pulsar import PulsarLog
from chainfold.watch.live import WatchProcess, WorkerRun

MODEL = "chainfold.examples.accounts"
_TICK = os.sysconf("SC_CLK_TCK")


def events(n: int, streams: int, seed: int) -> Iterator[Event]:
    """The accounts story of ``n`` events one at a time, with per-stream ``seq`` (as generate_events)."""
    seqs: dict[str, int] = {}
    for d in iter_events(n, streams, seed):
        s = seqs[d["stream"]] = seqs.get(d["stream"], 0) + 1
        yield Event(d["id"], d["stream"], s, d["type"], d["time"], d["data"])


class SteadyPublisher(threading.Thread):
    """Appends ``source`` to ``elog`` at ``rate`` events/s in chunks of ``chunk`` until stopped."""

    def __init__(self, elog: PulsarLog, source: Iterator[Event], rate: float, chunk: int = 50) -> None:
        super().__init__(name="steady-publisher", daemon=True)
        self.elog, self.source, self.rate, self.chunk = elog, source, rate, chunk
        self.published = 0
        self.halt = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        t0 = time.monotonic()
        try:
            while not self.halt.wait(max(0.0, t0 + self.published / self.rate - time.monotonic())):
                part = [e for _, e in zip(range(self.chunk), self.source)]
                if not part:
                    return
                self.elog.append(part, assign_seq=False)
                self.published += len(part)
        except BaseException as exc:  # reported in the summary
            self.error = exc


def proc_status(pid: int | None) -> dict[str, float]:
    """``VmRSS`` and ``VmHWM`` (MB) and CPU seconds (user + system) of a live process, else {}."""
    if pid is None:
        return {}
    try:
        status = Path(f"/proc/{pid}/status").read_text().splitlines()
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return {}
    out = {f: int(line.split()[1]) / 1024 for line in status for f in ("VmRSS", "VmHWM") if line.startswith(f + ":")}
    out["cpu_s"] = (int(stat[11]) + int(stat[12])) / _TICK
    return out


def slope_mb_per_hour(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, MB) points, in MB per hour."""
    if len(points) < 3:
        return None
    n = len(points)
    mx = sum(t for t, _ in points) / n
    my = sum(m for _, m in points) / n
    den = sum((t - mx) ** 2 for t, _ in points)
    return None if den == 0 else sum((t - mx) * (m - my) for t, m in points) / den * 3600


def summarize(samples: list[dict[str, Any]]) -> dict[str, Any]:
    rss = [s["watch_rss_mb"] for s in samples if "watch_rss_mb" in s]
    if not rss:
        return {}
    half = [(s["t_s"], s["watch_rss_mb"]) for s in samples[len(samples) // 2:] if "watch_rss_mb" in s]
    at = {f"{q}%": rss[min(len(rss) - 1, len(rss) * q // 100)] for q in (25, 50, 75)}
    worker = [s["worker_rss_mb"] for s in samples if "worker_rss_mb" in s]
    return {"watch_rss_mb": {"first": rss[0], **at, "last": rss[-1], "max": max(rss), "min": min(rss),
                             "second_half_slope_mb_per_h": slope_mb_per_hour(half)},
            "worker_rss_mb": {"first": worker[0], "last": worker[-1], "max": max(worker)} if worker else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=60.0, help="how long the publisher appends")
    ap.add_argument("--rate", type=float, default=500.0, help="events/s the publisher appends")
    ap.add_argument("--streams", type=int, default=1000)
    ap.add_argument("--sample-seconds", type=float, default=30.0)
    ap.add_argument("--data-dir", default=".chainfold-bench")
    ap.add_argument("--keep", metavar="DIR", help="work in DIR/chainfold-watch-memory-*, kept (samples, logs)")
    a = ap.parse_args()
    total = int(a.minutes * 60 * a.rate)
    opts = BrokerOptions.from_env(data_dir=a.data_dir)
    url = resolve_url(opts)
    client = connect(opts)
    keep = contextlib.nullcontext(tempfile.mkdtemp(prefix="chainfold-watch-memory-", dir=a.keep)) if a.keep else None
    with keep or tempfile.TemporaryDirectory(prefix="chainfold-watch-memory-") as tmp:
        work = Path(tmp)
        source = events(total + 20, a.streams, seed=21)
        elog = PulsarLog(client, f"watch-memory-{uuid.uuid4().hex[:8]}")
        elog.append([next(source) for _ in range(20)], assign_seq=False)  # the topic exists before anyone reads
        evidence = work / "evidence"
        watch = WatchProcess(elog.topic, url, ["--model", MODEL, "--evidence", str(evidence), "--snapshots",
                                               str(work / "snapshots")], log_path=work / "watch.log", cwd=work).start()
        watch.wait_for(lambda w: w.of("progress"), 120)
        worker = WorkerRun(topic=elog.topic, service_url=url, evidence=evidence, state=work / "state.json",
                           flush_every=1000, commit_seconds=1.0, idle=60.0, log_path=work / "worker.log")
        worker.supervise(timeout=a.minutes * 60 + 3600)
        pub = SteadyPublisher(elog, source, a.rate)
        t0 = time.monotonic()
        pub.start()
        samples: list[dict[str, Any]] = []
        with open(work / "samples.jsonl", "a") as out:
            def sample() -> None:
                assert watch.proc is not None
                w = proc_status(watch.proc.pid)
                k = proc_status(worker.proc.pid if worker.proc is not None else None)
                p = watch.last_progress() or {}
                s = {"t_s": round(time.monotonic() - t0, 1), "published": pub.published + 20,
                     "log_entries": p.get("log_entries"), "worker_entries": p.get("worker_entries"),
                     "lag": p.get("lag")}
                if w:
                    s.update(watch_rss_mb=round(w["VmRSS"], 1), watch_hwm_mb=round(w["VmHWM"], 1),
                             watch_cpu_s=round(w["cpu_s"], 2))
                if k:
                    s["worker_rss_mb"] = round(k["VmRSS"], 1)
                samples.append(s)
                out.write(json.dumps(s) + "\n")
                out.flush()
                print(json.dumps(s), file=sys.stderr, flush=True)

            while pub.is_alive() and time.monotonic() - t0 < a.minutes * 60:
                sample()
                time.sleep(a.sample_seconds)
            pub.halt.set()
            pub.join()
            published = pub.published + 20
            watch.wait_for(lambda w: (w.last_progress() or {}).get("log_entries", 0) >= published and
                           (w.last_progress() or {}).get("worker_entries", 0) >= published, 600)
            sample()
        cpu = samples[-1].get("watch_cpu_s", 0.0) - next((s["watch_cpu_s"] for s in samples if "watch_cpu_s" in s), 0.0)
        code = watch.stop()
        worker.join(180)
        worker.kill()
        elog.close()
        last = samples[-1]
        summary = {"minutes": a.minutes, "rate": a.rate, "sample_seconds": a.sample_seconds,
                   "published": published, "read": last.get("log_entries"), "compared": last.get("worker_entries"),
                   "publisher_error": repr(pub.error) if pub.error else None, "watch_exit": code,
                   "divergences": len(watch.of("divergence")), "errors": len(watch.of("error")),
                   "watch_cpu_us_per_event": round(cpu * 1e6 / max(1, published), 1),
                   "samples": len(samples), **summarize(samples)}
    client.close()
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

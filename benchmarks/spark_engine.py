"""The Spark engine against the local ones, whole processes side by side, and what one task does per
second (the figures the README's projection to a billion events starts from).

    .venv/bin/python benchmarks/spark_engine.py [--events 1000000] [--master local[2]] [--repeat 2]
                                                [--command rebuild|verify] [--service-url URL] [--json]
                                                [--variants local,workers2,spark] [--baseline-src DIR]

Without ``--service-url`` an embedded pulsar-lite broker is started in a temporary directory (and
stopped at the end). ``--events`` accounts events (``read_throughput.publish``: 1 stream per 200
events) are published first (not timed); a bare read warms the broker's and the page cache.

1. **Whole processes**, ``--repeat`` rounds, the three one after the other in each round, each with
   a fresh ``--snapshots`` folder (so every run reads, hashes, records and folds everything; only the
   final snapshot is written: ``--snapshot-every 0``, what ``--workers`` writes):

   - ``local``: ``chainfold rebuild TOPIC --model chainfold.examples.accounts --full``
   - ``workers2``: the same with ``--workers 2``
   - ``spark``: the same with ``--engine spark --spark-master MASTER`` (its session start-up
     included: that is what a user waits for; the phases come from its ``-v`` log)

   - ``spark_base`` (with ``--baseline-src DIR``, e.g. ``git archive main src | tar -x -C DIR``):
     the ``spark`` run with ``PYTHONPATH=DIR/src``, so the driver and the executors run that
     version of chainfold (before/after in one run)

   ``--variants`` picks some (default: all that apply). Wall seconds and peak RSS from
   ``/usr/bin/time -f "%e %M"`` (the ``chainfold`` process itself), the driver's own CPU seconds
   (``time.process_time()`` of the ``chainfold`` process at exit: its threads, not the Spark JVM or
   the Python workers it starts; ``driver_cpu_us_per_event``),
   and the peak of the whole process tree's RSS sampled every 0.2 s (``tree_peak_rss_mb``: the Spark
   JVM and its Python workers are children of the driver; ``--workers`` processes too); the
   three ``--json`` reports must agree (normalised).
2. **Per task, one core** (this process, no Spark): the topic planned into ``--ranges`` ranges, each
   read by :func:`~chainfold.engines.tasks.read_chunk` (read + leaf hash + decode), assembled
   (:func:`~chainfold.engines.tasks.assemble`), its ids hashed for the dedup shuffle, its events folded
   (:func:`~chainfold.engines.tasks.fold_streams`, decode again + model); and the driver's share (the
   distributed rebuild on the in-process cluster, minus the tasks). Events per second of each.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import psutil
import pulsar

sys.path.insert(0, str(Path(__file__).resolve().parent))
from read_throughput import bare_read, publish  # noqa: E402

from chainfold.log.broker import BrokerOptions, EmbeddedBroker, client_logger  # noqa: E402

MODEL = "chainfold.examples.accounts"
_PHASE = re.compile(r"(planning \d+ ranges|read, hash, decode|dedup|fold|assembly) took ([\d.]+)s")


def _tree_rss(pid: int) -> int:
    try:
        p = psutil.Process(pid)
        return sum(q.memory_info().rss for q in [p, *p.children(recursive=True)])
    except psutil.Error:
        return 0


# ``python -m chainfold`` that prints its own CPU seconds (all its threads, no children) at exit
_CLI = ("import atexit, runpy, sys, time; "
        "atexit.register(lambda: print('DRIVER_CPU', time.process_time(), file=sys.stderr)); "
        "sys.argv[0] = 'chainfold'; runpy.run_module('chainfold', run_name='__main__', alter_sys=True)")


def run_cli(args: list[str], url: str, src: str | None = None) -> dict:
    """One whole ``chainfold`` process under ``/usr/bin/time``: wall s, peak RSS MB (the process;
    and its whole tree, sampled every 0.2 s: the Spark JVM and Python workers are children), its
    own CPU s, its report, phases. ``src``: run the chainfold found there (``PYTHONPATH``)."""
    env = {**os.environ, "CHAINFOLD_SERVICE_URL": url, "CHAINFOLD_PROGRESS_SECONDS": "3600"}
    if src:
        env["PYTHONPATH"] = src
    cmd = ["/usr/bin/time", "-f", "TIME %e %M", sys.executable, "-c", _CLI, "-v", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    tree = [0]

    def sample() -> None:
        while proc.poll() is None:
            tree[0] = max(tree[0], _tree_rss(proc.pid))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = proc.communicate()
    sampler.join()
    m = re.search(r"TIME ([\d.]+) (\d+)", stderr)
    cpu = re.search(r"DRIVER_CPU ([\d.]+)", stderr)
    if proc.returncode != 0 or m is None or cpu is None:
        raise SystemExit(f"{' '.join(args)} failed (exit {proc.returncode}):\n{stderr[-3000:]}")
    return {"seconds": float(m.group(1)), "peak_rss_mb": round(int(m.group(2)) / 1024),
            "driver_cpu_s": float(cpu.group(1)),
            "tree_peak_rss_mb": round(tree[0] / 2**20), "report": json.loads(stdout),
            "phases": {k: float(v) for k, v in _PHASE.findall(stderr)}}


def normalised(doc: dict) -> dict:
    d = dict(doc)
    for k in ("seconds", "redeliveries_dropped", "snapshots_written", "workers"):
        d.pop(k, None)
    return d


def whole_processes(url: str, topic: str, n: int, master: str, repeat: int, command: str, work: Path,
                    names: list[str], baseline_src: str | None = None) -> dict:
    spark = ["--engine", "spark", "--spark-master", master]
    every: dict[str, tuple[list[str], str | None]] = {
        "local": ([], None),
        "workers2": (["--workers", "2"], None),
        "spark": (spark, None),
        "spark_base": (spark, str(Path(baseline_src).resolve() / "src") if baseline_src else None),
    }
    variants = {k: every[k] for k in names if k != "spark_base" or baseline_src}
    runs: dict[str, list[dict]] = {k: [] for k in variants}
    for i in range(repeat):
        for name, (extra, src) in variants.items():
            snaps = work / f"{name}-{i}"
            if command == "rebuild":
                args = ["rebuild", topic, "--model", MODEL, "--full", "--snapshot-every", "0"]
            else:
                args = ["verify", topic]
            got = run_cli([*args, "--snapshots", str(snaps), "--json", *extra], url, src)
            runs[name].append(got)
            shutil.rmtree(snaps, ignore_errors=True)
            print(f"round {i}: {name}: {got['seconds']} s, {got['peak_rss_mb']} MB, driver CPU {got['driver_cpu_s']:.1f} s",
                  file=sys.stderr)
    reports = {normalised(r["report"]).__repr__() for rs in runs.values() for r in rs}
    out: dict = {"same_reports": len(reports) == 1}
    for name, rs in runs.items():
        secs = [r["seconds"] for r in rs]
        best = min(secs)
        cpu = [r["driver_cpu_s"] for r in rs]
        out[name] = {"seconds": secs, "events_per_s": round(n / best), "peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
                     "tree_peak_rss_mb": max(r["tree_peak_rss_mb"] for r in rs), "driver_cpu_s": cpu,
                     "driver_cpu_us_per_event": round(min(cpu) / n * 1e6, 2)}
        if rs[0]["phases"]:
            out[name]["phases_best_run"] = rs[secs.index(best)]["phases"]
    if "local" in variants:
        base = min(out["local"]["seconds"])
        for name in variants:
            out[name]["x_local"] = round(base / min(out[name]["seconds"]), 2)
    return out


def per_task(url: str, topic: str, n: int, ranges: int) -> dict:
    """Each task kind on one core, over the whole topic (events per second of that core)."""
    from chainfold.engines.cluster import InProcess
    from chainfold.engines.distributed import Distribution, distributed_rebuild
    from chainfold.engines.pool import PulsarSource
    from chainfold.engines.spark_io import RANGE_QUEUE, PulsarPlanner, plan_partition
    from chainfold.engines.tasks import assemble, dedup_pairs, fold_items, fold_streams, read_chunk
    from chainfold.log.pulsar import PulsarLog
    from chainfold.replay.dedup import id_keys

    client = pulsar.Client(url, logger=client_logger(), operation_timeout_seconds=30)
    try:
        plan = plan_partition(topic, client=client, target_ranges=ranges)
        source = PulsarSource(topic, BrokerOptions(service_url=url), receiver_queue=RANGE_QUEUE)
        t0 = time.perf_counter()
        chunks = [read_chunk(source, r, 0, i) for i, r in enumerate(plan)]
        t_read = time.perf_counter() - t0
        task_rates = [round(c.count / c.seconds) for c in chunks]
        begins, b = [], 0
        for c in chunks:
            begins.append(b)
            b += c.count
        t0 = time.perf_counter()
        for c, b in zip(chunks, begins):
            assemble(c, b, c.count, 1024, [], 0, ids=True)
        t_assemble = time.perf_counter() - t0
        t0 = time.perf_counter()
        for c, b in zip(chunks, begins):
            ids, _ = dedup_pairs(c, b, c.count)
            id_keys(ids)
        t_keys = time.perf_counter() - t0
        items = [it for c, b in zip(chunks, begins) for it in fold_items(c, b, c.count, frozenset())]
        t0 = time.perf_counter()
        items.sort(key=lambda it: (it[0], it[1]))
        results = list(fold_streams(iter(items), MODEL, "stop", [], None))
        t_fold = time.perf_counter() - t0
        del items, chunks
        plog = PulsarLog(client, topic)
        dist = Distribution(InProcess(1, 1), source, PulsarPlanner(client))
        root = Path(tempfile.mkdtemp(prefix="chainfold-bench-inproc-"))
        t0 = time.perf_counter()
        distributed_rebuild(dist, plog, MODEL, snapshots_root=root, full=True, snapshot_every=0)
        t_all = time.perf_counter() - t0
        shutil.rmtree(root, ignore_errors=True)
        plog.close()
    finally:
        client.close()
    tasks = t_read + t_assemble + t_keys + t_fold
    return {
        "ranges": len(plan),
        "streams": len(results),
        "read_hash_decode_per_s": round(n / t_read),
        "read_task_rates_per_s": task_rates,
        "read_task_median_per_s": round(statistics.median(task_rates)),
        "assemble_per_s": round(n / t_assemble),
        "dedup_keys_per_s": round(n / t_keys),
        "fold_per_s": round(n / t_fold),
        "executor_total_per_s": round(n / tasks),
        "in_process_rebuild_s": round(t_all, 2),
        "driver_share_per_s": round(n / max(1e-9, t_all - tasks)),
        "note": "in_process_rebuild runs every task and the driver in this process; driver_share = "
                "its time minus the tasks' (the shuffles' pickling included)",
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--master", default="local[2]")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--ranges", type=int, default=8, help="ranges of the per-task measurement")
    ap.add_argument("--command", choices=["rebuild", "verify"], default="rebuild")
    ap.add_argument("--skip-processes", action="store_true", help="only the per-task figures")
    ap.add_argument("--variants", default="local,workers2,spark,spark_base",
                    help="whole-process runs, of local,workers2,spark,spark_base")
    ap.add_argument("--baseline-src", help="a chainfold tree (with src/) the spark_base variant runs")
    ap.add_argument("--service-url")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    data = broker = None
    url = args.service_url
    if not url:
        data = Path(tempfile.mkdtemp(prefix="chainfold-bench-sparkeng-"))
        broker = EmbeddedBroker(data)
        url = broker.acquire(pinned=True)
    work = Path(tempfile.mkdtemp(prefix="chainfold-bench-sparkeng-runs-"))
    out: dict = {"events": args.events, "master": args.master, "command": args.command, "broker": url,
                 "load_avg_start": os.getloadavg()[0]}
    try:
        client = pulsar.Client(url, logger=client_logger(), operation_timeout_seconds=30)
        topic = f"persistent://public/default/bench-sparkeng-{uuid.uuid4().hex[:10]}"
        out["publish_s"] = round(publish(client, topic, args.events), 1)
        bare_read(client, topic)
        client.close()
        print(f"published {args.events:,} events in {out['publish_s']} s", file=sys.stderr)
        if not args.skip_processes:
            out["processes"] = whole_processes(url, topic, args.events, args.master, args.repeat, args.command, work,
                                               args.variants.split(","), args.baseline_src)
        out["per_task_one_core"] = per_task(url, topic, args.events, args.ranges)
        out["load_avg_end"] = os.getloadavg()[0]
    finally:
        if broker is not None:
            broker.stop()
            shutil.rmtree(data, ignore_errors=True)  # type: ignore[arg-type]
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        for k in ("local", "workers2", "spark", "spark_base"):
            p = (out.get("processes") or {}).get(k)
            if p:
                print(f"{k:10s} {p['events_per_s']:>9,} events/s  {p.get('x_local', '-'):>5} x local  runs {p['seconds']} s  "
                      f"driver CPU {p['driver_cpu_us_per_event']} us/event  peak {p['peak_rss_mb']} MB "
                      f"(tree {p['tree_peak_rss_mb']} MB)  {p.get('phases_best_run', '')}")
        print(f"same reports: {(out.get('processes') or {}).get('same_reports')}")
        print(json.dumps(out["per_task_one_core"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

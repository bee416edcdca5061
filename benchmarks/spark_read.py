"""The Spark engine's read stage alone: a Spark job whose tasks read fixed ranges and count, vs the
serial read loops, side by side on one topic.

    .venv/bin/python benchmarks/spark_read.py [--events 1000000] [--master local[2]] [--ranges 2,8]
                                              [--queue 1000] [--repeat 2] [--service-url URL] [--json]

Without ``--service-url`` an embedded pulsar-lite broker is started in a temporary directory (and
stopped at the end). ``--events`` accounts events are published first with chainfold's batching
producer (not timed). Then, ``--repeat`` times, interleaved:

- ``bare``: a bare pulsar-client reader loop over the whole topic (``read_throughput.bare_read``:
  payload touched, nothing else, redeliveries not even filtered), the most a Python reader gets;
- ``serial``: chainfold's log reader over the whole topic (what the local engine reads with);
- ``spark``: ``chainfold.engines.spark.read_ranges`` on ``--master``: one task per planned range,
  each connecting, reading its range with :class:`RangeReader` and counting. Wall time of the job
  (the session is made once, before; its start-up is reported apart), and per task: messages,
  seconds from connect to close, messages/s.

Also reported: the plan (probe count and time), the driver's peak RSS and the Spark JVM's RSS.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil
import pulsar

sys.path.insert(0, str(Path(__file__).resolve().parent))
from read_throughput import bare_read, publish  # noqa: E402

from chainfold.engines.parallel import peak_rss  # noqa: E402
from chainfold.engines.spark import read_ranges, spark_session  # noqa: E402
from chainfold.engines.spark_io import plan_partition  # noqa: E402
from chainfold.log.broker import BrokerOptions, EmbeddedBroker, client_logger  # noqa: E402
from chainfold.log.pulsar import PulsarLog  # noqa: E402


def serial_read(client: pulsar.Client, topic: str) -> tuple[float, int]:
    t0 = time.perf_counter()
    n = 0
    for entry in PulsarLog(client, topic).read():
        len(entry.payload)
        n += 1
    return time.perf_counter() - t0, n


def jvm_rss() -> int:
    """RSS of this process's Java children (the Spark driver JVM, and executors in local mode)."""
    return sum(c.memory_info().rss for c in psutil.Process().children(recursive=True) if "java" in c.name())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--master", default="local[2]")
    ap.add_argument("--ranges", default="8", help="target number of ranges (tasks); several plans: N,M,...")
    ap.add_argument("--queue", type=int, help="range readers' receiver queue (default: RangeReader's)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--service-url")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    data = None
    broker = None
    url = args.service_url
    if not url:
        data = Path(tempfile.mkdtemp(prefix="chainfold-bench-spark-"))
        broker = EmbeddedBroker(data)
        url = broker.acquire(pinned=True)
    client = pulsar.Client(url, logger=client_logger(), operation_timeout_seconds=30)
    out: dict = {"events": args.events, "master": args.master, "queue": args.queue, "broker": url}
    try:
        topic = f"persistent://public/default/bench-spark-{uuid.uuid4().hex[:10]}"
        out["publish_s"] = round(publish(client, topic, args.events), 1)
        print(f"published {args.events:,} events in {out['publish_s']} s", file=sys.stderr)
        plans = {}
        out["plans"] = {}
        for k in [int(x) for x in args.ranges.split(",")]:
            t0 = time.perf_counter()
            plans[f"spark({k} ranges)"] = ranges = plan_partition(topic, client=client, target_ranges=k)
            out["plans"][k] = {"ranges": len(ranges), "seconds": round(time.perf_counter() - t0, 3),
                               "entries": sum(r.entries or 0 for r in ranges)}
        bare_read(client, topic)  # warm-up: the broker's cache, the page cache
        t0 = time.perf_counter()
        with spark_session(args.master, app_name="chainfold-bench") as spark:
            out["spark_session_s"] = round(time.perf_counter() - t0, 1)
            names = list(plans)
            kw = {} if args.queue is None else {"receiver_queue": args.queue}
            runs: dict[str, list[float]] = {"bare": [], "serial": [], **{n: [] for n in names}}
            tasks: dict[str, list] = {n: [] for n in names}
            for _ in range(args.repeat):
                dt, n = bare_read(client, topic)  # n counts pulsar-lite's redeliveries too
                out["bare_messages"] = n
                runs["bare"].append(dt)
                dt, n = serial_read(client, topic)
                assert n == args.events, n
                runs["serial"].append(dt)
                for name, ranges in plans.items():
                    t0 = time.perf_counter()
                    stats = read_ranges(spark, BrokerOptions(service_url=url), ranges, **kw)
                    runs[name].append(time.perf_counter() - t0)
                    assert sum(s.messages for s in stats) == args.events
                    tasks[name].append(stats)
            out["jvm_rss_mb"] = round(jvm_rss() / 2**20)
        out["driver_peak_rss_mb"] = round(peak_rss() / 2**20)
        for k, v in runs.items():
            best = min(v)
            out[k] = {"seconds": [round(x, 2) for x in v], "events_per_s": round(args.events / best)}
        out["tasks"] = {}
        for name in names:
            best_run = tasks[name][runs[name].index(min(runs[name]))]
            out["tasks"][name] = [{"range": s.index, "messages": s.messages, "seconds": round(s.seconds, 2),
                                   "messages_per_s": round(s.messages / s.seconds) if s.seconds else None,
                                   "redelivered": s.redelivered} for s in best_run]
            rates = [t["messages_per_s"] for t in out["tasks"][name] if t["messages_per_s"]]
            out[name]["task_messages_per_s_median"] = round(statistics.median(rates))
    finally:
        client.close()
        if broker is not None:
            broker.stop()
            shutil.rmtree(data, ignore_errors=True)  # type: ignore[arg-type]
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        print(f"plans: {out['plans']}; spark session start-up {out['spark_session_s']} s")
        for k in ("bare", "serial", *names):
            print(f"{k:18s} {out[k]['events_per_s']:>10,} events/s  runs {out[k]['seconds']}")
        for name in names:
            print(f"{name}: per task (best run), median {out[name]['task_messages_per_s_median']:,} messages/s")
            for t in out["tasks"][name]:
                print(f"  task {t['range']}: {t['messages']:,} messages in {t['seconds']} s = {t['messages_per_s']:,}/s")
        print(f"driver peak RSS {out['driver_peak_rss_mb']} MB, Spark JVM RSS {out['jvm_rss_mb']} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

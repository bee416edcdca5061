"""Read throughput: ``chainfold read`` (a subprocess, wall time) vs a bare pulsar-client reader loop.

    .venv/bin/python benchmarks/read_throughput.py [SERVICE_URL] [--events 100000] [--repeat 3]
                                                   [--topic NAME] [--label NAME] [--json]

The broker is SERVICE_URL, else ``$CHAINFOLD_SERVICE_URL`` (pulsar-lite: ``chainfold broker start
--data-dir DIR`` prints its URL; Apache Pulsar: ``scripts/pulsar-standalone start``). Unless
``--topic`` names a topic that already holds the events, ``--events`` accounts events are published
to a fresh topic first (not timed).

Measured, each ``--repeat`` times, interleaved; the best time counts:

- ``chainfold read``: ``python -m chainfold read TOPIC`` with stdout to /dev/null, wall time of the
  whole process (interpreter start, connect, decode every entry, JSON out);
- ``chainfold --version``: the fixed cost of starting the CLI, for scale;
- bare reader: a ``pulsar.Reader`` from the earliest message, ``read_next`` until
  ``has_message_available`` is false, payload bytes touched and nothing else (in this process,
  client already connected): the most any Python reader gets out of pulsar-client.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import uuid

import _pulsar
import pulsar

from chainfold.log.broker import pulsar_logger
from chainfold.envelope import event_from_json
from chainfold.examples import accounts
from chainfold.log.pulsar import PulsarLog


def publish(client: pulsar.Client, topic: str, n: int) -> float:
    t0 = time.perf_counter()
    log = PulsarLog(client, topic)
    try:
        log.append(event_from_json(e) for e in accounts.generate(n, max(1, n // 200), seed=42))
    finally:
        log.close()
    return time.perf_counter() - t0


def cli_read(url: str, topic: str) -> float:
    env = {**os.environ, "CHAINFOLD_SERVICE_URL": url}
    t0 = time.perf_counter()
    with open(os.devnull, "wb") as null:
        r = subprocess.run([sys.executable, "-m", "chainfold", "read", topic], stdout=null,
                           stderr=subprocess.PIPE, env=env, text=True)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"chainfold read failed (exit {r.returncode}): {r.stderr}")
    return dt


def cli_version() -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "chainfold", "--version"], capture_output=True, check=True)
    return time.perf_counter() - t0


def bare_read(client: pulsar.Client, topic: str) -> tuple[float, int]:
    t0 = time.perf_counter()
    reader = client.create_reader(topic, pulsar.MessageId.earliest, receiver_queue_size=5000)
    raw = reader._reader
    n = 0
    size = 0
    try:
        while True:
            try:
                m = raw.read_next(300)
            except _pulsar.Timeout:
                if not reader.has_message_available():
                    break
                continue
            size += len(m.data())
            n += 1
    finally:
        reader.close()
    return time.perf_counter() - t0, n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("service_url", nargs="?", default=os.environ.get("CHAINFOLD_SERVICE_URL"))
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--topic", help="read this topic (already holding the events) instead of publishing one")
    ap.add_argument("--label", default="", help="name of the broker, for the report")
    ap.add_argument("--json", action="store_true", help="machine-readable result on stdout")
    args = ap.parse_args(argv)
    if not args.service_url:
        ap.error("give SERVICE_URL or set CHAINFOLD_SERVICE_URL")

    client = pulsar.Client(args.service_url, logger=pulsar_logger(), operation_timeout_seconds=30)
    try:
        if args.topic:
            topic = args.topic
            published = None
        else:
            topic = f"persistent://public/default/bench-read-{uuid.uuid4().hex[:10]}"
            published = publish(client, topic, args.events)
            print(f"published {args.events:,} events to {topic} in {published:.1f}s", file=sys.stderr)
        bare_read(client, topic)  # warm-up: the broker's cache, the page cache
        cli, bare, startup = [], [], []
        n = None
        for _ in range(args.repeat):
            cli.append(cli_read(args.service_url, topic))
            dt, n = bare_read(client, topic)
            bare.append(dt)
            startup.append(cli_version())
    finally:
        client.close()

    best_cli, best_bare, best_start = min(cli), min(bare), min(startup)
    result = {
        "broker": args.label or args.service_url,
        "service_url": args.service_url,
        "topic": topic,
        "events": n,
        "publish_seconds": round(published, 3) if published is not None else None,
        "chainfold_read": {"seconds": round(best_cli, 3), "events_per_s": round(n / best_cli)},
        "chainfold_startup_seconds": round(best_start, 3),
        "chainfold_read_minus_startup": {"seconds": round(best_cli - best_start, 3),
                                         "events_per_s": round(n / max(best_cli - best_start, 1e-9))},
        "bare_reader": {"seconds": round(best_bare, 3), "events_per_s": round(n / best_bare)},
        "chainfold_read_over_bare": round(best_cli / best_bare, 2),
        "repeat": args.repeat,
        "python": platform.python_version(),
        "pulsar_client": getattr(pulsar, "__version__", None),
        "cpus": os.cpu_count(),
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"broker {result['broker']}: {n:,} events, best of {args.repeat}")
        print(f"  chainfold read (process wall) {best_cli:7.2f} s  {n / best_cli:>10,.0f} events/s")
        print(f"    of which CLI start-up       {best_start:7.2f} s")
        print(f"  bare pulsar-client reader     {best_bare:7.2f} s  {n / best_bare:>10,.0f} events/s")
        print(f"  chainfold read / bare reader  {best_cli / best_bare:7.2f} x")
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # pulsar-client's native threads can abort a normal interpreter shutdown

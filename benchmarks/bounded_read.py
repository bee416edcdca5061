"""Bounded reading: read rate and peak RSS of ways to read a topic, whole processes, side by side.

    .venv/bin/python benchmarks/bounded_read.py [SERVICE_URL] [--events 1000000,3000000]
        [--work-us 0,8] [--strategies gate-100,ungated,...] [--repeat 1] [--json]

The broker is SERVICE_URL, else ``$CHAINFOLD_SERVICE_URL`` (pulsar-lite: ``chainfold broker start
--data-dir DIR`` prints its URL; Apache Pulsar: ``scripts/pulsar-standalone start``). For each N a
fresh topic gets N accounts events (1,000 streams) from chainfold's batching producer (not timed),
unless ``--topic N=NAME`` names one that holds them. Then every strategy reads the whole topic in its
own process under ``/usr/bin/time -f "%e %M"`` (wall seconds, peak RSS), one after another, repeated
``--repeat`` times interleaved. ``--work-us W`` makes the consumer spend W µs per message (a busy
loop), standing in for what a replay does with each message (``rebuild`` costs ~8 µs per event).

Strategies:

- ``gate-L``: chainfold's reader (``PulsarLog.read``) on a client whose logger is the process's
  :class:`chainfold.log.readgate.ReadGate`, holding at most L entries ahead of the reader (what
  ``open_log`` does on the embedded broker, L = 100);
- ``ungated``: chainfold's reader without a gate (pulsar-client's native logger), as before;
- ``queue-Q``: ``ungated`` with a receiver queue of Q instead of chainfold's default;
- ``windows-W``: a bare reader re-created after every W messages, from the last message id.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid

HERE = os.path.abspath(__file__)


def _spin(us: float) -> None:
    end = time.perf_counter() + us * 1e-6
    while time.perf_counter() < end:
        pass


def _peak_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024
    return 0.0


def one(url: str, topic: str, strategy: str, work_us: float) -> dict:
    """Read the whole topic with ``strategy`` in this process; the measured result."""
    import pulsar

    from chainfold.log import pulsar as cfp
    from chainfold.log.broker import client_logger, pulsar_logger

    kind, _, arg = strategy.partition("-")
    t0 = time.perf_counter()
    if kind == "windows":
        n, redelivered = _windows(url, topic, int(arg), work_us)
    else:
        gate = pulsar_logger() if kind == "gate" else None  # the process's gate
        if gate is not None:
            gate.limit = int(arg)
        if kind == "queue":
            cfp._RECEIVER_QUEUE = int(arg)
        client = pulsar.Client(url, logger=gate or client_logger(), io_threads=1, operation_timeout_seconds=30)
        log = cfp.PulsarLog(client, topic, gate=gate)
        reader = log.read()
        n = 0
        for e in reader:
            e.payload
            if work_us:
                _spin(work_us)
            n += 1
        redelivered = reader.redelivered
    seconds = time.perf_counter() - t0
    return {"strategy": strategy, "events": n, "seconds": round(seconds, 2), "events_per_s": round(n / seconds),
            "redelivered": redelivered, "peak_rss_mb_inside": round(_peak_mb())}


def _windows(url: str, topic: str, window: int, work_us: float) -> tuple[int, int]:
    import _pulsar
    import pulsar

    from chainfold.log.broker import client_logger

    client = pulsar.Client(url, logger=client_logger(), io_threads=1, operation_timeout_seconds=30)
    last = None
    n = redelivered = 0
    while True:
        start = pulsar.MessageId.earliest if last is None else pulsar.MessageId(
            last.partition(), last.ledger_id(), last.entry_id(), last.batch_index())
        reader = client.create_reader(topic, start, receiver_queue_size=1000)
        k = idle = 0
        done = False
        while k < window:
            try:
                m = reader._reader.read_next(100)
            except _pulsar.Timeout:
                if not reader.has_message_available():
                    done = True
                    break
                idle += 1
                if idle >= 10:
                    break  # stalled: a new window
                continue
            idle = 0
            mid = m.message_id()
            if last is not None and mid <= last:
                redelivered += 1
                continue
            last = mid
            m.data()
            if work_us:
                _spin(work_us)
            n += 1
            k += 1
        reader.close()
        if done:
            return n, redelivered


def publish(url: str, n: int) -> str:
    from chainfold.bench import publish_story

    topic = f"persistent://public/default/bounded-read-{n}-{uuid.uuid4().hex[:8]}"
    secs, _ = publish_story(url, topic, n, 1000, 7)
    print(f"published {n:,} events to {topic} in {secs:.0f}s", file=sys.stderr, flush=True)
    return topic


def measure(url: str, topic: str, strategy: str, work_us: float) -> dict:
    cmd = ["/usr/bin/time", "-f", "%e %M", sys.executable, HERE, "--one", url, topic, strategy, str(work_us)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        return {"strategy": strategy, "error": r.stderr.strip()[-500:]}
    res = json.loads(r.stdout.strip().splitlines()[-1])
    wall, kb = r.stderr.strip().splitlines()[-1].split()
    res.update(wall_seconds=float(wall), peak_rss_mb=round(int(kb) / 1024), work_us=work_us)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("service_url", nargs="?", default=os.environ.get("CHAINFOLD_SERVICE_URL"))
    ap.add_argument("--events", default="1000000,3000000")
    ap.add_argument("--work-us", default="0,8")
    ap.add_argument("--strategies", default="gate-100,ungated,queue-1000,queue-100,windows-100000")
    ap.add_argument("--topic", action="append", default=[], metavar="N=NAME")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if not args.service_url:
        ap.error("give SERVICE_URL or set CHAINFOLD_SERVICE_URL")
    given = dict(t.split("=", 1) for t in args.topic)
    rows = []
    for n in [int(x) for x in args.events.split(",")]:
        topic = given.get(str(n)) or publish(args.service_url, n)
        for _ in range(args.repeat):
            for w in [float(x) for x in args.work_us.split(",")]:
                for s in args.strategies.split(","):
                    row = measure(args.service_url, topic, s, w)
                    row["n"] = n
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print("| N | work µs/event | strategy | events/s | wall s | peak RSS MB | redelivered |")
        print("|---:|---:|---|---:|---:|---:|---:|")
        for r in rows:
            if "error" in r:
                print(f"| {r['n']:,} | | {r['strategy']} | error: {r['error'][:60]} | | | |")
                continue
            print(f"| {r['n']:,} | {r['work_us']:g} | {r['strategy']} | {r['events_per_s']:,} | {r['wall_seconds']:.1f} "
                  f"| {r['peak_rss_mb']:,} | {r['redelivered']:,} |")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        out = one(sys.argv[2], sys.argv[3], sys.argv[4], float(sys.argv[5]))
        print(json.dumps(out), flush=True)
        os._exit(0)  # pulsar-client's native threads can abort a normal interpreter shutdown
    code = main()
    sys.stdout.flush()
    os._exit(code)

"""Profile the replay hot path: ``rebuild(..., full=True)`` under pyinstrument, on a broker or in memory.

    .venv/bin/python benchmarks/profile_rebuild.py [SERVICE_URL] [--events 1000000] [--streams 1000]
                                                   [--topic NAME] [--memory] [--no-profile]

With SERVICE_URL (or ``$CHAINFOLD_SERVICE_URL``; for pulsar-lite, ``chainfold broker start --data-dir
DIR`` prints one) the events are published to a fresh topic first (not timed) unless ``--topic``
names one that holds them; ``--memory`` folds an in-memory log instead (no broker: the cost of
chainfold alone). Prints the profile (pyinstrument's sampling inflates small functions) and, with
``--no-profile``, just the time. This is how the hot path in ``benchmarks/RESULTS.md`` was found.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("service_url", nargs="?", default=os.environ.get("CHAINFOLD_SERVICE_URL"))
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--streams", type=int, default=1000)
    ap.add_argument("--topic")
    ap.add_argument("--memory", action="store_true", help="fold an in-memory log (no broker)")
    ap.add_argument("--no-profile", action="store_true")
    args = ap.parse_args(argv)

    from chainfold.bench import publish_story, story
    from chainfold.envelope import Event, encode
    from chainfold.replay.fold import load_model
    from chainfold.ops.rebuild import rebuild

    if args.memory:
        from chainfold.log import MemoryLog

        elog = MemoryLog("profile")
        seqs: dict[str, int] = {}
        items = []
        for d in story(args.events, args.streams, 7):
            q = seqs[d["stream"]] = seqs.get(d["stream"], 0) + 1
            items.append((encode(Event(d["id"], d["stream"], q, d["type"], d["time"], d["data"])), d["stream"], d["time"]))
        elog.append_payloads(items)
        del items
    else:
        if not args.service_url:
            ap.error("give SERVICE_URL (or --memory)")
        from chainfold.log.broker import BrokerOptions
        from chainfold.log.pulsar import open_log

        topic = args.topic
        if topic is None:
            topic = f"profile-{args.events}-{os.getpid()}"
            secs, _ = publish_story(args.service_url, topic, args.events, args.streams, 7)
            print(f"published {args.events:,} events to {topic} in {secs:.1f}s", file=sys.stderr)
        elog = open_log(topic, BrokerOptions(service_url=args.service_url))

    model = load_model("chainfold.examples.accounts")
    snaps = Path(tempfile.mkdtemp(prefix="chainfold-profile-"))
    profiler = None
    if not args.no_profile:
        from pyinstrument import Profiler

        profiler = Profiler(interval=0.0005)
        profiler.start()
    t0 = time.perf_counter()
    result = rebuild(elog, model, snapshots_root=snaps, full=True, write_snapshots=False)
    seconds = time.perf_counter() - t0
    if profiler is not None:
        profiler.stop()
        print(profiler.output_text(unicode=False, color=False))
    n = result.to_json()["replayed"]["events"]
    print(f"rebuild: {n:,} entries in {seconds:.2f}s = {n / seconds:,.0f}/s")
    elog.close()
    os._exit(0)  # pulsar-client's threads can abort a normal interpreter shutdown


if __name__ == "__main__":
    sys.exit(main())

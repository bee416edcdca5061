"""`rebuild --full` of two chainfold builds side by side, each as a ratio to the read limit.

    python benchmarks/rebuild_before_after.py --before OLD/.venv/bin/python --events 1000000 \
        [--service-url pulsar://127.0.0.1:6650] [--rounds 3] [--extra=--no-snapshots]

One topic of the accounts story is published once; then, in each round, in turn: the bare read loop
(``read_limit``, this build), ``rebuild --full`` of the ``--before`` interpreter's chainfold and of
this one, each a whole process (wall seconds, peak RSS from ``wait4``), each build with a snapshot
folder of its own (after one unmeasured rebuild that records the checkpoints, so every measured one
does the same work). Quoted: the medians of ``read_limit seconds / rebuild seconds`` per build, and
of after / before pair by pair. Machines are shared: quote ratios from one run, not seconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from chainfold.bench import MODEL, new_config, publish_story
from chainfold.bench_scale import whole_process
from chainfold.log.broker import BrokerOptions, resolve_url


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--before", required=True, help="python of the build to compare with (its chainfold)")
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--streams", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--service-url", default=None, help="default: the embedded broker")
    ap.add_argument("--extra", action="append", default=[], help="more rebuild arguments (both builds)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="before-after-"))
    url = args.service_url or resolve_url(BrokerOptions(data_dir=str(work / "broker")))
    cfg = new_config(args.events, args.streams, 7, url, str(work))
    print(f"publishing {args.events:,} events to {cfg.topic} on {url}", file=sys.stderr)
    _, cfg.last_message_id = publish_story(url, cfg.topic, args.events, args.streams, 7)
    builds = {"before": args.before, "after": sys.executable}

    def rebuild(build: str, tag: str) -> tuple[float, float]:
        argv = [builds[build], "-m", "chainfold", "rebuild", cfg.topic, "-m", MODEL, "--full", "--snapshots",
                str(work / f"snapshots-{build}"), "--service-url", url, "--json", *args.extra]
        code, seconds, rss, out = whole_process(argv, work / f"{build}-{tag}.out")
        if code != 0 or json.loads(out)["applied"] != args.events:
            raise SystemExit(f"{build} rebuild failed ({code}): {out[-2000:]}")
        return seconds, rss

    for build in builds:
        rebuild(build, "warmup")
    rows = []
    for r in range(args.rounds):
        argv = [sys.executable, "-m", "chainfold.bench", "--step", "read_limit", "--config", json.dumps(asdict(cfg))]
        code, lim, lim_rss, out = whole_process(argv, work / f"read-{r}.out")
        if code != 0:
            raise SystemExit(f"read_limit failed: {out[-2000:]}")
        order = ("before", "after") if r % 2 == 0 else ("after", "before")
        got = {b: rebuild(b, str(r)) for b in order}
        row = {"round": r, "read_limit_s": round(lim, 2), "read_limit_rss_mb": round(lim_rss, 1)}
        for b in builds:
            row[f"{b}_s"], row[f"{b}_rss_mb"] = round(got[b][0], 2), round(got[b][1], 1)
            row[f"{b}_x_read_limit"] = round(lim / got[b][0], 3)
        row["after_over_before"] = round(got["after"][0] / got["before"][0], 3)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    summary = {k: statistics.median(row[k] for row in rows) for k in rows[0] if k != "round"}
    print(json.dumps({"events": args.events, "streams": args.streams, "service_url": url, "extra": args.extra,
                      "rounds": rows, "median": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

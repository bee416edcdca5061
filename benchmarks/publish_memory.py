"""Peak RSS of ``chainfold publish`` (whole processes) for events files of growing size.

    .venv/bin/python benchmarks/publish_memory.py [SERVICE_URL] [--events 1000000,10000000]
        [--before-src DIR] [--before-max 1000000] [--dir DIR] [--json]

For each N, an events file of the accounts story (1,000 streams, seed 7) is written to ``--dir``
(kept, so a rerun reuses it), then ``python -m chainfold publish TOPIC FILE`` runs under
``/usr/bin/time -f "%e %M"`` against the broker (SERVICE_URL or ``$CHAINFOLD_SERVICE_URL``) on a
fresh topic, with its snapshot store (the seq index) in a fresh folder. With ``--before-src DIR``
(the ``src`` folder of another checkout, e.g. ``git archive main src | tar -x -C /tmp/before``) the
same is measured with that code first, for N up to ``--before-max`` (the code before streaming
publish holds the whole file: ~1 GB per million events).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import uuid


def write_events(path: str, n: int) -> None:
    from chainfold.examples import accounts

    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for ev in accounts.iter_events(n, 1000, 7, 1_700_000_000_000):
            f.write(json.dumps(ev, separators=(",", ":")) + "\n")
    os.replace(tmp, path)


def publish(url: str, path: str, src: str | None) -> dict:
    env = {**os.environ, "CHAINFOLD_SERVICE_URL": url}
    if src:
        env["PYTHONPATH"] = src
    topic = f"publish-mem-{uuid.uuid4().hex[:10]}"
    with tempfile.TemporaryDirectory(prefix="chainfold-pubmem-") as work:
        r = subprocess.run(["/usr/bin/time", "-f", "%e %M", sys.executable, "-m", "chainfold", "publish", topic, path,
                            "--json"], capture_output=True, text=True, env=env, cwd=work)
    if r.returncode != 0:
        return {"error": r.stderr.strip()[-400:]}
    wall, kb = r.stderr.strip().splitlines()[-1].split()
    out = json.loads(r.stdout)
    return {"published": out["published"], "wall_seconds": float(wall), "peak_rss_mb": round(int(kb) / 1024),
            "events_per_s": round(out["published"] / float(wall))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("service_url", nargs="?", default=os.environ.get("CHAINFOLD_SERVICE_URL"))
    ap.add_argument("--events", default="1000000,10000000")
    ap.add_argument("--before-src")
    ap.add_argument("--before-max", type=int, default=1_000_000)
    ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "chainfold-publish-files"))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if not args.service_url:
        ap.error("give SERVICE_URL or set CHAINFOLD_SERVICE_URL")
    os.makedirs(args.dir, exist_ok=True)
    rows = []
    for n in [int(x) for x in args.events.split(",")]:
        path = os.path.join(args.dir, f"accounts-{n}.jsonl")
        if not os.path.exists(path):
            write_events(path, n)
        size_mb = round(os.path.getsize(path) / 2**20)
        runs = [("before", args.before_src)] if args.before_src and n <= args.before_max else []
        for label, src in runs + [("after", None)]:
            row = {"n": n, "file_mb": size_mb, "code": label, **publish(args.service_url, path, src)}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print("| N | file MB | code | peak RSS MB | wall s | events/s |")
        print("|---:|---:|---|---:|---:|---:|")
        for r in rows:
            if "error" in r:
                print(f"| {r['n']:,} | {r['file_mb']} | {r['code']} | error: {r['error'][:80]} | | |")
            else:
                print(f"| {r['n']:,} | {r['file_mb']:,} | {r['code']} | {r['peak_rss_mb']:,} | {r['wall_seconds']:.0f} "
                      f"| {r['events_per_s']:,} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

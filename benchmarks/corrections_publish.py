"""What exactly-once publishing of corrections costs as TOPIC2 grows (docs/corrections.md).

``--publish-corrections TOPIC2`` reads TOPIC2 whole (to skip keys already there) before sending.
This measures one publish of M new corrections to a TOPIC2 already holding N corrections, and the
rerun that finds all M there, each in its own process so peak RSS is the publish's own:

    python benchmarks/corrections_publish.py fill T2 --existing 200000      # builds TOPIC2 (not measured)
    /usr/bin/time -f "%e s %M KB" python benchmarks/corrections_publish.py publish T2 --new 2000

Broker: ``$CHAINFOLD_SERVICE_URL``, else the embedded broker of ``--data-dir``. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

from chainfold.log.broker import BrokerOptions
from chainfold.log.pulsar import open_log
from chainfold.ops.corrections import make_corrections, producer_name_for, publish_corrections


def corrections(source: str, n: int, start: int = 0) -> list[dict]:
    return make_corrections(source, ({"stream": f"acct-{i:07d}", "expected": {"balance": i + 5, "events": 3},
                                      "actual": {"balance": i, "events": 3}, "delta": {"balance": 5}}
                                     for i in range(start, start + n)))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("step", choices=("fill", "publish"))
    p.add_argument("topic2")
    p.add_argument("--existing", type=int, default=100_000)
    p.add_argument("--new", type=int, default=2000)
    p.add_argument("--data-dir", default=".chainfold-bench")
    a = p.parse_args()
    opts = BrokerOptions.from_env(data_dir=a.data_dir)
    if a.step == "fill":  # corrections of another source topic: a long-lived TOPIC2
        with open_log(a.topic2, opts, producer_name=producer_name_for("older-incidents")) as lg:
            t = time.monotonic()
            publish_corrections(lg, corrections("older-incidents", a.existing))
            print(json.dumps({"step": "fill", "existing": a.existing, "seconds": round(time.monotonic() - t, 2)}))
        return
    cs = corrections("bench-source", a.new)
    out = {"step": "publish", "new": a.new}
    for run in ("first", "rerun"):
        with open_log(a.topic2, opts, producer_name=producer_name_for("bench-source")) as lg:
            t = time.monotonic()
            rep = publish_corrections(lg, cs)
            out[run] = {"seconds": round(time.monotonic() - t, 3), "published": rep.published,
                        "already_published": rep.already_published}
    print(json.dumps(out))


if __name__ == "__main__":
    main()

"""What the Tracker costs a worker: events/s of a worker loop with and without it, side by side.

The loop is the handling of :class:`chainfold.worker.AccountsWorker` without the broker: decode the
payload, apply it to its account (``accounts.apply``), render the state; N real payloads (accounts
events, encoded as chainfold stores them). Variants, each run in every round, in rotating order
(rounds interleave so a shared machine's drift hits all alike; the median round is reported):

* ``no tracker``: the loop alone;
* ``count 1024``: + ``Tracker(flush_every=1024, flush_interval=None)``: flushes (and fsyncs) by
  count only, in the worker's thread (the Tracker before the time bound);
* ``count 1024 + 1 s``: + the time bound (the default: ``flush_interval=1.0``);
* ``1 s only``: ``flush_every`` huge, ``flush_interval=1.0``: every write in the flusher thread;
* ``+ states, times``: the default plus ``state=`` digests and ``handling_times`` (what
  :mod:`chainfold.worker` records for ``chainfold watch``).

A second measurement shows what the time bound buys: a worker that handles a burst and then goes
quiet; the seconds until its last event is on disk (readable by ``watch``), with and without it.

    python benchmarks/tracker_overhead.py [--events 100000] [--rounds 5]

Prints a table and one JSON line. Evidence goes to a temp dir on the default temp file system.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from chainfold.envelope import Event, decode, encode
from chainfold.examples import accounts
from chainfold.tracker import Tracker


def make_payloads(n: int) -> list[bytes]:
    seqs: dict[str, int] = {}
    out = []
    for d in accounts.generate(n, max(10, n // 200), seed=1):
        seqs[d["stream"]] = seqs.get(d["stream"], 0) + 1
        out.append(encode(Event(d["id"], d["stream"], seqs[d["stream"]], d["type"], d["time"], d["data"])))
    return out


def run_loop(payloads: list[bytes], tracker: Tracker | None, with_state: bool) -> tuple[float, float]:
    """Handle every payload; return (events per wall second, events per CPU second of the process,
    the flusher thread included); the tracker is closed, i.e. everything flushed, inside."""
    states: dict[str, Any] = {}
    t0, c0 = time.perf_counter(), time.process_time()
    for i, p in enumerate(payloads):
        ev = decode(p)
        st = states.get(ev.stream)
        if st is None:
            st = accounts.initial(ev.stream)
        try:
            new = accounts.apply(st, ev)
        except ValueError:
            continue
        rendered = states[ev.stream] = accounts.render(new)
        if tracker is not None:
            if with_state:
                tracker.handled(p, f"7:{i}:-1:-1", ev.id, state=rendered, stream=ev.stream)
            else:
                tracker.handled(p, f"7:{i}:-1:-1", ev.id)
    if tracker is not None:
        tracker.close()
    return len(payloads) / (time.perf_counter() - t0), len(payloads) / (time.process_time() - c0)


VARIANTS: dict[str, tuple[dict[str, Any] | None, bool]] = {
    "no tracker": (None, False),
    "count 1024": ({"flush_every": 1024, "flush_interval": None}, False),
    "count 1024 + 1 s": ({"flush_every": 1024, "flush_interval": 1.0}, False),
    "1 s only": ({"flush_every": 1 << 62, "flush_interval": 1.0}, False),
    "+ states, times": ({"flush_every": 1024, "flush_interval": 1.0, "handling_times": True}, True),
}


def visible_after_quiet(root: Path, flush_interval: float | None, burst: list[bytes], wait: float) -> float | None:
    """A worker handles ``burst`` and goes quiet: seconds until its last leaf is on disk (None: not
    within ``wait``)."""
    d = Path(tempfile.mkdtemp(dir=root))
    t = Tracker(d, flush_interval=flush_interval)
    for i, p in enumerate(burst):
        t.handled(p, f"7:{i}:-1:-1")
    t0 = time.monotonic()
    leaves = d / "checkpoints.leaves"
    try:
        while time.monotonic() - t0 < wait:
            if leaves.exists() and leaves.stat().st_size == 32 * len(burst):
                return time.monotonic() - t0
            time.sleep(0.005)
        return None
    finally:
        t.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    payloads = make_payloads(a.events)
    rates: dict[str, list[float]] = {k: [] for k in VARIANTS}
    cpu: dict[str, list[float]] = {k: [] for k in VARIANTS}
    names = list(VARIANTS)
    with tempfile.TemporaryDirectory(prefix="chainfold-tracker-bench-") as tmp:
        root = Path(tmp)
        run_loop(payloads[:5000], None, False)  # warm-up
        for r in range(a.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                kw, with_state = VARIANTS[name]
                tracker = Tracker(tempfile.mkdtemp(dir=root), **kw) if kw is not None else None
                wall, per_cpu = run_loop(payloads, tracker, with_state)
                rates[name].append(wall)
                cpu[name].append(per_cpu)
        quiet = {label: visible_after_quiet(root, fi, payloads[:300], 5.0)
                 for label, fi in (("count 1024 (no time bound)", None), ("count 1024 + 1 s", 1.0))}
    base = statistics.median(rates["no tracker"])
    cbase = statistics.median(cpu["no tracker"])
    print(f"worker loop over {a.events:,} accounts events, {a.rounds} interleaved rounds (median); "
          "wall events/s, and events per CPU second of the process (flusher thread included):")
    result: dict[str, Any] = {"events": a.events, "rounds": a.rounds, "variants": {}}
    for name in names:
        med, cmed = statistics.median(rates[name]), statistics.median(cpu[name])
        print(f"  {name:<18} {med:>9,.0f}/s {med / base:5.2f}x   CPU: {cmed:>9,.0f}/s {cmed / cbase:5.2f}x "
              f"{(1 / cmed - 1 / cbase) * 1e6:+6.1f} us/event")
        result["variants"][name] = {"events_per_s": round(med), "ratio": round(med / base, 3),
                                    "events_per_cpu_s": round(cmed), "cpu_ratio": round(cmed / cbase, 3),
                                    "cpu_us_per_event_added": round((1 / cmed - 1 / cbase) * 1e6, 2),
                                    "rounds": [round(x) for x in rates[name]]}
    print("a burst of 300 events, then quiet: seconds until the last one is on disk")
    for label, secs in quiet.items():
        print(f"  {label:<27} {'not within 5 s' if secs is None else f'{secs:.2f} s'}")
    result["visible_after_quiet_s"] = quiet
    print(json.dumps(result))


if __name__ == "__main__":
    main()

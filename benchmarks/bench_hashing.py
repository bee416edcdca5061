"""Hashing cost on the hot path: ChainBuilder.add per event vs a bare SHA-256 loop, same payloads, same run.

    PYTHONPATH=src python benchmarks/bench_hashing.py [--n 1000000] [--size 80] [--repeat 3] [--json]

Each loop runs ``--repeat`` times, interleaved, and the best time counts. The ratio says how many
bare SHA-256 calls one ``ChainBuilder.add`` costs; about 2 is the floor (a leaf hash plus, on
average, one node hash per entry).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time

from chainfold.hashing.chain import ChainBuilder
from chainfold.merkle import CompactRange, leaf_hash


def bare_sha256(payloads: list[bytes]) -> None:
    sha = hashlib.sha256
    for p in payloads:
        sha(p).digest()


def leaf_hashes(payloads: list[bytes]) -> None:
    for p in payloads:
        leaf_hash(p)


def chain_add(payloads: list[bytes]) -> None:
    add = ChainBuilder(1024).add
    for p in payloads:
        add(p)


def compact_append(leaves: list[bytes]) -> None:
    append = CompactRange().append
    for h in leaves:
        append(h)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--size", type=int, default=80)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", action="store_true", help="machine-readable result on stdout")
    args = ap.parse_args(argv)

    payloads = [os.urandom(args.size) for _ in range(args.n)]
    leaves = [leaf_hash(p) for p in payloads]
    cases = {
        "bare_sha256": (bare_sha256, payloads),
        "leaf_hash": (leaf_hashes, payloads),
        "chain_add": (chain_add, payloads),
        "compact_append": (compact_append, leaves),
    }
    best = {name: float("inf") for name in cases}
    for _ in range(args.repeat):
        for name, (fn, data) in cases.items():
            t = time.perf_counter()
            fn(data)
            best[name] = min(best[name], time.perf_counter() - t)
    rates = {name: args.n / t for name, t in best.items()}
    result = {
        "n": args.n,
        "payload_bytes": args.size,
        "python": platform.python_version(),
        "per_second": {k: round(v) for k, v in rates.items()},
        "chain_add_cost_in_bare_sha256": round(rates["bare_sha256"] / rates["chain_add"], 2),
    }
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        for name, r in rates.items():
            print(f"{name:>16}: {r:>12,.0f} /s   ({1e9 / r:6.0f} ns each)")
        ratio = result["chain_add_cost_in_bare_sha256"]
        print(f"ChainBuilder.add costs {ratio}x a bare sha256(payload).digest()")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

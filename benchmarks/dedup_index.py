"""Exact dedup of event ids at scale: today's ``set`` against the two measured alternatives.

    python benchmarks/dedup_index.py compare --n 1000000 --n 10000000      # the RESULTS.md table
    python benchmarks/dedup_index.py run --impl pieces --n 1000000         # one run, JSON on stdout

Every run is its own process under ``/usr/bin/time -f "%e %M"`` (peak RSS of the whole process), one
after the other in one ``compare`` invocation, so ratios are side by side. The workload: N distinct
random-text ids (12-32 characters of base64 from a keyed mix of the index: no structure to exploit)
plus a share ``--dup`` of duplicates drawn uniformly from all ids seen so far (the worst case for a
spilled index: most duplicates are old), fed in batches of ``--batch``; a checkpoint every
``--checkpoint-every`` distinct ids; at the end a last checkpoint, close, and a timed reopen.

Implementations (``--impl``):

* ``none``: the workload alone (generation, no index): the harness's own time and memory.
* ``set``: today's Python ``set``; a checkpoint writes every id sorted as CBOR, as snapshot format 1
  does (temp file, fsync, rename); reopen loads them back into a set.
* ``pieces``: :class:`chainfold.replay.dedup.DedupIndex` (sorted runs + binary fuse filters, pieces
  named by SHA-256).
* ``rocksdb``: RocksDB through ``rocksdict`` (bloom filters 10 bits/key, 8 MiB block cache, 16 MiB
  memtables, WAL off): ``multi_get`` then a write batch per batch; a checkpoint flushes the memtable,
  makes a RocksDB checkpoint (hard links) and SHA-256-hashes the SST files it has not hashed before
  (what content-addressed pieces would need); reopen opens the last checkpoint.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

IMPLS = ("none", "set", "pieces", "rocksdb")


# --- workload ----------------------------------------------------------------------------------------


def _splitmix(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def ids_of(index: np.ndarray, seed: int = 7) -> list[str]:
    """The id of each index: 12-32 characters of base64 of 24 mixed bytes (deterministic)."""
    x = index.astype(np.uint64) * np.uint64(3) + np.uint64(seed << 40)
    a, b, c = _splitmix(x), _splitmix(x + np.uint64(1)), _splitmix(x + np.uint64(2))
    raw = np.stack([a, b, c], axis=1).tobytes()
    text = base64.b64encode(raw).decode("ascii")
    lengths = (12 + a % np.uint64(21)).tolist()
    return [text[32 * k: 32 * k + n] for k, n in enumerate(lengths)]


def batches(n: int, batch: int, dup: float, seed: int = 1):
    """Yield (ids, distinct ids so far) until ``n`` distinct ids were produced."""
    rng = np.random.default_rng(seed)
    fresh = 0
    while fresh < n:
        is_dup = rng.random(batch) < dup
        if fresh == 0:
            is_dup[:] = False
        new = np.flatnonzero(~is_dup)
        new = new[: n - fresh]
        size = int(new[-1]) + 1 if new.size else batch
        index = np.empty(size, dtype=np.uint64)
        index[new] = np.arange(fresh, fresh + new.size, dtype=np.uint64)
        old = np.setdiff1d(np.arange(size), new)
        index[old] = rng.integers(0, fresh + np.searchsorted(new, old), dtype=np.uint64) if old.size else 0
        fresh += new.size
        yield ids_of(index), fresh


# --- implementations ---------------------------------------------------------------------------------


class SetImpl:
    def __init__(self, directory: Path) -> None:
        import cbor2

        from chainfold.store.atomic import atomic_write
        self.cbor2, self.atomic_write = cbor2, atomic_write
        self.dir, self.seen = directory, set()

    def add_new(self, ids: list[str]) -> list[bool]:
        seen, out = self.seen, []
        for s in ids:
            if s in seen:
                out.append(False)
            else:
                seen.add(s)
                out.append(True)
        return out

    def checkpoint(self) -> Any:
        self.atomic_write(self.dir / "seen.cbor", self.cbor2.dumps(sorted(self.seen)))
        return None

    def reopen(self, manifest: Any) -> int:
        self.seen = set()
        self.seen = set(self.cbor2.loads((self.dir / "seen.cbor").read_bytes()))
        return len(self.seen)

    def disk_bytes(self) -> int:
        return (self.dir / "seen.cbor").stat().st_size


class PiecesImpl:
    def __init__(self, directory: Path, memory_bytes: int) -> None:
        from chainfold.replay.dedup import DedupIndex
        self.cls, self.dir, self.memory_bytes = DedupIndex, directory, memory_bytes
        self.ix = DedupIndex.open(directory, memory_bytes=memory_bytes)
        self.kept: list[Any] = []

    def add_new(self, ids: list[str]) -> list[bool]:
        return self.ix.add_new(ids)

    def checkpoint(self) -> Any:
        m = self.ix.checkpoint()
        self.kept = (self.kept + [m])[-3:]  # a store keeping the newest 3 snapshots
        self.ix.collect_garbage(self.kept)
        return m

    def reopen(self, manifest: Any) -> int:
        self.ix.close()
        self.ix = self.cls.open(self.dir, manifest, memory_bytes=self.memory_bytes)
        return len(self.ix)

    def disk_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.dir.iterdir())

    def stats(self) -> dict[str, int]:
        return self.ix.stats


class RocksImpl:
    def __init__(self, directory: Path) -> None:
        import rocksdict as r
        self.r, self.dir = r, directory
        opt = r.Options(raw_mode=True)
        opt.create_if_missing(True)
        bbo = r.BlockBasedOptions()
        bbo.set_bloom_filter(10, False)
        bbo.set_block_cache(r.Cache(8 << 20))
        opt.set_block_based_table_factory(bbo)
        opt.set_write_buffer_size(16 << 20)
        opt.set_max_write_buffer_number(2)
        self.opt = opt
        self.db = r.Rdict(str(directory / "db"), opt)
        wo = r.WriteOptions()
        wo.disable_wal = True
        self.db.set_write_options(wo)
        self.hashed: set[str] = set()
        self.n = 0

    def add_new(self, ids: list[str]) -> list[bool]:
        enc = [s.encode("utf-8", "surrogatepass") for s in ids]
        got = self.db.get(enc)
        wb = self.r.WriteBatch(raw_mode=True)
        out, batch = [], set()
        for k, v in zip(enc, got):
            if v is None and k not in batch:
                batch.add(k)
                wb.put(k, b"")
                out.append(True)
            else:
                out.append(False)
        self.db.write(wb)
        return out

    def checkpoint(self) -> Any:
        self.db.flush()
        self.n += 1
        path = self.dir / f"cp{self.n}"
        self.r.Checkpoint(self.db).create_checkpoint(str(path))
        for f in self.db.live_files():
            name = f["name"].lstrip("/")
            if name not in self.hashed:
                with open(self.dir / "db" / name, "rb") as fh:
                    hashlib.file_digest(fh, "sha256")
                self.hashed.add(name)
        old = self.dir / f"cp{self.n - 3}"
        if old.exists():
            shutil.rmtree(old)
        return str(path)

    def reopen(self, manifest: Any) -> int:
        self.db.close()
        self.db = self.r.Rdict(manifest, self.opt)
        return int(self.db.property_int_value("rocksdb.estimate-num-keys") or 0)

    def disk_bytes(self) -> int:
        return sum(f["size"] for f in self.db.live_files())


def _peak_rss_mb() -> int:
    """The process's peak resident memory so far (VmHWM), in MB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) // 1024 for line in f if line.startswith("VmHWM:"))


# --- one run -----------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    directory = Path(tempfile.mkdtemp(prefix="dedup-bench-", dir=args.dir))
    try:
        impl: Any = {"none": lambda: None, "set": lambda: SetImpl(directory),
                     "pieces": lambda: PiecesImpl(directory, args.memory_mb << 20),
                     "rocksdb": lambda: RocksImpl(directory)}[args.impl]()
        add_s = 0.0
        events = new = 0
        cps: list[float] = []
        cp_at = args.checkpoint_every
        manifest = None
        for ids, fresh in batches(args.n, args.batch, args.dup):
            events += len(ids)
            if impl is None:
                continue
            t = time.perf_counter()
            got = impl.add_new(ids)
            add_s += time.perf_counter() - t
            new += sum(got)
            if cp_at and fresh >= cp_at:
                t = time.perf_counter()
                manifest = impl.checkpoint()
                cps.append(time.perf_counter() - t)
                cp_at += args.checkpoint_every
        out: dict[str, Any] = {"impl": args.impl, "n": args.n, "events": events}
        if impl is None:
            return out
        hwm_fed = _peak_rss_mb()
        t = time.perf_counter()
        manifest = impl.checkpoint()
        final_cp = time.perf_counter() - t
        disk = impl.disk_bytes()
        t = time.perf_counter()
        reopened = impl.reopen(manifest)
        reopen_s = time.perf_counter() - t
        k = max(1, len(cps) // 10)
        out.update({
            "new": new, "add_s": round(add_s, 2), "us_per_event": round(add_s / events * 1e6, 3),
            "checkpoints": len(cps), "cp_first_ms": round(1e3 * sum(cps[:k]) / k, 1) if cps else None,
            "cp_last_ms": round(1e3 * sum(cps[-k:]) / k, 1) if cps else None,
            "cp_max_ms": round(1e3 * max(cps), 1) if cps else None,
            "cp_total_s": round(sum(cps), 2), "final_cp_s": round(final_cp, 2),
            "reopen_s": round(reopen_s, 3), "reopened": reopened,
            "disk_bytes_per_id": round(disk / new, 1), "peak_rss_fed_mb": hwm_fed,
        })
        if isinstance(impl, PiecesImpl):
            out["stats"] = impl.stats()
        return out
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# --- comparison --------------------------------------------------------------------------------------


def compare(args: argparse.Namespace) -> None:
    rows = []
    for n in args.n:
        for impl in args.impl:
            cmd = ["/usr/bin/time", "-f", "TIME %e %M", sys.executable, __file__, "run", "--impl", impl,
                   "--n", str(n), "--batch", str(args.batch), "--dup", str(args.dup),
                   "--checkpoint-every", str(args.checkpoint_every), "--memory-mb", str(args.memory_mb)]
            if args.dir:
                cmd += ["--dir", args.dir]
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode:
                sys.stderr.write(p.stderr)
                raise SystemExit(f"{impl} at {n}: exit {p.returncode}")
            row = json.loads(p.stdout.strip().splitlines()[-1])
            wall, rss = next(line for line in p.stderr.splitlines() if line.startswith("TIME ")).split()[1:]
            row.update(wall_s=float(wall), peak_rss_mb=round(int(rss) / 1024))
            print(json.dumps(row), file=sys.stderr, flush=True)
            rows.append(row)
    cols = ["impl", "n", "us_per_event", "peak_rss_mb", "cp_first_ms", "cp_last_ms", "cp_max_ms",
            "cp_total_s", "reopen_s", "disk_bytes_per_id", "wall_s"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join("" if r.get(c) is None else str(r.get(c)) for c in cols) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("run", "compare"):
        p = sub.add_parser(name)
        if name == "run":
            p.add_argument("--impl", choices=IMPLS, required=True)
            p.add_argument("--n", type=int, required=True)
        else:
            p.add_argument("--impl", choices=IMPLS, action="append")
            p.add_argument("--n", type=int, action="append", required=True)
        p.add_argument("--batch", type=int, default=1000)
        p.add_argument("--dup", type=float, default=0.1, help="share of events that repeat an earlier id")
        p.add_argument("--checkpoint-every", type=int, default=100_000, help="distinct ids; 0: none")
        p.add_argument("--memory-mb", type=int, default=32, help="pieces: bound of the in-memory part")
        p.add_argument("--dir", default=None, help="where the indexes go (default: the temp folder)")
    args = ap.parse_args()
    if args.cmd == "run":
        print(json.dumps(run(args)))
    else:
        args.impl = args.impl or list(IMPLS)
        compare(args)


if __name__ == "__main__":
    main()

"""Reconcile's comparison of a processed log with the reference, without a broker: the handling join
(ops/reference_join.py) against the SQLite index-probe queries it replaced, side by side, per N.

    python benchmarks/reconcile_join.py --n 1000000,3000000

For each N: a reference of N events (ids as the accounts story names them, in log order) and a
correct worker's processed log (the same ids, in the same order). "sqlite" is what reconcile did
before (the processed log as an indexed table beside the reference; the walk in handling order with
one index probe per handling, and the NOT EXISTS queries for missing / unknown ids); "join" is
:class:`chainfold.ops.reference_join.HandlingJoin` plus the walk of its annotations. Both start
from the reference already in SQLite (what the reference pass leaves) and end when every result has
been read. Each method runs in a process of its own (peak RSS = its ru_maxrss), alternating.
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_OLD_QUERIES = {
    "missing": "SELECT r.id FROM ref r WHERE NOT EXISTS (SELECT 1 FROM proc p WHERE p.id = r.id) ORDER BY r.rowid",
    "twice": "SELECT id FROM proc GROUP BY id HAVING count(*) > 1",
    "unknown": "SELECT p.line, p.id FROM proc p WHERE NOT EXISTS (SELECT 1 FROM ref r WHERE r.id = p.id) ORDER BY p.rowid",
    "handlings": "SELECT coalesce(r.pi, -1), coalesce(r.j, -1), coalesce(r.sno, -1), p.id, "
                 "p.rowid = (SELECT min(q.rowid) FROM proc q WHERE q.id = p.id) "
                 "FROM proc p LEFT JOIN ref r ON r.id = p.id ORDER BY p.rowid",
}


def _ids(n: int):
    return (f"evt-7-{i + 1}" for i in range(n))


def one(method: str, n: int) -> dict:
    from chainfold.ops.reference import ReferenceDB
    from chainfold.ops.reference_join import HandlingJoin

    with tempfile.TemporaryDirectory(prefix="chainfold-joinbench-") as d:
        db = ReferenceDB(Path(d))
        rows = ((eid, 0, i, i, i % 1000) for i, eid in enumerate(_ids(n)))
        while batch := list(itertools.islice(rows, 20_000)):
            db.add(batch)
        db.seal()
        t0 = time.perf_counter()
        if method == "sqlite":
            db.db.execute("CREATE TABLE proc (id TEXT NOT NULL, line INTEGER NOT NULL)")
            db.db.execute("BEGIN")
            db.db.executemany("INSERT INTO proc VALUES (?, ?)", ((eid, i + 1) for i, eid in enumerate(_ids(n))))
            db.db.execute("COMMIT")
            db.db.execute("CREATE INDEX proc_id ON proc(id)")
            rows = sum(sum(1 for _ in db.db.execute(sql)) for sql in _OLD_QUERIES.values())
        else:
            join = HandlingJoin(Path(d) / "join", db.ids_and_streams(), n,
                                ((eid, i + 1) for i, eid in enumerate(_ids(n))), n)
            rows = sum(1 for _ in join.annotations()) + len(join.missing) + len(join.unknown) + len(join.twice)
            join.close()
        seconds = time.perf_counter() - t0
        db.close()
    return {"method": method, "n": n, "seconds": round(seconds, 2), "rows": rows,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", default="1000000,3000000", help="sizes, comma-separated")
    ap.add_argument("--methods", default="sqlite,join")
    ap.add_argument("--one", nargs=2, metavar=("METHOD", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]))))
        return
    for n in (int(x) for x in args.n.split(",")):
        for method in args.methods.split(","):
            out = subprocess.run([sys.executable, __file__, "--one", method, str(n)], check=True,
                                 capture_output=True, text=True).stdout
            print(out.strip(), flush=True)


if __name__ == "__main__":
    main()

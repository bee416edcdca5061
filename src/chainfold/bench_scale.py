"""``chainfold bench --scale N1,N2,...``: what each command costs as the history grows, as whole processes.

For each N (same streams, the accounts story), one topic of N events is built on the broker (not
measured), then each step runs as the command a user types, in a process of its own: its wall
time from start to exit (imports, connecting, loading snapshots included) and its peak resident
memory (``ru_maxrss`` of the process, as ``/usr/bin/time`` reports it):

``read_limit``                 a bare pulsar-client read loop over the topic (the ceiling)
``verify``                     ``chainfold verify`` (records the topic's checkpoints)
``rebuild_full``               ``chainfold rebuild --full`` with the default periodic snapshots
``rebuild_full_no_snapshots``  ``chainfold rebuild --full --no-snapshots`` (also writes the state export)
``rebuild_from_snapshot``      ``chainfold rebuild`` from a snapshot covering 90% of N (made beforehand,
                               not measured): the last 10% folded
``reconcile_processed``        ``chainfold reconcile --processed`` of a correct worker's processed log
                               and state export (``consistent``)
``publish``                    ``chainfold publish`` of an N-event JSON Lines file to a new topic

The report's targets are the history-scale ones (issue 11): peak memory at the largest N at most
1.5 x at the smallest; periodic snapshots at most 1.15 x no snapshots; a rebuild from the 90%
snapshot at most 0.15 x a full one.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .bench import MODEL, BenchConfig, BenchFailed, machine, new_config, publish_story, story

__all__ = ["SCALE_STEPS", "ScaleStep", "ScaleReport", "run_scale", "write_files"]

SCALE_STEPS = ("read_limit", "verify", "rebuild_full", "rebuild_full_no_snapshots", "rebuild_from_snapshot",
               "reconcile_processed", "publish")
SNAPSHOT_FRACTION = 0.9

Progress = Callable[[str], None]


@dataclass
class ScaleStep:
    """One command, run as a whole process: wall seconds, peak RSS, events it went through."""

    name: str
    events: int
    seconds: float
    peak_rss_mb: float
    command: str
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "events": self.events, "seconds": round(self.seconds, 3),
                "peak_rss_mb": round(self.peak_rss_mb, 1),
                "events_per_s": round(self.events / self.seconds, 1) if self.seconds > 0 else 0.0,
                "command": self.command, **self.extra}


def whole_process(argv: list[str], out: Path, env: dict[str, str] | None = None) -> tuple[int, float, float, str]:
    """Run ``argv`` to its end: (exit code, wall seconds, peak RSS MB, stdout). Stdout and stderr go
    to files beside ``out`` (so nothing blocks on a pipe); the peak is the process's ``ru_maxrss``."""
    err = out.with_suffix(".stderr")
    with open(out, "wb") as fo, open(err, "wb") as fe:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=fo, stderr=fe, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
    return proc.returncode, seconds, usage.ru_maxrss / 1024, out.read_text(errors="replace")


def write_files(n: int, k: int, seed: int, events_file: Path, processed_file: Path) -> None:
    """The story as a JSON Lines file ``publish`` reads, and a correct worker's processed log
    (each event id once, in log order), written as generated (nothing held)."""
    with open(events_file, "w") as ev, open(processed_file, "w") as pr:
        for d in story(n, k, seed):
            ev.write(json.dumps({"id": d["id"], "stream": d["stream"], "type": d["type"], "data": d["data"],
                                 "time": d["time"]}, separators=(",", ":")) + "\n")
            pr.write(json.dumps({"id": d["id"]}) + "\n")


@dataclass
class _Run:
    """One N: its topic, files and the commands' common arguments."""

    cfg: BenchConfig
    results: list[ScaleStep] = field(default_factory=list)

    @property
    def dir(self) -> Path:
        return Path(self.cfg.workdir)

    def cli(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "chainfold", *args, "--service-url", self.cfg.service_url, "--json"]

    def step(self, name: str, argv: list[str], events: int, check: Callable[[dict[str, Any]], str | None],
             ok_codes: tuple[int, ...] = (0,)) -> ScaleStep:
        code, seconds, rss, out = whole_process(argv, self.dir / f"{name}.out")
        doc = _last_json(out)
        if code not in ok_codes or doc is None:
            err = (self.dir / f"{name}.stderr").read_text(errors="replace")[-3000:]
            raise BenchFailed(f"{name} exited {code}: {out[-1500:]} {err}")
        why = check(doc)
        if why:
            raise BenchFailed(f"{name}: {why}")
        shown = " ".join(a for a in argv[2:] if not a.startswith(str(self.dir)))
        result = ScaleStep(name, events, seconds, rss, shown)
        self.results.append(result)
        return result


def _last_json(out: str) -> dict[str, Any] | None:
    for line in reversed(out.strip().splitlines()):
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if isinstance(doc, dict):
            return doc
    try:
        doc = json.loads(out)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def _setup(run: _Run, progress: Progress) -> dict[str, float]:
    cfg = run.cfg
    progress(f"N={cfg.events:,}: building the topic {cfg.topic} and the files (not measured)")
    run.dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    write_files(cfg.events, cfg.streams, cfg.seed, run.dir / "events.jsonl", run.dir / "processed.jsonl")
    files = time.perf_counter() - t0
    seconds, last = publish_story(cfg.service_url, cfg.topic, cfg.events, cfg.streams, cfg.seed)
    cfg.last_message_id = last
    return {"publish_story": round(seconds, 2), "files": round(files, 2)}


def _snapshot_at(run: _Run, at: int) -> None:
    """Leave one snapshot, covering ``at`` entries (not measured)."""
    from .store.snapshots import SnapshotStore

    snaps = run.cfg.snapshots
    for info in SnapshotStore(snaps, run.cfg.topic).list():  # earlier steps' (they would outrank it)
        info.path.unlink()
    code, _, _, out = whole_process(run.cli("rebuild", run.cfg.topic, "-m", MODEL, "--full", "--snapshots", snaps,
                                            "--snapshot-every", str(at), "--keep", "2"),
                                    run.dir / "prepare_snapshot.out")
    if code != 0:
        raise BenchFailed(f"preparing the {at}-entry snapshot failed: {out[-1500:]}")
    store = SnapshotStore(snaps, run.cfg.topic, keep=2)
    for info in store.list():
        if info.entries != at:
            info.path.unlink()
    if [info.entries for info in store.list()] != [at]:
        raise BenchFailed(f"expected one snapshot at {at} entries")


def _measure(run: _Run, steps: tuple[str, ...], progress: Progress) -> None:
    cfg, n = run.cfg, run.cfg.events
    snaps, topic = cfg.snapshots, cfg.topic
    state = str(run.dir / "state.json")

    def applied_all(doc: dict[str, Any]) -> str | None:
        return None if doc.get("applied") == n else f"folded {doc.get('applied')} of {n} events"

    for name in steps:
        progress(f"N={n:,}: {name}")
        if name == "read_limit":
            run.step(name, [sys.executable, "-m", "chainfold.bench", "--step", "read_limit", "--config",
                            json.dumps(asdict(cfg))], n,
                     lambda d: None if d.get("events") == n else f"read {d.get('events')}")
        elif name == "verify":
            run.step(name, run.cli("verify", topic, "--snapshots", snaps), n,
                     lambda d: None if d.get("verdict") == "intact" else f"verdict {d.get('verdict')}")
        elif name == "rebuild_full":
            run.step(name, run.cli("rebuild", topic, "-m", MODEL, "--full", "--snapshots", snaps), n, applied_all)
        elif name == "rebuild_full_no_snapshots":
            run.step(name, run.cli("rebuild", topic, "-m", MODEL, "--full", "--no-snapshots", "--snapshots", snaps,
                                   "--out", state), n, applied_all)
        elif name == "rebuild_from_snapshot":
            at = max(1, int(n * SNAPSHOT_FRACTION))
            _snapshot_at(run, at)
            run.step(name, run.cli("rebuild", topic, "-m", MODEL, "--snapshots", snaps), n - at,
                     lambda d: None if (d.get("replayed") or {}).get("from_snapshot") == at
                     else f"did not start from the {at}-entry snapshot: {d.get('rejected_snapshots')}")
        elif name == "reconcile_processed":
            if not Path(state).exists():
                raise BenchFailed("reconcile_processed needs the state export of rebuild_full_no_snapshots")
            run.step(name, run.cli("reconcile", topic, "-m", MODEL, "--state", state, "--processed",
                                   str(run.dir / "processed.jsonl"), "--snapshots", snaps), n,
                     lambda d: None if d.get("verdict") == "consistent" else f"verdict {d.get('verdict')}")
        elif name == "publish":
            run.step(name, run.cli("publish", f"{topic}-published", str(run.dir / "events.jsonl")), n,
                     lambda d: None)


@dataclass
class ScaleReport:
    """A ``chainfold bench --scale`` run: ``to_json()`` is its ``--json`` document."""

    sizes: tuple[int, ...]
    streams: int
    service_url: str
    rows: list[dict[str, Any]] = field(default_factory=list)

    def _at(self, n: int, name: str) -> dict[str, Any] | None:
        row = next((r for r in self.rows if r["events"] == n), None)
        return next((s for s in row["results"] if s["name"] == name), None) if row else None

    def targets(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if len(self.rows) >= 2:
            lo, hi = self.rows[0]["events"], self.rows[-1]["events"]
            for name in SCALE_STEPS:
                a, b = self._at(lo, name), self._at(hi, name)
                if a and b and name != "read_limit":
                    v = b["peak_rss_mb"] / a["peak_rss_mb"]
                    out.append({"target": f"{name}: peak RSS at {hi:,} <= 1.5 x at {lo:,}", "value": round(v, 2),
                                "threshold": 1.5, "met": v <= 1.5})
        for row in self.rows:
            n = row["events"]
            full, bare, tail = (self._at(n, s) for s in ("rebuild_full", "rebuild_full_no_snapshots",
                                                         "rebuild_from_snapshot"))
            if full and bare:
                v = full["seconds"] / bare["seconds"]
                out.append({"target": f"N={n:,}: rebuild --full <= 1.15 x --no-snapshots", "value": round(v, 3),
                            "threshold": 1.15, "met": v <= 1.15})
            if full and tail:
                v = tail["seconds"] / full["seconds"]
                out.append({"target": f"N={n:,}: rebuild from a 90% snapshot <= 0.15 x rebuild --full",
                            "value": round(v, 3), "threshold": 0.15, "met": v <= 0.15})
        return out

    def to_json(self) -> dict[str, Any]:
        return {"scale": self.rows, "streams": self.streams, "targets": self.targets(), "machine": machine(),
                "measured_as": "whole processes: wall seconds from start to exit, peak RSS = ru_maxrss"}


def run_scale(sizes: tuple[int, ...], streams: int, seed: int, service_url: str, workdir: str, *,
              steps: tuple[str, ...] = SCALE_STEPS, keep_files: bool = False,
              progress: Progress = lambda s: None) -> ScaleReport:
    """Each step of ``steps`` at each N of ``sizes`` (see the module doc). Each N's topic and files
    are made in ``workdir/nN`` and removed after it (unless ``keep_files``)."""
    report = ScaleReport(tuple(sizes), streams, service_url)
    for n in sizes:
        cfg = new_config(n, streams, seed, service_url, os.path.join(workdir, f"n{n}"))
        run = _Run(cfg)
        setup = _setup(run, progress)
        try:
            _measure(run, steps, progress)
        finally:
            report.rows.append({"events": n, "topic": cfg.topic, "setup_seconds": setup,
                                "results": [r.to_json() for r in run.results]})
            if not keep_files:
                shutil.rmtree(run.dir, ignore_errors=True)
    return report

"""Replay throughput, side by side with the read limit and with the eventsourcing library.

:func:`run_bench` builds one topic of the accounts story (:mod:`chainfold.examples.accounts`) on a
broker, the same story in an ``eventsourcing`` application with SQLite persistence, and a snapshot
covering 90% of the topic; then it measures, one after another, each step in its own process (so
peak memory is the step's own, ``VmHWM`` of that process and of its workers):

``read_limit``             a bare pulsar-client read loop over the topic, no decoding: the ceiling
``verify``                 hashes only (:func:`chainfold.ops.verify.verify_log`)
``rebuild``                decode + hash + fold, the whole log (:func:`chainfold.ops.rebuild.rebuild`,
                           ``full=True``, no snapshot written)
``rebuild_from_snapshot``  the same from the snapshot: the last 10% only
``eventsourcing``          ``app.repository.get(id)`` for every account of an eventsourcing
                           ``Application`` (default settings, ``eventsourcing.sqlite`` in a file)

Each step's ``events`` is the number of events it processed (the tail for
``rebuild_from_snapshot``), ``seconds`` the time of the measured call only (not the process start,
imports or connecting), ``events_per_s`` their ratio. Building the data is not measured.

:func:`run_parallel` repeats ``rebuild`` and ``verify`` with several worker counts; how the costs
grow with the history (``--scale``) is :mod:`chainfold.bench_scale`.

``python -m chainfold.bench --step NAME --config JSON`` runs one step (what the parent starts).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import BadInput, ChainfoldError
from .examples import accounts

__all__ = [
    "STEPS",
    "BenchConfig",
    "StepResult",
    "BenchReport",
    "story",
    "run_bench",
    "run_parallel",
    "peak_rss_mb",
]

class BenchFailed(ChainfoldError):
    """A bench step did not do what it measures (wrong count, no snapshot, a step process failed)."""


STEPS = ("read_limit", "verify", "rebuild", "rebuild_from_snapshot", "eventsourcing")
MODEL = "chainfold.examples.accounts"
SNAPSHOT_FRACTION = 0.9
_MB = 1024 * 1024


def peak_rss_mb() -> float:
    """Peak resident memory of this process, MB (``VmHWM``)."""
    from .engines.pool import peak_rss

    return peak_rss() / _MB


# --- the data --------------------------------------------------------------------------------------


def story(n_events: int, n_streams: int, seed: int, start_time_ms: int = 1_700_000_000_000) -> Iterator[dict[str, Any]]:
    """:func:`chainfold.examples.accounts.generate`, one event at a time (so 10M events fit)."""
    return accounts.iter_events(n_events, n_streams, seed, start_time_ms)


def publish_story(service_url: str, topic: str, n: int, k: int, seed: int, chunk: int = 20_000) -> tuple[float, str]:
    """Append the story to a fresh topic, ``seq`` per stream, keyed by stream; (seconds, last message id)."""
    from .log.broker import BrokerOptions
    from .envelope import Event, encode
    from .log.pulsar import open_log

    t0 = time.perf_counter()
    seqs: dict[str, int] = {}
    last = ""
    with open_log(topic, BrokerOptions(service_url=service_url)) as elog:
        batch: list[tuple[bytes, str | None, int | None]] = []
        for d in story(n, k, seed):
            s = d["stream"]
            q = seqs[s] = seqs.get(s, 0) + 1
            batch.append((encode(Event(d["id"], s, q, d["type"], d["time"], d["data"])), s, d["time"]))
            if len(batch) >= chunk:
                last = str(elog.append_payloads(batch)[-1])
                batch = []
        if batch:
            last = str(elog.append_payloads(batch)[-1])
    return time.perf_counter() - t0, last


def es_app(db: str) -> Any:
    """The eventsourcing application of the bench: default settings, SQLite persistence in ``db``."""
    from eventsourcing.application import Application

    return Application(env={"PERSISTENCE_MODULE": "eventsourcing.sqlite", "SQLITE_DBNAME": db})


def write_es_story(db: str, n: int, k: int, seed: int, chunk: int = 1000) -> float:
    """The same story told through ``BankAccount`` commands, saved into :func:`es_app` (as
    :func:`chainfold.examples.es_accounts.generate_events` tells it, every ``chunk`` events)."""
    from datetime import timedelta

    from .examples.es_accounts import _EPOCH, BankAccount, account_number, fixed_clock

    t0 = time.perf_counter()
    app = es_app(db)
    live: dict[str, Any] = {}
    touched: dict[int, Any] = {}
    now = [_EPOCH]
    with fixed_clock(lambda: now[0]):
        for i, d in enumerate(story(n, k, seed)):
            now[0] = _EPOCH + timedelta(milliseconds=d["time"], microseconds=i % 1000)
            etype, data, stream = d["type"], d["data"], d["stream"]
            if etype == "Opened":
                acct = live[stream] = BankAccount(number=account_number(stream, seed), owner=data["owner"],
                                                  currency=data.get("currency", "EUR"))
            else:
                acct = live[stream]
                if etype == "Deposited":
                    acct.deposit(data["amount"])
                elif etype == "Withdrawn":
                    acct.withdraw(data["amount"])
                elif etype == "FeeCharged":
                    acct.charge_fee(data["amount"])
                else:
                    acct.close()
            touched[id(acct)] = acct
            if len(touched) >= chunk or (i + 1) % chunk == 0:
                app.save(*touched.values())
                touched.clear()
    if touched:
        app.save(*touched.values())
    return time.perf_counter() - t0


def es_ids(k: int, seed: int) -> list[Any]:
    """The aggregate ids of the story's accounts (every stream opens an account)."""
    from .examples.es_accounts import BankAccount, account_number

    width = max(4, len(str(k)))
    return [BankAccount.create_id(account_number(f"acct-{i + 1:0{width}d}", seed)) for i in range(k)]


def prepare_snapshot(service_url: str, topic: str, snapshots: str, n: int) -> int:
    """Record the topic's checkpoints and leave one snapshot, at ``SNAPSHOT_FRACTION`` of it."""
    from .log.broker import BrokerOptions
    from .replay.model import load_model
    from .log.pulsar import open_log
    from .ops.rebuild import rebuild
    from .store.snapshots import SnapshotStore

    at = max(1, int(n * SNAPSHOT_FRACTION))
    with open_log(topic, BrokerOptions(service_url=service_url)) as elog:
        rebuild(elog, load_model(MODEL), snapshots_root=Path(snapshots), full=True, snapshot_every=at, keep=10)
        store = SnapshotStore(snapshots, elog.topic, keep=10)
        for info in store.list():
            if info.entries != at:
                info.path.unlink()
        if [info.entries for info in store.list()] != [at]:
            raise BenchFailed(f"expected one snapshot at {at} entries")
    return at


# --- steps, each in its own process ---------------------------------------------------------------


@dataclass
class BenchConfig:
    """What every step needs to know (sent to the step processes as JSON)."""

    events: int = 200_000
    streams: int = 1000
    seed: int = 7
    service_url: str = ""
    topic: str = ""
    workdir: str = ""
    workers: int = 1
    last_message_id: str = ""
    snapshot_entries: int = 0

    @property
    def snapshots(self) -> str:
        return os.path.join(self.workdir, "snapshots")

    @property
    def es_db(self) -> str:
        return os.path.join(self.workdir, "eventsourcing.sqlite")


@dataclass
class StepResult:
    """One measured step."""

    name: str
    events: int
    seconds: float
    peak_rss_mb: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "events_per_s": round(self.events_per_s, 1), "seconds": round(self.seconds, 4),
                "peak_rss_mb": round(self.peak_rss_mb, 1), "events": self.events, **self.extra}


def _step_read_limit(cfg: BenchConfig) -> StepResult:
    import _pulsar
    import pulsar

    from .log.broker import client_logger
    from .log import MessageId
    from .log.pulsar import _RECEIVER_QUEUE

    client = pulsar.Client(cfg.service_url, logger=client_logger(), io_threads=1)
    last = MessageId.parse(cfg.last_message_id)
    end = pulsar.MessageId(last.partition, last.ledger, last.entry, last.batch)._msg_id
    t0 = time.perf_counter()
    reader = client.create_reader(cfg.topic, pulsar.MessageId.earliest, receiver_queue_size=_RECEIVER_QUEUE)
    read_next = reader._reader.read_next
    received = 0
    while True:  # until the last message id published, payload bytes touched, nothing decoded
        try:
            m = read_next(5000)
        except _pulsar.Timeout:
            raise BenchFailed(f"read_limit: nothing for 5 s after {received} messages") from None
        m.data()
        received += 1
        if m.message_id() >= end:
            break
    seconds = time.perf_counter() - t0
    reader.close()
    return StepResult("read_limit", cfg.events, seconds, peak_rss_mb(), {"messages_received": received})


def _open(cfg: BenchConfig) -> Any:
    from .log.broker import BrokerOptions
    from .log.pulsar import open_log

    return open_log(cfg.topic, BrokerOptions(service_url=cfg.service_url))


def _source(cfg: BenchConfig) -> Any:
    from .log.broker import BrokerOptions
    from .engines.parallel import PulsarSource

    return PulsarSource(cfg.topic, BrokerOptions(service_url=cfg.service_url))


def _with_workers(r: StepResult, workers: int, peaks: list[int]) -> StepResult:
    r.extra["workers"] = workers
    if peaks:  # the parent's own peak plus every worker's
        r.extra["peak_rss_mb_parent"] = round(r.peak_rss_mb, 1)
        r.peak_rss_mb += sum(peaks) / _MB
    return r


def _step_verify(cfg: BenchConfig, name: str = "verify") -> StepResult:
    from .engines.parallel import parallel_verify
    from .store.snapshots import topic_dir
    from .ops.verify import verify_log

    snaps = Path(cfg.snapshots)
    with _open(cfg) as elog:
        tdir = topic_dir(snaps, elog.topic)
        t0 = time.perf_counter()
        if cfg.workers > 1:
            report = parallel_verify(_source(cfg), record_dir=tdir, workers=cfg.workers, snapshots_root=snaps)
        else:
            report = verify_log(elog, record_dir=tdir, snapshots_root=snaps)
        seconds = time.perf_counter() - t0
    doc = report.to_json()
    if doc["verdict"] != "intact":
        raise BenchFailed(f"verify: {doc['first_mismatch']}")
    r = StepResult(name, doc["log"]["events"], seconds, peak_rss_mb())
    return _with_workers(r, report.workers, report.worker_peak_rss)


def _step_rebuild(cfg: BenchConfig, name: str = "rebuild", full: bool = True) -> StepResult:
    from .replay.model import load_model
    from .engines.parallel import parallel_rebuild
    from .ops.rebuild import rebuild

    snaps = Path(cfg.snapshots)
    with _open(cfg) as elog:
        model = load_model(MODEL)
        t0 = time.perf_counter()
        if cfg.workers > 1:
            result = parallel_rebuild(_source(cfg), MODEL, workers=cfg.workers, snapshots_root=snaps, full=full,
                                      write_snapshots=False)
        else:
            result = rebuild(elog, model, snapshots_root=snaps, full=full, write_snapshots=False)
        seconds = time.perf_counter() - t0
    doc = result.to_json()
    events = doc["replayed"]["events"]
    if full and (doc["applied"] != cfg.events or events != cfg.events):
        raise BenchFailed(f"rebuild folded {doc['applied']} of {cfg.events} events")
    if not full and doc["replayed"]["from_snapshot"] != cfg.snapshot_entries:
        raise BenchFailed(f"rebuild did not start from the snapshot: {doc['rejected_snapshots']}")
    r = StepResult(name, events, seconds, peak_rss_mb(),
                   {"from_snapshot": doc["replayed"]["from_snapshot"], "notes": doc["notes"]} if not full else {})
    return _with_workers(r, result.workers, result.worker_peak_rss)


def _step_eventsourcing(cfg: BenchConfig) -> StepResult:
    app = es_app(cfg.es_db)
    ids = es_ids(cfg.streams, cfg.seed) if cfg.events >= cfg.streams else es_ids(cfg.events, cfg.seed)
    get = app.repository.get
    t0 = time.perf_counter()
    events = 0
    for aggregate_id in ids:
        events += get(aggregate_id).version
    seconds = time.perf_counter() - t0
    if events != cfg.events:
        raise BenchFailed(f"eventsourcing rebuilt {events} of {cfg.events} events")
    return StepResult("eventsourcing", events, seconds, peak_rss_mb(), {"aggregates": len(ids)})


def run_step_here(name: str, cfg: BenchConfig) -> StepResult:
    """Run one step in this process."""
    if name == "read_limit":
        return _step_read_limit(cfg)
    if name == "verify" or name.startswith("verify_w"):
        return _step_verify(cfg, name)
    if name == "rebuild" or name.startswith("rebuild_w"):
        return _step_rebuild(cfg, name)
    if name == "rebuild_from_snapshot":
        return _step_rebuild(cfg, name, full=False)
    if name == "eventsourcing":
        return _step_eventsourcing(cfg)
    if name == "setup_topic":
        seconds, last = publish_story(cfg.service_url, cfg.topic, cfg.events, cfg.streams, cfg.seed)
        at = prepare_snapshot(cfg.service_url, cfg.topic, cfg.snapshots, cfg.events)
        return StepResult(name, cfg.events, seconds, peak_rss_mb(), {"last_message_id": last, "snapshot_entries": at})
    if name == "setup_eventsourcing":
        seconds = write_es_story(cfg.es_db, cfg.events, cfg.streams, cfg.seed)
        return StepResult(name, cfg.events, seconds, peak_rss_mb())
    raise BadInput(f"no bench step {name!r}")


def _start_step(name: str, cfg: BenchConfig) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "chainfold.bench", "--step", name, "--config", json.dumps(asdict(cfg))],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _finish_step(name: str, proc: subprocess.Popen[str]) -> StepResult:
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise BenchFailed(f"bench step {name} failed (exit {proc.returncode}):\n{err.strip()[-3000:]}")
    d = json.loads(out.strip().splitlines()[-1])
    return StepResult(d.pop("name"), d.pop("events"), d.pop("seconds"), d.pop("peak_rss_mb"),
                      {k: v for k, v in d.items() if k != "events_per_s"})


def run_step(name: str, cfg: BenchConfig) -> StepResult:
    """Run one step in a process of its own."""
    return _finish_step(name, _start_step(name, cfg))


# --- runs ------------------------------------------------------------------------------------------


@dataclass
class BenchReport:
    """One ``chainfold bench`` run: ``to_json()`` is the ``--json`` document."""

    config: BenchConfig
    results: list[StepResult] = field(default_factory=list)
    setup: dict[str, float] = field(default_factory=dict)
    parallel: list[dict[str, Any]] = field(default_factory=list)

    def get(self, name: str) -> StepResult | None:
        return next((r for r in self.results if r.name == name), None)

    def targets(self) -> list[dict[str, Any]]:
        """The issue's targets that this run can check: value, threshold, met."""
        out: list[dict[str, Any]] = []
        rb, lim, es = self.get("rebuild"), self.get("read_limit"), self.get("eventsourcing")
        if rb and lim and lim.events_per_s:
            v = rb.events_per_s / lim.events_per_s
            out.append({"target": "rebuild >= 0.5 x read_limit", "value": round(v, 3), "threshold": 0.5, "met": v >= 0.5})
        if rb and es and es.events_per_s:
            v = rb.events_per_s / es.events_per_s
            out.append({"target": "rebuild >= 5 x eventsourcing", "value": round(v, 2), "threshold": 5, "met": v >= 5})
        for row in self.parallel:
            if row["workers"] == 2 and row.get("rebuild_speedup") is not None:
                v = row["rebuild_speedup"]
                out.append({"target": "rebuild, 2 workers >= 1.6 x 1 worker", "value": v, "threshold": 1.6,
                            "met": v >= 1.6})
        return out

    def to_json(self) -> dict[str, Any]:
        cfg = self.config
        doc: dict[str, Any] = {
            "events": cfg.events,
            "streams": cfg.streams,
            "results": [r.to_json() for r in self.results],
        }
        if self.parallel:
            doc["parallel"] = self.parallel
        doc["targets"] = self.targets()
        doc["setup_seconds"] = {k: round(v, 2) for k, v in self.setup.items()}
        doc["machine"] = machine()
        return doc


def machine() -> dict[str, Any]:
    """Where the numbers come from."""
    from importlib.metadata import PackageNotFoundError, version

    def v(dist: str) -> str:
        try:
            return version(dist)
        except PackageNotFoundError:
            return "?"

    return {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform(),
            "pulsar_client": v("pulsar-client"), "pulsar_lite": v("pulsar-lite"), "cbor2": v("cbor2"),
            "eventsourcing": v("eventsourcing")}


Progress = Callable[[str], None]


def _setup(cfg: BenchConfig, report: BenchReport, progress: Progress, eventsourcing: bool) -> None:
    progress(f"building {cfg.events:,} events over {cfg.streams:,} streams on {cfg.topic}"
             + (" and in eventsourcing (SQLite)" if eventsourcing else ""))
    topic = _start_step("setup_topic", cfg)
    es = _start_step("setup_eventsourcing", cfg) if eventsourcing else None
    t = _finish_step("setup_topic", topic)
    cfg.last_message_id = t.extra["last_message_id"]
    cfg.snapshot_entries = t.extra["snapshot_entries"]
    report.setup["publish"] = t.seconds
    if es is not None:
        report.setup["eventsourcing_write"] = _finish_step("setup_eventsourcing", es).seconds


def new_config(events: int, streams: int, seed: int, service_url: str, workdir: str, workers: int = 1) -> BenchConfig:
    return BenchConfig(events=events, streams=streams, seed=seed, service_url=service_url,
                       topic=f"bench-{events}-{uuid.uuid4().hex[:8]}", workdir=workdir, workers=workers)


def run_bench(cfg: BenchConfig, *, steps: tuple[str, ...] = STEPS, parallel: tuple[int, ...] = (),
              progress: Progress = lambda s: None) -> BenchReport:
    """Build the data, then measure ``steps`` (and rebuild/verify with each worker count in ``parallel``)."""
    report = BenchReport(cfg)
    Path(cfg.workdir).mkdir(parents=True, exist_ok=True)
    _setup(cfg, report, progress, "eventsourcing" in steps)
    for name in steps:
        progress(f"measuring {name}")
        report.results.append(run_step(name, cfg))
    if parallel:  # speed-ups relative to the first worker count (1 first, normally)
        base: dict[str, float] = {}
        for w in parallel:
            row: dict[str, Any] = {"workers": w}
            for what in ("rebuild", "verify"):
                progress(f"measuring {what} with {w} worker(s)")
                r = run_step(f"{what}_w{w}", BenchConfig(**{**asdict(cfg), "workers": w}))
                report.results.append(r)
                row[what] = r.to_json()
                base.setdefault(what, r.events_per_s)
                row[f"{what}_speedup"] = round(r.events_per_s / base[what], 2) if base[what] else None
            report.parallel.append(row)
    return report


def run_parallel(cfg: BenchConfig, workers: tuple[int, ...], progress: Progress = lambda s: None) -> BenchReport:
    """Only ``rebuild`` and ``verify`` for each worker count (same topic)."""
    return run_bench(cfg, steps=(), parallel=workers, progress=progress)


def _main(argv: list[str]) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m chainfold.bench", description="one bench step (internal)")
    ap.add_argument("--step", required=True)
    ap.add_argument("--config", required=True)
    args = ap.parse_args(argv)
    cfg = BenchConfig(**json.loads(args.config))
    result = run_step_here(args.step, cfg)
    sys.stdout.write(json.dumps(result.to_json()) + "\n")
    from .log.broker import exit_process

    exit_process(0)


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))

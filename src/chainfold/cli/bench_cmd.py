"""``chainfold bench``: replay throughput beside the read limit and the eventsourcing library."""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

import click
from rich.table import Table

from ..bench import STEPS, BenchReport, new_config, run_bench
from ..bench_scale import SCALE_STEPS, ScaleReport, run_scale
from .common import broker_options, cli, emit_json, esc, json_option, run, stderr, stdout


def _ints(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, ...]:
    if not value:
        return ()
    try:
        out = tuple(int(v.replace("_", "")) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter("a comma-separated list of integers") from None
    if not out or any(v < 1 for v in out):
        raise click.BadParameter("integers >= 1")
    return out


def _steps(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[str, ...]:
    if not value:
        return ()
    names = tuple(v.strip() for v in value.split(",") if v.strip())
    known = STEPS + tuple(s for s in SCALE_STEPS if s not in STEPS)
    bad = [n for n in names if n not in known]
    if bad:
        raise click.BadParameter(f"unknown step(s) {', '.join(bad)}; steps are {', '.join(STEPS)} "
                                 f"(with --scale: {', '.join(SCALE_STEPS)})")
    return names


@cli.command()
@click.option("--events", "-n", type=click.IntRange(min=1), default=200_000, show_default=True,
              help="Events in the topic (N = 1000000 takes a few minutes, mostly building the data).")
@click.option("--streams", "-k", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Streams (accounts) the events are spread over.")
@click.option("--seed", type=int, default=7, show_default=True, help="Seed of the accounts story.")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Worker processes for the verify and rebuild steps.")
@click.option("--steps", callback=_steps, metavar="A,B,...",
              help=f"Only these steps ({', '.join(STEPS)}; with --scale: {', '.join(SCALE_STEPS)}).")
@click.option("--parallel", callback=_ints, metavar="W1,W2,...",
              help="Also measure rebuild and verify with each worker count (e.g. 1,2,4) and the speed-ups.")
@click.option("--scale", callback=_ints, metavar="N1,N2,...",
              help="Instead: each command as a whole process at each N (e.g. 1000000,10000000): wall time and "
                   "peak memory of read_limit, verify, rebuild --full (with and without snapshots), rebuild "
                   "from a 90%% snapshot, reconcile --processed and publish. Takes long: minutes per million.")
@click.option("--keep", "keep_dir", type=click.Path(file_okay=False), metavar="DIR",
              help="Keep snapshots and the eventsourcing database here (default: a temporary folder, removed).")
@broker_options
@json_option
def bench(events: int, streams: int, seed: int, workers: int, steps: tuple[str, ...], parallel: tuple[int, ...],
          scale: tuple[int, ...], keep_dir: str | None, broker, as_json: bool) -> None:
    """Measure replay throughput in events/s, each step in its own process on one topic built on the
    broker (the embedded one by default): read_limit (a bare pulsar-client read loop, the ceiling),
    verify (hashes), rebuild (decode + hash + fold), rebuild_from_snapshot (the last 10%) and
    eventsourcing (the eventsourcing library rebuilding the same accounts from SQLite), with the peak
    memory of each. The topic stays on the broker.

    With --scale, how each command's cost grows with the history: at each N, the commands a user
    types, each timed and measured (peak RSS) as a whole process."""

    def body() -> int:
        from ..log.broker import read_ahead_limit, resolve_url

        url = resolve_url(broker)  # the embedded broker stays up for the whole run
        limit = read_ahead_limit(broker)  # the steps get the URL: keep the embedded broker's read bound
        os.environ["CHAINFOLD_READ_AHEAD"] = str(limit or 0)
        workdir = keep_dir or tempfile.mkdtemp(prefix="chainfold-bench-")

        def progress(msg: str) -> None:
            stderr.print(f"[dim]bench:[/] {esc(msg)}", markup=True, highlight=False)

        report: BenchReport | ScaleReport
        try:
            if scale:
                bad = [s for s in steps if s not in SCALE_STEPS]
                if bad:
                    raise click.BadParameter(f"not a --scale step: {', '.join(bad)}", param_hint="--steps")
                report = run_scale(scale, streams, seed, url, workdir, steps=steps or SCALE_STEPS,
                                   keep_files=keep_dir is not None, progress=progress)
            else:
                bad = [s for s in steps if s not in STEPS]
                if bad:
                    raise click.BadParameter(f"a --scale step only: {', '.join(bad)}", param_hint="--steps")
                cfg = new_config(events, streams, seed, url, workdir, workers)
                report = run_bench(cfg, steps=steps or STEPS, parallel=parallel, progress=progress)
        finally:
            if keep_dir is None:
                shutil.rmtree(workdir, ignore_errors=True)
        if as_json:
            emit_json(report.to_json())
        elif isinstance(report, ScaleReport):
            print_scale(report)
        else:
            print_report(report)
        return 0

    run(body, as_json=as_json)


def _rate(v: float) -> str:
    return f"{v:,.0f}"


def _table(title: str, results: list[dict[str, Any]]) -> Table:
    lim = next((r for r in results if r["name"] == "read_limit"), None)
    t = Table(title=title, title_justify="left")
    for col in ("step", "events", "events/s", "seconds", "peak RSS MB", "x read_limit"):
        t.add_column(col, justify="left" if col == "step" else "right")
    for r in results:
        ratio = f"{r['events_per_s'] / lim['events_per_s']:.2f}" if lim and lim["events_per_s"] else ""
        name = r["name"] + (f" ({r['workers']} workers)" if r.get("workers", 1) > 1 else "")
        t.add_row(name, f"{r['events']:,}", _rate(r["events_per_s"]), f"{r['seconds']:.3f}",
                  f"{r['peak_rss_mb']:.0f}", ratio)
    return t


def print_report(report: BenchReport) -> None:
    doc = report.to_json()
    if doc.get("results"):
        stdout.print(_table(f"{doc['events']:,} events, {doc['streams']:,} streams", doc["results"]))
    if doc.get("parallel"):
        t = Table(title="parallel", title_justify="left")
        for col in ("workers", "rebuild events/s", "speed-up", "verify events/s", "speed-up"):
            t.add_column(col, justify="right")
        for row in doc["parallel"]:
            t.add_row(str(row["workers"]), _rate(row["rebuild"]["events_per_s"]), f"{row['rebuild_speedup']:.2f}",
                      _rate(row["verify"]["events_per_s"]), f"{row['verify_speedup']:.2f}")
        stdout.print(t)
    _print_targets(doc, f"setup (not measured): {doc['setup_seconds']}")


def print_scale(report: ScaleReport) -> None:
    doc = report.to_json()
    rows = doc["scale"]
    for row in rows:
        stdout.print(_scale_table(row))
    if len(rows) > 1:
        t = Table(title="peak RSS MB (whole processes)", title_justify="left")
        t.add_column("step")
        for row in rows:
            t.add_column(f"N = {row['events']:,}", justify="right")
        for name in SCALE_STEPS:
            cells = [next((f"{r['peak_rss_mb']:.0f}" for r in row["results"] if r["name"] == name), "-")
                     for row in rows]
            if any(c != "-" for c in cells):
                t.add_row(name, *cells)
        stdout.print(t)
    _print_targets(doc, doc["measured_as"])


def _print_targets(doc: dict, how: str) -> None:
    """Each target met or missed, then the machine and ``how`` it was measured."""
    for tg in doc["targets"]:
        mark = "[green]met[/]" if tg["met"] else "[red]missed[/]"
        stdout.print(f"{mark}  {esc(tg['target'])}: {esc(tg['value'])}")
    m = doc["machine"]
    stdout.print(f"[dim]{m['cpus']} CPUs, Python {m['python']}, pulsar-client {m['pulsar_client']}; {how}[/]")


def _scale_table(row: dict[str, Any]) -> Table:
    results = row["results"]
    lim = next((r for r in results if r["name"] == "read_limit"), None)
    t = Table(title=f"N = {row['events']:,} (whole processes)", title_justify="left")
    for col in ("step", "events", "seconds", "events/s", "peak RSS MB", "x read_limit"):
        t.add_column(col, justify="left" if col == "step" else "right")
    for r in results:
        ratio = f"{r['events_per_s'] / lim['events_per_s']:.2f}" if lim and lim["events_per_s"] else ""
        t.add_row(r["name"], f"{r['events']:,}", f"{r['seconds']:.1f}", _rate(r["events_per_s"]),
                  f"{r['peak_rss_mb']:.0f}", ratio)
    return t

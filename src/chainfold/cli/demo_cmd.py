"""``chainfold demo``: the whole recovery story on the embedded broker (see :mod:`chainfold.demo`)."""

from __future__ import annotations

import dataclasses
import random
import tempfile
from collections.abc import Callable
from pathlib import Path

import click
from click.core import ParameterSource
from rich.console import Console
from rich.padding import Padding
from rich.text import Text

from ..demo import run_demo
from ..demo_live import FAULTS, LIVE_EVENTS, run_live_demo
from .common import broker_options, cli, emit_json, esc, json_option, run, stderr, stdout
from .reconcile_view import print_reconcile


@cli.command()
@click.option("--events", type=click.IntRange(min=100), default=20_000, show_default=True,
              help="Account events to publish.")
@click.option("--streams", type=click.IntRange(min=1), default=200, show_default=True, help="Accounts.")
@click.option("--seed", type=int, help="Seed of the generated events (default: random, printed).")
@click.option("--workdir", type=click.Path(file_okay=False), metavar="DIR",
              help="Where the worker's state, evidence, repaired state and snapshots go "
                   "(default: a fresh temporary directory, printed).")
@click.option("--live", is_flag=True, help=f"Instead: watch catching the worker's fault as it happens (events "
              f"published at --rate; {LIVE_EVENTS:,} unless --events is given).")
@click.option("--fault", type=click.Choice(FAULTS), default="mishandle", show_default=True,
              help="With --live: the worker's fault.")
@click.option("--rate", type=click.FloatRange(min=1), default=500.0, show_default=True,
              help="With --live: events published per second.")
@broker_options
@json_option
def demo(events: int, streams: int, seed: int | None, workdir: str | None, live: bool, fault: str, rate: float,
         broker, as_json: bool) -> None:
    """The whole recovery story: publish account events (with malformed and duplicated entries), run
    a real worker that skips, mishandles and crashes before acking, detect what it got wrong with
    reconcile, repair the divergent accounts, and validate the repair against a fresh rebuild.
    With --live: chainfold watch follows the topic and the worker's evidence while events are
    published and names the worker's fault within seconds of it.

    Exit 0 when repaired and validated (--live: the fault named exactly within 10 s), else 1. With
    --json, stdout holds only the report (the repair's reconcile report; --live: the demo's result
    and watch's divergence line); the story goes to stderr."""
    ctx = click.get_current_context()

    def body() -> int:
        console = stderr if as_json else stdout
        wd = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="chainfold-demo-"))
        opts = broker
        if not opts.service_url and ctx.get_parameter_source("data_dir") in (ParameterSource.DEFAULT, None):
            opts = dataclasses.replace(opts, data_dir=str(wd / ".chainfold"))  # self-contained by default
        s = seed if seed is not None else random.randrange(1, 1_000_000)
        narrate = _narrator(console)
        narrate(f"chainfold demo: workdir {esc(wd)}, seed {s}"
                + ("" if opts.service_url else f", embedded broker in {esc(Path(opts.data_dir).absolute())}"))
        if live:
            n = events if ctx.get_parameter_source("events") not in (ParameterSource.DEFAULT, None) else LIVE_EVENTS
            doc = run_live_demo(events=n, streams=streams, rate=rate, fault=fault, seed=s, workdir=wd, broker=opts,
                                narrate=narrate)
            if as_json:
                emit_json(doc)
            return 0 if doc["demo"]["ok"] else 1
        doc = run_demo(events=events, streams=streams, seed=s, workdir=wd, broker=opts, narrate=narrate)
        if as_json:
            emit_json(doc)
        else:
            stdout.print()
            print_reconcile(doc)
        return 0 if doc["demo"]["ok"] else 1

    run(body, as_json=as_json)


def _narrator(console: Console) -> Callable[[str], None]:
    """Print narration (rich markup) wrapped to the console's width, continuation lines indented
    like the first one, so the story reads well in any terminal."""

    def narrate(text: str) -> None:
        body = text.lstrip(" ")
        indent = len(text) - len(body)
        console.print(Padding(Text.from_markup(body, emoji=False), (0, 0, 0, indent), expand=False), soft_wrap=False)

    return narrate

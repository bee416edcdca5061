"""``chainfold snapshots``: list a topic's snapshots with their validity, or inspect one file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from rich import box
from rich.table import Table

from ..errors import BadInput
from ..replay.model import load_model
from ..store.snapshots import SnapshotStore
from .common import cli, emit_json, esc, json_option, run, snapshots_option, stdout


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit[0]}"
        n /= 1024  # type: ignore[assignment]
    return str(n)  # pragma: no cover


def _validity(s: dict[str, Any]) -> str:
    return "[green]valid[/]" if s["valid"] else f"[red]rejected[/]: {esc(s['reason'])}"


def _print_list(store: SnapshotStore, summaries: list[dict[str, Any]], with_model: bool) -> None:
    if not summaries:
        stdout.print(esc(f"no snapshots of {store.topic} in {store.dir}"))
        return
    table = Table(title=esc(f"snapshots of {store.topic} in {store.dir}, newest first"), title_justify="left",
                  box=box.SIMPLE_HEAD, pad_edge=False)
    width = max(len(Path(s["path"]).name) for s in summaries)
    table.add_column("file", no_wrap=True, min_width=width)
    table.add_column("entries", justify="right", no_wrap=True)
    table.add_column("streams", justify="right", no_wrap=True)
    table.add_column("size", justify="right", no_wrap=True)
    table.add_column("status", no_wrap=True)
    reasons = []
    for s in summaries:
        name = Path(s["path"]).name
        if s["valid"]:
            status = "[green]valid[/]"
        elif with_model and s.get("fingerprint") and not s.get("model_matches") and _intact(s):
            status = "[yellow]other model[/]"
            reasons.append((name, s["reason"]))
        else:
            status = "[red]rejected[/]"
            reasons.append((name, s["reason"]))
        table.add_row(
            esc(name),
            f"{s['entries']:,}" if isinstance(s.get("entries"), int) else "-",
            f"{s['streams']:,}" if isinstance(s.get("streams"), int) else "-",
            _size(s.get("size_bytes")),
            status,
        )
    stdout.print(table)
    for name, reason in reasons:
        stdout.print(esc(f"  {name}: {reason}"), soft_wrap=True)


def _intact(s: dict[str, Any]) -> bool:
    """Rejected only for its model (the file itself is fine)."""
    return str(s.get("reason") or "").startswith("taken with other model code")


def _value(v: Any) -> str:
    """A summary value for people: numbers with separators, mappings as ``key value, ...``."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, dict):
        return ", ".join(f"{k} {_value(x)}" for k, x in v.items()) or "-"
    if isinstance(v, (list, tuple)):
        return ", ".join(_value(x) for x in v) or "-"
    return str(v)


def _print_one(s: dict[str, Any]) -> None:
    table = Table(show_header=False, title=esc(s["path"]), title_justify="left", box=box.SIMPLE, pad_edge=False)
    table.add_column("key", style="bold", no_wrap=True)
    table.add_column("value", overflow="fold")
    shown = {"path", "partitions", "valid", "reason"}
    for key in ("topic", "entries", "streams", "seen", "created", "size_bytes", "model", "fingerprint",
                "model_matches", "segment_size", "streams_root", "stats"):
        if key in s:
            shown.add(key)
            table.add_row(key.replace("_", " "), esc(_value(s[key])))
    shown.add("created_ms")
    for p in s.get("partitions") or []:
        table.add_row("partition", esc(_value(p.get("partition"))))
        for key, v in p.items():
            if key != "partition":
                table.add_row("  " + key.replace("_", " ").replace("message id", "last message id"),
                              esc(_value(v)))
    for key, v in s.items():  # anything newer versions add
        if key not in shown:
            table.add_row(key.replace("_", " "), esc(_value(v)))
    table.add_row("validity", _validity(s))
    stdout.print(table)


@cli.command("snapshots")
@click.argument("topic")
@snapshots_option
@json_option
@click.option("--model", "model_ref", metavar="M", help="Also tell whether each snapshot was taken with "
              "this model's code (package.module:attribute or path/to/file.py:attribute).")
@click.option("--inspect", "inspect_file", metavar="FILE",
              help="Describe one snapshot file (a path, or a file name in TOPIC's snapshot folder).")
def snapshots(topic: str, snapshots_dir: str, as_json: bool, model_ref: str | None,
              inspect_file: str | None) -> None:
    """List TOPIC's snapshots, newest (most entries covered) first, each checked: readable, intact
    (checksum and streams root), of this topic and, with --model, of this model's code.

    A table for people goes to stdout; --json writes the list (or, with --inspect, the one summary)
    to stdout. Exit 0, or with --inspect 1 when the file is rejected, 2 when it does not exist.
    """

    def body() -> int:
        store = SnapshotStore(snapshots_dir, topic)
        model = load_model(model_ref) if model_ref else None
        if inspect_file is not None:
            path = Path(inspect_file)
            if not path.exists() and (store.dir / inspect_file).exists():
                path = store.dir / inspect_file
            if not path.is_file():
                raise BadInput(f"no snapshot file {inspect_file} (looked in . and {store.dir})")
            summary = store.inspect(path, model=model)
            if as_json:
                emit_json(summary)
            else:
                _print_one(summary)
            return 0 if summary["valid"] else 1
        summaries = [store.inspect(info.path, model=model) for info in store.list()]
        if as_json:
            emit_json({"topic": store.topic, "dir": str(store.dir), "snapshots": summaries})
        else:
            _print_list(store, summaries, model is not None)
        return 0

    run(body, as_json=as_json)

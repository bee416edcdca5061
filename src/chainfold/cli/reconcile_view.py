"""The reconcile report for people, in a terminal: verdict, faults, and divergent streams field by
field (``balance: 120 → 95 (-25)``), sized to the terminal (a 100-column one shows it unwrapped)."""

from __future__ import annotations

from typing import Any

from rich import box
from rich.table import Table

from ..statediff import field_diffs, format_change
from .common import esc, print_history, stdout

__all__ = ["print_reconcile", "STREAMS_SHOWN", "FIELDS_SHOWN"]

STREAMS_SHOWN = 10
FIELDS_SHOWN = 4

# report lists shown in the faults table: key, label (other list keys a newer report adds are counted too)
_FAULTS = (
    ("missing", "missed"),
    ("duplicates", "duplicated"),
    ("out_of_order", "out of order"),
    ("malformed", "malformed entries"),
    ("unknown_ids", "unknown event ids"),
    ("unknown_streams", "unknown streams"),
    ("skipped", "skipped by the model"),
)


def _example(item: Any) -> str:
    if isinstance(item, dict):
        return str(item.get("event_id") or item.get("stream") or item.get("message_id") or item)
    return str(item)


def _examples(items: list[Any], width: int) -> str:
    out: list[str] = []
    used = 0
    for it in items:
        text = _example(it)
        if out and used + len(text) + 2 > width - 2:
            break
        out.append(text)
        used += len(text) + 2
    more = len(items) - len(out)
    return esc(", ".join(out) + (f" … +{more}" if more else ""))


def _faults_table(doc: dict[str, Any], width: int) -> Table | None:
    rows = [(label, doc[key]) for key, label in _FAULTS if isinstance(doc.get(key), list)]
    if not any(items for _, items in rows):
        return None
    t = Table(title="faults", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    t.add_column("kind", no_wrap=True)
    t.add_column("count", justify="right", no_wrap=True)
    t.add_column("first ones", no_wrap=True, overflow="ellipsis")
    room = max(20, width - 40)
    for label, items in rows:
        if items:
            t.add_row(label, f"{len(items):,}", _examples(items, room))
    return t


def _changes(d: dict[str, Any], width: int) -> str:
    """The changed fields, packed into lines of ``width``, broken only between fields."""
    diffs = field_diffs(d.get("expected"), d.get("actual"), only_changed=True)
    parts = [format_change(x, width=max(12, width // 3)) for x in diffs[:FIELDS_SHOWN]]
    if len(diffs) > FIELDS_SHOWN:
        parts.append(f"… {len(diffs) - FIELDS_SHOWN} more field(s)")
    lines: list[str] = []
    for p in parts:
        if lines and len(lines[-1]) + 2 + len(p) <= width:
            lines[-1] += "; " + p
        else:
            lines.append(p)
    return esc("\n".join(lines) or "(equal when rendered)")


def _streams_table(ds: list[dict[str, Any]], width: int) -> Table:
    t = Table(title=f"divergent streams ({len(ds):,}): field: expected → worker's (difference)",
              title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, show_lines=False)
    name_w = min(max(16, width // 3), max(6, *(len(str(d.get("stream"))) for d in ds[:STREAMS_SHOWN])))
    t.add_column("stream", overflow="fold", max_width=name_w)  # whole ids, folded if long: people copy them
    t.add_column("differences", overflow="fold")
    for d in ds[:STREAMS_SHOWN]:
        t.add_row(esc(d.get("stream")), _changes(d, width - name_w - 4))
    return t


def _say(text: str) -> None:
    stdout.print(text, soft_wrap=False)  # prose wraps at the terminal's width


def print_reconcile(doc: dict[str, Any]) -> None:
    """Print a reconcile report (its JSON form) for people, on stdout."""
    width = stdout.width
    colour = {"consistent": "green", "repaired": "green"}.get(doc["verdict"], "bold red")
    lg = doc.get("log") or {}
    events = lg.get("events")
    handled = doc["processed"]["events"]
    _say(f"[{colour}]{esc(doc['verdict']).upper()}[/] {esc(doc.get('topic', ''))}: "
         + (f"{events:,} log entries, " if isinstance(events, int) else "")
         + (f"{handled:,} handled by the worker" if isinstance(handled, int)
            else "events handled by the worker unknown (no --processed or --checkpoints)"))
    if doc.get("error"):
        _say(f"[bold red]error:[/] {esc(doc['error'])}")
    fd = doc.get("first_divergence")
    if fd:
        idx = fd["index"]
        _say(f"first divergence: entry {idx:,} (segment {fd['segment']}), event "
                     f"{esc(fd.get('event_id') or '-')}, message {esc(fd.get('message_id') or '-')}")
    faults = _faults_table(doc, width)
    if faults is not None:
        stdout.print(faults)
    ds = doc.get("divergent_streams") or []
    if ds:
        stdout.print(_streams_table(ds, width))
        if len(ds) > STREAMS_SHOWN:
            _say(f"… and {len(ds) - STREAMS_SHOWN:,} more stream(s): every field of every stream "
                         "is in --json and --html")
    rp = doc.get("replayed") or {}
    if rp:
        src = f"a snapshot at {rp['from_snapshot']:,} entries" if rp.get("from_snapshot") is not None \
            else "the start of the log"
        _say(f"replayed {rp.get('events', 0):,} entries from {src}")
    if "repair" in doc:
        r = doc["repair"]
        if doc["verdict"] == "consistent":
            _say(f"nothing to repair: the export is correct as it is → {esc(r['state'])} "
                 f"(corrections → {esc(r['corrections'])}: none)")
        else:
            _say(f"[green]repaired[/] {r['streams']} stream(s), validated against a fresh rebuild: "
                 f"state → {esc(r['state'])}, corrections → {esc(r['corrections'])}")
        pb = r.get("publish")
        if pb:
            _say(f"corrections published to {esc(pb['topic'])}: {pb['published']} sent, "
                 f"{pb['already_published']} already there (exactly once per idempotency key)")
        ev = r.get("evidence")
        if ev:
            _say(f"fresh evidence for the repaired worker → {esc(ev['dir'])} ({ev['events']:,} events); "
                 f"resume the worker after message {esc(ev['resume_after'])}")
    print_history(doc)
    if doc.get("html"):
        _say(f"report for a browser: {esc(doc['html'])}")
    for n in doc.get("notes", []):
        _say(f"[yellow]note:[/] {esc(n)}")

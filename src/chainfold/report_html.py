"""The reconcile report as one self-contained HTML page (``reconcile --html FILE``, ``demo``).

:func:`render_report` takes the report exactly as ``reconcile --json`` prints it (a dict of JSON
values) and nothing else, so a page can be made from any saved report, and keys a newer report adds
still show up (under "more details") instead of breaking the page. The page shows

* the verdict, the topic and the counts;
* the log as a strip of segments, one lane per kind of finding (missed, duplicated, out of order,
  malformed, stored again), each marked where it sits in the log, and the first divergence as a
  line across all lanes (positions come from the report's ``positions``; without them the strip
  shows the segments and the first divergence only);
* the marked entries as a table (kind, entry, segment, id), each mark linking to its row;
* per divergent stream, its fields side by side: expected, the worker's, the difference.

Everything that comes from the report is escaped (ids and stream names are text from the log and
from the worker, never markup). The page loads nothing: CSS and JS are inline, and a
Content-Security-Policy forbids any network access, so it opens the same from a file, a mail
attachment or an air-gapped machine. Without JavaScript everything is visible; the script only adds
a stream filter and buttons to show equal fields and open or close all streams.
"""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Mapping, Sequence
from html import escape
from typing import Any

from .statediff import FieldDiff, field_diffs, format_value

__all__ = ["render_report", "KINDS", "MAX_MARKS", "MAX_ROWS", "MAX_STREAMS"]

# (report key, label, css class): the lanes of the strip, in order
KINDS: tuple[tuple[str, str, str], ...] = (
    ("missing", "missed by the worker", "k-missing"),
    ("duplicates", "duplicated", "k-dup"),
    ("out_of_order", "out of order", "k-ooo"),
    ("malformed", "malformed entries", "k-malformed"),
    ("stored_again", "stored again in the log", "k-again"),
)
MAX_MARKS = 400      # marks per lane: more items share a mark (its count says how many)
MAX_SEGMENTS = 256   # segment bands drawn: more segments share a band
MAX_ROWS = 2000      # rows of the entries table
MAX_STREAMS = 1000   # divergent streams drawn in full
_KNOWN = {"verdict", "topic", "log", "processed", "first_divergence", "missing", "duplicates", "out_of_order",
          "malformed", "divergent_streams", "replayed", "notes", "positions", "seconds", "error", "html"}


def _e(value: Any) -> str:
    return escape(str(value), quote=True)


def _n(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else _e("-" if value is None else value)


def _count(n: int, one: str, many: str | None = None) -> str:
    return f"{n:,} {one if n == 1 else (many or one + 's')}"


# --- the log strip ---------------------------------------------------------------------------------


def _items(doc: Mapping[str, Any], key: str) -> list[tuple[Any, str]]:
    """``(position, label)`` of each item of one kind; position as the report gives it (or None)."""
    pos = doc.get("positions") or {}
    if key == "stored_again":
        return [(d.get("index"), f"{d.get('event_id')} (message {d.get('message_id')})")
                for d in pos.get("stored_again") or [] if isinstance(d, dict)]
    items = doc.get(key) or []
    where = pos.get(key) or []
    return [(where[i] if i < len(where) else None, str(it)) for i, it in enumerate(items)]


def _split(position: Any) -> tuple[int, int] | None:
    """``(partition number, index)`` of a position (an int, or [partition, index])."""
    if isinstance(position, int) and not isinstance(position, bool):
        return 0, position
    if isinstance(position, list) and len(position) == 2 and all(isinstance(x, int) for x in position):
        return position[0], position[1]
    return None


def _bands(n: int, seg: int) -> str:
    segments = max(1, -(-n // seg)) if n else 0
    if not segments:
        return '<div class="band empty" style="left:0;width:100%">empty log</div>'
    per = max(1, -(-segments // MAX_SEGMENTS))
    out = []
    for b, k in enumerate(range(0, segments, per)):
        last = min(k + per, segments) - 1
        lo, hi = k * seg, min((last + 1) * seg, n)
        what = f"segment {k:,}" if per == 1 else f"segments {k:,}–{last:,}"
        out.append(f'<div class="band{" odd" if b % 2 else ""}" style="left:{100 * lo / n:.4f}%;'
                   f'width:{100 * (hi - lo) / n:.4f}%" title="{_e(what)}: entries {lo:,}–{hi - 1:,}"></div>')
    return "".join(out)


def _lane(kind: str, label: str, css: str, items: list[tuple[int, str]], n: int) -> str:
    """One lane: marks at their positions (items sharing a bin share a mark, ``data-count``)."""
    bins: dict[int, list[tuple[int, str]]] = {}
    for idx, text in items:
        b = min(MAX_MARKS - 1, idx * MAX_MARKS // max(n, 1))
        bins.setdefault(b, []).append((idx, text))
    marks = []
    for b in sorted(bins):
        group = sorted(bins[b])
        first = group[0][0]
        tip = "; ".join(f"entry {i:,}: {t}" for i, t in group[:5]) + (f"; … {len(group) - 5} more" if len(group) > 5 else "")
        marks.append(f'<a class="mark {css}" href="#e-{kind}-{first}" data-kind="{kind}" data-count="{len(group)}" '
                     f'data-index="{first}" style="left:{100 * first / max(n, 1):.4f}%" title="{_e(tip)}"></a>')
    return (f'<div class="lane" data-kind="{kind}"><span class="lane-label">{_e(label)} '
            f'<b>{len(items):,}</b></span><div class="lane-track">{"".join(marks)}</div></div>')


def _strip(doc: Mapping[str, Any], part: int, n: int, seg: int,
           per_kind: dict[str, list[tuple[int, str]]], title: str) -> str:
    fd = doc.get("first_divergence") or {}
    fd_line = ""
    if isinstance(fd.get("index"), int) and n:
        fd_part = 0
        if "partition" in fd and isinstance(doc.get("positions"), dict):
            fd_part = -1  # on a partitioned topic, the line goes on the strip of its partition
            names = (doc.get("positions") or {}).get("partitions") or []
            fd_part = names.index(fd["partition"]) if fd["partition"] in names else -1
        if fd_part == part:
            x = 100 * min(fd["index"], n) / n
            fd_line = (f'<div class="fd-line" id="strip-first-divergence" data-index="{fd["index"]}" style="left:{x:.4f}%">'
                       f'<span>first divergence · entry {fd["index"]:,}</span></div>')
    lanes = "".join(_lane(k, label, css, per_kind.get(k, []), n) for k, label, css in KINDS if per_kind.get(k))
    return (f'<div class="strip" data-partition="{part}" data-entries="{n}">'
            f'<div class="strip-title">{_e(title)}: {_count(n, "entry", "entries")}, '
            f'{_count(max(1, -(-n // seg)) if n else 0, "segment")} of {seg:,}</div>'
            f'<div class="strip-body"><div class="bands">{_bands(n, seg)}</div>{lanes}{fd_line}</div></div>')


def _log_section(doc: Mapping[str, Any]) -> tuple[str, list[tuple[str, int, int, str]]]:
    """The strip(s) and the rows of the marked-entries table ``(kind, partition, index, label)``."""
    pos = doc.get("positions") if isinstance(doc.get("positions"), dict) else {}
    log = doc.get("log") or {}
    total = log.get("events") if isinstance(log.get("events"), int) else 0
    entries = pos.get("entries") if isinstance(pos.get("entries"), list) else [total]
    seg = pos.get("segment_size") if isinstance(pos.get("segment_size"), int) and pos.get("segment_size") else 1024
    rows: list[tuple[str, int, int, str]] = []
    per_part: list[dict[str, list[tuple[int, str]]]] = [{} for _ in entries]
    unplaced = 0
    for key, _label, _css in KINDS:
        for position, text in _items(doc, key):
            where = _split(position)
            if where is None or not 0 <= where[0] < len(entries):
                unplaced += 1
                continue
            per_part[where[0]].setdefault(key, []).append((where[1], text))
            rows.append((key, where[0], where[1], text))
    names = pos.get("partitions") or []
    strips = "".join(
        _strip(doc, k, n if isinstance(n, int) else 0, seg, per_part[k],
               names[k] if k < len(names) else (f"partition {k}" if len(entries) > 1 else "log"))
        for k, n in enumerate(entries))
    legend = "".join(f'<span class="legend-item"><i class="swatch {css}"></i>{_e(label)}</span>' for _, label, css in KINDS)
    legend += '<span class="legend-item"><i class="swatch fd"></i>first divergence</span>'
    note = ""
    if not pos:
        note = '<p class="muted">This report has no entry positions: only the segments and the first divergence are drawn.</p>'
    elif unplaced:
        note = f'<p class="muted">{unplaced:,} listed item(s) have no position in the log and are not drawn.</p>'
    return f'<div class="legend">{legend}</div>{strips}{note}', rows


def _entries_table(doc: Mapping[str, Any], rows: list[tuple[str, int, int, str]]) -> str:
    if not rows:
        return ""
    labels = {k: label for k, label, _ in KINDS}
    css = {k: c for k, _, c in KINDS}
    seg = ((doc.get("positions") or {}).get("segment_size")) or 1024
    multi = len((doc.get("positions") or {}).get("entries") or [0]) > 1
    rows = sorted(rows, key=lambda r: (r[1], r[2], r[0]))
    seen: set[str] = set()
    body = []
    for kind, part, idx, text in rows[:MAX_ROWS]:
        anchor = f"e-{kind}-{idx}"
        rid = f' id="{anchor}"' if anchor not in seen else ""
        seen.add(anchor)
        body.append(f'<tr class="entry" data-kind="{kind}"{rid}><td><i class="swatch {css[kind]}"></i>{_e(labels[kind])}</td>'
                    + (f"<td>{part}</td>" if multi else "")
                    + f'<td class="num">{idx:,}</td><td class="num">{idx // seg:,}</td><td class="id">{_e(text)}</td></tr>')
    more = f'<p class="muted">… and {len(rows) - MAX_ROWS:,} more (see the JSON report).</p>' if len(rows) > MAX_ROWS else ""
    head = "<th>kind</th>" + ("<th>partition</th>" if multi else "") + "<th>entry</th><th>segment</th><th>id</th>"
    return (f'<section id="entries"><details{" open" if len(rows) <= 30 else ""}><summary><h2>Marked entries '
            f'<span class="count">{len(rows):,}</span></h2></summary>'
            f'<table class="entries"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>{more}'
            '</details></section>')


# --- divergent streams -----------------------------------------------------------------------------


def _diff_row(d: FieldDiff) -> str:
    delta = d.delta
    dtext = "" if delta is None or not d.changed else (f"{delta:+,}" if isinstance(delta, int) else f"{delta:+g}")
    cls = "chg" if d.changed else "eq"
    return (f'<tr class="{cls}"><td class="field">{_e(d.path or "(state)")}</td>'
            f'<td class="exp">{_e(format_value(d.expected, 200))}</td>'
            f'<td class="act">{_e(format_value(d.actual, 200))}</td><td class="num delta">{_e(dtext)}</td></tr>')


def _stream(d: Mapping[str, Any], open_: bool) -> str:
    diffs = field_diffs(d.get("expected"), d.get("actual"))
    changed = sum(1 for x in diffs if x.changed)
    name = str(d.get("stream"))
    side = ""
    if d.get("expected") is None:
        side = " · not in the log's states"
    elif d.get("actual") is None:
        side = " · missing from the worker's export"
    return (f'<details class="stream" data-stream="{_e(name)}" data-changed="{changed}"{" open" if open_ else ""}>'
            f'<summary><span class="sname">{_e(name)}</span> <span class="muted">{changed} of {len(diffs)} '
            f'field(s) differ{_e(side)}</span></summary>'
            '<table class="diff"><thead><tr><th>field</th><th>expected (from the log)</th><th>worker\'s</th>'
            f'<th>worker − expected</th></tr></thead><tbody>{"".join(_diff_row(x) for x in diffs)}</tbody></table></details>')


def _streams_section(doc: Mapping[str, Any]) -> str:
    ds = [d for d in doc.get("divergent_streams") or [] if isinstance(d, Mapping)]
    if not ds:
        return ""
    shown = "".join(_stream(d, i < 20) for i, d in enumerate(ds[:MAX_STREAMS]))
    more = (f'<p class="muted">… and {len(ds) - MAX_STREAMS:,} more stream(s) in the JSON report.</p>'
            if len(ds) > MAX_STREAMS else "")
    return ('<section id="streams"><h2>Divergent streams <span class="count">' + f"{len(ds):,}</span></h2>"
            '<div class="tools" hidden><input id="filter" type="search" placeholder="filter streams" '
            'aria-label="filter streams"><button type="button" id="toggle-eq">show equal fields</button>'
            '<button type="button" id="open-all">open all</button><button type="button" id="close-all">close all'
            f'</button><span id="shown" class="muted"></span></div>{shown}{more}</section>')


# --- anything else ---------------------------------------------------------------------------------


def _generic(value: Any, depth: int = 0) -> str:
    """Any JSON value as HTML: objects as key/value tables, lists of objects as tables."""
    if isinstance(value, Mapping):
        if not value:
            return '<span class="muted">(none)</span>'
        if depth >= 3:
            return f"<code>{_e(json.dumps(value, default=str)[:2000])}</code>"
        rows = "".join(f"<tr><th>{_e(k)}</th><td>{_generic(v, depth + 1)}</td></tr>" for k, v in value.items())
        return f'<table class="kv">{rows}</table>'
    if isinstance(value, list):
        if not value:
            return '<span class="muted">(none)</span>'
        if all(isinstance(v, Mapping) for v in value) and depth < 3:
            keys: list[str] = []
            for v in value[:200]:
                keys.extend(k for k in v if k not in keys)
            head = "".join(f"<th>{_e(k)}</th>" for k in keys)
            body = "".join("<tr>" + "".join(f"<td>{_generic(v.get(k), depth + 1)}</td>" for k in keys) + "</tr>"
                           for v in value[:200])
            more = f'<p class="muted">… {len(value) - 200:,} more</p>' if len(value) > 200 else ""
            return f'<table class="list"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{more}'
        text = ", ".join(_e(v if isinstance(v, str) else json.dumps(v, default=str)) for v in value[:200])
        return text + (f' <span class="muted">… {len(value) - 200:,} more</span>' if len(value) > 200 else "")
    if isinstance(value, bool) or value is None:
        return f"<code>{_e(json.dumps(value))}</code>"
    return _n(value) if isinstance(value, int) else _e(value)


def _other_section(doc: Mapping[str, Any]) -> str:
    extra = {k: v for k, v in doc.items() if k not in _KNOWN and v is not None}
    if not extra:
        return ""
    blocks = "".join(f'<div class="extra" data-key="{_e(k)}"><h3>{_e(k.replace("_", " "))}</h3>{_generic(v)}</div>'
                     for k, v in extra.items())
    return f'<section id="more"><h2>More details</h2>{blocks}</section>'


# --- the page --------------------------------------------------------------------------------------


def _summary(doc: Mapping[str, Any]) -> str:
    log = doc.get("log") or {}
    processed = doc.get("processed") or {}
    cards = [("log entries", log.get("events"), "log-entries"), ("segments", log.get("segments"), "segments"),
             ("handled by the worker", processed.get("events"), "handled")]
    labels = {"missing": "missed", "duplicates": "duplicated", "out_of_order": "out of order",
              "malformed": "malformed entries", "divergent_streams": "divergent streams"}
    for key, value in doc.items():  # every list the report has is a count worth seeing
        if isinstance(value, list) and key not in ("notes",):
            cards.append((labels.get(key, key.replace("_", " ")), len(value), key))
    return '<div class="cards">' + "".join(
        f'<div class="card{" bad" if isinstance(v, int) and v and k not in ("log-entries", "segments", "handled") else ""}"'
        f' data-key="{_e(k)}"><b>{_n(v)}</b><span>{_e(label)}</span></div>' for label, v, k in cards) + "</div>"


def _first_divergence(doc: Mapping[str, Any]) -> str:
    fd = doc.get("first_divergence")
    if not isinstance(fd, Mapping):
        return ""
    rows = "".join(f"<tr><th>{_e(k.replace('_', ' '))}</th><td>{_n(v)}</td></tr>" for k, v in fd.items())
    return f'<section id="first-divergence"><h2>First divergence</h2><table class="kv">{rows}</table></section>'


def _head(doc: Mapping[str, Any]) -> str:
    verdict = str(doc.get("verdict", "unknown"))
    log = doc.get("log") or {}
    rp = doc.get("replayed") or {}
    facts = []
    if log.get("head"):
        facts.append(f"head <code>{_e(log['head'])}</code>")
    if isinstance(rp, Mapping) and rp:
        src = (f"a snapshot at {_n(rp.get('from_snapshot'))} entries" if rp.get("from_snapshot") is not None
               else "the start of the log")
        facts.append(f"replayed {_n(rp.get('events'))} entries from {src}")
    if isinstance(doc.get("seconds"), (int, float)):
        facts.append(f"{doc['seconds']:.2f} s")
    err = f'<p class="error">{_e(doc["error"])}</p>' if doc.get("error") else ""
    return (f'<header class="verdict v-{_e(verdict)}"><h1 id="verdict">{_e(verdict.upper())}</h1>'
            f'<p class="topic">{_e(doc.get("topic", ""))}</p><p class="facts">{" · ".join(facts)}</p>{err}</header>')


def _notes(doc: Mapping[str, Any]) -> str:
    notes = doc.get("notes") or []
    if not notes:
        return ""
    return '<section id="notes"><h2>Notes</h2><ul>' + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul></section>"


def _json_blob(doc: Mapping[str, Any]) -> str:
    text = json.dumps(doc, default=str, sort_keys=False)
    # inside <script>, only "</" and "<!--" can end the element early: escape every "<" (and the
    # line separators JavaScript once treated as newlines)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026") \
        .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def render_report(doc: Mapping[str, Any], *, generated: str | None = None) -> str:
    """The HTML page of a reconcile report (the dict ``reconcile --json`` prints)."""
    strips, rows = _log_section(doc)
    when = generated or _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    title = f"chainfold reconcile: {str(doc.get('verdict', '')).upper()} {doc.get('topic', '')}"
    return "".join([
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">",
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; "
        "script-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'\">",
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{_CSS}</style></head>",
        f'<body data-verdict="{_e(doc.get("verdict", ""))}">',
        _head(doc), _summary(doc),
        f'<section id="log"><h2>The log</h2>{strips}</section>',
        _first_divergence(doc), _streams_section(doc), _entries_table(doc, rows), _notes(doc), _other_section(doc),
        f'<footer>chainfold reconcile report · made {_e(when)} · the full JSON report is embedded in this page '
        '(<code>#report-json</code>)</footer>',
        f'<script type="application/json" id="report-json">{_json_blob(doc)}</script>',
        f"<script>{_JS}</script></body></html>\n",
    ])


_CSS = """
:root{--bg:#f8f9fa;--fg:#212529;--muted:#6c757d;--line:#dee2e6;--card:#fff;--missing:#e8590c;--dup:#7048e8;
--ooo:#1c7ed6;--malformed:#343a40;--again:#c2255c;--fd:#e03131;--ok:#2b8a3e;--bad:#c92a2a}
*{box-sizing:border-box}body{margin:0;padding:0 2rem 2rem;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;
color:var(--fg);background:var(--bg)}h1{margin:0;font-size:2rem;letter-spacing:.04em}h2{font-size:1.15rem;margin:1.6rem 0 .6rem}
h3{font-size:1rem;margin:1rem 0 .4rem}code{font:12px/1.3 ui-monospace,SFMono-Regular,Menlo,monospace;word-break:break-all}
.muted{color:var(--muted)}.count{color:var(--muted);font-weight:normal}
header.verdict{margin:0 -2rem;padding:1.2rem 2rem;color:#fff;background:var(--bad)}
header.v-consistent,header.v-repaired{background:var(--ok)}header.v-unrecoverable{background:#862e9c}
header .topic{margin:.2rem 0;font-size:1.05rem;word-break:break-all}header .facts{margin:0;opacity:.9}
header code{color:#fff}header .error{background:rgba(0,0,0,.2);padding:.4rem .6rem;border-radius:4px}
.cards{display:flex;flex-wrap:wrap;gap:.6rem;margin:1rem 0}.card{background:var(--card);border:1px solid var(--line);
border-radius:6px;padding:.5rem .8rem;min-width:8rem}.card b{display:block;font-size:1.35rem}.card span{color:var(--muted)}
.card.bad b{color:var(--bad)}#entries summary h2{display:inline-block;margin:1.2rem 0 .6rem}
.legend{display:flex;flex-wrap:wrap;gap:1rem;margin:.3rem 0 .6rem}.legend-item{display:inline-flex;align-items:center;gap:.35rem}
.swatch{display:inline-block;width:.8rem;height:.8rem;border-radius:2px;margin-right:.3rem;vertical-align:-1px}
.k-missing{background:var(--missing)}.k-dup{background:var(--dup)}.k-ooo{background:var(--ooo)}
.k-malformed{background:var(--malformed)}.k-again{background:var(--again)}.swatch.fd{background:var(--fd)}
.strip{background:var(--card);border:1px solid var(--line);border-radius:6px;padding:.6rem .8rem 1.6rem;margin-bottom:.8rem}
.strip-title{color:var(--muted);margin-bottom:.4rem}.strip-body{position:relative;margin-left:11rem}
.bands{position:relative;height:18px;border:1px solid var(--line);background:#e9ecef}
.band{position:absolute;top:0;bottom:0;background:#dee2e6}.band.odd{background:#ced4da}
.band.empty{position:static;color:var(--muted);font-size:12px;text-align:center;background:none}
.lane{position:relative;height:20px;margin-top:3px}.lane-label{position:absolute;right:100%;width:11rem;padding-right:.6rem;
text-align:right;white-space:nowrap;font-size:12px;color:var(--muted)}.lane-label b{color:var(--fg)}
.lane-track{position:absolute;left:0;right:0;top:0;bottom:0;background:repeating-linear-gradient(90deg,#f1f3f5 0 1px,transparent 1px 10%)}
.mark{position:absolute;top:2px;bottom:2px;width:4px;margin-left:-2px;border-radius:1px;opacity:.9}
.mark:hover,.mark:focus{outline:2px solid var(--fg);opacity:1}
.fd-line{position:absolute;top:-4px;bottom:-4px;width:2px;margin-left:-1px;background:var(--fd)}
.fd-line span{position:absolute;top:100%;left:4px;white-space:nowrap;color:var(--fd);font-size:12px;font-weight:600}
table{border-collapse:collapse;background:var(--card)}th,td{border:1px solid var(--line);padding:.25rem .5rem;text-align:left;
vertical-align:top}th{background:#f1f3f5;font-weight:600}td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
td.id,td.exp,td.act{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:12px;word-break:break-all}
table.entries{min-width:50%}tr.entry:target{background:#fff3bf}
.tools{display:flex;gap:.5rem;align-items:center;margin:.4rem 0 .8rem}.tools input{padding:.3rem .5rem;min-width:16rem}
details.stream{background:var(--card);border:1px solid var(--line);border-radius:6px;margin:.4rem 0;padding:.3rem .6rem}
details.stream summary{cursor:pointer}.sname{font-weight:600;font-family:ui-monospace,SFMono-Regular,Menlo,monospace}
table.diff{margin:.4rem 0;width:100%;max-width:72rem;table-layout:fixed}table.diff th:nth-child(1){width:24%}
table.diff th:nth-child(2),table.diff th:nth-child(3){width:30%}table.diff th:nth-child(4){width:16%}table.diff td.field{font-weight:600;word-break:break-all}
tr.chg td.exp{background:#ebfbee}tr.chg td.act{background:#fff5f5}tr.chg td.delta{color:var(--bad);font-weight:600}
tr.eq{display:none}body.show-eq tr.eq{display:table-row;color:var(--muted)}
table.kv th{width:12rem}footer{margin-top:2rem;color:var(--muted);font-size:12px}
"""

_JS = """
(function(){
  var q=function(s){return document.querySelector(s)}, all=function(s){return Array.prototype.slice.call(document.querySelectorAll(s))};
  var tools=q('#streams .tools');
  if(tools){
    tools.hidden=false;
    var streams=all('details.stream'), shown=q('#shown');
    var filter=function(){
      var t=q('#filter').value.toLowerCase(), n=0;
      streams.forEach(function(d){var ok=d.getAttribute('data-stream').toLowerCase().indexOf(t)>=0; d.hidden=!ok; if(ok)n++;});
      shown.textContent=n+' of '+streams.length+' shown';
    };
    q('#filter').addEventListener('input',filter);
    q('#toggle-eq').addEventListener('click',function(){
      var on=document.body.classList.toggle('show-eq'); this.textContent=on?'hide equal fields':'show equal fields';});
    q('#open-all').addEventListener('click',function(){streams.forEach(function(d){d.open=true});});
    q('#close-all').addEventListener('click',function(){streams.forEach(function(d){d.open=false});});
    filter();
  }
  document.body.setAttribute('data-js','ready');
})();
"""

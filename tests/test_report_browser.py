"""The HTML reconcile report in a real browser: headless Chromium loads the page from a file, and the
rendered DOM must show the verdict, every finding where it sits in the log, the first divergence,
each divergent stream, hostile ids as text, no console message (no script error, nothing blocked by
the page's no-network policy). A screenshot is kept in test-artifacts/ (CHAINFOLD_TEST_ARTIFACTS).

Chromium comes from Debian's ``chromium`` package: ``scripts/ensure-chromium`` (run by ``make test``
and, when missing, by this module) installs it as root; without it these tests skip, saying why.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from chainfold.report_html import KINDS, render_report

from .conftest import ROOT
from .test_operator import HOSTILE_ID, HOSTILE_STREAM, build_scenario

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--enable-logging=stderr", "--v=0"]


@pytest.fixture(scope="session")
def chromium() -> str:
    for c in (os.environ.get("CHAINFOLD_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if c and shutil.which(c):
            return shutil.which(c)  # type: ignore[return-value]
    r = subprocess.run([str(ROOT / "scripts" / "ensure-chromium")], capture_output=True, text=True, timeout=1200)
    if r.returncode != 0 or not r.stdout.strip():
        pytest.skip(f"no headless Chromium (scripts/ensure-chromium: {r.stderr.strip()[-300:]})")
    return r.stdout.strip().splitlines()[-1]


def artifacts_dir() -> Path:
    d = Path(os.environ.get("CHAINFOLD_TEST_ARTIFACTS", ROOT / "test-artifacts"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def run_chromium(browser: str, tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    profile = tmp / f"profile-{len(list(tmp.glob('profile-*')))}"  # a fresh profile per run
    return subprocess.run([browser, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)


class Dom(HTMLParser):
    """The elements of a page: (tag, attributes), and the text inside each element with an id."""

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict[str, str]]] = []
        self.text_by_id: dict[str, str] = {}
        self._open: list[str | None] = []
        self.text: list[str] = []
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        self.elements.append((tag, a))
        if tag not in ("meta", "br", "input", "img", "link", "hr"):
            self._open.append(a.get("id"))
            if a.get("id"):
                self.text_by_id[a["id"]] = ""

    def handle_endtag(self, tag: str) -> None:
        if self._open:
            self._open.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        for i in self._open:
            if i:
                self.text_by_id[i] += data

    def find(self, tag: str | None = None, **attrs: str) -> list[dict[str, str]]:
        """Elements by tag and attributes (``class_`` matches one of the classes, ``data_x`` is
        ``data-x``)."""
        want = {("class" if k == "class_" else k.replace("_", "-")): v for k, v in attrs.items()}

        def ok(a: dict[str, str]) -> bool:
            for k, v in want.items():
                if k not in a or (v not in a[k].split() if k == "class" else a[k] != v):
                    return False
            return True

        return [a for t, a in self.elements if (tag is None or t == tag) and ok(a)]


@pytest.mark.broker
def test_report_renders_in_chromium(cli, pulsar_client, chromium: str, tmp_path: Path) -> None:
    sc = build_scenario(cli, pulsar_client, tmp_path)
    doc = sc.report
    url = sc.html.resolve().as_uri()
    r = run_chromium(chromium, tmp_path, "--window-size=1280,1800", "--dump-dom", url)
    assert r.returncode == 0, r.stderr[-2000:]
    dom = Dom(r.stdout)

    body = dom.find("body")[0]
    assert body["data-verdict"] == "divergent" and body["data-js"] == "ready"  # the inline script ran
    assert dom.text_by_id["verdict"].strip() == "DIVERGENT"

    # every finding is marked in its lane; marks that share a spot carry their count
    pos = doc["positions"]
    for kind, _label, _css in KINDS:
        items = pos["stored_again"] if kind == "stored_again" else doc[kind]
        marks = dom.find("a", data_kind=kind)
        assert sum(int(m["data-count"]) for m in marks) == len(items), kind
        if kind != "stored_again" and items:
            assert {int(m["data-index"]) for m in marks} <= set(pos[kind])
    assert [int(m["data-index"]) for m in dom.find("a", data_kind="missing")] == pos["missing"]
    # the first divergence: a line on the strip at its entry, and its own table
    fd = doc["first_divergence"]
    line = dom.find("div", id="strip-first-divergence")
    assert len(line) == 1 and int(line[0]["data-index"]) == fd["index"]
    assert f"first divergence · entry {fd['index']:,}" in dom.text_by_id["strip-first-divergence"]
    assert fd["event_id"] in dom.text_by_id["first-divergence"]
    # each mark links to its row in the entries table
    rows = {a["id"] for a in dom.find("tr") if a.get("id")}
    for m in dom.find("a", class_="mark"):
        assert m["href"][1:] in rows
    # one side-by-side diff per divergent stream, hostile names as text
    streams = dom.find("details", class_="stream")
    assert [s["data-stream"] for s in streams] == [d["stream"] for d in doc["divergent_streams"]]
    assert HOSTILE_STREAM in "".join(dom.text) and HOSTILE_ID in "".join(dom.text)
    assert not dom.find("img") and len(dom.find("script")) == 2  # nothing injected
    assert len(dom.find("tr", class_="chg")) >= len(doc["divergent_streams"])
    # the embedded JSON is the report
    blob = dom.text_by_id["report-json"]
    assert json.loads(blob) == {k: v for k, v in doc.items() if k != "html"}
    # no console output at all: no script error, no request the page's policy had to block
    assert "CONSOLE" not in r.stderr, [x for x in r.stderr.splitlines() if "CONSOLE" in x]

    shot = artifacts_dir() / "reconcile-report.png"
    shot.unlink(missing_ok=True)
    r = run_chromium(chromium, tmp_path, "--window-size=1280,1800", "--hide-scrollbars", f"--screenshot={shot}", url)
    assert r.returncode == 0, r.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    shutil.copy(sc.html, artifacts_dir() / "reconcile-report.html")


def test_report_without_positions_and_with_keys_it_does_not_know(chromium: str, tmp_path: Path) -> None:
    doc = {
        "verdict": "unrecoverable", "topic": "t", "log": {"events": None, "segments": None, "head": None},
        "processed": {"events": 3}, "first_divergence": None, "missing": [], "duplicates": [],
        "out_of_order": [], "malformed": [], "divergent_streams": [], "replayed": {"from_snapshot": None, "events": 0},
        "error": "the log now starts at 5:0:-1:-1",
        "seq_gaps": [{"stream": "<b>s</b>", "expected_seq": 3, "found_seq": 5, "message_id": "1:2:-1:-1"}],
        "future": {"nested": {"deeper": [1, 2, {"x": "<script>alert(1)</script>"}]}},
    }
    page = tmp_path / "r.html"
    page.write_text(render_report(doc))
    r = run_chromium(chromium, tmp_path, "--dump-dom", page.resolve().as_uri())
    assert r.returncode == 0, r.stderr[-2000:]
    dom = Dom(r.stdout)
    assert dom.text_by_id["verdict"].strip() == "UNRECOVERABLE"
    assert dom.find("div", class_="extra", data_key="seq_gaps") and dom.find("div", class_="extra", data_key="future")
    assert dom.find("div", class_="card", data_key="seq_gaps")
    assert "<b>s</b>" in "".join(dom.text) and "<script>alert(1)</script>" in "".join(dom.text)  # text, not markup
    assert len(dom.find("script")) == 2 and "CONSOLE" not in r.stderr
    assert "no entry positions" in "".join(dom.text)

"""Watch's JSON lines, its Prometheus endpoint (scraped with a plain HTTP GET), signals, status line."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import urllib.request

import pytest

from chainfold.watch.compare import LiveDivergence
from chainfold.watch.metrics import WatchMetrics
from chainfold.watch.output import KINDS, StderrStatus, StopOnSignals, WatchLines

SPEC_KEYS = {
    "progress": {"log_entries", "worker_entries", "lag"},
    "divergence": {"index", "segment", "event_id", "message_id"},
    "malformed": {"message_id", "reason"},
    "duplicate": {"event_id", "message_id"},
    "error": {"message"},
}


def scrape(url: str) -> dict[str, float]:
    """The samples of a Prometheus text exposition, fetched with a plain GET."""
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def write_some(lines: WatchLines) -> None:
    lines.progress(log_entries=100, worker_entries=None, lag=None)
    lines.malformed("5:3:-1:-1", "not CBOR")
    lines.duplicate("evt-9", "5:40:-1:-1")
    lines.duplicate("evt-11", "5:41:-1:-1")
    lines.progress(log_entries=250, worker_entries=240, lag=7)
    lines.divergence(LiveDivergence(200, 203, 0, "evt-200", "5:203:-1:-1", "skipped"))
    lines.error("broker unreachable: retrying", service_url="pulsar://127.0.0.1:1")
    lines.checkpoint_recorded(1_700_000_000.5)


def test_every_line_is_one_object_with_kind_time_and_the_documented_keys() -> None:
    out = io.StringIO()
    lines = WatchLines(out, clock=lambda: 1_700_000_000_123)
    write_some(lines)
    objs = [json.loads(x) for x in out.getvalue().splitlines()]
    assert [o["kind"] for o in objs] == ["progress", "malformed", "duplicate", "duplicate", "progress",
                                         "divergence", "error"]
    for o in objs:
        assert o["kind"] in KINDS and o["time"] == 1_700_000_000_123
        assert SPEC_KEYS[o["kind"]] <= set(o) - {"kind", "time"}
    assert objs[5] == {"kind": "divergence", "time": 1_700_000_000_123, "index": 203, "segment": 0,
                       "event_id": "evt-200", "message_id": "5:203:-1:-1", "worker_position": 200,
                       "reason": "skipped"}
    assert lines.counts == {"progress": 2, "malformed": 1, "duplicate": 2, "divergence": 1, "error": 1}


def test_metrics_endpoint_matches_the_lines() -> None:
    metrics = WatchMetrics()
    server = metrics.serve(0)  # any free loopback port
    try:
        assert server.host == "127.0.0.1" and server.port > 0
        out = io.StringIO()
        write_some(WatchLines(out, metrics=metrics))
        objs = [json.loads(x) for x in out.getvalue().splitlines()]
        got = scrape(server.url)
        last = [o for o in objs if o["kind"] == "progress"][-1]
        assert got["chainfold_watch_entries_read_total"] == last["log_entries"]
        assert got["chainfold_watch_worker_entries"] == last["worker_entries"]
        assert got["chainfold_watch_worker_lag_entries"] == last["lag"]
        for kind, name in (("divergence", "divergences"), ("malformed", "malformed"), ("duplicate", "duplicates")):
            assert got[f"chainfold_watch_{name}_total"] == sum(o["kind"] == kind for o in objs)
        assert got["chainfold_watch_last_checkpoint_timestamp_seconds"] == 1_700_000_000.5
    finally:
        server.close()
    with pytest.raises(OSError):
        urllib.request.urlopen(server.url, timeout=2)


def test_a_taken_port_is_bad_input() -> None:
    from chainfold.errors import BadInput

    a = WatchMetrics().serve(0)
    try:
        with pytest.raises(BadInput, match="cannot serve metrics"):
            WatchMetrics().serve(a.port)
    finally:
        a.close()


def test_first_signal_stops_cleanly_second_ends_at_once() -> None:
    stops: list[int] = []
    old = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        with StopOnSignals(stops.append) as s:
            os.kill(os.getpid(), signal.SIGTERM)
            assert stops == [signal.SIGTERM] and s.received == signal.SIGTERM
            os.kill(os.getpid(), signal.SIGINT)  # the second: SIGINT's default, at once
            pytest.fail("not reached")  # pragma: no cover
    assert stops == [signal.SIGTERM]
    assert signal.getsignal(signal.SIGTERM) is old


def test_signals_in_a_real_process() -> None:
    """SIGTERM: the stop callback runs, the loop ends, exit 0; the handlers are restored after."""
    code = textwrap.dedent("""
        import os, signal, sys, time
        from chainfold.watch.output import StopOnSignals
        stopped = []
        with StopOnSignals(stopped.append) as s:
            print("ready", flush=True)
            while not stopped:
                time.sleep(0.01)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        print("stopped by", stopped[0], flush=True)
        sys.exit(0)
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=30)
    assert p.returncode == 0 and out.strip() == f"stopped by {int(signal.SIGTERM)}"


def test_status_line_only_on_a_terminal() -> None:
    buf = io.StringIO()
    with StderrStatus(buf) as s:
        s.update("watch t: 10 entries")
    assert not s.enabled and buf.getvalue() == ""

"""A live scene for watch: a publisher appending at a controlled rate, the demo's real worker
(:mod:`chainfold.worker`) consuming with faults, and when the evidence says each event was handled.

Used by the tests on real brokers, ``benchmarks/watch_live.py`` and a live demo:

* :class:`Publisher`: a thread appending accounts events to a topic at ``rate`` events/s, in small
  chunks (as a service publishes), with extra payloads (another producer's copies, malformed
  entries) injected at chosen counts;
* :class:`WorkerRun`: ``python -m chainfold.worker`` as a subprocess with a Tracker in its evidence
  directory and faults (``skip:ID``, ``double:ID``, ``mishandle:TYPE:FROM:TO``,
  ``crash-before-ack:N``: after the crash it is started again, like a supervisor would, and handles
  the redelivered messages twice);
  ``commit_seconds`` makes its evidence visible within about that long even when it goes quiet;
* :func:`fault_positions` and :func:`handling_time_ms`: where in its handling order the worker
  departed from the reference (from its own bookkeeping, ``worker.json``) and when it handled a
  position (the Tracker's ``handling_times`` in the processed log), so
  :func:`detection_latency` = the time of watch's ``divergence`` line minus the handling time of
  the first divergent event;
* :class:`WatchProcess`: ``chainfold watch`` itself as a subprocess, its JSON lines collected as
  they come;
* :class:`ApacheBroker`: kill and restart the Apache Pulsar standalone broker of the integration
  tier (``scripts/pulsar-standalone``) under a running process, keeping its data and ports.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..envelope import Event
from ..examples import accounts
from ..log.pulsar import PulsarLog
from ..worker import CRASH_EXIT, META_NAME

__all__ = ["live_events", "Publisher", "WorkerRun", "WatchProcess", "fault_positions", "first_fault_position",
           "handling_time_ms", "detection_latency", "ApacheBroker"]


def live_events(n: int, streams: int, seed: int = 1) -> list[Event]:
    """``n`` accounts events over ``streams`` accounts, with their per-stream ``seq``."""
    return accounts.generate_events(n, streams, seed)


class Publisher(threading.Thread):
    """Appends ``events`` to ``elog`` at ``rate`` events/s in chunks of ``chunk`` (a daemon thread).

    ``inject`` maps a count of events published to raw payloads appended right after it (e.g. a
    second copy of an earlier event, a malformed entry). :attr:`published` counts events sent,
    :attr:`error` holds what stopped it early; :meth:`stop` ends it at the next chunk;
    :meth:`pause` and :meth:`resume` hold it between chunks.
    """

    def __init__(self, elog: PulsarLog, events: Sequence[Event], *, rate: float, chunk: int = 20,
                 inject: dict[int, list[bytes]] | None = None) -> None:
        super().__init__(name="chainfold-live-publisher", daemon=True)
        if rate <= 0 or chunk < 1:
            raise ValueError("rate must be > 0 and chunk >= 1")
        self.elog = elog
        self.events = list(events)
        self.rate = rate
        self.chunk = chunk
        self.inject = dict(inject or {})
        self.published = 0
        self.injected = 0
        self.error: BaseException | None = None
        self.finished_at: float | None = None
        self._halt = threading.Event()
        self._go = threading.Event()
        self._go.set()
        self._sending = threading.Lock()

    def stop(self) -> None:
        self._halt.set()
        self._go.set()

    def pause(self) -> None:
        """Append nothing more until :meth:`resume`; returns once no chunk is being sent (e.g. to
        restart the broker: a send cut off by a broker going away fails, and the publisher stops)."""
        self._go.clear()
        with self._sending:
            pass

    def resume(self) -> None:
        self._go.set()

    def run(self) -> None:
        t0 = time.monotonic()
        try:
            for i in range(0, len(self.events), self.chunk):
                due = t0 + i / self.rate
                if self._halt.wait(max(0.0, due - time.monotonic())):
                    return
                if not self._go.is_set():
                    paused = time.monotonic()
                    self._go.wait()
                    t0 += time.monotonic() - paused  # the rate goes on from where it was
                if self._halt.is_set():
                    return
                with self._sending:  # pause() waits for a chunk under way
                    part = self.events[i:i + self.chunk]
                    self.elog.append(part, assign_seq=False)
                    self.published += len(part)
                    for at in sorted(k for k in self.inject if i < k <= self.published):
                        extra = self.inject.pop(at)
                        self.elog.append_payloads((p, None, None) for p in extra)
                        self.injected += len(extra)
        except BaseException as exc:  # kept for the caller: a test fails with it
            self.error = exc
        finally:
            self.finished_at = time.monotonic()


@dataclass
class WorkerRun:
    """``python -m chainfold.worker`` on ``topic``: started with :meth:`start`, restarted after a
    crash on purpose by :meth:`supervise` (a thread), stdout summaries and stderr in ``log_path``."""

    topic: str
    service_url: str
    evidence: Path
    state: Path
    faults: Sequence[str] = ()
    commit_seconds: float = 1.0
    flush_every: int = 100
    idle: float = 8.0
    subscription: str = "live-worker"
    log_path: Path | None = None

    def __post_init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.runs: list[int] = []  # exit codes, in order
        self.summaries: list[dict[str, Any]] = []
        self._supervisor: threading.Thread | None = None

    def args(self) -> list[str]:
        a = [sys.executable, "-m", "chainfold.worker", "--topic", self.topic, "--service-url", self.service_url,
             "--evidence", str(self.evidence), "--state", str(self.state), "--subscription", self.subscription,
             "--flush-every", str(self.flush_every), "--commit-seconds", str(self.commit_seconds),
             "--idle", str(self.idle)]
        for f in self.faults:
            a += ["--faults", f]
        return a

    def start(self) -> subprocess.Popen[bytes]:
        log = open(self.log_path or os.devnull, "ab")
        try:
            self.proc = subprocess.Popen(self.args(), stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL)
        finally:
            log.close()
        return self.proc

    def _run_once(self, timeout: float) -> int:
        p = self.start()
        out, _ = p.communicate(timeout=timeout)
        for line in out.decode(errors="replace").splitlines():
            try:
                self.summaries.append(json.loads(line))
            except ValueError:
                continue
        self.runs.append(p.returncode)
        return p.returncode

    def supervise(self, *, timeout: float = 600.0, max_restarts: int = 3) -> threading.Thread:
        """Run the worker in a thread until it exits other than by a crash on purpose (restarting
        it after each :data:`~chainfold.worker.CRASH_EXIT`, at most ``max_restarts`` times)."""
        def loop() -> None:
            for _ in range(max_restarts + 1):
                if self._run_once(timeout) != CRASH_EXIT:
                    return

        self._supervisor = threading.Thread(target=loop, name="chainfold-live-worker", daemon=True)
        self._supervisor.start()
        return self._supervisor

    def join(self, timeout: float | None = None) -> list[int]:
        """Wait for :meth:`supervise` to end; the exit codes of the runs."""
        if self._supervisor is not None:
            self._supervisor.join(timeout)
        return self.runs

    def kill(self) -> None:
        """End a running worker at once (SIGKILL), e.g. when a test fails."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def meta(self) -> dict[str, Any]:
        """The worker's own bookkeeping (``worker.json``), as of its last commit."""
        p = self.evidence / META_NAME
        return json.loads(p.read_text()) if p.exists() else {}


_METRICS_AT = re.compile(r"metrics at (http://\S+/metrics)")


class WatchProcess:
    """``python -m chainfold watch TOPIC ARGS...`` (the real command) against ``service_url``: its
    JSON lines collected by a thread as they come (:attr:`lines`), stderr in ``log_path`` (and the
    metrics URL it prints, :attr:`metrics_url`). Start with :meth:`start`; :meth:`stop` sends
    SIGTERM and waits, as a supervisor stops it. ``env``: variables set for it (e.g. ``PYTHONPATH``
    to run another checkout's code side by side)."""

    def __init__(self, topic: str, service_url: str, args: Sequence[str], *, log_path: Path,
                 cwd: Path | None = None, env: dict[str, str] | None = None) -> None:
        self.argv = [sys.executable, "-m", "chainfold", "watch", topic, "--service-url", service_url, *args]
        self.log_path = log_path
        self.cwd = cwd
        self.env = None if env is None else {**os.environ, **env}
        self.lines: list[dict[str, Any]] = []
        self.metrics_url: str | None = None
        self.proc: subprocess.Popen[str] | None = None
        self._threads: list[threading.Thread] = []
        self._cond = threading.Condition()

    def start(self) -> WatchProcess:
        self.proc = subprocess.Popen(self.argv, cwd=self.cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     stdin=subprocess.DEVNULL, text=True, env=self.env)
        self._threads = [threading.Thread(target=self._read_lines, daemon=True),
                         threading.Thread(target=self._read_stderr, daemon=True)]
        for t in self._threads:
            t.start()
        return self

    def _read_lines(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for raw in self.proc.stdout:
            try:
                obj = json.loads(raw)
            except ValueError:
                obj = {"kind": "not-json", "text": raw}
            with self._cond:
                self.lines.append(obj)
                self._cond.notify_all()

    def _read_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        with open(self.log_path, "a", encoding="utf-8") as log:
            for raw in self.proc.stderr:
                log.write(raw)
                log.flush()
                m = _METRICS_AT.search(raw)
                if m:
                    with self._cond:
                        self.metrics_url = m.group(1)
                        self._cond.notify_all()

    def of(self, kind: str) -> list[dict[str, Any]]:
        """The lines of one kind so far."""
        with self._cond:
            return [x for x in self.lines if x.get("kind") == kind]

    def wait_for(self, test: Callable[[WatchProcess], Any], timeout: float) -> Any:
        """Wait until ``test(self)`` is truthy (returned) or the process ended or ``timeout`` passed (None)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                got = test(self)
                if got or time.monotonic() >= deadline or (self.proc is not None and self.proc.poll() is not None):
                    return got or None
                self._cond.wait(min(0.2, max(0.0, deadline - time.monotonic())))

    def last_progress(self) -> dict[str, Any] | None:
        prog = self.of("progress")
        return prog[-1] if prog else None

    def wait(self, timeout: float = 120) -> int:
        """Wait for the process to end (and its output to be read); its exit code."""
        assert self.proc is not None
        code = self.proc.wait(timeout=timeout)
        for t in self._threads:
            t.join(timeout=10)
        return code

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 120) -> int:
        """Send ``sig`` (if still running) and wait; the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.wait(timeout)

    def kill(self) -> None:
        """End it at once (SIGKILL), e.g. when a test fails."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def fault_positions(evidence: str | os.PathLike[str]) -> dict[str, list[int]]:
    """Where the worker's faults put it off the reference, as places in its handling order (from
    ``worker.json``): ``skip`` (where a skipped event should have been), ``mishandle``, ``double``
    (the second handling of an event handled twice), ``crash`` (the place of the first handling
    after the restart: a redelivered message, handled again)."""
    p = Path(evidence) / META_NAME
    meta = json.loads(p.read_text()) if p.exists() else {}
    return {"skip": list(meta.get("skipped_at", [])), "mishandle": list(meta.get("mishandled_at", [])),
            "double": list(meta.get("doubled_at", [])), "crash": list(meta.get("crashed_at", []))}


def first_fault_position(evidence: str | os.PathLike[str]) -> int | None:
    """The first place in the handling order where the worker departed from the reference."""
    places = [p for ps in fault_positions(evidence).values() for p in ps]
    return min(places) if places else None


def handling_time_ms(evidence: str | os.PathLike[str], position: int) -> int | None:
    """When the worker handled handling position ``position`` (0-based), in ms since the epoch: the
    ``time`` of processed-log line ``position + 1`` (the worker writes one line per handled event);
    ``None`` if not written yet or without times."""
    path = Path(evidence) / "processed.jsonl"
    if not path.exists():
        return None
    with open(path, "rb") as f:
        for k, line in enumerate(f):
            if k == position:
                if not line.endswith(b"\n"):
                    return None
                t = json.loads(line).get("time")
                return t if type(t) is int else None
    return None


def detection_latency(evidence: str | os.PathLike[str], position: int, reported_ms: int) -> float | None:
    """Seconds from the worker handling position ``position`` to a report at ``reported_ms`` (the
    ``time`` of watch's ``divergence`` line); ``None`` if the handling time is unknown."""
    t = handling_time_ms(evidence, position)
    return None if t is None else (reported_ms - t) / 1000


@dataclass(frozen=True)
class ApacheBroker:
    """The Apache Pulsar standalone broker of the integration tier, controlled through
    ``scripts/pulsar-standalone`` with its data directory and ports (as ``scripts/test-apache``
    exports them: ``CHAINFOLD_TEST_PULSAR_DATA``, ``..._PORT``, ``..._HTTP_PORT``, ``..._SCRIPT``)."""

    script: str
    data: str
    port: str
    http_port: str

    @classmethod
    def from_env(cls) -> ApacheBroker | None:
        """The test broker, or None outside the Apache tier."""
        e = os.environ
        need = ("CHAINFOLD_TEST_PULSAR_DATA", "CHAINFOLD_TEST_PULSAR_PORT", "CHAINFOLD_TEST_PULSAR_HTTP_PORT",
                "CHAINFOLD_TEST_PULSAR_SCRIPT")
        if not all(e.get(v) for v in need):
            return None
        return cls(e["CHAINFOLD_TEST_PULSAR_SCRIPT"], e["CHAINFOLD_TEST_PULSAR_DATA"],
                   e["CHAINFOLD_TEST_PULSAR_PORT"], e["CHAINFOLD_TEST_PULSAR_HTTP_PORT"])

    def run(self, command: str, timeout: float = 400) -> float:
        """``pulsar-standalone COMMAND`` (``kill``: SIGKILL at once; ``restart``: stop, then start and
        wait until healthy, same data and ports); returns the seconds it took."""
        t0 = time.monotonic()
        r = subprocess.run([self.script, command, "--data", self.data, "--port", self.port,
                            "--http-port", self.http_port], capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"pulsar-standalone {command} failed:\n{r.stderr[-3000:]}")
        return time.monotonic() - t0

    def kill_and_restart(self, down_seconds: float = 0.0) -> float:
        """SIGKILL the broker, stay down ``down_seconds``, start it again; total seconds."""
        t = self.run("kill")
        time.sleep(down_seconds)
        return t + down_seconds + self.run("restart")

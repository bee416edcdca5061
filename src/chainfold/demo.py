"""``chainfold demo``: the whole recovery story, on a real broker, in under a minute.

1. **publish** account events (:func:`chainfold.examples.accounts.generate`) to a fresh topic, and,
   as "another producer", a few malformed entries and a second publish of some events;
2. **run the worker** (:mod:`chainfold.worker`, a real Pulsar consumer, as a subprocess) with faults:
   it skips some messages, applies one event type wrongly for a while, and crashes after committing
   but before acking; restarted, it handles the redelivered messages again;
3. **detect**: :func:`~chainfold.ops.reconcile.reconcile` with the worker's state export, processed log
   and tracker checkpoints: the first divergence, what was missed, doubled, reordered, and the
   streams whose state is wrong;
4. **replay and repair**: the divergent streams replayed, the corrected state export and the
   corrections written;
5. **validate**: a fresh full rebuild equals the repaired state for every stream, ``verify`` finds
   the log intact, and the repaired export reconciles clean.

:func:`run_demo` does it all and returns the repair's reconcile report (docs/cli.md) with a ``demo``
section; ``narrate`` receives the story line by line (rich markup allowed).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import cbor2
from rich.markup import escape

from .log.broker import BrokerOptions, connect, resolve_url
from .envelope import Event, encode
from .errors import BadInput, ChainfoldError
from .examples import accounts
from .replay.model import load_model
from .log.pulsar import PulsarLog
from .ops.rebuild import rebuild
from .ops.reconcile import load_processed, load_state_export, load_tracker, reconcile
from .store.snapshots import topic_dir
from .ops.verify import verify_log
from .report_html import render_report
from .store.atomic import atomic_write
from .worker import CRASH_EXIT, META_NAME

__all__ = ["run_demo", "DemoFailed", "MODEL"]

MODEL = "chainfold.examples.accounts"


PUBLISH_CHUNK = 50
FLUSH_EVERY = 100


def _e(value: object) -> str:
    """Text from the log or the file system, safe inside the narration's rich markup."""
    return escape(str(value))


class DemoFailed(ChainfoldError):
    """A step of the demo did not go as the story says (exit 1)."""

    exit_code = 1


def _write_json(path: Path, obj: Any) -> None:
    atomic_write(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def _events(n: int, streams: int, seed: int) -> list[Event]:
    """The generated events with their per-stream seq (what chainfold's writer would assign)."""
    return accounts.generate_events(n, streams, seed)


def _plan(n: int) -> dict[str, Any]:
    """Where the faults go, in worker message counts (the log has n + 5 entries)."""
    return {
        "crash": n * 11 // 20 + (37 if n >= 400 else 0),
        "skip_every": max(3, n // 12) | 1,
        "mishandle": ("Withdrawn", n // 5, n // 5 + 60),
    }


def _publish(log: PulsarLog, events: list[Event], chunk: int = PUBLISH_CHUNK) -> None:
    """Append in small flushes, the way a service publishes events as they happen (so the broker's
    batches are small, as in production, not the 1000-message batches of a bulk load)."""
    for i in range(0, len(events), chunk):
        log.append(events[i:i + chunk], assign_seq=False)


def _run_worker(args: list[str], logfile: Path, timeout: float) -> tuple[int, dict[str, Any] | None]:
    with open(logfile, "ab") as err:
        r = subprocess.run([sys.executable, "-m", "chainfold.worker", *args], stdout=subprocess.PIPE,
                           stderr=err, stdin=subprocess.DEVNULL, timeout=timeout)
    summary = None
    for line in r.stdout.decode(errors="replace").splitlines():
        try:
            summary = json.loads(line)
        except ValueError:
            continue
    return r.returncode, summary


def _tail(path: Path, n: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


class _Files:
    """Where one demo run keeps its files."""

    def __init__(self, wd: Path) -> None:
        self.wd = wd
        self.snaps = wd / "snapshots"
        self.evidence = wd / "worker-evidence"
        self.state = wd / "worker-state.json"
        self.repaired = wd / "repaired-state.json"
        self.corrections = wd / "corrections.jsonl"


@dataclass
class _Story:
    """One demo run: the steps of the module docstring, each a method that narrates what it did and
    records it in ``demo`` (the report's ``demo`` section)."""

    files: _Files
    log: PulsarLog
    url: str
    svc: str
    events: int
    streams: int
    seed: int
    narrate: Callable[[str], None]
    worker_timeout: float
    demo: dict[str, Any]
    model: Any = field(default_factory=lambda: load_model(MODEL))
    plan: dict[str, Any] = field(init=False)
    evs: list[Event] = field(init=False)
    foreign_dups: list[Event] = field(init=False)
    meta: dict[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        self.plan = _plan(self.events)

    def publish(self, client: Any) -> None:
        """1. The account events, in small flushes; from another producer: two malformed entries
        (JSON instead of CBOR; no 'stream') and three events published a second time."""
        t0 = time.monotonic()
        evs = self.evs = _events(self.events, self.streams, self.seed)
        a, b = self.events // 3, 2 * self.events // 3
        other = PulsarLog(client, self.log.topic)  # another producer on the same topic
        self.foreign_dups = [evs[i] for i in (5, a // 2, a - 1)]
        try:
            _publish(self.log, evs[:a])
            bad1 = json.dumps({"id": "evt-json-1", "stream": "acct-0001", "type": "Deposited",
                               "data": {"amount": 100}}).encode()  # JSON, not CBOR: a foreign producer's mistake
            other.append_payloads([(bad1, "acct-0001", None)])
            _publish(self.log, evs[a:b])
            other.append_payloads((encode(e), e.stream, e.time) for e in self.foreign_dups)  # published again
            bad2 = cbor2.dumps({"id": "evt-nostream", "type": "Deposited", "time": evs[b].time,
                                "data": {"amount": 100}}, canonical=True)  # no 'stream'
            other.append_payloads([(bad2, None, evs[b].time)])
            _publish(self.log, evs[b:])
        finally:
            other.close()
        topic = self.log.topic
        n_entries = self.events + len(self.foreign_dups) + 2
        self.demo.update(topic=topic, log_entries=n_entries)
        self.narrate(f"[bold]1. publish[/]  {self.events:,} account events over {self.streams} accounts to "
                     f"{_e(topic)} ({time.monotonic() - t0:.1f}s)")
        self.narrate(f"   plus, from another producer: {len(self.foreign_dups)} events published a second time "
                     f"({_e(', '.join(e.id for e in self.foreign_dups))}) and 2 malformed entries (JSON instead of "
                     f"CBOR; an event without 'stream'): {n_entries:,} log entries")

    def run_worker(self) -> None:
        """2. The worker with faults: run 1 crashes on purpose after committing, run 2 resumes."""
        t0, ev, wd, plan = time.monotonic(), self.files.evidence, self.files.wd, self.plan
        etype, lo, hi = plan["mishandle"]
        faults = f"crash-before-ack:{plan['crash']};skip-every:{plan['skip_every']};mishandle:{etype}:{lo}:{hi}"
        self.demo["faults"] = faults
        wargs = ["--topic", self.log.topic, "--service-url", self.url, "--evidence", str(ev),
                 "--state", str(self.files.state), "--faults", faults, "--subscription", "payments",
                 "--flush-every", str(FLUSH_EVERY)]
        self.narrate(f"[bold]2. run the worker[/]  python -m chainfold.worker (Pulsar subscription 'payments', "
                     f"commit + ack every {FLUSH_EVERY} messages) with faults: {_e(faults)}")
        rc1, _ = _run_worker(wargs, wd / "worker-run1.log", self.worker_timeout)
        meta = json.loads((ev / META_NAME).read_text()) if (ev / META_NAME).exists() else {}
        if rc1 != CRASH_EXIT:
            raise DemoFailed(f"worker run 1 should have crashed on purpose (exit {CRASH_EXIT}) but exited "
                             f"{rc1}:\n{_tail(wd / 'worker-run1.log')}")
        tracked1 = load_tracker(str(ev / "checkpoints.jsonl")).size
        self.narrate(f"   run 1: received {meta.get('received', 0):,} messages, handled {tracked1:,}, then crashed "
                     f"after message {plan['crash']:,}: state and evidence committed, the last batch not acked")
        rc2, s2 = _run_worker(wargs, wd / "worker-run2.log", self.worker_timeout)
        if rc2 != 0 or s2 is None:
            raise DemoFailed(f"worker run 2 exited {rc2}:\n{_tail(wd / 'worker-run2.log')}")
        meta = self.meta = json.loads((ev / META_NAME).read_text())
        redelivered = meta["received"] - self.demo["log_entries"]
        self.narrate(f"   run 2 (restarted, same subscription): resumed from the committed state; the broker "
                     f"redelivered {redelivered:,} message(s): the {plan['crash'] % FLUSH_EVERY} not acked since the "
                     f"last commit, plus those whose acks were still in the client's ack-grouping window or in a "
                     f"partly acked batch. The worker handled them again; {s2['received']:,} received in this run, "
                     f"{s2['handled']:,} handled ({time.monotonic() - t0:.1f}s for both runs)")
        self.narrate(f"   the worker's own account of its faults: {len(meta['skipped'])} message(s) skipped, "
                     f"{len(meta['mishandled'])} {_e(etype)} event(s) mishandled (messages {lo:,}..{hi:,}), "
                     f"1 crash before ack")
        self.demo["worker"] = {"run2": s2, "received": meta["received"], "redelivered": redelivered,
                               "skipped": meta["skipped"], "mishandled": meta["mishandled"],
                               "crashes": meta["crashes"]}

    def _reconcile(self, **kw: Any) -> Any:
        return reconcile(self.log, self.model, snapshots_root=self.files.snaps, **kw)

    def detect(self) -> dict[str, Any]:
        """3. Reconcile the worker's evidence against the log; returns the evidence for the repair."""
        t0, ev, f = time.monotonic(), self.files.evidence, self.files
        evidence = {"state": load_state_export(str(f.state)), "state_path": str(f.state),
                    "processed": load_processed(str(ev / "processed.jsonl")),
                    "tracker": load_tracker(str(ev / "checkpoints.jsonl"))}
        self.narrate(f"[bold]3. detect[/]  chainfold reconcile {_e(self.log.topic)} --model {MODEL} --state "
                     f"{_e(f.state)} --processed {_e(ev / 'processed.jsonl')} --checkpoints "
                     f"{_e(ev / 'checkpoints.jsonl')} --snapshots {_e(f.snaps)}{_e(self.svc)}")
        fdoc = self._reconcile(**evidence).to_json()
        self.narrate(f"   verdict {fdoc['verdict'].upper()} after {time.monotonic() - t0:.1f}s: "
                     f"{fdoc['log']['events']:,} log entries, {fdoc['processed']['events']:,} handled by the worker")
        self._narrate_findings(fdoc, evidence["processed"].ids)
        detect = self.demo["detect"] = {k: fdoc[k] for k in ("verdict", "first_divergence")}
        detect.update({k: len(fdoc[k]) for k in ("missing", "duplicates", "out_of_order", "malformed",
                                                 "divergent_streams")})
        detect["tracker"] = fdoc.get("tracker") or None
        if fdoc["verdict"] != "divergent":
            raise DemoFailed(f"reconcile should have found the injected faults, but says {fdoc['verdict']}")
        return evidence

    def _narrate_findings(self, fdoc: dict[str, Any], handled: list[str]) -> None:
        """What reconcile found, told against what the worker says it did wrong."""
        meta, fd, say = self.meta, fdoc["first_divergence"], self.narrate
        if fd:
            say(f"   first divergence: entry {fd['index']:,} (segment {fd['segment']}), event {_e(fd['event_id'])}, "
                f"message {_e(fd['message_id'])}"
                + (": the first message the worker skipped" if fd["event_id"] in meta["skipped"] else ""))
        tinfo = fdoc.get("tracker") or {}
        if tinfo:
            say(f"   the tracker checkpoints alone name the same entry after {tinfo['comparisons']} hash "
                f"comparisons ({tinfo['checkpoints']} checkpoints, exact: {tinfo['exact']})")
        skipped = set(meta["skipped"])
        late = skipped & set(handled)
        say(f"   missed: {len(fdoc['missing'])} (the worker skipped {len(skipped)}; {len(late)} of those came "
            f"back, redelivered or as the other producer's copy, and were handled late)")
        worker_dups = {e for e, c in Counter(handled).items() if c > 1}
        again_ids = {e.id for e in self.foreign_dups} & worker_dups
        say(f"   duplicated: {len(fdoc['duplicates'])} event ids: {len(worker_dups)} handled twice by the worker "
            f"(its in-memory idempotency cache died in the crash, so redelivered messages"
            + (f" and {len(again_ids)} of the other producer's copies" if again_ids else "")
            + f" were applied again); {len(self.foreign_dups)} stored twice in the log")
        say(f"   out of order: {len(fdoc['out_of_order'])} (handled after a later event of the same account)")
        say(f"   malformed log entries: {len(fdoc['malformed'])} ({_e(', '.join(fdoc['malformed']))}), "
            "reported, never folded")
        etype = self.plan["mishandle"][0]
        mishandled = set(meta["mishandled"])
        mis_streams = {e.stream for e in self.evs if e.id in mishandled}
        ds = {d["stream"] for d in fdoc["divergent_streams"]}
        say(f"   divergent accounts: {len(ds)} of {self.streams} ({len(mis_streams & ds)} touched by the "
            f"mishandled {_e(etype)} events, the rest by duplicates and skips)")

    def repair(self, evidence: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        """4. Replay the divergent streams: the corrected state export and the corrections."""
        t0, f = time.monotonic(), self.files
        self.narrate(f"[bold]4. replay + repair[/]  chainfold reconcile ... --repair {_e(f.repaired)}")
        fixed = self._reconcile(**evidence, repair=True)
        doc = fixed.to_json()
        if fixed.repaired_states is None:
            self.narrate(f"   [bold red]no repair[/]: {_e('; '.join(doc['notes']) or doc['verdict'])}")
            return doc, fixed
        _write_json(f.repaired, fixed.repaired_states)
        f.corrections.write_text("".join(json.dumps(c, sort_keys=True) + "\n" for c in fixed.corrections))
        doc["repair"] = {"state": str(f.repaired), "corrections": str(f.corrections),
                         "streams": len(fixed.corrections)}
        rp = doc["replayed"]
        src = f"the snapshot at {rp['from_snapshot']:,} entries" if rp["from_snapshot"] is not None \
            else "the start of the log"
        self.narrate(f"   replayed {len(fixed.corrections)} divergent account(s) from {src} ({rp['events']:,} "
                     f"entries read, {time.monotonic() - t0:.1f}s); corrected state → {_e(f.repaired)}, "
                     f"{len(fixed.corrections)} corrections (each with an idempotency key) → {_e(f.corrections)}")
        return doc, fixed

    def validate(self, doc: dict[str, Any], fixed: Any) -> bool:
        """5. A fresh full rebuild equals the repaired state, verify finds the log intact, and the
        repaired export reconciles clean."""
        topic, f = self.log.topic, self.files
        checks: dict[str, Any] = {}
        self.narrate(f"[bold]5. validate[/]  chainfold rebuild {_e(topic)} --full --model {MODEL}; "
                     f"chainfold verify {_e(topic)}")
        fresh = rebuild(self.log, self.model, snapshots_root=f.snaps, full=True,
                        write_snapshots=False).folder.rendered()
        repaired = fixed.repaired_states or {}
        differ = sorted(s for s in set(fresh) | set(repaired) if fresh.get(s) != repaired.get(s))
        checks["rebuild_equals_repaired"] = not differ and bool(repaired)
        checks["streams_compared"] = len(set(fresh) | set(repaired))
        self.narrate(f"   fresh full rebuild vs repaired state: {checks['streams_compared']} accounts compared, "
                     + ("all equal" if not differ else f"{len(differ)} differ: {_e(', '.join(differ[:5]))}"))
        vr = verify_log(self.log, record_dir=topic_dir(f.snaps, topic), snapshots_root=f.snaps)
        vdoc = vr.to_json()
        checks["verify"] = vdoc["verdict"]
        self.narrate(f"   verify: {vdoc['verdict']} ({vdoc['log']['events']:,} entries, {vdoc['log']['segments']} "
                     f"segments, head {vdoc['log']['head'][:16]}…)")
        again = self._reconcile(state=repaired, state_path=str(f.repaired))
        checks["repaired_reconciles"] = again.verdict
        self.narrate(f"   chainfold reconcile {_e(topic)} --state {_e(f.repaired)}: {again.verdict}")
        self.demo["validation"] = checks
        return (doc["verdict"] == "repaired" and checks["rebuild_equals_repaired"] and vr.intact
                and again.verdict == "consistent")


def run_demo(
    *,
    events: int = 20_000,
    streams: int = 200,
    seed: int = 1,
    workdir: str | os.PathLike[str],
    broker: BrokerOptions = BrokerOptions(),
    narrate: Callable[[str], None] = lambda text: None,
    worker_timeout: float = 300.0,
) -> dict[str, Any]:
    """Run the recovery story (module docstring) in ``workdir``; return the repair report as JSON.

    The returned document is the reconcile report of the repair (verdict ``repaired`` when it
    worked) plus ``demo``: the topic, the faults injected, what each step found and
    ``demo.ok``: repaired and validated. Raises :class:`DemoFailed` when a worker does not behave
    as planned, and the usual chainfold errors (broker unreachable, ...).
    """
    if events < 100:
        raise DemoFailed("the demo needs at least 100 events")
    t_start = time.monotonic()
    files = _Files(Path(workdir))
    files.wd.mkdir(parents=True, exist_ok=True)
    if files.state.exists() or files.evidence.exists():
        raise BadInput(f"{files.wd} already holds a demo run (its worker would resume it): give a fresh --workdir")
    url = resolve_url(broker)  # the embedded broker (started if needed) or the given one
    demo: dict[str, Any] = {"workdir": str(files.wd), "seed": seed, "events": events, "streams": streams,
                            "service_url": url}
    svc = f" --service-url {broker.service_url}" if broker.service_url else \
        f" --data-dir {Path(broker.data_dir).absolute()}"
    client = connect(replace(broker, service_url=url))
    log = PulsarLog(client, f"demo-accounts-{uuid.uuid4().hex[:8]}")
    try:
        story = _Story(files, log, url, svc, events, streams, seed, narrate, worker_timeout, demo)
        story.publish(client)
        story.run_worker()
        evidence = story.detect()
        doc, fixed = story.repair(evidence)
        ok = story.validate(doc, fixed)
        demo["ok"] = ok
        demo["seconds"] = round(time.monotonic() - t_start, 2)
        doc["demo"] = demo
        html_path = files.wd / "reconcile-report.html"
        doc["html"] = str(html_path)
        atomic_write(html_path, render_report(doc).encode("utf-8"))
        narrate(("[bold green]repaired and validated[/]" if ok else "[bold red]NOT validated[/]")
                + f" in {demo['seconds']:.1f}s; everything is in {_e(files.wd)}")
        narrate(f"   the reconcile report for a browser: {_e(html_path)}")
        return doc
    finally:
        log.close()
        try:
            client.close()
        except Exception:  # pulsar raises its own types
            pass

"""``--engine spark`` on a real Spark (``local[2]``, one session shared by the test session): the
JSON report, the ``--out``/``--repair`` state export, the corrections, the recorded checkpoints and
leaf hashes, and the snapshots equal the local engine's byte for byte (timings removed), for
``rebuild``, ``verify`` (also ``--against`` a copy with a dropped entry) and ``reconcile`` (a
divergent worker; ``unknown_ids``/``unknown_streams``), with duplicates and malformed entries in the
log; on the embedded broker, and on Apache Pulsar with a partitioned topic. Poison events under each
``--on-model-error`` policy (the same error document or ``skipped``, snapshots recording them).
Failures: a broker gone (Spark retries the tasks, then exit 3). One command runs as its own process (a real
Spark start-up), and, marked slow, one on a loopback standalone cluster (scripts/spark-standalone).

Needs the chainfold[spark] extra and Java 17+; skipped without them, unless
``CHAINFOLD_TEST_REQUIRE_SPARK=1`` (set by ``make test``). Cluster ports:
``CHAINFOLD_TEST_SPARK_MASTER_PORT`` [7177], ``CHAINFOLD_TEST_SPARK_UI_PORT`` [8181] (the cluster
is shared with test_spark.py's slow test).
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from chainfold.cli import common
from chainfold.envelope import decode
from chainfold.errors import MalformedEnvelope
from chainfold.log.pulsar import PulsarLog

from .conftest import APACHE, unique_topic
from .distributed_cases import MODEL, POISON_MODEL, assert_same_store, events, messy, normalized

try:
    import pyspark  # noqa: F401
except ImportError:
    if os.environ.get("CHAINFOLD_TEST_REQUIRE_SPARK"):
        raise
    pytest.skip("needs PySpark: pip install 'chainfold[spark]' (make setup-spark)", allow_module_level=True)

pytestmark = [pytest.mark.spark, pytest.mark.broker]

SPARK = ("--engine", "spark", "--spark-master", "local[2]")
# On Apache Pulsar the Spark engine plans a topic never read before from internalStats (--admin-url)
ADMIN = ("--admin-url", os.environ["CHAINFOLD_TEST_ADMIN_URL"]) if APACHE and os.environ.get("CHAINFOLD_TEST_ADMIN_URL") else ()


@pytest.fixture
def invoke(monkeypatch: pytest.MonkeyPatch, spark: Any) -> Callable[..., Any]:
    """Run the CLI in this process (so ``--engine spark`` uses the shared session): ``run()`` ends
    the process with os._exit, so it exits through SystemExit here."""

    def fake_exit(code: int) -> None:
        raise SystemExit(code)

    monkeypatch.setattr(common, "exit_process", fake_exit)

    def call(*args: str) -> Any:
        return CliRunner().invoke(common.cli, [str(a) for a in args], catch_exceptions=False)

    return call


def _topic(pulsar_client: Any, partitions: int) -> PulsarLog:
    topic = unique_topic("sparkeng")
    if partitions:
        from .test_apache import create_partitioned_topic

        create_partitioned_topic(topic, partitions)
    return PulsarLog(pulsar_client, topic)


class Both:
    """The same command through the local engine (store ``tmp/local``) and the Spark engine
    (``tmp/spark``); the outputs compared."""

    def __init__(self, invoke: Callable[..., Any], tmp: Path, url: str) -> None:
        self.invoke, self.tmp, self.url = invoke, tmp, url
        self.roots = (tmp / "local", tmp / "spark")
        for r in self.roots:
            r.mkdir(exist_ok=True)

    def run(self, *args: str, code: int = 0, files: tuple[str, ...] = ()) -> dict[str, Any]:
        """``chainfold ARGS`` with ``{root}`` in an argument replaced by each engine's folder; the
        two JSON reports (normalized) and the files named (relative to the root) must be equal."""
        docs, blobs = [], []
        for root, extra in zip(self.roots, ((), SPARK)):
            argv = [str(a).replace("{root}", str(root)) for a in args]
            r = self.invoke(*argv, "--snapshots", root / "snapshots", "--service-url", self.url, "--json", *ADMIN, *extra)
            assert r.exit_code == code, r.output
            docs.append(normalized(json.loads(r.stdout), self.roots))
            blobs.append({f: (root / f).read_bytes() for f in files})
        assert docs[0] == docs[1]
        assert blobs[0] == blobs[1]
        return docs[0]

    def same_store(self, topic: str) -> None:
        assert_same_store(self.roots[0] / "snapshots", self.roots[1] / "snapshots", topic)


def _worker_evidence(plog: PulsarLog, tmp: Path, expected: dict[str, Any]) -> tuple[Path, Path]:
    """A worker that missed one event, handled one twice and one the log never had, got two
    streams wrong and keeps one the log never had."""
    ids: list[str] = []
    for p in plog.partitions():
        seen: set[str] = set()
        for e in plog.read(p):
            try:
                eid = decode(e.payload).id
            except MalformedEnvelope:
                continue
            if eid not in seen:
                seen.add(eid)
                ids.append(eid)
    del ids[40]
    ids.insert(9, ids[3])
    ids.insert(20, "an-id-from-elsewhere")
    processed = tmp / "processed.jsonl"
    processed.write_text("".join(json.dumps({"id": i}) + "\n" for i in ids))
    state = dict(expected)
    streams = sorted(state)
    state[streams[1]] = {"balance": -7}
    del state[streams[2]]
    state["never-in-the-log"] = {"balance": 1}
    export = tmp / "worker-state.json"
    export.write_text(json.dumps(state))
    return processed, export


def _story(invoke: Callable[..., Any], pulsar_client: Any, broker_url: str, tmp: Path, partitions: int) -> None:
    plog = _topic(pulsar_client, partitions)
    evs = messy(plog, 2500)
    both = Both(invoke, tmp, broker_url)
    topic = plog.topic

    doc = both.run("rebuild", topic, "--model", MODEL, "--snapshot-every", "700", "--out", "{root}/state.json",
                   files=("state.json",))
    assert doc["duplicates"] and doc["malformed"] and len(doc["snapshots_written"]) >= 3
    both.same_store(topic)

    plog.append(events(400, seed=8))
    plog.append(evs[100:120], assign_seq=False)  # duplicates of events the snapshots cover
    doc = both.run("rebuild", topic, "--model", MODEL, "--snapshot-every", "700", "--out", "{root}/state.json",
                   files=("state.json",))
    assert doc["snapshot"] is not None and len(doc["duplicates"]) >= 20
    both.same_store(topic)

    doc = both.run("verify", topic)
    assert doc["verdict"] == "intact" and doc["snapshots_checked"] >= 1
    both.same_store(topic)

    copy = PulsarLog(pulsar_client, unique_topic("sparkcopy")) if not partitions else _topic(pulsar_client, partitions)
    entries = [e for p in plog.partitions() for e in plog.read(p)]
    copy.append_payloads((e.payload, e.key, e.event_time) for i, e in enumerate(entries) if i != 1234)
    doc = both.run("verify", topic, "--against", copy.topic, code=1)
    assert doc["first_mismatch"] is not None

    expected = json.loads((both.roots[0] / "state.json").read_text())
    processed, export = _worker_evidence(plog, tmp, expected)
    doc = both.run("reconcile", topic, "--model", MODEL, "--state", export, "--processed", processed,
                   "--repair", "{root}/repaired.json", files=("repaired.json", "repaired.corrections.jsonl"))
    assert doc["verdict"] == "repaired" and len(doc["missing"]) == 1 and doc["divergent_streams"]
    assert doc["unknown_ids"] == ["an-id-from-elsewhere"] and doc["unknown_streams"] == ["never-in-the-log"]
    both.same_store(topic)


@pytest.mark.skipif(APACHE, reason="the embedded broker's story (Apache Pulsar: the partitioned one)")
def test_rebuild_verify_reconcile_on_the_embedded_broker(invoke, pulsar_client, broker_url: str,
                                                         tmp_path: Path) -> None:
    _story(invoke, pulsar_client, broker_url, tmp_path, 0)


@pytest.mark.apache
def test_rebuild_verify_reconcile_on_a_partitioned_apache_topic(invoke, pulsar_client, broker_url: str,
                                                                 tmp_path: Path) -> None:
    _story(invoke, pulsar_client, broker_url, tmp_path, 3)


def test_poison_events_under_each_policy_alike(invoke, pulsar_client, broker_url: str, tmp_path: Path) -> None:
    """``--on-model-error``: ``stop`` (exit 2, the same error document, the same snapshots before
    it); ``skip-stream`` (exit 1, the same ``skipped``, states and snapshots recording them), then
    from such a snapshot after more events; ``skip-event`` in reconcile (its reference and repair)."""
    model = tmp_path / "poison_model.py"
    model.write_text(POISON_MODEL)
    plog = _topic(pulsar_client, 0)
    from chainfold.envelope import Event

    poison = {7, 1800, 2100, 2600}
    evs = [Event(f"e{i}", f"s{i % 5}", None, "t", 1, {"poison": i in poison}) for i in range(3000)]
    plog.append(evs[:2500])
    both = Both(invoke, tmp_path, broker_url)
    ref = f"{model}:"
    doc = both.run("rebuild", plog.topic, "--model", ref, "--snapshot-every", "500", code=2)
    assert doc["event_id"] == "e7" and doc["stream"] == "s2"
    both.same_store(plog.topic)

    doc = both.run("rebuild", plog.topic, "--model", ref, "--snapshot-every", "500", "--on-model-error", "skip-stream",
                   "--out", "{root}/state.json", code=1, files=("state.json",))
    assert [k["event_id"] for k in doc["skipped"]][:2] == ["e7", "e12"] and doc["snapshot"] is None
    both.same_store(plog.topic)
    plog.append(evs[2500:])
    plog.append(evs[1795:1805], assign_seq=False)
    doc = both.run("rebuild", plog.topic, "--model", ref, "--snapshot-every", "500", "--on-model-error", "skip-stream",
                   "--out", "{root}/state.json", code=1, files=("state.json",))
    assert doc["snapshot"] is not None and doc["duplicates"] and any(k["event_id"] == "e2600" for k in doc["skipped"])
    both.same_store(plog.topic)

    export = tmp_path / "worker-state.json"
    state = json.loads((both.roots[0] / "state.json").read_text())
    state["s1"] = {"n": 0}
    export.write_text(json.dumps(state))
    doc = both.run("reconcile", plog.topic, "--model", ref, "--state", export, "--on-model-error", "skip-event",
                   "--repair", "{root}/repaired.json", code=1, files=("repaired.json",))
    assert doc["skipped"] and doc["processed"]["events"] is None
    both.same_store(plog.topic)


def test_seq_gaps_alike(invoke, pulsar_client, broker_url: str, tmp_path: Path) -> None:
    """A log with seq gaps (events never published, re-sent and foreign ones without ``seq``):
    rebuild and verify fail alike (exit 3, the same gaps, the same snapshots and their seq state),
    pass alike with ``--allow-partial-history``, again from a snapshot after more events; reconcile
    gives the same report."""
    from chainfold.envelope import encode

    from .test_reconcile import gen_events

    def publish(n: int, seed: int) -> None:
        evs = gen_events(n, 7, seed)
        rows = []
        for i, e in enumerate(evs):
            if i % 97 == 13:
                continue  # never published: a gap in its stream
            rows.append(e)
            if i % 89 == 5:
                rows.append(evs[i // 2])  # re-sent
            if i % 71 == 3:
                rows.append(e._replace(id=f"foreign-{seed}-{i}", seq=None))
        plog.append_payloads((encode(e), e.stream, e.time) for e in rows)

    plog = _topic(pulsar_client, 0)
    publish(1500, 1)
    both = Both(invoke, tmp_path, broker_url)
    topic = plog.topic
    doc = both.run("rebuild", topic, "--model", MODEL, "--snapshot-every", "400", "--out", "{root}/none.json", code=3)
    assert doc["history"] == "gaps" and doc["seq_gaps"] and doc["seq_unverifiable"]
    both.same_store(topic)
    doc = both.run("verify", topic, code=3)
    assert doc["seq_gaps"]
    for more in (0, 1):
        doc = both.run("rebuild", topic, "--model", MODEL, "--snapshot-every", "400", "--allow-partial-history",
                       "--out", "{root}/state.json", files=("state.json",))
        assert doc["seq_gaps"] and (doc["snapshot"] is not None or not more)
        both.same_store(topic)
        both.run("verify", topic, "--allow-partial-history")
        both.same_store(topic)
        publish(300, 2)  # the second time: the same events again (duplicates)
    export = tmp_path / "worker-state.json"
    export.write_text((both.roots[0] / "state.json").read_text())
    doc = both.run("reconcile", topic, "--model", MODEL, "--state", export, "--allow-partial-history")
    assert doc["seq_gaps"]


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_broker_gone_fails_the_tasks_then_the_job_with_exit_3(spark, pulsar_client, broker_url: str,
                                                                 tmp_path: Path) -> None:
    """Tasks that cannot reach the broker fail; Spark tries each 4 times; then the driver raises
    the task's own error (BrokerUnavailable, exit 3), not Spark's."""
    from chainfold.engines.distributed import distributed_verify
    from chainfold.engines.pool import PulsarSource
    from chainfold.engines.spark import SparkCluster
    from chainfold.engines.spark_io import PulsarPlanner
    from chainfold.errors import BrokerUnavailable
    from chainfold.engines.distributed import Distribution
    from chainfold.log.broker import BrokerOptions
    from chainfold.ops.verify import VerifyOptions

    plog = _topic(pulsar_client, 0)
    plog.append(events(300))
    gone = BrokerOptions(service_url=f"pulsar://127.0.0.1:{_dead_port()}", connect_timeout=0.5)
    dist = Distribution(SparkCluster(spark), PulsarSource(plog.topic, gone), PulsarPlanner(pulsar_client))
    with pytest.raises(BrokerUnavailable) as err:
        distributed_verify(dist, plog, VerifyOptions(record_dir=tmp_path / "rec"))
    assert err.value.exit_code == 3


@pytest.mark.skipif(APACHE, reason="once, in the pulsar-lite tier")
def test_a_command_in_its_own_process(cli, pulsar_client, broker_url: str, tmp_path: Path) -> None:
    """``chainfold rebuild --engine spark`` as a user runs it: its own Spark (local[2]) started and
    stopped, the same report and state export as the local engine's."""
    plog = _topic(pulsar_client, 0)
    messy(plog, 1500)
    outs = []
    for name, extra in (("local", ()), ("spark", SPARK)):
        r = cli("rebuild", plog.topic, "--model", MODEL, "--json", "--out", f"{name}.json", "--snapshots", name,
                *extra, timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
        assert r.stdout.lstrip().startswith("{")  # nothing but the report on stdout
        outs.append((normalized(json.loads(r.stdout), (tmp_path / "local", tmp_path / "spark")),
                     (tmp_path / f"{name}.json").read_bytes()))
    assert outs[0] == outs[1]
    assert_same_store(tmp_path / "local", tmp_path / "spark", plog.topic)


@pytest.mark.slow
@pytest.mark.skipif(APACHE, reason="the cluster runs once, in the pulsar-lite tier")
def test_rebuild_on_a_standalone_cluster(standalone_master: str, cli, pulsar_client, broker_url: str,
                                          tmp_path: Path) -> None:
    """A master and a worker of the PySpark install (scripts/spark-standalone, loopback), the
    command as a driver process with ``--spark-master spark://...``: the local engine's result."""
    plog = _topic(pulsar_client, 0)
    messy(plog, 3000)
    outs = []
    for name, extra in (("local", ()), ("spark", ("--engine", "spark", "--spark-master", standalone_master))):
        r = cli("rebuild", plog.topic, "--model", MODEL, "--json", "--out", f"{name}.json", "--snapshots", name,
                "--snapshot-every", "1000", *extra, timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
        outs.append((normalized(json.loads(r.stdout), (tmp_path / "local", tmp_path / "spark")),
                     (tmp_path / f"{name}.json").read_bytes()))
    assert outs[0] == outs[1]
    assert_same_store(tmp_path / "local", tmp_path / "spark", plog.topic)


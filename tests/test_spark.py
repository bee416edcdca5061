"""The Spark side of the engine (chainfold.engines.spark), on a real Spark: local mode (``local[2]``)
and, in a test marked slow, a loopback standalone cluster started by ``scripts/spark-standalone``.

Needs the chainfold[spark] extra and Java 17+; skipped without them, unless
``CHAINFOLD_TEST_REQUIRE_SPARK=1`` (set by ``make test``), where a missing extra fails.
Cluster ports: ``CHAINFOLD_TEST_SPARK_MASTER_PORT`` [7177], ``CHAINFOLD_TEST_SPARK_UI_PORT`` [8181].
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from chainfold.engines.spark import _with_retries, find_java_home
from chainfold.engines.spark_io import plan_partition
from chainfold.log.broker import BrokerOptions
from chainfold.log.pulsar import PulsarLog

from .conftest import APACHE, ROOT, unique_topic

try:
    import pyspark  # noqa: F401
except ImportError:
    if os.environ.get("CHAINFOLD_TEST_REQUIRE_SPARK"):
        raise
    pytest.skip("needs PySpark: pip install 'chainfold[spark]' (make setup-spark)", allow_module_level=True)

from chainfold.engines.spark import collect_ranges, read_ranges, spark_session  # noqa: E402

pytestmark = pytest.mark.spark


@pytest.fixture(scope="module")
def spark():
    with spark_session("local[2]", app_name="chainfold-tests") as s:
        yield s


def _topic(client, batched: int = 4000, single: int = 20) -> PulsarLog:
    plog = PulsarLog(client, unique_topic("spark"))
    plog.append_payloads([(b"e%d" % i, f"k{i % 7}", None) for i in range(batched)])
    p = client.create_producer(plog.topic, batching_enabled=False)
    for i in range(single):
        p.send(b"s%d" % i)
    p.close()
    return plog


def _serial(plog: PulsarLog, partition: str | None = None) -> list[tuple[str, bytes]]:
    return [(str(e.message_id), e.payload) for e in plog.read(partition)]


def test_master_urls_get_task_retries_in_local_mode() -> None:
    assert _with_retries("local[2]", 4) == "local[2,4]"
    assert _with_retries("local[*]", 3) == "local[*,3]"
    assert _with_retries("local", 4) == "local[1,4]"
    assert _with_retries("local[2,1]", 4) == "local[2,1]"  # said explicitly: kept
    assert _with_retries("spark://127.0.0.1:7177", 4) == "spark://127.0.0.1:7177"


def test_java_home_falls_back_from_a_bad_one(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("JAVA_HOME", str(tmp_path))  # no bin/java there
    home = find_java_home()
    assert (Path(home) / "bin" / "java").exists()


@pytest.mark.broker
def test_tasks_read_the_ranges_like_the_serial_read(spark, pulsar_client, broker_url: str) -> None:
    plog = _topic(pulsar_client)
    ranges = plan_partition(plog.topic, client=pulsar_client, target_ranges=6, min_entries=1)
    assert len(ranges) >= 3
    broker = BrokerOptions(service_url=broker_url)
    parts = collect_ranges(spark, broker, ranges, receiver_queue=50)
    got = [m for part in parts for m in part]
    assert got == _serial(plog)
    stats = read_ranges(spark, broker, ranges)
    assert [s.index for s in stats] == [r.index for r in ranges]
    assert [s.messages for s in stats] == [len(p) for p in parts]
    assert all(s.first == p[0][0] and s.last == p[-1][0] for s, p in zip(stats, parts))


@pytest.mark.apache
def test_tasks_read_a_partitioned_topic(spark, pulsar_client, broker_url: str) -> None:
    from .test_apache import create_partitioned_topic

    admin = os.environ["CHAINFOLD_TEST_ADMIN_URL"]
    topic = unique_topic("sparkp")
    create_partitioned_topic(topic, 3)
    plog = PulsarLog(pulsar_client, topic)
    plog.append_payloads([(b"m%d" % i, f"s{i % 13}", None) for i in range(5000)])
    ranges = [r for part in plog.partitions()
              for r in plan_partition(part, admin_url=admin, target_ranges=3, min_entries=1)]
    parts = collect_ranges(spark, BrokerOptions(service_url=broker_url), ranges)
    by_partition: dict[str, list] = {}
    for r, part in zip(ranges, parts):
        by_partition.setdefault(r.partition, []).extend(part)
    assert by_partition == {p: _serial(plog, p) for p in plog.partitions()}


def test_a_failed_task_is_retried_in_local_mode(spark, tmp_path: Path) -> None:
    """local[2] becomes local[2,4]: a task that fails once (as a read whose broker went away past
    its retry budget does) is run again and the job succeeds; one that always fails fails the job
    after the 4th attempt."""
    from pyspark.errors import PythonException

    marker = tmp_path / "failed-once"

    def flaky(it):
        if not marker.exists():
            marker.touch()
            raise RuntimeError("first attempt fails")
        yield sum(it)

    assert spark.sparkContext.parallelize(range(10), 1).mapPartitions(flaky).collect() == [45]
    attempts = tmp_path / "attempts"

    def always(it):
        with open(attempts, "a") as f:
            f.write("x")
        raise RuntimeError("always fails")
        yield  # pragma: no cover

    with pytest.raises(PythonException, match="always fails"):
        spark.sparkContext.parallelize(range(3), 1).mapPartitions(always).collect()
    assert attempts.read_text() == "xxxx"


# --- a loopback standalone cluster -----------------------------------------------------------------


@pytest.fixture(scope="module")
def standalone_master() -> Iterator[str]:
    """A master and a worker from ``scripts/spark-standalone`` on loopback; stopped afterwards."""
    data = Path(tempfile.mkdtemp(prefix="chainfold-spark-cluster-"))
    script = str(ROOT / "scripts" / "spark-standalone")
    opts = ["--data", str(data), "--port", os.environ.get("CHAINFOLD_TEST_SPARK_MASTER_PORT", "7177"),
            "--ui-port", os.environ.get("CHAINFOLD_TEST_SPARK_UI_PORT", "8181"), "--cores", "2", "--memory", "1g"]
    started = subprocess.run([script, "start", *opts], capture_output=True, text=True, timeout=300)
    try:
        assert started.returncode == 0, f"spark-standalone start failed:\n{started.stderr[-3000:]}"
        status = subprocess.run([script, "status", *opts], capture_output=True, text=True, timeout=60)
        assert status.returncode == 0, status.stdout + status.stderr
        yield started.stdout.strip()
    finally:
        subprocess.run([script, "stop", *opts], capture_output=True, text=True, timeout=120)
        shutil.rmtree(data, ignore_errors=True)


_CLUSTER_JOB = """
import json, sys
import pulsar
from chainfold.engines.spark import collect_ranges, spark_session
from chainfold.engines.spark_io import plan_partition
from chainfold.log.broker import BrokerOptions, client_logger

master, url, topic = sys.argv[1:]
client = pulsar.Client(url, logger=client_logger())
ranges = plan_partition(topic, client=client, target_ranges=4, min_entries=1)
client.close()
conf = {"spark.executor.memory": "512m", "spark.cores.max": "2"}
with spark_session(master, app_name="chainfold-cluster-test", conf=conf) as s:
    assert s.sparkContext.master == master, s.sparkContext.master
    parts = collect_ranges(s, BrokerOptions(service_url=url), ranges)
print(json.dumps([[i, p.hex()] for part in parts for i, p in part]))
"""


@pytest.mark.slow
@pytest.mark.broker
@pytest.mark.skipif(APACHE, reason="the cluster runs once, in the pulsar-lite tier")
def test_standalone_cluster_reads_the_ranges(standalone_master: str, pulsar_client, broker_url: str) -> None:
    """A driver process (as the CLI will be) runs the read stage on the cluster's executors."""
    import json
    import sys

    assert standalone_master.startswith("spark://127.0.0.1:")
    plog = _topic(pulsar_client, 3000, 5)
    r = subprocess.run([sys.executable, "-c", _CLUSTER_JOB, standalone_master, broker_url, plog.topic],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    got = [(i, bytes.fromhex(p)) for i, p in json.loads(r.stdout)]
    assert got == _serial(plog)

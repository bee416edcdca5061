"""Shared fixtures.

Broker tests run against a real broker process: by default an embedded pulsar-lite broker started
for the session; with ``CHAINFOLD_TEST_SERVICE_URL`` set (e.g. by ``scripts/test-apache``), against
that broker instead (Apache Pulsar in the integration tier). The log contract suite runs against
the in-memory log and the Pulsar-backed log alike.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from chainfold.log.broker import EmbeddedBroker
from chainfold.log import EventLog, MemoryLog

ROOT = Path(__file__).resolve().parent.parent
APACHE = bool(os.environ.get("CHAINFOLD_TEST_SERVICE_URL"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_apache = pytest.mark.skip(reason="needs Apache Pulsar: run via scripts/test-apache")
    for item in items:
        if "apache" in item.keywords and not APACHE:
            item.add_marker(skip_apache)


@pytest.fixture(scope="session")
def broker_url() -> Iterator[str]:
    """Service URL of a real broker for this test session."""
    url = os.environ.get("CHAINFOLD_TEST_SERVICE_URL")
    if url:
        yield url
        return
    data = Path(tempfile.mkdtemp(prefix="chainfold-test-broker-"))
    broker = EmbeddedBroker(data)
    url = broker.acquire(pinned=True)
    try:
        yield url
    finally:
        broker.stop()
        shutil.rmtree(data, ignore_errors=True)


@pytest.fixture(scope="session")
def spark():
    """One Spark session (``local[2]``) for the whole test session: every Spark test shares it, and
    a command run in-process with ``--engine spark`` uses it (chainfold uses a session the process
    already runs)."""
    from chainfold.engines.spark import spark_session

    with spark_session("local[2]", app_name="chainfold-tests") as s:
        yield s


@pytest.fixture(scope="session")
def standalone_master() -> Iterator[str]:
    """A Spark master and a worker from ``scripts/spark-standalone`` on loopback (ports
    ``CHAINFOLD_TEST_SPARK_MASTER_PORT`` [7177], ``CHAINFOLD_TEST_SPARK_UI_PORT`` [8181]), shared by
    the slow cluster tests; stopped afterwards. Yields the master URL."""
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


@pytest.fixture(scope="session")
def pulsar_client(broker_url: str):
    import pulsar

    from chainfold.log.broker import pulsar_logger

    client = pulsar.Client(broker_url, logger=pulsar_logger(), operation_timeout_seconds=20)
    yield client
    client.close()


def unique_topic(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def topic() -> str:
    return unique_topic()


@pytest.fixture(params=["memory", pytest.param("pulsar", marks=pytest.mark.broker)])
def make_log(request: pytest.FixtureRequest) -> Iterator[Callable[..., EventLog]]:
    """A factory of fresh, empty logs of the parametrised kind (same suite for both)."""
    made: list[EventLog] = []

    def factory(**kw: object) -> EventLog:
        if request.param == "memory":
            lg: EventLog = MemoryLog(unique_topic(), **kw)  # type: ignore[arg-type]
        else:
            from chainfold.log.pulsar import PulsarLog

            client = request.getfixturevalue("pulsar_client")
            lg = PulsarLog(client, unique_topic(), **kw)  # type: ignore[arg-type]
        made.append(lg)
        return lg

    factory.kind = request.param  # type: ignore[attr-defined]
    yield factory
    for lg in made:
        lg.close()


def run_cli(*args: str, input: str | None = None, env: dict[str, str] | None = None,
            cwd: str | Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run ``chainfold ARGS`` as a subprocess (the installed console script's module)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "chainfold", *args], input=input, capture_output=True, text=True,
        env=full_env, cwd=cwd, timeout=timeout,
    )


@pytest.fixture
def cli(broker_url: str, tmp_path: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run the CLI against the session's broker, in a temporary working directory."""

    def call(*args: str, **kw: object) -> subprocess.CompletedProcess[str]:
        env = {"CHAINFOLD_SERVICE_URL": broker_url, **(kw.pop("env", None) or {})}  # type: ignore[dict-item]
        kw.setdefault("cwd", tmp_path)
        return run_cli(*args, env=env, **kw)  # type: ignore[arg-type]

    return call

"""The Apache Spark engine: a replay as a Spark job (``--engine spark``).

PySpark is an optional extra (``pip install chainfold[spark]``); nothing else in chainfold imports
this module, and it imports PySpark only when a session is made, so a missing extra is reported as
:class:`SparkUnavailable` ("install chainfold[spark]") by the command that asked for Spark.

What is here now: the session (master URL, a Java 17+ found for it, loopback-only networking, task
retries also in local mode) and the job that reads a plan's ranges in tasks
(:func:`read_ranges`), on which the engine's stages are wired (design: :mod:`.spark_io`).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import BadInput
from ..log.broker import BrokerOptions
from .spark_io import ReadRange, open_range

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql import SparkSession

__all__ = [
    "ENV_MASTER",
    "DEFAULT_MASTER",
    "SparkUnavailable",
    "require_pyspark",
    "find_java_home",
    "spark_session",
    "RangeStats",
    "read_ranges",
    "collect_ranges",
]

ENV_MASTER = "CHAINFOLD_SPARK_MASTER"
DEFAULT_MASTER = "local[*]"
TASK_MAX_FAILURES = 4  # Spark's default on a cluster; local mode needs it spelt into the master URL
_JAVA_MIN = 17


class SparkUnavailable(BadInput):
    """``--engine spark`` cannot run here: PySpark (the ``chainfold[spark]`` extra) or a Java 17+
    runtime is missing. ``missing`` names which."""

    def __init__(self, missing: str, detail: str) -> None:
        self.missing = missing
        super().__init__(detail)


def require_pyspark() -> Any:
    """The ``pyspark`` module, or :class:`SparkUnavailable` saying how to install it."""
    try:
        import pyspark
    except ImportError as exc:
        raise SparkUnavailable(
            "pyspark",
            f"--engine spark needs PySpark: install chainfold[spark] (pip install 'chainfold[spark]'); {exc}",
        ) from None
    return pyspark


def _java_major(java: str) -> int | None:
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30).stderr
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r'version "(?:1\.)?(\d+)', out)
    return int(m.group(1)) if m else None


def find_java_home() -> str:
    """A ``JAVA_HOME`` whose Java is 17 or newer: ``$JAVA_HOME`` if it qualifies, else the ``java``
    on ``PATH``, else one under ``/usr/lib/jvm`` (17 and 21 first: the versions Spark 4 supports).
    :class:`SparkUnavailable` if there is none, saying what was found."""
    seen: list[str] = []
    candidates: list[Path] = []
    if os.environ.get("JAVA_HOME"):
        candidates.append(Path(os.environ["JAVA_HOME"]) / "bin" / "java")
    on_path = shutil.which("java")
    if on_path:
        candidates.append(Path(on_path).resolve())
    jvms = sorted(Path("/usr/lib/jvm").glob("*/bin/java"))
    candidates += sorted(jvms, key=lambda p: (not re.search(r"-(17|21)[-.]", str(p)), str(p)))
    for java in candidates:
        if not java.exists():
            continue
        major = _java_major(str(java))
        seen.append(f"{java} ({major or 'unknown version'})")
        if major is not None and major >= _JAVA_MIN:
            return str(java.resolve().parent.parent)
    raise SparkUnavailable("java", "--engine spark needs a Java 17+ runtime (set JAVA_HOME to one); found: "
                           + (", ".join(seen) or "no java"))


def _with_retries(master: str, max_failures: int) -> str:
    """``local[N]``/``local[*]``/``local`` retry nothing unless the URL says ``local[N,F]``."""
    if master == "local":
        return f"local[1,{max_failures}]"
    m = re.fullmatch(r"local\[(\d+|\*)\]", master)
    return f"local[{m.group(1)},{max_failures}]" if m else master


@contextlib.contextmanager
def spark_session(
    master: str | None = None,
    *,
    app_name: str = "chainfold",
    conf: dict[str, str] | None = None,
    max_failures: int = TASK_MAX_FAILURES,
) -> Iterator["SparkSession"]:
    """A Spark session on ``master`` (default ``$CHAINFOLD_SPARK_MASTER`` or ``local[*]``), stopped
    on exit.

    The driver binds to 127.0.0.1 unless ``conf`` says otherwise (a cluster beyond this machine
    needs ``spark.driver.host``); executors run this interpreter (``spark.pyspark.python``) unless
    set; the UI and the console progress bar are off (stdout stays clean for ``--json``); a task is
    tried ``max_failures`` times before the job fails, in local mode too.
    """
    require_pyspark()
    from pyspark import SparkContext

    active = SparkContext._active_spark_context
    if active is not None:
        raise BadInput(f"a Spark session is already running in this process (master {active.master}); "
                       "chainfold runs one at a time")
    os.environ["JAVA_HOME"] = find_java_home()
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    from pyspark.sql import SparkSession

    master = _with_retries(master or os.environ.get(ENV_MASTER) or DEFAULT_MASTER, max_failures)
    settings = {
        "spark.driver.host": "127.0.0.1",
        "spark.driver.bindAddress": "127.0.0.1",
        "spark.ui.enabled": "false",
        "spark.ui.showConsoleProgress": "false",
        "spark.task.maxFailures": str(max_failures),
        "spark.pyspark.python": sys.executable,
        "spark.python.worker.reuse": "true",
        **(conf or {}),
    }
    builder = SparkSession.builder.master(master).appName(app_name)
    for k, v in settings.items():
        builder = builder.config(k, v)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(os.environ.get("CHAINFOLD_SPARK_LOG", "ERROR"))
    try:
        yield spark
    finally:
        spark.stop()


# --- the read stage as a Spark job -----------------------------------------------------------------


@dataclass(frozen=True)
class RangeStats:
    """What one task read: the range, messages and payload bytes, first and last message id,
    redeliveries dropped, reconnections, and the task's read time (s, from reader open to close)."""

    partition: str
    index: int
    messages: int
    payload_bytes: int
    first: str | None
    last: str | None
    redelivered: int
    reconnects: int
    seconds: float


def _ranges_rdd(spark: "SparkSession", ranges: Sequence[ReadRange]) -> Any:
    """An RDD with one Spark partition per range, in plan order (one task each)."""
    return spark.sparkContext.parallelize(list(enumerate(ranges)), max(1, len(ranges)))


def _count_task(broker: BrokerOptions, reader_kw: dict[str, Any]) -> Callable[[Iterable[tuple[int, ReadRange]]], Iterator[RangeStats]]:
    def run(items: Iterable[tuple[int, ReadRange]]) -> Iterator[RangeStats]:
        for _, rng in items:
            t0 = time.perf_counter()
            n = size = 0
            first = None
            with open_range(broker, rng, **reader_kw) as reader:
                for entry in reader:
                    if first is None:
                        first = str(entry.message_id)
                    n += 1
                    size += len(entry.payload)
            yield RangeStats(rng.partition, rng.index, n, size, first, str(reader.last) if reader.last else None,
                             reader.redelivered, reader.reconnects, time.perf_counter() - t0)

    return run


def read_ranges(spark: "SparkSession", broker: BrokerOptions, ranges: Sequence[ReadRange],
                **reader_kw: Any) -> list[RangeStats]:
    """Read every range in a task of its own and count (the read stage alone); in plan order."""
    return _ranges_rdd(spark, ranges).mapPartitions(_count_task(broker, reader_kw)).collect()


def collect_ranges(spark: "SparkSession", broker: BrokerOptions, ranges: Sequence[ReadRange],
                   **reader_kw: Any) -> list[list[tuple[str, bytes]]]:
    """Every range's ``(message id, payload)`` pairs, read in tasks, in plan order (for tests:
    small topics only, everything comes back to the driver)."""

    def run(items: Iterable[tuple[int, ReadRange]]) -> Iterator[list[tuple[str, bytes]]]:
        for _, rng in items:
            with open_range(broker, rng, **reader_kw) as reader:
                yield [(str(e.message_id), e.payload) for e in reader]

    return _ranges_rdd(spark, ranges).mapPartitions(run).collect()

"""The Apache Spark engine: a replay as a Spark job (``--engine spark``).

PySpark is an optional extra (``pip install chainfold[spark]``); nothing else in chainfold imports
this module, and it imports PySpark only when a session is made, so a missing extra is reported as
:class:`~chainfold.errors.SparkUnavailable` ("install chainfold[spark]") by the command that asked
for Spark.

Here: the session (master URL, a Java 17+ found for it, loopback-only networking unless configured,
task retries also in local mode); :class:`SparkCluster`, the
:class:`~chainfold.engines.cluster.Cluster` the distributed driver (:mod:`.distributed`) runs its
tasks on (chunks cached in the executors, the dedup and fold shuffles, chainfold's errors carried
back from executors to the driver); :func:`spark_distribution`, everything a command needs to run
on Spark; and the read stage alone as a job (:func:`read_ranges`, for benchmarks).
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import pickle
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import BadInput, ChainfoldError, SparkUnavailable, WorkerFailed
from ..log import EventLog
from ..log.broker import BrokerOptions
from .cluster import Shared, group_of
from .spark_io import RANGE_QUEUE, PulsarPlanner, ReadRange, open_range
from .tasks import Chunk

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql import SparkSession

__all__ = [
    "ENV_MASTER",
    "DEFAULT_MASTER",
    "SparkUnavailable",
    "SparkCluster",
    "spark_cluster",
    "pulsar_distribution",
    "require_pyspark",
    "find_java_home",
    "spark_session",
    "RangeStats",
    "read_ranges",
    "collect_ranges",
]

log = logging.getLogger("chainfold.engines.spark")

ENV_MASTER = "CHAINFOLD_SPARK_MASTER"
DEFAULT_MASTER = "local[*]"
TASK_MAX_FAILURES = 4  # Spark's default on a cluster; local mode needs it spelt into the master URL
_JAVA_MIN = 17


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


def on_this_machine(master: str) -> bool:
    """Whether ``master`` runs on this machine (``local[...]``, or a ``spark://`` master on a
    loopback address): then the driver binds to 127.0.0.1 and executors run this interpreter."""
    return master.startswith("local") or re.match(r"spark://(127\.|localhost[:/]|\[::1\])", master + "/") is not None


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

    With a master on this machine (:func:`on_this_machine`) the driver binds to 127.0.0.1 and
    executors run this interpreter (``spark.pyspark.python``); with any other master, Spark's own
    settings decide (``spark-defaults.conf``, ``SPARK_LOCAL_IP``, ``PYSPARK_PYTHON``: the executors'
    interpreter, this one's path unless set). ``conf`` overrides either. The UI and the console
    progress bar are off (stdout stays clean for ``--json``); a task is tried ``max_failures`` times
    before the job fails, in local mode too.

    A session this process already runs (a notebook's, a test session's) is used as it is and left
    running; a warning says so when its master is not ``master``.
    """
    require_pyspark()
    from pyspark import SparkContext

    submitted = "PYSPARK_GATEWAY_PORT" in os.environ and not (master or os.environ.get(ENV_MASTER))
    master = _with_retries(master or os.environ.get(ENV_MASTER) or DEFAULT_MASTER, max_failures)
    active = SparkContext._active_spark_context
    if active is not None:
        from pyspark.sql import SparkSession

        if active.master != master:
            log.warning("using the Spark session this process already runs (master %s), not %s", active.master, master)
        yield SparkSession(active)
        return
    os.environ["JAVA_HOME"] = find_java_home()
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    from pyspark.sql import SparkSession

    settings = {
        "spark.ui.enabled": "false",
        "spark.ui.showConsoleProgress": "false",
        "spark.task.maxFailures": str(max_failures),
        "spark.python.worker.reuse": "true",
    }
    if on_this_machine(master):
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
        settings.update({"spark.driver.host": "127.0.0.1", "spark.driver.bindAddress": "127.0.0.1",
                         "spark.pyspark.python": sys.executable})
    settings.update(conf or {})
    builder = SparkSession.builder.appName(app_name)
    if submitted:  # run by spark-submit: its --master (and --conf) stand, this process's defaults do not
        settings = {k: v for k, v in settings.items() if not k.startswith(("spark.driver.", "spark.pyspark."))}
        log.info("run by spark-submit: its master and settings are used")
    else:
        builder = builder.master(master)
    for k, v in settings.items():
        builder = builder.config(k, v)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(os.environ.get("CHAINFOLD_SPARK_LOG", "ERROR"))
    try:
        yield spark
    finally:
        spark.stop()


# --- errors from executors -----------------------------------------------------------------------

_MARK = "chainfold-error:"
_MARK_END = ":chainfold-error-end"
T = TypeVar("T")


def _carry(exc: ChainfoldError) -> RuntimeError:
    """An exception whose text carries ``exc`` (pickled): Spark hands the driver an executor's
    error as text only."""
    return RuntimeError(_MARK + base64.b64encode(pickle.dumps(exc)).decode() + _MARK_END)


def _carrying(fn: Callable[..., T]) -> Callable[..., T]:
    """``fn`` run in an executor: a chainfold error it raises reaches the driver whole."""

    def run(*args: Any, **kw: Any) -> T:
        try:
            return fn(*args, **kw)
        except ChainfoldError as exc:
            raise _carry(exc) from None

    return run


def _carrying_iter(fn: Callable[..., Iterable[T]]) -> Callable[..., Iterator[T]]:
    """:func:`_carrying` for a function that returns an iterable (raising while iterated)."""

    def run(*args: Any, **kw: Any) -> Iterator[T]:
        try:
            yield from fn(*args, **kw)
        except ChainfoldError as exc:
            raise _carry(exc) from None

    return run


def driver_error(exc: BaseException) -> ChainfoldError:
    """The chainfold error an executor raised, from the exception a failed Spark job gives the
    driver; else :class:`~chainfold.errors.WorkerFailed` saying what Spark said (exit 3: Spark
    gave up after retrying the task)."""
    text = str(exc)
    i = text.find(_MARK)
    if i >= 0:
        j = text.find(_MARK_END, i)
        try:
            err = pickle.loads(base64.b64decode(text[i + len(_MARK) : j]))
            if isinstance(err, ChainfoldError):
                return err
        except Exception:  # noqa: BLE001 - fall through to the generic report
            pass
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    detail = next((ln for ln in reversed(lines) if "Error" in ln or "Exception" in ln), lines[-1] if lines else repr(exc))
    return WorkerFailed(f"the Spark job failed after its retries: {detail[:500]}")


@contextlib.contextmanager
def _spark_errors() -> Iterator[None]:
    try:
        yield
    except ChainfoldError:
        raise
    except Exception as exc:  # py4j / PySpark errors of a failed job
        if type(exc).__module__.startswith(("py4j", "pyspark")):
            raise driver_error(exc) from None
        raise


# --- the cluster -----------------------------------------------------------------------------------


def _by_bucket(keys: Any, positions: Any, buckets: int) -> Iterator[tuple[int, tuple[bytes, bytes]]]:
    """``(bucket, (keys, positions))`` column pieces of one chunk, a record per bucket."""
    import numpy as np

    which = keys % np.uint64(buckets)
    for b in np.unique(which):
        mask = which == b
        yield int(b), (keys[mask].tobytes(), positions[mask].tobytes())


def _repeats(records: Iterable[tuple[int, tuple[bytes, bytes]]]) -> Iterator[tuple[bytes, bytes]]:
    """The keys (and their positions) that occur more than once in one bucket's records."""
    import numpy as np

    ks, ps = [], []
    for _, (kb, pb) in records:
        ks.append(np.frombuffer(kb, dtype=np.uint64))
        ps.append(np.frombuffer(pb, dtype=np.int64))
    if not ks:
        return
    k, p = np.concatenate(ks), np.concatenate(ps)
    order = np.argsort(k, kind="stable")
    k, p = k[order], p[order]
    same = k[1:] == k[:-1]
    rep = np.zeros(len(k), dtype=bool)
    rep[1:] |= same
    rep[:-1] |= same
    if rep.any():
        yield k[rep].tobytes(), p[rep].tobytes()


class _SparkChunks:
    """The chunks of one read, cached in the executors (one Spark partition per range)."""

    def __init__(self, cluster: SparkCluster, rdd: Any, n: int) -> None:
        self.cluster = cluster
        self.rdd = rdd
        self.n = n

    def collect(self, fn: Callable[[Chunk], T]) -> list[T]:
        with _spark_errors():
            return self.rdd.map(_carrying(fn)).collect()

    def stream(self, fn: Callable[[Chunk], T]) -> Iterator[T]:
        """Results in range order, ``parallelism`` ranges per job: the driver holds that many."""
        sc = self.cluster.sc
        mapped = self.rdd.map(_carrying(fn))
        step = max(1, self.cluster.parallelism)
        for lo in range(0, self.n, step):
            with _spark_errors():
                got = sc.runJob(mapped, lambda it: it, partitions=list(range(lo, min(self.n, lo + step))))
            yield from got

    def repeated(self, pairs: Callable[[Chunk], tuple[Sequence[str], Sequence[int]]],
                 prior: Collection[str] = ()) -> list[tuple[str, tuple[int, ...]]]:
        """Keys hashed to 64 bits (:func:`~chainfold.replay.dedup.id_keys`) and shuffled in column
        pieces, one record per chunk and bucket; the keys whose hash occurs more than once are then
        looked up exactly (distinct ids sharing a hash are told apart there)."""
        import numpy as np

        from ..replay.dedup import id_keys

        sc, buckets = self.cluster.sc, self.cluster.groups

        def bucketed(chunk: Chunk) -> Iterator[tuple[int, tuple[bytes, bytes]]]:
            ids, positions = pairs(chunk)
            return _by_bucket(id_keys(ids), np.asarray(positions, dtype=np.int64), buckets)

        records = self.rdd.flatMap(_carrying_iter(bucketed))
        prior = list(prior)
        prior_keys = id_keys(prior) if prior else None
        if prior_keys is not None:
            records = records.union(sc.parallelize(list(_by_bucket(prior_keys, np.full(len(prior), -1, dtype=np.int64),
                                                                    buckets)), buckets))
        with _spark_errors():
            found = records.partitionBy(buckets, lambda b: b).mapPartitions(_carrying_iter(_repeats)).collect()
        keys = np.concatenate([np.frombuffer(k, dtype=np.uint64) for k, _ in found]) if found else np.zeros(0, np.uint64)
        wanted = self.cluster.share(frozenset(int(g) for _, p in found for g in np.frombuffer(p, dtype=np.int64) if g >= 0))

        def named(chunk: Chunk) -> list[tuple[str, int]]:
            ids, positions = pairs(chunk)
            return [(i, g) for i, g in zip(ids, positions) if g in wanted.value]

        by_id: dict[str, list[int]] = {}
        if prior_keys is not None and len(keys):
            for i in np.flatnonzero(np.isin(prior_keys, keys)):
                by_id[prior[i]] = [-1]
        if wanted.value:
            for part in self.collect(named):
                for i, g in part:
                    by_id.setdefault(i, []).append(g)
        return [(i, tuple(sorted(v))) for i, v in by_id.items() if len(v) > 1]

    def fold(self, items: Callable[[Chunk], Iterable[tuple[str, int, Any]]], start: Sequence[tuple[str, int, Any]],
             fold: Callable[[Iterator[tuple[str, int, Any]]], Iterator[T]], groups: int | None = None) -> list[T]:
        """Items shuffled in lists, one record per chunk and group; each group's items sorted by
        stream and position in the task that folds them."""
        sc = self.cluster.sc
        n = groups or self.cluster.groups

        def grouped(chunk: Chunk) -> list[tuple[int, list[tuple[str, int, Any]]]]:
            return _grouped(items(chunk), n)

        records = self.rdd.flatMap(_carrying_iter(grouped))
        if start:
            records = records.union(sc.parallelize(_grouped(start, n), n))

        def run(it: Iterable[tuple[int, list[tuple[str, int, Any]]]]) -> Iterator[T]:
            everything = [x for _, part in it for x in part]
            everything.sort(key=_stream_and_position)
            return fold(iter(everything))

        with _spark_errors():
            return records.partitionBy(n, lambda g: g).mapPartitions(_carrying_iter(run)).collect()

    def release(self) -> None:
        try:
            self.rdd.unpersist()
        except Exception:  # noqa: BLE001 - a session already stopped has nothing cached
            pass


def _stream_and_position(item: tuple[str, int, Any]) -> tuple[str, int]:
    return item[0], item[1]


def _grouped(items: Iterable[tuple[str, int, Any]], groups: int) -> list[tuple[int, list[tuple[str, int, Any]]]]:
    out: dict[int, list[tuple[str, int, Any]]] = {}
    of: dict[str, int] = {}
    for it in items:
        g = of.get(it[0])
        if g is None:
            g = of[it[0]] = group_of(it[0], groups)
        out.setdefault(g, []).append(it)
    return list(out.items())


class SparkCluster:
    """The :class:`~chainfold.engines.cluster.Cluster` of a Spark session: a read is an RDD with
    one partition per range, cached (memory, then disk) in the executors; shares are broadcasts;
    the dedup shuffle is a ``reduceByKey`` and the fold's a ``repartitionAndSortWithinPartitions``
    by stream into ``groups`` partitions (default: twice the default parallelism). A chainfold error
    an executor raises (a broker gone past its retry budget, a log shorter than planned) fails the
    task; Spark retries it, and when it gives up the driver raises that error
    (:func:`driver_error`)."""

    def __init__(self, spark: "SparkSession", *, groups: int | None = None) -> None:
        self.spark = spark
        self.sc = spark.sparkContext
        self.groups = groups or max(2, 2 * self.sc.defaultParallelism)

    @property
    def parallelism(self) -> int:
        return int(self.sc.defaultParallelism)

    def share(self, value: Any) -> Shared:
        return self.sc.broadcast(value)

    def read(self, tasks: Sequence[Callable[[], Chunk]]) -> _SparkChunks:
        from pyspark import StorageLevel

        n = max(1, len(tasks))
        rdd = self.sc.parallelize(list(tasks), n).map(_carrying(lambda task: task()))
        rdd.persist(StorageLevel.MEMORY_AND_DISK)
        return _SparkChunks(self, rdd, len(tasks))


@contextlib.contextmanager
def spark_cluster(master: str | None = None, *, conf: dict[str, str] | None = None) -> Iterator[SparkCluster]:
    """A :class:`SparkCluster` on a new session (see :func:`spark_session`), stopped on exit."""
    with spark_session(master, conf=conf) as spark:
        yield SparkCluster(spark)


def pulsar_distribution(cluster: Any, topic: str, broker: BrokerOptions, client: Any,
                        admin_url: str | None = None) -> Any:
    """What the distributed driver needs to replay ``topic`` on ``cluster``: tasks that open the
    topic on ``broker`` (given by URL: executors never start an embedded broker), each with a
    connection of its own, and a planner that asks ``client`` (``internalStats`` at ``admin_url``
    when given, else probing). A :class:`~chainfold.engines.distributed.Distribution`."""
    from .distributed import Distribution
    from .pool import PulsarSource

    if not broker.service_url:
        raise BadInput("the Spark engine reads from a broker given by URL (resolve the embedded one first)")
    return Distribution(cluster, PulsarSource(topic, broker, receiver_queue=RANGE_QUEUE), PulsarPlanner(client, admin_url))


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


def _count_task(open_log: Callable[[], EventLog], reader_kw: dict[str, Any]) -> Callable[[Iterable[tuple[int, ReadRange]]], Iterator[RangeStats]]:
    def run(items: Iterable[tuple[int, ReadRange]]) -> Iterator[RangeStats]:
        for _, rng in items:
            t0 = time.perf_counter()
            n = size = 0
            first = None
            with open_range(open_log, rng, **reader_kw) as reader:
                for entry in reader:
                    if first is None:
                        first = str(entry.message_id)
                    n += 1
                    size += len(entry.payload)
            yield RangeStats(rng.partition, rng.index, n, size, first, str(reader.last) if reader.last else None,
                             reader.redelivered, reader.reconnects, time.perf_counter() - t0)

    return run


def read_ranges(spark: "SparkSession", open_log: Callable[[], EventLog], ranges: Sequence[ReadRange],
                **reader_kw: Any) -> list[RangeStats]:
    """Read every range in a task of its own (``open_log()``: a log of its own, e.g. a
    :class:`~chainfold.engines.pool.PulsarSource`) and count (the read stage alone); in plan order."""
    return _ranges_rdd(spark, ranges).mapPartitions(_count_task(open_log, reader_kw)).collect()


def collect_ranges(spark: "SparkSession", open_log: Callable[[], EventLog], ranges: Sequence[ReadRange],
                   **reader_kw: Any) -> list[list[tuple[str, bytes]]]:
    """Every range's ``(message id, payload)`` pairs, read in tasks, in plan order (for tests:
    small topics only, everything comes back to the driver)."""

    def run(items: Iterable[tuple[int, ReadRange]]) -> Iterator[list[tuple[str, bytes]]]:
        for _, rng in items:
            with open_range(open_log, rng, **reader_kw) as reader:
                yield [(str(e.message_id), e.payload) for e in reader]

    return _ranges_rdd(spark, ranges).mapPartitions(run).collect()

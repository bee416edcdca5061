"""Brokers: connect to a Pulsar cluster by URL, or start the embedded pulsar-lite broker.

Without a service URL chainfold runs the embedded broker (the ``pulsar-lite`` package's binary) with
its data under a data directory. The broker is shared: every chainfold process using the same data
directory registers itself in ``<data-dir>/users/``; the first starts the broker, later ones reuse it,
and the last one to leave stops it, so no stray process is left when commands end. A broker started
with ``chainfold broker start`` is pinned and stays until ``chainfold broker stop``.

An unreachable broker is reported within seconds as :class:`~chainfold.errors.BrokerUnavailable`.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from ..errors import BadInput, BrokerUnavailable
from ..store.atomic import atomic_write

__all__ = ["BrokerOptions", "EmbeddedBroker", "connect", "first_lookup", "check_reachable", "read_ahead_limit", "topic_listed",
           "pulsar_logger", "client_logger", "exit_process"]

log = logging.getLogger("chainfold.log.broker")

ENV_SERVICE_URL = "CHAINFOLD_SERVICE_URL"
ENV_ADMIN_URL = "CHAINFOLD_ADMIN_URL"
DEFAULT_DATA_DIR = ".chainfold"
_CONFIG = """# written by chainfold: the embedded broker for this data directory
[metrics]
enabled = false
"""


@dataclass(frozen=True)
class BrokerOptions:
    """How to reach a broker. ``service_url=None`` means the embedded broker under ``data_dir``."""

    service_url: str | None = None
    data_dir: str = DEFAULT_DATA_DIR
    auth_token: str | None = None
    tls_trust_certs: str | None = None
    tls_allow_insecure: bool = False
    tls_cert: str | None = None
    tls_key: str | None = None
    connect_timeout: float = 5.0
    operation_timeout: int = 15
    admin_url: str | None = None
    """The broker's admin REST URL (``http://host:8080``), used to tell whether a topic exists
    without creating it; without one, chainfold cannot tell a missing topic from an empty one."""
    read_ahead: int = -1
    """Entries a client may hold ahead of its readers (:class:`~chainfold.log.readgate.ReadGate`):
    0 unbounded, -1 automatic (bounded on the embedded broker, or ``$CHAINFOLD_READ_AHEAD``)."""

    @classmethod
    def from_env(cls, **kw: object) -> "BrokerOptions":
        """Options with ``service_url`` defaulting to ``$CHAINFOLD_SERVICE_URL``."""
        if kw.get("service_url") is None:
            kw["service_url"] = os.environ.get(ENV_SERVICE_URL) or None
        if kw.get("auth_token") is None:
            kw["auth_token"] = os.environ.get("CHAINFOLD_AUTH_TOKEN") or None
        if kw.get("admin_url") is None:
            kw["admin_url"] = os.environ.get(ENV_ADMIN_URL) or None
        return cls(**{k: v for k, v in kw.items() if v is not None})  # type: ignore[arg-type]


def pulsar_logger() -> logging.Logger:
    """The logger to give pulsar-client: routes its native logs through logging to stderr.

    pulsar-client writes its logs to stdout by default, which would corrupt ``--json`` output. They
    are silent unless ``CHAINFOLD_PULSAR_LOG`` names a level (e.g. ``INFO``); chainfold reports
    the failures that matter itself. It is the process's
    :class:`~chainfold.log.readgate.ReadGate` (pulsar-client keeps the first client's logger for
    every client of the process), which also bounds gated readers and hears broker errors.
    """
    from .readgate import the_gate

    lg = logging.getLogger("chainfold.pulsar")
    if lg.level == logging.NOTSET:
        lg.setLevel(logging.getLevelName(os.environ.get("CHAINFOLD_PULSAR_LOG", "CRITICAL").upper()))
    return the_gate(forward=lg)


def client_logger():  # -> pulsar.FileLogger | logging.Logger
    """The logger :func:`connect` gives pulsar-client when reading is not bounded:
    :func:`pulsar_logger` when ``CHAINFOLD_PULSAR_LOG`` is set, else a native logger writing errors
    to the null device.

    A Python logger makes pulsar-client's I/O thread take the GIL for its log calls, several per
    message received; on a replay that costs more than a third of the read rate. Without
    ``CHAINFOLD_PULSAR_LOG`` nothing is shown either way.
    """
    if os.environ.get("CHAINFOLD_PULSAR_LOG"):
        return pulsar_logger()
    import pulsar

    return pulsar.FileLogger(pulsar.LoggerLevel.Error, os.devnull)


def exit_process(code: int) -> None:
    """End the process with ``code``: flush stdout, run the exit handlers, flush stderr, leave.

    A process that used pulsar-client must not rely on the interpreter's own shutdown: its native
    threads can abort it ("terminate called without an active exception", SIGABRT), turning a
    finished command into a crash. Every chainfold entry point that may have opened a client ends here.
    """
    try:
        sys.stdout.flush()
    except (BrokenPipeError, ValueError):
        pass
    atexit._run_exitfuncs()
    try:
        sys.stderr.flush()
    except ValueError:
        pass
    os._exit(code)


def check_reachable(service_url: str, timeout: float = 5.0) -> None:
    """Raise :class:`BrokerUnavailable` unless a TCP connection to the URL's host:port succeeds."""
    u = urlparse(service_url)
    if u.scheme not in ("pulsar", "pulsar+ssl") or not u.hostname:
        raise BadInput(f"not a Pulsar service URL: {service_url!r} (expected pulsar://host:port)")
    port = u.port or (6651 if u.scheme == "pulsar+ssl" else 6650)
    last: OSError | None = None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((u.hostname, port), timeout=min(1.0, timeout)):
                return
        except OSError as exc:
            last = exc
            time.sleep(0.2)
    raise BrokerUnavailable(f"broker {service_url} unreachable: {last}")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child still answers kill(0): look at its state
    with contextlib.suppress(OSError):
        with open(f"/proc/{pid}/stat") as f:
            if f.read().split(") ", 1)[1].startswith("Z"):
                return False
    return True


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _binary() -> str:
    env = os.environ.get("PULSAR_LITE_BINARY")
    if env:
        return env
    try:
        from pulsar_lite.binary_finder import find_pulsar_lite_binary
    except ImportError as exc:  # pragma: no cover - dependency missing
        raise BrokerUnavailable("the embedded broker needs the 'pulsar-lite' package") from exc
    return find_pulsar_lite_binary()


class EmbeddedBroker:
    """The pulsar-lite broker of one data directory, shared by every chainfold process using it.

    ``acquire()`` starts it (or joins the running one) and registers this process; ``release()``
    unregisters and stops the broker when no registered process remains (unless pinned).
    """

    def __init__(self, data_dir: str | os.PathLike[str] = DEFAULT_DATA_DIR) -> None:
        self.data_dir = Path(data_dir).absolute()
        self._state = self.data_dir / "broker.json"
        self._users = self.data_dir / "users"
        self._lockfile = self.data_dir / "broker.lock"
        self._held = False
        self.url: str | None = None

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self._lockfile, "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _read_state(self) -> dict | None:
        try:
            st = json.loads(self._state.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(st, dict) or not _alive(int(st.get("pid", -1))) or not _port_open(int(st["port"])):
            return None
        return st

    def running(self) -> dict | None:
        """``{"pid", "port", "url", "pinned"}`` of the live broker, or None."""
        return self._read_state()

    def _start(self, pinned: bool) -> dict:
        binary = _binary()
        port = _free_port()
        cfg = self.data_dir / "pulsar-lite.toml"
        cfg.write_text(_CONFIG)
        logf = open(self.data_dir / "broker.log", "ab")
        t0 = time.monotonic()
        proc = subprocess.Popen(
            [binary, "--config", str(cfg), "--addr", f"127.0.0.1:{port}",
             "--db-path", str(self.data_dir / "broker"), "--log-level", "warn"],
            stdout=logf, stderr=logf, stdin=subprocess.DEVNULL, cwd=str(self.data_dir),
            start_new_session=True,  # not killed by the terminal's ^C meant for chainfold
        )
        logf.close()
        while not _port_open(port):
            if proc.poll() is not None:
                tail = (self.data_dir / "broker.log").read_text(errors="replace")[-2000:]
                raise BrokerUnavailable(f"embedded broker exited at start (code {proc.returncode}):\n{tail}")
            if time.monotonic() - t0 > 20:
                proc.kill()
                raise BrokerUnavailable("embedded broker did not accept connections within 20 s")
            time.sleep(0.05)
        st = {"pid": proc.pid, "port": port, "url": f"pulsar://127.0.0.1:{port}", "pinned": pinned}
        atomic_write(self._state, json.dumps(st).encode())
        log.info("started embedded broker pid %s on port %s (%.2fs)", proc.pid, port, time.monotonic() - t0)
        return st

    def acquire(self, *, pinned: bool = False) -> str:
        """Start or join the broker; returns its service URL. Registers this process as a user."""
        with self._lock():
            st = self._read_state()
            if st is None:
                st = self._start(pinned)
            elif pinned and not st.get("pinned"):
                st["pinned"] = True
                atomic_write(self._state, json.dumps(st).encode())
            if not pinned:
                self._users.mkdir(exist_ok=True)
                (self._users / str(os.getpid())).touch()
                if not self._held:
                    atexit.register(self.release)
                self._held = True
            self.url = st["url"]
            return st["url"]

    def release(self) -> None:
        """Unregister this process; stop the broker if no live user remains and it is not pinned."""
        if not self._held:
            return
        self._held = False
        with self._lock():
            with contextlib.suppress(FileNotFoundError):
                (self._users / str(os.getpid())).unlink()
            if any(_alive(int(p.name)) for p in self._users.iterdir() if p.name.isdigit()):
                return
            st = self._read_state()
            if st is not None and not st.get("pinned"):
                self._stop(st)

    def stop(self) -> bool:
        """Stop the broker regardless of users (``chainfold broker stop``). True if one was running."""
        with self._lock():
            st = self._read_state()
            if st is None:
                return False
            self._stop(st)
            return True

    def _stop(self, st: dict) -> None:
        pid = int(st["pid"])
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while _alive(pid) and time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, os.WNOHANG)
            time.sleep(0.05)
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)
        with contextlib.suppress(FileNotFoundError):
            self._state.unlink()
        for p in list(self._users.iterdir()) if self._users.exists() else []:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        log.info("stopped embedded broker pid %s", pid)


_embedded: dict[Path, EmbeddedBroker] = {}


def resolve_url(opts: BrokerOptions) -> str:
    """The service URL to use: the given one, or the embedded broker's (started if needed)."""
    if opts.service_url:
        return opts.service_url
    path = Path(opts.data_dir).absolute()
    broker = _embedded.get(path)
    if broker is None:
        broker = _embedded[path] = EmbeddedBroker(path)
    return broker.acquire()


def topic_listed(admin_url: str, topic: str, *, token: str | None = None, timeout: float = 5.0) -> bool:
    """Whether Apache Pulsar's admin REST API lists ``topic`` (a full ``persistent://`` name), as a
    topic or a partitioned topic of its namespace. Listing creates nothing. Raises
    :class:`BrokerUnavailable` if the API does not answer."""
    import urllib.error
    import urllib.request

    scheme, _, rest = topic.partition("://")
    tenant, namespace, _name = rest.split("/", 2)
    base = f"{admin_url.rstrip('/')}/admin/v2/{scheme}/{tenant}/{namespace}"
    headers = {"Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    listed: set[str] = set()
    for url in (base, base + "/partitioned"):
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as r:
                listed.update(json.loads(r.read().decode("utf-8")))
        except (OSError, ValueError) as exc:  # URLError and HTTPError are OSErrors
            raise BrokerUnavailable(f"admin API {admin_url}: cannot list the topics of {tenant}/{namespace}: {exc}") from exc
    return topic in listed or any(t.startswith(topic + "-partition-") for t in listed)


def read_ahead_limit(opts: BrokerOptions) -> int | None:
    """Entries a client of ``opts`` may hold ahead of its readers; None: unbounded.

    Automatic (``read_ahead=-1``): ``$CHAINFOLD_READ_AHEAD`` if set, else bounded on the embedded
    broker (pulsar-lite counts flow-control permits per batch, see :mod:`chainfold.log.readgate`) and
    unbounded with a service URL (Apache Pulsar's receiver queue bounds the client by itself).
    """
    from .readgate import DEFAULT_READ_AHEAD

    if opts.read_ahead >= 0:
        return opts.read_ahead or None
    raw = os.environ.get("CHAINFOLD_READ_AHEAD", "").strip()
    if raw:
        try:
            n = int(raw)
        except ValueError:
            raise BadInput(f"CHAINFOLD_READ_AHEAD: not a number of entries: {raw!r}") from None
        return n if n > 0 else None
    return None if opts.service_url else DEFAULT_READ_AHEAD


def _client_kwargs(opts: BrokerOptions, logger: object) -> dict[str, object]:
    import pulsar

    kw: dict[str, object] = dict(
        operation_timeout_seconds=opts.operation_timeout,
        connection_timeout_ms=int(opts.connect_timeout * 1000),
        logger=logger,
        io_threads=1,
    )
    if opts.auth_token:
        kw["authentication"] = pulsar.AuthenticationToken(opts.auth_token)
    if opts.tls_trust_certs:
        kw["tls_trust_certs_file_path"] = opts.tls_trust_certs
    if opts.tls_allow_insecure:
        kw["tls_allow_insecure_connection"] = True
    if opts.tls_cert and opts.tls_key:
        kw["authentication"] = pulsar.AuthenticationTLS(opts.tls_cert, opts.tls_key)
    return kw


def _logger_for(opts: BrokerOptions) -> object:
    """pulsar-client's logger for a client of ``opts``: the read gate, limited, when reading is to
    be bounded (:func:`read_ahead_limit`); else :func:`client_logger` (the fastest)."""
    limit = read_ahead_limit(opts)
    if not limit:
        return client_logger()
    gate = pulsar_logger()
    gate.limit = limit  # type: ignore[attr-defined]
    return gate


def connect(opts: BrokerOptions):  # -> pulsar.Client
    """A ``pulsar.Client`` for the options; raises :class:`BrokerUnavailable` within seconds if
    nothing listens at the address."""
    import pulsar

    url = resolve_url(opts)
    check_reachable(url, opts.connect_timeout)
    try:
        return pulsar.Client(url, **_client_kwargs(opts, _logger_for(opts)))
    except Exception as exc:  # pulsar raises its own error types
        raise BrokerUnavailable(f"cannot create a client for {url}: {exc}") from exc


def first_lookup(opts: BrokerOptions, url: str, topic: str) -> list[str]:
    """The partitions of ``topic``, asked through a short-lived client whose every step (connect,
    handshake, lookup) is bounded by ``opts.connect_timeout``: a broker that accepts the connection
    but never answers is reported within seconds as :class:`BrokerUnavailable`, naming the address.
    """
    import math

    import _pulsar
    import pulsar

    kw = _client_kwargs(opts, _logger_for(opts))  # the same logger: the first client's stays for all
    kw["operation_timeout_seconds"] = max(1, math.ceil(opts.connect_timeout))
    t0 = time.monotonic()
    try:
        probe = pulsar.Client(url, **kw)
    except Exception as exc:
        raise BrokerUnavailable(f"cannot create a client for {url}: {exc}") from exc
    try:
        return list(probe.get_topic_partitions(topic))
    except (_pulsar.Timeout, _pulsar.ConnectError) as exc:
        raise BrokerUnavailable(
            f"broker {url} accepted the connection but did not answer within "
            f"{time.monotonic() - t0:.1f}s (looking up {topic}: {exc})"
        ) from exc
    except Exception as exc:  # pulsar raises its own error types
        raise BrokerUnavailable(f"broker {url}: looking up {topic} failed: {exc}") from exc
    finally:
        with contextlib.suppress(Exception):
            probe.close()

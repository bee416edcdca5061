"""Prometheus metrics of ``chainfold watch`` (docs/cli.md), served at ``/metrics`` on loopback.

Needs ``prometheus_client``: ``pip install chainfold[watch]``. The metrics live in their own
registry (not the process-wide default), so several watches in one process, or tests, never mix:

=================================================== ======= ==========================================
``chainfold_watch_entries_read_total``              counter log entries read (malformed, duplicates included)
``chainfold_watch_worker_entries``                  gauge   events the worker handled (its Tracker's positions)
``chainfold_watch_worker_lag_entries``              gauge   log entries the worker is behind (the ``lag`` of ``progress``)
``chainfold_watch_divergences_total``               counter divergences reported (0 or 1 per worker)
``chainfold_watch_malformed_total``                 counter malformed entries reported
``chainfold_watch_duplicates_total``                counter entries whose event id was stored before
``chainfold_watch_last_checkpoint_timestamp_seconds`` gauge  when watch last recorded a checkpoint (Unix time)
=================================================== ======= ==========================================

:class:`WatchMetrics` is updated by :class:`~chainfold.watch.output.WatchLines` as it writes each
line, so the counters always match the JSON lines.
"""

from __future__ import annotations

import threading
from typing import Any

from ..errors import BadInput

__all__ = ["WatchMetrics", "MetricsServer", "metrics_available"]


def metrics_available() -> bool:
    """Whether ``prometheus_client`` can be imported."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        return False
    return True


def _client() -> Any:
    try:
        import prometheus_client
    except ImportError:
        raise BadInput("--metrics-port needs prometheus_client: pip install 'chainfold[watch]'") from None
    return prometheus_client


class MetricsServer:
    """The HTTP server of a :class:`WatchMetrics` (a daemon thread); :attr:`port` is the bound port."""

    def __init__(self, server: Any, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread
        self.host, self.port = server.server_address[:2]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving and free the port."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


class WatchMetrics:
    """The metrics of one watch, in a registry of their own (see the module doc)."""

    def __init__(self) -> None:
        pc = _client()
        self.registry = reg = pc.CollectorRegistry()
        self.entries_read = pc.Counter("chainfold_watch_entries_read", "Log entries read by watch", registry=reg)
        self.worker_entries = pc.Gauge("chainfold_watch_worker_entries",
                                       "Events the worker handled (positions in its Tracker evidence)", registry=reg)
        self.worker_lag = pc.Gauge("chainfold_watch_worker_lag_entries",
                                   "Log entries the worker is behind watch", registry=reg)
        self.divergences = pc.Counter("chainfold_watch_divergences", "Divergences reported", registry=reg)
        self.malformed = pc.Counter("chainfold_watch_malformed", "Malformed entries reported", registry=reg)
        self.duplicates = pc.Counter("chainfold_watch_duplicates",
                                     "Entries whose event id was stored before (duplicates)", registry=reg)
        self.seq_gaps = pc.Counter("chainfold_watch_seq_gaps",
                                   "seq gaps reported: events missing from the log itself", registry=reg)
        self.truncations = pc.Counter("chainfold_watch_truncations",
                                      "Partitions reported to have lost recorded entries (retention, truncation)",
                                      registry=reg)
        self.last_checkpoint = pc.Gauge("chainfold_watch_last_checkpoint_timestamp_seconds",
                                        "When watch last recorded a checkpoint (Unix time)", registry=reg)
        self._read = 0

    def set_entries_read(self, n: int) -> None:
        """Entries read so far (the counter only grows: a smaller ``n`` is ignored)."""
        if n > self._read:
            self.entries_read.inc(n - self._read)
            self._read = n

    def serve(self, port: int, host: str = "127.0.0.1") -> MetricsServer:
        """Serve ``/metrics`` on ``host:port`` (``port`` 0: any free port) until ``close()``.
        :class:`~chainfold.errors.BadInput` if the port cannot be bound."""
        pc = _client()
        try:
            server, thread = pc.start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise BadInput(f"--metrics-port {port}: cannot serve metrics on {host}:{port}: {exc.strerror}") from None
        return MetricsServer(server, thread)

    def exposition(self) -> str:
        """The text the endpoint serves (for tests and logs)."""
        return _client().generate_latest(self.registry).decode()

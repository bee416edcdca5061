"""Shared pieces of the CLI: the command group, common options, error handling, output."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import click
from rich.console import Console
from rich.markup import escape

from ..log.broker import BrokerOptions, exit_process
from ..errors import BadInput, ChainfoldError, MissingDirectory
from ..replay.fold import ON_MODEL_ERROR

__all__ = ["cli", "main", "broker_options", "json_option", "snapshots_option", "engine_options", "Engine",
           "on_model_error_option", "with_skipped", "print_skipped", "output_dir_exists", "emit_json", "stderr",
           "stdout", "run", "esc", "error_json", "allow_partial_option", "print_history", "history_failed"]

# emoji=False: message ids like 6:3:-1:-1 hold ":-1:", which rich would turn into an emoji. Text
# that comes from users or the log (ids, stream names, paths, reasons) still needs ``esc`` before it
# is put into a markup string: a stream called "[/]" would otherwise break or restyle the output.
stderr = Console(stderr=True, highlight=False, emoji=False)
stdout = Console(highlight=False, soft_wrap=True, emoji=False)


def esc(value: object) -> str:
    """``value`` as text that rich prints literally inside a markup string."""
    return escape(str(value))


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-v", "--verbose", count=True, help="More logging on stderr (-vv for debug).")
@click.version_option(package_name="chainfold")
def cli(verbose: int) -> None:
    """chainfold: rebuild event-sourced state from Apache Pulsar, prove it with hash chains,
    and repair only what diverged."""
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(stream=sys.stderr, level=level, format="chainfold: %(levelname)s %(message)s")
    logging.getLogger("chainfold").setLevel(level)


def broker_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Add the broker options and pass them to the command as ``broker: BrokerOptions``."""

    @click.option("--service-url", envvar="CHAINFOLD_SERVICE_URL", metavar="URL",
                  help="Pulsar service URL (pulsar://host:6650). Default: the embedded broker.")
    @click.option("--data-dir", default=".chainfold", show_default=True, envvar="CHAINFOLD_DATA_DIR",
                  type=click.Path(file_okay=False), help="Data directory of the embedded broker.")
    @click.option("--admin-url", envvar="CHAINFOLD_ADMIN_URL", metavar="URL",
                  help="Apache Pulsar's admin REST URL (http://host:8080): lets commands tell a missing "
                  "topic from an empty one without creating it.")
    @click.option("--auth-token", envvar="CHAINFOLD_AUTH_TOKEN", metavar="TOKEN", help="Token authentication.")
    @click.option("--tls-trust-certs", type=click.Path(dir_okay=False), help="CA bundle for pulsar+ssl://.")
    @click.option("--tls-allow-insecure", is_flag=True, help="Accept any TLS certificate.")
    @click.option("--tls-cert", type=click.Path(dir_okay=False), help="Client certificate (TLS auth).")
    @click.option("--tls-key", type=click.Path(dir_okay=False), help="Client key (TLS auth).")
    @functools.wraps(fn)
    def wrapper(*args: Any, service_url: str | None, data_dir: str, admin_url: str | None, auth_token: str | None,
                tls_trust_certs: str | None, tls_allow_insecure: bool, tls_cert: str | None,
                tls_key: str | None, **kw: Any) -> Any:
        kw["broker"] = BrokerOptions(
            service_url=service_url or None, data_dir=data_dir, admin_url=admin_url or None,
            auth_token=auth_token or None,
            tls_trust_certs=tls_trust_certs, tls_allow_insecure=tls_allow_insecure,
            tls_cert=tls_cert, tls_key=tls_key,
        )
        return fn(*args, **kw)

    return wrapper


@dataclass(frozen=True)
class Engine:
    """Where a command's replay runs (``--engine``): here (``local``), or as an Apache Spark job
    on ``master`` (``spark``)."""

    name: str = "local"
    master: str | None = None

    @property
    def spark(self) -> bool:
        return self.name == "spark"

    def refuse_workers(self, workers: int) -> None:
        if self.spark and workers > 1:
            raise BadInput("--workers is the local engine's; with --engine spark the Spark cluster runs the tasks")

    @contextlib.contextmanager
    def distribution(self, elog: Any, broker: BrokerOptions) -> Iterator[Any]:
        """The Spark session and what the distributed driver needs to replay ``elog`` (a
        :class:`~chainfold.log.pulsar.PulsarLog` open on ``broker``), stopped on exit."""
        from ..engines.spark import pulsar_distribution, spark_cluster
        from ..log.broker import resolve_url

        url = dataclasses.replace(broker, service_url=resolve_url(broker))
        with spark_cluster(self.master) as cluster:
            yield pulsar_distribution(cluster, elog.topic, url, elog.client, broker.admin_url)


def engine_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``--engine`` and ``--spark-master`` and pass them to the command as ``engine: Engine``."""

    @click.option("--engine", type=click.Choice(["local", "spark"]), default="local", show_default=True,
                  help="Run on this machine, or as an Apache Spark job (pip install 'chainfold[spark]').")
    @click.option("--spark-master", envvar="CHAINFOLD_SPARK_MASTER", default="local[*]", show_default=True,
                  metavar="URL", help="With --engine spark: the Spark master (local[N], spark://host:7077, ...).")
    @functools.wraps(fn)
    def wrapper(*args: Any, engine: str, spark_master: str, **kw: Any) -> Any:
        kw["engine"] = Engine(engine, spark_master)
        return fn(*args, **kw)

    return wrapper


json_option = click.option("--json", "as_json", is_flag=True, help="Write the machine-readable report to stdout.")
snapshots_option = click.option(
    "--snapshots", "snapshots_dir", default="snapshots", show_default=True, envvar="CHAINFOLD_SNAPSHOTS",
    type=click.Path(file_okay=False), help="Snapshot and checkpoint store.")


on_model_error_option = click.option(
    "--on-model-error", "on_model_error", type=click.Choice(ON_MODEL_ERROR), default="stop", show_default=True,
    help="When the model raises on an event: stop (exit 2 naming it), skip-event (fold the stream on "
         "without it) or skip-stream (keep the stream at its last good state); skipped events are "
         "reported and make the exit code 1.")


def with_skipped(code: int, skipped: list[Any]) -> int:
    """The exit code of a command whose fold skipped ``skipped`` (docs/cli.md#poison-events): 1 when
    it would otherwise be 0 and events were skipped (the states are not those of the whole log)."""
    return 1 if code == 0 and skipped else code


def print_skipped(skipped: list[dict[str, Any]], shown: int = 20) -> None:
    """The events a skip policy left out, for people (stdout)."""
    if not skipped:
        return
    stdout.print(f"[bold red]{len(skipped):,} event(s) skipped[/]: the model failed on them (--on-model-error)")
    for k in skipped[:shown]:
        stdout.print(f"  [red]skipped[/] {esc(k['event_id'])} (stream {esc(k['stream'])}, message "
                     f"{esc(k['message_id'])}): {esc(k['error'])}")
    if len(skipped) > shown:
        stdout.print(f"  ... and {len(skipped) - shown:,} more (see --json)")


def output_dir_exists(option: str, path: str | None) -> None:
    """:class:`~chainfold.errors.MissingDirectory` unless the directory an output ``path`` goes into
    exists (checked before any work: outputs never create directories; ``-`` is stdout)."""
    if not path or path == "-":
        return
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise MissingDirectory(option, path, os.path.dirname(path) or parent)
allow_partial_option = click.option(
    "--allow-partial-history", is_flag=True,
    help="The log is known to start mid-history: lost entries (retention) and seq gaps are reported but do "
         "not fail the command (docs/cli.md#history).")


def history_failed(doc: dict[str, Any]) -> bool:
    """Whether a report's history part makes the command fail (exit 3): lost entries no snapshot
    covers, or seq gaps, unless the log is known to start mid-history."""
    if doc.get("allow_partial_history"):
        return False
    if doc.get("history") == "truncated":
        return any(not t.get("covered_by_snapshot") for t in doc.get("truncated") or [])
    return doc.get("history") == "gaps"


def print_history(doc: dict[str, Any]) -> None:
    """The history part of a report for people (docs/cli.md#history): what is gone, the seq gaps."""
    state = doc.get("history")
    if state in (None, "complete"):
        return
    colour = "bold red" if history_failed(doc) else "yellow"
    stdout.print(f"[{colour}]history {state}[/]")
    for t in doc.get("truncated") or []:
        segs, at, checked = t.get("unverifiable_segments"), t.get("first_available_index"), t.get("checked_from")
        stdout.print(f"  {esc(t['partition'])}: entries before message id {esc(t['first_available'])} are gone "
                     f"(retention or truncation; entry 0 was {esc(t['recorded_first'])} when recorded)")
        if segs:
            stdout.print(f"    recorded segments {segs[0]}..{segs[1]}"
                         + (f" (entries 0..{at - 1:,})" if at else "") + " can no longer be verified against the log")
        if checked is not None:
            stdout.print(f"    the log was checked against the record at the recorded positions from entry {checked:,}")
        if t.get("covered_by_snapshot"):
            stdout.print(f"    snapshot {esc(t['covered_by_snapshot'])} covers the loss: the work was done from it")
    gaps = doc.get("seq_gaps") or []
    for g in gaps[:10]:
        stdout.print(f"  seq gap: stream {esc(g['stream'])} jumps to seq {g['found_seq']} where {g['expected_seq']} "
                     f"was due, at message {esc(g['message_id'])}")
    if len(gaps) > 10:
        stdout.print(f"  ... and {len(gaps) - 10:,} more seq gap(s) (see --json)")


def emit_json(obj: Any) -> None:
    """Write one JSON document to stdout."""
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
    sys.stdout.flush()


_EVIDENCE = (("path", "file"), ("line", "line"), ("stream", "stream"), ("event_id", "event_id"),
             ("message_id", "message_id"))


def error_json(exc: ChainfoldError) -> dict[str, Any]:
    """The one JSON object a failing ``--json`` command writes: ``{"error": message}`` plus what
    locates the problem (``file``, ``line``, ``stream``, ``event_id``, ``message_id``) where known,
    and the error's ``details`` (e.g. the history part of a report)."""
    out: dict[str, Any] = {"error": str(exc), "exit_code": exc.exit_code}
    for attr, key in _EVIDENCE:
        value = getattr(exc, attr, None)
        if value is not None:
            out[key] = value
    details = getattr(exc, "details", None)
    if isinstance(details, dict):
        out.update({k: v for k, v in details.items() if k not in out})
    return out


def run(fn: Callable[[], int | None], *, as_json: bool = False) -> None:
    """Run a command body; map chainfold errors to their exit codes with a one-line message on
    stderr (and, with ``as_json``, :func:`error_json` on stdout).

    The process ends through :func:`~chainfold.log.broker.exit_process`: pulsar-client's native threads can abort the
    interpreter's own shutdown ("terminate called without an active exception"), which would turn
    a finished command into a crash; so exit handlers run first, then the process leaves directly.
    """
    code = 0
    try:
        code = fn() or 0
    except ChainfoldError as exc:
        stderr.print(f"[bold red]error:[/] {esc(exc)}", markup=True, highlight=False, soft_wrap=True)
        if as_json:
            emit_json(error_json(exc))
        code = exc.exit_code
    except KeyboardInterrupt:
        stderr.print("interrupted")
        code = 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 0
    exit_process(code)


def main() -> None:
    """Console-script entry point."""
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.exceptions.ClickException as exc:
        exc.show()
        sys.exit(2)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except BadInput as exc:  # pragma: no cover - commands use run()
        stderr.print(f"error: {esc(exc)}")
        sys.exit(2)

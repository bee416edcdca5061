"""The ``chainfold`` command line: a thin layer over the library (docs/cli.md).

Data (JSON Lines, ``--json`` reports, state exports) goes to stdout; progress, tables for people and
logs go to stderr. Exit codes: 0 consistent/done, 1 divergence found, 2 usage or bad input,
3 broker unreachable or history unrecoverable.
"""

from __future__ import annotations

from .common import main, cli

# each command module registers itself on ``cli`` when imported
from . import publish as _publish  # noqa: F401,E402
from . import broker_cmd as _broker  # noqa: F401,E402
from . import verify_cmd as _verify  # noqa: F401,E402
from . import rebuild_cmd as _rebuild  # noqa: F401,E402
from . import reconcile_cmd as _reconcile  # noqa: F401,E402
from . import snapshots_cmd as _snapshots  # noqa: F401,E402
from . import demo_cmd as _demo  # noqa: F401,E402
from . import bench_cmd as _bench  # noqa: F401,E402
from . import rewind_cmd as _rewind  # noqa: F401,E402
from . import watch_cmd as _watch  # noqa: F401,E402

__all__ = ["main", "cli"]

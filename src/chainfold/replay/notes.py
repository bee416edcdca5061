"""What a model has to say about the states it folded: notes for people, beside the numbers.

A model may define ``notes(states) -> iterable of str`` (optional, see docs/models.md): given the
folded states ``{stream: state}`` (as ``apply`` returns them, not rendered), it names situations a
reader of the numbers would otherwise miss, e.g. the accounts model telling that deposits to
accounts that were never opened were refused. Notes never change a state, an exit code or a
verdict; they go into the report's ``notes``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from .fold import Model

__all__ = ["model_notes", "MAX_NOTES"]

MAX_NOTES = 20
log = logging.getLogger("chainfold.replay.notes")


def model_notes(model: Model, states: Mapping[str, Any]) -> list[str]:
    """The model's notes about ``states`` (at most :data:`MAX_NOTES`); none when it has no
    ``notes``. A ``notes`` that raises is reported as one note, never as a failure of the fold."""
    fn = getattr(model.obj, "notes", None)
    if not callable(fn):
        return []
    try:
        out = [str(n) for n in fn(states)]
    except Exception as exc:  # the user's code: a broken note must not break a finished fold
        log.debug("notes of %s failed", model.name, exc_info=True)
        return [f"the model's notes() failed: {type(exc).__name__}: {exc}"]
    return out[:MAX_NOTES]

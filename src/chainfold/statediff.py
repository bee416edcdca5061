"""Field by field: how a worker's state of a stream differs from the state the log gives.

Both the terminal table and the HTML report of ``reconcile`` show a divergent stream as its fields,
expected beside actual, rather than two blobs of JSON. States are JSON values (as models render
them); nested objects are walked, their fields named by dotted paths (``lines.sku-1.qty``); any
other value (a number, a string, a list) is one field. A state that is absent on one side (a stream
the export lacks, or the log never had) is ``ABSENT`` there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["ABSENT", "FieldDiff", "field_diffs", "format_value", "format_change"]


class _Absent:
    __slots__ = ()

    def __repr__(self) -> str:
        return "ABSENT"


ABSENT: Any = _Absent()
"""The value of a field (or a whole state) that one side does not have."""


@dataclass(frozen=True, slots=True)
class FieldDiff:
    """One field of a stream's state: its path (``""`` for a state that is not an object), the
    expected and the actual value (either may be :data:`ABSENT`), and ``delta`` = actual - expected
    when both are numbers."""

    path: str
    expected: Any
    actual: Any

    @property
    def changed(self) -> bool:
        return type(self.expected) is not type(self.actual) or self.expected != self.actual

    @property
    def delta(self) -> int | float | None:
        e, a = self.expected, self.actual
        if _number(e) and _number(a):
            return a - e
        return None


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _walk(prefix: str, expected: Any, actual: Any, out: list[FieldDiff]) -> None:
    if isinstance(expected, dict) or isinstance(actual, dict):
        e = expected if isinstance(expected, dict) else {}
        a = actual if isinstance(actual, dict) else {}
        if (expected is not ABSENT and not isinstance(expected, dict)) or \
                (actual is not ABSENT and not isinstance(actual, dict)):
            out.append(FieldDiff(prefix, expected, actual))  # an object on one side only: one field
            return
        keys = list(e) + [k for k in a if k not in e]
        for k in keys:
            _walk(f"{prefix}.{k}" if prefix else str(k), e.get(k, ABSENT), a.get(k, ABSENT), out)
        if not keys:
            out.append(FieldDiff(prefix, expected, actual))
        return
    out.append(FieldDiff(prefix, expected, actual))


def field_diffs(expected: Any, actual: Any, *, only_changed: bool = False) -> list[FieldDiff]:
    """The fields of two states, in the expected state's order (then fields only the actual one
    has); with ``only_changed``, just those that differ. Pass :data:`ABSENT` (or None, which a
    report uses for a missing state) for a side without the stream."""
    out: list[FieldDiff] = []
    _walk("", ABSENT if expected is None else expected, ABSENT if actual is None else actual, out)
    return [d for d in out if d.changed] if only_changed else out


def format_value(v: Any, width: int = 40) -> str:
    """A field value for people: numbers with thousands separators, strings as they are, other
    values as compact JSON, cut to ``width`` characters."""
    import json

    if v is ABSENT:
        text = "(absent)"
    elif isinstance(v, bool) or v is None:
        text = json.dumps(v)
    elif isinstance(v, int):
        text = f"{v:,}"
    elif isinstance(v, str):
        text = v
    else:
        text = json.dumps(v, sort_keys=True, separators=(",", ":"))
    return text if len(text) <= width else text[: width - 1] + "…"


def format_change(d: FieldDiff, width: int = 40) -> str:
    """``balance: 120 → 95 (-25)``: one changed field, expected → actual."""
    delta = d.delta
    extra = ""
    if delta is not None:
        extra = f" ({delta:+,})" if isinstance(delta, int) else f" ({delta:+g})"
    name = d.path or "state"
    return f"{name}: {format_value(d.expected, width)} → {format_value(d.actual, width)}{extra}"

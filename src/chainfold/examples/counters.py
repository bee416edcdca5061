"""The simplest model: per stream, how many events of each type, and the sum of their amounts.

State: ``{"events": n, "types": {event type: n}, "amount": int}``. ``amount`` sums ``data["amount"]``
where it is an integer (other values, and events without one, add nothing). Folds any log, so it is
the model of choice for tests of the fold itself.
"""

from __future__ import annotations

from typing import Any

__all__ = ["version", "initial", "apply", "render", "model"]

version = "1"


def initial(stream: str) -> dict[str, Any]:
    """No events yet."""
    return {"events": 0, "types": {}, "amount": 0}


def apply(state: dict[str, Any], event: Any) -> dict[str, Any]:
    """Count ``event``; a new dict (``state`` and its ``types`` dict are left as they were)."""
    types = dict(state["types"])
    types[event.type] = types.get(event.type, 0) + 1
    amount = event.data.get("amount")
    return {
        "events": state["events"] + 1,
        "types": types,
        "amount": state["amount"] + amount if type(amount) is int else state["amount"],
    }


def render(state: dict[str, Any]) -> dict[str, Any]:
    """The state as JSON (a copy)."""
    return {"events": state["events"], "types": dict(state["types"]), "amount": state["amount"]}


class CountersModel:
    """The counters model as one object; the same functions as the module."""

    version = version
    initial = staticmethod(initial)
    apply = staticmethod(apply)
    render = staticmethod(render)

    def __repr__(self) -> str:
        return "chainfold.examples.counters:model"


model = CountersModel()

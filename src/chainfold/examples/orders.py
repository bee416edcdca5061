"""Order totals, the state an order service's worker keeps per order.

Events (``data`` in brackets)::

    OrderPlaced     {"customer": str}
    ItemAdded       {"sku": str, "qty": int > 0, "price": int >= 0}   price per unit, minor units
    ItemRemoved     {"sku": str}                                      removes the whole line
    OrderPaid       {}
    OrderCancelled  {}

State (JSON values; ``apply`` never changes the state it is given, nor any dict inside it)::

    {"status": "new" | "placed" | "paid" | "cancelled", "customer": str | None,
     "lines": {sku: {"qty": int, "price": int}}, "total": int, "items": int,
     "events": n, "rejected": n, "ignored": n}

``total`` is the sum of ``qty * price`` over the lines, ``items`` the sum of ``qty``. Adding a SKU
that is already on the order adds to its quantity, at the new price. Lines change only while the
order is placed; paying needs a placed order with at least one line; only a placed order can be
cancelled. Anything else (and a non-positive quantity, a negative price, removing a SKU that is not
on the order, placing twice) is counted in ``rejected``; unknown event types in ``ignored``.
Malformed data (missing fields, wrong types) raises :class:`ValueError`.
"""

from __future__ import annotations

import random
from typing import Any

from .accounts import _FIRST, _LAST, _Ev, _slots

__all__ = ["version", "initial", "apply", "render", "model", "generate", "EVENT_TYPES", "CATALOG"]

version = "1"
"""Explicit model version: bump it when the meaning of a state changes."""

EVENT_TYPES = ("OrderPlaced", "ItemAdded", "ItemRemoved", "OrderPaid", "OrderCancelled")


def initial(stream: str) -> dict[str, Any]:
    """The state of an order before its first event."""
    return {
        "status": "new",
        "customer": None,
        "lines": {},
        "total": 0,
        "items": 0,
        "events": 0,
        "rejected": 0,
        "ignored": 0,
    }


def _field(event: Any, key: str, kind: type) -> Any:
    data = event.data
    if key not in data:
        raise ValueError(f"{event.type} event {event.id!r} has no {key!r}")
    value = data[key]
    if type(value) is not kind:
        raise ValueError(
            f"{event.type} event {event.id!r}: {key!r} must be {kind.__name__},"
            f" got {type(value).__name__} {value!r}"
        )
    return value


def _with_lines(s: dict[str, Any], lines: dict[str, dict[str, int]]) -> None:
    s["lines"] = lines
    s["total"] = sum(line["qty"] * line["price"] for line in lines.values())
    s["items"] = sum(line["qty"] for line in lines.values())


def apply(state: dict[str, Any], event: Any) -> dict[str, Any]:
    """The order after ``event``: a new dict (unchanged lines are shared, never modified)."""
    etype = event.type
    s = dict(state)
    s["events"] += 1
    status = s["status"]
    if etype == "ItemAdded":
        sku = _field(event, "sku", str)
        qty = _field(event, "qty", int)
        price = _field(event, "price", int)
        if status != "placed" or qty <= 0 or price < 0:
            s["rejected"] += 1
        else:
            lines = dict(s["lines"])
            old = lines.get(sku)
            lines[sku] = {"qty": qty + (old["qty"] if old else 0), "price": price}
            _with_lines(s, lines)
    elif etype == "ItemRemoved":
        sku = _field(event, "sku", str)
        if status != "placed" or sku not in s["lines"]:
            s["rejected"] += 1
        else:
            lines = dict(s["lines"])
            del lines[sku]
            _with_lines(s, lines)
    elif etype == "OrderPlaced":
        customer = _field(event, "customer", str)
        if status != "new":
            s["rejected"] += 1
        else:
            s["status"] = "placed"
            s["customer"] = customer
    elif etype == "OrderPaid":
        if status != "placed" or not s["lines"]:
            s["rejected"] += 1
        else:
            s["status"] = "paid"
    elif etype == "OrderCancelled":
        if status != "placed":
            s["rejected"] += 1
        else:
            s["status"] = "cancelled"
    else:
        s["ignored"] += 1
    return s


def render(state: dict[str, Any]) -> dict[str, Any]:
    """The state as JSON: a deep copy (lines included)."""
    s = dict(state)
    s["lines"] = {sku: dict(line) for sku, line in state["lines"].items()}
    return s


class OrdersModel:
    """The orders model as one object; the same functions as the module."""

    version = version
    initial = staticmethod(initial)
    apply = staticmethod(apply)
    render = staticmethod(render)

    def __repr__(self) -> str:
        return "chainfold.examples.orders:model"


model = OrdersModel()

CATALOG: dict[str, int] = {
    f"SKU-{i:04d}": price
    for i, price in enumerate(
        (199, 249, 399, 499, 599, 799, 999, 1299, 1499, 1999, 2499, 2999, 3499, 3999, 4999, 5999,
         7999, 9999, 12999, 14999, 19999, 24999, 29999, 39999),
        1,
    )
}
"""The shop's SKUs and their unit prices (minor units), used by :func:`generate`."""

_SKUS = tuple(CATALOG)


def generate(
    n_events: int, n_streams: int, seed: int, start_time_ms: int = 1_700_000_000_000
) -> list[dict[str, Any]]:
    """``n_events`` realistic order events over ``n_streams`` orders, the same list for the same
    arguments: JSON Lines ready dicts ``{"id", "stream", "type", "time", "data"}``.

    Ids are ``ord-<seed>-<n>`` (n from 1), streams ``order-0001``...; each order is placed first,
    then gets items (sometimes one removed again); most orders with three or more events end paid,
    some cancelled, a few stay open. Every event is accepted by the model. Times increase by
    0-40 ms per event.
    """
    rng = random.Random(seed)
    slots = _slots(rng, n_events, n_streams)
    remaining = [0] * n_streams
    for s in slots:
        remaining[s] += 1
    states: list[dict[str, Any] | None] = [None] * n_streams
    ending: list[str | None] = [None] * n_streams
    width = max(4, len(str(n_streams)))
    out: list[dict[str, Any]] = []
    t = start_time_ms
    for n, k in enumerate(slots, 1):
        t += rng.randint(0, 40)
        st = states[k]
        left = remaining[k]
        remaining[k] = left - 1
        data: dict[str, Any]
        if st is None:
            etype, data = "OrderPlaced", {"customer": f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"}
            if left >= 3:
                r = rng.random()
                ending[k] = "OrderPaid" if r < 0.85 else "OrderCancelled" if r < 0.95 else None
            st = initial("")
        elif left == 1 and ending[k] is not None:
            etype, data = ending[k] if st["lines"] else "OrderCancelled", {}
        elif st["lines"] and rng.random() < 0.1:
            etype, data = "ItemRemoved", {"sku": rng.choice(sorted(st["lines"]))}
        else:
            sku = rng.choice(_SKUS)
            qty = rng.choices((1, 2, 3, 4, 5), (60, 20, 10, 6, 4))[0]
            etype, data = "ItemAdded", {"sku": sku, "qty": qty, "price": CATALOG[sku]}
        ev_id = f"ord-{seed}-{n}"
        stream = f"order-{k + 1:0{width}d}"
        states[k] = apply(st, _Ev(ev_id, etype, data))
        out.append({"id": ev_id, "stream": stream, "type": etype, "time": t, "data": data})
    return out


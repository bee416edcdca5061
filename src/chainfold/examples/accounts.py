"""Bank accounts, the state a real-time payments worker keeps per account.

Events (``data`` in brackets)::

    Opened      {"owner": str, "currency": str (optional, default "EUR")}
    Deposited   {"amount": int}      minor units (cents), > 0
    Withdrawn   {"amount": int}      refused when it exceeds the balance
    FeeCharged  {"amount": int}      may take the balance below zero (an overdraft fee)
    Closed      {}

State (a flat dict of JSON values; ``apply`` never changes the state it is given)::

    {"balance": int, "status": "new" | "open" | "closed", "owner": str | None, "currency": str | None,
     "deposits": n, "withdrawals": n, "fees": n, "events": n, "rejected": n, "ignored": n}

Business rules, the way a bank applies them: an account takes money only while it is open;
``Opened`` on an account that is not new, ``Closed`` on one that is not open, any money event on an
account that is not open, a non-positive amount and a withdrawal beyond the balance are counted in
``rejected`` and change nothing else. Unknown event types are counted in ``ignored``. ``events``
counts every event applied. Malformed data (a missing or non-integer amount, a missing owner) is not
a business decision but a broken event: ``apply`` raises :class:`ValueError`, and the fold reports it
with the event id.

So for every account, ``balance == sum(accepted deposits) - sum(accepted withdrawals) - sum(accepted
fees)``, and ``balance >= 0`` unless fees were charged.

The module is a model (``--model chainfold.examples.accounts``); ``model`` is the same model as one
object (``--model chainfold.examples.accounts:model``).
"""

from __future__ import annotations

import random
from array import array
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..envelope import Event

__all__ = ["version", "initial", "apply", "render", "notes", "model", "generate", "EVENT_TYPES"]

version = "1"
"""Explicit model version: bump it when the meaning of a state changes."""

EVENT_TYPES = ("Opened", "Deposited", "Withdrawn", "FeeCharged", "Closed")

_DEFAULT_CURRENCY = "EUR"


def initial(stream: str) -> dict[str, Any]:
    """The state of an account before its first event."""
    return {
        "balance": 0,
        "status": "new",
        "owner": None,
        "currency": None,
        "deposits": 0,
        "withdrawals": 0,
        "fees": 0,
        "events": 0,
        "rejected": 0,
        "ignored": 0,
    }


def _amount(event: Any) -> int:
    data = event.data
    if "amount" not in data:
        raise ValueError(f"{event.type} event {event.id!r} has no 'amount'")
    amount = data["amount"]
    if type(amount) is not int:  # bool and float are not amounts in minor units
        raise ValueError(
            f"{event.type} event {event.id!r}: 'amount' must be an integer (minor units),"
            f" got {type(amount).__name__} {amount!r}"
        )
    return amount


def apply(state: dict[str, Any], event: Any) -> dict[str, Any]:
    """The account after ``event``: a new dict; ``state`` is left as it was."""
    etype = event.type
    s = dict(state)
    s["events"] += 1
    status = s["status"]
    if etype == "Deposited" or etype == "Withdrawn" or etype == "FeeCharged":
        amount = _amount(event)
        if status != "open" or amount <= 0:
            s["rejected"] += 1
        elif etype == "Deposited":
            s["balance"] += amount
            s["deposits"] += 1
        elif etype == "Withdrawn":
            if amount > s["balance"]:
                s["rejected"] += 1
            else:
                s["balance"] -= amount
                s["withdrawals"] += 1
        else:
            s["balance"] -= amount
            s["fees"] += 1
    elif etype == "Opened":
        data = event.data
        owner = data.get("owner")
        if type(owner) is not str:
            raise ValueError(f"Opened event {event.id!r}: 'owner' must be a string, got {owner!r}")
        currency = data.get("currency", _DEFAULT_CURRENCY)
        if type(currency) is not str:
            raise ValueError(f"Opened event {event.id!r}: 'currency' must be a string, got {currency!r}")
        if status != "new":
            s["rejected"] += 1
        else:
            s["status"] = "open"
            s["owner"] = owner
            s["currency"] = currency
    elif etype == "Closed":
        if status != "open":
            s["rejected"] += 1
        else:
            s["status"] = "closed"
    else:
        s["ignored"] += 1
    return s


def render(state: dict[str, Any]) -> dict[str, Any]:
    """The state as JSON: a copy of the (flat) state dict."""
    return dict(state)


def _some(streams: list[str], n: int = 3) -> str:
    return ", ".join(streams[:n]) + (f" and {len(streams) - n} more" if len(streams) > n else "")


def notes(states: Mapping[str, dict[str, Any]]) -> list[str]:
    """What the numbers alone do not say: money events on accounts that were never opened were
    refused, and events of unknown types were ignored (docs/models.md#accounts)."""
    never_opened = sorted(s for s, st in states.items() if st["status"] == "new" and st["rejected"])
    ignored = sorted(s for s, st in states.items() if st["ignored"])
    out = []
    if never_opened:
        n = sum(states[s]["rejected"] for s in never_opened)
        out.append(f"{len(never_opened)} account(s) were never opened, so their {n} money event(s) were "
                   f"refused and counted in 'rejected' ({_some(never_opened)}): an account takes deposits, "
                   "withdrawals and fees only after its 'Opened' event (docs/models.md#accounts)")
    if ignored:
        n = sum(states[s]["ignored"] for s in ignored)
        out.append(f"{n} event(s) of types this model does not know were ignored, counted in 'ignored' "
                   f"({_some(ignored)}); known types: {', '.join(EVENT_TYPES)}")
    return out


class AccountsModel:
    """The accounts model as one object; the same functions as the module."""

    version = version
    initial = staticmethod(initial)
    apply = staticmethod(apply)
    render = staticmethod(render)
    notes = staticmethod(notes)

    def __repr__(self) -> str:
        return "chainfold.examples.accounts:model"


model = AccountsModel()

_FIRST = ("Ada", "Alan", "Grace", "Edsger", "Barbara", "Donald", "Frances", "Ken", "Radia", "Tony",
          "Margaret", "John", "Leslie", "Shafi", "Niklaus", "Sophie", "Jean", "Guido", "Anita", "Linus")
_LAST = ("Lovelace", "Turing", "Hopper", "Dijkstra", "Liskov", "Knuth", "Allen", "Thompson", "Perlman",
         "Hoare", "Hamilton", "Backus", "Lamport", "Goldwasser", "Wirth", "Wilson", "Sammet", "Rossum",
         "Borg", "Torvalds")
_CURRENCIES = ("EUR", "USD", "GBP")
_CURRENCY_WEIGHTS = (6, 3, 1)
_FEES = (150, 250, 500, 1000)


def _slots(rng: random.Random, n_events: int, n_streams: int) -> list[int]:
    """Which stream each event position belongs to: every stream at least once (when there are
    enough events), the rest uniformly at random, in a random interleaving."""
    if n_events < 0 or n_streams < 1:
        raise ValueError("need n_events >= 0 and n_streams >= 1")
    first = list(range(min(n_streams, n_events)))
    slots = first + [rng.randrange(n_streams) for _ in range(n_events - len(first))]
    rng.shuffle(slots)
    return slots


def iter_events(
    n_events: int, n_streams: int, seed: int, start_time_ms: int = 1_700_000_000_000
) -> Iterator[dict[str, Any]]:
    """The events of :func:`generate`, one at a time, in O(streams + events/8) memory (the
    stream of each position is kept in a typed array): for stories too large for a list."""
    if n_events < 0 or n_streams < 1:
        raise ValueError("need n_events >= 0 and n_streams >= 1")
    rng = random.Random(seed)
    # as _slots, in a typed array (the same draws and the same shuffle swaps)
    first = min(n_streams, n_events)
    slots = array("l", range(first))
    randrange = rng.randrange
    slots.extend(randrange(n_streams) for _ in range(n_events - first))
    rng.shuffle(slots)  # type: ignore[arg-type]
    remaining = array("l", [0]) * n_streams
    for s in slots:
        remaining[s] += 1
    states: list[dict[str, Any] | None] = [None] * n_streams
    closing = [False] * n_streams
    width = max(4, len(str(n_streams)))
    t = start_time_ms
    for n, k in enumerate(slots, 1):
        t += rng.randint(0, 40)
        st = states[k]
        left = remaining[k]
        remaining[k] = left - 1
        if st is None:
            etype = "Opened"
            data: dict[str, Any] = {"owner": f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"}
            currency = rng.choices(_CURRENCIES, _CURRENCY_WEIGHTS)[0]
            if currency != _DEFAULT_CURRENCY:
                data["currency"] = currency
            closing[k] = left >= 4 and rng.random() < 0.05
            st = initial("")
        elif closing[k] and left == 1:
            etype, data = "Closed", {}
        elif closing[k] and left == 2 and st["balance"] > 0:
            etype, data = "Withdrawn", {"amount": st["balance"]}  # the payout before closing
        else:
            balance = st["balance"]
            r = rng.random()
            if balance <= 0 or r < 0.52:
                etype = "Deposited"
                data = {"amount": rng.randint(1, 2500) * 100 + rng.choice((0, 0, 0, 50, 99))}
            elif r < 0.94:
                etype = "Withdrawn"
                data = {"amount": min(balance, rng.randint(1, 800) * 100 + rng.choice((0, 0, 25)))}
            else:
                etype, data = "FeeCharged", {"amount": rng.choice(_FEES)}
        ev_id = f"evt-{seed}-{n}"
        states[k] = apply(st, _Ev(ev_id, etype, data))
        yield {"id": ev_id, "stream": f"acct-{k + 1:0{width}d}", "type": etype, "time": t, "data": data}


def generate(
    n_events: int, n_streams: int, seed: int, start_time_ms: int = 1_700_000_000_000
) -> list[dict[str, Any]]:
    """``n_events`` realistic account events over ``n_streams`` accounts, the same list for the same
    arguments: JSON Lines ready dicts ``{"id", "stream", "type", "time", "data"}``.

    Ids are ``evt-<seed>-<n>`` (n from 1), streams ``acct-0001``...; each account opens with its
    first event; then mostly deposits and withdrawals (never beyond the balance), now and then a
    fee, and a few accounts are paid out and closed at their end. Every event is accepted by the
    model (nothing is ``rejected`` or ``ignored``). Times increase by 0-40 ms per event.
    """
    return list(iter_events(n_events, n_streams, seed, start_time_ms))


def generate_events(n_events: int, n_streams: int, seed: int) -> list[Event]:
    """:func:`generate`'s events as :class:`chainfold.envelope.Event`\\ s with their per-stream
    ``seq`` (1-based, as chainfold's writer assigns it): ready to append without a writer."""
    from ..envelope import Event

    seqs: dict[str, int] = {}
    out = []
    for d in iter_events(n_events, n_streams, seed):
        s = seqs[d["stream"]] = seqs.get(d["stream"], 0) + 1
        out.append(Event(d["id"], d["stream"], s, d["type"], d["time"], d["data"]))
    return out


class _Ev:
    """The few event attributes :func:`apply` reads, for the generator's own bookkeeping."""

    __slots__ = ("id", "type", "data")

    def __init__(self, id: str, type: str, data: dict[str, Any]) -> None:
        self.id = id
        self.type = type
        self.data = data

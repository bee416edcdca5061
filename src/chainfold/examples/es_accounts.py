"""The bank account of :mod:`chainfold.examples.accounts` as an ``eventsourcing`` aggregate.

``BankAccount`` validates in its commands (``deposit``, ``withdraw``, ``charge_fee``, ``close``) and
records decided facts with ``@event`` methods, the idiomatic eventsourcing style: a refused command
raises and records nothing, so replay never refuses an event. Its event types have the names of
the accounts example (``Opened``, ``Deposited``, ``Withdrawn``, ``FeeCharged``, ``Closed``) and its
attributes the same meaning (``balance`` in minor units, ``status``, ``owner``, ``currency``,
``deposits``/``withdrawals``/``fees`` counts), so the two models render comparable states.

``model = AggregateModel(BankAccount)`` folds it: ``--model chainfold.examples.es_accounts:model``.
:func:`generate_events` drives the aggregate's commands from :func:`accounts.generate`, so the same
seed gives the same story (and the same balances) in both models.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime, timedelta, timezone
from typing import Any
from uuid import UUID, uuid5

from eventsourcing.domain import Aggregate, datetime_now_with_tzinfo, event

from ..envelope import Event
from ..es import AggregateModel, events_from_aggregate
from . import accounts

__all__ = [
    "BankAccount",
    "AccountClosedError",
    "InsufficientFundsError",
    "model",
    "generate_events",
    "account_number",
    "fixed_clock",
]

ACCOUNT_NAMESPACE = UUID("6f1c1d2e-8a4b-5c3d-9e7f-0a1b2c3d4e5f")
"""Account ids are ``uuid5(ACCOUNT_NAMESPACE, number)``: the number determines the aggregate id."""

_clock: ContextVar[Callable[[], datetime] | None] = ContextVar("chainfold_es_accounts_clock", default=None)


@contextmanager
def fixed_clock(now: Callable[[], datetime]) -> Iterator[None]:
    """Within the block, new ``BankAccount`` events take their timestamps from ``now()`` (for
    deterministic test data); outside, from the system clock, as eventsourcing does."""
    token = _clock.set(now)
    try:
        yield
    finally:
        _clock.reset(token)


class AccountClosedError(Exception):
    """A command on an account that is not open."""


class InsufficientFundsError(Exception):
    """A withdrawal beyond the balance."""


def _check_amount(amount: Any) -> None:
    if type(amount) is not int:
        raise ValueError(f"amount must be an integer (minor units), got {type(amount).__name__} {amount!r}")
    if amount <= 0:
        raise ValueError(f"amount must be positive, got {amount}")


class BankAccount(Aggregate):
    """A bank account; money in minor units (cents)."""

    class Event(Aggregate.Event):
        @staticmethod
        def create_timestamp() -> datetime:
            now = _clock.get()
            return now() if now is not None else datetime_now_with_tzinfo()

    @staticmethod
    def create_id(number: str) -> UUID:
        return uuid5(ACCOUNT_NAMESPACE, number)

    @event("Opened")
    def __init__(self, number: str, owner: str, currency: str = "EUR") -> None:
        self.number = number
        self.owner = owner
        self.currency = currency
        self.status = "open"
        self.balance = 0
        self.deposits = 0
        self.withdrawals = 0
        self.fees = 0

    # Commands: decide, then record.

    def _require_open(self) -> None:
        if self.status != "open":
            raise AccountClosedError(f"account {self.number} is {self.status}")

    def deposit(self, amount: int) -> None:
        self._require_open()
        _check_amount(amount)
        self._deposited(amount)

    def withdraw(self, amount: int) -> None:
        self._require_open()
        _check_amount(amount)
        if amount > self.balance:
            raise InsufficientFundsError(f"account {self.number}: {amount} > balance {self.balance}")
        self._withdrawn(amount)

    def charge_fee(self, amount: int) -> None:
        """Fees are charged even when they take the balance below zero."""
        self._require_open()
        _check_amount(amount)
        self._fee_charged(amount)

    def close(self) -> None:
        self._require_open()
        self._closed()

    # Events: what happened; these run again on every replay.

    @event("Deposited")
    def _deposited(self, amount: int) -> None:
        self.balance += amount
        self.deposits += 1

    @event("Withdrawn")
    def _withdrawn(self, amount: int) -> None:
        self.balance -= amount
        self.withdrawals += 1

    @event("FeeCharged")
    def _fee_charged(self, amount: int) -> None:
        self.balance -= amount
        self.fees += 1

    @event("Closed")
    def _closed(self) -> None:
        self.status = "closed"


model = AggregateModel(BankAccount)
"""The chainfold model folding ``BankAccount`` aggregates from the log."""

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def account_number(stream: str, seed: int) -> str:
    """The account number :func:`generate_events` gives the account of ``accounts.generate``'s
    ``stream`` (the seed is part of it, so data sets of different seeds never share ids)."""
    return f"{stream}-s{seed}"


def generate_events(
    n_events: int, n_streams: int, seed: int, start_time_ms: int = 1_700_000_000_000
) -> list[Event]:
    """``n_events`` chainfold events of ``BankAccount`` aggregates, the same for the same arguments.

    The story is :func:`chainfold.examples.accounts.generate` with the same arguments, told through
    the aggregate's commands: account ``stream`` of that story is the aggregate with number
    :func:`account_number(stream, seed) <account_number>`; event ``n`` has that story's time with
    ``n % 1000`` microseconds added (eventsourcing timestamps have microseconds).
    """
    story = accounts.generate(n_events, n_streams, seed, start_time_ms)
    live: dict[str, BankAccount] = {}
    out: list[Event] = []
    now: list[datetime] = [_EPOCH]
    with fixed_clock(lambda: now[0]):
        for n, d in enumerate(story):
            now[0] = _EPOCH + timedelta(milliseconds=d["time"], microseconds=n % 1000)
            etype, data, stream = d["type"], d["data"], d["stream"]
            if etype == "Opened":
                account = BankAccount(
                    number=account_number(stream, seed),
                    owner=data["owner"],
                    currency=data.get("currency", "EUR"),
                )
                live[stream] = account
            else:
                account = live[stream]
                if etype == "Deposited":
                    account.deposit(data["amount"])
                elif etype == "Withdrawn":
                    account.withdraw(data["amount"])
                elif etype == "FeeCharged":
                    account.charge_fee(data["amount"])
                elif etype == "Closed":
                    account.close()
                else:  # pragma: no cover - accounts.generate makes no other types
                    raise AssertionError(etype)
            out.extend(events_from_aggregate(account))
    return out

"""Example models, ready to fold with ``--model`` and used by the demo, the benchmarks and the tests.

Each module is a model by itself (its functions ``initial``, ``apply`` and ``render``, so
``--model chainfold.examples.accounts`` works) and also has a ``model`` attribute with the same
methods (``--model chainfold.examples.accounts:model``); both are one implementation.

``chainfold.examples.accounts``
    Bank accounts: ``Opened``, ``Deposited``, ``Withdrawn``, ``FeeCharged``, ``Closed``. Balances in
    minor units; events a bank would refuse are counted as ``rejected``, unknown ones as ``ignored``.
    ``generate()`` makes a realistic, seeded event stream (JSON Lines ready).
``chainfold.examples.orders``
    Order totals: ``OrderPlaced``, ``ItemAdded``, ``ItemRemoved``, ``OrderPaid``, ``OrderCancelled``.
    ``generate()`` as above.
``chainfold.examples.counters``
    The simplest model: counts events per type and sums integer ``data["amount"]``. Folds any log.
``chainfold.examples.es_accounts``
    The bank account as an ``eventsourcing`` aggregate (``BankAccount``), folded by
    :class:`chainfold.es.AggregateModel`; ``generate_events()`` drives its commands from
    ``accounts.generate()`` so both models give the same balances.
"""

__all__ = ["accounts", "orders", "counters", "es_accounts"]

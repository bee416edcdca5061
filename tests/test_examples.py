"""The example models: pure, deterministic, sensible on generated and on odd input, and foldable
in pieces (through copies and through snapshots) with the same result as in one go."""

from __future__ import annotations

import copy
import json
from collections import Counter
from types import SimpleNamespace
from typing import Any

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chainfold.envelope import Event, decode, encode, event_from_json
from chainfold.examples import accounts, counters, orders

MODELS = {"accounts": accounts, "orders": orders, "counters": counters}
GENERATORS = {"accounts": accounts.generate, "orders": orders.generate, "counters": accounts.generate}

FAST = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def as_events(dicts: list[dict[str, Any]]) -> list[Event]:
    """JSON Lines dicts -> Events with seq assigned per stream, through the envelope's bytes."""
    seqs: Counter[str] = Counter()
    out = []
    for d in dicts:
        ev = event_from_json(json.loads(json.dumps(d)))
        seqs[ev.stream] += 1
        out.append(decode(encode(ev._replace(seq=seqs[ev.stream]))))
    return out


def fold(model: Any, events: list[Event], states: dict[str, Any] | None = None) -> dict[str, Any]:
    states = dict(states or {})
    for ev in events:
        state = states[ev.stream] if ev.stream in states else model.initial(ev.stream)
        states[ev.stream] = model.apply(state, ev)
    return states


def ev(type_: str, data: dict[str, Any] | None = None, *, stream: str = "s-1", n: int = 1) -> Event:
    return Event(f"e-{n}", stream, n, type_, 1_700_000_000_000 + n, data or {})


# -- shape of the modules ------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MODELS))
def test_module_and_model_object_are_one_implementation(name: str) -> None:
    mod = MODELS[name]
    for member in ("initial", "apply", "render"):
        assert getattr(mod.model, member) is getattr(mod, member)
    assert mod.model.version == mod.version


@pytest.mark.parametrize("ref", ["chainfold.examples.accounts", "chainfold.examples.orders:model",
                                 "chainfold.examples.counters:model"])
def test_loadable_by_reference(ref: str) -> None:
    from chainfold.replay.model import load_model

    model = load_model(ref)
    state = model.apply(model.initial("s-1"), ev("Opened", {"owner": "Ada"}))
    json.dumps(model.render(state))


# -- generators ----------------------------------------------------------------------------


@pytest.mark.parametrize("gen", [accounts.generate, orders.generate])
def test_generate_is_deterministic_and_well_formed(gen: Any) -> None:
    a = gen(500, 17, 42)
    assert a == gen(500, 17, 42)
    assert a != gen(500, 17, 43)
    assert len(a) == 500
    assert len({d["id"] for d in a}) == 500
    assert len({d["stream"] for d in a}) == 17
    times = [d["time"] for d in a]
    assert times == sorted(times) and times[0] >= 1_700_000_000_000
    assert gen(10, 3, 42, start_time_ms=5)[0]["time"] < 1_000
    first = {}
    for d in a:
        assert set(d) == {"id", "stream", "type", "time", "data"}
        first.setdefault(d["stream"], d["type"])
    assert set(first.values()) == {"Opened" if gen is accounts.generate else "OrderPlaced"}
    assert gen(0, 3, 1) == []
    assert len(gen(2, 5, 1)) == 2


def test_accounts_generate_looks_like_a_bank() -> None:
    dicts = accounts.generate(3000, 40, 7)
    kinds = Counter(d["type"] for d in dicts)
    assert kinds["Opened"] == 40
    assert kinds["Deposited"] > kinds["Withdrawn"] > kinds["FeeCharged"] > 0
    assert 0 < kinds["Closed"] < 10
    assert all(d["stream"].startswith("acct-") and len(d["stream"]) == 9 for d in dicts)
    assert dicts[0]["id"] == "evt-7-1"


def test_accounts_fold_of_generated_events_balances() -> None:
    events = as_events(accounts.generate(4000, 50, 3))
    states = fold(accounts, events)
    expected: dict[str, int] = Counter()
    counts: dict[str, Counter[str]] = {}
    for e in events:
        sign = {"Deposited": 1, "Withdrawn": -1, "FeeCharged": -1}.get(e.type, 0)
        expected[e.stream] += sign * e.data.get("amount", 0)
        counts.setdefault(e.stream, Counter())[e.type] += 1
    for stream, s in states.items():
        assert s["rejected"] == 0 and s["ignored"] == 0  # generate makes only valid events
        assert s["balance"] == expected[stream]
        assert s["deposits"] == counts[stream]["Deposited"]
        assert s["withdrawals"] == counts[stream]["Withdrawn"]
        assert s["fees"] == counts[stream]["FeeCharged"]
        assert s["events"] == sum(counts[stream].values())
        assert s["status"] == ("closed" if counts[stream]["Closed"] else "open")
        assert s["balance"] >= 0 or s["fees"] > 0
        assert isinstance(s["owner"], str) and s["currency"] in ("EUR", "USD", "GBP")


def test_orders_fold_of_generated_events_totals() -> None:
    events = as_events(orders.generate(4000, 60, 5))
    states = fold(orders, events)
    statuses = Counter(s["status"] for s in states.values())
    assert statuses["paid"] > statuses["cancelled"] > 0
    for s in states.values():
        assert s["rejected"] == 0 and s["ignored"] == 0
        assert s["total"] == sum(line["qty"] * line["price"] for line in s["lines"].values())
        assert s["items"] == sum(line["qty"] for line in s["lines"].values())
        assert all(orders.CATALOG[sku] == line["price"] for sku, line in s["lines"].items())
        if s["status"] == "paid":
            assert s["lines"]


def test_counters_counts_everything() -> None:
    events = as_events(accounts.generate(800, 9, 1))
    states = fold(counters, events)
    assert sum(s["events"] for s in states.values()) == 800
    total = sum(e.data["amount"] for e in events if "amount" in e.data)
    assert sum(s["amount"] for s in states.values()) == total
    s = fold(counters, [ev("A", {"amount": 2}), ev("A", {"amount": 1.5}), ev("B", {"amount": True}), ev("B")])
    assert s["s-1"] == {"events": 4, "types": {"A": 2, "B": 2}, "amount": 2}


# -- business rules and odd input ----------------------------------------------------------


def test_accounts_rules() -> None:
    run = [
        ev("Deposited", {"amount": 100}, n=1),  # not open yet
        ev("Opened", {"owner": "Ada", "currency": "GBP"}, n=2),
        ev("Opened", {"owner": "Eve"}, n=3),  # twice
        ev("Deposited", {"amount": 1000}, n=4),
        ev("Withdrawn", {"amount": 1001}, n=5),  # beyond the balance
        ev("Withdrawn", {"amount": 400}, n=6),
        ev("Deposited", {"amount": 0}, n=7),  # not positive
        ev("FeeCharged", {"amount": 700}, n=8),  # overdraft fee: allowed
        ev("Audited", {"by": "x"}, n=9),  # unknown
        ev("Closed", n=10),
        ev("Deposited", {"amount": 5}, n=11),  # closed
        ev("Closed", n=12),
    ]
    s = fold(accounts, run)["s-1"]
    assert s == {
        "balance": -100, "status": "closed", "owner": "Ada", "currency": "GBP", "deposits": 1,
        "withdrawals": 1, "fees": 1, "events": 12, "rejected": 6, "ignored": 1,
    }
    assert accounts.apply(accounts.initial("x"), ev("Opened", {"owner": "Bo"}))["currency"] == "EUR"


@pytest.mark.parametrize("data", [{"amount": 1.5}, {"amount": "10"}, {"amount": True}, {"amount": None}, {}])
@pytest.mark.parametrize("etype", ["Deposited", "Withdrawn", "FeeCharged"])
def test_accounts_non_integer_amount_is_an_error(etype: str, data: dict[str, Any]) -> None:
    opened = accounts.apply(accounts.initial("s-1"), ev("Opened", {"owner": "Ada"}))
    with pytest.raises(ValueError, match="amount"):
        accounts.apply(opened, ev(etype, data, n=2))
    with pytest.raises(ValueError, match="owner"):
        accounts.apply(accounts.initial("s-1"), ev("Opened", {"owner": 3}))


def test_orders_rules() -> None:
    run = [
        ev("ItemAdded", {"sku": "A", "qty": 1, "price": 100}, n=1),  # not placed
        ev("OrderPaid", n=2),  # not placed
        ev("OrderPlaced", {"customer": "Ada"}, n=3),
        ev("OrderPaid", n=4),  # empty
        ev("ItemAdded", {"sku": "A", "qty": 2, "price": 100}, n=5),
        ev("ItemAdded", {"sku": "B", "qty": 1, "price": 250}, n=6),
        ev("ItemAdded", {"sku": "A", "qty": 1, "price": 90}, n=7),  # more of A, re-priced
        ev("ItemAdded", {"sku": "C", "qty": 0, "price": 1}, n=8),  # qty not positive
        ev("ItemRemoved", {"sku": "Z"}, n=9),  # not on the order
        ev("ItemRemoved", {"sku": "B"}, n=10),
        ev("Shipped", n=11),  # unknown
        ev("OrderPaid", n=12),
        ev("OrderCancelled", n=13),  # already paid
    ]
    s = fold(orders, run)["s-1"]
    assert s == {
        "status": "paid", "customer": "Ada", "lines": {"A": {"qty": 3, "price": 90}}, "total": 270,
        "items": 3, "events": 13, "rejected": 6, "ignored": 1,
    }
    with pytest.raises(ValueError, match="qty"):
        orders.apply(s, ev("ItemAdded", {"sku": "A", "qty": "1", "price": 1}))
    with pytest.raises(ValueError, match="sku"):
        orders.apply(s, ev("ItemRemoved", {}))


# -- purity and folding in pieces ----------------------------------------------------------

_amounts = st.one_of(st.integers(-50, 5000), st.sampled_from([0, 1, 10**12]))
_account_events = st.one_of(
    st.builds(lambda o: ("Opened", {"owner": o}), st.sampled_from(["Ada", "Bo"])),
    st.builds(
        lambda t, a: (t, {"amount": a}), st.sampled_from(["Deposited", "Withdrawn", "FeeCharged"]), _amounts
    ),
    st.just(("Closed", {})),
    st.just(("Frozen", {"why": "?"})),
)
_order_events = st.one_of(
    st.builds(lambda c: ("OrderPlaced", {"customer": c}), st.sampled_from(["Ada", "Bo"])),
    st.builds(
        lambda s, q, p: ("ItemAdded", {"sku": s, "qty": q, "price": p}),
        st.sampled_from(["A", "B", "C"]), st.integers(-1, 4), st.integers(-1, 999),
    ),
    st.builds(lambda s: ("ItemRemoved", {"sku": s}), st.sampled_from(["A", "B", "C"])),
    st.sampled_from([("OrderPaid", {}), ("OrderCancelled", {}), ("Returned", {})]),
)
RANDOM_EVENTS = {
    "accounts": _account_events,
    "orders": _order_events,
    "counters": st.one_of(_account_events, _order_events),
}


def _random_run(name: str) -> st.SearchStrategy[list[Event]]:
    return st.lists(
        st.tuples(RANDOM_EVENTS[name], st.sampled_from(["s-1", "s-2"])), max_size=30
    ).map(lambda xs: [ev(t, d, stream=s, n=i) for i, ((t, d), s) in enumerate(xs, 1)])


@pytest.mark.parametrize("name", sorted(MODELS))
def test_apply_is_pure(name: str) -> None:
    model = MODELS[name]

    @FAST
    @given(_random_run(name))
    def check(events: list[Event]) -> None:
        states: dict[str, Any] = {}
        for e in events:
            before = states.get(e.stream, model.initial(e.stream))
            frozen = copy.deepcopy(before)
            e_frozen = copy.deepcopy(e)
            after = model.apply(before, e)
            assert before == frozen and e == e_frozen  # nothing given was changed
            assert model.apply(frozen, e) == after  # same input, same output
            assert after is not before
            rendered = model.render(after)
            assert json.loads(json.dumps(rendered)) == rendered
            _scribble(rendered)  # render gives a copy: changing it changes no state
            assert model.render(after) != rendered and before == frozen
            states[e.stream] = after

    check()


def _scribble(value: Any) -> None:
    """Change every dict inside ``value`` in place."""
    if isinstance(value, dict):
        for v in list(value.values()):
            _scribble(v)
        value["__scribbled__"] = True


def test_accounts_steps_follow_the_rules() -> None:
    """On any input, each step changes the state in exactly one of the documented ways."""

    @FAST
    @given(_random_run("accounts"))
    def check(events: list[Event]) -> None:
        states: dict[str, Any] = {}
        for e in events:
            a = states.get(e.stream, accounts.initial(e.stream))
            b = accounts.apply(a, e)
            states[e.stream] = b
            assert b["events"] == a["events"] + 1
            delta = {k for k in a if a[k] != b[k]} - {"events"}
            amount = e.data.get("amount", 0)
            if delta == {"rejected"} or delta == {"ignored"}:
                assert (delta == {"ignored"}) == (e.type not in accounts.EVENT_TYPES)
                continue
            if e.type == "Deposited":
                assert delta == {"balance", "deposits"}
                assert b["balance"] == a["balance"] + amount > a["balance"]
            elif e.type == "Withdrawn":
                assert delta <= {"balance", "withdrawals"} and 0 <= b["balance"] == a["balance"] - amount
            elif e.type == "FeeCharged":
                assert delta == {"balance", "fees"} and b["balance"] == a["balance"] - amount
            elif e.type == "Opened":
                assert a["status"] == "new" and b["status"] == "open"
            elif e.type == "Closed":
                assert delta == {"status"} and (a["status"], b["status"]) == ("open", "closed")
            else:  # pragma: no cover
                raise AssertionError((e, a, b))

    check()


def _snapshot_round_trip(model: Any, states: dict[str, Any]) -> dict[str, Any]:
    dump = getattr(model, "dump_state", lambda s: s)
    load = getattr(model, "load_state", lambda v: v)
    blob = cbor2.dumps({k: dump(v) for k, v in states.items()}, canonical=True)
    return {k: load(v) for k, v in cbor2.loads(blob).items()}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_folding_in_pieces_equals_folding_at_once(name: str) -> None:
    model, gen = MODELS[name], GENERATORS[name]

    @FAST
    @given(st.integers(0, 40), st.integers(1, 5), st.integers(0, 2**32))
    def check(n_events: int, n_streams: int, seed: int) -> None:
        events = as_events(gen(n_events, n_streams, seed))
        whole = fold(model, events)
        for k in range(len(events) + 1):
            head = fold(model, events[:k])
            kept = copy.deepcopy(head)
            assert fold(model, events[k:], head) == whole
            assert head == kept  # folding on did not change the intermediate states
            assert fold(model, events[k:], kept) == whole
            assert fold(model, events[k:], _snapshot_round_trip(model, head)) == whole

    check()

"""chainfold.es: eventsourcing domain events through the log and back, folded by AggregateModel to
exactly the aggregates eventsourcing itself reconstructs; CBORTranscoder inside eventsourcing."""

from __future__ import annotations

import copy
import json
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any
from uuid import UUID, uuid4

import cbor2
import pytest
from eventsourcing.application import Application
from eventsourcing.domain import Aggregate, OriginatorVersionError, event
from eventsourcing.persistence import (
    DatetimeAsISO,
    DecimalAsStr,
    JSONTranscoder,
    Mapper,
    Transcoding,
    TranscodingNotRegisteredError,
    UUIDAsHex,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chainfold.envelope import Event, decode, encode, event_from_json, event_to_json
from chainfold.es import (
    AggregateModel,
    CBORTranscoder,
    copy_aggregate,
    event_id,
    events_from_aggregate,
    timestamp_ms,
    to_event,
)
from chainfold.examples import accounts, es_accounts
from chainfold.examples.es_accounts import BankAccount, InsufficientFundsError

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
UTC = timezone.utc


class Shelf(Aggregate):
    """A test aggregate with every kind of value: UUID, Decimal, datetime, nested containers,
    a tuple, and an event class at class_version 2 with an upcaster."""

    @event("Created")
    def __init__(self, name: str, opened: datetime, tags: list[str] | tuple[str, ...]) -> None:
        self.name = name
        self.opened = opened
        self.tags = list(tags)
        self.books: dict[str, dict[str, Any]] = {}
        self.ledger: list[str] = []
        self.total = Decimal("0")

    class BookAdded(Aggregate.Event):
        isbn: str
        price: Decimal
        ref: UUID
        meta: dict[str, Any]
        copies: int

        class_version = 2

        @staticmethod
        def upcast_v1_v2(state: dict[str, Any]) -> None:
            state["copies"] = 1

    @event(BookAdded)
    def add_book(self, isbn: str, price: Decimal, ref: UUID, meta: dict[str, Any], copies: int) -> None:
        self.books[isbn] = {"price": price, "ref": ref, "meta": meta, "copies": copies}
        self.ledger.append(isbn)
        self.total += price * copies

    @event("BookRemoved")
    def remove_book(self, isbn: str) -> None:
        book = self.books.pop(isbn)
        self.ledger.append("-" + isbn)
        self.total -= book["price"] * book["copies"]


shelf_model = AggregateModel(Shelf)


def through_the_log(events: list[Event]) -> list[Event]:
    """What a consumer sees: canonical CBOR bytes, decoded again."""
    out = []
    for e in events:
        payload = encode(e)
        assert cbor2.dumps(cbor2.loads(payload), canonical=True) == payload
        out.append(decode(payload))
    return out


def fold(model: AggregateModel, events: list[Event], states: dict[str, Any] | None = None) -> dict[str, Any]:
    states = dict(states or {})
    for e in events:
        states[e.stream] = model.apply(states.get(e.stream, model.initial(e.stream)), e)
    return states


def replay(domain_events: list[Any]) -> Any:
    """eventsourcing's own reconstruction: mutate, event after event."""
    agg = None
    for de in domain_events:
        agg = de.mutate(agg)
    return agg


def make_shelf(n: int = 3) -> Shelf:
    opened = datetime(2024, 2, 29, 23, 59, 59, 999_999, tzinfo=UTC)
    shelf = Shelf(name="Fiction ✓", opened=opened, tags=["a", "b"])
    for i in range(n):
        shelf.add_book(
            isbn=f"978-{i}",
            price=Decimal("12.345") + i,
            ref=uuid4(),
            meta={"pages": 100 + i, "langs": ["en", "nl"], "rating": 4.5, "extra": None},
            copies=i + 1,
        )
    shelf.remove_book(isbn="978-0")
    return shelf


@pytest.fixture(scope="module")
def app() -> Application:
    """A POPO application with eventsourcing's default JSON transcoder."""
    return Application(env={"PERSISTENCE_MODULE": "eventsourcing.popo"})


# -- CBORTranscoder ------------------------------------------------------------------------

_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**64), 2**64), st.floats(allow_nan=False), st.text(max_size=8),
    st.uuids(), st.decimals(allow_nan=False, allow_infinity=False),
    st.datetimes(timezones=st.sampled_from([UTC, timezone(timedelta(hours=-5, minutes=-30))])),
)
_values = st.recursive(
    _leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.text(alphabet="abcxyz", max_size=4), inner, max_size=4),
    ),
    max_leaves=20,
)


@FAST
@given(_values)
def test_cbor_transcoder_round_trips_canonically_and_matches_json_transcoder(value: Any) -> None:
    tr = CBORTranscoder()
    data = tr.encode(value)
    assert tr.decode(data) == value
    assert cbor2.dumps(cbor2.loads(data), canonical=True) == data
    assert tr.encode(tr.decode(data)) == data
    # the plain structure is exactly what eventsourcing's JSONTranscoder writes
    jt = JSONTranscoder()
    for t in (UUIDAsHex(), DecimalAsStr(), DatetimeAsISO()):
        jt.register(t)
    assert tr.to_value(value) == json.loads(jt.encode(value))


class Point:
    def __init__(self, x: int, y: int) -> None:
        self.x, self.y = x, y

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Point) and (self.x, self.y) == (other.x, other.y)


class PointAsList(Transcoding):
    type = Point
    name = "point"

    def encode(self, obj: Point) -> list[int]:
        return [obj.x, obj.y]

    def decode(self, data: list[int]) -> Point:
        return Point(*data)


def test_cbor_transcoder_custom_and_unknown_types() -> None:
    tr = CBORTranscoder()
    with pytest.raises(TranscodingNotRegisteredError):
        tr.encode({"p": Point(1, 2)})
    with pytest.raises(TranscodingNotRegisteredError):
        tr.encode({1, 2})
    tr.register(PointAsList())
    value = {"p": [Point(1, 2), (3, b"\x00")], 7: {"_type_": "x"}}
    assert tr.decode(tr.encode(value)) == {"p": [Point(1, 2), [3, b"\x00"]], 7: {"_type_": "x"}}
    with pytest.raises(TranscodingNotRegisteredError):
        CBORTranscoder().decode(tr.encode(Point(0, 0)))
    with pytest.raises(TypeError):
        tr.encode({(1, 2): 3})


def test_cbor_transcoder_in_eventsourcing_mapper() -> None:
    mapper = Mapper(transcoder=CBORTranscoder())
    shelf = make_shelf()
    pending = list(shelf.pending_events)
    for de in pending:
        stored = mapper.to_stored_event(de)
        assert cbor2.dumps(cbor2.loads(stored.state), canonical=True) == stored.state
        assert mapper.to_domain_event(stored) == de
    assert replay([mapper.to_domain_event(mapper.to_stored_event(de)) for de in pending]) == replay(pending)


def test_cbor_transcoder_as_application_transcoder() -> None:
    env = {"PERSISTENCE_MODULE": "eventsourcing.popo", "TRANSCODER_TOPIC": "chainfold.es:CBORTranscoder"}
    app = Application(env=env)
    assert isinstance(app.mapper.transcoder, CBORTranscoder)
    shelf = make_shelf()
    app.save(shelf)
    assert app.repository.get(shelf.id) == shelf


# -- domain event <-> envelope -------------------------------------------------------------


def test_to_event_mapping() -> None:
    shelf = make_shelf(2)
    pending = list(shelf.pending_events)
    events = events_from_aggregate(shelf)
    json_mapper = Mapper(transcoder=JSONTranscoder())
    for t in (UUIDAsHex(), DecimalAsStr(), DatetimeAsISO()):
        json_mapper.transcoder.register(t)
    assert shelf.pending_events == [] and len(events) == len(pending) == 4
    for de, e in zip(pending, events):
        assert e.id == event_id(shelf.id, de.originator_version) == f"{shelf.id}:{de.originator_version}"
        assert e.stream == str(shelf.id) and e.seq == de.originator_version
        assert e.type == f"{__name__}:Shelf.{type(de).__name__}"
        assert e.time == timestamp_ms(de.timestamp)
        assert e.data["originator_version"] == de.originator_version and "originator_id" not in e.data
        assert json.loads(json.dumps(e.data)) == e.data  # JSON Lines and state exports can carry it
        stored = json.loads(json_mapper.to_stored_event(de).state)  # what eventsourcing stores
        assert e.data == {**stored, "originator_version": de.originator_version}
        assert shelf_model.to_domain_event(decode(encode(e))) == de
    assert events[1].data["class_version"] == 2
    # JSON Lines (chainfold publish) round trip gives the same event
    for e in events:
        assert event_from_json(json.loads(json.dumps(event_to_json(e)))) == e


def test_timestamp_ms() -> None:
    assert timestamp_ms(datetime(1970, 1, 1, 0, 0, 0, 1999, tzinfo=UTC)) == 1
    assert timestamp_ms(datetime(1970, 1, 1, 1, tzinfo=timezone(timedelta(hours=1)))) == 0
    assert timestamp_ms(datetime(2023, 11, 14, 22, 13, 20)) == 1_700_000_000_000  # naive = UTC
    with pytest.raises(ValueError):
        timestamp_ms(datetime(1969, 12, 31, 23, 59, 59, tzinfo=UTC))


_commands = st.lists(
    st.one_of(
        st.tuples(
            st.just("add"), st.sampled_from(["x", "y", "z"]),
            st.decimals(min_value=0, max_value=10**6, places=3), st.integers(1, 5),
            st.dictionaries(
                st.text(max_size=5),
                st.one_of(st.integers(), st.text(max_size=5), st.lists(st.booleans())),
                max_size=3,
            ),
        ),
        st.tuples(st.just("remove"), st.sampled_from(["x", "y", "z"])),
    ),
    max_size=12,
)


@FAST
@given(_commands, st.text(max_size=10), st.datetimes(min_value=datetime(1971, 1, 1), timezones=st.just(UTC)))
def test_fold_equals_eventsourcing_reconstruction(
    app: Application, commands: list[Any], name: str, opened: datetime
) -> None:
    shelf = Shelf(name=name, opened=opened, tags=tuple(name))
    for cmd in commands:
        if cmd[0] == "add":
            _, isbn, price, copies, meta = cmd
            shelf.add_book(isbn=isbn, price=price, ref=uuid4(), meta=meta, copies=copies)
        elif cmd[1] in shelf.books:
            shelf.remove_book(isbn=cmd[1])
    pending = list(shelf.pending_events)
    events = [to_event(de) for de in pending]
    app.save(shelf)
    ours = fold(shelf_model, through_the_log(events))[str(shelf.id)]
    theirs = app.repository.get(shelf.id)
    assert ours == theirs  # same class, same attributes (type for type), same version
    assert ours.version == theirs.version == len(pending)
    assert ours == replay(pending)
    assert shelf_model.render(ours) == shelf_model.render(theirs)


def test_old_event_versions_are_upcast() -> None:
    shelf = make_shelf(1)
    events = [to_event(de) for de in shelf.collect_events()]
    old = events[1]
    data = {k: v for k, v in old.data.items() if k not in ("class_version", "copies")}  # as v1 wrote it
    states = fold(shelf_model, [events[0], old._replace(data=data)])
    assert states[str(shelf.id)].books["978-0"]["copies"] == 1


# -- AggregateModel as a model -------------------------------------------------------------


def test_apply_is_pure_and_shares_nothing_mutable() -> None:
    shelf = make_shelf(3)
    events = through_the_log(events_from_aggregate(shelf))
    state = None
    for e in events:
        before = copy.deepcopy(state)
        after = shelf_model.apply(state, e)
        assert state == before  # the given aggregate is unchanged
        assert shelf_model.apply(before, e) == after  # same input, same output
        assert after is not state
        state = after
    # the next state shares no mutable value with the previous one
    prev = fold(shelf_model, events[:-1])[str(shelf.id)]
    kept = copy.deepcopy(prev)
    nxt = shelf_model.apply(prev, events[-1])
    nxt.books["978-2"]["meta"]["langs"].append("fr")
    nxt.tags.append("zzz")
    nxt.ledger.clear()
    assert prev == kept


def test_copy_aggregate() -> None:
    shelf = make_shelf(2)
    shelf.same = shelf.ledger  # aliasing is kept, as by copy.deepcopy
    c = copy_aggregate(shelf)
    assert c.__dict__.keys() == shelf.__dict__.keys() and c.pending_events == []
    assert {k: v for k, v in vars(c).items() if k != "_pending_events"} == {
        k: v for k, v in vars(shelf).items() if k != "_pending_events"
    }
    assert c.same is c.ledger and c.ledger is not shelf.ledger
    assert c.books["978-1"]["meta"] is not shelf.books["978-1"]["meta"]
    assert c.id is shelf.id  # immutable values are shared


def test_model_errors_are_clear() -> None:
    shelf = make_shelf(1)
    created, added, removed = through_the_log(events_from_aggregate(shelf))
    with pytest.raises(ValueError, match="does not create"):
        shelf_model.apply(None, added)
    state = shelf_model.apply(None, created)
    with pytest.raises(ValueError, match="again"):
        shelf_model.apply(state, created)
    with pytest.raises(OriginatorVersionError):
        shelf_model.apply(state, removed)  # version 3 after version 1
    with pytest.raises(ValueError, match="not an event of Shelf"):
        shelf_model.apply(state, added._replace(type="os:system"))
    with pytest.raises(ValueError, match="not an event of BankAccount"):
        es_accounts.model.apply(None, created)
    with pytest.raises(ValueError, match="not a valid id"):
        shelf_model.apply(None, created._replace(stream="acct-0001"))
    forged = created._replace(data={**created.data, "originator_topic": "os:system"})
    with pytest.raises(ValueError, match="creates"):
        shelf_model.apply(None, forged)
    # seq is the log's business: a shifted seq (e.g. after a duplicated entry) changes nothing
    assert shelf_model.apply(state, added._replace(seq=99)) == shelf_model.apply(state, added)


def test_dump_and_load_state() -> None:
    shelf = make_shelf(3)
    events = through_the_log(events_from_aggregate(shelf))
    state = fold(shelf_model, events)[str(shelf.id)]
    value = shelf_model.dump_state(state)
    assert shelf_model.dump_state(state) == value  # no clock in it
    assert json.loads(json.dumps(value)) == value
    blob = cbor2.dumps(value, canonical=True)
    loaded = shelf_model.load_state(cbor2.loads(blob))
    assert loaded == state and loaded.version == state.version == 5
    assert shelf_model.dump_state(None) is None and shelf_model.load_state(None) is None
    with pytest.raises(ValueError):
        es_accounts.model.load_state(value)


def test_render_is_json() -> None:
    state = fold(shelf_model, through_the_log(events_from_aggregate(make_shelf(2))))
    (rendered,) = [shelf_model.render(s) for s in state.values()]
    assert json.loads(json.dumps(rendered)) == rendered
    assert rendered["version"] == 4 and rendered["name"] == "Fiction ✓"
    assert rendered["opened"] == "2024-02-29T23:59:59.999999+00:00"
    assert rendered["total"] == "26.690" and rendered["tags"] == ["a", "b"]
    assert set(rendered) == {
        "id", "version", "created_on", "modified_on", "name", "opened", "tags", "books", "ledger", "total"
    }
    assert shelf_model.render(None) is None
    assert shelf_model.version.startswith(f"1:{__name__}:Shelf")


# -- the example aggregate -----------------------------------------------------------------


def test_bank_account_commands() -> None:
    acct = BankAccount(number="n-1", owner="Ada")
    acct.deposit(1000)
    with pytest.raises(InsufficientFundsError):
        acct.withdraw(1001)
    with pytest.raises(ValueError):
        acct.deposit(1.5)  # type: ignore[arg-type]
    acct.charge_fee(1500)
    acct.close()
    assert (acct.balance, acct.status, acct.version) == (-500, "closed", 4)
    assert acct.id == BankAccount.create_id("n-1")


def test_es_accounts_generate_events_is_deterministic_and_matches_accounts() -> None:
    events = es_accounts.generate_events(600, 12, 9)
    assert events == es_accounts.generate_events(600, 12, 9) and len(events) == 600
    assert len({e.id for e in events}) == 600
    story = accounts.generate(600, 12, 9)
    assert [e.time for e in events] == [d["time"] for d in story]
    ours = fold(es_accounts.model, through_the_log(events))
    by_number = {s.number: es_accounts.model.render(s) for s in ours.values()}
    plain: dict[str, Any] = {}
    for d in story:
        e = event_from_json(d)
        plain[e.stream] = accounts.apply(plain.get(e.stream, accounts.initial(e.stream)), e)
    assert len(by_number) == len(plain) == 12
    for stream, s in plain.items():
        r = by_number[es_accounts.account_number(stream, 9)]
        for key in ("balance", "status", "owner", "currency", "deposits", "withdrawals", "fees"):
            assert r[key] == s[key], (stream, key)
        assert r["version"] == s["events"]


def test_es_folding_in_pieces_equals_folding_at_once() -> None:
    model = es_accounts.model

    @FAST
    @given(st.integers(0, 30), st.integers(1, 4), st.integers(0, 2**32))
    def check(n_events: int, n_streams: int, seed: int) -> None:
        events = through_the_log(es_accounts.generate_events(n_events, n_streams, seed))
        whole = fold(model, events)
        for k in range(len(events) + 1):
            head = fold(model, events[:k])
            kept = copy.deepcopy(head)
            assert fold(model, events[k:], head) == whole
            assert head == kept
            assert fold(model, events[k:], kept) == whole
            blob = cbor2.dumps({s: model.dump_state(a) for s, a in head.items()}, canonical=True)
            restored = {s: model.load_state(v) for s, v in cbor2.loads(blob).items()}
            assert fold(model, events[k:], restored) == whole

    check()


def test_loadable_by_reference() -> None:
    from chainfold.replay.model import load_model

    model = load_model("chainfold.examples.es_accounts:model")
    assert model.obj is es_accounts.model and model.version == es_accounts.model.version

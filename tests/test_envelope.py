"""The event envelope (SPEC §1): deterministic bytes, round trips, and clear refusals."""

from __future__ import annotations

import json

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chainfold.envelope import Event, decode, encode, event_from_json
from chainfold.errors import MalformedEnvelope, MalformedInputLine

text = st.text(min_size=1, max_size=20)
json_scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=10)
data = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
).filter(lambda x: True)
data_maps = st.dictionaries(st.text(max_size=8), data, max_size=4)
events = st.builds(
    Event,
    id=text,
    stream=text,
    seq=st.none() | st.integers(1, 2**64 - 1),
    type=text,
    time=st.integers(0, 2**64 - 1),
    data=data_maps,
)


@given(events)
@settings(max_examples=300)
def test_round_trip(ev: Event) -> None:
    assert decode(encode(ev)) == ev


@given(events)
@settings(max_examples=200)
def test_bytes_are_canonical_and_stable(ev: Event) -> None:
    b = encode(ev)
    assert encode(decode(b)) == b
    # key order in the source dict does not matter: deterministic encoding sorts keys
    shuffled = Event(ev.id, ev.stream, ev.seq, ev.type, ev.time, dict(reversed(list(ev.data.items()))))
    assert encode(shuffled) == b
    m = {"data": ev.data, "time": ev.time, "type": ev.type, "stream": ev.stream, "id": ev.id}
    if ev.seq is not None:
        m["seq"] = ev.seq
    assert cbor2.dumps(m, canonical=True) == b


GOOD = {"id": "e1", "stream": "s", "seq": 1, "type": "T", "time": 5, "data": {}}


@pytest.mark.parametrize(
    "payload, reason",
    [
        (b"", "empty payload"),
        (b"\xff\xfe", "not CBOR"),
        (json.dumps(GOOD).encode(), "looks like JSON, expected a CBOR map"),
        (b"[1, 2]", "looks like JSON, expected a CBOR map"),
        (b"hello", "looks like text ('hello'), expected a CBOR map"),
        (cbor2.dumps([1, 2]), "not a CBOR map"),
        (cbor2.dumps({k: v for k, v in GOOD.items() if k != "id"}), "missing key 'id'"),
        (cbor2.dumps({k: v for k, v in GOOD.items() if k != "data"}), "missing key 'data'"),
        (cbor2.dumps({**GOOD, "id": 7}), "'id'"),
        (cbor2.dumps({**GOOD, "stream": ""}), "'stream'"),
        (cbor2.dumps({**GOOD, "time": -1}), "'time'"),
        (cbor2.dumps({**GOOD, "time": True}), "'time'"),
        (cbor2.dumps({**GOOD, "time": 1.5}), "'time'"),
        (cbor2.dumps({**GOOD, "data": [1]}), "'data'"),
        (cbor2.dumps({**GOOD, "seq": 0}), "'seq'"),
        (cbor2.dumps({**GOOD, "type": b"bytes"}), "'type'"),
        (cbor2.dumps(GOOD, canonical=True) + b"\x00", "after the CBOR item"),
        (b"\xa2\x62id\x61a\x62id\x61b", "not CBOR"),  # repeated key
    ],
)
def test_malformed_payloads_say_why(payload: bytes, reason: str) -> None:
    with pytest.raises(MalformedEnvelope) as info:
        decode(payload)
    assert reason in info.value.reason


@given(st.binary(max_size=64))
def test_arbitrary_bytes_never_crash(b: bytes) -> None:
    try:
        ev = decode(b)
    except MalformedEnvelope:
        return
    assert isinstance(ev, Event)


@pytest.mark.parametrize(
    "obj, reason",
    [
        ([], "expected a JSON object"),
        ({"stream": "s", "type": "T", "data": {}}, "missing 'id'"),
        ({"id": "e", "type": "T", "data": {}}, "missing 'stream'"),
        ({"id": "e", "stream": "s", "data": {}}, "missing 'type'"),
        ({"id": "e", "stream": "s", "type": "T"}, "missing 'data'"),
        ({"id": "e", "stream": "s", "type": "T", "data": 3}, "'data' must be"),
        ({"id": "e", "stream": 1, "type": "T", "data": {}}, "'stream' must be"),
        ({"id": "e", "stream": "s", "type": "T", "data": {}, "time": "now"}, "'time'"),
        ({"id": "e", "stream": "s", "type": "T", "data": {}, "extra": 1}, "unknown key"),
    ],
)
def test_json_input_refused_with_reason(obj: object, reason: str) -> None:
    with pytest.raises(MalformedInputLine) as info:
        event_from_json(obj, path="f.jsonl", line=3)
    assert info.value.line == 3 and reason in info.value.reason


def test_json_input_defaults_time() -> None:
    ev = event_from_json({"id": "e", "stream": "s", "type": "T", "data": {}}, now_ms=42)
    assert ev.time == 42 and ev.seq is None

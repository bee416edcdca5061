"""Corrections (SPEC §4): the idempotency key is a function of the correction alone, pinned to its
documented encoding; corrections are SPEC §1 envelopes; and the consumer-side example applies each
correction once (``chainfold.examples.apply_corrections``)."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import cbor2
import pytest
from hypothesis import given, settings, strategies as st

from chainfold.envelope import decode, encode
from chainfold.examples import accounts
from chainfold.examples.apply_corrections import CorrectionApplier, add_delta, main as apply_main
from chainfold.log import MemoryLog
from chainfold.ops.corrections import (
    KEY_FORMAT, correction_events, correction_key, make_correction, producer_name_for,
)
from chainfold.ops.reconcile import reconcile

from .test_reconcile import build

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=5), kids, max_size=3),
    max_leaves=8,
)


# -- the key ------------------------------------------------------------------------------------------


def test_key_is_the_documented_encoding() -> None:
    """SHA-256 over deterministic CBOR (RFC 8949 §4.2.1) of [format, full topic, stream, actual,
    expected], checked against CBOR bytes written out by hand (map keys in bytewise order of their
    encodings: "status" (0x66...) before "balance" (0x67...))."""
    actual, expected = {"balance": 95, "status": "open"}, {"balance": 100, "status": "open"}

    def text(s: str) -> bytes:
        b = s.encode()
        return (bytes([0x60 + len(b)]) if len(b) < 24 else bytes([0x78, len(b)])) + b

    def account(balance: int) -> bytes:
        return b"\xa2" + text("status") + text("open") + text("balance") + bytes([0x18, balance])

    by_hand = (b"\x85" + text("chainfold/correction/1") + text("persistent://public/default/accounts")
               + text("acct-0007") + account(95) + account(100))
    assert KEY_FORMAT == "chainfold/correction/1"
    assert cbor2.dumps([KEY_FORMAT, "persistent://public/default/accounts", "acct-0007", actual, expected],
                       canonical=True) == by_hand
    assert correction_key("accounts", "acct-0007", actual, expected) == hashlib.sha256(by_hand).hexdigest()


def test_key_ignores_dict_order_and_short_names() -> None:
    a = correction_key("t", "s", {"x": 1, "y": [1, 2]}, {"y": [1, 2], "x": 2})
    assert a == correction_key("persistent://public/default/t", "s", {"y": [1, 2], "x": 1}, {"x": 2, "y": [1, 2]})
    assert len(a) == 64 and int(a, 16) >= 0


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=6), st.text(max_size=6), json_values, json_values)
def test_key_is_a_function_of_its_four_inputs(stream: str, other: str, actual, expected) -> None:
    k = correction_key("t", stream, actual, expected)
    assert k == correction_key("t", stream, json.loads(json.dumps(actual)), json.loads(json.dumps(expected)))
    if other != stream:
        assert correction_key("t", other, actual, expected) != k
    assert correction_key("t2", stream, actual, expected) != k
    if actual != expected:
        assert correction_key("t", stream, expected, actual) != k  # the direction matters


def test_large_integers_keep_distinct_keys() -> None:
    """Beyond 2^53 (where canonical JSON would round), distinct states keep distinct keys."""
    big = 2**60
    assert correction_key("t", "s", {"ns": big}, {"ns": big + 1}) != correction_key("t", "s", {"ns": big}, {"ns": big + 2})


def test_key_does_not_depend_on_unrelated_log_growth(tmp_path: Path) -> None:
    w = build(300, 8, seed=3)
    expected = {}
    for ev in w.events:
        expected[ev.stream] = accounts.apply(expected.get(ev.stream) or accounts.initial(ev.stream), ev)
    victim, other = sorted(expected)[0], sorted(expected)[-1]
    export = dict(expected, **{victim: dict(expected[victim], balance=expected[victim]["balance"] - 5)})
    r1 = reconcile(w.log, accounts.model, snapshots_root=tmp_path / "s", state=export, repair=True)
    late = w.events[-1]._replace(id="evt-late", stream=other, type="Deposited", data={"amount": 1}, seq=None)
    w.log.append([late])
    export[other] = accounts.apply(export[other], late)
    r2 = reconcile(w.log, accounts.model, snapshots_root=tmp_path / "s", state=export, repair=True)
    assert r1.to_json()["log"]["head"] != r2.to_json()["log"]["head"]
    assert r1.corrections == r2.corrections and len(r1.corrections) == 1
    assert r1.corrections[0]["idempotency_key"] == correction_key(w.log.topic, victim, export[victim], expected[victim])


def test_correction_envelopes() -> None:
    c = make_correction("t", "acct-1", {"balance": 10}, {"balance": 4}, {"balance": 6})
    (ev,) = correction_events([c], time_ms=1_700_000_000_000)
    back = decode(encode(ev))
    assert back.id == c["idempotency_key"] and back.stream == "acct-1" and back.type == "Correction"
    assert back.data == c and back.time == 1_700_000_000_000


def test_producer_name_is_stable_per_source_topic() -> None:
    assert producer_name_for("a") == producer_name_for("persistent://public/default/a") != producer_name_for("b")


def test_publish_needs_a_log_that_appends_each_id_once() -> None:
    from chainfold.ops.corrections import publish_corrections

    with pytest.raises(ValueError, match="producer_name"):
        publish_corrections(MemoryLog("t2"), [make_correction("t", "s", 1, 0, 1)])


# -- the consumer-side example ------------------------------------------------------------------------


def corr(stream: str, actual, expected, delta) -> dict:
    return make_correction("t", stream, expected, actual, delta)


def test_applier_sets_expected_adds_delta_or_reports_a_conflict() -> None:
    a = CorrectionApplier({"s1": {"balance": 95, "status": "open"}, "s2": {"balance": 50, "status": "open"},
                           "s3": {"status": "open"}})
    c1 = corr("s1", {"balance": 95, "status": "open"}, {"balance": 100, "status": "open"}, {"balance": 5})
    assert a.apply(c1) == "set" and a.figures["s1"] == {"balance": 100, "status": "open"}
    assert a.apply(c1) == "duplicate" and a.figures["s1"] == {"balance": 100, "status": "open"}
    # s2 moved on (a later +20 applied correctly) since the correction was computed: add the delta
    c2 = corr("s2", {"balance": 30, "status": "open"}, {"balance": 35, "status": "open"}, {"balance": 5})
    assert a.apply(c2) == "delta" and a.figures["s2"] == {"balance": 55, "status": "open"}
    # a non-numeric difference on a figure that moved on: nothing to add safely
    c3 = corr("s3", {"status": "new"}, {"status": "closed"}, None)
    assert a.apply(c3) == "conflict" and a.figures["s3"] == {"status": "open"} and a.conflicts == [c3]
    # a stream the worker should never have had
    c4 = corr("s4", {"balance": 1}, None, None)
    a.figures["s4"] = {"balance": 1}
    assert a.apply(c4) == "set" and "s4" not in a.figures


def test_applier_survives_a_restart(tmp_path: Path) -> None:
    f = tmp_path / "figures.json"
    c = corr("s", {"n": 1}, {"n": 3}, {"n": 2})
    a = CorrectionApplier({"s": {"n": 1}})
    a.apply(c)
    a.save(f)
    b = CorrectionApplier.load(f)
    assert b.apply(c) == "duplicate" and b.figures == {"s": {"n": 3}}


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abc"), st.integers(-50, 50), st.integers(-50, 50)), max_size=8),
       st.integers(0, 2**32))
def test_redelivered_corrections_change_nothing(items, seed: int) -> None:
    """Any corrections in log order, each re-delivered up to twice more at any later point: the same
    figures as delivering each once."""
    cs = [corr(s, {"n": act}, {"n": exp}, {"n": exp - act} if exp != act else None) for s, act, exp in items]
    start = {s: {"n": act} for s, act, _ in items}
    once = CorrectionApplier(start)
    for c in cs:
        once.apply(c)
    rng = random.Random(seed)
    deliveries = list(cs)
    for i, c in enumerate(cs):
        for _ in range(rng.randint(0, 2)):  # a re-send lands anywhere after the first delivery
            deliveries.insert(rng.randint(deliveries.index(c) + 1, len(deliveries)), c)
    many = CorrectionApplier(start)
    for c in deliveries:
        many.apply(c)
    assert many.figures == once.figures and many.applied == once.applied


def test_add_delta_nested() -> None:
    assert add_delta({"a": 1, "b": {"c": 2}}, {"b": {"c": 3}, "d": 4}) == {"a": 1, "b": {"c": 5}, "d": 4}


def test_example_applies_a_corrections_file_once(tmp_path: Path, capsys) -> None:
    figures = tmp_path / "figures.json"
    CorrectionApplier({"s": {"n": 1}}).save(figures)
    f = tmp_path / "c.jsonl"
    f.write_text(json.dumps(corr("s", {"n": 1}, {"n": 4}, {"n": 3})) + "\n")
    for applied in (1, 0):  # the second run is a retry
        assert apply_main(["--figures", str(figures), "--file", str(f)]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["applied"] == applied and out["conflicts"] == []
    assert json.loads(figures.read_text())["figures"] == {"s": {"n": 4}}

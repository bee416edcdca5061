"""The state digest's fast path (orjson, no rendering) is byte for byte the definition's.

``state_digest`` is a contract between a worker's Tracker and ``watch`` (SPEC §3): SHA-256 of
0x03, the stream id, 0x00 and ``json.dumps(state, sort_keys=True, separators=(",", ":"),
ensure_ascii=False)``. Watch digests a model's flat state without rendering it
(:func:`~chainfold.tracker.plain_state_digest`); both must agree with the definition for every
value, and fall back where orjson's text would differ (floats, odd keys, huge ints, surrogates).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from chainfold.replay.model import render_json
from chainfold.tracker import plain_state_digest, state_digest


def definition(stream: str, state: Any) -> bytes:
    text = json.dumps(state, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(b"\x03" + stream.encode("utf-8", "surrogatepass") + b"\x00"
                          + text.encode("utf-8", "surrogatepass")).digest()


texts = st.text(st.characters(min_codepoint=0, max_codepoint=0x10FFFF), max_size=8)
plain = st.one_of(texts, st.integers(-2**70, 2**70), st.booleans(), st.none(), st.floats(allow_nan=False))
flat = st.dictionaries(texts, plain, max_size=12)


@settings(max_examples=400, deadline=None)
@given(texts, flat)
def test_flat_states_digest_as_defined(stream: str, state: dict[str, Any]) -> None:
    want = definition(stream, state)
    assert state_digest(stream, state) == want
    fast = plain_state_digest(stream, state)
    assert fast is None or fast == want
    if not any(type(v) is float or (type(v) is int and not -2**63 <= v < 2**64) for v in state.values()) \
            and not any("\ud800" <= c <= "\udfff" for t in [stream, *state, *map(str, state.values())] for c in t):
        assert fast == want  # the common flat state takes the fast path


@settings(max_examples=200, deadline=None)
@given(texts, st.dictionaries(st.one_of(texts, st.integers(), st.booleans()), st.one_of(plain, st.lists(plain)),
                              max_size=6))
def test_unrendered_values_fall_back_to_rendering(stream: str, raw: dict[Any, Any]) -> None:
    """What watch does with a model's raw render: the fast path or, where it declines, render_json."""
    fast = plain_state_digest(stream, raw)
    rendered = render_json(raw)
    assert (fast if fast is not None else state_digest(stream, rendered)) == definition(stream, rendered)


def test_surrogates_and_huge_ints_are_not_taken() -> None:
    assert plain_state_digest("s", {"a": "\ud800"}) is None
    assert plain_state_digest("s", {"a": 2**64}) is None
    assert plain_state_digest("s", {"a": 1.5}) is None
    assert plain_state_digest("s", {1: "x"}) is None
    assert state_digest("s", {"a": 2**64}) == definition("s", {"a": 2**64})

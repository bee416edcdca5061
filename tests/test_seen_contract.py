"""The SeenIds contract (chainfold.replay.seen): one suite for every index of folded event ids.
Add an implementation to ``INDEXES`` (a factory taking a scratch directory) to run it here."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chainfold.replay.seen import SeenIds, SeenSet

INDEXES: dict[str, Callable[[Path], SeenIds]] = {"memory": lambda _dir: SeenSet()}

ids = st.text(alphabet="abcdef0123456789-", min_size=1, max_size=6)


@pytest.fixture(params=sorted(INDEXES))
def make(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], SeenIds]:
    n = [0]

    def new() -> SeenIds:
        n[0] += 1
        d = tmp_path / f"index-{n[0]}"
        d.mkdir()
        return INDEXES[request.param](d)

    return new


def test_it_is_a_seen_ids(make) -> None:
    assert isinstance(make(), SeenIds)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.lists(ids, max_size=30), max_size=12))
def test_add_new_is_exact_in_batches(make, batches: list[list[str]]) -> None:
    index, known = make(), set()
    for batch in batches:
        want = []
        for i in batch:  # True exactly for the first sight, even inside one batch
            want.append(i not in known)
            known.add(i)
        assert index.add_new(batch) == want
        assert len(index) == len(known)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(ids, max_size=40), st.lists(ids, max_size=40))
def test_a_snapshot_changes_nothing_it_answers(make, first: list[str], then: list[str]) -> None:
    a, b = make(), make()
    a.add_new(first)
    b.add_new(first)
    a.snapshot()
    assert a.add_new(then) == b.add_new(then) and len(a) == len(b)

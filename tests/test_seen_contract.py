"""The SeenIds contract (chainfold.replay.seen): one suite for every index of folded event ids.
Add an implementation to ``INDEXES`` (a factory taking a scratch directory) to run it here."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chainfold.replay.dedup import DedupIndex
from chainfold.replay.seen import SeenIds, SeenSet

INDEXES: dict[str, Callable[[Path], SeenIds]] = {
    "memory": lambda _dir: SeenSet(),
    # a tiny memory bound: most batches spill, so answers come from pieces on disk too
    "dedup": lambda d: DedupIndex.open(d, memory_bytes=2_000),
}

ids = st.text(alphabet="abcdef0123456789-", min_size=1, max_size=6)


@pytest.fixture(params=sorted(INDEXES))
def make(request: pytest.FixtureRequest, tmp_path: Path):  # type: ignore[no-untyped-def]
    made: list[SeenIds] = []

    def new() -> SeenIds:
        d = tmp_path / f"index-{len(made)}"
        d.mkdir()
        made.append(INDEXES[request.param](d))
        return made[-1]

    yield new
    for index in made:
        close = getattr(index, "close", None)
        if close is not None:
            close()


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
    a.checkpoint()
    assert a.add_new(then) == b.add_new(then) and len(a) == len(b)

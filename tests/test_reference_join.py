"""The handling join (ops/reference_join.py) against a plain in-memory computation, with buckets
small enough that every case spans many of them."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from chainfold.ops.reference_join import HandlingJoin

ids = st.sampled_from([f"evt-{i}" for i in range(40)] + ["é", "", "a\x00b", "evt-1 "])


def plain(reference: list[tuple[str, int]], handlings: list[tuple[str, int]]):
    pos = {eid: (k, sno) for k, (eid, sno) in enumerate(reference)}
    seen: dict[str, int] = {}
    ann, unknown = [], []
    for h, (eid, line) in enumerate(handlings):
        k, sno = pos.get(eid, (-1, -1))
        ann.append((k, sno, eid not in seen))
        seen[eid] = seen.get(eid, 0) + 1
        if k < 0:
            unknown.append((h, line, eid))
    missing = [(k, eid) for k, (eid, _) in enumerate(reference) if eid not in seen]
    return ann, unknown, missing, {e for e, n in seen.items() if n > 1}


@settings(max_examples=150, deadline=None)
@given(ref=st.lists(ids, unique=True, max_size=30), handled=st.lists(ids, max_size=60),
       bucket_rows=st.integers(1, 9), data=st.data())
def test_join_equals_the_plain_computation(tmp_path_factory, ref, handled, bucket_rows, data) -> None:
    reference = [(eid, data.draw(st.integers(0, 5))) for eid in ref]
    handlings = [(eid, 2 * h + 1) for h, eid in enumerate(handled)]
    d: Path = tmp_path_factory.mktemp("join")
    join = HandlingJoin(d / "j", iter(reference), len(reference), iter(handlings), len(handlings),
                        bucket_rows=bucket_rows)
    try:
        ann, unknown, missing, twice = plain(reference, handlings)
        assert list(join.annotations(block=3)) == ann
        assert join.unknown == unknown and join.missing == missing and join.twice == twice
        assert join.handlings == len(handlings)
    finally:
        join.close()
    assert not any((d / "j").iterdir())  # every file removed

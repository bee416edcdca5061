"""verify: every fault kind is caught and the first bad entry is named exactly (memory log; the
same checks run on real brokers in test_verify_broker.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chainfold.envelope import Event, encode
from chainfold.errors import CheckpointCorrupt
from chainfold.log import MemoryLog
from chainfold import verify
from chainfold.ops.verify import compare_logs

FAULTS = ["drop", "duplicate", "swap", "alter", "insert", "truncate"]


def payloads(n: int) -> list[bytes]:
    return [encode(Event(f"e{i}", f"s{i % 7}", i // 7 + 1, "T", 1_700_000_000_000 + i, {"i": i})) for i in range(n)]


def make(ps: list[bytes], name: str = "t") -> MemoryLog:
    log = MemoryLog(name)
    log.append_payloads((p, "k", None) for p in ps)
    return log


def inject(ps: list[bytes], kind: str, i: int) -> list[bytes]:
    out = list(ps)
    if kind == "drop":
        del out[i]
    elif kind == "duplicate":
        out.insert(i + 1, out[i])
    elif kind == "swap":
        out[i], out[i + 1] = out[i + 1], out[i]
    elif kind == "alter":
        b = bytearray(out[i])
        b[len(b) // 2] ^= 0x01
        out[i] = bytes(b)
    elif kind == "insert":
        out.insert(i, encode(Event("intruder", "s0", None, "T", 1, {})))
    elif kind == "truncate":
        del out[i:]
    return out


def first_diff(a: list[bytes], b: list[bytes]) -> int | None:
    for j, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return j
    return None if len(a) == len(b) else min(len(a), len(b))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(2, 600), seg=st.sampled_from([1, 2, 4, 16, 64]), kind=st.sampled_from(FAULTS), data=st.data())
def test_verify_names_the_first_bad_entry(tmp_path_factory, n: int, seg: int, kind: str, data) -> None:
    rec = tmp_path_factory.mktemp("rec")
    ps = payloads(n)
    i = data.draw(st.integers(0, n - 2))
    original = make(ps)
    first = verify(original, record_dir=rec, segment_size=seg)
    assert first.intact and first.to_json()["log"]["events"] == n
    again = verify(original, record_dir=rec, segment_size=seg)
    assert again.intact and again.to_json()["log"]["head"] == first.to_json()["log"]["head"]

    bad = inject(ps, kind, i)
    expected = first_diff(ps, bad)
    faulty = make(bad)
    report = verify(faulty, record_dir=rec, segment_size=seg)
    assert not report.intact, kind
    assert report.mismatch.index == expected, (kind, i, report.mismatch)
    fm = report.to_json()["first_mismatch"]
    assert fm["segment"] == expected // seg
    if expected < len(bad):
        assert fm["message_id"] == str(faulty.entries()[expected].message_id)

    cmp = compare_logs(faulty, original, segment_size=seg)
    assert cmp.mismatch is not None and cmp.mismatch.index == expected


def test_growing_log_stays_intact_and_records_more(tmp_path: Path) -> None:
    ps = payloads(50)
    log = make(ps[:30])
    assert verify(log, record_dir=tmp_path, segment_size=8).intact
    log.append_payloads((p, "k", None) for p in ps[30:])
    r = verify(log, record_dir=tmp_path, segment_size=8)
    assert r.intact and r.to_json()["log"]["segments"] == 7
    assert r.to_json()["checkpoints_recorded"] == 3  # segments 3, 4, 5 (6 is partial)


def test_corrupt_checkpoint_file_is_reported_not_trusted(tmp_path: Path) -> None:
    log = make(payloads(40))
    verify(log, record_dir=tmp_path, segment_size=8)
    f = tmp_path / "checkpoints.jsonl"
    lines = f.read_text().splitlines(keepends=True)
    f.write_text("".join(lines[:2]) + lines[2][:20])
    with pytest.raises(CheckpointCorrupt) as info:
        verify(log, record_dir=tmp_path, segment_size=8)
    assert str(f) in str(info.value)
    r = verify(log, record_dir=tmp_path, segment_size=8, reset=True)
    assert r.intact and verify(log, record_dir=tmp_path, segment_size=8).intact


def test_identical_logs_compare_equal() -> None:
    ps = payloads(100)
    r = compare_logs(make(ps), make(ps, "copy"), segment_size=16)
    assert r.intact and r.to_json()["first_mismatch"] is None

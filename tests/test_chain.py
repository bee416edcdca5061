"""chainfold.hashing.chain and chainfold.hashing.checkpoints against the SPEC §2 formulas, computed naively here."""

from __future__ import annotations

import hashlib
import json
import math

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chainfold import merkle
from chainfold.hashing.chain import ZERO_HEAD, ChainBuilder, Checkpoint, Divergence, chain_head, find_divergence
from chainfold.hashing.checkpoints import CheckpointFile
from chainfold.errors import CheckpointCorrupt

SEGMENT_SIZES = [1, 2, 4, 8, 16, 64]


# --- the naive reference: SPEC §2 read literally ---------------------------------------------------


def sha(b: bytes) -> bytes:
    return hashlib.sha256(b).digest()


def mth(leaves):
    if not leaves:
        return sha(b"")
    if len(leaves) == 1:
        return leaves[0]
    k = 1
    while 2 * k < len(leaves):
        k *= 2
    return sha(b"\x01" + mth(leaves[:k]) + mth(leaves[k:]))


def reference_checkpoints(payloads, ids, s):
    """Every segment's checkpoint (the last one provisional if partial), straight from the formulas."""
    leaves = [sha(b"\x00" + p) for p in payloads]
    out, head = [], bytes(32)
    for k in range(math.ceil(len(leaves) / s)):
        seg = leaves[k * s : (k + 1) * s]
        n_k = k * s + len(seg)
        r = mth(seg)
        head = sha(b"\x02" + head + n_k.to_bytes(8, "big") + r)
        out.append(Checkpoint(k, n_k, s, r, head, ids[k * s], ids[n_k - 1]))
    return out


def run(builder, payloads, ids, start=0):
    got = []
    for i, p in enumerate(payloads):
        cp = builder.add(p, ids[start + i])
        if cp is not None:
            got.append(cp)
    return got


def all_checkpoints(builder, full):
    p = builder.pending()
    return full + [p] if p else full


payload_lists = st.lists(st.binary(max_size=12), max_size=150)


def _ids(n):
    return [f"{i}:{i % 7}:-1:-1" for i in range(n)]


# --- chain head and builder ----------------------------------------------------------------------------


def test_chain_head_formula():
    r = sha(b"r")
    assert chain_head(ZERO_HEAD, 5, r) == sha(b"\x02" + bytes(32) + b"\0\0\0\0\0\0\0\x05" + r)
    assert ZERO_HEAD == bytes(32)


@settings(max_examples=120, deadline=None)
@given(payload_lists, st.sampled_from(SEGMENT_SIZES))
def test_builder_matches_reference(payloads, s):
    ids = _ids(len(payloads))
    want = reference_checkpoints(payloads, ids, s)
    b = ChainBuilder(s)
    full = run(b, payloads, ids)
    assert all(cp.full for cp in full)
    assert all_checkpoints(b, full) == want
    assert b.size == len(payloads)
    assert b.head == (full[-1].head if full else ZERO_HEAD)
    if want and not want[-1].full:
        assert b.pending() == want[-1] and not want[-1].full
    else:
        assert b.pending() is None
    # add_leaf is add with a precomputed leaf hash
    b2 = ChainBuilder(s)
    full2 = [cp for cp in (b2.add_leaf(merkle.leaf_hash(p), i) for p, i in zip(payloads, ids)) if cp]
    assert full2 == full and b2.pending() == b.pending() and b2.log_root() == b.log_root()


@settings(max_examples=60, deadline=None)
@given(payload_lists, st.sampled_from(SEGMENT_SIZES))
def test_log_root_equals_merkle_root_at_every_size(payloads, s):
    leaves = [merkle.leaf_hash(p) for p in payloads]
    b = ChainBuilder(s)
    assert b.log_root() == merkle.root([])
    for i, p in enumerate(payloads):
        b.add(p)
        assert b.log_root() == merkle.root(leaves[: i + 1])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.binary(max_size=6), max_size=70), st.sampled_from(SEGMENT_SIZES))
def test_state_round_trip_at_every_split(payloads, s):
    ids = _ids(len(payloads))
    whole = ChainBuilder(s)
    want = run(whole, payloads, ids)
    for split in range(len(payloads) + 1):
        b = ChainBuilder(s)
        got = run(b, payloads[:split], ids)
        state = cbor2.loads(cbor2.dumps(b.state(), canonical=True))  # CBOR-encodable, exactly
        r = ChainBuilder.from_state(state)
        assert r.state() == b.state()
        assert r.pending() == b.pending() and r.log_root() == b.log_root() and r.head == b.head
        got += run(r, payloads[split:], ids, start=split)
        assert got == want
        assert r.pending() == whole.pending() and r.log_root() == whole.log_root()
        assert r.state() == whole.state()


def test_from_state_rejects_inconsistent_state():
    b = ChainBuilder(4)
    run(b, [b"%d" % i for i in range(11)], _ids(11))
    good = b.state()
    assert ChainBuilder.from_state(good).state() == good
    bad = [
        {**good, "segment_size": 3},
        {**good, "size": 12},  # frontiers no longer match the size
        {**good, "size": -1},
        {**good, "head": b"x"},
        {**good, "head": ZERO_HEAD},
        {**good, "segment_frontier": good["segment_frontier"][:1]},
        {**good, "log_frontier": []},
        {**good, "segment_frontier": [b"short", b"short"]},
        {**good, "first": 5},
        {**good, "version": 99},
        {k: v for k, v in good.items() if k != "head"},
    ]
    for st_ in bad:
        with pytest.raises(ValueError):
            ChainBuilder.from_state(st_)


@pytest.mark.parametrize("s", [0, 3, -4, 6, 1.0, True, "8", None])
def test_segment_size_must_be_power_of_two(s):
    with pytest.raises(ValueError):
        ChainBuilder(s)


def test_checkpoint_json_round_trip_and_keys():
    b = ChainBuilder(4)
    cps = run(b, [b"a", b"b", b"c", b"d", b"e"], _ids(5))
    cp = cps[0]
    j = cp.to_json()
    assert list(j) == ["segment", "size", "segment_size", "root", "head", "first", "last"]
    assert j["root"] == cp.root.hex() and j["head"] == cp.head.hex() and j["first"] == "0:0:-1:-1"
    assert Checkpoint.from_json(json.loads(json.dumps(j))) == cp
    assert Checkpoint.from_cbor(cbor2.loads(cbor2.dumps(cp.to_cbor()))) == cp
    assert cp.full and not b.pending().full
    p = b.pending()
    assert Checkpoint.from_json(p.to_json()) == p
    none_ids = Checkpoint(0, 2, 4, cp.root, cp.head, None, None)
    assert Checkpoint.from_json(none_ids.to_json()) == none_ids


@pytest.mark.parametrize(
    "change",
    [
        {"root": "AB" * 32},
        {"root": "ab" * 31},
        {"head": "zz" * 32},
        {"head": None},
        {"segment": True},
        {"segment": -1},
        {"segment": 1},
        {"size": 5},
        {"size": 0},
        {"size": 4.0},
        {"segment_size": 3},
        {"segment_size": 0},
        {"first": 12},
        {"last": ["x"]},
        {"extra": 1},
    ],
)
def test_checkpoint_from_json_rejects(change):
    cp = run(ChainBuilder(4), [b"a", b"b", b"c", b"d"], _ids(4))[0]
    with pytest.raises(ValueError):
        Checkpoint.from_json({**cp.to_json(), **change})
    with pytest.raises(ValueError):
        Checkpoint.from_json({k: v for k, v in cp.to_json().items() if k != "root"})
    with pytest.raises(ValueError):
        Checkpoint.from_json(["not", "a", "dict"])


# --- divergence -----------------------------------------------------------------------------------------


def naive_first_difference(a, b):
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


class Side:
    """A log as the finder sees it: checkpoints, plus leaves on demand (calls recorded)."""

    def __init__(self, payloads, s):
        self.leaves = [merkle.leaf_hash(p) for p in payloads]
        b = ChainBuilder(s)
        self.cps = [cp for cp in (b.add_leaf(h) for h in self.leaves) if cp]
        if b.pending():
            self.cps.append(b.pending())
        self.s = s
        self.calls = []

    def leaves_of(self, k):
        self.calls.append(k)
        return self.leaves[k * self.s : (k + 1) * self.s]


def inject(payloads, fault, i, data):
    p = list(payloads)
    if fault == "drop":
        del p[i]
    elif fault == "duplicate":
        p.insert(i + 1, p[i])
    elif fault == "swap" and i + 1 < len(p):
        p[i], p[i + 1] = p[i + 1], p[i]
    elif fault == "alter":
        byte = data.draw(st.integers(0, max(len(p[i]) - 1, 0)), label="byte")
        old = p[i] or b"\0"
        p[i] = old[:byte] + bytes([old[byte] ^ data.draw(st.integers(1, 255), label="xor")]) + old[byte + 1 :]
    elif fault == "insert":
        p.insert(i, data.draw(st.binary(max_size=8), label="inserted"))
    return p


@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    st.integers(0, 3000),
    st.sampled_from(SEGMENT_SIZES),
    st.sampled_from(["drop", "duplicate", "swap", "alter", "insert"]),
    st.booleans(),
    st.booleans(),
    st.data(),
)
def test_divergence_finder_finds_the_first_differing_leaf(n, s, fault, repetitive, swap_sides, data):
    # Distinct payloads, or a tiny alphabet (then a swap or duplicate may change nothing: None is right).
    payloads = [bytes([i % 3]) if repetitive else b"e%d" % i for i in range(n)]
    if n == 0 and fault != "insert":
        fault = "insert"
    i = data.draw(st.integers(0, max(n - 1, 0)), label="position")
    faulty = inject(payloads, fault, i, data)
    a, b = Side(payloads, s), Side(faulty, s)
    if swap_sides:
        a, b = b, a
    want = naive_first_difference(a.leaves, b.leaves)
    got = find_divergence(a.cps, b.cps, a.leaves_of, b.leaves_of)
    if want is None:
        assert got is None
        return
    assert isinstance(got, Divergence)
    assert got.index == want
    assert got.segment == want // s
    size = max(len(a.leaves), len(b.leaves))
    assert got.comparisons <= 2 * math.ceil(math.log2(size + 1)) + 4
    # leaves were fetched for at most the one segment holding the divergence, once per side
    assert a.calls in ([], [got.segment]) and b.calls in ([], [got.segment])


def test_divergence_identical_and_empty():
    a = Side([b"x%d" % i for i in range(100)], 8)
    assert find_divergence(a.cps, a.cps, a.leaves_of, a.leaves_of) is None
    assert find_divergence([], [], a.leaves_of, a.leaves_of) is None
    d = find_divergence([], a.cps, a.leaves_of, a.leaves_of)
    assert (d.index, d.segment) == (0, 0)
    assert a.calls == []


def test_divergence_strict_prefix_is_at_the_shorter_size():
    long = Side([b"x%d" % i for i in range(100)], 8)
    for n in (8, 13, 64, 99):
        short = Side([b"x%d" % i for i in range(n)], 8)
        for left, right in ((short, long), (long, short)):
            d = find_divergence(left.cps, right.cps, left.leaves_of, right.leaves_of)
            assert (d.index, d.segment) == (n, n // 8)


def test_divergence_refuses_mismatched_inputs():
    a = Side([b"x%d" % i for i in range(20)], 4)
    b = Side([b"x%d" % i for i in range(20)], 8)
    with pytest.raises(ValueError):
        find_divergence(a.cps, b.cps, a.leaves_of, b.leaves_of)
    c = Side([b"y%d" % i for i in range(20)], 4)
    with pytest.raises(ValueError):  # leaves that do not match the checkpoint root
        find_divergence(a.cps, c.cps, a.leaves_of, a.leaves_of)
    with pytest.raises(ValueError):  # not segments 0..k in order
        find_divergence(a.cps[1:], c.cps, a.leaves_of, c.leaves_of)


def test_divergence_comparisons_are_logarithmic_on_a_big_log():
    n = 1 << 16
    payloads = [b"%d" % i for i in range(n)]
    a = Side(payloads, 1024)
    for i in (0, 1, 1023, 1024, 40000, n - 1):
        b = Side(payloads[:i] + [b"changed"] + payloads[i + 1 :], 1024)
        d = find_divergence(a.cps, b.cps, a.leaves_of, b.leaves_of)
        assert d.index == i
        assert d.comparisons <= math.ceil(math.log2(len(a.cps) + 1)) + 10


# --- checkpoint files -----------------------------------------------------------------------------------


def _checkpoints(n=45, s=4):
    b = ChainBuilder(s)
    ids = _ids(n)
    full = run(b, [b"p%d" % i for i in range(n)], ids)
    return full, b.pending()


def test_checkpoint_file_round_trip(tmp_path):
    full, pending = _checkpoints()
    f = CheckpointFile(tmp_path / "deep" / "dir" / "cps.jsonl")
    assert f.load() == [] and f.load_provisional() is None and f.load_all() == []
    f.append(full[:3])
    f.append([])
    f.append(full[3:])
    assert f.load() == full
    lines = f.path.read_text().splitlines()
    assert [json.loads(line) for line in lines] == [cp.to_json() for cp in full]
    f.write_provisional(pending)
    assert f.load_provisional() == pending
    assert f.load_all() == full + [pending]
    assert CheckpointFile(str(f.path)).load_all() == full + [pending]


def test_provisional_is_superseded_and_replaced(tmp_path):
    b = ChainBuilder(4)
    f = CheckpointFile(tmp_path / "cps.jsonl")
    for i in range(14):
        cp = b.add(b"%d" % i)
        if cp:
            f.append([cp])
        elif b.pending():
            f.write_provisional(b.pending())
        assert f.load_all()[-1] == (b.pending() or cp)
    f.write_provisional(b.pending())
    stale = b.pending()
    for i in range(14, 16):
        cp = b.add(b"%d" % i)
    f.append([cp])
    assert f.load_provisional() is None  # stale: segment 3 is full now
    assert f.load_all()[-1] == cp and stale.segment == cp.segment
    f.clear_provisional()
    assert not f.partial_path.exists()


def test_append_refuses_what_does_not_chain(tmp_path):
    full, pending = _checkpoints()
    f = CheckpointFile(tmp_path / "cps.jsonl")
    with pytest.raises(ValueError):
        f.append([full[1]])  # does not start at segment 0
    f.append(full[:2])
    for bad in ([full[3]], [full[1]], [pending], [full[2], full[4]]):
        with pytest.raises(ValueError):
            f.append(bad)
    other = _checkpoints(s=8)[0]
    with pytest.raises(ValueError):
        f.append([other[1]])
    forged = Checkpoint(2, full[2].size, 4, full[2].root, bytes(32), None, None)
    with pytest.raises(ValueError):
        f.append([forged])
    with pytest.raises(ValueError):
        f.write_provisional(full[2])  # full: belongs in the file
    with pytest.raises(ValueError):
        f.write_provisional(pending)  # does not follow segment 1
    assert f.load() == full[:2]


def _write(f, full):
    f.append(full)
    return f.path.read_bytes().split(b"\n")[:-1]


def test_torn_last_line_is_corrupt_with_path_and_line(tmp_path):
    full, _ = _checkpoints()
    f = CheckpointFile(tmp_path / "cps.jsonl")
    lines = _write(f, full)
    for cut in (1, 10, len(lines[-1]) - 1):
        f.path.write_bytes(b"\n".join(lines[:-1]) + b"\n" + lines[-1][:cut])
        with pytest.raises(CheckpointCorrupt) as e:
            f.load()
        assert e.value.path == str(f.path) and e.value.line == len(lines)
        with pytest.raises(CheckpointCorrupt) as e:  # appending after a torn line is refused too
            f.append([full[-1]])
        assert e.value.line == len(lines)
    # the whole line but its newline: still torn (the write did not finish)
    f.path.write_bytes(b"\n".join(lines))
    with pytest.raises(CheckpointCorrupt) as e:
        f.load()
    assert e.value.line == len(lines)
    # recovery: keep what is good
    kept = f.truncate_after(len(lines) - 2)
    assert kept == full[:-1] and f.load() == full[:-1]
    f.append(full[-1:])
    assert f.load() == full


def test_flipped_hex_digit_is_caught_by_the_chain(tmp_path):
    full, _ = _checkpoints(n=24)
    f = CheckpointFile(tmp_path / "cps.jsonl")
    lines = _write(f, full)
    for j, line in enumerate(lines):
        d = json.loads(line)
        for key in ("root", "head"):
            for pos in (0, 31, 63):
                v = d[key]
                flipped = v[:pos] + ("0" if v[pos] != "0" else "1") + v[pos + 1 :]
                forged = json.dumps({**d, key: flipped}, separators=(",", ":")).encode()
                bad = lines[:j] + [forged] + lines[j + 1 :]
                f.path.write_bytes(b"\n".join(bad) + b"\n")
                with pytest.raises(CheckpointCorrupt) as e:
                    f.load()
                assert (e.value.path, e.value.line) == (str(f.path), j + 1)
                assert "head" in e.value.reason


@pytest.mark.parametrize(
    "mutate, line",
    [
        (lambda ls: ls[:2] + ls[3:], 3),  # missing segment 2
        (lambda ls: ls[:3] + [ls[2]] + ls[3:], 4),  # repeated segment
        (lambda ls: ls[:1] + [b"{not json"] + ls[2:], 2),
        (lambda ls: ls[:1] + [b""] + ls[1:], 2),  # blank line
        (lambda ls: ls[:1] + [b"\xff\xfe"] + ls[2:], 2),
        (lambda ls: ls[:4] + [ls[4].replace(b'"size":20', b'"size":19')] + ls[5:], 5),
        (lambda ls: ls[:4] + [ls[4].replace(b'"segment_size":4', b'"segment_size":8')] + ls[5:], 5),
        (lambda ls: [ls[1]] + ls[1:], 1),
    ],
)
def test_corrupt_files_name_path_and_line(tmp_path, mutate, line):
    full, _ = _checkpoints(n=24)
    f = CheckpointFile(tmp_path / "cps.jsonl")
    lines = _write(f, full)
    f.path.write_bytes(b"\n".join(mutate(lines)) + b"\n")
    with pytest.raises(CheckpointCorrupt) as e:
        f.load()
    assert (e.value.path, e.value.line) == (str(f.path), line)
    assert str(f.path) in str(e.value)


def test_corrupt_provisional_names_its_own_path(tmp_path):
    full, pending = _checkpoints()
    f = CheckpointFile(tmp_path / "cps.jsonl")
    f.append(full)
    f.write_provisional(pending)
    good = f.partial_path.read_bytes()
    for bad in (good[:-5], good.replace(b'"head":"', b'"head":"0', 1)[:-1] + b"\n", b"{}\n", good + good):
        f.partial_path.write_bytes(bad)
        with pytest.raises(CheckpointCorrupt) as e:
            f.load_provisional()
        assert e.value.path == str(f.partial_path)


def test_truncate_after(tmp_path):
    full, pending = _checkpoints()
    f = CheckpointFile(tmp_path / "cps.jsonl")
    f.append(full)
    f.write_provisional(pending)
    assert f.truncate_after(len(full) - 1) == full
    assert f.load_provisional() == pending  # still follows the kept checkpoints
    assert f.truncate_after(4) == full[:5]
    assert f.load() == full[:5] and not f.partial_path.exists()
    assert f.truncate_after(-1) == [] and f.load() == []
    f.append(full)
    assert f.load() == full
    with pytest.raises(ValueError):
        f.truncate_after(-2)


def test_long_lines_tail(tmp_path):
    """Message ids longer than the tail-reading chunk."""
    b = ChainBuilder(2)
    cps = [cp for cp in (b.add(b"%d" % i, "x" * 5000 + str(i)) for i in range(6)) if cp]
    f = CheckpointFile(tmp_path / "cps.jsonl")
    for cp in cps:
        f.append([cp])
    assert f.load() == cps


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 12), st.integers(0, 40), st.sampled_from([1, 2, 8]))
def test_a_chain_rebuilt_from_recorded_segments_continues_like_the_original(k: int, more: int, seg: int) -> None:
    payloads = [b"e%d" % i for i in range(k * seg + more)]
    whole = ChainBuilder(seg)
    cps = [cp for i, p in enumerate(payloads) if (cp := whole.add(p, f"0:{i}:-1:-1")) is not None]
    resumed = ChainBuilder.after_segments(cps[:k])
    part = ChainBuilder(seg)
    for i, p in enumerate(payloads[: k * seg]):
        part.add(p, f"0:{i}:-1:-1")
    assert (resumed.size, resumed.head, resumed.log_root()) == (part.size, part.head, part.log_root())
    rest = [cp for i, p in enumerate(payloads[k * seg:], k * seg) if (cp := resumed.add(p, f"0:{i}:-1:-1")) is not None]
    assert rest == cps[k:] and resumed.log_root() == whole.log_root() and resumed.pending() == whole.pending()
    with pytest.raises(ValueError):
        ChainBuilder.after_segments(cps[1:k + 1])  # not segments 0..k-1

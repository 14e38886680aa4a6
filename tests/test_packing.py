"""Slice packing: every kernel against its plain reference, plus the guards in front of them.

Random inputs come from hypothesis (it prints the falsifying example and how to replay it) or
from ``numpy`` generators seeded by ``UMBRA_TEST_SEED`` (printed; set it to replay a run).
"""

from __future__ import annotations

import itertools
import json
import mmap
import os
import random

import numpy as np
import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import store.packing as P
from store.errors import ErrorCode, StoreError

SEED = int(os.environ.get("UMBRA_TEST_SEED", random.SystemRandom().randrange(2**32)))
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module", autouse=True)
def _compiled():
    P.warmup()


@pytest.fixture
def rng():
    print(f"UMBRA_TEST_SEED={SEED}")
    return np.random.default_rng(SEED)


def _invalid(exc_info) -> None:
    assert exc_info.value.code == ErrorCode.INVALID_PARAMS


# --------------------------------------------------------------------------- planning


@pytest.mark.parametrize(("length", "expected"), [
    (0, []),
    (1, [(0, 1)]),
    (65536, [(0, 65536)]),
    (65536 + 16384, [(0, 81920)]),  # remainder == fragment_limit: merged
    (65536 + 16385, [(0, 65536), (65536, 16385)]),  # one byte more: a slice of its own
    (2 * 65536, [(0, 65536), (65536, 65536)]),
    (3 * 65536 + 100, [(0, 65536), (65536, 65536), (131072, 65636)]),
])
def test_plan_slices_follows_mooncake_tail_rule(length, expected):
    assert P.plan_slices(length).tolist() == [list(r) for r in expected]
    assert P.reference_plan_slices(length).tolist() == [list(r) for r in expected]


def test_plan_slices_shape_and_dtype_when_empty():
    plan = P.plan_slices(0)
    assert plan.shape == (0, 2) and plan.dtype == np.int64


@FAST
@given(length=st.integers(0, 5_000_000), slice_size=st.integers(1, 300_000),
       frag_ratio=st.floats(0, 1.5))
def test_plan_slices_matches_reference(length, slice_size, frag_ratio):
    fragment_limit = int(slice_size * frag_ratio)
    if length // slice_size > 50_000:  # keep the literal loop of the reference quick
        length = slice_size * 50_000
    got = P.plan_slices(length, slice_size, fragment_limit)
    want = P.reference_plan_slices(length, slice_size, fragment_limit)
    np.testing.assert_array_equal(got, want)
    assert P.slice_count(length, slice_size, fragment_limit) == len(got)
    if len(got):
        assert got[:, 1].sum() == length
        np.testing.assert_array_equal(got[1:, 0], np.cumsum(got[:-1, 1]))
        assert (got[:-1, 1] == slice_size).all()
        assert got[-1, 1] <= slice_size + fragment_limit


def test_plan_store_chunks_boundaries():
    c = P.MAX_STORE_CHUNK
    assert c == 16 * 1024 * 1024 - 16
    assert P.plan_store_chunks(0).shape == (0, 2)
    assert P.plan_store_chunks(c).tolist() == [[0, c]]
    assert P.plan_store_chunks(16 * 1024 * 1024).tolist() == [[0, c], [c, 16]]


@FAST
@given(length=st.integers(0, 10**9), max_chunk=st.integers(1 << 16, 1 << 26))
def test_plan_store_chunks_matches_reference(length, max_chunk):
    got = P.plan_store_chunks(length, max_chunk)
    np.testing.assert_array_equal(got, P.reference_plan_store_chunks(length, max_chunk))


def _block_layouts():
    """Blocks with gaps, adjacency (to exercise coalescing) and empty blocks."""
    block = st.tuples(st.integers(0, 300_000), st.sampled_from(["adjacent", "gap", "anywhere"]),
                      st.integers(0, 5000))
    return st.lists(block, max_size=25).map(_materialise)


def _materialise(spec):
    offsets, lengths = [], []
    pos = 0
    for length, how, jump in spec:
        if how == "adjacent":
            off = pos
        elif how == "gap":
            off = pos + jump + 1
        else:
            off = jump * 97
        offsets.append(off)
        lengths.append(length)
        pos = off + length
    return np.array(offsets, np.int64), np.array(lengths, np.int64)


@FAST
@given(layout=_block_layouts(), slice_size=st.sampled_from([4096, 65536, 100_000]),
       frag=st.sampled_from([0, 1024, 16384]), coalesce=st.booleans())
def test_plan_blocks_matches_reference(layout, slice_size, frag, coalesce):
    offsets, lengths = layout
    got = P.plan_blocks(offsets, lengths, slice_size, frag, coalesce=coalesce)
    want = P.reference_plan_blocks(offsets, lengths, slice_size, frag, coalesce=coalesce)
    np.testing.assert_array_equal(got, want)


@FAST
@given(layout=_block_layouts(), coalesce=st.booleans(), data=st.data())
def test_plan_blocks_moves_the_same_bytes_as_gather(layout, coalesce, data):
    """Copying slice by slice from the source must build exactly the gathered staging area."""
    offsets, lengths = layout
    size = int((offsets + lengths).max()) if len(offsets) else 0
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    src = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)
    total = int(lengths.sum())
    gathered = np.zeros(total, np.uint8)
    assert P.gather(src, offsets, lengths, gathered) == total
    plan = P.plan_blocks(offsets, lengths, 65536, 16384, coalesce=coalesce)
    staged = np.zeros(total, np.uint8)
    for b, boff, soff, n in plan:
        s = offsets[b] + boff
        staged[soff:soff + n] = src[s:s + n]
        if not coalesce:
            assert boff + n <= lengths[b]  # cut at block boundaries
    assert int(plan[:, P.LENGTH].sum()) == total
    np.testing.assert_array_equal(staged, gathered)


def test_plan_blocks_example_coalesce_and_not():
    offsets = np.array([0, 70_000, 70_000 + 50_000, 500_000])
    lengths = np.array([70_000, 50_000, 0, 10])
    assert P.plan_blocks(offsets, lengths).tolist() == [
        [0, 0, 0, 70_000],  # 70 000 <= 64 Ki + 16 Ki: one slice
        [1, 0, 70_000, 50_000],
        [3, 0, 120_000, 10],
    ]
    assert P.plan_blocks(offsets, lengths, coalesce=True).tolist() == [
        [0, 0, 0, 65_536],
        [0, 65_536, 65_536, 54_464],  # starts in block 0, runs on into block 1
        [3, 0, 120_000, 10],
    ]


@pytest.mark.parametrize(("slice_size", "frag"), [(65536, 16384), (4096, 0), (1000, 999)])
def test_plan_blocks_tail_boundaries_match_plan_slices(slice_size, frag):
    """Each block alone is sliced exactly like one request, right at the merge boundary."""
    lengths = [n for k in (1, 2, 5) for n in (k * slice_size + frag - 1, k * slice_size + frag,
                                               k * slice_size + frag + 1, k * slice_size)]
    lengths += [0, 1, slice_size - 1]
    offsets = np.cumsum([0, *lengths[:-1]]) + np.arange(len(lengths))  # 1-byte gaps
    plan = P.plan_blocks(offsets, lengths, slice_size, frag)
    staging = 0
    for i, n in enumerate(lengths):
        rows = plan[plan[:, P.BLOCK] == i]
        want = P.reference_plan_slices(n, slice_size, frag)
        np.testing.assert_array_equal(rows[:, P.BLOCK_OFFSET], want[:, 0])
        np.testing.assert_array_equal(rows[:, P.LENGTH], want[:, 1])
        np.testing.assert_array_equal(rows[:, P.STAGING_OFFSET], want[:, 0] + staging)
        staging += n
    # The same lengths back to back in the source form one run: sliced as one request.
    run = P.plan_blocks(np.cumsum([0, *lengths[:-1]]), lengths, slice_size, frag, coalesce=True)
    np.testing.assert_array_equal(run[:, [P.STAGING_OFFSET, P.LENGTH]],
                                  P.plan_slices(sum(lengths), slice_size, frag))


def test_plan_rejects_bad_arguments():
    with pytest.raises(StoreError) as ei:
        P.plan_slices(-1)
    _invalid(ei)
    with pytest.raises(StoreError):
        P.plan_slices(10, slice_size=0)
    with pytest.raises(StoreError):
        P.plan_slices(10.0)
    with pytest.raises(StoreError):
        P.plan_blocks([0, 1], [1])
    with pytest.raises(StoreError):
        P.plan_blocks([0], [-5])
    with pytest.raises(StoreError):
        P.plan_blocks([0.5], [5])


@pytest.mark.parametrize(("env", "expected"), [
    ({}, (65536, 16384)),
    ({"MC_SLICE_SIZE": "131072"}, (131072, 32768)),
    ({"MC_SLICE_SIZE": "131072", "MC_FRAGMENT_RATIO": "0"}, (131072, 16384)),
    ({"MC_FRAGMENT_RATIO": "8"}, (65536, 8192)),
    ({"MC_FRAGMENT_RATIO": "-3"}, (65536, 16384)),
    ({"MC_SLICE_SIZE": "0"}, (65536, 16384)),
    ({"MC_SLICE_SIZE": "junk", "MC_FRAGMENT_RATIO": "2"}, (65536, 32768)),
])
def test_slice_config_from_env(env, expected):
    cfg = P.SliceConfig.from_env(env)
    assert (cfg.slice_size, cfg.fragment_limit) == expected


# --------------------------------------------------------------------------- copies


@st.composite
def _pieces(draw, max_buf=5000, max_pieces=20):
    size = draw(st.integers(0, max_buf))
    n = draw(st.integers(0, max_pieces))
    offs, lens = [], []
    for _ in range(n):
        o = draw(st.integers(0, size))
        offs.append(o)
        lens.append(draw(st.integers(0, size - o)))
    return size, np.array(offs, np.int64), np.array(lens, np.int64)


@FAST
@given(pieces=_pieces(), extra=st.integers(0, 50), seed=st.integers(0, 2**32 - 1))
def test_gather_matches_reference(pieces, extra, seed):
    size, offs, lens = pieces
    r = np.random.default_rng(seed)
    src = r.integers(0, 256, size, dtype=np.uint8)
    total = int(lens.sum())
    dst_offset = int(r.integers(0, extra + 1))
    got = r.integers(0, 256, total + extra, dtype=np.uint8)
    want = got.copy()
    assert P.gather(src, offs, lens, got, dst_offset=dst_offset) == total
    assert P.reference_gather(src, offs, lens, want, dst_offset) == total
    np.testing.assert_array_equal(got, want)


@FAST
@given(pieces=_pieces(), seed=st.integers(0, 2**32 - 1))
def test_scatter_matches_reference_including_overlaps(pieces, seed):
    size, offs, lens = pieces  # pieces may overlap: later ones win, in both
    r = np.random.default_rng(seed)
    total = int(lens.sum())
    src = r.integers(0, 256, total + 3, dtype=np.uint8)
    got = r.integers(0, 256, size, dtype=np.uint8)
    want = got.copy()
    assert P.scatter(src, got, offs, lens, src_offset=3) == total
    assert P.reference_scatter(src, want, offs, lens, 3) == total
    np.testing.assert_array_equal(got, want)


@FAST
@given(pieces=_pieces(), seed=st.integers(0, 2**32 - 1), same_buffer=st.booleans())
def test_copy_pieces_matches_reference_even_in_place(pieces, seed, same_buffer):
    size, offs, lens = pieces
    r = np.random.default_rng(seed)
    dst_offs = np.array([r.integers(0, size - n + 1) for n in lens], np.int64)
    src = r.integers(0, 256, size, dtype=np.uint8)
    dst = src if same_buffer else r.integers(0, 256, size, dtype=np.uint8)
    src_ref = src.copy()
    dst_ref = src_ref if same_buffer else dst.copy()
    assert P.copy_pieces(src, offs, dst, dst_offs, lens) == int(lens.sum())
    P.reference_copy_pieces(src_ref, offs, dst_ref, dst_offs, lens)
    np.testing.assert_array_equal(dst, dst_ref)


def test_gather_scatter_round_trip_kv_blocks(rng):
    """The shape the client packs: equal blocks at strided, shuffled slots of a pool."""
    block, nblocks = 16 * 1024, 64
    pool = rng.integers(0, 256, block * nblocks * 2, dtype=np.uint8)
    slots = rng.permutation(nblocks * 2)[:nblocks]
    offsets = slots * block
    lengths = np.full(nblocks, block)
    staging = np.empty(block * nblocks, np.uint8)
    assert P.gather(pool, offsets, lengths, staging) == staging.size
    np.testing.assert_array_equal(staging.reshape(nblocks, block), pool.reshape(-1, block)[slots])
    back = np.zeros_like(pool)
    assert P.scatter(staging, back, offsets, lengths) == staging.size
    mask = np.zeros(nblocks * 2, bool)
    mask[slots] = True
    np.testing.assert_array_equal(back.reshape(-1, block)[mask], pool.reshape(-1, block)[mask])
    assert not back.reshape(-1, block)[~mask].any()


def test_gather_accepts_other_buffers_and_dtypes():
    src = bytes(range(100))
    dst = bytearray(10)
    assert P.gather(src, [5, 50], [5, 5], dst) == 10
    assert bytes(dst) == bytes(range(5, 10)) + bytes(range(50, 55))
    words = np.arange(8, dtype=np.uint32)  # seen as its 32 bytes
    out = np.zeros(8, np.uint8)
    P.gather(words, [4], [8], out)
    assert out.view(np.uint32).tolist() == [1, 2]


@pytest.mark.parametrize("case", [
    "offset_past_end", "length_past_end", "dst_too_small", "dst_offset", "negative",
    "float_offsets", "mismatched", "read_only_dst", "non_contiguous", "huge_offset",
])
def test_copy_guards(case):
    src = np.arange(100, dtype=np.uint8)
    dst = np.zeros(50, np.uint8)
    offs, lens = [0, 10], [10, 10]
    kwargs = {}
    if case == "offset_past_end":
        offs = [0, 101]
    elif case == "length_past_end":
        offs, lens = [0, 95], [10, 6]
    elif case == "dst_too_small":
        lens = [30, 30]
    elif case == "dst_offset":
        kwargs = {"dst_offset": 35}
    elif case == "negative":
        offs = [0, -1]
    elif case == "float_offsets":
        offs = [0.0, 10.0]
    elif case == "mismatched":
        lens = [10]
    elif case == "read_only_dst":
        dst = bytes(50)
    elif case == "non_contiguous":
        src = np.arange(200, dtype=np.uint8)[::2]
    elif case == "huge_offset":
        offs = [0, 2**63 - 5]
    before = bytes(dst)
    with pytest.raises(StoreError) as ei:
        P.gather(src, offs, lens, dst, **kwargs)
    _invalid(ei)
    assert bytes(dst) == before  # nothing was written


def test_scatter_guards():
    with pytest.raises(StoreError):
        P.scatter(np.zeros(10, np.uint8), np.zeros(10, np.uint8), [0], [11])
    with pytest.raises(StoreError):
        P.scatter(np.zeros(10, np.uint8), np.zeros(100, np.uint8), [0, 50], [6, 6])
    with pytest.raises(StoreError, match="dst piece 0"):
        P.copy_pieces(np.zeros(10, np.uint8), [5], np.zeros(10, np.uint8), [6], [5])
    with pytest.raises(StoreError, match="src piece 1"):
        P.copy_pieces(np.zeros(10, np.uint8), [0, 6], np.zeros(10, np.uint8), [0, 0], [5, 5])


# --------------------------------------------------------------------------- raw addresses


def _addr(a: np.ndarray) -> int:
    return a.ctypes.data


def test_gather_scatter_addrs_round_trip(rng):
    space = P.AddressSpace()
    pool = rng.integers(0, 256, 1 << 20, dtype=np.uint8)
    staging = np.zeros(256 * 1024, np.uint8)
    space.register(pool, name="pool")
    space.register(staging, name="staging")
    offsets = rng.permutation(16)[:4] * 65536
    addrs = np.array(offsets + _addr(pool), np.uint64)
    lengths = np.full(4, 65536)
    assert P.gather_addrs(addrs, lengths, _addr(staging), space=space) == staging.size
    want = np.zeros_like(staging)
    P.reference_gather(pool, offsets, lengths, want)
    np.testing.assert_array_equal(staging, want)
    pool2 = np.zeros_like(pool)
    space.register(pool2)
    dst = np.array(offsets + _addr(pool2), np.uint64)
    assert P.scatter_addrs(_addr(staging), dst, lengths, space=space) == staging.size
    for o in offsets:
        np.testing.assert_array_equal(pool2[o:o + 65536], pool[o:o + 65536])
    assert P.copy_addrs([_addr(pool)], [_addr(pool2) + 7], [1000], space=space) == 1000
    np.testing.assert_array_equal(pool2[7:1007], pool[:1000])


def test_raw_addresses_outside_registered_memory_are_refused():
    space = P.AddressSpace()
    a = np.arange(4096, dtype=np.uint8)
    b = np.zeros(4096, np.uint8)
    ra, rb = space.register(a), space.register(b)
    base_a, base_b = ra.addr, rb.addr
    refused = [
        ([base_a + 4090], [7], base_b),  # runs one byte past the end of a
        ([base_a - 1], [2], base_b),  # starts before a
        ([base_a], [10], base_b + 4090),  # destination does not fit
        ([base_a], [10], 0x1000),  # destination never registered
    ]
    refused.append(([2**63 + base_a], [1], base_b))  # beyond int64: never wraps into range
    for srcs, lens, dst in refused:
        with pytest.raises(StoreError) as ei:
            P.gather_addrs(np.array(srcs, np.uint64), lens, dst, space=space)
        _invalid(ei)
    assert not b.any()
    # A piece covering two regions is refused even if they happen to be adjacent in memory.
    c = np.zeros(8192, np.uint8)
    space2 = P.AddressSpace()
    space2.register(c[:4096])
    space2.register(c[4096:])
    with pytest.raises(StoreError):
        P.copy_addrs([_addr(c) + 4000], [_addr(c)], [200], space=space2)
    # Zero-length pieces touch nothing and are allowed anywhere.
    assert P.gather_addrs([12345], [0], base_b, space=space) == 0


def test_read_only_regions_are_not_written():
    space = P.AddressSpace()
    src = np.arange(100, dtype=np.uint8)
    frozen = np.zeros(100, np.uint8)
    space.register(src)
    space.register(frozen, writable=False)
    with pytest.raises(StoreError):
        P.gather_addrs([_addr(src)], [10], _addr(frozen), space=space)
    with pytest.raises(StoreError):
        P.scatter_addrs(_addr(src), [_addr(frozen)], [10], space=space)
    assert not frozen.any()
    with pytest.raises(StoreError):
        space.register(b"immutable bytes", writable=True)
    space.register(b"immutable bytes")  # readable is fine


def test_register_overlap_and_unregister():
    space = P.AddressSpace()
    a = np.zeros(1000, np.uint8)
    r = space.register(a)
    with pytest.raises(StoreError):
        space.register(a[10:20])
    with pytest.raises(StoreError):
        space.register_raw(r.addr + 999, 10)
    assert space.find(r.addr + 10, 990) is r
    assert space.find(r.addr + 10, 991) is None
    assert space.unregister(r.addr) is r
    with pytest.raises(StoreError):
        P.gather_addrs([r.addr], [1], r.addr + 500, space=space)
    with pytest.raises(StoreError):
        space.unregister(r.addr)
    with pytest.raises(StoreError):
        space.register(np.zeros(0, np.uint8))


def test_registered_mmap_cannot_be_closed_under_a_copy():
    space = P.AddressSpace()
    mm = mmap.mmap(-1, 8192)
    mm[:5] = b"hello"
    region = space.register(mm, name="mm")
    with pytest.raises(BufferError):
        mm.close()
    dst = np.zeros(5, np.uint8)
    space.register(dst)
    P.gather_addrs([region.addr], [5], _addr(dst), space=space)
    assert dst.tobytes() == b"hello"
    space.unregister(region.addr)
    del region
    mm.close()


# --------------------------------------------------------------------------- checksums


@FAST
@given(data=st.binary(max_size=3000), seed=st.integers(0, 2**64 - 1))
def test_checksum_matches_xxhash_and_reference(data, seed):
    want = xxhash.xxh64_intdigest(data, seed=seed)
    assert P.checksum(data, seed=seed) == want
    assert P.reference_xxh64(data, seed) == want


@FAST
@given(data=st.binary(max_size=3000), cuts=st.lists(st.integers(0, 3000), max_size=8))
def test_streaming_checksum_is_split_independent(data, cuts):
    bounds = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    h = P.Checksum()
    for lo, hi in itertools.pairwise(bounds):
        h.update(data[lo:hi])
        assert h.copy().digest() == xxhash.xxh64_intdigest(data[:hi])
    assert h.digest() == xxhash.xxh64_intdigest(data)
    assert h.length == len(data)
    offsets = np.array(bounds[:-1], np.int64)
    lengths = np.diff(bounds).astype(np.int64)
    assert P.checksum_pieces(data, offsets, lengths) == xxhash.xxh64_intdigest(data)


def test_streaming_checksum_every_chunk_size():
    """Chunk sizes around the 32-byte stripe, from every fill level of the internal buffer."""
    data = bytes((i * 131 + 7) % 256 for i in range(300))
    for first in range(0, 40):
        for size in (1, 3, 8, 31, 32, 33, 64, 65, 100):
            h = P.Checksum(seed=5).update(data[:first])
            for lo in range(first, len(data), size):
                h.update(data[lo:lo + size])
            assert h.digest() == xxhash.xxh64_intdigest(data, seed=5), (first, size)
    for n in (31, 32, 33, 64):
        assert P.Checksum().update(data[:n]).digest() == xxhash.xxh64_intdigest(data[:n]), n


def test_checksum_large_and_scattered(rng):
    data = rng.integers(0, 256, (1 << 22) + 7, dtype=np.uint8)
    assert P.checksum(data) == xxhash.xxh64_intdigest(data.tobytes())
    offsets = rng.permutation(64)[:20] * 65536
    lengths = np.full(20, 65536)
    packed = np.zeros(20 * 65536, np.uint8)
    P.gather(data, offsets, lengths, packed)
    want = xxhash.xxh64_intdigest(packed.tobytes())
    assert P.checksum_pieces(data, offsets, lengths) == want
    space = P.AddressSpace()
    space.register(data)
    assert P.checksum_addrs(offsets + _addr(data), lengths, space=space) == want
    with pytest.raises(StoreError):
        P.checksum_addrs([_addr(data) + data.size - 3], [4], space=space)


def test_checksum_inputs():
    raw = bytes(range(256)) * 3
    want = xxhash.xxh64_intdigest(raw)
    assert P.checksum(bytearray(raw)) == want
    assert P.checksum(memoryview(raw)) == want
    assert P.checksum(np.frombuffer(raw, np.uint8)) == want
    assert P.checksum(np.frombuffer(raw, np.uint16).reshape(48, 8)) == want
    strided = np.frombuffer(raw, np.uint8)[::2]
    assert P.checksum(strided) == xxhash.xxh64_intdigest(strided.tobytes())
    assert P.checksum(memoryview(raw)[::3]) == xxhash.xxh64_intdigest(raw[::3])
    assert P.checksum(b"") == xxhash.xxh64_intdigest(b"") == 0xEF46DB3751D8E999
    with pytest.raises(StoreError):
        P.checksum(12345)


def test_verify_checksum_detects_a_flipped_bit(rng):
    value = bytearray(rng.integers(0, 256, 100_000, dtype=np.uint8).tobytes())
    recorded = P.checksum(value)
    P.verify_checksum(value, recorded)
    value[54_321] ^= 0x10
    with pytest.raises(StoreError) as ei:
        P.verify_checksum(value, recorded, what="key k1")
    assert ei.value.code == ErrorCode.CHECKSUM_MISMATCH == -801
    assert "key k1" in str(ei.value)


def test_warmup_reports_every_kernel():
    report = P.warmup()
    assert set(report["kernels"]) >= {"gather", "scatter", "copy", "plan_blocks", "xxh64"}
    for name, k in report["kernels"].items():
        assert k["cache_hits"] + k["cache_misses"] >= 1, name
    assert report["cpu_name"]


def test_bench_packing_json_is_one_object(capsys):
    from store.bench import packing as bench

    assert bench.main(["--json", "--quick", "--seed", "7", "--total-mib", "3", "--working-mib", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["verified"] is True and result["seed"] == 7
    for key in ("gather_GBps", "scatter_GBps", "numpy_copy_GBps", "ratio_to_numpy"):
        assert set(result[key]) == {"4096", "65536", "1048576"}
        assert all(v > 0 for v in result[key].values())
    assert result["checksum_GBps"] > 0 and result["xxhash_lib_GBps"] > 0


def test_kernels_keep_a_single_specialisation():
    """Wrappers normalise argument types, so nothing above compiled a second variant.

    (Run last in this module: the property tests before it feed every kind of input.)
    """
    src = np.frombuffer(bytes(64), np.uint8)
    offs = np.frombuffer(np.zeros(2, np.int64).tobytes(), np.int64)  # read-only
    lens = np.array([3, 4], np.uint32)
    P.gather(src, offs, lens, np.zeros(16, np.uint8))
    P.checksum_pieces(src, np.array([1, 2], np.uint64), lens)
    from store.packing.kernels import KERNELS, SPECIALISATIONS
    for name, disp in KERNELS.items():
        assert len(disp.signatures) <= SPECIALISATIONS.get(name, 1), (name, disp.signatures)

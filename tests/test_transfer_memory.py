"""Memory regions, the registration table, slice planning and descriptors of the transfer engine."""

import ctypes
import itertools
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from store.errors import ErrorCode, StoreError
from store.transfer.engine import EngineConfig, plan_slices
from store.transfer.memory import PAGE_SIZE, MemoryRegion, MemoryTable, address_of, view_at
from store.transfer.transport import BufferDescriptor, Opcode, SegmentDescriptor, Slice, TransferStatus


def test_region_is_page_aligned_and_views_share_memory():
    with MemoryRegion(3 * PAGE_SIZE + 5) as r:
        assert r.addr % PAGE_SIZE == 0
        arr = r.numpy()
        arr[:] = 7
        v = view_at(r.addr + 10, 4)
        v[:] = b"abcd"
        assert bytes(arr[10:14]) == b"abcd"
        assert address_of(arr) == r.addr
        del arr, v


def test_region_chunks_cover_it_page_aligned():
    with MemoryRegion(10 * PAGE_SIZE + 123) as r:
        chunks = r.chunks(3 * PAGE_SIZE + 100)  # rounded down to whole pages
        assert [c.length for c in chunks] == [3 * PAGE_SIZE] * 3 + [PAGE_SIZE + 123]
        assert chunks[0].addr == r.addr
        for a, b in itertools.pairwise(chunks):
            assert a.end == b.addr
        assert chunks[-1].end == r.end


def test_region_close_refused_while_registered_and_while_viewed():
    r = MemoryRegion(PAGE_SIZE)
    table = MemoryTable()
    table.add(r.addr, PAGE_SIZE)
    with pytest.raises(StoreError) as ei:
        r.close()
    assert ei.value.code is ErrorCode.UNAVAILABLE_IN_CURRENT_STATUS
    table.remove(r.addr)
    arr = r.numpy()
    with pytest.raises(BufferError):
        r.close()
    del arr
    r.close()
    assert r.closed
    with pytest.raises(StoreError):
        r.numpy()


def test_table_lookups_overlap_and_cover():
    t = MemoryTable()
    t.add(1000, 100)
    t.add(1100, 50, remote=False)
    t.add(2000, 10)
    with pytest.raises(StoreError) as ei:
        t.add(1050, 10)
    assert ei.value.code is ErrorCode.INVALID_PARAMS
    with pytest.raises(StoreError):
        t.add(990, 20)
    assert t.find(1000, 100).addr == 1000
    assert t.find(1050, 60) is None  # spans two ranges
    assert t.find(1100, 10, remote_only=True) is None  # local-only range
    assert t.find(999, 1) is None and t.find(2005, 6) is None
    cov = t.cover(1050, 80)
    assert [r.addr for r in cov] == [1000, 1100]
    assert t.cover(1050, 200) is None  # gap after 1150
    assert t.cover(1150, 0) is not None  # an empty range at the end of a buffer


def test_table_remove_waits_for_users_then_refuses():
    t = MemoryTable()
    t.add(4096, 4096)
    entry = t.acquire(4096, 10)
    assert entry is not None
    with pytest.raises(StoreError) as ei:
        t.remove(4096, wait_s=0.05)
    assert ei.value.code is ErrorCode.UNAVAILABLE_IN_CURRENT_STATUS
    assert t.find(4096, 1) is not None  # still registered and usable after the refusal
    releaser = threading.Timer(0.05, t.release, args=(entry,))
    releaser.start()
    t.remove(4096, wait_s=5)
    releaser.join()
    assert t.find(4096, 1) is None and len(t) == 0


@pytest.mark.parametrize(("length", "expected"), [
    (0, []),
    (1, [(0, 1)]),
    (65536 + 16384, [(0, 81920)]),
    (65536 + 16385, [(0, 65536), (65536, 16385)]),
    (3 * 65536, [(0, 65536), (65536, 65536), (131072, 65536)]),
    (3 * 65536 + 100, [(0, 65536), (65536, 65536), (131072, 65636)]),
])
def test_plan_slices_merges_small_tail(length, expected):
    assert plan_slices(length) == expected


@settings(max_examples=300, deadline=None)
@given(length=st.integers(0, 1 << 22), slice_size=st.integers(512, 1 << 18), frag=st.integers(0, 1 << 16))
def test_plan_slices_properties(length, slice_size, frag):
    sl = plan_slices(length, slice_size, frag)
    assert sum(n for _, n in sl) == length
    pos = 0
    for off, n in sl:
        assert off == pos and n > 0
        pos += n
    assert all(n == slice_size for _, n in sl[:-1])
    if sl:
        assert sl[-1][1] <= slice_size + frag


def test_plan_slices_agrees_with_packing_planner():
    plan = pytest.importorskip("store.packing.plan", exc_type=ImportError)
    rng = np.random.default_rng(5)
    for length in [0, 1, 81920, 81921, *rng.integers(0, 1 << 22, 60).tolist()]:
        for ss, fl in ((65536, 16384), (4096, 1024), (1000, 0)):
            theirs = plan.plan_slices(length, ss, fl).tolist()
            assert plan_slices(length, ss, fl) == [tuple(x) for x in theirs]


def test_config_reads_mooncake_env():
    cfg = EngineConfig.resolve("tcp", {"MC_SLICE_SIZE": "4096", "MC_FRAGMENT_RATIO": "8", "MC_RETRY_CNT": "3",
                                       "MC_SLICE_TIMEOUT": "-1", "MC_STORE_MEMCPY": "0"})
    assert (cfg.slice_size, cfg.fragment_limit, cfg.retry_cap, cfg.slice_timeout_s, cfg.memcpy) == \
        (4096, 512, 3, -1.0, False)
    assert EngineConfig.resolve("rdma", {}).memcpy is False  # Mooncake: memcpy auto = TCP-only setups
    assert EngineConfig.resolve("tcp", {"MC_SLICE_SIZE": "x"}).slice_size == 65536
    assert EngineConfig.resolve("tcp", {"MC_SLICE_SIZE": "4096"}, slice_size=1024).slice_size == 1024


def test_segment_descriptor_roundtrip_and_find():
    d = SegmentDescriptor("h:1", "tcp", "h:1", (BufferDescriptor(100, 50, 7), BufferDescriptor(200, 10)),
                          ({"name": "rxe0", "gid": "::1"},), 42)
    assert SegmentDescriptor.from_json(d.to_json()) == d
    assert d.find_buffer(120, 30).rkey == 7
    assert d.find_buffer(120, 31) is None


def test_slice_completes_once_per_attempt():
    seen = []
    s = Slice(Opcode.WRITE, 1, 2, SegmentDescriptor("a", "tcp", "a"), 3, status=TransferStatus.PENDING,
              on_done=seen.append)
    s.complete(False, "boom", code=ErrorCode.INVALID_PARAMS, retryable=False)
    s.complete(True)  # a second completion of the same attempt is ignored
    assert seen == [s]
    assert (s.status, s.code, s.retryable, s.error) == (TransferStatus.FAILED, -600, False, "boom")


def test_region_alignment_beyond_a_page():
    align = 16 * 1024 * 1024
    with MemoryRegion(3 * 4096, align=align) as region:
        assert region.addr % align == 0
        arr = region.numpy()
        assert arr.size == region.length == 3 * 4096
        arr[:] = 7
        assert bytes(region.view()[:4]) == b"\x07" * 4
        assert ctypes.string_at(region.addr + region.length - 1, 1) == b"\x07"
        del arr


@pytest.mark.parametrize("bad", [0, 100, 4096 * 3, 2048])
def test_region_rejects_bad_alignment(bad):
    with pytest.raises(StoreError):
        MemoryRegion(4096, align=bad)

"""SlabAllocator (cachelib model): size classes, mount constraint, calcification, state machine."""

from __future__ import annotations

from itertools import pairwise

import pytest
from hypothesis import HealthCheck, assume, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from store.allocator import ALLOC_SIZES, SLAB_SIZE, Allocation, AllocatorError, SlabAllocator, make_allocator
from store.allocator.slab import generate_alloc_sizes
from store.units import KiB, MiB


def test_53_classes_exactly_as_cachelib_generates_them():
    assert len(ALLOC_SIZES) == 53
    assert ALLOC_SIZES[:8] == (72, 96, 120, 152, 192, 240, 304, 384)
    assert ALLOC_SIZES[-4:] == (4_596_680, 5_745_856, 7_182_320, 16_777_216)
    assert all(s % 8 == 0 for s in ALLOC_SIZES)
    assert all(SLAB_SIZE // s >= 2 for s in ALLOC_SIZES[:-1])
    assert generate_alloc_sizes() == ALLOC_SIZES
    with pytest.raises(ValueError):
        generate_alloc_sizes(factor=1.0)
    with pytest.raises(ValueError):
        generate_alloc_sizes(max_size=SLAB_SIZE + 1)


@pytest.mark.parametrize(("size", "chunk"), [(1, 72), (64, 72), (72, 72), (73, 96), (100, 120),
                                             (7_182_320, 7_182_320), (7_182_321, SLAB_SIZE),
                                             (SLAB_SIZE, SLAB_SIZE), (SLAB_SIZE + 1, None)])
def test_class_for(size, chunk):
    assert SlabAllocator.class_for(size) == chunk


def test_mount_constraint():
    SlabAllocator.check_mount(0, 64 * MiB)
    SlabAllocator.check_mount(32 * MiB, 16 * MiB)
    for base, size in [(4096, 64 * MiB), (0, 64 * MiB + 4096), (0, 8 * MiB), (0, 0), (-SLAB_SIZE, SLAB_SIZE)]:
        with pytest.raises(AllocatorError):
            SlabAllocator.check_mount(base, size)
    with pytest.raises(AllocatorError, match="16 MiB"):
        SlabAllocator(100 * MiB)
    with pytest.raises(AllocatorError):
        make_allocator("cachelib", 64 * MiB, base=12345)
    assert isinstance(make_allocator("slab", 64 * MiB), SlabAllocator)
    assert make_allocator("cachelib", 64 * MiB, segment_name="s").segment_name == "s"


def test_chunks_are_carved_in_slab_order_and_freed_lifo():
    a = SlabAllocator(64 * MiB)
    x, y, z = (a.allocate(100) for _ in range(3))
    assert (x.offset, y.offset, z.offset) == (0, 120, 240) and x.size == 120
    a.free(y)
    a.free(x)
    assert a.allocate(110).offset == 0  # last freed first
    assert a.allocate(110).offset == 120
    big = a.allocate(1 * MiB)
    assert big.offset == SLAB_SIZE  # a new class takes the next slab
    assert a.allocate(SLAB_SIZE).offset == 2 * SLAB_SIZE
    assert a.allocate(SLAB_SIZE + 1) is None  # no class above 16 MiB
    a.check_invariants()


def test_calcification_fill_one_class_free_all_then_another_class_fails():
    """Mooncake issue #632: slabs stay with their class forever."""
    a = SlabAllocator(64 * MiB)  # 4 slabs
    first = []
    while (x := a.allocate(1 * MiB)) is not None:
        first.append(x)
    assert a.free_slabs == 0
    for x in first:
        a.free(x)
    assert a.used == 0 and a.live_count == 0
    # everything is free, yet a different size class cannot get a single chunk
    assert a.allocate(100 * KiB) is None
    assert not a.can_allocate(100 * KiB)
    assert a.allocate(64) is None
    # the original class still works: its slabs are still its own
    again = a.allocate(1 * MiB)
    assert again is not None
    r = a.report()
    assert r["slabs_free"] == 0 and r["stranded_bytes"] == 64 * MiB - again.size
    assert r["fragmentation"] == 1.0  # every free byte is locked in a class's slabs
    assert [c["chunk_size"] for c in r["classes"]] == [SlabAllocator.class_for(1 * MiB)]
    a.check_invariants()


def test_largest_free_region_is_not_monotone():
    a = SlabAllocator(16 * MiB)
    x = a.allocate(1 * MiB)
    assert a.free_slabs == 0
    c = SlabAllocator.class_for(1 * MiB)
    assert a.largest_free_region == c
    assert a.can_allocate(1 * MiB) and not a.can_allocate(1000)  # smaller, yet it fails
    a.free(x)
    assert a.fit_size(1 * MiB) == c and a.fit_size(1000) is None


def _state(a):
    r = a.report()
    r.pop("bookkeeping_bytes")
    return r


@pytest.mark.parametrize("size", [0, -5, 64 * MiB + 1, 2.0, "1", None, False])
def test_bad_sizes_raise_and_leave_state_unchanged(size):
    a = SlabAllocator(64 * MiB)
    a.allocate(1000)
    before = _state(a)
    with pytest.raises(AllocatorError):
        a.allocate(size)
    assert _state(a) == before


def test_double_foreign_stale_and_forged_frees_raise():
    a = SlabAllocator(64 * MiB)
    b = SlabAllocator(64 * MiB)
    x = a.allocate(1000)
    keep = a.allocate(1000)
    y = b.allocate(1000)
    a.free(x)
    before = _state(a)
    with pytest.raises(AllocatorError, match="double free"):
        a.free(x)
    with pytest.raises(AllocatorError, match="does not belong"):
        a.free(y)
    for forged in (Allocation(keep.offset + 8, keep.size, 1000, keep.owner, keep.handle),
                   Allocation(keep.offset, keep.size * 2, 1000, keep.owner, keep.handle),
                   Allocation(keep.offset, keep.size, 1000, keep.owner, keep.handle + 1),
                   Allocation(40 * SLAB_SIZE, keep.size, 1000, keep.owner, keep.handle),
                   Allocation(3 * SLAB_SIZE, keep.size, 1000, keep.owner, keep.handle)):
        with pytest.raises(AllocatorError):
            a.free(forged)
    with pytest.raises(AllocatorError):
        a.free(object())
    assert _state(a) == before
    z = a.allocate(1000)  # reuses x's chunk
    assert z.offset == x.offset
    with pytest.raises(AllocatorError):
        a.free(x)  # stale handle
    a.free(z)
    a.free(keep)
    a.check_invariants()


SIZES = st.one_of(
    st.integers(min_value=1, max_value=4 * KiB),
    st.sampled_from([64, 72, 73, 1 * KiB, 100 * KiB, 1 * MiB, 4 * MiB, 7_182_320, SLAB_SIZE]),
    st.integers(min_value=1, max_value=SLAB_SIZE + 100),
)


class SlabMachine(RuleBasedStateMachine):
    @initialize(slabs=st.integers(min_value=1, max_value=6))
    def setup(self, slabs):
        self.a = SlabAllocator(slabs * SLAB_SIZE)
        self.live: dict[int, Allocation] = {}
        self.freed: list[Allocation] = []

    @rule(size=SIZES)
    def allocate(self, size):
        assume(size <= self.a.capacity)
        predicted = self.a.can_allocate(size)
        fit = self.a.fit_size(size)
        x = self.a.allocate(size)
        assert (x is not None) == predicted == (fit is not None)
        if x is None:
            return
        assert x.size == SlabAllocator.class_for(size) >= size
        slab = x.offset // SLAB_SIZE
        assert (x.end - 1) // SLAB_SIZE == slab, "a chunk never crosses a slab"
        assert (x.offset % SLAB_SIZE) % x.size == 0
        key = (x.offset, x.handle)
        assert key not in self.live
        self.live[key] = x

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free(self, data):
        key = data.draw(st.sampled_from(sorted(self.live)))
        x = self.live.pop(key)
        self.a.free(x)
        self.freed.append(x)

    @precondition(lambda self: self.freed)
    @rule(data=st.data())
    def double_free_is_refused(self, data):
        x = data.draw(st.sampled_from(self.freed))
        assume((x.offset, x.handle) not in self.live)
        before = _state(self.a)
        with pytest.raises(AllocatorError):
            self.a.free(x)
        assert _state(self.a) == before

    @invariant()
    def no_overlap_and_counters(self):
        spans = sorted((x.offset, x.end) for x in self.live.values())
        for (_, e1), (s2, _) in pairwise(spans):
            assert e1 <= s2, "live allocations overlap"
        assert self.a.used == sum(x.size for x in self.live.values())
        assert self.a.requested_bytes == sum(x.requested for x in self.live.values())
        assert self.a.live_count == len(self.live)
        self.a.check_invariants()

    def teardown(self):
        if not hasattr(self, "a"):
            return
        owned = {c["chunk_size"]: c["slabs"] for c in self.a.class_report()}
        for x in list(self.live.values()):
            self.a.free(x)
        assert self.a.used == 0
        # slabs are never returned: the same classes own the same number of slabs
        assert {c["chunk_size"]: c["slabs"] for c in self.a.class_report()} == owned
        self.a.check_invariants()


SlabMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=50, deadline=None,
                                         suppress_health_check=[HealthCheck.too_slow])
TestSlabMachine = SlabMachine.TestCase

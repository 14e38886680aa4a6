"""Placement strategies: distinct names, best effort, preferred first, seeded determinism."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from store.allocator import (
    SLAB_SIZE,
    STRATEGIES,
    Allocator,
    AllocatorError,
    BestFitStrategy,
    OffsetAllocator,
    SlabAllocator,
    make_strategy,
)
from store.units import KiB, MiB

NAMES = ("random", "free_ratio_first", "best_fit")


@dataclass
class Target:
    name: str
    allocator: Allocator


def segments(n, capacity=64 * MiB, kind=OffsetAllocator):
    return [Target(f"seg{i}", kind(capacity, segment_name=f"seg{i}")) for i in range(n)]


def test_factory_names_and_alias():
    assert set(STRATEGIES) >= {"random", "free_ratio_first", "best_fit", "largest_fit"}
    for name in STRATEGIES:
        s = make_strategy(name, 7)
        assert s.seed == 7
    assert isinstance(make_strategy("largest_fit", 1), BestFitStrategy)
    with pytest.raises(AllocatorError):
        make_strategy("round_robin", 1)


@pytest.mark.parametrize("name", NAMES)
def test_replicas_land_on_distinct_segment_names(name):
    targets = segments(5)
    s = make_strategy(name, 1)
    for _ in range(20):
        placed = s.place(targets, 1 * MiB, 3)
        assert len(placed) == 3
        assert len({t.name for t, _ in placed}) == 3
        for t, a in placed:
            assert a.owner == t.allocator._owner  # allocated from that target's allocator


@pytest.mark.parametrize("name", NAMES)
def test_best_effort_when_segments_run_out(name):
    s = make_strategy(name, 1)
    placed = s.place(segments(2), 1 * MiB, 3)
    assert len(placed) == 2 and {t.name for t, _ in placed} == {"seg0", "seg1"}
    assert len(s.place(segments(1), 1 * MiB, 2)) == 1
    assert s.place([], 1 * MiB, 1) == []


@pytest.mark.parametrize("name", NAMES)
def test_several_mounts_of_one_name_count_once(name):
    targets = [Target("a", OffsetAllocator(8 * MiB)), Target("a", OffsetAllocator(8 * MiB)),
               Target("b", OffsetAllocator(8 * MiB))]
    s = make_strategy(name, 3)
    placed = s.place(targets, 1 * MiB, 3)
    assert sorted(t.name for t, _ in placed) == ["a", "b"]
    # a full first mount: the second mount of the same name is used
    full = [Target("a", OffsetAllocator(1 * MiB)), Target("a", OffsetAllocator(8 * MiB))]
    assert full[0].allocator.allocate(1 * MiB) is not None
    placed = s.place(full, 1 * MiB, 1)
    assert len(placed) == 1 and placed[0][0] is full[1]


@pytest.mark.parametrize("name", NAMES)
def test_preferred_first_in_order_and_excluded_never(name):
    targets = segments(6)
    s = make_strategy(name, 5)
    for _ in range(10):
        placed = s.place(targets, 64 * KiB, 3, preferred=["seg4", "seg1"], excluded=["seg2", "seg3"])
        assert [t.name for t, _ in placed][:2] == ["seg4", "seg1"]
        assert len(placed) == 3
        assert not {"seg2", "seg3"} & {t.name for t, _ in placed}
    # a preferred name that is excluded, unknown or full is skipped
    assert targets[5].allocator.allocate(60 * MiB) is not None
    placed = s.place(targets, 8 * MiB, 2, preferred=["seg5", "nope", "seg2"], excluded=["seg2"])
    assert len(placed) == 2 and not {"seg5", "seg2"} & {t.name for t, _ in placed}


@pytest.mark.parametrize("name", NAMES)
def test_no_space_is_an_empty_list_not_an_error(name):
    targets = segments(3, capacity=1 * MiB)
    s = make_strategy(name, 1)
    assert s.place(targets, 2 * MiB, 1) == []  # larger than every segment
    for t in targets:
        assert t.allocator.allocate(1 * MiB) is not None
    assert s.place(targets, 1, 2) == []
    slabs = segments(2, capacity=SLAB_SIZE, kind=SlabAllocator)
    assert s.place(slabs, SLAB_SIZE + 1, 1) == []  # no cachelib class above 16 MiB


@pytest.mark.parametrize("name", NAMES)
def test_bad_arguments_raise(name):
    s = make_strategy(name, 1)
    for size, n in [(0, 1), (-1, 1), (1, 0), (1.0, 1)]:
        with pytest.raises(AllocatorError):
            s.place(segments(2), size, n)
    with pytest.raises(AllocatorError):
        s.place(segments(2), 1, 1, preferred="seg0")


def _trace(name, seed, calls=60):
    targets = segments(8, capacity=16 * MiB)
    s = make_strategy(name, seed)
    sizes = [(i * 7919) % (2 * MiB) + 1 for i in range(calls)]
    out = []
    for i, size in enumerate(sizes):
        placed = s.place(targets, size, 1 + i % 3)
        out.append([(t.name, a.offset, a.size) for t, a in placed])
        if i % 4 == 3:  # free some so the state keeps moving
            for t, a in placed:
                t.allocator.free(a)
    return out


@pytest.mark.parametrize("name", NAMES)
def test_seeded_determinism(name):
    assert _trace(name, 42) == _trace(name, 42)


def test_different_seeds_change_random_choices():
    assert _trace("random", 1) != _trace("random", 2)


def test_best_fit_fills_the_tightest_hole():
    a, b = OffsetAllocator(64 * MiB), OffsetAllocator(64 * MiB)
    xs = [a.allocate(1 * MiB) for _ in range(3)]
    a.free(xs[1])  # a exact 1 MiB hole in a
    targets = [Target("b", b), Target("a", a)]
    for seed in range(10):
        placed = make_strategy("best_fit", seed).place(targets, 1 * MiB, 1)
        assert placed[0][0].name == "a" and placed[0][1].offset == 1 * MiB
        a.free(placed[0][1])
    # a request the hole cannot take goes where the fit is tightest: the fuller segment a
    placed = make_strategy("best_fit", 0).place(targets, 2 * MiB, 2)
    assert [t.name for t, _ in placed] == ["a", "b"]


def test_best_fit_keeps_a_size_class_in_segments_that_already_have_chunks():
    s0, s1 = SlabAllocator(2 * SLAB_SIZE), SlabAllocator(2 * SLAB_SIZE)
    s1.allocate(100 * KiB)
    targets = [Target("s0", s0), Target("s1", s1)]
    for seed in range(5):
        placed = make_strategy("best_fit", seed).place(targets, 100 * KiB, 1)
        assert placed[0][0].name == "s1"
    assert s0.free_slabs == 2  # no slab committed in s0


def test_free_ratio_first_prefers_the_emptier_segment():
    targets = segments(2, capacity=16 * MiB)
    assert targets[0].allocator.allocate(8 * MiB) is not None
    for seed in range(10):
        placed = make_strategy("free_ratio_first", seed).place(targets, 1 * MiB, 1)
        assert placed[0][0].name == "seg1"
        placed[0][0].allocator.free(placed[0][1])


@settings(max_examples=40, deadline=None)
@given(data=st.data(), name=st.sampled_from(NAMES), n=st.integers(1, 7), seed=st.integers(0, 99))
def test_placement_properties(data, name, n, seed):
    caps = data.draw(st.lists(st.sampled_from([1 * MiB, 4 * MiB, 16 * MiB]), min_size=n, max_size=n))
    names = data.draw(st.lists(st.sampled_from("abcdef"), min_size=n, max_size=n))
    targets = [Target(nm, OffsetAllocator(c)) for nm, c in zip(names, caps, strict=True)]
    s = make_strategy(name, seed)
    for _ in range(data.draw(st.integers(1, 15))):
        size = data.draw(st.integers(1, 5 * MiB))
        k = data.draw(st.integers(1, 4))
        excluded = data.draw(st.lists(st.sampled_from("abcdef"), max_size=2))
        preferred = data.draw(st.lists(st.sampled_from("abcdefg"), max_size=3))
        placed = s.place(targets, size, k, preferred=preferred, excluded=excluded)
        got = [t.name for t, _ in placed]
        assert len(got) == len(set(got)) <= k
        assert not set(got) & set(excluded)
        eligible = {t.name for t in targets if t.name not in excluded}
        assert len(got) <= len(eligible)
        # preferred names that were placed come first, in the given order
        pref = [p for p in dict.fromkeys(preferred) if p in got]
        assert got[:len(pref)] == pref
        for t, a in placed:
            assert a.requested == size and a.end <= t.allocator.capacity
        # best effort: a name that could still take the object was not left out
        if len(got) < k:
            for t in targets:
                if t.name not in excluded and t.name not in got:
                    assert not t.allocator.can_allocate(size)

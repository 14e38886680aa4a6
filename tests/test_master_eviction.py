"""Eviction: trigger, Mooncake's target/lower-bound arithmetic, ordering, what is never evicted."""

import math

import pytest
from master_helpers import MiB, make_service, put, segment

from store import failpoints
from store.errors import ErrorCode, StoreError
from store.master.eviction import eviction_targets, should_evict


@pytest.fixture(autouse=True)
def _no_failpoints():
    failpoints.disarm_all()
    yield
    failpoints.disarm_all()


def fill(svc, clock, n, size=MiB, prefix="k", step=0.001, **cfg):
    """n puts, each a little later than the last (so lease deadlines order them)."""
    for i in range(n):
        put(svc, "c0", f"{prefix}{i}", size, **cfg)
        clock.advance(step)


def one_segment(**cfg):
    svc, clock = make_service(**cfg)
    svc.mount_segment(segment(0, size=64 * MiB), "c0")
    return svc, clock


@pytest.mark.parametrize("used,hw,ratio,target,lower", [
    (1.0, 0.90, 0.05, 0.15, 0.10),
    (0.906, 0.90, 0.05, 0.056, 0.028),
    (0.5, 0.90, 0.05, 0.05, 0.025),  # failed-allocation trigger below the watermark
    (0.95, 0.5, 0.2, 0.65, 0.45),
])
def test_targets_are_mooncakes_formulas(used, hw, ratio, target, lower):
    t, lb = eviction_targets(used, hw, ratio)
    assert t == pytest.approx(target) and lb == pytest.approx(lower)


def test_trigger():
    assert should_evict(0.91, 0.9, 0.05, False)
    assert not should_evict(0.90, 0.9, 0.05, False)
    assert should_evict(0.1, 0.9, 0.05, True)
    assert not should_evict(0.1, 0.9, 0.0, True)


def test_no_eviction_below_watermark():
    svc, clock = one_segment()
    fill(svc, clock, 57)  # 57/64 = 0.89
    assert svc.run_eviction() is None
    c = svc.counters()
    assert c["successful_evictions"] == 0 and c["attempted_evictions"] == 0


def test_full_segment_first_round_evicts_ceil_15_percent_oldest_first():
    """Mooncake measured: used = 1.0 → the first round evicts 10 of 64 (15%), oldest first."""
    svc, clock = one_segment()
    fill(svc, clock, 64)
    with pytest.raises(StoreError) as ei:
        svc.put_start("c0", "late", MiB)
    assert ei.value.code == ErrorCode.NO_AVAILABLE_HANDLE
    rep = svc.run_eviction()
    assert rep.target == pytest.approx(0.15) and rep.lowerbound == pytest.approx(0.10)
    assert sorted(rep.evicted_keys, key=lambda k: int(k[1:])) == [f"k{i}" for i in range(10)]
    assert rep.freed_bytes == 10 * MiB
    c = svc.counters()
    assert c["successful_evictions"] == 1 and c["evicted_keys"] == 10
    assert c["evicted_size_bytes"] == 10 * MiB
    assert svc.gauges()["need_eviction"] is False
    svc.put_start("c0", "late", MiB)  # room again
    assert svc.check_invariants() == []


def test_rounds_keep_occupancy_under_watermark_and_newest_survive():
    """Mooncake anchor B: a 2x-capacity burst with the 10-ms loop keeps the newest keys."""
    svc, clock = one_segment()
    failed = 0
    for i in range(128):
        try:
            put(svc, "c0", f"k{i}", MiB)
        except StoreError as exc:
            assert exc.code == ErrorCode.NO_AVAILABLE_HANDLE
            failed += 1
        clock.advance(0.01)
        svc.run_eviction()
        assert svc.gauges()["used_ratio"] <= 1.0
    survivors = sorted(int(k[1:]) for k in svc.all_keys())
    assert failed == 0
    assert survivors == list(range(128 - len(survivors), 128))  # a suffix: oldest went first
    assert 0.80 <= svc.gauges()["used_ratio"] <= 0.90 + 1 / 64
    assert svc.check_invariants() == []


def test_leased_and_incomplete_objects_are_never_evicted():
    svc, clock = one_segment()
    fill(svc, clock, 60)
    for i in range(0, 60, 2):
        svc.get_replica_list(f"k{i}")  # lease 10 s on the even keys
    for i in range(4):
        svc.put_start("c0", f"p{i}", MiB)  # in progress
    rep = svc.trigger_eviction()
    assert rep.evicted_keys
    assert all(int(k[1:]) % 2 == 1 for k in rep.evicted_keys)
    for _ in range(50):
        svc.trigger_eviction()
    left = set(svc.all_keys())
    assert {f"k{i}" for i in range(0, 60, 2)} <= left and {f"p{i}" for i in range(4)} <= left
    assert not any(f"k{i}" in left for i in range(1, 60, 2))
    # nothing evictable: the round is an attempt and need_eviction stays set
    assert svc.trigger_eviction() is not None
    assert svc.counters()["attempted_evictions"] >= 1 and svc.gauges()["need_eviction"] is True
    clock.advance(10)  # leases expire: now they go
    assert svc.run_eviction().evicted_keys


def test_recently_read_objects_outlive_unread_ones():
    svc, clock = one_segment()
    fill(svc, clock, 40)
    for i in range(10):
        svc.get_replica_list(f"k{i}")  # oldest puts, but read: lease deadline = now + 10 s
    clock.advance(11)  # leases over; their deadlines are still the newest
    rep = svc.trigger_eviction()
    assert not any(int(k[1:]) < 10 for k in rep.evicted_keys)


def test_soft_pinned_only_in_second_pass():
    svc, clock = one_segment()
    fill(svc, clock, 20, prefix="pin", with_soft_pin=True)
    fill(svc, clock, 2, prefix="free")
    # used = 22/64 below the watermark; a failed allocation triggers: target 0.05, lower 0.025
    rep = svc.trigger_eviction()
    assert rep.evicted_keys == ["free0", "free1"]  # ceil(22*0.05) = 2, both unpinned
    rep = svc.trigger_eviction()
    # 20 objects left, all pinned: pass 1 finds none; pass 2 takes ceil(20*0.025) = 1, the oldest
    assert rep.first_pass == 0 and rep.evicted_keys == ["pin0"]


def test_soft_pinned_never_evicted_when_not_allowed():
    svc, clock = one_segment(allow_evict_soft_pinned_objects=False)
    fill(svc, clock, 10, prefix="pin", with_soft_pin=True)
    rep = svc.trigger_eviction()
    assert rep.evicted_keys == [] and len(svc.all_keys()) == 10


def test_soft_pin_expires():
    svc, clock = one_segment()
    fill(svc, clock, 10, prefix="pin", with_soft_pin=True)
    clock.advance(1801)
    rep = svc.trigger_eviction()
    assert rep.first_pass == 1  # no longer pinned: pass 1 takes it


def test_watermark_half_keeps_occupancy_at_or_below_half():
    """Mooncake anchor D: watermark 0.5, ratio 0.2 → all 96 puts succeed, occupancy ≤ 0.5."""
    svc, clock = one_segment(eviction_high_watermark_ratio=0.5, eviction_ratio=0.2)
    peak = 0.0
    for i in range(96):
        put(svc, "c0", f"k{i}", MiB)
        peak = max(peak, svc.gauges()["used_ratio"])
        clock.advance(0.01)
        svc.run_eviction()
        assert svc.gauges()["used_ratio"] <= 0.5
    assert peak <= 0.5 + 1 / 64
    assert svc.counters()["evicted_keys"] + len(svc.all_keys()) == 96


def test_eviction_by_bytes_frees_what_the_watermark_asks_for():
    """Mixed sizes: counting objects frees too little when the victims are small; bytes do not."""
    def scenario(by):
        svc, clock = make_service(eviction_by=by)
        svc.mount_segment(segment(0, size=64 * MiB), "c0")
        for i in range(40):
            put(svc, "c0", f"small{i}", 64 * 1024)  # oldest: small
            clock.advance(0.001)
        for i in range(14):
            put(svc, "c0", f"big{i}", 4 * MiB)
            clock.advance(0.001)
        return svc

    by_count, by_bytes = scenario("objects"), scenario("bytes")
    used = by_bytes.gauges()["used_ratio"]
    assert used > 0.9
    rep_c, rep_b = by_count.run_eviction(), by_bytes.run_eviction()
    target, _ = eviction_targets(used, 0.9, 0.05)
    freed_bytes = sum(1 for k in rep_b.evicted_keys if k.startswith("big")) * 4 * MiB + \
        sum(1 for k in rep_b.evicted_keys if k.startswith("small")) * 64 * 1024
    assert freed_bytes >= target * 64 * MiB
    assert by_bytes.gauges()["used_ratio"] <= 0.9 - 0.05 + 1e-9
    # object counting evicts ceil(54 * target) small objects and stays above the watermark
    assert len(rep_c.evicted_keys) == math.ceil(54 * rep_c.target)
    assert all(k.startswith("small") for k in rep_c.evicted_keys)
    assert by_count.gauges()["used_ratio"] > 0.9
    assert by_count.check_invariants() == [] and by_bytes.check_invariants() == []


def test_classic_sharded_eviction_counts_the_same_but_ignores_global_age():
    svc, clock = one_segment(classic_eviction=True)
    fill(svc, clock, 64)
    with pytest.raises(StoreError):
        svc.put_start("c0", "late", MiB)
    rep = svc.run_eviction()
    assert len(rep.evicted_keys) == 10  # per-shard ceil arithmetic still sums to ceil(64 * 0.15)
    assert sorted(int(k[1:]) for k in rep.evicted_keys) != list(range(10))
    assert svc.check_invariants() == []


def test_evict_failpoint_skips_the_round():
    svc, clock = one_segment()
    fill(svc, clock, 60)
    failpoints.arm("master.evict", "error", -1, count=1)
    assert svc.run_eviction() is None
    assert len(svc.all_keys()) == 60
    assert svc.run_eviction().evicted_keys


def test_eviction_events_name_each_key():
    svc, clock = one_segment()
    fill(svc, clock, 64)
    seq = svc.events_since(0)["last_seq"]
    rep = svc.trigger_eviction()
    evs = svc.events_since(seq)["events"]
    assert sorted(e["key"] for e in evs if e["kind"] == "evict") == sorted(rep.evicted_keys)
    assert sum(1 for e in evs if e["kind"] == "free") == len(rep.evicted_keys)

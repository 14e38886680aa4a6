"""Legacy 1-s GC, Umbra's on-demand reclamation, client TTL expiry and zombie puts."""

import pytest
from master_helpers import MiB, make_service, put, segment

from store import failpoints
from store.errors import ErrorCode, StoreError
from store.master.types import ClientStatus, ReplicateConfig


@pytest.fixture(autouse=True)
def _no_failpoints():
    failpoints.disarm_all()
    yield
    failpoints.disarm_all()


def code(fn, *a, **kw) -> ErrorCode:
    with pytest.raises(StoreError) as ei:
        fn(*a, **kw)
    return ei.value.code


def gc_service(**cfg):
    svc, clock = make_service(gc_mode="legacy", **cfg)
    svc.mount_segment(segment(0), "c0")
    return svc, clock


# ---------------------------------------------------------------- legacy GC


def test_object_vanishes_one_second_after_a_read():
    svc, clock = gc_service()
    put(svc, "c0", "k", 1000)
    rl = svc.get_replica_list("k")
    assert rl.lease_granted is False and rl.lease_ttl_ms == 0
    clock.advance(0.999)
    assert svc.run_gc() == [] and svc.all_keys() == ["k"]
    clock.advance(0.001)
    assert svc.run_gc() == ["k"]
    assert code(svc.get_replica_list, "k") == ErrorCode.OBJECT_NOT_FOUND
    assert svc.counters()["gc_removals"] == 1
    assert svc.gauges()["allocated_bytes"] == 0


def test_first_read_sets_the_clock_and_later_reads_do_not_save_it():
    svc, clock = gc_service()
    put(svc, "c0", "k", 10)
    svc.get_replica_list("k")
    clock.advance(0.5)
    svc.get_replica_list("k")  # a second read inside the window still works...
    clock.advance(0.5)
    assert svc.run_gc() == ["k"]  # ...but the object goes 1 s after the first one
    clock.advance(0.5)
    assert svc.run_gc() == []  # the second task finds nothing (OBJECT_NOT_FOUND ignored)


def test_unread_objects_are_never_collected():
    svc, clock = gc_service()
    put(svc, "c0", "k", 10)
    clock.advance(100)
    assert svc.run_gc() == [] and svc.all_keys() == ["k"]


def test_exist_key_lease_blocks_the_gc_remove_and_the_object_then_lives_on():
    """v0.3.5: a GC'd read grants no lease but ExistKey does; the GC Remove then fails with
    OBJECT_HAS_LEASE, is not retried, and the object lives until evicted."""
    svc, clock = gc_service()
    put(svc, "c0", "k", 10)
    svc.get_replica_list("k")
    clock.advance(0.2)
    assert svc.exist_key("k")
    clock.advance(0.8)
    assert svc.run_gc() == []
    clock.advance(60)
    assert svc.run_gc() == [] and svc.all_keys() == ["k"]


def test_gc_removes_a_new_object_under_the_same_key():
    """The task holds a key, not an object: a re-put inside the second is collected too."""
    svc, clock = gc_service()
    put(svc, "c0", "k", 10)
    svc.get_replica_list("k")
    svc.remove("k")
    put(svc, "c0", "k", 20)
    clock.advance(1)
    assert svc.run_gc() == ["k"]


def test_gc_queue_is_bounded():
    svc, _clock = gc_service(gc_queue_size=3)
    put(svc, "c0", "k", 10)
    for _ in range(5):
        svc.get_replica_list("k")  # reads still succeed when the queue is full
    assert svc.counters()["gc_queue_full"] == 2
    assert svc.gauges()["gc_pending"] == 3


def test_gc_full_queue_means_never_collected():
    svc, clock = gc_service(gc_queue_size=1)
    put(svc, "c0", "a", 10)
    put(svc, "c0", "b", 10)
    svc.get_replica_list("a")
    svc.get_replica_list("b")  # dropped: queue full
    clock.advance(1)
    assert svc.run_gc() == ["a"]
    clock.advance(10)
    assert svc.run_gc() == [] and svc.all_keys() == ["b"]


def test_gc_remove_failpoint_drops_the_task():
    svc, clock = gc_service()
    put(svc, "c0", "k", 10)
    svc.get_replica_list("k")
    failpoints.arm("master.gc_remove", "error", -1, count=1)
    clock.advance(1)
    assert svc.run_gc() == [] and svc.all_keys() == ["k"]


# ---------------------------------------------------------------- on-demand reclamation


def on_demand(**cfg):
    svc, clock = make_service(gc_mode="on_demand", **cfg)
    svc.mount_segment(segment(0, size=64 * MiB), "c0")
    return svc, clock


def test_on_demand_keeps_read_objects_while_there_is_room():
    svc, clock = on_demand()
    for i in range(10):
        put(svc, "c0", f"k{i}", MiB)
        svc.get_replica_list(f"k{i}")
    assert svc.remove("k0", force=True) is None
    clock.advance(3600)
    assert svc.run_gc() == [] and len(svc.all_keys()) == 9


def test_on_demand_reclaims_read_objects_first_and_never_leased_ones():
    svc, clock = on_demand()
    for i in range(30):
        put(svc, "c0", f"unread{i}", MiB)
        clock.advance(0.001)
    for i in range(28):
        put(svc, "c0", f"read{i}", MiB)
        svc.get_replica_list(f"read{i}")
        clock.advance(0.001)
    assert svc.gauges()["used_ratio"] > 0.9  # 58/64
    assert svc.run_gc() == []  # every read object is still leased
    clock.advance(10)
    svc.get_replica_list("read0")  # re-read: leased again, must survive
    removed = svc.run_gc()
    assert removed and all(k.startswith("read") for k in removed) and "read0" not in removed
    assert removed == [f"read{i}" for i in range(1, 1 + len(removed))]  # oldest read first
    assert svc.gauges()["used_ratio"] <= 0.85 + 1e-9
    assert svc.counters()["gc_removals"] == len(removed)
    assert all(f"unread{i}" in svc.all_keys() for i in range(30))
    assert svc.run_eviction() is None  # already below the watermark: eviction has nothing to do
    assert svc.check_invariants() == []


# ---------------------------------------------------------------- client liveness


def two_clients(**cfg):
    svc, clock = make_service(client_ttl=10.0, **cfg)
    svc.mount_segment(segment(0), "c0")
    svc.mount_segment(segment(1), "c1")
    return svc, clock


def test_client_expires_after_ttl_and_its_segments_are_unmounted():
    svc, clock = two_clients()
    put(svc, "c1", "on0", 100, preferred_segments=("127.0.0.1:20000",))
    put(svc, "c1", "on1", 100, preferred_segments=("127.0.0.1:20001",))
    put(svc, "c1", "both", 100, replica_num=2)
    svc.get_replica_list("on0")  # leased: still dropped, its bytes are gone
    for _ in range(12):
        clock.advance(1)
        svc.ping("c1")
        svc.run_client_monitor()
    assert svc.gauges()["active_clients"] == 1
    # c0 last pinged at mount (t0), deadline t0 + 10; the 1-s monitor saw it at t0 + 11
    kinds = [e for e in svc.events_since(0)["events"] if e["kind"] == "client_expire"]
    assert [e["client_id"] for e in kinds] == ["c0"]
    assert sorted(svc.all_keys()) == ["both", "on1"]
    assert [r["segment_id"] for r in svc.inspect_objects(["both"])[0]["replicas"]] == ["seg-1"]
    assert [s["id"] for s in svc.inspect_segments()] == ["seg-1"]
    assert svc.gauges()["total_capacity_bytes"] == 64 * MiB and svc.gauges()["allocated_bytes"] == 200
    assert svc.counters()["clients_expired"] == 1
    assert svc.ping("c0").status is ClientStatus.NEED_REMOUNT
    assert svc.check_invariants() == []


def test_expiry_is_strictly_after_the_deadline():
    svc, clock = two_clients()
    clock.advance(10)
    svc.ping("c1")
    assert svc.run_client_monitor() == []  # deadline == now: not yet
    clock.advance(0.001)
    assert svc.run_client_monitor() == ["c0"]


def test_pinging_keeps_a_client_alive():
    svc, clock = two_clients()
    for _ in range(40):
        clock.advance(1)
        svc.ping("c0")
        svc.ping("c1")
        assert svc.run_client_monitor() == []
    assert svc.gauges()["active_clients"] == 2


def test_expired_client_remounts_and_is_back():
    svc, clock = two_clients()
    clock.advance(11)
    svc.ping("c1")
    svc.run_client_monitor()
    assert svc.ping("c0").status is ClientStatus.NEED_REMOUNT
    svc.remount_segment([segment(0)], "c0")
    assert svc.ping("c0").status is ClientStatus.OK
    seg0 = next(s for s in svc.inspect_segments() if s["id"] == "seg-0")
    assert seg0["allocated_bytes"] == 0 and seg0["allocator"]["live_allocations"] == 0
    put(svc, "c0", "again", 10, preferred_segments=("127.0.0.1:20000",))


def test_zombie_put_is_reclaimed_when_its_writer_expires():
    """Mooncake #849: a writer killed after PutStart blocked the key (HEAD: 30 s / 600 s)."""
    svc, clock = two_clients(put_start_discard_timeout=30, put_start_release_timeout=600)
    svc.remount_segment([], "writer")  # a client without memory of its own
    svc.put_start("writer", "zombie", 5 * MiB, ReplicateConfig(replica_num=2))
    assert svc.gauges()["allocated_bytes"] == 10 * MiB
    for _ in range(11):  # the writer dies: only c0 and c1 keep pinging
        clock.advance(1)
        svc.ping("c0")
        svc.ping("c1")
        svc.run_client_monitor()
    assert svc.all_keys() == [] and svc.gauges()["allocated_bytes"] == 0
    assert svc.counters()["zombie_puts_reclaimed"] == 1
    svc.put_start("c0", "zombie", 10)  # the key is free again after ~ttl, not 600 s
    assert code(svc.put_end, "writer", "zombie") == ErrorCode.ILLEGAL_CLIENT
    assert svc.check_invariants() == []


def test_slow_put_of_a_live_writer_is_left_alone():
    svc, clock = two_clients()
    svc.put_start("c1", "slow", 100)
    for _ in range(45):
        clock.advance(1)
        svc.ping("c0")
        svc.ping("c1")
        svc.run_client_monitor()
    assert code(svc.put_start, "c0", "slow", 100) == ErrorCode.OBJECT_ALREADY_EXISTS
    svc.put_end("c1", "slow")


def test_unknown_writer_falls_back_to_mooncake_head_timers():
    svc, clock = two_clients(put_start_discard_timeout=30, put_start_release_timeout=600)
    svc.put_start("ghost", "k", MiB)  # a writer that never mounted nor pinged
    clock.advance(29)
    assert code(svc.put_start, "c0", "k", 10) == ErrorCode.OBJECT_ALREADY_EXISTS
    clock.advance(1)
    svc.put_start("c0", "k", 10)  # preempted: the key is free...
    assert svc.counters()["put_start_discards"] == 1
    assert svc.gauges()["allocated_bytes"] == MiB + 10  # ...but the ghost's range stays allocated
    assert svc.check_invariants() == []
    clock.advance(569)
    svc.ping("c0")
    svc.ping("c1")
    svc.run_client_monitor()
    assert svc.gauges()["allocated_bytes"] == MiB + 10
    clock.advance(1)  # put_start_time + 600 s
    svc.ping("c0")
    svc.ping("c1")
    svc.run_client_monitor()
    assert svc.gauges()["allocated_bytes"] == 10 and svc.counters()["put_start_releases"] == 1
    assert code(svc.put_end, "ghost", "k") == ErrorCode.ILLEGAL_CLIENT
    assert svc.check_invariants() == []


def test_monitor_discards_stale_unowned_puts_without_a_new_put():
    svc, clock = make_service(put_start_discard_timeout=30, put_start_release_timeout=600,
                              client_ttl=1e9)
    svc.mount_segment(segment(0), "c0")
    svc.put_start("ghost", "k", MiB)
    clock.advance(31)
    svc.run_client_monitor()
    assert svc.all_keys() == [] and svc.gauges()["discarded_puts"] == 1
    clock.advance(570)
    svc.run_client_monitor()
    assert svc.gauges()["allocated_bytes"] == 0 and svc.gauges()["discarded_puts"] == 0


def test_client_expire_failpoint_postpones_expiry():
    svc, clock = two_clients()
    clock.advance(11)
    svc.ping("c1")
    failpoints.arm("master.client_expire", "error", -1, count=1)
    assert svc.run_client_monitor() == []
    assert svc.gauges()["active_clients"] == 2
    assert svc.run_client_monitor() == ["c0"]


def test_expiry_releases_discarded_replicas_of_that_writer():
    svc, clock = two_clients(put_start_discard_timeout=30, put_start_release_timeout=600)
    svc.remount_segment([], "w")
    svc.put_start("w", "k", MiB)
    # w stays alive 40 s but its put never ends; nobody preempts a live writer
    for _ in range(40):
        clock.advance(1)
        for c in ("c0", "c1", "w"):
            svc.ping(c)
        svc.run_client_monitor()
    assert svc.all_keys() == ["k"]
    for _ in range(12):
        clock.advance(1)
        svc.ping("c0")
        svc.ping("c1")
        svc.run_client_monitor()
    assert svc.all_keys() == [] and svc.gauges()["allocated_bytes"] == 0

"""The master state machine's RPCs on a manual clock: success and error paths, leases, soft pin."""

import pytest
from master_helpers import MiB, make_service, put, segment

from store import failpoints
from store.errors import ErrorCode, StoreError
from store.master.types import ClientStatus, ReplicaStatus, ReplicateConfig, Segment


@pytest.fixture(autouse=True)
def _no_failpoints():
    failpoints.disarm_all()
    yield
    failpoints.disarm_all()


@pytest.fixture
def svc():
    s, clock = make_service()
    s.mount_segment(segment(0), "c0")
    s.mount_segment(segment(1), "c1")
    s.clock = clock
    return s


def code(fn, *a, **kw) -> ErrorCode:
    with pytest.raises(StoreError) as ei:
        fn(*a, **kw)
    return ei.value.code


# ---------------------------------------------------------------- puts


def test_put_start_returns_one_descriptor_per_replica_on_distinct_segments(svc):
    descs = svc.put_start("c0", "k", 5000, ReplicateConfig(replica_num=2))
    assert len(descs) == 2
    assert {d.segment_name for d in descs} == {"127.0.0.1:20000", "127.0.0.1:20001"}
    for d in descs:
        seg = next(s for s in (segment(0), segment(1)) if s.id == d.segment_id)
        assert seg.base <= d.address and d.address + d.length <= seg.base + seg.size
        assert d.length == 5000 and d.status is ReplicaStatus.PROCESSING
        assert d.te_endpoint == seg.te_endpoint and d.transport == seg.transport and d.protocol == "tcp"
    assert svc.inspect_objects(["k"])[0]["state"] == "PROCESSING"
    assert svc.check_invariants() == []


def test_put_start_best_effort_replicas_and_partial_counter(svc):
    descs = svc.put_start("c0", "k", 100, ReplicateConfig(replica_num=5))
    assert len(descs) == 2  # only two segment names exist
    assert svc.counters()["put_start_partial_allocations"] == 1


def test_put_start_preferred_segment_first(svc):
    for i in range(5):
        d = svc.put_start("c0", f"k{i}", 100, ReplicateConfig(preferred_segments=("127.0.0.1:20001",)))
        assert d[0].segment_name == "127.0.0.1:20001"


@pytest.mark.parametrize("args,expected", [
    (("c0", "", 10), ErrorCode.INVALID_PARAMS),
    (("c0", "k", 0), ErrorCode.INVALID_PARAMS),
    (("c0", "k", -5), ErrorCode.INVALID_PARAMS),
    (("c0", "k", "10"), ErrorCode.INVALID_PARAMS),
    (("c0", "k", True), ErrorCode.INVALID_PARAMS),
    (("", "k", 10), ErrorCode.INVALID_PARAMS),
    (("c0", "x" * 4097, 10), ErrorCode.INVALID_KEY),
    (("c0", 123, 10), ErrorCode.INVALID_PARAMS),
])
def test_put_start_rejects_bad_input_without_state_change(svc, args, expected):
    before = svc.snapshot()
    assert code(svc.put_start, *args) == expected
    after = svc.snapshot()
    assert after["objects"] == before["objects"] and after["segments"] == before["segments"]


def test_put_start_key_of_exactly_4096_bytes_is_fine(svc):
    svc.put_start("c0", "é" * 2048, 10)  # 4096 UTF-8 bytes
    assert code(svc.put_start, "c0", "é" * 2048 + "x", 10) == ErrorCode.INVALID_KEY


def test_put_start_replica_num_zero_is_invalid(svc):
    assert code(svc.put_start, "c0", "k", 10, {"replica_num": 0}) == ErrorCode.INVALID_PARAMS
    assert code(svc.put_start, "c0", "k", 10, {"replica_num": 1, "bogus": 1}) == ErrorCode.INVALID_PARAMS


def test_put_start_existing_key(svc):
    put(svc, "c0", "k", 10)
    assert code(svc.put_start, "c0", "k", 10) == ErrorCode.OBJECT_ALREADY_EXISTS
    svc.put_start("c0", "p", 10)
    assert code(svc.put_start, "c1", "p", 10) == ErrorCode.OBJECT_ALREADY_EXISTS


def test_put_start_without_segments_or_too_large(svc):
    empty, _ = make_service()
    assert code(empty.put_start, "c0", "k", 10) == ErrorCode.NO_AVAILABLE_HANDLE
    assert code(svc.put_start, "c0", "k", 65 * MiB) == ErrorCode.NO_AVAILABLE_HANDLE
    assert svc.gauges()["need_eviction"] is False  # eviction cannot make room for that


def test_put_start_full_sets_need_eviction_and_frees_partial(svc):
    put(svc, "c0", "a", 60 * MiB, preferred_segments=("127.0.0.1:20000",))
    put(svc, "c0", "b", 60 * MiB, preferred_segments=("127.0.0.1:20001",))
    assert code(svc.put_start, "c0", "c", 10 * MiB, ReplicateConfig(replica_num=2)) == \
        ErrorCode.NO_AVAILABLE_HANDLE
    g = svc.gauges()
    assert g["need_eviction"] is True and g["key_count"] == 2
    assert svc.counters()["put_start_alloc_failures"] == 1
    assert svc.check_invariants() == []


def test_cachelib_caps_object_size_and_checks_alignment():
    s, _ = make_service(memory_allocator="cachelib")
    assert code(s.mount_segment, segment(0, base=(1 << 36) + 4096), "c") == ErrorCode.INVALID_PARAMS
    assert code(s.mount_segment, segment(0, size=64 * MiB + 1), "c") == ErrorCode.INVALID_PARAMS
    s.mount_segment(segment(0), "c")
    assert code(s.put_start, "c", "k", 16 * MiB - 15) == ErrorCode.INVALID_PARAMS
    s.put_start("c", "k", 16 * MiB - 16)


def test_put_end_completes_and_grants_zero_lease(svc):
    svc.put_start("c0", "k", 10)
    assert code(svc.get_replica_list, "k") == ErrorCode.REPLICA_IS_NOT_READY
    svc.put_end("c0", "k")
    info = svc.inspect_objects(["k"])[0]
    assert info["state"] == "COMPLETE" and info["lease_deadline"] == svc.now() and not info["leased"]
    svc.remove("k")  # a fresh put is removable at once (no lease)


def test_put_end_errors(svc):
    assert code(svc.put_end, "c0", "nope") == ErrorCode.OBJECT_NOT_FOUND
    svc.put_start("c0", "k", 10)
    assert code(svc.put_end, "c1", "k") == ErrorCode.ILLEGAL_CLIENT
    svc.put_end("c0", "k")
    assert code(svc.put_end, "c0", "k") == ErrorCode.INVALID_WRITE


def test_put_revoke(svc):
    svc.put_start("c0", "k", 1000, ReplicateConfig(replica_num=2))
    assert svc.gauges()["allocated_bytes"] == 2000
    assert code(svc.put_revoke, "c1", "k") == ErrorCode.ILLEGAL_CLIENT
    svc.put_revoke("c0", "k")
    assert svc.gauges()["allocated_bytes"] == 0 and svc.gauges()["key_count"] == 0
    assert code(svc.put_revoke, "c0", "k") == ErrorCode.OBJECT_NOT_FOUND
    assert [s["allocator"]["live_allocations"] for s in svc.inspect_segments()] == [0, 0]
    put(svc, "c0", "done", 10)
    assert code(svc.put_revoke, "c0", "done") == ErrorCode.INVALID_WRITE
    assert svc.check_invariants() == []


def test_batch_puts_report_per_key(svc):
    items = svc.batch_put_start("c0", ["a", "b", "", "a"], [10, 20, 30, 40])
    assert [it.code for it in items] == [ErrorCode.OK, ErrorCode.OK, ErrorCode.INVALID_PARAMS,
                                         ErrorCode.OBJECT_ALREADY_EXISTS]
    assert items[1].value[0].length == 20
    ends = svc.batch_put_end("c0", ["a", "zz"])
    assert [it.code for it in ends] == [ErrorCode.OK, ErrorCode.OBJECT_NOT_FOUND]
    revs = svc.batch_put_revoke("c0", ["a", "b"])
    assert [it.code for it in revs] == [ErrorCode.INVALID_WRITE, ErrorCode.OK]
    c = svc.counters()
    assert c["batch_put_start_items"] == 4 and c["batch_put_start_failed_items"] == 2
    assert c["batch_put_start_partial_successes"] == 1 and c["batch_put_start_failures"] == 0
    assert code(svc.batch_put_start, "c0", ["a"], [1, 2]) == ErrorCode.INVALID_PARAMS
    assert code(svc.batch_put_start, "c0", "notalist", [1]) == ErrorCode.INVALID_PARAMS
    assert svc.counters()["batch_put_start_failures"] == 2


# ---------------------------------------------------------------- reads and leases


def test_get_replica_list_grants_lease_that_blocks_remove(svc):
    put(svc, "c0", "k", 10)
    rl = svc.get_replica_list("k")
    assert rl.lease_ttl_ms == 10_000 and rl.lease_granted and rl.size == 10
    assert rl.replicas[0].status is ReplicaStatus.COMPLETE
    assert code(svc.remove, "k") == ErrorCode.OBJECT_HAS_LEASE
    svc.clock.advance(9.999)
    assert code(svc.remove, "k") == ErrorCode.OBJECT_HAS_LEASE
    svc.clock.advance(0.001)  # now == deadline: expired (Mooncake: now >= lease_timeout)
    svc.remove("k")
    assert code(svc.get_replica_list, "k") == ErrorCode.OBJECT_NOT_FOUND


def test_lease_is_max_of_old_and_new(svc):
    put(svc, "c0", "k", 10)
    svc.get_replica_list("k")
    first = svc.inspect_objects(["k"])[0]["lease_deadline"]
    svc.clock.advance(3)
    svc.exist_key("k")
    assert svc.inspect_objects(["k"])[0]["lease_deadline"] == first + 3
    svc.config.default_kv_lease_ttl = 1.0  # a shorter TTL never shortens a lease
    svc.get_replica_list("k")
    assert svc.inspect_objects(["k"])[0]["lease_deadline"] == first + 3


def test_force_remove_skips_lease_not_readiness(svc):
    put(svc, "c0", "k", 10)
    svc.get_replica_list("k")
    svc.remove("k", force=True)
    svc.put_start("c0", "p", 10)
    assert code(svc.remove, "p", force=True) == ErrorCode.REPLICA_IS_NOT_READY
    assert code(svc.remove, "nope") == ErrorCode.OBJECT_NOT_FOUND
    assert code(svc.remove, "p", force="yes") == ErrorCode.INVALID_PARAMS


def test_exist_key(svc):
    assert svc.exist_key("nope") is False
    svc.put_start("c0", "k", 10)
    assert code(svc.exist_key, "k") == ErrorCode.REPLICA_IS_NOT_READY
    svc.put_end("c0", "k")
    assert svc.exist_key("k") is True
    assert code(svc.remove, "k") == ErrorCode.OBJECT_HAS_LEASE  # ExistKey grants the lease too
    items = svc.batch_exist_key(["k", "nope", ""])
    assert [(i.code, i.value) for i in items] == [(ErrorCode.OK, True), (ErrorCode.OK, False),
                                                  (ErrorCode.INVALID_PARAMS, None)]


def test_batch_get_replica_list(svc):
    put(svc, "c0", "a", 10)
    svc.put_start("c0", "b", 10)
    items = svc.batch_get_replica_list(["a", "b", "c"])
    assert [i.code for i in items] == [ErrorCode.OK, ErrorCode.REPLICA_IS_NOT_READY,
                                       ErrorCode.OBJECT_NOT_FOUND]
    assert items[0].value.key == "a"


def test_query_key_does_not_grant_lease(svc):
    put(svc, "c0", "k", 10)
    info = svc.query_key("k")
    assert info["key"] == "k" and not info["leased"]
    svc.remove("k")  # would be OBJECT_HAS_LEASE if query_key had leased it
    assert svc.query_key("k") is None


def test_soft_pin_deadline_set_at_put_end_and_extended_by_reads(svc):
    put(svc, "c0", "k", 10, with_soft_pin=True)
    t0 = svc.now()
    info = svc.inspect_objects(["k"])[0]
    assert info["soft_pin_deadline"] == t0 + 1800 and info["soft_pinned"]
    assert svc.gauges()["soft_pin_key_count"] == 1
    svc.clock.advance(100)
    svc.get_replica_list("k")
    assert svc.inspect_objects(["k"])[0]["soft_pin_deadline"] == t0 + 1900
    svc.clock.advance(2000)
    assert svc.gauges()["soft_pin_key_count"] == 0


def test_remove_all_respects_leases_and_puts_in_progress(svc):
    put(svc, "c0", "a", 10)
    put(svc, "c0", "b", 10)
    svc.get_replica_list("b")
    svc.put_start("c0", "p", 10)
    assert svc.remove_all() == 1
    assert sorted(svc.all_keys()) == ["b", "p"]
    assert svc.remove_all(force=True) == 1
    assert svc.all_keys() == ["p"]
    svc.put_end("c0", "p")
    assert svc.check_invariants() == []


def test_classic_remove_all_erases_puts_in_progress():
    s, _ = make_service(classic_remove_all=True)
    s.mount_segment(segment(0), "c0")
    s.put_start("c0", "p", 10)
    assert s.remove_all() == 1
    assert code(s.put_end, "c0", "p") == ErrorCode.OBJECT_NOT_FOUND  # v0.3.5's lost in-flight put


# ---------------------------------------------------------------- segments and clients


def test_mount_is_idempotent_and_validated(svc):
    svc.mount_segment(segment(0), "c0")  # same again: OK
    assert len(svc.inspect_segments()) == 2
    assert code(svc.mount_segment, segment(0), "other") == ErrorCode.SEGMENT_ALREADY_EXISTS
    assert code(svc.mount_segment, segment(0, size=32 * MiB), "c0") == ErrorCode.SEGMENT_ALREADY_EXISTS
    assert code(svc.mount_segment, segment(5, base=0), "c5") == ErrorCode.INVALID_PARAMS
    assert code(svc.mount_segment, segment(5, size=0), "c5") == ErrorCode.INVALID_PARAMS
    overlapping = segment(0, id="seg-x", base=segment(0).base + MiB)
    assert code(svc.mount_segment, overlapping, "c0") == ErrorCode.INVALID_PARAMS
    assert code(svc.mount_segment, {"id": "x", "name": "n", "base": 1 << 30}, "c") == ErrorCode.INVALID_PARAMS
    assert code(svc.mount_segment, {"id": "x", "name": "n", "base": 1 << 30, "size": 1, "bad": 1}, "c") == \
        ErrorCode.INVALID_PARAMS
    assert code(svc.mount_segment, "not a map", "c") == ErrorCode.INVALID_PARAMS
    assert len(svc.inspect_segments()) == 2
    assert svc.gauges()["total_capacity_bytes"] == 128 * MiB


def test_unmount_drops_replicas_and_objects(svc):
    put(svc, "c0", "both", 100, replica_num=2)
    put(svc, "c0", "only0", 100, preferred_segments=("127.0.0.1:20000",))
    svc.get_replica_list("only0")  # a lease does not keep bytes whose segment is gone
    assert code(svc.unmount_segment, "seg-0", "c1") == ErrorCode.ILLEGAL_CLIENT
    assert code(svc.unmount_segment, "seg-nope", "c0") == ErrorCode.SEGMENT_NOT_FOUND
    svc.unmount_segment("seg-0", "c0")
    assert sorted(svc.all_keys()) == ["both"]
    both = svc.inspect_objects(["both"])[0]
    assert [r["segment_id"] for r in both["replicas"]] == ["seg-1"]
    assert svc.gauges()["allocated_bytes"] == 100
    assert svc.gauges()["total_capacity_bytes"] == 64 * MiB
    assert svc.check_invariants() == []
    kinds = [e["kind"] for e in svc.events_since(0)["events"]]
    assert "replica_lost" in kinds and "object_lost" in kinds and "unmount" in kinds


def test_classic_unmount_drops_whole_object():
    s, _ = make_service(classic_unmount=True)
    s.mount_segment(segment(0), "c0")
    s.mount_segment(segment(1), "c1")
    put(s, "c0", "both", 100, replica_num=2)
    s.unmount_segment("seg-0", "c0")
    assert s.all_keys() == [] and s.gauges()["allocated_bytes"] == 0
    assert s.check_invariants() == []


def test_ping_and_remount(svc):
    assert svc.ping("c0").status is ClientStatus.OK
    assert svc.ping("fresh").status is ClientStatus.NEED_REMOUNT
    svc.remount_segment([], "fresh")  # a client with no memory registers with an empty list
    assert svc.ping("fresh").status is ClientStatus.OK
    assert svc.gauges()["active_clients"] == 3
    new = segment(7)
    svc.remount_segment([new], "fresh")  # already known: nothing changes (Mooncake)
    assert all(s["id"] != new.id for s in svc.inspect_segments())


def test_remount_is_all_or_nothing(svc):
    good, clash = segment(7), segment(0, id="seg-clash")
    assert code(svc.remount_segment, [good, clash], "c7") == ErrorCode.INVALID_PARAMS
    assert len(svc.inspect_segments()) == 2 and svc.ping("c7").status is ClientStatus.NEED_REMOUNT
    assert code(svc.remount_segment, [good, good], "c7") == ErrorCode.INVALID_PARAMS
    assert code(svc.remount_segment, "nope", "c7") == ErrorCode.INVALID_PARAMS
    svc.remount_segment([good, segment(8)], "c7")
    assert len(svc.inspect_segments()) == 4


def test_segment_wire_round_trip():
    s = segment(3)
    assert Segment.from_wire(s.to_wire()) == s


# ---------------------------------------------------------------- failpoints and metrics


def test_failpoint_error_counts_as_failure_and_changes_nothing(svc):
    failpoints.arm("master.put_start", "error", -800, count=1)
    assert code(svc.put_start, "c0", "k", 10) == ErrorCode.TRANSFER_FAIL
    assert svc.all_keys() == []
    svc.put_start("c0", "k", 10)
    c = svc.counters()
    assert c["put_start_requests"] == 2 and c["put_start_failures"] == 1


def test_batch_items_hit_the_single_op_failpoint(svc):
    failpoints.arm("master.put_start", "error", -200, count=1)
    items = svc.batch_put_start("c0", ["a", "b"], [1, 1])
    assert [i.code for i in items] == [ErrorCode.NO_AVAILABLE_HANDLE, ErrorCode.OK]


def test_counters_and_gauges(svc):
    put(svc, "c0", "a", 4096)
    svc.get_replica_list("a")
    code(svc.get_replica_list, "b")
    svc.exist_key("zz")
    c = svc.counters()
    assert c["put_start_requests"] == 1 and c["put_end_requests"] == 1
    assert c["get_replica_list_requests"] == 2 and c["get_replica_list_failures"] == 1
    assert c["exist_key_requests"] == 1 and c["exist_key_failures"] == 0
    assert c["mount_segment_requests"] == 2
    g = svc.gauges()
    assert g["key_count"] == 1 and g["allocated_bytes"] == 4096 and g["active_clients"] == 2
    assert dict(g["value_size_buckets"])[4096] == 1


def test_events_record_the_lifecycle(svc):
    put(svc, "c0", "k", 10)
    svc.get_replica_list("k")
    svc.clock.advance(11)
    svc.remove("k")
    evs = svc.events_since(0)["events"]
    kinds = [e["kind"] for e in evs if e.get("key") == "k"]
    assert kinds == ["alloc", "put_start", "put_end", "lease", "free", "remove"]
    seqs = [e["seq"] for e in evs]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    later = svc.events_since(seqs[-2])
    assert [e["seq"] for e in later["events"]] == [seqs[-1]] and not later["lost"]


def test_event_ring_reports_lost_events():
    from store.master.events import EventLog
    log = EventLog(capacity=5)
    for i in range(8):
        log.emit(float(i), "x", i=i)
    events, lost = log.since(0)
    assert lost and [e["seq"] for e in events] == [4, 5, 6, 7, 8]
    events, lost = log.since(5, limit=2)
    assert not lost and [e["seq"] for e in events] == [6, 7]
    assert log.since(8) == ([], False)

"""Faults the client must survive with the right code and no leak: an owner dying during a put,
replica failover, a read outliving its lease, checksum mismatches, remount after expiry, and
failures injected at the client's own steps."""

from __future__ import annotations

import pytest
from client_helpers import (
    SEED,
    MiB,
    addr_of,
    cluster,
    local_store,
    new_client,
    no_borrowed_memory,
    random_bytes,
    wait_until,
)
from master_helpers import in_process_server

from store import failpoints
from store.client import ReplicateConfig
from store.errors import ErrorCode, StoreError
from store.transfer.memory import MemoryRegion, view_at

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(autouse=True)
def _disarm():
    yield
    failpoints.disarm_all()


def test_owner_dies_during_put() -> None:
    """The holder crashes (failpoint ``tcp.server_apply=panic``) while the put's bytes arrive: the put
    fails with TRANSFER_FAIL, the key is not readable, and the master holds nothing for it."""
    with cluster("--client_ttl=2", holders=0) as c:
        holder = c.add_holder(segment_size="64mb", env={"UMBRA_FAILPOINTS": "tcp.server_apply=panic"})
        client = c.client(local_buffer=16 * MiB)
        value = random_bytes(SEED, 8 * MiB)
        assert client.put("doomed", value) == int(ErrorCode.TRANSFER_FAIL)
        wait_until(lambda: not holder.alive(), 10, what="holder exit")
        assert holder.proc.returncode == 137
        assert client.get("doomed") == b""
        assert client.is_exist("doomed") == 0
        g = c.gauges()
        assert (g["key_count"], g["processing_key_count"], g["allocated_bytes"]) == (0, 0, 0), g
        assert c.mc.check_invariants() == []
        assert client.counters()["revokes"] == 1
        assert client.local_buffer_report()["used"] == 0
        # the master unmounts the dead owner's segment once its client TTL runs out
        wait_until(lambda: c.gauges()["segment_count"] == 0, 15, what="dead holder's segment unmounted")
        assert client.put("after", b"x") == int(ErrorCode.NO_AVAILABLE_HANDLE)


def test_failover_to_the_surviving_replica() -> None:
    """Two replicas; the owner of the one read first is killed: get, get_into and get_batch read the
    other one (Mooncake would return TRANSFER_FAIL); a key whose only replica died gives −800."""
    with cluster(holders=2, segment_size="64mb") as c:
        client = c.client(local_buffer=16 * MiB)
        value = random_bytes(SEED + 1, 5 * MiB + 17)  # streamed: read in parts
        assert client.put("two", value, ReplicateConfig(replica_num=2)) == 0
        first = client.get_replica_desc("two")[0]["segment_name"]
        victim = next(h for h in c.holders if h.segment_name == first)
        solo = ReplicateConfig(preferred_segments=[first])
        assert client.put("solo", b"s" * 5000, solo) == 0
        assert [r["segment_name"] for r in client.get_replica_desc("solo")] == [first]
        victim.kill()
        assert client.get("two") == value
        rec = client.last_op()
        assert rec.code == 0 and rec.failovers == 1 and rec.replica != first
        assert no_borrowed_memory(client)
        region = MemoryRegion(8 * MiB)
        try:
            assert client.register_buffer(region.addr, region.length) == 0
            assert client.get_into("two", region.addr, region.length) == len(value)
            assert bytes(view_at(region.addr, len(value))) == value
            assert client.get_into("solo", region.addr, region.length) == int(ErrorCode.TRANSFER_FAIL)
            client.unregister_buffer(region.addr)
        finally:
            region.close()
        assert client.get_batch(["two", "solo"]) == [value, b""]
        assert client.counters()["failovers"] == 3
        assert client.local_buffer_report()["used"] == 0
        assert no_borrowed_memory(client)


def test_read_that_outlives_its_lease_is_discarded() -> None:
    with local_store(default_kv_lease_ttl=0.3) as (_server, client):
        value = random_bytes(SEED + 2, 200_000)
        assert client.put("slow", value) == 0
        failpoints.arm("client.read_replica", "sleep", 0.6, count=1)
        assert client.get("slow") == b""
        assert client.last_op().code == int(ErrorCode.LEASE_EXPIRED)
        assert client.counters()["lease_expired"] == 1
        failpoints.arm("client.read_replica", "sleep", 0.6, count=1)
        region = MemoryRegion(MiB)
        try:
            assert client.register_buffer(region.addr, MiB) == 0
            assert client.get_into("slow", region.addr, MiB) == int(ErrorCode.LEASE_EXPIRED)
            client.unregister_buffer(region.addr)
        finally:
            region.close()
        assert client.get("slow") == value  # in time now
        assert client.local_buffer_report()["used"] == 0


def test_checksum_mismatch_fails_over_then_reports() -> None:
    """Corrupt the replica in this client's own segment (read first): the get fails over to the other
    replica; corrupt both: CHECKSUM_MISMATCH (−801)."""
    with in_process_server() as server:
        other = new_client(addr_of(server), segment=16 * MiB)
        me = new_client(addr_of(server), segment=16 * MiB, local_buffer=16 * MiB)
        try:
            value = random_bytes(SEED + 3, 5 * MiB + 1)  # large: the streamed read path
            small = random_bytes(SEED + 4, 3000)
            assert me.put("big", value, ReplicateConfig(replica_num=2)) == 0
            assert me.put("small", small, ReplicateConfig(replica_num=2)) == 0
            reps = {k: {r["segment_name"]: r["address"] for r in me.get_replica_desc(k)}
                    for k in ("big", "small")}
            for k in reps:
                assert set(reps[k]) == {me.get_hostname(), other.get_hostname()}
                view_at(reps[k][me.get_hostname()] + 100, 1)[0] ^= 0xFF
            assert me.get("big") == value and me.last_op().failovers == 1
            assert me.get("small") == small and me.last_op().failovers == 1
            assert me.counters()["checksum_mismatches"] == 2
            for k in reps:
                view_at(reps[k][other.get_hostname()] + 7, 1)[0] ^= 0x01
            assert me.get("big") == b"" and me.last_op().code == int(ErrorCode.CHECKSUM_MISMATCH)
            assert me.get_batch(["small"]) == [b""]
            assert me.counters()["checksum_mismatches"] == 6
            assert me.local_buffer_report()["used"] == 0
            assert no_borrowed_memory(me)
        finally:
            me.close()
            other.close()


@pytest.mark.parametrize(("point", "code"), [("client.put_start", -900), ("client.write_replica", -800),
                                             ("client.put_end", -901)])
def test_failure_at_each_put_step_leaves_nothing(point: str, code: int) -> None:
    with local_store() as (server, client):
        failpoints.arm(point, "error", code, count=1)
        assert client.put("k", random_bytes(SEED, 100_000)) == code
        assert client.is_exist("k") == 0
        g = server.service.gauges()
        assert (g["key_count"], g["processing_key_count"], g["allocated_bytes"]) == (0, 0, 0), g
        assert client.local_buffer_report()["used"] == 0
        assert client.put("k", b"ok") == 0 and client.get("k") == b"ok"


def test_batch_put_with_one_failed_replica_write() -> None:
    """Only the key whose replica write failed is revoked; the rest of the batch is stored."""
    with local_store() as (server, client):
        failed = []

        def refuse(key: str, **ids: object) -> None:
            if key == "b2":
                failed.append(key)
                raise StoreError(ErrorCode.TRANSFER_FAIL, "injected")

        failpoints.arm("client.write_replica", "call", refuse)
        keys = [f"b{i}" for i in range(5)]
        assert client.put_batch(keys, [bytes([i]) * 1000 for i in range(5)]) == int(ErrorCode.TRANSFER_FAIL)
        assert failed == ["b2"]
        assert client.batch_is_exist(keys) == [1, 1, 0, 1, 1]
        assert server.service.gauges()["allocated_bytes"] == 4000


def test_remount_after_the_master_expired_the_holder() -> None:
    """SIGSTOP the holder past the client TTL: the master expires it and unmounts its segment; after
    SIGCONT its heartbeat gets NEED_REMOUNT and mounts the segment again."""
    with cluster("--client_ttl=1", holders=0) as c:
        # the first remount attempt fails (failpoint); the next heartbeat tries again
        holder = c.add_holder(segment_size="32mb", env={"UMBRA_FAILPOINTS": "client.remount=error(-900)*1"})
        client = c.client()
        wait_until(lambda: c.gauges()["segment_count"] == 1, 5, what="segment mounted")
        holder.stop()
        try:
            wait_until(lambda: c.gauges()["segment_count"] == 0, 10, what="holder expired")
        finally:
            holder.cont()
        wait_until(lambda: c.gauges()["segment_count"] == 1, 10, what="segment remounted")
        stats = holder.stats()
        assert stats["counters"]["remounts"] == 1
        assert stats["failpoints_fired"].count("client.remount") == 1
        value = random_bytes(SEED + 5, 100_000)
        assert client.put("again", value) == 0 and client.get("again") == value


def test_failpoints_on_the_read_path() -> None:
    with in_process_server() as server:
        other = new_client(addr_of(server), segment=8 * MiB)
        me = new_client(addr_of(server), segment=8 * MiB)
        try:
            value = random_bytes(SEED + 6, 50_000)
            assert me.put("r", value, ReplicateConfig(replica_num=2)) == 0
            failpoints.arm("client.get_replica_list", "error", -901, count=1)
            assert me.get("r") == b"" and me.last_op().code == -901
            failpoints.arm("client.verify_checksum", "error", -801, count=1)
            assert me.get("r") == value
            assert me.last_op().failovers == 1 and me.counters()["checksum_mismatches"] == 1
            failpoints.arm("client.read_replica", "error", -800, count=2)
            assert me.get("r") == b"" and me.last_op().code == -800
            assert me.get("r") == value
            assert me.local_buffer_report()["used"] == 0
        finally:
            me.close()
            other.close()

"""End to end across processes: a master process, two segment-holding client processes, and this
process as a pure client (``global_segment_size=0``), so every byte crosses a real TCP socket.

Seeds: values come from ``random_bytes(seed, n)``; hypothesis prints the failing (seed, size) and
``UMBRA_TEST_SEED`` moves the fixed seeds.
"""

from __future__ import annotations

import numpy as np
import pytest
from client_helpers import SEED, MiB, cluster, no_borrowed_memory, random_bytes, wait_until
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from store.client import Client, ReplicateConfig
from store.errors import ErrorCode
from store.transfer.memory import MemoryRegion

pytestmark = pytest.mark.timeout(240)

MAX_VALUE = 64 * MiB


@pytest.fixture(scope="module")
def two_holders():
    with cluster(holders=2, segment_size="192mb") as c:
        client = c.client(local_buffer=MAX_VALUE + 16 * MiB)
        yield c, client


def _baseline(c) -> None:
    c.mc.remove_all(force=True)
    g = c.gauges()
    assert g["allocated_bytes"] == 0 and g["key_count"] == 0, g


sizes = st.integers(0, 26).flatmap(lambda e: st.integers(1 << e, min(2 << e, MAX_VALUE)))


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(size=sizes, seed=st.integers(0, 2**32 - 1))
@example(size=1, seed=SEED)
@example(size=MAX_VALUE, seed=SEED)
@example(size=4 * MiB + 3, seed=SEED)  # streamed in parts, odd tail
def test_put_get_sizes(two_holders, size: int, seed: int) -> None:
    c, client = two_holders
    value = random_bytes(seed, size)
    key = f"v-{seed}-{size}"
    assert client.put(key, value) == 0, f"seed={seed} size={size}"
    assert client.get_size(key) == size
    assert client.get(key) == value, f"seed={seed} size={size}"
    rec = client.last_op()
    assert rec.code == 0 and rec.replica in {h.segment_name for h in c.holders}
    assert client.remove(key, force=True) == 0
    assert client.get(key) == b""
    assert c.gauges()["allocated_bytes"] == 0
    assert no_borrowed_memory(client) and client.local_buffer_report()["used"] == 0


def _wire_bytes(client: Client) -> tuple[int, int]:
    conns = [ci for infos in client.engine.connections().values() for ci in infos]
    return sum(ci.bytes_sent for ci in conns), sum(ci.bytes_received for ci in conns)


@pytest.mark.parametrize("size", [3 * MiB, 6 * MiB])  # staged through the local buffer / zero-copy
def test_every_byte_crossed_tcp(two_holders, size: int) -> None:
    c, client = two_holders
    value = random_bytes(SEED, size)
    sent0, recv0 = _wire_bytes(client)
    zc0 = client.counters()["zero_copy"]
    assert client.put("tcp-check", value) == 0 and client.get("tcp-check") == value
    sent1, recv1 = _wire_bytes(client)
    assert sent1 - sent0 >= len(value) and recv1 - recv0 >= len(value)
    assert client.counters()["zero_copy"] - zc0 == (2 if size >= 4 * MiB else 0)
    assert client.engine.stats()["transports"].get("local", {}).get("bytes", 0) == 0
    _baseline(c)


def test_batch_forms(two_holders) -> None:
    c, client = two_holders
    keys = [f"batch-{i}" for i in range(12)]
    values = [random_bytes(SEED + i, 1 + 37_000 * i) for i in range(12)]
    assert client.put_batch(keys, values) == 0
    assert client.get_batch(keys) == values
    assert client.batch_is_exist([*keys, "absent"]) == [1] * 12 + [0]
    region = MemoryRegion(8 * MiB)
    try:
        assert client.register_buffer(region.addr, region.length) == 0
        arr = region.numpy()
        sizes = [4096, 65536, MiB, 3 * MiB]
        offs = [0, 4096, 4096 + 65536, 4096 + 65536 + MiB]
        blob = np.frombuffer(random_bytes(SEED + 99, sum(sizes)), np.uint8)
        arr[: sum(sizes)] = blob
        bkeys = [f"bpf-{i}" for i in range(4)]
        assert client.batch_put_from(bkeys, [region.addr + o for o in offs], sizes) == [0] * 4
        arr[: sum(sizes)] = 0
        assert client.batch_get_into(bkeys, [region.addr + o for o in offs], sizes) == sizes
        assert bytes(arr[: sum(sizes)]) == blob.tobytes()
        del arr
        assert client.unregister_buffer(region.addr) == 0
    finally:
        region.close()
    _baseline(c)


def test_two_replicas_on_two_owners(two_holders) -> None:
    c, client = two_holders
    value = random_bytes(SEED + 7, 2 * MiB + 5)
    assert client.put("rep2", value, ReplicateConfig(replica_num=2)) == 0
    reps = client.get_replica_desc("rep2")
    assert len(reps) == 2
    assert {r["segment_name"] for r in reps} == {h.segment_name for h in c.holders}
    assert client.get("rep2") == value
    assert c.gauges()["allocated_bytes"] == 2 * len(value)
    # preferred segment: the replica lands where asked
    cfg = ReplicateConfig()
    cfg.preferred_segment = c.holders[1].segment_name
    assert client.put("pref", b"p" * 1000, cfg) == 0
    assert [r["segment_name"] for r in client.get_replica_desc("pref")] == [c.holders[1].segment_name]
    _baseline(c)


def test_removal_and_leases(two_holders) -> None:
    c, client = two_holders
    for i in range(5):
        assert client.put(f"rm-{i}", random_bytes(SEED + i, 10_000)) == 0
    assert client.remove("rm-0") == 0
    assert client.get("rm-1") != b""
    assert client.remove("rm-1") == int(ErrorCode.OBJECT_HAS_LEASE)
    assert client.is_exist("rm-2") == 1
    assert client.remove("rm-2") == int(ErrorCode.OBJECT_HAS_LEASE)
    assert client.remove_all() == 2  # rm-3, rm-4: never read, so no lease
    assert client.remove_all(force=True) == 2
    assert client.batch_is_exist([f"rm-{i}" for i in range(5)]) == [0] * 5
    assert c.gauges()["allocated_bytes"] == 0
    assert c.mc.check_invariants() == []


def test_holder_reads_what_another_client_wrote(two_holders) -> None:
    """A second pure client sees the first one's values (and the owner's memcpy path is not needed)."""
    c, client = two_holders
    other = Client()
    assert other.setup("127.0.0.1", "P2PHANDSHAKE", 0, 8 * MiB, "tcp", "", c.address) == 0
    try:
        value = random_bytes(SEED + 11, 6 * MiB)
        assert client.put("shared", value) == 0
        assert other.get("shared") == value
        assert other.upsert("shared", b"new") == 0
        assert client.get("shared") == b"new"
    finally:
        other.close()
    _baseline(c)


def test_eviction_under_pressure() -> None:
    """A 32 MiB segment and 80 puts of 1 MiB: the master evicts (watermark 0.9, ratio 0.05); every
    put answers 0 or NO_AVAILABLE_HANDLE; every surviving key reads back its own bytes."""
    with cluster(holders=1, segment_size="32mb") as c:
        client = c.client(local_buffer=4 * MiB)
        codes = {}
        for i in range(80):
            codes[i] = client.put(f"ev-{i}", random_bytes(SEED + i, MiB))
        assert set(codes.values()) <= {0, int(ErrorCode.NO_AVAILABLE_HANDLE)}, codes
        stored = [i for i, code in codes.items() if code == 0]
        assert len(stored) > 32, "eviction made room for more than one segment's worth"
        survivors = [i for i in stored if client.is_exist(f"ev-{i}") == 1]
        assert 0 < len(survivors) <= 32
        assert min(survivors) > min(stored), "the oldest objects went first"
        for i in survivors:
            assert client.get(f"ev-{i}") == random_bytes(SEED + i, MiB), f"key ev-{i}"
        evicted = [i for i in stored if i not in survivors]
        assert all(client.get(f"ev-{i}") == b"" for i in evicted[:5])
        g = c.gauges()
        assert g["allocated_bytes"] == len(survivors) * MiB <= g["total_capacity_bytes"]
        assert c.mc.check_invariants() == []
        assert client.counters()["put_failed"] == sum(1 for v in codes.values() if v)
        wait_until(lambda: c.mc.remove_all(force=True) >= 0 and c.gauges()["allocated_bytes"] == 0, 5,
                   what="store empty after remove_all")

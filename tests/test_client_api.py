"""Client API semantics and bad input, against an in-process master (Mooncake's codes, measured).

Reference: ``research/mooncake-measured.md`` §0. Every bad call must leave the store unchanged:
the tests compare key count, allocated bytes and an existing value before and after.
"""

from __future__ import annotations

import json
import socket
from typing import ClassVar

import numpy as np
import pytest
from client_helpers import SEED, MiB, addr_of, local_store, new_client, random_bytes
from master_helpers import in_process_server

from store.client import Client, MooncakeDistributedStore, ReplicateConfig
from store.errors import ErrorCode
from store.transfer.memory import MemoryRegion, address_of
from store.transfer.tcp import TcpTransport

INVALID_PARAMS = int(ErrorCode.INVALID_PARAMS)


def snapshot(server, client: Client, key: str) -> tuple[int, int, bytes]:
    g = server.service.gauges()
    return g["key_count"], g["allocated_bytes"], client.get(key)


@pytest.fixture()
def store():
    with local_store() as (server, client):
        yield server, client


def test_alias_and_context_manager() -> None:
    assert MooncakeDistributedStore is Client
    with in_process_server() as server:
        with Client() as c:
            assert c.setup("127.0.0.1", "P2PHANDSHAKE", 16 * MiB, 4 * MiB, "tcp", "", addr_of(server)) == 0
            assert c.health_check() == 0
            assert server.service.gauges()["segment_count"] == 1
            host, _, port = c.get_hostname().rpartition(":")
            assert host == "127.0.0.1" and int(port) > 0  # no port given → a free one
        assert c.health_check() == 1
        assert server.service.gauges()["segment_count"] == 0  # close() unmounted it


def test_round_trip_and_mooncake_semantics(store) -> None:
    server, c = store
    v1, v2 = random_bytes(SEED, 100_000), random_bytes(SEED + 1, 5000)
    assert c.put("k", v1) == 0
    assert c.remove("k") == 0, "put grants no lease: remove right after put succeeds"
    assert c.put("k", v1) == 0
    assert c.put("k", v2) == 0, "a second put of an existing key returns 0"
    assert c.get("k") == v1, "... and keeps the old value"
    assert c.remove("k") == int(ErrorCode.OBJECT_HAS_LEASE), "get granted the read lease"
    assert c.upsert("k", v2) == 0
    assert c.get("k") == v2, "upsert overwrites"
    assert c.get_size("k") == len(v2)
    assert c.is_exist("k") == 1 and c.is_exist("nope") == 0
    assert c.batch_is_exist(["k", "nope", ""]) == [1, 0, -1]
    assert c.get("nope") == b""
    assert c.last_op().code == int(ErrorCode.OBJECT_NOT_FOUND)
    assert c.get_size("nope") == int(ErrorCode.OBJECT_NOT_FOUND)
    assert c.remove("nope") == int(ErrorCode.OBJECT_NOT_FOUND)
    assert c.remove("k", force=True) == 0
    assert c.get("k") == b""
    assert server.service.gauges()["allocated_bytes"] == 0
    assert server.service.check_invariants() == []
    # the replica lives in this client's own segment: memcpy, not TCP
    local = c.engine.stats()["transports"]["local"]
    assert local.get("slices_ok", 0) > 0


def test_put_records_checksum_and_get_verifies(store) -> None:
    server, c = store
    v = random_bytes(SEED + 2, 70_000)
    assert c.put("ck", v) == 0
    import xxhash
    assert server.service.query_key("ck")["checksum"] == xxhash.xxh64_intdigest(v)
    assert c.get("ck") == v
    assert c.counters()["checksum_mismatches"] == 0


def test_registered_buffers_put_from_get_into(store) -> None:
    _server, c = store
    region = MemoryRegion(2 * MiB)
    try:
        assert c.register_buffer(region.addr, region.length) == 0
        src = region.numpy()
        src[: MiB] = np.frombuffer(random_bytes(SEED + 3, MiB), np.uint8)
        assert c.put_from("pf", region.addr, MiB) == 0
        assert c.get_into("pf", region.addr + MiB, MiB) == MiB
        assert bytes(src[MiB:]) == bytes(src[:MiB])
        keys = ["b0", "b1", "b2"]
        sizes = [1000, 2000, 3000]
        ptrs = [region.addr + i * 4096 for i in range(3)]
        assert c.batch_put_from(keys, ptrs, sizes) == [0, 0, 0]
        out = [region.addr + MiB + i * 4096 for i in range(3)]
        assert c.batch_get_into([*keys, "missing"], [*out, region.addr + MiB + 65536], [*sizes, 100]) == \
            [*sizes, int(ErrorCode.OBJECT_NOT_FOUND)]
        for i, n in enumerate(sizes):
            assert bytes(src[i * 4096:i * 4096 + n]) == bytes(src[MiB + i * 4096:MiB + i * 4096 + n])
        assert c.unregister_buffer(region.addr) == 0
        assert c.unregister_buffer(region.addr) == INVALID_PARAMS
        # unregistered now: refused before anything moves (Mooncake over RDMA: -800)
        assert c.put_from("pf2", region.addr, 100) == int(ErrorCode.TRANSFER_FAIL)
        assert c.get_into("pf", region.addr, MiB) == int(ErrorCode.TRANSFER_FAIL)
        assert c.is_exist("pf2") == 0
        del src
    finally:
        region.close()


def test_batch_bytes_forms(store) -> None:
    server, c = store
    keys = [f"pb{i}" for i in range(6)]
    values = [random_bytes(SEED + 10 + i, 1 + 9000 * i) for i in range(6)]
    assert c.put_batch(keys, values) == 0
    assert c.get_batch([*keys, "nope"]) == [*values, b""]
    assert c.put_batch(keys[:2], [b"other", b"values"]) == 0  # existing keys: kept
    assert c.get_batch(keys[:2]) == values[:2]
    assert c.upsert_batch(keys[:2], [b"other", b"values"]) == 0
    assert c.get_batch(keys[:2]) == [b"other", b"values"]
    assert c.put_batch(["pbx", ""], [b"a", b"b"]) == INVALID_PARAMS  # first error code
    assert c.get("pbx") == b"a"  # the valid key of a partly bad batch is stored
    assert c.remove_all(force=True) == 7
    assert server.service.gauges()["key_count"] == 0


def test_bad_input_codes_and_nothing_changes(store) -> None:
    server, c = store
    keep = random_bytes(SEED + 20, 3000)
    assert c.put("keep", keep) == 0
    before = snapshot(server, c, "keep")
    assert c.put("e", b"") == INVALID_PARAMS, "empty value"
    assert c.put("big", bytes(8 * MiB + 1)) == INVALID_PARAMS, "larger than local_buffer_size"
    assert c.put("", b"x") == INVALID_PARAMS, "empty key"
    assert c.put("k" * 4097, b"x") == int(ErrorCode.INVALID_KEY), "key over 4 KiB"
    assert c.put("s", "a str is not bytes") == INVALID_PARAMS
    assert c.put(None, b"x") == INVALID_PARAMS  # type: ignore[arg-type]
    assert c.put("rc", b"x", ReplicateConfig(replica_num=0)) == INVALID_PARAMS
    assert c.put("rc", b"x", {"replica_num": 1, "bogus": 2}) == INVALID_PARAMS
    assert c.get("") == b"" and c.get("k" * 5000) == b""
    assert c.is_exist("") == -1 and c.get_size("") == INVALID_PARAMS
    assert c.remove("") == INVALID_PARAMS
    assert c.register_buffer(0, 100) == INVALID_PARAMS
    assert c.register_buffer(12345, -1) == INVALID_PARAMS
    assert c.put_from("u", 0, 10) == INVALID_PARAMS
    arr = np.zeros(4096, np.uint8)
    assert c.put_from("u", address_of(arr), 4096) == int(ErrorCode.TRANSFER_FAIL), "unregistered buffer"
    assert c.get_into("keep", address_of(arr), 4096) == int(ErrorCode.TRANSFER_FAIL)
    region = MemoryRegion(4096)
    try:
        assert c.register_buffer(region.addr, 4096) == 0
        assert c.register_buffer(region.addr, 4096) == INVALID_PARAMS, "overlapping registration"
        assert c.get_into("keep", region.addr, 100) == INVALID_PARAMS, "buffer smaller than the value"
        assert c.get_into("keep", region.addr, 4096) == 3000
        assert c.batch_put_from(["a", "b"], [region.addr], [1]) == [INVALID_PARAMS] * 2
        c.unregister_buffer(region.addr)
    finally:
        region.close()
    assert c.put_batch(["a"], [b"1", b"2"]) == INVALID_PARAMS
    assert snapshot(server, c, "keep") == before
    assert server.service.check_invariants() == []


def test_value_larger_than_cluster() -> None:
    # A 6 MiB value fits the 8 MiB local buffer but not the 4 MiB cluster.
    with local_store(segment=4 * MiB, local_buffer=8 * MiB) as (small_server, small):
        before = small_server.service.gauges()
        assert small.put("huge", bytes(6 * MiB)) == int(ErrorCode.NO_AVAILABLE_HANDLE)
        after = small_server.service.gauges()
        for name in ("key_count", "allocated_bytes", "processing_key_count"):
            assert after[name] == before[name], name
        assert small.last_op().code == int(ErrorCode.NO_AVAILABLE_HANDLE)


def test_calls_before_setup() -> None:
    c = Client()
    assert c.put("k", b"v") == -1
    assert c.get("k") == b""
    assert c.get_batch(["a", "b"]) == [b"", b""]
    assert c.batch_put_from(["a"], [1], [1]) == [-1]
    assert c.is_exist("k") == -1
    assert c.health_check() == 1
    assert c.close() == 0


def test_setup_config_errors(tmp_path, monkeypatch) -> None:
    with in_process_server() as server:
        addr = addr_of(server)
        c = Client()
        monkeypatch.delenv("MOONCAKE_CONFIG_PATH", raising=False)
        assert c.setup() == INVALID_PARAMS, "no arguments and no MOONCAKE_CONFIG_PATH"
        assert c.setup("127.0.0.1", "P2PHANDSHAKE", 0, MiB, "udp", "", addr) == INVALID_PARAMS
        assert c.setup("127.0.0.1", "P2PHANDSHAKE", "lots", MiB, "tcp", "", addr) == INVALID_PARAMS
        assert c.setup("127.0.0.1", "P2PHANDSHAKE", -1, MiB, "tcp", "", addr) == INVALID_PARAMS
        assert c.setup("127.0.0.1", "P2PHANDSHAKE", 0, MiB, "tcp", "", "no-port") == INVALID_PARAMS
        assert c.setup("127.0.0.1", "P2PHANDSHAKE", 0, MiB, "rdma", "", addr) == INVALID_PARAMS, \
            "rdma without a device"
        assert c.setup({"local_hostname": "127.0.0.1", "master_server_address": addr, "bogus": 1}) == \
            INVALID_PARAMS
        assert c.setup("", "P2PHANDSHAKE", 0, MiB, "tcp", "", addr) == INVALID_PARAMS
        with socket.socket() as s:  # a port nobody listens on
            s.bind(("127.0.0.1", 0))
            dead = f"127.0.0.1:{s.getsockname()[1]}"
        assert c.setup("127.0.0.1", "P2PHANDSHAKE", 0, MiB, "tcp", "", dead) == int(ErrorCode.RPC_FAIL)
        assert c.health_check() == 1
        g = server.service.gauges()
        assert g["segment_count"] == 0 and g["active_clients"] == 0
        # the JSON file named by MOONCAKE_CONFIG_PATH, with "4mb"-style sizes
        path = tmp_path / "mooncake.json"
        path.write_text(json.dumps({"local_hostname": "127.0.0.1", "metadata_server": "P2PHANDSHAKE",
                                    "global_segment_size": "4mb", "local_buffer_size": "2mb",
                                    "protocol": "tcp", "device_name": "", "master_server_address": addr}))
        monkeypatch.setenv("MOONCAKE_CONFIG_PATH", str(path))
        assert c.setup() == 0
        assert c.segments()[0]["size"] == 4 * MiB
        assert c.local_buffer_report()["size"] == 2 * MiB
        assert c.setup() == int(ErrorCode.UNAVAILABLE_IN_CURRENT_STATUS), "second setup without close"
        assert c.put("cfg", b"v") == 0 and c.get("cfg") == b"v"
        c.close()
        # the dict form, with Mooncake's alternative key spellings
        d = Client()
        assert d.setup({"local_hostname": "127.0.0.1", "metadata_server": "P2PHANDSHAKE",
                        "global_segment_size": 0, "local_buffer_size": "1mb",
                        "master_server_addr": addr}) == 0
        assert d.segments() == [] and d.health_check() == 0
        d.close()


def test_health_check_reports_lost_master() -> None:
    with in_process_server() as server:
        c = new_client(addr_of(server))
        assert c.health_check() == 0
        server.stop()
        assert c.health_check() == 2
        c.close()


def test_large_segment_is_mounted_in_chunks() -> None:
    """``global_segment_size`` above ``max_mr_size`` becomes several segments, as in Mooncake."""
    with in_process_server() as server:
        c = Client(max_mr_size=4 * MiB)
        assert c.setup("127.0.0.1", "P2PHANDSHAKE", 10 * MiB, 2 * MiB, "tcp", "", addr_of(server)) == 0
        try:
            segs = c.segments()
            assert [s["size"] for s in segs] == [4 * MiB, 4 * MiB, 2 * MiB]
            assert len({s["id"] for s in segs}) == 3 and {s["name"] for s in segs} == {c.get_hostname()}
            assert server.service.gauges()["total_capacity_bytes"] == 10 * MiB
            values = {f"c{i}": random_bytes(SEED + 30 + i, MiB + i) for i in range(7)}
            for k, v in values.items():
                assert c.put(k, v) == 0
            assert {c.get(k) == v for k, v in values.items()} == {True}
            used = {r["segment_id"] for k in values for r in server.service.query_key(k)["replicas"]}
            assert len(used) >= 2, "objects spread over several chunks"
        finally:
            c.close()


def test_threads_share_one_client_and_one_value() -> None:
    """Four threads put the same large bytes object under their own keys at once (only one can
    borrow its memory; the others fall back to the staging copy) and read everything back."""
    import threading

    with local_store(segment=128 * MiB, local_buffer=64 * MiB) as (server, c):
        value = random_bytes(SEED + 40, 6 * MiB)
        errors: list[str] = []

        def work(t: int) -> None:
            for i in range(3):
                key = f"t{t}-{i}"
                if c.put(key, value) != 0:
                    errors.append(f"put {key}")
                elif c.get(key) != value:
                    errors.append(f"get {key}")

        threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert errors == []
        assert server.service.gauges()["key_count"] == 12
        assert c.local_buffer_report()["used"] == 0
        assert all(r["location"] != "cpu:borrowed" for r in c.engine.memory.snapshot())


def test_zero_copy_off_gives_the_same_bytes() -> None:
    with in_process_server() as server:
        c = Client(zero_copy=False)
        assert c.setup("127.0.0.1", "P2PHANDSHAKE", 32 * MiB, 16 * MiB, "tcp", "", addr_of(server)) == 0
        try:
            value = random_bytes(SEED + 41, 5 * MiB + 3)
            assert c.put("z", value) == 0 and c.get("z") == value
            assert c.counters()["zero_copy"] == 0
        finally:
            c.close()


class FakeRdma(TcpTransport):
    """Stands in for the RDMA transport on a host without RDMA: TCP underneath, records its options."""

    name = "rdma"
    seen: ClassVar[list[dict]] = []

    def __init__(self, engine=None, **options) -> None:
        FakeRdma.seen.append(options)
        super().__init__(engine)


def test_rdma_protocol_reaches_the_engine(monkeypatch) -> None:
    """``protocol="rdma", device_name="rxe0"`` selects the engine's ``rdma`` transport (through the
    transport registry, as the real one plugs in) with that device."""
    from store.transfer import transport as transport_mod

    FakeRdma.seen.clear()
    monkeypatch.setitem(transport_mod.TRANSPORTS, "rdma", f"{__name__}:FakeRdma")
    with in_process_server() as server:
        c = Client()
        rc = c.setup("127.0.0.1", "P2PHANDSHAKE", 16 * MiB, 16 * MiB, "rdma", "rxe0,rxe1", addr_of(server))
        assert rc == 0
        try:
            assert FakeRdma.seen == [{"device_name": "rxe0"}]
            assert c.engine.protocol == "rdma"
            value = random_bytes(SEED + 50, 5 * MiB)
            assert c.put("r", value) == 0 and c.get("r") == value
            # no memcpy shortcut and no borrowed memory with rdma (Mooncake: "memcpy disabled")
            assert c.engine.stats()["transports"].get("local", {}).get("bytes", 0) == 0
            assert c.counters()["zero_copy"] == 0
            assert server.service.inspect_segments()[0]["protocol"] == "rdma"
        finally:
            c.close()


def test_rdma_without_a_device_fails_cleanly() -> None:
    with in_process_server() as server:
        c = Client()
        rc = c.setup("127.0.0.1", "P2PHANDSHAKE", 16 * MiB, MiB, "rdma", "no_such_dev0", addr_of(server))
        assert rc < 0
        g = server.service.gauges()
        assert g["segment_count"] == 0
        assert c.health_check() == 1


def test_master_records_the_checksum_over_rpc() -> None:
    """The master-side addition the client relies on: PutEnd / BatchPutEnd take the value's XXH64
    and GetReplicaList hands it back; bad checksums are refused and change nothing."""
    from store.errors import StoreError
    from store.master.client import MasterClient
    from store.master.types import Segment

    with in_process_server() as server, MasterClient(addr_of(server)) as mc:
        mc.mount_segment(Segment(id="s", name="127.0.0.1:1", base=1 << 30, size=64 * MiB,
                                 te_endpoint="127.0.0.1:2"), "c")
        mc.put_start("c", "a", 100)
        for bad in (-1, "12", 1.5):  # (2**64 cannot even be packed)
            with pytest.raises(StoreError) as err:
                mc.put_end("c", "a", checksum=bad)  # type: ignore[arg-type]
            assert err.value.code is ErrorCode.INVALID_PARAMS
        assert server.service.query_key("a")["state"] == "PROCESSING"
        mc.put_end("c", "a", checksum=(1 << 64) - 1)
        assert mc.get_replica_list("a").checksum == (1 << 64) - 1
        mc.batch_put_start("c", ["b", "d"], [10, 20])
        with pytest.raises(StoreError):
            mc.batch_put_end("c", ["b", "d"], checksums=[1])
        items = mc.batch_put_end("c", ["b", "d"], checksums=[7, None])
        assert [i.ok for i in items] == [True, True]
        lists = mc.batch_get_replica_list(["b", "d"])
        assert [x.value.checksum for x in lists] == [7, None]

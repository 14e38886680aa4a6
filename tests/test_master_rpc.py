"""The RPC server (in-process, real sockets): stub round trips, bad frames, deadlines, failpoints,
HTTP endpoints, concurrent clients."""

import json
import socket
import struct
import threading
import time
import urllib.error
import urllib.request

import msgpack
import pytest
from master_helpers import MiB, in_process_server, segment

from store import failpoints
from store.errors import ErrorCode, StoreError
from store.master.client import Heartbeat, MasterClient
from store.master.types import ClientStatus, ReplicaStatus, ReplicateConfig


@pytest.fixture(autouse=True)
def _no_failpoints():
    failpoints.disarm_all()
    yield
    failpoints.disarm_all()


@pytest.fixture(scope="module")
def server():
    with in_process_server(max_frame_bytes=1 * MiB, frame_timeout=2.0) as srv:
        yield srv


@pytest.fixture
def mc(server):
    with MasterClient(server.rpc_address, timeout=5.0) as client:
        yield client


@pytest.fixture
def fresh():
    """A server of its own, for tests that look at whole-store state."""
    with in_process_server() as srv, MasterClient(srv.rpc_address) as client:
        client.mount_segment(segment(0), "c0")
        client.mount_segment(segment(1), "c1")
        yield srv, client


def code_of_call(fn, *a, **kw) -> ErrorCode:
    with pytest.raises(StoreError) as ei:
        fn(*a, **kw)
    return ei.value.code


def frame(obj) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


def read_reply(sock: socket.socket):
    sock.settimeout(5)
    buf = b""
    while len(buf) < 4:
        chunk = sock.recv(4 - len(buf))
        if not chunk:
            return None
        buf += chunk
    (n,) = struct.unpack(">I", buf)
    body = b""
    while len(body) < n:
        chunk = sock.recv(n - len(body))
        assert chunk, "connection closed mid-reply"
        body += chunk
    return msgpack.unpackb(body, raw=False)


def is_closed(sock: socket.socket) -> bool:
    sock.settimeout(5)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def raw(server) -> socket.socket:
    return socket.create_connection(server.rpc_address, timeout=5)


# ---------------------------------------------------------------- round trips


def test_full_put_get_remove_cycle_over_rpc(fresh):
    _srv, mc = fresh
    descs = mc.put_start("c0", "k", 3000, ReplicateConfig(replica_num=2))
    assert len(descs) == 2 and all(d.status is ReplicaStatus.PROCESSING for d in descs)
    seg0 = segment(0)
    d0 = next(d for d in descs if d.segment_id == seg0.id)
    assert (d0.segment_name, d0.te_endpoint, d0.protocol, d0.transport) == (
        seg0.name, seg0.te_endpoint, "tcp", seg0.transport)
    assert seg0.base <= d0.address < seg0.base + seg0.size and d0.length == 3000
    mc.put_end("c0", "k")
    rl = mc.get_replica_list("k")
    assert rl.size == 3000 and rl.lease_ttl_ms == 10_000 and rl.lease_granted
    assert {r.address for r in rl.replicas} == {d.address for d in descs}
    assert mc.exist_key("k") and not mc.exist_key("nope")
    assert code_of_call(mc.remove, "k") == ErrorCode.OBJECT_HAS_LEASE
    mc.remove("k", force=True)
    assert code_of_call(mc.get_replica_list, "k") == ErrorCode.OBJECT_NOT_FOUND
    assert mc.check_invariants() == []
    counters = mc.inspect("counters")
    assert counters["put_start_requests"] == 1 and counters["remove_failures"] == 1


def test_batches_ping_remount_unmount_over_rpc(fresh):
    _srv, mc = fresh
    items = mc.batch_put_start("c0", ["a", "b", "a"], [10, 20, 30])
    assert [i.code for i in items] == [ErrorCode.OK, ErrorCode.OK, ErrorCode.OBJECT_ALREADY_EXISTS]
    assert items[1].value[0].length == 20
    assert all(i.ok for i in mc.batch_put_end("c0", ["a", "b"]))
    got = mc.batch_get_replica_list(["a", "zz"])
    assert got[0].value.key == "a" and got[1].code == ErrorCode.OBJECT_NOT_FOUND
    assert [i.value for i in mc.batch_exist_key(["a", "zz"])] == [True, False]
    assert mc.batch_put_revoke("c0", ["a"])[0].code == ErrorCode.INVALID_WRITE
    assert mc.ping("c0").status is ClientStatus.OK
    assert mc.ping("new").status is ClientStatus.NEED_REMOUNT
    mc.remount_segment([segment(2)], "new")
    assert mc.ping("new").status is ClientStatus.OK
    assert len(mc.inspect("segments")) == 3
    mc.unmount_segment("seg-2", "new")
    assert code_of_call(mc.unmount_segment, "seg-2", "new") == ErrorCode.SEGMENT_NOT_FOUND
    assert mc.remove_all(force=True) == 2
    assert mc.service_ready() is True
    assert mc.query_key("a") is None


def test_heartbeat_remounts_after_need_remount(fresh):
    srv, mc = fresh
    remounts = []
    hb = Heartbeat(mc, "hb", interval=0.05,
                   on_need_remount=lambda: remounts.append(mc.remount_segment([segment(5)], "hb")))
    first = hb.beat()
    assert first.status is ClientStatus.NEED_REMOUNT and hb.remounts == 1 and remounts
    assert hb.beat().status is ClientStatus.OK
    hb.start()
    time.sleep(0.3)
    hb.stop()
    assert hb.pings >= 3 and hb.failures == 0 and hb.view_version == srv.service.view_version


# ---------------------------------------------------------------- bad input


def _state(srv):
    snap = srv.service.snapshot()
    return snap["objects"], [(s["id"], s["allocated_bytes"]) for s in snap["segments"]], snap["clients"]


def test_bad_frames_get_an_error_and_a_closed_connection(server):
    before = _state(server)
    cases = [
        (struct.pack(">I", 2 * MiB), ErrorCode.BUFFER_OVERFLOW),  # larger than the 1 MiB cap
        (struct.pack(">I", 3) + b"\xc1\xc1\xc1", ErrorCode.INVALID_PARAMS),  # not msgpack
        (frame([1, "Ping"]), ErrorCode.INVALID_PARAMS),  # wrong shape
        (frame({"id": 1}), ErrorCode.INVALID_PARAMS),
        (frame([-1, "Ping", {}]), ErrorCode.INVALID_PARAMS),
        (frame([1, 5, {}]), ErrorCode.INVALID_PARAMS),
        (frame([1, "Ping", []]), ErrorCode.INVALID_PARAMS),
        (struct.pack(">I", 0), ErrorCode.INVALID_PARAMS),
        (frame([1, "Ping", {}]) + b"\x00\x00", None),  # a good frame, then a cut header
    ]
    for data, expected in cases:
        with raw(server) as s:
            s.sendall(data)
            if expected is None:
                assert read_reply(s)[1] == ErrorCode.INVALID_PARAMS  # Ping without client_id
                s.shutdown(socket.SHUT_WR)
                assert read_reply(s)[1:2] == [ErrorCode.INVALID_PARAMS]
                assert is_closed(s)
                continue
            reply = read_reply(s)
            assert reply[0] == 0 and reply[1] == expected, (data[:16], reply)
            assert is_closed(s)
    assert _state(server) == before
    assert server.frame_errors >= len(cases)


def test_truncated_frame_body(server):
    with raw(server) as s:
        s.sendall(struct.pack(">I", 100) + b"\x93\x01")
        s.shutdown(socket.SHUT_WR)
        reply = read_reply(s)
        assert reply[1] == ErrorCode.INVALID_PARAMS and "truncated" in reply[3]
        assert is_closed(s)


def test_stalled_frame_body_times_out(server):
    with raw(server) as s:
        s.sendall(struct.pack(">I", 100) + b"\x93")
        reply = read_reply(s)  # the server gives up after frame_timeout (2 s here)
        assert reply[1] == ErrorCode.RPC_TIMEOUT
        assert is_closed(s)


def test_call_errors_keep_the_connection_open(server):
    before = _state(server)
    calls = [
        ([1, "NoSuchMethod", {}], ErrorCode.NOT_SUPPORTED),
        ([2, "PutStart", {"client_id": "c"}], ErrorCode.INVALID_PARAMS),  # missing params
        ([3, "Ping", {"client_id": "c", "extra": 1}], ErrorCode.INVALID_PARAMS),
        ([4, "PutStart", {"client_id": "c", "key": "k" * 5000, "length": 10}], ErrorCode.INVALID_KEY),
        ([5, "PutStart", {"client_id": "c", "key": "k", "length": -10}], ErrorCode.INVALID_PARAMS),
        ([6, "PutStart", {"client_id": "c", "key": "k", "length": 10, "config": {"replica_num": -1}}],
         ErrorCode.INVALID_PARAMS),
        ([7, "PutStart", {"client_id": "c", "key": "k", "length": 2**64 - 1}], ErrorCode.NO_AVAILABLE_HANDLE),
        ([8, "UnmountSegment", {"segment_id": "no-such-seg", "client_id": "c"}], ErrorCode.SEGMENT_NOT_FOUND),
        ([9, "MountSegment", {"segment": {"id": "x"}, "client_id": "c"}], ErrorCode.INVALID_PARAMS),
        ([10, "GetReplicaList", {"key": ["not", "a", "string"]}], ErrorCode.INVALID_PARAMS),
        ([11, "BatchPutStart", {"client_id": "c", "keys": "ab", "lengths": [1]}], ErrorCode.INVALID_PARAMS),
        ([12, "Inspect", {"what": "nonsense"}], ErrorCode.INVALID_PARAMS),
        ([13, "ArmFailpoints", {"spec": "not a spec"}], ErrorCode.INVALID_PARAMS),
        ([14, "Remove", {"key": "k", "force": "yes"}], ErrorCode.INVALID_PARAMS),
        ([15, "Ping", {"client_id": "c"}], ErrorCode.OK),
    ]
    with raw(server) as s:
        for req, expected in calls:
            s.sendall(frame(req))
            reply = read_reply(s)
            assert reply[0] == req[0] and reply[1] == expected, (req, reply)
            if expected != ErrorCode.OK:
                assert reply[2] is None and reply[3]
    after = _state(server)
    assert after[0] == before[0] and after[1] == before[1]


def test_server_keeps_serving_others_while_one_connection_misbehaves(server, mc):
    bad = raw(server)
    bad.sendall(struct.pack(">I", 50))  # header only: this connection waits for its body
    try:
        for _ in range(20):
            assert mc.ping("other").status is ClientStatus.NEED_REMOUNT
    finally:
        bad.close()
    with raw(server) as s:
        s.sendall(b"\xff" * 8)  # a huge length: rejected at once
        assert read_reply(s)[1] == ErrorCode.BUFFER_OVERFLOW
    assert mc.service_ready()


def test_admin_rpcs_validate_params(mc):
    assert code_of_call(mc.call, "Events", since=-1) == ErrorCode.INVALID_PARAMS
    assert code_of_call(mc.call, "Inspect", keys="k") == ErrorCode.INVALID_PARAMS
    assert code_of_call(mc.call, "DisarmFailpoints", names="x") == ErrorCode.INVALID_PARAMS
    assert code_of_call(mc.call, "ArmFailpoints", spec="x.y=call") == ErrorCode.INVALID_PARAMS


# ---------------------------------------------------------------- deadlines and failpoints


def test_deadline_gives_rpc_timeout_and_others_carry_on(fresh):
    srv, mc = fresh
    mc.put_start("c0", "k", 10)
    mc.put_end("c0", "k")
    mc.arm_failpoints("master.get_replica_list=sleep(1.0)*1")
    t0 = time.monotonic()
    assert code_of_call(mc.get_replica_list, "k", timeout=0.2) == ErrorCode.RPC_TIMEOUT
    assert time.monotonic() - t0 < 1.0
    other = MasterClient(srv.rpc_address)
    try:
        assert other.ping("c0").status is ClientStatus.OK  # served while the first call sleeps
    finally:
        other.close()
    assert mc.get_replica_list("k").size == 10  # the stub reconnected; no stale reply
    assert code_of_call(MasterClient(("127.0.0.1", 1), timeout=0.5).ping, "x") == ErrorCode.RPC_FAIL


def test_pause_holds_one_call_and_admin_rpcs_still_answer(fresh):
    _srv, mc = fresh
    mc.put_start("c0", "k", 10)
    mc.arm_failpoints("master.put_end=pause(10)")
    done = threading.Event()
    errors = []

    def writer():
        try:
            mc.put_end("c0", "k", timeout=10)
        except StoreError as exc:
            errors.append(exc)
        done.set()

    t = threading.Thread(target=writer)
    t.start()
    deadline = time.monotonic() + 5
    while not any(f["hits"] for f in mc.list_failpoints()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not done.is_set()
    assert mc.inspect("objects", keys=["k"])[0]["state"] == "PROCESSING"
    assert mc.ping("c0").status is ClientStatus.OK
    mc.release_failpoint("master.put_end")
    assert done.wait(5) and not errors
    t.join(5)
    mc.disarm_failpoints(["master.put_end"])
    assert mc.inspect("objects", keys=["k"])[0]["state"] == "COMPLETE"
    assert any(h[1] == "master.put_end" for h in mc.failpoint_history())


def test_dropped_reply_means_applied_but_unknown(fresh):
    _srv, mc = fresh
    mc.arm_failpoints("master.rpc.send=error(-1)*1")
    assert code_of_call(mc.put_start, "c0", "k", 10) == ErrorCode.RPC_FAIL
    assert mc.query_key("k")["state"] == "PROCESSING"  # it happened
    assert code_of_call(mc.put_start, "c0", "k", 10) == ErrorCode.OBJECT_ALREADY_EXISTS


def test_recv_failpoint_rejects_before_anything_runs(fresh):
    _srv, mc = fresh
    mc.arm_failpoints("master.rpc.recv=error(-900)*1")
    assert code_of_call(mc.put_start, "c0", "k", 10) == ErrorCode.RPC_FAIL
    assert mc.query_key("k") is None
    mc.put_start("c0", "k", 10)


def test_trigger_eviction_rpc(fresh):
    _srv, mc = fresh
    for i in range(4):
        mc.put_start("c0", f"k{i}", MiB)
        mc.put_end("c0", f"k{i}")
    rep = mc.trigger_eviction()
    assert len(rep["evicted_keys"]) == 1  # ceil(4 * 0.05)
    ev = mc.events(0)
    assert any(e["kind"] == "evict" and e["key"] == rep["evicted_keys"][0] for e in ev["events"])


# ---------------------------------------------------------------- concurrency


def test_eight_concurrent_clients(fresh):
    srv, mc = fresh
    errors = []

    def worker(n):
        try:
            with MasterClient(srv.rpc_address) as c:
                for i in range(40):
                    key = f"w{n}-{i}"
                    c.put_start(f"c{n % 2}", key, 1000 + n)
                    c.put_end(f"c{n % 2}", key)
                    assert c.get_replica_list(key).size == 1000 + n
                    c.remove(key, force=True)
        except (StoreError, AssertionError) as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert mc.inspect("gauges")["key_count"] == 0 and mc.inspect("gauges")["allocated_bytes"] == 0
    assert mc.inspect("counters")["put_start_requests"] == 320
    assert mc.check_invariants() == []


def test_one_stub_shared_by_threads(fresh):
    _srv, mc = fresh
    results = []

    def worker(n):
        for i in range(30):
            mc.put_start("c0", f"s{n}-{i}", 10)
        results.append(n)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(results) == [0, 1, 2, 3]
    assert mc.inspect("gauges")["processing_key_count"] == 120


# ---------------------------------------------------------------- HTTP


def http_get(srv, path):
    host, port = srv.metrics_address
    try:
        with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_metrics_endpoint_values(fresh):
    srv, mc = fresh
    mc.put_start("c0", "k", 5000, ReplicateConfig(replica_num=2))
    mc.put_end("c0", "k")
    code_of_call(mc.get_replica_list, "missing")
    status, text = http_get(srv, "/metrics")
    assert status == 200
    assert metric(text, "master_key_count") == 1
    assert metric(text, "master_allocated_bytes") == 10000
    assert metric(text, "master_total_capacity_bytes") == 128 * MiB
    assert metric(text, "master_active_clients") == 2
    assert metric(text, "master_put_start_requests_total") == 1
    assert metric(text, "master_get_replica_list_failures_total") == 1
    assert metric(text, "master_mount_segment_requests_total") == 2
    assert metric(text, "master_successful_evictions_total") == 0
    assert metric(text, "master_gc_removals_total") == 0
    assert 'master_value_size_bytes_bucket{le="65536.0"} 1.0' in text or \
        'master_value_size_bytes_bucket{le="65536"} 1.0' in text
    assert 'segment_allocated_bytes{segment="127.0.0.1:20000",segment_id="seg-0"} 5000.0' in text


def test_query_key_over_http_grants_no_lease(fresh):
    srv, mc = fresh
    mc.put_start("c0", "k", 10)
    mc.put_end("c0", "k")
    status, body = http_get(srv, "/query_key?key=k")
    info = json.loads(body)
    assert status == 200 and info["key"] == "k" and info["replicas"][0]["length"] == 10
    assert info["leased"] is False
    mc.remove("k")  # Mooncake's /query_key would have leased it: OBJECT_HAS_LEASE here
    status, body = http_get(srv, "/query_key?key=k")
    assert status == 404 and json.loads(body)["error_code"] == -704
    assert http_get(srv, "/query_key")[0] == 400


def test_health_segments_keys_summary(fresh):
    srv, mc = fresh
    mc.put_start("c0", "k", 10)
    status, body = http_get(srv, "/health")
    assert status == 200 and json.loads(body)["status"] == "ok"
    assert http_get(srv, "/get_all_segments")[1].split() == ["127.0.0.1:20000", "127.0.0.1:20001"]
    detail = json.loads(http_get(srv, "/get_segments_detail")[1])
    assert {d["id"] for d in detail} == {"seg-0", "seg-1"}
    assert json.loads(http_get(srv, "/query_segment?segment=seg-1")[1])[0]["name"] == "127.0.0.1:20001"
    assert http_get(srv, "/query_segment?segment=nope")[0] == 404
    assert http_get(srv, "/get_all_keys")[1].split() == ["k"]
    assert "Keys: 1" in http_get(srv, "/metrics/summary")[1]
    snap = json.loads(http_get(srv, "/inspect")[1])
    assert snap["gauges"]["key_count"] == 1
    assert http_get(srv, "/nope")[0] == 404


def test_opaque_transport_dict_round_trips_including_bytes(fresh):
    srv, mc = fresh
    transport = {"rkey": 0x1234, "gid": bytes(range(16)), "devices": [{"name": "rxe0", "lid": 0}]}
    seg = segment(9, transport=transport)
    mc.mount_segment(seg, "c9")
    descs = mc.put_start("c9", "k", 10, ReplicateConfig(preferred_segments=(seg.name,)))
    assert descs[0].transport == transport
    mc.put_end("c9", "k")
    assert mc.get_replica_list("k").replicas[0].transport == transport
    status, body = http_get(srv, "/query_key?key=k")
    assert status == 200 and json.loads(body)["replicas"][0]["transport"]["gid"] == bytes(range(16)).hex()


def test_unencodable_parameters_are_invalid_params_and_the_link_survives(fresh):
    _srv, client = fresh
    client.put_start("c0", "big-sum", 4096)
    # a checksum of 2**64 cannot be encoded as msgpack uint64: refused before anything is sent
    assert code_of_call(client.put_end, "c0", "big-sum", checksum=2**64) is ErrorCode.INVALID_PARAMS
    client.put_end("c0", "big-sum", checksum=7)
    assert client.get_replica_list("big-sum").checksum == 7


def test_announcement_round_trip_and_rejects_other_lines():
    from store.master.server import Announcement

    ann = Announcement(("127.0.0.1", 50051), ("127.0.0.1", 9003), 42)
    assert Announcement.parse(ann.line() + "\n") == ann
    for bad in ("", "hello world", "umbra master listening rpc=127.0.0.1:x metrics=h:1 seed=1"):
        with pytest.raises(ValueError):
            Announcement.parse(bad)

"""Put/get over RDMA through the transfer engine, across processes, with verification.

The segment owner is ``store.transfer.peer --protocol rdma`` in a child process; this process
registers a local buffer and writes into / reads from the peer's segment: sizes 0 B … 16 MiB,
batches of mixed sizes, and one object written to two replicas (the peer and a second engine).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from rdma_helpers import WAIT_S, PeerProcess, Side, digest, pattern

from store.transfer.engine import TransferRequest
from store.transfer.peer import fill_bytes
from store.transfer.rdma.transport import RdmaTransport
from store.transfer.transport import Opcode

pytestmark = [pytest.mark.rdma, pytest.mark.timeout(600)]

SIZES = [0, 1, 4095, 65536, 65536 + 16384, 65536 + 16385, 1 << 20, (16 << 20) - 16, 16 << 20]


@pytest.fixture(scope="module")
def peer(rdma_target):
    p = PeerProcess(rdma_target, segment_size="40mb")
    yield p
    p.close()


@pytest.fixture(scope="module")
def local(rdma_target):
    s = Side(rdma_target, 40 << 20)
    yield s
    s.close()


def test_write_then_read_every_size_across_processes(peer, local):
    eng = local.engine
    seg = eng.open_segment(peer.segment)
    assert seg.protocol == "rdma" and seg.devices[0]["name"] == local.transport.device
    assert seg.buffers[0].rkey != 0
    for i, n in enumerate(SIZES):
        data = pattern(i, n)
        local.mem[:n] = data
        remote_off = 4096 * (i + 1)
        assert eng.transfer_sync(Opcode.WRITE, local.region.addr, seg.name, peer.addr + remote_off, n,
                                 timeout=WAIT_S) == n
        got = peer.call(eng, "digest", {"offset": remote_off, "length": n}).decode()
        assert got == digest(data), f"WRITE of {n} B did not land intact"
        # now the other direction: the peer fills, we read
        want = peer.call(eng, "fill", {"offset": remote_off, "length": n, "seed": 1000 + i}).decode()
        local.mem[:n] = 0
        assert eng.transfer_sync(Opcode.READ, local.region.addr, seg.name, peer.addr + remote_off, n,
                                 timeout=WAIT_S) == n
        assert digest(local.mem[:n]) == want
        assert np.array_equal(local.mem[:n], fill_bytes(1000 + i, n))
    t = local.transport
    ep = t.endpoint(peer.endpoint)
    assert ep is not None and ep.connections == 1 and ep.faults == 0 and ep.retries == 0
    assert t.metrics.value("umbra_rdma_handshakes", device=t.device, role="active", result="ok") == 1


def test_batches_of_mixed_sizes(peer, local):
    eng = local.engine
    seg = eng.open_segment(peer.segment)
    sizes = [17, 4096, 65536, 100_000, 1 << 20, 3 << 20, 123_457, 0]
    offs = np.cumsum([0, *sizes[:-1]]).tolist()
    blob = pattern(77, sum(sizes))
    local.mem[:len(blob)] = blob
    base = 8 << 20
    batch = eng.allocate_batch(len(sizes))
    eng.submit(batch, [TransferRequest(Opcode.WRITE, local.region.addr + o, seg.name, peer.addr + base + o, n)
                       for o, n in zip(offs, sizes, strict=True)])
    results = eng.wait(batch, WAIT_S)
    eng.free_batch(batch)
    assert [r.ok for r in results] == [True] * len(sizes), [r.error for r in results if not r.ok]
    assert sum(r.transferred_bytes for r in results) == sum(sizes)
    assert peer.call(eng, "digest", {"offset": base, "length": len(blob)}).decode() == digest(blob)
    # read it all back in one batch into another place
    dst = 16 << 20
    local.mem[dst:dst + len(blob)] = 0
    batch = eng.allocate_batch(len(sizes))
    eng.submit(batch, [TransferRequest(Opcode.READ, local.region.addr + dst + o, seg.name,
                                       peer.addr + base + o, n) for o, n in zip(offs, sizes, strict=True)])
    results = eng.wait(batch, WAIT_S)
    eng.free_batch(batch)
    assert all(r.ok for r in results)
    assert np.array_equal(local.mem[dst:dst + len(blob)], blob)


def test_one_object_to_two_replicas(rdma_target, peer, local):
    """The same bytes to the peer process and to a second engine, in one batch."""
    other = Side(rdma_target, 4 << 20)
    try:
        eng = local.engine
        seg1 = eng.open_segment(peer.segment)
        seg2 = eng.open_segment(other.engine.segment_name)
        n = (2 << 20) + 12345
        data = pattern(5, n)
        local.mem[:n] = data
        batch = eng.allocate_batch(2)
        addr = local.region.addr
        eng.submit(batch, [TransferRequest(Opcode.WRITE, addr, seg1.name, peer.addr + (20 << 20), n),
                           TransferRequest(Opcode.WRITE, addr, seg2.name, other.region.addr + 7, n)])
        results = eng.wait(batch, WAIT_S)
        eng.free_batch(batch)
        assert all(r.ok for r in results), [r.error for r in results]
        assert peer.call(eng, "digest", {"offset": 20 << 20, "length": n}).decode() == digest(data)
        assert np.array_equal(other.mem[7:7 + n], data)
        # two endpoints now, one per peer server
        peers = sorted(ep.peer_server for ep in local.transport.endpoints())
        assert peers == sorted([peer.endpoint, other.engine.endpoint])
    finally:
        other.close()


def test_the_owner_answers_with_passive_qps_and_frees_them_on_close(rdma_target, peer, local):
    """Each active endpoint has answering QPs on the owner; closing the poster frees them there."""

    def passive_count() -> int:
        return int(json.loads(peer.call(local.engine, "stats"))["transports"]["rdma"]["passive_endpoints"])

    before = passive_count()
    side = Side(rdma_target, 1 << 20)
    try:
        seg = side.engine.open_segment(peer.segment)
        side.mem[:4096] = pattern(9, 4096)
        side.engine.transfer_sync(Opcode.WRITE, side.region.addr, seg.name, peer.addr, 4096, timeout=WAIT_S)
        ep = side.transport.endpoint(peer.endpoint)
        assert ep is not None and len(ep.qps) == side.transport.config.num_qp_per_ep
        assert all(q.peer_qp_num for q in ep.qps)
        assert passive_count() == before + 1
    finally:
        side.close()
    assert passive_count() == before


def test_dead_peer_ends_in_an_error_not_a_hang(rdma_target):
    """Kill the owner process: the next write fails (handshake refused or retry exceeded),
    the path is paused after repeated failures, nothing hangs."""
    p = PeerProcess(rdma_target, segment_size="4mb")
    side = Side(rdma_target, 4 << 20, pause_after_failures=3, pause_seconds=60.0)
    try:
        seg = side.engine.open_segment(p.segment)
        side.mem[:65536] = pattern(3, 65536)
        side.engine.transfer_sync(Opcode.WRITE, side.region.addr, seg.name, p.addr, 65536, timeout=WAIT_S)
        p.kill()
        with pytest.raises(Exception) as info:
            side.engine.transfer_sync(Opcode.WRITE, side.region.addr, seg.name, p.addr, 65536, timeout=WAIT_S)
        assert "not done within" not in str(info.value)
        t: RdmaTransport = side.transport
        ep = t.endpoint(p.endpoint)
        assert ep is not None
        text = str(info.value)
        assert ("transport retry counter exceeded" in text or "handshake" in text or "paused" in text), text
        assert ep.faults + ep.handshake_failures >= 1
    finally:
        side.close()
        p.close()

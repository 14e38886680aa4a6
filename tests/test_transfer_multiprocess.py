"""TCP transport between two processes: a peer process holds the registered segment
(``store.transfer.peer``), this process writes and reads it through a TransferEngine."""

import os
import time

import numpy as np
import pytest

from store.errors import ErrorCode
from store.transfer.engine import Opcode, TransferEngine, TransferRequest
from store.transfer.memory import MemoryRegion
from store.transfer.peer import PeerProcess, digest, fill_bytes
from store.transfer.transport import TransferStatus

MiB = 1 << 20
SEG = 40 * MiB
SEED = int(os.environ.get("UMBRA_TEST_SEED", "7031"))


def wait_until(cond, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


class Client:
    def __init__(self, peer, **kw):
        self.region = MemoryRegion(SEG)
        self.engine = TransferEngine("127.0.0.1", **kw)
        self.engine.register_memory(self.region.addr, self.region.length)
        self.peer = peer
        self.seg = self.engine.open_segment(peer.endpoint).name

    def run(self, *reqs, timeout=60):
        batch = self.engine.allocate_batch(len(reqs))
        self.engine.submit(batch, list(reqs))
        res = self.engine.wait(batch, timeout)
        self.engine.free_batch(batch, wait_s=timeout)
        return res

    def frames_on_wire(self):
        return sum(c.frames_in_flight for c in self.engine.connections().get(self.peer.endpoint, []))

    def close(self):
        self.engine.close()
        self.region.close()


@pytest.fixture(scope="module")
def peer():
    p = PeerProcess(segment_size=SEG)
    yield p
    assert p.close() == 0


@pytest.fixture
def client(peer):
    c = Client(peer)
    yield c
    c.close()


@pytest.fixture
def rng():
    print(f"seed={SEED} (set UMBRA_TEST_SEED to replay)")
    return np.random.default_rng(SEED)


def test_peer_segment_is_discovered_by_name(peer, client):
    seg = client.engine.open_segment(peer.endpoint)
    assert seg.pid == peer.pid != os.getpid()
    assert [(b.addr, b.length) for b in seg.buffers] == [(peer.addr, SEG)]


@pytest.mark.parametrize("size", [0, 1, 4097, 65536 + 16385, MiB + 1, 16 * MiB + 4099])
def test_read_and_write_across_processes(peer, client, rng, size):
    seed = int(rng.integers(1 << 31))
    peer.control("fill", offset=0, length=SEG, seed=seed)
    expected = fill_bytes(seed, SEG)
    lo, ro = 11, 333  # unaligned on both sides
    (r,) = client.run(TransferRequest(Opcode.READ, client.region.addr + lo, client.seg, peer.addr + ro, size))
    assert (r.status, r.transferred_bytes) == (TransferStatus.COMPLETED, size), r.error
    local = client.region.numpy()
    assert np.array_equal(local[lo:lo + size], expected[ro:ro + size])
    data = rng.integers(0, 256, size, dtype=np.uint8)
    local[lo:lo + size] = data
    wo = 20 * MiB + 1
    (w,) = client.run(TransferRequest(Opcode.WRITE, client.region.addr + lo, client.seg, peer.addr + wo,
                                      size))
    assert (w.status, w.transferred_bytes) == (TransferStatus.COMPLETED, size), w.error
    # the ACK came after the peer applied it: its bytes are there now, and nothing around them changed
    assert peer.digest(wo, size) == digest(data)
    assert peer.digest(0, wo) == digest(expected[:wo])
    assert peer.digest(wo + size) == digest(expected[wo + size:])


def test_out_of_range_refused_by_the_peer_which_keeps_serving(peer, rng):
    c = Client(peer, validate_remote=False)  # let the bad addresses reach the peer
    try:
        peer.control("fill", offset=0, length=SEG, seed=1)
        before = peer.digest()
        c.region.numpy()[:MiB] = rng.integers(0, 256, MiB, dtype=np.uint8)
        straddle = TransferRequest(Opcode.WRITE, c.region.addr, c.seg, peer.addr + SEG - 100, 4096)
        below = TransferRequest(Opcode.WRITE, c.region.addr, c.seg, peer.addr - 4096, 8192)
        far = TransferRequest(Opcode.READ, c.region.addr, c.seg, 4096, 100)
        res = c.run(straddle, below, far)
        assert [x.status for x in res] == [TransferStatus.FAILED] * 3
        assert all(x.code == ErrorCode.INVALID_PARAMS and x.retries == 0 for x in res)
        assert "not inside one remotely accessible registered buffer" in res[0].error
        assert peer.digest() == before  # the peer's memory is untouched
        (ok,) = c.run(TransferRequest(Opcode.WRITE, c.region.addr, c.seg, peer.addr + SEG - MiB, MiB))
        assert ok.status is TransferStatus.COMPLETED
        assert peer.digest(SEG - MiB, MiB) == digest(c.region.numpy()[:MiB])
        stats = c.engine.stats()["transports"]["tcp"]
        assert stats.get("connections_lost", 0) == 0 and stats["frames_refused"] == 3
    finally:
        c.close()


def test_connection_drop_mid_transfer_is_retried_on_a_new_connection(rng):
    # the peer stalls 1 s on its first apply, long enough to cut the connection under it
    with PeerProcess(segment_size=8 * MiB, env={"UMBRA_FAILPOINTS": "tcp.server_apply=sleep(1.0)*1"}) as peer:
        c = Client(peer)
        try:
            data = rng.integers(0, 256, 2 * MiB, dtype=np.uint8)
            c.region.numpy()[:2 * MiB] = data
            batch = c.engine.allocate_batch(1)
            c.engine.submit(batch, [TransferRequest(Opcode.WRITE, c.region.addr, c.seg, peer.addr, 2 * MiB)])
            wait_until(lambda: c.frames_on_wire() >= 1, what="the write to be on the wire")
            first = {x.id for x in c.engine.connections()[peer.endpoint]}
            assert c.engine.drop_connections(peer.endpoint) >= 1
            (res,) = c.engine.wait(batch, 30)
            assert res.status is TransferStatus.COMPLETED, res.error
            assert res.retries >= 1
            assert not first & {x.id for x in c.engine.connections()[peer.endpoint]}
            assert peer.digest(0, 2 * MiB) == digest(data)
            assert c.engine.free_batch(batch, wait_s=10)
            assert c.engine.stats()["transports"]["tcp"]["connections_lost"] >= 1
        finally:
            c.close()


def test_peer_killed_mid_transfer_fails_with_a_clear_status():
    with PeerProcess(segment_size=8 * MiB, env={"UMBRA_FAILPOINTS": "tcp.server_apply=sleep(30)"}) as peer:
        c = Client(peer, retry_cap=3)
        try:
            batch = c.engine.allocate_batch(2)
            c.engine.submit(batch, [TransferRequest(Opcode.WRITE, c.region.addr, c.seg, peer.addr, MiB),
                                    TransferRequest(Opcode.READ, c.region.addr + MiB, c.seg, peer.addr, MiB)])
            wait_until(lambda: c.frames_on_wire() >= 1, what="the requests to be on the wire")
            peer.kill()
            res = c.engine.wait(batch, 30)
            assert [r.status for r in res] == [TransferStatus.FAILED] * 2
            for r in res:
                assert r.code == ErrorCode.TRANSFER_FAIL and r.retries >= 3  # summed over slices
                assert peer.endpoint in r.error and "after 3 retries" in r.error
                assert "refused" in r.error.lower() or "lost" in r.error
            wait_until(lambda: c.engine.in_flight_slices() == 0, what="slices to return")
            assert c.engine.free_batch(batch)
        finally:
            c.close()

"""Transfer engine in one process: two engines talking TCP over loopback, local memcpy, and a fake
asynchronous transport (completions from another thread, as an RDMA completion queue delivers
them). Multi-process behaviour is in test_transfer_multiprocess.py."""

import ctypes
import gc
import os
import sys
import threading
import time

import numpy as np
import pytest

from store import failpoints as fp
from store.errors import ErrorCode, StoreError
from store.transfer import transport as transport_mod
from store.transfer.engine import Opcode, TransferEngine, TransferRequest
from store.transfer.memory import MemoryRegion
from store.transfer.server import control_call
from store.transfer.transport import BufferDescriptor, Slice, TransferStatus, Transport

MiB = 1 << 20
SEED = int(os.environ.get("UMBRA_TEST_SEED", "20240611"))


def live_slices() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o) is Slice)


def wait_until(cond, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


@pytest.fixture(autouse=True)
def _failpoints():
    fp.disarm_all()
    yield
    fp.disarm_all()


@pytest.fixture
def rng():
    print(f"seed={SEED} (set UMBRA_TEST_SEED to replay)")
    return np.random.default_rng(SEED)


class Pair:
    """Client engine ``a`` and server engine ``b``, each with a registered region."""

    def __init__(self, size=36 * MiB, a_kwargs=None, b_kwargs=None):
        self.a = TransferEngine("127.0.0.1", **(a_kwargs or {}))
        self.b = TransferEngine("127.0.0.1", **(b_kwargs or {}))
        self.ra = MemoryRegion(size)
        self.rb = MemoryRegion(size)
        self.a.register_memory(self.ra.addr, size)
        self.b.register_memory(self.rb.addr, size)
        self.seg = self.a.open_segment(self.b.segment_name).name

    def run(self, *reqs, timeout=30):
        batch = self.a.allocate_batch(len(reqs))
        self.a.submit(batch, list(reqs))
        res = self.a.wait(batch, timeout)
        assert self.a.free_batch(batch, wait_s=timeout)
        return res

    def close(self):
        self.a.close()
        self.b.close()
        gc.collect()  # numpy views held by tracebacks of pytest.raises
        self.ra.close()
        self.rb.close()


@pytest.fixture
def pair():
    p = Pair()
    yield p
    p.close()


@pytest.fixture
def make_pair():
    made = []

    def make(**kw):
        made.append(Pair(**kw))
        return made[-1]

    yield make
    fp.disarm_all()  # release anything a failed test left paused
    for p in made:
        p.close()


# ----------------------------------------------------------------------------- data paths

@pytest.mark.parametrize("size", [0, 1, 4097, 65536 + 16384, 65536 + 16385, 3 * MiB + 5, 16 * MiB + 4099])
def test_tcp_write_then_read_roundtrip(pair, rng, size):
    src = pair.ra.numpy()
    src[:] = rng.integers(0, 256, src.size, dtype=np.uint8)
    lo, ro = 3, 5  # unaligned on both sides
    (w,) = pair.run(TransferRequest(Opcode.WRITE, pair.ra.addr + lo, pair.seg, pair.rb.addr + ro, size))
    assert (w.status, w.transferred_bytes, w.code, w.error) == (TransferStatus.COMPLETED, size, 0, "")
    dst = pair.rb.numpy()
    assert np.array_equal(dst[ro:ro + size], src[lo:lo + size])
    assert not dst[:ro].any() and not dst[ro + size:].any()  # nothing written outside the range
    back = 16 * MiB + 8192
    (r,) = pair.run(TransferRequest(Opcode.READ, pair.ra.addr + back, pair.seg, pair.rb.addr + ro, size))
    assert r.status is TransferStatus.COMPLETED and r.transferred_bytes == size
    assert np.array_equal(src[back:back + size], dst[ro:ro + size])
    assert pair.a.stats()["slices_in_flight"] == 0


def test_many_requests_one_batch_with_mixed_directions(pair, rng):
    src, dst = pair.ra.numpy(), pair.rb.numpy()
    src[:8 * MiB] = rng.integers(0, 256, 8 * MiB, dtype=np.uint8)
    dst[8 * MiB:16 * MiB] = rng.integers(0, 256, 8 * MiB, dtype=np.uint8)
    sizes = rng.integers(1, 200_000, 40)
    reqs, off = [], 0
    for i, n in enumerate(sizes.tolist()):
        op = Opcode.WRITE if i % 2 == 0 else Opcode.READ
        base = 0 if op is Opcode.WRITE else 8 * MiB
        reqs.append(TransferRequest(op, pair.ra.addr + base + off, pair.seg, pair.rb.addr + base + off, n))
        off += n + 17
    res = pair.run(*reqs)
    assert [r.status for r in res] == [TransferStatus.COMPLETED] * len(reqs)
    for r in reqs:  # every request's range matches on both sides
        a = r.local_addr - pair.ra.addr
        b = r.target_offset - pair.rb.addr
        assert np.array_equal(src[a:a + r.length], dst[b:b + r.length])


def test_local_segment_uses_memcpy_and_validates_target(rng):
    with MemoryRegion(4 * MiB) as r, TransferEngine("127.0.0.1") as e:
        e.register_memory(r.addr, 2 * MiB)
        e.register_memory(r.addr + 2 * MiB, 1 * MiB, remote=False)
        arr = r.numpy()
        arr[:MiB] = rng.integers(0, 256, MiB, dtype=np.uint8)
        batch = e.allocate_batch(2)
        e.submit(batch, [TransferRequest(Opcode.WRITE, r.addr, e.segment_name, r.addr + MiB, 1000),
                         TransferRequest(Opcode.WRITE, r.addr, e.segment_name, r.addr + 2 * MiB, 10)])
        ok, refused = e.wait(batch, 10)
        assert e.free_batch(batch, wait_s=10)
        assert ok.status is TransferStatus.COMPLETED
        assert np.array_equal(arr[MiB:MiB + 1000], arr[:1000])
        # the local-only range is not part of the segment: refused before anything moves
        assert refused.status is TransferStatus.FAILED and refused.code == ErrorCode.INVALID_PARAMS
        assert not arr[2 * MiB:2 * MiB + 10].any()
        st = e.stats()
        assert st["transports"]["local"]["slices_ok"] == 1
        assert st["server"]["writes"] == 0  # no TCP involved
        del arr


def test_segment_spanning_chunks_is_cut_at_buffer_boundaries(rng, make_pair):
    p = make_pair(size=8 * MiB)
    # re-register b's region as 1 MiB chunks: a request may span them, each slice may not
    p.b.unregister_memory(p.rb.addr)
    for c in p.rb.chunks(MiB):
        p.b.register_memory(c.addr, c.length)
    seg = p.a.open_segment(p.b.segment_name, refresh=True)
    assert len(seg.buffers) == 8
    src = p.ra.numpy()
    src[:] = rng.integers(0, 256, src.size, dtype=np.uint8)
    n = 3 * MiB + 777
    (res,) = p.run(TransferRequest(Opcode.WRITE, p.ra.addr, seg.name, p.rb.addr + MiB - 100, n))
    assert res.status is TransferStatus.COMPLETED, res.error
    assert np.array_equal(p.rb.numpy()[MiB - 100:MiB - 100 + n], src[:n])
    assert p.b.stats()["server"]["rejected"] == 0


# ----------------------------------------------------------------------------- validation

def test_unregistered_local_address_is_refused_and_nothing_is_queued(pair):
    stray = (ctypes.c_ubyte * 4096)()
    batch = pair.a.allocate_batch(2)
    good = TransferRequest(Opcode.WRITE, pair.ra.addr, pair.seg, pair.rb.addr, 10)
    bad = TransferRequest(Opcode.WRITE, ctypes.addressof(stray), pair.seg, pair.rb.addr, 10)
    with pytest.raises(StoreError) as ei:
        pair.a.submit(batch, [good, bad])
    assert ei.value.code is ErrorCode.INVALID_PARAMS
    assert "not registered" in ei.value.message
    assert len(batch) == 0 and pair.a.stats()["slices_in_flight"] == 0
    # a range that starts registered and runs past the end is refused too
    with pytest.raises(StoreError):
        pair.a.submit(batch, [TransferRequest(Opcode.READ, pair.ra.end - 5, pair.seg, pair.rb.addr, 10)])
    assert pair.a.free_batch(batch)


def test_unknown_segment_and_full_batch(pair):
    batch = pair.a.allocate_batch(1)
    with pytest.raises(StoreError) as ei:
        pair.a.submit(batch, [TransferRequest(Opcode.WRITE, pair.ra.addr, "10.9.9.9:1", 0, 1)])
    assert ei.value.code is ErrorCode.SEGMENT_NOT_FOUND
    r = TransferRequest(Opcode.WRITE, pair.ra.addr, pair.seg, pair.rb.addr, 1)
    with pytest.raises(StoreError) as ei:
        pair.a.submit(batch, [r, r])
    assert ei.value.code is ErrorCode.INVALID_PARAMS and len(batch) == 0
    pair.a.submit(batch, [r])
    pair.a.wait(batch, 10)
    assert pair.a.free_batch(batch, wait_s=10)
    with pytest.raises(StoreError):
        pair.a.status(batch, 0)  # freed


def test_out_of_range_target_fails_before_sending(pair):
    before = pair.b.stats()["server"]
    (res,) = pair.run(TransferRequest(Opcode.WRITE, pair.ra.addr, pair.seg, pair.rb.end - 10, 100))
    assert res.status is TransferStatus.FAILED and res.code == ErrorCode.INVALID_PARAMS
    assert "outside the registered buffers" in res.error
    assert pair.b.stats()["server"]["writes"] == before["writes"]


def test_server_refuses_range_it_no_longer_serves_and_keeps_the_connection(rng, make_pair):
    p = make_pair(size=4 * MiB, a_kwargs={"transport_options": {"tcp": {"connections_per_peer": 1}}})
    p.b.unregister_memory(p.rb.addr)
    p.b.register_memory(p.rb.addr, 2 * MiB)
    p.b.register_memory(p.rb.addr + 2 * MiB, 2 * MiB)
    seg = p.a.open_segment(p.b.segment_name, refresh=True)
    src = p.ra.numpy()
    src[:] = rng.integers(1, 256, src.size, dtype=np.uint8)
    (ok,) = p.run(TransferRequest(Opcode.WRITE, p.ra.addr, seg.name, p.rb.addr, 1000))
    assert ok.status is TransferStatus.COMPLETED
    conns_before = [c.id for c in p.a.connections()[p.b.endpoint]]
    # the owner withdraws the second half; a's cached descriptor still lists it
    p.b.unregister_memory(p.rb.addr + 2 * MiB)
    dst = p.rb.numpy()
    snapshot = dst.copy()
    (refused,) = p.run(TransferRequest(Opcode.WRITE, p.ra.addr, seg.name, p.rb.addr + 3 * MiB, 64 * 1024))
    assert refused.status is TransferStatus.FAILED
    assert refused.code == ErrorCode.INVALID_PARAMS and refused.retries == 0  # no retry can fix it
    assert "not inside one remotely accessible registered buffer" in refused.error
    assert np.array_equal(dst, snapshot)  # not one byte changed
    (rd,) = p.run(TransferRequest(Opcode.READ, p.ra.addr, seg.name, p.rb.addr + 2 * MiB + 10, 10))
    assert rd.status is TransferStatus.FAILED and rd.code == ErrorCode.INVALID_PARAMS
    # same connection still serves
    (again,) = p.run(TransferRequest(Opcode.WRITE, p.ra.addr + 5, seg.name, p.rb.addr + 7, 5000))
    assert again.status is TransferStatus.COMPLETED
    assert np.array_equal(dst[7:5007], src[5:5005])
    assert [c.id for c in p.a.connections()[p.b.endpoint]] == conns_before
    assert p.a.stats()["transports"]["tcp"].get("connections_lost", 0) == 0
    assert p.b.stats()["server"]["rejected"] == 2
    del dst


def test_server_refuses_straddling_write_when_client_does_not_check(rng, make_pair):
    p = make_pair(size=2 * MiB, a_kwargs={"validate_remote": False})
    p.b.unregister_memory(p.rb.addr)
    p.b.register_memory(p.rb.addr, MiB)  # second MiB of the mapping is not registered
    dst = p.rb.numpy()
    dst[:] = 0xAB
    p.ra.numpy()[:] = 1
    (res,) = p.run(TransferRequest(Opcode.WRITE, p.ra.addr, p.seg, p.rb.addr + MiB - 10, 20))
    assert res.status is TransferStatus.FAILED and res.code == ErrorCode.INVALID_PARAMS
    assert (dst == 0xAB).all()
    del dst


# ----------------------------------------------------------------------------- failures and retries

def test_connection_loss_mid_transfer_is_retried_on_a_new_connection(rng, make_pair):
    p = make_pair(size=4 * MiB)
    src = p.ra.numpy()
    src[:] = rng.integers(0, 256, src.size, dtype=np.uint8)
    (warm,) = p.run(TransferRequest(Opcode.WRITE, p.ra.addr, p.seg, p.rb.addr, 10))
    assert warm.ok
    old = {c.id for c in p.a.connections()[p.b.endpoint]}
    point = fp.arm("tcp.server_apply", "pause", 10.0, count=1)  # the server stalls on the 1st apply
    batch = p.a.allocate_batch(1)
    p.a.submit(batch, [TransferRequest(Opcode.WRITE, p.ra.addr, p.seg, p.rb.addr, 3 * MiB)])
    wait_until(lambda: point.fired == 1, what="server to reach the apply step")
    assert p.a.in_flight_slices() == 48
    assert p.a.drop_connections(p.b.endpoint) >= 1
    (res,) = p.a.wait(batch, 20)
    fp.release("tcp.server_apply")
    assert res.status is TransferStatus.COMPLETED, res.error
    assert res.retries >= 1
    assert np.array_equal(p.rb.numpy()[:3 * MiB], src[:3 * MiB])
    new = {c.id for c in p.a.connections()[p.b.endpoint]}
    assert new and not (new & old)
    assert p.a.stats()["transports"]["tcp"]["connections_lost"] >= 1
    assert p.a.free_batch(batch, wait_s=10)


def test_retry_cap_then_failed_with_the_cause(pair):
    pair.a.config.retry_cap = 2
    fp.arm("tcp.server_apply", "error", int(ErrorCode.TRANSFER_FAIL))
    (res,) = pair.run(TransferRequest(Opcode.WRITE, pair.ra.addr, pair.seg, pair.rb.addr, 100))
    assert res.status is TransferStatus.FAILED
    assert res.code == ErrorCode.TRANSFER_FAIL and res.retries == 2
    assert "after 2 retries" in res.error and "tcp.server_apply" in res.error
    fp.disarm_all()
    (ok,) = pair.run(TransferRequest(Opcode.WRITE, pair.ra.addr, pair.seg, pair.rb.addr, 100))
    assert ok.status is TransferStatus.COMPLETED
    assert pair.a.stats()["transports"]["tcp"].get("connections_lost", 0) == 0


def test_injected_post_and_send_errors_are_retried(pair, rng):
    src = pair.ra.numpy()
    src[:MiB] = rng.integers(0, 256, MiB, dtype=np.uint8)
    fp.arm("transfer.slice_post", "error", -800, count=3)
    fp.arm("tcp.send", "error", -800, count=1)
    (res,) = pair.run(TransferRequest(Opcode.WRITE, pair.ra.addr, pair.seg, pair.rb.addr, MiB))
    assert res.status is TransferStatus.COMPLETED and res.retries >= 3
    assert np.array_equal(pair.rb.numpy()[:MiB], src[:MiB])


def test_local_memcpy_failpoint_is_retried_and_retry_failpoint_stops_it(rng):
    with MemoryRegion(MiB) as r, TransferEngine("127.0.0.1") as e:
        e.register_memory(r.addr, MiB)
        arr = r.numpy()
        arr[:1000] = rng.integers(0, 256, 1000, dtype=np.uint8)
        fp.arm("local.memcpy", "error", -800, count=2)
        assert e.transfer_sync(Opcode.WRITE, r.addr, e.segment_name, r.addr + 4096, 1000, timeout=10) == 1000
        assert np.array_equal(arr[4096:5096], arr[:1000])
        fp.arm("local.memcpy", "error", -800, count=1)
        fp.arm("transfer.retry", "error", -1)
        with pytest.raises(StoreError) as ei:
            e.transfer_sync(Opcode.READ, r.addr, e.segment_name, r.addr + 8192, 10, timeout=10)
        assert ei.value.code is ErrorCode.INTERNAL_ERROR and "transfer.retry" in ei.value.message
        assert e.stats()["retries"] == 3
        del arr


def test_server_side_reset_is_retried(pair, rng):
    src = pair.ra.numpy()
    src[:MiB] = rng.integers(0, 256, MiB, dtype=np.uint8)
    (warm,) = pair.run(TransferRequest(Opcode.WRITE, pair.ra.addr, pair.seg, pair.rb.addr, 10))
    assert warm.ok and pair.b.server_connections()
    point = fp.arm("tcp.server_apply", "pause", 10.0, count=1)
    batch = pair.a.allocate_batch(1)
    pair.a.submit(batch, [TransferRequest(Opcode.WRITE, pair.ra.addr, pair.seg, pair.rb.addr, MiB)])
    wait_until(lambda: point.fired == 1, what="server to reach the apply step")
    assert pair.b.drop_server_connections() >= 1
    (res,) = pair.a.wait(batch, 20)
    fp.release("tcp.server_apply")
    assert res.status is TransferStatus.COMPLETED and res.retries >= 1, res
    assert np.array_equal(pair.rb.numpy()[:MiB], src[:MiB])
    assert pair.a.free_batch(batch, wait_s=10)


def test_connect_failure_fails_request_with_clear_status():
    with MemoryRegion(MiB) as r, TransferEngine("127.0.0.1", retry_cap=2) as a:
        a.register_memory(r.addr, MiB)
        # a peer that was there and is gone: its port now refuses connections
        b = TransferEngine("127.0.0.1")
        seg = a.open_segment(b.segment_name)
        b.close()
        batch = a.allocate_batch(1)
        a.submit(batch, [TransferRequest(Opcode.WRITE, r.addr, seg.name, seg.buffers[0].addr if seg.buffers
                                         else 4096, 10)])
        (res,) = a.wait(batch, 20)
        assert res.status is TransferStatus.FAILED and res.retries == 2
        assert "connect to" in res.error and "refused" in res.error.lower()
        assert a.free_batch(batch, wait_s=5)


def test_slice_timeout_aborts_the_connection_and_reports_timeout(make_pair):
    p = make_pair(size=2 * MiB, a_kwargs={"slice_timeout_s": 0.3})
    fp.arm("tcp.server_apply", "pause", 20.0)
    batch = p.a.allocate_batch(1)
    p.a.submit(batch, [TransferRequest(Opcode.WRITE, p.ra.addr, p.seg, p.rb.addr, 1000)])
    (res,) = p.a.wait(batch, 20)
    assert res.status is TransferStatus.TIMEOUT, res
    assert "did not complete within 0.3s" in res.error
    # the connection carrying it was reset, so the slice came back (failed) and the batch frees
    wait_until(lambda: p.a.in_flight_slices() == 0, what="aborted slice to complete")
    assert p.a.free_batch(batch)
    assert p.a.stats()["transports"]["tcp"]["connections_aborted"] >= 1
    fp.disarm_all()
    (ok,) = p.run(TransferRequest(Opcode.READ, p.ra.addr, p.seg, p.rb.addr, 1000))
    assert ok.status is TransferStatus.COMPLETED


def test_cancel_drops_unsent_slices_and_lets_sent_ones_finish(make_pair):
    p = make_pair(size=64 * MiB, a_kwargs={"transport_options": {"tcp": {"connections_per_peer": 1}}})
    point = fp.arm("tcp.server_apply", "pause", 20.0)
    batch = p.a.allocate_batch(3)
    p.a.submit(batch, [TransferRequest(Opcode.WRITE, p.ra.addr + i * 20 * MiB, p.seg,
                                       p.rb.addr + i * 20 * MiB, 16 * MiB) for i in range(3)])
    wait_until(lambda: point.fired >= 1, what="first frame to reach the server")
    assert p.a.cancel(batch) == 3
    res = p.a.wait(batch, 0)
    assert [r.status for r in res] == [TransferStatus.CANCELED] * 3
    assert all("cancelled" in r.error for r in res)
    assert p.a.in_flight_slices() > 0  # sent frames are still out there
    fp.disarm_all()
    wait_until(lambda: p.a.in_flight_slices() == 0, what="in-flight slices to drain")
    assert p.a.free_batch(batch)
    # 12 frames of 4 MiB were queued; the ones not yet on the wire were never sent
    assert p.b.stats()["server"]["writes"] < 12
    assert p.a.stats()["transports"]["tcp"]["frames_queued"] == 12


def test_read_answer_arriving_after_cancel_does_not_touch_local_memory(make_pair):
    p = make_pair(size=2 * MiB)
    p.rb.numpy()[:] = 0x11
    local = p.ra.numpy()
    local[:] = 0x5A
    point = fp.arm("tcp.server_apply", "pause", 20.0, count=1)
    batch = p.a.allocate_batch(1)
    p.a.submit(batch, [TransferRequest(Opcode.READ, p.ra.addr, p.seg, p.rb.addr, MiB)])
    wait_until(lambda: point.fired == 1, what="server to reach the READ")
    assert p.a.cancel(batch) == 1
    fp.release("tcp.server_apply")
    wait_until(lambda: p.a.in_flight_slices() == 0, what="the READ answer")
    assert p.a.free_batch(batch)
    assert (local == 0x5A).all()  # the answer was read off the socket and discarded
    assert p.a.stats()["transports"]["tcp"]["reads_discarded"] == 1
    (ok,) = p.run(TransferRequest(Opcode.READ, p.ra.addr, p.seg, p.rb.addr, MiB))  # connection in step
    assert ok.status is TransferStatus.COMPLETED and (local[:MiB] == 0x11).all()
    del local


def test_free_batch_early_defers_until_in_flight_slices_return(rng, make_pair):
    p = make_pair(size=4 * MiB)
    src = p.ra.numpy()
    src[:] = rng.integers(0, 256, src.size, dtype=np.uint8)
    point = fp.arm("tcp.server_apply", "pause", 20.0, count=1)
    batch = p.a.allocate_batch(1)
    p.a.submit(batch, [TransferRequest(Opcode.WRITE, p.ra.addr, p.seg, p.rb.addr, MiB)])
    wait_until(lambda: point.fired == 1, what="server to reach the apply step")
    assert p.a.free_batch(batch) is False  # deferred: 16 slices still in flight
    st = p.a.stats()
    assert st["batches"] == 1 and st["slices_in_flight"] == 16
    with pytest.raises(StoreError):
        p.a.status(batch, 0)
    # the local memory those slices read from cannot go away underneath them
    with pytest.raises(StoreError) as ei:
        p.a.unregister_memory(p.ra.addr, wait_s=0.05)
    assert ei.value.code is ErrorCode.UNAVAILABLE_IN_CURRENT_STATUS
    fp.release("tcp.server_apply")
    wait_until(lambda: p.a.stats()["batches"] == 0, what="deferred free")
    assert p.a.stats()["slices_in_flight"] == 0
    assert np.array_equal(p.rb.numpy()[:MiB], src[:MiB])  # the write still landed whole
    assert live_slices() == 0
    p.a.unregister_memory(p.ra.addr, wait_s=1)
    p.a.register_memory(p.ra.addr, p.ra.length)


# ----------------------------------------------------------------------------- bounded bookkeeping

def test_soak_local_200k_slices_leaves_no_slice_behind():
    with MemoryRegion(8 * MiB) as r, TransferEngine("127.0.0.1", slice_size=256, fragment_limit=64) as e:
        e.register_memory(r.addr, r.length)
        req, per_batch = 256 * 32, 128  # 32 slices per request, 4096 per batch

        def one(k):
            batch = e.allocate_batch(per_batch)
            op = Opcode.WRITE if k % 2 else Opcode.READ
            dst = r.addr + 4 * MiB
            e.submit(batch, [TransferRequest(op, r.addr + i * req, e.segment_name, dst + i * req, req)
                             for i in range(per_batch)])
            res = e.wait(batch, 30)
            assert all(x.status is TransferStatus.COMPLETED for x in res)
            assert e.free_batch(batch, wait_s=5)

        one(0)
        gc.collect()
        objects_before = len(gc.get_objects())
        n = 200_000 // (per_batch * 32) + 1
        for k in range(1, n + 1):
            one(k)
        st = e.stats()
        assert st["slices_ok"] >= 200_000
        assert st["batches"] == 0 and st["slices_in_flight"] == 0 and st["active_requests"] == 0
        assert live_slices() == 0
        assert len(gc.get_objects()) - objects_before < 1000  # no growth with the number of slices


def test_soak_tcp_leaves_no_slice_behind(pair):
    pair.a.config.slice_size, pair.a.config.fragment_limit = 512, 128
    for k in range(10):
        op = Opcode.WRITE if k % 2 else Opcode.READ
        n = 16384
        res = pair.run(*[TransferRequest(op, pair.ra.addr + i * n, pair.seg, pair.rb.addr + i * n, n)
                         for i in range(64)])
        assert all(r.ok for r in res)
    assert pair.a.stats()["slices_ok"] == 10 * 64 * 32
    wait_until(lambda: pair.a.stats()["transports"]["tcp"]["frames_in_flight"] == 0, what="frames to drain")
    assert live_slices() == 0


# ----------------------------------------------------------------------------- control channel, registry

def test_control_channel_and_segment_discovery(pair):
    seen = []

    def echo(payload, peer):
        seen.append(peer)
        if payload == b"missing":
            raise StoreError(ErrorCode.OBJECT_NOT_FOUND, "no such thing")
        if payload == b"bug":
            raise ValueError("handler bug")
        return payload[::-1]

    pair.b.register_control_handler("test.echo", echo)
    assert pair.a.control_call(pair.b.endpoint, "test.echo", b"abc") == b"cba"
    assert seen and seen[0].startswith("127.0.0.1:")
    with pytest.raises(StoreError) as ei:
        pair.a.control_call(pair.b.endpoint, "test.echo", b"missing")
    assert ei.value.code is ErrorCode.OBJECT_NOT_FOUND and "no such thing" in ei.value.message
    with pytest.raises(StoreError) as ei:
        pair.a.control_call(pair.b.endpoint, "test.echo", b"bug")
    assert ei.value.code is ErrorCode.INTERNAL_ERROR and "handler bug" in ei.value.message
    with pytest.raises(StoreError) as ei:
        pair.a.control_call(pair.b.endpoint, "test.nobody", b"")
    assert ei.value.code is ErrorCode.NOT_SUPPORTED
    assert pair.a.control_call(pair.b.endpoint, "engine.ping") == b"pong"
    assert pair.a.open_segment(pair.b.segment_name, refresh=True) == pair.b.segment_descriptor()
    # a data connection and a control call share the listener without disturbing each other
    (res,) = pair.run(TransferRequest(Opcode.WRITE, pair.ra.addr, pair.seg, pair.rb.addr, 10))
    assert res.ok


def test_control_call_to_nowhere_is_rpc_fail():
    with TransferEngine("127.0.0.1") as e:
        port = e.endpoint.rpartition(":")[2]
    with pytest.raises(StoreError) as ei:
        control_call(f"127.0.0.1:{port}", "engine.ping", b"", 2.0)
    assert ei.value.code is ErrorCode.RPC_FAIL


class FakeAsyncTransport(Transport):
    """Completes slices from a poller thread, like a completion queue; fails chosen attempts."""

    name = "fake"

    def __init__(self, engine, *, fail_first=0, refuse=False):
        self.engine = engine
        self.fail_first = fail_first
        self.refuse = refuse
        self.attempts = 0
        self.cq: list[Slice] = []
        self.cond = threading.Condition()
        self.closed = False
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def register_memory(self, addr, length):
        return BufferDescriptor(addr, length, rkey=0x1234)

    def unregister_memory(self, addr):
        pass

    def submit(self, slices):
        with self.cond:
            self.cq.extend(slices)
            self.cond.notify()

    def _poll(self):
        while True:
            with self.cond:
                while not self.cq and not self.closed:
                    self.cond.wait()
                if self.closed:
                    return
                batch, self.cq = self.cq, []
            for s in batch:
                self.attempts += 1
                assert s.rkey == 0x1234  # rkey of the target buffer reaches the transport
                if self.refuse:
                    s.complete(False, "remote access error", code=ErrorCode.INVALID_WRITE, retryable=False)
                elif self.attempts <= self.fail_first:
                    s.complete(False, "flushed")
                else:
                    ctypes.memmove(s.remote_addr, s.local_addr, s.length)
                    s.complete(True)
                    s.complete(False, "late duplicate")  # ignored: one completion per attempt

    def close(self):
        with self.cond:
            self.closed = True
            self.cond.notify()
        self.thread.join(5)


@pytest.fixture
def fake_registry(monkeypatch):
    monkeypatch.setitem(transport_mod.TRANSPORTS, "fake", f"{__name__}:FakeAsyncTransport")
    assert sys.modules[__name__].FakeAsyncTransport is FakeAsyncTransport


@pytest.mark.parametrize(("options", "status", "retries"), [
    ({"fail_first": 5}, TransferStatus.COMPLETED, 5),
    ({"refuse": True}, TransferStatus.FAILED, 0),
])
def test_pluggable_async_transport(fake_registry, rng, options, status, retries):
    opts = {"fake": options}
    with MemoryRegion(MiB) as ra, MemoryRegion(MiB) as rb, \
            TransferEngine("127.0.0.1", "fake", transport_options=opts) as a, \
            TransferEngine("127.0.0.1", "fake", transport_options=opts) as b:
        a.register_memory(ra.addr, MiB)
        assert b.register_memory(rb.addr, MiB).rkey == 0x1234
        seg = a.open_segment(b.segment_descriptor())
        ra.numpy()[:] = rng.integers(0, 256, MiB, dtype=np.uint8)
        batch = a.allocate_batch(1)
        a.submit(batch, [TransferRequest(Opcode.WRITE, ra.addr, seg, rb.addr, 300_000)])
        (res,) = a.wait(batch, 10)
        assert res.status is status and res.retries == retries
        if status is TransferStatus.COMPLETED:
            assert np.array_equal(ra.numpy()[:300_000], rb.numpy()[:300_000])
        else:
            assert res.code == ErrorCode.INVALID_WRITE and "remote access error" in res.error
        wait_until(lambda: a.in_flight_slices() == 0, what="slices to return")
        assert a.free_batch(batch)


def test_unknown_protocol_is_refused():
    with pytest.raises(StoreError) as ei:
        TransferEngine("127.0.0.1", "carrier-pigeon")
    assert ei.value.code is ErrorCode.INVALID_PARAMS

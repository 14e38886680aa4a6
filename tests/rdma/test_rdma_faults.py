"""The RDMA error catalogue, provoked for real on the device, and the transport's reaction.

Each test makes the fault happen through the real mechanism (a wrong rkey on the wire, an MR
really deregistered, a peer QP really destroyed or stripped of remote-write access, two QPs really
configured with different path MTUs, a QP really moved to ERR), checks the work-completion status
the transport saw, what it did (retire, reconnect, retry, fail at once, pause), and then that the
next transfer succeeds and no byte outside the transfers changed.

A (poster) and B (segment owner) are two transfer engines in this process on the same device, so
the test can act on B's side directly; the cross-process path is in ``test_rdma_transfer.py``.
"""

from __future__ import annotations

import logging
import urllib.request

import numpy as np
import pytest
from rdma_helpers import Pair, Side, pattern, run_slices, wait_for
from rdma_helpers import verbs as e

from store import failpoints
from store.errors import StoreError
from store.transfer.rdma.metrics import serve_metrics
from store.transfer.rdma.transport import RdmaTransport
from store.transfer.transport import Opcode, TransferStatus

pytestmark = [pytest.mark.rdma, pytest.mark.timeout(300)]

KiB = 1024
QUIET = {"pause_after_failures": 100}  # faults below must not pause the path unless a test says so


def completions(t: RdmaTransport, status: str) -> float:
    return t.metrics.value("umbra_rdma_completions", device=t.device, status=f"IBV_WC_{status}")


def warm(pr: Pair) -> None:
    """Connect A's endpoint to B with one verified write."""
    pr.a.mem[:4096] = pattern(99, 4096)
    pr.write(0, 0, 4096)
    assert np.array_equal(pr.b.mem[:4096], pr.a.mem[:4096])


def write_and_verify(pr: Pair, seed: int, remote_off: int, n: int = 64 * KiB) -> None:
    data = pattern(seed, n)
    pr.a.mem[:n] = data
    pr.write(0, remote_off, n)
    assert np.array_equal(pr.b.mem[remote_off:remote_off + n], data)
    pr.a.mem[:n] = 0
    pr.read(0, remote_off, n)
    assert np.array_equal(pr.a.mem[:n], data)


@pytest.fixture
def pair(rdma_target):
    pr = Pair(rdma_target, a_opts=QUIET)
    yield pr
    pr.close()


def test_bad_rkey_fails_at_once_and_the_next_write_succeeds(pair):
    pr = pair
    ta = pr.a.transport
    assert ta.context.cq_mode == "ex"  # the default on a provider with extended CQs (rxe, mlx5)
    warm(pr)
    pr.b.mem[64 * KiB:128 * KiB] = 0xAB
    pr.a.mem[:64 * KiB] = pattern(1, 64 * KiB)
    rkey = pr.seg.buffers[0].rkey
    s = pr.slice(Opcode.WRITE, 0, pr.b.region.addr + 64 * KiB, 64 * KiB, rkey=rkey ^ 0xFF)
    calls = run_slices(ta, [s])
    assert calls[id(s)] == 1
    assert s.status is TransferStatus.FAILED
    assert "remote access error" in s.error and "IBV_WC_REM_ACCESS_ERR" in s.error
    assert s.retryable is False and s.retries == 0  # a request fault is not retried
    assert (pr.b.mem[64 * KiB:128 * KiB] == 0xAB).all()
    assert completions(ta, "REM_ACCESS_ERR") == 1
    ep = ta.endpoint(pr.b.engine.endpoint)
    assert ep is not None and ep.errors["IBV_WC_REM_ACCESS_ERR"] == 1 and ep.retirements == 1
    assert ta.metrics.value("umbra_rdma_endpoint_errors", device=ta.device, peer=ep.peer_nic_path,
                            status="IBV_WC_REM_ACCESS_ERR") == 1
    # the QPs went to ERR with the fault; the next transfer runs on a fresh generation
    write_and_verify(pr, 2, 128 * KiB)
    assert ep.generation == 1 and ep.connections == 2 and ep.reconnects == 1
    assert ta.metrics.value("umbra_rdma_reconnects", device=ta.device, peer=ep.peer_nic_path) == 1
    assert wait_for(lambda: ta.context.describe()["retired_qps"] == 0), "retired QPs were not destroyed"
    # the owner replaced its answering QPs for the new generation
    (pe,) = pr.b.transport.passive_endpoints()
    assert pe.generation == 1 and {q.qp_num for q in pe.qps} == {q.peer_qp_num for q in ep.qps}
    # the counters are on the metrics port
    server = serve_metrics(0, [ta.metrics.registry], host="127.0.0.1")
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=30).read().decode()
    finally:
        server.close()
    assert f'umbra_rdma_completions_total{{device="{ta.device}",status="IBV_WC_REM_ACCESS_ERR"}} 1.0' in text


def test_completion_channel_mode_moves_data_and_recovers(rdma_target):
    """The fallback CQ (completion channel, sleeps until the device signals) does the same job as
    the default extended CQ: data verified, a fault retired and recovered."""
    pr = Pair(rdma_target, a_opts={**QUIET, "cq_mode": "channel"}, b_opts={"cq_mode": "channel"})
    try:
        ta = pr.a.transport
        assert ta.context.cq_mode == "channel" and ta.context.comp_fd is not None
        for i, n in enumerate((1, 65536, 3 << 20)):
            write_and_verify(pr, 30 + i, 0, n)
        s = pr.slice(Opcode.WRITE, 0, pr.b.region.addr, 4096, rkey=pr.seg.buffers[0].rkey ^ 0xFF)
        run_slices(ta, [s])
        assert s.status is TransferStatus.FAILED and "remote access error" in s.error
        write_and_verify(pr, 40, 4096)
        ep = ta.endpoint(pr.b.engine.endpoint)
        assert ep is not None and ep.reconnects == 1
    finally:
        pr.close()


def test_write_and_read_beyond_the_mr_end(pair):
    pr = pair
    ta = pr.a.transport
    warm(pr)
    end = pr.b.region.length
    pr.b.mem[end - 4 * KiB:] = 0x5A
    pr.a.mem[:4 * KiB] = pattern(3, 4 * KiB)
    w = pr.slice(Opcode.WRITE, 0, pr.b.region.addr + end - KiB, 4 * KiB)
    run_slices(ta, [w])
    assert w.status is TransferStatus.FAILED and "remote access error" in w.error
    assert (pr.b.mem[end - 4 * KiB:] == 0x5A).all()  # nothing of it landed
    pr.a.mem[8 * KiB:12 * KiB] = 0x11
    r = pr.slice(Opcode.READ, 8 * KiB, pr.b.region.addr + end - KiB, 4 * KiB)
    run_slices(ta, [r])
    assert r.status is TransferStatus.FAILED and "remote access error" in r.error
    assert completions(ta, "REM_ACCESS_ERR") == 2
    write_and_verify(pr, 4, end - 64 * KiB)  # the last in-bounds bytes work


def test_qp_without_remote_write_gives_remote_invalid_request_then_recovers(pair, caplog):
    """Mooncake's "remote invalid request error": the answering QP lacks REMOTE_WRITE. The
    endpoint is retired and the slice retried on fresh QPs, where the owner grants access again."""
    pr = pair
    ta = pr.a.transport
    warm(pr)
    for pe in pr.b.transport.passive_endpoints():
        for q in pe.qps:
            q.set_access_flags(e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_READ)
            assert q.access_flags & e.IBV_ACCESS_REMOTE_WRITE == 0
    caplog.set_level(logging.WARNING, logger="store.transfer.rdma")
    write_and_verify(pr, 5, 256 * KiB)
    assert completions(ta, "REM_INV_REQ_ERR") >= 1
    ep = ta.endpoint(pr.b.engine.endpoint)
    assert ep is not None and ep.errors["IBV_WC_REM_INV_REQ_ERR"] >= 1 and ep.reconnects >= 1
    assert ep.retries >= 1
    assert "remote invalid request error" in caplog.text
    # the answering QPs now in use have remote write again
    assert all(q.access_flags & e.IBV_ACCESS_REMOTE_WRITE for pe in pr.b.transport.passive_endpoints()
               for q in pe.qps)


def test_mr_deregistered_with_writes_in_flight(rdma_target):
    """32 chained 256 KiB writes, then the target MR is deregistered: every slice completes exactly
    once; the ones that fail say "remote access error"; the endpoint is not rebuilt in a storm; once
    the owner registers again, a write with the new rkey lands."""
    pr = Pair(rdma_target, size=16 << 20, a_opts=QUIET)
    try:
        ta = pr.a.transport
        warm(pr)
        n, size = 32, 256 * KiB
        data = pattern(6, n * size)
        pr.a.mem[:n * size] = data
        pr.b.mem[:n * size] = 0
        slices = [pr.slice(Opcode.WRITE, i * size, pr.b.region.addr + i * size, size) for i in range(n)]
        (mr,) = pr.b.transport.memory_regions()
        calls = run_slices(ta, slices, after_submit=mr.deregister)
        assert sorted(calls.values()) == [1] * n  # none lost, none completed twice
        assert not mr.registered
        failed = [s for s in slices if s.status is TransferStatus.FAILED]
        done = [i for i, s in enumerate(slices) if s.status is TransferStatus.COMPLETED]
        assert failed, "deregistering the target MR must fail the writes behind it"
        assert all("remote access error" in s.error and not s.retryable for s in failed)
        for i in done:  # what was reported written was written
            assert np.array_equal(pr.b.mem[i * size:(i + 1) * size], data[i * size:(i + 1) * size])
        assert completions(ta, "REM_ACCESS_ERR") >= 1
        ep = ta.endpoint(pr.b.engine.endpoint)
        assert ep is not None and ep.retirements <= 3, f"{ep.retirements} retirements: a reconnect storm"
        # the owner registers its memory again (new MR, new rkey); the poster refreshes the descriptor
        pr.b.engine.unregister_memory(pr.b.region.addr)
        pr.b.desc = pr.b.engine.register_memory(pr.b.region.addr, pr.b.region.length)
        seg = pr.refresh()
        assert seg.buffers[0].rkey == pr.b.desc.rkey
        write_and_verify(pr, 7, 0, 1 << 20)
    finally:
        pr.close()


def test_peer_qp_destroyed_gives_retry_exceeded_then_a_fresh_qp_succeeds(pair):
    pr = pair
    ta = pr.a.transport
    warm(pr)
    expected_bound = ta.config.retry_exhaustion_s()
    assert expected_bound < 5.0  # the default makes a dead peer end in an error within seconds
    for pe in pr.b.transport.passive_endpoints():
        for q in pe.qps:
            assert q.destroy()
            assert q.destroyed and q.state() is None
    write_and_verify(pr, 8, 512 * KiB)
    assert completions(ta, "RETRY_EXC_ERR") >= 1
    ep = ta.endpoint(pr.b.engine.endpoint)
    assert ep is not None and ep.errors["IBV_WC_RETRY_EXC_ERR"] >= 1 and ep.reconnects >= 1


def test_path_mtu_mismatch_with_negotiation_off_and_on(rdma_target):
    """One end at a large path MTU, its peer at a smaller one (two hosts with different NIC MTUs).
    Mooncake picks the MTU locally (its issue #3868): writes larger than the smaller MTU fail with
    "remote invalid request error". Negotiation (the default) settles on min(local, peer)."""
    probe = Side(rdma_target, 1 << 20)
    try:
        active = probe.transport.context.active_mtu
    finally:
        probe.close()
    hi, lo = (active, 1024) if active >= 2048 else (1024, 512)
    off = {"mtu_negotiation": False}
    pr = Pair(rdma_target, a_opts={**QUIET, **off, "mtu": hi, "retry_cap": 2}, b_opts={**off, "mtu": lo})
    try:
        ta = pr.a.transport
        pr.b.mem[:256 * KiB] = 0x3C
        pr.a.mem[:64 * KiB] = pattern(9, 64 * KiB)
        w = pr.slice(Opcode.WRITE, 0, pr.b.region.addr, 64 * KiB)
        run_slices(ta, [w])
        assert w.status is TransferStatus.FAILED and "remote invalid request error" in w.error
        assert w.retries == 2  # retried on fresh QPs up to the cap, every time the same mismatch
        assert completions(ta, "REM_INV_REQ_ERR") == 3
        assert (pr.b.mem[:256 * KiB] == 0x3C).all()
        ep = ta.endpoint(pr.b.engine.endpoint)
        (pe,) = pr.b.transport.passive_endpoints()
        assert ep is not None and ep.path_mtu == hi and pe.path_mtu == lo
        # a write that fits in one packet of the smaller MTU still works
        small = pattern(10, lo)
        pr.a.mem[:lo] = small
        pr.write(0, 128 * KiB, lo)
        assert np.array_equal(pr.b.mem[128 * KiB:128 * KiB + lo], small)
        # a read larger than the responder's MTU fails too
        r = pr.slice(Opcode.READ, 64 * KiB, pr.b.region.addr, 64 * KiB)
        run_slices(ta, [r])
        assert r.status is TransferStatus.FAILED
        assert completions(ta, "RETRY_EXC_ERR") + completions(ta, "REM_INV_REQ_ERR") >= 4
    finally:
        pr.close()
    on = {"mtu_negotiation": True}
    pr = Pair(rdma_target, a_opts={**QUIET, **on, "mtu": hi}, b_opts={**on, "mtu": lo})
    try:
        write_and_verify(pr, 11, 0, 1 << 20)
        ep = pr.a.transport.endpoint(pr.b.engine.endpoint)
        (pe,) = pr.b.transport.passive_endpoints()
        assert ep is not None and ep.path_mtu == lo and pe.path_mtu == lo and ep.faults == 0
    finally:
        pr.close()


def test_qp_moved_to_err_with_writes_in_flight_loses_and_doubles_nothing(rdma_target):
    pr = Pair(rdma_target, size=16 << 20, a_opts=QUIET)
    try:
        ta = pr.a.transport
        warm(pr)
        n, size = 32, 256 * KiB
        data = pattern(12, n * size)
        pr.a.mem[:n * size] = data
        pr.b.mem[:n * size] = 0
        ep = ta.endpoint(pr.b.engine.endpoint)
        assert ep is not None
        qps = list(ep.qps)
        slices = [pr.slice(Opcode.WRITE, i * size, pr.b.region.addr + i * size, size) for i in range(n)]

        def to_err() -> None:
            assert wait_for(lambda: any(q.outstanding for q in qps), interval=0.001)
            for q in qps:
                assert q.to_err()

        calls = run_slices(ta, slices, after_submit=to_err)
        assert sorted(calls.values()) == [1] * n
        assert all(s.status is TransferStatus.COMPLETED for s in slices), [s.error for s in slices]
        assert np.array_equal(pr.b.mem[:n * size], data)
        assert completions(ta, "WR_FLUSH_ERR") >= 1
        assert ep.retirements >= 1 and sum(s.retries for s in slices) >= 1
    finally:
        pr.close()


def test_injected_qp_event_retires_that_endpoint(pair, caplog):
    pr = pair
    ta = pr.a.transport
    warm(pr)
    ep = ta.endpoint(pr.b.engine.endpoint)
    assert ep is not None
    caplog.set_level(logging.WARNING, logger="store.transfer.rdma")
    ta.inject_async_event("QP_FATAL", ep.qps[0].qp_num)
    assert wait_for(lambda: ep.retirements == 1)
    assert "local work queue catastrophic error" in caplog.text
    assert ta.metrics.value("umbra_rdma_async_events", device=ta.device, event="IBV_EVENT_QP_FATAL",
                            source="injected") == 1
    write_and_verify(pr, 13, 0)
    assert ep.reconnects == 1


def test_answering_qp_access_error_is_reported_to_the_poster(pair, caplog):
    """The Mooncake pair on the owner's side: "local access violation work queue error" (rxe never
    raises it, so it is injected) makes the owner tell the poster, which retires at once."""
    pr = pair
    ta, tb = pr.a.transport, pr.b.transport
    warm(pr)
    ep = ta.endpoint(pr.b.engine.endpoint)
    assert ep is not None
    (pe,) = tb.passive_endpoints()
    caplog.set_level(logging.WARNING, logger="store.transfer.rdma")
    tb.inject_async_event(e.IBV_EVENT_QP_ACCESS_ERR, pe.qps[0].qp_num)
    assert wait_for(lambda: ep.retirements == 1)
    assert "local access violation work queue error" in caplog.text
    assert "peer reported" in ep.last_error
    assert all(q.state() == e.IBV_QPS_ERR for q in pe.qps)
    write_and_verify(pr, 14, 64 * KiB)


def test_port_error_takes_the_device_out_until_port_active(pair):
    pr = pair
    ta = pr.a.transport
    warm(pr)
    ta.inject_async_event("PORT_ERR")
    assert wait_for(lambda: not ta.context.active)
    pr.a.mem[:4096] = 1
    with pytest.raises(StoreError, match="out of service"):
        pr.write(0, 0, 4096)
    ta.inject_async_event("PORT_ACTIVE")
    assert wait_for(lambda: ta.context.active)
    write_and_verify(pr, 15, 0)
    ta.inject_async_event("CQ_ERR")  # completions may have been lost: every endpoint is rebuilt
    ep = ta.endpoint(pr.b.engine.endpoint)
    assert ep is not None
    before = ep.retirements
    assert wait_for(lambda: ep.retirements == before + 1)
    write_and_verify(pr, 16, 0)


def test_abort_tears_down_the_qp_carrying_a_stuck_slice(rdma_target):
    """The engine's slice timeout calls abort(): the slice completes (failed) because its QP is
    flushed, not because the retry timer ran out."""
    pr = Pair(rdma_target, a_opts={**QUIET, "qp_timeout": 20})  # ~30 s before retry-exceeded
    try:
        ta = pr.a.transport
        warm(pr)
        for pe in pr.b.transport.passive_endpoints():
            for q in pe.qps:
                q.to_err()  # an ERR responder silently drops: the requester would retransmit
        s = pr.slice(Opcode.WRITE, 0, pr.b.region.addr, 4096)

        def abort() -> None:
            assert wait_for(lambda: s.where.get("qp_num") is not None, interval=0.005)
            s.abandoned = True
            ta.abort([s])

        run_slices(ta, [s], after_submit=abort)
        assert s.status is TransferStatus.FAILED
        assert completions(ta, "WR_FLUSH_ERR") >= 1 and completions(ta, "RETRY_EXC_ERR") == 0
    finally:
        pr.close()


def test_failpoints_at_post_and_handshake_are_survived(rdma_target):
    failpoints.arm("rdma.handshake", "error", -800, count=1)
    failpoints.arm("rdma.post_send", "error", -800, count=1)
    try:
        pr = Pair(rdma_target, a_opts=QUIET)
        try:
            write_and_verify(pr, 17, 0)
            ta = pr.a.transport
            ep = ta.endpoint(pr.b.engine.endpoint)
            assert ep is not None and ep.handshake_failures == 1 and ep.retirements >= 1
            assert failpoints.armed()["rdma.post_send"].fired == 1
            assert failpoints.armed()["rdma.handshake"].fired == 1
        finally:
            pr.close()
    finally:
        failpoints.disarm_all()


def test_every_step_reaches_its_failpoint(pair):
    """rdma.modify_qp / retire_endpoint / async_event / poll_cq are reached with the ids a fault
    plan needs, and an async event dropped at its failpoint changes nothing."""
    pr = pair
    ta = pr.a.transport
    seen: dict[str, list[dict]] = {}

    def recorder(name):
        def record(**ids):
            seen.setdefault(name, []).append(ids)
        return record

    for name in ("rdma.modify_qp", "rdma.retire_endpoint", "rdma.async_event", "rdma.poll_cq"):
        failpoints.arm(name, "call", recorder(name))
    try:
        warm(pr)
        ep = ta.endpoint(pr.b.engine.endpoint)
        assert ep is not None
        assert {ids["to"] for ids in seen["rdma.modify_qp"]} == {"INIT", "RTR", "RTS"}
        assert {ids["role"] for ids in seen["rdma.modify_qp"]} == {"active", "passive"}
        qpn = ep.qps[0].qp_num
        ta.inject_async_event("QP_REQ_ERR", qpn)
        assert wait_for(lambda: ep.retirements == 1)
        (ev,) = seen["rdma.async_event"]
        assert ev["event"] == "IBV_EVENT_QP_REQ_ERR" and ev["qp_num"] == qpn and ev["source"] == "injected"
        (ret,) = seen["rdma.retire_endpoint"]
        assert qpn in ret["qp_nums"] and ret["generation"] == 0
        assert seen["rdma.poll_cq"]
        write_and_verify(pr, 19, 0)  # reconnects
        failpoints.arm("rdma.async_event", "error", -800, count=1)
        ta.inject_async_event("QP_FATAL", ep.qps[0].qp_num)
        assert wait_for(lambda: failpoints.armed()["rdma.async_event"].fired == 1)
        write_and_verify(pr, 20, 0)
        assert ep.retirements == 1 and ep.generation == 1  # the dropped event retired nothing
    finally:
        failpoints.disarm_all()


def test_a_path_that_keeps_failing_is_paused(rdma_target):
    """Owner gone: the poster's handshakes are refused; after the threshold the path is paused and
    further slices fail at once, without new handshakes (no reconnect storm)."""
    pr = Pair(rdma_target, a_opts={"pause_after_failures": 3, "pause_seconds": 120.0})
    try:
        ta = pr.a.transport
        warm(pr)
        pr.b.close()  # its QPs and its control port are gone
        pr.a.mem[:4096] = 2
        with pytest.raises(StoreError) as info:
            pr.write(0, 0, 4096)
        ep = ta.endpoint(pr.b.engine.endpoint)
        assert ep is not None
        assert wait_for(lambda: ep.state.value == "paused")
        assert ep.errors["IBV_WC_RETRY_EXC_ERR"] >= 1 or ep.handshake_failures >= 1
        assert ta.metrics.value("umbra_rdma_paths_paused", device=ta.device, peer=ep.peer_nic_path) == 1
        tries = ep.handshake_failures
        with pytest.raises(StoreError, match="paused"):
            pr.write(0, 0, 4096)
        assert ep.handshake_failures == tries
        assert "paused" in str(info.value) or "handshake" in str(info.value)
    finally:
        pr.a.close()


def _netdev_of(device: str, port: int, gid_index: int) -> str | None:
    path = f"/sys/class/infiniband/{device}/ports/{port}/gid_attrs/ndevs/{gid_index}"
    try:
        with open(path) as f:
            return f.read().strip() or None
    except OSError:
        return None


@pytest.mark.softroce
def test_real_port_events_from_the_device_take_it_out_and_back(rdma_target):
    """Not injected: the link under rxe goes down and up; the kernel raises PORT_ERR / PORT_ACTIVE
    (and GID_CHANGE) on the async fd, which the worker reads without blocking and acts on."""
    import os
    import shutil
    import subprocess

    from store.transfer.rdma import device as rdma_device

    if not rdma_device.is_soft_roce(rdma_target.device):
        pytest.skip("only flaps the link of a Soft-RoCE device")
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 to take the link down")
    pr = Pair(rdma_target, a_opts=QUIET)
    ndev = None
    try:
        ta = pr.a.transport
        warm(pr)
        ctx = ta.context
        ndev = _netdev_of(ctx.device, ctx.config.port, ctx.gid_index)
        if ndev is None:
            pytest.skip(f"no netdev behind GID[{ctx.gid_index}] of {ctx.device}")
        subprocess.run(["ip", "link", "set", ndev, "down"], check=True)
        assert wait_for(lambda: not ctx.active), "no PORT_ERR read from the device"
        assert ta.metrics.value("umbra_rdma_async_events", device=ta.device, event="IBV_EVENT_PORT_ERR",
                                source="device") >= 1
        pr.a.mem[:4096] = 3
        with pytest.raises(StoreError, match="out of service"):
            pr.write(0, 0, 4096)
        subprocess.run(["ip", "link", "set", ndev, "up"], check=True)
        ndev = None
        assert wait_for(lambda: ctx.active), "no PORT_ACTIVE read from the device"
        assert ta.metrics.value("umbra_rdma_async_events", device=ta.device, event="IBV_EVENT_PORT_ACTIVE",
                                source="device") >= 1
        # the B side saw the same events on its own context and is back too
        assert wait_for(lambda: pr.b.transport.context.active)
        write_and_verify(pr, 18, 0)
    finally:
        if ndev is not None:
            subprocess.run(["ip", "link", "set", ndev, "up"], check=False)
        pr.close()

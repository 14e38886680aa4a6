"""Per-device RDMA context: device, PD, one CQ with a completion channel, the async-event reader,
registered memory, the endpoints, and the one worker thread that posts and polls.

Threads
-------
All data-path state (endpoints, QP outstanding counts, the WR table) is owned by the *worker*
thread. Other threads talk to it through two queues: ``submit`` appends slices to the inbox, and
everything else (a finished handshake, an injected async event, an abort, a peer's fault report)
is a command run by the worker. A small *connector* pool runs handshakes, because they wait on the
network. The engine's control-server thread answers passive handshakes (creating the answering QPs
under a lock of their own).

The worker never blocks while holding the GIL: it polls the CQ (non-blocking), and when there is
nothing to do it arms the CQ, then ``select``\\ s on the completion channel's fd, the async-event fd
and a wake-up pipe (``select`` releases the GIL; pyverbs' blocking ``get_cq_event`` and
``get_async_event`` would not, so both fds are made non-blocking first). pyverbs 44 exposes neither
fd; they are found as the ``anon_inode:[infinibandevent]`` descriptors that appear when the
context and the channel are created (the async fd is ``cmd_fd + 1`` on rdma-core 44).

Posting: pending slices are spread over the endpoint's QPs, at most ``max_wr`` outstanding per QP
and ``max_cqe`` per CQ (a CQ overrun loses completions on rxe), as chains of up to ``max_chain`` WRs
posted with one ``ibv_post_send`` (one doorbell). The WR/SGE objects of a chain are built once and
reused (building them costs ~0.1 ms each under TCG, and pyverbs 44 leaks their SGE arrays unless
closed).

Failures: see :mod:`store.transfer.rdma.endpoint` (retire the endpoint, retry flushed WRs on a
fresh generation) and :mod:`store.transfer.rdma.policy` (what to retry, when to pause a path).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import json
import logging
import os
import select
import threading
import time
from bisect import bisect_right
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyverbs.enums as e
from pyverbs.cq import CQ, CQEX, CompChannel, CqInitAttrEx, PollCqAttr
from pyverbs.device import Context
from pyverbs.mr import MR
from pyverbs.pd import PD
from pyverbs.pyverbs_error import PyverbsError, PyverbsRDMAError
from pyverbs.wr import SGE, SendWR

from store.errors import ErrorCode, StoreError
from store.failpoints import failpoint
from store.transfer.rdma import device
from store.transfer.rdma import handshake as hs
from store.transfer.rdma.config import RdmaConfig, mtu_to_bytes
from store.transfer.rdma.endpoint import (
    ACCESS_ALL,
    Endpoint,
    EpState,
    PassiveEndpoint,
    QpHandle,
    Role,
    create_qp,
)
from store.transfer.rdma.errors import (
    DEVICE_DOWN_EVENTS,
    DEVICE_UP_EVENTS,
    QP_ERROR_EVENTS,
    AsyncEventType,
    DeviceError,
    HandshakeError,
    RdmaError,
    WcStatus,
    describe_event,
    describe_wc,
    event_type_name,
    is_request_fault,
    wc_status_name,
)
from store.transfer.rdma.metrics import RdmaMetrics
from store.transfer.rdma.policy import Action, PathHealth, RetryPolicy, plan_posts, reconnect_delay
from store.transfer.transport import Opcode, Slice

log = logging.getLogger(__name__)

_OPCODE = {Opcode.WRITE: e.IBV_WR_RDMA_WRITE, Opcode.READ: e.IBV_WR_RDMA_READ}
_SIGNALED = e.IBV_SEND_SIGNALED
_EVENT_FD_LINK = "anon_inode:[infinibandevent]"
_fd_lock = threading.Lock()  # serialises "create object, then find the fd it opened"

# pyverbs 44 names the SendWR/SGE destructors ``__dealloc`` (a typo: never called), so a WR can be
# pointed at an SGE we own and reused without a double free. A fixed pyverbs frees them itself;
# then WRs are built per post and closed right after.
_REUSE_WRS = hasattr(SendWR, "_SendWR__dealloc") or "__dealloc" in dir(SendWR)

HOUSEKEEPING_S = 0.05
IDLE_WAIT_S = 1.0
POLL_BUDGET = 1024  # completions handled per step before posting again


# ---------------------------------------------------------------------------------- fds


def _event_fds() -> set[int]:
    out = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == _EVENT_FD_LINK:
                out.add(int(name))
        except (OSError, ValueError):
            continue
    return out


def _set_nonblocking(fd: int) -> None:
    fl = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, fl | os.O_NONBLOCK)


def open_context_with_async_fd(name: str) -> tuple[Context, int]:
    """``Context(name)`` plus its async-event fd, made non-blocking."""
    with _fd_lock:
        before = _event_fds()
        ctx = Context(name=name)
        new = sorted(_event_fds() - before)
    if not new:
        ctx.close()
        raise DeviceError(f"{name}: cannot find the async event fd of the new context")
    fd = ctx.cmd_fd + 1 if ctx.cmd_fd + 1 in new else new[0]
    _set_nonblocking(fd)
    return ctx, fd


def create_channel_with_fd(ctx: Context) -> tuple[CompChannel, int]:
    with _fd_lock:
        before = _event_fds()
        ch = CompChannel(ctx)
        new = sorted(_event_fds() - before)
    if len(new) != 1:
        ch.close()
        raise DeviceError(f"cannot find the completion channel fd (candidates {new})")
    _set_nonblocking(new[0])
    return ch, new[0]


# ---------------------------------------------------------------------------------- devices


def auto_gid_index(ctx: Context, port: int) -> int:
    """The ``auto`` GID index: :func:`store.transfer.rdma.device.pick_gid_index` (first RoCE v2
    IPv4-mapped GID, as Mooncake's ``getBestGidIndex``), the same rule ``umbra doctor`` prints."""
    try:
        return device.pick_gid_index(ctx, port)
    except PyverbsError as exc:
        raise DeviceError(f"reading the GID table of port {port} failed: {exc}") from exc


# ---------------------------------------------------------------------------------- WR chains


class _Chain:
    """A reusable linked list of SendWRs, each pointing at its own SGE.

    To post ``k`` WRs the suffix ``wrs[n-k:]`` is filled and posted from ``wrs[n-k]``: the last WR
    always ends the list (pyverbs cannot set ``next`` back to NULL)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.sges = [SGE(0, 0, 0) for _ in range(n)]
        self.wrs: list[SendWR] = []
        for sge in self.sges:
            wr = SendWR(wr_id=0, opcode=e.IBV_WR_RDMA_WRITE, num_sge=1, sg=[sge], send_flags=_SIGNALED)
            wr.close()  # free the WR's private copy of the SGE array ...
            wr.sg_list = sge  # ... and point it at the SGE we keep filling
            self.wrs.append(wr)
        for a, b in itertools.pairwise(self.wrs):
            a.next_wr = b
        # what each slot's SGE/WR holds now: (length, lkey, opcode)
        self.slots: list[tuple[int, int, int]] = [(0, 0, int(e.IBV_WR_RDMA_WRITE))] * n
        bad_sge = SGE(0, 0, 0)
        self.bad = SendWR(wr_id=0, opcode=e.IBV_WR_RDMA_WRITE, num_sge=1, sg=[bad_sge])
        bad_sge.close()

    def close(self) -> None:
        for sge in self.sges:
            sge.close()  # the WRs' sg_list points here; the WRs themselves are never closed again
        self.sges = []
        self.wrs = []


# ---------------------------------------------------------------------------------- MRs


class MrEntry:
    """A registered memory region: the fault layer may ``deregister()`` it (really ``ibv_dereg_mr``)."""

    __slots__ = ("addr", "length", "lkey", "mr", "rkey")

    def __init__(self, mr: MR, addr: int, length: int) -> None:
        self.mr: MR | None = mr
        self.addr = addr
        self.length = length
        self.lkey = mr.lkey
        self.rkey = mr.rkey

    @property
    def registered(self) -> bool:
        return self.mr is not None

    def deregister(self) -> bool:
        mr, self.mr = self.mr, None
        if mr is None:
            return False
        mr.close()
        return True

    def describe(self) -> dict[str, Any]:
        return {"addr": self.addr, "length": self.length, "lkey": self.lkey, "rkey": self.rkey,
                "registered": self.registered}


# ---------------------------------------------------------------------------------- context


class RdmaContext:
    """One opened RDMA device and everything hanging off it. See the module docstring."""

    def __init__(self, config: RdmaConfig, *, control: Any, local_server: str,
                 metrics: RdmaMetrics | None = None, device_name: str | None = None) -> None:
        self.config = config
        self.control = control  # has control_call(endpoint, msg_type, payload, timeout) -> bytes
        self.local_server = local_server
        self.metrics = metrics or RdmaMetrics()
        self.policy = RetryPolicy(config.retry_cap)
        name = device_name or config.device_name
        if "," in name:  # Mooncake accepts a list of NICs; this transport drives one context
            first = name.split(",")[0].strip()
            log.warning("rdma: device_name %r lists several devices; using %s only", name, first)
            name = first
        if not name:
            devices = device.list_device_names()
            if not devices:
                raise DeviceError("no RDMA device found (/sys/class/infiniband is empty)")
            name = devices[0]
        self.device = name
        self._closed = False
        self._resources: list[Any] = []
        try:
            self._open()
        except PyverbsError as exc:
            self._close_resources()
            raise DeviceError(f"opening RDMA device {name} failed: {exc}") from exc
        except BaseException:
            self._close_resources()
            raise

        self._mr_lock = threading.Lock()
        self._mrs: dict[int, MrEntry] = {}
        self._mr_starts: list[int] = []
        self._mr_list: list[MrEntry] = []

        self._ep_lock = threading.Lock()
        self._endpoints: dict[tuple[str, str], Endpoint] = {}
        self._passive_lock = threading.Lock()
        self._passive: dict[str, PassiveEndpoint] = {}
        self._qps: dict[int, QpHandle] = {}  # qp_num -> handle (active and passive, live ones)

        self._inbox: deque[tuple[Endpoint, Slice]] = deque()
        self._cmds: deque[Callable[[], None]] = deque()
        self._work: set[Endpoint] = set()
        self._wrs: dict[int, tuple[Slice, QpHandle, float]] = {}  # wr_id -> (slice, QP, posted at)
        self._wr_ids = itertools.count(1)
        self._outstanding = 0
        self._retired: list[QpHandle] = []
        self._sleeping = False
        self._wake_r, self._wake_w = os.pipe()
        _set_nonblocking(self._wake_r)
        _set_nonblocking(self._wake_w)
        self.active = self.port_active
        self.down_reason = "" if self.active else f"port {config.port} not ACTIVE at open"
        self.async_counts: Counter[str] = Counter()
        self._ok_since_flush = 0
        self._bytes_since_flush = {Opcode.WRITE: 0, Opcode.READ: 0}
        self._m_ok = self.metrics.completions.labels(self.device, wc_status_name(0))
        self._m_bytes = {op: self.metrics.bytes.labels(self.device, op.name) for op in Opcode}
        self._chain = _Chain(config.max_chain) if _REUSE_WRS else None
        self._poll_wait_min = 50e-6
        self._poll_wait_max = max(self._poll_wait_min, config.poll_interval_max_us / 1e6)
        self._poll_wait = self._poll_wait_min
        self._connector = ThreadPoolExecutor(max_workers=2, thread_name_prefix=f"rdma-connect-{self.device}")
        self._stopped = threading.Event()
        self._worker = threading.Thread(target=self._run, name=f"rdma-worker-{self.device}", daemon=True)
        self._worker.start()
        log.info("rdma: context %s up: port %d %s active_mtu %d local_mtu %d gid_index %d gid %s "
                 "num_qp_per_ep %d max_wr %d max_cqe %d qp_timeout %d retry_cnt %d (dead peer -> error in "
                 "~%.1fs) mtu_negotiation %s cq %s", self.device, config.port,
                 "ACTIVE" if self.active else "DOWN", self.active_mtu, self.local_mtu, self.gid_index,
                 self.gid, config.num_qp_per_ep, config.max_wr, config.max_cqe, config.qp_timeout,
                 config.qp_retry_cnt, config.retry_exhaustion_s(), config.mtu_negotiation, self.cq_mode)

    # ------------------------------------------------------------------ open / close

    def _open(self) -> None:
        cfg = self.config
        self.ctx, self.async_fd = open_context_with_async_fd(self.device)
        self._resources.append(self.ctx)
        dev_attr = self.ctx.query_device()
        port_attr = self.ctx.query_port(cfg.port)
        self.port_state = int(port_attr.state)
        self.active_mtu = mtu_to_bytes(int(port_attr.active_mtu))
        self.local_mtu = min(self.active_mtu, cfg.mtu)
        self.lid = int(port_attr.lid)
        self.gid_table_len = int(port_attr.gid_tbl_len)
        self.gid_index = cfg.gid_index if cfg.gid_index is not None else auto_gid_index(self.ctx, cfg.port)
        self.gid = hs.normalize_gid(str(self.ctx.query_gid(cfg.port, self.gid_index)))
        if set(self.gid.replace(":", "")) <= {"0"}:
            raise DeviceError(f"{self.device} port {cfg.port}: GID[{self.gid_index}] is NULL, please check "
                              f"your GID index by specifying MC_GID_INDEX")
        self.max_qp_wr = int(dev_attr.max_qp_wr)
        self.qp_cap = min(cfg.max_wr, self.max_qp_wr)
        self.cq_cap = min(cfg.max_cqe, int(dev_attr.max_cqe))
        self.pd = PD(self.ctx)
        self._resources.append(self.pd)
        self._cq_events = 0
        self.channel: CompChannel | None = None
        self.comp_fd: int | None = None
        self.cq: Any = None
        if cfg.cq_mode in ("auto", "ex"):
            try:
                self.cq = CQEX(self.ctx, CqInitAttrEx(cqe=self.cq_cap))
            except PyverbsError as exc:
                if cfg.cq_mode == "ex":
                    raise
                log.info("rdma: %s has no extended CQ (%s); using a CQ with a completion channel",
                         self.device, exc)
        if self.cq is not None:
            self.cq_mode = "ex"
            self._poll_attr = PollCqAttr()
        else:
            self.cq_mode = "channel"
            self.channel, self.comp_fd = create_channel_with_fd(self.ctx)
            self._resources.append(self.channel)
            self.cq = CQ(self.ctx, self.cq_cap, None, self.channel, 0)
        self._resources.append(self.cq)

    @property
    def port_active(self) -> bool:
        return self.port_state == e.IBV_PORT_ACTIVE

    def _close_resources(self) -> None:
        for obj in reversed(self._resources):
            try:
                obj.close()
            except PyverbsError as exc:
                log.warning("rdma: closing %s on %s failed: %s", type(obj).__name__, self.device, exc)
        self._resources.clear()

    def close(self, timeout: float = 10.0) -> None:
        """Stop the worker, fail what is queued or in flight, notify peers, free every resource."""
        if threading.current_thread() is self._worker:
            # called from a completion callback: the worker must unwind before anything is freed
            threading.Thread(target=self.close, args=(timeout,), name=f"rdma-close-{self.device}",
                             daemon=True).start()
            return
        if self._closed:
            return
        self._closed = True
        self._stopped.set()
        self._wake()
        self._worker.join(timeout)
        if self._worker.is_alive():
            # freeing verbs objects under a live worker would crash the process: leak them instead
            log.error("rdma: worker of %s did not stop within %.1fs (held by a failpoint pause or a "
                      "blocked call?); leaving its QPs, CQ and context allocated", self.device, timeout)
            return
        self._connector.shutdown(wait=True, cancel_futures=True)
        self._drain_on_stop()  # connect results that arrived late: free their QPs
        # Whatever the worker left: complete it as failed (the engine must see every slice once).
        while self._inbox:
            _, s = self._inbox.popleft()
            s.complete(False, f"rdma transport on {self.device} closed", retryable=False)
        with self._ep_lock:
            endpoints = list(self._endpoints.values())
            self._endpoints.clear()
        for ep in endpoints:
            while ep.pending:
                ep.pending.popleft().complete(False, f"rdma transport on {self.device} closed",
                                              retryable=False)
            for q in ep.qps:
                q.to_err()
            ep.state = EpState.CLOSED
        for s, _q, _t in list(self._wrs.values()):
            s.complete(False, f"rdma transport on {self.device} closed with the WR in flight",
                       retryable=False)
        self._wrs.clear()
        for ep in endpoints:
            if ep.connections:
                self._notify_peer(ep.peer_server, hs.MSG_DISCONNECT,
                                  {"ep_id": ep.ep_id, "generation": ep.generation})
        with self._passive_lock:
            passive = list(self._passive.values())
            self._passive.clear()
        handles = [q for ep in endpoints for q in ep.qps] + self._retired
        handles += [q for p in passive for q in p.qps]
        for q in handles:
            q.destroy()
        self._qps.clear()
        with self._mr_lock:
            mrs = list(self._mrs.values())
            self._mrs.clear()
            self._mr_starts, self._mr_list = [], []
        for m in mrs:
            m.deregister()
        if self._chain is not None:
            self._chain.close()
        if self._cq_events and self.cq_mode == "channel":
            self.cq.ack_events(self._cq_events)
            self._cq_events = 0
        self._close_resources()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        log.info("rdma: context %s closed", self.device)

    # ------------------------------------------------------------------ memory

    def register_memory(self, addr: int, length: int, access: int = ACCESS_ALL) -> MrEntry:
        if length <= 0:
            raise RdmaError(f"cannot register {length} bytes at {addr:#x} on {self.device}",
                            ErrorCode.INVALID_PARAMS)
        with self._mr_lock:
            if addr in self._mrs:
                raise RdmaError(f"{addr:#x} is already registered on {self.device}", ErrorCode.INVALID_PARAMS)
            try:
                mr = MR(self.pd, length, access, address=addr)
            except PyverbsError as exc:
                raise RdmaError(f"ibv_reg_mr of [{addr:#x}, +{length}) on {self.device} failed: "
                                f"{exc}") from exc
            entry = MrEntry(mr, addr, length)
            self._mrs[addr] = entry
            self._rebuild_mr_index()
        log.debug("rdma: registered [%#x, +%d) on %s lkey=%#x rkey=%#x", addr, length, self.device,
                  entry.lkey, entry.rkey)
        return entry

    def unregister_memory(self, addr: int) -> None:
        with self._mr_lock:
            entry = self._mrs.pop(addr, None)
            if entry is None:
                raise RdmaError(f"{addr:#x} is not registered on {self.device}", ErrorCode.INVALID_PARAMS)
            self._rebuild_mr_index()
        entry.deregister()

    def _rebuild_mr_index(self) -> None:
        items = sorted(self._mrs.values(), key=lambda m: m.addr)
        self._mr_list = items
        self._mr_starts = [m.addr for m in items]

    def find_mr(self, addr: int, length: int) -> MrEntry | None:
        starts, items = self._mr_starts, self._mr_list  # one consistent snapshot
        i = bisect_right(starts, addr) - 1
        if i < 0:
            return None
        m = items[i]
        if addr + length <= m.addr + m.length and m.registered:
            return m
        return None

    def memory_regions(self) -> list[MrEntry]:
        with self._mr_lock:
            return list(self._mr_list)

    # ------------------------------------------------------------------ submit side

    def endpoint_for(self, peer_server: str, peer_device: str) -> Endpoint:
        key = (peer_server, peer_device)
        ep = self._endpoints.get(key)
        if ep is not None:
            return ep
        with self._ep_lock:
            ep = self._endpoints.get(key)
            if ep is None:
                cfg = self.config
                ep = Endpoint(self.device, peer_server, peer_device, self.local_server,
                              PathHealth(cfg.pause_after_failures, cfg.pause_window_s, cfg.pause_seconds))
                self._endpoints[key] = ep
        return ep

    def enqueue(self, items: list[tuple[Endpoint, Slice]]) -> None:
        if self._closed:
            for _, s in items:
                s.complete(False, f"rdma transport on {self.device} is closed", retryable=False)
            return
        self._inbox.extend(items)
        if self._sleeping:
            self._wake()

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the worker thread."""
        self._cmds.append(fn)
        if self._sleeping:
            self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"\0")

    def inject_async_event(self, event_type: int | str, qp_num: int | None = None) -> None:
        """Deliver a synthetic async event through the same handler as real ones.

        rxe raises no QP-affiliated events (QP_FATAL, QP_REQ_ERR, QP_ACCESS_ERR) for any fault, so
        the fault layer injects them; ``qp_num`` names the QP the event is about (real events
        carry no QP in pyverbs 44, and the handler then finds errored QPs by querying them)."""
        if isinstance(event_type, str):
            name = event_type.upper().removeprefix("IBV_EVENT_")
            event_type = int(AsyncEventType[name])
        ev = int(event_type)
        self.call_soon(lambda: self._handle_async_event(ev, qp_num, "injected"))

    # ------------------------------------------------------------------ worker

    def _run(self) -> None:
        next_hk = time.monotonic()
        while True:
            try:
                if self._stopped.is_set():
                    self._drain_on_stop()
                    return
                busy = self._step()
                now = time.monotonic()
                if now >= next_hk:
                    self._housekeeping(now)
                    next_hk = now + HOUSEKEEPING_S
                if not busy:
                    self._idle_wait(next_hk)
            except Exception:  # the worker must survive any bug, or every slice would hang
                log.exception("rdma: worker of %s hit an unexpected error; continuing", self.device)
                time.sleep(0.01)

    def _drain_on_stop(self) -> None:
        """Run queued commands once (so connect results free their QPs), then stop."""
        while self._cmds:
            try:
                self._cmds.popleft()()
            except Exception:
                log.exception("rdma: command failed while %s was stopping", self.device)

    def _step(self) -> bool:
        busy = False
        while self._cmds:
            self._cmds.popleft()()
            busy = True
        if self._inbox:
            self._route_inbox()
            busy = True
        if self._poll_cq():
            busy = True
        if self._work and self._post_work():
            busy = True
        return busy

    def _idle_wait(self, next_hk: float) -> None:
        self._sleeping = True
        try:
            if self._cmds or self._inbox:
                return
            fds = [self._wake_r, self.async_fd]
            if self.comp_fd is not None:
                try:
                    self.cq.req_notify()
                except PyverbsError as exc:
                    log.warning("rdma: ibv_req_notify_cq on %s failed: %s", self.device, exc)
                if self._poll_cq():
                    return
                fds.append(self.comp_fd)
            nothing_pending = not self._wrs and not self._retired and not self._work
            timeout = IDLE_WAIT_S if nothing_pending else max(0.0, next_hk - time.monotonic())
            if self._wrs and self.comp_fd is None:
                # the extended CQ cannot be armed: come back soon, later and later while nothing arrives
                timeout = min(timeout, self._poll_wait)
                self._poll_wait = min(self._poll_wait * 2, self._poll_wait_max)
            try:
                ready, _, _ = select.select(fds, [], [], timeout)
            except (OSError, ValueError) as exc:
                if self._stopped.is_set():
                    return
                log.warning("rdma: select on %s failed: %s", self.device, exc)
                time.sleep(0.01)
                return
        finally:
            self._sleeping = False
        if self.comp_fd is not None and self.comp_fd in ready:
            self._drain_cq_events()
        if self._wake_r in ready:
            with contextlib.suppress(BlockingIOError, OSError):
                while os.read(self._wake_r, 4096):
                    pass
        if self.async_fd in ready:
            self._read_async_events()

    def _drain_cq_events(self) -> None:
        assert self.channel is not None
        n = 0
        while True:
            try:
                self.channel.get_cq_event(self.cq)
            except PyverbsError:
                break
            n += 1
        if n:
            self.cq.ack_events(n)

    def _housekeeping(self, now: float) -> None:
        if self._ok_since_flush:
            self._m_ok.inc(self._ok_since_flush)
            self._ok_since_flush = 0
        for op, n in self._bytes_since_flush.items():
            if n:
                self._m_bytes[op].inc(n)
                self._bytes_since_flush[op] = 0
        self.metrics.outstanding.labels(self.device).set(self._outstanding)
        if self._retired:
            self._reap_retired(now)
        if self.config.slice_timeout_s > 0 and self._wrs:
            self._check_slice_timeouts(now)
        paused = 0
        for ep in list(self._endpoints.values()):
            if ep.state is EpState.PAUSED:
                if not ep.health.is_paused(now):
                    ep.state = EpState.UNCONNECTED
                    log.info("rdma: path %s -> %s resumes after its pause", self.device, ep.peer_nic_path)
                else:
                    paused += 1
            if ep.pending:
                self._work.add(ep)
        self.metrics.paused_paths.labels(self.device).set(paused)
        # no fd wake-up is guaranteed for async events while busy: look every housekeeping tick
        ready, _, _ = select.select([self.async_fd], [], [], 0)
        if ready:
            self._read_async_events()

    # ------------------------------------------------------------------ routing and posting

    def _route_inbox(self) -> None:
        inbox = self._inbox
        work = self._work
        while inbox:
            ep, s = inbox.popleft()
            ep.pending.append(s)
            work.add(ep)

    def _post_work(self) -> bool:
        did = False
        now = time.monotonic()
        for ep in list(self._work):
            if not ep.pending:
                self._work.discard(ep)
                continue
            st = ep.state
            if st is EpState.CONNECTED:
                if self._post_endpoint(ep):
                    did = True
                if not ep.pending:
                    self._work.discard(ep)
            elif st is EpState.UNCONNECTED:
                if not self.active:
                    self._fail_pending(ep, f"device {self.device} is out of service ({self.down_reason})",
                                       retryable=True)
                    self._work.discard(ep)
                    did = True
                elif now >= ep.next_connect_at:
                    self._start_connect(ep)
                    did = True
            elif st is EpState.PAUSED:
                self._fail_pending(
                    ep, f"path {self.device} -> {ep.peer_nic_path} is paused for another "
                        f"{ep.health.remaining(now):.1f}s after repeated failures ({ep.last_error})",
                    retryable=False)
                self._work.discard(ep)
                did = True
            else:  # CONNECTING: the connector will wake us
                self._work.discard(ep)
        return did

    def _post_endpoint(self, ep: Endpoint) -> bool:
        cap = self.qp_cap
        qp_free = [cap - q.outstanding for q in ep.qps]
        plan = plan_posts(len(ep.pending), qp_free, self.cq_cap - self._outstanding,
                          self.config.max_chain, ep.rr)
        if not plan:
            return False
        ep.rr += 1
        posted = False
        limit = self.config.max_chain_bytes
        for qi, count in plan:
            batch: list[Slice] = []
            nbytes = 0
            while len(batch) < count and ep.pending:
                if batch and nbytes + ep.pending[0].length > limit:
                    self._post_chain(ep, ep.qps[qi], batch)  # one doorbell per max_chain_bytes
                    posted = True
                    if ep.state is not EpState.CONNECTED:
                        return posted
                    count -= len(batch)
                    batch, nbytes = [], 0
                    continue
                s = ep.pending.popleft()
                if s.abandoned:
                    s.complete(False, "request over before the slice was posted", retryable=False)
                    continue
                if ep.dead_rkeys and ep.rkey_dead(s.rkey, time.monotonic()):
                    self._fail_dead_rkey(ep, s, f"{s.opcode.name} [{s.remote_addr:#x}, +{s.length}] to "
                                                f"{ep.peer_nic_path}: remote access error")
                    continue
                batch.append(s)
                nbytes += s.length
            if batch:
                self._post_chain(ep, ep.qps[qi], batch)
                posted = True
            if ep.state is not EpState.CONNECTED:
                break  # the post failed and retired the endpoint
        return posted

    def _post_chain(self, ep: Endpoint, q: QpHandle, batch: list[Slice]) -> None:
        lookup = self.find_mr
        ok: list[tuple[Slice, int, int]] = []  # (slice, wr_id, lkey)
        for s in batch:
            mr = lookup(s.local_addr, s.length)
            if mr is None:
                s.complete(False, f"local [{s.local_addr:#x}, +{s.length}) is not registered on "
                                  f"{self.device} (Memory region not registered by any active device(s))",
                           code=ErrorCode.INVALID_PARAMS, retryable=False)
                continue
            ok.append((s, next(self._wr_ids), mr.lkey))
        k = len(ok)
        if not k:
            return
        chain = self._chain
        own: list[tuple[SendWR, SGE]] = []
        bad: SendWR | None = None
        if chain is not None and k <= chain.n:
            start = chain.n - k
            sges, cwrs = chain.sges, chain.wrs
            slots = chain.slots
            for j, (s, wr_id, lkey) in enumerate(ok):
                i = start + j
                sge = sges[i]
                sge.addr = s.local_addr
                wr = cwrs[i]
                wr.wr_id = wr_id
                wr.set_wr_rdma(s.rkey, s.remote_addr)
                # pyverbs setters cost ~10 µs each under TCG: skip the ones that did not change
                length, opcode = s.length, _OPCODE[s.opcode]
                last = slots[i]
                if last[0] != length:
                    sge.length = length
                if last[1] != lkey:
                    sge.lkey = lkey
                if last[2] != opcode:
                    wr.opcode = opcode
                slots[i] = (length, lkey, opcode)
            head = cwrs[start]
            bad = chain.bad
        else:
            prev = None
            for s, wr_id, lkey in reversed(ok):
                sge = SGE(s.local_addr, s.length, lkey)
                if prev is None:
                    wr = SendWR(wr_id=wr_id, opcode=_OPCODE[s.opcode], num_sge=1, sg=[sge],
                                send_flags=_SIGNALED)
                else:
                    wr = SendWR(wr_id=wr_id, opcode=_OPCODE[s.opcode], num_sge=1, sg=[sge],
                                send_flags=_SIGNALED, next_wr=prev)
                wr.set_wr_rdma(s.rkey, s.remote_addr)
                own.append((wr, sge))
                prev = wr
            head = own[-1][0]
        posted_upto = k
        error = ""
        try:
            failpoint("rdma.post_send", device=self.device, qp_num=q.qp_num, peer=ep.peer_nic_path, count=k)
            q.post_send(head, bad)
        except StoreError as exc:
            posted_upto, error = 0, f"post_send on {self.device} qp_num={q.qp_num}: {exc.message}"
        except PyverbsRDMAError as exc:
            posted_upto = 0
            if bad is not None:
                ids = [wr_id for _, wr_id, _ in ok]
                if bad.wr_id in ids:
                    posted_upto = ids.index(bad.wr_id)
            error = f"ibv_post_send on {self.device} qp_num={q.qp_num} failed: {exc}"
        except PyverbsError as exc:
            posted_upto, error = 0, f"post_send on {self.device} qp_num={q.qp_num} failed: {exc}"
        finally:
            for w, sge in own:
                w.close()
                sge.close()
        wrs_map = self._wrs
        posted_q = q.posted
        where = q.where  # one shared, read-only dict per QP: no allocation per slice
        now = time.monotonic()
        for j in range(posted_upto):
            s, wr_id, _ = ok[j]
            wrs_map[wr_id] = (s, q, now)
            posted_q.append(wr_id)
            s.where = where
        q.outstanding += posted_upto
        self._outstanding += posted_upto
        if posted_upto < k:
            peer = ep.peer_nic_path
            log.warning("rdma: %s; %d of %d WRs not posted to %s", error, k - posted_upto, k, peer)
            self._fault_endpoint(ep, None, error, q)
            for s, _, _ in ok[posted_upto:]:
                self._retry_or_fail(ep, s, WcStatus.WR_FLUSH_ERR, f"{s.opcode.name} to {peer}: {error}")

    # ------------------------------------------------------------------ completions

    def _read_completions(self, limit: int) -> list[tuple[int, int, int]]:
        """Up to ``limit`` completions as ``(wr_id, status, vendor_err)``."""
        cq = self.cq
        if self.cq_mode == "ex":
            # One completion per start_poll/end_poll: providers disagree on next_poll at the end of
            # the queue (rxe stores the consumer index and unlocks there, so a following end_poll
            # consumes a second entry; mlx5 needs that end_poll). start + end of one entry means the
            # same on both.
            out: list[tuple[int, int, int]] = []
            attr = self._poll_attr
            while len(out) < limit and cq.start_poll(attr) == 0:
                st = cq.status
                out.append((cq.wr_id, st, cq.read_vendor_err() if st else 0))
                cq.end_poll()
            return out
        _, wcs = cq.poll(limit)
        return [(wc.wr_id, wc.status, wc.vendor_err) for wc in wcs]

    def _poll_cq(self) -> int:
        try:
            failpoint("rdma.poll_cq", device=self.device)
        except StoreError as exc:
            log.warning("rdma: poll of %s skipped by failpoint: %s", self.device, exc.message)
            return 0
        total = 0
        batch = self.config.poll_batch
        wrs = self._wrs
        while total < POLL_BUDGET:
            try:
                wcs = self._read_completions(batch)
            except PyverbsError as exc:
                log.error("rdma: polling the CQ of %s failed: %s", self.device, exc)
                return total
            n = len(wcs)
            if not n:
                break
            total += n
            ok = 0
            for wr_id, status, vendor_err in wcs:
                entry = wrs.pop(wr_id, None)
                if entry is None:
                    log.debug("rdma: completion for unknown wr_id %d status %s on %s", wr_id,
                              describe_wc(status), self.device)
                    continue
                s, q, _ = entry
                q.outstanding -= 1
                self._outstanding -= 1
                posted = q.posted
                while posted and posted[0] not in wrs:
                    posted.popleft()
                if status == 0:
                    ok += 1
                    self._bytes_since_flush[s.opcode] += s.length
                    s.complete(True)
                else:
                    self._on_wc_error(s, q, status, vendor_err)
            if ok:
                self._ok_since_flush += ok
            if n < batch:
                break
        if total:
            self._poll_wait = self._poll_wait_min
        return total

    def _on_wc_error(self, s: Slice, q: QpHandle, status: int, vendor_err: int = 0) -> None:
        ep = q.endpoint
        name = wc_status_name(status)
        self.metrics.completions.labels(self.device, name).inc()
        if not isinstance(ep, Endpoint):
            s.complete(False, f"{describe_wc(status)} on {self.device} qp_num={q.qp_num} (no endpoint)")
            return
        ep.completions[name] += 1
        if status == WcStatus.REM_ACCESS_ERR and s.segment.find_buffer(s.remote_addr, s.length) is not None:
            # inside a published buffer, so bounds do not explain the refusal: the rkey is suspect
            self._note_rkey_fault(ep, s.rkey)
        text = (f"{s.opcode.name} [{s.local_addr:#x} -> {s.remote_addr:#x}, +{s.length}] rkey={s.rkey:#x} "
                f"on {self.device} qp_num={q.qp_num} peer={ep.peer_nic_path}: {describe_wc(status)}")
        if not q.retired and q.generation == ep.generation:
            # the first error of this QP: one endpoint fault for the whole burst
            log.warning("rdma: Process failed for slice: %s vendor_err=%#x retry %d/%d", text, vendor_err,
                        s.retries, self.config.retry_cap)
            self._fault_endpoint(ep, status, describe_wc(status), q)
        elif status != WcStatus.WR_FLUSH_ERR:
            log.info("rdma: slice failed on retired qp_num=%d: %s", q.qp_num, text)
        self._retry_or_fail(ep, s, status, text)

    def _retry_or_fail(self, ep: Endpoint, s: Slice, status: int, text: str) -> None:
        if s.abandoned:
            s.complete(False, f"{text}; request already over", retryable=False)
            return
        if ep.dead_rkeys and ep.rkey_dead(s.rkey, time.monotonic()):
            self._fail_dead_rkey(ep, s, text)
            return
        action = self.policy.decide(status, s.retries)
        if action is Action.RETRY and ep.state is not EpState.PAUSED and ep.state is not EpState.CLOSED \
                and self.active:
            s.retries += 1
            ep.retries += 1
            self.metrics.retries.labels(self.device, ep.peer_nic_path).inc()
            ep.pending.append(s)
            self._work.add(ep)
            return
        if is_request_fault(status):
            reason, retryable = "request_fault", False
        elif ep.state is EpState.PAUSED:
            reason, retryable = "path_paused", False
        elif not self.active:
            reason, retryable = "device_down", True
        else:
            reason, retryable = "retry_cap", False
        self.metrics.slices_failed.labels(self.device, reason).inc()
        s.complete(False, f"{text} (after {s.retries} retr{'y' if s.retries == 1 else 'ies'}; {reason})",
                   code=ErrorCode.TRANSFER_FAIL, retryable=retryable)

    def _note_rkey_fault(self, ep: Endpoint, rkey: int) -> None:
        now = time.monotonic()
        prev = ep.rkey_faults.get(rkey)
        ep.rkey_faults[rkey] = now
        if prev is not None and now - prev <= self.config.rkey_fault_window_s and not ep.rkey_dead(rkey, now):
            ep.dead_rkeys[rkey] = now + self.config.dead_rkey_hold_s
            log.warning("rdma: rkey %#x rejected again by %s (remote access error): taking it as "
                        "deregistered; slices using it fail at once for %.1fs", rkey, ep.peer_nic_path,
                        self.config.dead_rkey_hold_s)
        if len(ep.rkey_faults) > 256:
            for k in [k for k, t in ep.rkey_faults.items() if now - t > self.config.rkey_fault_window_s]:
                del ep.rkey_faults[k]

    def _fail_dead_rkey(self, ep: Endpoint, s: Slice, text: str) -> None:
        self.metrics.slices_failed.labels(self.device, "dead_rkey").inc()
        s.complete(False, f"{text}; rkey {s.rkey:#x} was refused twice with remote access error by "
                          f"{ep.peer_nic_path} (deregistered or stale descriptor)",
                   code=ErrorCode.TRANSFER_FAIL, retryable=False)

    # ------------------------------------------------------------------ faults

    def _fault_endpoint(self, ep: Endpoint, status: int | None, reason: str, q: QpHandle | None = None,
                        *, count_path: bool = True) -> None:
        """Retire the endpoint's current QPs after a fault and account for it."""
        now = time.monotonic()
        label = wc_status_name(status) if status is not None else reason.split(" ", 1)[0]
        ep.faults += 1
        ep.errors[label] += 1
        ep.last_error = reason
        self.metrics.endpoint_errors.labels(self.device, ep.peer_nic_path, label).inc()
        self.metrics.device_errors.labels(self.device, label).inc()
        self._retire(ep, reason)
        paused = False
        if count_path and (status is None or self.policy.is_path_failure(status)):
            paused = ep.health.record_failure(now)
        if paused:
            self._pause(ep, now)

    def _pause(self, ep: Endpoint, now: float) -> None:
        ep.state = EpState.PAUSED
        self.metrics.paused.labels(self.device, ep.peer_nic_path).inc()
        log.error("rdma: path %s -> %s paused for %.1fs after %d failures within %.1fs (last: %s)",
                  self.device, ep.peer_nic_path, self.config.pause_seconds, self.config.pause_after_failures,
                  self.config.pause_window_s, ep.last_error)
        self._fail_pending(ep, f"path {self.device} -> {ep.peer_nic_path} paused after repeated failures "
                               f"({ep.last_error})", retryable=False, reason="path_paused")

    def _retire(self, ep: Endpoint, reason: str) -> None:
        """Move every QP of the current generation to ERR (all outstanding WRs complete, flushed)
        and start a new generation; the old QPs are destroyed once drained."""
        try:
            failpoint("rdma.retire_endpoint", device=self.device, peer=ep.peer_nic_path, ep_id=ep.ep_id,
                      generation=ep.generation, qp_nums=[q.qp_num for q in ep.qps])
        except StoreError as exc:
            log.warning("rdma: failpoint at retire of %s: %s (retiring anyway)", ep.peer_nic_path,
                        exc.message)
        old = ep.qps
        now = time.monotonic()
        if old:
            log.warning("rdma: retiring endpoint %s -> %s generation %d qp_nums=%s: %s", self.device,
                        ep.peer_nic_path, ep.generation, [q.qp_num for q in old], reason)
        for q in old:
            q.retired = True
            q.retired_at = now
            q.drain_deadline = now + self.config.drain_timeout_s
            q.to_err()
            self._retired.append(q)
        ep.qps = []
        ep.retirements += 1 if old else 0
        ep.generation += 1
        if ep.state in (EpState.CONNECTED, EpState.CONNECTING):
            ep.state = EpState.UNCONNECTED
        ep.next_connect_at = now
        if ep.pending:
            self._work.add(ep)
        self.metrics.endpoints.labels(self.device, Role.ACTIVE.value).set(self._count_connected())

    def _count_connected(self) -> int:
        return sum(1 for ep in self._endpoints.values() if ep.state is EpState.CONNECTED)

    def _reap_retired(self, now: float) -> None:
        keep = []
        for q in self._retired:
            if q.outstanding > 0 and now < q.drain_deadline:
                keep.append(q)
                continue
            if q.outstanding > 0:
                lost = [wid for wid in q.posted if wid in self._wrs]
                log.warning("rdma: retired qp_num=%d on %s: %d WR(s) never completed within %.1fs; retrying "
                            "them", q.qp_num, self.device, len(lost), self.config.drain_timeout_s)
                for wid in lost:
                    s, _, _ = self._wrs.pop(wid)
                    self._outstanding -= 1
                    ep = q.endpoint
                    if isinstance(ep, Endpoint):
                        self._retry_or_fail(ep, s, WcStatus.WR_FLUSH_ERR,
                                            f"{s.opcode.name} slice lost on retired qp_num={q.qp_num}")
                    else:
                        s.complete(False, f"slice lost on retired qp_num={q.qp_num}")
                q.outstanding = 0
            q.posted.clear()
            self._qps.pop(q.qp_num, None)
            q.destroy()
        self._retired = keep

    def _check_slice_timeouts(self, now: float) -> None:
        limit = self.config.slice_timeout_s
        for ep in list(self._endpoints.values()):
            for q in ep.qps:
                posted = q.posted
                while posted and posted[0] not in self._wrs:
                    posted.popleft()
                if not posted:
                    continue
                _, _, started = self._wrs[posted[0]]
                if now - started > limit:
                    self._fault_endpoint(ep, None, f"completion timeout: wr_id {posted[0]} on qp_num="
                                                   f"{q.qp_num} outstanding for more than {limit:.1f}s", q)
                    break

    def _fail_pending(self, ep: Endpoint, error: str, *, retryable: bool, reason: str = "") -> None:
        n = 0
        while ep.pending:
            s = ep.pending.popleft()
            s.complete(False, error, code=ErrorCode.TRANSFER_FAIL, retryable=retryable and not s.abandoned)
            n += 1
        if n:
            self.metrics.slices_failed.labels(self.device, reason or ("device_down" if not self.active
                                                                      else "path_paused")).inc(n)

    def abort(self, slices: list[Slice]) -> None:
        """The engine gave up on these slices: drop the queued ones, tear down the QPs carrying the
        posted ones (their WRs flush; abandoned slices then complete as failed)."""
        ids = {id(s) for s in slices}

        def run() -> None:
            for ep in list(self._endpoints.values()):
                if ep.pending and any(id(s) in ids for s in ep.pending):
                    keep: deque[Slice] = deque()
                    for s in ep.pending:
                        if id(s) in ids:
                            s.complete(False, "aborted by the engine (slice timeout)", retryable=False)
                        else:
                            keep.append(s)
                    ep.pending = keep
            hit: dict[int, tuple[Endpoint, QpHandle]] = {}
            for s, q, _ in self._wrs.values():
                if id(s) in ids and isinstance(q.endpoint, Endpoint) and not q.retired:
                    hit[q.qp_num] = (q.endpoint, q)
            for ep, q in hit.values():
                if not q.retired and q.generation == ep.generation:
                    self._fault_endpoint(ep, None, f"completion timeout: the engine aborted slices on qp_num="
                                                   f"{q.qp_num}", q)

        self.call_soon(run)

    # ------------------------------------------------------------------ async events

    def _read_async_events(self) -> None:
        while True:
            try:
                ev = self.ctx.get_async_event()
            except PyverbsRDMAError as exc:
                if exc.error_code not in (errno.EAGAIN, errno.EWOULDBLOCK, 0):
                    log.warning("rdma: ibv_get_async_event on %s failed: %s", self.device, exc)
                return
            except PyverbsError as exc:
                log.warning("rdma: ibv_get_async_event on %s failed: %s", self.device, exc)
                return
            t = int(ev.event_type)
            ev.ack()  # ack at once: an unacked event makes destroying its object hang
            self._handle_async_event(t, None, "device")

    def _handle_async_event(self, ev: int, qp_num: int | None, source: str) -> None:
        name = event_type_name(ev)
        try:
            failpoint("rdma.async_event", device=self.device, event=name, qp_num=qp_num, source=source)
        except StoreError as exc:
            log.warning("rdma: async event %s on %s dropped by failpoint: %s", name, self.device, exc.message)
            return
        self.async_counts[name] += 1
        self.metrics.async_events.labels(self.device, name, source).inc()
        where = f" qp_num={qp_num}" if qp_num is not None else ""
        log.warning("rdma: Received context async event %s for context %s%s (%s)",
                    describe_event(ev), self.device, where, source)
        if ev in QP_ERROR_EVENTS:
            self._on_qp_error_event(ev, qp_num)
        elif ev in DEVICE_DOWN_EVENTS:
            self._device_down(describe_event(ev))
        elif ev in DEVICE_UP_EVENTS:
            self._device_up(describe_event(ev))
        elif ev == AsyncEventType.CQ_ERR:
            # completions were lost: every outstanding WR is suspect; flush and retry them all
            for ep in list(self._endpoints.values()):
                if ep.qps:
                    self._fault_endpoint(ep, None, f"CQ_ERR {describe_event(ev)} on {self.device}",
                                         count_path=False)
        elif ev == AsyncEventType.GID_CHANGE:
            self._refresh_gid()

    def _on_qp_error_event(self, ev: int, qp_num: int | None) -> None:
        reason = f"{event_type_name(ev).removeprefix('IBV_EVENT_')} {describe_event(ev)}"
        if qp_num is not None:
            q = self._qps.get(qp_num)
            if q is None:
                log.warning("rdma: async event %s names unknown qp_num=%d on %s", describe_event(ev), qp_num,
                            self.device)
                return
            targets = [q]
        else:
            # pyverbs 44 does not say which QP: look for QPs the kernel moved to ERR
            targets = [q for q in list(self._qps.values())
                       if not q.retired and q.state() in (e.IBV_QPS_ERR, e.IBV_QPS_SQE)]
        for q in targets:
            owner = q.endpoint
            if isinstance(owner, Endpoint):
                if not q.retired and q.generation == owner.generation:
                    self._fault_endpoint(owner, None, reason, q)
            elif isinstance(owner, PassiveEndpoint):
                self._passive_fault(owner, reason)

    def _device_down(self, reason: str) -> None:
        if self.active:
            log.error("rdma: device %s out of service: %s", self.device, reason)
        self.active = False
        self.down_reason = reason
        for ep in list(self._endpoints.values()):
            if ep.qps:
                self._fault_endpoint(ep, None, f"device down: {reason}", count_path=False)
            self._fail_pending(ep, f"device {self.device} is out of service ({reason})", retryable=True,
                               reason="device_down")

    def _device_up(self, reason: str) -> None:
        was = self.active
        self.active = True
        self.down_reason = ""
        try:
            self.port_state = int(self.ctx.query_port(self.config.port).state)
        except PyverbsError as exc:
            log.warning("rdma: query_port on %s failed: %s", self.device, exc)
        for ep in self._endpoints.values():
            ep.next_connect_at = 0.0
            if ep.pending:
                self._work.add(ep)
        if not was:
            log.warning("rdma: device %s back in service: %s", self.device, reason)

    def _refresh_gid(self) -> None:
        try:
            idx = self.config.gid_index if self.config.gid_index is not None else auto_gid_index(
                self.ctx, self.config.port)
            gid = hs.normalize_gid(str(self.ctx.query_gid(self.config.port, idx)))
        except (PyverbsError, DeviceError) as exc:
            log.warning("rdma: GID table of %s changed and could not be re-read: %s", self.device, exc)
            return
        if (idx, gid) != (self.gid_index, self.gid):
            log.warning("rdma: GID of %s changed: index %d %s -> index %d %s", self.device, self.gid_index,
                        self.gid, idx, gid)
            self.gid_index, self.gid = idx, gid

    # ------------------------------------------------------------------ connect (active side)

    def _start_connect(self, ep: Endpoint) -> None:
        ep.state = EpState.CONNECTING
        gen = ep.generation
        self._work.discard(ep)
        try:
            self._connector.submit(self._connect_job, ep, gen)
        except RuntimeError:  # executor shut down: closing
            ep.state = EpState.UNCONNECTED

    def _new_qps(self, n: int, role: Role, owner: Any, generation: int, max_send_wr: int) -> list[QpHandle]:
        handles: list[QpHandle] = []
        try:
            for i in range(n):
                qp = create_qp(self.pd, self.cq, max_send_wr=max_send_wr, max_send_sge=self.config.max_sge,
                               max_inline=self.config.max_inline)
                handles.append(QpHandle(qp, role, self.device, endpoint=owner, generation=generation,
                                        index=i))
        except PyverbsError as exc:
            for h in handles:
                h.destroy()
            raise RdmaError(f"ibv_create_qp on {self.device} failed: {exc}") from exc
        return handles

    def _connect_job(self, ep: Endpoint, gen: int) -> None:
        """Connector thread: create QPs, handshake, bring them to RTS; hand the result to the worker."""
        cfg = self.config
        handles: list[QpHandle] = []
        try:
            failpoint("rdma.handshake", role="active", device=self.device, peer=ep.peer_nic_path,
                      ep_id=ep.ep_id, generation=gen)
            handles = self._new_qps(cfg.num_qp_per_ep, Role.ACTIVE, ep, gen, self.qp_cap)
            for h in handles:
                h.to_init(cfg.port)
            psns = [hs.new_psn() for _ in handles]
            req = hs.HandshakeRequest(
                ep_id=ep.ep_id, generation=gen, local_nic_path=ep.local_nic_path,
                peer_nic_path=ep.peer_nic_path, qp_nums=[h.qp_num for h in handles], psns=psns,
                gid=self.gid, lid=self.lid, gid_index=self.gid_index, mtu=self.local_mtu,
                notify_endpoint=self.local_server)
            raw = self.control.control_call(ep.peer_server, hs.MSG_HANDSHAKE, req.encode(),
                                            cfg.handshake_timeout_s)
            rep = hs.HandshakeReply.from_dict(raw)
            hs.check_reply_matches(req, rep)
            path_mtu = hs.negotiate_mtu(self.local_mtu, rep.mtu, cfg.mtu_negotiation)
            for h, pqpn, ppsn, mypsn in zip(handles, rep.qp_nums, rep.psns, psns, strict=True):
                h.to_rtr(port=cfg.port, dest_qp_num=pqpn, rq_psn=ppsn, path_mtu=path_mtu, dgid=rep.gid,
                         sgid_index=self.gid_index, hop_limit=cfg.hop_limit, sl=cfg.service_level,
                         traffic_class=cfg.traffic_class, max_dest_rd_atomic=cfg.max_rd_atomic,
                         min_rnr_timer=cfg.min_rnr_timer)
                h.to_rts(sq_psn=mypsn, timeout=cfg.qp_timeout, retry_cnt=cfg.qp_retry_cnt,
                         rnr_retry=cfg.rnr_retry, max_rd_atomic=cfg.max_rd_atomic)
        except (StoreError, PyverbsError, OSError, ValueError) as exc:
            for h in handles:
                h.destroy()
            msg = exc.message if isinstance(exc, StoreError) else str(exc)
            self.call_soon(lambda: self._connect_failed(ep, gen, msg))
            return
        self.call_soon(lambda: self._install(ep, gen, handles, rep, path_mtu))

    def _install(self, ep: Endpoint, gen: int, handles: list[QpHandle], rep: hs.HandshakeReply,
                 path_mtu: int) -> None:
        if self._stopped.is_set() or ep.state is EpState.CLOSED or ep.generation != gen \
                or ep.state is not EpState.CONNECTING:
            for h in handles:
                h.destroy()
            return
        for h in handles:
            self._qps[h.qp_num] = h
        ep.qps = handles
        ep.state = EpState.CONNECTED
        ep.path_mtu = path_mtu
        ep.peer_gid = rep.gid
        ep.connected_at = time.monotonic()
        if ep.connections:
            ep.reconnects += 1
            self.metrics.reconnects.labels(self.device, ep.peer_nic_path).inc()
        ep.connections += 1
        self.metrics.handshakes.labels(self.device, Role.ACTIVE.value, "ok").inc()
        self.metrics.endpoints.labels(self.device, Role.ACTIVE.value).set(self._count_connected())
        log.info("rdma: endpoint %s -> %s connected generation %d qp_nums=%s peer_qp_nums=%s path_mtu %d "
                 "(local %d, peer %d, negotiation %s)", self.device, ep.peer_nic_path, gen,
                 [h.qp_num for h in handles], rep.qp_nums, path_mtu, self.local_mtu, rep.mtu,
                 "on" if self.config.mtu_negotiation else "off")
        if ep.pending:
            self._work.add(ep)

    def _connect_failed(self, ep: Endpoint, gen: int, error: str) -> None:
        if ep.generation != gen or ep.state is not EpState.CONNECTING:
            return
        now = time.monotonic()
        ep.state = EpState.UNCONNECTED
        ep.handshake_failures += 1
        ep.last_error = f"handshake with {ep.peer_nic_path} failed: {error}"
        self.metrics.handshakes.labels(self.device, Role.ACTIVE.value, "failed").inc()
        self.metrics.endpoint_errors.labels(self.device, ep.peer_nic_path, "HANDSHAKE").inc()
        self.metrics.device_errors.labels(self.device, "HANDSHAKE").inc()
        ep.errors["HANDSHAKE"] += 1
        log.warning("rdma: %s (attempt %d)", ep.last_error, ep.health.consecutive + 1)
        if ep.health.record_failure(now):
            self._pause(ep, now)
            return
        ep.next_connect_at = now + reconnect_delay(ep.health.consecutive, self.config.reconnect_backoff_s,
                                                   self.config.reconnect_backoff_max_s)
        # each failed handshake costs every waiting slice one retry
        keep: deque[Slice] = deque()
        while ep.pending:
            s = ep.pending.popleft()
            if s.abandoned:
                s.complete(False, f"{ep.last_error}; request already over", retryable=False)
            elif s.retries >= self.config.retry_cap:
                self.metrics.slices_failed.labels(self.device, "retry_cap").inc()
                s.complete(False, f"{ep.last_error} (after {s.retries} retries)", retryable=False)
            else:
                s.retries += 1
                ep.retries += 1
                keep.append(s)
        ep.pending = keep
        if keep:
            self.metrics.retries.labels(self.device, ep.peer_nic_path).inc(len(keep))
            self._work.add(ep)

    # ------------------------------------------------------------------ passive side

    def handle_handshake(self, payload: bytes) -> bytes:
        """Answer a peer's handshake (control-server thread): create and connect answering QPs."""
        cfg = self.config
        try:
            req = hs.HandshakeRequest.from_dict(payload)
        except HandshakeError as exc:
            self.metrics.handshakes.labels(self.device, Role.PASSIVE.value, "rejected").inc()
            return hs.HandshakeReply.rejected(exc.message).encode()
        try:
            failpoint("rdma.handshake", role="passive", device=self.device, peer=req.local_nic_path,
                      ep_id=req.ep_id, generation=req.generation)
            _, dev = hs.split_nic_path(req.peer_nic_path)
            if dev != self.device:
                raise HandshakeError(f"this side has no device {dev!r} (it serves {self.device})")
            if not self.active:
                raise HandshakeError(f"device {self.device} is out of service ({self.down_reason})")
            if self._closed:
                raise HandshakeError(f"device {self.device} is closing")
            with self._passive_lock:
                old = self._passive.get(req.ep_id)
                if old is not None and req.generation < old.generation:
                    raise HandshakeError(f"stale handshake generation {req.generation} for {req.ep_id} "
                                         f"(current {old.generation})")
            path_mtu = hs.negotiate_mtu(self.local_mtu, req.mtu, cfg.mtu_negotiation)
            pe = PassiveEndpoint(req.ep_id, self.device, req.local_nic_path, req.generation, [],
                                 notify_endpoint=req.notify_endpoint, path_mtu=path_mtu)
            handles = self._new_qps(len(req.qp_nums), Role.PASSIVE, pe, req.generation, 4)
            psns = [hs.new_psn() for _ in handles]
            try:
                for h, pqpn, ppsn, mypsn in zip(handles, req.qp_nums, req.psns, psns, strict=True):
                    h.to_init(cfg.port)
                    h.to_rtr(port=cfg.port, dest_qp_num=pqpn, rq_psn=ppsn, path_mtu=path_mtu, dgid=req.gid,
                             sgid_index=self.gid_index, hop_limit=cfg.hop_limit, sl=cfg.service_level,
                             traffic_class=cfg.traffic_class, max_dest_rd_atomic=cfg.max_rd_atomic,
                             min_rnr_timer=cfg.min_rnr_timer)
                    h.to_rts(sq_psn=mypsn, timeout=cfg.qp_timeout, retry_cnt=cfg.qp_retry_cnt,
                             rnr_retry=cfg.rnr_retry, max_rd_atomic=cfg.max_rd_atomic)
            except (StoreError, PyverbsError):
                for h in handles:
                    h.destroy()
                raise
            pe.qps = handles
            with self._passive_lock:
                old = self._passive.get(req.ep_id)
                self._passive[req.ep_id] = pe
                for h in handles:
                    self._qps[h.qp_num] = h
                # one NIC path has one active endpoint per device: another ep_id from the same path
                # is a restarted peer, and the QPs that answered its predecessor are dead weight
                stale = [x for k, x in self._passive.items()
                         if k != req.ep_id and x.peer_nic_path == req.local_nic_path]
                for x in stale:
                    del self._passive[x.ep_id]
                for x in ([old] if old is not None else []) + stale:
                    for h in x.qps:
                        self._qps.pop(h.qp_num, None)
            if old is not None:
                log.info("rdma: re-establish connection for %s (generation %d -> %d): destroying qp_nums=%s",
                         req.local_nic_path, old.generation, req.generation, [h.qp_num for h in old.qps])
            for x in stale:
                log.info("rdma: %s came back as a new endpoint %s: destroying qp_nums=%s of %s",
                         req.local_nic_path, req.ep_id, [h.qp_num for h in x.qps], x.ep_id)
            for x in ([old] if old is not None else []) + stale:
                for h in x.qps:
                    h.destroy()
        except (StoreError, PyverbsError) as exc:
            msg = exc.message if isinstance(exc, StoreError) else str(exc)
            log.warning("rdma: rejecting handshake from %s on %s: %s", req.local_nic_path, self.device, msg)
            self.metrics.handshakes.labels(self.device, Role.PASSIVE.value, "rejected").inc()
            return hs.HandshakeReply.rejected(msg).encode()
        self.metrics.handshakes.labels(self.device, Role.PASSIVE.value, "ok").inc()
        self.metrics.endpoints.labels(self.device, Role.PASSIVE.value).set(len(self._passive))
        log.info("rdma: accepted handshake from %s generation %d on %s: qp_nums=%s -> peer qp_nums=%s "
                 "path_mtu %d (local %d, peer %d, negotiation %s)", req.local_nic_path, req.generation,
                 self.device, [h.qp_num for h in handles], req.qp_nums, path_mtu, self.local_mtu, req.mtu,
                 "on" if cfg.mtu_negotiation else "off")
        return hs.HandshakeReply(qp_nums=[h.qp_num for h in handles], psns=psns, gid=self.gid, lid=self.lid,
                                 mtu=self.local_mtu, path_mtu=path_mtu, device=self.device).encode()

    def handle_disconnect(self, ep_id: str, generation: int) -> None:
        """The active peer closed its endpoint: free the answering QPs."""
        with self._passive_lock:
            pe = self._passive.get(ep_id)
            if pe is None or generation < pe.generation:
                return
            del self._passive[ep_id]
            for h in pe.qps:
                self._qps.pop(h.qp_num, None)
        for h in pe.qps:
            h.destroy()
        self.metrics.endpoints.labels(self.device, Role.PASSIVE.value).set(len(self._passive))
        log.info("rdma: peer %s disconnected endpoint %s; destroyed qp_nums=%s", pe.peer_nic_path, ep_id,
                 [h.qp_num for h in pe.qps])

    def handle_peer_fault(self, ep_id: str, generation: int, reason: str) -> None:
        """The passive peer saw this endpoint's answering QP fail: retire it without waiting for a
        retry timeout."""
        def run() -> None:
            for ep in self._endpoints.values():
                if ep.ep_id == ep_id and ep.generation == generation and ep.qps:
                    self._fault_endpoint(ep, None, f"peer reported: {reason}")
        self.call_soon(run)

    def _passive_fault(self, pe: PassiveEndpoint, reason: str) -> None:
        if pe.faulted:
            return
        pe.faulted = True
        for h in pe.qps:
            h.to_err()
        log.warning("rdma: answering QPs %s of %s failed (%s); telling the peer", [h.qp_num for h in pe.qps],
                    pe.peer_nic_path, reason)
        if pe.notify_endpoint:
            self._notify_peer(pe.notify_endpoint, hs.MSG_ENDPOINT_FAULT,
                              {"ep_id": pe.ep_id, "generation": pe.generation, "reason": reason})

    def _notify_peer(self, endpoint: str, msg_type: str, body: dict[str, Any]) -> None:
        payload = json.dumps(body).encode()

        def send() -> None:
            try:
                self.control.control_call(endpoint, msg_type, payload,
                                          min(2.0, self.config.handshake_timeout_s))
            except StoreError as exc:
                log.info("rdma: %s to %s not delivered: %s", msg_type, endpoint, exc.message)

        if self._closed:
            send()
        else:
            try:
                self._connector.submit(send)
            except RuntimeError:
                send()

    # ------------------------------------------------------------------ introspection

    def endpoints(self) -> list[Endpoint]:
        with self._ep_lock:
            return list(self._endpoints.values())

    def passive_endpoints(self) -> list[PassiveEndpoint]:
        with self._passive_lock:
            return list(self._passive.values())

    def qp(self, qp_num: int) -> QpHandle | None:
        return self._qps.get(qp_num)

    def qp_handles(self) -> list[QpHandle]:
        return list(self._qps.values())

    def run_on_worker(self, fn: Callable[[], Any], timeout: float = 10.0) -> Any:
        """Run ``fn`` on the worker thread and return its result (for consistent snapshots)."""
        done = threading.Event()
        box: dict[str, Any] = {}

        def job() -> None:
            try:
                box["v"] = fn()
            except Exception as exc:  # noqa: BLE001 - re-raised in the calling thread below
                box["e"] = exc
            finally:
                done.set()

        self.call_soon(job)
        if not done.wait(timeout):
            raise RdmaError(f"worker of {self.device} did not answer within {timeout}s")
        if "e" in box:
            raise box["e"]
        return box.get("v")

    def describe(self) -> dict[str, Any]:
        return {"device": self.device, "port": self.config.port, "active": self.active,
                "down_reason": self.down_reason, "active_mtu": self.active_mtu, "local_mtu": self.local_mtu,
                "gid_index": self.gid_index, "gid": self.gid, "lid": self.lid,
                "outstanding": self._outstanding,
                "qp_cap": self.qp_cap, "cq_cap": self.cq_cap, "cq_mode": self.cq_mode,
                "retired_qps": len(self._retired),
                "async_events": dict(self.async_counts),
                "memory_regions": [m.describe() for m in self.memory_regions()]}

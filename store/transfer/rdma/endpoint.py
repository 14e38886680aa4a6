"""RC queue pairs and the endpoints that group them.

An *active* endpoint is this process's side of a path to one peer device: ``num_qp_per_ep`` RC QPs
that post RDMA WRITE/READ work requests, connected lazily through the handshake. A *passive*
endpoint is the peer's side of someone else's active endpoint: the same number of QPs that only
answer. Keeping the two roles apart (rather than Mooncake's one endpoint per NIC pair serving both
directions) means a reconnect started by one side never tears down the QPs the other side is
posting on, and two peers that connect to each other at the same moment cannot race.

Every QP transition goes RESET→INIT→RTR→RTS with a GRH (RoCE has no LIDs). A QP that failed is
never reset in place: its endpoint is *retired* (all its QPs moved to ERR so every outstanding WR
completes, flushed, and is retried) and a new generation of QPs is connected with fresh PSNs on
both sides. Resetting one side only and reusing its PSN makes writes complete with SUCCESS while no
data lands — the responder takes the packets for duplicates.

:class:`QpHandle` is also the fault layer's handle on a QP: it can read the QP number and state,
move the QP to ERR, take away remote-write access, or destroy it, all without racing the poster.
"""

from __future__ import annotations

import enum
import itertools
import logging
import threading
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyverbs.enums as e
from pyverbs.addr import GID, AHAttr, GlobalRoute
from pyverbs.pyverbs_error import PyverbsError
from pyverbs.qp import QP, QPAttr, QPCap, QPInitAttr

from store.failpoints import failpoint
from store.transfer.rdma.config import mtu_to_enum
from store.transfer.rdma.errors import RdmaError, qp_state_name
from store.transfer.rdma.policy import PathHealth

if TYPE_CHECKING:
    from pyverbs.cq import CQ
    from pyverbs.pd import PD
    from pyverbs.wr import SendWR

    from store.transfer.transport import Slice

log = logging.getLogger(__name__)

ACCESS_ALL = e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_WRITE | e.IBV_ACCESS_REMOTE_READ

_INIT_MASK = e.IBV_QP_STATE | e.IBV_QP_PKEY_INDEX | e.IBV_QP_PORT | e.IBV_QP_ACCESS_FLAGS
_RTR_MASK = (e.IBV_QP_STATE | e.IBV_QP_AV | e.IBV_QP_PATH_MTU | e.IBV_QP_DEST_QPN | e.IBV_QP_RQ_PSN
             | e.IBV_QP_MAX_DEST_RD_ATOMIC | e.IBV_QP_MIN_RNR_TIMER)
_RTS_MASK = (e.IBV_QP_STATE | e.IBV_QP_TIMEOUT | e.IBV_QP_RETRY_CNT | e.IBV_QP_RNR_RETRY
             | e.IBV_QP_SQ_PSN | e.IBV_QP_MAX_QP_RD_ATOMIC)


class Role(enum.Enum):
    ACTIVE = "active"
    PASSIVE = "passive"


class EpState(enum.Enum):
    UNCONNECTED = "unconnected"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    PAUSED = "paused"
    CLOSED = "closed"


class QpHandle:
    """One RC QP plus the bookkeeping the transport keeps for it.

    The pyverbs QP must never be touched after ``close()`` (pyverbs 44 dereferences NULL and the
    process dies), so every access goes through this handle under its lock and checks
    ``destroyed`` first.
    """

    def __init__(self, qp: QP, role: Role, device: str, *, endpoint: Any = None, generation: int = 0,
                 index: int = 0, psn: int = 0) -> None:
        self._qp: QP | None = qp
        self.qp_num: int = qp.qp_num
        self.role = role
        self.device = device
        self.endpoint = endpoint  # Endpoint or PassiveEndpoint
        self.generation = generation
        self.index = index
        self.psn = psn  # our sq_psn
        self.peer_qp_num = 0
        self.peer_psn = 0  # the peer's sq_psn = our rq_psn
        self.path_mtu = 0  # bytes
        self.access_flags = ACCESS_ALL
        self.outstanding = 0  # signaled WRs posted and not yet completed (worker thread only)
        self.posted: deque[int] = deque()  # wr_ids in posting order (worker thread only)
        self.retired = False
        self.retired_at = 0.0
        self.drain_deadline = 0.0
        self.lock = threading.Lock()
        # what Slice.where shows for slices posted here (shared; set again at RTR with the peer QP)
        self.where: dict[str, Any] = {"device": device, "qp_num": self.qp_num, "generation": generation}

    # -- read-only views -------------------------------------------------------------------

    @property
    def destroyed(self) -> bool:
        return self._qp is None

    @property
    def qp(self) -> QP | None:
        """The pyverbs QP (None once destroyed). Use the handle's methods to change it."""
        return self._qp

    def state(self) -> int | None:
        """The QP state as the kernel sees it now (``ibv_query_qp``); None once destroyed.

        ``QP.qp_state`` is only the cached value from the last modify and misses the kernel moving
        the QP to ERR after an error completion."""
        with self.lock:
            if self._qp is None:
                return None
            try:
                return int(self._qp.query(e.IBV_QP_STATE)[0].qp_state)
            except PyverbsError as exc:
                log.warning("ibv_query_qp failed on %s qp_num=%d: %s", self.device, self.qp_num, exc)
                return None

    def describe(self) -> dict[str, Any]:
        return {"qp_num": self.qp_num, "role": self.role.value, "device": self.device,
                "generation": self.generation, "index": self.index, "state": qp_state_name(self.state()),
                "psn": self.psn, "peer_qp_num": self.peer_qp_num, "peer_psn": self.peer_psn,
                "path_mtu": self.path_mtu, "outstanding": self.outstanding, "retired": self.retired,
                "access_flags": self.access_flags}

    # -- transitions -----------------------------------------------------------------------

    def _modify(self, attr: QPAttr, mask: int, target: str) -> None:
        failpoint("rdma.modify_qp", device=self.device, qp_num=self.qp_num, to=target, role=self.role.value)
        with self.lock:
            if self._qp is None:
                raise RdmaError(f"modify_qp to {target} on destroyed qp_num={self.qp_num} ({self.device})")
            try:
                self._qp.modify(attr, mask)
            except PyverbsError as exc:
                raise RdmaError(f"modify_qp to {target} failed on {self.device} qp_num={self.qp_num}: "
                                f"{exc}; check mtu, gid, peer qp num") from exc

    def to_init(self, port: int, access: int = ACCESS_ALL) -> None:
        a = QPAttr()
        a.qp_state = e.IBV_QPS_INIT
        a.pkey_index = 0
        a.port_num = port
        a.qp_access_flags = access
        self._modify(a, _INIT_MASK, "INIT")
        self.access_flags = access

    def to_rtr(self, *, port: int, dest_qp_num: int, rq_psn: int, path_mtu: int, dgid: str,
               sgid_index: int, hop_limit: int, sl: int = 0, traffic_class: int = 0,
               max_dest_rd_atomic: int = 16, min_rnr_timer: int = 12) -> None:
        a = QPAttr()
        a.qp_state = e.IBV_QPS_RTR
        a.path_mtu = mtu_to_enum(path_mtu)
        a.dest_qp_num = dest_qp_num
        a.rq_psn = rq_psn
        a.max_dest_rd_atomic = max_dest_rd_atomic
        a.min_rnr_timer = min_rnr_timer
        gr = GlobalRoute(dgid=GID(dgid), sgid_index=sgid_index, hop_limit=hop_limit,
                         traffic_class=traffic_class)
        a.ah_attr = AHAttr(port_num=port, is_global=1, gr=gr, dlid=0, sl=sl)
        self._modify(a, _RTR_MASK, "RTR")
        self.peer_qp_num = dest_qp_num
        self.peer_psn = rq_psn
        self.path_mtu = path_mtu
        peer = getattr(self.endpoint, "peer_nic_path", None)
        self.where = {"device": self.device, "qp_num": self.qp_num, "generation": self.generation,
                      "peer": peer, "peer_qp_num": dest_qp_num}

    def to_rts(self, *, sq_psn: int, timeout: int, retry_cnt: int, rnr_retry: int,
               max_rd_atomic: int = 16) -> None:
        a = QPAttr()
        a.qp_state = e.IBV_QPS_RTS
        a.timeout = timeout
        a.retry_cnt = retry_cnt
        a.rnr_retry = rnr_retry
        a.sq_psn = sq_psn
        a.max_rd_atomic = max_rd_atomic
        self._modify(a, _RTS_MASK, "RTS")
        self.psn = sq_psn

    def to_err(self) -> bool:
        """Move the QP to ERR so every outstanding WR completes (flushed). False if destroyed."""
        a = QPAttr()
        a.qp_state = e.IBV_QPS_ERR
        with self.lock:
            if self._qp is None:
                return False
            try:
                self._qp.modify(a, e.IBV_QP_STATE)
            except PyverbsError as exc:
                log.warning("modify_qp to ERR failed on %s qp_num=%d: %s", self.device, self.qp_num, exc)
                return False
        return True

    def set_access_flags(self, access: int) -> None:
        """RTS→RTS change of ``qp_access_flags`` (the fault 'QP without remote write')."""
        a = QPAttr()
        a.qp_access_flags = access
        with self.lock:
            if self._qp is None:
                raise RdmaError(f"set_access_flags on destroyed qp_num={self.qp_num} ({self.device})")
            try:
                self._qp.modify(a, e.IBV_QP_ACCESS_FLAGS)
            except PyverbsError as exc:
                raise RdmaError(f"modify_qp access flags failed on {self.device} qp_num={self.qp_num}: "
                                f"{exc}") from exc
        self.access_flags = access

    def post_send(self, wr: SendWR, bad_wr: SendWR | None = None) -> None:
        with self.lock:
            if self._qp is None:
                raise RdmaError(f"post_send on destroyed qp_num={self.qp_num} ({self.device})")
            self._qp.post_send(wr, bad_wr)

    def destroy(self) -> bool:
        """``ibv_destroy_qp``. Idempotent; False when it was already destroyed."""
        with self.lock:
            qp, self._qp = self._qp, None
        if qp is None:
            return False
        try:
            qp.close()
        except PyverbsError as exc:
            log.warning("ibv_destroy_qp failed on %s qp_num=%d: %s", self.device, self.qp_num, exc)
        return True


def create_qp(pd: PD, cq: CQ, *, max_send_wr: int, max_send_sge: int = 1, max_inline: int = 0) -> QP:
    """An RC QP in RESET sharing the context's CQ for sends and receives (no receives are posted)."""
    cap = QPCap(max_send_wr=max_send_wr, max_recv_wr=1, max_send_sge=max_send_sge, max_recv_sge=1,
                max_inline_data=max_inline)
    init = QPInitAttr(qp_type=e.IBV_QPT_RC, scq=cq, rcq=cq, cap=cap, sq_sig_all=0)
    return QP(pd, init)


_ep_ids = itertools.count(1)


@dataclass(eq=False)
class Endpoint:
    """The active side of one path: local device → (peer server, peer device).

    Mutated only by the context's worker thread, except ``inbox`` (appended by submitters).
    """

    device: str
    peer_server: str
    peer_device: str
    local_server: str
    health: PathHealth
    ep_id: str = field(default_factory=lambda: f"{uuid.uuid4().hex[:12]}-{next(_ep_ids)}")
    state: EpState = EpState.UNCONNECTED
    generation: int = 0
    qps: list[QpHandle] = field(default_factory=list)
    pending: deque[Slice] = field(default_factory=deque)
    next_connect_at: float = 0.0
    connections: int = 0  # successful handshakes
    reconnects: int = 0  # successful handshakes after a retirement
    retirements: int = 0
    retries: int = 0
    faults: int = 0
    errors: Counter[str] = field(default_factory=Counter)  # endpoint faults by status/event name
    completions: Counter[str] = field(default_factory=Counter)  # error WCs seen, by status name
    handshake_failures: int = 0
    last_error: str = ""
    path_mtu: int = 0
    peer_gid: str = ""
    rr: int = 0
    connected_at: float = 0.0
    rkey_faults: dict[int, float] = field(default_factory=dict)  # rkey -> time of its last REM_ACCESS_ERR
    dead_rkeys: dict[int, float] = field(default_factory=dict)  # rkey -> until when it is refused locally

    def rkey_dead(self, rkey: int, now: float) -> bool:
        until = self.dead_rkeys.get(rkey)
        if until is None:
            return False
        if now >= until:
            del self.dead_rkeys[rkey]
            return False
        return True

    @property
    def key(self) -> tuple[str, str]:
        return (self.peer_server, self.peer_device)

    @property
    def peer_nic_path(self) -> str:
        return f"{self.peer_server}@{self.peer_device}"

    @property
    def local_nic_path(self) -> str:
        return f"{self.local_server}@{self.device}"

    def describe(self) -> dict[str, Any]:
        now = time.monotonic()
        return {"ep_id": self.ep_id, "role": Role.ACTIVE.value, "device": self.device,
                "peer": self.peer_nic_path, "state": self.state.value, "generation": self.generation,
                "qps": [q.describe() for q in self.qps], "pending": len(self.pending),
                "connections": self.connections, "reconnects": self.reconnects,
                "retirements": self.retirements, "retries": self.retries, "faults": self.faults,
                "errors": dict(self.errors), "error_completions": dict(self.completions),
                "handshake_failures": self.handshake_failures, "last_error": self.last_error,
                "path_mtu": self.path_mtu, "paused_for_s": round(self.health.remaining(now), 3),
                "pauses": self.health.pauses, "dead_rkeys": sorted(self.dead_rkeys)}


@dataclass(eq=False)
class PassiveEndpoint:
    """The answering side of a peer's active endpoint (keyed by the peer's ``ep_id``)."""

    ep_id: str
    device: str
    peer_nic_path: str  # the active side's NIC path
    generation: int
    qps: list[QpHandle]
    notify_endpoint: str = ""
    path_mtu: int = 0
    faulted: bool = False
    created_at: float = field(default_factory=time.monotonic)

    def describe(self) -> dict[str, Any]:
        return {"ep_id": self.ep_id, "role": Role.PASSIVE.value, "device": self.device,
                "peer": self.peer_nic_path, "generation": self.generation, "faulted": self.faulted,
                "path_mtu": self.path_mtu, "qps": [q.describe() for q in self.qps]}

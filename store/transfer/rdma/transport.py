"""``RdmaTransport``: the transfer engine's ``rdma`` protocol on pyverbs.

The engine builds it as ``RdmaTransport(engine, **transport_options["rdma"])``; the options are
:class:`~store.transfer.rdma.config.RdmaConfig` fields (``device_name="rxe0"``, ``mtu=1024``,
``mtu_negotiation=False``, ...) on top of the ``MC_*`` environment variables. It uses the engine's
control channel for the QP handshake (``rdma.handshake``), for telling a peer that its endpoint's
answering QPs failed (``rdma.endpoint_fault``) and that an endpoint is gone (``rdma.disconnect``).

Data path: ``register_memory`` registers an MR (LOCAL_WRITE | REMOTE_WRITE | REMOTE_READ) whose
rkey goes into the segment descriptor; ``submit`` routes each slice to the endpoint for the peer's
(server, device) and returns at once; the context's worker posts RDMA WRITE/READ work requests and
completes slices from the CQ. See :mod:`store.transfer.rdma.context`.

Read-only introspection for the fault layer: :meth:`endpoints`, :meth:`passive_endpoints`,
:meth:`qp_handles` (QP numbers, states, and handles that can move a QP to ERR, change its access
flags or destroy it), :meth:`memory_regions` (lkey/rkey, and ``deregister()``),
:meth:`inject_async_event` (synthetic events through the real handler) and :attr:`metrics`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from store.errors import ErrorCode
from store.transfer.rdma import handshake as hs
from store.transfer.rdma.config import RdmaConfig
from store.transfer.rdma.context import MrEntry, RdmaContext
from store.transfer.rdma.endpoint import Endpoint, PassiveEndpoint, QpHandle, Role
from store.transfer.rdma.errors import ConfigError, HandshakeError
from store.transfer.rdma.metrics import RdmaMetrics
from store.transfer.transport import BufferDescriptor, Slice, Transport

log = logging.getLogger(__name__)

MAX_MESSAGE = (1 << 31) - 1  # rxe rejects RETH lengths beyond 2 GiB


class RdmaTransport(Transport):
    """See the module docstring."""

    name = "rdma"

    def __init__(self, engine: Any = None, *, config: RdmaConfig | None = None,
                 metrics: RdmaMetrics | None = None, control: Any = None, local_server: str | None = None,
                 environ: Mapping[str, str] | None = None, **options: Any) -> None:
        self.config = config.with_(**options) if config is not None and options else (
            config or RdmaConfig.from_env(environ, **options))
        self.control = control if control is not None else engine
        if self.control is None or not hasattr(self.control, "control_call"):
            raise ConfigError("RdmaTransport needs an engine (or a control channel) for the QP handshake")
        server = local_server or getattr(engine, "endpoint", None) or getattr(self.control, "endpoint", None)
        if not server:
            raise ConfigError("RdmaTransport needs the local server endpoint (host:port) for its NIC path")
        self.local_server = str(server)
        self.metrics = metrics or RdmaMetrics()
        self.context = RdmaContext(self.config, control=self.control, local_server=self.local_server,
                                   metrics=self.metrics)
        self._closed = False
        register = getattr(self.control, "register_control_handler", None)
        if callable(register):
            register(hs.MSG_HANDSHAKE, self._on_handshake)
            register(hs.MSG_DISCONNECT, self._on_disconnect)
            register(hs.MSG_ENDPOINT_FAULT, self._on_endpoint_fault)

    # ------------------------------------------------------------------ control handlers

    def _on_handshake(self, payload: bytes, peer: str = "") -> bytes:
        return self.context.handle_handshake(payload)

    def _on_disconnect(self, payload: bytes, peer: str = "") -> bytes:
        body = _json(payload, "rdma.disconnect")
        self.context.handle_disconnect(str(body.get("ep_id", "")), int(body.get("generation", 0)))
        return b"ok"

    def _on_endpoint_fault(self, payload: bytes, peer: str = "") -> bytes:
        body = _json(payload, "rdma.endpoint_fault")
        self.context.handle_peer_fault(str(body.get("ep_id", "")), int(body.get("generation", -1)),
                                       str(body.get("reason", "")))
        return b"ok"

    # ------------------------------------------------------------------ Transport

    def register_memory(self, addr: int, length: int) -> BufferDescriptor:
        mr = self.context.register_memory(addr, length)
        return BufferDescriptor(addr, length, mr.rkey)

    def unregister_memory(self, addr: int) -> None:
        self.context.unregister_memory(addr)

    def submit(self, slices: Sequence[Slice]) -> None:
        ctx = self.context
        items: list[tuple[Endpoint, Slice]] = []
        eps: dict[int, Endpoint] = {}  # per descriptor object within this call
        for s in slices:
            if s.abandoned:
                s.complete(False, "request over before the slice was posted", retryable=False)
                continue
            if s.length == 0:
                s.complete(True)
                continue
            seg = s.segment
            if not seg.devices:
                s.complete(False, f"segment {seg.name} publishes no RDMA device (its protocol is "
                                  f"{seg.protocol!r})", code=ErrorCode.INVALID_PARAMS, retryable=False)
                continue
            if s.length > MAX_MESSAGE:
                s.complete(False, f"slice of {s.length} B exceeds the RDMA message limit {MAX_MESSAGE} B",
                           code=ErrorCode.INVALID_PARAMS, retryable=False)
                continue
            if not s.rkey:
                buf = seg.find_buffer(s.remote_addr, s.length)
                if buf is not None:
                    s.rkey = buf.rkey
            ep = eps.get(id(seg))
            if ep is None:
                ep = eps[id(seg)] = ctx.endpoint_for(seg.endpoint, str(seg.devices[0].get("name", "")))
            items.append((ep, s))
        if items:
            ctx.enqueue(items)

    def abort(self, slices: Sequence[Slice]) -> None:
        self.context.abort(list(slices))

    def segment_devices(self) -> tuple[dict[str, Any], ...]:
        c = self.context
        return ({"name": c.device, "gid": c.gid, "lid": c.lid, "gid_index": c.gid_index, "mtu": c.local_mtu},)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.context.close()

    def stats(self) -> dict[str, Any]:
        eps = self.context.endpoints()
        return {
            "device": self.context.device,
            "active": self.context.active,
            "endpoints": len(eps),
            "connected": sum(1 for ep in eps if ep.state.value == "connected"),
            "passive_endpoints": len(self.context.passive_endpoints()),
            "reconnects": sum(ep.reconnects for ep in eps),
            "retirements": sum(ep.retirements for ep in eps),
            "retries": sum(ep.retries for ep in eps),
            "paused_paths": sum(1 for ep in eps if ep.state.value == "paused"),
            "async_events": dict(self.context.async_counts),
            "metrics": self.metrics.snapshot(),
        }

    # ------------------------------------------------------------------ introspection

    @property
    def device(self) -> str:
        return self.context.device

    def endpoints(self) -> list[Endpoint]:
        """Active endpoints (this side posts). Read them; change QPs only through ``QpHandle``."""
        return self.context.endpoints()

    def endpoint(self, peer_server: str, peer_device: str | None = None) -> Endpoint | None:
        for ep in self.context.endpoints():
            if ep.peer_server == peer_server and (peer_device is None or ep.peer_device == peer_device):
                return ep
        return None

    def passive_endpoints(self) -> list[PassiveEndpoint]:
        """Answering endpoints created by peers' handshakes."""
        return self.context.passive_endpoints()

    def qp_handles(self, role: Role | str | None = None) -> list[QpHandle]:
        """Live QPs (active and passive), as handles the fault layer can act through."""
        handles = self.context.qp_handles()
        if role is None:
            return handles
        r = Role(role) if isinstance(role, str) else role
        return [h for h in handles if h.role is r]

    def qp(self, qp_num: int) -> QpHandle | None:
        return self.context.qp(qp_num)

    def memory_regions(self) -> list[MrEntry]:
        return self.context.memory_regions()

    def inject_async_event(self, event_type: int | str, qp_num: int | None = None) -> None:
        """A synthetic async event through the real handler (rxe raises no QP events itself)."""
        self.context.inject_async_event(event_type, qp_num)

    def describe(self) -> dict[str, Any]:
        """Everything at once, JSON-friendly (for reports and ``umbra doctor``)."""
        return {**self.context.describe(),
                "endpoints": [ep.describe() for ep in self.context.endpoints()],
                "passive_endpoints": [pe.describe() for pe in self.context.passive_endpoints()]}


def _json(payload: bytes, what: str) -> dict[str, Any]:
    try:
        body = json.loads(payload or b"{}")
    except ValueError as exc:
        raise HandshakeError(f"{what}: payload is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise HandshakeError(f"{what}: payload must be a JSON object")
    return body

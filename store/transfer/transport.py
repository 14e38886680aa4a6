"""The contract between the transfer engine and a transport (tcp, rdma, local).

Completions are asynchronous: ``submit`` only queues; the transport later calls
``Slice.complete`` from whatever thread sees the completion (a socket reader, a CQ poller).
That shape fits RDMA's completion queue and is trivially met by synchronous transports.

Writing a transport
-------------------
- Subclass :class:`Transport`, set ``name``, and accept ``__init__(self, engine, **options)``:
  ``engine`` satisfies :class:`EngineContext` (its memory table, its segment name, the control
  channel for handshakes); ``options`` are the engine's ``transport_options[name]``.
- Add it to :data:`TRANSPORTS` as ``"module:Class"``; the engine imports it only when asked.
- ``submit(slices)`` must not block on the network. For every slice it receives, call
  ``slice.complete(ok, error, code=..., retryable=...)`` exactly once, from any thread. A slice
  whose ``abandoned`` flag is set (its request was cancelled, timed out or failed) may be
  completed at once with ``ok=False`` instead of being posted, but it must still be completed:
  the engine counts a slice as in flight until then, and refuses to release its batch or
  unregister its memory before.
- ``retryable=False`` tells the engine that retrying cannot help (the peer rejected the
  address); the request fails at once. Otherwise the engine retries the slice (up to its retry
  cap, with backoff) by calling ``submit`` again with the same object; a transport should use a
  fresh connection/QP for it when the old one failed.
- ``abort(slices)``: the engine gave up waiting on these (per-slice timeout); tear down what
  carries them so they complete (with a failure) promptly.
"""

from __future__ import annotations

import importlib
import json
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Protocol

from store.errors import ErrorCode


class Opcode(IntEnum):
    READ = 0
    WRITE = 1


class TransferStatus(IntEnum):
    """Mooncake's ``TransferStatusEnum`` values."""

    WAITING = 0
    PENDING = 1
    INVALID = 2
    CANCELED = 3
    COMPLETED = 4
    TIMEOUT = 5
    FAILED = 6


TERMINAL = frozenset({TransferStatus.COMPLETED, TransferStatus.FAILED, TransferStatus.CANCELED,
                      TransferStatus.TIMEOUT})


@dataclass(frozen=True)
class BufferDescriptor:
    """One registered buffer of a segment as peers see it (Mooncake's ``buffers[]`` entry)."""

    addr: int
    length: int
    rkey: int = 0  # RDMA remote key; 0 for transports that need none
    name: str = "cpu:0"


@dataclass(frozen=True)
class SegmentDescriptor:
    """A peer's segment: where to reach it and which address ranges it accepts.

    ``endpoint`` is ``host:port`` of the owner's transfer server (TCP data, control messages,
    RDMA handshake). ``devices`` lists RDMA devices as dicts ``{name, gid, lid, gid_index, mtu}``.
    ``pid`` identifies the owning process (diagnostics; 0 when unknown).
    """

    name: str
    protocol: str
    endpoint: str
    buffers: tuple[BufferDescriptor, ...] = ()
    devices: tuple[dict[str, Any], ...] = ()
    pid: int = 0

    def find_buffer(self, addr: int, length: int) -> BufferDescriptor | None:
        for b in self.buffers:
            if b.addr <= addr and addr + length <= b.addr + b.length:
                return b
        return None

    def to_dict(self) -> dict[str, Any]:
        """A JSON/msgpack-friendly form (what the master stores and serves)."""
        return {
            "name": self.name, "protocol": self.protocol, "endpoint": self.endpoint, "pid": self.pid,
            "buffers": [{"addr": b.addr, "length": b.length, "rkey": b.rkey, "name": b.name}
                        for b in self.buffers],
            "devices": [dict(d) for d in self.devices],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SegmentDescriptor:
        return cls(
            name=str(d["name"]), protocol=str(d["protocol"]), endpoint=str(d["endpoint"]),
            buffers=tuple(BufferDescriptor(int(b["addr"]), int(b["length"]), int(b.get("rkey", 0)),
                                           str(b.get("name", "cpu:0"))) for b in d.get("buffers", ())),
            devices=tuple(dict(x) for x in d.get("devices", ())),
            pid=int(d.get("pid", 0)),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> SegmentDescriptor:
        return cls.from_dict(json.loads(text))


@dataclass(eq=False, slots=True)
class Slice:
    """One unit of transfer. ``complete`` is called exactly once per attempt by the transport.

    Lifecycle: the engine sets ``status = PENDING`` and hands the slice to a transport; the
    transport calls ``complete``; the slice becomes COMPLETED or FAILED and ``on_done`` runs. A
    retry puts it back to PENDING. A second ``complete`` for the same attempt is ignored.
    """

    opcode: Opcode
    local_addr: int
    length: int
    segment: SegmentDescriptor
    remote_addr: int
    rkey: int = 0
    retries: int = 0
    status: TransferStatus = TransferStatus.WAITING
    error: str = ""
    on_done: Callable[[Slice], None] | None = field(default=None, repr=False)
    # set by the transport for diagnostics (QP number, connection id, ...)
    where: dict[str, Any] = field(default_factory=dict)
    code: int = 0  # ErrorCode of the last failure
    retryable: bool = True  # whether the last failure may succeed on another attempt
    abandoned: bool = False  # the request is over (cancelled/failed/timed out): don't post
    deadline: float = 0.0  # monotonic time by which the current attempt must complete
    task: Any = field(default=None, repr=False)  # engine bookkeeping (request this slice belongs to)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def complete(self, ok: bool, error: str = "", *, code: int | None = None,
                 retryable: bool = True) -> None:
        with self._lock:
            if self.status not in (TransferStatus.PENDING, TransferStatus.WAITING):
                return
            if ok:
                self.status = TransferStatus.COMPLETED
                self.error, self.code = "", 0
            else:
                self.status = TransferStatus.FAILED
                self.error = error or "transfer failed"
                self.code = int(ErrorCode.TRANSFER_FAIL if code is None else code)
                self.retryable = retryable
        if self.on_done is not None:
            self.on_done(self)


class EngineContext(Protocol):
    """What a transport may use of the engine that constructs it (``TransferEngine`` is one)."""

    @property
    def segment_name(self) -> str: ...

    @property
    def endpoint(self) -> str: ...

    @property
    def memory(self) -> Any:
        """``store.transfer.memory.MemoryTable``: registered ranges; ``find(addr, length)`` returns
        the entry whose ``extra`` dict a transport may use for its own handles (RDMA MRs)."""

    @property
    def config(self) -> Any:
        """``store.transfer.engine.EngineConfig`` (slice size, retry cap, slice timeout, ...)."""

    def register_control_handler(self, msg_type: str, handler: Callable[[bytes, str], bytes]) -> None: ...

    def control_call(self, endpoint: str, msg_type: str, payload: bytes = b"",
                     timeout: float = 5.0) -> bytes: ...


class Transport(ABC):
    """A way to move slices to/from one kind of peer."""

    name: str = "abstract"

    @abstractmethod
    def register_memory(self, addr: int, length: int) -> BufferDescriptor:
        """Make ``[addr, addr+length)`` of this process reachable by peers; returns its descriptor."""

    @abstractmethod
    def unregister_memory(self, addr: int) -> None: ...

    @abstractmethod
    def submit(self, slices: Sequence[Slice]) -> None:
        """Queue slices; each later gets ``complete(ok, error)``. Must not block on the network."""

    @abstractmethod
    def close(self) -> None: ...

    def abort(self, slices: Sequence[Slice]) -> None:  # noqa: B027 - optional hook
        """The engine stopped waiting for these slices; make them complete soon (default: nothing)."""

    def segment_devices(self) -> tuple[dict[str, Any], ...]:
        """Devices to publish in this engine's segment descriptor (RDMA NICs); none by default."""
        return ()

    def stats(self) -> dict[str, Any]:
        """Read-only counters for metrics and checkers."""
        return {}


# name -> "module:Class"; imported on first use so a missing optional dependency (pyverbs) only
# affects the protocol that needs it.
TRANSPORTS: dict[str, str] = {
    "tcp": "store.transfer.tcp:TcpTransport",
    "local": "store.transfer.local:LocalTransport",
    "rdma": "store.transfer.rdma:RdmaTransport",
}


def transport_class(name: str) -> type[Transport]:
    """Resolve a protocol name through :data:`TRANSPORTS` (``ErrorCode.INVALID_PARAMS`` if unknown)."""
    from store.errors import StoreError

    spec = TRANSPORTS.get(name)
    if spec is None:
        raise StoreError(ErrorCode.INVALID_PARAMS,
                         f"unknown transport protocol {name!r}; known: {', '.join(sorted(TRANSPORTS))}")
    module_name, _, cls_name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise StoreError(ErrorCode.NOT_SUPPORTED,
                         f"transport {name!r} unavailable: cannot import {module_name}: {exc}") from exc
    cls = getattr(module, cls_name, None)
    if cls is None or not (isinstance(cls, type) and issubclass(cls, Transport)):
        raise StoreError(ErrorCode.NOT_SUPPORTED, f"transport {name!r}: {spec} is not a Transport class")
    return cls

"""The contract between the transfer engine and a transport (tcp, rdma, local).

Completions are asynchronous: ``submit`` only queues; the transport later calls
``Slice.complete`` from whatever thread sees the completion (a socket reader, a CQ poller).
That shape fits RDMA's completion queue and is trivially met by synchronous transports.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any


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

    ``endpoint`` is ``host:port`` of the owner's transfer server (TCP data / RDMA handshake).
    ``devices`` lists RDMA devices as dicts ``{name, gid, lid, gid_index, mtu}``.
    """

    name: str
    protocol: str
    endpoint: str
    buffers: tuple[BufferDescriptor, ...] = ()
    devices: tuple[dict[str, Any], ...] = ()

    def find_buffer(self, addr: int, length: int) -> BufferDescriptor | None:
        for b in self.buffers:
            if b.addr <= addr and addr + length <= b.addr + b.length:
                return b
        return None


@dataclass(eq=False)
class Slice:
    """One unit of transfer. ``complete`` is called exactly once per attempt by the transport."""

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
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def complete(self, ok: bool, error: str = "") -> None:
        with self._lock:
            if self.status in (TransferStatus.COMPLETED, TransferStatus.FAILED,
                               TransferStatus.CANCELED, TransferStatus.TIMEOUT):
                return
            self.status = TransferStatus.COMPLETED if ok else TransferStatus.FAILED
            self.error = error
        if self.on_done is not None:
            self.on_done(self)


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

    def stats(self) -> dict[str, Any]:
        """Read-only counters for metrics and checkers."""
        return {}

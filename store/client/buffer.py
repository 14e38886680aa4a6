"""The client's local buffer: registered staging memory for the bytes APIs.

Mooncake's client keeps one registered region of ``local_buffer_size`` bytes and carves a range out
of it for every ``put``/``get`` of a Python ``bytes`` value (``ClientBufferAllocator``, an offset
allocator). The size of that region therefore bounds the largest value the bytes APIs can move and
how many can be in flight at once; a value that does not fit is refused with INVALID_PARAMS, as
Mooncake does ("Failed to allocate buffer for put operation").

Ranges touched by a transfer that did not finish cleanly (a failed or timed-out request whose
slices are still in flight) are *quarantined* with their engine batch instead of being freed: the
transport may still read from them or, for an RDMA READ, land bytes in them. They return to the
allocator once the batch reports no slice in flight, so a later operation can never have its bytes
overwritten by an earlier one's late completion.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from store.allocator import make_allocator
from store.allocator.base import Allocation
from store.transfer.engine import Batch, TransferEngine
from store.transfer.memory import MemoryRegion

log = logging.getLogger("store.client.buffer")


class LocalBuffer:
    """A registered :class:`MemoryRegion` managed by an offset allocator (thread-safe)."""

    def __init__(self, engine: TransferEngine, size: int) -> None:
        self.size = size
        self.region = MemoryRegion(size)
        self.addr = self.region.addr
        self._engine = engine
        try:
            engine.register_memory(self.addr, size, remote=False, location="cpu:local-buffer")
        except BaseException:
            self.region.close()
            raise
        self.allocator = make_allocator("offset", size, segment_name="local-buffer", base=self.addr)
        self._lock = threading.Lock()
        self._quarantine: list[tuple[list[Batch], list[Allocation]]] = []
        self.failed_allocations = 0
        self.quarantined_total = 0

    def allocate(self, length: int) -> Allocation | None:
        """A range of ``length`` bytes, or ``None`` when the buffer has no room (after first
        returning quarantined ranges whose transfers have drained)."""
        if length <= 0 or length > self.size:
            self.failed_allocations += 1
            return None
        alloc = self.allocator.allocate(length)
        if alloc is None and self._quarantine:
            self.sweep()
            alloc = self.allocator.allocate(length)
        if alloc is None:
            self.failed_allocations += 1
        return alloc

    def address(self, alloc: Allocation) -> int:
        return self.addr + alloc.offset

    def free(self, alloc: Allocation) -> None:
        self.allocator.free(alloc)

    def quarantine(self, batches: Batch | list[Batch], allocs: list[Allocation]) -> None:
        """Keep ``allocs`` reserved until every batch in ``batches`` has no slice in flight."""
        if not allocs:
            return
        held = [batches] if isinstance(batches, Batch) else list(batches)
        with self._lock:
            self._quarantine.append((held, list(allocs)))
            self.quarantined_total += len(allocs)
        log.info("local buffer: %d range(s) quarantined behind batch(es) %s (%d slice(s) in flight)",
                 len(allocs), [b.id for b in held], sum(b.slices_in_flight for b in held))

    def sweep(self) -> int:
        """Free quarantined ranges whose batch has drained; returns how many were freed."""
        with self._lock:
            keep, done = [], []
            for batches, allocs in self._quarantine:
                drained = all(b.slices_in_flight == 0 for b in batches)
                (done if drained else keep).append((batches, allocs))
            self._quarantine = keep
        n = 0
        for _, allocs in done:
            for a in allocs:
                self.allocator.free(a)
                n += 1
        return n

    def report(self) -> dict[str, Any]:
        """Allocator figures plus the quarantine (read-only, for checkers)."""
        with self._lock:
            held = sum(len(a) for _, a in self._quarantine)
        return {"addr": self.addr, "size": self.size, **self.allocator.report(),
                "quarantined": held, "quarantined_total": self.quarantined_total,
                "failed_allocations": self.failed_allocations}

    def close(self) -> None:
        """Unregister and unmap (the engine waits for transfers still using the range)."""
        try:
            self._engine.unregister_memory(self.addr, wait_s=5.0)
        except Exception as exc:  # noqa: BLE001 - the engine may already be closed
            log.debug("local buffer %#x unregister: %s", self.addr, exc)
        try:
            self.region.close()
        except Exception as exc:  # noqa: BLE001 - still pinned by a stuck transfer: leak, never unmap
            log.warning("local buffer %#x+%d left mapped: %s", self.addr, self.size, exc)

"""Local transport: ``memmove`` when the target segment belongs to this engine.

Mooncake's store skips the transfer engine for replicas on the local host
(``MC_STORE_MEMCPY``, on by default in TCP-only setups) and copies on one memcpy worker; this
does the same behind the :class:`~store.transfer.transport.Transport` contract, so the engine's
batch, status, retry and timeout rules apply unchanged. The target range is checked against
the engine's registered, remotely accessible memory exactly as the TCP server checks it, and
held while the copy runs so it cannot be unregistered underneath.

``ctypes.memmove`` releases the GIL while it copies. Failpoint: ``local.memcpy`` (per slice).
"""

from __future__ import annotations

import collections
import ctypes
import logging
import threading
from collections.abc import Sequence
from typing import Any

from store.errors import ErrorCode, StoreError
from store.failpoints import failpoint
from store.transfer.memory import MemoryTable
from store.transfer.transport import BufferDescriptor, EngineContext, Opcode, Slice, Transport

log = logging.getLogger(__name__)


class LocalTransport(Transport):
    """Copies on ``workers`` threads (default 1, as Mooncake's single memcpy worker)."""

    name = "local"

    def __init__(self, engine: EngineContext | None = None, *, workers: int = 1,
                 memory: MemoryTable | None = None) -> None:
        if memory is None:
            if engine is None:
                raise StoreError(ErrorCode.INVALID_PARAMS,
                                 "local transport needs an engine or a memory table")
            memory = engine.memory
        self.memory: MemoryTable = memory
        self._cond = threading.Condition(threading.Lock())
        self._queue: collections.deque[Slice] = collections.deque()
        self._closed = False
        self._counters = collections.Counter[str]()
        self._threads = [threading.Thread(target=self._run, daemon=True, name=f"local-memcpy-{i}")
                         for i in range(max(1, workers))]
        for t in self._threads:
            t.start()

    def register_memory(self, addr: int, length: int) -> BufferDescriptor:
        return BufferDescriptor(addr, length)

    def unregister_memory(self, addr: int) -> None:
        return None

    def submit(self, slices: Sequence[Slice]) -> None:
        with self._cond:
            if not self._closed:
                self._queue.extend(slices)
                self._cond.notify()
                return
        for s in slices:
            s.complete(False, "local transport is closed", retryable=False)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            left = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for s in left:
            s.complete(False, "local transport closed before the copy ran", retryable=False)
        for t in self._threads:
            t.join(timeout=5)

    def stats(self) -> dict[str, Any]:
        with self._cond:
            return {**self._counters, "queued": len(self._queue)}

    def _take(self) -> list[Slice] | None:
        with self._cond:
            while not self._queue:
                if self._closed:
                    return None
                self._cond.wait()
            n = min(len(self._queue), 256)
            return [self._queue.popleft() for _ in range(n)]

    def _run(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            ok, failed, nbytes = self._copy_all(batch)
            del batch  # hold no slice while idle
            with self._cond:
                self._counters["slices_ok"] += ok
                self._counters["slices_failed"] += failed
                self._counters["bytes"] += nbytes

    def _copy_all(self, batch: list[Slice]) -> tuple[int, int, int]:
        ok = failed = nbytes = 0
        for s in batch:
            if self._copy(s):
                ok += 1
                nbytes += s.length
            else:
                failed += 1
        return ok, failed, nbytes

    def _copy(self, s: Slice) -> bool:
        if s.abandoned:
            s.complete(False, "request abandoned before the copy", retryable=False)
            return False
        try:
            failpoint("local.memcpy", op=s.opcode.name, addr=s.remote_addr, length=s.length)
        except StoreError as exc:
            s.complete(False, f"local copy at {s.remote_addr:#x}: {exc}", code=exc.code)
            return False
        entry = self.memory.acquire(s.remote_addr, s.length, remote_only=True)
        if entry is None:
            s.complete(False, f"local {s.opcode.name} target [{s.remote_addr:#x}, +{s.length}) is not inside "
                              f"one remotely accessible registered buffer of this engine",
                       code=ErrorCode.INVALID_PARAMS, retryable=False)
            return False
        try:
            if s.opcode is Opcode.WRITE:
                ctypes.memmove(s.remote_addr, s.local_addr, s.length)
            else:
                ctypes.memmove(s.local_addr, s.remote_addr, s.length)
        finally:
            self.memory.release(entry)
        s.complete(True)
        return True

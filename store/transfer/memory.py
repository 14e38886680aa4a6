"""Memory the transfer engine moves bytes into and out of.

Three pieces:

- :class:`MemoryRegion`: an anonymous, page-aligned ``mmap`` a client contributes as its global
  segment or uses as its local buffer. It has a stable address (``.addr``) that peers can target,
  a numpy view, and :meth:`MemoryRegion.chunks` to cut a large segment into registration chunks
  (Mooncake mounts ``global_segment_size`` in pieces of at most ``max_mr_size``).
- :func:`view_at`: a memoryview over raw memory at an address, built with
  ``PyMemoryView_FromMemory`` so no ctypes array type is created per call (ctypes caches one type
  per distinct length forever, which would grow without bound on a data path).
- :class:`MemoryTable`: the engine's registered ranges, with O(log n) lookups and a use count per
  range so memory cannot be unregistered (or a region closed) while a transfer is touching it.
"""

from __future__ import annotations

import bisect
import ctypes
import mmap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from store.errors import ErrorCode, StoreError

PAGE_SIZE = mmap.PAGESIZE

_PyBUF_READ = 0x100
_PyBUF_WRITE = 0x200
_from_memory = ctypes.pythonapi.PyMemoryView_FromMemory
_from_memory.restype = ctypes.py_object
_from_memory.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int)


def view_at(addr: int, length: int, *, writable: bool = True) -> memoryview:
    """A memoryview of ``length`` bytes at ``addr``. The caller guarantees the memory stays mapped."""
    if length < 0:
        raise ValueError(f"view_at: negative length {length}")
    return _from_memory(addr, length, _PyBUF_WRITE if writable else _PyBUF_READ)


def address_of(obj: object) -> int:
    """Address of the first byte of a writable buffer (bytearray, numpy array, mmap, memoryview)."""
    arr = np.frombuffer(obj, dtype=np.uint8)  # type: ignore[call-overload]
    return int(arr.ctypes.data)


# Ranges pinned by an engine registration; closing a region that overlaps one is refused, because
# peers may still write into it.
_pins: dict[int, int] = {}  # start -> end
_pins_lock = threading.Lock()


def pin_range(addr: int, length: int) -> None:
    with _pins_lock:
        _pins[addr] = addr + length


def unpin_range(addr: int) -> None:
    with _pins_lock:
        _pins.pop(addr, None)


def pinned_overlapping(addr: int, length: int) -> list[tuple[int, int]]:
    end = addr + length
    with _pins_lock:
        return [(s, e) for s, e in _pins.items() if s < end and addr < e]


@dataclass(frozen=True)
class Buffer:
    """A contiguous piece of memory (a chunk of a region, or user memory): address and length."""

    addr: int
    length: int

    @property
    def end(self) -> int:
        return self.addr + self.length

    def view(self, *, writable: bool = True) -> memoryview:
        return view_at(self.addr, self.length, writable=writable)

    def numpy(self) -> np.ndarray:
        return np.frombuffer(self.view(), dtype=np.uint8)


class MemoryRegion:
    """An anonymous page-aligned mapping with a fixed address for its whole life.

    ``hugepages=True`` asks for transparent huge pages (``madvise(MADV_HUGEPAGE)``) where the
    kernel offers it; the mapping works either way.
    """

    def __init__(self, length: int, *, hugepages: bool = False, populate: bool = False,
                 align: int = PAGE_SIZE) -> None:
        if length <= 0:
            raise StoreError(ErrorCode.INVALID_PARAMS, f"memory region length must be > 0, got {length}")
        if align < PAGE_SIZE or align & (align - 1):
            raise StoreError(ErrorCode.INVALID_PARAMS,
                             f"alignment must be a power of two >= {PAGE_SIZE}, got {align}")
        self.length = length
        # A stricter alignment than a page (the slab allocator's 16 MiB, as Mooncake's
        # aligned_alloc gives) is had by mapping ``align`` bytes more and starting inside.
        extra = align - PAGE_SIZE
        self._map: mmap.mmap | None = mmap.mmap(-1, length + extra,
                                                flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hugepages and hasattr(mmap, "MADV_HUGEPAGE"):
            self._map.madvise(mmap.MADV_HUGEPAGE)
        # Take the address through a short-lived export; the mapping itself never moves.
        probe = ctypes.c_ubyte.from_buffer(self._map)
        base = ctypes.addressof(probe)
        del probe
        self._skew = -base % align
        self.addr = base + self._skew
        if populate:
            self.numpy()[::PAGE_SIZE] = 0

    @property
    def closed(self) -> bool:
        return self._map is None

    @property
    def end(self) -> int:
        return self.addr + self.length

    def _check_open(self) -> mmap.mmap:
        if self._map is None:
            raise StoreError(ErrorCode.INVALID_PARAMS, f"memory region at {self.addr:#x} is closed")
        return self._map

    def buffer(self, offset: int = 0, length: int | None = None) -> Buffer:
        self._check_open()
        length = self.length - offset if length is None else length
        if offset < 0 or length < 0 or offset + length > self.length:
            raise StoreError(ErrorCode.INVALID_PARAMS,
                             f"range [{offset}, {offset + length}) outside region of {self.length} B")
        return Buffer(self.addr + offset, length)

    def chunks(self, max_chunk: int) -> list[Buffer]:
        """Cut the region into page-aligned pieces of at most ``max_chunk`` bytes (the last may be
        shorter), each registered on its own so no registration exceeds a transport's limit."""
        self._check_open()
        if max_chunk <= 0:
            raise StoreError(ErrorCode.INVALID_PARAMS, f"chunk size must be > 0, got {max_chunk}")
        step = max(PAGE_SIZE, max_chunk - max_chunk % PAGE_SIZE)
        return [Buffer(self.addr + off, min(step, self.length - off)) for off in range(0, self.length, step)]

    def view(self) -> memoryview:
        return memoryview(self._check_open())[self._skew:self._skew + self.length]

    def numpy(self) -> np.ndarray:
        return np.frombuffer(self._check_open(), dtype=np.uint8, count=self.length, offset=self._skew)

    def close(self) -> None:
        """Unmap. Refused while an engine still has part of the region registered; raises
        ``BufferError`` while numpy views or memoryviews of it are alive."""
        if self._map is None:
            return
        pins = pinned_overlapping(self.addr, self.length)
        if pins:
            raise StoreError(ErrorCode.UNAVAILABLE_IN_CURRENT_STATUS,
                             f"memory region {self.addr:#x}+{self.length} still registered "
                             f"({len(pins)} range(s), first {pins[0][0]:#x}); unregister it first")
        self._map.close()
        self._map = None

    def __enter__(self) -> MemoryRegion:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"MemoryRegion(addr={self.addr:#x}, length={self.length}, {state})"


@dataclass(eq=False)
class RegisteredRange:
    """One entry of a :class:`MemoryTable`."""

    addr: int
    length: int
    remote: bool
    location: str = "cpu:0"
    users: int = 0  # transfers currently reading/writing inside the range
    closing: bool = False  # being unregistered: no new users
    extra: dict = field(default_factory=dict)  # per-transport data (e.g. RDMA MR handles)

    @property
    def end(self) -> int:
        return self.addr + self.length


class MemoryTable:
    """Registered ranges of one engine; non-overlapping, sorted by address."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ranges: list[RegisteredRange] = []
        self._cond = threading.Condition(threading.Lock())

    def add(self, addr: int, length: int, *, remote: bool = True, location: str = "cpu:0") -> RegisteredRange:
        if addr <= 0 or length <= 0:
            raise StoreError(ErrorCode.INVALID_PARAMS,
                             f"cannot register addr={addr:#x} length={length}: both must be > 0")
        with self._cond:
            i = bisect.bisect_right(self._starts, addr)
            prev = self._ranges[i - 1] if i > 0 else None
            nxt = self._ranges[i] if i < len(self._ranges) else None
            if (prev is not None and prev.end > addr) or (nxt is not None and nxt.addr < addr + length):
                other = prev if prev is not None and prev.end > addr else nxt
                assert other is not None
                raise StoreError(ErrorCode.INVALID_PARAMS,
                                 f"range {addr:#x}+{length} overlaps registered range "
                                 f"{other.addr:#x}+{other.length}")
            entry = RegisteredRange(addr, length, remote, location)
            self._starts.insert(i, addr)
            self._ranges.insert(i, entry)
        pin_range(addr, length)
        return entry

    def remove(self, addr: int, *, wait_s: float = 5.0) -> RegisteredRange:
        """Unregister the range starting at ``addr`` once no transfer uses it.

        New transfers are refused at once; if users remain after ``wait_s`` the range is left
        registered and ``UNAVAILABLE_IN_CURRENT_STATUS`` is raised (never unmapped under a peer).
        """
        deadline = time.monotonic() + wait_s
        with self._cond:
            i = bisect.bisect_left(self._starts, addr)
            if i >= len(self._starts) or self._starts[i] != addr:
                raise StoreError(ErrorCode.INVALID_PARAMS, f"no registered range starts at {addr:#x}")
            entry = self._ranges[i]
            entry.closing = True
            while entry.users > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    entry.closing = False
                    raise StoreError(ErrorCode.UNAVAILABLE_IN_CURRENT_STATUS,
                                     f"range {addr:#x}+{entry.length} has {entry.users} transfer(s) in "
                                     f"flight; not unregistered")
                self._cond.wait(left)
            i = self._ranges.index(entry)
            del self._starts[i]
            del self._ranges[i]
        unpin_range(addr)
        return entry

    def find(self, addr: int, length: int, *, remote_only: bool = False) -> RegisteredRange | None:
        """The single range holding all of ``[addr, addr+length)``, or ``None``."""
        with self._cond:
            return self._find_locked(addr, length, remote_only)

    def _find_locked(self, addr: int, length: int, remote_only: bool) -> RegisteredRange | None:
        i = bisect.bisect_right(self._starts, addr) - 1
        if i < 0:
            return None
        r = self._ranges[i]
        if addr + length <= r.end and not r.closing and (r.remote or not remote_only):
            return r
        return None

    def cover(self, addr: int, length: int) -> list[RegisteredRange] | None:
        """The ranges that together hold ``[addr, addr+length)`` back to back, or ``None``.

        A local buffer may be registered in several adjacent pieces (chunks); a request spanning
        them is valid.
        """
        with self._cond:
            out: list[RegisteredRange] = []
            pos, end = addr, addr + length
            i = bisect.bisect_right(self._starts, addr) - 1
            if i < 0:
                return None
            while True:
                if i >= len(self._ranges):
                    return None
                r = self._ranges[i]
                if r.closing or not (r.addr <= pos < r.end or (length == 0 and r.addr <= pos <= r.end)):
                    return None
                out.append(r)
                if end <= r.end:
                    return out
                pos = r.end
                i += 1

    def acquire(self, addr: int, length: int, *, remote_only: bool = False) -> RegisteredRange | None:
        """Like :meth:`find`, and count a user so the range cannot be unregistered meanwhile."""
        with self._cond:
            r = self._find_locked(addr, length, remote_only)
            if r is not None:
                r.users += 1
            return r

    def acquire_all(self, ranges: list[RegisteredRange]) -> bool:
        with self._cond:
            if any(r.closing for r in ranges):
                return False
            for r in ranges:
                r.users += 1
            return True

    def release(self, r: RegisteredRange) -> None:
        with self._cond:
            r.users -= 1
            if r.users == 0 and r.closing:
                self._cond.notify_all()

    def release_all(self, ranges: list[RegisteredRange]) -> None:
        with self._cond:
            wake = False
            for r in ranges:
                r.users -= 1
                wake = wake or (r.users == 0 and r.closing)
            if wake:
                self._cond.notify_all()

    def __iter__(self) -> Iterator[RegisteredRange]:
        with self._cond:
            return iter(list(self._ranges))

    def __len__(self) -> int:
        return len(self._ranges)

    def snapshot(self) -> list[dict]:
        """Read-only view for checkers: address, length, remote flag, current users."""
        with self._cond:
            return [{"addr": r.addr, "length": r.length, "remote": r.remote, "location": r.location,
                     "users": r.users, "closing": r.closing} for r in self._ranges]

"""``SlabAllocator``: the cachelib slab allocator Mooncake called the "Facebook allocator".

A model of Mooncake's ``CachelibBufferAllocator`` (one cachelib ``MemoryAllocator`` with one pool
``"main"`` spanning the segment), kept faithful *including its failure*:

- The segment is cut into 16 MiB slabs (``Slab::kSize = 1 << 24``); base address and size must be
  multiples of 16 MiB (:meth:`SlabAllocator.check_mount`, Mooncake answers ``INVALID_PARAMS``).
- 53 allocation classes from ``generateAllocSizes(factor=1.25, maxSize=16 MiB, minSize=72)``:
  72 B growing x1.25 rounded up to 8 B, stopping when fewer than two chunks fit a slab, then
  16 MiB. A request is padded to at least 64 B and served by the smallest class that holds it;
  requests above 16 MiB have no class and fail.
- A class serves a request from its freed chunks first (LIFO), then carves the next chunk of its
  current slab, then takes a whole new slab from the pool.
- **Slabs are never given back.** Once a class owns a slab it keeps it even when every chunk in
  it is free (cachelib's slab release / rebalancing was not imported; Mooncake issue #632). After
  the size mix changes, allocation fails although usage is low: *calcification*. That is the
  behaviour this class exists to reproduce; tests pin it.

Per carved chunk the model keeps a 16-bit tag (the live allocation's tag, 0 when free) so double
frees and stale handles are refused; freed chunks are an ``array('Q')`` stack per class.
"""

from __future__ import annotations

import itertools
import logging
import sys
import threading
from array import array
from bisect import bisect_left
from typing import Any

from store.allocator._fast import make_allocation
from store.allocator.base import Allocation, Allocator, AllocatorError
from store.allocator.offset import check_size

log = logging.getLogger("store.allocator.slab")
_DEBUG = logging.DEBUG

SLAB_SIZE = 1 << 24  # Slab::kSize, kNumSlabBits = 24
SLAB_BITS = 24
MIN_ALLOC_SIZE = 64  # kMinAllocSize / kMinSliceSize
ALIGNMENT = 8
_owner_ids = itertools.count(1_000_000_001)  # distinct from offset allocators' ids


def _align_up(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def generate_alloc_sizes(factor: float = 1.25, max_size: int = SLAB_SIZE,
                         min_size: int = 72) -> tuple[int, ...]:
    """cachelib's ``MemoryAllocator::generateAllocSizes`` (``reduceFragmentation=false``)."""
    if max_size > SLAB_SIZE:
        raise ValueError(f"maximum alloc size {max_size} is more than the slab size {SLAB_SIZE}")
    if factor <= 1.0:
        raise ValueError(f"invalid factor {factor}")
    sizes: set[int] = set()
    size = min_size
    while size < max_size:
        if SLAB_SIZE // size <= 1:  # fewer than two chunks per slab: stop, use the max size
            break
        sizes.add(size)
        prev = size
        size = _align_up(int(size * factor), ALIGNMENT)
        if size == prev:
            raise ValueError(f"invalid incFactor {factor}")
    sizes.add(_align_up(max_size, ALIGNMENT))
    return tuple(sorted(sizes))


ALLOC_SIZES: tuple[int, ...] = generate_alloc_sizes()
assert len(ALLOC_SIZES) == 53, len(ALLOC_SIZES)


class _Class:
    """One allocation class: its slabs, current slab cursor and freed-chunk stack."""

    __slots__ = ("chunks_per_slab", "curr_off", "curr_slab", "freed", "index", "live", "size", "slabs")

    def __init__(self, index: int, size: int) -> None:
        self.index = index
        self.size = size
        self.chunks_per_slab = SLAB_SIZE // size
        self.slabs: list[int] = []
        self.curr_slab = -1
        self.curr_off = SLAB_SIZE  # nothing to carve
        self.freed = array("Q")
        self.live = 0

    def has_free_chunk(self) -> bool:
        return bool(self.freed) or (self.curr_slab >= 0 and self.curr_off + self.size <= SLAB_SIZE)

    def free_chunks(self) -> int:
        carve = (SLAB_SIZE - self.curr_off) // self.size if self.curr_slab >= 0 else 0
        return len(self.freed) + carve


class SlabAllocator(Allocator):
    """Mooncake's cachelib allocator for one segment (``capacity`` a multiple of 16 MiB)."""

    kind = "cachelib"
    _log = log

    def __init__(self, capacity: int, *, segment_name: str = "", base: int = 0) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int):
            raise AllocatorError(f"segment capacity must be an int, got {capacity!r}")
        self.check_mount(base, capacity)
        self._capacity = capacity
        self.segment_name = segment_name
        self.base = base
        self._owner = next(_owner_ids)
        self._lock = threading.Lock()
        self._nslabs = capacity >> SLAB_BITS
        self._next_slab = 0  # the pool hands out slabs in address order, never takes them back
        self._slab_class = array("b", [-1]) * self._nslabs
        self._tags: list[array | None] = [None] * self._nslabs
        self._classes: list[_Class | None] = [None] * len(ALLOC_SIZES)
        self._tag = 0
        self._used = 0
        self._requested = 0
        self._live = 0

    @staticmethod
    def check_mount(base: int, size: int) -> None:
        """Mooncake's mount constraint for cachelib segments: raise ``AllocatorError`` unless the
        base address and the size are positive multiples of 16 MiB (the master answers
        ``INVALID_PARAMS``)."""
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise AllocatorError(f"segment size must be a positive int, got {size!r}")
        if isinstance(base, bool) or not isinstance(base, int) or base < 0:
            raise AllocatorError(f"segment base must be a non-negative int, got {base!r}")
        if size % SLAB_SIZE or base % SLAB_SIZE:
            raise AllocatorError(
                f"cachelib segments need base and size aligned to the 16 MiB slab size: base={base:#x} "
                f"size={size} (size % 16 MiB = {size % SLAB_SIZE}, base % 16 MiB = {base % SLAB_SIZE})")

    @staticmethod
    def class_for(size: int) -> int | None:
        """Chunk size that serves a request of ``size`` bytes, or ``None`` when above 16 MiB."""
        i = bisect_left(ALLOC_SIZES, max(size, MIN_ALLOC_SIZE))
        return ALLOC_SIZES[i] if i < len(ALLOC_SIZES) else None

    # --- interface -----------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def used(self) -> int:
        return self._used

    @property
    def requested_bytes(self) -> int:
        return self._requested

    @property
    def live_count(self) -> int:
        return self._live

    @property
    def free_slabs(self) -> int:
        return self._nslabs - self._next_slab

    @property
    def largest_free_region(self) -> int:
        """Largest chunk size a request can get now: 16 MiB while unassigned slabs remain, else
        the largest class with a free chunk. Unlike the offset allocator this is not monotone:
        a *smaller* request can still fail (its class has no chunk). Use :meth:`can_allocate`."""
        if self._next_slab < self._nslabs:
            return ALLOC_SIZES[-1]
        best = 0
        for cls in self._classes:
            if cls is not None and cls.size > best and cls.has_free_chunk():
                best = cls.size
        return best

    def reserved_size(self, size: int) -> int:
        c = self.class_for(size)
        return 0 if c is None else c

    def can_allocate(self, size: int) -> bool:
        if size <= 0 or size > self._capacity:
            return False
        i = bisect_left(ALLOC_SIZES, max(size, MIN_ALLOC_SIZE))
        if i >= len(ALLOC_SIZES):
            return False
        cls = self._classes[i]
        return (cls is not None and cls.has_free_chunk()) or self._next_slab < self._nslabs

    def fit_size(self, size: int) -> int | None:
        """Placement's best-fit cost: the chunk size when the class already has a free chunk (no
        slab committed), 16 MiB + chunk size when a new slab must be taken, ``None`` when the
        request cannot be served here."""
        if size <= 0 or size > self._capacity:
            return None
        i = bisect_left(ALLOC_SIZES, max(size, MIN_ALLOC_SIZE))
        if i >= len(ALLOC_SIZES):
            return None
        cls = self._classes[i]
        if cls is not None and cls.has_free_chunk():
            return ALLOC_SIZES[i]
        if self._next_slab < self._nslabs:
            return SLAB_SIZE + ALLOC_SIZES[i]
        return None

    def allocate(self, size: int) -> Allocation | None:
        if type(size) is not int or size <= 0 or size > self._capacity:
            size = check_size(size, self._capacity)
        i = bisect_left(ALLOC_SIZES, size if size > MIN_ALLOC_SIZE else MIN_ALLOC_SIZE)
        if i >= len(ALLOC_SIZES):  # no class above 16 MiB: cachelib throws, Mooncake returns null
            return self._fail(size)
        with self._lock:
            cls = self._classes[i]
            if cls is None:
                cls = self._classes[i] = _Class(i, ALLOC_SIZES[i])
            csize = cls.size
            if cls.freed:
                off = cls.freed.pop()
                slab = off >> SLAB_BITS
                chunk = (off & (SLAB_SIZE - 1)) // csize
            elif cls.curr_slab >= 0 and cls.curr_off + csize <= SLAB_SIZE:
                slab = cls.curr_slab
                chunk = cls.curr_off // csize
                off = (slab << SLAB_BITS) + cls.curr_off
                cls.curr_off += csize
                self._tags[slab].append(0)
            elif self._next_slab < self._nslabs:
                slab = self._next_slab
                self._next_slab += 1
                self._slab_class[slab] = i
                self._tags[slab] = array("H", [0])
                cls.slabs.append(slab)
                cls.curr_slab = slab
                cls.curr_off = csize
                chunk = 0
                off = slab << SLAB_BITS
            else:
                return self._fail(size)
            tag = self._tag % 65535 + 1
            self._tag = tag
            self._tags[slab][chunk] = tag
            cls.live += 1
            self._used += csize
            self._requested += size
            self._live += 1
        alloc = make_allocation(off, csize, size, self._owner, tag)
        if log.isEnabledFor(_DEBUG):
            log.debug("allocation_succeeded size=%d segment=%s address=%#x", size, self.segment_name,
                      self.base + off)
        return alloc

    def free(self, allocation: Allocation) -> None:
        self._check_owner(allocation)
        off = allocation.offset
        with self._lock:
            slab = off >> SLAB_BITS if isinstance(off, int) and off >= 0 else -1
            ci = self._slab_class[slab] if 0 <= slab < self._nslabs else -1
            ok = ci >= 0
            if ok:
                cls = self._classes[ci]
                within = off & (SLAB_SIZE - 1)
                chunk = within // cls.size
                tags = self._tags[slab]
                ok = (allocation.size == cls.size and within % cls.size == 0 and chunk < len(tags)
                      and tags[chunk] != 0 and tags[chunk] == allocation.handle)
            if not ok:
                raise AllocatorError(
                    f"allocation at offset {off} size {allocation.size} is not live in segment "
                    f"{self.segment_name!r} (double free or stale handle)")
            tags[chunk] = 0
            cls.freed.append(off)
            cls.live -= 1
            self._used -= cls.size
            self._requested -= allocation.requested
            self._live -= 1
        if log.isEnabledFor(_DEBUG):
            log.debug("deallocation_succeeded address=%#x size=%d segment=%s", self.base + off,
                      allocation.requested, self.segment_name)

    # --- introspection -------------------------------------------------------------------------

    def class_report(self) -> list[dict[str, int]]:
        """Per class that owns slabs: chunk size, slabs, live and free chunks, stranded bytes."""
        out = []
        with self._lock:
            for cls in self._classes:
                if cls is None or not cls.slabs:
                    continue
                out.append({
                    "chunk_size": cls.size,
                    "slabs": len(cls.slabs),
                    "live": cls.live,
                    "free_chunks": cls.free_chunks(),
                    "stranded_bytes": len(cls.slabs) * SLAB_SIZE - cls.live * cls.size,
                })
        return out

    def bookkeeping_bytes(self) -> int:
        total = sys.getsizeof(self) + sys.getsizeof(self._slab_class) + sys.getsizeof(self._tags)
        total += sys.getsizeof(self._classes)
        for t in self._tags:
            if t is not None:
                total += sys.getsizeof(t)
        for cls in self._classes:
            if cls is not None:
                total += sys.getsizeof(cls) + sys.getsizeof(cls.freed) + sys.getsizeof(cls.slabs)
        return total

    def report(self) -> dict[str, Any]:
        classes = self.class_report()
        with self._lock:
            free = self._capacity - self._used
            unassigned = (self._nslabs - self._next_slab) * SLAB_SIZE
            stranded = free - unassigned
            rep = {
                "kind": self.kind,
                "segment": self.segment_name,
                "capacity": self._capacity,
                "used": self._used,
                "requested": self._requested,
                "free": free,
                "largest_free_region": self.largest_free_region,
                # share of free bytes locked inside slabs owned by a size class
                "fragmentation": stranded / free if free else 0.0,
                "utilisation": self._requested / self._capacity,
                "rounding_waste": self._used - self._requested,
                "live_allocations": self._live,
                "slabs_total": self._nslabs,
                "slabs_free": self._nslabs - self._next_slab,
                "stranded_bytes": stranded,
                "classes": classes,
            }
        rep["bookkeeping_bytes"] = self.bookkeeping_bytes()
        return rep

    def check_invariants(self) -> None:
        """Cross-check counters, tags, slab ownership and freed stacks (O(carved chunks))."""
        with self._lock:
            used = live = 0
            owned = 0
            for ci, cls in enumerate(self._classes):
                if cls is None:
                    continue
                freed = set(cls.freed)
                assert len(freed) == len(cls.freed), "chunk freed twice"
                clive = 0
                for slab in cls.slabs:
                    owned += 1
                    assert self._slab_class[slab] == ci, "slab owner"
                    tags = self._tags[slab]
                    for chunk, tag in enumerate(tags):
                        off = (slab << SLAB_BITS) + chunk * cls.size
                        if tag:
                            assert off not in freed, "live chunk on the freed stack"
                            clive += 1
                        else:
                            assert off in freed, "free chunk lost (not on the freed stack)"
                    assert len(tags) <= cls.chunks_per_slab
                assert clive == cls.live, "class live counter"
                live += clive
                used += clive * cls.size
            assert owned == self._next_slab, "every handed-out slab belongs to exactly one class"
            assert used == self._used and live == self._live, "allocator counters"

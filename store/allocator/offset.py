"""``OffsetAllocator``: the O(1) two-level-bitmap allocator Mooncake uses for segments.

Same algorithm and bin maths as Sebastian Aaltonen's OffsetAllocator (MIT) as modified by
Mooncake (``mooncake-store/src/offset_allocator.cpp``), re-implemented in Python:

- 256 leaf bins = 32 top bins x 8 leaf bins. A size maps to a bin through a "small float" with
  3 mantissa bits (``exponent << 3 | mantissa``; values below 8 are exact), so bin sizes grow in
  steps of at most 12.5 % (8 bins per power of two).
- Two bitmaps find a non-empty bin in O(1): one 32-bit word for the top bins, one 8-bit word per
  top bin for its leaves.
- ``allocate`` rounds the request *up* to its bin index (``uint_to_float_round_up``), takes the
  head node of the lowest non-empty bin at or above it, and (Mooncake's change) reserves the
  whole bin size ``float_to_uint(min_bin)`` so that a freed block returns to the same bin. The
  remainder becomes a free node inserted by ``uint_to_float_round_down``.
- ``free`` coalesces with free physical neighbours (doubly linked neighbour list), reinserts.
- Mooncake's ``multiplier_bits``: for segments larger than ``MAX_BIN_SIZE`` (3.75 GiB) all
  offsets and sizes are scaled by ``2**k`` (k smallest with ``capacity >> k <= MAX_BIN_SIZE``),
  so the allocation granularity of a 1 TiB segment is 512 B.
- Node capacity bounds as in ``OffsetBufferAllocator``: the node arrays start at
  ``clamp(capacity / 4096, 1 Ki, 64 Ki)`` and grow up to ``clamp(capacity / 1024, 1 Mi, 64 Mi)``
  nodes; when every node is in use, ``allocate`` fails (bounding live allocations).
- Fast fail: the largest free region is cached after every change (O(1) from the bitmaps); a
  request above it fails without touching the bins.

Node state is a struct of ``array('I')`` columns plus one state byte per node (about 29 bytes per
node), so a 1 TiB segment with a million live allocations costs tens of MiB, not the hundreds
that per-node Python objects would.
"""

from __future__ import annotations

import itertools
import logging
import operator
import sys
import threading
from array import array
from typing import Any

from store.allocator._fast import make_allocation
from store.allocator.base import Allocation, Allocator, AllocatorError

log = logging.getLogger("store.allocator.offset")
_DEBUG = logging.DEBUG

MANTISSA_BITS = 3
MANTISSA_VALUE = 1 << MANTISSA_BITS
MANTISSA_MASK = MANTISSA_VALUE - 1
NUM_TOP_BINS = 32
BINS_PER_LEAF = 8
TOP_BINS_INDEX_SHIFT = 3
LEAF_BINS_INDEX_MASK = 7
NUM_LEAF_BINS = NUM_TOP_BINS * BINS_PER_LEAF
MAX_BIN_SIZE = 4_026_531_840  # 3.75 GiB, float_to_uint(239)

UNUSED = 0xFFFFFFFF
_GEN_SHIFT = 32
_IDX_MASK = 0xFFFFFFFF

# node states
_SLOT = 0  # spare node on the node free list
_FREE = 1  # a free region linked in a bin
_LIVE = 2  # a live allocation

_owner_ids = itertools.count(1)


# --- small-float bin maths -----------------------------------------------------------------------

def uint_to_float_round_up(size: int) -> int:
    """Bin index of the smallest bin whose size is >= ``size``."""
    if size < MANTISSA_VALUE:
        return size
    mantissa_start_bit = size.bit_length() - 1 - MANTISSA_BITS
    exp = mantissa_start_bit + 1
    mantissa = (size >> mantissa_start_bit) & MANTISSA_MASK
    if size & ((1 << mantissa_start_bit) - 1):
        mantissa += 1  # may overflow into the exponent: "+" below, as in the original
    return (exp << MANTISSA_BITS) + mantissa


def uint_to_float_round_down(size: int) -> int:
    """Bin index of the largest bin whose size is <= ``size``."""
    if size < MANTISSA_VALUE:
        return size
    mantissa_start_bit = size.bit_length() - 1 - MANTISSA_BITS
    exp = mantissa_start_bit + 1
    mantissa = (size >> mantissa_start_bit) & MANTISSA_MASK
    return (exp << MANTISSA_BITS) | mantissa


def float_to_uint(float_value: int) -> int:
    """Size of bin ``float_value``."""
    exponent = float_value >> MANTISSA_BITS
    mantissa = float_value & MANTISSA_MASK
    if exponent == 0:
        return mantissa
    return (mantissa | MANTISSA_VALUE) << (exponent - 1)


BIN_SIZES: tuple[int, ...] = tuple(float_to_uint(b) for b in range(NUM_LEAF_BINS))


def bin_size_round_up(size: int) -> int:
    """What the offset allocator reserves for ``size`` units (Mooncake's round-up)."""
    return float_to_uint(uint_to_float_round_up(size))


def multiplier_bits_for(capacity: int) -> int:
    """Mooncake's ``calculateMultiplier``: smallest k with ``capacity >> k <= MAX_BIN_SIZE``."""
    k = 0
    while (capacity >> k) > MAX_BIN_SIZE:
        k += 1
    return k


def default_node_bounds(capacity: int) -> tuple[int, int]:
    """``OffsetBufferAllocator``'s node capacity: (initial, maximum)."""
    init = min(max(capacity // 4096, 1024), 64 * 1024)
    maximum = min(max(capacity // 1024, 1024 * 1024), 64 * 1024 * 1024)
    return init, max(init, maximum)


def check_size(size: object, capacity: int) -> int:
    """Validate an allocation size (ints and numpy integers; never bools or floats)."""
    if type(size) is not int:
        if isinstance(size, bool):
            raise AllocatorError(f"allocation size must be an int, got {size!r}")
        try:
            size = operator.index(size)
        except TypeError:
            raise AllocatorError(f"allocation size must be an int, got {size!r}") from None
    if size <= 0:
        raise AllocatorError(f"allocation size must be > 0, got {size}")
    if size > capacity:
        raise AllocatorError(f"allocation size {size} exceeds the segment capacity {capacity}")
    return size


class OffsetAllocator(Allocator):
    """Mooncake's offset allocator for one segment of ``capacity`` bytes.

    ``segment_name`` and ``base`` are only used in log lines (``address = base + offset``).
    ``max_nodes`` / ``init_nodes`` override Mooncake's node bounds (tests use a small bound);
    ``round_up=False`` is Mooncake's ``OFFSET_ALLOCATOR_NOT_ROUND_UP`` build (sebbbi's original).
    """

    kind = "offset"
    _log = log

    def __init__(self, capacity: int, *, segment_name: str = "", base: int = 0,
                 max_nodes: int | None = None, init_nodes: int | None = None,
                 round_up: bool = True) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity <= 0:
            raise AllocatorError(f"segment capacity must be a positive int, got {capacity!r}")
        d_init, d_max = default_node_bounds(capacity)
        if max_nodes is not None:
            if max_nodes < 2:
                raise AllocatorError(f"max_nodes must be >= 2, got {max_nodes}")
            d_max = max_nodes
            d_init = min(d_init, max_nodes)
        if init_nodes is not None:
            d_init = max(1, min(init_nodes, d_max))
        self._capacity = capacity
        self.segment_name = segment_name
        self.base = base
        self._k = multiplier_bits_for(capacity)
        self._units = capacity >> self._k
        self._round_up = round_up
        self._owner = next(_owner_ids)
        self._lock = threading.Lock()
        self._max_nodes = d_max
        self._init_nodes = d_init
        self._reset()

    # --- state ---------------------------------------------------------------------------------

    def _reset(self) -> None:
        n = self._init_nodes
        self._n = 0  # node slots allocated in the arrays
        self._off = array("I")
        self._size = array("I")
        self._bprev = array("I")
        self._bnext = array("I")  # bin list; for spare slots: the node free list
        self._nprev = array("I")
        self._nnext = array("I")
        self._gen = array("I")
        self._state = bytearray()
        self._spare = UNUSED  # head of the spare-slot list
        self._nodes_used = 0
        self._heads = [UNUSED] * NUM_LEAF_BINS
        self._leaf = [0] * NUM_TOP_BINS
        self._top = 0
        self._free_units = 0
        self._used_units = 0
        self._requested = 0
        self._live = 0
        self._largest_units = 0
        self._grow(n)
        self._insert(self._units, 0)
        self._refresh_largest()

    def _grow(self, want: int | None = None) -> bool:
        """Add spare node slots (doubling, up to the maximum). False when at the maximum."""
        n = self._n
        if n >= self._max_nodes:
            return False
        add = want if want is not None else max(n, 1024)
        add = min(add, self._max_nodes - n)
        fill = array("I", [UNUSED]) * add
        zeros = array("I", [0]) * add
        self._off.extend(zeros)
        self._size.extend(zeros)
        self._gen.extend(zeros)
        self._bprev.extend(fill)
        self._nprev.extend(fill)
        self._nnext.extend(fill)
        # the new slots form the spare list n -> n+1 -> ... -> old spare head
        chain = array("I", range(n + 1, n + add + 1))
        chain[-1] = self._spare
        self._bnext.extend(chain)
        self._state.extend(bytes(add))
        self._spare = n
        self._n = n + add
        return True

    def _refresh_largest(self) -> None:
        top = self._top
        if top:
            tb = top.bit_length() - 1
            self._largest_units = BIN_SIZES[(tb << 3) | (self._leaf[tb].bit_length() - 1)]
        else:
            self._largest_units = 0

    def _insert(self, size: int, offset: int) -> int:
        """Take a spare slot, make it a free region of ``size`` units at ``offset``, bin it."""
        if size < MANTISSA_VALUE:
            b = size
        else:
            msb = size.bit_length() - 4
            b = ((msb + 1) << 3) | ((size >> msb) & 7)
        heads = self._heads
        top_node = heads[b]
        if top_node == UNUSED:
            tb = b >> 3
            self._leaf[tb] |= 1 << (b & 7)
            self._top |= 1 << tb
        idx = self._spare
        bnext = self._bnext
        self._spare = bnext[idx]
        self._nodes_used += 1
        self._off[idx] = offset
        self._size[idx] = size
        bnext[idx] = top_node
        self._bprev[idx] = UNUSED
        self._nprev[idx] = UNUSED
        self._nnext[idx] = UNUSED
        self._state[idx] = _FREE
        if top_node != UNUSED:
            self._bprev[top_node] = idx
        heads[b] = idx
        self._free_units += size
        return idx

    def _remove(self, idx: int) -> None:
        """Unlink free region ``idx`` from its bin and return its slot to the spare list."""
        bprev = self._bprev
        bnext = self._bnext
        p = bprev[idx]
        nx = bnext[idx]
        size = self._size[idx]
        if p != UNUSED:
            bnext[p] = nx
            if nx != UNUSED:
                bprev[nx] = p
        else:
            if size < MANTISSA_VALUE:
                b = size
            else:
                msb = size.bit_length() - 4
                b = ((msb + 1) << 3) | ((size >> msb) & 7)
            self._heads[b] = nx
            if nx != UNUSED:
                bprev[nx] = UNUSED
            else:
                tb = b >> 3
                leaf = self._leaf[tb] & ~(1 << (b & 7))
                self._leaf[tb] = leaf
                if not leaf:
                    self._top &= ~(1 << tb)
        self._state[idx] = _SLOT
        bnext[idx] = self._spare
        self._spare = idx
        self._nodes_used -= 1
        self._free_units -= size

    # --- interface -----------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def used(self) -> int:
        return self._used_units << self._k

    @property
    def requested_bytes(self) -> int:
        """Sum of the sizes callers asked for (Mooncake's ``cur_size_``)."""
        return self._requested

    @property
    def free_bytes(self) -> int:
        return self._free_units << self._k

    @property
    def largest_free_region(self) -> int:
        if self._nodes_used >= self._max_nodes:
            return 0
        return self._largest_units << self._k

    @property
    def live_count(self) -> int:
        return self._live

    @property
    def granularity(self) -> int:
        return 1 << self._k

    @property
    def max_nodes(self) -> int:
        return self._max_nodes

    def reserved_size(self, size: int) -> int:
        """Bytes ``allocate(size)`` would reserve (granularity and bin round-up)."""
        k = self._k
        units = (size + (1 << k) - 1) >> k
        return (bin_size_round_up(units) if self._round_up else units) << k

    def can_allocate(self, size: int) -> bool:
        """Exactly whether ``allocate(size)`` would succeed now (no side effects)."""
        if size <= 0 or size > self._capacity or self._nodes_used >= self._max_nodes:
            return False
        k = self._k
        return bin_size_round_up((size + (1 << k) - 1) >> k) <= self._largest_units

    def fit_size(self, size: int) -> int | None:
        """Size class (bytes) of the free block ``allocate(size)`` would split, or ``None``.

        Placement uses it for best fit across segments: the smaller, the tighter the fit.
        """
        if size <= 0 or size > self._capacity or self._nodes_used >= self._max_nodes:
            return None
        k = self._k
        units = (size + (1 << k) - 1) >> k
        if units > MAX_BIN_SIZE:
            return None
        min_bin = uint_to_float_round_up(units)
        tb = min_bin >> 3
        top = self._top
        b = -1
        if top & (1 << tb):
            bits = self._leaf[tb] & ~((1 << (min_bin & 7)) - 1)
            if bits:
                b = (tb << 3) | ((bits & -bits).bit_length() - 1)
        if b < 0:
            bits = top & ~((1 << (tb + 1)) - 1)
            if not bits:
                return None
            tb = (bits & -bits).bit_length() - 1
            leaf = self._leaf[tb]
            b = (tb << 3) | ((leaf & -leaf).bit_length() - 1)
        return float_to_uint(b) << k

    def allocate(self, size: int) -> Allocation | None:
        if type(size) is not int or size <= 0 or size > self._capacity:
            size = check_size(size, self._capacity)
        k = self._k
        units = (size + (1 << k) - 1) >> k if k else size
        with self._lock:
            # Fast fail (Mooncake's largest-free-region hint) and the node bound.
            if units > self._largest_units or self._nodes_used >= self._max_nodes:
                return self._fail(size)
            if self._spare == UNUSED:
                self._grow()
            # min bin: round up
            if units < MANTISSA_VALUE:
                min_bin = units
            else:
                msb = units.bit_length() - 4
                min_bin = ((msb + 1) << 3) + ((units >> msb) & 7) + (1 if units & ((1 << msb) - 1) else 0)
            tb = min_bin >> 3
            top = self._top
            leaf = self._leaf
            b = -1
            if top & (1 << tb):
                bits = leaf[tb] & ~((1 << (min_bin & 7)) - 1)
                if bits:
                    b = (tb << 3) | ((bits & -bits).bit_length() - 1)
            if b < 0:
                bits = top & ~((1 << (tb + 1)) - 1)
                if not bits:  # cannot happen after the fast-fail check; kept for safety
                    return self._fail(size)
                tb = (bits & -bits).bit_length() - 1
                lbits = leaf[tb]
                b = (tb << 3) | ((lbits & -lbits).bit_length() - 1)
            reserve = BIN_SIZES[min_bin] if self._round_up else units
            # pop the head node of bin b
            heads = self._heads
            bnext = self._bnext
            sizes = self._size
            idx = heads[b]
            total = sizes[idx]
            nx = bnext[idx]
            heads[b] = nx
            if nx != UNUSED:
                self._bprev[nx] = UNUSED
            else:
                lbits = leaf[tb] & ~(1 << (b & 7))
                leaf[tb] = lbits
                if not lbits:
                    self._top = top & ~(1 << tb)
            self._free_units -= total
            sizes[idx] = reserve
            self._state[idx] = _LIVE
            gen = (self._gen[idx] + 1) & _IDX_MASK
            self._gen[idx] = gen
            offset = self._off[idx]
            remainder = total - reserve
            if remainder > 0:
                new = self._insert(remainder, offset + reserve)
                nnext = self._nnext
                old_next = nnext[idx]
                if old_next != UNUSED:
                    self._nprev[old_next] = new
                self._nprev[new] = idx
                nnext[new] = old_next
                nnext[idx] = new
            self._used_units += reserve
            self._requested += size
            self._live += 1
            top = self._top
            if top:
                tb = top.bit_length() - 1
                self._largest_units = BIN_SIZES[(tb << 3) | (leaf[tb].bit_length() - 1)]
            else:
                self._largest_units = 0
        alloc = make_allocation(offset << k, reserve << k, size, self._owner, idx | (gen << _GEN_SHIFT))
        if log.isEnabledFor(_DEBUG):
            log.debug("allocation_succeeded size=%d segment=%s address=%#x", size, self.segment_name,
                      self.base + alloc.offset)
        return alloc

    def _check_live(self, allocation: Allocation) -> int:
        self._check_owner(allocation)
        h = allocation.handle
        idx = h & _IDX_MASK if isinstance(h, int) and h >= 0 else -1
        k = self._k
        if (idx < 0 or idx >= self._n or self._state[idx] != _LIVE
                or self._gen[idx] != (h >> _GEN_SHIFT)
                or (self._off[idx] << k) != allocation.offset
                or (self._size[idx] << k) != allocation.size):
            raise AllocatorError(
                f"allocation at offset {allocation.offset} size {allocation.size} is not live in segment "
                f"{self.segment_name!r} (double free or stale handle)")
        return idx

    def free(self, allocation: Allocation) -> None:
        with self._lock:
            idx = self._check_live(allocation)
            sizes = self._size
            state = self._state
            nprev = self._nprev
            nnext = self._nnext
            offset = self._off[idx]
            size = sizes[idx]
            self._used_units -= size
            self._requested -= allocation.requested
            self._live -= 1
            p = nprev[idx]
            if p != UNUSED and state[p] == _FREE:
                offset = self._off[p]
                size += sizes[p]
                pp = nprev[p]
                self._remove(p)
                nprev[idx] = pp
            n = nnext[idx]
            if n != UNUSED and state[n] == _FREE:
                size += sizes[n]
                nn = nnext[n]
                self._remove(n)
                nnext[idx] = nn
            neighbor_next = nnext[idx]
            neighbor_prev = nprev[idx]
            # return the node itself to the spare list, then insert the combined region
            state[idx] = _SLOT
            self._bnext[idx] = self._spare
            self._spare = idx
            self._nodes_used -= 1
            combined = self._insert(size, offset)
            if neighbor_next != UNUSED:
                nnext[combined] = neighbor_next
                nprev[neighbor_next] = combined
            if neighbor_prev != UNUSED:
                nprev[combined] = neighbor_prev
                nnext[neighbor_prev] = combined
            top = self._top
            tb = top.bit_length() - 1  # never empty right after an insert
            self._largest_units = BIN_SIZES[(tb << 3) | (self._leaf[tb].bit_length() - 1)]
        if log.isEnabledFor(_DEBUG):
            log.debug("deallocation_succeeded address=%#x size=%d segment=%s", self.base + allocation.offset,
                      allocation.requested, self.segment_name)

    # --- introspection -------------------------------------------------------------------------

    def free_regions(self) -> list[tuple[int, int]]:
        """Free regions as sorted ``(offset, size)`` byte pairs (walks the bins: O(free regions))."""
        k = self._k
        out = []
        with self._lock:
            for head in self._heads:
                idx = head
                while idx != UNUSED:
                    out.append((self._off[idx] << k, self._size[idx] << k))
                    idx = self._bnext[idx]
        out.sort()
        return out

    def largest_free_block(self) -> int:
        """Actual size of the largest free region (scans the highest non-empty bin only)."""
        with self._lock:
            top = self._top
            if not top:
                return 0
            tb = top.bit_length() - 1
            b = (tb << TOP_BINS_INDEX_SHIFT) | (self._leaf[tb].bit_length() - 1)
            best, idx = 0, self._heads[b]
            while idx != UNUSED:
                best = max(best, self._size[idx])
                idx = self._bnext[idx]
            return best << self._k

    def bookkeeping_bytes(self) -> int:
        """Bytes held by the allocator's own structures (node arrays, bins, bitmaps)."""
        arrays = (self._off, self._size, self._bprev, self._bnext, self._nprev, self._nnext, self._gen)
        total = sum(sys.getsizeof(a) for a in arrays) + sys.getsizeof(self._state)
        total += sys.getsizeof(self._heads) + sys.getsizeof(self._leaf)
        return total + sys.getsizeof(self)

    def bin_histogram(self) -> dict[int, int]:
        """Free regions per bin size (bytes) for non-empty bins (Mooncake's storageReportFull)."""
        hist: dict[int, int] = {}
        with self._lock:
            for b, head in enumerate(self._heads):
                count = 0
                idx = head
                while idx != UNUSED:
                    count += 1
                    idx = self._bnext[idx]
                if count:
                    hist[float_to_uint(b) << self._k] = count
        return hist

    def report(self) -> dict[str, Any]:
        block = self.largest_free_block()
        with self._lock:
            free = self._free_units << self._k
            largest = self.largest_free_region
            n_free_regions = self._nodes_used - self._live
            rep = {
                "kind": self.kind,
                "segment": self.segment_name,
                "capacity": self._capacity,
                "used": self._used_units << self._k,
                "requested": self._requested,
                "free": free,
                "largest_free_region": largest,
                "largest_free_block": block,
                "fragmentation": (1.0 - block / free) if free else 0.0,
                "utilisation": self._requested / self._capacity,
                "rounding_waste": (self._used_units << self._k) - self._requested,
                "live_allocations": self._live,
                "free_regions": n_free_regions,
                "nodes_in_use": self._nodes_used,
                "node_slots": self._n,
                "max_nodes": self._max_nodes,
                "granularity": 1 << self._k,
                "multiplier_bits": self._k,
                "round_up": self._round_up,
            }
        rep["bookkeeping_bytes"] = self.bookkeeping_bytes()
        return rep

    def check_invariants(self) -> None:
        """Walk every structure and raise ``AssertionError`` on any inconsistency (O(nodes)).

        For tests and checkers: the neighbour list tiles ``[0, units)`` exactly, no two free
        regions are adjacent (coalescing), every free region sits in the bin its size rounds down
        to, the bitmaps match the bins, and the counters match the nodes.
        """
        with self._lock:
            state, off, size = self._state, self._off, self._size
            live_nodes = [i for i in range(self._n) if state[i] != _SLOT]
            assert len(live_nodes) == self._nodes_used, "nodes_used counter"
            firsts = [i for i in live_nodes if self._nprev[i] == UNUSED]
            assert len(firsts) == 1, f"neighbour list must have one head, found {len(firsts)}"
            idx, pos, prev_free, seen = firsts[0], 0, False, 0
            used = free = live = 0
            while idx != UNUSED:
                assert off[idx] == pos, f"gap or overlap at unit {pos} (node {idx} at {off[idx]})"
                is_free = state[idx] == _FREE
                assert not (is_free and prev_free), f"adjacent free regions at unit {pos}"
                prev_free = is_free
                if is_free:
                    free += size[idx]
                else:
                    used += size[idx]
                    live += 1
                pos += size[idx]
                nxt = self._nnext[idx]
                if nxt != UNUSED:
                    assert self._nprev[nxt] == idx, "neighbour back link"
                idx = nxt
                seen += 1
            assert seen == self._nodes_used, "neighbour list does not reach every node"
            assert pos == self._units, f"regions cover {pos} units, segment has {self._units}"
            assert free == self._free_units and used == self._used_units and live == self._live
            top = 0
            for b, head in enumerate(self._heads):
                idx, prev = head, UNUSED
                while idx != UNUSED:
                    assert state[idx] == _FREE, "non-free node in a bin"
                    assert uint_to_float_round_down(size[idx]) == b, "region in the wrong bin"
                    assert self._bprev[idx] == prev, "bin back link"
                    prev, idx = idx, self._bnext[idx]
                leaf_bit = bool(self._leaf[b >> 3] & (1 << (b & 7)))
                assert leaf_bit == (head != UNUSED), f"leaf bitmap for bin {b}"
                if head != UNUSED:
                    top |= 1 << (b >> 3)
            assert top == self._top, "top bitmap"

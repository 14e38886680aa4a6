"""Allocators for mounted segments and placement strategies for replicas.

- :class:`OffsetAllocator` (``"offset"``, Mooncake's default): O(1) two-level-bitmap allocator.
- :class:`SlabAllocator` (``"cachelib"``, alias ``"slab"``): the cachelib slab allocator with its
  calcification failure reproduced on purpose.
- Strategies: ``random``, ``free_ratio_first`` (Mooncake's) and ``best_fit`` (Umbra's, alias
  ``largest_fit``).

The master builds one allocator per mounted segment with :func:`make_allocator` and one strategy
with :func:`make_strategy`.
"""

from __future__ import annotations

from store.allocator.base import (
    Allocation,
    Allocator,
    AllocatorError,
    PlacementStrategy,
    PlacementTarget,
)
from store.allocator.offset import OffsetAllocator
from store.allocator.placement import (
    STRATEGIES,
    BestFitStrategy,
    FreeRatioFirstStrategy,
    RandomStrategy,
)
from store.allocator.slab import ALLOC_SIZES, SLAB_SIZE, SlabAllocator

ALLOCATOR_KINDS: dict[str, type[Allocator]] = {
    "offset": OffsetAllocator,
    "cachelib": SlabAllocator,
    "slab": SlabAllocator,
}


def make_allocator(kind: str, capacity: int, *, segment_name: str = "", base: int = 0) -> Allocator:
    """Allocator of ``kind`` (``offset``, ``cachelib``/``slab``) for a segment of ``capacity`` bytes.

    ``segment_name`` and ``base`` appear in the allocation log lines. Raises ``AllocatorError``
    (a ``ValueError``) for an unknown kind or a bad capacity, and for ``cachelib`` when base or
    capacity is not a multiple of 16 MiB (Mooncake's ``INVALID_PARAMS``).
    """
    cls = ALLOCATOR_KINDS.get(kind)
    if cls is None:
        raise AllocatorError(f"unknown allocator kind {kind!r}; expected one of {sorted(ALLOCATOR_KINDS)}")
    return cls(capacity, segment_name=segment_name, base=base)


def make_strategy(name: str, seed: int) -> PlacementStrategy:
    """Placement strategy ``name`` (``random``, ``free_ratio_first``, ``best_fit``/``largest_fit``)."""
    cls = STRATEGIES.get(name)
    if cls is None:
        raise AllocatorError(f"unknown allocation strategy {name!r}; expected one of {sorted(STRATEGIES)}")
    return cls(seed)


__all__ = [
    "ALLOCATOR_KINDS",
    "ALLOC_SIZES",
    "SLAB_SIZE",
    "STRATEGIES",
    "Allocation",
    "Allocator",
    "AllocatorError",
    "BestFitStrategy",
    "FreeRatioFirstStrategy",
    "OffsetAllocator",
    "PlacementStrategy",
    "PlacementTarget",
    "RandomStrategy",
    "SlabAllocator",
    "make_allocator",
    "make_strategy",
]

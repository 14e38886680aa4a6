"""Placement strategies: which segment gets each replica of an object.

Common rules (Mooncake's ``AllocationStrategy::Allocate`` since v0.3.6):

1. Preferred segments first, in the order given (all mounts of a preferred name are tried).
2. Then the strategy's own choice among the remaining segment names.
3. Replicas of one object always land on **distinct segment names**; excluded names are never
   used. **Best effort**: fewer replicas than asked come back when segments run out; an empty
   list means nothing could be placed. Lack of space never raises (a request larger than a
   segment simply skips that segment).

Several targets may share one name (one client mounting several segments); they count as one
name and are tried from a random offset, as Mooncake does.

Strategies (all seeded: the same seed and the same calls give the same placements):

- ``random`` — Mooncake's default: random start index, walk consecutive names, at most
  ``min(100, #names)`` of them.
- ``free_ratio_first`` — Mooncake's best-of-N: sample ``min(6 x remaining, #names)`` consecutive
  names from a random start, order by free/capacity (highest first), try in order, fall back to
  the random walk.
- ``best_fit`` (alias ``largest_fit``) — Umbra's own. Mooncake's strategies look at free
  *bytes*, which is not the same as contiguous free space (see Mooncake PRs #2797, #4000): a
  segment that is 40 % free in small holes fails a large request. ``best_fit`` asks each
  candidate allocator which free block the request would be cut from (``fit_size``: for the
  offset allocator the bin of the block it would split, for the slab allocator whether the size
  class already has a free chunk or must commit a new slab) and takes the tightest fit, ties
  broken by the fuller segment, then randomly. Small objects fill the holes of already
  fragmented segments; large free regions stay whole for large objects, so fewer requests fail
  at the same utilisation.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Sequence

from store.allocator.base import Allocation, Allocator, AllocatorError, PlacementStrategy, PlacementTarget

Placed = list[tuple[PlacementTarget, Allocation]]

MAX_RANDOM_WALK = 100  # Mooncake's max_retry = min(100, #names)
FREE_RATIO_SAMPLE_FACTOR = 6  # best-of-(6 x replicas)
BEST_FIT_MAX_CANDIDATES = 64  # names scored per placement by best_fit (bounded cost)


def _group(targets: Sequence[PlacementTarget]) -> tuple[list[str], dict[str, list[PlacementTarget]]]:
    names: list[str] = []
    groups: dict[str, list[PlacementTarget]] = {}
    for t in targets:
        g = groups.get(t.name)
        if g is None:
            groups[t.name] = [t]
            names.append(t.name)
        else:
            g.append(t)
    return names, groups


def _fit_size(alloc: Allocator, size: int) -> int | None:
    fit = getattr(alloc, "fit_size", None)
    if fit is not None:
        return fit(size)
    largest = alloc.largest_free_region
    return largest if largest >= size else None


class _Strategy(PlacementStrategy):
    """Shared frame: argument checks, grouping by name, preferred names, distinctness."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self._rng = random.Random(seed)
        self._lock = threading.Lock()

    def place(
        self,
        targets: Sequence[PlacementTarget],
        size: int,
        replica_num: int,
        preferred: Sequence[str] = (),
        excluded: Sequence[str] = (),
    ) -> Placed:
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise AllocatorError(f"object size must be a positive int, got {size!r}")
        if isinstance(replica_num, bool) or not isinstance(replica_num, int) or replica_num <= 0:
            raise AllocatorError(f"replica_num must be a positive int, got {replica_num!r}")
        if isinstance(preferred, str) or isinstance(excluded, str):
            raise AllocatorError("preferred/excluded must be sequences of segment names, not a string")
        names, groups = _group(targets)
        out: Placed = []
        if not names:
            return out
        used: set[str] = set(excluded)  # names that may not take another replica
        with self._lock:
            for name in preferred:
                if len(out) >= replica_num:
                    break
                if name in used or name not in groups:
                    continue
                got = self._try_name(groups[name], size, random_start=False)
                if got is not None:
                    out.append(got)
                    used.add(name)
            if len(out) < replica_num:
                self._place_rest(names, groups, size, replica_num, used, out)
        return out

    # --- helpers -------------------------------------------------------------------------------

    def _try_name(self, group: list[PlacementTarget], size: int, *, random_start: bool = True,
                  order: Callable[[list[PlacementTarget]], list[PlacementTarget]] | None = None
                  ) -> tuple[PlacementTarget, Allocation] | None:
        """Try the mounts of one name (from a random offset, as Mooncake); first success wins."""
        if order is not None:
            seq = order(group)
        elif random_start and len(group) > 1:
            k = self._rng.randrange(len(group))
            seq = group[k:] + group[:k]
        else:
            seq = group
        for t in seq:
            alloc = t.allocator
            if size > alloc.capacity:
                continue
            a = alloc.allocate(size)
            if a is not None:
                return t, a
        return None

    def _random_walk(self, names: list[str], groups: dict[str, list[PlacementTarget]], size: int,
                     replica_num: int, used: set[str], out: Placed) -> None:
        n = len(names)
        start = self._rng.randrange(n)
        for i in range(min(MAX_RANDOM_WALK, n)):
            if len(out) >= replica_num:
                return
            name = names[(start + i) % n]
            if name in used:
                continue
            got = self._try_name(groups[name], size)
            if got is not None:
                out.append(got)
                used.add(name)

    def _place_rest(self, names: list[str], groups: dict[str, list[PlacementTarget]], size: int,
                    replica_num: int, used: set[str], out: Placed) -> None:
        raise NotImplementedError


class RandomStrategy(_Strategy):
    """Mooncake's ``random``: random start, walk up to ``min(100, n)`` consecutive names."""

    name = "random"

    def _place_rest(self, names, groups, size, replica_num, used, out) -> None:
        self._random_walk(names, groups, size, replica_num, used, out)


class FreeRatioFirstStrategy(_Strategy):
    """Mooncake's ``free_ratio_first``: best of ``6 x remaining`` sampled names by free ratio."""

    name = "free_ratio_first"

    def _place_rest(self, names, groups, size, replica_num, used, out) -> None:
        n = len(names)
        remaining = replica_num - len(out)
        count = min(FREE_RATIO_SAMPLE_FACTOR * remaining, n)
        start = self._rng.randrange(n)
        scored = []
        for i in range(count):
            name = names[(start + i) % n]
            if name in used:
                continue
            cap = sum(t.allocator.capacity for t in groups[name])
            free = sum(t.allocator.capacity - t.allocator.used for t in groups[name])
            scored.append((free / cap if cap else 0.0, i, name))
        scored.sort(key=lambda s: (-s[0], s[1]))
        for _, _, name in scored:
            if len(out) >= replica_num:
                return
            got = self._try_name(groups[name], size)
            if got is not None:
                out.append(got)
                used.add(name)
        if len(out) < replica_num:
            self._random_walk(names, groups, size, replica_num, used, out)


class BestFitStrategy(_Strategy):
    """Umbra's ``best_fit``: the segment whose fitting free block is tightest (see module doc)."""

    name = "best_fit"

    def _place_rest(self, names, groups, size, replica_num, used, out) -> None:
        n = len(names)
        count = min(n, max(BEST_FIT_MAX_CANDIDATES, FREE_RATIO_SAMPLE_FACTOR * (replica_num - len(out))))
        start = self._rng.randrange(n)
        scored = []
        for i in range(count):
            name = names[(start + i) % n]
            if name in used:
                continue
            best = None
            for t in groups[name]:
                alloc = t.allocator
                fit = _fit_size(alloc, size)
                if fit is None:
                    continue
                key = (fit, alloc.capacity - alloc.used)
                if best is None or key < best[0]:
                    best = (key, t)
            if best is not None:
                scored.append((best[0], i, name, best[1]))
        scored.sort(key=lambda s: (s[0], s[1]))
        for _, _, name, target in scored:
            if len(out) >= replica_num:
                return
            # best mount of this name first, then the others
            got = self._try_name(groups[name], size,
                                 order=lambda g, t=target: [t] + [x for x in g if x is not t])
            if got is not None:
                out.append(got)
                used.add(name)
        if len(out) < replica_num and count < n:
            self._random_walk(names, groups, size, replica_num, used, out)


STRATEGIES: dict[str, type[_Strategy]] = {
    "random": RandomStrategy,
    "free_ratio_first": FreeRatioFirstStrategy,
    "best_fit": BestFitStrategy,
    "largest_fit": BestFitStrategy,  # alias
}

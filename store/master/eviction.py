"""Which objects an eviction round removes: Mooncake's count-based ``BatchEvict`` and Umbra's
byte-based variant. Pure functions: they read metadata and return victims; the service erases.

Trigger (every 10 ms): ``used_ratio > high_watermark`` or (an allocation failed and
``eviction_ratio > 0``). Then

    target     = max(eviction_ratio, used_ratio - high_watermark + eviction_ratio)
    lowerbound = max(target * 0.5, used_ratio - high_watermark)

Mooncake applies both ratios to the number of objects. Candidates are objects whose lease has
expired and whose replicas are all COMPLETE, ordered by lease deadline (≈ last read + TTL, or the
PutEnd time for objects never read: near-LRU).

Default (Mooncake HEAD, what the measured 0.3.13 master does: a burst of puts loses its oldest keys
first): pass 1 evicts the ``ceil(count × target)`` unpinned candidates with the smallest lease
deadlines over the whole store; pass 2 runs only if fewer than ``ceil(count × lowerbound)`` went
and takes the oldest soft-pinned ones (if allowed) up to that bound.

``--classic_eviction`` (v0.3.5): pass 1 starts at a random shard and walks all 1024; in each,
``ideal = ceil(count_so_far × target) - evicted_so_far``, and the ``ideal`` unpinned candidates
with the smallest lease deadlines *of that shard* go (all ties with the ideal-th go too, as
``nth_element`` + ``<=`` does) — with few objects per shard that is close to random. Pass 2: the
globally oldest unpinned leftovers, or when there are not enough of them every unpinned leftover
plus the oldest soft-pinned ones (if allowed), up to ``ceil(count × lowerbound)``.

``--eviction_by bytes`` uses the same two ratios over capacity bytes: evict unpinned candidates,
oldest first, until ``target × capacity`` bytes are freed, then soft-pinned ones (if allowed) until
``lowerbound × capacity`` bytes are. Bytes are what the allocators reserved (after rounding), so
the figure matches what the next allocation can use.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from store.master.objects import ObjectMeta


@dataclass
class EvictionPlan:
    used_ratio: float
    target: float
    lowerbound: float
    victims: list[ObjectMeta] = field(default_factory=list)
    first_pass: int = 0


def should_evict(used_ratio: float, high_watermark: float, eviction_ratio: float,
                 need_eviction: bool) -> bool:
    return used_ratio > high_watermark or (need_eviction and eviction_ratio > 0.0)


def eviction_targets(used_ratio: float, high_watermark: float, eviction_ratio: float) -> tuple[float, float]:
    target = max(eviction_ratio, used_ratio - high_watermark + eviction_ratio)
    lowerbound = max(target * 0.5, used_ratio - high_watermark)
    return target, lowerbound


def _candidate(obj: ObjectMeta, now: float) -> bool:
    return not obj.is_leased(now) and obj.is_complete()


def _kth_smallest(values: list[float], k: int) -> float:
    """The k-th smallest (1-based) — what ``nth_element(begin, begin + k - 1, end)`` leaves there."""
    return sorted(values)[k - 1]


def _deadline(obj: ObjectMeta) -> float:
    return obj.lease_deadline


def select_by_count(objects: Sequence[ObjectMeta], total: int, now: float, target: float,
                    lowerbound: float, allow_soft_pinned: bool) -> tuple[list[ObjectMeta], int]:
    """Mooncake HEAD's global near-LRU round; ``total`` counts every object (incl. in progress)."""
    unpinned, pinned = [], []
    for obj in objects:
        if _candidate(obj, now):
            (pinned if obj.is_soft_pinned(now) else unpinned).append(obj)
    victims = heapq.nsmallest(max(0, math.ceil(total * target)), unpinned, key=_deadline)
    first_pass = len(victims)
    want = math.ceil(total * lowerbound) - len(victims)
    if want > 0 and allow_soft_pinned:
        victims += heapq.nsmallest(want, pinned, key=_deadline)
    return victims, first_pass


def select_by_count_sharded(shards: Sequence[dict[str, ObjectMeta]], now: float, target: float,
                    lowerbound: float, start: int, allow_soft_pinned: bool) -> tuple[list[ObjectMeta], int]:
    """v0.3.5 ``BatchEvict``; returns ``(victims, how many of them pass 1 took)``."""
    n = len(shards)
    victims: list[ObjectMeta] = []
    object_count = 0
    no_pin: list[ObjectMeta] = []
    soft_pin: list[ObjectMeta] = []
    for i in range(n):
        shard = shards[(start + i) % n]
        object_count += len(shard)
        ideal = math.ceil(object_count * target) - len(victims)
        candidates: list[ObjectMeta] = []
        for obj in shard.values():
            if not _candidate(obj, now):
                continue
            if not obj.is_soft_pinned(now):
                (candidates if ideal > 0 else no_pin).append(obj)
            elif allow_soft_pinned:
                soft_pin.append(obj)
        if ideal > 0 and candidates:
            k = min(ideal, len(candidates))
            cut = _kth_smallest([o.lease_deadline for o in candidates], k)
            for obj in candidates:
                (victims if obj.lease_deadline <= cut else no_pin).append(obj)
    first_pass = len(victims)

    want = math.ceil(object_count * lowerbound) - len(victims)
    want = min(want, len(no_pin) + len(soft_pin))
    if want <= 0:
        return victims, first_pass
    if want <= len(no_pin) or not allow_soft_pinned:
        want = min(want, len(no_pin))
        if want <= 0:
            return victims, first_pass
        cut = _kth_smallest([o.lease_deadline for o in no_pin], want)
        # Mooncake walks shards from 0 and stops after ``want`` erasures.
        chosen = {id(o) for o in no_pin if o.lease_deadline <= cut}
        for shard in shards:
            for obj in shard.values():
                if want <= 0:
                    break
                if id(obj) in chosen:
                    victims.append(obj)
                    want -= 1
    else:
        pinned_want = want - len(no_pin)
        cut = _kth_smallest([o.lease_deadline for o in soft_pin], pinned_want)
        chosen = {id(o) for o in no_pin}
        chosen.update(id(o) for o in soft_pin if o.lease_deadline <= cut)
        for shard in shards:
            for obj in shard.values():
                if want <= 0:
                    break
                if id(obj) in chosen:
                    victims.append(obj)
                    want -= 1
    return victims, first_pass


def select_by_bytes(objects: Sequence[ObjectMeta], now: float, target_bytes: float,
                    lower_bytes: float, allow_soft_pinned: bool) -> tuple[list[ObjectMeta], int]:
    """Umbra's byte-based round; returns ``(victims, how many of them pass 1 took)``."""
    unpinned = sorted((o for o in objects if _candidate(o, now) and not o.is_soft_pinned(now)),
                      key=lambda o: o.lease_deadline)
    victims: list[ObjectMeta] = []
    freed = 0
    for obj in unpinned:
        if freed >= target_bytes:
            break
        victims.append(obj)
        freed += obj.reserved_bytes()
    first_pass = len(victims)
    if freed < lower_bytes and allow_soft_pinned:
        pinned = sorted((o for o in objects if _candidate(o, now) and o.is_soft_pinned(now)),
                        key=lambda o: o.lease_deadline)
        for obj in pinned:
            if freed >= lower_bytes:
                break
            victims.append(obj)
            freed += obj.reserved_bytes()
    return victims, first_pass

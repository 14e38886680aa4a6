"""Garbage collection of read objects: Mooncake's legacy 1-s GC and Umbra's on-demand answer.

Legacy (``--enable_gc``, Mooncake v0.3.0–v0.3.5): every successful GetReplicaList calls
``MarkForGC(key, 1000 ms)`` — "After 1 second, the object will be removed". Tasks go through a
bounded queue (10 Ki; full → ``gc_queue_full`` and the key is never collected) into a min-heap by
deletion time; a 10-ms loop pops due tasks and calls ``Remove(key)`` without force, ignoring
failures. Read-once objects therefore vanish about a second after their first read, even while a
slow reader is still copying them.

On demand (Umbra): a read remembers the key (most recent read last). Only when memory use is above
the high watermark (or an allocation failed) does the GC loop remove remembered objects, oldest
read first, and never one whose lease is live; it stops once use is back under
``high_watermark - eviction_ratio``. Objects nobody read are left to eviction.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict, deque


class LegacyGC:
    """Queue + min-heap of ``(deletion_time, seq, key)``, as Mooncake's ``GCThreadFunc`` kept it."""

    def __init__(self, delay: float, queue_size: int) -> None:
        self.delay = delay
        self.queue_size = queue_size
        self._queue: deque[tuple[float, str]] = deque()
        self._heap: list[tuple[float, int, str]] = []
        self._seq = 0

    def mark(self, key: str, now: float) -> bool:
        """Schedule a Remove; False when the queue is full (the key is then never collected)."""
        if len(self._queue) >= self.queue_size:
            return False
        self._queue.append((now + self.delay, key))
        return True

    def due(self, now: float) -> list[str]:
        """Move queued tasks into the heap, then pop every task whose time has come."""
        while self._queue:
            t, key = self._queue.popleft()
            self._seq += 1
            heapq.heappush(self._heap, (t, self._seq, key))
        out = []
        while self._heap and self._heap[0][0] <= now:
            out.append(heapq.heappop(self._heap)[2])
        return out

    def pending(self) -> int:
        return len(self._queue) + len(self._heap)

    def next_due(self) -> float | None:
        times = [t for t, _ in self._queue] + ([self._heap[0][0]] if self._heap else [])
        return min(times) if times else None


class OnDemandReclaimer:
    """Keys read at least once, oldest read first; bounded like the legacy queue."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._keys: OrderedDict[str, None] = OrderedDict()

    def note_read(self, key: str) -> bool:
        if key in self._keys:
            self._keys.move_to_end(key)
            return True
        if len(self._keys) >= self.capacity:
            return False
        self._keys[key] = None
        return True

    def forget(self, key: str) -> None:
        self._keys.pop(key, None)

    def candidates(self) -> list[str]:
        return list(self._keys)

    def pending(self) -> int:
        return len(self._keys)

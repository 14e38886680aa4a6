"""The master's event log: what happened to which key and which range, in order.

Checkers join it with a client history: an eviction inside a lease, a read overlapping the reuse of
its range, two live allocations sharing bytes. Each event is a dict with ``seq`` (strictly
increasing), ``t`` (master clock), ``kind`` and kind-specific ids. Kinds:

``put_start`` ``put_end`` ``put_revoke`` ``lease`` ``remove`` ``evict`` ``gc_remove``
``gc_queue_full`` ``alloc`` ``free`` ``discard`` ``mount`` ``unmount`` ``replica_lost``
``object_lost`` ``client_register`` ``client_expire`` ``zombie_reclaim``.

The log is a ring (oldest events fall off); ``since(seq)`` says when a reader fell behind.
"""

from __future__ import annotations

import itertools
from collections import deque
from typing import Any


class EventLog:
    def __init__(self, capacity: int = 100_000) -> None:
        self._events: deque[dict[str, Any]] = deque(maxlen=capacity)
        self.seq = 0

    def emit(self, t: float, kind: str, **ids: Any) -> None:
        self.seq += 1
        ids["seq"] = self.seq
        ids["t"] = t
        ids["kind"] = kind
        self._events.append(ids)

    def since(self, seq: int, limit: int | None = None) -> tuple[list[dict[str, Any]], bool]:
        """Events with ``seq > seq`` (oldest first, at most ``limit``) and whether some were lost."""
        first = self._events[0]["seq"] if self._events else self.seq + 1
        lost = seq + 1 < first
        skip = max(0, seq + 1 - first)
        stop = None if limit is None else skip + limit
        return [dict(ev) for ev in itertools.islice(self._events, skip, stop)], lost

    def __len__(self) -> int:
        return len(self._events)

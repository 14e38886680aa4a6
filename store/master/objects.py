"""Object metadata and its 1024 shards.

Mooncake shards metadata by ``hash(key) % 1024`` with one mutex per shard. Umbra keeps the shard
layout because eviction's arithmetic walks shards (the per-shard ``ceil(count × target)`` rounding
changes how many objects go), but uses a stable hash (xxh3) so a run replays across processes;
Python's ``hash`` of a str is salted per process.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import xxhash

from store.allocator.base import Allocation
from store.master.types import ReplicaDescriptor, ReplicaStatus

if TYPE_CHECKING:
    from store.master.segments import MountedSegment

NUM_SHARDS = 1024
NEVER = float("-inf")  # lease deadline of an object nobody has read or completed yet


def shard_of(key: str) -> int:
    return xxhash.xxh3_64_intdigest(key.encode()) % NUM_SHARDS


@dataclass(slots=True, eq=False)
class Replica:
    """One copy of an object: a range inside one mounted segment."""

    segment: MountedSegment
    allocation: Allocation
    length: int
    key: str
    status: ReplicaStatus = ReplicaStatus.PROCESSING
    discarded: bool = False  # preempted zombie put: still allocated until its release time

    @property
    def address(self) -> int:
        return self.segment.base + self.allocation.offset

    def descriptor(self) -> ReplicaDescriptor:
        s = self.segment
        return ReplicaDescriptor(s.id, s.name, s.base + self.allocation.offset, self.length,
                                 s.te_endpoint, s.protocol, dict(s.transport), self.status)


@dataclass(slots=True, eq=False)
class ObjectMeta:
    """Mooncake's ``ObjectMetadata`` plus the writer's client id (for zombie-put reclamation)."""

    key: str
    size: int
    replicas: list[Replica]
    client_id: str
    put_start_time: float
    with_soft_pin: bool = False
    lease_deadline: float = NEVER
    soft_pin_deadline: float | None = None
    read_count: int = 0
    checksum: int | None = None  # XXH64 of the value, recorded by PutEnd (Umbra; None = not given)

    def is_complete(self) -> bool:
        return all(r.status is ReplicaStatus.COMPLETE for r in self.replicas)

    def is_processing(self) -> bool:
        return all(r.status is ReplicaStatus.PROCESSING for r in self.replicas)

    def is_leased(self, now: float) -> bool:
        """Mooncake: ``IsLeaseExpired(now) = now >= lease_timeout``; leased is the opposite."""
        return now < self.lease_deadline

    def is_soft_pinned(self, now: float) -> bool:
        return self.soft_pin_deadline is not None and now < self.soft_pin_deadline

    def grant_lease(self, now: float, ttl: float, soft_pin_ttl: float) -> None:
        """``max(old, now + ttl)``: a lease never shrinks. v0.3.5 also extends a soft pin."""
        deadline = now + ttl
        if deadline > self.lease_deadline:
            self.lease_deadline = deadline
        if self.with_soft_pin:
            pin = now + soft_pin_ttl
            if self.soft_pin_deadline is None or pin > self.soft_pin_deadline:
                self.soft_pin_deadline = pin

    def state(self) -> str:
        return "COMPLETE" if self.is_complete() else "PROCESSING"

    def reserved_bytes(self) -> int:
        return sum(r.allocation.size for r in self.replicas)


class ShardMap:
    """1024 dicts of key → :class:`ObjectMeta` (the layout eviction's classic arithmetic walks),
    plus one flat dict so lookups and whole-store scans do not visit 1024 shards."""

    def __init__(self) -> None:
        self.shards: list[dict[str, ObjectMeta]] = [{} for _ in range(NUM_SHARDS)]
        self._all: dict[str, ObjectMeta] = {}

    def get(self, key: str) -> ObjectMeta | None:
        return self._all.get(key)

    def put(self, obj: ObjectMeta) -> None:
        self.shards[shard_of(obj.key)][obj.key] = obj
        self._all[obj.key] = obj

    def pop(self, key: str) -> ObjectMeta | None:
        obj = self._all.pop(key, None)
        if obj is not None:
            del self.shards[shard_of(key)][key]
        return obj

    @property
    def count(self) -> int:
        return len(self._all)

    def __len__(self) -> int:
        return len(self._all)

    def __iter__(self) -> Iterator[ObjectMeta]:
        return iter(list(self._all.values()))

    def keys(self) -> list[str]:
        return list(self._all)

    def consistent(self) -> bool:
        """Every object is in exactly its own shard (checked by the invariant checker)."""
        if sum(len(s) for s in self.shards) != len(self._all):
            return False
        return all(self._all.get(k) is o and shard_of(k) == i
                   for i, s in enumerate(self.shards) for k, o in s.items())

"""Mounted segments: one allocator each, plus the index of the replicas that live there.

Mooncake finds the objects hit by an unmount by scanning all 1024 shards
(``ClearInvalidHandles``); Umbra keeps a per-segment set of replicas so unmount and client expiry cost
what they touch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from store.allocator.base import Allocator
from store.master.types import Segment

if TYPE_CHECKING:
    from store.master.objects import Replica


@dataclass(eq=False)
class MountedSegment:
    """A segment as the master holds it; satisfies the allocator's ``PlacementTarget``."""

    id: str
    name: str
    base: int
    size: int
    protocol: str
    te_endpoint: str
    transport: dict[str, Any]
    client_id: str
    allocator: Allocator
    mounted_at: float
    replicas: set[Replica] = field(default_factory=set)  # live replicas here (incl. discarded ones)
    mounted: bool = True
    requested_bytes: int = 0  # sum of value lengths of live replicas here (Mooncake's metric)

    @classmethod
    def from_spec(cls, spec: Segment, client_id: str, allocator: Allocator, now: float) -> MountedSegment:
        return cls(spec.id, spec.name, spec.base, spec.size, spec.protocol, spec.te_endpoint,
                   dict(spec.transport), client_id, allocator, now)

    def spec(self) -> Segment:
        return Segment(self.id, self.name, self.base, self.size, self.protocol, self.te_endpoint,
                       dict(self.transport))

    def same_as(self, spec: Segment) -> bool:
        return (self.name, self.base, self.size, self.protocol, self.te_endpoint) == (
            spec.name, spec.base, spec.size, spec.protocol, spec.te_endpoint)

    def overlaps(self, spec: Segment) -> bool:
        return (self.name == spec.name and self.base < spec.base + spec.size
                and spec.base < self.base + self.size)

    def report(self) -> dict[str, Any]:
        return {**self.spec().to_wire(), "client_id": self.client_id, "mounted_at": self.mounted_at,
                "allocated_bytes": self.requested_bytes, "replica_count": len(self.replicas),
                "allocator": self.allocator.report()}


class SegmentTable:
    """Segments by id, in mount order (placement sees them in that order)."""

    def __init__(self) -> None:
        self.by_id: dict[str, MountedSegment] = {}

    def get(self, segment_id: str) -> MountedSegment | None:
        return self.by_id.get(segment_id)

    def add(self, seg: MountedSegment) -> None:
        self.by_id[seg.id] = seg

    def remove(self, segment_id: str) -> MountedSegment | None:
        return self.by_id.pop(segment_id, None)

    def targets(self) -> list[MountedSegment]:
        return list(self.by_id.values())

    def of_client(self, client_id: str) -> list[MountedSegment]:
        return [s for s in self.by_id.values() if s.client_id == client_id]

    def overlapping(self, spec: Segment) -> MountedSegment | None:
        for s in self.by_id.values():
            if s.id != spec.id and s.overlaps(spec):
                return s
        return None

    @property
    def capacity(self) -> int:
        return sum(s.size for s in self.by_id.values())

    @property
    def reserved(self) -> int:
        return sum(s.allocator.used for s in self.by_id.values())

    def __len__(self) -> int:
        return len(self.by_id)

"""The allocator contract shared by the master and every allocator.

An allocator hands out offsets inside one segment. The memory itself lives in a client process;
the allocator never touches it, so its state is plain bookkeeping that a checker can read.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol


class AllocatorError(ValueError):
    """Bad use of an allocator (size <= 0, double free, foreign allocation). State is unchanged."""


@dataclass(frozen=True, slots=True)
class Allocation:
    """A live range ``[offset, offset + size)`` inside one segment.

    ``size`` is what the allocator reserved (after its rounding); ``requested`` what was asked.
    ``owner`` identifies the allocator instance so a foreign free is detected; ``handle`` is the
    allocator's own slot for O(1) free.
    """

    offset: int
    size: int
    requested: int
    owner: int
    handle: int

    @property
    def end(self) -> int:
        return self.offset + self.size


class Allocator(ABC):
    """Interface: ``allocate``/``free`` plus read-only figures for metrics and checkers."""

    kind: str = "abstract"
    # set by implementations: the logger for Mooncake-style lines, the segment name they print,
    # this instance's owner tag (stamped into every Allocation) and the bytes requested so far
    _log: logging.Logger
    segment_name: str
    _owner: int
    _requested: int

    @property
    @abstractmethod
    def capacity(self) -> int: ...

    @property
    @abstractmethod
    def used(self) -> int:
        """Bytes reserved by live allocations (rounded sizes)."""

    @property
    @abstractmethod
    def largest_free_region(self) -> int:
        """Largest size that ``allocate`` can currently satisfy (0 when full)."""

    @property
    @abstractmethod
    def live_count(self) -> int: ...

    @abstractmethod
    def allocate(self, size: int) -> Allocation | None:
        """Reserve ``size`` bytes; ``None`` when there is no room; ``AllocatorError`` on bad size."""

    @abstractmethod
    def free(self, allocation: Allocation) -> None:
        """Release a live allocation; ``AllocatorError`` on double or foreign free."""

    @abstractmethod
    def report(self) -> dict[str, Any]:
        """Figures for people and checkers: capacity, used, free, largest free region,
        fragmentation (1 − largest_free / free), live allocations, allocator-specific detail."""

    def _fail(self, size: int) -> None:
        """Log Mooncake's ``allocation_failed`` line (only when debug logging is on); returns None."""
        if self._log.isEnabledFor(logging.DEBUG):
            self._log.debug("allocation_failed size=%d segment=%s current_size=%d", size,
                            self.segment_name, self._requested)
        return None

    def _check_owner(self, allocation: Allocation) -> None:
        """Reject anything that is not an Allocation made by this very instance."""
        if not isinstance(allocation, Allocation):
            raise AllocatorError(f"free() expects an Allocation, got {type(allocation).__name__}")
        if allocation.owner != self._owner:
            raise AllocatorError(
                f"allocation at offset {allocation.offset} (owner {allocation.owner}) does not belong to "
                f"this allocator (owner {self._owner}, segment {self.segment_name!r})")

    @property
    def free_bytes(self) -> int:
        return self.capacity - self.used

    @property
    def free_ratio(self) -> float:
        return self.free_bytes / self.capacity if self.capacity else 0.0


class PlacementTarget(Protocol):
    """What a placement strategy needs to know about a mounted segment."""

    @property
    def name(self) -> str: ...

    @property
    def allocator(self) -> Allocator: ...


class PlacementStrategy(ABC):
    """Chooses segments for the replicas of one object: distinct segment names, best effort."""

    name: str = "abstract"

    @abstractmethod
    def place(
        self,
        targets: Sequence[PlacementTarget],
        size: int,
        replica_num: int,
        preferred: Sequence[str] = (),
        excluded: Sequence[str] = (),
    ) -> list[tuple[PlacementTarget, Allocation]]:
        """Allocate up to ``replica_num`` replicas of ``size`` bytes on distinct segment names.

        Returns what it could allocate (possibly fewer than asked, possibly none); the caller
        frees them if it decides to fail. Never raises for lack of space.
        """

"""Fast construction of :class:`~store.allocator.base.Allocation` for the allocators' hot path.

``Allocation`` is a frozen slotted dataclass; its generated ``__init__`` goes through
``object.__setattr__`` per field (about 1 us here). Setting the slots through their descriptors
is twice as fast and gives an identical object. If the dataclass ever changes shape, this falls
back to the normal constructor.
"""

from __future__ import annotations

from dataclasses import fields

from store.allocator.base import Allocation

_FIELDS = ("offset", "size", "requested", "owner", "handle")


def _slow(offset: int, size: int, requested: int, owner: int, handle: int) -> Allocation:
    return Allocation(offset, size, requested, owner, handle)


if tuple(f.name for f in fields(Allocation)) == _FIELDS and getattr(Allocation, "__slots__", None):
    _new = object.__new__
    _s_off = Allocation.offset.__set__  # type: ignore[attr-defined]
    _s_size = Allocation.size.__set__  # type: ignore[attr-defined]
    _s_req = Allocation.requested.__set__  # type: ignore[attr-defined]
    _s_owner = Allocation.owner.__set__  # type: ignore[attr-defined]
    _s_handle = Allocation.handle.__set__  # type: ignore[attr-defined]

    def make_allocation(offset: int, size: int, requested: int, owner: int, handle: int) -> Allocation:
        a = _new(Allocation)
        _s_off(a, offset)
        _s_size(a, size)
        _s_req(a, requested)
        _s_owner(a, owner)
        _s_handle(a, handle)
        return a
else:  # pragma: no cover - only if base.Allocation changes
    make_allocation = _slow

"""Gather/scatter between scattered blocks and a contiguous buffer, on arrays or raw addresses.

Array forms (:func:`gather`, :func:`scatter`, :func:`copy_pieces`) check every piece against the
buffers' sizes. Raw-address forms (:func:`gather_addrs`, :func:`scatter_addrs`,
:func:`copy_addrs`) exist so the transfer engine can pack from registered memory it only knows
by address; they check every piece against an :class:`AddressSpace` — the ranges the engine has
registered — so a call with in-range arguments can only touch memory somebody registered, and
writes only memory registered writable.

Pieces are copied in order, each as by ``memmove``: overlapping source and destination pieces
are allowed and behave as that sequence of moves.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from store.packing import kernels
from store.packing._validate import (
    as_byte_array,
    as_count,
    as_i64_array,
    check_regions,
    invalid,
    raise_bad_piece,
    same_length,
)
from store.packing.kernels import address_of

_ADDR_LIMIT = 2**63


_NO_LIMIT = int(kernels.NO_LIMIT)


def _done(result: tuple[int, int], offsets: np.ndarray, lengths: np.ndarray, *, what: str,
          size: int | None, limit: int, offsets_name: str = "offsets") -> int:
    where, value = result
    if where >= 0:
        raise_bad_piece(where, value, offsets, lengths, what=what, offsets_name=offsets_name, size=size,
                        limit=limit)
    return int(value)


def gather(src: Any, offsets: Any, lengths: Any, dst: Any, *, dst_offset: int = 0) -> int:
    """Pack ``src[offsets[i]:offsets[i]+lengths[i]]`` back to back into ``dst`` from ``dst_offset``.

    Returns the number of bytes copied. ``src``/``dst`` are C-contiguous buffers (numpy arrays of
    any dtype are seen as their bytes); ``dst`` must be writable. On a bad piece nothing is
    copied.
    """
    s = as_byte_array(src, "src", writable=False)
    d = as_byte_array(dst, "dst", writable=True)
    offs = as_i64_array(offsets, "offsets")
    lens = as_i64_array(lengths, "lengths")
    same_length(offsets=offs, lengths=lens)
    dst_offset = as_count(dst_offset, "dst_offset")
    if dst_offset > d.size:
        raise invalid(f"dst_offset {dst_offset} is past the end of dst ({d.size} bytes)")
    room = d.size - dst_offset
    result = kernels.gather_kernel(address_of(s), s.size, offs, lens, address_of(d) + dst_offset, room)
    return _done(result, offs, lens, what="src", size=s.size, limit=room)


def scatter(src: Any, dst: Any, offsets: Any, lengths: Any, *, src_offset: int = 0) -> int:
    """Unpack consecutive bytes of ``src`` (from ``src_offset``) into ``dst[offsets[i]:+lengths[i]]``.

    The inverse of :func:`gather`. Returns the number of bytes copied.
    """
    s = as_byte_array(src, "src", writable=False)
    d = as_byte_array(dst, "dst", writable=True)
    offs = as_i64_array(offsets, "offsets")
    lens = as_i64_array(lengths, "lengths")
    same_length(offsets=offs, lengths=lens)
    src_offset = as_count(src_offset, "src_offset")
    if src_offset > s.size:
        raise invalid(f"src_offset {src_offset} is past the end of src ({s.size} bytes)")
    room = s.size - src_offset
    result = kernels.scatter_kernel(address_of(s) + src_offset, room, address_of(d), d.size, offs, lens)
    return _done(result, offs, lens, what="dst", size=d.size, limit=room)


def copy_pieces(src: Any, src_offsets: Any, dst: Any, dst_offsets: Any, lengths: Any) -> int:
    """Copy piece ``i`` from ``src[src_offsets[i]:]`` to ``dst[dst_offsets[i]:]`` (``lengths[i]`` bytes)."""
    s = as_byte_array(src, "src", writable=False)
    d = as_byte_array(dst, "dst", writable=True)
    so = as_i64_array(src_offsets, "src_offsets")
    do = as_i64_array(dst_offsets, "dst_offsets")
    lens = as_i64_array(lengths, "lengths")
    same_length(src_offsets=so, dst_offsets=do, lengths=lens)
    where, value = kernels.copy_kernel(address_of(s), s.size, so, address_of(d), d.size, do, lens)
    if where >= 0 and value >= kernels.DST_SIDE:
        raise_bad_piece(where, value - kernels.DST_SIDE, do, lens, what="dst", offsets_name="dst_offsets",
                        size=d.size, limit=_NO_LIMIT)
    return _done((where, value), so, lens, what="src", size=s.size, limit=_NO_LIMIT,
                 offsets_name="src_offsets")


# --------------------------------------------------------------------------- address space


@dataclass(frozen=True)
class Region:
    """One registered range ``[addr, addr + length)``."""

    addr: int
    length: int
    writable: bool
    name: str = ""
    # What keeps the memory alive (and, for buffers, exported: an mmap cannot be closed and a
    # bytearray cannot be resized while registered).
    keepalive: Any = field(default=None, repr=False, compare=False)

    @property
    def end(self) -> int:
        return self.addr + self.length


@dataclass(frozen=True)
class _Snapshot:
    regions: tuple[Region, ...]
    starts: np.ndarray
    ends: np.ndarray
    writable: np.ndarray


def _snapshot(regions: list[Region]) -> _Snapshot:
    regions = sorted(regions, key=lambda r: r.addr)
    return _Snapshot(
        tuple(regions),
        np.array([r.addr for r in regions], np.int64),
        np.array([r.end for r in regions], np.int64),
        np.array([r.writable for r in regions], bool),
    )


class AddressSpace:
    """The memory ranges raw-address kernels may touch (mirrors the engine's registrations).

    Ranges never overlap (Mooncake's TE refuses overlapping registrations too). A check takes a
    snapshot, and the call holds that snapshot until its kernel returns, so unregistering a
    buffer registered with :meth:`register` while a copy runs cannot free it under the copy.
    Memory registered with :meth:`register_raw` stays valid only as long as its owner keeps it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._regions: dict[int, Region] = {}
        self._snap = _snapshot([])

    def register(self, buf: Any, *, name: str = "", writable: bool | None = None) -> Region:
        """Register a buffer (numpy array, bytearray, mmap, writable memoryview, ctypes array).

        ``writable`` defaults to whether the buffer is writable; asking for a writable region
        over read-only memory (e.g. ``bytes``) is refused.
        """
        arr = as_byte_array(buf, name or "buffer", writable=bool(writable))
        if arr.size == 0:
            raise invalid("cannot register an empty buffer")
        if writable is None:
            writable = bool(arr.flags.writeable)
        return self._add(Region(address_of(arr), int(arr.size), bool(writable), name, arr))

    def register_raw(self, addr: int, length: int, *, writable: bool = True, name: str = "",
                     keepalive: Any = None) -> Region:
        """Register memory known only by address (e.g. a buffer allocated by the RDMA stack).

        The caller vouches that ``[addr, addr + length)`` is mapped for as long as it is
        registered; pass the owning object as ``keepalive`` to tie its lifetime to the region.
        """
        addr = as_count(addr, "addr", minimum=1)
        length = as_count(length, "length", minimum=1)
        if addr + length > _ADDR_LIMIT:
            raise invalid(f"range [{addr:#x}, +{length}) is beyond the address limit")
        return self._add(Region(addr, length, bool(writable), name, keepalive))

    def _add(self, region: Region) -> Region:
        with self._lock:
            for r in self._regions.values():
                if region.addr < r.end and r.addr < region.end:
                    raise invalid(f"range [{region.addr:#x}, +{region.length}) overlaps registered "
                                  f"region {r.name or ''}[{r.addr:#x}, +{r.length})")
            self._regions[region.addr] = region
            self._snap = _snapshot(list(self._regions.values()))
        return region

    def unregister(self, addr: int) -> Region:
        """Remove the region starting at ``addr``."""
        with self._lock:
            region = self._regions.pop(int(addr), None)
            if region is None:
                raise invalid(f"no region registered at {int(addr):#x}")
            self._snap = _snapshot(list(self._regions.values()))
        return region

    def regions(self) -> list[Region]:
        return list(self._snap.regions)

    def find(self, addr: int, length: int = 1) -> Region | None:
        """The region containing all of ``[addr, addr + length)``, if any."""
        snap = self._snap
        i = int(np.searchsorted(snap.starts, addr, side="right")) - 1
        if i < 0 or length > int(snap.ends[i]) - addr:
            return None
        return snap.regions[i]

    def snapshot(self) -> _Snapshot:
        """The current set of regions; holding it keeps their buffers alive."""
        return self._snap

    def check(self, addrs: np.ndarray, lengths: np.ndarray, *, write: bool, what: str = "piece",
              snapshot: _Snapshot | None = None) -> int:
        """Refuse unless each non-empty ``[addrs[i], +lengths[i])`` lies inside one region.

        ``addrs`` and ``lengths`` are int64 arrays; returns the total length. Pass the
        ``snapshot`` the copy will hold so the check and the copy see the same regions.
        """
        snap = self._snap if snapshot is None else snapshot
        return check_regions(addrs, lengths, snap.starts, snap.ends, snap.writable, write=write,
                             what=what)


# Each raw-address copy takes one snapshot, checks against it, and keeps it referenced across the
# kernel call, so the regions it names stay alive even if they are unregistered meanwhile.


def gather_addrs(src_addrs: Any, lengths: Any, dst_addr: int, *, space: AddressSpace) -> int:
    """Pack pieces at raw addresses back to back from ``dst_addr``; returns bytes copied."""
    srcs = as_i64_array(src_addrs, "src_addrs")
    lens = as_i64_array(lengths, "lengths")
    same_length(src_addrs=srcs, lengths=lens)
    dst = np.array([as_count(dst_addr, "dst_addr")], np.int64)
    snap = space.snapshot()
    total = space.check(srcs, lens, write=False, what="src", snapshot=snap)
    space.check(dst, np.array([total], np.int64), write=True, what="dst", snapshot=snap)
    result = kernels.gather_kernel(0, _NO_LIMIT, srcs, lens, int(dst[0]), _NO_LIMIT)
    return _done(result, srcs, lens, what="src", size=None, limit=_NO_LIMIT)


def scatter_addrs(src_addr: int, dst_addrs: Any, lengths: Any, *, space: AddressSpace) -> int:
    """Unpack consecutive bytes from ``src_addr`` to pieces at raw addresses; returns bytes copied."""
    dsts = as_i64_array(dst_addrs, "dst_addrs")
    lens = as_i64_array(lengths, "lengths")
    same_length(dst_addrs=dsts, lengths=lens)
    src = np.array([as_count(src_addr, "src_addr")], np.int64)
    snap = space.snapshot()
    total = space.check(dsts, lens, write=True, what="dst", snapshot=snap)
    space.check(src, np.array([total], np.int64), write=False, what="src", snapshot=snap)
    result = kernels.scatter_kernel(int(src[0]), _NO_LIMIT, 0, _NO_LIMIT, dsts, lens)
    return _done(result, dsts, lens, what="dst", size=None, limit=_NO_LIMIT)


def copy_addrs(src_addrs: Any, dst_addrs: Any, lengths: Any, *, space: AddressSpace) -> int:
    """Copy piece ``i`` from ``src_addrs[i]`` to ``dst_addrs[i]`` (the local-memcpy transport)."""
    srcs = as_i64_array(src_addrs, "src_addrs")
    dsts = as_i64_array(dst_addrs, "dst_addrs")
    lens = as_i64_array(lengths, "lengths")
    same_length(src_addrs=srcs, dst_addrs=dsts, lengths=lens)
    snap = space.snapshot()
    space.check(srcs, lens, write=False, what="src", snapshot=snap)
    space.check(dsts, lens, write=True, what="dst", snapshot=snap)
    result = kernels.copy_kernel(0, _NO_LIMIT, srcs, 0, _NO_LIMIT, dsts, lens)
    return _done(result, srcs, lens, what="src", size=None, limit=_NO_LIMIT)

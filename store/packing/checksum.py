"""Object checksums: XXH64 (seed 0) of the value's bytes, computed in a numba kernel.

The store records ``checksum(value)`` at PutEnd and verifies it on every get. XXH64 was chosen
over crc32c because it is as fast as memory in plain 64-bit integer code (no CRC instruction
needed, so the same kernel runs under any CPU target, including ``NUMBA_CPU_NAME=generic``) and
because the ``xxhash`` library gives an independent implementation to test against.

The digest is defined over the logical byte sequence only, never over how it is split: one
contiguous buffer, several chunks fed to :class:`Checksum`, or scattered pieces given by
(offset, length) or raw (address, length) all give the same number for the same bytes, so a
client checksums a value while it is still scattered, without concatenating it.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from store.errors import ErrorCode, StoreError
from store.packing import kernels
from store.packing._validate import as_byte_array, as_i64_array, raise_bad_piece, same_length
from store.packing.copy import AddressSpace
from store.packing.kernels import address_of

if sys.byteorder != "little":  # the kernel reads words natively; XXH64 defines them little-endian
    raise ImportError("store.packing.checksum supports little-endian hosts only")

_MASK = (1 << 64) - 1
_P1 = int(kernels.P1)
_P2 = int(kernels.P2)
_ZERO_OFFSET = np.zeros(1, np.int64)
_NO_LIMIT = int(kernels.NO_LIMIT)


def _seed(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or not 0 <= int(value) <= _MASK:
        raise StoreError(ErrorCode.INVALID_PARAMS, f"seed must be an int in [0, 2**64), got {value!r}")
    return int(value)


def _contiguous_bytes(data: Any) -> np.ndarray:
    """A flat uint8 view of ``data``; a non-contiguous array or view is copied in C order."""
    if isinstance(data, np.ndarray) and not data.flags.c_contiguous:
        data = np.ascontiguousarray(data)
    elif isinstance(data, memoryview) and not data.c_contiguous:
        data = data.tobytes()
    return as_byte_array(data, "data", writable=False)


def checksum(data: Any, seed: int = 0) -> int:
    """XXH64 of the bytes of ``data`` (bytes, bytearray, memoryview, mmap, numpy array)."""
    arr = _contiguous_bytes(data)
    seed = _seed(seed)
    return int(kernels.xxh64_kernel(address_of(arr), arr.size, np.uint64(seed)))


class Checksum:
    """Streaming XXH64: ``update`` with chunks in order, ``digest`` at any point.

    ``Checksum().update(a).update(b).digest() == checksum(a + b)``. ``digest`` does not end
    the stream. Not thread-safe: one stream per thread.
    """

    __slots__ = ("_mem", "_seed", "_state")

    def __init__(self, seed: int = 0) -> None:
        self._seed = _seed(seed)
        self._state = np.zeros(kernels.STATE_WORDS, np.uint64)
        self._mem = np.zeros(kernels.MEM_BYTES, np.uint8)
        self.reset()

    def reset(self) -> None:
        s = self._seed
        self._state[:] = [(s + _P1 + _P2) & _MASK, (s + _P2) & _MASK, s, (s - _P1) & _MASK,
                          0, 0, s, 0]

    def update(self, chunk: Any) -> Checksum:
        arr = _contiguous_bytes(chunk)
        if arr.size:
            kernels.xxh64_update_kernel(self._state, self._mem, address_of(arr), arr.size, _ZERO_OFFSET,
                                        np.array([arr.size], np.int64))
        return self

    def update_pieces(self, buf: Any, offsets: Any, lengths: Any) -> Checksum:
        """Feed ``buf[offsets[i]:offsets[i]+lengths[i]]`` for each ``i`` in order."""
        arr = _contiguous_bytes(buf)
        offs = as_i64_array(offsets, "offsets")
        lens = as_i64_array(lengths, "lengths")
        same_length(offsets=offs, lengths=lens)
        where, value = kernels.xxh64_update_kernel(self._state, self._mem, address_of(arr), arr.size,
                                                   offs, lens)
        if where >= 0:
            raise_bad_piece(where, value, offs, lens, what="buf", size=arr.size, limit=_NO_LIMIT)
        return self

    def update_addrs(self, addrs: Any, lengths: Any, *, space: AddressSpace) -> Checksum:
        """Feed pieces at raw addresses, each checked to lie inside a region of ``space``."""
        a = as_i64_array(addrs, "addrs")
        lens = as_i64_array(lengths, "lengths")
        same_length(addrs=a, lengths=lens)
        # Held across the kernel call, so the regions checked stay alive until it returns.
        snap = space.snapshot()
        space.check(a, lens, write=False, what="checksum", snapshot=snap)
        kernels.xxh64_update_kernel(self._state, self._mem, 0, _NO_LIMIT, a, lens)
        return self

    @property
    def length(self) -> int:
        """Bytes fed so far."""
        return int(self._state[4])

    def digest(self) -> int:
        return int(kernels.xxh64_digest_kernel(self._state, self._mem))

    def hexdigest(self) -> str:
        return f"{self.digest():016x}"

    def copy(self) -> Checksum:
        other = Checksum.__new__(Checksum)
        other._seed = self._seed
        other._state = self._state.copy()
        other._mem = self._mem.copy()
        return other


def checksum_pieces(buf: Any, offsets: Any, lengths: Any, seed: int = 0) -> int:
    """XXH64 of the concatenation of pieces of ``buf``, without concatenating them."""
    return Checksum(seed).update_pieces(buf, offsets, lengths).digest()


def checksum_addrs(addrs: Any, lengths: Any, *, space: AddressSpace, seed: int = 0) -> int:
    """XXH64 of the concatenation of pieces at raw addresses (checked against ``space``)."""
    return Checksum(seed).update_addrs(addrs, lengths, space=space).digest()


def verify_checksum(data: Any, expected: int, *, what: str = "object") -> None:
    """Raise ``StoreError(CHECKSUM_MISMATCH)`` (−801) unless ``checksum(data) == expected``."""
    arr = _contiguous_bytes(data)
    got = checksum(arr)
    if got != int(expected):
        raise StoreError(ErrorCode.CHECKSUM_MISMATCH,
                         f"{what}: checksum {got:016x} != recorded {int(expected):016x} "
                         f"({arr.size} bytes)")

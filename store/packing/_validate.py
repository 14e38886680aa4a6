"""Argument checks shared by the packing wrappers.

Kernels trust what they are given, so everything that reaches one passes through here first.
Failures raise :class:`~store.errors.StoreError` with ``INVALID_PARAMS`` and name the argument.
"""

from __future__ import annotations

from typing import Any, NoReturn

import numpy as np

from store.errors import ErrorCode, StoreError
from store.packing import kernels

_I64_MAX = int(np.iinfo(np.int64).max)


def invalid(message: str) -> StoreError:
    return StoreError(ErrorCode.INVALID_PARAMS, message)


def as_count(value: Any, name: str, *, minimum: int = 0) -> int:
    """A non-negative Python int (numpy integers accepted; bools and floats are not)."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise invalid(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if value < minimum or value > _I64_MAX:
        raise invalid(f"{name} must be in [{minimum}, 2**63), got {value}")
    return value


def as_i64_array(value: Any, name: str) -> np.ndarray:
    """A 1-D C-contiguous int64 array, without looking at the values (a kernel check does).

    uint64 input is reinterpreted, not converted: values >= 2**63 turn negative, and every
    check refuses negative offsets, addresses and lengths.
    """
    arr = value if isinstance(value, np.ndarray) else np.asarray(value)
    if arr.ndim != 1:
        raise invalid(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.dtype == np.uint64:
        arr = arr.view(np.int64)  # same item size: fine for any strides
    if arr.dtype == np.int64 and arr.flags.c_contiguous and arr.flags.writeable and arr.flags.aligned:
        return arr  # the one array type the kernels are compiled for: no copy
    if arr.size == 0:
        return np.zeros(0, np.int64)
    if arr.dtype.kind not in "iu":
        raise invalid(f"{name} must hold integers, got dtype {arr.dtype}")
    # Anything else (other integer types, strided, read-only or unaligned arrays) is copied: each
    # of those would make numba compile another specialisation of every kernel.
    return np.array(arr, dtype=np.int64, order="C", copy=True)


def as_index_array(value: Any, name: str) -> np.ndarray:
    """:func:`as_i64_array` plus the check that every value is in ``[0, 2**63)``."""
    arr = as_i64_array(value, name)
    if arr.size and int(arr.min()) < 0:
        raise invalid(f"{name} must be in [0, 2**63), got {int(arr[arr < 0][0])} (as int64)")
    return arr


def same_length(**arrays: np.ndarray) -> int:
    sizes = {name: a.shape[0] for name, a in arrays.items()}
    if len(set(sizes.values())) > 1:
        raise invalid("arrays differ in length: " + ", ".join(f"{k}={v}" for k, v in sizes.items()))
    return next(iter(sizes.values()))


def checked_total(lengths: np.ndarray, name: str = "lengths") -> int:
    """Sum of non-negative lengths, refusing totals that would overflow int64 inside a kernel.

    The float sum is only a guard (exact far below 2**63); the returned total is exact.
    """
    if lengths.size == 0:
        return 0
    if float(lengths.sum(dtype=np.float64)) > 2.0**62:
        raise invalid(f"sum of {name} is too large")
    return int(lengths.sum())


def raise_bad_piece(where: int, reason: int, offsets: np.ndarray, lengths: np.ndarray, *, what: str,
                    offsets_name: str = "offsets", size: int | None, limit: int) -> NoReturn:
    """Turn a kernel's ``(index, reason)`` refusal into an ``INVALID_PARAMS`` error."""
    i = int(where)
    if reason == kernels.BAD_OFFSET:
        raise invalid(f"{offsets_name}[{i}] must be in [0, 2**63), got {int(offsets[i])} (as int64)")
    if reason == kernels.BAD_LENGTH:
        raise invalid(f"lengths[{i}] must be in [0, 2**63), got {int(lengths[i])} (as int64)")
    if reason == kernels.TOO_MUCH:
        raise invalid(f"{what} pieces total more than the {limit} bytes available (at piece {i})")
    piece = f"{what} piece {i} [{int(offsets[i]):#x}, +{int(lengths[i])})"
    if reason == kernels.READ_ONLY:
        raise invalid(f"{piece} lies in a read-only region")
    if size is None:
        raise invalid(f"{piece} is not inside one registered region")
    raise invalid(f"{piece} is outside its buffer of {size} bytes")


def check_regions(addrs: np.ndarray, lengths: np.ndarray, starts: np.ndarray, ends: np.ndarray,
                  writable: np.ndarray, *, write: bool, what: str, limit: int = _I64_MAX) -> int:
    """Every non-empty ``[addrs[i], +lengths[i])`` inside one of the sorted disjoint regions."""
    where, value = kernels.check_regions_kernel(addrs, lengths, starts, ends, writable, bool(write),
                                                int(limit))
    if where >= 0:
        raise_bad_piece(where, value, addrs, lengths, what=what, offsets_name=f"{what} addresses",
                        size=None, limit=limit)
    return int(value)


def as_byte_array(buf: Any, name: str, *, writable: bool) -> np.ndarray:
    """A flat uint8 view of a contiguous buffer (ndarray, bytes, bytearray, memoryview, mmap)."""
    if isinstance(buf, np.ndarray):
        if not buf.flags.c_contiguous:
            raise invalid(f"{name} must be C-contiguous")
        arr = buf.reshape(-1).view(np.uint8) if buf.dtype != np.uint8 or buf.ndim != 1 else buf
    else:
        try:
            mv = memoryview(buf)
        except TypeError:
            raise invalid(f"{name} must be a numpy array or a buffer, got "
                          f"{type(buf).__name__}") from None
        if not mv.c_contiguous:
            raise invalid(f"{name} must be C-contiguous")
        arr = np.frombuffer(mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv, np.uint8)
    if writable and not arr.flags.writeable:
        raise invalid(f"{name} is read-only")
    return arr

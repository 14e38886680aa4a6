"""Plain Python/numpy versions of every kernel, written for obviousness rather than speed.

Property tests run each kernel and its reference on the same generated inputs and demand equal
results. The planners transcribe Mooncake's loops literally (rather than the closed forms the
fast paths use), and the XXH64 here follows the specification step by step, so a shared
misreading is unlikely to hide in both.
"""

from __future__ import annotations

import bisect
from typing import Any

import numpy as np

_MASK = (1 << 64) - 1
_P1 = 11400714785074694791
_P2 = 14029467366897019727
_P3 = 1609587929392839161
_P4 = 9650029242287828579
_P5 = 2870177450012600261


def reference_plan_slices(length: int, slice_size: int = 65536, fragment_limit: int = 16384) -> np.ndarray:
    """Mooncake's ``submitTransferTask`` slicing loop, as written there."""
    rows = []
    offset = 0
    while offset < length:
        merge_final_slice = length - offset <= slice_size + fragment_limit
        rows.append((offset, length - offset if merge_final_slice else slice_size))
        if merge_final_slice:
            break
        offset += slice_size
    return np.array(rows, np.int64).reshape(-1, 2)


def reference_plan_store_chunks(length: int, max_chunk: int = 16 * 1024 * 1024 - 16) -> np.ndarray:
    """Mooncake's ``split_into_slices`` loop."""
    rows = []
    offset = 0
    while offset < length:
        chunk = min(length - offset, max_chunk)
        rows.append((offset, chunk))
        offset += chunk
    return np.array(rows, np.int64).reshape(-1, 2)


def reference_plan_blocks(offsets: Any, lengths: Any, slice_size: int = 65536, fragment_limit: int = 16384,
                          *, coalesce: bool = False) -> np.ndarray:
    """Group blocks into runs, slice each run, then map each slice start back to its block."""
    offsets = [int(x) for x in offsets]
    lengths = [int(x) for x in lengths]
    staging = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    runs: list[list[int]] = []
    for i, n in enumerate(lengths):
        if n == 0:
            continue
        prev = runs[-1][-1] if runs else None
        if coalesce and prev is not None and offsets[i] == offsets[prev] + lengths[prev]:
            runs[-1].append(i)
        else:
            runs.append([i])
    rows = []
    for run in runs:
        starts = []  # run-relative start of each member block
        pos = 0
        for b in run:
            starts.append(pos)
            pos += lengths[b]
        for off, n in reference_plan_slices(pos, slice_size, fragment_limit):
            k = bisect.bisect_right(starts, int(off)) - 1
            b = run[k]
            rows.append((b, int(off) - starts[k], int(staging[run[0]]) + int(off), int(n)))
    return np.array(rows, np.int64).reshape(-1, 4)


def reference_gather(src: np.ndarray, offsets: Any, lengths: Any, dst: np.ndarray,
                     dst_offset: int = 0) -> int:
    pos = dst_offset
    for o, n in zip(offsets, lengths, strict=True):
        dst[pos:pos + n] = src[o:o + n]  # numpy copies overlapping slices as memmove would
        pos += n
    return pos - dst_offset


def reference_scatter(src: np.ndarray, dst: np.ndarray, offsets: Any, lengths: Any,
                      src_offset: int = 0) -> int:
    pos = src_offset
    for o, n in zip(offsets, lengths, strict=True):
        dst[o:o + n] = src[pos:pos + n]
        pos += n
    return pos - src_offset


def reference_copy_pieces(src: np.ndarray, src_offsets: Any, dst: np.ndarray, dst_offsets: Any,
                          lengths: Any) -> int:
    total = 0
    for so, do, n in zip(src_offsets, dst_offsets, lengths, strict=True):
        dst[do:do + n] = src[so:so + n]
        total += n
    return total


def _rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (64 - r))) & _MASK


def _round(acc: int, lane: int) -> int:
    acc = (acc + lane * _P2) & _MASK
    return (_rotl(acc, 31) * _P1) & _MASK


def _merge(h: int, v: int) -> int:
    return ((h ^ _round(0, v)) * _P1 + _P4) & _MASK


def reference_xxh64(data: bytes | bytearray | memoryview, seed: int = 0) -> int:
    """XXH64 following the specification (slow; for tests on small inputs)."""
    b = bytes(data)
    n = len(b)
    p = 0
    if n >= 32:
        v = [(seed + _P1 + _P2) & _MASK, (seed + _P2) & _MASK, seed & _MASK, (seed - _P1) & _MASK]
        while p + 32 <= n:
            for k in range(4):
                v[k] = _round(v[k], int.from_bytes(b[p + 8 * k:p + 8 * k + 8], "little"))
            p += 32
        h = (_rotl(v[0], 1) + _rotl(v[1], 7) + _rotl(v[2], 12) + _rotl(v[3], 18)) & _MASK
        for x in v:
            h = _merge(h, x)
    else:
        h = (seed + _P5) & _MASK
    h = (h + n) & _MASK
    while p + 8 <= n:
        h ^= _round(0, int.from_bytes(b[p:p + 8], "little"))
        h = (_rotl(h, 27) * _P1 + _P4) & _MASK
        p += 8
    if p + 4 <= n:
        h ^= (int.from_bytes(b[p:p + 4], "little") * _P1) & _MASK
        h = (_rotl(h, 23) * _P2 + _P3) & _MASK
        p += 4
    while p < n:
        h ^= (b[p] * _P5) & _MASK
        h = (_rotl(h, 11) * _P1) & _MASK
        p += 1
    h ^= h >> 33
    h = (h * _P2) & _MASK
    h ^= h >> 29
    h = (h * _P3) & _MASK
    return h ^ (h >> 32)

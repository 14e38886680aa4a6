"""numba kernels: slice planning over blocks, gather/scatter/copy on raw addresses, xxh64.

Every kernel is ``nopython``, ``cache=True`` and ``nogil=True`` (a transfer thread packing a
staging buffer must not stall the completion pollers). Kernels take raw addresses and trust
them: the public wrappers in :mod:`store.packing.copy` and :mod:`store.packing.checksum` check
every range first. Argument types are fixed (addresses and seeds ``uint64`` scalars, offsets
and lengths C-contiguous ``int64`` arrays) so each kernel has exactly one compiled
specialisation, which :func:`warmup` compiles or loads from the on-disk cache.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from numba import njit

from store.packing._intrinsics import load_u8, load_u32, load_u64, memmove

# --------------------------------------------------------------------------- slice planning


@njit(cache=True, nogil=True)
def _slice_count(length, slice_size, fragment_limit):  # type: ignore[no-untyped-def]
    """Slices Mooncake's TE cuts ``length`` into (closed form of its submit loop)."""
    if length <= 0:
        return 0
    if length <= slice_size + fragment_limit:
        return 1
    return (length - fragment_limit - 1) // slice_size + 1


@njit(cache=True, nogil=True)
def plan_blocks_kernel(offsets, lengths, slice_size, fragment_limit, coalesce):  # type: ignore[no-untyped-def]
    """Plan ``(block, offset_in_block, staging_offset, length)`` rows; see ``plan_blocks``."""
    nb = lengths.shape[0]
    run_first = np.empty(nb, np.int64)
    run_stage = np.empty(nb, np.int64)
    run_len = np.empty(nb, np.int64)
    nruns = 0
    staging = 0
    last = -1  # last non-empty block of the open run
    for i in range(nb):
        n = lengths[i]
        if n == 0:
            continue
        if coalesce and last >= 0 and offsets[i] == offsets[last] + lengths[last]:
            run_len[nruns - 1] += n
        else:
            run_first[nruns] = i
            run_stage[nruns] = staging
            run_len[nruns] = n
            nruns += 1
        last = i
        staging += n
    total = 0
    for r in range(nruns):
        total += _slice_count(run_len[r], slice_size, fragment_limit)
    out = np.empty((total, 4), np.int64)
    row = 0
    for r in range(nruns):
        count = _slice_count(run_len[r], slice_size, fragment_limit)
        b = run_first[r]
        bstart = 0  # run-relative position where block b starts
        pos = 0
        for k in range(count):
            while pos >= bstart + lengths[b]:
                bstart += lengths[b]
                b += 1
            out[row, 0] = b
            out[row, 1] = pos - bstart
            out[row, 2] = run_stage[r] + pos
            out[row, 3] = slice_size if k < count - 1 else run_len[r] - pos
            row += 1
            pos += slice_size
    return out


# --------------------------------------------------------------------------- checks
# Every copy kernel checks all its pieces before it moves a byte, in the same call: a compiled
# pass costs about a microsecond, the same checks as numpy expressions several, and one call
# instead of two saves the dispatch. Kernels return ``(-1, bytes)`` on success and
# ``(index of the first bad piece, reason)`` when nothing was copied.

BAD_OFFSET, BAD_LENGTH, OUT_OF_RANGE, TOO_MUCH, READ_ONLY = 1, 2, 3, 4, 5
DST_SIDE = 16  # added to the reason when copy_kernel's destination side is at fault
NO_LIMIT = np.iinfo(np.int64).max


@njit(cache=True, nogil=True)
def _check_pieces(offsets, lengths, size, limit):  # type: ignore[no-untyped-def]
    """Every ``[offsets[i], +lengths[i])`` inside ``[0, size)``, the total at most ``limit``.

    Written as ``offset > size - length`` so that a huge offset cannot wrap into range.
    """
    total = 0
    for i in range(lengths.shape[0]):
        o = offsets[i]
        n = lengths[i]
        if o < 0:
            return i, BAD_OFFSET
        if n < 0:
            return i, BAD_LENGTH
        if n > size or o > size - n:
            return i, OUT_OF_RANGE
        if n > limit - total:
            return i, TOO_MUCH
        total += n
    return -1, total


@njit(cache=True, nogil=True)
def check_regions_kernel(addrs, lengths, starts, ends, writable, write, limit):  # type: ignore[no-untyped-def]
    """Like ``_check_pieces`` against sorted, disjoint regions ``[starts[j], ends[j])``: each
    non-empty piece must lie inside one region (a writable one when ``write``)."""
    total = 0
    for i in range(lengths.shape[0]):
        a = addrs[i]
        n = lengths[i]
        if a < 0:
            return i, BAD_OFFSET
        if n < 0:
            return i, BAD_LENGTH
        if n > limit - total:
            return i, TOO_MUCH
        total += n
        if n == 0:
            continue
        j = np.searchsorted(starts, a, side="right") - 1
        if j < 0 or n > ends[j] - a:
            return i, OUT_OF_RANGE
        if write and not writable[j]:
            return i, READ_ONLY
    return -1, total


# --------------------------------------------------------------------------- copies
# Addresses are int64 (user-space addresses are below 2**63). A raw-address caller has checked its
# pieces against registered regions already and passes base 0 and NO_LIMIT sizes.


@njit(cache=True, nogil=True)
def address_of(arr):  # type: ignore[no-untyped-def]
    """Address of a buffer's first byte (cheaper than ``arr.ctypes.data`` from Python)."""
    return np.int64(arr.ctypes.data)


@njit(cache=True, nogil=True)
def gather_kernel(src_addr, src_size, offsets, lengths, dst_addr, dst_room):  # type: ignore[no-untyped-def]
    """Copy pieces ``src_addr + offsets[i]`` back to back from ``dst_addr``."""
    where, value = _check_pieces(offsets, lengths, src_size, dst_room)
    if where >= 0:
        return where, value
    pos = 0
    for i in range(lengths.shape[0]):
        n = lengths[i]
        memmove(dst_addr + pos, src_addr + offsets[i], n)
        pos += n
    return -1, pos


@njit(cache=True, nogil=True)
def scatter_kernel(src_addr, src_room, dst_addr, dst_size, offsets, lengths):  # type: ignore[no-untyped-def]
    """Copy consecutive bytes from ``src_addr`` to pieces ``dst_addr + offsets[i]``."""
    where, value = _check_pieces(offsets, lengths, dst_size, src_room)
    if where >= 0:
        return where, value
    pos = 0
    for i in range(lengths.shape[0]):
        n = lengths[i]
        memmove(dst_addr + offsets[i], src_addr + pos, n)
        pos += n
    return -1, pos


@njit(cache=True, nogil=True)
def copy_kernel(src_addr, src_size, src_offsets, dst_addr, dst_size, dst_offsets, lengths):  # type: ignore[no-untyped-def]
    """Copy piece ``i`` from ``src_addr + src_offsets[i]`` to ``dst_addr + dst_offsets[i]``."""
    where, value = _check_pieces(src_offsets, lengths, src_size, NO_LIMIT)
    if where >= 0:
        return where, value
    where, value = _check_pieces(dst_offsets, lengths, dst_size, NO_LIMIT)
    if where >= 0:
        return where, value + DST_SIDE
    pos = 0
    for i in range(lengths.shape[0]):
        n = lengths[i]
        memmove(dst_addr + dst_offsets[i], src_addr + src_offsets[i], n)
        pos += n
    return -1, pos


# --------------------------------------------------------------------------- xxh64
# XXH64 as specified by Yann Collet (xxhash.com, "xxHash fast digest algorithm", v0.1.1).
# All arithmetic stays in uint64 (numba wraps modulo 2**64); every literal is a uint64 constant
# because mixing uint64 with a Python int would promote to float64.

P1 = np.uint64(11400714785074694791)
P2 = np.uint64(14029467366897019727)
P3 = np.uint64(1609587929392839161)
P4 = np.uint64(9650029242287828579)
P5 = np.uint64(2870177450012600261)
_ZERO = np.uint64(0)
_C1, _C4, _C7, _C8, _C11, _C12, _C18 = (np.uint64(c) for c in (1, 4, 7, 8, 11, 12, 18))
_C23, _C27, _C29, _C31, _C32, _C33 = (np.uint64(c) for c in (23, 27, 29, 31, 32, 33))
_C64 = np.uint64(64)

STATE_WORDS = 8  # v1..v4, total length, bytes buffered, seed, unused
MEM_BYTES = 32


@njit(cache=True, inline="always")
def _rotl(x, r):  # type: ignore[no-untyped-def]
    return (x << r) | (x >> (_C64 - r))


@njit(cache=True, inline="always")
def _round(acc, lane):  # type: ignore[no-untyped-def]
    acc = acc + lane * P2
    acc = _rotl(acc, _C31)
    return acc * P1


@njit(cache=True, inline="always")
def _merge(h, v):  # type: ignore[no-untyped-def]
    h = h ^ _round(_ZERO, v)
    return h * P1 + P4


@njit(cache=True, nogil=True)
def _stripes(v1, v2, v3, v4, addr, nstripes):  # type: ignore[no-untyped-def]
    p = addr
    for _ in range(nstripes):
        v1 = _round(v1, load_u64(p))
        v2 = _round(v2, load_u64(p + _C8))
        v3 = _round(v3, load_u64(p + np.uint64(16)))
        v4 = _round(v4, load_u64(p + np.uint64(24)))
        p += np.uint64(32)
    return v1, v2, v3, v4


@njit(cache=True, nogil=True)
def _converge(v1, v2, v3, v4):  # type: ignore[no-untyped-def]
    h = _rotl(v1, _C1) + _rotl(v2, _C7) + _rotl(v3, _C12) + _rotl(v4, _C18)
    h = _merge(h, v1)
    h = _merge(h, v2)
    h = _merge(h, v3)
    return _merge(h, v4)


@njit(cache=True, nogil=True)
def _finalize(h, p, rem):  # type: ignore[no-untyped-def]
    while rem >= 8:
        h = h ^ _round(_ZERO, load_u64(p))
        h = _rotl(h, _C27) * P1 + P4
        p += _C8
        rem -= 8
    if rem >= 4:
        h = h ^ (load_u32(p) * P1)
        h = _rotl(h, _C23) * P2 + P3
        p += _C4
        rem -= 4
    while rem > 0:
        h = h ^ (load_u8(p) * P5)
        h = _rotl(h, _C11) * P1
        p += _C1
        rem -= 1
    h = h ^ (h >> _C33)
    h = h * P2
    h = h ^ (h >> _C29)
    h = h * P3
    return h ^ (h >> _C32)


@njit(cache=True, nogil=True)
def xxh64_kernel(addr, n, seed):  # type: ignore[no-untyped-def]
    """XXH64 of ``n`` bytes at ``addr``."""
    p = np.uint64(addr)
    if n >= 32:
        nstripes = n // 32
        v1, v2, v3, v4 = _stripes(seed + P1 + P2, seed + P2, seed, seed - P1, p, nstripes)
        h = _converge(v1, v2, v3, v4)
        p += np.uint64(nstripes * 32)
        rem = n - nstripes * 32
    else:
        h = seed + P5
        rem = n
    h += np.uint64(n)
    return _finalize(h, p, rem)


@njit(cache=True, nogil=True)
def _update(state, mem_addr, addr, n):  # type: ignore[no-untyped-def]
    if n <= 0:
        return
    state[4] += np.uint64(n)
    memsize = np.int64(state[5])
    if memsize + n < MEM_BYTES:
        memmove(mem_addr + np.uint64(memsize), addr, n)
        state[5] = np.uint64(memsize + n)
        return
    v1, v2, v3, v4 = state[0], state[1], state[2], state[3]
    p = addr
    rem = n
    if memsize > 0:
        fill = MEM_BYTES - memsize
        memmove(mem_addr + np.uint64(memsize), p, fill)
        v1, v2, v3, v4 = _stripes(v1, v2, v3, v4, mem_addr, 1)
        p += np.uint64(fill)
        rem -= fill
    nstripes = rem // 32
    if nstripes > 0:
        v1, v2, v3, v4 = _stripes(v1, v2, v3, v4, p, nstripes)
        p += np.uint64(nstripes * 32)
        rem -= nstripes * 32
    if rem > 0:
        memmove(mem_addr, p, rem)
    state[0] = v1
    state[1] = v2
    state[2] = v3
    state[3] = v4
    state[5] = np.uint64(rem)


@njit(cache=True, nogil=True)
def xxh64_update_kernel(state, mem, base, size, offsets, lengths):  # type: ignore[no-untyped-def]
    """Feed pieces ``base + offsets[i]`` (``lengths[i]`` bytes each, inside ``[0, size)``) into a
    streaming state; checked first like the copies, and nothing is fed on a bad piece."""
    where, value = _check_pieces(offsets, lengths, size, NO_LIMIT)
    if where >= 0:
        return where, value
    mem_addr = np.uint64(mem.ctypes.data)
    for i in range(lengths.shape[0]):
        _update(state, mem_addr, np.uint64(base + offsets[i]), lengths[i])
    return -1, value


@njit(cache=True, nogil=True)
def xxh64_digest_kernel(state, mem):  # type: ignore[no-untyped-def]
    """Digest of a streaming state (the state is left unchanged, so updates may continue)."""
    total = state[4]
    if total >= np.uint64(32):
        h = _converge(state[0], state[1], state[2], state[3])
    else:
        h = state[6] + P5
    h += total
    return _finalize(h, np.uint64(mem.ctypes.data), np.int64(state[5]))


# --------------------------------------------------------------------------- warmup

KERNELS = {
    "plan_blocks": plan_blocks_kernel,
    "check_regions": check_regions_kernel,
    "address_of": address_of,
    "gather": gather_kernel,
    "scatter": scatter_kernel,
    "copy": copy_kernel,
    "xxh64": xxh64_kernel,
    "xxh64_update": xxh64_update_kernel,
    "xxh64_digest": xxh64_digest_kernel,
}
# address_of is compiled for writable and for read-only buffers; every other kernel has one
# specialisation, because the wrappers hand it exactly these types.
SPECIALISATIONS = {"address_of": 2}


def _run_each_once() -> None:
    i64 = np.zeros(1, np.int64)
    lens = np.ones(1, np.int64)
    a = np.zeros(64, np.uint8)
    b = np.zeros(64, np.uint8)
    pa, pb = address_of(a), address_of(b)
    address_of(np.frombuffer(bytes(1), np.uint8))
    plan_blocks_kernel(i64, lens, 65536, 16384, False)
    check_regions_kernel(i64, lens, i64, lens, np.ones(1, np.bool_), True, 64)
    gather_kernel(pa, 64, i64, lens, pb, 64)
    scatter_kernel(pa, 64, pb, 64, i64, lens)
    copy_kernel(pa, 64, i64, pb, 64, i64, lens)
    xxh64_kernel(pa, 64, np.uint64(0))
    state = np.zeros(STATE_WORDS, np.uint64)
    mem = np.zeros(MEM_BYTES, np.uint8)
    xxh64_update_kernel(state, mem, pa, 64, i64, lens)
    xxh64_digest_kernel(state, mem)


def warmup() -> dict[str, Any]:
    """Compile (or load from numba's cache) every kernel once, and say which happened.

    Callers run this at setup so no transfer or timed loop pays a compile. The result names the
    CPU target numba compiled for and, per kernel, whether its machine code came from the
    on-disk cache (``cache_hits``) or was compiled now (``cache_misses``): that is how to tell,
    e.g. inside an emulated guest, whether a cache written elsewhere was reused.
    """
    from numba.core import config

    t0 = time.perf_counter()
    _run_each_once()
    seconds = time.perf_counter() - t0
    kernels: dict[str, dict[str, Any]] = {}
    for name, disp in KERNELS.items():
        stats = disp.stats
        kernels[name] = {
            "cache_hits": int(sum(stats.cache_hits.values())),
            "cache_misses": int(sum(stats.cache_misses.values())),
            "cache_path": stats.cache_path,
        }
    import llvmlite.binding as llb

    return {
        "seconds": seconds,
        "cpu_name": config.CPU_NAME or llb.get_host_cpu_name(),
        "numba_cpu_name_env": config.CPU_NAME,
        "numba_cpu_features_env": config.CPU_FEATURES,
        "kernels": kernels,
    }

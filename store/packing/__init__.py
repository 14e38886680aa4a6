"""Slice packing: plan slices, gather/scatter scattered blocks, checksum objects (numba kernels).

Public API (everything else is internal):

- planning: :func:`plan_slices`, :func:`plan_store_chunks`, :func:`plan_blocks`,
  :func:`slice_count`, :class:`SliceConfig` (``MC_SLICE_SIZE`` / ``MC_FRAGMENT_RATIO``);
- copies on buffers: :func:`gather`, :func:`scatter`, :func:`copy_pieces`;
- copies on raw addresses, checked against an :class:`AddressSpace` of registered ranges:
  :func:`gather_addrs`, :func:`scatter_addrs`, :func:`copy_addrs`;
- checksums (XXH64, seed 0): :func:`checksum`, :class:`Checksum` (streaming),
  :func:`checksum_pieces`, :func:`checksum_addrs`, :func:`verify_checksum` (raises
  ``CHECKSUM_MISMATCH``);
- :func:`warmup`: compile or load every kernel once, before anything is timed;
- ``reference_*``: plain numpy/Python versions the tests hold the kernels to.

Kernels compile lazily on first use and are cached on disk (numba ``cache=True``: under
``__pycache__`` next to these files, or in ``NUMBA_CACHE_DIR`` when set). numba keys a cached
kernel by the source file's path and modification time and by the CPU name and feature string
it was compiled for. An emulated guest CPU (QEMU ``-cpu max``) has another name and other
features than the host, so by default the guest compiles its own copy (about 5 s of LLVM work on
the host, some 20x that under TCG) and stores it beside the host's. With ``NUMBA_CPU_NAME=generic``
numba also defaults ``NUMBA_CPU_FEATURES`` to empty, so host and guest compute the same key and a
cache written on the host is loaded in the guest, provided both use the same cache directory and
see the same source path and mtime. Measured on the host: the generic entries are a separate
cache entry next to the native ones, and generic code is as fast here (copies go through libc
``memmove``, which picks its vector variant at run time; XXH64 is scalar 64-bit arithmetic).
:func:`warmup` (also ``python -m store.packing``) reports cache hits and misses per kernel, which
tells which case happened.
"""

from __future__ import annotations

from store.packing.checksum import (
    Checksum,
    checksum,
    checksum_addrs,
    checksum_pieces,
    verify_checksum,
)
from store.packing.copy import (
    AddressSpace,
    Region,
    copy_addrs,
    copy_pieces,
    gather,
    gather_addrs,
    scatter,
    scatter_addrs,
)
from store.packing.kernels import warmup
from store.packing.plan import (
    BLOCK,
    BLOCK_OFFSET,
    DEFAULT_FRAGMENT_LIMIT,
    DEFAULT_FRAGMENT_RATIO,
    DEFAULT_SLICE_SIZE,
    LENGTH,
    MAX_STORE_CHUNK,
    STAGING_OFFSET,
    SliceConfig,
    plan_blocks,
    plan_slices,
    plan_store_chunks,
    slice_count,
)
from store.packing.reference import (
    reference_copy_pieces,
    reference_gather,
    reference_plan_blocks,
    reference_plan_slices,
    reference_plan_store_chunks,
    reference_scatter,
    reference_xxh64,
)

__all__ = [
    "BLOCK",
    "BLOCK_OFFSET",
    "DEFAULT_FRAGMENT_LIMIT",
    "DEFAULT_FRAGMENT_RATIO",
    "DEFAULT_SLICE_SIZE",
    "LENGTH",
    "MAX_STORE_CHUNK",
    "STAGING_OFFSET",
    "AddressSpace",
    "Checksum",
    "Region",
    "SliceConfig",
    "checksum",
    "checksum_addrs",
    "checksum_pieces",
    "copy_addrs",
    "copy_pieces",
    "gather",
    "gather_addrs",
    "plan_blocks",
    "plan_slices",
    "plan_store_chunks",
    "reference_copy_pieces",
    "reference_gather",
    "reference_plan_blocks",
    "reference_plan_slices",
    "reference_plan_store_chunks",
    "reference_scatter",
    "reference_xxh64",
    "scatter",
    "scatter_addrs",
    "slice_count",
    "verify_checksum",
    "warmup",
]

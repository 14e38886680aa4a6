"""Slice planning: store chunks (≤ 16 MiB − 16) and transfer-engine slices (64 KiB, tail merged).

Two layers, as in Mooncake (research notes §3.3):

1. **Store chunks** (``split_into_slices`` in Mooncake's ``client_buffer.cpp``): a value is cut
   into consecutive chunks of at most ``kMaxSliceSize`` = 16 MiB − 16, the last one shorter.
2. **TE slices** (``RdmaTransport::submitTransferTask``): every transfer request is cut into
   ``slice_size`` pieces; at each step, when what remains is ``<= slice_size + fragment_limit``
   it becomes the final slice whole. So a remainder of at most ``fragment_limit`` bytes is merged
   into the slice before it (a 64 KiB + 16 KiB request is one slice, 64 KiB + 16 KiB + 1 is two:
   64 KiB and 16 KiB + 1), and no slice is ever longer than ``slice_size + fragment_limit``.
   ``MC_SLICE_SIZE`` and ``MC_FRAGMENT_RATIO`` configure it (:meth:`SliceConfig.from_env`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from store.packing import kernels
from store.packing._validate import as_count, as_index_array, checked_total, invalid, same_length

log = logging.getLogger(__name__)

DEFAULT_SLICE_SIZE = 65536  # MC_SLICE_SIZE
DEFAULT_FRAGMENT_RATIO = 4  # MC_FRAGMENT_RATIO
DEFAULT_FRAGMENT_LIMIT = DEFAULT_SLICE_SIZE // DEFAULT_FRAGMENT_RATIO  # 16 KiB
MAX_STORE_CHUNK = 16 * 1024 * 1024 - 16  # kMaxSliceSize

# Columns of a plan_blocks() row.
BLOCK, BLOCK_OFFSET, STAGING_OFFSET, LENGTH = 0, 1, 2, 3


@dataclass(frozen=True)
class SliceConfig:
    """TE slicing parameters (Mooncake's ``globalConfig().slice_size`` / ``fragment_limit``)."""

    slice_size: int = DEFAULT_SLICE_SIZE
    fragment_limit: int = DEFAULT_FRAGMENT_LIMIT

    def __post_init__(self) -> None:
        as_count(self.slice_size, "slice_size", minimum=1)
        as_count(self.fragment_limit, "fragment_limit")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> SliceConfig:
        """Read ``MC_SLICE_SIZE`` and ``MC_FRAGMENT_RATIO`` the way Mooncake's config does.

        ``MC_SLICE_SIZE`` > 0 replaces 65536. ``MC_FRAGMENT_RATIO`` (default 4) sets
        ``fragment_limit = slice_size // ratio`` when ``0 < ratio < slice_size``; another non-zero
        value is ignored with a warning and 4 is used; 0 keeps the absolute 16 KiB default.
        A value that is not an integer is ignored with a warning, as Mooncake does.
        """
        env = os.environ if environ is None else environ
        slice_size = DEFAULT_SLICE_SIZE
        raw = env.get("MC_SLICE_SIZE")
        if raw is not None:
            value = _env_int("MC_SLICE_SIZE", raw)
            if value is not None and value > 0:
                slice_size = value
            else:
                log.warning("ignoring MC_SLICE_SIZE=%r; using %d", raw, slice_size)
        ratio = DEFAULT_FRAGMENT_RATIO
        raw = env.get("MC_FRAGMENT_RATIO")
        if raw is not None:
            value = _env_int("MC_FRAGMENT_RATIO", raw)
            ratio = DEFAULT_FRAGMENT_RATIO if value is None else value
        if 0 < ratio < slice_size:
            fragment_limit = slice_size // ratio
        elif ratio != 0:
            log.warning("ignoring MC_FRAGMENT_RATIO=%d; using %d", ratio, DEFAULT_FRAGMENT_RATIO)
            fragment_limit = slice_size // DEFAULT_FRAGMENT_RATIO
        else:
            fragment_limit = DEFAULT_FRAGMENT_LIMIT
        return cls(slice_size, fragment_limit)


def _env_int(name: str, raw: str) -> int | None:
    try:
        return int(raw.strip())
    except ValueError:
        log.warning("%s=%r is not an integer", name, raw)
        return None


def slice_count(length: int, slice_size: int = DEFAULT_SLICE_SIZE,
                fragment_limit: int = DEFAULT_FRAGMENT_LIMIT) -> int:
    """How many TE slices :func:`plan_slices` makes, without building them."""
    length = as_count(length, "length")
    slice_size = as_count(slice_size, "slice_size", minimum=1)
    fragment_limit = as_count(fragment_limit, "fragment_limit")
    if length == 0:
        return 0
    if length <= slice_size + fragment_limit:
        return 1
    return (length - fragment_limit - 1) // slice_size + 1


def plan_slices(length: int, slice_size: int = DEFAULT_SLICE_SIZE,
                fragment_limit: int = DEFAULT_FRAGMENT_LIMIT) -> np.ndarray:
    """TE slices of one contiguous request: ``(n, 2)`` int64 rows ``(offset, length)``.

    Length 0 gives zero slices (Mooncake's loop does not run). See the module docstring for
    the tail rule.
    """
    n = slice_count(length, slice_size, fragment_limit)
    out = np.empty((n, 2), np.int64)
    if n:
        out[:, 0] = np.arange(n, dtype=np.int64) * slice_size
        out[:, 1] = slice_size
        out[-1, 1] = length - (n - 1) * slice_size
    return out


def plan_store_chunks(length: int, max_chunk: int = MAX_STORE_CHUNK) -> np.ndarray:
    """Store-level chunks of a value: ``(n, 2)`` int64 ``(offset, length)``, each ≤ ``max_chunk``.

    Mooncake cuts a value into ``kMaxSliceSize`` chunks so each fits one 16 MiB cachelib slab
    (v0.3.0–v0.3.7: one buffer per chunk; v0.3.8+: one TE request per chunk). No tail merging.
    """
    length = as_count(length, "length")
    max_chunk = as_count(max_chunk, "max_chunk", minimum=1)
    n = -(-length // max_chunk)
    out = np.empty((n, 2), np.int64)
    if n:
        out[:, 0] = np.arange(n, dtype=np.int64) * max_chunk
        out[:, 1] = max_chunk
        out[-1, 1] = length - (n - 1) * max_chunk
    return out


def plan_blocks(offsets: Any, lengths: Any, slice_size: int = DEFAULT_SLICE_SIZE,
                fragment_limit: int = DEFAULT_FRAGMENT_LIMIT, *, coalesce: bool = False) -> np.ndarray:
    """TE slices over scattered source blocks packed back to back into a staging area.

    Returns ``(n, 4)`` int64 rows ``(block, offset_in_block, staging_offset, length)`` (column
    constants ``BLOCK``, ``BLOCK_OFFSET``, ``STAGING_OFFSET``, ``LENGTH``). Block ``i`` occupies
    ``[sum(lengths[:i]), +lengths[i])`` of the staging area.

    Slices are **cut at block boundaries**: each block is sliced on its own with Mooncake's rule,
    exactly as if each block were one TE request (which is what Mooncake does with a list of
    blocks). So every slice is one contiguous range of the source *and* of the staging area and
    can be posted as one work request with one SGE, either straight from a registered source
    block or from the staging buffer. Empty blocks produce no slice.

    With ``coalesce=True``, consecutive non-empty blocks that are also adjacent in the source
    (``offsets[i] == offsets[j] + lengths[j]`` for the previous non-empty block ``j``) are first
    merged into one run and the run is sliced as one request; a slice may then cross into the
    next block of its run, and still is contiguous in source and staging: its source range is
    ``offsets[block] + offset_in_block`` onwards for ``length`` bytes. That gives fewer, larger
    work requests when an allocator handed out neighbouring blocks.
    """
    offs = as_index_array(offsets, "offsets")
    lens = as_index_array(lengths, "lengths")
    same_length(offsets=offs, lengths=lens)
    slice_size = as_count(slice_size, "slice_size", minimum=1)
    fragment_limit = as_count(fragment_limit, "fragment_limit")
    checked_total(lens)
    if offs.size and float(offs.max()) + float(lens.max()) > 2.0**62:
        raise invalid("offsets + lengths too large")
    if slice_size + fragment_limit > 2**62:
        raise invalid("slice_size + fragment_limit too large")
    return kernels.plan_blocks_kernel(offs, lens, np.int64(slice_size), np.int64(fragment_limit),
                                      bool(coalesce))

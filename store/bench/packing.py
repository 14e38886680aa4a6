"""``umbra bench packing``: numba gather/scatter and XXH64 against numpy and the xxhash library.

Figures, all measured in this run and interleaved repetition by repetition so both sides see the
same machine load (``--seed`` fixes the block layout, ``--quick`` shrinks it to about a second):

- per block size (4 KiB, 64 KiB, 1 MiB): ``gather_GBps`` packs equal blocks from shuffled slots
  of a pool twice the working set into a contiguous staging buffer; ``scatter_GBps`` puts them
  back. ``numpy_copy_GBps`` is numpy moving the same bytes in the same pattern in one call
  (``np.take(pool, slots, axis=0, out=staging, mode="clip")``; the default
  ``mode="raise"`` goes through a temporary) and ``numpy_scatter_GBps`` the reverse
  (``pool[slots] = staging``). ``ratio_to_numpy`` = gather / numpy copy and
  ``scatter_ratio_to_numpy`` = scatter / numpy scatter; the target is >= 0.8 at 64 KiB.
  ``numpy_contiguous_GBps`` is one plain contiguous copy of the working set, the memory ceiling.
- ``checksum_GBps``: the numba XXH64 over the working set; ``xxhash_lib_GBps``: the ``xxhash``
  library on the same buffer; ``checksum_pieces_GBps``: the numba XXH64 streamed over the
  scattered 64 KiB blocks (no packing first).

Each figure moves ``--total-mib`` MiB (256; 32 with ``--quick``) as calls over a working set of
``--working-mib`` MiB (8, e.g. 128 KV blocks of 64 KiB; 2 with ``--quick``). The calls of the
compared sides alternate one by one, in alternating order, so load from other processes and
cache state favour neither side; each figure is working set / median call time. Results are
verified (bytes equal, digests equal to the library's) before anything is printed.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from store import packing
from store.units import KiB, MiB

BLOCK_SIZES = (4 * KiB, 64 * KiB, 1 * MiB)
TARGET_RATIO = 0.8
TARGET_BLOCK = 64 * KiB


def _time(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _gbps(nbytes: int, seconds: list[float]) -> float:
    return nbytes / statistics.median(seconds) / 1e9


def run(seed: int, quick: bool, total_mib: int | None = None,
        working_mib: int | None = None) -> dict[str, Any]:
    working = (working_mib or (2 if quick else 8)) * MiB
    total = (total_mib or (32 if quick else 256)) * MiB
    calls = max(3, total // working)
    rng = np.random.default_rng(seed)
    warm = packing.warmup()

    pool = rng.integers(0, 256, 2 * working, dtype=np.uint8)
    staging = np.empty(working, np.uint8)
    moved = calls * working
    out: dict[str, Any] = {
        "benchmark": "packing",
        "seed": seed,
        "quick": quick,
        "working_set_bytes": working,
        "bytes_per_measurement": moved,
        "calls": calls,
        "block_sizes": list(BLOCK_SIZES),
        "gather_GBps": {},
        "scatter_GBps": {},
        "numpy_copy_GBps": {},
        "numpy_scatter_GBps": {},
        "ratio_to_numpy": {},
        "scatter_ratio_to_numpy": {},
    }
    for bs in BLOCK_SIZES:
        nblocks = working // bs
        slots = rng.permutation(2 * nblocks)[:nblocks].astype(np.int64)
        offsets = slots * bs
        lengths = np.full(nblocks, bs, np.int64)
        pool2d = pool.reshape(-1, bs)
        stage2d = staging.reshape(-1, bs)

        def gather(offsets=offsets, lengths=lengths) -> None:
            packing.gather(pool, offsets, lengths, staging)

        def scatter(offsets=offsets, lengths=lengths) -> None:
            packing.scatter(staging, pool, offsets, lengths)

        def np_gather(pool2d=pool2d, slots=slots, stage2d=stage2d) -> None:
            np.take(pool2d, slots, axis=0, out=stage2d, mode="clip")  # 'raise' would buffer

        def np_scatter(pool2d=pool2d, slots=slots, stage2d=stage2d) -> None:
            pool2d[slots] = stage2d

        gather()
        if not np.array_equal(stage2d, pool2d[slots]):
            raise AssertionError(f"gather of {bs}-byte blocks produced other bytes")
        times: dict[str, list[float]] = {"g": [], "s": [], "ng": [], "ns": []}
        pairs = (("g", gather), ("ng", np_gather), ("s", scatter), ("ns", np_scatter))
        for i in range(calls):
            # Call by call, in alternating order, so noise and cache state favour neither side.
            for name, fn in pairs if i % 2 == 0 else pairs[::-1]:
                times[name].append(_time(fn))
        key = str(bs)
        g, s = _gbps(working, times["g"]), _gbps(working, times["s"])
        ng, ns = _gbps(working, times["ng"]), _gbps(working, times["ns"])
        out["gather_GBps"][key] = g
        out["scatter_GBps"][key] = s
        out["numpy_copy_GBps"][key] = ng
        out["numpy_scatter_GBps"][key] = ns
        out["ratio_to_numpy"][key] = g / ng
        out["scatter_ratio_to_numpy"][key] = s / ns

    src = pool[:working]
    contiguous = [_time(lambda: np.copyto(staging, src)) for _ in range(calls)]
    out["numpy_contiguous_GBps"] = _gbps(working, contiguous)

    import xxhash

    want = xxhash.xxh64_intdigest(src)
    if packing.checksum(src) != want:
        raise AssertionError("numba XXH64 disagrees with the xxhash library")
    nblocks = working // TARGET_BLOCK
    slots = rng.permutation(2 * nblocks)[:nblocks].astype(np.int64)
    offsets, lengths = slots * TARGET_BLOCK, np.full(nblocks, TARGET_BLOCK, np.int64)
    packing.gather(pool, offsets, lengths, staging)
    if packing.checksum_pieces(pool, offsets, lengths) != xxhash.xxh64_intdigest(staging):
        raise AssertionError("streamed XXH64 over pieces disagrees with the packed digest")
    ck: dict[str, list[float]] = {"numba": [], "lib": [], "pieces": []}
    checks = (("numba", lambda: packing.checksum(src)), ("lib", lambda: xxhash.xxh64_intdigest(src)),
              ("pieces", lambda: packing.checksum_pieces(pool, offsets, lengths)))
    for i in range(calls):
        for name, fn in checks if i % 2 == 0 else checks[::-1]:
            ck[name].append(_time(fn))
    out["checksum_GBps"] = _gbps(working, ck["numba"])
    out["xxhash_lib_GBps"] = _gbps(working, ck["lib"])
    out["checksum_pieces_GBps"] = _gbps(working, ck["pieces"])
    out["checksum_ratio_to_lib"] = out["checksum_GBps"] / out["xxhash_lib_GBps"]

    key = str(TARGET_BLOCK)
    out["target"] = {
        "block_size": TARGET_BLOCK,
        "ratio": TARGET_RATIO,
        "gather_met": out["ratio_to_numpy"][key] >= TARGET_RATIO,
        "scatter_met": out["scatter_ratio_to_numpy"][key] >= TARGET_RATIO,
    }
    out["warmup"] = {
        "seconds": warm["seconds"],
        "cpu_name": warm["cpu_name"],
        "cache_hits": sum(k["cache_hits"] for k in warm["kernels"].values()),
        "cache_misses": sum(k["cache_misses"] for k in warm["kernels"].values()),
    }
    out["verified"] = True
    return out


def print_tables(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    t = Table(title=f"gather/scatter, {result['bytes_per_measurement'] // MiB} MiB per measurement, "
                    f"median call, {result['calls']} calls (seed {result['seed']})")
    for col in ("block", "gather GB/s", "numpy copy GB/s", "ratio", "scatter GB/s",
                "numpy scatter GB/s", "ratio"):
        t.add_column(col, justify="right")
    for bs in result["block_sizes"]:
        k = str(bs)
        t.add_row(f"{bs // KiB} KiB", f"{result['gather_GBps'][k]:.2f}",
                  f"{result['numpy_copy_GBps'][k]:.2f}", f"{result['ratio_to_numpy'][k]:.2f}",
                  f"{result['scatter_GBps'][k]:.2f}", f"{result['numpy_scatter_GBps'][k]:.2f}",
                  f"{result['scatter_ratio_to_numpy'][k]:.2f}")
    console.print(t)
    c = Table(title="checksum (XXH64)")
    for col in ("what", "GB/s"):
        c.add_column(col, justify="right")
    c.add_row("numba, contiguous", f"{result['checksum_GBps']:.2f}")
    c.add_row("xxhash library", f"{result['xxhash_lib_GBps']:.2f}")
    c.add_row("numba, 64 KiB pieces", f"{result['checksum_pieces_GBps']:.2f}")
    c.add_row("numpy contiguous copy", f"{result['numpy_contiguous_GBps']:.2f}")
    console.print(c)
    tgt = result["target"]
    w = result["warmup"]
    console.print(f"target >= {tgt['ratio']} of numpy at {tgt['block_size'] // KiB} KiB: "
                  f"gather {'met' if tgt['gather_met'] else 'MISSED'}, "
                  f"scatter {'met' if tgt['scatter_met'] else 'MISSED'}; "
                  f"warmup {w['seconds']:.2f} s on {w['cpu_name']} "
                  f"({w['cache_hits']} cache hits, {w['cache_misses']} compiled)")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="umbra bench packing", description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument("--quick", action="store_true",
                        help="about a second: 32 MiB per figure over a 2 MiB working set")
    parser.add_argument("--seed", type=int, default=None, help="seed for the block layout (default: random)")
    parser.add_argument("--total-mib", type=int, default=None,
                        help="MiB moved per figure (default 256, 32 with --quick)")
    parser.add_argument("--working-mib", type=int, default=None,
                        help="MiB moved per call, the working set (default 8, 2 with --quick)")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 31)
    if not args.json:
        print(f"seed={seed}", file=sys.stderr)
    result = run(seed, args.quick, args.total_mib, args.working_mib)
    if args.json:
        print(json.dumps(result))
    else:
        print_tables(result)
    return 0

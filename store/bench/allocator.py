"""``umbra bench allocator``: speed, utilisation and bookkeeping of the allocators and strategies.

Figures, all measured in this run (``--seed`` fixes every random choice, ``--quick`` shrinks it to
a few seconds):

- ``alloc_free_per_s``: allocate+free pairs per second on one 1 GiB offset segment with mixed
  sizes (1 KiB-1 MiB, ~1000 live), plus ns per allocate and per free, next to Mooncake's C++
  figures (100-550 ns per allocation).
- ``util_at_first_failure``: requested bytes / capacity when the first request fails, filling
  an empty allocator, for ``uniform_pow2`` (2^k), ``uniform_pow2_plus_17``,
  ``uniform_pow2_minus_17`` (one run per k, min/mean reported) and ``random_1k_4m`` (uniform
  1 KiB-4 MiB): offset and slab on one 1 GiB segment, and each placement strategy over 8
  offset segments of 128 MiB (same total).
- ``steady_state``: Mooncake's allocator benchmark method (``allocator_bench.cpp``): keep
  allocating; when a request fails evict random live objects until it fits; utilisation after
  every request (avg/min/p1) and at each failure. ``random_1k_64m_2g`` is Mooncake's exact
  random workload (1 KiB-64 MiB on 2 GiB, published avg 0.84); ``random_1k_4m`` runs on one
  128 MiB segment and across 8 x 128 MiB per strategy (same object/segment ratio, 1/32).
- ``calcification``: fill with 1 MiB objects, free everything, then fill with 100 KiB objects:
  utilisation at first failure (the slab allocator's failure, reproduced).
- ``bookkeeping_bytes_per_allocation``: the offset allocator's own structures for a 1 TiB
  segment with 1 M live allocations (100 k with ``--quick``) divided by live allocations, both
  from the array sizes and from tracemalloc, and with the caller's ``Allocation`` objects.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import random
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from store.allocator import OffsetAllocator, SlabAllocator, make_strategy
from store.allocator.base import Allocation, Allocator
from store.units import GiB, KiB, MiB, TiB

MOONCAKE_REFERENCE = {
    "uniform_pow2": 1.0,
    "uniform_pow2_minus_17": "0.967-0.999999 (0.97-0.999 from 2 KiB up)",
    "uniform_pow2_plus_17": "0.875-0.942 (0.889 from 2 KiB up)",
    "random_1k_64m_2g_avg": 0.841576,
    "random_1k_64m_2g_min": 0.544250,
    "ns_per_allocation_cpp": [98, 568],
}
STRATEGY_NAMES = ("random", "free_ratio_first", "best_fit")


@dataclass
class _Target:
    name: str
    allocator: Allocator


@dataclass
class Config:
    seed: int
    quick: bool
    segment: int  # single-segment utilisation runs
    strategy_segment: int  # each of the 8 strategy segments
    segments: int
    pow2_ks: tuple[int, ...]
    strategy_pow2_ks: tuple[int, ...]
    churn_ops: int
    speed_pairs: int
    memory_allocs: int


def make_config(seed: int, quick: bool) -> Config:
    if quick:
        return Config(seed, True, 256 * MiB, 32 * MiB, 8, (16, 20, 24), (18, 22), 3000, 20_000, 100_000)
    return Config(seed, False, 1 * GiB, 128 * MiB, 8, (12, 14, 16, 18, 20, 22, 24), (16, 18, 20, 22, 24),
                  40_000, 100_000, 1_000_000)


# --- workloads -----------------------------------------------------------------------------------

def _uniform(size: int) -> Callable[[], int]:
    return lambda: size


def _random(rng: random.Random, lo: int, hi: int) -> Callable[[], int]:
    return lambda: rng.randint(lo, hi)


def _fill(alloc: Allocator, next_size: Callable[[], int], limit: int = 50_000_000) -> tuple[float, int]:
    """Allocate until the first failure; (requested/capacity, allocations)."""
    requested = n = 0
    while n < limit:
        size = next_size()
        if size > alloc.capacity or alloc.allocate(size) is None:
            break
        requested += size
        n += 1
    return requested / alloc.capacity, n


def _place_fill(strategy, targets: list[_Target], next_size: Callable[[], int]) -> tuple[float, int]:
    cap = sum(t.allocator.capacity for t in targets)
    requested = n = 0
    while True:
        size = next_size()
        if not strategy.place(targets, size, 1):
            break
        requested += size
        n += 1
    return requested / cap, n


def _summary(values: dict[str, float]) -> dict[str, Any]:
    vs = list(values.values())
    return {"min": round(min(vs), 6), "mean": round(statistics.fmean(vs), 6),
            "per_size": {k: round(v, 6) for k, v in values.items()}}


def _pctl(sorted_vals: list[float], q: float) -> float:
    return sorted_vals[min(len(sorted_vals) - 1, int(len(sorted_vals) * q))]


def _churn(place: Callable[[int], list[tuple[Any, Allocation]] | None], capacity: int,
           next_size: Callable[[], int], ops: int, rng: random.Random) -> dict[str, Any]:
    """Mooncake's ``allocator_bench`` loop: on failure evict random live objects until it fits."""
    live: list[tuple[int, list[tuple[Any, Allocation]]]] = []
    requested = 0
    warm = 0
    # warm-up: as Mooncake, allocate until the requested total reaches the capacity
    while warm < capacity:
        size = next_size()
        warm += size
        requested = _churn_one(place, size, live, requested, rng, None)
    utils: list[float] = []
    at_failure: list[float] = []
    for _ in range(ops):
        size = next_size()
        requested = _churn_one(place, size, live, requested, rng, (at_failure, capacity))
        utils.append(requested / capacity)
    utils.sort()
    return {
        "avg": round(statistics.fmean(utils), 6),
        "min": round(utils[0], 6),
        "p1": round(_pctl(utils, 0.01), 6),
        "p50": round(_pctl(utils, 0.5), 6),
        "at_failure_avg": round(statistics.fmean(at_failure), 6) if at_failure else None,
        "failures": len(at_failure),
        "ops": ops,
    }


def _churn_one(place, size, live, requested, rng, failure_log) -> int:
    while True:
        got = place(size)
        if got:
            live.append((size, got))
            return requested + size
        if not live:
            return requested  # cannot fit even when empty
        if failure_log is not None:
            failure_log[0].append(requested / failure_log[1])
        i = rng.randrange(len(live))
        live[i], live[-1] = live[-1], live[i]
        vsize, placed = live.pop()
        for target, a in placed:
            target.allocator.free(a)
        requested -= vsize


def _single_placer(alloc: Allocator):
    target = _Target("seg", alloc)

    def place(size: int):
        if size > alloc.capacity:
            return None
        a = alloc.allocate(size)
        return [(target, a)] if a is not None else None
    return place


def _strategy_targets(cfg: Config) -> list[_Target]:
    return [_Target(f"seg{i}", OffsetAllocator(cfg.strategy_segment, segment_name=f"seg{i}"))
            for i in range(cfg.segments)]


# --- sections ------------------------------------------------------------------------------------

def bench_speed(cfg: Config) -> dict[str, Any]:
    rng = random.Random(cfg.seed)
    alloc = OffsetAllocator(1 * GiB, segment_name="speed")
    n_live = 1000
    sizes = [rng.randint(1 * KiB, 1 * MiB) for _ in range(cfg.speed_pairs + n_live)]
    picks = [rng.randrange(n_live) for _ in range(cfg.speed_pairs)]
    gc.collect()
    live = [alloc.allocate(s) for s in sizes[:n_live]]
    allocate = alloc.allocate
    free = alloc.free
    start = time.perf_counter_ns()
    for j, i in enumerate(picks):
        free(live[i])
        a = allocate(sizes[n_live + j])
        if a is None:  # keep the live set; practically never with ~0.5 GiB live
            a = allocate(1 * KiB)
        live[i] = a
    elapsed = time.perf_counter_ns() - start
    for a in live:
        free(a)
    # allocate and free timed apart: rounds of 1000 allocations, then 1000 frees in random order
    t_alloc = t_free = 0
    rounds = max(1, cfg.speed_pairs // (5 * n_live))
    for r in range(rounds):
        batch = sizes[r * n_live:(r + 1) * n_live]
        t0 = time.perf_counter_ns()
        live = [allocate(s) for s in batch]
        t1 = time.perf_counter_ns()
        rng.shuffle(live)
        t2 = time.perf_counter_ns()
        for a in live:
            free(a)
        t3 = time.perf_counter_ns()
        t_alloc += t1 - t0
        t_free += t3 - t2
    alloc.check_invariants()
    # slab allocator, same loop (4 GiB: each size class takes whole 16 MiB slabs)
    slab = SlabAllocator(4 * GiB, segment_name="speed")
    live = [slab.allocate(s) for s in sizes[:n_live]]
    s_fail = live.count(None)
    s_start = time.perf_counter_ns()
    for j, i in enumerate(picks):
        if live[i] is not None:
            slab.free(live[i])
        live[i] = slab.allocate(sizes[n_live + j])
        s_fail += live[i] is None
    s_elapsed = time.perf_counter_ns() - s_start
    pairs = len(picks)
    return {
        "alloc_free_per_s": round(pairs / (elapsed / 1e9)),
        "ns_per_alloc_free_pair": round(elapsed / pairs),
        "ns_per_allocate": round(t_alloc / (rounds * n_live)),
        "ns_per_free": round(t_free / (rounds * n_live)),
        "slab_alloc_free_per_s": round(pairs / (s_elapsed / 1e9)),
        "slab_failed_allocations": s_fail,
        "pairs": pairs,
        "mooncake_cpp_ns_per_allocation": MOONCAKE_REFERENCE["ns_per_allocation_cpp"],
    }


def bench_first_failure(cfg: Config) -> dict[str, Any]:
    out: dict[str, dict[str, Any]] = {}
    workloads: dict[str, Callable[[int], int]] = {
        "uniform_pow2": lambda k: 1 << k,
        "uniform_pow2_plus_17": lambda k: (1 << k) + 17,
        "uniform_pow2_minus_17": lambda k: (1 << k) - 17,
    }
    makers = {"offset": lambda: OffsetAllocator(cfg.segment, segment_name="bench"),
              "slab": lambda: SlabAllocator(cfg.segment, segment_name="bench")}
    for kind, make in makers.items():
        res: dict[str, Any] = {}
        for wname, size_of in workloads.items():
            res[wname] = _summary({str(size_of(k)): _fill(make(), _uniform(size_of(k)))[0]
                                   for k in cfg.pow2_ks})
        rng = random.Random(cfg.seed)
        util, n = _fill(make(), _random(rng, 1 * KiB, 4 * MiB))
        res["random_1k_4m"] = {"util": round(util, 6), "allocations": n}
        out[kind] = res
    for sname in STRATEGY_NAMES:
        res = {}
        for wname, size_of in workloads.items():
            vals = {}
            for k in cfg.strategy_pow2_ks:
                strategy = make_strategy(sname, cfg.seed)
                vals[str(size_of(k))] = _place_fill(strategy, _strategy_targets(cfg), _uniform(size_of(k)))[0]
            res[wname] = _summary(vals)
        rng = random.Random(cfg.seed)
        util, n = _place_fill(make_strategy(sname, cfg.seed), _strategy_targets(cfg),
                              _random(rng, 1 * KiB, 4 * MiB))
        res["random_1k_4m"] = {"util": round(util, 6), "allocations": n}
        out[sname] = res
    return out


def bench_steady_state(cfg: Config) -> dict[str, Any]:
    out: dict[str, Any] = {}
    rng = random.Random(cfg.seed)
    seg = 2 * GiB
    out["offset_random_1k_64m_2g"] = _churn(_single_placer(OffsetAllocator(seg)), seg,
                                            _random(rng, 1 * KiB, 64 * MiB), cfg.churn_ops, rng)
    rng = random.Random(cfg.seed)
    seg = cfg.strategy_segment
    out["offset_random_1k_4m_1seg"] = _churn(_single_placer(OffsetAllocator(seg)), seg,
                                             _random(rng, 1 * KiB, 4 * MiB), cfg.churn_ops, rng)
    rng = random.Random(cfg.seed)
    slab_seg = cfg.segment  # 16 MiB slabs: a 128 MiB segment has only 8 for ~40 size classes
    out["slab_random_1k_4m_1seg"] = _churn(_single_placer(SlabAllocator(slab_seg)), slab_seg,
                                           _random(rng, 1 * KiB, 4 * MiB), cfg.churn_ops, rng)
    for sname in STRATEGY_NAMES:
        rng = random.Random(cfg.seed)
        targets = _strategy_targets(cfg)
        strategy = make_strategy(sname, cfg.seed)
        cap = sum(t.allocator.capacity for t in targets)

        def place(size, strategy=strategy, targets=targets):
            return strategy.place(targets, size, 1) or None
        out[f"{sname}_random_1k_4m_{cfg.segments}seg"] = _churn(place, cap, _random(rng, 1 * KiB, 4 * MiB),
                                                                cfg.churn_ops, rng)
    return out


def bench_calcification(cfg: Config) -> dict[str, Any]:
    out = {}
    for kind, make in (("offset", OffsetAllocator), ("slab", SlabAllocator)):
        alloc = make(cfg.segment)
        first = []
        while (a := alloc.allocate(1 * MiB)) is not None:
            first.append(a)
        for a in first:
            alloc.free(a)
        util, n = _fill(alloc, _uniform(100 * KiB))
        out[kind] = {"util_after_shift": round(util, 6), "allocations_after_shift": n,
                     "used_before_shift": 0, "phase1_allocations": len(first)}
    return out


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096
    except OSError:  # pragma: no cover - non-Linux
        return 0


def _allocation_object_bytes(allocs: list[Allocation]) -> int:
    """Bytes of the caller-side ``Allocation`` objects: the object plus the ints it alone holds
    (offset, size, handle; ``requested`` is the caller's own int, ``owner`` is shared)."""
    total = 0
    for a in allocs:
        total += sys.getsizeof(a)
        for v in (a.offset, a.size, a.handle):
            if not -5 <= v <= 256:  # small ints are shared singletons
                total += sys.getsizeof(v)
    return total


def bench_memory(cfg: Config) -> dict[str, Any]:
    """1 TiB offset segment with ``memory_allocs`` live allocations (4 KiB-1 MiB).

    The allocator's own structures are measured from its arrays (``bookkeeping_bytes``: exact
    buffer sizes) and cross-checked with tracemalloc on a 20 k-allocation run (tracemalloc slows
    a million traced objects down ~30x, so it is not used on the big run); the process RSS delta
    of the big run covers everything (arrays, ``Allocation`` objects, the list holding them).
    """
    n = cfg.memory_allocs
    rng = random.Random(cfg.seed)
    sizes = [rng.randint(4 * KiB, 1 * MiB) for _ in range(n)]
    gc.collect()
    rss0 = _rss()
    alloc = OffsetAllocator(1 * TiB, segment_name="memory")
    allocate = alloc.allocate
    t0 = time.perf_counter()
    keep = [allocate(s) for s in sizes]
    fill_s = time.perf_counter() - t0
    rss1 = _rss()
    assert all(keep) and alloc.live_count == n
    own = alloc.bookkeeping_bytes()
    objects = _allocation_object_bytes(keep) + sys.getsizeof(keep)
    rep = alloc.report()
    del keep, alloc
    gc.collect()
    # tracemalloc cross-check on a smaller run
    m = 20_000
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    small = OffsetAllocator(1 * TiB, segment_name="memory-traced")
    keep = [small.allocate(s) for s in sizes[:m]]
    with_objects = tracemalloc.get_traced_memory()[0] - before
    del keep
    gc.collect()
    traced_own = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    arrays_small = small.bookkeeping_bytes()
    return {
        "segment_bytes": 1 * TiB,
        "live_allocations": n,
        "bookkeeping_bytes": own,
        "bookkeeping_bytes_per_allocation": round(own / n, 2),
        "allocation_objects_bytes": objects,
        "with_allocation_objects_bytes": own + objects,
        "with_allocation_objects_per_allocation": round((own + objects) / n, 2),
        "rss_delta_bytes": rss1 - rss0,
        "node_slots": rep["node_slots"],
        "max_nodes": rep["max_nodes"],
        "granularity": rep["granularity"],
        "fill_seconds": round(fill_s, 3),
        "ns_per_allocate_1tib": round(fill_s / n * 1e9),
        "tracemalloc_check": {
            "live_allocations": m,
            "allocator_traced_bytes": traced_own,
            "allocator_array_bytes": arrays_small,
            "with_allocation_objects_traced_bytes": with_objects,
            "allocation_object_traced_bytes_each": round((with_objects - traced_own) / m, 1),
        },
        "limit_bytes": 200 * MiB,
        "within_limit": own < 200 * MiB,
    }


# --- output --------------------------------------------------------------------------------------

def run(cfg: Config) -> dict[str, Any]:
    t0 = time.perf_counter()
    result: dict[str, Any] = {"benchmark": "allocator", "seed": cfg.seed, "quick": cfg.quick}
    result["config"] = {"segment_bytes": cfg.segment, "strategy_segments": cfg.segments,
                        "strategy_segment_bytes": cfg.strategy_segment,
                        "pow2_exponents": list(cfg.pow2_ks),
                        "strategy_pow2_exponents": list(cfg.strategy_pow2_ks),
                        "churn_ops": cfg.churn_ops}
    speed = bench_speed(cfg)
    result["alloc_free_per_s"] = speed["alloc_free_per_s"]
    result["speed"] = speed
    result["util_at_first_failure"] = bench_first_failure(cfg)
    result["steady_state"] = bench_steady_state(cfg)
    result["calcification"] = bench_calcification(cfg)
    memory = bench_memory(cfg)
    result["bookkeeping_bytes_per_allocation"] = memory["bookkeeping_bytes_per_allocation"]
    result["memory"] = memory
    result["mooncake_reference"] = MOONCAKE_REFERENCE
    result["seconds"] = round(time.perf_counter() - t0, 2)
    return result


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return "-" if v is None else str(v)


def print_tables(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console = Console(width=120)  # logs and pipes: no need to squeeze into 80 columns
    console.print(f"[bold]umbra bench allocator[/bold]  seed={result['seed']}  quick={result['quick']}  "
                  f"({result['seconds']} s)")
    sp = result["speed"]
    t = Table(title="Speed (offset allocator, 1 GiB, mixed 1 KiB-1 MiB, ~1000 live)")
    for c in ("alloc+free pairs/s", "ns/pair", "ns/allocate", "ns/free", "slab pairs/s",
              "Mooncake C++ ns/alloc"):
        t.add_column(c, justify="right")
    t.add_row(str(sp["alloc_free_per_s"]), str(sp["ns_per_alloc_free_pair"]), str(sp["ns_per_allocate"]),
              str(sp["ns_per_free"]), _fmt(sp["slab_alloc_free_per_s"]),
              "-".join(map(str, sp["mooncake_cpp_ns_per_allocation"])))
    console.print(t)

    cfg = result["config"]
    seg = f"{cfg['segment_bytes'] >> 20} MiB"
    sseg = f"{cfg['strategy_segments']}x{cfg['strategy_segment_bytes'] >> 20} MiB"
    t = Table(title="Utilisation at first failure (requested / capacity), min / mean over sizes 2^k")
    t.add_column("allocator / strategy")
    wl = {"uniform_pow2": "2^k", "uniform_pow2_plus_17": "2^k+17", "uniform_pow2_minus_17": "2^k-17"}
    for label in wl.values():
        t.add_column(label, justify="right")
    t.add_column("random 1K-4M", justify="right")
    for name, res in result["util_at_first_failure"].items():
        where = seg if name in ("offset", "slab") else f"offset {sseg}"
        t.add_row(f"{name} ({where})", *[f"{res[w]['min']:.4f} / {res[w]['mean']:.4f}" for w in wl],
                  f"{res['random_1k_4m']['util']:.4f}")
    t.add_row("Mooncake offset (published)", "1.0", "0.875-0.942", "0.967-0.999999", "-", style="dim")
    console.print(t)

    t = Table(title="Steady state: Mooncake's method (evict random objects on failure), utilisation")
    for c in ("run", "avg", "min", "p1", "p50", "at failure", "failures"):
        t.add_column(c, justify="right" if c != "run" else "left")
    labels = {
        "offset_random_1k_64m_2g": "offset, 1K-64M, 1x2 GiB (Mooncake's setup)",
        "offset_random_1k_4m_1seg": f"offset, 1K-4M, 1x{cfg['strategy_segment_bytes'] >> 20} MiB",
        "slab_random_1k_4m_1seg": f"slab, 1K-4M, 1x{seg}",
    }
    for name, r in result["steady_state"].items():
        label = labels.get(name) or f"{name.split('_random')[0]}, 1K-4M, {sseg}"
        t.add_row(label, _fmt(r["avg"]), _fmt(r["min"]), _fmt(r["p1"]), _fmt(r["p50"]),
                  _fmt(r["at_failure_avg"]), str(r["failures"]))
    t.add_row("Mooncake offset 1K-64M 2 GiB (published)", _fmt(MOONCAKE_REFERENCE["random_1k_64m_2g_avg"]),
              _fmt(MOONCAKE_REFERENCE["random_1k_64m_2g_min"]), "0.7133", "0.8479", "-", "-", style="dim")
    console.print(t)

    t = Table(title="Calcification: fill with 1 MiB objects, free all, fill with 100 KiB objects")
    for c in ("allocator", "1 MiB allocations", "util at failure after the shift", "100 KiB allocations"):
        t.add_column(c, justify="right" if c != "allocator" else "left")
    for name, r in result["calcification"].items():
        t.add_row(name, str(r["phase1_allocations"]), _fmt(r["util_after_shift"]),
                  str(r["allocations_after_shift"]))
    console.print(t)

    m = result["memory"]
    tc = m["tracemalloc_check"]
    t = Table(title=f"Bookkeeping: 1 TiB offset segment, {m['live_allocations']:,} live allocations")
    for c in ("", "total", "per allocation"):
        t.add_column(c, justify="right" if c else "left")
    t.add_row("allocator's own structures", f"{m['bookkeeping_bytes'] / MiB:.1f} MiB",
              f"{m['bookkeeping_bytes_per_allocation']:.1f} B")
    t.add_row("+ caller's Allocation objects", f"{m['with_allocation_objects_bytes'] / MiB:.1f} MiB",
              f"{m['with_allocation_objects_per_allocation']:.1f} B")
    t.add_row("process RSS delta", f"{m['rss_delta_bytes'] / MiB:.1f} MiB",
              f"{m['rss_delta_bytes'] / m['live_allocations']:.1f} B")
    t.add_row(f"tracemalloc check, {tc['live_allocations']:,} allocations",
              f"{tc['allocator_traced_bytes'] / KiB:.0f} KiB traced",
              f"arrays {tc['allocator_array_bytes'] / KiB:.0f} KiB")
    t.add_row("allocator under 200 MiB", str(m["within_limit"]), "")
    console.print(t)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="umbra bench allocator", description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument("--quick", action="store_true", help="a few seconds: smaller segments and runs")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed for every random choice (default: a random one, printed)")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 31)
    logging.getLogger("store.allocator").setLevel(logging.INFO)  # no per-allocation DEBUG lines here
    if not args.json:
        print(f"seed={seed}", file=sys.stderr)
    result = run(make_config(seed, args.quick))
    if args.json:
        print(json.dumps(result, sort_keys=False))
    else:
        print_tables(result)
    return 0

"""Workloads: what the clients do while faults fire. Every random choice comes from the run's seed.

- :class:`KVCacheWorkload` — vLLM-like KV-cache traffic: workers put KV blocks of a
  DeepSeek-R1-like layout (MLA: 576 values per token per layer, bf16, 61 layers; a key holds
  ``tokens × layers`` of them, 18 KiB to ~4 MiB) and read back recent blocks (prefix-cache hits),
  removing their oldest blocks past a per-worker budget; at the end every block a worker still
  believes stored is read once more (``verify``) for the visibility checker.
- :class:`ReadOnceWorkload` — prefill→decode handoff: prefill workers put a request's blocks
  and hand the keys over; decode workers read each block once (``first_read``) and read it again
  1–2 s later (``reread``: another decode instance, a retry, a prefix hit) — the pattern the
  legacy GC breaks.
- :class:`SizeMixWorkload` — one client puts values phase by phase with a changing size mix
  (fragmentation), recording the master's allocator view at every NO_AVAILABLE_HANDLE.

Values are cheap to make and tell keys apart: a header with the key's hash and the size, then
bytes from a seeded pool at a key-dependent offset; the history keeps each value's XXH64.
"""

from __future__ import annotations

import heapq
import queue
import random
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import xxhash

from scenarios.clients import RecordingClient
from store.errors import ErrorCode
from store.master.client import MasterClient
from store.units import KiB, MiB

NO_HANDLE = int(ErrorCode.NO_AVAILABLE_HANDLE)
HAS_LEASE = int(ErrorCode.OBJECT_HAS_LEASE)
POOL_BYTES = 8 * MiB


class ValueMaker:
    """Deterministic, distinct values: ``value(key, size)`` is a function of the seed, key, size."""

    def __init__(self, seed: int) -> None:
        self.pool = np.random.default_rng(seed).bytes(POOL_BYTES + 4 * MiB)

    def value(self, key: str, size: int) -> bytes:
        h = xxhash.xxh64_intdigest(key.encode())
        header = struct.pack("<QQ", h, size)
        if size <= len(header):
            return header[:size]
        off = h % POOL_BYTES
        body_len = size - len(header)
        if off + body_len <= len(self.pool):
            return header + self.pool[off : off + body_len]
        reps = -(-body_len // len(self.pool))
        return header + (self.pool * reps)[off : off + body_len]


@dataclass(frozen=True)
class KVLayout:
    """DeepSeek-R1 with MLA: 61 layers, 512 + 64 latent values per token per layer, bf16."""

    layers: int = 61
    kv_dim: int = 576
    dtype_bytes: int = 2

    def block_bytes(self, tokens: int, layers: int) -> int:
        return tokens * layers * self.kv_dim * self.dtype_bytes


# (tokens per block, layers per key, weight): 18 KiB … 4.2 MiB
KV_MIX: tuple[tuple[int, int, float], ...] = (
    (16, 1, 3.0),
    (16, 4, 3.0),
    (64, 4, 2.0),
    (64, 16, 1.5),
    (128, 16, 1.0),
    (256, 14, 0.5),
)


@dataclass
class WorkloadContext:
    """What a workload gets from the runner."""

    clients: list[RecordingClient]
    seed: int
    variant: str
    stop: threading.Event
    admin: Callable[[], MasterClient]
    progress: Callable[[int], None] = lambda n: None
    metrics: dict[str, Any] = field(default_factory=dict)

    def rng(self, *parts: object) -> random.Random:
        return random.Random(":".join(map(str, ("umbra-workload", self.seed, self.variant, *parts))))


class Workload:
    name = "workload"

    def describe(self) -> dict[str, Any]:
        return {"workload": self.name, **{k: v for k, v in vars(self).items() if not k.startswith("_")}}

    def run(self, ctx: WorkloadContext) -> dict[str, Any]:
        raise NotImplementedError


def _run_threads(fns: list[Callable[[], None]]) -> None:
    errors: list[BaseException] = []

    def wrap(fn: Callable[[], None]) -> None:
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the runner's thread
            errors.append(exc)

    threads = [
        threading.Thread(target=wrap, args=(fn,), daemon=True, name=f"worker-{i}") for i, fn in enumerate(fns)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def _snapshot(shared: deque[str], lock: threading.Lock) -> list[str]:
    with lock:
        return list(shared)


class KVCacheWorkload(Workload):
    """See the module docstring. ``duration`` (s) or ``ops`` (per worker) bounds the run."""

    name = "kv-cache"

    def __init__(
        self,
        *,
        duration: float | None = None,
        ops: int | None = 200,
        put_ratio: float = 0.5,
        live_budget: int = 24 * MiB,
        mix: tuple[tuple[int, int, float], ...] = KV_MIX,
        max_value: int = 4 * MiB + 256 * KiB,
        think_s: float = 0.0,
        verify: bool = True,
        retry_remove_s: float = 1.0,
        share_reads: bool = True,
    ) -> None:
        self.duration = duration
        self.ops = ops if duration is None else None
        self.put_ratio = put_ratio
        self.live_budget = live_budget
        self.mix = mix
        self.max_value = max_value
        self.think_s = think_s
        self.verify = verify
        self.retry_remove_s = retry_remove_s
        self.share_reads = share_reads
        self._layout = KVLayout()

    def run(self, ctx: WorkloadContext) -> dict[str, Any]:
        values = ValueMaker(ctx.seed)
        shared: deque[str] = deque(maxlen=256)
        lock = threading.Lock()
        t_end = time.monotonic() + self.duration if self.duration else None
        sizes = [min(self._layout.block_bytes(t, layer), self.max_value) for t, layer, _ in self.mix]
        weights = [w for _, _, w in self.mix]

        def worker(i: int) -> None:
            c = ctx.clients[i]
            rng = ctx.rng("kv", i)
            live: deque[tuple[str, int]] = deque()
            deferred: deque[tuple[float, str, int]] = deque()  # removes refused under a lease
            owned = 0  # bytes of live + deferred blocks: what this worker keeps in the store
            n = 0
            req = 0
            while not ctx.stop.is_set():
                if t_end is not None and time.monotonic() >= t_end:
                    break
                if self.ops is not None and n >= self.ops:
                    break
                now = time.monotonic()
                candidates = [k for k, _ in live] if not self.share_reads else _snapshot(shared, lock)
                if owned > self.live_budget and live:
                    old, sz = live.popleft()
                    with lock:
                        if old in shared:
                            shared.remove(old)
                    if c.remove(old, note="budget") == HAS_LEASE:
                        # a reader holds a lease: Mooncake refuses the remove; try again later
                        deferred.append((now + self.retry_remove_s, old, sz))
                    else:
                        owned -= sz
                elif deferred and deferred[0][0] <= now:
                    _, k, sz = deferred.popleft()
                    if c.remove(k, note="budget-retry") == HAS_LEASE:
                        deferred.append((now + self.retry_remove_s, k, sz))
                    else:
                        owned -= sz
                elif owned <= self.live_budget and (not candidates or rng.random() < self.put_ratio):
                    req += 1
                    size = rng.choices(sizes, weights)[0]
                    key = f"{ctx.variant}/w{i}/req{req}/blk{rng.randrange(1 << 20)}"
                    if c.put(key, values.value(key, size)) == 0:
                        live.append((key, size))
                        owned += size
                        with lock:
                            shared.append(key)
                elif candidates:
                    k = candidates[-1 - min(int(rng.expovariate(1 / 16)), len(candidates) - 1)]
                    c.get(k)
                else:  # over budget with nothing to read: wait for a lease to run out
                    time.sleep(min(0.05, max(0.0, deferred[0][0] - now)) if deferred else 0.01)
                    continue
                n += 1
                ctx.progress(1)
                if self.think_s:
                    time.sleep(self.think_s)
            if self.verify:
                for key, _ in list(live):
                    c.get(key, note="verify")
                    ctx.progress(1)

        _run_threads([lambda i=i: worker(i) for i in range(len(ctx.clients))])
        return {}


class ReadOnceWorkload(Workload):
    """See the module docstring."""

    name = "read-once-handoff"

    def __init__(
        self,
        *,
        requests: int = 24,
        blocks: tuple[int, int] = (2, 4),
        prefill: int = 2,
        decode: int = 2,
        block_tokens: tuple[int, ...] = (16, 64),
        layers_per_key: int = 8,
        reread_after: tuple[float, float] = (1.1, 2.0),
        prefill_gap_s: float = 0.05,
    ) -> None:
        self.requests = requests
        self.blocks = blocks
        self.prefill = prefill
        self.decode = decode
        self.block_tokens = block_tokens
        self.layers_per_key = layers_per_key
        self.reread_after = reread_after
        self.prefill_gap_s = prefill_gap_s
        self._layout = KVLayout()

    def run(self, ctx: WorkloadContext) -> dict[str, Any]:
        if len(ctx.clients) < self.prefill + self.decode:
            raise ValueError(
                f"read-once handoff needs {self.prefill + self.decode} clients, "
                f"the topology has {len(ctx.clients)}"
            )
        values = ValueMaker(ctx.seed)
        handoff: queue.Queue[list[str] | None] = queue.Queue()
        rereads: list[tuple[float, int, str]] = []
        cond = threading.Condition()
        state = {"prefill_done": 0, "pending_first": 0, "seq": 0}

        def prefill(i: int) -> None:
            c = ctx.clients[i]
            rng = ctx.rng("prefill", i)
            for r in range(i, self.requests, self.prefill):
                if ctx.stop.is_set():
                    break
                keys = []
                for b in range(rng.randint(*self.blocks)):
                    size = self._layout.block_bytes(rng.choice(self.block_tokens), self.layers_per_key)
                    key = f"{ctx.variant}/req{r}/blk{b}"
                    if c.put(key, values.value(key, size), note="prefill") == 0:
                        keys.append(key)
                    ctx.progress(1)
                if keys:
                    handoff.put(keys)
                time.sleep(rng.uniform(0, self.prefill_gap_s))
            with cond:
                state["prefill_done"] += 1
                if state["prefill_done"] == self.prefill:
                    for _ in range(self.decode):
                        handoff.put(None)
                cond.notify_all()

        def decode(i: int) -> None:
            c = ctx.clients[self.prefill + i]
            rng = ctx.rng("decode", i)
            handoff_open = True
            while True:
                with cond:
                    due = rereads and rereads[0][0] <= time.monotonic()
                    item = heapq.heappop(rereads) if due else None
                if item is not None:
                    c.get(item[2], note="reread")
                    ctx.progress(1)
                    continue
                if handoff_open:
                    try:
                        keys = handoff.get(timeout=0.02)
                    except queue.Empty:
                        continue
                    if keys is None:
                        handoff_open = False
                        continue
                    for key in keys:
                        c.get(key, note="first_read")
                        ctx.progress(1)
                        with cond:
                            state["seq"] += 1
                            heapq.heappush(
                                rereads,
                                (time.monotonic() + rng.uniform(*self.reread_after), state["seq"], key),
                            )
                    continue
                with cond:
                    if not rereads:
                        return
                    wait = rereads[0][0] - time.monotonic()
                if wait > 0:
                    time.sleep(min(wait, 0.05))

        _run_threads(
            [
                *(lambda i=i: prefill(i) for i in range(self.prefill)),
                *(lambda i=i: decode(i) for i in range(self.decode)),
            ]
        )
        return {}


@dataclass(frozen=True)
class SizePhase:
    """Put values drawn from ``sizes`` until ``failures`` NO_AVAILABLE_HANDLE answers or ``max_puts``."""

    name: str
    sizes: tuple[int, ...]
    max_puts: int = 2000
    failures: int = 1


class SizeMixWorkload(Workload):
    """See the module docstring: records, per phase, puts, −200 counts and the allocator at the
    first failure (utilisation = value bytes / capacity; free and largest free region)."""

    name = "size-mix-change"

    def __init__(self, phases: list[SizePhase], segment_target: str = "") -> None:
        self.phases = phases
        self.segment_target = segment_target

    def run(self, ctx: WorkloadContext) -> dict[str, Any]:
        c = ctx.clients[0]
        values = ValueMaker(ctx.seed)
        admin = ctx.admin()
        rng = ctx.rng("size-mix")
        out: dict[str, Any] = {}
        for ph in self.phases:
            puts = ok = fails = 0
            first: dict[str, Any] | None = None
            fail_free: list[dict[str, Any]] = []
            for n in range(ph.max_puts):
                if ctx.stop.is_set() or fails >= ph.failures:
                    break
                size = rng.choice(ph.sizes)
                key = f"{ctx.variant}/{ph.name}/{n}"
                rc = c.put(key, values.value(key, size), note=ph.name)
                puts += 1
                ctx.progress(1)
                if rc == 0:
                    ok += 1
                    continue
                if rc != NO_HANDLE:
                    continue
                fails += 1
                g = admin.inspect("gauges")
                segs = admin.inspect("segments")
                free = sum(s["allocator"]["free"] for s in segs)
                largest = max((s["allocator"]["largest_free_region"] for s in segs), default=0)
                snap = {
                    "size": size,
                    "utilisation": g["allocated_bytes"] / max(1, g["total_capacity_bytes"]),
                    "reserved_ratio": g["reserved_bytes"] / max(1, g["total_capacity_bytes"]),
                    "free_bytes": free,
                    "largest_free_region": largest,
                }
                fail_free.append(snap)
                if first is None:
                    first = snap
            out[ph.name] = {
                "puts": puts,
                "ok": ok,
                "no_handle": fails,
                "first_failure": first,
                "failures_with_room": sum(1 for f in fail_free if f["free_bytes"] >= f["size"]),
            }
        return {"phases": out}

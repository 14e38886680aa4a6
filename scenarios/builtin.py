"""The built-in scenarios. Each states what it reproduces, its plan (as data), and what must hold.

- ``tcp-smoke`` — no faults: vLLM-like traffic over TCP; every checker passes, no error at all.
- ``legacy-gc-read-once`` — Mooncake's legacy GC (``--enable_gc``) against a prefill→decode
  handoff: rereads 1–2 s after a key's first read miss, and the visibility checker names the
  vanished objects; the same workload with the GC off has no miss.
- ``fragmentation`` — the offset allocator against cachelib's slab allocator: fill a segment with
  1 MiB values, remove every other one by address, switch the size mix; −200 counts and
  utilisation at the first failure compared.
- ``holder-killed`` — SIGKILL a segment holder mid-run: documented errors, no wrong bytes, reads of
  its objects fail, and the master recovers once ``client_ttl`` expires the dead client.
- ``tcp-reset`` — a proxy resets the data connections between clients and the holder; the
  transfer engine retries on new connections, nothing wrong is read.
"""

from __future__ import annotations

import json
from typing import Any

from fault.plan import FaultPlan, load_plan
from scenarios.scenario import Expectation, Outcome, Scenario, Variant, Verdict, all_pass
from scenarios.topology import TopologySpec
from scenarios.workloads import KVCacheWorkload, ReadOnceWorkload, SizeMixWorkload, SizePhase
from store.errors import ErrorCode as E
from store.units import KiB, MiB

NO_PLAN = FaultPlan()
# KV workloads remove their oldest blocks; Mooncake refuses a remove while a read lease (10 s by
# default) is live, so the KV scenarios run with 1-s leases to keep memory bounded.
KV_MASTER_FLAGS = ["--default_kv_lease_ttl=1000"]


# ===================================================================================== tcp-smoke


def _smoke(quick: bool, transport: str, device: str) -> list[Variant]:
    topo = TopologySpec(
        holders=2,
        segment_size="64mb",
        clients=3 if quick else 4,
        transport=transport,
        device=device,
        master_flags=list(KV_MASTER_FLAGS),
    )
    wl = KVCacheWorkload(ops=60 if quick else 150, put_ratio=0.5, live_budget=12 * MiB, share_reads=False)
    return [
        Variant(
            "baseline",
            "two holders, vLLM-like put/get of KV blocks, no fault",
            topo,
            wl,
            NO_PLAN,
            allowed_codes=frozenset({int(E.OBJECT_HAS_LEASE)}),
        )
    ]


def _no_errors(o: Outcome) -> Verdict:
    v = o["baseline"]
    ops = v.ops()
    if len(ops) == 0:
        return False, "no operation ran"
    data = ops[ops["op"].isin(["put", "get"])]
    bad = data[data["result_code"] != 0]
    removes = v.ops("remove")
    refused = removes[removes["result_code"] != 0]
    odd = refused[refused["result_code"] != int(E.OBJECT_HAS_LEASE)]
    verify = v.ops("get", "verify")
    if not bad.empty:
        r = bad.iloc[0]
        return (
            False,
            f"{len(bad)} of {len(data)} puts/gets failed, e.g. {r['op']} {r['key']} → {r['result_code']}",
        )
    if not odd.empty:
        return False, f"{len(odd)} removes failed with codes other than OBJECT_HAS_LEASE"
    return True, (
        f"{len(data)} puts/gets, none failed ({len(verify)} verify reads hit); {len(refused)} of "
        f"{len(removes)} removes refused with OBJECT_HAS_LEASE while a reader's lease was live"
    )


TCP_SMOKE = Scenario(
    "tcp-smoke",
    "TCP smoke: no faults",
    "Two segment holders and in-process pure clients (every byte over loopback TCP) run vLLM-like "
    "KV-block traffic. Nothing is injected: this is the control every other scenario is read "
    "against.",
    _smoke,
    [
        all_pass(),
        Expectation(
            "no errors",
            "every put and get succeeds; a remove is refused only while a read "
            "lease is live (OBJECT_HAS_LEASE, Mooncake's rule)",
            _no_errors,
        ),
    ],
)


# ===================================================================================== legacy GC


GC_PLAN = load_plan(
    {"faults": [{"fault": "gc.legacy", "target": "master", "when": "start", "params": {"delay_ms": 1000}}]}
)


def _gc(quick: bool, transport: str, device: str) -> list[Variant]:
    topo = TopologySpec(holders=1, segment_size="64mb", clients=4, transport=transport, device=device)
    wl = ReadOnceWorkload(
        requests=12 if quick else 24, blocks=(2, 3) if quick else (2, 4), reread_after=(1.1, 2.0)
    )
    return [
        Variant(
            "gc_on",
            "master with --enable_gc (Mooncake ≤ v0.3.5): every read schedules a Remove 1 s later",
            topo,
            wl,
            GC_PLAN,
            allowed_codes=frozenset({int(E.OBJECT_NOT_FOUND)}),
            recovery_ops=(),
        ),
        Variant(
            "gc_off",
            "the same workload, GC off (Mooncake's default since PR #167)",
            topo,
            wl,
            NO_PLAN,
            allowed_codes=frozenset(),
            recovery_ops=(),
        ),
    ]


def _first_reads_hit(o: Outcome) -> Verdict:
    parts, ok = [], True
    for name in ("gc_on", "gc_off"):
        first = o[name].ops("get", "first_read")
        miss = int((first["result_code"] != 0).sum())
        ok &= miss == 0 and len(first) > 0
        parts.append(f"{name}: {len(first) - miss}/{len(first)} first reads hit")
    return ok, "; ".join(parts)


def _gc_rereads_vanish(o: Outcome) -> Verdict:
    v = o["gc_on"]
    rereads = v.ops("get", "reread")
    missed = rereads[rereads["result_code"] == int(E.OBJECT_NOT_FOUND)]
    vis = v.check("visibility").metrics
    by_gc = vis.get("misses_explained", {}).get("gc_remove", 0)
    if rereads.empty:
        return False, "no reread ran"
    frac = len(missed) / len(rereads)
    ok = frac >= 0.9 and by_gc == len(missed) and vis.get("lost", 1) == 0
    return ok, (
        f"{len(missed)}/{len(rereads)} rereads 1.1–2 s after the first read missed ({frac:.0%}); "
        f"{by_gc} misses explained by the master's gc_remove of the key; "
        f"vanished objects e.g. {', '.join(vis.get('vanished_keys', [])[:3])}"
    )


def _gc_off_no_miss(o: Outcome) -> Verdict:
    v = o["gc_off"]
    gets = v.ops("get")
    miss = gets[gets["result_code"] != 0]
    return miss.empty and len(gets) > 0, f"{len(miss)} of {len(gets)} reads missed with the GC off"


LEGACY_GC = Scenario(
    "legacy-gc-read-once",
    "Legacy 1-s GC vs read-once handoff",
    "Prefill workers put a request's KV blocks and hand the keys to decode workers, which read each "
    "block once and again 1.1–2 s later (another decode instance, a retry, a prefix-cache hit). With "
    "Mooncake's legacy GC (--enable_gc, v0.3.0–v0.3.5) the first read schedules a Remove one second "
    "later, so the second read misses: the objects vanish while they are still wanted. The visibility "
    "checker explains every such miss by the master's gc_remove event and lists the vanished keys; the "
    "same workload with the GC off must not miss at all.",
    _gc,
    [
        all_pass(),
        Expectation(
            "first reads hit", "in both variants, the first read of every block hits", _first_reads_hit
        ),
        Expectation(
            "GC removes read-once objects",
            "gc_on: ≥ 90% of rereads miss, each explained by gc_remove (the reproduced failure)",
            _gc_rereads_vanish,
        ),
        Expectation("no miss without GC", "gc_off: no read misses", _gc_off_no_miss),
    ],
)


# ===================================================================================== fragmentation


FRAG_PLAN = load_plan(
    {
        "faults": [
            {"fault": "memory.fill", "target": "holder:0", "when": "setup", "params": {"sizes": "1mb"}},
            {"fault": "memory.fragment", "target": "holder:0", "when": "setup", "params": {"keep": "even"}},
        ]
    }
)
SMALL = (64 * KiB, 96 * KiB, 128 * KiB)
LARGE = (2 * MiB, 3 * MiB, 4 * MiB)


def _frag(quick: bool, transport: str, device: str) -> list[Variant]:
    variants = []
    for alloc, what in (
        ("offset", "Mooncake's default offset allocator (sebbbi-style, coalescing)"),
        ("cachelib", "cachelib slab allocator (Mooncake ≤ v0.3.x option): slabs never change class"),
    ):
        topo = TopologySpec(
            holders=1,
            segment_size="64mb",
            clients=1,
            transport=transport,
            device=device,
            master_flags=[
                f"--memory_allocator={alloc}",
                "--allocation_strategy=random",
                "--eviction_high_watermark_ratio=1.0",
                "--eviction_ratio=0",
            ],
        )
        wl = SizeMixWorkload(
            [
                SizePhase("large", LARGE, max_puts=12 if quick else 24, failures=6),
                SizePhase("small", SMALL, max_puts=1500, failures=1),
            ]
        )
        variants.append(
            Variant(
                alloc,
                f"{what}; eviction off so failures are the allocator's",
                topo,
                wl,
                FRAG_PLAN,
                allowed_codes=frozenset({int(E.NO_AVAILABLE_HANDLE)}),
                recovery_ops=(),
            )
        )
    return variants


def _phase(o: Outcome, variant: str, phase: str) -> dict[str, Any]:
    return o[variant].workload["phases"][phase]


def _fill_fragment_fired(o: Outcome) -> Verdict:
    parts, ok = [], True
    for name in ("offset", "cachelib"):
        rows = {r["fault"]: r for r in o[name].fault_rows()}
        fill, frag = (
            rows.get("memory.fill", {}).get("detail", {}),
            rows.get("memory.fragment", {}).get("detail", {}),
        )
        ok &= fill.get("puts", 0) > 0 and frag.get("removed", 0) >= max(1, fill.get("puts", 0) // 2 - 1)
        parts.append(
            f"{name}: filled {fill.get('puts', 0)} × 1 MiB ({fill.get('stop', '?')}), removed "
            f"{frag.get('removed', 0)} in address order, free after {frag.get('free', 0) / MiB:.1f} MiB, "
            f"largest hole {frag.get('largest_free_region', 0) / MiB:.2f} MiB"
        )
    return ok, "; ".join(parts)


def _large_fail_with_room(o: Outcome) -> Verdict:
    parts, ok = [], True
    for name in ("offset", "cachelib"):
        ph = _phase(o, name, "large")
        ok &= ph["no_handle"] > 0 and ph["failures_with_room"] > 0
        ff = ph.get("first_failure") or {}
        parts.append(
            f"{name}: {ph['no_handle']} of {ph['puts']} large puts → −200, {ph['failures_with_room']} "
            f"while ≥ the value's size was free (first: {ff.get('size', 0) / MiB:.0f} MiB asked, "
            f"{ff.get('free_bytes', 0) / MiB:.1f} MiB free, largest region "
            f"{ff.get('largest_free_region', 0) / MiB:.2f} MiB)"
        )
    return ok, "; ".join(parts)


def _calcification(o: Outcome) -> Verdict:
    off = (_phase(o, "offset", "small").get("first_failure") or {}).get("utilisation")
    cl = (_phase(o, "cachelib", "small").get("first_failure") or {}).get("utilisation")
    if off is None or cl is None:
        return False, f"small puts never failed (offset util {off}, cachelib util {cl})"
    ok = off >= 0.85 and cl <= 0.75 and off - cl >= 0.2
    return ok, (
        f"utilisation at the first −200 of the small-value phase: offset {off:.2f}, cachelib {cl:.2f} "
        f"(cachelib's freed 1 MiB chunks stay in their class: its small classes get no slab)"
    )


FRAGMENTATION = Scenario(
    "fragmentation",
    "Fragmentation after a size-mix change: offset vs cachelib",
    "One 64 MiB segment is filled with 1 MiB values (memory.fill), every other object is removed in "
    "address order (memory.fragment: half the segment free, in 1 MiB holes), then the size mix changes: "
    "first 2–4 MiB values, which fail on both allocators with NO_AVAILABLE_HANDLE (−200) although the "
    "master reports half the segment free, then 64–128 KiB values until the first −200: the offset "
    "allocator reuses the holes, the slab allocator cannot (calcification). Eviction is off so every −200 "
    "is the allocator's.",
    _frag,
    [
        all_pass(),
        Expectation(
            "faults acted",
            "memory.fill filled the segment and memory.fragment removed every other object",
            _fill_fragment_fired,
        ),
        Expectation(
            "−200 with free space",
            "in both variants large puts fail with −200 while the reported free bytes exceed the request",
            _large_fail_with_room,
        ),
        Expectation(
            "calcification",
            "small-value phase: utilisation at the first −200 ≥ 0.85 for offset, "
            "≤ 0.75 for cachelib, and at least 0.2 apart",
            _calcification,
        ),
    ],
)


# ===================================================================================== holder-killed


CLIENT_TTL = 2.0
KILL_AT = 1.5
HOLDER_PLAN = load_plan(
    {"faults": [{"fault": "process.kill", "target": "holder:0", "when": {"at": KILL_AT}}]}
)
HOLDER_CODES = frozenset(
    int(c)
    for c in (
        E.TRANSFER_FAIL,
        E.OBJECT_NOT_FOUND,
        E.NO_AVAILABLE_HANDLE,
        E.OBJECT_HAS_LEASE,
        E.SEGMENT_NOT_FOUND,
        E.LEASE_EXPIRED,
        E.RPC_TIMEOUT,
    )
)
# what a dead holder causes; NO_AVAILABLE_HANDLE afterwards is the smaller store filling up
HOLDER_FAULT_CODES = frozenset(int(c) for c in (E.TRANSFER_FAIL, E.SEGMENT_NOT_FOUND, E.RPC_TIMEOUT))


def _holder(quick: bool, transport: str, device: str) -> list[Variant]:
    topo = TopologySpec(
        holders=2,
        segment_size="64mb",
        clients=3,
        transport=transport,
        device=device,
        master_flags=[*KV_MASTER_FLAGS, f"--client_ttl={CLIENT_TTL:g}"],
        transfer_timeout_s=5.0,
        slice_timeout_s=2.0,
    )
    wl = KVCacheWorkload(
        duration=5.0 if quick else 7.0, ops=None, put_ratio=0.5, live_budget=8 * MiB, think_s=0.01
    )
    return [
        Variant(
            "kill",
            f"SIGKILL holder:0 at t={KILL_AT}s; master --client_ttl={CLIENT_TTL:g}",
            topo,
            wl,
            HOLDER_PLAN,
            allowed_codes=HOLDER_CODES,
            recovery_codes=HOLDER_FAULT_CODES,
        )
    ]


def _kill_info(o: Outcome) -> dict[str, Any]:
    rows = [r for r in o["kill"].fault_rows() if r["fault"] == "process.kill"]
    if not rows or rows[0]["code"] != 0:
        raise AssertionError(f"the kill did not happen: {rows}")
    return {**rows[0]["detail"], "t": rows[0]["t"]}


def _failures_after_kill(o: Outcome) -> Verdict:
    k = _kill_info(o)
    ops = o["kill"].ops()
    after = ops[ops["time_start"] >= k["t"]]
    failed = after[after["result_code"] != 0]
    codes = failed["result_code"].value_counts().to_dict()
    names = {E(c).name: n for c, n in codes.items()}
    return len(failed) > 0, f"{len(failed)} of {len(after)} operations after the kill failed: {names}"


def _dead_reads_fail(o: Outcome) -> Verdict:
    k = _kill_info(o)
    v = o["kill"]
    puts = v.ops("put")
    on_dead = set(puts[(puts["result_code"] == 0) & (puts["replica"] == k["segment_name"])]["key"])
    gets = v.ops("get")
    after = gets[(gets["time_start"] > k["t"] + 0.05) & (gets["key"].isin(on_dead))]
    served = after[after["result_code"] == 0]
    failed = after[after["result_code"] != 0]
    if after.empty:
        return False, "no read of an object stored on the killed holder happened after the kill"
    codes = {E(c).name: n for c, n in failed["result_code"].value_counts().to_dict().items()}
    return served.empty, (
        f"{len(after)} reads of objects on the killed holder after the kill: "
        f"{len(failed)} failed {codes}, {len(served)} returned bytes"
    )


def _expired(o: Outcome) -> Verdict:
    k = _kill_info(o)
    ev = o["kill"].events("client_expire")
    mine = [r for _, r in ev.iterrows() if json.loads(r["detail"] or "{}").get("client_id") == k["client_id"]]
    if not mine:
        return False, f"the master never expired client {k['client_id']}"
    dt = float(mine[0]["time_start"]) - k["t"]
    bound = CLIENT_TTL + 3.0
    return dt <= bound, (
        f"the master expired the killed holder's client {dt:.2f}s after the kill "
        f"(client_ttl {CLIENT_TTL:g}s; bound {bound:g}s) and unmounted its segment"
    )


def _puts_recover(o: Outcome) -> Verdict:
    rec = o["kill"].check("recovery").metrics.get("faults", [])
    if not rec:
        return False, "no recovery figure"
    r = rec[0]
    bound = CLIENT_TTL + 3.0
    if not r["recovered"]:
        return False, f"puts never recovered after the kill ({r['failures']} failures)"
    return r["recovery_s"] <= bound, (
        f"puts recovered {r['recovery_s']:.2f}s after the kill "
        f"({r['failures']} failed puts; bound client_ttl + 3 s = {bound:g}s)"
    )


HOLDER_KILLED = Scenario(
    "holder-killed",
    "A segment holder is SIGKILLed mid-run",
    "Two holders serve three clients doing vLLM-like traffic; holder:0 is SIGKILLed at t=1.5 s. Until the "
    "master notices (client_ttl = 2 s without a ping), puts placed on the dead segment and reads of its "
    "objects fail with TRANSFER_FAIL; then the master unmounts the segment, its objects are lost (reads "
    "answer OBJECT_NOT_FOUND) and puts go to the surviving holder. No read may ever return wrong bytes.",
    _holder,
    [
        all_pass(),
        Expectation(
            "the kill bites",
            "operations fail after the kill, with documented codes only",
            _failures_after_kill,
        ),
        Expectation(
            "dead objects unreadable",
            "after the kill no read of an object stored on the killed holder returns bytes",
            _dead_reads_fail,
        ),
        Expectation(
            "master expires the holder",
            "the master expires the dead client within client_ttl + 3 s",
            _expired,
        ),
        Expectation("puts recover", "puts succeed again within client_ttl + 3 s of the kill", _puts_recover),
    ],
)


# ===================================================================================== tcp-reset


RESET_PLAN = load_plan(
    {
        "faults": [
            {
                "fault": "network.reset",
                "target": "proxy:transfer",
                "when": {"at": 1.0},
                "params": {"duration": 2.0, "after_bytes": "256kb", "probability": 0.5},
            }
        ]
    }
)


# TRANSFER_FAIL if a slice runs out of retries; the rest is the KV workload's own life (a remove
# refused under a lease, a remove or read of a block the master evicted, a put while it evicts)
RESET_CODES = frozenset(
    int(c) for c in (E.TRANSFER_FAIL, E.OBJECT_HAS_LEASE, E.OBJECT_NOT_FOUND, E.NO_AVAILABLE_HANDLE)
)


def _reset(quick: bool, transport: str, device: str) -> list[Variant]:
    topo = TopologySpec(
        holders=1,
        segment_size="64mb",
        clients=3,
        transport="tcp",
        proxy_transfer=True,
        transfer_timeout_s=10.0,
        slice_timeout_s=3.0,
        master_flags=list(KV_MASTER_FLAGS),
    )
    wl = KVCacheWorkload(
        duration=4.0 if quick else 6.0,
        ops=None,
        put_ratio=0.5,
        live_budget=6 * MiB,
        think_s=0.005,
        share_reads=False,
    )
    return [
        Variant(
            "reset",
            "data connections through a proxy; for 2 s half of them are reset after 256 KiB",
            topo,
            wl,
            RESET_PLAN,
            allowed_codes=RESET_CODES,
            recovery_codes=frozenset({int(E.TRANSFER_FAIL)}),
        )
    ]


def _resets_happened(o: Outcome) -> Verdict:
    v = o["reset"]
    proxy = v.stats.get("proxies", {}).get("transfer-0", {})
    retries = int(v.ops()["retries"].sum())
    engine_retries = sum(
        int(c.get("engine", {}).get("retries", 0)) for c in v.stats.get("clients", {}).values()
    )
    resets = int(proxy.get("resets", 0))
    ok = resets > 0 and max(retries, engine_retries) > 0
    return ok, (
        f"the proxy reset {resets} connection(s) carrying {proxy.get('bytes_up', 0) / MiB:.0f} MiB up / "
        f"{proxy.get('bytes_down', 0) / MiB:.0f} MiB down; operations took {retries} slice retries "
        f"(engines counted {engine_retries})"
    )


def _mostly_served(o: Outcome) -> Verdict:
    ops = o["reset"].ops()
    data = ops[ops["op"].isin(["put", "get"])]
    ok = int((data["result_code"] == 0).sum())
    xfer = int((data["result_code"] == int(E.TRANSFER_FAIL)).sum())
    frac = ok / max(1, len(data))
    return frac >= 0.95 and len(data) > 0, (
        f"{ok}/{len(data)} puts and gets succeeded ({frac:.1%}; need ≥ 95%); {xfer} ended in TRANSFER_FAIL"
    )


TCP_RESET = Scenario(
    "tcp-reset",
    "TCP connection resets on the data path",
    "Clients reach the master through a proxy that routes their data connections through a second proxy "
    "in front of the holder's transfer endpoint. From t=1 s for 2 s, each connection is picked with "
    "probability 0.5 and reset (TCP RST) after carrying 256 KiB more. The transfer engine must retry the "
    "failed slices on new connections; reads never return wrong bytes; errors, if any, are TRANSFER_FAIL.",
    _reset,
    [
        all_pass(),
        Expectation(
            "resets happen and are retried",
            "the proxy resets connections and the engine retries slices",
            _resets_happened,
        ),
        Expectation("service continues", "≥ 95% of puts and gets succeed", _mostly_served),
    ],
    transports=("tcp",),
)


SCENARIOS: dict[str, Scenario] = {
    s.name: s for s in (TCP_SMOKE, LEGACY_GC, FRAGMENTATION, HOLDER_KILLED, TCP_RESET)
}

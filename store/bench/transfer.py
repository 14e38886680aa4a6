"""``umbra bench transfer``: TCP transport throughput vs a plain socket, and a slice soak.

Two processes: this one runs a :class:`~store.transfer.engine.TransferEngine` with a registered
local buffer; a child (:mod:`store.transfer.peer`) holds the target segment and also serves a
plain-socket baseline (``sendall`` / ``recv_into`` of the same message sizes between the same two
processes, no framing). For each request size (64 KiB, 1 MiB, 16 MiB) and direction the engine's
MB/s is printed next to the socket's and as ``ratio_to_socket``; the target is ≥ 0.6 at 16 MiB.

The soak pushes a million slices through the engine over TCP (small slices, so it is the
bookkeeping that is exercised, not the bandwidth) in batches that are allocated, waited and
freed, and prints the process RSS before and after and the number of live ``Slice`` objects left
(expected 0; Mooncake's per-thread slice cache grew and leaked over several releases).
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import socket
import statistics
import time
from typing import Any

from store.transfer.engine import Opcode, TransferEngine, TransferRequest
from store.transfer.memory import MemoryRegion
from store.transfer.peer import PLAIN_HEADER, PeerProcess
from store.transfer.transport import Slice, TransferStatus
from store.units import KiB, MiB

SIZES = (64 * KiB, 1 * MiB, 16 * MiB)
REGION = 256 * MiB


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def live_slices() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o) is Slice)


def engine_mbps(engine: TransferEngine, seg: str, local: int, remote: int, op: Opcode, size: int,
                total: int, window: int = 32 * MiB, depth: int = 2) -> float:
    """Move ``total`` bytes in requests of ``size`` with up to ``depth`` batches of ``window`` bytes
    outstanding (a client keeps the pipe full this way); MB/s = 1e6 bytes/s."""
    per_batch = max(1, window // size)
    n_req = max(1, total // size)
    span = REGION - size
    outstanding: collections.deque[Any] = collections.deque()
    issued = 0
    t0 = time.perf_counter()
    while issued < n_req or outstanding:
        while issued < n_req and len(outstanding) < depth:
            k = min(per_batch, n_req - issued)
            batch = engine.allocate_batch(k)
            reqs = []
            for i in range(issued, issued + k):
                off = (i * size) % (span + 1)
                reqs.append(TransferRequest(op, local + off, seg, remote + off, size))
            engine.submit(batch, reqs)
            outstanding.append(batch)
            issued += k
        batch = outstanding.popleft()
        res = engine.wait(batch, 120)
        engine.free_batch(batch)
        bad = [r for r in res if r.status is not TransferStatus.COMPLETED]
        if bad:
            raise RuntimeError(f"{op.name} {size} B: {len(bad)} request(s) failed: {bad[0]}")
    dt = time.perf_counter() - t0
    return n_req * size / dt / 1e6


def socket_mbps(host: str, port: int, local: MemoryRegion, op: Opcode, size: int, total: int) -> float:
    n = max(1, total // size)
    total = n * size
    view = local.view()
    try:
        with socket.create_connection((host, port)) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            t0 = time.perf_counter()
            sock.sendall(PLAIN_HEADER.pack(ord("W") if op is Opcode.WRITE else ord("R"), total, size))
            span = len(view) - size + 1
            for i in range(n):
                base = (i * size) % span
                if op is Opcode.WRITE:
                    sock.sendall(view[base:base + size])
                else:
                    piece = view[base:base + size]
                    got = 0
                    while got < size:
                        r = sock.recv_into(piece[got:])
                        if r == 0:
                            raise ConnectionError("plain-socket peer closed early")
                        got += r
            if op is Opcode.WRITE and sock.recv(1) != b"k":
                raise ConnectionError("plain-socket peer did not acknowledge")
            dt = time.perf_counter() - t0
    finally:
        view.release()
    return total / dt / 1e6


def run_throughput(args: argparse.Namespace) -> list[dict[str, Any]]:
    peer = PeerProcess(segment_size=REGION, plain_socket=True)
    info = peer.info
    rows: list[dict[str, Any]] = []
    region = MemoryRegion(REGION, populate=True)
    options = {"tcp": {"connections_per_peer": args.connections, "max_frame_bytes": args.frame_bytes}}
    engine = TransferEngine("127.0.0.1", "tcp", transport_options=options)
    try:
        engine.register_memory(region.addr, region.length)
        seg = engine.open_segment(info["endpoint"]).name
        host = info["endpoint"].rpartition(":")[0]
        remote = int(info["addr"])
        # warm both paths (connections, page faults on both sides)
        engine_mbps(engine, seg, region.addr, remote, Opcode.WRITE, 16 * MiB, REGION)
        socket_mbps(host, info["plain_port"], region, Opcode.WRITE, 16 * MiB, REGION)
        for size in args.sizes:
            total = max(size, args.total_mb * MiB)
            for op in (Opcode.WRITE, Opcode.READ):
                te, so = [], []
                for _ in range(args.repeat):
                    te.append(engine_mbps(engine, seg, region.addr, remote, op, size, total))
                    so.append(socket_mbps(host, info["plain_port"], region, op, size, total))
                row = {"op": op.name, "size": size, "engine_MBps": round(statistics.median(te), 1),
                       "socket_MBps": round(statistics.median(so), 1)}
                row["ratio_to_socket"] = round(row["engine_MBps"] / row["socket_MBps"], 3)
                rows.append(row)
                if not args.json:
                    print(f"  {op.name:<5} {size // KiB:>6} KiB  engine {row['engine_MBps']:>8.1f} MB/s  "
                          f"socket {row['socket_MBps']:>8.1f} MB/s  "
                          f"ratio_to_socket {row['ratio_to_socket']:.3f}", flush=True)
    finally:
        engine.close()
        region.close()
        peer.close()
    return rows


def run_soak(args: argparse.Namespace) -> dict[str, Any]:
    peer = PeerProcess(segment_size=64 * MiB)
    info = peer.info
    region = MemoryRegion(64 * MiB, populate=True)
    engine = TransferEngine("127.0.0.1", "tcp", slice_size=args.soak_slice,
                            fragment_limit=args.soak_slice // 4)
    try:
        engine.register_memory(region.addr, region.length)
        seg = engine.open_segment(info["endpoint"]).name
        remote = int(info["addr"])
        req_size = args.soak_slice * 32  # 32 slices per request
        per_batch = 128  # 4096 slices per batch, like Mooncake's slice-cache ring
        slices_per_batch = per_batch * 32
        span = 64 * MiB - req_size

        def one_batch(k: int) -> None:
            batch = engine.allocate_batch(per_batch)
            op = Opcode.WRITE if k % 2 == 0 else Opcode.READ
            offs = [((k * per_batch + i) * req_size) % span for i in range(per_batch)]
            engine.submit(batch, [TransferRequest(op, region.addr + o, seg, remote + o, req_size)
                                  for o in offs])
            res = engine.wait(batch, 120)
            engine.free_batch(batch)
            if any(r.status is not TransferStatus.COMPLETED for r in res):
                raise RuntimeError(f"soak batch {k} failed: {[r for r in res if not r.ok][:1]}")

        warm = 5
        for k in range(warm):
            one_batch(k)
        gc.collect()
        rss_before = rss_bytes()
        n_batches = max(1, args.soak_slices // slices_per_batch)
        t0 = time.perf_counter()
        for k in range(warm, warm + n_batches):
            one_batch(k)
        dt = time.perf_counter() - t0
        gc.collect()
        rss_after = rss_bytes()
        stats = engine.stats()
        out = {"slices": n_batches * slices_per_batch, "slice_size": args.soak_slice, "seconds": round(dt, 2),
               "slices_per_s": round(n_batches * slices_per_batch / dt),
               "rss_before_MB": round(rss_before / MiB, 1), "rss_after_MB": round(rss_after / MiB, 1),
               "rss_growth_MB": round((rss_after - rss_before) / MiB, 1),
               "live_slice_objects": live_slices(), "slices_in_flight": stats["slices_in_flight"],
               "live_batches": stats["batches"]}
    finally:
        engine.close()
        region.close()
        peer.close()
    return out


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="umbra bench transfer", description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    ap.add_argument("--quick", action="store_true", help="smaller totals, one repeat, 100k-slice soak")
    ap.add_argument("--total-mb", type=int, default=256, help="bytes moved per measurement (MiB)")
    ap.add_argument("--repeat", type=int, default=3, help="measurements per point (median reported)")
    ap.add_argument("--sizes", type=int, nargs="*", default=list(SIZES))
    ap.add_argument("--connections", type=int, default=2, help="TCP connections per peer")
    ap.add_argument("--frame-bytes", type=int, default=4 * MiB, help="largest TCP frame")
    ap.add_argument("--soak-slices", type=int, default=1_000_000)
    ap.add_argument("--soak-slice", type=int, default=1024, help="slice size used by the soak")
    ap.add_argument("--no-soak", action="store_true")
    ap.add_argument("--no-throughput", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.total_mb, args.repeat = min(args.total_mb, 64), 1
        args.soak_slices = min(args.soak_slices, 100_000)
    report: dict[str, Any] = {"benchmark": "transfer", "transport": "tcp", "processes": 2,
                              "connections_per_peer": args.connections, "max_frame_bytes": args.frame_bytes}
    if not args.json:
        print(f"transfer engine over TCP loopback between two processes vs a plain socket "
              f"({args.total_mb} MiB per point, median of {args.repeat})")
    if not args.no_throughput:
        report["throughput"] = run_throughput(args)
        big = [r for r in report["throughput"] if r["size"] == 16 * MiB]
        if big:
            report["target_16MiB_ratio"] = 0.6
            report["min_ratio_16MiB"] = min(r["ratio_to_socket"] for r in big)
    if not args.no_soak:
        if not args.json:
            print(f"slice soak: {args.soak_slices} slices of {args.soak_slice} B over TCP ...", flush=True)
        soak = report["soak"] = run_soak(args)
        if not args.json:
            print(f"  {soak['slices']} slices in {soak['seconds']} s ({soak['slices_per_s']} slices/s)  "
                  f"RSS before {soak['rss_before_MB']} MB  after {soak['rss_after_MB']} MB  "
                  f"(growth {soak['rss_growth_MB']} MB)  live Slice objects {soak['live_slice_objects']}  "
                  f"in flight {soak['slices_in_flight']}")
    if args.json:
        print(json.dumps(report, indent=2))
    elif "min_ratio_16MiB" in report:
        print(f"16 MiB ratio_to_socket (min of WRITE/READ): {report['min_ratio_16MiB']:.3f} (target >= 0.6)")
    return 0

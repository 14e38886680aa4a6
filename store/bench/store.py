"""``umbra bench store``: client put/get over TCP loopback across processes vs a plain socket.

Processes: this one runs the master (in a thread) and the plain-socket baseline; a *holder*
(:mod:`store.client.holder`) contributes the only segment; a *writer* and a *reader* (this module
with ``--worker``) are pure clients (``global_segment_size=0``), so every byte of every put and get
crosses a real TCP connection to the holder, as in Mooncake's two-process measurement.

For each value size (4 KiB, 64 KiB, 1 MiB, 16 MiB) the writer puts ``count`` keys one after the
other, then the reader gets them all back and compares every value with what was written (outside
the timed calls). Reported: ``put_MBps`` / ``get_MBps`` (bytes / summed time of the sequential
calls), ``put_p50_us`` / ``get_p50_us`` (and p99), then ``socket_MBps``: ``sendall``/``recv_into``
of the same message sizes between this process and a peer process (:mod:`store.transfer.peer`),
measured in the same run just before the size's round, and ``ratio_to_socket`` for 1 MiB and
16 MiB. Targets: ≥ 0.6 of the socket at 16 MiB; 4 KiB p50 under 300 µs. The real Mooncake's
figures on this kind of machine (``research/mooncake-measured.md`` §1, two processes) are printed
beside them; compare ratios, not absolute figures, because the machine's load moves both.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

import numpy as np

from store.units import KiB, MiB

SIZES = (4 * KiB, 64 * KiB, 1 * MiB, 16 * MiB)
COUNTS = {4 * KiB: 2000, 64 * KiB: 1000, 1 * MiB: 256, 16 * MiB: 24}
QUICK_COUNTS = {4 * KiB: 400, 64 * KiB: 200, 1 * MiB: 48, 16 * MiB: 12}
VALUES_PER_SIZE = 4  # distinct values cycled over the keys (key i holds value i % 4)
TARGET_RATIO_16MIB = 0.6
TARGET_P50_4KIB_US = 300.0

# Real Mooncake 0.3.13 (C++), two processes over TCP, this machine: research/mooncake-measured.md §1,
# runs A (busy), B (quiet), P (pinned to one core). MB/s and p50 µs per op.
MOONCAKE_TWO_PROCESS = {
    4 * KiB: {"put_MBps": (17, 9, 26), "get_MBps": (18, 18, 39), "put_p50_us": (114, 314, 112),
              "get_p50_us": (97, 200, 72)},
    64 * KiB: {"put_MBps": (168, 151, 347), "get_MBps": (252, 246, 382), "put_p50_us": (199, 348, 130),
               "get_p50_us": (139, 229, 123)},
    1 * MiB: {"put_MBps": (540, 770, 587), "get_MBps": (579, 939, 587), "put_p50_us": (1185, 1344, 1224),
              "get_p50_us": (1171, 1150, 1136)},
    16 * MiB: {"put_MBps": (751, 1168, 847), "get_MBps": (705, 1158, 698),
               "put_p50_us": (19922, 13938, 19537), "get_p50_us": (22700, 14183, 24601)},
}


def _label(size: int) -> str:
    return f"{size // MiB} MiB" if size >= MiB else f"{size // KiB} KiB"


def _values(size: int, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed + size)
    return [rng.bytes(size) for _ in range(VALUES_PER_SIZE)]


def _summary(lat_ns: list[int], nbytes: int, seconds: float, errors: int,
             extra: dict[str, Any]) -> dict[str, Any]:
    lat = sorted(lat_ns)
    n = len(lat)
    return {"count": n, "bytes": nbytes, "seconds": round(seconds, 4),
            "MBps": round(nbytes / seconds / 1e6, 1) if seconds > 0 else 0.0,
            "p50_us": round(lat[n // 2] / 1e3, 1) if n else 0.0,
            "p99_us": round(lat[min(n - 1, (n * 99) // 100)] / 1e3, 1) if n else 0.0,
            "errors": errors, **extra}


# --------------------------------------------------------------------------------------------
# worker process (writer / reader): one Client, driven by JSON lines on stdin


def worker_main(args: argparse.Namespace) -> int:
    from store.client import Client

    client = Client()
    rc = client.setup("127.0.0.1", "P2PHANDSHAKE", 0, args.local_buffer_size, "tcp", "", args.master)
    print(json.dumps({"ready": rc == 0, "code": rc, "pid": os.getpid()}), flush=True)
    if rc != 0:
        return 1
    cache: dict[int, list[bytes]] = {}
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        if op == "quit":
            break
        size, count, prefix = int(cmd.get("size", 0)), int(cmd.get("count", 0)), cmd.get("prefix", "k")
        if size and size not in cache:
            cache.clear()
            cache[size] = _values(size, int(cmd.get("seed", 0)))
        values = cache.get(size, [])
        lat: list[int] = []
        errors = 0
        codes: dict[str, int] = {}
        if op == "put":
            for i in range(count):
                s = time.perf_counter_ns()
                rc = client.put(f"{prefix}{i}", values[i % VALUES_PER_SIZE])
                lat.append(time.perf_counter_ns() - s)
                if rc != 0:
                    errors += 1
                    codes[str(rc)] = codes.get(str(rc), 0) + 1
            reply = _summary(lat, size * (count - errors), sum(lat) / 1e9, errors, {"codes": codes})
        elif op == "get":
            wrong = 0
            for i in range(count):
                s = time.perf_counter_ns()
                v = client.get(f"{prefix}{i}")
                lat.append(time.perf_counter_ns() - s)
                if v != values[i % VALUES_PER_SIZE]:  # checked outside the timed call
                    errors += 1
                    wrong += 1 if v else 0
                del v
            reply = _summary(lat, size * (count - errors), sum(lat) / 1e9, errors, {"wrong_bytes": wrong})
        elif op == "warm":
            ok = all(client.put(f"warm{i}", v) == 0 and client.get(f"warm{i}") == v
                     for i, v in enumerate([b"w" * 4096, np.random.default_rng(0).bytes(2 * MiB),
                                            np.random.default_rng(1).bytes(6 * MiB)]))
            for i in range(3):
                client.remove(f"warm{i}", force=True)
            reply = {"ok": ok}
        elif op == "stats":
            reply = client.stats()
        else:
            reply = {"error": f"unknown op {op!r}"}
        print(json.dumps(reply), flush=True)
    client.close()
    return 0


class Worker:
    """A writer or reader process and its JSON-lines pipe."""

    def __init__(self, master: str, local_buffer_size: int, name: str) -> None:
        self.name = name
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "store.bench.store", "--worker", "--master", master,
             "--local-buffer-size", str(local_buffer_size)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        hello = self._read(60.0)
        if not hello.get("ready"):
            self.close()
            raise RuntimeError(f"{name} worker failed to set up its client (code {hello.get('code')})")
        self.pid = int(hello["pid"])

    def _read(self, timeout: float) -> dict[str, Any]:
        out: list[str] = []
        t = threading.Thread(target=lambda: out.append(self.proc.stdout.readline()  # type: ignore[union-attr]
                                                       ), daemon=True)
        t.start()
        t.join(timeout)
        if not out or not out[0]:
            raise RuntimeError(f"{self.name} worker did not answer within {timeout}s "
                               f"(exit {self.proc.poll()})")
        return json.loads(out[0])

    def call(self, timeout: float = 600.0, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.close()
                self.proc.wait(15)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


# --------------------------------------------------------------------------------------------
# orchestration


def _socket_baseline(peer: Any, region: Any, size: int, total: int, repeat: int) -> tuple[float, float]:
    from store.bench.transfer import socket_mbps
    from store.transfer.engine import Opcode

    host = peer.endpoint.rpartition(":")[0]
    port = int(peer.info["plain_port"])
    w = [socket_mbps(host, port, region, Opcode.WRITE, size, total) for _ in range(repeat)]
    r = [socket_mbps(host, port, region, Opcode.READ, size, total) for _ in range(repeat)]
    return statistics.median(w), statistics.median(r)


def _anchor_text(size: int, key: str) -> str:
    vals = MOONCAKE_TWO_PROCESS[size][key]
    return f"{min(vals)}–{max(vals)}"


def run(args: argparse.Namespace) -> dict[str, Any]:
    from store.client.holder import HolderProcess
    from store.master.client import MasterClient
    from store.master.config import MasterConfig
    from store.master.server import MasterServer
    from store.transfer.memory import MemoryRegion
    from store.transfer.peer import PeerProcess

    counts = dict(QUICK_COUNTS if args.quick else COUNTS)
    if args.count:
        counts = {s: args.count for s in counts}
    sizes = [s for s in SIZES if not args.sizes or s in args.sizes]
    holder_size = max(64 * MiB, max(int(counts[s] * s * 1.25) for s in sizes))
    holder_size = (holder_size + MiB - 1) // MiB * MiB
    report: dict[str, Any] = {
        "benchmark": "store", "transport": "tcp", "seed": args.seed, "quick": args.quick,
        "load_avg_start": [round(x, 2) for x in os.getloadavg()],
        "holder_segment_bytes": holder_size, "local_buffer_bytes": args.local_buffer_size,
        "targets": {"ratio_to_socket_16MiB": TARGET_RATIO_16MIB, "put_p50_4KiB_us": TARGET_P50_4KIB_US,
                    "get_p50_4KiB_us": TARGET_P50_4KIB_US},
    }
    master = MasterServer(MasterConfig(rpc_port=0, metrics_port=0, enable_metric_reporting=False,
                                       seed=args.seed)).start()
    assert master.rpc_address is not None
    addr = f"{master.rpc_address[0]}:{master.rpc_address[1]}"
    holder = writer = reader = peer = None
    region = None
    rows: list[dict[str, Any]] = []
    try:
        # populated: puts land in resident pages, the steady state Mooncake's "put2" measured
        holder = HolderProcess(addr, segment_size=holder_size, local_buffer_size=16 * MiB, populate=True)
        writer = Worker(addr, args.local_buffer_size, "writer")
        reader = Worker(addr, args.local_buffer_size, "reader")
        peer = PeerProcess(segment_size=64 * MiB, plain_socket=True)
        region = MemoryRegion(64 * MiB, populate=True)
        report["processes"] = {"master+socket": os.getpid(), "holder": holder.pid, "writer": writer.pid,
                               "reader": reader.pid, "socket_peer": peer.pid}
        if not (writer.call(op="warm").get("ok") and reader.call(op="warm").get("ok")):
            raise RuntimeError("warm-up put/get did not read back what it wrote")
        _socket_baseline(peer, region, 16 * MiB, 64 * MiB, 1)  # warm the socket path too
        mc = MasterClient(addr)
        for size in sizes:
            count = counts[size]
            sock_total = max(size * 64, 64 * MiB) if size >= MiB else 16 * MiB
            sw, sr = _socket_baseline(peer, region, size, sock_total, args.socket_repeat)
            puts, gets = [], []
            for rep in range(args.repeat):
                prefix = f"s{size}r{rep}k"
                puts.append(writer.call(op="put", size=size, count=count, prefix=prefix, seed=args.seed))
                gets.append(reader.call(op="get", size=size, count=count, prefix=prefix, seed=args.seed))
                mc.remove_all(force=True)
            put = min(puts, key=lambda r: r["p50_us"]) if len(puts) == 1 else _median_row(puts)
            get = min(gets, key=lambda r: r["p50_us"]) if len(gets) == 1 else _median_row(gets)
            row: dict[str, Any] = {
                "size": size, "label": _label(size), "count": count,
                "put_MBps": put["MBps"], "get_MBps": get["MBps"], "put_p50_us": put["p50_us"],
                "get_p50_us": get["p50_us"], "put_p99_us": put["p99_us"], "get_p99_us": get["p99_us"],
                "put_errors": sum(p["errors"] for p in puts), "get_errors": sum(g["errors"] for g in gets),
                "socket_MBps": round((sw + sr) / 2, 1), "socket_write_MBps": round(sw, 1),
                "socket_read_MBps": round(sr, 1),
                "mooncake_two_process": {k: list(v) for k, v in MOONCAKE_TWO_PROCESS[size].items()},
            }
            if size >= MiB:
                row["ratio_to_socket"] = {"put": round(put["MBps"] / sw, 3),
                                          "get": round(get["MBps"] / sr, 3)}
            rows.append(row)
            if not args.json:
                _print_row(row)
        report["results"] = rows
        report["writer_counters"] = writer.call(op="stats")["counters"]
        report["reader_counters"] = reader.call(op="stats")["counters"]
        report["master_invariant_violations"] = mc.check_invariants()
        report["master_allocated_bytes_after"] = mc.inspect("gauges")["allocated_bytes"]
        mc.close()
    finally:
        for w in (writer, reader):
            if w is not None:
                w.close()
        if holder is not None:
            holder.close()
        if peer is not None:
            peer.close()
        if region is not None:
            region.close()
        master.stop()
    report["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    big = next((r for r in rows if r["size"] == 16 * MiB), None)
    small = next((r for r in rows if r["size"] == 4 * KiB), None)
    verdict: dict[str, Any] = {}
    if big is not None:
        worst = min(big["ratio_to_socket"].values())
        verdict["ratio_to_socket_16MiB_min"] = worst
        verdict["ratio_16MiB_ok"] = worst >= TARGET_RATIO_16MIB
    if small is not None:
        verdict["p50_4KiB_ok"] = max(small["put_p50_us"], small["get_p50_us"]) < TARGET_P50_4KIB_US
    verdict["errors"] = sum(r["put_errors"] + r["get_errors"] for r in rows)
    report["verdict"] = verdict
    return report


def _median_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {k: statistics.median(r[k] for r in rows) for k in ("MBps", "p50_us", "p99_us")} | {
        "errors": sum(r["errors"] for r in rows)}


def _print_row(row: dict[str, Any]) -> None:
    ratio = row.get("ratio_to_socket")
    rtext = f"  ratio put {ratio['put']:.2f} get {ratio['get']:.2f}" if ratio else ""
    print(f"  {row['label']:>7}: put {row['put_MBps']:8.1f} MB/s p50 {row['put_p50_us']:8.1f} µs | "
          f"get {row['get_MBps']:8.1f} MB/s p50 {row['get_p50_us']:8.1f} µs | "
          f"socket {row['socket_MBps']:7.1f} MB/s{rtext}", flush=True)


def print_table(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="umbra store over TCP loopback (holder / writer / reader processes) vs plain socket; "
                    "Mooncake = real C++ client, two processes, same machine (runs A/B/P)")
    for col in ("size", "put MB/s", "get MB/s", "put p50 µs", "get p50 µs", "socket MB/s", "ratio put/get",
                "Mooncake put MB/s", "Mooncake get MB/s", "Mooncake p50 put/get µs"):
        t.add_column(col, justify="right")
    for r in report["results"]:
        ratio = r.get("ratio_to_socket")
        size = r["size"]
        t.add_row(r["label"], f"{r['put_MBps']:.1f}", f"{r['get_MBps']:.1f}", f"{r['put_p50_us']:.0f}",
                  f"{r['get_p50_us']:.0f}", f"{r['socket_MBps']:.0f}",
                  f"{ratio['put']:.2f} / {ratio['get']:.2f}" if ratio else "-",
                  _anchor_text(size, "put_MBps"), _anchor_text(size, "get_MBps"),
                  f"{_anchor_text(size, 'put_p50_us')} / {_anchor_text(size, 'get_p50_us')}")
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)  # a pipe or file: do not squeeze the table into 80 columns
    console.print(t)
    v = report["verdict"]
    print(f"targets: 16 MiB ratio_to_socket >= {TARGET_RATIO_16MIB}: "
          f"{v.get('ratio_to_socket_16MiB_min')} ({'ok' if v.get('ratio_16MiB_ok') else 'MISSED'}); "
          f"4 KiB p50 < {TARGET_P50_4KIB_US:.0f} µs: {'ok' if v.get('p50_4KiB_ok') else 'MISSED'}; "
          f"errors: {v['errors']}; load average {report['load_avg_start']} → {report['load_avg_end']}")


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="umbra bench store", description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    ap.add_argument("--quick", action="store_true", help="fewer operations per size")
    ap.add_argument("--repeat", type=int, default=1, help="put/get rounds per size (median reported)")
    ap.add_argument("--socket-repeat", type=int, default=3, help="socket measurements per point (median)")
    ap.add_argument("--sizes", type=int, nargs="*", default=[], help="subset of 4096 65536 1048576 16777216")
    ap.add_argument("--count", type=int, default=0, help="operations per size (overrides the defaults)")
    ap.add_argument("--local-buffer-size", type=int, default=64 * MiB)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--master", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker_main(args)
    if not args.json:
        print(f"umbra bench store: seed {args.seed}, {'quick' if args.quick else 'full'} run", flush=True)
    report = run(args)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)
    return 0 if report["verdict"]["errors"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

"""``umbra bench master``: the put cycle against the master, over RPC and in process.

One cycle = PutStart + PutEnd + GetReplicaList + Remove(force) of a fresh key. Measured three ways
in one run, so the ratios mean something on a shared machine:

- over RPC from one client (this process) to ``umbra master`` in a subprocess,
- over RPC from N client processes at once (default 8),
- in process: the same calls straight on a :class:`~store.master.service.MasterService`.

Prints a table, or with ``--json`` exactly one JSON object: ``put_cycle_per_s`` (per mode),
``p50_us`` / ``p99_us`` per RPC (one RPC client), the in-process percentiles, and ratios.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

from store.master.server import Announcement

RPCS = ("PutStart", "PutEnd", "GetReplicaList", "Remove")
CLIENT_ID = "bench"
SEGMENT_SIZE = 1 << 30


def _segment(n: int = 0) -> Any:
    from store.master.types import Segment
    return Segment(id=f"bench-seg-{n}", name=f"127.0.0.1:{45000 + n}", base=(n + 1) << 36, size=SEGMENT_SIZE,
                   te_endpoint=f"127.0.0.1:{46000 + n}")


def _percentiles(samples: list[int]) -> tuple[float, float]:
    if not samples:
        return float("nan"), float("nan")
    s = sorted(samples)
    return s[len(s) // 2] / 1000.0, s[min(len(s) - 1, int(len(s) * 0.99))] / 1000.0


def _cycle_loop(ops: Any, prefix: str, seconds: float, value_size: int) -> tuple[int, dict[str, list[int]]]:
    """Run cycles for ``seconds``; ``ops`` has put_start/put_end/get_replica_list/remove."""
    lat: dict[str, list[int]] = {r: [] for r in RPCS}
    clock = time.perf_counter_ns
    end = clock() + int(seconds * 1e9)
    n = 0
    while clock() < end:
        key = f"{prefix}-{n}"
        t0 = clock()
        ops.put_start(CLIENT_ID, key, value_size)
        t1 = clock()
        ops.put_end(CLIENT_ID, key)
        t2 = clock()
        ops.get_replica_list(key)
        t3 = clock()
        ops.remove(key, True)
        t4 = clock()
        lat["PutStart"].append(t1 - t0)
        lat["PutEnd"].append(t2 - t1)
        lat["GetReplicaList"].append(t3 - t2)
        lat["Remove"].append(t4 - t3)
        n += 1
    return n, lat


def _rpc_worker(address: tuple[str, int], idx: int, seconds: float, value_size: int, barrier: Any,
                out: Any) -> None:
    from store.master.client import MasterClient
    with MasterClient(address, timeout=30) as mc:
        mc.ping(CLIENT_ID)  # connect before the start line
        barrier.wait(60)
        n, lat = _cycle_loop(mc, f"w{idx}", seconds, value_size)
    out.put((n, {r: _percentiles(v) for r, v in lat.items()}))


class _MasterProc:
    def __init__(self, seed: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "store.master.server", "--rpc_port=0", "--metrics_port=0",
             "--enable_metric_reporting=false", f"--seed={seed}"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        lines: queue.Queue[str] = queue.Queue()

        def pump() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                lines.put(line)

        threading.Thread(target=pump, daemon=True).start()
        try:
            banner = lines.get(timeout=60)
        except queue.Empty:
            self.stop()
            raise RuntimeError("umbra master did not start within 60 s") from None
        self.address = Announcement.parse(banner).rpc

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def run(seconds: float, clients: int, value_size: int, seed: int) -> dict[str, Any]:
    from store.master.client import MasterClient
    from store.master.config import MasterConfig
    from store.master.service import MasterService

    load_start = os.getloadavg()
    result: dict[str, Any] = {"seconds": seconds, "clients": clients, "value_size": value_size, "seed": seed}

    # in process
    svc = MasterService(MasterConfig(seed=seed))
    svc.mount_segment(_segment(), CLIENT_ID)
    n_in, lat_in = _cycle_loop(svc, "inproc", seconds, value_size)

    master = _MasterProc(seed)
    try:
        with MasterClient(master.address, timeout=30) as mc:
            mc.mount_segment(_segment(), CLIENT_ID)
            _cycle_loop(mc, "warm", min(0.5, seconds), value_size)
            n_one, lat_one = _cycle_loop(mc, "one", seconds, value_size)
            leftover = mc.inspect("gauges")["key_count"]

        ctx = mp.get_context("fork")
        barrier = ctx.Barrier(clients + 1)
        out = ctx.Queue()
        procs = [ctx.Process(target=_rpc_worker, args=(master.address, i, seconds, value_size, barrier, out))
                 for i in range(clients)]
        for p in procs:
            p.start()
        barrier.wait(60)
        t0 = time.perf_counter()
        per_worker = [out.get(timeout=seconds + 60) for _ in procs]
        wall = time.perf_counter() - t0
        for p in procs:
            p.join(30)
    finally:
        master.stop()

    n_many = sum(n for n, _ in per_worker)
    result["put_cycle_per_s"] = {
        "rpc_1_client": n_one / seconds,
        f"rpc_{clients}_clients": n_many / max(seconds, wall),
        "in_process": n_in / seconds,
    }
    result["p50_us"] = {r: _percentiles(lat_one[r])[0] for r in RPCS}
    result["p99_us"] = {r: _percentiles(lat_one[r])[1] for r in RPCS}
    result["in_process_p50_us"] = {r: _percentiles(lat_in[r])[0] for r in RPCS}
    result["in_process_p99_us"] = {r: _percentiles(lat_in[r])[1] for r in RPCS}
    result[f"rpc_{clients}_clients_p50_us_median_worker"] = {
        r: statistics.median(w[1][r][0] for w in per_worker) for r in RPCS}
    cps = result["put_cycle_per_s"]
    result["ratios"] = {
        "in_process_over_rpc_1": cps["in_process"] / cps["rpc_1_client"] if cps["rpc_1_client"] else None,
        f"rpc_{clients}_over_rpc_1": (cps[f"rpc_{clients}_clients"] / cps["rpc_1_client"]
                                      if cps["rpc_1_client"] else None),
    }
    result["keys_left_after_1_client_run"] = leftover
    result["loadavg_start_end"] = [load_start[0], os.getloadavg()[0]]
    result["cpus"] = os.cpu_count()
    return result


def _print_table(res: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    t = Table(title=f"put cycles/s, {res['value_size']} B, {res['seconds']} s each")
    t.add_column("mode")
    t.add_column("cycles/s", justify="right")
    for mode, v in res["put_cycle_per_s"].items():
        t.add_row(mode, f"{v:,.0f}")
    console.print(t)
    lt = Table(title="latency per RPC (µs)")
    for col in ("RPC", "p50 RPC", "p99 RPC", "p50 in process", "p99 in process"):
        lt.add_column(col, justify="right" if col != "RPC" else "left")
    for r in RPCS:
        lt.add_row(r, f"{res['p50_us'][r]:.1f}", f"{res['p99_us'][r]:.1f}",
                   f"{res['in_process_p50_us'][r]:.1f}", f"{res['in_process_p99_us'][r]:.1f}")
    console.print(lt)
    console.print({k: (round(v, 2) if isinstance(v, float) else v) for k, v in res["ratios"].items()},
                  f"loadavg {res['loadavg_start_end']}", f"seed {res['seed']}")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="umbra bench master", description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print exactly one JSON object")
    p.add_argument("--seconds", type=float, default=2.0, help="measuring time per mode (default 2)")
    p.add_argument("--clients", type=int, default=8, help="client processes for the concurrent run")
    p.add_argument("--value-size", type=int, default=4096)
    p.add_argument("--seed", type=int, default=None, help="master seed (placement); printed")
    a = p.parse_args(argv)
    seed = a.seed if a.seed is not None else int.from_bytes(os.urandom(4), "big")
    res = run(a.seconds, a.clients, a.value_size, seed)
    if a.json:
        print(json.dumps(res))
    else:
        _print_table(res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

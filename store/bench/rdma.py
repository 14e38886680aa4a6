"""``umbra bench rdma [--json]``: the RDMA transport against perftest on the same device, same run.

Runs where an RDMA device exists (inside the Soft-RoCE guest: ``ci/softroce-run -- .venv/bin/umbra
bench rdma --json``). Layout, as perftest's: the segment owner is a second process
(``store.transfer.peer --protocol rdma``), this process posts.

Figures, for 64 KiB and 1 MiB slices (MB/s = 10^6 bytes per second):

- ``rdma_write_MBps`` / ``rdma_read_MBps``: slices handed straight to the RDMA transport, a fixed
  window of them in flight (16 × 64 KiB, 4 × 1 MiB: the batch shapes of Mooncake's
  ``transfer_engine_bench`` figures), each completion immediately replaced by the next slice;
- ``ib_write_bw_MBps`` / ``ib_read_bw_MBps``: ``ib_write_bw`` / ``ib_read_bw`` on the same device
  and GID with the same message size and the same depth (``-t``); perftest reports MiB/s, converted;
- ``ratio_to_perftest``: Umbra / perftest, the median of the per-round ratios (the target is ≥ 0.8;
  only the ratio is meaningful under emulation), every round's ratio in ``ratio_per_round``;
- ``engine_write_MBps`` / ``engine_read_MBps``: the same through the transfer engine (requests cut
  into 64 KiB slices, batches of 16 × 64 KiB or 4 × 1 MiB requests, two batches in flight), the
  shape of Mooncake's figures in the same kind of guest (27.6 / 30.6 MB/s at 64 KiB, 41 / 44 MB/s
  at 1 MiB, ``mooncake_guest_MBps``).

Each figure is the median of ``--rounds`` rounds; within a round perftest and Umbra run back to back,
so load from elsewhere on the machine hits both. The bytes are checked at the end (a verified write
and read through the same path).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

MIB = 1 << 20
SHAPES = ((64 * 1024, 16, "64KiB"), (MIB, 4, "1MiB"))
MOONCAKE_GUEST_MBPS = {"write": {"64KiB": 27.6, "1MiB": 41.0}, "read": {"64KiB": 30.6, "1MiB": 43.8}}
TARGET_RATIO = 0.8
PROJECT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def parse_perftest(text: str) -> float | None:
    """Average bandwidth in MB/s (10^6) from perftest's report (which prints MiB/s)."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if "#bytes" in line and "BW average" in line:
            gbits = "Gb/sec" in line
            for row in lines[i + 1:]:
                parts = row.split()
                if len(parts) >= 4 and parts[0].isdigit():
                    avg = float(parts[3])
                    return avg * 125.0 if gbits else avg * MIB / 1e6
    return None


def run_perftest(tool: str, device: str, port: int, gid_index: int, size: int, depth: int,
                 seconds: float) -> dict[str, Any]:
    """Server and client of ``tool`` on this host; returns ``{"MBps": .., "cmd": ..}``."""
    tcp_port = _free_port()
    common = [tool, "-d", device, "-i", str(port), "-x", str(gid_index), "-s", str(size), "-t", str(depth),
              "-D", str(int(max(1, seconds))), "-F", "-p", str(tcp_port)]
    server = subprocess.Popen(common, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(1.0)
        client = None
        for _ in range(20):  # the server may still be setting up under emulation
            client = subprocess.run([*common, "127.0.0.1"], capture_output=True, text=True,
                                    timeout=seconds * 4 + 120)
            if client.returncode == 0 or "Couldn't connect" not in client.stdout + client.stderr:
                break
            time.sleep(0.5)
        server.wait(timeout=seconds * 4 + 120)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert client is not None
    mbps = parse_perftest(client.stdout)
    out: dict[str, Any] = {"MBps": mbps, "cmd": " ".join([*common, "127.0.0.1"])}
    if mbps is None or client.returncode != 0:
        out["error"] = (client.stdout + client.stderr)[-800:]
    return out


def transport_bw(transport: Any, seg: Any, local_addr: int, remote_addr: int, span: int, op: Any, size: int,
                 window: int, seconds: float) -> dict[str, Any]:
    """Keep ``window`` slices of ``size`` in flight on the transport for ``seconds``; MB/s."""
    from store.transfer.transport import Slice, TransferStatus

    lock = threading.Lock()
    done = threading.Event()
    state = {"bytes": 0, "inflight": 0, "errors": 0, "last": 0.0, "stop": False, "next": 0}
    slots = max(1, span // size)
    rkey = seg.buffers[0].rkey

    def on_done(s: Slice) -> None:
        with lock:
            state["inflight"] -= 1
            if s.status is TransferStatus.COMPLETED:
                state["bytes"] += s.length
                state["last"] = time.perf_counter()
            else:
                state["errors"] += 1
            again = not state["stop"] and time.perf_counter() < end
            if again:
                i = state["next"] = (state["next"] + 1) % slots
                state["inflight"] += 1
            elif state["inflight"] == 0:
                done.set()
        if again:
            s.status = TransferStatus.PENDING
            s.local_addr = local_addr + i * size
            s.remote_addr = remote_addr + i * size
            transport.submit([s])

    start = time.perf_counter()
    end = start + seconds
    first = []
    for i in range(window):
        first.append(Slice(op, local_addr + (i % slots) * size, size, seg, remote_addr + (i % slots) * size,
                           rkey, status=TransferStatus.PENDING, on_done=on_done))
    state["inflight"] = window
    state["next"] = window % slots
    transport.submit(first)
    if not done.wait(seconds + 120):
        state["stop"] = True
        raise RuntimeError(f"{op.name} {size} B: {state['inflight']} slices still in flight after the run")
    dt = max(state["last"] - start, 1e-9)
    return {"MBps": state["bytes"] / dt / 1e6, "bytes": state["bytes"], "seconds": dt,
            "errors": state["errors"]}


def engine_bw(engine: Any, seg_name: str, local_addr: int, remote_addr: int, span: int, op: Any, size: int,
              batch: int, seconds: float, depth: int = 2) -> dict[str, Any]:
    """Batches of ``batch`` requests of ``size`` through the transfer engine, ``depth`` in flight."""
    from store.transfer.engine import TransferRequest

    slots = max(1, span // size)
    start = time.perf_counter()
    end = start + seconds
    inflight: list[Any] = []
    moved = failures = 0
    i = 0
    while True:
        while len(inflight) < depth and time.perf_counter() < end:
            b = engine.allocate_batch(batch)
            reqs = []
            for _ in range(batch):
                k = i % slots
                i += 1
                reqs.append(TransferRequest(op, local_addr + k * size, seg_name, remote_addr + k * size,
                                            size))
            engine.submit(b, reqs)
            inflight.append(b)
        if not inflight:
            break
        b = inflight.pop(0)
        results = engine.wait(b, 300)
        engine.free_batch(b)
        moved += sum(r.transferred_bytes for r in results)
        failures += sum(1 for r in results if not r.ok)
    dt = time.perf_counter() - start
    return {"MBps": moved / dt / 1e6, "bytes": moved, "seconds": dt, "errors": failures}


def _median(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return round(statistics.median(vals), 2) if vals else None


def run(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np

    from store.transfer.engine import TransferEngine
    from store.transfer.memory import MemoryRegion
    from store.transfer.rdma import device as rdma_device
    from store.transfer.transport import Opcode, SegmentDescriptor

    devices = rdma_device.list_device_names()
    if not devices:
        raise SystemExit("umbra bench rdma: no RDMA device on this host; run it inside the Soft-RoCE guest: "
                         "ci/softroce-run -- .venv/bin/umbra bench rdma --json")
    dev = args.device or devices[0]
    opts: dict[str, Any] = {"device_name": dev, "port": args.port}
    if args.gid_index is not None:
        opts["gid_index"] = args.gid_index
    if args.num_qp_per_ep is not None:
        opts["num_qp_per_ep"] = args.num_qp_per_ep
    span = 32 * MIB
    env = dict(os.environ)
    env["PYTHONPATH"] = str(PROJECT) + os.pathsep + env.get("PYTHONPATH", "")
    owner = subprocess.Popen(
        [sys.executable, "-m", "store.transfer.peer", "--protocol", "rdma", "--hostname", "127.0.0.1",
         "--segment-size", str(2 * span), "--engine-options",
         json.dumps({"transport_options": {"rdma": opts}})],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=PROJECT, env=env)
    engine = region = mem = None
    try:
        assert owner.stdout is not None
        line = owner.stdout.readline()
        if not line:
            raise RuntimeError(f"the owner process exited with {owner.wait(30)} before reporting")
        info = json.loads(line)
        engine = TransferEngine("127.0.0.1", "rdma", transport_options={"rdma": opts})
        region = MemoryRegion(2 * span)
        engine.register_memory(region.addr, region.length)
        seg = engine.open_segment(SegmentDescriptor.from_dict(info["segment"]))
        transport = engine.transport("rdma")
        ctx = transport.context  # type: ignore[attr-defined]
        local, remote = region.addr, int(info["addr"])
        mem = region.numpy()
        mem[:] = np.random.default_rng(0).integers(0, 256, mem.size, dtype=np.uint8)
        engine.transfer_sync(Opcode.WRITE, local, seg.name, remote, MIB, timeout=300)  # connect
        out: dict[str, Any] = {
            "device": dev, "port": args.port, "gid_index": ctx.gid_index, "active_mtu": ctx.active_mtu,
            "path_mtu": ctx.local_mtu, "seconds": args.seconds, "rounds": args.rounds,
            "num_qp_per_ep": transport.config.num_qp_per_ep,  # type: ignore[attr-defined]
            "windows": {label: window for _, window, label in SHAPES},
        }
        keys = ("rdma_write_MBps", "rdma_read_MBps", "ib_write_bw_MBps", "ib_read_bw_MBps",
                "engine_write_MBps", "engine_read_MBps")
        for k in keys:
            out[k] = {}
        raw: dict[str, list[Any]] = {}
        ratios: dict[str, dict[str, float | None]] = {"write": {}, "read": {}}
        ratio_rounds: dict[str, dict[str, list[float]]] = {"write": {}, "read": {}}
        perftest = shutil.which("ib_write_bw") is not None and shutil.which("ib_read_bw") is not None
        for size, window, label in SHAPES:
            samples: dict[str, list[float | None]] = {k: [] for k in keys}
            for _ in range(args.rounds):
                for op, tool, key, pkey in (
                        (Opcode.WRITE, "ib_write_bw", "rdma_write_MBps", "ib_write_bw_MBps"),
                        (Opcode.READ, "ib_read_bw", "rdma_read_MBps", "ib_read_bw_MBps")):
                    if perftest:
                        pt = run_perftest(tool, dev, args.port, ctx.gid_index, size, window, args.seconds)
                        samples[pkey].append(pt["MBps"])
                        raw.setdefault(f"{tool}_{label}", []).append(pt)
                    t = transport_bw(transport, seg, local, remote, span, op, size, window, args.seconds)
                    samples[key].append(t["MBps"])
                    raw.setdefault(f"{key}_{label}", []).append(t)
                    if not args.no_engine:
                        ekey = "engine_write_MBps" if op is Opcode.WRITE else "engine_read_MBps"
                        eng = engine_bw(engine, seg.name, local, remote, span, op, size, window, args.seconds)
                        samples[ekey].append(eng["MBps"])
                        raw.setdefault(f"{ekey}_{label}", []).append(eng)
            for k in keys:
                out[k][label] = _median(samples[k])
            # each round ran perftest and Umbra back to back: the median of the per-round ratios
            # cancels load from elsewhere on the machine better than a ratio of medians
            for op_name, key, pkey in (("write", "rdma_write_MBps", "ib_write_bw_MBps"),
                                       ("read", "rdma_read_MBps", "ib_read_bw_MBps")):
                per_round = [u / p for u, p in zip(samples[key], samples[pkey], strict=False) if u and p]
                ratios[op_name][label] = round(statistics.median(per_round), 3) if per_round else None
                ratio_rounds[op_name][label] = [round(r, 3) for r in per_round]
        out["ratio_to_perftest"] = ratios
        out["ratio_per_round"] = ratio_rounds
        out["target_ratio"] = TARGET_RATIO
        write_ratios = [v for v in ratios["write"].values() if v is not None]
        out["meets_target"] = bool(write_ratios) and min(write_ratios) >= TARGET_RATIO
        out["mooncake_guest_MBps"] = MOONCAKE_GUEST_MBPS
        out["errors"] = sum(int(r.get("errors", 0) or 0) for rs in raw.values() for r in rs
                            if isinstance(r, dict))
        out["verified"] = _verify(engine, seg.name, owner, info, local, remote, mem)
        if args.raw:
            out["raw"] = raw
        stats = transport.stats()
        out["transport"] = {k: stats[k] for k in ("reconnects", "retirements", "retries", "paused_paths")}
        return out
    finally:
        if engine is not None:
            engine.close()
        mem = None  # our numpy view keeps the mapping exported
        if region is not None:
            try:
                region.close()
            except BufferError as exc:  # a view still alive: leave the mapping to process exit
                print(f"umbra bench rdma: region not unmapped: {exc}", file=sys.stderr)
        if owner.poll() is None:
            assert owner.stdin is not None
            owner.stdin.close()
            try:
                owner.wait(60)
            except subprocess.TimeoutExpired:
                owner.kill()


def _verify(engine: Any, seg_name: str, owner: subprocess.Popen[str], info: dict[str, Any], local: int,
            remote: int, mem: Any) -> bool:
    """A 4 MiB write then read through the engine, compared byte for byte with the owner's digest."""
    import hashlib

    from store.transfer.transport import Opcode

    n = 4 * MIB
    engine.transfer_sync(Opcode.WRITE, local, seg_name, remote, n, timeout=300)
    body = json.dumps({"offset": 0, "length": n}).encode()
    reply = engine.control_call(info["endpoint"], "peer.digest", body, 60)
    want = hashlib.blake2b(memoryview(mem[:n]).cast("B"), digest_size=16).hexdigest()
    if reply.decode() != want:
        return False
    saved = mem[:n].copy()
    mem[:n] = 0
    engine.transfer_sync(Opcode.READ, local, seg_name, remote, n, timeout=300)
    return bool((mem[:n] == saved).all())


def _table(out: dict[str, Any]) -> str:
    rows = [f"RDMA on {out['device']} (path MTU {out['path_mtu']}, median of {out['rounds']} x "
            f"{out['seconds']}s), MB/s = 1e6 B/s"]
    rows.append(f"{'':24}{'64KiB':>10}{'1MiB':>10}")
    for key in ("rdma_write_MBps", "ib_write_bw_MBps", "rdma_read_MBps", "ib_read_bw_MBps",
                "engine_write_MBps", "engine_read_MBps"):
        vals = out.get(key, {})
        rows.append(f"{key:24}" + "".join(f"{(vals.get(lbl) or 0):>10.1f}" for _, _, lbl in SHAPES))
    for op in ("write", "read"):
        vals = out["ratio_to_perftest"][op]
        rows.append(f"{'ratio ' + op:24}" + "".join(f"{(vals.get(lbl) or 0):>10.2f}" for _, _, lbl in SHAPES))
    rows.append(f"verified: {out['verified']}  meets target (write >= {TARGET_RATIO}): {out['meets_target']}")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="umbra bench rdma", description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--device", default=os.environ.get("UMBRA_RDMA_DEVICE", ""),
                    help="RDMA device (default: first)")
    ap.add_argument("--port", type=int, default=1)
    ap.add_argument("--gid-index", type=int, default=None, help="GID index (default: auto)")
    ap.add_argument("--seconds", type=float, default=3.0, help="seconds per measurement (default 3)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds; figures are medians (default 3)")
    ap.add_argument("--num-qp-per-ep", type=int, default=None, help="QPs per endpoint (default: config, 2)")
    ap.add_argument("--no-engine", action="store_true", help="skip the transfer-engine figures")
    ap.add_argument("--raw", action="store_true", help="include every sample in the JSON")
    args = ap.parse_args(list(sys.argv[1:] if argv is None else argv))
    t0 = time.perf_counter()
    out = run(args)
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out, indent=2) if args.json else _table(out))
    return 0 if out["verified"] else 1


if __name__ == "__main__":
    raise SystemExit(main())

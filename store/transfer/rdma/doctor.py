"""``umbra doctor``: does RDMA work on this host, and which GID index should be used?

It lists every RDMA device (node GUID, transport, driver), each port (state, active/max MTU, link
layer) and its GID table with types and netdevs, recommends a GID index, then runs a loopback RDMA
WRITE and READ between two RC QPs on one device and verifies the bytes. This is the in-process
equivalent of the ``ib_send_bw``/``ib_write_bw`` check a user would otherwise run by hand, with the
same QP settings the transport uses on Soft-RoCE (GRH, retry_cnt 6, timeout 17: rxe treats
retry_cnt 7 or timeout 0 as "retry forever", and TCG makes timeouts below 16 retransmit spuriously).

Exit codes: 0 PASS; 1 FAIL (device present but the port, GID or loopback check failed);
2 usage error; 3 no usable RDMA on this host (no device, pyverbs missing, named device absent).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from store.transfer.rdma.device import (
    GUEST_HINT,
    DeviceError,
    DeviceInfo,
    PortInfo,
    PyverbsUnavailable,
    describe_device,
    list_device_names,
    mtu_enum,
)

EXIT_PASS = 0
EXIT_FAIL = 1
EXIT_NO_RDMA = 3

QP_TIMEOUT = 17  # 4.096 µs × 2^17 ≈ 0.54 s per try
QP_RETRY_CNT = 6  # 7 means infinite on rxe
QP_RNR_RETRY = 6  # 7 means infinite by the spec
RD_ATOMIC = 16


@dataclass
class LoopbackResult:
    ok: bool
    reason: str
    device: str
    port: int
    gid_index: int | None = None
    gid: str | None = None
    gid_type: str | None = None
    path_mtu: int | None = None
    size: int = 0
    connect_ms: float | None = None
    write_ms: float | None = None
    read_ms: float | None = None


class LoopbackFailure(Exception):
    """A step of the loopback check failed; the message is the reason the doctor prints."""


def _size(n: int) -> str:
    for unit, shift in (("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} B"


def _wc_text(status: int) -> str:
    """``remote access error (IBV_WC_REM_ACCESS_ERR=10)``."""
    try:
        from store.transfer.rdma.errors import describe_wc

        return describe_wc(status)
    except ImportError:
        return f"status {status}"


def _poll_one(cq: Any, qp: Any, what: str, timeout_s: float) -> None:
    """Busy-poll for one completion with a deadline.

    pyverbs calls hold the GIL and a blocking wait would hang the process if the completion never
    comes (a QP that retries forever), so poll non-blockingly until the deadline.
    """
    import pyverbs.enums as e

    deadline = time.monotonic() + timeout_s
    while True:
        n, wcs = cq.poll(1)
        if n:
            wc = wcs[0]
            if wc.status != e.IBV_WC_SUCCESS:
                raise LoopbackFailure(f"{what} completed with {_wc_text(int(wc.status))}")
            return
        if time.monotonic() > deadline:
            state = qp.query(e.IBV_QP_STATE)[0].qp_state
            raise LoopbackFailure(f"{what}: no completion within {timeout_s:g} s (requester QP state "
                                  f"{e.ibv_qp_state(state).name})")
        time.sleep(0.0002)


def _first_difference(a: bytes, b: bytes) -> int:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return min(len(a), len(b))


def loopback_check(device: str, port: int, gid_index: int, path_mtu: int, *, size: int = 65536,
                   timeout_s: float = 10.0) -> LoopbackResult:
    """RDMA WRITE then READ between two RC QPs of one device, data verified both ways.

    ``path_mtu`` (bytes) is min(local active MTU, peer active MTU); both ends are this port here.
    Every pyverbs object is closed in reverse order of creation, work requests included (pyverbs 44
    leaks their SGE arrays otherwise), and nothing is touched after it is closed.
    """
    import pyverbs.enums as e
    from pyverbs.addr import AHAttr, GlobalRoute
    from pyverbs.cq import CQ
    from pyverbs.device import Context
    from pyverbs.mr import MR
    from pyverbs.pd import PD
    from pyverbs.pyverbs_error import PyverbsError
    from pyverbs.qp import QP, QPAttr, QPCap, QPInitAttr
    from pyverbs.wr import SGE, SendWR

    result = LoopbackResult(ok=False, reason="", device=device, port=port, gid_index=gid_index,
                            path_mtu=path_mtu, size=size)
    access = e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_WRITE | e.IBV_ACCESS_REMOTE_READ
    with contextlib.ExitStack() as stack:
        def keep(obj: Any) -> Any:
            stack.callback(obj.close)
            return obj

        step = "open the device"
        try:
            ctx = keep(Context(name=device))
            step = "query the port and GID"
            dev_attr = ctx.query_device()
            port_attr = ctx.query_port(port)
            gid = ctx.query_gid(port, gid_index)
            result.gid = str(gid)
            rd_init = max(1, min(RD_ATOMIC, int(dev_attr.max_qp_init_rd_atom)))
            rd_resp = max(1, min(RD_ATOMIC, int(dev_attr.max_qp_rd_atom)))
            step = "allocate PD, CQ and MRs"
            pd = keep(PD(ctx))
            cq = keep(CQ(ctx, 16, None, None, 0))
            mr_a = keep(MR(pd, size, access))
            mr_b = keep(MR(pd, size, access))
            step = "create the QPs"
            cap = QPCap(max_send_wr=4, max_recv_wr=1, max_send_sge=1, max_recv_sge=1)
            init = QPInitAttr(qp_type=e.IBV_QPT_RC, scq=cq, rcq=cq, cap=cap, sq_sig_all=0)
            qa = keep(QP(pd, init))
            qb = keep(QP(pd, init))
            psn_a, psn_b = secrets.randbelow(1 << 24), secrets.randbelow(1 << 24)

            def connect(qp: Any, dest_qpn: int, my_psn: int, dest_psn: int) -> None:
                a = QPAttr()
                a.qp_state = e.IBV_QPS_INIT
                a.pkey_index = 0
                a.port_num = port
                a.qp_access_flags = access
                qp.modify(a, e.IBV_QP_STATE | e.IBV_QP_PKEY_INDEX | e.IBV_QP_PORT | e.IBV_QP_ACCESS_FLAGS)
                a = QPAttr()
                a.qp_state = e.IBV_QPS_RTR
                a.path_mtu = mtu_enum(path_mtu)
                a.dest_qp_num = dest_qpn
                a.rq_psn = dest_psn
                a.max_dest_rd_atomic = rd_resp
                a.min_rnr_timer = 12
                a.ah_attr = AHAttr(port_num=port, is_global=1, dlid=int(port_attr.lid), sl=0,
                                   gr=GlobalRoute(dgid=gid, sgid_index=gid_index, hop_limit=64))
                qp.modify(a, e.IBV_QP_STATE | e.IBV_QP_AV | e.IBV_QP_PATH_MTU | e.IBV_QP_DEST_QPN
                          | e.IBV_QP_RQ_PSN | e.IBV_QP_MAX_DEST_RD_ATOMIC | e.IBV_QP_MIN_RNR_TIMER)
                a = QPAttr()
                a.qp_state = e.IBV_QPS_RTS
                a.timeout = QP_TIMEOUT
                a.retry_cnt = QP_RETRY_CNT
                a.rnr_retry = QP_RNR_RETRY
                a.sq_psn = my_psn
                a.max_rd_atomic = rd_init
                qp.modify(a, e.IBV_QP_STATE | e.IBV_QP_TIMEOUT | e.IBV_QP_RETRY_CNT | e.IBV_QP_RNR_RETRY
                          | e.IBV_QP_SQ_PSN | e.IBV_QP_MAX_QP_RD_ATOMIC)

            step = "connect the QPs (RESET→INIT→RTR→RTS)"
            t = time.perf_counter()
            connect(qa, qb.qp_num, psn_a, psn_b)
            connect(qb, qa.qp_num, psn_b, psn_a)
            result.connect_ms = (time.perf_counter() - t) * 1e3

            def transfer(opcode: int, wr_id: int, what: str) -> float:
                sge = keep(SGE(mr_a.buf, size, mr_a.lkey))
                wr = keep(SendWR(wr_id=wr_id, opcode=opcode, num_sge=1, sg=[sge],
                                 send_flags=e.IBV_SEND_SIGNALED))
                wr.set_wr_rdma(mr_b.rkey, mr_b.buf)
                t = time.perf_counter()
                qa.post_send(wr)
                _poll_one(cq, qa, what, timeout_s)
                return (time.perf_counter() - t) * 1e3

            step = "RDMA WRITE"
            payload = os.urandom(size)
            mr_a.write(payload, size)
            mr_b.write(bytes(size), size)
            result.write_ms = transfer(e.IBV_WR_RDMA_WRITE, 1, "RDMA WRITE")
            landed = mr_b.read(size, 0)
            if landed != payload:
                raise LoopbackFailure(f"RDMA WRITE completed but the target differs from the source at "
                                      f"byte {_first_difference(landed, payload)} of {size}")
            step = "RDMA READ"
            payload = os.urandom(size)
            mr_b.write(payload, size)
            mr_a.write(bytes(size), size)
            result.read_ms = transfer(e.IBV_WR_RDMA_READ, 2, "RDMA READ")
            fetched = mr_a.read(size, 0)
            if fetched != payload:
                raise LoopbackFailure(f"RDMA READ completed but the local buffer differs from the remote "
                                      f"at byte {_first_difference(fetched, payload)} of {size}")
        except LoopbackFailure as exc:
            result.reason = str(exc)
            return result
        except (PyverbsError, DeviceError) as exc:
            result.reason = f"{step} failed: {exc}"
            return result
    result.ok = True
    result.reason = (f"{_size(size)} RDMA WRITE and READ verified between two RC QPs "
                     f"(GID index {gid_index}, path MTU {path_mtu})")
    return result


# --------------------------------------------------------------------------------------- CLI

def _gid_index_arg(value: str) -> int | None:
    if value == "auto":
        return None
    try:
        index = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a GID index or 'auto', got {value!r}") from None
    if index < 0:
        raise argparse.ArgumentTypeError(f"GID index must be >= 0, got {index}")
    return index


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="umbra doctor", description=(
        "List RDMA devices, ports, MTUs and GID tables, recommend a GID index, and run a loopback "
        "RDMA WRITE + READ with data verification. Exit 0 PASS, 1 FAIL, 3 no usable RDMA."))
    env = os.environ
    p.add_argument("--device", default=env.get("UMBRA_RDMA_DEVICE", ""),
                   help="device for the loopback check (default: first with an ACTIVE port; "
                        "env UMBRA_RDMA_DEVICE)")
    p.add_argument("--port", type=int, default=None,
                   help="port for the loopback check (default: first ACTIVE port; env UMBRA_RDMA_PORT)")
    p.add_argument("--gid-index", type=_gid_index_arg, default=env.get("UMBRA_RDMA_GID_INDEX", "auto"),
                   help="GID index, or 'auto' for the recommended one (env UMBRA_RDMA_GID_INDEX)")
    p.add_argument("--size", type=int, default=65536, help="bytes per RDMA WRITE/READ (default 65536)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for each completion")
    p.add_argument("--no-loopback", action="store_true", help="only list devices, ports and GIDs")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return p


def render_device(info: DeviceInfo) -> list[str]:
    parent = f", netdev {info.parent_netdev}" if info.parent_netdev else ""
    lines = [f"{info.name}: node GUID {info.node_guid}, transport {info.transport}, node type "
             f"{info.node_type}, driver {info.driver}{parent}, firmware {info.fw_version or '-'}"]
    for p in info.ports:
        lines.append(f"  port {p.port}: {p.state}, link layer {p.link_layer}, active MTU {p.active_mtu} "
                     f"(max {p.max_mtu}), LID {p.lid}, GID table {len(p.gids)} valid of {p.gid_tbl_len}")
        if p.gids:
            width = max(len(g.short) for g in p.gids)
            lines.append(f"    {'index':>5}  {'GID':<{width}}  {'type':<10}  netdev")
            for g in p.gids:
                mark = "  <- recommended" if g.index == p.recommended_gid_index else ""
                netdev = g.netdev or "-"
                lines.append(f"    {g.index:>5}  {g.short:<{width}}  {g.gid_type:<10}  {netdev}{mark}")
        if p.recommended_gid_index is None:
            lines.append("    recommended GID index: none (no valid GID)")
        else:
            g = next(x for x in p.gids if x.index == p.recommended_gid_index)
            why = f"{g.gid_type}, IPv4-mapped {g.ipv4}" if g.ipv4 else g.gid_type
            lines.append(f"    recommended GID index: {g.index} ({why})")
    return lines


def _choose_target(devices: list[DeviceInfo], name: str, port: int | None) -> tuple[DeviceInfo, PortInfo]:
    """The device/port the loopback runs on: the named ones, else the first ACTIVE port."""
    candidates = [d for d in devices if d.name == name] if name else devices
    for dev in candidates:
        for p in dev.ports:
            if (port is None and p.active) or p.port == port:
                return dev, p
    dev = candidates[0]
    if port is not None:
        raise LoopbackFailure(f"{dev.name} has no port {port} (ports: {[p.port for p in dev.ports]})")
    return dev, dev.ports[0]


def run(args: argparse.Namespace, emit: Callable[[str], None]) -> tuple[int, dict[str, Any]]:
    report: dict[str, Any] = {"devices": [], "loopback": None, "verdict": "FAIL",
                              "recommended_gid_index": None, "hint": None}
    names = list_device_names()
    if not names:
        report["verdict"] = "NO_DEVICE"
        report["hint"] = GUEST_HINT
        emit("No RDMA device on this host (/sys/class/infiniband is empty): RDMA does not work here.")
        emit(f"Hint: {GUEST_HINT}")
        return EXIT_NO_RDMA, report
    if args.device and args.device not in names:
        report["verdict"] = "NO_DEVICE"
        emit(f"RDMA device {args.device!r} not found; devices here: {', '.join(names)}")
        return EXIT_NO_RDMA, report
    devices: list[DeviceInfo] = []
    try:
        for name in names:
            devices.append(describe_device(name))
    except PyverbsUnavailable as exc:
        report["verdict"] = "NO_PYVERBS"
        emit(f"RDMA devices present ({', '.join(names)}), but {exc.message}")
        return EXIT_NO_RDMA, report
    except DeviceError as exc:
        emit(f"FAIL: {exc.message}")
        return EXIT_FAIL, report
    report["devices"] = [d.to_dict() for d in devices]
    emit(f"RDMA devices: {len(devices)}")
    for dev in devices:
        for line in render_device(dev):
            emit(line)
    try:
        dev, port = _choose_target(devices, args.device, args.port)
    except LoopbackFailure as exc:
        emit(f"FAIL: {exc}")
        return EXIT_FAIL, report
    report["recommended_gid_index"] = port.recommended_gid_index
    gid_index = args.gid_index if args.gid_index is not None else port.recommended_gid_index
    if args.no_loopback:
        report["verdict"] = "LISTED"
        return (EXIT_PASS if port.active and gid_index is not None else EXIT_FAIL), report
    result = LoopbackResult(ok=False, reason="", device=dev.name, port=port.port, gid_index=gid_index,
                            size=args.size)
    if not port.active:
        result.reason = f"{dev.name} port {port.port} is {port.state}, not ACTIVE"
    elif gid_index is None:
        result.reason = f"{dev.name} port {port.port} has no valid GID"
    elif gid_index not in {g.index for g in port.gids}:
        result.reason = (f"GID index {gid_index} is empty on {dev.name} port {port.port} (valid: "
                         f"{[g.index for g in port.gids]})")
    else:
        path_mtu = min(port.active_mtu, port.active_mtu)  # local and "peer" are the same port here
        emit(f"loopback: {dev.name} port {port.port}, GID index {gid_index}, path MTU {path_mtu}, "
             f"{_size(args.size)} RDMA WRITE + READ between two RC QPs ...")
        result = loopback_check(dev.name, port.port, gid_index, path_mtu, size=args.size,
                                timeout_s=args.timeout)
        result.gid_type = next(g.gid_type for g in port.gids if g.index == gid_index)
    report["loopback"] = {k: round(v, 3) if isinstance(v, float) else v for k, v in asdict(result).items()}
    if result.ok:
        report["verdict"] = "PASS"
        emit(f"PASS: RDMA works on {dev.name} port {port.port}: {result.reason}; connect "
             f"{result.connect_ms:.1f} ms, write {result.write_ms:.1f} ms, read {result.read_ms:.1f} ms")
        emit(f"Use GID index {gid_index} (UMBRA_RDMA_GID_INDEX={gid_index}, MC_GID_INDEX={gid_index}).")
        return EXIT_PASS, report
    emit(f"FAIL: {result.reason}")
    return EXIT_FAIL, report


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:
        return int(exc.code or 0)
    if args.port is None and os.environ.get("UMBRA_RDMA_PORT"):
        args.port = int(os.environ["UMBRA_RDMA_PORT"])
    if args.size <= 0:
        parser.print_usage(sys.stderr)
        print("umbra doctor: --size must be positive", file=sys.stderr)
        return 2
    lines: list[str] = []
    emit = lines.append if args.json else (lambda s: print(s, flush=True))
    code, report = run(args, emit)
    if args.json:
        report["messages"] = lines
        print(json.dumps(report, indent=2))
    return code


if __name__ == "__main__":
    raise SystemExit(main())

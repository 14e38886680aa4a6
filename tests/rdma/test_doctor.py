"""``umbra doctor`` on a real RDMA device (Soft-RoCE in the guest, or mlx5 hardware).

The GID facts the doctor reports come from ``ibv_query_gid_table``; the tests check them against
sysfs, an independent view of the same table, so a mistranslated GID type enum cannot pass.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from store.transfer.rdma import doctor
from store.transfer.rdma.device import describe_device, pick_gid_index, rxe_active_mtu

pytestmark = [pytest.mark.rdma, pytest.mark.timeout(300)]

SYSFS = Path("/sys/class/infiniband")


def _doctor_json(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict]:
    code = doctor.main(["--json", *args])
    return code, json.loads(capsys.readouterr().out)


def _target_args(t) -> list[str]:
    args = ["--device", t.device, "--port", str(t.port)]
    if t.gid_index is not None:
        args += ["--gid-index", str(t.gid_index)]
    return args


def test_doctor_loopback_passes_and_recommends_a_roce_v2_gid(rdma_target, capsys):
    code, report = _doctor_json(capsys, *_target_args(rdma_target))
    assert code == doctor.EXIT_PASS, report["messages"]
    assert report["verdict"] == "PASS"
    loop = report["loopback"]
    assert loop["ok"] and loop["device"] == rdma_target.device and loop["port"] == rdma_target.port
    assert loop["write_ms"] > 0 and loop["read_ms"] > 0

    dev = next(d for d in report["devices"] if d["name"] == rdma_target.device)
    port = next(p for p in dev["ports"] if p["port"] == rdma_target.port)
    rec = report["recommended_gid_index"]
    assert rec is not None and rec == port["recommended_gid_index"]
    entry = next(g for g in port["gids"] if g["index"] == rec)
    sysfs_port = SYSFS / rdma_target.device / "ports" / str(rdma_target.port)
    assert (sysfs_port / "gids" / str(rec)).read_text().strip() == entry["gid"]
    if port["link_layer"] == "Ethernet":
        assert entry["type"] == "RoCE v2"
        assert (sysfs_port / "gid_attrs" / "types" / str(rec)).read_text().strip() == "RoCE v2"
    if rdma_target.driver == "rdma_rxe":
        # the guest runner waits for the IPv4-mapped GID of eth0 before it runs anything
        assert entry["ipv4"] == "10.0.2.15" and entry["netdev"] == "eth0"
    if rdma_target.gid_index is None:
        assert loop["gid_index"] == rec
    assert "PASS" in report["messages"][-2] and f"GID index {loop['gid_index']}" in report["messages"][-1]


def test_every_reported_gid_matches_sysfs(rdma_target):
    info = describe_device(rdma_target.device)
    port = next(p for p in info.ports if p.port == rdma_target.port)
    sysfs_port = SYSFS / rdma_target.device / "ports" / str(rdma_target.port)
    assert port.gids, "a port in use has at least one GID"
    for g in port.gids:
        assert (sysfs_port / "gids" / str(g.index)).read_text().strip() == g.gid
        sysfs_type = (sysfs_port / "gid_attrs" / "types" / str(g.index)).read_text().strip()
        assert sysfs_type == g.gid_type or (sysfs_type == "IB/RoCE v1" and g.gid_type in ("IB", "RoCE v1"))
    assert port.state == (sysfs_port / "state").read_text().split(":")[1].strip()


def test_pick_gid_index_is_the_doctors_recommendation(rdma_target):
    from pyverbs.device import Context

    info = describe_device(rdma_target.device)
    port = next(p for p in info.ports if p.port == rdma_target.port)
    ctx = Context(name=rdma_target.device)
    try:
        assert pick_gid_index(ctx, rdma_target.port) == port.recommended_gid_index
    finally:
        ctx.close()


@pytest.mark.parametrize("size", [1, 65536 + 7, 1 << 20])
def test_loopback_moves_every_size_at_every_path_mtu_up_to_the_active_one(rdma_target, size):
    info = describe_device(rdma_target.device)
    port = next(p for p in info.ports if p.port == rdma_target.port)
    gid = rdma_target.gid_index if rdma_target.gid_index is not None else port.recommended_gid_index
    for mtu in sorted({256, port.active_mtu}):
        res = doctor.loopback_check(rdma_target.device, rdma_target.port, gid, mtu, size=size, timeout_s=20)
        assert res.ok, res.reason
        assert res.path_mtu == mtu and res.size == size


def test_doctor_fails_with_a_reason_on_an_empty_gid_index(rdma_target, capsys):
    info = describe_device(rdma_target.device)
    port = next(p for p in info.ports if p.port == rdma_target.port)
    empty = next(i for i in range(port.gid_tbl_len) if i not in {g.index for g in port.gids})
    code, report = _doctor_json(capsys, "--device", rdma_target.device, "--port", str(rdma_target.port),
                                "--gid-index", str(empty))
    assert code == doctor.EXIT_FAIL
    assert report["verdict"] == "FAIL" and f"GID index {empty} is empty" in report["loopback"]["reason"]


def test_doctor_rejects_an_absent_device(rdma_target, capsys):
    code, report = _doctor_json(capsys, "--device", "no_such_dev0")
    assert code == doctor.EXIT_NO_RDMA and report["verdict"] == "NO_DEVICE"


@pytest.mark.softroce
def test_active_mtu_follows_the_netdev_mtu(rdma_target):
    """The runner's ``--mtu`` reaches rxe: 1500 → active MTU 1024, 9000 → 4096."""
    parent = (SYSFS / rdma_target.device / "parent").read_text().strip()
    netdev_mtu = int(Path(f"/sys/class/net/{parent}/mtu").read_text())
    if os.environ.get("UMBRA_GUEST_MTU"):
        assert netdev_mtu == int(os.environ["UMBRA_GUEST_MTU"])
    info = describe_device(rdma_target.device)
    port = next(p for p in info.ports if p.port == rdma_target.port)
    assert port.active_mtu == rxe_active_mtu(netdev_mtu)
    assert port.max_mtu == 4096

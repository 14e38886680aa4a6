"""``umbra doctor`` and device discovery without an RDMA device (the host has none).

What can be checked here: the no-device path of the real command, argument errors, the GID choice
rule, GID/MTU conversions, driver detection over a fake sysfs tree, and the translation of
``ibv_query_gid_table`` entries (whose type enum differs from the sysfs one).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from store.transfer.rdma import doctor
from store.transfer.rdma.device import (
    GidEntry,
    choose_gid_index,
    device_driver,
    gid_table,
    list_device_names,
    mtu_bytes,
    mtu_enum,
    normalize_gid,
    rxe_active_mtu,
)
from store.transfer.rdma.errors import DeviceError

no_device = pytest.mark.skipif(bool(list_device_names()), reason="this host has an RDMA device")

LINK_LOCAL = "fe80:0000:0000:0000:5054:00ff:fe12:3456"
MAPPED = "0000:0000:0000:0000:0000:ffff:0a00:020f"
SITE = "fec0:0000:0000:0000:5054:00ff:fe12:3456"


def _umbra(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "scenarios.cli", *args], capture_output=True, text=True,
                          timeout=120)


@no_device
def test_doctor_without_a_device_says_so_and_fails():
    proc = _umbra("doctor")
    assert proc.returncode == doctor.EXIT_NO_RDMA
    assert "No RDMA device on this host" in proc.stdout
    assert "ci/softroce-run -- .venv/bin/umbra doctor" in proc.stdout


@no_device
def test_doctor_json_without_a_device():
    proc = _umbra("doctor", "--json")
    assert proc.returncode == doctor.EXIT_NO_RDMA
    report = json.loads(proc.stdout)
    assert report["verdict"] == "NO_DEVICE" and "ci/softroce-run" in report["hint"]
    assert report["devices"] == [] and report["loopback"] is None


@pytest.mark.parametrize("args", [["--gid-index", "x"], ["--gid-index", "-1"], ["--port", "one"]])
def test_doctor_usage_errors_exit_2(args, capsys):
    assert doctor.main(args) == 2
    assert "usage: umbra doctor" in capsys.readouterr().err


def test_doctor_rejects_a_non_positive_size(capsys):
    assert doctor.main(["--size", "0"]) == 2


def _g(index: int, gid: str, gid_type: str = "RoCE v2") -> GidEntry:
    return GidEntry(index=index, gid=gid, gid_type=gid_type, netdev="eth0")


def test_gid_choice_prefers_the_ipv4_mapped_roce_v2_entry():
    table = [_g(0, LINK_LOCAL), _g(1, MAPPED), _g(2, SITE)]
    assert choose_gid_index(table, "Ethernet") == 1


def test_gid_choice_skips_an_ipv4_mapped_roce_v1_entry():
    table = [_g(0, LINK_LOCAL, "RoCE v1"), _g(1, MAPPED, "RoCE v1"), _g(2, LINK_LOCAL), _g(3, MAPPED)]
    assert choose_gid_index(table, "Ethernet") == 3


def test_gid_choice_falls_back_to_roce_v2_then_to_anything():
    assert choose_gid_index([_g(0, LINK_LOCAL, "RoCE v1"), _g(4, SITE)], "Ethernet") == 4
    assert choose_gid_index([_g(2, LINK_LOCAL, "RoCE v1"), _g(5, MAPPED, "RoCE v1")], "Ethernet") == 2


def test_gid_choice_on_infiniband_and_on_an_empty_table():
    assert choose_gid_index([_g(0, LINK_LOCAL, "IB"), _g(1, SITE, "IB")], "InfiniBand") == 0
    assert choose_gid_index([], "Ethernet") is None
    assert choose_gid_index([_g(0, "::", "RoCE v2")], "Ethernet") is None


def test_gid_forms():
    g = _g(1, normalize_gid("::ffff:10.0.2.15"))
    assert g.gid == MAPPED and g.ipv4 == "10.0.2.15" and g.short == "::ffff:10.0.2.15"
    assert _g(0, LINK_LOCAL).ipv4 is None and _g(0, LINK_LOCAL).short == "fe80::5054:ff:fe12:3456"
    assert normalize_gid(LINK_LOCAL.upper()) == LINK_LOCAL


def test_mtu_conversions():
    assert [mtu_bytes(i) for i in range(1, 6)] == [256, 512, 1024, 2048, 4096]
    assert all(mtu_enum(mtu_bytes(i)) == i for i in range(1, 6))
    with pytest.raises(DeviceError):
        mtu_bytes(0)
    with pytest.raises(DeviceError):
        mtu_enum(1500)


@pytest.mark.parametrize(("netdev", "active"), [(1500, 1024), (9000, 4096), (4000, 2048), (1104, 1024),
                                                 (1103, 512), (1000, 512)])
def test_rxe_active_mtu(netdev, active):
    assert rxe_active_mtu(netdev) == active


def test_device_driver_from_sysfs(tmp_path: Path):
    rxe = tmp_path / "rxe0"
    rxe.mkdir()
    (rxe / "parent").write_text("eth0\n")
    (rxe / "node_type").write_text("1: CA\n")
    siw = tmp_path / "siw0"
    siw.mkdir()
    (siw / "parent").write_text("eth1\n")
    (siw / "node_type").write_text("4: RNIC\n")
    drivers = tmp_path / "bus" / "drivers" / "mlx5_core"
    drivers.mkdir(parents=True)
    pci = tmp_path / "bus" / "devices" / "0000:3b:00.0"
    pci.mkdir(parents=True)
    (pci / "driver").symlink_to(drivers)
    mlx = tmp_path / "mlx5_0"
    mlx.mkdir()
    (mlx / "device").symlink_to(pci)
    assert device_driver("rxe0", tmp_path) == "rdma_rxe"
    assert device_driver("siw0", tmp_path) == "siw"
    assert device_driver("mlx5_0", tmp_path) == "mlx5_core"
    assert list_device_names(tmp_path) == ["bus", "mlx5_0", "rxe0", "siw0"]
    assert list_device_names(tmp_path / "absent") == []


class _FakeContext:
    """Answers the three queries gid_table makes, the way pyverbs 44 does on rxe (two ports here)."""

    def __init__(self) -> None:
        raw = [(0, 1, LINK_LOCAL, 2), (1, 1, MAPPED, 2), (0, 2, SITE, 1), (3, 1, SITE, 0)]
        self.entries = [SimpleNamespace(gid_index=i, port_num=p, gid_str=lambda g=g: g, gid_type=t,
                                        ndev_ifindex=1) for i, p, g, t in raw]
        self.asked: list[int] = []

    def query_device(self) -> SimpleNamespace:
        return SimpleNamespace(phys_port_cnt=2)

    def query_port(self, port: int) -> SimpleNamespace:
        return SimpleNamespace(gid_tbl_len=1024 if port == 1 else 16)

    def query_gid_table(self, max_entries: int) -> list[SimpleNamespace]:
        self.asked.append(max_entries)
        return self.entries


def test_gid_table_translates_the_table_type_enum_and_filters_the_port():
    ctx = _FakeContext()
    table = gid_table(ctx, 1)
    assert ctx.asked == [1024 + 16]  # room for every port's entries in one call
    assert [(g.index, g.gid, g.gid_type, g.netdev) for g in table] == [
        (0, LINK_LOCAL, "RoCE v2", "lo"), (1, MAPPED, "RoCE v2", "lo"), (3, SITE, "IB", "lo")]
    assert [(g.index, g.gid_type) for g in gid_table(ctx, 2)] == [(0, "RoCE v1")]

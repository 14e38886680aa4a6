"""RDMA device, port and GID discovery shared by ``umbra doctor`` and the RDMA transport.

Why a module of its own: the doctor must describe a host with no RDMA at all (so listing devices
goes through sysfs and pyverbs is imported only when a device exists), and the transport must choose
its GID index by exactly the rule the doctor recommends, so that "doctor says index 1" and "the
transport uses index 1" cannot drift apart.

GID choice (Mooncake's ``getBestGidIndex``, extended for ports without one): on Ethernet (RoCE) the
first RoCE v2 GID that is IPv4-mapped (``::ffff:a.b.c.d``: routable between hosts, stable, what
``ib_write_bw -x`` users pick); else the first RoCE v2 GID; else the first GID. On InfiniBand the
first GID (index 0 holds the port GID). Link-local and site-local entries come and go at run time
(SLAAC), the IPv4-mapped one does not.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from store.transfer.rdma.errors import DeviceError

SYSFS_ROOT = Path("/sys/class/infiniband")
GUEST_HINT = "run inside the Soft-RoCE guest: ci/softroce-run -- .venv/bin/umbra doctor"

# enum ibv_mtu <-> bytes
_MTU_BYTES = {1: 256, 2: 512, 3: 1024, 4: 2048, 5: 4096}
_MTU_ENUM = {v: k for k, v in _MTU_BYTES.items()}
# enum ibv_port_state
_PORT_STATES = {0: "NOP", 1: "DOWN", 2: "INIT", 3: "ARMED", 4: "ACTIVE", 5: "ACTIVE_DEFER"}
PORT_ACTIVE = 4
# enum ibv_port_link_layer (Unspecified means InfiniBand on old drivers)
_LINK_LAYERS = {0: "InfiniBand", 1: "InfiniBand", 2: "Ethernet"}
# enum ibv_gid_type (ibv_query_gid_table) and the sysfs enum (ibv_query_gid_type)
_GID_TYPES = {0: "IB", 1: "RoCE v1", 2: "RoCE v2"}
_GID_TYPES_SYSFS = {0: "IB/RoCE v1", 1: "RoCE v2"}
_TRANSPORTS = {0: "InfiniBand", 1: "iWARP", 2: "usNIC", 3: "usNIC UDP", 4: "unspecified"}
ROCE_V2 = "RoCE v2"


class PyverbsUnavailable(DeviceError):
    """pyverbs cannot be imported (Debian's python3-pyverbs is not linked into this environment)."""


def mtu_bytes(mtu_enum: int) -> int:
    """``IBV_MTU_1024`` (3) → 1024. Raises ``DeviceError`` for a value outside the verbs enum."""
    try:
        return _MTU_BYTES[int(mtu_enum)]
    except KeyError:
        raise DeviceError(f"unknown ibv_mtu value {mtu_enum}") from None


def mtu_enum(nbytes: int) -> int:
    """1024 → ``IBV_MTU_1024`` (3)."""
    try:
        return _MTU_ENUM[int(nbytes)]
    except KeyError:
        raise DeviceError(f"RDMA MTU must be one of {sorted(_MTU_ENUM)} bytes, got {nbytes}") from None


def rxe_active_mtu(netdev_mtu: int) -> int:
    """The active MTU Soft-RoCE reports for its netdev's MTU: the largest IB MTU not above
    ``netdev_mtu - RXE_MAX_HDR_LENGTH`` (80), so 1500 → 1024 and 9000 → 4096 (rxe_param.h)."""
    fitting = [size for size in _MTU_ENUM if size <= netdev_mtu - 80]
    if not fitting:
        raise DeviceError(f"netdev MTU {netdev_mtu} is too small for RoCE")
    return max(fitting)


def import_pyverbs() -> None:
    """Import pyverbs or raise a typed error that says how to get it."""
    try:
        import pyverbs.device  # noqa: F401
    except ImportError as exc:
        raise PyverbsUnavailable(
            f"pyverbs is not importable ({exc}); Debian's python3-pyverbs (rdma-core 44) is the one "
            f"that matches this libibverbs; bash ci/setup.sh links it into .venv") from exc


# ------------------------------------------------------------------------------------- sysfs

def list_device_names(root: Path = SYSFS_ROOT) -> list[str]:
    """RDMA devices the kernel exposes. sysfs, not pyverbs: works where pyverbs is missing."""
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def device_driver(name: str, root: Path = SYSFS_ROOT) -> str:
    """Kernel driver behind a device: ``mlx5_core`` for hardware, ``rdma_rxe``/``siw`` for the
    software devices (which have a parent netdev and no PCI device)."""
    dev = root / name
    drv = dev / "device" / "driver"
    if drv.exists():
        return drv.resolve().name
    if (dev / "parent").exists():
        node_type = _read(dev / "node_type") or ""
        return "siw" if "RNIC" in node_type else "rdma_rxe"
    return "unknown"


def is_soft_roce(name: str, root: Path = SYSFS_ROOT) -> bool:
    return device_driver(name, root) == "rdma_rxe"


# -------------------------------------------------------------------------------------- data

def normalize_gid(text: str) -> str:
    """Any GID spelling → the 8-group, 4-digit form pyverbs prints (``0000:…:ffff:0a00:020f``)."""
    return ipaddress.IPv6Address(text.strip()).exploded


@dataclass(frozen=True)
class GidEntry:
    index: int
    gid: str  # normalized 8-group form
    gid_type: str  # "RoCE v2", "RoCE v1", "IB" or "IB/RoCE v1" (the sysfs type cannot tell those apart)
    netdev: str | None = None

    @property
    def address(self) -> ipaddress.IPv6Address:
        return ipaddress.IPv6Address(self.gid)

    @property
    def ipv4(self) -> str | None:
        """The IPv4 address of an IPv4-mapped GID, else ``None``."""
        mapped = self.address.ipv4_mapped
        return str(mapped) if mapped is not None else None

    @property
    def is_zero(self) -> bool:
        return int(self.address) == 0

    @property
    def short(self) -> str:
        """Compressed form, with an IPv4-mapped GID written the usual way (``::ffff:10.0.2.15``)."""
        ipv4 = self.ipv4
        return f"::ffff:{ipv4}" if ipv4 is not None else str(self.address)


@dataclass
class PortInfo:
    port: int
    state: str
    active_mtu: int  # bytes
    max_mtu: int  # bytes
    link_layer: str
    lid: int
    gid_tbl_len: int
    gids: list[GidEntry] = field(default_factory=list)
    recommended_gid_index: int | None = None

    @property
    def active(self) -> bool:
        return self.state == "ACTIVE"


@dataclass
class DeviceInfo:
    name: str
    node_guid: str
    node_type: str
    transport: str
    driver: str
    parent_netdev: str | None
    fw_version: str
    ports: list[PortInfo] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for port, raw in zip(self.ports, out["ports"], strict=True):
            raw["gids"] = [dict(index=g.index, gid=g.gid, short=g.short, type=g.gid_type, netdev=g.netdev,
                                ipv4=g.ipv4) for g in port.gids]
        return out


def choose_gid_index(entries: list[GidEntry], link_layer: str) -> int | None:
    """The recommended GID index among valid entries (see the module docstring), or ``None``."""
    usable = [g for g in entries if not g.is_zero]
    if not usable:
        return None
    if link_layer != "Ethernet":
        return usable[0].index
    for g in usable:
        if g.gid_type == ROCE_V2 and g.ipv4 is not None:
            return g.index
    for g in usable:
        if g.gid_type == ROCE_V2:
            return g.index
    return usable[0].index


# ---------------------------------------------------------------------------------- pyverbs

def _ifname(ifindex: int) -> str | None:
    if ifindex <= 0:
        return None
    try:
        return socket.if_indextoname(ifindex)
    except OSError:
        return None


def gid_table(ctx: Any, port: int, gid_tbl_len: int | None = None) -> list[GidEntry]:
    """The valid GID entries of one port, with types and netdevs.

    Uses ``ibv_query_gid_table`` (one call, valid entries only): a RoCE port has 1024 slots, mostly
    empty, and querying them one by one costs seconds under emulation. Falls back to per-index
    queries where the call is missing.
    """
    if gid_tbl_len is None:
        gid_tbl_len = int(ctx.query_port(port).gid_tbl_len)
    if hasattr(ctx, "query_gid_table"):
        dev_attr = ctx.query_device()
        total = 0
        for p in range(1, int(dev_attr.phys_port_cnt) + 1):
            total += int(ctx.query_port(p).gid_tbl_len)
        out = []
        for g in ctx.query_gid_table(max(total, 1)):
            if int(g.port_num) != port:
                continue
            out.append(GidEntry(index=int(g.gid_index), gid=normalize_gid(g.gid_str()),
                                gid_type=_GID_TYPES.get(int(g.gid_type), f"type {int(g.gid_type)}"),
                                netdev=_ifname(int(g.ndev_ifindex))))
        return sorted(out, key=lambda g: g.index)
    from pyverbs.pyverbs_error import PyverbsError

    out = []
    for i in range(gid_tbl_len):
        try:
            gid = normalize_gid(str(ctx.query_gid(port, i)))
        except PyverbsError:
            continue
        if int(ipaddress.IPv6Address(gid)) == 0:
            continue
        try:
            gid_type = _GID_TYPES_SYSFS.get(int(ctx.query_gid_type(port, i)), "unknown")
        except PyverbsError:
            gid_type = "unknown"
        out.append(GidEntry(index=i, gid=gid, gid_type=gid_type))
    return out


def port_info(ctx: Any, port: int) -> PortInfo:
    attr = ctx.query_port(port)
    info = PortInfo(port=port, state=_PORT_STATES.get(int(attr.state), f"state {int(attr.state)}"),
                    active_mtu=mtu_bytes(int(attr.active_mtu)), max_mtu=mtu_bytes(int(attr.max_mtu)),
                    link_layer=_LINK_LAYERS.get(int(attr.link_layer), f"link layer {int(attr.link_layer)}"),
                    lid=int(attr.lid), gid_tbl_len=int(attr.gid_tbl_len))
    info.gids = gid_table(ctx, port, info.gid_tbl_len)
    info.recommended_gid_index = choose_gid_index(info.gids, info.link_layer)
    return info


def pick_gid_index(ctx: Any, port: int) -> int:
    """The GID index to use on ``port`` of an open context (the transport's ``auto``)."""
    info = port_info(ctx, port)
    if info.recommended_gid_index is None:
        raise DeviceError(f"port {port}: the GID table has no valid entry (link layer {info.link_layer}, "
                          f"state {info.state})")
    return info.recommended_gid_index


def describe_device(name: str, root: Path = SYSFS_ROOT) -> DeviceInfo:
    """Everything the doctor prints about one device; opens and closes its own context."""
    import_pyverbs()
    from pyverbs.device import Context
    from pyverbs.pyverbs_error import PyverbsError

    try:
        ctx = Context(name=name)
    except PyverbsError as exc:
        raise DeviceError(f"cannot open RDMA device {name}: {exc}") from exc
    try:
        attr = ctx.query_device()
        transport = "unknown"
        from pyverbs.device import get_device_list

        for dev in get_device_list():
            if dev.name.decode() == name:
                transport = _TRANSPORTS.get(int(dev.transport_type), str(dev.transport_type))
        info = DeviceInfo(name=name, node_guid=_read(root / name / "node_guid") or "?",
                          node_type=_read(root / name / "node_type") or "?", transport=transport,
                          driver=device_driver(name, root), parent_netdev=_read(root / name / "parent"),
                          fw_version=str(attr.fw_version))
        for port in range(1, int(attr.phys_port_cnt) + 1):
            info.ports.append(port_info(ctx, port))
        return info
    except PyverbsError as exc:
        raise DeviceError(f"querying RDMA device {name} failed: {exc}") from exc
    finally:
        ctx.close()

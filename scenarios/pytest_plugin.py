"""Umbra's pytest plugin: RDMA options and markers, skipping RDMA tests with a stated reason.

Device, port and GID index come from options or the environment so that the same tests run on
Soft-RoCE inside the guest and on mlx5 hardware:
``--rdma-device`` / ``UMBRA_RDMA_DEVICE``, ``--rdma-port`` / ``UMBRA_RDMA_PORT``,
``--rdma-gid-index`` / ``UMBRA_RDMA_GID_INDEX`` (``auto`` picks the first RoCE v2 IPv4-mapped GID).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

GUEST_HINT = "run them inside the Soft-RoCE guest: ci/softroce-run -- .venv/bin/python -m pytest -m rdma"


@dataclass(frozen=True)
class RdmaTarget:
    device: str
    port: int
    gid_index: int | None  # None = auto


def list_rdma_devices() -> list[str]:
    """RDMA devices the kernel exposes (sysfs: no pyverbs needed to find out that there are none)."""
    root = Path("/sys/class/infiniband")
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("umbra")
    group.addoption("--rdma-device", default=os.environ.get("UMBRA_RDMA_DEVICE", ""),
                    help="RDMA device for rdma tests (default: first device found)")
    group.addoption("--rdma-port", type=int, default=int(os.environ.get("UMBRA_RDMA_PORT", "1")),
                    help="RDMA port number (default 1)")
    group.addoption("--rdma-gid-index", default=os.environ.get("UMBRA_RDMA_GID_INDEX", "auto"),
                    help="GID index, or 'auto' for the first RoCE v2 IPv4-mapped GID")


def _rdma_skip_reason() -> str | None:
    devices = list_rdma_devices()
    if not devices:
        return f"no RDMA device on this host (/sys/class/infiniband is empty); {GUEST_HINT}"
    try:
        import pyverbs.device  # noqa: F401
    except ImportError as exc:
        return f"pyverbs is not importable ({exc}); run ci/setup.sh, which links Debian's python3-pyverbs"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rdma_items = [i for i in items if i.get_closest_marker("rdma")]
    if not rdma_items:
        return
    reason = _rdma_skip_reason()
    if reason is None:
        return
    marker = pytest.mark.skip(reason=reason)
    for item in rdma_items:
        item.add_marker(marker)


@pytest.fixture(scope="session")
def rdma_target(pytestconfig: pytest.Config) -> RdmaTarget:
    """The RDMA device/port/GID index the rdma tests use."""
    reason = _rdma_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    device = pytestconfig.getoption("--rdma-device") or list_rdma_devices()[0]
    gid = pytestconfig.getoption("--rdma-gid-index")
    return RdmaTarget(device=device, port=int(pytestconfig.getoption("--rdma-port")),
                      gid_index=None if str(gid) == "auto" else int(gid))

"""Umbra's pytest plugin: RDMA options and markers, skipping RDMA tests with a stated reason.

Device, port and GID index come from options or the environment so that the same tests run on
Soft-RoCE inside the guest and on mlx5 hardware:
``--rdma-device`` / ``UMBRA_RDMA_DEVICE``, ``--rdma-port`` / ``UMBRA_RDMA_PORT``,
``--rdma-gid-index`` / ``UMBRA_RDMA_GID_INDEX`` (``auto`` picks the first RoCE v2 IPv4-mapped GID).

Markers: ``rdma`` tests skip when there is no RDMA device or no pyverbs (and say how to run them:
inside the Soft-RoCE guest); ``softroce`` tests additionally need the target device to be rxe, and
``mlx5`` tests an mlx5 device. A device named with ``--rdma-device`` that does not exist is a usage
error rather than a skip, so a typo on a hardware runner cannot turn the RDMA suite into skips.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

GUEST_HINT = ("run them inside the Soft-RoCE guest: "
              "ci/softroce-run -- .venv/bin/python -m pytest -m rdma tests/rdma")
SYSFS_ROOT = Path("/sys/class/infiniband")


@dataclass(frozen=True)
class RdmaTarget:
    device: str
    port: int
    gid_index: int | None  # None = auto
    driver: str = ""  # kernel driver: rdma_rxe, mlx5_core, ...


def list_rdma_devices() -> list[str]:
    """RDMA devices the kernel exposes (sysfs: no pyverbs needed to find out that there are none)."""
    return sorted(p.name for p in SYSFS_ROOT.iterdir()) if SYSFS_ROOT.is_dir() else []


def device_driver(name: str) -> str:
    """``rdma_rxe`` for Soft-RoCE, the PCI driver (``mlx5_core``) for hardware; see store's discovery."""
    from store.transfer.rdma.device import device_driver as _driver

    return _driver(name, SYSFS_ROOT)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("umbra")
    group.addoption("--rdma-device", default=os.environ.get("UMBRA_RDMA_DEVICE", ""),
                    help="RDMA device for rdma tests (default: first device found)")
    group.addoption("--rdma-port", type=int, default=int(os.environ.get("UMBRA_RDMA_PORT", "1")),
                    help="RDMA port number (default 1)")
    group.addoption("--rdma-gid-index", default=os.environ.get("UMBRA_RDMA_GID_INDEX", "auto"),
                    help="GID index, or 'auto' for the first RoCE v2 IPv4-mapped GID")


def _gid_index(value: object) -> int | None:
    text = str(value).strip()
    if text in ("auto", "-1", ""):
        return None
    try:
        index = int(text)
    except ValueError:
        raise pytest.UsageError(f"--rdma-gid-index must be an integer or 'auto', got {text!r}") from None
    if index < 0:
        raise pytest.UsageError(f"--rdma-gid-index must be >= 0 or 'auto', got {index}")
    return index


def _rdma_skip_reason() -> str | None:
    devices = list_rdma_devices()
    if not devices:
        return f"no RDMA device on this host (/sys/class/infiniband is empty); {GUEST_HINT}"
    try:
        import pyverbs.device  # noqa: F401
    except ImportError as exc:
        return f"pyverbs is not importable ({exc}); run ci/setup.sh, which links Debian's python3-pyverbs"
    return None


def _target(config: pytest.Config) -> RdmaTarget:
    devices = list_rdma_devices()
    name = config.getoption("--rdma-device") or devices[0]
    if name not in devices:
        raise pytest.UsageError(f"RDMA device {name!r} (--rdma-device / UMBRA_RDMA_DEVICE) does not exist; "
                                f"devices here: {', '.join(devices)}")
    return RdmaTarget(device=name, port=int(config.getoption("--rdma-port")),
                      gid_index=_gid_index(config.getoption("--rdma-gid-index")), driver=device_driver(name))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rdma_items = [i for i in items if i.get_closest_marker("rdma")]
    if not rdma_items:
        return
    reason = _rdma_skip_reason()
    if reason is not None:
        marker = pytest.mark.skip(reason=reason)
        for item in rdma_items:
            item.add_marker(marker)
        return
    target = _target(config)
    needs = {"softroce": ("rdma_rxe", "Soft-RoCE (rdma_rxe)"), "mlx5": ("mlx5_core", "an mlx5 device")}
    for item in rdma_items:
        for mark, (driver, what) in needs.items():
            if item.get_closest_marker(mark) and target.driver != driver:
                item.add_marker(pytest.mark.skip(
                    reason=f"needs {what}; {target.device} is driven by {target.driver or 'unknown'}"))


@pytest.fixture(scope="session")
def rdma_target(pytestconfig: pytest.Config) -> RdmaTarget:
    """The RDMA device/port/GID index the rdma tests use (``gid_index`` None means auto)."""
    reason = _rdma_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    return _target(pytestconfig)

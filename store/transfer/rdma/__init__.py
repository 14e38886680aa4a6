"""RDMA transport over pyverbs, plus device discovery and ``umbra doctor``.

Importing this package does not import pyverbs: ``device`` and ``doctor`` must work (and say what is
missing) on a host without RDMA devices or without pyverbs; only the modules that post work
requests need it.
"""

from typing import Any


def __getattr__(name: str) -> Any:
    """``store.transfer.rdma.RdmaTransport`` (the engine's ``TRANSPORTS["rdma"]``), imported on first
    use so that importing the package stays free of pyverbs."""
    if name == "RdmaTransport":
        from store.transfer.rdma.transport import RdmaTransport

        return RdmaTransport
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

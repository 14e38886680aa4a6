"""Umbra's Mooncake-compatible client (``from store.client import Client, ReplicateConfig``).

``MooncakeDistributedStore`` is an alias of :class:`Client`, so code written for
``mooncake.store`` switches by changing its import. See :mod:`store.client.core` for the data path
and :mod:`store.client.holder` for the segment-holding process used by tests, benchmarks and
scenarios.
"""

from store.client.core import Client, MooncakeDistributedStore
from store.client.types import OpRecord, ReplicateConfig

__all__ = ["Client", "MooncakeDistributedStore", "OpRecord", "ReplicateConfig"]

"""The master: object metadata, leases, eviction, GC and client liveness, and its server.

- :mod:`store.master.service` — the state machine (``MasterService``), clock injected, no threads.
- :mod:`store.master.server` — ``umbra master``: asyncio RPC server + HTTP metrics around it.
- :mod:`store.master.client` — ``MasterClient``, the typed RPC stub, and ``Heartbeat``.
- :mod:`store.master.types` — wire types (``Segment``, ``ReplicaDescriptor``, ``ReplicaList``...).
"""

from store.master.config import MasterConfig
from store.master.types import (
    BatchItem,
    ClientStatus,
    PingResult,
    ReplicaDescriptor,
    ReplicaList,
    ReplicaStatus,
    ReplicateConfig,
    Segment,
)

__all__ = [
    "BatchItem",
    "ClientStatus",
    "MasterConfig",
    "PingResult",
    "ReplicaDescriptor",
    "ReplicaList",
    "ReplicaStatus",
    "ReplicateConfig",
    "Segment",
]

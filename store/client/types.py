"""Small value types of the client API: ``ReplicateConfig`` and the per-operation record."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from store.errors import ErrorCode, StoreError
from store.master.types import ReplicateConfig as WireReplicateConfig


@dataclass
class ReplicateConfig:
    """Mooncake's Python ``ReplicateConfig``: mutable, so ``cfg = ReplicateConfig(); cfg.replica_num = 2``
    works as it does there.

    ``preferred_segment`` (Mooncake's single-segment field) and ``preferred_segments`` may both be
    given; the single one is tried first. Segment names are transfer-engine segment names
    (``host:port``, what :meth:`Client.get_hostname` returns on the owning client).
    """

    replica_num: int = 1
    with_soft_pin: bool = False
    preferred_segments: list[str] = field(default_factory=list)
    preferred_segment: str = ""

    def to_wire(self) -> WireReplicateConfig:
        """The master's form; ``StoreError(INVALID_PARAMS)`` for values it would refuse."""
        n = self.replica_num
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise StoreError(ErrorCode.INVALID_PARAMS, f"replica_num must be an int >= 1, got {n!r}")
        if not isinstance(self.with_soft_pin, bool):
            raise StoreError(ErrorCode.INVALID_PARAMS,
                             f"with_soft_pin must be a bool, got {self.with_soft_pin!r}")
        preferred = list(self.preferred_segments or ())
        if self.preferred_segment:
            preferred.insert(0, self.preferred_segment)
        if not all(isinstance(s, str) and s for s in preferred):
            raise StoreError(ErrorCode.INVALID_PARAMS,
                             f"preferred segments must be non-empty names, got {preferred!r}")
        return WireReplicateConfig(self.replica_num, self.with_soft_pin, tuple(preferred))


def to_wire_config(config: Any) -> WireReplicateConfig:
    """Accept the client's ``ReplicateConfig``, the master's, a Mooncake-style dict, or None."""
    if config is None:
        return WireReplicateConfig()
    if isinstance(config, ReplicateConfig):
        return config.to_wire()
    if isinstance(config, WireReplicateConfig):
        if config.replica_num < 1:
            raise StoreError(ErrorCode.INVALID_PARAMS, f"replica_num must be >= 1, got {config.replica_num}")
        return config
    if isinstance(config, dict):
        try:
            return ReplicateConfig(**config).to_wire()
        except TypeError as exc:
            raise StoreError(ErrorCode.INVALID_PARAMS, f"bad ReplicateConfig fields: {exc}") from exc
    raise StoreError(ErrorCode.INVALID_PARAMS,
                     f"config must be a ReplicateConfig, got {type(config).__name__}")


@dataclass(slots=True)
class OpRecord:
    """What the last operation of a thread did (``Client.last_op()``), for histories and checkers:
    ``code`` is the per-key result (0 ok), ``replica`` the segment name read or written first,
    ``failovers`` how many replicas were abandoned before the answer, ``retries`` the transfer
    engine's slice retries."""

    op: str
    key: str
    code: int
    size: int = 0
    replica: str = ""
    failovers: int = 0
    retries: int = 0

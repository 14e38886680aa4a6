"""What the master's RPCs take and return, with their wire form (plain msgpack-able dicts).

Field names are stable: the client and transfer-engine layers build on them.

``Segment`` (argument of ``MountSegment`` / ``ReMountSegment``; Mooncake's ``Segment`` struct):
    ``id``          unique id of this mount (a uuid string; any non-empty string up to 256 bytes)
    ``name``        the owner's transfer-engine segment name, e.g. ``"127.0.0.1:12345"``
    ``base``        remote virtual address where the segment starts (> 0)
    ``size``        bytes (> 0; cachelib: base and size multiples of 16 MiB)
    ``protocol``    ``"tcp"`` or ``"rdma"``
    ``te_endpoint`` ``"host:port"`` of the owner's transfer server
    ``transport``   opaque dict the master stores and returns untouched (RDMA rkey, device GIDs, ...)

``ReplicaDescriptor`` (one buffer descriptor per replica, returned by PutStart / GetReplicaList):
    ``segment_id``, ``segment_name``, ``address`` (= segment base + offset), ``length`` (value
    bytes), ``te_endpoint``, ``protocol``, ``transport`` (the segment's opaque dict), ``status``
    (``"PROCESSING"`` or ``"COMPLETE"``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from store.errors import ErrorCode, StoreError

MAX_ID_BYTES = 256
MAX_SLICE_SIZE = 16 * 1024 * 1024 - 16  # Mooncake kMaxSliceSize: the cachelib mode's object cap


class ReplicaStatus(StrEnum):
    PROCESSING = "PROCESSING"
    COMPLETE = "COMPLETE"


class ClientStatus(StrEnum):
    OK = "OK"
    NEED_REMOUNT = "NEED_REMOUNT"


def _bad(message: str) -> StoreError:
    return StoreError(ErrorCode.INVALID_PARAMS, message)


def check_int(name: str, value: Any, *, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"{name} must be an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise _bad(f"{name} must be >= {minimum}, got {value}")
    return value


def check_id(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise _bad(f"{name} must be a non-empty string, got {value!r:.80}")
    if len(value.encode()) > MAX_ID_BYTES:
        raise _bad(f"{name} longer than {MAX_ID_BYTES} bytes")
    return value


def check_checksum(value: Any) -> int | None:
    """An object checksum (XXH64, so an unsigned 64-bit int) or None."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 64:
        raise _bad(f"checksum must be an unsigned 64-bit int or None, got {value!r:.40}")
    return value


def check_key(key: Any, max_bytes: int) -> str:
    """Mooncake answers INVALID_PARAMS to an empty key; Umbra also caps key length (INVALID_KEY)."""
    if not isinstance(key, str):
        raise _bad(f"key must be a string, got {type(key).__name__}")
    if not key:
        raise _bad("key must not be empty")
    if len(key) > max_bytes // 4 and len(key.encode()) > max_bytes:
        raise StoreError(ErrorCode.INVALID_KEY, f"key of {len(key.encode())} bytes exceeds {max_bytes}")
    return key


@dataclass(frozen=True, slots=True)
class ReplicateConfig:
    """How many replicas and where (Mooncake ``ReplicateConfig``; preferred_segment folded in)."""

    replica_num: int = 1
    with_soft_pin: bool = False
    preferred_segments: tuple[str, ...] = ()

    def to_wire(self) -> dict[str, Any]:
        return {"replica_num": self.replica_num, "with_soft_pin": self.with_soft_pin,
                "preferred_segments": list(self.preferred_segments)}

    @classmethod
    def from_wire(cls, d: Any) -> ReplicateConfig:
        if d is None:
            return cls()
        if isinstance(d, ReplicateConfig):
            return d
        if not isinstance(d, dict):
            raise _bad(f"config must be a map, got {type(d).__name__}")
        unknown = set(d) - {"replica_num", "with_soft_pin", "preferred_segments", "preferred_segment"}
        if unknown:
            raise _bad(f"unknown ReplicateConfig fields {sorted(map(str, unknown))}")
        replica_num = check_int("replica_num", d.get("replica_num", 1))
        soft = d.get("with_soft_pin", False)
        if not isinstance(soft, bool):
            raise _bad("with_soft_pin must be a bool")
        preferred = d.get("preferred_segments", [])
        if not isinstance(preferred, list | tuple) or not all(isinstance(s, str) for s in preferred):
            raise _bad("preferred_segments must be a list of segment names")
        single = d.get("preferred_segment")
        if single:
            if not isinstance(single, str):
                raise _bad("preferred_segment must be a segment name")
            preferred = [single, *preferred]
        return cls(replica_num, soft, tuple(preferred))


@dataclass(frozen=True, slots=True)
class Segment:
    """A segment a client offers to the store (see the module docstring for each field)."""

    id: str
    name: str
    base: int
    size: int
    protocol: str = "tcp"
    te_endpoint: str = ""
    transport: dict[str, Any] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "base": self.base, "size": self.size,
                "protocol": self.protocol, "te_endpoint": self.te_endpoint,
                "transport": dict(self.transport)}

    @classmethod
    def from_wire(cls, d: Any) -> Segment:
        if isinstance(d, Segment):
            return d
        if not isinstance(d, dict):
            raise _bad(f"segment must be a map, got {type(d).__name__}")
        unknown = set(d) - {"id", "name", "base", "size", "protocol", "te_endpoint", "transport"}
        if unknown:
            raise _bad(f"unknown segment fields {sorted(map(str, unknown))}")
        transport = d.get("transport", {})
        if not isinstance(transport, dict) or not all(isinstance(k, str) for k in transport):
            raise _bad("segment transport must be a map with string keys")
        protocol = d.get("protocol", "tcp")
        te_endpoint = d.get("te_endpoint", "")
        if not isinstance(protocol, str) or not isinstance(te_endpoint, str):
            raise _bad("segment protocol and te_endpoint must be strings")
        return cls(id=check_id("segment id", d.get("id")), name=check_id("segment name", d.get("name")),
                   base=check_int("segment base", d.get("base")),
                   size=check_int("segment size", d.get("size")),
                   protocol=protocol, te_endpoint=te_endpoint, transport=transport)


@dataclass(frozen=True, slots=True)
class ReplicaDescriptor:
    """Where one replica's bytes live (the buffer descriptor handed to the client)."""

    segment_id: str
    segment_name: str
    address: int
    length: int
    te_endpoint: str
    protocol: str
    transport: dict[str, Any]
    status: ReplicaStatus

    def to_wire(self) -> dict[str, Any]:
        return {"segment_id": self.segment_id, "segment_name": self.segment_name,
                "address": self.address, "length": self.length, "te_endpoint": self.te_endpoint,
                "protocol": self.protocol, "transport": self.transport, "status": str(self.status)}

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> ReplicaDescriptor:
        return cls(d["segment_id"], d["segment_name"], d["address"], d["length"], d["te_endpoint"],
                   d["protocol"], d["transport"], ReplicaStatus(d["status"]))


@dataclass(frozen=True, slots=True)
class ReplicaList:
    """GetReplicaList's answer. ``lease_granted`` is False in legacy-GC mode (Mooncake v0.3.5
    granted no lease to a GC'd read), so a client knows its lease-deadline guard does not apply."""

    key: str
    size: int
    replicas: tuple[ReplicaDescriptor, ...]
    lease_ttl_ms: int
    lease_granted: bool = True
    checksum: int | None = None  # XXH64 the writer recorded at PutEnd (Umbra; None = none recorded)

    def to_wire(self) -> dict[str, Any]:
        return {"key": self.key, "size": self.size, "replicas": [r.to_wire() for r in self.replicas],
                "lease_ttl_ms": self.lease_ttl_ms, "lease_granted": self.lease_granted,
                "checksum": self.checksum}

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> ReplicaList:
        return cls(d["key"], d["size"], tuple(ReplicaDescriptor.from_wire(r) for r in d["replicas"]),
                   d["lease_ttl_ms"], d["lease_granted"], d.get("checksum"))


@dataclass(frozen=True, slots=True)
class PingResult:
    """``view_version`` changes when the master restarts; NEED_REMOUNT asks for ReMountSegment."""

    view_version: int
    status: ClientStatus

    def to_wire(self) -> dict[str, Any]:
        return {"view_version": self.view_version, "status": str(self.status)}

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> PingResult:
        return cls(d["view_version"], ClientStatus(d["status"]))


@dataclass(frozen=True, slots=True)
class BatchItem:
    """One key's outcome inside a batch RPC (batches may succeed partially, as in Mooncake)."""

    code: ErrorCode
    value: Any = None
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.code == ErrorCode.OK

    def unwrap(self) -> Any:
        if self.code != ErrorCode.OK:
            raise StoreError(self.code, self.message)
        return self.value

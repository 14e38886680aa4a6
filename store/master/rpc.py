"""The master's wire protocol: msgpack frames over TCP, and the table of methods.

Frame: a 4-byte big-endian unsigned length, then that many bytes of msgpack.

- request  ``[request_id: int >= 0, method: str, params: map]``
- response ``[request_id, code: int, result, message: str]``; ``code`` is an
  :class:`~store.errors.ErrorCode` (0 = OK) and ``result`` is None unless OK.

A frame larger than ``max_frame_bytes`` (BUFFER_OVERFLOW), one that does not decode or does not
have the request shape (INVALID_PARAMS), or one cut short (INVALID_PARAMS) gets an error response
with ``request_id`` 0 when none could be read, and the connection is closed: after a bad frame the
byte stream cannot be trusted. An unknown method (NOT_SUPPORTED) or bad parameters
(INVALID_PARAMS) get an error response and the connection stays open. Nothing of this changes the
master's state.

Methods carry Mooncake's RPC names (``PutStart``, ``GetReplicaList``, ``ReMountSegment``, ...);
Umbra's introspection and fault-control methods are listed in :data:`ADMIN_METHODS` and never wait
behind a paused failpoint.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack

from store import failpoints
from store.errors import ErrorCode, StoreError
from store.master.service import MasterService
from store.master.types import BatchItem

HEADER = struct.Struct(">I")
DEFAULT_MAX_FRAME = 64 * 1024 * 1024


class FrameError(Exception):
    """A frame that cannot be trusted: reply with ``code`` and close the connection."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def pack(obj: Any) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return HEADER.pack(len(body)) + body


def unpack(body: bytes) -> Any:
    try:
        return msgpack.unpackb(body, raw=False, strict_map_key=True)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise FrameError(ErrorCode.INVALID_PARAMS, f"frame does not decode as msgpack: {exc}") from exc


def parse_request(obj: Any) -> tuple[int, str, dict[str, Any]]:
    if not isinstance(obj, list | tuple) or len(obj) != 3:
        raise FrameError(ErrorCode.INVALID_PARAMS, "request must be [request_id, method, params]")
    req_id, method, params = obj
    if isinstance(req_id, bool) or not isinstance(req_id, int) or req_id < 0 or req_id >= 1 << 63:
        raise FrameError(ErrorCode.INVALID_PARAMS,
                         f"request_id must be an int in [0, 2^63), got {req_id!r:.40}")
    if not isinstance(method, str) or not isinstance(params, dict):
        raise FrameError(ErrorCode.INVALID_PARAMS, "method must be a string and params a map")
    return req_id, method, params


def response(req_id: int, code: ErrorCode | int, result: Any = None, message: str = "") -> bytes:
    return pack([req_id, int(code), result, message])


# ------------------------------------------------------------------------------------------
# Method table


@dataclass(frozen=True)
class Method:
    fn: Callable[[MasterService, dict[str, Any]], Any]
    required: tuple[str, ...]
    optional: tuple[str, ...] = ()
    admin: bool = False
    allowed: frozenset[str] = field(init=False, repr=False, compare=False)  # required | optional

    def __post_init__(self) -> None:
        object.__setattr__(self, "allowed", frozenset(self.required) | frozenset(self.optional))


def _items(items: list[BatchItem], wire: Callable[[Any], Any] = lambda v: v) -> list[list[Any]]:
    return [[int(it.code), wire(it.value) if it.ok else None, it.message] for it in items]


def _descs(value: Any) -> Any:
    return [d.to_wire() for d in value]


def _arm(_: MasterService, p: dict[str, Any]) -> list[str]:
    spec = p["spec"]
    if not isinstance(spec, str):
        raise StoreError(ErrorCode.INVALID_PARAMS, "spec must be a string")
    try:
        return [fp.name for fp in failpoints.arm_from_spec(spec)]
    except ValueError as exc:
        raise StoreError(ErrorCode.INVALID_PARAMS, f"bad failpoint spec {spec!r}: {exc}") from exc


def _disarm(_: MasterService, p: dict[str, Any]) -> None:
    names = p.get("names")
    if names is None:
        failpoints.disarm_all()
        return
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise StoreError(ErrorCode.INVALID_PARAMS, "names must be a list of failpoint names")
    for n in names:
        failpoints.disarm(n)


def _release(_: MasterService, p: dict[str, Any]) -> None:
    if not isinstance(p["name"], str):
        raise StoreError(ErrorCode.INVALID_PARAMS, "name must be a string")
    failpoints.release(p["name"])


def _list_fps(_: MasterService, p: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"name": fp.name, "action": fp.action, "arg": fp.arg if not callable(fp.arg) else repr(fp.arg),
             "count": fp.count, "probability": fp.probability, "hits": fp.hits, "fired": fp.fired}
            for fp in failpoints.armed().values()]


def _fp_history(_: MasterService, p: dict[str, Any]) -> list[list[Any]]:
    return [[t, name, action, {k: v if isinstance(v, str | int | float | bool | None) else repr(v)
                               for k, v in ids.items()}]
            for t, name, action, ids in failpoints.history()]


def _inspect(svc: MasterService, p: dict[str, Any]) -> Any:
    what = p.get("what", "all")
    keys = p.get("keys")
    limit = p.get("limit")
    if keys is not None and (not isinstance(keys, list) or not all(isinstance(k, str) for k in keys)):
        raise StoreError(ErrorCode.INVALID_PARAMS, "keys must be a list of strings")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise StoreError(ErrorCode.INVALID_PARAMS, "limit must be a non-negative int")
    if what == "all":
        return svc.snapshot()
    if what == "objects":
        return svc.inspect_objects(keys, limit)
    if what == "segments":
        return svc.inspect_segments()
    if what == "clients":
        return svc.inspect_clients()
    if what == "counters":
        return svc.counters()
    if what == "gauges":
        g = svc.gauges()
        g["value_size_buckets"] = [[b if b != float("inf") else None, n] for b, n in g["value_size_buckets"]]
        return g
    if what == "keys":
        return svc.all_keys()
    raise StoreError(ErrorCode.INVALID_PARAMS, f"unknown inspect target {what!r}")


def _events(svc: MasterService, p: dict[str, Any]) -> dict[str, Any]:
    since = p.get("since", 0)
    limit = p.get("limit")
    for name, v in (("since", since), ("limit", limit)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise StoreError(ErrorCode.INVALID_PARAMS, f"{name} must be a non-negative int")
    return svc.events_since(since, limit)


def _eviction(svc: MasterService, p: dict[str, Any]) -> dict[str, Any] | None:
    r = svc.trigger_eviction()
    return None if r is None else {"used_ratio": r.used_ratio, "target": r.target, "lowerbound": r.lowerbound,
                                   "evicted_keys": r.evicted_keys, "freed_bytes": r.freed_bytes}


METHODS: dict[str, Method] = {
    "PutStart": Method(
        lambda s, p: _descs(s.put_start(p["client_id"], p["key"], p["length"], p.get("config"))),
        ("client_id", "key", "length"), ("config",)),
    "PutEnd": Method(lambda s, p: s.put_end(p["client_id"], p["key"], p.get("checksum")),
                     ("client_id", "key"), ("checksum",)),
    "PutRevoke": Method(lambda s, p: s.put_revoke(p["client_id"], p["key"]), ("client_id", "key")),
    "BatchPutStart": Method(lambda s, p: _items(s.batch_put_start(p["client_id"], p["keys"], p["lengths"],
                                                                  p.get("config")), _descs),
                            ("client_id", "keys", "lengths"), ("config",)),
    "BatchPutEnd": Method(lambda s, p: _items(s.batch_put_end(p["client_id"], p["keys"], p.get("checksums"))),
                          ("client_id", "keys"), ("checksums",)),
    "BatchPutRevoke": Method(lambda s, p: _items(s.batch_put_revoke(p["client_id"], p["keys"])),
                             ("client_id", "keys")),
    "GetReplicaList": Method(lambda s, p: s.get_replica_list(p["key"]).to_wire(), ("key",)),
    "BatchGetReplicaList": Method(
        lambda s, p: _items(s.batch_get_replica_list(p["keys"]), lambda v: v.to_wire()), ("keys",)),
    "ExistKey": Method(lambda s, p: s.exist_key(p["key"]), ("key",)),
    "BatchExistKey": Method(lambda s, p: _items(s.batch_exist_key(p["keys"])), ("keys",)),
    "Remove": Method(lambda s, p: s.remove(p["key"], p.get("force", False)), ("key",), ("force",)),
    "RemoveAll": Method(lambda s, p: s.remove_all(p.get("force", False)), (), ("force",)),
    "MountSegment": Method(lambda s, p: s.mount_segment(p["segment"], p["client_id"]),
                           ("segment", "client_id")),
    "ReMountSegment": Method(lambda s, p: s.remount_segment(p["segments"], p["client_id"]),
                             ("segments", "client_id")),
    "UnmountSegment": Method(lambda s, p: s.unmount_segment(p["segment_id"], p["client_id"]),
                             ("segment_id", "client_id")),
    "Ping": Method(lambda s, p: s.ping(p["client_id"]).to_wire(), ("client_id",)),
    "ServiceReady": Method(lambda s, p: True, (), admin=True),
    "TriggerEviction": Method(_eviction, ()),
    # introspection and fault control: answered at once, even while failpoints hold other calls
    "QueryKey": Method(lambda s, p: s.query_key(p["key"]), ("key",), admin=True),
    "Inspect": Method(_inspect, (), ("what", "keys", "limit"), admin=True),
    "Events": Method(_events, (), ("since", "limit"), admin=True),
    "CheckInvariants": Method(lambda s, p: s.check_invariants(), (), admin=True),
    "ArmFailpoints": Method(_arm, ("spec",), admin=True),
    "DisarmFailpoints": Method(_disarm, (), ("names",), admin=True),
    "ReleaseFailpoint": Method(_release, ("name",), admin=True),
    "ListFailpoints": Method(_list_fps, (), admin=True),
    "FailpointHistory": Method(_fp_history, (), admin=True),
}
ADMIN_METHODS = frozenset(n for n, m in METHODS.items() if m.admin)


def lookup(method: str) -> Method:
    m = METHODS.get(method)
    if m is None:
        raise StoreError(ErrorCode.NOT_SUPPORTED, f"unknown method {method!r:.80}")
    return m


def check_params(name: str, m: Method, params: dict[str, Any]) -> None:
    missing = [p for p in m.required if p not in params]
    if missing:
        raise StoreError(ErrorCode.INVALID_PARAMS, f"{name}: missing parameters {missing}")
    unknown = params.keys() - m.allowed
    if unknown:
        raise StoreError(ErrorCode.INVALID_PARAMS, f"{name}: unknown parameters {sorted(unknown)[:8]}")


def dispatch(svc: MasterService, method: str, params: dict[str, Any]) -> tuple[ErrorCode, Any, str]:
    """Run one call; every failure becomes a code (the connection and the server carry on)."""
    try:
        m = lookup(method)
        check_params(method, m, params)
        return ErrorCode.OK, m.fn(svc, params), ""
    except StoreError as exc:
        return exc.code, None, exc.message

"""The QP handshake: what two peers exchange to connect an endpoint, and the rules applied to it.

The active side (the one with slices to post) sends a :class:`HandshakeRequest` over the transfer
engine's control channel; the passive side (the segment owner) creates as many QPs, brings them to
RTS against the active QP numbers and answers with a :class:`HandshakeReply`; the active side then
brings its own QPs to RTR/RTS. Mooncake exchanges QP numbers only (PSN 0, path MTU chosen locally);
Umbra also exchanges fresh random PSNs per connection and each side's MTU, so

- a reconnect never reuses a PSN the responder may still accept as a duplicate (resetting one side
  and reusing its PSN makes writes complete with SUCCESS while no data lands), and
- the path MTU is ``min(local, peer)`` unless negotiation is switched off, which reproduces
  Mooncake's local-only choice (its issue #3868: mismatched MTUs give "remote invalid request
  error" on writes and retry-exceeded on reads).

Messages are plain dicts of JSON types, so any control channel (msgpack, JSON) can carry them.
"""

from __future__ import annotations

import ipaddress
import json
import random
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from store.transfer.rdma.config import MTU_ENUM
from store.transfer.rdma.errors import HandshakeError

VERSION = 1
MSG_HANDSHAKE = "rdma.handshake"
MSG_ENDPOINT_FAULT = "rdma.endpoint_fault"
MSG_DISCONNECT = "rdma.disconnect"

_U24 = (1 << 24) - 1
_GID_RE = re.compile(r"^[0-9a-fA-F]{4}(:[0-9a-fA-F]{4}){7}$")


def nic_path(server: str, device: str) -> str:
    """Mooncake's NIC path ``<server_name>@<device>`` that names one end of an endpoint."""
    return f"{server}@{device}"


def split_nic_path(path: str) -> tuple[str, str]:
    server, sep, device = path.rpartition("@")
    if not sep or not server or not device:
        raise HandshakeError(f"bad NIC path {path!r}: expected <host:port>@<device>")
    return server, device


def new_psn(rng: random.Random | None = None) -> int:
    """A fresh 24-bit packet sequence number."""
    return (rng or random.SystemRandom()).randint(0, _U24)


def negotiate_mtu(local_mtu: int, peer_mtu: int, negotiation: bool) -> int:
    """Path MTU in bytes: ``min(local, peer)`` with negotiation, the local choice without it."""
    for v in (local_mtu, peer_mtu):
        if v not in MTU_ENUM:
            raise HandshakeError(f"MTU {v} is not an InfiniBand MTU ({sorted(MTU_ENUM)})")
    return min(local_mtu, peer_mtu) if negotiation else local_mtu


def normalize_gid(gid: str) -> str:
    """GID in pyverbs' 8-group form (``0000:…:ffff:0a00:020f``); accepts IPv6 notation too."""
    g = gid.strip()
    if _GID_RE.match(g):
        return g.lower()
    try:
        packed = ipaddress.IPv6Address(g).packed
    except ValueError:
        raise HandshakeError(f"bad GID {gid!r}") from None
    return ":".join(packed[i:i + 2].hex() for i in range(0, 16, 2))


def _check_u24(name: str, values: list[int]) -> list[int]:
    out = []
    for v in values:
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= _U24:
            raise HandshakeError(f"{name}: {v!r} is not a 24-bit number")
        out.append(v)
    return out


@dataclass(frozen=True)
class HandshakeRequest:
    """Active → passive. ``ep_id`` is stable for an endpoint; ``generation`` grows per reconnect."""

    ep_id: str
    generation: int
    local_nic_path: str  # the active side: "<its server>@<its device>"
    peer_nic_path: str  # the passive side as the active side addresses it
    qp_nums: list[int]
    psns: list[int]
    gid: str
    lid: int = 0
    gid_index: int = 0
    mtu: int = 1024  # the active side's local MTU choice, bytes
    notify_endpoint: str = ""  # where the passive side reports faults of this endpoint
    version: int = VERSION

    def __post_init__(self) -> None:
        validate_request(self)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def encode(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":")).encode()

    @classmethod
    def from_dict(cls, d: dict[str, Any] | bytes | str) -> HandshakeRequest:
        d = _as_dict(d, "handshake request")
        _check_version(d)
        try:
            return cls(**{k: d[k] for k in _REQ_FIELDS if k in d})
        except TypeError as exc:
            raise HandshakeError(f"malformed handshake request: {exc}") from None


@dataclass(frozen=True)
class HandshakeReply:
    """Passive → active. ``error`` non-empty means rejected (Mooncake's ``reply_msg``)."""

    qp_nums: list[int] = field(default_factory=list)
    psns: list[int] = field(default_factory=list)
    gid: str = ""
    lid: int = 0
    mtu: int = 1024  # the passive side's local MTU choice, bytes
    path_mtu: int = 1024  # what the passive side applied to its QPs
    device: str = ""
    error: str = ""
    version: int = VERSION

    def __post_init__(self) -> None:
        if not self.error:
            validate_reply(self)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def encode(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":")).encode()

    @classmethod
    def rejected(cls, reason: str) -> HandshakeReply:
        return cls(error=reason or "rejected")

    @classmethod
    def from_dict(cls, d: dict[str, Any] | bytes | str) -> HandshakeReply:
        d = _as_dict(d, "handshake reply")
        _check_version(d)
        try:
            return cls(**{k: d[k] for k in _REP_FIELDS if k in d})
        except TypeError as exc:
            raise HandshakeError(f"malformed handshake reply: {exc}") from None


_REQ_FIELDS = tuple(HandshakeRequest.__dataclass_fields__)
_REP_FIELDS = tuple(HandshakeReply.__dataclass_fields__)


def _as_dict(d: dict[str, Any] | bytes | str, what: str) -> dict[str, Any]:
    if isinstance(d, bytes | bytearray | str):
        try:
            d = json.loads(d)
        except (ValueError, UnicodeDecodeError) as exc:
            raise HandshakeError(f"{what} is not JSON: {exc}") from None
    if not isinstance(d, dict):
        raise HandshakeError(f"{what} must be a mapping, got {type(d).__name__}")
    return d


def _check_version(d: dict[str, Any]) -> None:
    v = d.get("version", VERSION)
    if v != VERSION:
        raise HandshakeError(f"handshake version {v!r} not supported (this side speaks {VERSION})")


def validate_request(r: HandshakeRequest) -> None:
    if not r.ep_id:
        raise HandshakeError("handshake request without ep_id")
    split_nic_path(r.local_nic_path)
    split_nic_path(r.peer_nic_path)
    if not r.qp_nums:
        raise HandshakeError("handshake request carries no QP numbers")
    if len(r.qp_nums) != len(r.psns):
        raise HandshakeError(f"handshake request: {len(r.qp_nums)} QP numbers but {len(r.psns)} PSNs")
    _check_u24("qp_num", list(r.qp_nums))
    _check_u24("psn", list(r.psns))
    normalize_gid(r.gid)
    if r.mtu not in MTU_ENUM:
        raise HandshakeError(f"handshake request: MTU {r.mtu} is not an InfiniBand MTU")
    if r.generation < 0:
        raise HandshakeError(f"handshake request: negative generation {r.generation}")


def validate_reply(r: HandshakeReply) -> None:
    if not r.qp_nums:
        raise HandshakeError("handshake reply carries no QP numbers")
    if len(r.qp_nums) != len(r.psns):
        raise HandshakeError(f"handshake reply: {len(r.qp_nums)} QP numbers but {len(r.psns)} PSNs")
    _check_u24("qp_num", list(r.qp_nums))
    _check_u24("psn", list(r.psns))
    normalize_gid(r.gid)
    for name, v in (("mtu", r.mtu), ("path_mtu", r.path_mtu)):
        if v not in MTU_ENUM:
            raise HandshakeError(f"handshake reply: {name} {v} is not an InfiniBand MTU")


def check_reply_matches(req: HandshakeRequest, rep: HandshakeReply) -> None:
    """The passive side must answer with one QP per requested QP (Mooncake requires equal counts)."""
    if rep.error:
        raise HandshakeError(f"peer {req.peer_nic_path} rejected the handshake: {rep.error}")
    if len(rep.qp_nums) != len(req.qp_nums):
        raise HandshakeError(f"peer {req.peer_nic_path} answered with {len(rep.qp_nums)} QPs, "
                             f"{len(req.qp_nums)} requested")

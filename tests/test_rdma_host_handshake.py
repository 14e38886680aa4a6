"""Handshake encoding and the MTU rule, without a device."""

from __future__ import annotations

import json
import random

import pytest

from store.errors import ErrorCode
from store.transfer.rdma import handshake as hs
from store.transfer.rdma.errors import HandshakeError

GID = "0000:0000:0000:0000:0000:ffff:0a00:020f"


def request(**kw):
    base = dict(ep_id="ep-1", generation=3, local_nic_path="10.0.2.15:4000@rxe0",
                peer_nic_path="10.0.2.15:5000@rxe0", qp_nums=[17, 18], psns=[0x123456, 7], gid=GID,
                mtu=1024, notify_endpoint="10.0.2.15:4000")
    base.update(kw)
    return hs.HandshakeRequest(**base)


def test_request_round_trip_through_bytes_and_dict():
    r = request()
    assert hs.HandshakeRequest.from_dict(r.encode()) == r
    assert hs.HandshakeRequest.from_dict(r.to_dict()) == r
    assert hs.HandshakeRequest.from_dict(r.encode().decode()) == r
    d = json.loads(r.encode())
    assert d["qp_nums"] == [17, 18] and d["psns"] == [0x123456, 7] and d["version"] == hs.VERSION


def test_reply_round_trip_and_rejection():
    rep = hs.HandshakeReply(qp_nums=[19, 20], psns=[1, 2], gid=GID, mtu=4096, path_mtu=1024, device="rxe0")
    assert hs.HandshakeReply.from_dict(rep.encode()) == rep
    rej = hs.HandshakeReply.from_dict(hs.HandshakeReply.rejected("no device mlx5_0").encode())
    assert rej.error == "no device mlx5_0" and rej.qp_nums == []
    with pytest.raises(HandshakeError, match="rejected the handshake: no device mlx5_0"):
        hs.check_reply_matches(request(), rej)


@pytest.mark.parametrize("change, match", [
    (dict(qp_nums=[]), "no QP numbers"),
    (dict(psns=[1]), "2 QP numbers but 1 PSNs"),
    (dict(qp_nums=[17, 1 << 24]), "24-bit"),
    (dict(psns=[-1, 2]), "24-bit"),
    (dict(psns=[True, 2]), "24-bit"),
    (dict(gid="not-a-gid"), "bad GID"),
    (dict(mtu=1500), "not an InfiniBand MTU"),
    (dict(local_nic_path="no-device"), "bad NIC path"),
    (dict(ep_id=""), "without ep_id"),
    (dict(generation=-1), "negative generation"),
])
def test_request_validation_rejects(change, match):
    with pytest.raises(HandshakeError, match=match) as info:
        request(**change)
    assert info.value.code == ErrorCode.TRANSFER_FAIL


def test_decoding_garbage_and_other_versions_is_a_typed_error():
    with pytest.raises(HandshakeError, match="not JSON"):
        hs.HandshakeRequest.from_dict(b"\xff\x00")
    with pytest.raises(HandshakeError, match="must be a mapping"):
        hs.HandshakeRequest.from_dict(b"[1, 2]")
    d = request().to_dict()
    d["version"] = 99
    with pytest.raises(HandshakeError, match="version 99 not supported"):
        hs.HandshakeRequest.from_dict(d)
    d = request().to_dict()
    del d["gid"]
    with pytest.raises(HandshakeError, match="malformed"):
        hs.HandshakeRequest.from_dict(d)


def test_unknown_fields_are_ignored_for_forward_compatibility():
    d = request().to_dict()
    d["future_field"] = 1
    assert hs.HandshakeRequest.from_dict(d) == request()


def test_reply_must_answer_every_requested_qp():
    rep = hs.HandshakeReply(qp_nums=[19], psns=[1], gid=GID)
    with pytest.raises(HandshakeError, match="answered with 1 QPs, 2 requested"):
        hs.check_reply_matches(request(), rep)


@pytest.mark.parametrize("local, peer, negotiation, expected", [
    (4096, 1024, True, 1024),
    (1024, 4096, True, 1024),
    (2048, 2048, True, 2048),
    (4096, 1024, False, 4096),  # Mooncake's local-only choice (its issue #3868)
    (1024, 4096, False, 1024),
])
def test_negotiate_mtu(local, peer, negotiation, expected):
    assert hs.negotiate_mtu(local, peer, negotiation) == expected


def test_negotiate_mtu_rejects_non_ib_values():
    with pytest.raises(HandshakeError):
        hs.negotiate_mtu(1500, 1024, True)


def test_gid_normalisation_accepts_ipv6_notation():
    assert hs.normalize_gid("::ffff:10.0.2.15") == GID
    assert hs.normalize_gid(GID.upper()) == GID
    assert hs.normalize_gid("fe80::5054:ff:fe12:3456") == "fe80:0000:0000:0000:5054:00ff:fe12:3456"


def test_psns_are_24_bit_and_reproducible_with_a_seeded_rng():
    a = [hs.new_psn(random.Random(5)) for _ in range(3)]
    b = [hs.new_psn(random.Random(5)) for _ in range(3)]
    assert a == b
    draws = {hs.new_psn() for _ in range(200)}
    assert all(0 <= p < (1 << 24) for p in draws)
    assert len(draws) > 150  # fresh per connection


def test_nic_path_split():
    assert hs.split_nic_path("10.0.2.15:5000@rxe0") == ("10.0.2.15:5000", "rxe0")
    assert hs.split_nic_path("[::1]:5000@mlx5_0") == ("[::1]:5000", "mlx5_0")
    assert hs.nic_path("h:1", "rxe0") == "h:1@rxe0"

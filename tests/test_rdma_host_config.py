"""RDMA configuration: defaults, Mooncake's env var names, and values that would never terminate."""

from __future__ import annotations

import pytest

from store.errors import ErrorCode
from store.transfer.rdma.config import RdmaConfig, mtu_to_bytes, mtu_to_enum
from store.transfer.rdma.errors import ConfigError


def test_defaults_follow_mooncake_where_they_terminate():
    c = RdmaConfig()
    assert (c.port, c.gid_index, c.num_qp_per_ep, c.max_wr, c.max_cqe, c.mtu, c.retry_cap) == \
        (1, None, 2, 256, 4096, 4096, 9)
    assert c.mtu_negotiation
    # rxe retries forever with 7 or timeout 0: the defaults must end in an error within seconds
    assert c.qp_retry_cnt < 7 and c.qp_timeout > 0 and c.rnr_retry < 7
    assert 0.5 < c.retry_exhaustion_s() < 5.0


def test_env_overrides_with_mooncake_names():
    env = {"MC_GID_INDEX": "3", "MC_IB_PORT": "2", "MC_NUM_QP_PER_EP": "4", "MC_MAX_WR": "128",
           "MC_MAX_CQE_PER_CTX": "1024", "MC_MTU": "1024", "MC_RETRY_CNT": "5",
           "MC_RDMA_RAIL_PAUSE_SECONDS": "7.5", "MC_HANDSHAKE_CONNECT_TIMEOUT": "2",
           "MC_SLICE_TIMEOUT": "10", "MC_IB_SL": "-1", "MC_IB_TC": "3",
           "UMBRA_RDMA_DEVICE": "rxe0", "UMBRA_RDMA_MTU_NEGOTIATION": "off",
           "UMBRA_RDMA_QP_TIMEOUT": "14", "UMBRA_RDMA_QP_RETRY_CNT": "3", "UMBRA_RDMA_RNR_RETRY": "2",
           "UMBRA_RDMA_PAUSE_AFTER": "2", "UMBRA_RDMA_PAUSE_WINDOW": "1.5", "UMBRA_RDMA_CQ_MODE": "Channel"}
    c = RdmaConfig.from_env(env)
    assert (c.gid_index, c.port, c.num_qp_per_ep, c.max_wr, c.max_cqe, c.mtu, c.retry_cap) == \
        (3, 2, 4, 128, 1024, 1024, 5)
    assert (c.pause_seconds, c.handshake_timeout_s, c.slice_timeout_s) == (7.5, 2.0, 10.0)
    assert (c.service_level, c.traffic_class) == (0, 3)
    assert c.device_name == "rxe0" and c.mtu_negotiation is False
    assert (c.qp_timeout, c.qp_retry_cnt, c.rnr_retry) == (14, 3, 2)
    assert (c.pause_after_failures, c.pause_window_s) == (2, 1.5)
    assert c.cq_mode == "channel"


@pytest.mark.parametrize("raw", ["-1", "auto", "AUTO"])
def test_gid_index_auto(raw):
    assert RdmaConfig.from_env({"MC_GID_INDEX": raw}).gid_index is None


def test_explicit_overrides_beat_the_environment():
    c = RdmaConfig.from_env({"MC_MTU": "1024"}, mtu=2048, mtu_negotiation="off")
    assert c.mtu == 2048 and c.mtu_negotiation is False


@pytest.mark.parametrize("env, match", [
    ({"MC_MTU": "1500"}, "MTU must be one of"),
    ({"MC_MAX_WR": "many"}, "expected a number"),
    ({"MC_GID_INDEX": "x"}, "index or 'auto'"),
    ({"UMBRA_RDMA_QP_RETRY_CNT": "7"}, "retry forever"),
    ({"UMBRA_RDMA_QP_TIMEOUT": "0"}, "retry forever"),
    ({"UMBRA_RDMA_RNR_RETRY": "7"}, "infinite RNR"),
    ({"UMBRA_RDMA_MTU_NEGOTIATION": "maybe"}, "expected on/off"),
    ({"MC_NUM_QP_PER_EP": "0"}, "num_qp_per_ep"),
    ({"UMBRA_RDMA_CQ_MODE": "fast"}, "cq_mode"),
])
def test_bad_values_are_config_errors(env, match):
    with pytest.raises(ConfigError, match=match) as info:
        RdmaConfig.from_env(env)
    assert info.value.code == ErrorCode.INVALID_PARAMS


def test_infinite_retry_only_when_asked_for():
    c = RdmaConfig(qp_retry_cnt=7, rnr_retry=7, allow_infinite_retry=True)
    assert c.qp_retry_cnt == 7


def test_unknown_override_is_refused():
    with pytest.raises(ConfigError, match="unknown RDMA config key 'mtuu'"):
        RdmaConfig.from_env({}, mtuu=1024)


def test_with_derives_and_validates():
    c = RdmaConfig().with_(mtu=1024)
    assert c.mtu == 1024 and c.mtu_enum == 3
    with pytest.raises(ConfigError):
        RdmaConfig().with_(qp_retry_cnt=7)


def test_mtu_enum_mapping():
    assert [mtu_to_enum(m) for m in (256, 512, 1024, 2048, 4096)] == [1, 2, 3, 4, 5]
    assert mtu_to_bytes(5) == 4096
    with pytest.raises(ConfigError):
        mtu_to_bytes(9)

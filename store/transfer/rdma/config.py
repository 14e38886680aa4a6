"""RDMA transport configuration: one dataclass, Mooncake's environment variable names as overrides.

Defaults follow Mooncake (2 QPs per endpoint, 256 WRs per QP, 4096 CQ entries, slice retry cap 9,
30 s rail pause) except where Mooncake's value does not terminate on Soft-RoCE: Mooncake sets the QP
``retry_cnt = 7`` and ``rnr_retry = 7``, and rxe treats 7 as "retry forever", so a dead peer never
produces a completion. Umbra defaults to ``retry_cnt = 6`` and ``timeout = 16`` (ACK timeout
4.096 µs × 2^16 ≈ 0.27 s; time to ``RETRY_EXC_ERR`` ≈ (6 + 1) × 0.27 s ≈ 1.9 s), and rejects values
that never terminate unless ``allow_infinite_retry`` is set. ``timeout = 16`` rather than
Mooncake's 14 because under TCG 14 causes spurious retransmissions.

Environment variables (read by :meth:`RdmaConfig.from_env`):

=================================  ======================================================
``MC_IB_PORT``                     port number (1)
``MC_GID_INDEX``                   GID index; ``-1`` or ``auto`` = first RoCE v2 IPv4-mapped GID
``MC_NUM_QP_PER_EP``               RC QPs per endpoint (2)
``MC_MAX_WR``                      send WRs per QP (256)
``MC_MAX_CQE_PER_CTX``             CQ entries per device context (4096)
``MC_MAX_SGE`` / ``MC_MAX_INLINE``  QP capabilities (4 / 64)
``MC_MTU``                         upper bound of the path MTU in bytes (4096)
``MC_RETRY_CNT``                   slice retry cap (9) — Mooncake's meaning of the name
``MC_RDMA_RAIL_PAUSE_SECONDS``     how long a failing path stays paused (30)
``MC_HANDSHAKE_CONNECT_TIMEOUT``   handshake timeout in seconds (5)
``MC_SLICE_TIMEOUT``               seconds before an outstanding WR counts as lost (-1 = off)
``MC_IB_SL`` / ``MC_IB_TC``        service level / traffic class (-1 = default 0)
``UMBRA_RDMA_DEVICE``              device name (``device_name``; empty = first device)
``UMBRA_RDMA_MTU_NEGOTIATION``     ``on``/``off``: ``off`` reproduces Mooncake's local-only MTU
``UMBRA_RDMA_QP_TIMEOUT``          QP ``timeout`` (16)
``UMBRA_RDMA_QP_RETRY_CNT``        QP ``retry_cnt`` (6)
``UMBRA_RDMA_RNR_RETRY``           QP ``rnr_retry`` (6)
``UMBRA_RDMA_PAUSE_AFTER``         path failures within the window that pause a path (5)
``UMBRA_RDMA_PAUSE_WINDOW``        that window in seconds (5)
=================================  ======================================================
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from store.transfer.rdma.errors import ConfigError

# ibv_mtu enum values
MTU_ENUM = {256: 1, 512: 2, 1024: 3, 2048: 4, 4096: 5}
MTU_BYTES = {v: k for k, v in MTU_ENUM.items()}

_TRUE = {"1", "on", "true", "yes", "enable", "enabled"}
_FALSE = {"0", "off", "false", "no", "disable", "disabled"}


def mtu_to_enum(mtu_bytes: int) -> int:
    try:
        return MTU_ENUM[int(mtu_bytes)]
    except KeyError:
        raise ConfigError(f"MTU must be one of {sorted(MTU_ENUM)} bytes, got {mtu_bytes}") from None


def mtu_to_bytes(mtu_enum: int) -> int:
    try:
        return MTU_BYTES[int(mtu_enum)]
    except KeyError:
        raise ConfigError(f"unknown ibv_mtu value {mtu_enum}") from None


def parse_bool(value: str | bool, name: str) -> bool:
    if isinstance(value, bool):
        return value
    v = str(value).strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ConfigError(f"{name}: expected on/off, got {value!r}")


@dataclass(frozen=True)
class RdmaConfig:
    """Everything the RDMA transport can be told. Frozen: derive variants with :meth:`with_`."""

    device_name: str = ""  # "" = first RDMA device
    port: int = 1
    gid_index: int | None = None  # None = auto (first RoCE v2 IPv4-mapped GID)
    num_qp_per_ep: int = 2
    max_wr: int = 256
    max_cqe: int = 4096
    max_sge: int = 4
    max_inline: int = 64
    mtu: int = 4096  # upper bound in bytes; the local choice is min(port active MTU, mtu)
    mtu_negotiation: bool = True  # False = Mooncake's local-only choice (issue #3868)
    qp_timeout: int = 16
    qp_retry_cnt: int = 6
    rnr_retry: int = 6
    min_rnr_timer: int = 12
    max_rd_atomic: int = 16
    hop_limit: int = 16
    service_level: int = 0
    traffic_class: int = 0
    retry_cap: int = 9  # transport retries of one slice on fresh QPs
    pause_after_failures: int = 5  # path failures within pause_window_s that pause the path
    pause_window_s: float = 5.0
    pause_seconds: float = 30.0
    reconnect_backoff_s: float = 0.05  # first delay after a failed handshake; doubles per failure
    reconnect_backoff_max_s: float = 1.0
    handshake_timeout_s: float = 5.0
    slice_timeout_s: float = -1.0  # < 0 = off; else an outstanding WR older than this faults its QP
    drain_timeout_s: float = 5.0  # how long a retired QP may wait for its flushed completions
    # An rkey rejected twice within rkey_fault_window_s (remote access error for slices inside a
    # buffer the peer publishes) is taken as deregistered at the peer: slices using it fail at once
    # for dead_rkey_hold_s instead of each costing a reconnect. Slices outside the published
    # buffers (beyond the MR end) do not count: their own bounds explain the refusal.
    rkey_fault_window_s: float = 2.0
    dead_rkey_hold_s: float = 2.0
    max_chain: int = 32  # WRs per post_send call (one doorbell)
    # Bytes per post_send call (at least one WR). rxe does the requester's work (segmenting,
    # checksumming, loopback delivery) inside post_send for user QPs, and pyverbs holds the GIL
    # there: a long chain of large WRs would stall every other thread of the process.
    max_chain_bytes: int = 1 << 20
    poll_batch: int = 64
    # How completions are read. "ex": the extended CQ (ibv_start_poll/next_poll), no Python object
    # per completion (pyverbs' CQ.poll builds one, ~170 µs each under TCG against ~10 µs), but
    # pyverbs 44 cannot arm it, so while WRs are outstanding the worker sleeps in short steps
    # (doubling up to poll_interval_max_us) instead of on the completion channel. "channel": the
    # classic CQ with a completion channel (sleeps until the device signals). "auto": "ex" when
    # the provider supports it.
    cq_mode: str = "auto"
    poll_interval_max_us: int = 1000
    allow_infinite_retry: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.port < 1:
            raise ConfigError(f"port must be >= 1, got {self.port}")
        if self.gid_index is not None and self.gid_index < 0:
            raise ConfigError(f"gid_index must be >= 0 or None (auto), got {self.gid_index}")
        if not 1 <= self.num_qp_per_ep <= 64:
            raise ConfigError(f"num_qp_per_ep must be within 1..64, got {self.num_qp_per_ep}")
        if self.max_wr < 1 or self.max_cqe < 1:
            raise ConfigError(f"max_wr and max_cqe must be >= 1, got {self.max_wr}, {self.max_cqe}")
        mtu_to_enum(self.mtu)
        if not 0 <= self.qp_timeout <= 31:
            raise ConfigError(f"qp_timeout must be within 0..31, got {self.qp_timeout}")
        if not 0 <= self.qp_retry_cnt <= 7 or not 0 <= self.rnr_retry <= 7:
            raise ConfigError(f"qp_retry_cnt and rnr_retry must be within 0..7, "
                              f"got {self.qp_retry_cnt}, {self.rnr_retry}")
        if not self.allow_infinite_retry:
            if self.qp_retry_cnt == 7 or self.qp_timeout == 0:
                raise ConfigError(
                    f"qp_retry_cnt={self.qp_retry_cnt} qp_timeout={self.qp_timeout}: on rxe retry_cnt 7 "
                    f"and timeout 0 mean 'retry forever', so a dead peer never completes; use "
                    f"retry_cnt <= 6 and timeout >= 1, or set allow_infinite_retry")
            if self.rnr_retry == 7:
                raise ConfigError("rnr_retry=7 means infinite RNR retries; use <= 6 "
                                  "or set allow_infinite_retry")
        if self.retry_cap < 0:
            raise ConfigError(f"retry_cap must be >= 0, got {self.retry_cap}")
        if self.pause_after_failures < 1:
            raise ConfigError(f"pause_after_failures must be >= 1, got {self.pause_after_failures}")
        if self.pause_window_s <= 0 or self.pause_seconds < 0:
            raise ConfigError("pause_window_s must be > 0 and pause_seconds >= 0")
        if self.handshake_timeout_s <= 0:
            raise ConfigError(f"handshake_timeout_s must be > 0, got {self.handshake_timeout_s}")
        if self.cq_mode not in ("auto", "ex", "channel"):
            raise ConfigError(f"cq_mode must be auto, ex or channel, got {self.cq_mode!r}")
        if self.poll_interval_max_us < 1:
            raise ConfigError(f"poll_interval_max_us must be >= 1, got {self.poll_interval_max_us}")
        if not 1 <= self.max_chain <= 1024 or self.poll_batch < 1 or self.max_chain_bytes < 1:
            raise ConfigError("max_chain must be within 1..1024, poll_batch and max_chain_bytes >= 1")

    @property
    def mtu_enum(self) -> int:
        return mtu_to_enum(self.mtu)

    def retry_exhaustion_s(self) -> float:
        """Time a requester spends retransmitting to a dead peer before ``RETRY_EXC_ERR``."""
        return (self.qp_retry_cnt + 1) * 4.096e-6 * (2 ** self.qp_timeout)

    def with_(self, **changes: Any) -> RdmaConfig:
        return replace(self, **changes)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> RdmaConfig:
        """Defaults, then environment variables, then explicit ``overrides`` (highest priority)."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}

        def num(var: str, field_name: str, kind: type = int) -> None:
            raw = env.get(var)
            if raw is None or raw.strip() == "":
                return
            try:
                values[field_name] = kind(raw)
            except ValueError:
                raise ConfigError(f"{var}={raw!r}: expected a number") from None

        if env.get("UMBRA_RDMA_DEVICE"):
            values["device_name"] = env["UMBRA_RDMA_DEVICE"]
        num("MC_IB_PORT", "port")
        raw_gid = env.get("MC_GID_INDEX")
        if raw_gid is not None and raw_gid.strip() != "":
            if raw_gid.strip().lower() == "auto":
                values["gid_index"] = None
            else:
                try:
                    gid = int(raw_gid)
                except ValueError:
                    raise ConfigError(f"MC_GID_INDEX={raw_gid!r}: expected an index or 'auto'") from None
                values["gid_index"] = None if gid < 0 else gid
        num("MC_NUM_QP_PER_EP", "num_qp_per_ep")
        num("MC_MAX_WR", "max_wr")
        num("MC_MAX_CQE_PER_CTX", "max_cqe")
        num("MC_MAX_SGE", "max_sge")
        num("MC_MAX_INLINE", "max_inline")
        num("MC_MTU", "mtu")
        num("MC_RETRY_CNT", "retry_cap")
        num("MC_RDMA_RAIL_PAUSE_SECONDS", "pause_seconds", float)
        num("MC_HANDSHAKE_CONNECT_TIMEOUT", "handshake_timeout_s", float)
        num("MC_SLICE_TIMEOUT", "slice_timeout_s", float)
        num("UMBRA_RDMA_QP_TIMEOUT", "qp_timeout")
        num("UMBRA_RDMA_QP_RETRY_CNT", "qp_retry_cnt")
        num("UMBRA_RDMA_RNR_RETRY", "rnr_retry")
        num("UMBRA_RDMA_PAUSE_AFTER", "pause_after_failures")
        num("UMBRA_RDMA_PAUSE_WINDOW", "pause_window_s", float)
        num("UMBRA_RDMA_POLL_INTERVAL_MAX_US", "poll_interval_max_us")
        if env.get("UMBRA_RDMA_CQ_MODE"):
            values["cq_mode"] = env["UMBRA_RDMA_CQ_MODE"].strip().lower()
        for var, field_name in (("MC_IB_SL", "service_level"), ("MC_IB_TC", "traffic_class")):
            raw = env.get(var)
            if raw is not None and raw.strip() != "":
                try:
                    v = int(raw)
                except ValueError:
                    raise ConfigError(f"{var}={raw!r}: expected a number") from None
                values[field_name] = max(v, 0)
        if env.get("UMBRA_RDMA_MTU_NEGOTIATION"):
            values["mtu_negotiation"] = parse_bool(env["UMBRA_RDMA_MTU_NEGOTIATION"],
                                                   "UMBRA_RDMA_MTU_NEGOTIATION")
        known = {f.name for f in fields(cls)}
        for k, v in overrides.items():
            if k not in known:
                raise ConfigError(f"unknown RDMA config key {k!r}")
            if k == "mtu_negotiation":
                v = parse_bool(v, k)
            values[k] = v
        return cls(**values)

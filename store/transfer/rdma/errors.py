"""Names and strings for work-completion statuses and async events, as libibverbs prints them.

Logs must carry the exact text of ``ibv_wc_status_str`` / ``ibv_event_type_str`` so a line from
Umbra can be matched against a Mooncake log or a GitHub issue ("remote invalid request error",
"local access violation work queue error"). The tables are static copies of rdma-core 44's strings,
so this module imports without libibverbs (host unit tests); a host test checks them against the
library when it is loadable.

Also the typed exceptions of the RDMA transport, and the classification of statuses the retry
policy works from.
"""

from __future__ import annotations

from enum import IntEnum

from store.errors import ErrorCode, StoreError


class WcStatus(IntEnum):
    """``enum ibv_wc_status`` (values fixed by the verbs ABI)."""

    SUCCESS = 0
    LOC_LEN_ERR = 1
    LOC_QP_OP_ERR = 2
    LOC_EEC_OP_ERR = 3
    LOC_PROT_ERR = 4
    WR_FLUSH_ERR = 5
    MW_BIND_ERR = 6
    BAD_RESP_ERR = 7
    LOC_ACCESS_ERR = 8
    REM_INV_REQ_ERR = 9
    REM_ACCESS_ERR = 10
    REM_OP_ERR = 11
    RETRY_EXC_ERR = 12
    RNR_RETRY_EXC_ERR = 13
    LOC_RDD_VIOL_ERR = 14
    REM_INV_RD_REQ_ERR = 15
    REM_ABORT_ERR = 16
    INV_EECN_ERR = 17
    INV_EEC_STATE_ERR = 18
    FATAL_ERR = 19
    RESP_TIMEOUT_ERR = 20
    GENERAL_ERR = 21
    TM_ERR = 22
    TM_RNDV_INCOMPLETE = 23


class AsyncEventType(IntEnum):
    """``enum ibv_event_type``."""

    CQ_ERR = 0
    QP_FATAL = 1
    QP_REQ_ERR = 2
    QP_ACCESS_ERR = 3
    COMM_EST = 4
    SQ_DRAINED = 5
    PATH_MIG = 6
    PATH_MIG_ERR = 7
    DEVICE_FATAL = 8
    PORT_ACTIVE = 9
    PORT_ERR = 10
    LID_CHANGE = 11
    PKEY_CHANGE = 12
    SM_CHANGE = 13
    SRQ_ERR = 14
    SRQ_LIMIT_REACHED = 15
    QP_LAST_WQE_REACHED = 16
    CLIENT_REREGISTER = 17
    GID_CHANGE = 18
    WQ_FATAL = 19


# ibv_wc_status_str() of rdma-core 44 (libibverbs/enum_strs.c).
_WC_STATUS_STR: dict[int, str] = {
    0: "success",
    1: "local length error",
    2: "local QP operation error",
    3: "local EE context operation error",
    4: "local protection error",
    5: "Work Request Flushed Error",
    6: "memory management operation error",
    7: "bad response error",
    8: "local access error",
    9: "remote invalid request error",
    10: "remote access error",
    11: "remote operation error",
    12: "transport retry counter exceeded",
    13: "RNR retry counter exceeded",
    14: "local RDD violation error",
    15: "remote invalid RD request",
    16: "aborted error",
    17: "invalid EE context number",
    18: "invalid EE context state",
    19: "fatal error",
    20: "response timeout error",
    21: "general error",
    22: "TM error",
    23: "TM software rendezvous",
}

# ibv_event_type_str() of rdma-core 44.
_EVENT_STR: dict[int, str] = {
    0: "CQ error",
    1: "local work queue catastrophic error",
    2: "invalid request local work queue error",
    3: "local access violation work queue error",
    4: "communication established",
    5: "send queue drained",
    6: "path migrated",
    7: "path migration request error",
    8: "local catastrophic error",
    9: "port active",
    10: "port error",
    11: "LID change",
    12: "P_Key change",
    13: "SM change",
    14: "SRQ catastrophic error",
    15: "SRQ limit reached",
    16: "last WQE reached",
    17: "client reregistration",
    18: "GID table change",
    19: "WQ fatal",
}

QP_STATE_NAMES = {0: "RESET", 1: "INIT", 2: "RTR", 3: "RTS", 4: "SQD", 5: "SQE", 6: "ERR", 7: "UNKNOWN"}


def wc_status_str(status: int) -> str:
    """``ibv_wc_status_str(status)``: the text libibverbs (and Mooncake's logs) print."""
    return _WC_STATUS_STR.get(int(status), "unknown")


def wc_status_name(status: int) -> str:
    """``IBV_WC_REM_INV_REQ_ERR`` style name (the pyverbs enum name)."""
    try:
        return "IBV_WC_" + WcStatus(int(status)).name
    except ValueError:
        return f"IBV_WC_UNKNOWN_{int(status)}"


def event_type_str(event: int) -> str:
    """``ibv_event_type_str(event)``."""
    return _EVENT_STR.get(int(event), "unknown")


def event_type_name(event: int) -> str:
    try:
        return "IBV_EVENT_" + AsyncEventType(int(event)).name
    except ValueError:
        return f"IBV_EVENT_UNKNOWN_{int(event)}"


def describe_wc(status: int) -> str:
    """``remote invalid request error (IBV_WC_REM_INV_REQ_ERR=9)``: string first, as libibverbs."""
    return f"{wc_status_str(status)} ({wc_status_name(status)}={int(status)})"


def describe_event(event: int) -> str:
    return f"{event_type_str(event)} ({event_type_name(event)}={int(event)})"


def qp_state_name(state: int | None) -> str:
    return "DESTROYED" if state is None else QP_STATE_NAMES.get(int(state), f"STATE_{state}")


# -- classification ------------------------------------------------------------------------------

# The request itself is wrong (stale or forged rkey, range beyond the remote MR, local buffer not
# registered for this access): the peer answered, so the path works, and the same request on a fresh
# QP fails the same way. Fail the slice at once; the caller must refresh its descriptor.
REQUEST_FAULTS: frozenset[int] = frozenset({
    WcStatus.REM_ACCESS_ERR, WcStatus.LOC_PROT_ERR, WcStatus.LOC_LEN_ERR, WcStatus.LOC_ACCESS_ERR,
    WcStatus.MW_BIND_ERR,
})

# QP-affiliated async events that mean "this QP is broken".
QP_ERROR_EVENTS: frozenset[int] = frozenset({
    AsyncEventType.QP_FATAL, AsyncEventType.QP_REQ_ERR, AsyncEventType.QP_ACCESS_ERR,
    AsyncEventType.PATH_MIG_ERR,
})
# Events that take the whole device (port) out of service until PORT_ACTIVE.
DEVICE_DOWN_EVENTS: frozenset[int] = frozenset({
    AsyncEventType.PORT_ERR, AsyncEventType.DEVICE_FATAL,
})
DEVICE_UP_EVENTS: frozenset[int] = frozenset({AsyncEventType.PORT_ACTIVE})


def is_request_fault(status: int) -> bool:
    return int(status) in REQUEST_FAULTS


# -- exceptions ----------------------------------------------------------------------------------

class RdmaError(StoreError):
    """A failure in the RDMA transport; carries TRANSFER_FAIL unless a more precise code applies."""

    def __init__(self, message: str, code: ErrorCode | int = ErrorCode.TRANSFER_FAIL) -> None:
        super().__init__(code, message)


class DeviceError(RdmaError):
    """Opening or querying the device failed (no such device, port down, GID missing)."""


class HandshakeError(RdmaError):
    """The QP handshake with a peer failed or was rejected."""


class ConfigError(RdmaError):
    """An RDMA configuration value is invalid (for example one that makes rxe retry forever)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, ErrorCode.INVALID_PARAMS)


class NotRegisteredError(RdmaError):
    """A slice's local buffer lies outside every registered memory region."""

    def __init__(self, message: str) -> None:
        super().__init__(message, ErrorCode.INVALID_PARAMS)

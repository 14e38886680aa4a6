"""libibverbs strings, status classification and the transport's Prometheus counters/HTTP port."""

from __future__ import annotations

import ctypes
import ctypes.util
import urllib.request

import pytest

from store.transfer.rdma import errors as er
from store.transfer.rdma.metrics import RdmaMetrics, serve_metrics


def _libibverbs():
    name = ctypes.util.find_library("ibverbs") or "libibverbs.so.1"
    try:
        lib = ctypes.CDLL(name)
    except OSError:
        return None
    for fn in ("ibv_wc_status_str", "ibv_event_type_str"):
        getattr(lib, fn).restype = ctypes.c_char_p
        getattr(lib, fn).argtypes = [ctypes.c_int]
    return lib


def test_strings_as_mooncake_logs_print_them():
    assert er.wc_status_str(9) == "remote invalid request error"
    assert er.event_type_str(er.AsyncEventType.QP_ACCESS_ERR) == "local access violation work queue error"
    assert er.describe_wc(12) == "transport retry counter exceeded (IBV_WC_RETRY_EXC_ERR=12)"
    assert er.describe_event(10) == "port error (IBV_EVENT_PORT_ERR=10)"
    assert er.wc_status_name(99) == "IBV_WC_UNKNOWN_99" and er.wc_status_str(99) == "unknown"
    assert er.qp_state_name(6) == "ERR" and er.qp_state_name(None) == "DESTROYED"


def test_tables_match_the_installed_libibverbs():
    lib = _libibverbs()
    if lib is None:
        pytest.skip("libibverbs is not installed on this host")
    for st in er.WcStatus:
        assert er.wc_status_str(st) == lib.ibv_wc_status_str(int(st)).decode(), st
    for ev in er.AsyncEventType:
        assert er.event_type_str(ev) == lib.ibv_event_type_str(int(ev)).decode(), ev


def test_enums_match_pyverbs():
    e = pytest.importorskip("pyverbs.enums")
    for st in er.WcStatus:
        assert int(getattr(e, f"IBV_WC_{st.name}")) == int(st)
    for ev in er.AsyncEventType:
        assert int(getattr(e, f"IBV_EVENT_{ev.name}")) == int(ev)


def test_classification():
    assert er.is_request_fault(er.WcStatus.REM_ACCESS_ERR)
    assert not er.is_request_fault(er.WcStatus.REM_INV_REQ_ERR)
    assert er.AsyncEventType.QP_ACCESS_ERR in er.QP_ERROR_EVENTS
    assert er.AsyncEventType.PORT_ERR in er.DEVICE_DOWN_EVENTS
    assert er.AsyncEventType.PORT_ACTIVE in er.DEVICE_UP_EVENTS


def test_metrics_live_in_their_own_registry():
    a, b = RdmaMetrics(), RdmaMetrics()
    a.completions.labels("rxe0", "IBV_WC_SUCCESS").inc(3)
    a.async_events.labels("rxe0", "IBV_EVENT_PORT_ERR", "injected").inc()
    assert a.value("umbra_rdma_completions", device="rxe0", status="IBV_WC_SUCCESS") == 3
    assert b.value("umbra_rdma_completions", device="rxe0", status="IBV_WC_SUCCESS") == 0
    snap = a.snapshot()
    assert snap['umbra_rdma_completions_total{device="rxe0",status="IBV_WC_SUCCESS"}'] == 3
    assert not any(k.endswith("_created") for k in snap)


def test_metrics_http_port_serves_every_registry():
    a, b = RdmaMetrics(), RdmaMetrics()
    a.reconnects.labels("rxe0", "h:1@rxe0").inc(2)
    b.paused.labels("mlx5_0", "h:2@mlx5_0").inc()
    server = serve_metrics(0, [a.registry, b.registry], host="127.0.0.1", health=lambda: "OK rdma")
    try:
        base = f"http://127.0.0.1:{server.port}"
        text = urllib.request.urlopen(base + "/metrics", timeout=5).read().decode()
        assert 'umbra_rdma_reconnects_total{device="rxe0",peer="h:1@rxe0"} 2.0' in text
        assert 'umbra_rdma_paths_paused_total{device="mlx5_0",peer="h:2@mlx5_0"} 1.0' in text
        assert urllib.request.urlopen(base + "/health", timeout=5).read() == b"OK rdma"
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(base + "/nope", timeout=5)
    finally:
        server.close()

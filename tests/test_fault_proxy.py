"""The loopback proxy's faults, for real, on loopback sockets: bytes intact, delay, bandwidth cap,
TCP reset (the peer reads ECONNRESET), blackhole (stall and drop), and master reply rewriting.

Timing assertions here are lower bounds of injected delays only (a delay can make a transfer
slower, never faster), so a slow machine cannot make them fail."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from fault.proxy import MasterRouteRewriter, ProxyError, TcpProxy
from store.master.client import MasterClient
from store.master.config import MasterConfig
from store.master.server import MasterServer
from store.master.types import Segment


@pytest.fixture
def echo() -> Iterator[tuple[str, int]]:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    stop = threading.Event()

    def serve(s: socket.socket) -> None:
        try:
            while data := s.recv(65536):
                s.sendall(data)
        except OSError:
            pass
        finally:
            s.close()

    def accept() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                s, _ = srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=serve, args=(s,), daemon=True).start()

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield srv.getsockname()[:2]
    stop.set()
    t.join(2)
    srv.close()


@pytest.fixture
def proxy(echo: tuple[str, int]) -> Iterator[TcpProxy]:
    p = TcpProxy(f"{echo[0]}:{echo[1]}", name="test", seed=1).start()
    yield p
    p.close()


def connect(p: TcpProxy, timeout: float = 10.0) -> socket.socket:
    assert p.address is not None
    s = socket.create_connection(p.address, timeout=timeout)
    s.settimeout(timeout)
    return s


def wait_counter(p: TcpProxy, name: str, value: int) -> None:
    """The proxy counts a chunk once its write drained, which may be just after the peer read it."""
    deadline = time.monotonic() + 10
    while p.counter(name) < value and time.monotonic() < deadline:
        time.sleep(0.01)


def roundtrip(s: socket.socket, data: bytes) -> bytes:
    s.sendall(data)
    got = bytearray()
    while len(got) < len(data):
        chunk = s.recv(1 << 20)
        if not chunk:
            break
        got += chunk
    return bytes(got)


def test_bytes_pass_intact(proxy):
    data = os.urandom(3 << 20)
    with connect(proxy) as s:
        assert roundtrip(s, data) == data
    wait_counter(proxy, "bytes_down", len(data))
    st = proxy.stats()
    assert st["connections"] == 1 and st["bytes_up"] == len(data) and st["bytes_down"] == len(data)


def test_delay_adds_latency_both_ways(proxy):
    with connect(proxy) as s:
        assert roundtrip(s, b"warm") == b"warm"
        tid = proxy.add_toxic("delay", latency=0.15)
        t0 = time.monotonic()
        assert roundtrip(s, b"x") == b"x"
        assert time.monotonic() - t0 >= 0.3  # 0.15 up + 0.15 down, at least
        proxy.remove_toxic(tid)
        assert roundtrip(s, b"y") == b"y"
    assert proxy.counter("delayed_chunks") >= 2


def test_bandwidth_cap_throttles(proxy):
    data = os.urandom(256 * 1024)
    with connect(proxy) as s:
        proxy.add_toxic("bandwidth", rate=1 << 20, direction="up")
        t0 = time.monotonic()
        assert roundtrip(s, data) == data
        assert time.monotonic() - t0 >= 0.2  # 256 KiB at 1 MiB/s is 0.25 s
    wait_counter(proxy, "throttled_bytes", len(data))
    assert proxy.counter("throttled_bytes") == len(data)


def test_reset_kills_open_and_new_connections_with_rst(proxy):
    with connect(proxy) as s:
        assert roundtrip(s, b"a") == b"a"
        tid = proxy.add_toxic("reset")
        with pytest.raises(ConnectionResetError):
            roundtrip(s, b"b")
    with pytest.raises(ConnectionResetError), connect(proxy) as s2:  # the RST may beat connect()
        roundtrip(s2, b"c")
    proxy.remove_toxic(tid)
    with connect(proxy) as s3:
        assert roundtrip(s3, b"d") == b"d"
    assert proxy.counter("resets") >= 2


def test_reset_after_a_byte_budget(proxy):
    proxy.add_toxic("reset", after_bytes=100_000, probability=1.0)
    with connect(proxy) as s:
        assert roundtrip(s, b"z" * 10_000) == b"z" * 10_000  # 20 000 bytes through: within budget
        with pytest.raises((ConnectionResetError, BrokenPipeError)):
            for _ in range(50):
                roundtrip(s, b"z" * 10_000)


def test_reset_probability_is_seeded(echo):
    def picked(seed: int) -> int:
        with TcpProxy(f"{echo[0]}:{echo[1]}", name="p", seed=seed) as p:
            p.add_toxic("reset", probability=0.5)
            n = 0
            for _ in range(16):
                try:
                    with connect(p) as s:
                        roundtrip(s, b"q")
                except ConnectionResetError:
                    n += 1
            return n

    assert picked(3) == picked(3)


def test_blackhole_stall_holds_bytes_and_resumes_intact(proxy):
    with connect(proxy) as s:
        assert roundtrip(s, b"before") == b"before"
        tid = proxy.add_toxic("blackhole")
        s.sendall(b"held")
        s.settimeout(0.3)
        with pytest.raises(TimeoutError):
            s.recv(10)
        proxy.remove_toxic(tid)
        s.settimeout(10)
        got = b""
        while len(got) < 4:
            got += s.recv(10)
        assert got == b"held"


def test_blackhole_drop_discards_then_resets(proxy):
    with connect(proxy) as s:
        assert roundtrip(s, b"ok") == b"ok"
        tid = proxy.add_toxic("blackhole", mode="drop")
        s.sendall(b"lost bytes")
        s.settimeout(0.3)
        with pytest.raises(TimeoutError):
            s.recv(10)
        proxy.remove_toxic(tid)
        s.settimeout(10)
        with pytest.raises((ConnectionResetError, BrokenPipeError)):
            roundtrip(s, b"after")
    assert proxy.counter("dropped_bytes") == len(b"lost bytes")


def test_upstream_down_resets_the_client(echo):
    with TcpProxy("127.0.0.1:1", name="dead") as p, pytest.raises(ConnectionResetError), connect(p) as s:
        roundtrip(s, b"x")


def test_proxy_refuses_non_loopback_targets():
    with pytest.raises(ProxyError, match="loopback only"):
        TcpProxy("10.1.2.3:80")
    with pytest.raises(ProxyError, match="unknown toxic"):
        TcpProxy("127.0.0.1:1").add_toxic("melt")


def test_master_proxy_rewrites_transfer_endpoints():
    server = MasterServer(
        MasterConfig(rpc_port=0, metrics_port=0, seed=5, enable_metric_reporting=False)
    ).start()
    rewriter = MasterRouteRewriter({"127.0.0.1:1111": "127.0.0.1:2222"})
    try:
        addr = f"{server.rpc_address[0]}:{server.rpc_address[1]}"
        with (
            TcpProxy(addr, name="master", rewriter=rewriter) as p,
            MasterClient(addr) as direct,
            MasterClient(p.endpoint) as via,
        ):
            seg = Segment(
                id="s1",
                name="127.0.0.1:1111",
                base=1 << 36,
                size=1 << 24,
                te_endpoint="127.0.0.1:1111",
                transport={"endpoint": "127.0.0.1:1111"},
            )
            via.mount_segment(seg, "c1")
            descs = via.put_start("c1", "k", 4096)
            assert descs[0].te_endpoint == "127.0.0.1:2222"
            assert descs[0].transport["endpoint"] == "127.0.0.1:2222"
            assert direct.query_key("k")["replicas"][0]["te_endpoint"] == "127.0.0.1:1111"
            assert via.query_key("k")["replicas"][0]["te_endpoint"] == "127.0.0.1:2222"
            assert rewriter.rewritten >= 3 and p.stats()["rewritten"] == rewriter.rewritten
    finally:
        server.stop()

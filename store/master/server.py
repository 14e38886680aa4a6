"""``umbra master``: the state machine behind a TCP RPC server, an event loop and an HTTP endpoint.

Each RPC connection is served by its own thread: a blocking receive into a reusable buffer, the
call, one ``sendall`` of the answer, in order (see :mod:`store.master.rpc` for the frames). That
costs a fraction of an event-loop round per call (no selector wake-up, handle or callback
machinery: the loop's per-event work was most of the master's cost per small call). While no
failpoint is armed a call runs straight on its connection's thread (every state change is a few
microseconds under the state machine's one lock); once any is armed, calls move to a pool of
``--max_threads`` workers so a ``pause`` or ``sleep`` holds only its own caller and at most that
many calls wait on failpoints at once. Introspection and failpoint control always run on the
connection's thread and are answered even while workers are held. The asyncio event loop runs
the background loops below and the shutdown.

Loops around the state machine: GC and eviction every 10 ms, the client monitor every second,
and (``--enable_metric_reporting``) a summary line every 10 s. The process prints one line once
it is listening, for callers that asked for port 0::

    umbra master listening rpc=127.0.0.1:PORT metrics=127.0.0.1:PORT seed=N

Failpoints: ``UMBRA_FAILPOINTS`` is armed at start; steps are ``master.rpc.recv`` (error → that
code is returned, nothing runs), ``master.<rpc>`` (e.g. ``master.put_start``), ``master.rpc.send``
(error → the reply is dropped and the connection closed: the call took effect but the caller sees
RPC_FAIL), and the background ``master.evict``, ``master.gc_remove``, ``master.client_expire``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from store import failpoints
from store.allocator import STRATEGIES
from store.errors import ErrorCode, StoreError
from store.failpoints import failpoint
from store.master.clock import Clock
from store.master.config import MasterConfig, parse_args
from store.master.http import MasterHttpServer
from store.master.metrics import summary_line
from store.master.rpc import (
    ADMIN_METHODS,
    HEADER,
    FrameError,
    dispatch,
    parse_request,
    response,
    unpack,
)
from store.master.service import MasterService

log = logging.getLogger("store.master.server")


class MasterServer:
    """The master process's machinery; usable in-process (``start``/``stop``) or as ``main``."""

    def __init__(self, config: MasterConfig, clock: Clock | None = None) -> None:
        if config.view_version is None:
            config.view_version = time.time_ns() // 1_000_000
        self.config = config
        self.service = MasterService(config, clock)
        self.rpc_address: tuple[str, int] | None = None
        self.metrics_address: tuple[str, int] | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(config.max_threads,
                                                           thread_name_prefix="master-rpc")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._http: MasterHttpServer | None = None
        self._conns: set[_RpcConnection] = set()
        self._conns_lock = threading.Lock()  # guards _conns and the two counters below
        self._listener: socket.socket | None = None
        self._stopping = False  # set under _conns_lock: no connection is accepted after it
        self.connections_total = 0
        self.frame_errors = 0

    # ------------------------------------------------------------------ lifecycle

    def start(self, timeout: float = 10.0) -> MasterServer:
        """Run the server in a background thread (in-process use); returns once it listens."""
        self._thread = threading.Thread(target=self._thread_main, name="master-loop", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError("master did not start listening in time")
        if self._error is not None:
            raise RuntimeError(f"master failed to start: {self._error}") from self._error
        return self

    def _thread_main(self) -> None:
        try:
            asyncio.run(self.serve())
        except BaseException as exc:  # noqa: BLE001 - reported to the starter through _error
            self._error = exc
            self._ready.set()

    def stop(self, timeout: float = 10.0) -> None:
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(stop.set)
            except RuntimeError:
                pass  # the loop has already finished
        if self._thread is not None:
            self._thread.join(timeout)

    def request_stop(self) -> None:
        if self._stop is not None:
            self._stop.set()

    async def serve(self, on_ready: Callable[[MasterServer], None] | None = None) -> None:
        cfg = self.config
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        listener = self._listener = _listen(cfg.rpc_address, cfg.rpc_port)
        sock = listener.getsockname()
        self.rpc_address = (sock[0], sock[1])
        acceptor = threading.Thread(target=self._accept_loop, args=(listener,), daemon=True,
                                    name="master-accept")
        acceptor.start()
        self._http = MasterHttpServer(self.service, cfg.metrics_host, cfg.metrics_port)
        self._http.start()
        self.metrics_address = self._http.address
        monitor = self.service.run_client_monitor
        tasks = [asyncio.create_task(self._every(cfg.eviction_interval, self._housekeeping), name="evict-gc"),
                 asyncio.create_task(self._every(cfg.client_monitor_interval, monitor), name="monitor")]
        if cfg.enable_metric_reporting:
            tasks.append(asyncio.create_task(self._every(cfg.metric_report_interval, self._report),
                                             name="metric-report"))
        log.info("master listening rpc=%s:%d metrics=%s:%d view_version=%d", *self.rpc_address,
                 *self.metrics_address, self.service.view_version)
        if on_ready is not None:
            on_ready(self)
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            _shutdown(listener)
            listener.close()
            with self._conns_lock:
                self._stopping = True
                conns = list(self._conns)
            for c in conns:
                c.close()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            acceptor.join(5)
            self._http.stop()
            failpoints.disarm_all()  # let paused workers finish so the pool can drain
            self._pool.shutdown(wait=False, cancel_futures=True)
            log.info("master stopped")

    # ------------------------------------------------------------------ background loops

    async def _every(self, interval: float, fn: Callable[[], Any]) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self._run(fn)
            except Exception:
                log.exception("background step %s failed; it runs again in %.3fs",
                              getattr(fn, "__name__", fn), interval)

    def _housekeeping(self) -> None:
        if self.config.gc_mode != "off":
            self.service.run_gc()
        self.service.run_eviction()

    def _report(self) -> None:
        log.info("%s", summary_line(self.service))

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Inline while nothing is armed; on a worker thread otherwise (a failpoint may block)."""
        if failpoints.armed():
            assert self._loop is not None
            return await self._loop.run_in_executor(self._pool, fn, *args)
        return fn(*args)

    # ------------------------------------------------------------------ connections

    def _accept_loop(self, listener: socket.socket) -> None:
        while True:
            try:
                sock, addr = listener.accept()
            except OSError:
                return  # the listener was closed: the server is stopping
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            peer = f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else str(addr)
            conn = _RpcConnection(self, sock, peer)
            with self._conns_lock:
                stopping = self._stopping
                if not stopping:
                    self._conns.add(conn)
                    self.connections_total += 1
            if stopping:
                sock.close()
                return
            try:
                threading.Thread(target=conn.run, daemon=True, name=f"master-rpc-conn-{peer}").start()
            except RuntimeError:  # interpreter shutting down
                conn.close()
                return

    def _frame_error(self, peer: str, code: ErrorCode, message: str) -> tuple[bytes, bool]:
        with self._conns_lock:
            self.frame_errors += 1
        log.warning("bad frame from %s: %s (%s); closing the connection", peer, message, code.name)
        return response(0, code, None, message), False

    def _call(self, req_id: int, method: str, params: dict[str, Any]) -> bytes:
        try:
            code, result, message = dispatch(self.service, method, params)
        except Exception as exc:
            log.exception("method=%s request_id=%d raised; answering INTERNAL_ERROR", method, req_id)
            code, result, message = ErrorCode.INTERNAL_ERROR, None, f"{type(exc).__name__}: {exc}"
        try:
            return response(req_id, code, result, message)
        except (TypeError, ValueError, OverflowError) as exc:
            log.exception("method=%s request_id=%d: result does not encode", method, req_id)
            return response(req_id, ErrorCode.INTERNAL_ERROR, None, f"result does not encode: {exc}")

    def _handle(self, req_id: int, method: str, params: dict[str, Any], peer: str) -> bytes | None:
        try:
            failpoint("master.rpc.recv", method=method, request_id=req_id, peer=peer)
        except StoreError as exc:
            return response(req_id, exc.code, None, exc.message)
        reply = self._call(req_id, method, params)
        try:
            failpoint("master.rpc.send", method=method, request_id=req_id, peer=peer)
        except StoreError as exc:
            log.info("method=%s request_id=%d peer=%s: reply dropped by failpoint (%s)", method, req_id,
                     peer, exc.code.name)
            return None
        return reply


@dataclass(frozen=True)
class Announcement:
    """The line ``umbra master`` prints once it listens: where it listens and with which seed."""

    rpc: tuple[str, int]
    metrics: tuple[str, int]
    seed: int

    def line(self) -> str:
        return (f"umbra master listening rpc={self.rpc[0]}:{self.rpc[1]} "
                f"metrics={self.metrics[0]}:{self.metrics[1]} seed={self.seed}")

    @classmethod
    def parse(cls, line: str) -> Announcement:
        """Read the line back (callers that started the master with port 0); ``ValueError`` if it
        is not the announcement."""
        fields = dict(part.split("=", 1) for part in line.split() if "=" in part)
        try:
            rpc_host, rpc_port = fields["rpc"].rsplit(":", 1)
            m_host, m_port = fields["metrics"].rsplit(":", 1)
            return cls((rpc_host, int(rpc_port)), (m_host, int(m_port)), int(fields["seed"]))
        except (KeyError, ValueError) as exc:
            raise ValueError(f"not a master announcement: {line.strip()!r}") from exc


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket on the first address ``host`` resolves to (as the server reports one)."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, type_, proto, _, addr = infos[0]
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class _RpcConnection:
    """One client connection of a :class:`MasterServer`, served by its own thread.

    Frames are answered strictly in order; a frame's body must arrive within ``frame_timeout`` of
    the moment the server starts waiting for it (an idle connection may wait forever between
    frames). A call on a worker (a failpoint is armed) holds the frames behind it, as does a peer
    that does not read its answers (``sendall`` blocks this thread only).
    """

    _BUF = 64 * 1024

    def __init__(self, server: MasterServer, sock: socket.socket, peer: str) -> None:
        self.server = server
        self.sock = sock
        self.peer = peer
        self._buf = bytearray(self._BUF)
        self._view = memoryview(self._buf)
        self._start = 0  # received, not yet parsed: self._buf[self._start:self._end]
        self._end = 0
        self._poller: select.poll | None = None

    def close(self) -> None:
        """Wake the thread (its receive returns) and end the connection."""
        _shutdown(self.sock)

    def run(self) -> None:
        try:
            self._serve()
        except (ConnectionError, OSError) as exc:
            log.debug("connection from %s ended: %s", self.peer, exc)
        except Exception:
            log.exception("connection from %s failed; closing it", self.peer)
        finally:
            with self.server._conns_lock:
                self.server._conns.discard(self)
            try:
                self.sock.close()
            except OSError:
                pass

    def _fail(self, code: ErrorCode, message: str) -> None:
        reply, _ = self.server._frame_error(self.peer, code, message)
        try:
            self.sock.sendall(reply)
        except OSError:
            pass

    def _room(self, need: int) -> None:
        """Make ``need`` bytes fit from ``_start`` (move the unparsed bytes down, or grow)."""
        if self._start + need <= len(self._buf):
            return
        have = self._end - self._start
        if need > len(self._buf):
            buf = bytearray(need)
            buf[:have] = self._view[self._start:self._end]
            self._view.release()
            self._buf, self._view = buf, memoryview(buf)
        else:
            self._buf[:have] = bytes(self._view[self._start:self._end])  # may overlap: copy first
        self._start, self._end = 0, have

    def _recv(self, deadline: float | None) -> bool:
        """Receive more bytes (False at end of stream); ``TimeoutError`` past ``deadline``."""
        if deadline is not None:
            if self._poller is None:
                self._poller = select.poll()
                self._poller.register(self.sock.fileno(), select.POLLIN)
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._poller.poll(math.ceil(remaining * 1000)):
                raise TimeoutError
        n = self.sock.recv_into(self._view[self._end:])
        self._end += n
        return n > 0

    def _serve(self) -> None:
        srv = self.server
        cfg = srv.config
        sock = self.sock
        while True:
            if self._end - self._start < HEADER.size:
                self._room(HEADER.size)
                if not self._recv(None):
                    if self._end > self._start and not srv._stopping:
                        self._fail(ErrorCode.INVALID_PARAMS, "truncated frame header")
                    return
                continue
            (length,) = HEADER.unpack_from(self._buf, self._start)
            if length > cfg.max_frame_bytes:
                self._fail(ErrorCode.BUFFER_OVERFLOW,
                           f"frame of {length} bytes exceeds {cfg.max_frame_bytes}")
                return
            total = HEADER.size + length
            if self._end - self._start < total:
                self._room(total)
                deadline = time.monotonic() + cfg.frame_timeout
                while self._end - self._start < total:
                    try:
                        more = self._recv(deadline)
                    except TimeoutError:
                        self._fail(ErrorCode.RPC_TIMEOUT, f"frame body of {length} bytes not received in "
                                                          f"{cfg.frame_timeout}s")
                        return
                    if not more:
                        if srv._stopping:
                            return  # cut by the server's own shutdown, not by the peer
                        self._fail(ErrorCode.INVALID_PARAMS, f"truncated frame: "
                                                             f"{self._end - self._start - HEADER.size} of "
                                                             f"{length} bytes")
                        return
            start = self._start
            body = self._buf[start + HEADER.size:start + total]
            if start + total == self._end:
                self._start = self._end = 0
                if len(self._buf) > self._BUF:  # a big frame is done: give its buffer back
                    self._buf = bytearray(self._BUF)
                    self._view = memoryview(self._buf)
            else:
                self._start = start + total
            try:
                req_id, method, params = parse_request(unpack(body))
            except FrameError as exc:
                self._fail(exc.code, exc.message)
                return
            if method in ADMIN_METHODS:
                reply: bytes | None = srv._call(req_id, method, params)
            elif failpoints.armed():  # a failpoint may block: run the call on a worker
                try:
                    reply = srv._pool.submit(srv._handle, req_id, method, params, self.peer).result()
                except (RuntimeError, concurrent.futures.CancelledError):
                    return  # the server is stopping
            else:
                reply = srv._handle(req_id, method, params, self.peer)
            if reply is None:  # dropped by the master.rpc.send failpoint: close
                return
            sock.sendall(reply)


# ---------------------------------------------------------------------- process entry


def setup_logging(verbosity: int) -> None:
    """``-v=1`` is glog's VLOG(1): every allocation_succeeded / deallocation_succeeded line."""
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s.%(msecs)03d %(levelname).1s %(name)s] %(message)s",
                        datefmt="%m%d %H:%M:%S")
    level = logging.DEBUG if verbosity >= 1 else logging.INFO
    logging.getLogger("store").setLevel(level)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        config, ignored = parse_args(argv)
    except ValueError as exc:
        print(f"umbra master: {exc}", file=sys.stderr)
        return 2
    if config.allocation_strategy not in STRATEGIES:
        print(f"umbra master: unknown --allocation_strategy {config.allocation_strategy!r}; "
              f"expected one of {sorted(STRATEGIES)}", file=sys.stderr)
        return 2
    try:
        armed = failpoints.arm_from_env()
    except ValueError as exc:
        print(f"umbra master: {failpoints.ENV_VAR}: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.v)
    for name in ignored:
        log.warning("flag --%s is accepted for compatibility with mooncake_master and ignored", name)
    if armed:
        log.info("failpoints armed from %s: %s", failpoints.ENV_VAR, ", ".join(fp.name for fp in armed))
    try:
        server = MasterServer(config)
    except ValueError as exc:  # e.g. an unknown --allocation_strategy
        print(f"umbra master: {exc}", file=sys.stderr)
        return 2

    def announce(s: MasterServer) -> None:
        assert s.rpc_address and s.metrics_address
        print(Announcement(s.rpc_address, s.metrics_address, s.service.seed).line(), flush=True)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, s.request_stop)

    try:
        asyncio.run(server.serve(announce))
    except OSError as exc:
        print(f"umbra master: cannot listen: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

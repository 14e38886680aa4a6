"""``umbra master``: the state machine behind an asyncio RPC server and an HTTP endpoint.

One asyncio task per connection reads frames (see :mod:`store.master.rpc`), runs each call and
writes the answer in order. While no failpoint is armed a call runs straight on the event loop
(every state change is a few microseconds under one lock); once any is armed, calls move to a pool
of ``--max_threads`` workers so a ``pause`` or ``sleep`` holds only its own caller. Introspection
and failpoint control always run on the loop and are answered even while workers are held.

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
import signal
import sys
import threading
import time
from collections.abc import Callable
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
        self._writers: set[asyncio.StreamWriter] = set()
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
        server = await asyncio.start_server(self._connection, cfg.rpc_address, cfg.rpc_port)
        sock = server.sockets[0].getsockname()
        self.rpc_address = (sock[0], sock[1])
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
            server.close()
            for w in list(self._writers):
                w.close()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await server.wait_closed()
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

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        peer_s = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self._writers.add(writer)
        self.connections_total += 1
        try:
            while True:
                out = await self._one_frame(reader, peer_s)
                if out is None:
                    break
                reply, keep_open = out
                if reply is not None:
                    writer.write(reply)
                    await writer.drain()
                if not keep_open:
                    break
        except (ConnectionError, OSError) as exc:
            log.debug("connection from %s ended: %s", peer_s, exc)
        finally:
            self._writers.discard(writer)
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, OSError):
                pass

    async def _one_frame(self, reader: asyncio.StreamReader, peer: str) -> tuple[bytes | None, bool] | None:
        """Read and answer one frame: ``(reply, keep_open)``, or None at a clean end of stream."""
        try:
            header = await reader.readexactly(HEADER.size)
        except asyncio.IncompleteReadError as exc:
            if not exc.partial:
                return None
            return self._frame_error(peer, ErrorCode.INVALID_PARAMS, "truncated frame header")
        (length,) = HEADER.unpack(header)
        if length > self.config.max_frame_bytes:
            return self._frame_error(peer, ErrorCode.BUFFER_OVERFLOW,
                                     f"frame of {length} bytes exceeds {self.config.max_frame_bytes}")
        try:
            async with asyncio.timeout(self.config.frame_timeout):
                body = await reader.readexactly(length)
        except asyncio.IncompleteReadError as exc:
            return self._frame_error(peer, ErrorCode.INVALID_PARAMS,
                                     f"truncated frame: {len(exc.partial)} of {length} bytes")
        except TimeoutError:
            return self._frame_error(peer, ErrorCode.RPC_TIMEOUT,
                                     f"frame body of {length} bytes not received in "
                                     f"{self.config.frame_timeout}s")
        try:
            req_id, method, params = parse_request(unpack(body))
        except FrameError as exc:
            return self._frame_error(peer, exc.code, exc.message)
        if method in ADMIN_METHODS:
            return self._call(req_id, method, params), True
        reply = await self._run(self._handle, req_id, method, params, peer)
        return (reply, True) if reply is not None else (None, False)

    def _frame_error(self, peer: str, code: ErrorCode, message: str) -> tuple[bytes, bool]:
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
        print(f"umbra master listening rpc={s.rpc_address[0]}:{s.rpc_address[1]} "
              f"metrics={s.metrics_address[0]}:{s.metrics_address[1]} seed={s.service.seed}", flush=True)
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

"""A loopback TCP proxy the fault layer controls: delay, bandwidth cap, reset, blackhole.

Umbra puts one in front of a segment holder's transfer endpoint or the master's RPC port, and the
network faults act on it: the bytes really cross real sockets, are really held back or throttled,
and connections really end with a TCP reset (``SO_LINGER`` 0, so the peer reads ``ECONNRESET``).
Toxiproxy would do the same job but is not packaged for Debian or PyPI; this is a small asyncio
proxy with the toxics Umbra needs and the statistics a checker wants.

Toxics (any number at once; ``direction`` is ``up`` = client→server, ``down`` or ``both``):

- ``delay(latency, jitter=0)``: every chunk is forwarded ``latency`` (+ uniform ``[0, jitter]``,
  seeded) seconds after it arrived; order is kept and the pipe stays full (latency, not a
  throughput cap).
- ``bandwidth(rate)``: at most ``rate`` bytes per second per connection and direction.
- ``reset(after_bytes=0, probability=1)``: when added, each open connection is picked with
  ``probability`` and reset once it has carried ``after_bytes`` more bytes (0: at once); while the
  toxic is active every new connection is picked the same way.
- ``blackhole(mode="stall")``: nothing flows and new connections get no upstream until it is
  removed, then everything resumes intact (a partition that heals before TCP gives up);
  ``mode="drop"`` reads and discards instead, and resets the connections that lost bytes when it
  is removed (their byte streams can no longer be trusted).

Frame rewriting (a protocol-aware toxic): a proxy in front of the master can be given a
:class:`MasterRouteRewriter` that rewrites the transfer endpoints inside replica descriptors, so
clients that reach the master through the proxy send their data through a transfer proxy too.
The store is not told anything; it is the same answer a master on another network would give.

The proxy runs its own event loop in a daemon thread; every control method is thread-safe.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import random
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack

from store.master.rpc import HEADER

log = logging.getLogger("fault.proxy")

TOXIC_KINDS = ("delay", "bandwidth", "reset", "blackhole")
DIRECTIONS = ("up", "down", "both")
CHUNK = 64 * 1024
_LINGER_RST = struct.pack("ii", 1, 0)


class ProxyError(RuntimeError):
    """The proxy could not start, or a toxic was asked for with bad parameters."""


@dataclass
class Toxic:
    kind: str
    direction: str = "both"
    latency: float = 0.0
    jitter: float = 0.0
    rate: float = 0.0
    after_bytes: int = 0
    probability: float = 1.0
    mode: str = "stall"
    id: int = 0

    def applies(self, direction: str) -> bool:
        return self.direction == "both" or self.direction == direction

    def to_dict(self) -> dict[str, Any]:
        base: dict[str, Any] = {"id": self.id, "kind": self.kind, "direction": self.direction}
        extra = {
            "delay": {"latency": self.latency, "jitter": self.jitter},
            "bandwidth": {"rate": self.rate},
            "reset": {"after_bytes": self.after_bytes, "probability": self.probability},
            "blackhole": {"mode": self.mode},
        }[self.kind]
        return {**base, **extra}


class FrameRewriter:
    """Rewrites a byte stream frame by frame; :meth:`feed` returns what may be forwarded now."""

    def feed(self, data: bytes) -> bytes:
        return data


class MasterRouteRewriter(FrameRewriter):
    """Rewrites master replies (length-prefixed msgpack) so endpoints in ``routes`` become their
    proxies: every ``te_endpoint`` and ``endpoint`` value found in the reply, at any depth."""

    KEYS = ("te_endpoint", "endpoint")

    def __init__(self, routes: dict[str, str] | None = None) -> None:
        self.routes: dict[str, str] = dict(routes or {})
        self._buf = bytearray()
        self.rewritten = 0
        self._root: MasterRouteRewriter = self

    def clone(self) -> MasterRouteRewriter:
        """A rewriter for one more connection sharing this one's routes and counter (the frame
        buffer is per stream)."""
        twin = MasterRouteRewriter()
        twin.routes = self.routes
        twin._root = self._root
        return twin

    def _walk(self, obj: Any) -> Any:
        if isinstance(obj, dict):
            out = {}
            for k, v in obj.items():
                if k in self.KEYS and isinstance(v, str) and v in self.routes:
                    out[k] = self.routes[v]
                    self._root.rewritten += 1
                else:
                    out[k] = self._walk(v)
            return out
        if isinstance(obj, list):
            return [self._walk(v) for v in obj]
        return obj

    def feed(self, data: bytes) -> bytes:
        self._buf += data
        out = bytearray()
        while len(self._buf) >= HEADER.size:
            (n,) = HEADER.unpack_from(self._buf)
            if len(self._buf) < HEADER.size + n:
                break
            body = bytes(self._buf[HEADER.size : HEADER.size + n])
            del self._buf[: HEADER.size + n]
            if self.routes:
                try:
                    obj = msgpack.unpackb(body, raw=False, strict_map_key=False)
                    body = msgpack.packb(self._walk(obj), use_bin_type=True)
                except (ValueError, TypeError, msgpack.UnpackException):
                    pass  # not ours to judge: forward as it came
            out += HEADER.pack(len(body)) + body
        return bytes(out)


@dataclass(eq=False)
class _Conn:
    id: int
    peer: str
    opened: float
    client: asyncio.StreamWriter | None = None
    upstream: asyncio.StreamWriter | None = None
    bytes_up: int = 0
    bytes_down: int = 0
    reset_at: int | None = None  # total bytes after which the connection is reset
    lost_bytes: bool = False  # a drop blackhole discarded some of its bytes
    closed: bool = False
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.bytes_up + self.bytes_down


def _rst(writer: asyncio.StreamWriter | None) -> None:
    """Close with a TCP reset: the peer's next read or write fails with ECONNRESET."""
    if writer is None:
        return
    transport = writer.transport
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
        except OSError:
            pass
    transport.abort()


class TcpProxy:
    """See the module docstring. ``upstream`` is ``host:port`` (loopback only: this is a test tool)."""

    def __init__(
        self,
        upstream: str | tuple[str, int],
        *,
        name: str = "proxy",
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        rewriter: FrameRewriter | None = None,
        seed: int = 0,
    ) -> None:
        if isinstance(upstream, str):
            host, _, port = upstream.rpartition(":")
            upstream = (host.strip("[]"), int(port))
        if upstream[0] not in ("127.0.0.1", "localhost", "::1") or listen_host not in ("127.0.0.1", "::1"):
            raise ProxyError(
                f"proxy {name}: network faults target loopback only, got upstream {upstream} "
                f"listen {listen_host}"
            )
        self.name = name
        self.upstream = upstream
        self.listen = (listen_host, listen_port)
        self.rewriter = rewriter
        self._rng = random.Random(f"umbra-proxy:{seed}:{name}")
        self._toxics: dict[int, Toxic] = {}
        self._toxic_ids = itertools.count(1)
        self._conns: dict[int, _Conn] = {}
        self._conn_ids = itertools.count(1)
        self._counters: collections.Counter[str] = collections.Counter()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._flowing: asyncio.Event | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.address: tuple[str, int] | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self, timeout: float = 10.0) -> TcpProxy:
        self._thread = threading.Thread(target=self._main, name=f"proxy-{self.name}", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout) or self._error is not None:
            raise ProxyError(f"proxy {self.name} did not start: {self._error}")
        log.info("proxy %s listening %s -> %s:%d", self.name, self.endpoint, *self.upstream)
        return self

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # noqa: BLE001 - handed to start() through _error
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._stop = asyncio.Event()
        self._server = await asyncio.start_server(self._accept, *self.listen)
        self.address = self._server.sockets[0].getsockname()[:2]
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            self._server.close()
            for c in list(self._conns.values()):
                self._close_conn(c, reset=False)
            await self._server.wait_closed()

    def close(self) -> None:
        """Stop listening and close every connection (gracefully)."""
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(stop.set)
            except RuntimeError:
                pass
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def endpoint(self) -> str:
        if self.address is None:
            raise ProxyError(f"proxy {self.name} is not started")
        return f"{self.address[0]}:{self.address[1]}"

    def _call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the proxy's loop and return its result (thread-safe control)."""
        loop = self._loop
        if loop is None:
            raise ProxyError(f"proxy {self.name} is not started")

        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), loop).result(10)

    # ------------------------------------------------------------------ control

    def add_toxic(
        self,
        kind: str,
        *,
        direction: str = "both",
        latency: float = 0.0,
        jitter: float = 0.0,
        rate: float = 0.0,
        after_bytes: int = 0,
        probability: float = 1.0,
        mode: str = "stall",
    ) -> int:
        """Start a toxic; returns its id for :meth:`remove_toxic`."""
        if kind not in TOXIC_KINDS:
            raise ProxyError(f"unknown toxic {kind!r}; expected one of {TOXIC_KINDS}")
        if direction not in DIRECTIONS:
            raise ProxyError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        if latency < 0 or jitter < 0 or after_bytes < 0 or not 0.0 <= probability <= 1.0:
            raise ProxyError("latency, jitter and after_bytes must be >= 0 and probability in [0, 1]")
        if kind == "bandwidth" and rate <= 0:
            raise ProxyError("bandwidth toxic needs rate > 0 (bytes per second)")
        if mode not in ("stall", "drop"):
            raise ProxyError(f"blackhole mode must be 'stall' or 'drop', got {mode!r}")
        toxic = Toxic(
            kind, direction, latency, jitter, rate, after_bytes, probability, mode, next(self._toxic_ids)
        )

        def install() -> int:
            self._toxics[toxic.id] = toxic
            self._counters[f"toxics_{kind}"] += 1
            if kind == "blackhole":
                self._refresh_flow()
            elif kind == "reset":
                for c in list(self._conns.values()):
                    self._doom(c, toxic)
            return toxic.id

        tid = self._call(install)
        log.info("proxy %s: toxic %s added %s", self.name, kind, toxic.to_dict())
        return int(tid)

    def remove_toxic(self, toxic_id: int) -> bool:
        def uninstall() -> bool:
            toxic = self._toxics.pop(toxic_id, None)
            if toxic is None:
                return False
            if toxic.kind == "blackhole":
                self._refresh_flow()
                if toxic.mode == "drop" and not self._blackholes("drop"):
                    for c in [c for c in self._conns.values() if c.lost_bytes]:
                        self._reset(c, "bytes dropped by a blackhole")
            return True

        removed = bool(self._call(uninstall))
        if removed:
            log.info("proxy %s: toxic %d removed", self.name, toxic_id)
        return removed

    def clear_toxics(self) -> None:
        for tid in list(self.toxics()):
            self.remove_toxic(tid)

    def toxics(self) -> dict[int, dict[str, Any]]:
        return {t.id: t.to_dict() for t in list(self._toxics.values())}

    def reset_connections(self) -> int:
        """Reset every open connection now; returns how many."""

        def do() -> int:
            conns = [c for c in self._conns.values() if not c.closed]
            for c in conns:
                self._reset(c, "reset on request")
            return len(conns)

        return int(self._call(do))

    def stats(self) -> dict[str, Any]:
        conns = list(self._conns.values())
        return {
            "name": self.name,
            "endpoint": self.endpoint if self.address else "",
            "upstream": f"{self.upstream[0]}:{self.upstream[1]}",
            **dict(self._counters),
            "open_connections": sum(1 for c in conns if not c.closed),
            "rewritten": getattr(self.rewriter, "rewritten", 0),
            "toxics": list(self.toxics().values()),
        }

    def counter(self, name: str) -> int:
        return int(self._counters.get(name, 0))

    # ------------------------------------------------------------------ internals (loop thread)

    def _blackholes(self, mode: str | None = None) -> list[Toxic]:
        return [
            t for t in self._toxics.values() if t.kind == "blackhole" and (mode is None or t.mode == mode)
        ]

    def _refresh_flow(self) -> None:
        assert self._flowing is not None
        if self._blackholes("stall"):
            self._flowing.clear()
        else:
            self._flowing.set()

    def _doom(self, c: _Conn, toxic: Toxic) -> None:
        if c.closed or self._rng.random() >= toxic.probability:
            return
        at = c.total + toxic.after_bytes
        c.reset_at = at if c.reset_at is None else min(c.reset_at, at)
        if toxic.after_bytes == 0:
            self._reset(c, "reset toxic")

    def _reset(self, c: _Conn, why: str) -> None:
        if c.closed:
            return
        self._counters["resets"] += 1
        log.info(
            "proxy %s: connection #%d from %s reset after %d bytes (%s)",
            self.name,
            c.id,
            c.peer,
            c.total,
            why,
        )
        self._close_conn(c, reset=True)

    def _close_conn(self, c: _Conn, *, reset: bool) -> None:
        if c.closed:
            return
        c.closed = True
        for w in (c.client, c.upstream):
            if w is None:
                continue
            if reset:
                _rst(w)
            else:
                w.close()
        for t in c.tasks:
            if t is not asyncio.current_task():
                t.cancel()
        self._conns.pop(c.id, None)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._handle(reader, writer)
        except asyncio.CancelledError:
            # the loop is shutting down (close()): end quietly; asyncio's stream callback would
            # otherwise log the cancelled handler task as an error
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        c = _Conn(
            next(self._conn_ids),
            f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer),
            time.monotonic(),
            client=writer,
        )
        self._conns[c.id] = c
        self._counters["connections"] += 1
        for t in list(self._toxics.values()):
            if t.kind == "reset":
                self._doom(c, t)
        if c.closed:
            return
        assert self._flowing is not None
        await self._flowing.wait()  # a stalled blackhole lets the connection in but not through
        if c.closed:
            return
        try:
            ureader, uwriter = await asyncio.open_connection(*self.upstream)
        except OSError as exc:
            self._counters["upstream_failures"] += 1
            log.info(
                "proxy %s: upstream %s:%d refused connection #%d: %s", self.name, *self.upstream, c.id, exc
            )
            self._reset(c, "upstream unreachable")
            return
        if c.closed:
            uwriter.close()
            return
        c.upstream = uwriter
        rewriter = self.rewriter.clone() if isinstance(self.rewriter, MasterRouteRewriter) else None
        c.tasks = [
            asyncio.create_task(self._pipe(c, reader, uwriter, "up", None)),
            asyncio.create_task(self._pipe(c, ureader, writer, "down", rewriter)),
        ]
        await asyncio.gather(*c.tasks, return_exceptions=True)
        self._close_conn(c, reset=False)

    async def _pipe(
        self,
        c: _Conn,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        direction: str,
        rewriter: FrameRewriter | None,
    ) -> None:
        """Read → (rewrite) → queue with a due time → write, keeping order; toxics act on the way."""
        queue: asyncio.Queue[tuple[float, bytes | None]] = asyncio.Queue()
        sender = asyncio.create_task(self._send(c, writer, direction, queue))
        c.tasks.append(sender)
        assert self._flowing is not None
        last_due = 0.0
        try:
            while not c.closed:
                await self._flowing.wait()
                try:
                    data = await reader.read(CHUNK)
                except (ConnectionError, OSError):
                    self._reset(c, f"{direction} side reset")
                    return
                if not data:
                    await queue.put((0.0, None))
                    await sender
                    return
                if any(
                    t.kind == "blackhole" and t.mode == "drop" and t.applies(direction)
                    for t in self._toxics.values()
                ):
                    c.lost_bytes = True
                    self._counters["dropped_bytes"] += len(data)
                    continue
                if rewriter is not None:
                    data = rewriter.feed(data)
                    if not data:
                        continue
                delay = 0.0
                for t in self._toxics.values():
                    if t.kind == "delay" and t.applies(direction):
                        delay += t.latency + (self._rng.uniform(0.0, t.jitter) if t.jitter else 0.0)
                due = max(time.monotonic() + delay, last_due)
                last_due = due
                if delay:
                    self._counters["delayed_chunks"] += 1
                await queue.put((due, data))
        finally:
            if c.closed and not sender.done():
                sender.cancel()

    async def _send(
        self,
        c: _Conn,
        writer: asyncio.StreamWriter,
        direction: str,
        queue: asyncio.Queue[tuple[float, bytes | None]],
    ) -> None:
        assert self._flowing is not None
        while not c.closed:
            due, data = await queue.get()
            if data is None:
                try:
                    if writer.can_write_eof():
                        writer.write_eof()
                except (ConnectionError, OSError, RuntimeError):
                    pass
                return
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            await self._flowing.wait()
            rate = min(
                (t.rate for t in self._toxics.values() if t.kind == "bandwidth" and t.applies(direction)),
                default=0.0,
            )
            pieces = (
                [data]
                if not rate
                else [
                    data[i : i + max(1, int(rate / 20))] for i in range(0, len(data), max(1, int(rate / 20)))
                ]
            )
            for piece in pieces:
                if c.closed:
                    return
                try:
                    writer.write(piece)
                    await writer.drain()
                except (ConnectionError, OSError):
                    self._reset(c, f"{direction} write failed")
                    return
                n = len(piece)
                if direction == "up":
                    c.bytes_up += n
                    self._counters["bytes_up"] += n
                else:
                    c.bytes_down += n
                    self._counters["bytes_down"] += n
                if rate:
                    self._counters["throttled_bytes"] += n
                    await asyncio.sleep(n / rate)
                if c.reset_at is not None and c.total >= c.reset_at:
                    self._reset(c, "reset toxic (byte budget reached)")
                    return

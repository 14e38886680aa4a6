"""TCP transport: persistent, pipelined connections to each peer's transfer server.

Per peer there is a pool of ``connections_per_peer`` lanes. A lane owns at most one connection
and a writer thread; each connection has a reader thread. Slices handed to :meth:`submit` are
grouped into *frames* (consecutive slices of one request that are contiguous locally and
remotely, inside one remote buffer, up to ``max_frame_bytes``) and queued on the peer; whichever
lane is free sends the next frame without waiting for earlier acknowledgements, so a connection
carries a pipeline of requests. Each slice still gets its own completion: when a frame's
acknowledgement (or READ data) arrives, every slice in it completes.

Failures: a send or receive error, a reset, or :meth:`TcpTransport.drop_connections` kills the
connection; its reader thread fails every frame still awaiting an answer (retryable, with the
connection id and peer in the message), and the lane opens a new connection for the next frame,
which is where the engine's retries land. The reader is the only thread that receives on a
connection, so no READ data can land in local memory after its slices were failed; and the
answer to a READ whose request is already over (cancelled, timed out, failed) is read into a
scratch buffer, not into the caller's memory.

Failpoints: ``tcp.connect`` (before opening a connection), ``tcp.send`` (before a frame is sent;
an error kills the connection), ``tcp.recv_ack`` (before an answer is read; an error kills the
connection, as a lost acknowledgement would).
"""

from __future__ import annotations

import collections
import itertools
import logging
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from store.errors import ErrorCode, StoreError
from store.failpoints import failpoint
from store.transfer.memory import view_at
from store.transfer.server import (
    HEADER_SIZE,
    MSG_READ,
    MSG_READ_RESP,
    MSG_WRITE,
    MSG_WRITE_ACK,
    NON_RETRYABLE,
    ProtocolError,
    abort_socket,
    drain,
    pack_header,
    recv_bytes,
    recv_exact_into,
    send_all,
    split_endpoint,
    unpack_header,
)
from store.transfer.transport import BufferDescriptor, EngineContext, Opcode, Slice, Transport

log = logging.getLogger(__name__)

_conn_ids = itertools.count(1)


class _Frame:
    """Consecutive slices sent as one message."""

    __slots__ = ("endpoint", "length", "local_addr", "opcode", "remote_addr", "remote_limit", "slices")

    def __init__(self, first: Slice) -> None:
        self.opcode = first.opcode
        self.endpoint = first.segment.endpoint
        self.local_addr = first.local_addr
        self.remote_addr = first.remote_addr
        self.length = first.length
        self.slices = [first]
        buf = first.segment.find_buffer(first.remote_addr, first.length)
        self.remote_limit = buf.addr + buf.length if buf is not None else None

    def try_add(self, s: Slice, max_bytes: int) -> bool:
        if (s.opcode is not self.opcode or s.local_addr != self.local_addr + self.length
                or s.remote_addr != self.remote_addr + self.length
                or self.length + s.length > max_bytes or s.segment.endpoint != self.endpoint
                or (self.remote_limit is not None and s.remote_addr + s.length > self.remote_limit)):
            return False
        self.slices.append(s)
        self.length += s.length
        return True

    def fail(self, error: str, *, code: int = ErrorCode.TRANSFER_FAIL, retryable: bool = True) -> None:
        for s in self.slices:
            s.complete(False, error, code=code, retryable=retryable)


@dataclass(frozen=True)
class ConnectionInfo:
    """Read-only snapshot of one client connection (for fault injectors and checkers)."""

    id: int
    peer: str
    local: str
    lane: int
    frames_in_flight: int
    slices_in_flight: int
    frames_sent: int
    bytes_sent: int
    bytes_received: int
    alive: bool


class _Connection:
    def __init__(self, transport: TcpTransport, endpoint: str, lane: int, sock: socket.socket) -> None:
        self.id = next(_conn_ids)
        self.transport = transport
        self.endpoint = endpoint
        self.lane = lane
        self.sock = sock
        try:
            name = sock.getsockname()
            self.local = f"{name[0]}:{name[1]}"
        except OSError:
            self.local = "?"
        self._lock = threading.Lock()
        self.pending: collections.OrderedDict[int, _Frame] = collections.OrderedDict()
        self.dead = False
        self.reason = ""
        self._req_ids = itertools.count(1)
        self.frames_sent = 0
        self.bytes_sent = 0
        self.bytes_received = 0
        self.reader = threading.Thread(target=self._read_loop, daemon=True,
                                       name=f"tcp-read-{endpoint}-{self.id}")
        self.reader.start()

    def info(self) -> ConnectionInfo:
        with self._lock:
            frames = len(self.pending)
            slices = sum(len(f.slices) for f in self.pending.values())
        return ConnectionInfo(self.id, self.endpoint, self.local, self.lane, frames, slices,
                              self.frames_sent, self.bytes_sent, self.bytes_received, not self.dead)

    def send(self, frame: _Frame, slice_timeout: float) -> None:
        deadline = time.monotonic() + slice_timeout if slice_timeout > 0 else 0.0  # restarts on the wire
        for s in frame.slices:
            if deadline:
                s.deadline = deadline
            s.where["conn"] = self.id
        with self._lock:
            if self.dead:
                dead = True
            else:
                dead = False
                req_id = next(self._req_ids)
                self.pending[req_id] = frame
        if dead:
            frame.fail(f"tcp connection #{self.id} to {self.endpoint} closed before send: {self.reason}")
            return
        try:
            failpoint("tcp.send", peer=self.endpoint, conn=self.id, req_id=req_id, op=frame.opcode.name,
                      addr=frame.remote_addr, length=frame.length)
            if frame.opcode is Opcode.WRITE:
                header = pack_header(MSG_WRITE, req_id, frame.remote_addr, frame.length)
                send_all(self.sock, [header, view_at(frame.local_addr, frame.length, writable=False)])
            else:
                self.sock.sendall(pack_header(MSG_READ, req_id, frame.remote_addr, frame.length))
        except (OSError, StoreError) as exc:
            # The reader owns failing pending frames; waking it with a reset is enough.
            self.abort(f"send of request {req_id} failed: {exc}")
            return
        self.frames_sent += 1
        if frame.opcode is Opcode.WRITE:
            self.bytes_sent += frame.length

    def abort(self, reason: str) -> None:
        with self._lock:
            if not self.reason:
                self.reason = reason
        abort_socket(self.sock)

    def _read_loop(self) -> None:
        sock = self.sock
        hbuf = bytearray(HEADER_SIZE)
        hview = memoryview(hbuf)
        scratch: memoryview | None = None
        error = ""
        try:
            while True:
                failpoint("tcp.recv_ack", peer=self.endpoint, conn=self.id)
                recv_exact_into(sock, hview)
                msg_type, req_id, _addr, length, status, aux = unpack_header(hbuf)
                with self._lock:
                    if not self.pending:
                        raise ProtocolError(f"answer to request {req_id} with nothing pending")
                    expected, frame = next(iter(self.pending.items()))
                if req_id != expected:
                    raise ProtocolError(f"answer to request {req_id}, expected {expected}")
                want = MSG_WRITE_ACK if frame.opcode is Opcode.WRITE else MSG_READ_RESP
                if msg_type != want:
                    raise ProtocolError(f"request {req_id}: got message type {msg_type}, expected {want}")
                if status == 0 and msg_type == MSG_READ_RESP:
                    if length != frame.length:
                        raise ProtocolError(f"READ {req_id}: {length} B answered, {frame.length} B asked")
                    if all(s.abandoned for s in frame.slices):
                        # its request is over and the caller may be reusing the memory: discard
                        if scratch is None:
                            scratch = memoryview(bytearray(1 << 16))
                        drain(sock, length, scratch)
                        self.transport._count("reads_discarded")
                    elif length:
                        recv_exact_into(sock, view_at(frame.local_addr, length))
                    self.bytes_received += length
                elif length:
                    raise ProtocolError(f"request {req_id}: unexpected {length} data bytes")
                text = recv_bytes(sock, aux).decode(errors="replace") if aux else ""
                with self._lock:
                    self.pending.pop(req_id, None)
                self.transport._frame_done(frame, status, text, self)
                del frame  # hold no slice while idle
        except ProtocolError as exc:
            error = f"protocol error: {exc}"
            log.warning("tcp connection #%d to %s: %s", self.id, self.endpoint, error)
        except (OSError, StoreError) as exc:
            error = str(exc)
        finally:
            with self._lock:
                self.dead = True
                reason = self.reason or error or "connection closed"
                self.reason = reason
                frames = list(self.pending.values())
                self.pending.clear()
            abort_socket(sock)
            try:
                sock.close()
            except OSError:
                pass
            self.transport._connection_lost(self, reason, frames)


class _Lane:
    def __init__(self, pool: _PeerPool, index: int) -> None:
        self.pool = pool
        self.index = index
        self.conn: _Connection | None = None
        self.thread = threading.Thread(target=self._run, daemon=True,
                                       name=f"tcp-lane-{pool.endpoint}-{index}")
        self.thread.start()

    def _connect(self) -> _Connection:
        pool = self.pool
        t = pool.transport
        failpoint("tcp.connect", peer=pool.endpoint, lane=self.index)
        sock = socket.create_connection((pool.host, pool.port), timeout=t.connect_timeout)
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if t.socket_buffer:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, t.socket_buffer)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, t.socket_buffer)
        conn = _Connection(t, pool.endpoint, self.index, sock)
        with pool.lock:
            closed = pool.closed
            if not closed:
                pool.conns[conn.id] = conn
        if closed:
            conn.abort("tcp transport closed while connecting")
        t._count("connections_opened")
        log.debug("tcp connection #%d to %s opened (lane %d, local %s)",
                  conn.id, pool.endpoint, self.index, conn.local)
        return conn

    def _run(self) -> None:
        pool = self.pool
        t = pool.transport
        while True:
            frame = pool.take()
            if frame is None:
                return
            if all(s.abandoned for s in frame.slices):
                frame.fail("request abandoned before send", retryable=False)
                del frame
                continue
            conn = self.conn
            if conn is None or conn.dead:
                try:
                    conn = self.conn = self._connect()
                except (OSError, StoreError) as exc:
                    self.conn = None
                    t._count("connect_failures")
                    code = exc.code if isinstance(exc, StoreError) else ErrorCode.TRANSFER_FAIL
                    frame.fail(f"tcp connect to {pool.endpoint} (lane {self.index}) failed: {exc}", code=code)
                    del frame
                    continue
            conn.send(frame, t.slice_timeout)
            del frame  # hold no slice while idle


class _PeerPool:
    def __init__(self, transport: TcpTransport, endpoint: str) -> None:
        self.transport = transport
        self.endpoint = endpoint
        self.host, self.port = split_endpoint(endpoint)
        self.lock = threading.Lock()
        self.ready = threading.Condition(self.lock)
        self.queue: collections.deque[_Frame] = collections.deque()
        self.conns: dict[int, _Connection] = {}
        self.closed = False
        self.lanes = [_Lane(self, i) for i in range(transport.connections_per_peer)]

    def put(self, frames: list[_Frame]) -> None:
        with self.lock:
            if self.closed:
                closed = True
            else:
                closed = False
                self.queue.extend(frames)
                self.ready.notify(len(frames))
        if closed:
            for f in frames:
                f.fail(f"tcp transport to {self.endpoint} is closed", retryable=False)

    def take(self) -> _Frame | None:
        with self.lock:
            while not self.queue:
                if self.closed:
                    return None
                self.ready.wait()
            return self.queue.popleft()

    def close(self) -> list[_Frame]:
        with self.lock:
            self.closed = True
            left = list(self.queue)
            self.queue.clear()
            conns = list(self.conns.values())
            self.ready.notify_all()
        for c in conns:
            c.abort("tcp transport closed")
        return left


class TcpTransport(Transport):
    """See the module docstring. Options (``transport_options["tcp"]`` of the engine):

    - ``connections_per_peer`` (2): lanes, hence at most that many connections, per peer.
    - ``max_frame_bytes`` (4 MiB): largest frame; bigger requests go out as several frames that
      different connections carry in parallel.
    - ``connect_timeout`` (5 s), ``socket_buffer`` (0 = kernel default) SO_SNDBUF/SO_RCVBUF.
    """

    name = "tcp"

    def __init__(self, engine: EngineContext | None = None, *, connections_per_peer: int = 2,
                 max_frame_bytes: int = 4 << 20, connect_timeout: float = 5.0, socket_buffer: int = 0,
                 slice_timeout: float = 0.0) -> None:
        if connections_per_peer < 1:
            raise StoreError(ErrorCode.INVALID_PARAMS, f"connections_per_peer must be >= 1, got "
                                                       f"{connections_per_peer}")
        if max_frame_bytes < 1:
            raise StoreError(ErrorCode.INVALID_PARAMS, f"max_frame_bytes must be >= 1, got {max_frame_bytes}")
        self.engine = engine
        self.connections_per_peer = connections_per_peer
        self.max_frame_bytes = max_frame_bytes
        self.connect_timeout = connect_timeout
        self.socket_buffer = socket_buffer
        config = getattr(engine, "config", None)
        self.slice_timeout = slice_timeout or float(getattr(config, "slice_timeout_s", 0.0) or 0.0)
        self._lock = threading.Lock()
        self._pools: dict[str, _PeerPool] = {}
        self._closed = False
        self._counters = collections.Counter[str]()

    # ---------------------------------------------------------------- Transport

    def register_memory(self, addr: int, length: int) -> BufferDescriptor:
        # The transfer server serves straight from the engine's memory table; nothing to pin here.
        return BufferDescriptor(addr, length)

    def unregister_memory(self, addr: int) -> None:
        return None

    def submit(self, slices: Sequence[Slice]) -> None:
        frames: dict[str, list[_Frame]] = {}
        cur: _Frame | None = None
        limit = self.max_frame_bytes
        for s in slices:
            if cur is not None and cur.try_add(s, limit):
                continue
            cur = _Frame(s)
            frames.setdefault(cur.endpoint, []).append(cur)
        for endpoint, fs in frames.items():
            pool = self._pool(endpoint)
            if pool is None:
                for f in fs:
                    f.fail("tcp transport is closed", retryable=False)
                continue
            self._count("frames_queued", len(fs))
            pool.put(fs)

    def abort(self, slices: Sequence[Slice]) -> None:
        """Reset the connections carrying these slices (they stopped answering in time)."""
        ids = {s.where.get("conn") for s in slices} - {None}
        if not ids:
            return
        with self._lock:
            pools = list(self._pools.values())
        for pool in pools:
            with pool.lock:
                conns = [c for cid, c in pool.conns.items() if cid in ids]
            for c in conns:
                self._count("connections_aborted")
                c.abort("slice timed out waiting for the peer's answer")

    def close(self) -> None:
        with self._lock:
            self._closed = True
            pools = list(self._pools.values())
            self._pools.clear()
        for pool in pools:
            for frame in pool.close():
                frame.fail(f"tcp transport closed with the frame to {pool.endpoint} unsent", retryable=False)
        for pool in pools:
            for lane in pool.lanes:
                lane.thread.join(timeout=5)
            with pool.lock:
                conns = list(pool.conns.values())
            for c in conns:
                c.reader.join(timeout=5)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            pools = list(self._pools.values())
            counters = dict(self._counters)
        conns = [c.info() for p in pools for c in list(p.conns.values())]
        return {**counters, "peers": len(pools), "open_connections": sum(c.alive for c in conns),
                "frames_in_flight": sum(c.frames_in_flight for c in conns),
                "slices_in_flight": sum(c.slices_in_flight for c in conns),
                "frames_queued_now": sum(len(p.queue) for p in pools)}

    # ---------------------------------------------------------------- introspection / faults

    def peers(self) -> dict[str, list[ConnectionInfo]]:
        """Connections per peer endpoint (read-only snapshots)."""
        with self._lock:
            pools = dict(self._pools)
        out = {}
        for endpoint, pool in pools.items():
            with pool.lock:
                conns = list(pool.conns.values())
            out[endpoint] = [c.info() for c in conns]
        return out

    def drop_connections(self, endpoint: str) -> int:
        """Reset every connection to ``endpoint`` now (real sockets closed with a reset).

        Frames awaiting an answer on them fail (retryable); the next frames open new connections.
        Returns how many connections were dropped.
        """
        with self._lock:
            pool = self._pools.get(endpoint)
        if pool is None:
            return 0
        with pool.lock:
            conns = [c for c in pool.conns.values() if not c.dead]
        for c in conns:
            c.abort(f"connection to {endpoint} dropped on request")
        self._count("connections_dropped", len(conns))
        return len(conns)

    # ---------------------------------------------------------------- internals

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._counters[key] += n

    def _pool(self, endpoint: str) -> _PeerPool | None:
        with self._lock:
            if self._closed:
                return None
            pool = self._pools.get(endpoint)
            if pool is None:
                pool = self._pools[endpoint] = _PeerPool(self, endpoint)
            return pool

    def _frame_done(self, frame: _Frame, status: int, text: str, conn: _Connection) -> None:
        if status == 0:
            self._count("frames_ok")
            for s in frame.slices:
                s.complete(True)
            return
        self._count("frames_refused")
        retryable = status not in NON_RETRYABLE
        msg = (f"{frame.opcode.name} of {frame.length} B at {frame.remote_addr:#x} refused by "
               f"{conn.endpoint} (connection #{conn.id}): {text or status}")
        for s in frame.slices:
            s.complete(False, msg, code=status, retryable=retryable)

    def _connection_lost(self, conn: _Connection, reason: str, frames: list[_Frame]) -> None:
        with self._lock:
            pool = self._pools.get(conn.endpoint)
            self._counters["connections_lost"] += 1
        if pool is not None:
            with pool.lock:
                pool.conns.pop(conn.id, None)
        if frames:
            log.info("tcp connection #%d to %s lost with %d frame(s) in flight: %s",
                     conn.id, conn.endpoint, len(frames), reason)
        for f in frames:
            f.fail(f"tcp connection #{conn.id} to {conn.endpoint} lost: {reason}")

"""TCP transport: persistent, pipelined connections to each peer's transfer server.

Per peer there is a pool of ``connections_per_peer`` lanes. A lane owns at most one connection
and a writer thread; each connection has a reader thread. Slices handed to :meth:`submit` are
grouped into *frames* (consecutive slices of one request that are contiguous locally and
remotely, inside one remote buffer, up to ``max_frame_bytes``) and queued on the peer; whichever
lane is free sends the next frame without waiting for earlier acknowledgements, so a connection
carries a pipeline of requests. Each slice still gets its own completion: when a frame's
acknowledgement (or READ data) arrives, every slice in it completes.

Receiving: a connection has a reader thread only while answers are due. The thread starts when
a frame is sent on an idle connection, and once nothing is pending it lingers briefly for more,
then ends; before a frame goes out on a connection nobody is receiving on, a non-blocking peek
checks that the peer has not closed it meanwhile (a closed one is replaced, as before).

Small requests take a fast path (``inline_max_bytes``, 64 KiB): when one small frame is all a
``submit`` carries and a lane's connection is idle, the caller's thread sends the frame on it and
waits up to ``inline_wait_s`` for the answer, reading it itself, so a 4 KiB put or get costs no
hand-off to a lane thread and back from a reader thread (each a wake-up and a GIL hand-over). If
the answer is late, a reader thread takes over as for any frame, so ``submit`` blocks on the
network for at most ``inline_wait_s``. Exactly one thread receives on a connection at any time.
The fast path is skipped while any failpoint is armed (a paused step must not hold the caller
inside ``submit``) and for retries (they are sent from the engine's monitor thread).

Failures: a send or receive error, a reset, or :meth:`TcpTransport.drop_connections` kills the
connection; the thread receiving on it fails every frame still awaiting an answer (retryable,
with the connection id and peer in the message), and the lane opens a new connection for the next
frame, which is where the engine's retries land. Only that one thread receives on a connection,
so no READ data can land in local memory after its slices were failed; and the
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
import select
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from store import failpoints
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

READER_LINGER_S = 0.05  # an idle reader thread waits this long for the next frame before it ends

# Who receives on a connection (``_Connection.rx``): nobody (idle), its reader thread (reading, or
# lingering for the next frame), a caller on the inline fast path, a lane peeking at an idle
# connection, or the thread closing it. ``_Connection.rx_gen`` counts hand-overs of that role, so a
# lingering reader whose role was taken meanwhile knows it must end even if the role is a reader's
# again by the time it wakes up (only one thread ever receives on a connection).
_RX_NONE, _RX_READER, _RX_LINGER, _RX_INLINE, _RX_PEEK, _RX_CLOSING = range(6)


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
        self._cond = threading.Condition(self._lock)
        self._send_lock = threading.Lock()  # one sender at a time; pending order = wire order
        self.pending: collections.OrderedDict[int, _Frame] = collections.OrderedDict()
        self.dead = False
        self.reason = ""
        self.rx = _RX_NONE
        self.rx_gen = 0
        self._req_ids = itertools.count(1)
        self.frames_sent = 0
        self.bytes_sent = 0
        self.bytes_received = 0
        self._hbuf = bytearray(HEADER_SIZE)
        self._hview = memoryview(self._hbuf)
        self._scratch: memoryview | None = None
        self._poller: select.poll | None = None
        self.reader: threading.Thread | None = None  # the latest reader thread (joined on close)

    def info(self) -> ConnectionInfo:
        with self._lock:
            frames = len(self.pending)
            slices = sum(len(f.slices) for f in self.pending.values())
        return ConnectionInfo(self.id, self.endpoint, self.local, self.lane, frames, slices,
                              self.frames_sent, self.bytes_sent, self.bytes_received, not self.dead)

    def _take_rx(self, rx: int) -> int:
        """Hand the receiving role to a new owner (caller holds ``_lock``); its generation."""
        self.rx = rx
        self.rx_gen += 1
        self._cond.notify_all()  # a lingering reader ends
        return self.rx_gen

    def _start_reader(self, gen: int) -> None:
        t = threading.Thread(target=self._read_loop, args=(gen,), daemon=True,
                             name=f"tcp-read-{self.endpoint}-{self.id}")
        self.reader = t
        t.start()

    def peer_gone(self) -> str:
        """Why the idle connection cannot be used ("" when it can): the peer closed or reset it, or
        sent bytes nobody asked for. One non-blocking peek, by the holder of the receiving role."""
        try:
            data = self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return ""
        except OSError as exc:
            return f"connection broken while idle: {exc}"
        if not data:
            return "peer closed the connection while it was idle"
        with self._lock:
            if self.pending:
                return ""  # the answer to a frame a lane sent meanwhile
        return "peer sent bytes while nothing was pending"

    def _release_rx(self, rx: int) -> None:
        """Give up the receiving role held as ``rx``: to a new reader thread when frames a lane sent
        meanwhile are due, to this thread's clean-up when the connection was aborted meanwhile
        (nobody was receiving to notice), else the connection goes idle."""
        with self._lock:
            if self.rx != rx or self.dead:
                return
            closing = bool(self.reason)
            if closing:
                self._take_rx(_RX_CLOSING)
                reader = 0
            elif self.pending:
                reader = self._take_rx(_RX_READER)
            else:
                self.rx = _RX_NONE
                reader = 0
        if closing:
            self._die("")
        elif reader:
            self._start_reader(reader)

    def retire(self, rx: int, why: str) -> None:
        """Close a connection the holder of the receiving role (as ``rx``) found broken."""
        with self._lock:
            if not self.reason:
                self.reason = why  # before the role is given up: nobody can claim it meanwhile
        self._release_rx(rx)

    def check_idle(self) -> bool:
        """Lanes call this before sending: an idle connection the peer closed is retired (as the
        reader thread of an always-read connection would have noticed), so the frame goes out on a
        fresh one. False when the connection is dead now."""
        with self._lock:
            if self.dead:
                return False
            if self.rx != _RX_NONE or self.pending:
                return True
            self._take_rx(_RX_PEEK)
        why = self.peer_gone()
        if why:
            self.retire(_RX_PEEK, why)
        else:
            self._release_rx(_RX_PEEK)
        return not self.dead

    def send(self, frame: _Frame, slice_timeout: float) -> None:
        deadline = time.monotonic() + slice_timeout if slice_timeout > 0 else 0.0  # restarts on the wire
        for s in frame.slices:
            if deadline:
                s.deadline = deadline
            s.where["conn"] = self.id
        with self._send_lock:
            start_reader = False
            with self._lock:
                if self.dead:
                    dead = True
                else:
                    dead = False
                    req_id = next(self._req_ids)
                    self.pending[req_id] = frame
                    if self.rx == _RX_NONE:
                        start_reader = self._take_rx(_RX_READER)
                    elif self.rx == _RX_LINGER:
                        self.rx = _RX_READER  # the lingering reader (same generation) goes on
                        self._cond.notify_all()
            if dead:
                frame.fail(f"tcp connection #{self.id} to {self.endpoint} closed before send: {self.reason}")
                return
            if start_reader:
                self._start_reader(start_reader)
            try:
                failpoint("tcp.send", peer=self.endpoint, conn=self.id, req_id=req_id, op=frame.opcode.name,
                          addr=frame.remote_addr, length=frame.length)
                if frame.opcode is Opcode.WRITE:
                    header = pack_header(MSG_WRITE, req_id, frame.remote_addr, frame.length)
                    send_all(self.sock, [header, view_at(frame.local_addr, frame.length, writable=False)])
                else:
                    self.sock.sendall(pack_header(MSG_READ, req_id, frame.remote_addr, frame.length))
            except (OSError, StoreError) as exc:
                # The receiving thread owns failing pending frames; waking it with a reset is enough.
                self.abort(f"send of request {req_id} failed: {exc}")
                return
            self.frames_sent += 1
            if frame.opcode is Opcode.WRITE:
                self.bytes_sent += frame.length

    def abort(self, reason: str) -> None:
        with self._lock:
            if not self.reason:
                self.reason = reason
            idle = not self.dead and self.rx in (_RX_NONE, _RX_LINGER)
            if idle:
                self._take_rx(_RX_CLOSING)  # nobody receives to notice the reset: this thread cleans up
        abort_socket(self.sock)
        if idle:
            self._die("")

    def claim_inline(self) -> bool:
        """Take the receiving role of an idle connection for the inline fast path."""
        with self._lock:
            if self.dead or self.reason or self.pending or self.rx not in (_RX_NONE, _RX_LINGER):
                return False
            self._take_rx(_RX_INLINE)
            return True

    def release_inline(self) -> None:
        self._release_rx(_RX_INLINE)

    def run_inline(self, frame: _Frame, slice_timeout: float, wait_s: float) -> None:
        """Send ``frame`` (after :meth:`claim_inline`) and, while its answer comes within
        ``wait_s``, receive on this thread.

        Answers to frames a lane sent meanwhile on the same connection are completed too; whatever
        is still pending when this frame is done, or when the wait runs out, is left to a reader
        thread. Failures kill the connection and fail its frames (retryable), as a reader would."""
        self.send(frame, slice_timeout)
        error = ""
        try:
            while True:
                with self._lock:
                    if self.dead:
                        return
                    if frame not in self.pending.values():
                        break
                if not self._wait_readable(wait_s):
                    with self._lock:
                        gen = self._take_rx(_RX_READER)
                    self.transport._count("inline_handovers")
                    self._start_reader(gen)
                    return
                self._read_one()
            self._release_rx(_RX_INLINE)  # frames a lane sent meanwhile go to a reader thread
            return
        except ProtocolError as exc:
            error = f"protocol error: {exc}"
            log.warning("tcp connection #%d to %s: %s", self.id, self.endpoint, error)
        except (OSError, ValueError, StoreError) as exc:
            error = str(exc)
        except BaseException as exc:
            self._die(f"inline receive failed: {exc!r}")
            raise
        self._die(error)

    def _wait_readable(self, timeout: float) -> bool:
        poller = self._poller
        if poller is None:
            poller = self._poller = select.poll()
            poller.register(self.sock.fileno(), select.POLLIN)
        return bool(poller.poll(max(0, int(timeout * 1000))))

    def _read_one(self) -> None:
        """Receive one answer and complete its frame (only the thread holding the receiving role)."""
        sock = self.sock
        failpoint("tcp.recv_ack", peer=self.endpoint, conn=self.id)
        recv_exact_into(sock, self._hview)
        msg_type, req_id, _addr, length, status, aux = unpack_header(self._hbuf)
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
                if self._scratch is None:
                    self._scratch = memoryview(bytearray(1 << 16))
                drain(sock, length, self._scratch)
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

    def _read_loop(self, gen: int) -> None:
        error = ""
        try:
            while True:
                with self._lock:
                    if self.dead or self.rx_gen != gen:
                        return
                    if not self.pending:
                        self.rx = _RX_LINGER
                        self._cond.wait_for(lambda: self.rx_gen != gen or self.rx != _RX_LINGER,
                                            READER_LINGER_S)
                        if self.rx_gen != gen or self.dead:
                            return  # an inline caller, a peek or an abort took the role
                        if self.rx == _RX_LINGER:  # nothing more came: the connection goes idle
                            self.rx = _RX_NONE
                            return
                self._read_one()
        except ProtocolError as exc:
            error = f"protocol error: {exc}"
            log.warning("tcp connection #%d to %s: %s", self.id, self.endpoint, error)
        except (OSError, StoreError) as exc:
            error = str(exc)
        except BaseException as exc:
            self._die(f"reader failed: {exc!r}")
            raise
        self._die(error)

    def _die(self, error: str) -> None:
        """The connection is over: fail every frame still awaiting an answer (retryable)."""
        with self._lock:
            if self.dead:
                return
            self.dead = True
            reason = self.reason or error or "connection closed"
            self.reason = reason
            frames = list(self.pending.values())
            self.pending.clear()
            self._cond.notify_all()
        abort_socket(self.sock)
        try:
            self.sock.close()
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
            if conn is None or not conn.check_idle():
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
    - ``inline_max_bytes`` (64 KiB; 0 = off): largest frame sent and answered on the caller's
      thread over an idle lane connection; ``inline_wait_s`` (0.05 s): how long that thread waits
      for the answer before a reader thread takes over.
    """

    name = "tcp"

    def __init__(self, engine: EngineContext | None = None, *, connections_per_peer: int = 2,
                 max_frame_bytes: int = 4 << 20, connect_timeout: float = 5.0, socket_buffer: int = 0,
                 slice_timeout: float = 0.0, inline_max_bytes: int = 64 << 10,
                 inline_wait_s: float = 0.05) -> None:
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
        self.inline_max_bytes = max(0, inline_max_bytes)
        self.inline_wait_s = max(0.0, inline_wait_s)
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
        if len(frames) == 1 and self.inline_max_bytes:
            ((endpoint, fs),) = frames.items()
            f = fs[0]
            if (len(fs) == 1 and f.length <= self.inline_max_bytes and f.slices[0].retries == 0
                    and not failpoints.armed() and self._inline(endpoint, f)):
                return
        for endpoint, fs in frames.items():
            pool = self._pool(endpoint)
            if pool is None:
                for f in fs:
                    f.fail("tcp transport is closed", retryable=False)
                continue
            self._count("frames_queued", len(fs))
            pool.put(fs)

    def _inline(self, endpoint: str, frame: _Frame) -> bool:
        """The fast path for one small frame (module docstring); False when no connection to the
        peer is idle now (the frame then takes the queue)."""
        with self._lock:
            pool = self._pools.get(endpoint)
        if pool is None:
            return False
        with pool.lock:
            conns = list(pool.conns.values())
        conn = next((c for c in conns if c.claim_inline()), None)
        if conn is None:
            return False
        why = conn.peer_gone()
        if why:
            conn.retire(_RX_INLINE, why)  # as a lane would; the queue path opens a new connection
            return False
        if all(s.abandoned for s in frame.slices):
            conn.release_inline()
            frame.fail("request abandoned before send", retryable=False)
            return True
        self._count("frames_inline")
        conn.run_inline(frame, self.slice_timeout, self.inline_wait_s)
        return True

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
                if c.reader is not None:
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

"""Wire format of the TCP transfer protocol and the server that answers it.

Every message starts with one fixed header (:data:`HEADER`, little endian, 40 bytes)::

    magic u32 | version u8 | type u8 | flags u16 | req_id u64 | addr u64 | length u64 | status i32 | aux u32

Requests (client → server):

- ``WRITE``: header + ``length`` payload bytes for ``[addr, addr+length)`` of the server's memory.
- ``READ``: header only; asks for ``length`` bytes at ``addr``.
- ``CONTROL``: header + ``length`` body bytes = ``u16 name_len | name (utf-8) | payload``.

Responses (server → client), in request order on each connection: a header with the request's
``req_id`` and a ``status`` (an :class:`~store.errors.ErrorCode`, 0 = OK), followed by ``length``
data bytes (READ data, CONTROL reply) and then ``aux`` bytes of utf-8 error text.

- ``WRITE_ACK`` is sent only after the payload was received into the target memory, so a WRITE
  completes only once the receiver applied it.
- Before touching memory the server checks that ``[addr, addr+length)`` lies inside one range
  registered as remotely accessible; otherwise it drains the payload (so the connection stays
  usable) and answers ``INVALID_PARAMS`` (Mooncake TE: ``ERR_ADDRESS_NOT_REGISTERED``). A
  range is held (cannot be unregistered) while a request is using it.
- Data moves without intermediate copies: ``recv_into`` a memoryview of the registered memory,
  and ``sendmsg`` straight out of it.

Control messages carry small requests for other transports and tools (the RDMA QP handshake,
segment discovery): :meth:`TransferServer.register_handler` binds a name to
``handler(payload: bytes, peer: str) -> bytes``; :func:`control_call` sends one and returns the
reply, raising :class:`~store.errors.StoreError` with the handler's code on failure. Bodies are
limited to ``max_control_bytes`` (1 MiB, as ``MC_HANDSHAKE_MAX_LENGTH``).

Late writes: a WRITE whose bytes already reached the server's socket buffer is applied even if
the client gave up on it meanwhile (Linux delivers queued data before reporting a reset). As
with an RDMA WRITE posted on a QP that later fails, a caller that abandons a WRITE must treat
the target range as possibly written.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from store.errors import ErrorCode, StoreError
from store.failpoints import failpoint
from store.transfer.memory import MemoryTable, view_at

log = logging.getLogger(__name__)

MAGIC = 0x544D4255  # b"UBMT" little endian
VERSION = 1
HEADER = struct.Struct("<IBBHQQQiI")
HEADER_SIZE = HEADER.size

MSG_WRITE = 1
MSG_WRITE_ACK = 2
MSG_READ = 3
MSG_READ_RESP = 4
MSG_CONTROL = 5
MSG_CONTROL_RESP = 6
MSG_NAMES = {MSG_WRITE: "WRITE", MSG_WRITE_ACK: "WRITE_ACK", MSG_READ: "READ", MSG_READ_RESP: "READ_RESP",
             MSG_CONTROL: "CONTROL", MSG_CONTROL_RESP: "CONTROL_RESP"}

# Statuses a retry cannot fix: the server refused the request itself, not the path to it.
NON_RETRYABLE = frozenset({int(ErrorCode.INVALID_PARAMS), int(ErrorCode.INVALID_WRITE),
                           int(ErrorCode.INVALID_READ), int(ErrorCode.NOT_SUPPORTED)})

MAX_CONTROL_BYTES = 1 << 20
_DRAIN_CHUNK = 1 << 16
_LINGER_RST = struct.pack("ii", 1, 0)

ControlHandler = Callable[[bytes, str], bytes]


class ProtocolError(Exception):
    """The peer sent something that is not this protocol; the connection is closed."""


def pack_header(msg_type: int, req_id: int, addr: int = 0, length: int = 0, status: int = 0,
                aux: int = 0) -> bytes:
    return HEADER.pack(MAGIC, VERSION, msg_type, 0, req_id, addr, length, status, aux)


def unpack_header(buf: bytes | bytearray | memoryview) -> tuple[int, int, int, int, int, int]:
    """``(type, req_id, addr, length, status, aux)``; raises :class:`ProtocolError` on garbage."""
    magic, version, msg_type, _flags, req_id, addr, length, status, aux = HEADER.unpack(buf)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {magic:#x} (expected {MAGIC:#x})")
    if version != VERSION:
        raise ProtocolError(f"unsupported protocol version {version} (speak {VERSION})")
    if msg_type not in MSG_NAMES:
        raise ProtocolError(f"unknown message type {msg_type}")
    return msg_type, req_id, addr, length, status, aux


def recv_exact_into(sock: socket.socket, view: memoryview) -> None:
    """Fill ``view`` from ``sock``; ``ConnectionError`` on EOF before it is full."""
    got, n = 0, len(view)
    while got < n:
        r = sock.recv_into(view[got:])
        if r == 0:
            raise ConnectionError(f"peer closed the connection after {got} of {n} bytes")
        got += r


def recv_bytes(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    if n:
        recv_exact_into(sock, memoryview(buf))
    return bytes(buf)


def drain(sock: socket.socket, n: int, scratch: memoryview) -> None:
    """Read and discard ``n`` bytes (a refused WRITE's payload) to keep the stream in step."""
    while n > 0:
        r = sock.recv_into(scratch[: min(n, len(scratch))])
        if r == 0:
            raise ConnectionError(f"peer closed the connection with {n} payload bytes left")
        n -= r


def send_all(sock: socket.socket, parts: list[Any]) -> None:
    """``sendmsg`` the parts (header + memoryview) until all bytes are out, without copying them."""
    views = [memoryview(p).cast("B") for p in parts if len(p)]
    while views:
        sent = sock.sendmsg(views)
        while sent:
            if sent >= len(views[0]):
                sent -= len(views[0])
                views.pop(0)
            else:
                views[0] = views[0][sent:]
                sent = 0


def abort_socket(sock: socket.socket) -> None:
    """Tear a connection down now: wake threads blocked on it and make the close a reset."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    except OSError:
        pass
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def split_endpoint(endpoint: str) -> tuple[str, int]:
    host, sep, port = endpoint.rpartition(":")
    if not sep or not port.isdigit():
        raise StoreError(ErrorCode.INVALID_PARAMS, f"endpoint {endpoint!r} is not host:port")
    return host.strip("[]") or "127.0.0.1", int(port)


@dataclass
class ServerConnection:
    """Read-only snapshot of one accepted connection."""

    id: int
    peer: str
    requests: int
    bytes_in: int
    bytes_out: int
    errors: int


class _Accepted:
    __slots__ = ("bytes_in", "bytes_out", "errors", "id", "peer", "requests", "sock", "thread")

    def __init__(self, conn_id: int, sock: socket.socket, peer: str) -> None:
        self.id = conn_id
        self.sock = sock
        self.peer = peer
        self.requests = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.errors = 0
        self.thread: threading.Thread | None = None


class TransferServer:
    """Applies WRITEs into and serves READs from a :class:`MemoryTable`; dispatches control messages.

    One thread accepts; one thread per connection reads requests and answers them in order.
    """

    def __init__(self, memory: MemoryTable, host: str = "127.0.0.1", port: int = 0, *,
                 name: str = "", backlog: int = 128, max_control_bytes: int = MAX_CONTROL_BYTES) -> None:
        self.memory = memory
        self.name = name
        self.max_control_bytes = max_control_bytes
        self._handlers: dict[str, ControlHandler] = {}
        self._lock = threading.Lock()
        self._conns: dict[int, _Accepted] = {}
        self._next_id = 0
        self._closed = False
        self.counters = {"connections": 0, "writes": 0, "reads": 0, "controls": 0, "bytes_written": 0,
                         "bytes_read": 0, "rejected": 0, "failpoint_errors": 0, "protocol_errors": 0}
        self._listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._listener.bind((host, port))
        except OSError as exc:
            self._listener.close()
            raise StoreError(ErrorCode.INVALID_PARAMS,
                             f"transfer server cannot listen on {host}:{port}: {exc}") from exc
        self._listener.listen(backlog)
        self.host = host
        self.port = self._listener.getsockname()[1]
        self._endpoint = f"{host}:{self.port}"  # built once: every request names it to its failpoint
        self._accept_thread = threading.Thread(target=self._accept_loop, daemon=True,
                                               name=f"xfer-accept-{self.port}")
        self._accept_thread.start()

    @property
    def endpoint(self) -> str:
        return self._endpoint

    def register_handler(self, msg_type: str, handler: ControlHandler) -> None:
        """Answer control messages named ``msg_type`` (e.g. ``"rdma.handshake"``) with ``handler``.

        The handler runs on the connection's thread; it returns the reply bytes, or raises
        :class:`StoreError` (its code and message go back to the caller).
        """
        if not msg_type or len(msg_type.encode()) > 0xFFFF:
            raise StoreError(ErrorCode.INVALID_PARAMS, f"bad control message type {msg_type!r}")
        with self._lock:
            self._handlers[msg_type] = handler

    def unregister_handler(self, msg_type: str) -> None:
        with self._lock:
            self._handlers.pop(msg_type, None)

    def connections(self) -> list[ServerConnection]:
        with self._lock:
            return [ServerConnection(c.id, c.peer, c.requests, c.bytes_in, c.bytes_out, c.errors)
                    for c in self._conns.values()]

    def drop_connections(self) -> int:
        """Reset every accepted connection (server side of a connection-loss fault)."""
        with self._lock:
            conns = list(self._conns.values())
        for c in conns:
            abort_socket(c.sock)
        return len(conns)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {**self.counters, "open_connections": len(self._conns)}

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            conns = list(self._conns.values())
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        for c in conns:
            abort_socket(c.sock)
        self._accept_thread.join(timeout=5)
        for c in conns:
            if c.thread is not None:
                c.thread.join(timeout=5)

    # ------------------------------------------------------------------ internals

    def _accept_loop(self) -> None:
        while True:
            try:
                sock, addr = self._listener.accept()
            except OSError:
                return  # listener closed
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                if self._closed:
                    sock.close()
                    return
                self._next_id += 1
                conn = _Accepted(self._next_id, sock, f"{addr[0]}:{addr[1]}")
                self._conns[conn.id] = conn
                self.counters["connections"] += 1
            conn.thread = threading.Thread(target=self._serve, args=(conn,), daemon=True,
                                           name=f"xfer-serve-{self.port}-{conn.id}")
            conn.thread.start()

    def _serve(self, conn: _Accepted) -> None:
        sock = conn.sock
        hbuf = bytearray(HEADER_SIZE)
        hview = memoryview(hbuf)
        scratch = memoryview(bytearray(_DRAIN_CHUNK))
        try:
            while True:
                try:
                    r = sock.recv_into(hview)
                except OSError:
                    return
                if r == 0:
                    return
                if r < HEADER_SIZE:
                    recv_exact_into(sock, hview[r:])
                msg_type, req_id, addr, length, _status, _aux = unpack_header(hbuf)
                conn.requests += 1
                if msg_type == MSG_WRITE:
                    self._apply_write(conn, req_id, addr, length, scratch)
                elif msg_type == MSG_READ:
                    self._serve_read(conn, req_id, addr, length)
                elif msg_type == MSG_CONTROL:
                    self._serve_control(conn, req_id, length, scratch)
                else:
                    raise ProtocolError(f"unexpected {MSG_NAMES[msg_type]} from a client")
        except ProtocolError as exc:
            with self._lock:
                self.counters["protocol_errors"] += 1
            log.warning("transfer server %s: closing connection #%d from %s: %s",
                        self.endpoint, conn.id, conn.peer, exc)
        except (ConnectionError, OSError) as exc:
            log.debug("transfer server %s: connection #%d from %s ended: %s",
                      self.endpoint, conn.id, conn.peer, exc)
        finally:
            with self._lock:
                self._conns.pop(conn.id, None)
            try:
                sock.close()
            except OSError:
                pass

    def _reply(self, conn: _Accepted, msg_type: int, req_id: int, status: int, error: str = "",
               data: memoryview | bytes | None = None) -> None:
        if not status and data is None:  # a plain acknowledgement: one header, one send
            conn.sock.sendall(pack_header(msg_type, req_id))
            return
        text = error.encode() if status else b""
        n = len(data) if data is not None else 0
        parts: list[Any] = [pack_header(msg_type, req_id, 0, n, status, len(text))]
        if n:
            parts.append(data)
        if text:
            parts.append(text)
        send_all(conn.sock, parts)
        conn.bytes_out += n

    def _refuse(self, conn: _Accepted, what: str, req_id: int, addr: int, length: int) -> tuple[int, str]:
        conn.errors += 1
        with self._lock:
            self.counters["rejected"] += 1
        msg = (f"{what} [{addr:#x}, {addr + length:#x}) ({length} B) is not inside one remotely "
               f"accessible registered buffer of {self.name or self.endpoint} (request {req_id})")
        log.info("transfer server %s: refused %s from %s", self.endpoint, msg, conn.peer)
        return int(ErrorCode.INVALID_PARAMS), msg

    def _apply_write(self, conn: _Accepted, req_id: int, addr: int, length: int, scratch: memoryview) -> None:
        status, error = 0, ""
        try:
            failpoint("tcp.server_apply", op="write", server=self.endpoint, peer=conn.peer, req_id=req_id,
                      addr=addr, length=length)
        except StoreError as exc:
            with self._lock:
                self.counters["failpoint_errors"] += 1
            status, error = int(exc.code), str(exc)
        entry = self.memory.acquire(addr, length, remote_only=True) if status == 0 else None
        if entry is None:
            if status == 0:
                status, error = self._refuse(conn, "WRITE", req_id, addr, length)
            drain(conn.sock, length, scratch)
        else:
            try:
                if length:
                    recv_exact_into(conn.sock, view_at(addr, length))
            finally:
                self.memory.release(entry)
            conn.bytes_in += length
            with self._lock:
                self.counters["writes"] += 1
                self.counters["bytes_written"] += length
        self._reply(conn, MSG_WRITE_ACK, req_id, status, error)

    def _serve_read(self, conn: _Accepted, req_id: int, addr: int, length: int) -> None:
        try:
            failpoint("tcp.server_apply", op="read", server=self.endpoint, peer=conn.peer, req_id=req_id,
                      addr=addr, length=length)
        except StoreError as exc:
            with self._lock:
                self.counters["failpoint_errors"] += 1
            self._reply(conn, MSG_READ_RESP, req_id, int(exc.code), str(exc))
            return
        entry = self.memory.acquire(addr, length, remote_only=True)
        if entry is None:
            status, error = self._refuse(conn, "READ", req_id, addr, length)
            self._reply(conn, MSG_READ_RESP, req_id, status, error)
            return
        try:
            self._reply(conn, MSG_READ_RESP, req_id, 0, "", view_at(addr, length, writable=False))
        finally:
            self.memory.release(entry)
        with self._lock:
            self.counters["reads"] += 1
            self.counters["bytes_read"] += length

    def _serve_control(self, conn: _Accepted, req_id: int, length: int, scratch: memoryview) -> None:
        with self._lock:
            self.counters["controls"] += 1
        if length > self.max_control_bytes or length < 2:
            drain(conn.sock, length, scratch)
            self._reply(conn, MSG_CONTROL_RESP, req_id, int(ErrorCode.INVALID_PARAMS),
                        f"control message of {length} B outside [2, {self.max_control_bytes}]")
            return
        body = recv_bytes(conn.sock, length)
        (name_len,) = struct.unpack_from("<H", body)
        name = body[2:2 + name_len].decode(errors="replace")
        payload = body[2 + name_len:]
        with self._lock:
            handler = self._handlers.get(name)
        if handler is None:
            self._reply(conn, MSG_CONTROL_RESP, req_id, int(ErrorCode.NOT_SUPPORTED),
                        f"no control handler for {name!r} at {self.endpoint}")
            return
        try:
            reply = handler(payload, conn.peer)
        except StoreError as exc:
            self._reply(conn, MSG_CONTROL_RESP, req_id, int(exc.code), exc.message)
            return
        except Exception as exc:  # a handler bug must not kill the connection thread
            log.exception("control handler %r at %s failed for %s", name, self.endpoint, conn.peer)
            self._reply(conn, MSG_CONTROL_RESP, req_id, int(ErrorCode.INTERNAL_ERROR),
                        f"control handler {name!r} raised {type(exc).__name__}: {exc}")
            return
        self._reply(conn, MSG_CONTROL_RESP, req_id, 0, "", bytes(reply))


def control_call(endpoint: str, msg_type: str, payload: bytes = b"", timeout: float = 5.0) -> bytes:
    """Send one control message to the transfer server at ``endpoint`` and return its reply.

    Opens a short-lived connection (handshakes are rare; data connections stay untouched).
    Raises :class:`StoreError`: the handler's code on a refusal, ``RPC_TIMEOUT`` when the peer
    does not answer within ``timeout`` seconds, ``RPC_FAIL`` when it cannot be reached.
    """
    host, port = split_endpoint(endpoint)
    name = msg_type.encode()
    body = struct.pack("<H", len(name)) + name + bytes(payload)
    if len(body) > MAX_CONTROL_BYTES:
        raise StoreError(ErrorCode.INVALID_PARAMS,
                         f"control message {msg_type!r} of {len(body)} B exceeds {MAX_CONTROL_BYTES} B")
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            send_all(sock, [pack_header(MSG_CONTROL, 1, 0, len(body)), body])
            hbuf = bytearray(HEADER_SIZE)
            recv_exact_into(sock, memoryview(hbuf))
            rtype, _rid, _addr, length, status, aux = unpack_header(hbuf)
            if rtype != MSG_CONTROL_RESP:
                raise ProtocolError(f"expected CONTROL_RESP, got {MSG_NAMES[rtype]}")
            data = recv_bytes(sock, length)
            text = recv_bytes(sock, aux).decode(errors="replace")
    except TimeoutError as exc:
        raise StoreError(ErrorCode.RPC_TIMEOUT,
                         f"control {msg_type!r} to {endpoint}: no answer within {timeout}s") from exc
    except (OSError, ProtocolError) as exc:
        raise StoreError(ErrorCode.RPC_FAIL, f"control {msg_type!r} to {endpoint} failed: {exc}") from exc
    if status:
        raise StoreError(status if status in ErrorCode._value2member_map_ else ErrorCode.INTERNAL_ERROR,
                         f"control {msg_type!r} to {endpoint}: {text}")
    return data

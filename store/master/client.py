"""Typed, thread-safe blocking stub for the master's RPCs.

Each thread gets its own TCP connection (made lazily), so calls from several threads run in
parallel and a heartbeat thread never queues behind a slow put. Every call has a deadline
(``timeout`` per call, else the stub's default): past it the call raises
``StoreError(RPC_TIMEOUT)`` and that thread's connection is dropped, so a late reply can never be
taken for the answer to a later call. A broken connection raises ``StoreError(RPC_FAIL)``; the next
call reconnects. Error replies raise ``StoreError`` with the master's code.

    mc = MasterClient("127.0.0.1:50051")
    mc.mount_segment(Segment(id=str(uuid4()), name="127.0.0.1:12345", base=addr, size=n,
                             te_endpoint="127.0.0.1:12346"), client_id)
    hb = Heartbeat(mc, client_id, on_need_remount=lambda: mc.remount_segment(segs, client_id)).start()
    descs = mc.put_start(client_id, "k", 4096)        # -> [ReplicaDescriptor]
    mc.put_end(client_id, "k")
    rl = mc.get_replica_list("k")                       # -> ReplicaList (grants the lease)
"""

from __future__ import annotations

import itertools
import logging
import math
import select
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import msgpack

from store.errors import ErrorCode, StoreError, code_of
from store.master.rpc import HEADER, pack
from store.master.types import (
    BatchItem,
    ClientStatus,
    PingResult,
    ReplicaDescriptor,
    ReplicaList,
    ReplicateConfig,
    Segment,
)

log = logging.getLogger("store.master.client")


def parse_address(address: str | tuple[str, int]) -> tuple[str, int]:
    if isinstance(address, tuple):
        return address
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"master address must be host:port, got {address!r}")
    return host.strip("[]"), int(port)


class _Connection:
    """One thread's connection. Replies are received into a reusable buffer: a small reply
    (header and body) usually takes a single ``recv_into`` and no per-read allocation.

    The socket stays in blocking mode and the deadline is kept with one ``poll`` before each
    receive: with a socket timeout, CPython would add an ``ioctl`` per ``settimeout`` and a
    ``poll`` before every ``send`` and ``recv`` (six system calls per call instead of three). A
    request goes out with one non-blocking ``send`` (only one call is ever outstanding on a
    connection, so its send buffer is empty); whatever does not fit waits within the deadline.
    """

    _BUF = 64 * 1024

    def __init__(self, address: tuple[str, int], timeout: float) -> None:
        self.address = address
        self.sock = socket.create_connection(address, timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.settimeout(None)
        self._poller = select.poll()
        self._poller.register(self.sock.fileno(), select.POLLIN)
        self.ids = itertools.count(1)
        self._buf = bytearray(self._BUF)
        self._view = memoryview(self._buf)
        self._start = 0  # received, not yet parsed: self._buf[self._start:self._end]
        self._end = 0

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def _fill(self, need: int, deadline: float) -> None:
        """Receive until ``need`` unparsed bytes are buffered (growing the buffer for a big reply)."""
        if self._start + need > len(self._buf):
            have = self._end - self._start
            if need > len(self._buf):
                buf = bytearray(max(need, 2 * len(self._buf)))
                buf[:have] = self._view[self._start:self._end]
                self._view.release()
                self._buf, self._view = buf, memoryview(buf)
            else:
                self._buf[:have] = bytes(self._view[self._start:self._end])  # may overlap: copy first
            self._start, self._end = 0, have
        while self._end - self._start < need:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._poller.poll(math.ceil(remaining * 1000)):
                raise TimeoutError
            n = self.sock.recv_into(self._view[self._end:])
            if not n:
                raise ConnectionError("master closed the connection")
            self._end += n

    def _send(self, data: bytes, deadline: float) -> None:
        try:
            sent = self.sock.send(data, socket.MSG_DONTWAIT)
        except BlockingIOError:
            sent = 0
        if sent < len(data):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            self.sock.settimeout(remaining)  # sendall's timeout bounds the whole rest
            try:
                self.sock.sendall(memoryview(data)[sent:])
            finally:
                self.sock.settimeout(None)

    def _reply(self, deadline: float) -> Any:
        if self._end - self._start < HEADER.size:
            self._fill(HEADER.size, deadline)
        (length,) = HEADER.unpack_from(self._buf, self._start)
        total = HEADER.size + length
        if self._end - self._start < total:
            self._fill(total, deadline)
        start = self._start
        body = self._view[start + HEADER.size:start + total]
        try:
            reply = msgpack.unpackb(body, raw=False, strict_map_key=False)
        finally:
            body.release()
        if start + total == self._end:
            self._start = self._end = 0
        else:
            self._start = start + total
        return reply

    def call(self, method: str, params: dict[str, Any], deadline: float) -> list[Any]:
        req_id = next(self.ids)
        if deadline <= time.monotonic():
            raise TimeoutError
        try:
            frame = pack([req_id, method, params])
        except (OverflowError, TypeError, ValueError) as exc:  # nothing was sent: the link is fine
            raise StoreError(ErrorCode.INVALID_PARAMS,
                             f"{method}: parameters cannot be encoded: {exc}") from exc
        self._send(frame, deadline)
        while True:
            reply = self._reply(deadline)
            if not isinstance(reply, list) or len(reply) != 4:
                raise ConnectionError(f"malformed reply to {method}")
            if reply[0] == req_id or reply[0] == 0:
                return reply
            log.debug("dropping stale reply id=%s while waiting for %d", reply[0], req_id)


class MasterClient:
    """See the module docstring. ``close()`` closes every thread's connection."""

    def __init__(self, address: str | tuple[str, int], timeout: float = 5.0,
                 connect_timeout: float | None = None) -> None:
        self.address = parse_address(address)
        self.timeout = timeout
        self.connect_timeout = connect_timeout if connect_timeout is not None else timeout
        self._local = threading.local()
        self._all: list[_Connection] = []
        self._lock = threading.Lock()
        self._closed = False

    def __enter__(self) -> MasterClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conns, self._all = self._all, []
        for c in conns:
            c.close()

    def _conn(self) -> _Connection:
        conn: _Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        if self._closed:
            raise StoreError(ErrorCode.RPC_FAIL, "master client is closed")
        try:
            conn = _Connection(self.address, self.connect_timeout)
        except OSError as exc:
            raise StoreError(ErrorCode.RPC_FAIL,
                             f"cannot connect to master {self.address[0]}:{self.address[1]}: {exc}") from exc
        self._local.conn = conn
        with self._lock:
            self._all.append(conn)
        return conn

    def _drop(self, conn: _Connection) -> None:
        conn.close()
        self._local.conn = None
        with self._lock:
            if conn in self._all:
                self._all.remove(conn)

    def call(self, method: str, timeout: float | None = None, **params: Any) -> Any:
        """Raw call: the decoded result, or ``StoreError`` with the master's code."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        conn = self._conn()
        try:
            _, code, result, message = conn.call(method, params, deadline)
        except TimeoutError as exc:
            self._drop(conn)
            raise StoreError(ErrorCode.RPC_TIMEOUT,
                             f"{method} to {self.address[0]}:{self.address[1]} timed out") from exc
        except (OSError, ValueError, msgpack.UnpackException) as exc:
            self._drop(conn)
            raise StoreError(ErrorCode.RPC_FAIL,
                             f"{method} to {self.address[0]}:{self.address[1]} failed: {exc}") from exc
        if code != 0:
            known = code_of(code) if isinstance(code, int) else None
            raise StoreError(known if known is not None else ErrorCode.RPC_FAIL,
                             message or f"{method} failed with code {code!r}")
        return result

    # ------------------------------------------------------------------ puts

    def put_start(self, client_id: str, key: str, length: int, config: ReplicateConfig | None = None,
                  timeout: float | None = None) -> list[ReplicaDescriptor]:
        res = self.call("PutStart", timeout, client_id=client_id, key=key, length=length,
                        config=(config or ReplicateConfig()).to_wire())
        return [ReplicaDescriptor.from_wire(d) for d in res]

    def put_end(self, client_id: str, key: str, timeout: float | None = None,
                checksum: int | None = None) -> None:
        """``checksum``: the value's XXH64, returned to readers by GetReplicaList (Umbra)."""
        if checksum is None:
            self.call("PutEnd", timeout, client_id=client_id, key=key)
        else:
            self.call("PutEnd", timeout, client_id=client_id, key=key, checksum=checksum)

    def put_revoke(self, client_id: str, key: str, timeout: float | None = None) -> None:
        self.call("PutRevoke", timeout, client_id=client_id, key=key)

    @staticmethod
    def _items(raw: list[list[Any]], conv: Callable[[Any], Any] = lambda v: v) -> list[BatchItem]:
        return [BatchItem(ErrorCode(code), conv(value) if code == 0 else None, message)
                for code, value, message in raw]

    def batch_put_start(self, client_id: str, keys: Sequence[str], lengths: Sequence[int],
                        config: ReplicateConfig | None = None,
                        timeout: float | None = None) -> list[BatchItem]:
        raw = self.call("BatchPutStart", timeout, client_id=client_id, keys=list(keys), lengths=list(lengths),
                        config=(config or ReplicateConfig()).to_wire())
        return self._items(raw, lambda v: [ReplicaDescriptor.from_wire(d) for d in v])

    def batch_put_end(self, client_id: str, keys: Sequence[str], timeout: float | None = None,
                      checksums: Sequence[int | None] | None = None) -> list[BatchItem]:
        if checksums is None:
            return self._items(self.call("BatchPutEnd", timeout, client_id=client_id, keys=list(keys)))
        return self._items(self.call("BatchPutEnd", timeout, client_id=client_id, keys=list(keys),
                                     checksums=list(checksums)))

    def batch_put_revoke(self, client_id: str, keys: Sequence[str],
                         timeout: float | None = None) -> list[BatchItem]:
        return self._items(self.call("BatchPutRevoke", timeout, client_id=client_id, keys=list(keys)))

    # ------------------------------------------------------------------ reads and removal

    def get_replica_list(self, key: str, timeout: float | None = None) -> ReplicaList:
        return ReplicaList.from_wire(self.call("GetReplicaList", timeout, key=key))

    def batch_get_replica_list(self, keys: Sequence[str], timeout: float | None = None) -> list[BatchItem]:
        return self._items(self.call("BatchGetReplicaList", timeout, keys=list(keys)), ReplicaList.from_wire)

    def exist_key(self, key: str, timeout: float | None = None) -> bool:
        return bool(self.call("ExistKey", timeout, key=key))

    def batch_exist_key(self, keys: Sequence[str], timeout: float | None = None) -> list[BatchItem]:
        return self._items(self.call("BatchExistKey", timeout, keys=list(keys)))

    def remove(self, key: str, force: bool = False, timeout: float | None = None) -> None:
        self.call("Remove", timeout, key=key, force=force)

    def remove_all(self, force: bool = False, timeout: float | None = None) -> int:
        return int(self.call("RemoveAll", timeout, force=force))

    # ------------------------------------------------------------------ segments and liveness

    def mount_segment(self, segment: Segment, client_id: str, timeout: float | None = None) -> None:
        self.call("MountSegment", timeout, segment=segment.to_wire(), client_id=client_id)

    def remount_segment(self, segments: Sequence[Segment], client_id: str,
                        timeout: float | None = None) -> None:
        self.call("ReMountSegment", timeout, segments=[s.to_wire() for s in segments], client_id=client_id)

    def unmount_segment(self, segment_id: str, client_id: str, timeout: float | None = None) -> None:
        self.call("UnmountSegment", timeout, segment_id=segment_id, client_id=client_id)

    def ping(self, client_id: str, timeout: float | None = None) -> PingResult:
        return PingResult.from_wire(self.call("Ping", timeout, client_id=client_id))

    def service_ready(self, timeout: float | None = None) -> bool:
        return bool(self.call("ServiceReady", timeout))

    # ------------------------------------------------------------------ introspection and faults

    def query_key(self, key: str, timeout: float | None = None) -> dict[str, Any] | None:
        """Metadata of one key without granting a lease (None when absent)."""
        return self.call("QueryKey", timeout, key=key)

    def inspect(self, what: str = "all", keys: Sequence[str] | None = None, limit: int | None = None,
                timeout: float | None = None) -> Any:
        """``what``: all | objects | segments | clients | counters | gauges | keys."""
        params: dict[str, Any] = {"what": what}
        if keys is not None:
            params["keys"] = list(keys)
        if limit is not None:
            params["limit"] = limit
        return self.call("Inspect", timeout, **params)

    def events(self, since: int = 0, limit: int | None = None,
               timeout: float | None = None) -> dict[str, Any]:
        params: dict[str, Any] = {"since": since}
        if limit is not None:
            params["limit"] = limit
        return self.call("Events", timeout, **params)

    def check_invariants(self, timeout: float | None = None) -> list[str]:
        return list(self.call("CheckInvariants", timeout))

    def trigger_eviction(self, timeout: float | None = None) -> dict[str, Any] | None:
        return self.call("TriggerEviction", timeout)

    def arm_failpoints(self, spec: str, timeout: float | None = None) -> list[str]:
        """Arm points in the master process, spec syntax of :mod:`store.failpoints`."""
        return list(self.call("ArmFailpoints", timeout, spec=spec))

    def disarm_failpoints(self, names: Sequence[str] | None = None, timeout: float | None = None) -> None:
        if names is None:
            self.call("DisarmFailpoints", timeout)
        else:
            self.call("DisarmFailpoints", timeout, names=list(names))

    def release_failpoint(self, name: str, timeout: float | None = None) -> None:
        self.call("ReleaseFailpoint", timeout, name=name)

    def list_failpoints(self, timeout: float | None = None) -> list[dict[str, Any]]:
        return list(self.call("ListFailpoints", timeout))

    def failpoint_history(self, timeout: float | None = None) -> list[list[Any]]:
        return list(self.call("FailpointHistory", timeout))


class Heartbeat:
    """Pings the master every ``interval`` seconds from a daemon thread (Mooncake: 1 s).

    On NEED_REMOUNT it calls ``on_need_remount()`` (one at a time, in this thread), typically
    ``mc.remount_segment(my_segments, client_id)``. A failed ping is counted and retried at the
    next interval; ``on_failure(exc)`` is told about each.
    """

    def __init__(self, client: MasterClient, client_id: str, interval: float = 1.0,
                 on_need_remount: Callable[[], None] | None = None,
                 on_failure: Callable[[StoreError], None] | None = None) -> None:
        self.client = client
        self.client_id = client_id
        self.interval = interval
        self.on_need_remount = on_need_remount
        self.on_failure = on_failure
        self.pings = 0
        self.failures = 0
        self.consecutive_failures = 0
        self.remounts = 0
        self.last_status: ClientStatus | None = None
        self.view_version: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Heartbeat:
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{self.client_id}", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def beat(self) -> PingResult | None:
        """One ping (also usable without the thread)."""
        try:
            res = self.client.ping(self.client_id, timeout=max(self.interval, 1.0))
        except StoreError as exc:
            self.failures += 1
            self.consecutive_failures += 1
            log.warning("client_id=%s ping to %s:%d failed (%d in a row): %s", self.client_id,
                        *self.client.address, self.consecutive_failures, exc)
            if self.on_failure is not None:
                self.on_failure(exc)
            return None
        self.pings += 1
        self.consecutive_failures = 0
        self.last_status = res.status
        self.view_version = res.view_version
        if res.status is ClientStatus.NEED_REMOUNT and self.on_need_remount is not None:
            try:
                self.on_need_remount()
                self.remounts += 1
            except StoreError as exc:
                log.warning("client_id=%s remount after NEED_REMOUNT failed: %s", self.client_id, exc)
        return res

    def _run(self) -> None:
        while not self._stop.is_set():
            self.beat()
            self._stop.wait(self.interval)

"""The transfer engine: registered memory, segments, and batches of READ/WRITE requests.

A :class:`TransferEngine` owns

- a :class:`~store.transfer.memory.MemoryTable` of registered memory (``register_memory``);
  ranges registered ``remote=True`` make up this engine's *segment*, which peers target;
- a transfer server (:class:`~store.transfer.server.TransferServer`) on ``local_hostname``
  (port 0 = any free port) that serves TCP data and carries small *control messages* for other
  transports (the RDMA QP handshake) and for segment discovery;
- transports built by name through :data:`~store.transfer.transport.TRANSPORTS`: the engine's
  ``protocol`` (``tcp``, ``rdma``) and ``local`` (memcpy), used when the target segment is this
  engine's own and memcpy is on (``MC_STORE_MEMCPY``; default on except for ``rdma``).

Requests and slices
-------------------
``submit(batch, [TransferRequest(opcode, local_addr, segment, target_offset, length), ...])``
checks every request first (nothing is queued if one is invalid): the local range must be
registered with this engine (else ``StoreError(INVALID_PARAMS)``, Mooncake's
``ERR_ADDRESS_NOT_REGISTERED``), the segment known (``SEGMENT_NOT_FOUND``). The remote range is
cut at the target's buffer boundaries, then into slices of ``slice_size`` (``MC_SLICE_SIZE``,
64 KiB) with a tail of at most ``fragment_limit`` (16 KiB) merged into the slice before it. A
remote range outside the target's published buffers makes that request FAILED with
``INVALID_PARAMS`` (a status, not an exception, as in Mooncake); the owner checks again on
arrival, so a stale descriptor cannot make a peer write outside its memory.

Status of a request (``status(batch, i)`` → ``(TransferStatus, transferred_bytes)``):

- ``WAITING`` while any slice is outstanding;
- ``COMPLETED`` once every slice completed;
- ``FAILED`` as soon as one slice failed for good: a refusal a retry cannot fix, or a failure
  after ``retry_cap`` retries (``MC_RETRY_CNT``, 9). Umbra reports this at once (Mooncake waits
  for every slice before saying FAILED); the error text names the slice, peer and cause;
- ``TIMEOUT`` when a slice attempt took longer than ``slice_timeout_s`` (``MC_SLICE_TIMEOUT``,
  seconds; ≤ 0 disables). The clock starts when the slice is posted and restarts when the
  transport puts it on the wire (TCP), so queueing behind a stuck connection counts but a long
  queue of healthy traffic mostly does not; the transport is asked to tear down what carries it;
- ``CANCELED`` after ``cancel(batch)`` or ``free_batch`` of an unfinished batch.

Failed slices are retried on the same transport after a short exponential backoff; TCP sends a
retry over a new connection when the old one was lost. Once a request is over, its slices that
were not sent yet are dropped by the transport, and those already sent are left to finish: a
WRITE may still land at the target, and the local memory of the request stays in use until
``batch.slices_in_flight`` is 0. ``free_batch(batch, wait_s=...)`` returns ``True`` only then —
reuse the local memory of a failed or cancelled request after that, not before.

Bounded bookkeeping
-------------------
A slice is *in flight* from the moment it is handed to a transport until the transport
completes it. Its batch cannot be released and its local memory cannot be unregistered while it
is: ``free_batch`` of a batch with slices in flight defers the release to the last completion
(Mooncake's ``freeBatchID`` would free them under the transport). Slice objects live only as long
as their batch; releasing a batch breaks every reference cycle so memory is reclaimed at once,
and there is no slice cache to grow (Mooncake's thread-local cache leaked over several
releases). ``stats()`` reports live batches and slices in flight.

Control channel (for transports such as RDMA)
---------------------------------------------
``engine.register_control_handler("rdma.handshake", fn)`` with ``fn(payload: bytes, peer: str)
-> bytes`` answers messages of that type arriving at this engine's endpoint;
``engine.control_call(peer_endpoint, "rdma.handshake", payload, timeout)`` sends one and returns
the reply (``StoreError`` with the handler's code, ``RPC_TIMEOUT`` or ``RPC_FAIL`` otherwise).
Built in: ``"segment.describe"`` (this engine's segment descriptor as JSON, used by
``open_segment(name)``) and ``"engine.ping"``.
"""

from __future__ import annotations

import bisect
import collections
import heapq
import itertools
import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from store.errors import ErrorCode, StoreError
from store.failpoints import failpoint
from store.transfer.memory import MemoryTable, RegisteredRange
from store.transfer.server import ControlHandler, TransferServer, control_call
from store.transfer.transport import (
    TERMINAL,
    BufferDescriptor,
    Opcode,
    SegmentDescriptor,
    Slice,
    TransferStatus,
    Transport,
    transport_class,
)

log = logging.getLogger(__name__)

DEFAULT_SLICE_SIZE = 65536
DEFAULT_FRAGMENT_RATIO = 4
DEFAULT_RETRY_CAP = 9
DEFAULT_SLICE_TIMEOUT_S = 30.0


def plan_slices(length: int, slice_size: int = DEFAULT_SLICE_SIZE,
                fragment_limit: int = DEFAULT_SLICE_SIZE // DEFAULT_FRAGMENT_RATIO) -> list[tuple[int, int]]:
    """``(offset, length)`` of the slices of a ``length``-byte request.

    Mooncake's rule: while more than ``slice_size + fragment_limit`` bytes remain, cut
    ``slice_size``; the rest is the final slice. So a tail of at most ``fragment_limit`` merges
    into the slice before it, and 0 bytes give no slice. Same semantics as
    ``store.packing.plan.plan_slices`` (numba/numpy, checked against this one in the tests); this
    pure-Python form is cheaper for the few slices of one request on the submit path.
    """
    out = []
    off = 0
    limit = slice_size + fragment_limit
    while off < length:
        left = length - off
        n = left if left <= limit else slice_size
        out.append((off, n))
        off += n
    return out


def _env_int(env: Mapping[str, str], name: str) -> int | None:
    raw = env.get(name)
    if raw is None or not raw.strip():
        return None
    try:
        return int(raw.strip())
    except ValueError:
        log.warning("ignoring %s=%r: not an integer", name, raw)
        return None


def _env_bool(env: Mapping[str, str], name: str) -> bool | None:
    raw = env.get(name)
    if raw is None or not raw.strip() or raw.strip().lower() == "auto":
        return None
    return raw.strip().lower() in ("1", "true", "yes", "on")


@dataclass
class EngineConfig:
    """Engine settings. :meth:`resolve` fills what the caller left ``None`` from Mooncake's env vars."""

    slice_size: int = DEFAULT_SLICE_SIZE
    fragment_limit: int = DEFAULT_SLICE_SIZE // DEFAULT_FRAGMENT_RATIO
    retry_cap: int = DEFAULT_RETRY_CAP
    slice_timeout_s: float = DEFAULT_SLICE_TIMEOUT_S
    retry_backoff_s: float = 0.002  # first retry delay; doubles per retry of a slice
    retry_backoff_max_s: float = 0.2
    memcpy: bool = True  # local memcpy for this engine's own segment
    allow_unregistered_local: bool = False
    validate_remote: bool = True  # check target ranges against the peer's descriptor before sending
    control_timeout_s: float = 5.0
    transport_options: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def resolve(cls, protocol: str, environ: Mapping[str, str] | None = None, **given: Any) -> EngineConfig:
        env = os.environ if environ is None else environ
        values = {k: v for k, v in given.items() if v is not None}
        if "slice_size" not in values:
            v = _env_int(env, "MC_SLICE_SIZE")
            values["slice_size"] = v if v is not None and v > 0 else DEFAULT_SLICE_SIZE
        if "fragment_limit" not in values:
            ratio = _env_int(env, "MC_FRAGMENT_RATIO")
            ratio = DEFAULT_FRAGMENT_RATIO if ratio is None or not 0 < ratio < values["slice_size"] else ratio
            values["fragment_limit"] = values["slice_size"] // ratio
        if "retry_cap" not in values:
            v = _env_int(env, "MC_RETRY_CNT")
            values["retry_cap"] = v if v is not None and 0 <= v <= 127 else DEFAULT_RETRY_CAP
        if "slice_timeout_s" not in values:
            v = _env_int(env, "MC_SLICE_TIMEOUT")
            values["slice_timeout_s"] = float(v) if v is not None else DEFAULT_SLICE_TIMEOUT_S
        if "memcpy" not in values:
            v = _env_bool(env, "MC_STORE_MEMCPY")
            values["memcpy"] = (protocol != "rdma") if v is None else v
        cfg = cls(**values)
        if cfg.slice_size < 1 or cfg.fragment_limit < 0 or cfg.retry_cap < 0:
            raise StoreError(ErrorCode.INVALID_PARAMS,
                             f"bad engine config: slice_size={cfg.slice_size} "
                             f"fragment_limit={cfg.fragment_limit} retry_cap={cfg.retry_cap}")
        return cfg


@dataclass(frozen=True, slots=True)
class TransferRequest:
    """Mooncake's ``TransferRequest``: ``target_offset`` is the remote virtual address."""

    opcode: Opcode
    local_addr: int
    segment: str | SegmentDescriptor
    target_offset: int
    length: int


@dataclass(frozen=True, slots=True)
class TransferResult:
    """Outcome of one request: status, bytes moved, why it failed (code 0 / "" when it did not) and
    how many slice retries it took (summed over its slices)."""

    status: TransferStatus
    transferred_bytes: int
    code: int = 0
    error: str = ""
    retries: int = 0

    @property
    def ok(self) -> bool:
        return self.status is TransferStatus.COMPLETED


class _Task:
    """One request of a batch and its slices."""

    __slots__ = ("batch", "code", "error", "in_flight", "index", "ok_slices", "pins", "request", "retries",
                 "segment", "slices", "status", "transferred", "transport")

    def __init__(self, batch: Batch, index: int, request: TransferRequest,
                 segment: SegmentDescriptor) -> None:
        self.batch = batch
        self.index = index
        self.request = request
        self.segment = segment
        self.slices: list[Slice] = []
        self.status = TransferStatus.WAITING
        self.transferred = 0
        self.code = 0
        self.error = ""
        self.in_flight = 0
        self.ok_slices = 0
        self.retries = 0
        self.pins: list[RegisteredRange] | None = None
        self.transport: Transport | None = None

    def result(self) -> TransferResult:
        return TransferResult(self.status, self.transferred, self.code, self.error, self.retries)


class Batch:
    """A batch of requests (Mooncake's ``BatchID``); create with ``engine.allocate_batch(n)``.

    Submit to a batch from one thread at a time; status, wait and cancel may come from any thread.
    """

    __slots__ = ("_bytes", "_cond", "_failures", "_free_pending", "_freed", "_in_flight", "_ok", "_tasks",
                 "_unfinished", "capacity", "id")

    def __init__(self, batch_id: int, capacity: int) -> None:
        self.id = batch_id
        self.capacity = capacity
        self._tasks: list[_Task] = []
        self._cond = threading.Condition(threading.Lock())
        self._in_flight = 0
        self._unfinished = 0
        self._freed = False
        self._free_pending = False
        self._ok = 0  # slice completions, folded into the engine's counters on release
        self._bytes = 0
        self._failures = 0

    def __len__(self) -> int:
        return len(self._tasks)

    @property
    def slices_in_flight(self) -> int:
        return self._in_flight

    @property
    def freed(self) -> bool:
        return self._freed

    def __repr__(self) -> str:
        return (f"Batch(id={self.id}, requests={len(self._tasks)}/{self.capacity}, "
                f"unfinished={self._unfinished}, slices_in_flight={self._in_flight}, freed={self._freed})")


def _split_hostname(local_hostname: str) -> tuple[str, int]:
    host, sep, port = local_hostname.rpartition(":")
    if sep and port.isdigit() and host and not host.endswith(":"):
        return host.strip("[]"), int(port)
    return local_hostname.strip("[]") or "127.0.0.1", 0


class TransferEngine:
    """See the module docstring. ``metadata_server`` is accepted for config compatibility and
    unused: descriptors are published through the master or fetched peer to peer."""

    def __init__(self, local_hostname: str = "127.0.0.1", protocol: str = "tcp", *,
                 metadata_server: str | None = None, slice_size: int | None = None,
                 fragment_limit: int | None = None, retry_cap: int | None = None,
                 slice_timeout_s: float | None = None, memcpy: bool | None = None,
                 allow_unregistered_local: bool | None = None, validate_remote: bool | None = None,
                 transport_options: dict[str, dict[str, Any]] | None = None,
                 environ: Mapping[str, str] | None = None, config: EngineConfig | None = None) -> None:
        protocol = protocol.lower()
        self.protocol = protocol
        self.metadata_server = metadata_server
        self.config = config or EngineConfig.resolve(
            protocol, environ, slice_size=slice_size, fragment_limit=fragment_limit, retry_cap=retry_cap,
            slice_timeout_s=slice_timeout_s, memcpy=memcpy, allow_unregistered_local=allow_unregistered_local,
            validate_remote=validate_remote, transport_options=transport_options)
        host, port = _split_hostname(local_hostname)
        bind_host = "127.0.0.1" if host == "localhost" else host
        self.memory = MemoryTable()
        self._lock = threading.Lock()
        self._closed = False
        self._batches: dict[int, Batch] = {}
        self._batch_ids = itertools.count(1)
        self._segments: dict[str, SegmentDescriptor] = {}
        self._own_desc: SegmentDescriptor | None = None
        self._counters = collections.Counter[str]()
        self._active: set[_Task] = set()
        self._server = TransferServer(self.memory, bind_host, port, name=f"{host}:{port}")
        self._segment_name = f"{host}:{self._server.port}"
        self._server.name = self._segment_name
        self._endpoint = f"{host}:{self._server.port}"
        self._server.register_handler("segment.describe", self._describe_handler)
        self._server.register_handler("engine.ping", lambda payload, peer: b"pong")
        self._transports: dict[str, Transport] = {}
        try:
            self._transport = self.transport(protocol)
            self._local: Transport | None = self.transport("local") if self.config.memcpy else None
        except BaseException:
            self._server.close()
            for t in self._transports.values():
                t.close()
            raise
        self._mon_cond = threading.Condition(threading.Lock())
        self._retry_heap: list[tuple[float, int, Slice]] = []
        self._retry_seq = itertools.count()
        self._monitor = threading.Thread(target=self._monitor_loop, daemon=True,
                                         name=f"xfer-monitor-{self._server.port}")
        self._monitor.start()
        log.info("transfer engine %s up: protocol=%s endpoint=%s slice=%d fragment=%d retry_cap=%d "
                 "slice_timeout=%.1fs memcpy=%s", self._segment_name, protocol, self._endpoint,
                 self.config.slice_size, self.config.fragment_limit, self.config.retry_cap,
                 self.config.slice_timeout_s, self.config.memcpy)

    # ------------------------------------------------------------------ identity

    @property
    def segment_name(self) -> str:
        """This engine's segment name: ``local_hostname`` host with the real port."""
        return self._segment_name

    @property
    def endpoint(self) -> str:
        """``host:port`` of the transfer server (TCP data, control messages)."""
        return self._endpoint

    def transport(self, name: str) -> Transport:
        """The engine's transport called ``name``, built on first use from the registry."""
        with self._lock:
            t = self._transports.get(name)
        if t is not None:
            return t
        cls = transport_class(name)
        t = cls(self, **self.config.transport_options.get(name, {}))  # type: ignore[call-arg]
        with self._lock:
            existing = self._transports.setdefault(name, t)
        if existing is not t:
            t.close()
        return existing

    # ------------------------------------------------------------------ memory and segments

    def register_memory(self, addr: int, length: int, *, remote: bool = True,
                        location: str = "cpu:0") -> BufferDescriptor:
        """Register ``[addr, addr+length)``: usable as local memory of requests, and, with
        ``remote=True``, part of this engine's segment (peers may read and write it)."""
        entry = self.memory.add(addr, length, remote=remote, location=location)
        try:
            desc = self._transport.register_memory(addr, length)
        except BaseException:
            self.memory.remove(addr, wait_s=0)
            raise
        desc = replace(desc, name=location)
        entry.extra["desc"] = desc
        self._own_desc = None
        return desc

    def unregister_memory(self, addr: int, *, wait_s: float = 5.0) -> None:
        """Unregister the range starting at ``addr``; waits up to ``wait_s`` for transfers using it,
        then raises ``UNAVAILABLE_IN_CURRENT_STATUS`` and leaves it registered."""
        self.memory.remove(addr, wait_s=wait_s)
        self._own_desc = None
        self._transport.unregister_memory(addr)

    def segment_descriptor(self) -> SegmentDescriptor:
        """This engine's segment as peers (and the master) should see it."""
        desc = self._own_desc
        if desc is None:
            buffers = tuple(r.extra.get("desc") or BufferDescriptor(r.addr, r.length, 0, r.location)
                            for r in self.memory if r.remote)
            desc = self._own_desc = SegmentDescriptor(
                self._segment_name, self.protocol, self._endpoint, buffers,
                tuple(self._transport.segment_devices()), os.getpid())
        return desc

    def open_segment(self, segment: str | SegmentDescriptor, *, refresh: bool = False) -> SegmentDescriptor:
        """Remember a peer's descriptor (from the master), or fetch it from the peer by name."""
        if isinstance(segment, SegmentDescriptor):
            with self._lock:
                self._segments[segment.name] = segment
            return segment
        if segment == self._segment_name:
            return self.segment_descriptor()
        with self._lock:
            desc = self._segments.get(segment)
        if desc is not None and not refresh:
            return desc
        try:
            reply = self.control_call(segment, "segment.describe", b"", self.config.control_timeout_s)
        except StoreError as exc:
            raise StoreError(ErrorCode.SEGMENT_NOT_FOUND,
                             f"cannot open segment {segment!r}: {exc.message}") from exc
        desc = SegmentDescriptor.from_json(reply)
        with self._lock:
            self._segments[segment] = desc
        return desc

    def close_segment(self, name: str) -> None:
        with self._lock:
            self._segments.pop(name, None)

    def segments(self) -> dict[str, SegmentDescriptor]:
        with self._lock:
            return dict(self._segments)

    def _resolve(self, segment: str | SegmentDescriptor) -> SegmentDescriptor:
        if isinstance(segment, SegmentDescriptor):
            return self.segment_descriptor() if segment.name == self._segment_name else segment
        if segment == self._segment_name:
            return self.segment_descriptor()
        with self._lock:
            desc = self._segments.get(segment)
        if desc is None:
            raise StoreError(ErrorCode.SEGMENT_NOT_FOUND,
                             f"segment {segment!r} not opened on engine {self._segment_name}; "
                             f"call open_segment() first")
        return desc

    # ------------------------------------------------------------------ control channel

    def register_control_handler(self, msg_type: str, handler: ControlHandler) -> None:
        """Answer control messages of ``msg_type`` with ``handler(payload, peer) -> bytes``."""
        self._server.register_handler(msg_type, handler)

    def control_call(self, endpoint: str, msg_type: str, payload: bytes = b"",
                     timeout: float = 5.0) -> bytes:
        """Send a control message to a peer engine's endpoint and return its reply bytes."""
        return control_call(endpoint, msg_type, payload, timeout)

    def _describe_handler(self, payload: bytes, peer: str) -> bytes:
        return self.segment_descriptor().to_json().encode()

    # ------------------------------------------------------------------ batches

    def allocate_batch(self, capacity: int) -> Batch:
        """A batch that can hold up to ``capacity`` requests (over one or more ``submit`` calls)."""
        if capacity < 1:
            raise StoreError(ErrorCode.INVALID_PARAMS, f"batch capacity must be >= 1, got {capacity}")
        with self._lock:
            if self._closed:
                raise StoreError(ErrorCode.UNAVAILABLE_IN_CURRENT_STATUS, "transfer engine is closed")
            batch = Batch(next(self._batch_ids), capacity)
            self._batches[batch.id] = batch
        return batch

    def _batch(self, batch: Batch | int) -> Batch:
        b = self._batches.get(batch) if isinstance(batch, int) else batch
        if b is None or b._freed:
            bid = batch if isinstance(batch, int) else batch.id
            raise StoreError(ErrorCode.INVALID_PARAMS, f"batch {bid} is unknown or already freed")
        return b

    def submit(self, batch: Batch | int, requests: Sequence[TransferRequest]) -> None:
        """Queue ``requests``; never blocks on the network. Raises ``StoreError`` (and queues
        nothing) if a request is malformed, its local range unregistered, its segment unknown, or
        the batch full."""
        b = self._batch(batch)
        failpoint("transfer.submit", engine=self._segment_name, batch=b.id, requests=len(requests))
        if self._closed:
            raise StoreError(ErrorCode.UNAVAILABLE_IN_CURRENT_STATUS, "transfer engine is closed")
        if len(b._tasks) + len(requests) > b.capacity:
            raise StoreError(ErrorCode.INVALID_PARAMS,
                             f"batch {b.id} holds {b.capacity} requests; {len(b._tasks)} submitted, "
                             f"{len(requests)} more refused")
        base = len(b._tasks)
        checked = [self._check(b, base + i, r) for i, r in enumerate(requests)]
        tasks = self._pin_all(checked)
        by_transport: dict[int, tuple[Transport, list[Slice]]] = {}
        timeout = self.config.slice_timeout_s
        deadline = time.monotonic() + timeout if timeout > 0 else 0.0
        n_slices = 0
        with b._cond:
            for task in tasks:
                b._tasks.append(task)
                if task.status in TERMINAL:
                    continue
                b._unfinished += 1
                if not task.slices:  # 0 bytes
                    task.status = TransferStatus.COMPLETED
                    b._unfinished -= 1
                    continue
                task.in_flight = len(task.slices)
                b._in_flight += task.in_flight
                n_slices += task.in_flight
                for s in task.slices:
                    s.deadline = deadline
                assert task.transport is not None
                by_transport.setdefault(id(task.transport), (task.transport, []))[1].extend(task.slices)
            if b._unfinished == 0:
                b._cond.notify_all()
        for task in tasks:
            if task.slices and task.status is TransferStatus.WAITING:
                self._active.add(task)
        with self._lock:  # one lock round for both counters (as _count: zero adds no key)
            if tasks:
                self._counters["requests"] += len(tasks)
            if n_slices:
                self._counters["slices"] += n_slices
        for transport, slices in by_transport.values():
            self._post(transport, slices)

    def _check(self, b: Batch, index: int, r: TransferRequest) -> tuple[_Task, list[RegisteredRange]]:
        try:
            op = r.opcode if r.opcode.__class__ is Opcode else Opcode(r.opcode)  # skip the enum lookup
        except ValueError as exc:
            raise StoreError(ErrorCode.INVALID_PARAMS, f"request {index}: bad opcode {r.opcode!r}") from exc
        length, local, remote = int(r.length), int(r.local_addr), int(r.target_offset)
        if length < 0 or local < 0 or remote < 0:
            raise StoreError(ErrorCode.INVALID_PARAMS,
                             f"request {index}: negative length/address (local={local:#x} remote={remote:#x} "
                             f"length={length})")
        seg = self._resolve(r.segment)
        task = _Task(b, index, r, seg)
        is_local = seg.name == self._segment_name and self._local is not None
        task.transport = self._local if is_local else self._transport
        cover: list[RegisteredRange] = []
        if length:
            found = self.memory.cover(local, length)
            if found is None and not self.config.allow_unregistered_local:
                raise StoreError(ErrorCode.INVALID_PARAMS,
                                 f"request {index}: local range [{local:#x}, +{length}) is not registered "
                                 f"with engine {self._segment_name} (ERR_ADDRESS_NOT_REGISTERED)")
            cover = found or []
        pieces = self._remote_pieces(seg, remote, length)
        if pieces is None:
            task.status = TransferStatus.FAILED
            task.code = int(ErrorCode.INVALID_PARAMS)
            task.error = (f"{op.name} target [{remote:#x}, +{length}) is outside the registered buffers of "
                          f"segment {seg.name}")
            self._count("requests_refused")
            return task, []
        cfg = self.config
        on_done = self._on_slice_done
        pending = TransferStatus.PENDING
        slices = task.slices
        off = 0
        for addr, n, rkey in pieces:
            for o, ln in plan_slices(n, cfg.slice_size, cfg.fragment_limit):
                slices.append(Slice(op, local + off + o, ln, seg, addr + o, rkey, status=pending,
                                    on_done=on_done, task=task))
            off += n
        return task, cover

    def _remote_pieces(self, seg: SegmentDescriptor, addr: int,
                       length: int) -> list[tuple[int, int, int]] | None:
        """The target range cut at buffer boundaries as ``(addr, length, rkey)``; ``None`` when the
        descriptor's buffers do not hold all of it (unchecked when validation is off or the
        descriptor lists no buffers)."""
        if length == 0:
            return []
        if not self.config.validate_remote or not seg.buffers:
            return [(addr, length, 0)]
        bufs = sorted(seg.buffers, key=lambda b: b.addr)
        starts = [b.addr for b in bufs]
        i = bisect.bisect_right(starts, addr) - 1
        out = []
        pos, end = addr, addr + length
        while 0 <= i < len(bufs):
            b = bufs[i]
            if not b.addr <= pos < b.addr + b.length:
                return None
            take = min(end, b.addr + b.length) - pos
            out.append((pos, take, b.rkey))
            pos += take
            if pos == end:
                return out
            i += 1
        return None

    def _pin_all(self, checked: list[tuple[_Task, list[RegisteredRange]]]) -> list[_Task]:
        done: list[list[RegisteredRange]] = []
        for task, cover in checked:
            if not cover or task.status in TERMINAL:
                continue
            if not self.memory.acquire_all(cover):
                for pins in done:
                    self.memory.release_all(pins)
                raise StoreError(ErrorCode.INVALID_PARAMS,
                                 f"request {task.index}: local memory is being unregistered")
            task.pins = cover
            done.append(cover)
        return [t for t, _ in checked]

    def _post(self, transport: Transport, slices: list[Slice]) -> None:
        ready = []
        for s in slices:
            try:
                failpoint("transfer.slice_post", engine=self._segment_name, op=s.opcode.name,
                          peer=s.segment.name, addr=s.remote_addr, length=s.length)
            except StoreError as exc:
                s.complete(False, f"post of slice at {s.remote_addr:#x} to {s.segment.name}: {exc}",
                           code=exc.code)
                continue
            ready.append(s)
        if not ready:
            return
        try:
            transport.submit(ready)
        except Exception as exc:  # a transport bug must fail the slices, not the caller
            log.exception("transport %s refused %d slice(s)", transport.name, len(ready))
            for s in ready:
                s.complete(False, f"transport {transport.name} submit failed: {exc}", retryable=False)

    def _on_slice_done(self, s: Slice) -> None:
        """Called by transports (any thread) once per slice attempt."""
        task = s.task
        if task is None:
            return
        b = task.batch
        retry = False
        release = None
        finalize = False
        with b._cond:
            if s.status is TransferStatus.COMPLETED:
                task.ok_slices += 1
                task.transferred += s.length
                task.in_flight -= 1
                b._in_flight -= 1
                b._ok += 1
                b._bytes += s.length
                if task.ok_slices == len(task.slices) and task.status is TransferStatus.WAITING:
                    self._finish_locked(task, TransferStatus.COMPLETED)
            elif (task.status is TransferStatus.WAITING and s.retryable and s.retries < self.config.retry_cap
                  and not self._closed):
                b._failures += 1
                s.retries += 1
                task.retries += 1
                s.status = TransferStatus.PENDING
                s.deadline = 0.0
                retry = True
            else:
                b._failures += 1
                task.in_flight -= 1
                b._in_flight -= 1
                if task.status is TransferStatus.WAITING:
                    self._finish_locked(task, TransferStatus.FAILED, s.code,
                                        f"{s.opcode.name} slice [{s.remote_addr:#x}, +{s.length}) of request "
                                        f"{task.index} to {s.segment.name} failed after {s.retries} "
                                        f"retr{'y' if s.retries == 1 else 'ies'}: {s.error}")
            if task.in_flight == 0 and task.pins is not None:
                release, task.pins = task.pins, None
            if b._in_flight == 0:
                b._cond.notify_all()
                finalize = b._free_pending
        if release is not None:
            self.memory.release_all(release)
        if retry:
            self._schedule_retry(s)
        if finalize:
            self._finalize_free(b)

    def _finish_locked(self, task: _Task, status: TransferStatus, code: int = 0, error: str = "") -> None:
        task.status = status
        task.code = int(code)
        task.error = error
        b = task.batch
        b._unfinished -= 1
        if status is not TransferStatus.COMPLETED:
            for s in task.slices:
                s.abandoned = True
            log.info("transfer %s: batch %d request %d %s: %s", self._segment_name, b.id, task.index,
                     status.name, error)
        self._active.discard(task)
        if b._unfinished == 0:
            b._cond.notify_all()

    def status(self, batch: Batch | int, index: int) -> tuple[TransferStatus, int]:
        """``(status, transferred_bytes)`` of request ``index`` (Mooncake's ``getTransferStatus``)."""
        r = self.result(batch, index)
        return r.status, r.transferred_bytes

    def result(self, batch: Batch | int, index: int) -> TransferResult:
        b = self._batch(batch)
        with b._cond:
            if not 0 <= index < len(b._tasks):
                raise StoreError(ErrorCode.INVALID_PARAMS,
                                 f"batch {b.id} has {len(b._tasks)} requests; no request {index}")
            return b._tasks[index].result()

    def results(self, batch: Batch | int) -> list[TransferResult]:
        b = self._batch(batch)
        with b._cond:
            return [t.result() for t in b._tasks]

    def wait(self, batch: Batch | int, timeout: float | None = None) -> list[TransferResult]:
        """Block until every request is over (or ``timeout`` passes); returns every result."""
        b = self._batch(batch)
        with b._cond:
            b._cond.wait_for(lambda: b._unfinished == 0, timeout)
            return [t.result() for t in b._tasks]

    def cancel(self, batch: Batch | int) -> int:
        """Mark every unfinished request CANCELED; slices not yet sent are dropped, slices already
        on the wire finish on their own. Returns how many requests were cancelled."""
        b = self._batch(batch)
        n = 0
        with b._cond:
            for task in b._tasks:
                if task.status is TransferStatus.WAITING:
                    self._finish_locked(task, TransferStatus.CANCELED, ErrorCode.TRANSFER_FAIL,
                                        f"batch {b.id} cancelled by the caller")
                    n += 1
        self._count("requests_cancelled", n)
        return n

    def free_batch(self, batch: Batch | int, *, wait_s: float = 0.0) -> bool:
        """Release a batch. Unfinished requests are cancelled first. If slices are still in flight
        after ``wait_s`` seconds the release is deferred to their last completion and ``False`` is
        returned (the batch handle is unusable either way); ``True`` when released now."""
        b = self._batch(batch)
        with b._cond:
            b._freed = True
            for task in b._tasks:
                if task.status is TransferStatus.WAITING:
                    self._finish_locked(task, TransferStatus.CANCELED, ErrorCode.TRANSFER_FAIL,
                                        f"batch {b.id} freed before the request finished")
            if b._in_flight and wait_s > 0:
                b._cond.wait_for(lambda: b._in_flight == 0, wait_s)
            if b._in_flight:
                b._free_pending = True
                self._count("frees_deferred")
                log.info("transfer %s: free of batch %d deferred: %d slice(s) in flight",
                         self._segment_name, b.id, b._in_flight)
                return False
        self._finalize_free(b)
        return True

    def _finalize_free(self, b: Batch) -> None:
        with b._cond:
            if b._in_flight:
                return
            tasks, b._tasks = b._tasks, []
            b._free_pending = False
            folded = (b._ok, b._bytes, b._failures)
            b._ok = b._bytes = b._failures = 0
        with self._lock:
            self._counters["slices_ok"] += folded[0]
            self._counters["bytes"] += folded[1]
            self._counters["slice_failures"] += folded[2]
        for task in tasks:
            for s in task.slices:
                s.task = None
                s.on_done = None
            task.slices = []
            self._active.discard(task)
        with self._lock:
            self._batches.pop(b.id, None)

    # ------------------------------------------------------------------ synchronous helpers

    def transfer_sync(self, opcode: Opcode, local_addr: int, segment: str | SegmentDescriptor,
                      target_offset: int, length: int, timeout: float | None = None) -> int:
        """One request, waited for; returns bytes moved or raises ``StoreError`` with its code."""
        batch = self.allocate_batch(1)
        try:
            self.submit(batch, [TransferRequest(opcode, local_addr, segment, target_offset, length)])
            (res,) = self.wait(batch, timeout)
        finally:
            self.free_batch(batch)
        if res.status is TransferStatus.COMPLETED:
            return res.transferred_bytes
        if res.status is TransferStatus.WAITING:
            raise StoreError(ErrorCode.TRANSFER_FAIL,
                             f"{opcode.name} to {segment}: not done within {timeout}s")
        code = res.code or int(ErrorCode.TRANSFER_FAIL)
        raise StoreError(code if code in ErrorCode._value2member_map_ else ErrorCode.TRANSFER_FAIL,
                         f"{res.status.name}: {res.error}")

    def transfer_sync_write(self, segment: str | SegmentDescriptor, local_addr: int, target_offset: int,
                            length: int) -> int:
        """Mooncake's Python ``transfer_sync_write``: 0 on success, a negative error code otherwise."""
        try:
            self.transfer_sync(Opcode.WRITE, local_addr, segment, target_offset, length)
        except StoreError as exc:
            return int(exc.code)
        return 0

    def transfer_sync_read(self, segment: str | SegmentDescriptor, local_addr: int, target_offset: int,
                           length: int) -> int:
        try:
            self.transfer_sync(Opcode.READ, local_addr, segment, target_offset, length)
        except StoreError as exc:
            return int(exc.code)
        return 0

    # ------------------------------------------------------------------ retries and timeouts

    def _schedule_retry(self, s: Slice) -> None:
        delay = min(self.config.retry_backoff_s * (2 ** (s.retries - 1)), self.config.retry_backoff_max_s)
        self._count("retries")
        with self._mon_cond:
            heapq.heappush(self._retry_heap, (time.monotonic() + delay, next(self._retry_seq), s))
            self._mon_cond.notify()

    def _resubmit_all(self, due: list[Slice]) -> None:
        for s in due:
            self._resubmit(s)

    def _resubmit(self, s: Slice) -> None:
        task = s.task
        if task is None or s.abandoned or self._closed:
            s.complete(False, "request over before its retry was sent", retryable=False)
            return
        try:
            failpoint("transfer.retry", engine=self._segment_name, peer=s.segment.name, addr=s.remote_addr,
                      length=s.length, retries=s.retries)
        except StoreError as exc:
            s.complete(False, f"retry of slice at {s.remote_addr:#x} refused: {exc}", code=exc.code,
                       retryable=False)
            return
        timeout = self.config.slice_timeout_s
        s.deadline = time.monotonic() + timeout if timeout > 0 else 0.0
        assert task.transport is not None
        self._post(task.transport, [s])

    def _monitor_loop(self) -> None:
        timeout = self.config.slice_timeout_s
        tick = min(0.05, timeout / 4) if timeout > 0 else 0.25
        next_scan = time.monotonic() + tick
        while True:
            due: list[Slice] = []
            with self._mon_cond:
                if self._closed:
                    left = [s for _, _, s in self._retry_heap]
                    self._retry_heap.clear()
                    break
                now = time.monotonic()
                while self._retry_heap and self._retry_heap[0][0] <= now:
                    due.append(heapq.heappop(self._retry_heap)[2])
                if not due:
                    wake = min(next_scan, self._retry_heap[0][0] if self._retry_heap else next_scan)
                    if wake > now:
                        self._mon_cond.wait(wake - now)
            if due:
                self._resubmit_all(due)
                del due
            now = time.monotonic()
            if now >= next_scan:
                next_scan = now + tick
                if timeout > 0:
                    self._scan_timeouts(now)
        for s in left:
            s.complete(False, "transfer engine closed during retry backoff", retryable=False)

    def _scan_timeouts(self, now: float) -> None:
        expired: list[tuple[_Task, Slice]] = []
        for task in list(self._active):
            for s in task.slices:
                if s.status is TransferStatus.PENDING and 0 < s.deadline < now:
                    expired.append((task, s))
                    break
        for task, s in expired:
            b = task.batch
            with b._cond:
                if task.status is not TransferStatus.WAITING:
                    continue
                self._finish_locked(task, TransferStatus.TIMEOUT, ErrorCode.TRANSFER_FAIL,
                                    f"{s.opcode.name} slice [{s.remote_addr:#x}, +{s.length}) of request "
                                    f"{task.index} to {s.segment.name} did not complete within "
                                    f"{self.config.slice_timeout_s}s (attempt {s.retries + 1}, {s.where})")
                stuck = [x for x in task.slices if x.status is TransferStatus.PENDING]
            self._count("timeouts")
            if task.transport is not None and stuck:
                try:
                    task.transport.abort(stuck)
                except Exception:
                    log.exception("transport %s abort failed", task.transport.name)

    # ------------------------------------------------------------------ introspection

    def _count(self, key: str, n: int = 1) -> None:
        if n:
            with self._lock:
                self._counters[key] += n

    def in_flight_slices(self) -> int:
        with self._lock:
            batches = list(self._batches.values())
        return sum(b._in_flight for b in batches)

    def batches(self) -> list[Batch]:
        with self._lock:
            return list(self._batches.values())

    def connections(self) -> dict[str, list[Any]]:
        """Open connections per peer endpoint of the protocol transport (empty if it has none)."""
        peers = getattr(self._transport, "peers", None)
        return peers() if callable(peers) else {}

    def drop_connections(self, endpoint: str) -> int:
        """Reset every connection to ``endpoint`` (connection-loss fault); returns how many."""
        drop = getattr(self._transport, "drop_connections", None)
        return int(drop(endpoint)) if callable(drop) else 0

    def server_connections(self) -> list[Any]:
        """Connections accepted by this engine's transfer server (read-only snapshots)."""
        return self._server.connections()

    def drop_server_connections(self) -> int:
        """Reset every connection peers opened to this engine (server side of a connection loss)."""
        return self._server.drop_connections()

    def stats(self) -> dict[str, Any]:
        """Counters and gauges: requests, slices, retries, timeouts, live batches, slices in flight,
        per-transport and server counters, registered memory with its current users."""
        with self._lock:
            counters = dict(self._counters)
            batches = list(self._batches.values())
            transports = dict(self._transports)
        for b in batches:
            counters["slices_ok"] = counters.get("slices_ok", 0) + b._ok
            counters["bytes"] = counters.get("bytes", 0) + b._bytes
            counters["slice_failures"] = counters.get("slice_failures", 0) + b._failures
        return {
            **counters,
            "batches": len(batches),
            "slices_in_flight": sum(b._in_flight for b in batches),
            "requests_unfinished": sum(b._unfinished for b in batches),
            "active_requests": len(self._active),
            "retry_queue": len(self._retry_heap),
            "transports": {name: t.stats() for name, t in transports.items()},
            "server": self._server.stats(),
            "memory": self.memory.snapshot(),
        }

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Stop serving, fail whatever is still queued (in-flight slices fail without retry) and
        unregister all memory, so the regions behind it can be closed."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            transports = list(self._transports.values())
        with self._mon_cond:
            self._mon_cond.notify_all()
        self._monitor.join(timeout=5)
        for t in transports:
            try:
                t.close()
            except Exception:
                log.exception("closing transport %s failed", t.name)
        self._server.close()
        for r in list(self.memory):
            try:
                self.memory.remove(r.addr, wait_s=1.0)
            except StoreError as exc:
                log.warning("engine %s closing: %s", self._segment_name, exc)

    def __enter__(self) -> TransferEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TransferEngine({self._segment_name!r}, protocol={self.protocol!r})"


__all__ = [
    "Batch",
    "EngineConfig",
    "Opcode",
    "SegmentDescriptor",
    "TransferEngine",
    "TransferRequest",
    "TransferResult",
    "TransferStatus",
    "plan_slices",
]

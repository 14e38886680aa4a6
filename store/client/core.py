"""The Mooncake-compatible client: ``MooncakeDistributedStore``'s Python surface over Umbra's store.

Existing code that does ``store = MooncakeDistributedStore(); store.setup(...); store.put(k, v)``
can switch to :class:`Client` unchanged: same method names and arguments, same return conventions
(0 or a negative Mooncake error code; ``get`` returns ``b""`` on a miss or any error; ``get_into``
returns the byte count), same measured semantics (a second ``put`` of an existing key returns 0
and keeps the old value, ``upsert`` overwrites, ``get``/``is_exist``/``get_size`` grant the read
lease, ``put`` does not).

Data path (design §1)
---------------------
put: ``PutStart`` → one descriptor per replica → the value goes to every replica through the
transfer engine in one batch (memcpy when the replica is on this process's own segment and the
protocol is TCP; Mooncake's ``MC_STORE_MEMCPY``), chunked in ≤ 16 MiB − 16 requests as Mooncake
does → while the bytes are on the wire the client computes the value's XXH64 → ``PutEnd`` with
that checksum. Any replica that fails: the client waits for the batch's in-flight slices to drain
(so no late write lands after the space is handed out again), ``PutRevoke``s and returns
TRANSFER_FAIL (−800). Nothing half-written is ever readable.

get: the time is taken *before* ``GetReplicaList`` (which grants a lease of ``lease_ttl_ms``), so
``deadline = start + ttl`` is never later than the master's own lease deadline. One complete replica
is read (this process's own segment first); if its transfer fails the next replica is tried
(Mooncake gives up instead). A read that completes after the deadline returns LEASE_EXPIRED (−707)
and its bytes are discarded, because past the lease the master may have handed the range to
another object. Otherwise the bytes are checked against the checksum recorded at ``PutEnd``
(CHECKSUM_MISMATCH −801 when no replica matches) and only then handed out.

Failpoints, one per step: ``client.put_start``, ``client.write_replica``, ``client.put_end``,
``client.get_replica_list``, ``client.read_replica``, ``client.verify_checksum``,
``client.remount``. Introspection (read-only): :meth:`Client.counters`, :meth:`Client.segments`,
:meth:`Client.local_buffer_report`, :meth:`Client.last_op`, :meth:`Client.stats`.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import xxhash

from store.allocator.base import Allocation
from store.client.buffer import LocalBuffer
from store.client.types import OpRecord, to_wire_config
from store.config import ClientConfig, ConfigError, from_dict, load
from store.errors import ErrorCode, StoreError
from store.failpoints import failpoint
from store.master.client import Heartbeat, MasterClient
from store.master.types import ReplicaDescriptor, ReplicaList, ReplicaStatus, Segment
from store.master.types import ReplicateConfig as WireReplicateConfig
from store.packing import MAX_STORE_CHUNK, Checksum, checksum
from store.transfer.engine import Batch, Opcode, TransferEngine, TransferRequest, TransferResult
from store.transfer.memory import MemoryRegion, view_at
from store.transfer.transport import BufferDescriptor, SegmentDescriptor
from store.units import MiB

log = logging.getLogger("store.client")

SEGMENT_ALIGNMENT = 16 * MiB  # Mooncake's Slab::kSize: the cachelib allocator needs it

T = TypeVar("T")

MAX_KEY_BYTES = 4096  # the master's default --max_key_bytes
DEFAULT_MAX_MR_SIZE = 1 << 40  # one registration (and one mounted segment) per TiB, as Mooncake
SETUP_DEFAULT_SEGMENT = 16 * MiB  # Mooncake's pybind defaults for the positional form
SETUP_DEFAULT_BUFFER = 16 * MiB
OK = 0
_EXISTS = int(ErrorCode.OBJECT_ALREADY_EXISTS)
_NOT_INITIALISED = int(ErrorCode.INTERNAL_ERROR)  # Mooncake's store_py answers -1 before setup()


_QUIET = frozenset({ErrorCode.OBJECT_NOT_FOUND, ErrorCode.OBJECT_HAS_LEASE, ErrorCode.OBJECT_ALREADY_EXISTS,
                    ErrorCode.REPLICA_IS_NOT_READY})
_SMALL_DIGEST = 256 * 1024


def _code(exc: StoreError) -> int:
    return int(exc.code)


STREAM_MIN = 4 * MiB  # a single value this large is moved in parts, pipelined with copy and checksum
_MIN_PART = 2 * MiB
_MAX_PARTS = 8
_NEW_BYTES = ctypes.pythonapi.PyBytes_FromStringAndSize
_NEW_BYTES.restype = ctypes.py_object
_NEW_BYTES.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)


def new_bytes(length: int) -> tuple[bytes, int]:
    """An uninitialised ``bytes`` of ``length`` and the address of its data, to be filled before
    anyone else sees it (the C API's ``PyBytes_FromStringAndSize(NULL, n)``). Filling it with
    ``memmove`` releases the GIL, which ``bytes(view)`` does not."""
    out = _NEW_BYTES(None, length)
    return out, int(np.frombuffer(out, dtype=np.uint8).ctypes.data)


def parts_of(length: int) -> list[tuple[int, int]]:
    """``(offset, length)`` pieces a large value is streamed in: at most 8, at least 2 MiB, on
    64 KiB boundaries, never above a store chunk."""
    part = max(_MIN_PART, -(-length // _MAX_PARTS))
    part = min(MAX_STORE_CHUNK, -(-part // 65536) * 65536)
    return [(off, min(part, length - off)) for off in range(0, length, part)]


def digest(addr: int, length: int) -> int:
    """XXH64 (seed 0) of ``length`` bytes at ``addr``: the object checksum recorded at PutEnd.

    Small values go through the ``xxhash`` C library (half a microsecond for 4 KiB, where the numba
    kernel's dispatch costs ten times that); large ones through the numba kernel, which releases
    the GIL so the transfer threads keep moving bytes while it runs. Both are the same function.
    """
    view = view_at(addr, length, writable=False)
    if length <= _SMALL_DIGEST:
        return xxhash.xxh64_intdigest(view)
    return checksum(view)


@dataclass(slots=True, eq=False)
class _PutJob:
    key: str
    length: int
    src: int = 0  # registered address holding the value
    alloc: Allocation | None = None  # local-buffer copy (bytes APIs)
    code: int = 0
    descs: list[ReplicaDescriptor] | None = None
    first: int = 0
    nreq: int = 0
    checksum: int | None = None
    retries: int = 0
    pending: tuple[object, int, int] | None = None  # (value, address, length) still to copy to ``src``


@dataclass(slots=True, eq=False)
class _GetJob:
    key: str
    user_addr: int = 0  # get_into: the caller's registered buffer (0 = use the local buffer)
    user_size: int = 0
    code: int = 0
    size: int = 0
    dst: int = 0
    alloc: Allocation | None = None
    rl: ReplicaList | None = None
    deadline: float | None = None
    candidates: list[ReplicaDescriptor] = field(default_factory=list)
    next: int = 0
    replica: str = ""
    failovers: int = 0
    retries: int = 0
    done: bool = False
    first: int = 0
    nreq: int = 0
    last_error: int = int(ErrorCode.TRANSFER_FAIL)
    out: bytes | None = None  # get(): the result object, filled while a streamed read progresses
    out_addr: int = 0
    digest: int | None = None  # checksum computed while streaming
    borrowed: int = 0  # address of ``out`` while it is registered as the read's destination


_BYTES_DATA = sys.getsizeof(b"") - 1  # offset of a bytes object's data (offsetof ob_sval)


def _bytes_addr(value: bytes) -> int:
    return id(value) + _BYTES_DATA


_PROBE = b"layout probe"
if ctypes.cast(ctypes.c_char_p(_PROBE), ctypes.c_void_p).value != _bytes_addr(_PROBE):
    def _bytes_addr(value: bytes) -> int:  # another object layout: take the slow, exact way
        return int(np.frombuffer(value, dtype=np.uint8).ctypes.data)


def _value_source(value: Any) -> tuple[object, int, int] | None:
    """``(keep_alive, address, length)`` of a bytes-like value's contiguous bytes, or None when it is
    not bytes-like. ``bytes`` (the common case) is read in place without numpy."""
    if type(value) is bytes:
        return value, _bytes_addr(value), len(value)
    if isinstance(value, str) or value is None:
        return None
    try:
        arr = np.frombuffer(value, dtype=np.uint8)
    except (TypeError, ValueError, BufferError):
        try:
            mv = memoryview(value)
        except TypeError:
            return None
        arr = np.frombuffer(mv.tobytes(), dtype=np.uint8)  # non-contiguous: one compacting copy
    return arr, int(arr.ctypes.data), int(arr.size)


def _warm_kernels() -> None:
    try:
        Checksum().update(bytes(4096)).digest()
        checksum(bytes(_SMALL_DIGEST + 1))
    except Exception:  # only a warm-up; the real call reports any problem
        log.debug("checksum kernel warm-up failed", exc_info=True)


class Client:
    """Mooncake's ``MooncakeDistributedStore`` (see the module docstring). Thread-safe.

    Keyword arguments tune Umbra-only knobs: ``transfer_timeout_s`` (per batch, Mooncake's 60 s),
    ``rpc_timeout_s``, ``heartbeat_interval_s`` (Mooncake pings every second), ``max_mr_size``
    (largest registration and mounted segment; ``MC_MAX_MR_SIZE``), ``drain_wait_s`` (how long a
    failed operation waits for its in-flight slices before giving the space back),
    ``engine_options`` (extra :class:`TransferEngine` keyword arguments), ``zero_copy`` (see
    :meth:`_borrow`), ``populate_segment`` (touch every page of the global segment at setup, so
    the first puts into it do not pay page faults; benchmarks use it to measure steady state).
    """

    def __init__(self, *, transfer_timeout_s: float = 60.0, rpc_timeout_s: float = 5.0,
                 heartbeat_interval_s: float = 1.0, max_mr_size: int | None = None,
                 drain_wait_s: float = 5.0, engine_options: dict[str, Any] | None = None,
                 zero_copy: bool = True, populate_segment: bool = False,
                 environ: Mapping[str, str] | None = None) -> None:
        self.transfer_timeout_s = transfer_timeout_s
        self.rpc_timeout_s = rpc_timeout_s
        self.heartbeat_interval_s = heartbeat_interval_s
        env = os.environ if environ is None else environ
        if max_mr_size is None:
            raw = env.get("MC_MAX_MR_SIZE", "").strip()
            max_mr_size = int(raw) if raw.isdigit() and int(raw) > 0 else DEFAULT_MAX_MR_SIZE
        self.max_mr_size = max_mr_size
        self.drain_wait_s = drain_wait_s
        self.zero_copy = zero_copy
        self.populate_segment = populate_segment
        self._borrowed: list[tuple[list[Batch], object, int]] = []
        self._borrow_lock = threading.Lock()
        self._engine_options = dict(engine_options or {})
        self._environ = environ
        self._lock = threading.RLock()
        self._ready = False
        self.config: ClientConfig | None = None
        self.client_id = ""
        self._master: MasterClient | None = None
        self._engine: TransferEngine | None = None
        self._buffer: LocalBuffer | None = None
        self._segment_region: MemoryRegion | None = None
        self._segments: list[Segment] = []
        self._heartbeat: Heartbeat | None = None
        self._metrics_server: Any = None  # client_http_port: /metrics and /health
        self._seg_cache: dict[str, SegmentDescriptor] = {}
        self._counters: dict[str, int] = {}
        self._count_lock = threading.Lock()
        self._tls = threading.local()

    # ================================================================== lifecycle

    def setup(self, local_hostname: str | dict[str, Any] | None = None, metadata_server: str | None = None,
              global_segment_size: int | str = SETUP_DEFAULT_SEGMENT,
              local_buffer_size: int | str = SETUP_DEFAULT_BUFFER, protocol: str = "tcp",
              device_name: str = "", master_server_address: str = "127.0.0.1:50051", **kwargs: Any) -> int:
        """Mooncake's ``setup``: positional/keyword form, ``setup(config_dict)``, or ``setup()``
        reading ``MOONCAKE_CONFIG_PATH``. Returns 0, or a negative code: INVALID_PARAMS for a bad
        config value (the log names the key), RPC_FAIL when the master cannot be reached."""
        try:
            cfg = self._resolve_config(local_hostname, metadata_server, global_segment_size,
                                       local_buffer_size, protocol, device_name, master_server_address,
                                       kwargs)
        except StoreError as exc:
            log.error("setup refused: %s", exc)
            return _code(exc)
        with self._lock:
            if self._ready:
                log.error("setup called twice on client %s; close() it first", self.client_id)
                return int(ErrorCode.UNAVAILABLE_IN_CURRENT_STATUS)
            try:
                self._start(cfg)
            except StoreError as exc:
                log.error("setup failed (local_hostname=%s master=%s protocol=%s): %s", cfg.local_hostname,
                          cfg.master_server_address, cfg.protocol, exc)
                self._teardown()
                return _code(exc)
            except Exception:
                log.exception("setup failed (local_hostname=%s master=%s)", cfg.local_hostname,
                              cfg.master_server_address)
                self._teardown()
                return int(ErrorCode.INTERNAL_ERROR)
        return OK

    def _resolve_config(self, local_hostname: Any, metadata_server: Any, global_segment_size: Any,
                        local_buffer_size: Any, protocol: Any, device_name: Any, master_server_address: Any,
                        extra: dict[str, Any]) -> ClientConfig:
        if isinstance(local_hostname, dict):
            if metadata_server is not None or extra:
                raise ConfigError("setup(config_dict) takes no other arguments")
            return from_dict(local_hostname, environ=self._environ)
        if local_hostname is None and metadata_server is None and not extra:
            return load(environ=self._environ)
        if isinstance(local_hostname, ClientConfig):
            return local_hostname
        values: dict[str, Any] = {
            "local_hostname": local_hostname, "metadata_server": metadata_server or "P2PHANDSHAKE",
            "global_segment_size": global_segment_size, "local_buffer_size": local_buffer_size,
            "protocol": protocol, "device_name": device_name, "master_server_address": master_server_address,
        }
        for key, value in extra.items():
            if key in ("rdma_devices", "master_server_addr") and value in ("", None):
                continue
            values[key] = value
        if values["local_hostname"] is None:
            raise ConfigError("local_hostname must not be empty")
        # Explicit arguments win: Mooncake's MOONCAKE_* variables belong to the config-file path.
        return from_dict(values, environ={})

    def _start(self, cfg: ClientConfig) -> None:
        self.config = cfg
        self.client_id = str(uuid.uuid4())
        self._counters = {}
        self._seg_cache = {}
        self._master = MasterClient(cfg.master_server_address, timeout=self.rpc_timeout_s,
                                    connect_timeout=min(self.rpc_timeout_s, 3.0))
        self._master.service_ready()
        options = dict(self._engine_options)
        transport_options = {k: dict(v) for k, v in options.pop("transport_options", {}).items()}
        if cfg.protocol == "rdma":
            device = cfg.device_name.split(",")[0].strip()
            if device and device != "auto-discovery":
                transport_options.setdefault("rdma", {}).setdefault("device_name", device)
        options.setdefault("environ", self._environ)
        self._engine = TransferEngine(cfg.local_hostname, cfg.protocol, metadata_server=cfg.metadata_server,
                                      transport_options=transport_options, **options)
        if cfg.local_buffer_size > 0:
            self._buffer = LocalBuffer(self._engine, cfg.local_buffer_size)
        if cfg.global_segment_size > 0:
            self._mount(cfg.global_segment_size)
        else:
            # A pure client still registers with the master, so a put it leaves unfinished when it
            # dies is reclaimed at its expiry (the master learns of clients by mount/remount).
            self._master.remount_segment([], self.client_id)
        if cfg.enable_client_http_server:
            self._metrics_server = self._serve_metrics(cfg.client_http_port)
        self._heartbeat = Heartbeat(self._master, self.client_id, self.heartbeat_interval_s,
                                    on_need_remount=self._remount).start()
        # Load the checksum kernels now (from numba's disk cache), not inside the first large op.
        threading.Thread(target=_warm_kernels, name="client-warmup", daemon=True).start()
        self._ready = True
        log.info("client %s up: segment=%s endpoint=%s protocol=%s global_segment=%d local_buffer=%d "
                 "segments=%d master=%s", self.client_id, self._engine.segment_name, self._engine.endpoint,
                 cfg.protocol, cfg.global_segment_size, cfg.local_buffer_size, len(self._segments),
                 cfg.master_server_address)

    def _mount(self, size: int) -> None:
        """Map the global segment, register it in chunks of ≤ ``max_mr_size`` and mount each chunk
        as its own segment (Mooncake does the same)."""
        assert self._engine is not None and self._master is not None and self.config is not None
        # 16 MiB alignment, as Mooncake's aligned_alloc: the cachelib allocator refuses other bases
        self._segment_region = region = MemoryRegion(size, populate=self.populate_segment,
                                                     align=SEGMENT_ALIGNMENT)
        chunks = region.chunks(self.max_mr_size)
        for c in chunks:
            self._engine.register_memory(c.addr, c.length, remote=True)
        transport = self._engine.segment_descriptor().to_dict()
        for c in chunks:
            seg = Segment(id=str(uuid.uuid4()), name=self._engine.segment_name, base=c.addr,
                          size=c.length, protocol=self.config.protocol, te_endpoint=self._engine.endpoint,
                          transport=transport)
            self._master.mount_segment(seg, self.client_id)
            self._segments.append(seg)

    def _remount(self) -> None:
        """NEED_REMOUNT from the heartbeat: the master lost us (restart or expiry); mount everything
        again in one call."""
        failpoint("client.remount", client_id=self.client_id, segments=len(self._segments))
        assert self._master is not None
        self._master.remount_segment(list(self._segments), self.client_id)
        self._count("remounts")
        log.info("client %s remounted %d segment(s) after NEED_REMOUNT", self.client_id, len(self._segments))

    def close(self) -> int:
        """Stop the heartbeat, unmount the segments (their objects are lost, as in Mooncake), close
        the engine and unmap the memory. Idempotent; returns 0."""
        with self._lock:
            if self._ready:
                log.info("client %s closing", self.client_id)
            self._teardown()
        return OK

    def _serve_metrics(self, port: int) -> Any:
        """Mooncake's ``client_http_port``: the transport's Prometheus counters (RDMA: completions by
        status, async events, reconnects, retries, paused paths) on ``/metrics``, and ``/health``."""
        from store.transfer.rdma.metrics import serve_metrics  # prometheus only; no pyverbs

        assert self._engine is not None and self.config is not None
        metrics = getattr(self._engine.transport(self.config.protocol), "metrics", None)
        registries = [metrics.registry] if metrics is not None else []
        try:
            server = serve_metrics(port, registries, health=lambda: "OK" if self._ready else "NOT READY")
        except OSError as exc:
            log.warning("client %s: metrics HTTP server on port %d not started: %s", self.client_id, port,
                        exc)
            return None
        log.info("client %s: metrics on http://0.0.0.0:%d/metrics", self.client_id, server.port)
        return server

    def _teardown(self) -> None:
        self._ready = False
        if self._metrics_server is not None:
            self._metrics_server.close()
            self._metrics_server = None
        if self._heartbeat is not None:
            self._heartbeat.stop()
            self._heartbeat = None
        if self._master is not None:
            for seg in self._segments:
                try:
                    self._master.unmount_segment(seg.id, self.client_id, timeout=2.0)
                except StoreError as exc:
                    log.warning("client %s: unmount of segment %s failed: %s", self.client_id, seg.id, exc)
        self._segments = []
        if self._engine is not None:
            self._engine.close()  # unregisters everything, borrowed memory included
        with self._borrow_lock:
            self._borrowed = []
        if self._buffer is not None:
            self._buffer.close()
            self._buffer = None
        if self._segment_region is not None:
            try:
                self._segment_region.close()
            except Exception as exc:  # noqa: BLE001 - pinned by a stuck transfer: leak rather than unmap
                log.warning("client %s: segment memory left mapped: %s", self.client_id, exc)
            self._segment_region = None
        self._engine = None
        if self._master is not None:
            self._master.close()
            self._master = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def health_check(self) -> int:
        """Mooncake's codes: 0 healthy, 1 not set up, 2 master unreachable."""
        if not self._ready or self._master is None:
            return 1
        try:
            self._master.service_ready(timeout=min(self.rpc_timeout_s, 2.0))
        except StoreError:
            return 2
        return 0

    def get_hostname(self) -> str:
        """This client's segment name (``host:port``), what ``preferred_segment`` takes."""
        return self._engine.segment_name if self._engine is not None else ""

    # ================================================================== helpers

    def _count(self, name: str, n: int = 1) -> None:
        with self._count_lock:
            self._counters[name] = self._counters.get(name, 0) + n

    def _note(self, record: OpRecord) -> None:
        self._tls.last = record

    def _check_key(self, key: Any) -> int:
        if not isinstance(key, str):
            return int(ErrorCode.INVALID_PARAMS)
        if not key:
            return int(ErrorCode.INVALID_PARAMS)
        if len(key) > MAX_KEY_BYTES // 4 and len(key.encode()) > MAX_KEY_BYTES:
            return int(ErrorCode.INVALID_KEY)
        return OK

    def _registered(self, addr: Any, size: Any) -> int:
        """0 when ``[addr, addr+size)`` is a valid, registered caller buffer; else the code."""
        if isinstance(addr, bool) or not isinstance(addr, int) or isinstance(size, bool) \
                or not isinstance(size, int) or addr <= 0 or size <= 0:
            return int(ErrorCode.INVALID_PARAMS)
        assert self._engine is not None
        if self._engine.memory.cover(addr, size) is None:
            # Mooncake over RDMA refuses an unregistered buffer before anything moves
            # (AddressNotRegistered → TRANSFER_FAIL); Umbra does so on every transport.
            return int(ErrorCode.TRANSFER_FAIL)
        return OK

    def _guard(self, op: str, default: T, fn: Callable[[], T]) -> T:
        """Run an API call: before setup → ``default``; an unexpected exception is logged and
        answered with ``default`` (a code, or ``b""``) instead of escaping into the caller."""
        if not self._ready:
            log.error("%s: client is not set up", op)
            return default
        try:
            return fn()
        except StoreError as exc:
            log.log(logging.DEBUG if exc.code in _QUIET else logging.WARNING, "%s failed: %s", op, exc)
            if isinstance(default, int):
                return _code(exc)  # type: ignore[return-value]
            return default
        except Exception:
            log.exception("%s failed unexpectedly", op)
            return default

    def _borrow(self, addr: int, length: int) -> bool:
        """Register the memory of a large ``bytes`` value (put) or of the ``bytes`` a get returns as
        the transfer's own local memory, so the bytes APIs skip the staging copy through the local
        buffer. Only over TCP (and memcpy), where registering is bookkeeping; an RDMA registration
        pins pages and costs more than the copy. The local-buffer range is still reserved for the
        operation, so the buffer's size limit and its exhaustion behave exactly as in Mooncake.
        False when it cannot be done (the caller then copies)."""
        engine = self._engine
        if not self.zero_copy or engine is None or engine.protocol != "tcp":
            return False
        if self._borrowed:
            self._sweep_borrowed()
        try:
            engine.register_memory(addr, length, remote=False, location="cpu:borrowed")
        except StoreError:
            return False  # e.g. the same object is in flight in another thread
        self._count("zero_copy")
        return True

    def _give_back(self, addr: int, keep: object, batches: list[Batch], released: bool) -> None:
        """Unregister borrowed memory, or, while slices of a failed transfer may still touch it,
        keep the object alive and registered until they drained."""
        if released and self._engine is not None:
            try:
                self._engine.unregister_memory(addr, wait_s=0.0)
                return
            except StoreError:
                pass
        with self._borrow_lock:
            self._borrowed.append((batches, keep, addr))

    def _sweep_borrowed(self) -> None:
        with self._borrow_lock:
            ready = [e for e in self._borrowed if all(b.slices_in_flight == 0 for b in e[0])]
            self._borrowed = [e for e in self._borrowed if all(e is not r for r in ready)]
        for entry in ready:
            try:
                if self._engine is not None:
                    self._engine.unregister_memory(entry[2], wait_s=0.0)
            except StoreError as exc:
                log.info("borrowed memory %#x still in use, kept: %s", entry[2], exc)
                with self._borrow_lock:
                    self._borrowed.append(entry)

    def _segment_of(self, d: ReplicaDescriptor) -> SegmentDescriptor:
        """The engine's view of the segment a descriptor points into (cached per mount id)."""
        seg = self._seg_cache.get(d.segment_id)
        if seg is None:
            t = d.transport or {}
            buffers = tuple(BufferDescriptor(int(b["addr"]), int(b["length"]), int(b.get("rkey", 0)),
                                             str(b.get("name", "cpu:0"))) for b in t.get("buffers", ()))
            seg = SegmentDescriptor(d.segment_name, d.protocol, d.te_endpoint, buffers,
                                    tuple(dict(x) for x in t.get("devices", ())), int(t.get("pid", 0)))
            if len(self._seg_cache) > 4096:
                self._seg_cache.clear()
            self._seg_cache[d.segment_id] = seg
        return seg

    def _requests(self, op: Opcode, local: int, d: ReplicaDescriptor, length: int) -> list[TransferRequest]:
        """One engine request per ≤ 16 MiB − 16 store chunk (Mooncake's kMaxSliceSize)."""
        seg = self._segment_of(d)
        if length <= MAX_STORE_CHUNK:
            return [TransferRequest(op, local, seg, d.address, length)]
        out = []
        off = 0
        while off < length:
            n = min(MAX_STORE_CHUNK, length - off)
            out.append(TransferRequest(op, local + off, seg, d.address + off, n))
            off += n
        return out

    @staticmethod
    def _chunks(length: int) -> int:
        return max(1, -(-length // MAX_STORE_CHUNK))

    # ================================================================== puts

    def _stage(self, job: _PutJob, value: Any) -> None:
        """Copy a bytes-like value into the local buffer (INVALID_PARAMS when it is empty, not
        bytes-like, or does not fit, as Mooncake)."""
        source = _value_source(value)
        if source is None or source[2] == 0:
            job.code = int(ErrorCode.INVALID_PARAMS)
            return
        job.length = source[2]
        alloc = self._buffer.allocate(job.length) if self._buffer is not None else None
        if alloc is None:
            size = self._buffer.size if self._buffer is not None else 0
            log.warning("put key=%s: failed to allocate %d bytes in the local buffer of %d bytes", job.key,
                        job.length, size)
            job.code = int(ErrorCode.INVALID_PARAMS)
            return
        assert self._buffer is not None
        job.alloc = alloc
        job.src = self._buffer.address(alloc)
        job.pending = source  # copied once PutStart succeeded (a refused put copies nothing)

    def _release(self, jobs: Sequence[_PutJob | _GetJob]) -> None:
        if self._buffer is None:
            return
        for j in jobs:
            if j.alloc is not None:
                self._buffer.free(j.alloc)
                j.alloc = None

    def _run_puts(self, jobs: list[_PutJob], config: Any, overwrite: bool) -> None:
        try:
            wire = to_wire_config(config)
        except StoreError as exc:
            for j in jobs:
                j.code = j.code or _code(exc)
            return
        live = [j for j in jobs if j.code == 0]
        if not live:
            return
        self._put_start(live, wire, overwrite)
        writing = [j for j in live if j.code == 0 and j.descs is not None]
        if writing:
            self._write(writing)

    def _put_start(self, jobs: list[_PutJob], wire: WireReplicateConfig, overwrite: bool) -> None:
        assert self._master is not None
        todo = []
        for j in jobs:
            try:
                failpoint("client.put_start", key=j.key, size=j.length, client_id=self.client_id)
            except StoreError as exc:
                j.code = _code(exc)
                continue
            todo.append(j)
        if not todo:
            return
        outcomes: list[tuple[int, list[ReplicaDescriptor] | None]]
        if len(todo) == 1:
            try:
                outcomes = [(OK, self._master.put_start(self.client_id, todo[0].key, todo[0].length, wire))]
            except StoreError as exc:
                outcomes = [(_code(exc), None)]
                if exc.code is not ErrorCode.OBJECT_ALREADY_EXISTS:
                    log.info("put key=%s length=%d: PutStart failed: %s", todo[0].key, todo[0].length, exc)
        else:
            try:
                items = self._master.batch_put_start(self.client_id, [j.key for j in todo],
                                                     [j.length for j in todo], wire)
            except StoreError as exc:
                log.info("batch put of %d keys: BatchPutStart failed: %s", len(todo), exc)
                items = None
                for j in todo:
                    j.code = _code(exc)
            if items is None:
                return
            outcomes = [(int(it.code), it.value) for it in items]
        for j, (code, descs) in zip(todo, outcomes, strict=True):
            if code == _EXISTS:
                if overwrite:
                    self._overwrite_start(j, wire)
                else:
                    self._count("put_kept_existing")  # Mooncake: 0, the old value stays
            elif code:
                j.code = code
            else:
                j.descs = descs

    def _overwrite_start(self, j: _PutJob, wire: WireReplicateConfig) -> None:
        """upsert: drop the old object (even under a read lease: a reader still copying it finds out
        through the checksum or its lease deadline) and start the new one."""
        assert self._master is not None
        for _ in range(3):
            try:
                self._master.remove(j.key, force=True)
            except StoreError as exc:
                if exc.code is not ErrorCode.OBJECT_NOT_FOUND:
                    j.code = _code(exc)
                    return
            try:
                j.descs = self._master.put_start(self.client_id, j.key, j.length, wire)
                self._count("upsert_replaced")
                return
            except StoreError as exc:
                if exc.code is not ErrorCode.OBJECT_ALREADY_EXISTS:
                    j.code = _code(exc)
                    return
        j.code = _EXISTS

    def _write(self, jobs: list[_PutJob]) -> None:
        """Write every replica of every job in one engine batch; PutEnd the complete ones, revoke
        the others (after their in-flight slices drained)."""
        engine, master = self._engine, self._master
        assert engine is not None and master is not None
        if len(jobs) == 1 and jobs[0].length >= STREAM_MIN:
            self._write_streamed(jobs[0])
            return
        for j in jobs:
            if j.pending is not None:
                ctypes.memmove(j.src, j.pending[1], j.length)
                j.pending = None
        total = sum(len(j.descs or ()) * self._chunks(j.length) for j in jobs)
        batch = engine.allocate_batch(max(1, total))
        reqs: list[TransferRequest] = []
        for j in jobs:
            j.first = len(reqs)
            try:
                for i, d in enumerate(j.descs or ()):
                    self._check_replica(j, i, d)
                    reqs.extend(self._requests(Opcode.WRITE, j.src, d, j.length))
            except StoreError as exc:
                del reqs[j.first:]
                j.code = _code(exc)
                log.warning("put key=%s: replica write refused before sending: %s", j.key, exc)
            j.nreq = len(reqs) - j.first
        submitted = False
        if reqs:
            try:
                engine.submit(batch, reqs)
                submitted = True
            except StoreError as exc:
                log.warning("put of %d key(s): submit failed: %s", len(jobs), exc)
                for j in jobs:
                    if j.nreq:
                        j.code = int(ErrorCode.TRANSFER_FAIL)
        # Checksums are computed while the bytes travel (the kernel releases the GIL).
        for j in jobs:
            if j.code == 0:
                j.checksum = digest(j.src, j.length)
        results: list[TransferResult] = engine.wait(batch, self.transfer_timeout_s) if submitted else []
        self._conclude_write(jobs, batch, results)

    def _check_replica(self, j: _PutJob, i: int, d: ReplicaDescriptor) -> None:
        failpoint("client.write_replica", key=j.key, replica=i, segment=d.segment_name, address=d.address,
                  length=j.length)
        if d.length != j.length:
            raise StoreError(ErrorCode.INTERNAL_ERROR,
                             f"master gave a {d.length}-byte replica for a {j.length}-byte value")

    def _write_streamed(self, j: _PutJob) -> None:
        """One large value: copy a part into the local buffer, send it to every replica, hash it,
        next part; the copy and the checksum of one part overlap the transfer of the others."""
        engine = self._engine
        assert engine is not None
        descs = j.descs or []
        parts = parts_of(j.length)
        batch = engine.allocate_batch(max(1, len(parts) * len(descs)))
        j.first = 0
        try:
            for i, d in enumerate(descs):
                self._check_replica(j, i, d)
            segs = [self._segment_of(d) for d in descs]
        except StoreError as exc:
            j.code = _code(exc)
            log.warning("put key=%s: replica write refused before sending: %s", j.key, exc)
            segs = []
        stream = Checksum()
        sent = 0
        source = j.pending
        borrowed = 0
        if source is not None and not j.code and self._borrow(source[1], j.length):
            borrowed = j.src = source[1]
            j.pending = None
        for off, n in parts:
            if j.code:
                break
            if j.pending is not None:
                ctypes.memmove(j.src + off, j.pending[1] + off, n)
            try:
                engine.submit(batch, [TransferRequest(Opcode.WRITE, j.src + off, seg, d.address + off, n)
                                      for d, seg in zip(descs, segs, strict=True)])
                sent += len(segs)
            except StoreError as exc:
                log.warning("put key=%s: submit of part at %d failed: %s", j.key, off, exc)
                j.code = int(ErrorCode.TRANSFER_FAIL)
                break
            stream.update(view_at(j.src + off, n, writable=False))
        j.pending = None
        j.nreq = sent
        if j.code == 0:
            j.checksum = stream.digest()
        results = engine.wait(batch, self.transfer_timeout_s) if sent else []
        released = self._conclude_write([j], batch, results)
        if borrowed:
            self._give_back(borrowed, source[0] if source else None, [batch], released)

    def _conclude_write(self, jobs: list[_PutJob], batch: Batch, results: list[TransferResult]) -> bool:
        """Judge the transfers, PutEnd or revoke; True when the batch was released (drained)."""
        engine = self._engine
        assert engine is not None
        for j in jobs:
            if j.code or not j.nreq:
                continue
            mine = results[j.first:j.first + j.nreq]
            j.retries = sum(r.retries for r in mine)
            bad = next((r for r in mine if not r.ok), None)
            if bad is not None:
                j.code = int(ErrorCode.TRANSFER_FAIL)
                log.warning("put key=%s length=%d: replica write failed (%s, code %d): %s", j.key, j.length,
                            bad.status.name, bad.code, bad.error or "not finished in time")
        clean = all(j.code == 0 for j in jobs)
        released = engine.free_batch(batch, wait_s=0.0 if clean else self.drain_wait_s)
        if not released:
            log.warning("put: batch %d still has %d slice(s) in flight after %.1fs; revoking anyway",
                        batch.id, batch.slices_in_flight, self.drain_wait_s)
        self._finish_puts(jobs)
        if not released and self._buffer is not None:
            self._buffer.quarantine(batch, [j.alloc for j in jobs if j.alloc is not None])
            for j in jobs:
                j.alloc = None
        return released

    def _finish_puts(self, jobs: list[_PutJob]) -> None:
        master = self._master
        assert master is not None
        ok: list[_PutJob] = []
        for j in jobs:
            if j.code == 0:
                try:
                    failpoint("client.put_end", key=j.key, checksum=j.checksum)
                    ok.append(j)
                except StoreError as exc:
                    j.code = _code(exc)
        if len(ok) == 1:
            try:
                master.put_end(self.client_id, ok[0].key, checksum=ok[0].checksum)
            except StoreError as exc:
                ok[0].code = _code(exc)
                log.warning("put key=%s: PutEnd failed: %s", ok[0].key, exc)
        elif ok:
            try:
                items = master.batch_put_end(self.client_id, [j.key for j in ok],
                                             checksums=[j.checksum for j in ok])
                for j, it in zip(ok, items, strict=True):
                    if not it.ok:
                        j.code = int(it.code)
                        log.warning("put key=%s: PutEnd failed: %s", j.key, it.message)
            except StoreError as exc:
                log.warning("batch PutEnd of %d key(s) failed: %s", len(ok), exc)
                for j in ok:
                    j.code = _code(exc)
        bad = [j for j in jobs if j.code and j.descs is not None]
        if not bad:
            return
        self._count("revokes", len(bad))
        try:
            if len(bad) == 1:
                master.put_revoke(self.client_id, bad[0].key)
            else:
                items = master.batch_put_revoke(self.client_id, [j.key for j in bad])
                for j, it in zip(bad, items, strict=True):
                    if not it.ok:
                        log.warning("put key=%s: PutRevoke failed: %s", j.key, it.message)
        except StoreError as exc:
            log.warning("PutRevoke of %s failed: %s", [j.key for j in bad][:4], exc)

    def _account_puts(self, op: str, jobs: list[_PutJob]) -> None:
        good = [j for j in jobs if j.code == 0]
        self._count(f"{op}_ok", len(good))
        if len(good) != len(jobs):
            self._count(f"{op}_failed", len(jobs) - len(good))
        self._count("bytes_written", sum(j.length for j in good if j.descs is not None))
        if len(jobs) == 1:
            j = jobs[0]
            self._note(OpRecord(op, j.key, j.code, j.length, j.descs[0].segment_name if j.descs else "",
                                0, j.retries))

    def _put_values(self, op: str, keys: Sequence[Any], values: Sequence[Any], config: Any,
                    overwrite: bool) -> list[int]:
        if len(keys) != len(values):
            raise StoreError(ErrorCode.INVALID_PARAMS, f"{op}: {len(keys)} keys but {len(values)} values")
        jobs = []
        try:
            for key, value in zip(keys, values, strict=True):
                j = _PutJob(key if isinstance(key, str) else "", 0)
                j.code = self._check_key(key)
                if j.code == 0:
                    self._stage(j, value)
                jobs.append(j)
            self._run_puts(jobs, config, overwrite)
        finally:
            self._release(jobs)
        self._account_puts(op, jobs)
        return [j.code for j in jobs]

    def _put_buffers(self, op: str, keys: Sequence[Any], ptrs: Sequence[Any], sizes: Sequence[Any],
                     config: Any, overwrite: bool) -> list[int]:
        if not len(keys) == len(ptrs) == len(sizes):
            raise StoreError(ErrorCode.INVALID_PARAMS,
                             f"{op}: {len(keys)} keys, {len(ptrs)} buffers, {len(sizes)} sizes")
        jobs = []
        for key, ptr, size in zip(keys, ptrs, sizes, strict=True):
            j = _PutJob(key if isinstance(key, str) else "", 0)
            j.code = self._check_key(key) or self._registered(ptr, size)
            if j.code == 0:
                j.src, j.length = ptr, size
            jobs.append(j)
        self._run_puts(jobs, config, overwrite)
        self._account_puts(op, jobs)
        return [j.code for j in jobs]

    def put(self, key: str, value: Any, config: Any = None) -> int:
        """Store ``value`` (bytes-like) under ``key``. 0 also when the key exists (its old value
        stays, as in Mooncake; use :meth:`upsert` to overwrite)."""
        return self._guard("put", _NOT_INITIALISED,
                           lambda: self._put_values("put", [key], [value], config, False)[0])

    def upsert(self, key: str, value: Any, config: Any = None) -> int:
        """Store ``value`` under ``key``, replacing an existing value."""
        return self._guard("upsert", _NOT_INITIALISED,
                           lambda: self._put_values("upsert", [key], [value], config, True)[0])

    def put_from(self, key: str, buffer_ptr: int, size: int, config: Any = None) -> int:
        """Zero-copy put from a buffer registered with :meth:`register_buffer`."""
        return self._guard("put_from", _NOT_INITIALISED,
                           lambda: self._put_buffers("put_from", [key], [buffer_ptr], [size], config,
                                                     False)[0])

    def upsert_from(self, key: str, buffer_ptr: int, size: int, config: Any = None) -> int:
        return self._guard("upsert_from", _NOT_INITIALISED,
                           lambda: self._put_buffers("upsert_from", [key], [buffer_ptr], [size], config,
                                                     True)[0])

    def put_batch(self, keys: Sequence[str], values: Sequence[Any], config: Any = None) -> int:
        """Store several values in one PutStart/transfer/PutEnd round; 0 or the first error code."""
        def run() -> int:
            codes = self._put_values("put_batch", keys, values, config, False)
            return next((c for c in codes if c), OK)
        return self._guard("put_batch", _NOT_INITIALISED, run)

    def upsert_batch(self, keys: Sequence[str], values: Sequence[Any], config: Any = None) -> int:
        def run() -> int:
            codes = self._put_values("upsert_batch", keys, values, config, True)
            return next((c for c in codes if c), OK)
        return self._guard("upsert_batch", _NOT_INITIALISED, run)

    def batch_put_from(self, keys: Sequence[str], buffer_ptrs: Sequence[int], sizes: Sequence[int],
                       config: Any = None) -> list[int]:
        """Zero-copy batch put; one code per key."""
        def run() -> list[int]:
            return self._put_buffers("batch_put_from", keys, buffer_ptrs, sizes, config, False)
        return self._guard_list("batch_put_from", len(keys), run)

    def batch_upsert_from(self, keys: Sequence[str], buffer_ptrs: Sequence[int], sizes: Sequence[int],
                          config: Any = None) -> list[int]:
        def run() -> list[int]:
            return self._put_buffers("batch_upsert_from", keys, buffer_ptrs, sizes, config, True)
        return self._guard_list("batch_upsert_from", len(keys), run)

    def _guard_list(self, op: str, n: int, fn: Callable[[], list[int]]) -> list[int]:
        """Like :meth:`_guard` for calls answering one code per key."""
        if not self._ready:
            log.error("%s: client is not set up", op)
            return [_NOT_INITIALISED] * n
        try:
            return fn()
        except StoreError as exc:
            log.warning("%s failed: %s", op, exc)
            return [_code(exc)] * n
        except Exception:
            log.exception("%s failed unexpectedly", op)
            return [int(ErrorCode.INTERNAL_ERROR)] * n

    # ================================================================== gets

    def _replica_lists(self, jobs: list[_GetJob]) -> None:
        """GetReplicaList (grants the lease); the deadline is taken from the time *before* the RPC."""
        master = self._master
        assert master is not None
        todo = []
        for j in jobs:
            try:
                failpoint("client.get_replica_list", key=j.key, client_id=self.client_id)
                todo.append(j)
            except StoreError as exc:
                j.code = _code(exc)
        if not todo:
            return
        start = time.monotonic()
        if len(todo) == 1:
            try:
                todo[0].rl = master.get_replica_list(todo[0].key)
            except StoreError as exc:
                todo[0].code = _code(exc)
        else:
            try:
                items = master.batch_get_replica_list([j.key for j in todo])
            except StoreError as exc:
                for j in todo:
                    j.code = _code(exc)
                return
            for j, it in zip(todo, items, strict=True):
                if it.ok:
                    j.rl = it.value
                else:
                    j.code = int(it.code)
        own = self._engine.segment_name if self._engine is not None else ""
        for j in todo:
            rl = j.rl
            if rl is None:
                continue
            j.size = rl.size
            if rl.lease_granted and rl.lease_ttl_ms > 0:
                # No lease (legacy GC) or a 0-ms one protects nothing, so there is no deadline to
                # enforce; the checksum still guards those reads.
                j.deadline = start + rl.lease_ttl_ms / 1000.0
            complete = [d for d in rl.replicas if d.status is ReplicaStatus.COMPLETE]
            j.candidates = [d for d in complete if d.segment_name == own] + \
                           [d for d in complete if d.segment_name != own]
            if not j.candidates:
                j.code = int(ErrorCode.REPLICA_IS_NOT_READY)

    def _run_gets(self, jobs: list[_GetJob], want_bytes: bool = False) -> None:
        self._replica_lists([j for j in jobs if j.code == 0])
        for j in jobs:
            if j.code:
                continue
            if j.user_addr:
                if j.user_size < j.size:
                    log.warning("get_into key=%s: buffer of %d bytes is smaller than the %d-byte value",
                                j.key, j.user_size, j.size)
                    j.code = int(ErrorCode.INVALID_PARAMS)
                    continue
                j.dst = j.user_addr
            else:
                alloc = self._buffer.allocate(j.size) if self._buffer is not None else None
                if alloc is None:
                    log.warning("get key=%s: failed to allocate %d bytes in the local buffer", j.key, j.size)
                    j.code = int(ErrorCode.INVALID_PARAMS)
                    continue
                assert self._buffer is not None
                j.alloc = alloc
                j.dst = self._buffer.address(alloc)
        pending = [j for j in jobs if j.code == 0]
        if want_bytes and len(pending) == 1 and pending[0].size >= STREAM_MIN:
            j = pending[0]
            j.out, addr = new_bytes(j.size)
            if self._borrow(addr, j.size):
                j.borrowed = j.dst = addr  # read straight into the bytes returned
            else:
                j.out_addr = addr  # copied out part by part as the read progresses
        while pending:
            self._read_round(pending)
            pending = [j for j in pending if not j.done and j.code == 0]

    def _read_round(self, jobs: list[_GetJob]) -> None:
        """Read each job from its next candidate replica; check lease and checksum; on a failed
        transfer or a checksum mismatch move on to the replica after (next round)."""
        engine = self._engine
        assert engine is not None
        if len(jobs) == 1 and jobs[0].size >= STREAM_MIN:
            moved, batches = self._transfer_streamed(jobs[0])
        else:
            moved, batches = self._transfer_batch(jobs)
        now = time.monotonic()
        failed: list[_GetJob] = []
        for j, ok in zip(jobs, moved, strict=True):
            if not ok:
                failed.append(j)
                continue
            if j.deadline is not None and now > j.deadline:
                j.code = int(ErrorCode.LEASE_EXPIRED)
                self._count("lease_expired")
                log.warning("get key=%s: read from %s ended %.3fs after the lease deadline; bytes discarded",
                            j.key, j.replica, now - j.deadline)
                continue
            if not self._verify(j):
                failed.append(j)
                continue
            j.done = True
        wait_s = 0.0 if not failed else self.drain_wait_s
        released = True
        for b in batches:
            released = engine.free_batch(b, wait_s=wait_s) and released
        clean: set[int] = set()  # jobs whose local-buffer range this round never touched
        for j in jobs:
            if j.borrowed and (j.done or j.code or j in failed):
                self._give_back(j.borrowed, j.out, batches, released)
                j.borrowed = 0
                clean.add(id(j))
                if not j.done:
                    j.out = None
                    if j.alloc is not None and self._buffer is not None and j in failed:
                        # any next replica is read through the local buffer, copied out as it lands
                        j.dst = self._buffer.address(j.alloc)
                        j.out, j.out_addr = new_bytes(j.size)
        for j in failed:
            touched = not released and id(j) not in clean and j.alloc is not None and self._buffer is not None
            if j.next < len(j.candidates):
                j.failovers += 1
                self._count("failovers")
                if touched:
                    assert self._buffer is not None and j.alloc is not None
                    # Slices of the abandoned read may still land: read the next replica elsewhere.
                    self._buffer.quarantine(batches, [j.alloc])
                    j.alloc = self._buffer.allocate(j.size)
                    if j.alloc is None:
                        j.code = int(ErrorCode.INVALID_PARAMS)
                        continue
                    j.dst = self._buffer.address(j.alloc)
            else:
                j.code = j.last_error
                if touched:
                    assert self._buffer is not None and j.alloc is not None
                    self._buffer.quarantine(batches, [j.alloc])
                    j.alloc = None

    def _next_replica(self, j: _GetJob) -> ReplicaDescriptor | None:
        """Take the job's next candidate; None (and ``last_error`` set) when the read is refused."""
        d = j.candidates[j.next]
        j.next += 1
        j.replica = d.segment_name
        try:
            failpoint("client.read_replica", key=j.key, replica=j.next - 1, segment=d.segment_name,
                      address=d.address, length=j.size)
            if d.length != j.size:
                raise StoreError(ErrorCode.INVALID_REPLICA,
                                 f"replica of {d.length} bytes for a {j.size}-byte object")
        except StoreError as exc:
            j.last_error = _code(exc)
            log.warning("get key=%s: read of replica on %s refused: %s", j.key, d.segment_name, exc)
            return None
        return d

    def _transfer_batch(self, jobs: list[_GetJob]) -> tuple[list[bool], list[Batch]]:
        """Every job's read in one engine batch; which jobs got all their bytes."""
        engine = self._engine
        assert engine is not None
        batch = engine.allocate_batch(max(1, sum(self._chunks(j.size) for j in jobs)))
        reqs: list[TransferRequest] = []
        for j in jobs:
            j.first = len(reqs)
            d = self._next_replica(j)
            if d is not None:
                reqs.extend(self._requests(Opcode.READ, j.dst, d, j.size))
            j.nreq = len(reqs) - j.first
        submitted = False
        if reqs:
            try:
                engine.submit(batch, reqs)
                submitted = True
            except StoreError as exc:
                log.warning("get of %d key(s): submit failed: %s", len(jobs), exc)
                for j in jobs:
                    j.nreq = 0
                    j.last_error = int(ErrorCode.TRANSFER_FAIL)
        results = engine.wait(batch, self.transfer_timeout_s) if submitted else []
        moved = []
        for j in jobs:
            mine = results[j.first:j.first + j.nreq] if j.nreq else []
            j.retries += sum(r.retries for r in mine)
            bad = next((r for r in mine if not r.ok), None) if mine else None
            if bad is not None:
                j.last_error = int(ErrorCode.TRANSFER_FAIL)
                log.warning("get key=%s: read from %s failed (%s, code %d): %s", j.key, j.replica,
                            bad.status.name, bad.code, bad.error or "not finished in time")
            moved.append(bool(mine) and bad is None)
        return moved, [batch]

    def _transfer_streamed(self, j: _GetJob) -> tuple[list[bool], list[Batch]]:
        """One large value in parts, one batch each, all posted at once; as each part lands it is
        hashed and copied out while the later parts are still on the wire."""
        engine = self._engine
        assert engine is not None
        d = self._next_replica(j)
        if d is None:
            return [False], []
        seg = self._segment_of(d)
        parts = parts_of(j.size)
        batches: list[Batch] = []
        ok = True
        try:
            for off, n in parts:
                b = engine.allocate_batch(1)
                batches.append(b)
                engine.submit(b, [TransferRequest(Opcode.READ, j.dst + off, seg, d.address + off, n)])
        except StoreError as exc:
            log.warning("get key=%s: submit of a part failed: %s", j.key, exc)
            j.last_error = int(ErrorCode.TRANSFER_FAIL)
            ok = False
        expected = j.rl.checksum if j.rl is not None else None
        stream = Checksum() if expected is not None else None
        deadline = time.monotonic() + self.transfer_timeout_s
        for (off, n), b in zip(parts, batches, strict=False):
            if not ok:
                break
            (res,) = engine.wait(b, max(0.0, deadline - time.monotonic()))
            j.retries += res.retries
            if not res.ok:
                ok = False
                j.last_error = int(ErrorCode.TRANSFER_FAIL)
                log.warning("get key=%s: read of part [%d, +%d) from %s failed (%s, code %d): %s", j.key,
                            off, n, j.replica, res.status.name, res.code, res.error or "not finished in time")
                break
            if stream is not None:
                stream.update(view_at(j.dst + off, n, writable=False))
            if j.out_addr:
                ctypes.memmove(j.out_addr + off, j.dst + off, n)
        if not ok:
            for b in batches:
                engine.cancel(b)
        j.digest = stream.digest() if ok and stream is not None else None
        return [ok], batches

    def _verify(self, j: _GetJob) -> bool:
        """Check the bytes against the checksum recorded at PutEnd (when one was)."""
        expected = j.rl.checksum if j.rl is not None else None
        try:
            failpoint("client.verify_checksum", key=j.key, replica=j.replica, expected=expected)
        except StoreError as exc:
            j.last_error = _code(exc)
            self._count("checksum_mismatches")
            return False
        if expected is None:
            return True
        got = j.digest if j.digest is not None else digest(j.dst, j.size)
        j.digest = None
        if got != expected:
            j.last_error = int(ErrorCode.CHECKSUM_MISMATCH)
            self._count("checksum_mismatches")
            log.error("get key=%s: checksum %016x of the replica on %s != recorded %016x (%d bytes)", j.key,
                      got, j.replica, expected, j.size)
            return False
        return True

    def _account_gets(self, op: str, jobs: list[_GetJob]) -> None:
        good = [j for j in jobs if j.code == 0]
        missing = sum(1 for j in jobs if j.code == int(ErrorCode.OBJECT_NOT_FOUND))
        self._count(f"{op}_ok", len(good))
        if missing:
            self._count(f"{op}_miss", missing)
        if len(good) + missing != len(jobs):
            self._count(f"{op}_failed", len(jobs) - len(good) - missing)
        self._count("bytes_read", sum(j.size for j in good))
        if len(jobs) == 1:
            j = jobs[0]
            self._note(OpRecord(op, j.key, j.code, j.size, j.replica, j.failovers, j.retries))

    def _get_values(self, op: str, keys: Sequence[Any]) -> tuple[list[_GetJob], list[bytes]]:
        jobs = []
        for key in keys:
            j = _GetJob(key if isinstance(key, str) else "")
            j.code = self._check_key(key)
            jobs.append(j)
        out: list[bytes] = []
        try:
            self._run_gets(jobs, want_bytes=True)
            out = [self._copy_out(j) if j.code == 0 else b"" for j in jobs]
        finally:
            self._release(jobs)
        self._account_gets(op, jobs)
        return jobs, out

    @staticmethod
    def _copy_out(j: _GetJob) -> bytes:
        if j.out is not None:  # filled part by part during a streamed read
            out, j.out = j.out, None
            return out
        if j.size < 65536:
            return bytes(view_at(j.dst, j.size, writable=False))
        out, addr = new_bytes(j.size)
        ctypes.memmove(addr, j.dst, j.size)
        return out

    def _get_buffers(self, op: str, keys: Sequence[Any], ptrs: Sequence[Any],
                     sizes: Sequence[Any]) -> list[int]:
        if not len(keys) == len(ptrs) == len(sizes):
            raise StoreError(ErrorCode.INVALID_PARAMS,
                             f"{op}: {len(keys)} keys, {len(ptrs)} buffers, {len(sizes)} sizes")
        jobs = []
        for key, ptr, size in zip(keys, ptrs, sizes, strict=True):
            j = _GetJob(key if isinstance(key, str) else "", ptr if isinstance(ptr, int) else 0,
                        size if isinstance(size, int) else 0)
            j.code = self._check_key(key) or self._registered(ptr, size)
            jobs.append(j)
        self._run_gets(jobs)
        self._account_gets(op, jobs)
        return [j.size if j.code == 0 else j.code for j in jobs]

    def get(self, key: str) -> bytes:
        """The value, or ``b""`` when the key is missing or the read failed (Mooncake's
        convention; :meth:`last_op` tells which code it was)."""
        return self._guard("get", b"", lambda: self._get_values("get", [key])[1][0])

    def get_batch(self, keys: Sequence[str]) -> list[bytes]:
        """Values in key order; ``b""`` for each miss or failure."""
        if not self._ready:
            log.error("get_batch: client is not set up")
            return [b""] * len(keys)
        return self._guard("get_batch", [b""] * len(keys), lambda: self._get_values("get_batch", keys)[1])

    def get_into(self, key: str, buffer_ptr: int, size: int) -> int:
        """Read into a registered buffer; the byte count, or a negative code (INVALID_PARAMS when
        the buffer is too small, OBJECT_NOT_FOUND, TRANSFER_FAIL, LEASE_EXPIRED, CHECKSUM_MISMATCH)."""
        return self._guard("get_into", _NOT_INITIALISED,
                           lambda: self._get_buffers("get_into", [key], [buffer_ptr], [size])[0])

    def batch_get_into(self, keys: Sequence[str], buffer_ptrs: Sequence[int],
                       sizes: Sequence[int]) -> list[int]:
        return self._guard_list("batch_get_into", len(keys),
                                lambda: self._get_buffers("batch_get_into", keys, buffer_ptrs, sizes))

    # ================================================================== metadata

    def is_exist(self, key: str) -> int:
        """1 present, 0 absent (or still being written), −1 on error. Grants the read lease."""
        def run() -> int:
            if self._check_key(key):
                return -1
            assert self._master is not None
            try:
                return 1 if self._master.exist_key(key) else 0
            except StoreError as exc:
                if exc.code is ErrorCode.REPLICA_IS_NOT_READY:
                    return 0
                log.warning("is_exist key=%s: %s", key, exc)
                return -1
        return self._guard("is_exist", -1, run)

    def batch_is_exist(self, keys: Sequence[str]) -> list[int]:
        def run() -> list[int]:
            assert self._master is not None
            ok = [self._check_key(k) == 0 for k in keys]
            good = [k for k, v in zip(keys, ok, strict=True) if v]
            items = iter(self._master.batch_exist_key(good) if good else [])
            out = []
            for valid in ok:
                if not valid:
                    out.append(-1)
                    continue
                it = next(items)
                if it.ok:
                    out.append(1 if it.value else 0)
                else:
                    out.append(0 if it.code is ErrorCode.REPLICA_IS_NOT_READY else -1)
            return out
        if not self._ready:
            return [-1] * len(keys)
        try:
            return run()
        except StoreError as exc:
            log.warning("batch_is_exist failed: %s", exc)
            return [-1] * len(keys)

    def get_size(self, key: str) -> int:
        """The value's size, or a negative code (OBJECT_NOT_FOUND). Grants the read lease."""
        def run() -> int:
            code = self._check_key(key)
            if code:
                return code
            assert self._master is not None
            return self._master.get_replica_list(key).size
        return self._guard("get_size", _NOT_INITIALISED, run)

    def get_replica_desc(self, key: str) -> list[dict[str, Any]]:
        """The key's replica descriptors, without granting a lease ([] when absent)."""
        def run() -> list[dict[str, Any]]:
            assert self._master is not None
            info = self._master.query_key(key)
            return list(info["replicas"]) if info else []
        return self._guard("get_replica_desc", [], run)

    def remove(self, key: str, force: bool = False) -> int:
        """0, or OBJECT_NOT_FOUND / OBJECT_HAS_LEASE (unless ``force``) / REPLICA_IS_NOT_READY."""
        def run() -> int:
            code = self._check_key(key)
            if code:
                return code
            assert self._master is not None
            self._master.remove(key, force=force)
            self._count("removes")
            return OK
        return self._guard("remove", _NOT_INITIALISED, run)

    def remove_all(self, force: bool = False) -> int:
        """Remove every object whose lease expired (every object with ``force``); the count."""
        def run() -> int:
            assert self._master is not None
            return self._master.remove_all(force=force)
        return self._guard("remove_all", _NOT_INITIALISED, run)

    # ================================================================== registered buffers

    def register_buffer(self, buffer_ptr: int, size: int) -> int:
        """Register caller memory for :meth:`put_from` / :meth:`get_into` (never exposed to peers)."""
        def run() -> int:
            if isinstance(buffer_ptr, bool) or not isinstance(buffer_ptr, int) or isinstance(size, bool) \
                    or not isinstance(size, int) or buffer_ptr <= 0 or size <= 0:
                return int(ErrorCode.INVALID_PARAMS)
            assert self._engine is not None
            self._engine.register_memory(buffer_ptr, size, remote=False, location="cpu:user")
            return OK
        return self._guard("register_buffer", _NOT_INITIALISED, run)

    def unregister_buffer(self, buffer_ptr: int) -> int:
        """Unregister memory registered with :meth:`register_buffer` (waits for transfers using it)."""
        def run() -> int:
            if not isinstance(buffer_ptr, int) or isinstance(buffer_ptr, bool):
                return int(ErrorCode.INVALID_PARAMS)
            assert self._engine is not None
            entry = self._engine.memory.find(buffer_ptr, 0)
            if entry is None or entry.addr != buffer_ptr or entry.location != "cpu:user":
                log.warning("unregister_buffer: no buffer registered at %#x", buffer_ptr)
                return int(ErrorCode.INVALID_PARAMS)
            self._engine.unregister_memory(buffer_ptr)
            return OK
        return self._guard("unregister_buffer", _NOT_INITIALISED, run)

    # ================================================================== introspection

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def engine(self) -> TransferEngine | None:
        """The transfer engine (for fault injectors: connections, in-flight slices)."""
        return self._engine

    @property
    def master(self) -> MasterClient | None:
        return self._master

    def counters(self) -> dict[str, int]:
        """Monotonic counters: ``<op>_ok`` / ``_failed`` / ``_miss``, ``failovers``, ``lease_expired``,
        ``checksum_mismatches``, ``revokes``, ``remounts``, ``put_kept_existing``, ``zero_copy``
        (large bytes values moved without the staging copy), bytes moved."""
        with self._count_lock:
            out = {k: 0 for k in ("put_ok", "put_failed", "get_ok", "get_miss", "get_failed", "failovers",
                                  "lease_expired", "checksum_mismatches", "revokes", "remounts",
                                  "zero_copy", "bytes_written", "bytes_read")}
            out.update(self._counters)
        return out

    def segments(self) -> list[dict[str, Any]]:
        """The segments this client mounted (id, name, base, size, endpoint)."""
        return [{"id": s.id, "name": s.name, "base": s.base, "size": s.size, "protocol": s.protocol,
                 "te_endpoint": s.te_endpoint} for s in self._segments]

    def local_buffer_report(self) -> dict[str, Any]:
        return self._buffer.report() if self._buffer is not None else {}

    def last_op(self) -> OpRecord | None:
        """What this thread's last single-key operation did (code, replica, failovers, retries)."""
        return getattr(self._tls, "last", None)

    def stats(self) -> dict[str, Any]:
        """Everything above in one JSON-friendly dict."""
        hb = self._heartbeat
        return {
            "client_id": self.client_id, "ready": self._ready, "hostname": self.get_hostname(),
            "endpoint": self._engine.endpoint if self._engine is not None else "",
            "segments": self.segments(), "local_buffer": self.local_buffer_report(),
            "counters": self.counters(),
            "heartbeat": None if hb is None else {
                "pings": hb.pings, "failures": hb.failures, "remounts": hb.remounts,
                "last_status": str(hb.last_status) if hb.last_status else None},
        }

    def __repr__(self) -> str:
        state = "ready" if self._ready else "not set up"
        return f"Client({self.get_hostname() or '-'}, id={self.client_id or '-'}, {state})"


MooncakeDistributedStore = Client

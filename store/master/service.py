"""The master as a state machine: objects, leases, eviction, GC and client liveness.

No threads and no sockets here, and no reading of wall time: every method takes the time from the
injected clock, and the periodic work (eviction every 10 ms, GC, the 1-s client monitor) is done by
``run_eviction`` / ``run_gc`` / ``run_client_monitor``, which the server calls from its loops and a
test calls by hand after moving a :class:`~store.master.clock.ManualClock`.

One lock guards the whole state, so every RPC is atomic (Mooncake locks one of 1024 shards; under
the GIL a single lock costs less and gives a stronger guarantee). Failpoints fire *outside* the
lock, so a ``pause`` at ``master.put_end`` holds one caller and nobody else.

RPC semantics and error codes follow Mooncake (see ``research/mooncake.md`` §1); where Umbra
differs it says so at the method:

- PutEnd / PutRevoke from a client other than the writer → ILLEGAL_CLIENT.
- UnmountSegment of an unknown segment id → SEGMENT_NOT_FOUND (Mooncake answers OK).
- A put whose writer's client expires is reclaimed at expiry (Mooncake HEAD: 30 s / 600 s timers,
  which Umbra keeps only for writers it never heard from).
- Segments of one name may not overlap (INVALID_PARAMS): two keys can never share bytes.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import threading
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from store.allocator import make_allocator, make_strategy
from store.allocator.base import Allocation, AllocatorError
from store.errors import ErrorCode, StoreError
from store.failpoints import failpoint
from store.master.clock import Clock, monotonic
from store.master.config import MasterConfig
from store.master.events import EventLog
from store.master.eviction import (
    eviction_targets,
    select_by_bytes,
    select_by_count,
    select_by_count_sharded,
    should_evict,
)
from store.master.gc import LegacyGC, OnDemandReclaimer
from store.master.liveness import ClientRegistry
from store.master.objects import NEVER, NUM_SHARDS, ObjectMeta, Replica, ShardMap
from store.master.segments import MountedSegment, SegmentTable
from store.master.types import (
    MAX_SLICE_SIZE,
    BatchItem,
    ClientStatus,
    PingResult,
    ReplicaDescriptor,
    ReplicaList,
    ReplicaStatus,
    ReplicateConfig,
    Segment,
    check_checksum,
    check_id,
    check_int,
    check_key,
)

log = logging.getLogger("store.master")

T = TypeVar("T")

RPC_NAMES = (
    "put_start", "put_end", "put_revoke", "get_replica_list", "exist_key", "remove", "remove_all",
    "mount_segment", "remount_segment", "unmount_segment", "ping",
    "batch_put_start", "batch_put_end", "batch_put_revoke", "batch_get_replica_list", "batch_exist_key",
)
BATCH_RPCS = tuple(n for n in RPC_NAMES if n.startswith("batch_"))
FAILPOINTS = (*(f"master.{n}" for n in RPC_NAMES), "master.evict", "master.gc_remove", "master.client_expire",
              "master.rpc.recv", "master.rpc.send")
"""Every failpoint the master reaches (the last two only in the server process)."""
VALUE_SIZE_BUCKETS = (4096, 65536, 262144, 1 << 20, 4 << 20, 16 << 20, 64 << 20)


@dataclass
class Discarded:
    """Replicas of a preempted zombie put: the old writer may still be writing into them, so they
    stay allocated until ``release_at`` (Mooncake HEAD ``discarded_replicas_``)."""

    key: str
    client_id: str
    replicas: list[Replica]
    release_at: float


@dataclass
class EvictionReport:
    used_ratio: float
    target: float
    lowerbound: float
    evicted_keys: list[str] = field(default_factory=list)
    first_pass: int = 0
    freed_bytes: int = 0  # Mooncake's figure: value size × replica count


_RPC_NAMES: dict[str, tuple[str, str, str]] = {}


def _rpc_names(name: str) -> tuple[str, str, str]:
    """``(requests counter, failures counter, failpoint)`` of an RPC, formatted once per name."""
    names = _RPC_NAMES.get(name)
    if names is None:
        names = _RPC_NAMES[name] = (f"{name}_requests", f"{name}_failures", f"master.{name}")
    return names


class MasterService:
    """Pure master state machine; see the module docstring."""

    def __init__(self, config: MasterConfig | None = None, clock: Clock | None = None) -> None:
        self.config = config or MasterConfig()
        self._clock = clock or monotonic
        self.seed = self.config.seed if self.config.seed is not None else int.from_bytes(os.urandom(4), "big")
        self._rng = random.Random(self.seed)
        self._strategy = make_strategy(self.config.allocation_strategy, self.seed)
        self._lock = threading.RLock()
        self.shards = ShardMap()
        self.segments = SegmentTable()
        self.clients = ClientRegistry(self.config.client_ttl)
        self.events = EventLog()
        self._processing: dict[str, ObjectMeta] = {}
        self._discarded: list[Discarded] = []
        self._need_eviction = False
        self._allocated = 0  # requested bytes of live replicas on mounted segments (Mooncake's gauge)
        self._legacy_gc = LegacyGC(self.config.gc_delay, self.config.gc_queue_size)
        self._reclaimer = OnDemandReclaimer(self.config.gc_queue_size)
        self._counters: defaultdict[str, int] = defaultdict(int)
        self._value_sizes = [0] * (len(VALUE_SIZE_BUCKETS) + 1)
        self._value_size_sum = 0
        self.view_version = self.config.view_version if self.config.view_version is not None else 1
        log.info("master state machine ready seed=%d allocator=%s strategy=%s gc_mode=%s eviction_by=%s "
                 "lease_ttl=%.3fs client_ttl=%.3fs", self.seed, self.config.memory_allocator,
                 self.config.allocation_strategy, self.config.gc_mode, self.config.eviction_by,
                 self.config.default_kv_lease_ttl, self.config.client_ttl)

    # ------------------------------------------------------------------ plumbing

    def now(self) -> float:
        return self._clock()

    def _rpc(self, name: str, ids: dict[str, Any], fn: Callable[..., T], *args: Any) -> T:
        requests, failures, point = _rpc_names(name)
        with self._lock:
            self._counters[requests] += 1
        try:
            failpoint(point, **ids)
            with self._lock:
                return fn(*args)
        except StoreError as exc:
            with self._lock:
                self._counters[failures] += 1
            log.debug("rpc=%s failed ids=%s: %s", name, ids, exc)
            raise

    def _batch(self, name: str, item: str, keys: Any, fn: Callable[[int, str], Any],
               precheck: Callable[[], None] | None = None) -> list[BatchItem]:
        with self._lock:
            self._counters[f"{name}_requests"] += 1
        try:
            if not isinstance(keys, list | tuple):
                raise StoreError(ErrorCode.INVALID_PARAMS, f"{name}: keys must be a list")
            failpoint(f"master.{name}", count=len(keys))
            if precheck is not None:
                precheck()
        except StoreError:
            with self._lock:
                self._counters[f"{name}_failures"] += 1
            raise
        items: list[BatchItem] = []
        for i, key in enumerate(keys):
            try:
                failpoint(f"master.{item}", key=key, batch=name)
                with self._lock:
                    items.append(BatchItem(ErrorCode.OK, fn(i, key)))
            except StoreError as exc:
                items.append(BatchItem(exc.code, None, exc.message))
        failed = sum(1 for it in items if not it.ok)
        with self._lock:
            self._counters[f"{name}_items"] += len(items)
            self._counters[f"{name}_failed_items"] += failed
            if items and failed == len(items):
                self._counters[f"{name}_failures"] += 1
            elif failed:
                self._counters[f"{name}_partial_successes"] += 1
        return items

    def _key(self, key: Any) -> str:
        return check_key(key, self.config.max_key_bytes)

    def _require(self, key: str) -> ObjectMeta:
        obj = self.shards.get(key)
        if obj is None:
            raise StoreError(ErrorCode.OBJECT_NOT_FOUND, f"key={key!r} not found")
        return obj

    def _used_ratio(self) -> float:
        cap = self.segments.capacity
        if cap <= 0:
            return 0.0
        used = self.segments.reserved if self.config.eviction_by == "bytes" else self._allocated
        return used / cap

    # ------------------------------------------------------------------ allocation bookkeeping

    def _allocate(self, key: str, length: int,
                  cfg: ReplicateConfig) -> list[tuple[MountedSegment, Allocation]]:
        targets = self.segments.targets()
        if not targets:
            self._counters["put_start_alloc_failures"] += 1
            raise StoreError(ErrorCode.NO_AVAILABLE_HANDLE, f"key={key!r}: no segment is mounted")
        if length > max(t.size for t in targets):
            # Larger than every segment: eviction cannot help, so need_eviction stays as it is.
            self._counters["put_start_alloc_failures"] += 1
            raise StoreError(ErrorCode.NO_AVAILABLE_HANDLE,
                             f"key={key!r}: {length} bytes exceed every mounted segment")
        try:
            placed = self._strategy.place(targets, length, cfg.replica_num, cfg.preferred_segments)
        except AllocatorError as exc:
            raise StoreError(ErrorCode.INVALID_PARAMS, f"key={key!r} length={length}: {exc}") from exc
        if not placed:
            self._need_eviction = True
            self._counters["put_start_alloc_failures"] += 1
            raise StoreError(ErrorCode.NO_AVAILABLE_HANDLE,
                             f"key={key!r}: no segment has {length} contiguous free bytes "
                             f"(replicas={cfg.replica_num}, segments={len(targets)})")
        if len(placed) < cfg.replica_num:
            self._counters["put_start_partial_allocations"] += 1
        return placed  # type: ignore[return-value]

    def _free_replica(self, rep: Replica, now: float, reason: str) -> None:
        seg = rep.segment
        seg.replicas.discard(rep)
        if not seg.mounted:
            return  # the allocator went with the segment (Mooncake: the weak_ptr has expired)
        seg.allocator.free(rep.allocation)
        seg.requested_bytes -= rep.length
        self._allocated -= rep.length
        self.events.emit(now, "free", key=rep.key, segment_id=seg.id, offset=rep.allocation.offset,
                         size=rep.allocation.size, length=rep.length, reason=reason)

    def _erase(self, obj: ObjectMeta, now: float, reason: str) -> None:
        if self.shards.get(obj.key) is obj:
            self.shards.pop(obj.key)
        if self._processing.get(obj.key) is obj:
            del self._processing[obj.key]
        for rep in obj.replicas:
            self._free_replica(rep, now, reason)
        obj.replicas = []
        self._reclaimer.forget(obj.key)
        self.events.emit(now, reason, key=obj.key, size=obj.size, client_id=obj.client_id)

    def _discard(self, obj: ObjectMeta, now: float) -> None:
        self.shards.pop(obj.key)
        self._processing.pop(obj.key, None)
        for rep in obj.replicas:
            rep.discarded = True
        self._discarded.append(Discarded(obj.key, obj.client_id, obj.replicas,
                                         obj.put_start_time + self.config.put_start_release_timeout))
        self._counters["put_start_discards"] += 1
        self.events.emit(now, "discard", key=obj.key, client_id=obj.client_id,
                         release_at=obj.put_start_time + self.config.put_start_release_timeout)
        log.info("key=%s client_id=%s action=discard_stale_processing_put put_start_time=%.3f",
                 obj.key, obj.client_id, obj.put_start_time)

    def _release_discarded(self, now: float, client_id: str | None = None) -> int:
        keep, released = [], 0
        for d in self._discarded:
            if d.release_at <= now or (client_id is not None and d.client_id == client_id):
                for rep in d.replicas:
                    self._free_replica(rep, now, "discard_release")
                released += 1
            else:
                keep.append(d)
        self._discarded = keep
        self._counters["put_start_releases"] += released
        return released

    def _writer_alive(self, obj: ObjectMeta) -> bool:
        return self.clients.is_known(obj.client_id)

    # ------------------------------------------------------------------ puts

    def put_start(self, client_id: str, key: str, length: int,
                  config: ReplicateConfig | dict[str, Any] | None = None) -> list[ReplicaDescriptor]:
        """Allocate ``replica_num`` ranges (best effort, distinct segments) and record PROCESSING."""
        return self._rpc("put_start", {"key": key, "client_id": client_id}, self._put_start,
                         client_id, key, length, config)

    def _put_start(self, client_id: Any, key: Any, length: Any, config: Any) -> list[ReplicaDescriptor]:
        check_id("client_id", client_id)
        key = self._key(key)
        check_int("length", length, minimum=1)
        cfg = ReplicateConfig.from_wire(config)
        if cfg.replica_num < 1:
            raise StoreError(ErrorCode.INVALID_PARAMS, f"key={key!r}: replica_num must be >= 1")
        if self.config.memory_allocator == "cachelib" and length > MAX_SLICE_SIZE:
            raise StoreError(ErrorCode.INVALID_PARAMS,
                             f"key={key!r}: {length} bytes exceed the cachelib limit of {MAX_SLICE_SIZE}")
        now = self._clock()
        existing = self.shards.get(key)
        if existing is not None:
            timeout = self.config.put_start_discard_timeout
            if (existing.is_processing() and timeout > 0 and now - existing.put_start_time >= timeout
                    and not self._writer_alive(existing)):
                self._discard(existing, now)
            else:
                raise StoreError(ErrorCode.OBJECT_ALREADY_EXISTS, f"key={key!r} already exists")
        placed = self._allocate(key, length, cfg)
        replicas = [Replica(seg, alloc, length, key) for seg, alloc in placed]
        obj = ObjectMeta(key, length, replicas, client_id, now, with_soft_pin=cfg.with_soft_pin)
        self.shards.put(obj)
        self._processing[key] = obj
        for rep in replicas:
            seg = rep.segment
            seg.replicas.add(rep)
            seg.requested_bytes += length
            self._allocated += length
            self.events.emit(now, "alloc", key=key, segment_id=seg.id, offset=rep.allocation.offset,
                             size=rep.allocation.size, length=length)
        self._observe_value_size(length)
        self.events.emit(now, "put_start", key=key, size=length, client_id=client_id,
                         replicas=len(replicas))
        return [rep.descriptor() for rep in replicas]

    def _observe_value_size(self, length: int) -> None:
        for i, bound in enumerate(VALUE_SIZE_BUCKETS):
            if length <= bound:
                self._value_sizes[i] += 1
                break
        else:
            self._value_sizes[-1] += 1
        self._value_size_sum += length

    def put_end(self, client_id: str, key: str, checksum: int | None = None) -> None:
        """PROCESSING → COMPLETE; grants a 0-ms lease (evictable at once) and starts the soft pin.
        ``checksum`` (Umbra) is the writer's XXH64 of the value, handed to every reader."""
        self._rpc("put_end", {"key": key, "client_id": client_id}, self._put_end, client_id, key, checksum)

    def _put_end(self, client_id: Any, key: Any, checksum: Any = None) -> None:
        check_id("client_id", client_id)
        checksum = check_checksum(checksum)
        obj = self._require(self._key(key))
        if obj.client_id != client_id:
            raise StoreError(ErrorCode.ILLEGAL_CLIENT,
                             f"key={key!r} was started by client {obj.client_id}, not {client_id}")
        if not obj.is_processing():
            raise StoreError(ErrorCode.INVALID_WRITE, f"key={key!r} is not being written")
        now = self._clock()
        for rep in obj.replicas:
            rep.status = ReplicaStatus.COMPLETE
        obj.checksum = checksum
        self._processing.pop(obj.key, None)
        obj.lease_deadline = max(obj.lease_deadline, now)
        if obj.with_soft_pin:
            obj.soft_pin_deadline = now + self.config.default_kv_soft_pin_ttl
        self.events.emit(now, "put_end", key=obj.key, client_id=client_id)

    def put_revoke(self, client_id: str, key: str) -> None:
        """Erase a put in progress (any replica already COMPLETE → INVALID_WRITE)."""
        self._rpc("put_revoke", {"key": key, "client_id": client_id}, self._put_revoke, client_id, key)

    def _put_revoke(self, client_id: Any, key: Any) -> None:
        check_id("client_id", client_id)
        obj = self._require(self._key(key))
        if obj.client_id != client_id:
            raise StoreError(ErrorCode.ILLEGAL_CLIENT,
                             f"key={key!r} was started by client {obj.client_id}, not {client_id}")
        if not obj.is_processing():
            raise StoreError(ErrorCode.INVALID_WRITE, f"key={key!r}: a replica is already complete")
        self._erase(obj, self._clock(), "put_revoke")

    def batch_put_start(self, client_id: str, keys: Sequence[str], lengths: Sequence[int],
                        config: ReplicateConfig | dict[str, Any] | None = None) -> list[BatchItem]:
        def precheck() -> None:
            if not isinstance(lengths, list | tuple) or len(lengths) != len(keys):
                raise StoreError(ErrorCode.INVALID_PARAMS,
                                 "batch_put_start: keys and lengths differ in count")
        return self._batch("batch_put_start", "put_start", keys,
                           lambda i, k: self._put_start(client_id, k, lengths[i], config), precheck)

    def batch_put_end(self, client_id: str, keys: Sequence[str],
                      checksums: Sequence[int | None] | None = None) -> list[BatchItem]:
        def precheck() -> None:
            if checksums is not None and (not isinstance(checksums, list | tuple)
                                          or len(checksums) != len(keys)):
                raise StoreError(ErrorCode.INVALID_PARAMS,
                                 "batch_put_end: keys and checksums differ in count")

        def one(i: int, key: str) -> None:
            self._put_end(client_id, key, None if checksums is None else checksums[i])

        return self._batch("batch_put_end", "put_end", keys, one, precheck)

    def batch_put_revoke(self, client_id: str, keys: Sequence[str]) -> list[BatchItem]:
        return self._batch("batch_put_revoke", "put_revoke", keys,
                           lambda i, k: self._put_revoke(client_id, k))

    # ------------------------------------------------------------------ reads

    def get_replica_list(self, key: str) -> ReplicaList:
        """Descriptors of a COMPLETE object; grants ``max(old, now + ttl)`` (legacy GC: schedules a
        Remove 1 s later instead, as Mooncake v0.3.5 did)."""
        return self._rpc("get_replica_list", {"key": key}, self._get_replica_list, key)

    def _get_replica_list(self, key: Any) -> ReplicaList:
        obj = self._require(self._key(key))
        if not obj.is_complete():
            raise StoreError(ErrorCode.REPLICA_IS_NOT_READY, f"key={key!r} is still being written")
        now = self._clock()
        obj.read_count += 1
        granted = self.config.gc_mode != "legacy"
        if granted:
            self._grant(obj, now)
            if self.config.gc_mode == "on_demand":
                self._reclaimer.note_read(obj.key)
        elif not self._legacy_gc.mark(obj.key, now):
            self._counters["gc_queue_full"] += 1
            self.events.emit(now, "gc_queue_full", key=obj.key)
            log.warning("key=%s action=gc_queue_full capacity=%d: the key will not be collected",
                        obj.key, self.config.gc_queue_size)
        ttl_ms = round(self.config.default_kv_lease_ttl * 1000) if granted else 0
        return ReplicaList(obj.key, obj.size, tuple(r.descriptor() for r in obj.replicas), ttl_ms, granted,
                           obj.checksum)

    def _grant(self, obj: ObjectMeta, now: float) -> None:
        obj.grant_lease(now, self.config.default_kv_lease_ttl, self.config.default_kv_soft_pin_ttl)
        self.events.emit(now, "lease", key=obj.key, deadline=obj.lease_deadline)

    def batch_get_replica_list(self, keys: Sequence[str]) -> list[BatchItem]:
        return self._batch("batch_get_replica_list", "get_replica_list", keys,
                           lambda i, k: self._get_replica_list(k))

    def exist_key(self, key: str) -> bool:
        """False when absent (not an error); grants the read lease when present (even with legacy GC)."""
        return self._rpc("exist_key", {"key": key}, self._exist_key, key)

    def _exist_key(self, key: Any) -> bool:
        obj = self.shards.get(self._key(key))
        if obj is None:
            return False
        if not obj.is_complete():
            raise StoreError(ErrorCode.REPLICA_IS_NOT_READY, f"key={key!r} is still being written")
        self._grant(obj, self._clock())
        return True

    def batch_exist_key(self, keys: Sequence[str]) -> list[BatchItem]:
        return self._batch("batch_exist_key", "exist_key", keys, lambda i, k: self._exist_key(k))

    # ------------------------------------------------------------------ removal

    def remove(self, key: str, force: bool = False) -> None:
        """OBJECT_HAS_LEASE while leased unless ``force``; REPLICA_IS_NOT_READY while being written."""
        self._rpc("remove", {"key": key, "force": force}, self._remove, key, force)

    def _remove(self, key: Any, force: Any) -> None:
        if not isinstance(force, bool):
            raise StoreError(ErrorCode.INVALID_PARAMS, "force must be a bool")
        obj = self._require(self._key(key))
        now = self._clock()
        if not force and obj.is_leased(now):
            raise StoreError(ErrorCode.OBJECT_HAS_LEASE,
                             f"key={key!r} is leased for {obj.lease_deadline - now:.3f}s more")
        if not obj.is_complete():
            raise StoreError(ErrorCode.REPLICA_IS_NOT_READY, f"key={key!r} is still being written")
        self._erase(obj, now, "remove")

    def remove_all(self, force: bool = False) -> int:
        """Erase every object whose lease expired (all, with ``force``); returns how many."""
        return self._rpc("remove_all", {"force": force}, self._remove_all, force)

    def _remove_all(self, force: Any) -> int:
        if not isinstance(force, bool):
            raise StoreError(ErrorCode.INVALID_PARAMS, "force must be a bool")
        now = self._clock()
        classic = self.config.classic_remove_all
        victims = [o for o in self.shards
                   if (force or not o.is_leased(now)) and (classic or o.is_complete())]
        for obj in victims:
            self._erase(obj, now, "remove")
        return len(victims)

    # ------------------------------------------------------------------ segments and clients

    def mount_segment(self, segment: Segment | dict[str, Any], client_id: str) -> None:
        """Create the segment's allocator; idempotent for the same id and descriptor; starts the
        client's TTL."""
        self._rpc("mount_segment", {"client_id": client_id}, self._mount_segment, segment, client_id)

    def _mount_segment(self, segment: Any, client_id: Any) -> None:
        check_id("client_id", client_id)
        spec = Segment.from_wire(segment)
        now = self._clock()
        planned = self._plan_mount(spec, client_id)
        if planned is not None:
            self._commit_mount(planned, now)
        self._register(client_id, now)

    def _plan_mount(self, spec: Segment, client_id: str) -> MountedSegment | None:
        """Check a mount and build its allocator without changing state (None = already mounted)."""
        if spec.base <= 0 or spec.size <= 0:
            raise StoreError(ErrorCode.INVALID_PARAMS,
                             f"segment {spec.id} ({spec.name}): base and size must be > 0, "
                             f"got base={spec.base:#x} size={spec.size}")
        existing = self.segments.get(spec.id)
        if existing is not None:
            if existing.client_id == client_id and existing.same_as(spec):
                return None
            raise StoreError(ErrorCode.SEGMENT_ALREADY_EXISTS,
                             f"segment {spec.id} is already mounted by client {existing.client_id} "
                             f"as {existing.name} base={existing.base:#x} size={existing.size}")
        other = self.segments.overlapping(spec)
        if other is not None:
            raise StoreError(ErrorCode.INVALID_PARAMS,
                             f"segment {spec.id} ({spec.name} base={spec.base:#x} size={spec.size}) overlaps "
                             f"mounted segment {other.id} (base={other.base:#x} size={other.size})")
        try:
            allocator = make_allocator(self.config.memory_allocator, spec.size, segment_name=spec.name,
                                       base=spec.base)
        except AllocatorError as exc:
            raise StoreError(ErrorCode.INVALID_PARAMS, f"segment {spec.id} ({spec.name}): {exc}") from exc
        return MountedSegment.from_spec(spec, client_id, allocator, 0.0)

    def _commit_mount(self, seg: MountedSegment, now: float) -> None:
        seg.mounted_at = now
        self.segments.add(seg)
        self.events.emit(now, "mount", segment_id=seg.id, segment_name=seg.name, base=seg.base,
                         size=seg.size, client_id=seg.client_id)
        log.info("segment_id=%s segment_name=%s base=%#x size=%d client_id=%s action=mount_segment",
                 seg.id, seg.name, seg.base, seg.size, seg.client_id)

    def _register(self, client_id: str, now: float) -> None:
        known = self.clients.is_known(client_id)
        self.clients.register(client_id, now)
        if not known:
            self.events.emit(now, "client_register", client_id=client_id)

    def remount_segment(self, segments: Sequence[Segment | dict[str, Any]], client_id: str) -> None:
        """Answer to NEED_REMOUNT: mount all (atomically) and register the client. A client the
        master already knows gets OK and nothing changes (Mooncake: 'client already remounted')."""
        self._rpc("remount_segment", {"client_id": client_id}, self._remount_segment, segments, client_id)

    def _remount_segment(self, segments: Any, client_id: Any) -> None:
        check_id("client_id", client_id)
        if not isinstance(segments, list | tuple):
            raise StoreError(ErrorCode.INVALID_PARAMS, "segments must be a list")
        specs = [Segment.from_wire(s) for s in segments]
        now = self._clock()
        if self.clients.is_known(client_id):
            self.clients.register(client_id, now)
            return
        if len({s.id for s in specs}) != len(specs):
            raise StoreError(ErrorCode.INVALID_PARAMS, "remount lists a segment id twice")
        planned = [p for p in (self._plan_mount(s, client_id) for s in specs) if p is not None]
        for i, a in enumerate(planned):
            for b in planned[i + 1:]:
                if a.overlaps(b.spec()):
                    raise StoreError(ErrorCode.INVALID_PARAMS, f"segments {a.id} and {b.id} overlap")
        for seg in planned:
            self._commit_mount(seg, now)
        self._register(client_id, now)

    def unmount_segment(self, segment_id: str, client_id: str) -> None:
        """Drop a segment: its replicas vanish (objects left with none are erased)."""
        self._rpc("unmount_segment", {"segment_id": segment_id, "client_id": client_id},
                  self._unmount_segment, segment_id, client_id)

    def _unmount_segment(self, segment_id: Any, client_id: Any) -> None:
        check_id("client_id", client_id)
        check_id("segment_id", segment_id)
        seg = self.segments.get(segment_id)
        if seg is None:
            raise StoreError(ErrorCode.SEGMENT_NOT_FOUND, f"segment {segment_id} is not mounted")
        if seg.client_id != client_id:
            raise StoreError(ErrorCode.ILLEGAL_CLIENT,
                             f"segment {segment_id} belongs to client {seg.client_id}, not {client_id}")
        self._unmount(seg, self._clock(), "unmount")

    def _unmount(self, seg: MountedSegment, now: float, reason: str) -> None:
        self.segments.remove(seg.id)
        seg.mounted = False
        self._allocated -= seg.requested_bytes
        lost = 0
        for rep in list(seg.replicas):
            if rep.discarded:
                for d in self._discarded:
                    if rep in d.replicas:
                        d.replicas.remove(rep)
                continue
            obj = self.shards.get(rep.key)
            if obj is None or not any(r is rep for r in obj.replicas):
                continue
            obj.replicas = [r for r in obj.replicas if r is not rep]
            self.events.emit(now, "replica_lost", key=rep.key, segment_id=seg.id,
                             offset=rep.allocation.offset, size=rep.allocation.size)
            if self.config.classic_unmount or not obj.replicas:
                self._erase(obj, now, "object_lost")
                lost += 1
        self._discarded = [d for d in self._discarded if d.replicas]
        seg.replicas.clear()
        seg.requested_bytes = 0
        self.events.emit(now, "unmount", segment_id=seg.id, segment_name=seg.name, client_id=seg.client_id,
                         reason=reason, objects_lost=lost)
        log.info("segment_id=%s segment_name=%s client_id=%s reason=%s objects_lost=%d action=%s",
                 seg.id, seg.name, seg.client_id, reason, lost,
                 "unmount_expired_segment" if reason == "client_expired" else "unmount_segment")

    def ping(self, client_id: str) -> PingResult:
        """OK and a refreshed TTL for a known client; NEED_REMOUNT for one the master does not know."""
        return self._rpc("ping", {"client_id": client_id}, self._ping, client_id)

    def _ping(self, client_id: Any) -> PingResult:
        check_id("client_id", client_id)
        ok = self.clients.ping(client_id, self._clock())
        return PingResult(self.view_version, ClientStatus.OK if ok else ClientStatus.NEED_REMOUNT)

    # ------------------------------------------------------------------ periodic work

    def run_eviction(self) -> EvictionReport | None:
        """One tick of the 10-ms eviction loop; None when nothing triggered it."""
        cfg = self.config
        with self._lock:
            used = self._used_ratio()
            if not should_evict(used, cfg.eviction_high_watermark_ratio, cfg.eviction_ratio,
                                self._need_eviction):
                return None
            target, _ = eviction_targets(used, cfg.eviction_high_watermark_ratio, cfg.eviction_ratio)
        try:
            failpoint("master.evict", used_ratio=used, target=target)
        except StoreError as exc:
            log.warning("eviction round skipped used_ratio=%.4f: %s", used, exc)
            return None
        with self._lock:
            return self._evict_locked()

    def _evict_locked(self) -> EvictionReport | None:
        cfg = self.config
        now = self._clock()
        used = self._used_ratio()
        if not should_evict(used, cfg.eviction_high_watermark_ratio, cfg.eviction_ratio, self._need_eviction):
            return None
        target, lower = eviction_targets(used, cfg.eviction_high_watermark_ratio, cfg.eviction_ratio)
        if cfg.eviction_by == "bytes":
            cap = self.segments.capacity
            victims, first = select_by_bytes(list(self.shards), now, target * cap, lower * cap,
                                             cfg.allow_evict_soft_pinned_objects)
        elif cfg.classic_eviction:
            start = self._rng.randrange(NUM_SHARDS)
            victims, first = select_by_count_sharded(self.shards.shards, now, target, lower, start,
                                                     cfg.allow_evict_soft_pinned_objects)
        else:
            victims, first = select_by_count(list(self.shards), len(self.shards), now, target, lower,
                                             cfg.allow_evict_soft_pinned_objects)
        report = EvictionReport(used, target, lower, first_pass=first)
        for obj in victims:
            report.freed_bytes += obj.size * len(obj.replicas)
            report.evicted_keys.append(obj.key)
            self._erase(obj, now, "evict")
        if victims:
            self._need_eviction = False
            self._counters["successful_evictions"] += 1
            self._counters["evicted_keys"] += len(victims)
            self._counters["evicted_size_bytes"] += report.freed_bytes
        else:
            if len(self.shards) == 0:
                self._need_eviction = False
            self._counters["attempted_evictions"] += 1
        log.info("action=evict memory_ratio=%.4f target_evict_ratio=%.5f lowerbound=%.5f evicted_count=%d "
                 "first_pass=%d freed_size=%d by=%s", used, target, lower, len(victims), first,
                 report.freed_bytes, cfg.eviction_by)
        return report

    def run_gc(self) -> list[str]:
        """One tick of the GC loop (legacy or on-demand); returns the keys it removed."""
        mode = self.config.gc_mode
        if mode == "legacy":
            with self._lock:
                due = self._legacy_gc.due(self._clock())
            return [k for k in due if self._gc_remove_legacy(k)]
        if mode == "on_demand":
            return self._gc_on_demand()
        return []

    def _gc_remove_legacy(self, key: str) -> bool:
        try:
            failpoint("master.gc_remove", key=key)
        except StoreError as exc:
            log.info("key=%s action=gc_remove skipped: %s", key, exc)
            return False
        with self._lock:
            now = self._clock()
            obj = self.shards.get(key)
            # Remove(key) without force; OBJECT_NOT_FOUND / OBJECT_HAS_LEASE / not ready are ignored.
            if obj is None or obj.is_leased(now) or not obj.is_complete():
                return False
            self._erase(obj, now, "gc_remove")
            self._counters["gc_removals"] += 1
            log.debug("key=%s action=gc_remove", key)
            return True

    def _gc_on_demand(self) -> list[str]:
        cfg = self.config
        floor = cfg.eviction_high_watermark_ratio - cfg.eviction_ratio
        with self._lock:
            needed = self._need_eviction
            if not should_evict(self._used_ratio(), cfg.eviction_high_watermark_ratio, cfg.eviction_ratio,
                                needed):
                return []
            candidates = self._reclaimer.candidates()
        removed: list[str] = []
        for key in candidates:
            with self._lock:
                if self._used_ratio() <= floor and (removed or not needed):
                    break
                obj = self.shards.get(key)
                if obj is None:
                    self._reclaimer.forget(key)
                    continue
                if obj.is_leased(self._clock()) or not obj.is_complete():
                    continue
            try:
                failpoint("master.gc_remove", key=key)
            except StoreError as exc:
                log.info("key=%s action=gc_remove skipped: %s", key, exc)
                continue
            with self._lock:
                now = self._clock()
                current = self.shards.get(key)
                if current is not obj or obj.is_leased(now) or not obj.is_complete():
                    continue
                self._erase(obj, now, "gc_remove")
                self._counters["gc_removals"] += 1
                removed.append(key)
        if removed:
            with self._lock:
                self._need_eviction = False
        return removed

    def run_client_monitor(self) -> list[str]:
        """One tick of the 1-s client monitor: expire silent clients, then the zombie-put timers
        for writers the master never knew. Returns the expired client ids."""
        with self._lock:
            expired = self.clients.expired(self._clock())
        done = []
        for cid in expired:
            try:
                failpoint("master.client_expire", client_id=cid)
            except StoreError as exc:
                log.info("client_id=%s action=client_expire postponed: %s", cid, exc)
                continue
            with self._lock:
                now = self._clock()
                st = self.clients.clients.get(cid)
                if st is None or st.deadline >= now:
                    continue  # it pinged while the failpoint held us
                self._expire_client(cid, now)
                done.append(cid)
        with self._lock:
            now = self._clock()
            self._release_discarded(now)
            self._discard_unowned_stale_puts(now)
        return done

    def _expire_client(self, cid: str, now: float) -> None:
        self.clients.drop(cid)
        self._counters["clients_expired"] += 1
        log.info("client_id=%s action=client_expired", cid)
        self.events.emit(now, "client_expire", client_id=cid)
        for seg in self.segments.of_client(cid):
            self._unmount(seg, now, "client_expired")
        for obj in [o for o in self._processing.values() if o.client_id == cid]:
            self._erase(obj, now, "zombie_reclaim")
            self._counters["zombie_puts_reclaimed"] += 1
            log.info("key=%s client_id=%s action=reclaim_zombie_put", obj.key, cid)
        self._release_discarded(now, client_id=cid)

    def _discard_unowned_stale_puts(self, now: float) -> None:
        timeout = self.config.put_start_discard_timeout
        if timeout <= 0:
            return
        for obj in list(self._processing.values()):
            if now - obj.put_start_time >= timeout and not self._writer_alive(obj):
                self._discard(obj, now)

    def tick(self) -> dict[str, Any]:
        """Everything the server's loops do, once (tests and simulations)."""
        gc = self.run_gc()
        ev = self.run_eviction()
        expired = self.run_client_monitor()
        return {"gc_removed": gc, "eviction": ev, "expired_clients": expired}

    def trigger_eviction(self) -> EvictionReport | None:
        """Admin: behave as after a failed allocation and run one round now."""
        with self._lock:
            self._need_eviction = True
        return self.run_eviction()

    # ------------------------------------------------------------------ read-only introspection

    def object_info(self, obj: ObjectMeta, now: float) -> dict[str, Any]:
        return {
            "key": obj.key, "size": obj.size, "state": obj.state(), "client_id": obj.client_id,
            "put_start_time": obj.put_start_time,
            "lease_deadline": None if obj.lease_deadline == NEVER else obj.lease_deadline,
            "leased": obj.is_leased(now), "soft_pin_deadline": obj.soft_pin_deadline,
            "soft_pinned": obj.is_soft_pinned(now), "read_count": obj.read_count, "checksum": obj.checksum,
            "replicas": [{**r.descriptor().to_wire(), "offset": r.allocation.offset,
                          "reserved": r.allocation.size} for r in obj.replicas],
        }

    def query_key(self, key: str) -> dict[str, Any] | None:
        """What ``/query_key`` shows — without granting a lease (Mooncake's does; a known trap)."""
        with self._lock:
            obj = self.shards.get(key) if isinstance(key, str) else None
            return None if obj is None else self.object_info(obj, self._clock())

    def inspect_objects(self, keys: Sequence[str] | None = None,
                        limit: int | None = None) -> list[dict[str, Any]]:
        with self._lock:
            now = self._clock()
            if keys is not None:
                objs = [o for o in (self.shards.get(k) for k in keys) if o is not None]
            else:
                objs = list(self.shards)
            if limit is not None:
                objs = objs[:limit]
            return [self.object_info(o, now) for o in objs]

    def all_keys(self) -> list[str]:
        with self._lock:
            return self.shards.keys()

    def inspect_segments(self) -> list[dict[str, Any]]:
        with self._lock:
            return [s.report() for s in self.segments.targets()]

    def inspect_clients(self) -> list[dict[str, Any]]:
        with self._lock:
            now = self._clock()
            out = self.clients.report(now)
            for c in out:
                c["segments"] = [s.id for s in self.segments.of_client(c["client_id"])]
            return out

    def counters(self) -> dict[str, int]:
        """Monotonic counters: ``<rpc>_requests``, ``<rpc>_failures``, batch ``_items`` /
        ``_failed_items`` / ``_partial_successes``, evictions, GC removals, expiries, reclaims."""
        with self._lock:
            out = {f"{n}_{s}": 0 for n in RPC_NAMES for s in ("requests", "failures")}
            for n in BATCH_RPCS:
                for s in ("items", "failed_items", "partial_successes"):
                    out[f"{n}_{s}"] = 0
            for k in ("successful_evictions", "attempted_evictions", "evicted_keys", "evicted_size_bytes",
                      "gc_removals", "gc_queue_full", "clients_expired", "zombie_puts_reclaimed",
                      "put_start_alloc_failures", "put_start_partial_allocations", "put_start_discards",
                      "put_start_releases"):
                out[k] = 0
            out.update(self._counters)
            return out

    def gauges(self) -> dict[str, Any]:
        with self._lock:
            now = self._clock()
            return {
                "key_count": len(self.shards),
                "soft_pin_key_count": sum(1 for o in self.shards if o.is_soft_pinned(now)),
                "processing_key_count": len(self._processing),
                "allocated_bytes": self._allocated,
                "reserved_bytes": self.segments.reserved,
                "total_capacity_bytes": self.segments.capacity,
                "used_ratio": self._used_ratio(),
                "active_clients": len(self.clients),
                "segment_count": len(self.segments),
                "need_eviction": self._need_eviction,
                "gc_pending": (self._legacy_gc.pending() if self.config.gc_mode == "legacy"
                               else self._reclaimer.pending()),
                "discarded_puts": len(self._discarded),
                "value_size_buckets": list(zip((*VALUE_SIZE_BUCKETS, float("inf")), self._value_sizes,
                                               strict=True)),
                "value_size_sum": self._value_size_sum,
                "now": now,
                "view_version": self.view_version,
                "seed": self.seed,
            }

    def events_since(self, seq: int = 0, limit: int | None = None) -> dict[str, Any]:
        with self._lock:
            events, lost = self.events.since(seq, limit)
            # ``now`` lets a reader map the master's monotonic clock onto its own.
            return {"events": events, "lost": lost, "last_seq": self.events.seq, "now": self._clock()}

    def snapshot(self) -> dict[str, Any]:
        """Everything a checker may want in one consistent read (except the event log)."""
        with self._lock:
            return {"gauges": self.gauges(), "counters": self.counters(), "segments": self.inspect_segments(),
                    "clients": self.inspect_clients(), "objects": self.inspect_objects(),
                    "discarded": [{"key": d.key, "client_id": d.client_id, "release_at": d.release_at,
                                   "replicas": len(d.replicas)} for d in self._discarded]}

    def check_invariants(self) -> list[str]:
        """Bookkeeping invariants; an empty list means they all hold. Checked: live ranges inside
        their segment and pairwise disjoint; allocator used/live figures equal the replicas;
        allocated bytes equal the sum over live replicas; indexes agree with the shards."""
        bad: list[str] = []
        with self._lock:
            owned: dict[str, list[Replica]] = {s.id: [] for s in self.segments.targets()}
            count = 0
            for obj in self.shards:
                count += 1
                for rep in obj.replicas:
                    if rep.key != obj.key or rep.discarded:
                        bad.append(f"key={obj.key}: replica bookkeeping wrong (key={rep.key} "
                                   f"discarded={rep.discarded})")
                    if rep.segment.id not in owned or not rep.segment.mounted:
                        bad.append(f"key={obj.key}: replica on unmounted segment {rep.segment.id}")
                        continue
                    owned[rep.segment.id].append(rep)
                if not obj.replicas:
                    bad.append(f"key={obj.key}: object without replicas")
                if not obj.is_complete() and not obj.is_processing():
                    bad.append(f"key={obj.key}: mixed replica states")
                if obj.is_processing() != (self._processing.get(obj.key) is obj):
                    bad.append(f"key={obj.key}: processing index disagrees")
            if count != len(self.shards) or not self.shards.consistent():
                bad.append(f"shards disagree with the key index ({len(self.shards)} keys, {count} objects)")
            if len(self._processing) != sum(1 for o in self.shards if o.is_processing()):
                bad.append("processing index holds objects that are not in the shards")
            for d in self._discarded:
                for rep in d.replicas:
                    if rep.segment.id in owned:
                        owned[rep.segment.id].append(rep)
            total = 0
            for seg in self.segments.targets():
                reps = owned[seg.id]
                if set(map(id, reps)) != set(map(id, seg.replicas)) or len(reps) != len(seg.replicas):
                    bad.append(f"segment {seg.id}: replica index disagrees with the objects")
                used = sum(r.allocation.size for r in reps)
                if used != seg.allocator.used or len(reps) != seg.allocator.live_count:
                    bad.append(f"segment {seg.id}: allocator used={seg.allocator.used} live="
                               f"{seg.allocator.live_count}, replicas reserve {used} in {len(reps)}")
                requested = sum(r.length for r in reps)
                if requested != seg.requested_bytes:
                    bad.append(f"segment {seg.id}: requested bytes {seg.requested_bytes} != {requested}")
                total += requested
                spans = sorted((r.allocation.offset, r.allocation.end, r.key) for r in reps)
                for a, b in itertools.pairwise(spans):
                    if b[0] < a[1]:
                        bad.append(f"segment {seg.id}: {a[2]!r} [{a[0]}, {a[1]}) overlaps {b[2]!r} "
                                   f"[{b[0]}, {b[1]})")
                for off, end, key in spans:
                    if off < 0 or end > seg.size:
                        bad.append(f"segment {seg.id}: {key!r} [{off}, {end}) outside [0, {seg.size})")
            if total != self._allocated:
                bad.append(f"allocated bytes {self._allocated} != sum over live replicas {total}")
        return bad

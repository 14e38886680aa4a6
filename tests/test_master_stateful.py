"""Random interleavings of the master's RPCs and clock moves against a dictionary model.

The model holds key → (state, writer, lease deadline). Each rule predicts the RPC's result from
the model; background work (eviction, GC, client expiry) is observed through the master's event
log and checked against the model before the model follows it. Invariants after every step:
no two live ranges overlap, allocated bytes equal the sum over live replicas, the master's keys
and states equal the model's (so a COMPLETE object stays readable until a removal explains its
absence), and nothing whose lease is live disappears — except when its segment itself went away.

Hypothesis prints the failing program, including the master's seed; replay with
``--hypothesis-seed``.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from store import failpoints
from store.errors import ErrorCode, StoreError
from store.master.clock import ManualClock
from store.master.config import MasterConfig
from store.master.objects import NEVER
from store.master.service import MasterService
from store.master.types import ClientStatus, ReplicateConfig, Segment

KiB = 1024
KEYS = [f"k{i}" for i in range(8)]
OWNERS = ["c0", "c1"]  # clients with a segment each
WRITERS = ["c0", "c1", "w0"]  # w0 contributes no memory
TTL = 10.0


@dataclass
class Obj:
    state: str
    writer: str
    lease: float = NEVER


def seg_of(owner: str) -> Segment:
    n = OWNERS.index(owner)
    return Segment(id=f"seg-{owner}", name=f"127.0.0.1:{4000 + n}", base=(n + 1) << 32, size=256 * KiB,
                   te_endpoint=f"127.0.0.1:{5000 + n}", transport={"rkey": n})


class MasterModel(RuleBasedStateMachine):
    @initialize(seed=st.integers(0, 2**32 - 1), gc_mode=st.sampled_from(["off", "legacy", "on_demand"]),
                eviction_by=st.sampled_from(["objects", "bytes"]), classic=st.booleans())
    def setup(self, seed: int, gc_mode: str, eviction_by: str, classic: bool) -> None:
        failpoints.disarm_all()
        self.clock = ManualClock()
        cfg = MasterConfig(seed=seed, gc_mode=gc_mode, eviction_by=eviction_by, classic_eviction=classic,
                           default_kv_lease_ttl=TTL, client_ttl=5.0, put_start_discard_timeout=0,
                           eviction_high_watermark_ratio=0.6, eviction_ratio=0.1)
        self.svc = MasterService(cfg, self.clock)
        self.gc_mode = gc_mode
        self.model: dict[str, Obj] = {}
        self.reads: dict[str, list[float]] = {}
        self.mounted = set()
        self.known = {*OWNERS, "w0"}
        for owner in OWNERS:
            self.svc.mount_segment(seg_of(owner), owner)
            self.mounted.add(owner)
        self.svc.remount_segment([], "w0")
        self.seq = 0

    # ------------------------------------------------------------ helpers

    def now(self) -> float:
        return self.clock()

    def call(self, fn, *args):
        try:
            return ErrorCode.OK, fn(*args)
        except StoreError as exc:
            return exc.code, None

    def sync_events(self) -> None:
        """Apply removals the master did on its own, checking each against the model first."""
        got = self.svc.events_since(self.seq)
        assert not got["lost"]
        for ev in got["events"]:
            self.seq = ev["seq"]
            kind, key = ev["kind"], ev.get("key")
            if kind in ("evict", "gc_remove"):
                obj = self.model.get(key)
                assert obj is not None, f"{kind} of {key} which the model does not hold"
                assert obj.state == "COMPLETE", f"{kind} of {key} while its put is in progress"
                assert ev["t"] >= obj.lease, \
                    f"{kind} of {key} inside its lease (t={ev['t']}, lease={obj.lease})"
                if kind == "gc_remove" and self.gc_mode == "legacy":
                    delay = self.svc.config.gc_delay
                    assert any(r + delay <= ev["t"] for r in self.reads.get(key, [])), \
                        f"legacy GC removed {key} without a read {delay}s earlier"
                del self.model[key]
            elif kind == "object_lost":
                assert key in self.model
                del self.model[key]  # its only segment went away: allowed even under a lease
            elif kind == "zombie_reclaim":
                obj = self.model.pop(key)
                assert obj.state == "PROCESSING" and obj.writer == ev["client_id"]
            elif kind in ("remove", "put_revoke"):
                assert key not in self.model, f"{kind} of {key} that the model still holds"

    # ------------------------------------------------------------ RPC rules

    @rule(writer=st.sampled_from(WRITERS), key=st.sampled_from(KEYS), length=st.integers(1, 96 * KiB),
          replicas=st.integers(1, 3), finish=st.sampled_from(["end", "end", "end", "leave", "revoke"]))
    def put(self, writer: str, key: str, length: int, replicas: int, finish: str) -> None:
        """A client's put: PutStart, then usually PutEnd (sometimes left open or revoked)."""
        placed = self.put_start(writer, key, length, replicas)
        if placed and finish == "end":
            self.put_end(writer, key)
        elif placed and finish == "revoke":
            self.put_revoke(writer, key)

    def put_start(self, writer: str, key: str, length: int, replicas: int) -> bool:
        cfg = ReplicateConfig(replica_num=replicas)
        code, descs = self.call(self.svc.put_start, writer, key, length, cfg)
        if key in self.model:
            assert code == ErrorCode.OBJECT_ALREADY_EXISTS
        elif not self.mounted:
            assert code == ErrorCode.NO_AVAILABLE_HANDLE
        else:
            assert code in (ErrorCode.OK, ErrorCode.NO_AVAILABLE_HANDLE)
        if code == ErrorCode.OK:
            assert 1 <= len(descs) <= min(replicas, len(self.mounted))
            assert len({d.segment_name for d in descs}) == len(descs)
            self.model[key] = Obj("PROCESSING", writer)
        self.sync_events()
        return code == ErrorCode.OK

    def put_end(self, writer: str, key: str) -> None:
        code, _ = self.call(self.svc.put_end, writer, key)
        obj = self.model.get(key)
        if obj is None:
            assert code == ErrorCode.OBJECT_NOT_FOUND
        elif obj.writer != writer:
            assert code == ErrorCode.ILLEGAL_CLIENT
        elif obj.state == "COMPLETE":
            assert code == ErrorCode.INVALID_WRITE
        else:
            assert code == ErrorCode.OK
            obj.state = "COMPLETE"
            obj.lease = max(obj.lease, self.now())

    @rule(op=st.sampled_from(["put_end", "put_revoke", "get", "exist", "remove", "force_remove"]),
          writer=st.sampled_from(WRITERS), key=st.sampled_from(KEYS))
    def any_key(self, op: str, writer: str, key: str) -> None:
        """Calls on arbitrary keys and writers: the error paths."""
        if op in ("put_end", "put_revoke"):
            getattr(self, op)(writer, key)
        elif op in ("get", "exist"):
            getattr(self, op)(key)
        else:
            self.remove(key, op == "force_remove")

    @precondition(lambda self: any(o.state == "PROCESSING" for o in self.model.values()))
    @rule(data=st.data(), revoke=st.booleans())
    def finish_a_put(self, data: st.DataObject, revoke: bool) -> None:
        """Most puts end as a client would end them: PutEnd (or PutRevoke) by their writer."""
        key = data.draw(st.sampled_from(sorted(k for k, o in self.model.items() if o.state == "PROCESSING")))
        (self.put_revoke if revoke else self.put_end)(self.model[key].writer, key)

    @precondition(lambda self: self.model)
    @rule(data=st.data(), op=st.sampled_from(["get", "exist", "remove", "force_remove"]))
    def use_a_key(self, data: st.DataObject, op: str) -> None:
        key = data.draw(st.sampled_from(sorted(self.model)))
        if op == "get":
            self.get(key)
        elif op == "exist":
            self.exist(key)
        else:
            self.remove(key, op == "force_remove")

    @precondition(lambda self: any(o.state == "COMPLETE" for o in self.model.values()))
    @rule(data=st.data(), wait=st.sampled_from([0.5, 1.0, 1.0, 10.0, 11.0]))
    def read_wait_collect(self, data: st.DataObject, wait: float) -> None:
        """A read, some time, then GC and eviction: where leases and collection meet."""
        key = data.draw(st.sampled_from(sorted(k for k, o in self.model.items() if o.state == "COMPLETE")))
        self.get(key)
        self.clock.advance(wait)
        self.svc.run_gc()
        self.sync_events()
        self.svc.trigger_eviction()
        self.sync_events()

    def put_revoke(self, writer: str, key: str) -> None:
        code, _ = self.call(self.svc.put_revoke, writer, key)
        obj = self.model.get(key)
        if obj is None:
            assert code == ErrorCode.OBJECT_NOT_FOUND
        elif obj.writer != writer:
            assert code == ErrorCode.ILLEGAL_CLIENT
        elif obj.state == "COMPLETE":
            assert code == ErrorCode.INVALID_WRITE
        else:
            assert code == ErrorCode.OK
            del self.model[key]
        self.sync_events()

    def get(self, key: str) -> None:
        code, rl = self.call(self.svc.get_replica_list, key)
        obj = self.model.get(key)
        if obj is None:
            assert code == ErrorCode.OBJECT_NOT_FOUND
        elif obj.state == "PROCESSING":
            assert code == ErrorCode.REPLICA_IS_NOT_READY
        else:
            assert code == ErrorCode.OK and rl.replicas and all(r.length == rl.size for r in rl.replicas)
            self.reads.setdefault(key, []).append(self.now())
            if self.gc_mode != "legacy":
                obj.lease = max(obj.lease, self.now() + TTL)

    def exist(self, key: str) -> None:
        code, found = self.call(self.svc.exist_key, key)
        obj = self.model.get(key)
        if obj is None:
            assert code == ErrorCode.OK and found is False
        elif obj.state == "PROCESSING":
            assert code == ErrorCode.REPLICA_IS_NOT_READY
        else:
            assert code == ErrorCode.OK and found is True
            obj.lease = max(obj.lease, self.now() + TTL)

    def remove(self, key: str, force: bool) -> None:
        code, _ = self.call(self.svc.remove, key, force)
        obj = self.model.get(key)
        if obj is None:
            assert code == ErrorCode.OBJECT_NOT_FOUND
        elif not force and self.now() < obj.lease:
            assert code == ErrorCode.OBJECT_HAS_LEASE
        elif obj.state == "PROCESSING":
            assert code == ErrorCode.REPLICA_IS_NOT_READY
        else:
            assert code == ErrorCode.OK
            del self.model[key]
        self.sync_events()

    @rule(force=st.booleans())
    def remove_all(self, force: bool) -> None:
        expect = {k for k, o in self.model.items()
                  if o.state == "COMPLETE" and (force or self.now() >= o.lease)}
        code, n = self.call(self.svc.remove_all, force)
        assert code == ErrorCode.OK and n == len(expect)
        for k in expect:
            del self.model[k]
        self.sync_events()

    # ------------------------------------------------------------ time and background work

    @rule(dt=st.sampled_from([0.25, 0.5, 1.0, 2.0, 4.0, 11.0]))
    def advance(self, dt: float) -> None:
        self.clock.advance(dt)

    @rule(work=st.sampled_from(["eviction", "trigger_eviction", "gc", "client_monitor"]))
    def background(self, work: str) -> None:
        if work == "eviction":
            self.svc.run_eviction()
        elif work == "trigger_eviction":
            self.svc.trigger_eviction()
        elif work == "gc":
            self.svc.run_gc()
        else:
            for c in self.svc.run_client_monitor():
                assert c in self.known
                self.mounted.discard(c)
                self.known.discard(c)
        self.sync_events()

    @rule(client=st.sampled_from(WRITERS))
    def ping_one(self, client: str) -> None:
        status = self.svc.ping(client).status
        assert (status == ClientStatus.OK) == (client in self.known)
        if client not in self.known:
            self.svc.remount_segment([], client)
            self.known.add(client)

    @rule(owner=st.sampled_from(OWNERS))
    def mount(self, owner: str) -> None:
        """A client the master still knows mounts; an expired one remounts (NEED_REMOUNT)."""
        if owner in self.known:
            code, _ = self.call(self.svc.mount_segment, seg_of(owner), owner)
        else:
            code, _ = self.call(self.svc.remount_segment, [seg_of(owner)], owner)
        assert code == ErrorCode.OK
        self.mounted.add(owner)
        self.known.add(owner)

    @precondition(lambda self: self.mounted)
    @rule(data=st.data())
    def unmount(self, data: st.DataObject) -> None:
        owner = data.draw(st.sampled_from(sorted(self.mounted)))
        code, _ = self.call(self.svc.unmount_segment, seg_of(owner).id, owner)
        assert code == ErrorCode.OK
        self.mounted.discard(owner)
        self.sync_events()

    # ------------------------------------------------------------ invariants

    @invariant()
    def bookkeeping_holds(self) -> None:
        assert self.svc.check_invariants() == []

    @invariant()
    def master_matches_model(self) -> None:
        self.sync_events()
        assert sorted(self.svc.all_keys()) == sorted(self.model)
        for key, obj in self.model.items():
            info = self.svc.query_key(key)
            assert info is not None and info["state"] == obj.state
            lease = NEVER if info["lease_deadline"] is None else info["lease_deadline"]
            assert lease == obj.lease

    def teardown(self) -> None:
        failpoints.disarm_all()


MasterModel.TestCase.settings = settings(max_examples=60, stateful_step_count=80, deadline=None,
                                         suppress_health_check=[HealthCheck.too_slow])
test_master_state_machine = MasterModel.TestCase


@pytest.mark.parametrize("gc_mode", ["off", "legacy", "on_demand"])
def test_model_replays_a_fixed_program(gc_mode):
    """A fixed program through the same model, so a regression shows without shrinking."""
    m = MasterModel()
    m.setup(seed=7, gc_mode=gc_mode, eviction_by="objects", classic=False)
    m.put("c0", "k0", 64 * KiB, 2, "end")
    m.get("k0")
    m.remove("k0", False)  # leased, except under legacy GC
    for i in range(1, 6):
        m.put("c1", f"k{i}", 64 * KiB, 2, "end")
    m.put("w0", "k7", 10, 1, "leave")
    m.advance(11.0)
    m.background("gc")
    m.background("eviction")
    m.ping_one("c0")
    m.ping_one("c1")
    m.background("client_monitor")  # w0 went silent: its open put is reclaimed
    assert "k7" not in m.model
    m.bookkeeping_holds()
    m.master_matches_model()
    assert m.svc.counters()["evicted_keys"] > 0 or gc_mode != "off"

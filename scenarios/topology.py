"""A scenario's cluster, for real: ``umbra master`` and segment holders as processes, proxies,
and in-process workload clients that record every call.

Layout (transport ``tcp``; ``rdma`` passes the protocol and device to holders and clients)::

    workload clients (threads, pure clients: every byte crosses a socket)
        │ RPC ──────────► [proxy:master] ──► umbra master (process)
        │ data ─────────► [proxy:transfer-N] ──► holder N's transfer endpoint (process)
    fault clients ─────────► master and holders directly (the harness is not under test)

The proxies exist only when the topology asks for them. When there is a transfer proxy the
master proxy rewrites the holders' endpoints in its replies (see
:class:`fault.proxy.MasterRouteRewriter`), which is how the clients' data connections come to
cross it. The cluster implements :class:`fault.registry.FaultContext` for the injectors.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fault.procs import HolderProc, ManagedProcess, MasterProc
from fault.proxy import MasterRouteRewriter, TcpProxy
from fault.registry import FaultError, StartConfig
from scenarios.clients import RecordingClient
from scenarios.history import History
from store.client import Client
from store.errors import StoreError
from store.master.client import MasterClient
from store.units import MiB, parse_size

log = logging.getLogger("scenarios.topology")


class TopologyError(RuntimeError):
    """The cluster could not be built (a process or client did not come up)."""


@dataclass
class TopologySpec:
    """What to start. Sizes accept ``"64mb"`` strings; ``master_flags`` are Mooncake flags."""

    holders: int = 2
    segment_size: int | str = "64mb"
    holder_local_buffer: int | str = "16mb"
    master_flags: list[str] = field(default_factory=list)
    clients: int = 4
    client_local_buffer: int | str = "32mb"
    transport: str = "tcp"
    device: str = ""
    proxy_transfer: bool = False
    proxy_master: bool = False
    heartbeat_interval: float = 1.0
    rpc_timeout_s: float = 3.0
    transfer_timeout_s: float = 10.0
    slice_timeout_s: float = 5.0

    def describe(self) -> dict[str, Any]:
        return {
            "holders": self.holders,
            "segment_size": parse_size(self.segment_size),
            "clients": self.clients,
            "transport": self.transport,
            "device": self.device,
            "master_flags": list(self.master_flags),
            "proxy_transfer": self.proxy_transfer,
            "proxy_master": self.proxy_master or self.proxy_transfer,
            "client_local_buffer": parse_size(self.client_local_buffer),
        }


class Cluster:
    """See the module docstring. ``start()`` brings everything up; ``close()`` takes it down."""

    def __init__(
        self,
        spec: TopologySpec,
        *,
        run_dir: Path,
        history: History,
        seed: int,
        start: StartConfig | None = None,
        name: str = "",
    ) -> None:
        self.spec = spec
        self.run_dir = run_dir
        self.history = history
        self.seed = seed
        self.start_config = start or StartConfig()
        self.name = name
        self.master: MasterProc | None = None
        self.holders: list[HolderProc] = []
        self.proxies: dict[str, TcpProxy] = {}
        self.clients: list[RecordingClient] = []
        self._fault_clients: dict[str, RecordingClient] = {}
        self._admin: MasterClient | None = None
        self.t_started = 0.0

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Cluster:
        spec = self.spec
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            flags = [*spec.master_flags, *self.start_config.master_flags]
            if not any(f.startswith(("--seed", "-seed")) for f in flags):
                flags.append(f"--seed={self.seed}")  # placement and eviction draws replay too
            self.master = MasterProc(
                flags,
                log_dir=self.run_dir,
                name=f"{self.name}master".strip("-"),
                env=self.start_config.failpoint_env("master"),
            )
            self.master.start()
            for i in range(spec.holders):
                h = HolderProc(
                    self.master.address,
                    name=f"{self.name}holder-{i}",
                    segment_size=spec.segment_size,
                    local_buffer_size=spec.holder_local_buffer,
                    protocol=spec.transport,
                    device_name=spec.device,
                    heartbeat_interval=spec.heartbeat_interval,
                    log_dir=self.run_dir,
                    env=self.start_config.failpoint_env("holder", i),
                )
                h.start()
                self.holders.append(h)
            client_master = self.master.address
            if spec.proxy_transfer or spec.proxy_master:
                if spec.transport != "tcp":
                    raise TopologyError(
                        f"network proxies sit on the TCP transport; this run uses {spec.transport}"
                    )
                rewriter = MasterRouteRewriter()
                mp = TcpProxy(self.master.address, name="master", rewriter=rewriter, seed=self.seed).start()
                self.proxies["master"] = mp
                client_master = mp.endpoint
                if spec.proxy_transfer:
                    for i, h in enumerate(self.holders):
                        tp = TcpProxy(h.endpoint, name=f"transfer-{i}", seed=self.seed).start()
                        self.proxies[f"transfer-{i}"] = tp
                        rewriter.routes[h.endpoint] = tp.endpoint
                    self.proxies["transfer"] = self.proxies["transfer-0"]
            for i in range(spec.clients):
                self.clients.append(RecordingClient(self._new_client(client_master), self.history, f"w{i}"))
        except BaseException:
            self.close()
            raise
        self.t_started = time.monotonic()
        log.info(
            "cluster %s up: master %s, %d holder(s), %d client(s), proxies %s",
            self.name,
            self.master.address,
            len(self.holders),
            len(self.clients),
            sorted(self.proxies),
        )
        return self

    def _new_client(self, master: str, segment: int = 0) -> Client:
        spec = self.spec
        c = Client(
            transfer_timeout_s=spec.transfer_timeout_s,
            rpc_timeout_s=spec.rpc_timeout_s,
            heartbeat_interval_s=spec.heartbeat_interval,
            engine_options={"slice_timeout_s": spec.slice_timeout_s},
        )
        rc = c.setup(
            "127.0.0.1",
            "P2PHANDSHAKE",
            segment,
            parse_size(spec.client_local_buffer),
            spec.transport,
            spec.device,
            master,
        )
        if rc != 0:
            raise TopologyError(f"client setup against {master} failed with code {rc}")
        return c

    def teardown_state(self) -> dict[str, Any]:
        """Remove everything (``remove_all(force)``), then what the master still holds: every
        allocation must be back to zero and the bookkeeping invariants must hold."""
        try:
            admin = self.master_admin()
            removed = admin.remove_all(force=True)
            deadline = time.monotonic() + 3.0
            while True:  # a put still finishing its revoke may hold a range for a moment
                gauges = admin.inspect("gauges")
                if (
                    gauges["allocated_bytes"] == 0 and gauges["processing_key_count"] == 0
                ) or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
                removed += admin.remove_all(force=True)
            segments = [
                {
                    "name": s["name"],
                    "client_id": s["client_id"],
                    "allocated_bytes": s["allocated_bytes"],
                    "replica_count": s["replica_count"],
                    "used": s["allocator"].get("used"),
                    "live_allocations": s["allocator"].get("live_allocations"),
                }
                for s in admin.inspect("segments")
            ]
            return {
                "reachable": True,
                "removed_at_teardown": removed,
                "gauges": _plain(gauges),
                "segments": segments,
                "invariants": admin.check_invariants(),
            }
        except StoreError as exc:
            return {"reachable": False, "error": str(exc)}

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "proxies": {n: p.stats() for n, p in self.proxies.items() if n != "transfer"},
            "clients": {},
        }
        for rc in self.clients:
            c = rc.client
            eng = c.engine
            out["clients"][rc.name] = {
                "counters": c.counters(),
                "engine": _plain(
                    {
                        k: v
                        for k, v in (eng.stats() if eng else {}).items()
                        if k not in ("memory", "transports", "server")
                    }
                ),
            }
        return out

    def close(self) -> None:
        for c in [*self.clients, *self._fault_clients.values()]:
            try:
                c.close()
            except Exception as exc:  # noqa: BLE001 - teardown goes on
                log.warning("closing client %s: %s", c.name, exc)
        for p in self.proxies.values():
            p.close()
        for h in self.holders:
            h.close(timeout=10)
        if self._admin is not None:
            self._admin.close()
        if self.master is not None:
            self.master.close(timeout=10)

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ FaultContext

    def master_admin(self) -> MasterClient:
        if self.master is None:
            raise FaultError("no master")
        if self._admin is None or self._admin.address != self.master.rpc:
            self._admin = MasterClient(self.master.address, timeout=3.0, connect_timeout=2.0)
        return self._admin

    def process(self, target: str) -> ManagedProcess:
        if target == "master" and self.master is not None:
            return self.master
        if target.startswith("holder:"):
            i = int(target.split(":", 1)[1])
            if 0 <= i < len(self.holders):
                return self.holders[i]
        raise FaultError(f"no process {target!r} in this cluster (master, holder:0..{len(self.holders) - 1})")

    def expand(self, target: str) -> list[str]:
        if target == "holder:*":
            return [f"holder:{i}" for i in range(len(self.holders))]
        return [target]

    def proxy(self, name: str) -> TcpProxy:
        p = self.proxies.get(name)
        if p is None:
            raise FaultError(
                f"no proxy {name!r} in this topology (have {sorted(self.proxies) or 'none'}); "
                "set proxy_transfer / proxy_master"
            )
        return p

    def segment_name(self, target: str) -> str:
        proc = self.process(target)
        if not isinstance(proc, HolderProc):
            raise FaultError(f"{target} holds no segment")
        return proc.segment_name

    def fault_client(self, label: str) -> RecordingClient:
        c = self._fault_clients.get(label)
        if c is None:
            assert self.master is not None
            c = RecordingClient(self._new_client(self.master.address), self.history, f"fault:{label}")
            self._fault_clients[label] = c
        return c

    def elapsed(self) -> float:
        return self.history.now()

    def holder_of_segment(self, segment_name: str) -> str:
        for i, h in enumerate(self.holders):
            if h.segment_name == segment_name:
                return f"holder:{i}"
        return ""


def _plain(d: dict[str, Any]) -> dict[str, Any]:
    """JSON-friendly copy (drops nested lists of tuples the report does not need)."""
    return {k: v for k, v in d.items() if isinstance(v, int | float | str | bool) or v is None}


DEFAULT_SEGMENT = 64 * MiB

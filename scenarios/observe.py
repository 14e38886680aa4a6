"""Watching the master while a workload runs: its event log into the history, its gauges sampled.

The tap polls the master's ``Events`` admin RPC (removals, evictions, GC removals, segments lost,
clients expired...) and appends them to the history as ``event`` rows, so a checker can explain a
miss by the removal that caused it. It also samples ``Inspect gauges`` for the memory plot
(allocated = value bytes of live replicas, reserved = what the allocators hold, capacity).

A master that restarts starts its event sequence again; the tap notices (``last_seq`` went back)
and follows the new one. Events that fell off the master's ring before the tap read them are
recorded as one ``events_lost`` row, which makes the visibility checker say "unknown" rather
than guess.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from scenarios.history import History
from store.errors import StoreError
from store.master.client import MasterClient

log = logging.getLogger("scenarios.observe")

EVENT_KINDS = frozenset(
    {
        "remove",
        "evict",
        "gc_remove",
        "object_lost",
        "replica_lost",
        "put_revoke",
        "zombie_reclaim",
        "discard",
        "discard_release",
        "client_expire",
        "unmount",
        "mount",
        "client_register",
        "gc_queue_full",
    }
)
REMOVAL_KINDS = frozenset(
    {"remove", "evict", "gc_remove", "object_lost", "put_revoke", "zombie_reclaim", "discard"}
)


class MasterTap:
    def __init__(self, address: str, history: History, interval: float = 0.1) -> None:
        self.mc = MasterClient(address, timeout=2.0, connect_timeout=1.0)
        self.history = history
        self.interval = interval
        self.seq = 0
        self.samples: list[dict[str, Any]] = []
        self.failures = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> MasterTap:
        self.seq = self._current_seq()
        self._thread = threading.Thread(target=self._run, name="master-tap", daemon=True)
        self._thread.start()
        return self

    def _current_seq(self) -> int:
        try:
            return int(self.mc.events(since=0, limit=0)["last_seq"])
        except StoreError:
            return 0

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll()

    def poll(self) -> None:
        with self._lock:
            try:
                self._poll_events()
                self._sample()
            except StoreError as exc:
                self.failures += 1
                log.debug("master tap: %s", exc)

    def _poll_events(self) -> None:
        while True:
            local_now = time.monotonic()
            res = self.mc.events(since=self.seq, limit=5000)
            if res["last_seq"] < self.seq:  # the master restarted: a new sequence
                self.seq = 0
                continue
            offset = local_now - float(res["now"])
            if res.get("lost"):
                self.history.event("events_lost", local_now, detail={"since": self.seq})
            for ev in res["events"]:
                self.seq = max(self.seq, int(ev["seq"]))
                kind = ev.get("kind", "")
                if kind not in EVENT_KINDS:
                    continue
                detail = {k: v for k, v in ev.items() if k not in ("kind", "t", "key")}
                self.history.event(
                    kind,
                    float(ev["t"]) + offset,
                    key=str(ev.get("key", "") or ""),
                    size=int(ev.get("size", 0) or 0),
                    detail=detail,
                )
            if len(res["events"]) < 5000:
                return

    def _sample(self) -> None:
        g = self.mc.inspect("gauges")
        self.samples.append(
            {
                "variant": self.history.variant,
                "t": self.history.now(),
                "allocated_bytes": g["allocated_bytes"],
                "reserved_bytes": g["reserved_bytes"],
                "capacity_bytes": g["total_capacity_bytes"],
                "key_count": g["key_count"],
                "used_ratio": g["used_ratio"],
            }
        )

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self.poll()
        self.mc.close()

"""Runs a fault plan against a live cluster: fires each entry on its trigger and ends its window.

- ``phase: start`` entries change the :class:`~fault.registry.StartConfig` before processes start;
- ``phase: setup`` entries are applied in plan order by :meth:`FaultScheduler.run_setup`;
- ``at`` entries fire on the scheduler's own thread at their time after :meth:`start`;
- ``after_ops`` / ``probability`` entries are checked in :meth:`on_op` (called after every
  completed client operation, from the worker's thread): the check is a counter comparison or
  one draw from the entry's seeded generator — the n-th draw always belongs to the n-th completed
  operation, so a seed replays the same decisions — and the firing itself is handed to the
  scheduler thread, so a worker never waits for a process to die.

An entry with a ``duration`` is reverted that many seconds after it fired; whatever is still
active when the workload ends is reverted by :meth:`stop` (last fired first). Every action is
reported to ``record(label, fault, target, action, t_start, t_end, detail, error)``; an injector
that fails is recorded with its error and the run goes on (the scenario's expectations decide
whether that matters).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from fault.plan import FaultPlan
from fault.registry import FaultContext, Injector, StartConfig, instantiate

log = logging.getLogger("fault.scheduler")

Recorder = Callable[[str, str, str, str, float, float, dict[str, Any], str], None]


class FaultScheduler:
    """See the module docstring."""

    def __init__(self, plan: FaultPlan, seed: int, record: Recorder) -> None:
        self.plan = plan
        self.seed = seed
        self.record = record
        self.injectors: list[Injector] = instantiate(plan, seed)
        self.ctx: FaultContext | None = None
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._queue: list[tuple[float, int, str, int]] = []  # (due monotonic, seq, action, index)
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._active: list[int] = []  # indices applied and not yet reverted
        self._fired: dict[int, int] = dict.fromkeys(range(len(self.injectors)), 0)
        self._pending_ops = [i for i, inj in enumerate(self.injectors) if inj.spec.when.after_ops is not None]
        self._prob = [i for i, inj in enumerate(self.injectors) if inj.spec.when.probability is not None]
        self.t_start = 0.0
        self.errors: list[str] = []

    # ------------------------------------------------------------------ phases

    def configure_start(self, start: StartConfig) -> None:
        for i, inj in enumerate(self.injectors):
            if inj.spec.when.phase != "start":
                continue
            t = time.monotonic()
            try:
                detail = inj.configure(start)
                err = ""
            except Exception as exc:  # noqa: BLE001 - recorded; the expectations judge
                detail, err = {}, f"{type(exc).__name__}: {exc}"
                self.errors.append(f"{inj.spec.label}: {err}")
            self._fired[i] += 1
            self.record(
                inj.spec.label, inj.name, inj.spec.target, "configure", t, time.monotonic(), detail, err
            )

    def bind(self, ctx: FaultContext) -> None:
        self.ctx = ctx

    def run_setup(self) -> None:
        for i, inj in enumerate(self.injectors):
            if inj.spec.when.phase == "setup":
                self._apply(i)
                if inj.duration:
                    time.sleep(inj.duration)
                    self._revert(i)

    def start(self) -> None:
        """The workload starts now: schedule the timed entries."""
        self.t_start = time.monotonic()
        with self._cond:
            for i, inj in enumerate(self.injectors):
                if inj.spec.when.at is not None:
                    heapq.heappush(
                        self._queue, (self.t_start + inj.spec.when.at, next(self._seq), "apply", i)
                    )
            self._cond.notify()
        self._thread = threading.Thread(target=self._loop, name="fault-scheduler", daemon=True)
        self._thread.start()

    def on_op(self, completed: int) -> None:
        """Called after each completed operation; see the module docstring."""
        if not self._pending_ops and not self._prob:
            return
        due: list[int] = []
        with self._cond:
            for i in list(self._pending_ops):
                after = self.injectors[i].spec.when.after_ops
                assert after is not None
                if completed >= after:
                    self._pending_ops.remove(i)
                    due.append(i)
            for i in list(self._prob):
                inj = self.injectors[i]
                if inj.rng.random() < float(inj.spec.when.probability or 0.0):
                    self._fired[i] += 1  # counted at the draw so max_times holds under concurrency
                    due.append(i)
                    if self._fired[i] >= inj.spec.when.max_times:
                        self._prob.remove(i)
            now = time.monotonic()
            for i in due:
                heapq.heappush(self._queue, (now, next(self._seq), "apply", i))
            if due:
                self._cond.notify()

    def stop(self) -> None:
        """End of the workload: fire what was already due (an operation crossed its trigger),
        drop what was not, then revert what is active."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(30)
        with self._cond:
            now = time.monotonic()
            due = sorted(e for e in self._queue if e[2] == "apply" and e[0] <= now)
            self._queue.clear()
        for _, _, _, i in due:
            self._apply(i)
        for i in reversed(list(self._active)):
            self._revert(i)

    def active(self) -> list[str]:
        return [self.injectors[i].spec.label for i in self._active]

    def fired(self) -> dict[str, int]:
        return {inj.spec.label: self._fired[i] for i, inj in enumerate(self.injectors)}

    # ------------------------------------------------------------------ internals

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and (not self._queue or self._queue[0][0] > time.monotonic()):
                    timeout = None if not self._queue else max(0.0, self._queue[0][0] - time.monotonic())
                    self._cond.wait(timeout)
                if self._stopping:
                    return
                _, _, action, i = heapq.heappop(self._queue)
            if action == "apply":
                self._apply(i)
                dur = self.injectors[i].duration
                if dur is not None and i in self._active:
                    with self._cond:
                        heapq.heappush(self._queue, (time.monotonic() + dur, next(self._seq), "revert", i))
                        self._cond.notify()
            else:
                self._revert(i)

    def _apply(self, i: int) -> None:
        inj = self.injectors[i]
        assert self.ctx is not None, "bind() the scheduler to a cluster first"
        t = time.monotonic()
        try:
            detail = inj.apply(self.ctx)
            err = ""
            if inj.needs_revert():
                with self._lock:
                    self._active.append(i)
        except Exception as exc:  # noqa: BLE001 - recorded; the expectations judge
            detail, err = {}, f"{type(exc).__name__}: {exc}"
            self.errors.append(f"{inj.spec.label}: {err}")
            log.warning("fault %s failed to apply: %s", inj.spec.label, err)
        if inj.spec.when.probability is None:
            self._fired[i] += 1
        log.info("fault %s applied (%s): %s", inj.spec.label, inj.spec.when.describe(), detail or err)
        self.record(inj.spec.label, inj.name, inj.spec.target, "apply", t, time.monotonic(), detail, err)

    def _revert(self, i: int) -> None:
        with self._lock:
            if i not in self._active:
                return
            self._active.remove(i)
        inj = self.injectors[i]
        assert self.ctx is not None
        t = time.monotonic()
        try:
            detail = inj.revert(self.ctx)
            err = ""
        except Exception as exc:  # noqa: BLE001 - recorded; the expectations judge
            detail, err = {}, f"{type(exc).__name__}: {exc}"
            self.errors.append(f"{inj.spec.label} revert: {err}")
            log.warning("fault %s failed to revert: %s", inj.spec.label, err)
        log.info("fault %s reverted: %s", inj.spec.label, detail or err)
        self.record(inj.spec.label, inj.name, inj.spec.target, "revert", t, time.monotonic(), detail, err)

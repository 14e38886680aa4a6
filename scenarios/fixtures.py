"""pytest fixtures for writing fault tests against a real cluster: ``cluster``, ``fault_plan``,
``history``, ``umbra_seed``.

Register with ``pytest_plugins = ("scenarios.fixtures",)`` (or through Umbra's pytest plugin)::

    def test_master_rpc_error(cluster, fault_plan):
        plan = fault_plan({"faults": [{"fault": "failpoint", "target": "master", "when": "setup",
                                       "params": {"point": "master.put_start", "action": "error",
                                                  "arg": "NO_AVAILABLE_HANDLE", "count": 1}}]})
        c = cluster(holders=1, clients=1, plan=plan)      # starts processes, runs setup faults
        assert c.clients[0].put("k", b"x" * 4096) == -200
        assert c.clients[0].put("k", b"x" * 4096) == 0

The seed is ``UMBRA_TEST_SEED`` (default 20261128); failure messages should print it. Every
process and client a test starts is stopped when the test ends, whatever happened.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fault.plan import FaultPlan, load_plan
from fault.registry import StartConfig, validate_plan
from fault.scheduler import FaultScheduler
from scenarios.history import History
from scenarios.topology import Cluster, TopologySpec

DEFAULT_SEED = 20261128


@pytest.fixture
def umbra_seed() -> int:
    """The seed for every random choice of the test (``UMBRA_TEST_SEED``)."""
    return int(os.environ.get("UMBRA_TEST_SEED", DEFAULT_SEED))


@pytest.fixture
def history() -> History:
    """An empty history; clusters made by the ``cluster`` fixture record into it."""
    return History()


@pytest.fixture
def fault_plan(umbra_seed: int) -> Callable[[Any], FaultPlan]:
    """``fault_plan(source)``: load (YAML text, path, dict, list) and validate a plan, seeded."""

    def load(source: Any) -> FaultPlan:
        return validate_plan(load_plan(source)).with_seed(umbra_seed)

    return load


class ClusterHandle(Cluster):
    """A started cluster plus the scheduler of its plan (``scheduler.start()`` fires timed faults)."""

    scheduler: FaultScheduler


@pytest.fixture
def cluster(history: History, umbra_seed: int, tmp_path: Path) -> Iterator[Callable[..., ClusterHandle]]:
    """``cluster(plan=None, **TopologySpec fields)`` → a started :class:`Cluster`: start-phase faults
    configured, setup-phase faults applied; timed faults wait for ``c.scheduler.start()``."""
    made: list[tuple[Cluster, FaultScheduler]] = []

    def make(plan: FaultPlan | None = None, **spec: Any) -> ClusterHandle:
        plan = (plan or FaultPlan()).with_seed(plan.seed if plan and plan.seed is not None else umbra_seed)
        sched = FaultScheduler(validate_plan(plan), umbra_seed, history.record_fault)
        start = StartConfig()
        sched.configure_start(start)
        c = ClusterHandle(
            TopologySpec(**spec),
            run_dir=tmp_path / f"cluster-{len(made)}",
            history=history,
            seed=umbra_seed,
            start=start,
            name=f"c{len(made)}-",
        )
        made.append((c, sched))
        c.start()
        c.scheduler = sched
        sched.bind(c)
        history.on_op(sched.on_op)
        sched.run_setup()
        return c

    yield make
    for c, sched in reversed(made):
        sched.stop()
        c.close()

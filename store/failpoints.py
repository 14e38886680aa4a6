"""Named failpoints: the only door through which faults enter the store.

Every protocol step calls ``failpoint("component.step", **ids)``. When nothing is armed that is one
truthiness check of a module-level dict, so the hooks can stay in hot paths. The fault layer (or a
test) arms a point with an action:

- ``error(code)``: raise :class:`~store.errors.StoreError` with that code,
- ``sleep(seconds)``: delay the step,
- ``pause``: block until :func:`release` is called (for race windows a test wants to hold open),
- ``panic``: kill the process at once (``os._exit``), as a crash at exactly that step,
- ``call``: run a Python callable with the step's ids (in-process only),
- ``off``: disarm.

``count`` limits how many times an action fires; ``probability`` draws from a ``random.Random``
seeded per point, so a run replays. Arming also works across processes via the environment
variable ``UMBRA_FAILPOINTS`` with the spec syntax ``name=action[(arg)][*count][%prob][@seed]``,
several separated by ``;``; for example ``rdma.post_send=error(-800)*3;master.put_end=sleep(0.5)``.
"""

from __future__ import annotations

import logging
import os
import random
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from store.errors import ErrorCode, StoreError

log = logging.getLogger(__name__)

ENV_VAR = "UMBRA_FAILPOINTS"
ACTIONS = ("error", "sleep", "pause", "panic", "call", "off")


@dataclass
class Failpoint:
    """One armed point. Read-only for callers except through the module functions."""

    name: str
    action: str
    arg: Any = None
    count: int | None = None  # None = unlimited
    probability: float = 1.0
    seed: int = 0
    hits: int = 0  # times the step was reached while armed
    fired: int = 0  # times the action ran
    _rng: random.Random = field(default_factory=random.Random, repr=False)
    _released: threading.Event = field(default_factory=threading.Event, repr=False)

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"unknown failpoint action {self.action!r} for {self.name!r}; "
                             f"expected one of {ACTIONS}")
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"failpoint {self.name!r}: probability must be in [0, 1]")
        self._rng.seed(self.seed)


_armed: dict[str, Failpoint] = {}
_history: list[tuple[float, str, str, dict[str, Any]]] = []
_lock = threading.Lock()
_HISTORY_CAP = 10_000


def failpoint(name: str, **ids: Any) -> None:
    """Mark a protocol step. Cheap when nothing is armed; fires the armed action otherwise."""
    if not _armed:
        return
    fp = _armed.get(name)
    if fp is None:
        return
    _fire(fp, ids)


def _fire(fp: Failpoint, ids: dict[str, Any]) -> None:
    with _lock:
        fp.hits += 1
        if fp.count is not None and fp.fired >= fp.count:
            return
        if fp.probability < 1.0 and fp._rng.random() >= fp.probability:
            return
        fp.fired += 1
        if len(_history) < _HISTORY_CAP:
            _history.append((time.time(), fp.name, fp.action, dict(ids)))
    log.info("failpoint fired name=%s action=%s arg=%r ids=%s", fp.name, fp.action, fp.arg, ids)
    if fp.action == "error":
        code = ErrorCode(int(fp.arg)) if fp.arg is not None else ErrorCode.INTERNAL_ERROR
        raise StoreError(code, f"failpoint {fp.name} injected {code.name} ids={ids}")
    if fp.action == "sleep":
        time.sleep(float(fp.arg or 0.0))
    elif fp.action == "pause":
        timeout = float(fp.arg) if fp.arg is not None else None
        fp._released.wait(timeout)
    elif fp.action == "panic":
        os._exit(int(fp.arg) if fp.arg is not None else 137)
    elif fp.action == "call":
        fp.arg(**ids)


def arm(name: str, action: str, arg: Any = None, *, count: int | None = None,
        probability: float = 1.0, seed: int = 0) -> Failpoint:
    """Arm ``name``; replaces any earlier arming of the same point."""
    if action == "off":
        disarm(name)
        return Failpoint(name, "off")
    if action == "call" and not callable(arg):
        raise ValueError(f"failpoint {name!r}: action 'call' needs a callable")
    fp = Failpoint(name, action, arg, count, probability, seed)
    with _lock:
        old = _armed.get(name)
        _armed[name] = fp
    if old is not None:
        old._released.set()
    return fp


def disarm(name: str) -> None:
    with _lock:
        fp = _armed.pop(name, None)
    if fp is not None:
        fp._released.set()


def disarm_all() -> None:
    with _lock:
        points = list(_armed.values())
        _armed.clear()
    for fp in points:
        fp._released.set()


def release(name: str) -> None:
    """Let every thread paused at ``name`` continue (the point stays armed)."""
    fp = _armed.get(name)
    if fp is not None:
        fp._released.set()


def armed() -> dict[str, Failpoint]:
    """A snapshot of the armed points (for checkers and reports)."""
    with _lock:
        return dict(_armed)


def history() -> list[tuple[float, str, str, dict[str, Any]]]:
    """Every firing so far: ``(unix_time, name, action, ids)``."""
    with _lock:
        return list(_history)


def clear_history() -> None:
    with _lock:
        _history.clear()


_SPEC_RE = re.compile(
    r"^(?P<name>[\w.\-]+)=(?P<action>[a-z]+)(?:\((?P<arg>[^)]*)\))?"
    r"(?:\*(?P<count>\d+))?(?:%(?P<prob>[0-9.]+))?(?:@(?P<seed>\d+))?$"
)


def parse_spec(spec: str) -> list[Failpoint]:
    """Parse ``name=action(arg)*count%prob@seed;...`` into (unarmed) failpoints."""
    points = []
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        m = _SPEC_RE.match(part)
        if not m:
            raise ValueError(f"bad failpoint spec {part!r}: "
                             "expected name=action[(arg)][*count][%prob][@seed]")
        action = m.group("action")
        arg: Any = m.group("arg")
        if arg is not None and action in ("error", "panic"):
            arg = int(arg)
        elif arg is not None and action in ("sleep", "pause"):
            arg = float(arg)
        points.append(Failpoint(
            name=m.group("name"), action=action, arg=arg,
            count=int(m.group("count")) if m.group("count") else None,
            probability=float(m.group("prob")) if m.group("prob") else 1.0,
            seed=int(m.group("seed")) if m.group("seed") else 0,
        ))
    return points


def arm_from_spec(spec: str) -> list[Failpoint]:
    return [arm(p.name, p.action, p.arg, count=p.count, probability=p.probability, seed=p.seed)
            for p in parse_spec(spec)]


def arm_from_env(environ: dict[str, str] | None = None) -> list[Failpoint]:
    """Arm what ``UMBRA_FAILPOINTS`` names; servers call this at start so child processes obey."""
    spec = (environ if environ is not None else os.environ).get(ENV_VAR, "")
    return arm_from_spec(spec) if spec else []


Hook = Callable[..., None]

"""Fault plans: which fault, on what, when, with which parameters — as data.

A plan is a list of entries ``{fault, target, when, params}`` plus an optional seed. It can be
written in YAML or JSON, or built in Python, and it is written back (with the seed of the run) into
every report so a run can be replayed::

    seed: 20261128            # optional; `umbra run --seed` overrides it
    faults:
      - fault: process.kill
        target: holder:0
        when: {at: 1.5}             # seconds after the workload starts
      - fault: network.reset
        target: proxy:transfer
        when: {after_ops: 200}      # once 200 operations have completed
        params: {duration: 2.0, probability: 0.5}
      - fault: failpoint
        target: master
        when: {probability: 0.01}   # drawn after every completed operation (seeded), once
        params: {point: master.put_end, action: error, arg: -900, count: 3}
      - fault: gc.legacy
        target: master
        when: start                 # before the processes start (flags, environment)

``when`` takes exactly one trigger:

- ``at: T`` — T seconds after the workload starts;
- ``after_ops: N`` — once N operations (of any client) have completed;
- ``probability: P`` — after every completed operation a draw from the fault's own seeded
  generator fires the fault when it is below P; ``max_times`` (default 1) bounds the firings;
- ``phase: start`` — configures the cluster before its processes start (master flags, the
  ``UMBRA_FAILPOINTS`` environment of child processes);
- ``phase: setup`` — applied in plan order once the cluster is up and before the workload runs.

Short forms are accepted: ``when: start``, ``when: setup``, ``when: "at 1.5"``,
``when: "after 200 ops"``, ``when: "p=0.01"``.

Loading checks the shape here (:func:`load_plan`) and then each entry against the injector that
serves its fault (:func:`fault.registry.validate_plan`): unknown faults (with the closest names),
unknown or ill-typed parameters, targets the injector cannot act on and triggers it does not
support are all refused with the entry's position in the message, before anything starts.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

PHASES = ("start", "setup")
_WHEN_KEYS = ("at", "after_ops", "probability", "phase")
_WHEN_EXTRA = ("max_times",)
_ENTRY_KEYS = ("fault", "target", "when", "params", "name")


class PlanError(ValueError):
    """A plan that cannot run; the message names the entry and the field (``faults[2].when.at``)."""


@dataclass(frozen=True)
class When:
    """The trigger of one fault (exactly one of the fields below is set)."""

    at: float | None = None
    after_ops: int | None = None
    probability: float | None = None
    phase: str | None = None
    max_times: int = 1

    @property
    def kind(self) -> str:
        """``at`` | ``after_ops`` | ``probability`` | ``phase``."""
        for k in _WHEN_KEYS:
            if getattr(self, k) is not None:
                return k
        raise PlanError("when has no trigger")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {self.kind: getattr(self, self.kind)}
        if self.kind == "probability" and self.max_times != 1:
            out["max_times"] = self.max_times
        return out

    def describe(self) -> str:
        k = self.kind
        if k == "at":
            return f"at t={self.at:g}s"
        if k == "after_ops":
            return f"after {self.after_ops} ops"
        if k == "probability":
            return f"p={self.probability:g} per op (max {self.max_times})"
        return f"phase {self.phase}"

    @classmethod
    def parse(cls, value: Any, where: str = "when") -> When:
        if isinstance(value, When):
            return value
        if isinstance(value, str):
            return cls.parse(_when_shorthand(value, where), where)
        if not isinstance(value, Mapping):
            raise PlanError(
                f"{where}: expected a mapping such as {{at: 1.5}} or a short form "
                f"('start', 'setup', 'at 1.5', 'after 200 ops', 'p=0.01'), got {value!r}"
            )
        unknown = set(value) - set(_WHEN_KEYS) - set(_WHEN_EXTRA)
        if unknown:
            raise PlanError(
                f"{where}: unknown key(s) {sorted(map(str, unknown))}; triggers are {list(_WHEN_KEYS)}"
            )
        given = [k for k in _WHEN_KEYS if value.get(k) is not None]
        if len(given) != 1:
            raise PlanError(
                f"{where}: exactly one trigger of {list(_WHEN_KEYS)} is needed, got {given or 'none'}"
            )
        k = given[0]
        v = value[k]
        if "max_times" in value and k != "probability":
            raise PlanError(f"{where}.max_times: only a probability trigger repeats")
        if k == "at":
            at = _number(v, f"{where}.at")
            if at < 0:
                raise PlanError(f"{where}.at: must be >= 0 seconds, got {at}")
            return cls(at=at)
        if k == "after_ops":
            n = _integer(v, f"{where}.after_ops")
            if n < 0:
                raise PlanError(f"{where}.after_ops: must be >= 0, got {n}")
            return cls(after_ops=n)
        if k == "probability":
            p = _number(v, f"{where}.probability")
            if not 0.0 < p <= 1.0:
                raise PlanError(f"{where}.probability: must be in (0, 1], got {p}")
            times = _integer(value.get("max_times", 1), f"{where}.max_times")
            if times < 1:
                raise PlanError(f"{where}.max_times: must be >= 1, got {times}")
            return cls(probability=p, max_times=times)
        if v not in PHASES:
            raise PlanError(f"{where}.phase: must be one of {list(PHASES)}, got {v!r}")
        return cls(phase=str(v))


_AT_RE = re.compile(r"^at\s*(?:t\s*=\s*)?([0-9.]+)\s*s?$")
_OPS_RE = re.compile(r"^after\s+(\d+)\s*ops?$")
_P_RE = re.compile(r"^(?:p|probability)\s*=\s*([0-9.]+)$")


def _when_shorthand(text: str, where: str) -> dict[str, Any]:
    t = text.strip().lower()
    if t in PHASES:
        return {"phase": t}
    for rx, key, conv in ((_AT_RE, "at", float), (_OPS_RE, "after_ops", int), (_P_RE, "probability", float)):
        m = rx.match(t)
        if m:
            try:
                return {key: conv(m.group(1))}
            except ValueError:
                break
    raise PlanError(
        f"{where}: cannot read {text!r}; short forms are 'start', 'setup', 'at 1.5', "
        "'after 200 ops', 'p=0.01'"
    )


def _number(v: Any, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise PlanError(f"{where}: expected a number, got {v!r}")
    return float(v)


def _integer(v: Any, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise PlanError(f"{where}: expected an integer, got {v!r}")
    return v


@dataclass(frozen=True)
class FaultSpec:
    """One plan entry. ``name`` labels it in histories and plots (default ``fault@target``)."""

    fault: str
    target: str
    when: When
    params: dict[str, Any] = field(default_factory=dict)
    name: str = ""

    @property
    def label(self) -> str:
        return self.name or f"{self.fault}@{self.target}"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"fault": self.fault, "target": self.target, "when": self.when.to_dict()}
        if self.params:
            out["params"] = dict(self.params)
        if self.name:
            out["name"] = self.name
        return out


@dataclass(frozen=True)
class FaultPlan:
    """An ordered list of faults and the seed that drives every random choice they make."""

    faults: tuple[FaultSpec, ...] = ()
    seed: int | None = None

    def with_seed(self, seed: int) -> FaultPlan:
        return replace(self, seed=seed)

    def by_phase(self, phase: str) -> list[tuple[int, FaultSpec]]:
        return [(i, f) for i, f in enumerate(self.faults) if f.when.phase == phase]

    def timed(self) -> list[tuple[int, FaultSpec]]:
        """Entries whose trigger fires while the workload runs (``at``/``after_ops``/``probability``)."""
        return [(i, f) for i, f in enumerate(self.faults) if f.when.phase is None]

    def rng(self, index: int, seed: int | None = None) -> random.Random:
        """The generator of entry ``index``: a function of the seed, the position and the fault
        only, so adding a fault elsewhere in the plan does not change this one's draws."""
        s = self.seed if seed is None else seed
        return random.Random(f"umbra-fault:{s}:{index}:{self.faults[index].fault}")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"faults": [f.to_dict() for f in self.faults]}
        if self.seed is not None:
            out["seed"] = self.seed
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def __len__(self) -> int:
        return len(self.faults)


def _entry(raw: Any, where: str) -> FaultSpec:
    if not isinstance(raw, Mapping):
        raise PlanError(f"{where}: expected a mapping with keys fault, target, when[, params], got {raw!r}")
    unknown = set(raw) - set(_ENTRY_KEYS)
    if unknown:
        raise PlanError(f"{where}: unknown key(s) {sorted(map(str, unknown))}; allowed: {list(_ENTRY_KEYS)}")
    fault = raw.get("fault")
    if not isinstance(fault, str) or not fault.strip():
        raise PlanError(f"{where}.fault: expected a fault name such as 'process.kill', got {fault!r}")
    target = raw.get("target")
    if not isinstance(target, str) or not target.strip():
        raise PlanError(f"{where}.target: expected a target such as 'master' or 'holder:0', got {target!r}")
    if "when" not in raw:
        raise PlanError(
            f"{where}.when: missing; say when the fault fires (at / after_ops / probability / phase)"
        )
    when = When.parse(raw["when"], f"{where}.when")
    params = raw.get("params") or {}
    if not isinstance(params, Mapping) or not all(isinstance(k, str) for k in params):
        raise PlanError(f"{where}.params: expected a mapping of names to values, got {params!r}")
    name = raw.get("name", "") or ""
    if not isinstance(name, str):
        raise PlanError(f"{where}.name: expected a string, got {name!r}")
    return FaultSpec(fault.strip(), target.strip(), when, dict(params), name)


def plan_from_data(data: Any, source: str = "plan") -> FaultPlan:
    """A plan from parsed YAML/JSON: a mapping ``{faults: [...], seed: N}`` or a bare list."""
    if data is None:
        return FaultPlan()
    if isinstance(data, list | tuple):
        data = {"faults": list(data)}
    if not isinstance(data, Mapping):
        raise PlanError(
            f"{source}: expected a mapping with 'faults' (and optionally 'seed') or a list "
            f"of faults, got {type(data).__name__}"
        )
    unknown = set(data) - {"faults", "seed"}
    if unknown:
        raise PlanError(f"{source}: unknown key(s) {sorted(map(str, unknown))}; allowed: faults, seed")
    seed = data.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise PlanError(f"{source}.seed: expected a non-negative integer, got {seed!r}")
    faults = data.get("faults") or []
    if not isinstance(faults, list | tuple):
        raise PlanError(f"{source}.faults: expected a list, got {type(faults).__name__}")
    return FaultPlan(tuple(_entry(f, f"{source}.faults[{i}]") for i, f in enumerate(faults)), seed)


def parse_plan_text(text: str, source: str = "plan") -> FaultPlan:
    """YAML (JSON is YAML too) text to a plan."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PlanError(f"{source}: not valid YAML/JSON: {exc}") from exc
    return plan_from_data(data, source)


def load_plan(source: str | Path | Mapping[str, Any] | Iterable[Any] | FaultPlan) -> FaultPlan:
    """A plan from a file path (``.yaml``/``.yml``/``.json``), YAML/JSON text, parsed data or a
    plan. Shape errors raise :class:`PlanError`; see :func:`fault.registry.validate_plan` for the
    check against the injectors."""
    if isinstance(source, FaultPlan):
        return source
    if isinstance(source, Path) or (
        isinstance(source, str) and source.strip().endswith((".yaml", ".yml", ".json")) and "\n" not in source
    ):
        path = Path(source)
        try:
            text = path.read_text()
        except OSError as exc:
            raise PlanError(f"cannot read plan file {path}: {exc}") from exc
        return parse_plan_text(text, str(path))
    if isinstance(source, str):
        return parse_plan_text(source)
    if isinstance(source, Mapping):
        return plan_from_data(source)
    return plan_from_data(list(source))

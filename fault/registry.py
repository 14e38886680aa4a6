"""The injector registry: fault names → the classes that act on the real mechanism.

An injector is registered under its fault name (``failpoint``, ``memory.fill``, ``network.reset``,
``process.kill``, ``gc.legacy``...) with :func:`register`. The registry is open: any module can add
injectors (the RDMA QP faults will register ``qp.*`` names from their own module once the RDMA
transport lands) without touching this file; :func:`load_builtin` imports the built-in ones.

Each injector declares what the plan may say about it — its parameters (:class:`Param`: type,
default, range, choices), the targets it acts on (patterns such as ``holder:N``) and the triggers
it supports — so :func:`validate_plan` can refuse a bad plan before any process starts. At run time
it gets a :class:`FaultContext` (implemented by the scenario's cluster) to reach processes,
proxies, the master's admin RPCs and a recording client; it never reaches into the store
otherwise.
"""

from __future__ import annotations

import difflib
import importlib
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from fault.plan import FaultPlan, FaultSpec, PlanError
from store.errors import ErrorCode
from store.units import parse_size

BUILTIN_MODULES = (
    "fault.injectors.failpoint",
    "fault.injectors.memory",
    "fault.injectors.network",
    "fault.injectors.process",
    "fault.injectors.gc",
)
TRIGGERS = ("start", "setup", "at", "after_ops", "probability")
RUNTIME = frozenset({"setup", "at", "after_ops", "probability"})


class FaultError(RuntimeError):
    """An injector could not act (target missing, process already dead, RPC refused...)."""


# ------------------------------------------------------------------------------------- params


@dataclass(frozen=True)
class Param:
    """One parameter an injector takes. ``kind``: ``float``, ``int``, ``bool``, ``str``,
    ``size`` (bytes; ``"4mb"`` accepted), ``sizes`` (a list of sizes, or ``[lo, hi]`` with
    ``range: true`` in the value: see :func:`parse_sizes`), ``code`` (an ErrorCode number or
    name), ``any``."""

    kind: str
    doc: str
    default: Any = None
    required: bool = False
    choices: tuple[Any, ...] = ()
    minimum: float | None = None
    maximum: float | None = None

    def convert(self, value: Any, where: str) -> Any:
        k = self.kind
        if k == "any":
            return value
        if k == "bool":
            if not isinstance(value, bool):
                raise PlanError(f"{where}: expected true/false, got {value!r}")
            return value
        if k == "str":
            if not isinstance(value, str):
                raise PlanError(f"{where}: expected a string, got {value!r}")
            out: Any = value
        elif k in ("float", "int"):
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or (k == "int" and not isinstance(value, int))
            ):
                what = "an integer" if k == "int" else "a number"
                raise PlanError(f"{where}: expected {what}, got {value!r}")
            out = float(value) if k == "float" else int(value)
        elif k == "size":
            try:
                out = parse_size(value)
            except ValueError as exc:
                raise PlanError(f"{where}: {exc}") from None
        elif k == "sizes":
            out = parse_sizes(value, where)
        elif k == "code":
            out = parse_code(value, where)
        else:
            raise PlanError(f"{where}: injector declares unknown parameter kind {k!r}")
        if self.choices and out not in self.choices:
            raise PlanError(f"{where}: must be one of {list(self.choices)}, got {value!r}")
        if self.minimum is not None and isinstance(out, int | float) and out < self.minimum:
            raise PlanError(f"{where}: must be >= {self.minimum:g}, got {value!r}")
        if self.maximum is not None and isinstance(out, int | float) and out > self.maximum:
            raise PlanError(f"{where}: must be <= {self.maximum:g}, got {value!r}")
        return out


@dataclass(frozen=True)
class SizeMix:
    """Sizes to draw from: explicit choices (with optional weights) or a uniform range."""

    choices: tuple[int, ...] = ()
    weights: tuple[float, ...] = ()
    low: int = 0
    high: int = 0

    def draw(self, rng: random.Random) -> int:
        if self.choices:
            if self.weights:
                return rng.choices(self.choices, weights=self.weights)[0]
            return rng.choice(self.choices)
        return rng.randint(self.low, self.high)

    @property
    def largest(self) -> int:
        return max(self.choices) if self.choices else self.high

    def to_data(self) -> Any:
        if self.choices:
            out: dict[str, Any] = {"choices": list(self.choices)}
            if self.weights:
                out["weights"] = list(self.weights)
            return out
        return {"range": [self.low, self.high]}


def parse_sizes(value: Any, where: str) -> SizeMix:
    """``4mb`` / ``[64kb, 1mb]`` (choices) / ``{range: [64kb, 1mb]}`` /
    ``{choices: [...], weights: [...]}``."""

    def one(v: Any) -> int:
        try:
            n = parse_size(v)
        except ValueError as exc:
            raise PlanError(f"{where}: {exc}") from None
        if n < 1:
            raise PlanError(f"{where}: sizes must be >= 1 byte, got {v!r}")
        return n

    if isinstance(value, SizeMix):
        return value
    if isinstance(value, int | str) and not isinstance(value, bool):
        return SizeMix(choices=(one(value),))
    if isinstance(value, list | tuple):
        if not value:
            raise PlanError(f"{where}: empty size list")
        return SizeMix(choices=tuple(one(v) for v in value))
    if isinstance(value, dict):
        if set(value) == {"range"}:
            r = value["range"]
            if not isinstance(r, list | tuple) or len(r) != 2:
                raise PlanError(f"{where}.range: expected [low, high], got {r!r}")
            lo, hi = one(r[0]), one(r[1])
            if lo > hi:
                raise PlanError(f"{where}.range: low {lo} > high {hi}")
            return SizeMix(low=lo, high=hi)
        if set(value) <= {"choices", "weights"} and "choices" in value:
            mix = parse_sizes(value["choices"], f"{where}.choices")
            weights = value.get("weights") or ()
            if weights:
                if len(weights) != len(mix.choices) or not all(
                    isinstance(w, int | float) and not isinstance(w, bool) and w >= 0 for w in weights
                ):
                    raise PlanError(f"{where}.weights: one non-negative weight per choice is needed")
                if sum(weights) <= 0:
                    raise PlanError(f"{where}.weights: at least one weight must be > 0")
            return SizeMix(choices=mix.choices, weights=tuple(float(w) for w in weights))
    raise PlanError(
        f"{where}: expected a size, a list of sizes, {{range: [lo, hi]}} or "
        f"{{choices: [...], weights: [...]}}, got {value!r}"
    )


def parse_code(value: Any, where: str) -> int:
    """An ErrorCode by number (``-800``) or name (``TRANSFER_FAIL``); undocumented numbers refused."""
    if isinstance(value, str) and not value.lstrip("-").isdigit():
        try:
            return int(ErrorCode[value.strip().upper()])
        except KeyError:
            raise PlanError(f"{where}: {value!r} is not an ErrorCode name") from None
    try:
        return int(ErrorCode(int(value)))
    except (TypeError, ValueError):
        raise PlanError(f"{where}: {value!r} is not a documented ErrorCode") from None


# ------------------------------------------------------------------------------------- context


class RecordingClientLike(Protocol):
    """What an injector needs of a client: Mooncake's calls, each recorded in the run's history."""

    def put(self, key: str, value: bytes, config: Any = None, note: str = "") -> int: ...
    def remove(self, key: str, force: bool = False, note: str = "") -> int: ...


@dataclass
class StartConfig:
    """What ``phase: start`` faults may change before the processes start."""

    master_flags: list[str] = field(default_factory=list)
    failpoints: dict[str, list[str]] = field(default_factory=dict)  # target → spec parts
    env: dict[str, dict[str, str]] = field(default_factory=dict)  # target → extra environment

    def add_failpoint(self, target: str, spec: str) -> None:
        self.failpoints.setdefault(target, []).append(spec)

    def failpoint_env(self, target: str, index: int | None = None) -> dict[str, str]:
        """Environment for the process ``target`` (``master``, or ``holder`` with its index)."""
        keys = [target] if index is None else [f"{target}:*", f"{target}:{index}"]
        env: dict[str, str] = {}
        for k in keys:
            env.update(self.env.get(k, {}))
        specs = [s for k in keys for s in self.failpoints.get(k, [])]
        if specs:
            env["UMBRA_FAILPOINTS"] = ";".join(specs)
        return env


class FaultContext(Protocol):
    """What the scenario's cluster offers injectors (see ``scenarios.topology.Cluster``)."""

    seed: int

    def master_admin(self) -> Any: ...  # a MasterClient connected straight to the master
    def process(self, target: str) -> Any: ...  # fault.procs.ManagedProcess
    def expand(self, target: str) -> list[str]: ...  # "holder:*" → ["holder:0", ...]
    def proxy(self, name: str) -> Any: ...  # fault.proxy.TcpProxy
    def segment_name(self, target: str) -> str: ...  # "holder:0" → its segment name
    def fault_client(self, label: str) -> RecordingClientLike: ...
    def elapsed(self) -> float: ...


# ------------------------------------------------------------------------------------- injectors


class Injector:
    """Base of every injector. Subclasses set the class attributes and override :meth:`apply`
    (and :meth:`revert` when the fault is a window that ends, :meth:`configure` when it can act at
    ``phase: start``). One instance serves one plan entry, with the entry's own seeded ``rng``."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    params: ClassVar[dict[str, Param]] = {}
    targets: ClassVar[tuple[str, ...]] = ()  # regular expressions, full match
    target_help: ClassVar[str] = ""
    triggers: ClassVar[frozenset[str]] = RUNTIME
    windowed: ClassVar[bool] = False  # a `duration` param ends the fault with revert()

    def __init__(self, spec: FaultSpec, rng: random.Random) -> None:
        self.spec = spec
        self.rng = rng
        self.p = resolve_params(type(self), spec, "params")

    @classmethod
    def check(cls, spec: FaultSpec, params: dict[str, Any], where: str) -> None:
        """Cross-parameter checks (override); raise :class:`PlanError`."""

    def configure(self, start: StartConfig) -> dict[str, Any]:
        raise FaultError(f"{self.name} cannot act at phase start")

    def apply(self, ctx: FaultContext) -> dict[str, Any]:
        raise NotImplementedError

    def revert(self, ctx: FaultContext) -> dict[str, Any]:
        return {}

    @property
    def duration(self) -> float | None:
        d = self.p.get("duration")
        return float(d) if d else None

    def needs_revert(self) -> bool:
        """Whether an applied fault stays active until :meth:`revert` (its window)."""
        return self.windowed


REGISTRY: dict[str, type[Injector]] = {}


def register(cls: type[Injector]) -> type[Injector]:
    """Class decorator: make ``cls`` the injector for ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no fault name")
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise ValueError(f"fault {cls.name!r} is already registered by {REGISTRY[cls.name].__name__}")
    REGISTRY[cls.name] = cls
    return cls


def load_builtin(extra: Iterable[str] = ()) -> dict[str, type[Injector]]:
    for mod in (*BUILTIN_MODULES, *extra):
        importlib.import_module(mod)
    return REGISTRY


def get(name: str) -> type[Injector]:
    load_builtin()
    cls = REGISTRY.get(name)
    if cls is None:
        close = difflib.get_close_matches(name, REGISTRY, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise PlanError(f"unknown fault {name!r}{hint} (known: {', '.join(sorted(REGISTRY))})")
    return cls


def resolve_params(cls: type[Injector], spec: FaultSpec, where: str) -> dict[str, Any]:
    unknown = set(spec.params) - set(cls.params)
    if unknown:
        raise PlanError(
            f"{where}: {cls.name} takes no parameter(s) {sorted(unknown)}; it takes "
            f"{sorted(cls.params) or 'none'}"
        )
    out: dict[str, Any] = {}
    for pname, p in cls.params.items():
        if pname in spec.params and spec.params[pname] is not None:
            out[pname] = p.convert(spec.params[pname], f"{where}.{pname}")
        elif p.required:
            raise PlanError(f"{where}.{pname}: required by {cls.name} ({p.doc})")
        else:
            out[pname] = p.convert(p.default, f"{where}.{pname}") if p.default is not None else None
    cls.check(spec, out, where)
    return out


def validate_entry(spec: FaultSpec, where: str) -> type[Injector]:
    try:
        cls = get(spec.fault)
    except PlanError as exc:
        raise PlanError(f"{where}.fault: {exc}") from None
    if not any(re.fullmatch(p, spec.target) for p in cls.targets):
        raise PlanError(
            f"{where}.target: {cls.name} acts on {cls.target_help or cls.targets}, not {spec.target!r}"
        )
    trig = spec.when.phase or spec.when.kind
    if trig not in cls.triggers:
        raise PlanError(
            f"{where}.when: {cls.name} cannot fire at {spec.when.describe()}; it supports "
            f"{sorted(cls.triggers)}"
        )
    resolve_params(cls, spec, f"{where}.params")
    return cls


def validate_plan(plan: FaultPlan, source: str = "plan") -> FaultPlan:
    """Check every entry against its injector; returns the plan (raises :class:`PlanError`)."""
    for i, spec in enumerate(plan.faults):
        validate_entry(spec, f"{source}.faults[{i}]")
    return plan


def instantiate(plan: FaultPlan, seed: int) -> list[Injector]:
    """One injector per entry, each with its own seeded generator."""
    validate_plan(plan)
    return [get(spec.fault)(spec, plan.rng(i, seed)) for i, spec in enumerate(plan.faults)]


def catalogue() -> list[dict[str, Any]]:
    """Every registered fault with its targets, triggers and parameters (``umbra list``)."""
    load_builtin()
    out = []
    for name in sorted(REGISTRY):
        cls = REGISTRY[name]
        out.append(
            {
                "fault": name,
                "summary": cls.summary,
                "targets": cls.target_help,
                "triggers": sorted(cls.triggers),
                "params": {
                    k: {"kind": p.kind, "default": p.default, "required": p.required, "doc": p.doc}
                    for k, p in cls.params.items()
                },
            }
        )
    return out

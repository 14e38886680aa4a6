"""``failpoint``: arm one of the store's named failpoints in a process.

Where it acts depends on the target:

- ``local`` — this process's registry (the in-process workload clients and transfer engines);
- ``master`` — the master, through its ``ArmFailpoints`` admin RPC while it runs, or through
  ``UMBRA_FAILPOINTS`` when the trigger is ``phase: start``;
- ``holder:N`` / ``holder:*`` — segment-holder processes, through ``UMBRA_FAILPOINTS`` at start
  (they have no admin RPC), so only ``phase: start`` is accepted.

The point's own probability draw is seeded from the plan's seed, so the same run fires the same
way. With ``duration`` the point is disarmed (and paused threads released) when the window ends.
"""

from __future__ import annotations

from typing import Any, ClassVar

from fault.plan import FaultSpec, PlanError
from fault.registry import (
    TRIGGERS,
    FaultContext,
    FaultError,
    Injector,
    Param,
    StartConfig,
    parse_code,
    register,
)
from store import failpoints

ACTIONS = ("error", "sleep", "pause", "panic")


@register
class FailpointInjector(Injector):
    name = "failpoint"
    summary = (
        "arm a store failpoint (error code, sleep, pause, panic) in this process, the master or a holder"
    )
    targets = (r"local", r"master", r"holder:(\d+|\*)")
    target_help = "local | master | holder:N | holder:* (holders only at phase start)"
    triggers = frozenset(TRIGGERS)
    windowed = True
    params: ClassVar[dict[str, Param]] = {
        "point": Param(
            "str", "failpoint name, e.g. master.put_end, tcp.send, client.read_replica", required=True
        ),
        "action": Param("str", "error | sleep | pause | panic", default="error", choices=ACTIONS),
        "arg": Param(
            "any", "error: ErrorCode (number or name); sleep: seconds; pause: timeout s; panic: exit code"
        ),
        "count": Param("int", "fire at most this many times", minimum=1),
        "probability": Param(
            "float",
            "fire with this probability each time the step is reached",
            default=1.0,
            minimum=0.0,
            maximum=1.0,
        ),
        "duration": Param(
            "float", "disarm after this many seconds (default: at the end of the run)", minimum=0.0
        ),
    }

    @classmethod
    def check(cls, spec: FaultSpec, params: dict[str, Any], where: str) -> None:
        action, arg = params["action"], params["arg"]
        if action == "error":
            params["arg"] = parse_code(arg if arg is not None else -1, f"{where}.arg")
        elif action in ("sleep", "pause") and arg is not None:
            if isinstance(arg, bool) or not isinstance(arg, int | float) or arg < 0:
                raise PlanError(f"{where}.arg: {action} takes seconds >= 0, got {arg!r}")
        elif action == "panic" and arg is not None and (isinstance(arg, bool) or not isinstance(arg, int)):
            raise PlanError(f"{where}.arg: panic takes an exit code, got {arg!r}")
        if spec.target.startswith("holder") and spec.when.phase != "start":
            raise PlanError(
                f"{where}: holders have no admin RPC; arm them with when: start "
                "(UMBRA_FAILPOINTS in their environment)"
            )
        if spec.target == "local" and spec.when.phase == "start":
            raise PlanError(f"{where}: a local failpoint is armed while the run goes (use when: setup)")
        if not spec.params.get("point", "").strip():
            raise PlanError(f"{where}.point: empty failpoint name")

    def spec_string(self) -> str:
        """The ``UMBRA_FAILPOINTS`` / ``ArmFailpoints`` form of this point."""
        p = self.p
        out = f"{p['point']}={p['action']}"
        if p["arg"] is not None:
            out += f"({p['arg']})"
        if p["count"]:
            out += f"*{p['count']}"
        if p["probability"] < 1.0:
            out += f"%{p['probability']}"
        return out + f"@{self.point_seed}"

    @property
    def point_seed(self) -> int:
        if not hasattr(self, "_seed"):
            self._seed = self.rng.randrange(1 << 31)
        return self._seed

    def configure(self, start: StartConfig) -> dict[str, Any]:
        target = self.spec.target
        if target == "local":
            raise FaultError("a local failpoint cannot be armed at start")
        start.add_failpoint(target, self.spec_string())
        return {"spec": self.spec_string(), "via": "UMBRA_FAILPOINTS"}

    def apply(self, ctx: FaultContext) -> dict[str, Any]:
        spec = self.spec_string()
        if self.spec.target == "local":
            armed = failpoints.arm_from_spec(spec)
            return {"spec": spec, "via": "local registry", "armed": [fp.name for fp in armed]}
        if self.spec.target == "master":
            names = ctx.master_admin().arm_failpoints(spec)
            return {"spec": spec, "via": "master ArmFailpoints", "armed": names}
        raise FaultError(f"failpoint on {self.spec.target} can only be armed at start")

    def revert(self, ctx: FaultContext) -> dict[str, Any]:
        point = self.p["point"]
        if self.spec.target == "local":
            fired = failpoints.armed().get(point)
            failpoints.disarm(point)
            return {"disarmed": point, "fired": fired.fired if fired else None}
        if self.spec.target == "master":
            admin = ctx.master_admin()
            listing = {d.get("name"): d for d in admin.list_failpoints()}
            admin.disarm_failpoints([point])
            return {"disarmed": point, "fired": listing.get(point, {}).get("fired")}
        return {}

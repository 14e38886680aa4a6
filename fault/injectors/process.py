"""``process.*``: signals to the master or a segment holder — the real process really stops.

- ``process.kill``: SIGKILL, a crash at whatever step the process was in. A holder's segment stays
  mounted until the master expires its client (``client_ttl``); a killed master loses every
  object. ``restart_after`` starts it again (the master on the same port).
- ``process.stop``: SIGSTOP for ``duration`` seconds, then SIGCONT (a stalled process: no
  heartbeat, no RPC, no data service, but its sockets stay open).
- ``process.restart``: SIGKILL and start again at once.
"""

from __future__ import annotations

from typing import Any, ClassVar

from fault.registry import FaultContext, Injector, Param, register

TARGETS = (r"master", r"holder:\d+")
HELP = "master | holder:N"


def _describe(proc: Any) -> dict[str, Any]:
    out = {"process": proc.name, "pid": proc.pid}
    cid = getattr(proc, "client_id", "")
    if cid:
        out["client_id"] = cid
        out["segment_name"] = proc.segment_name
    return out


@register
class ProcessKill(Injector):
    name = "process.kill"
    summary = "SIGKILL the master or a holder (optionally restart it later)"
    targets = TARGETS
    target_help = HELP
    windowed = True
    params: ClassVar[dict[str, Param]] = {
        "restart_after": Param(
            "float", "start it again after this many seconds (default: never)", minimum=0.0
        )
    }

    @property
    def duration(self) -> float | None:
        r = self.p.get("restart_after")
        return float(r) if r is not None else None

    def needs_revert(self) -> bool:
        return self.p.get("restart_after") is not None

    def apply(self, ctx: FaultContext) -> dict[str, Any]:
        proc = ctx.process(self.spec.target)
        info = _describe(proc)
        proc.kill()
        self._killed = proc
        return {**info, "signal": "SIGKILL", "exit_code": proc.proc.returncode if proc.proc else None}

    def revert(self, ctx: FaultContext) -> dict[str, Any]:
        proc = getattr(self, "_killed", None)
        if proc is None or self.p.get("restart_after") is None:
            return {}
        self._killed = None
        proc.start()
        return {**_describe(proc), "restarted": True}


@register
class ProcessStop(Injector):
    name = "process.stop"
    summary = "SIGSTOP the master or a holder for a while, then SIGCONT"
    targets = TARGETS
    target_help = HELP
    windowed = True
    params: ClassVar[dict[str, Param]] = {
        "duration": Param("float", "seconds frozen before SIGCONT", default=1.0, minimum=0.0)
    }

    def apply(self, ctx: FaultContext) -> dict[str, Any]:
        proc = ctx.process(self.spec.target)
        proc.freeze()
        self._frozen = proc
        return {**_describe(proc), "signal": "SIGSTOP"}

    def revert(self, ctx: FaultContext) -> dict[str, Any]:
        proc = getattr(self, "_frozen", None)
        if proc is None:
            return {}
        self._frozen = None
        if proc.alive():
            proc.thaw()
        return {**_describe(proc), "signal": "SIGCONT"}


@register
class ProcessRestart(Injector):
    name = "process.restart"
    summary = "SIGKILL the master or a holder and start it again at once"
    targets = TARGETS
    target_help = HELP
    params: ClassVar[dict[str, Param]] = {}

    def apply(self, ctx: FaultContext) -> dict[str, Any]:
        proc = ctx.process(self.spec.target)
        before = _describe(proc)
        proc.restart()
        return {"before": before, "after": _describe(proc)}

"""``gc.legacy``: run the master with Mooncake's legacy GC (``--enable_gc``).

Mooncake v0.3.0–v0.3.5 scheduled a ``Remove`` one second after every successful read: an object
read once by the decode side of a prefill→decode handoff vanished about a second later, even
when another reader still wanted it. The mechanism is the master's own GC loop; this injector only
starts the master with the flag (and, optionally, another delay), so it acts at ``phase: start``.
"""

from __future__ import annotations

from typing import Any, ClassVar

from fault.registry import FaultContext, FaultError, Injector, Param, StartConfig, register


@register
class LegacyGcInjector(Injector):
    name = "gc.legacy"
    summary = "start the master with --enable_gc: every read schedules a Remove gc_delay later (1 s)"
    targets = (r"master",)
    target_help = "master"
    triggers = frozenset({"start"})
    params: ClassVar[dict[str, Param]] = {
        "delay_ms": Param(
            "float", "delay between a read and its Remove (Mooncake: 1000 ms)", default=1000.0, minimum=0.0
        )
    }

    def configure(self, start: StartConfig) -> dict[str, Any]:
        flags = ["--enable_gc", f"--gc_delay_ms={self.p['delay_ms']:g}"]
        start.master_flags += flags
        return {"master_flags": flags}

    def apply(self, ctx: FaultContext) -> dict[str, Any]:
        raise FaultError("gc.legacy is a master flag: it acts at phase start")

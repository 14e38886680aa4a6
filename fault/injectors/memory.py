"""``memory.fill`` and ``memory.fragment``: run a segment out of (contiguous) memory for real.

Both act through ordinary client calls, recorded in the run's history like any other operation:

- ``memory.fill`` puts values (a size mix drawn from the fault's seeded generator) preferring the
  target holder's segment until the segment is ``fraction`` full, a put is refused with
  NO_AVAILABLE_HANDLE (−200), or the placement spills onto another segment because the target
  has no room left;
- ``memory.fragment`` asks the master where every object of the segment lives
  (``Inspect objects``: offsets), sorts them by address and removes every other one. Half the
  bytes come free, in holes no larger than the objects between them, so a later put larger than
  those holes fails with −200 although the master reports plenty of free space.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from fault.registry import FaultContext, FaultError, Injector, Param, SizeMix, register
from store.errors import ErrorCode

NO_HANDLE = int(ErrorCode.NO_AVAILABLE_HANDLE)


def segment_report(ctx: FaultContext, segment_name: str) -> dict[str, Any]:
    """The master's view of a segment's allocator (by segment name)."""
    for seg in ctx.master_admin().inspect("segments"):
        if seg["name"] == segment_name:
            return dict(seg["allocator"])
    raise FaultError(f"segment {segment_name} is not mounted")


def allocator_summary(rep: dict[str, Any]) -> dict[str, Any]:
    keys = (
        "capacity",
        "used",
        "requested",
        "free",
        "largest_free_region",
        "utilisation",
        "fragmentation",
        "live_allocations",
    )
    return {k: rep.get(k) for k in keys if k in rep}


@register
class MemoryFill(Injector):
    name = "memory.fill"
    summary = "fill a holder's segment with real puts (seeded size mix) until full or a fraction is used"
    targets = (r"holder:\d+",)
    target_help = "holder:N"
    params: ClassVar[dict[str, Param]] = {
        "fraction": Param(
            "float",
            "stop once the segment's allocator is this full (1.0: until a put fails)",
            default=1.0,
            minimum=0.0,
            maximum=1.0,
        ),
        "sizes": Param(
            "sizes", "value sizes: a size, a list, {range: [lo, hi]} or {choices, weights}", default="1mb"
        ),
        "max_puts": Param("int", "upper bound on puts", default=100_000, minimum=1),
        "key_prefix": Param("str", "keys are PREFIX/<n>", default="fill"),
    }

    def apply(self, ctx: FaultContext) -> dict[str, Any]:
        seg = ctx.segment_name(self.spec.target)
        client = ctx.fault_client(self.spec.label)
        mix: SizeMix = self.p["sizes"]
        gen = np.random.default_rng(self.rng.randrange(1 << 63))
        fraction = self.p["fraction"]
        puts = put_bytes = 0
        reason = "max_puts"
        for i in range(self.p["max_puts"]):
            rep = segment_report(ctx, seg)
            if fraction < 1.0 and rep["utilisation"] >= fraction:
                reason = "fraction reached"
                break
            size = mix.draw(self.rng)
            rc = client.put(
                f"{self.p['key_prefix']}/{i}", gen.bytes(size), {"preferred_segment": seg}, note="memory.fill"
            )
            if rc == NO_HANDLE:
                reason = "NO_AVAILABLE_HANDLE"
                break
            if rc != 0:
                reason = f"put failed with {rc}"
                break
            puts += 1
            put_bytes += size
            last = client.last_op()
            if last is not None and last.replica and last.replica != seg:
                reason = "spilled onto another segment"
                break
        return {
            "segment": seg,
            "puts": puts,
            "bytes": put_bytes,
            "stop": reason,
            **allocator_summary(segment_report(ctx, seg)),
        }


@register
class MemoryFragment(Injector):
    name = "memory.fragment"
    summary = "remove every other object of a segment in address order (holes between survivors)"
    targets = (r"holder:\d+",)
    target_help = "holder:N"
    params: ClassVar[dict[str, Param]] = {
        "keep": Param(
            "str",
            "'even' keeps the 1st, 3rd... object by address; 'odd' the 2nd, 4th...",
            default="even",
            choices=("even", "odd"),
        ),
        "force": Param("bool", "remove even while a read lease is held", default=True),
        "key_prefix": Param("str", "only objects whose key starts with this"),
    }

    def apply(self, ctx: FaultContext) -> dict[str, Any]:
        seg = ctx.segment_name(self.spec.target)
        client = ctx.fault_client(self.spec.label)
        prefix = self.p["key_prefix"] or ""
        placed = []
        for obj in ctx.master_admin().inspect("objects"):
            if prefix and not obj["key"].startswith(prefix):
                continue
            for r in obj["replicas"]:
                if r["segment_name"] == seg:
                    placed.append((int(r["offset"]), obj["key"]))
        placed.sort()
        first = 1 if self.p["keep"] == "even" else 0
        victims = [key for _, key in placed[first::2]]
        failed = 0
        for key in victims:
            if client.remove(key, force=self.p["force"], note="memory.fragment") != 0:
                failed += 1
        return {
            "segment": seg,
            "objects": len(placed),
            "removed": len(victims) - failed,
            "failed": failed,
            **allocator_summary(segment_report(ctx, seg)),
        }

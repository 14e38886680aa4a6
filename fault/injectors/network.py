"""``network.*``: faults on the loopback TCP proxy (:mod:`fault.proxy`) in front of a holder's
transfer endpoint (``proxy:transfer``) or the master's RPC port (``proxy:master``).

Each adds a toxic to the proxy when it fires and removes it when its ``duration`` ends (or at the
end of the run): ``network.delay``, ``network.bandwidth``, ``network.reset`` (resets open
connections, and new ones while the window lasts; the transfer engine's retries open new
connections through the proxy), ``network.blackhole`` (nothing flows; ``mode: drop`` discards).
"""

from __future__ import annotations

from typing import Any, ClassVar

from fault.registry import FaultContext, Injector, Param, register

DIRECTION = Param("str", "up (client→server), down, or both", default="both", choices=("up", "down", "both"))
DURATION = Param(
    "float", "remove the toxic after this many seconds (default: at the end of the run)", minimum=0.0
)
PROXY_TARGET = (r"proxy:[\w.-]+",)
PROXY_HELP = "proxy:NAME (proxy:transfer, proxy:master)"


class _ProxyToxic(Injector):
    targets = PROXY_TARGET
    target_help = PROXY_HELP
    windowed = True
    kind = ""

    def toxic_args(self) -> dict[str, Any]:
        raise NotImplementedError

    def apply(self, ctx: FaultContext) -> dict[str, Any]:
        proxy = ctx.proxy(self.spec.target.split(":", 1)[1])
        args = self.toxic_args()
        self._toxic = proxy.add_toxic(self.kind, **args)
        self._proxy = proxy
        return {
            "proxy": proxy.name,
            "toxic": self.kind,
            **args,
            "open_connections": proxy.stats()["open_connections"],
        }

    def revert(self, ctx: FaultContext) -> dict[str, Any]:
        proxy = getattr(self, "_proxy", None)
        if proxy is None:
            return {}
        proxy.remove_toxic(self._toxic)
        self._proxy = None
        s = proxy.stats()
        return {"proxy": proxy.name, "resets": s.get("resets", 0), "dropped_bytes": s.get("dropped_bytes", 0)}


@register
class NetworkDelay(_ProxyToxic):
    name = "network.delay"
    kind = "delay"
    summary = "add latency (and seeded jitter) to every chunk through a proxy"
    params: ClassVar[dict[str, Param]] = {
        "latency": Param("float", "seconds added to every chunk", required=True, minimum=0.0),
        "jitter": Param("float", "extra uniform [0, jitter] seconds", default=0.0, minimum=0.0),
        "direction": DIRECTION,
        "duration": DURATION,
    }

    def toxic_args(self) -> dict[str, Any]:
        return {"latency": self.p["latency"], "jitter": self.p["jitter"], "direction": self.p["direction"]}


@register
class NetworkBandwidth(_ProxyToxic):
    name = "network.bandwidth"
    kind = "bandwidth"
    summary = "cap a proxy's throughput per connection and direction"
    params: ClassVar[dict[str, Param]] = {
        "rate": Param("size", "bytes per second ('1mb' = 1 MiB/s)", required=True, minimum=1),
        "direction": DIRECTION,
        "duration": DURATION,
    }

    def toxic_args(self) -> dict[str, Any]:
        return {"rate": float(self.p["rate"]), "direction": self.p["direction"]}


@register
class NetworkReset(_ProxyToxic):
    name = "network.reset"
    kind = "reset"
    summary = "reset (TCP RST) connections through a proxy, now and while the window lasts"
    params: ClassVar[dict[str, Param]] = {
        "after_bytes": Param(
            "size", "reset a picked connection after it carried this many more bytes", default=0
        ),
        "probability": Param(
            "float", "chance that a connection is picked (seeded)", default=1.0, minimum=0.0, maximum=1.0
        ),
        "duration": DURATION,
    }

    def toxic_args(self) -> dict[str, Any]:
        return {"after_bytes": self.p["after_bytes"], "probability": self.p["probability"]}


@register
class NetworkBlackhole(_ProxyToxic):
    name = "network.blackhole"
    kind = "blackhole"
    summary = "stop all traffic through a proxy (stall, or drop and reset when healed)"
    params: ClassVar[dict[str, Param]] = {
        "mode": Param(
            "str",
            "stall (hold bytes, resume intact) or drop (discard, reset at the end)",
            default="stall",
            choices=("stall", "drop"),
        ),
        "direction": DIRECTION,
        "duration": DURATION,
    }

    def toxic_args(self) -> dict[str, Any]:
        return {"mode": self.p["mode"], "direction": self.p["direction"]}

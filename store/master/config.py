"""Master flags: Mooncake's names and defaults, plus Umbra's own switches.

``mooncake_master`` is configured with gflags, so users write ``--rpc_port=50051``,
``-rpc_port 50051``, ``--enable_gc``, ``--enable_gc=false`` or ``--noenable_gc``. :func:`parse_args`
accepts every one of those spellings so a Mooncake command line can be pasted unchanged.

Units follow Mooncake: ``default_kv_lease_ttl`` and ``default_kv_soft_pin_ttl`` are milliseconds
(``ms``/``s``/``m``/``h`` suffixes accepted as HEAD does), ``client_ttl`` and the ``put_start_*``
timeouts are seconds. Inside :class:`MasterConfig` every duration is float seconds.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, fields

GC_MODES = ("off", "legacy", "on_demand")
EVICTION_BY = ("objects", "bytes")
MEMORY_ALLOCATORS = ("offset", "cachelib")


@dataclass
class MasterConfig:
    """Every knob of the master. Defaults are Mooncake v0.3.12+ unless marked Umbra."""

    rpc_port: int = 50051
    rpc_address: str = "127.0.0.1"  # Mooncake binds 0.0.0.0; Umbra stays on loopback unless told
    metrics_port: int = 9003
    metrics_host: str = "127.0.0.1"
    enable_metric_reporting: bool = True
    metric_report_interval: float = 10.0
    max_threads: int = 16  # rpc_thread_num: worker threads for RPCs that may block on a failpoint

    default_kv_lease_ttl: float = 10.0
    default_kv_soft_pin_ttl: float = 1800.0
    allow_evict_soft_pinned_objects: bool = True

    eviction_ratio: float = 0.05
    eviction_high_watermark_ratio: float = 0.90
    eviction_by: str = "objects"  # Umbra: "bytes" frees the bytes the watermark asks for
    eviction_interval: float = 0.010

    client_ttl: float = 10.0
    client_monitor_interval: float = 1.0

    allocation_strategy: str = "random"
    memory_allocator: str = "offset"

    gc_mode: str = "off"  # "legacy" = Mooncake's --enable_gc; "on_demand" = Umbra's reclamation
    gc_delay: float = 1.0
    gc_queue_size: int = 10 * 1024
    gc_interval: float = 0.010

    put_start_discard_timeout: float = 30.0
    put_start_release_timeout: float = 600.0

    classic_unmount: bool = False  # v0.3.5: a lost segment drops the whole object
    classic_remove_all: bool = False  # v0.3.5: RemoveAll also erased PROCESSING objects
    classic_eviction: bool = False  # v0.3.5: per-shard nth_element instead of a global order

    max_key_bytes: int = 4096
    max_frame_bytes: int = 64 * 1024 * 1024
    frame_timeout: float = 10.0
    seed: int | None = None
    view_version: int | None = None
    v: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Reject nonsense at start-up with a message that names the flag (never guess)."""
        if not 0.0 <= self.eviction_ratio <= 1.0:
            raise ValueError(f"--eviction_ratio must be in [0, 1], got {self.eviction_ratio}")
        if not 0.0 <= self.eviction_high_watermark_ratio <= 1.0:
            raise ValueError("--eviction_high_watermark_ratio must be in [0, 1], got "
                             f"{self.eviction_high_watermark_ratio}")
        if self.eviction_by not in EVICTION_BY:
            raise ValueError(f"--eviction_by must be one of {EVICTION_BY}, got {self.eviction_by!r}")
        if self.gc_mode not in GC_MODES:
            raise ValueError(f"--gc_mode must be one of {GC_MODES}, got {self.gc_mode!r}")
        if self.memory_allocator not in MEMORY_ALLOCATORS:
            raise ValueError(f"--memory_allocator must be one of {MEMORY_ALLOCATORS}, "
                             f"got {self.memory_allocator!r}")
        for name in ("default_kv_lease_ttl", "default_kv_soft_pin_ttl", "gc_delay",
                     "put_start_discard_timeout", "put_start_release_timeout"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)}")
        for name in ("client_ttl", "eviction_interval", "gc_interval", "client_monitor_interval",
                     "frame_timeout", "metric_report_interval"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name} must be > 0, got {getattr(self, name)}")
        for name in ("max_threads", "gc_queue_size", "max_key_bytes", "max_frame_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        for name in ("rpc_port", "metrics_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise ValueError(f"--{name} must be a TCP port (0 = any free), got {getattr(self, name)}")

    @property
    def enable_gc(self) -> bool:
        return self.gc_mode == "legacy"

    def as_dict(self) -> dict[str, object]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


# --------------------------------------------------------------------------------------------
# Parsing

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_SCALE = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: str | float | int, default_unit: str) -> float:
    """Seconds from ``"500"`` (in ``default_unit``), ``"500ms"``, ``"2s"``, ``"30m"``, ``"1h"``."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value) * _SCALE[default_unit]
    m = _DURATION_RE.match(str(value))
    if not m:
        raise ValueError(f"cannot parse duration {value!r}: expected a number with an optional "
                         "unit (ms, s, m, h)")
    return float(m.group(1)) * _SCALE[m.group(2) or default_unit]


def parse_bool(value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on", "t", "y"):
        return True
    if v in ("0", "false", "no", "off", "f", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {value!r}")


def _ms(value: str) -> float:
    try:
        return parse_duration(value, "ms")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _sec(value: str) -> float:
    try:
        return parse_duration(value, "s")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


_BOOL_FLAGS = ("enable_gc", "enable_metric_reporting", "allow_evict_soft_pinned_objects",
               "classic_unmount", "classic_remove_all", "classic_eviction")

# Mooncake flags this master accepts without acting on them (HA, metadata server, SSD offload...):
# a pasted command line must not fail, but the log says they are ignored.
IGNORED_FLAGS = ("enable_ha", "etcd_endpoints", "cluster_id", "enable_http_metadata_server",
                 "http_metadata_server_port", "http_metadata_server_host", "root_fs_dir",
                 "global_file_segment_size", "enable_offload", "memory_pool_size", "logtostderr",
                 "enable_metadata_cleanup_on_timeout", "rpc_enable_tcp_no_delay", "rpc_conn_timeout_seconds")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="umbra master", allow_abbrev=False,
        description="Umbra master service (Mooncake mooncake_master flag names; "
                    "single-dash and --noFLAG spellings accepted).")
    add = p.add_argument
    add("--rpc_port", "--port", dest="rpc_port", type=int, default=50051, help="RPC port (0 = any free)")
    add("--rpc_address", "--rpc_host", dest="rpc_address", default="127.0.0.1",
        help="RPC bind address (default 127.0.0.1)")
    add("--metrics_port", "--http_port", dest="metrics_port", type=int, default=9003,
        help="HTTP port for /metrics, /health, /query_key (0 = any free)")
    add("--metrics_host", dest="metrics_host", default="127.0.0.1")
    add("--enable_metric_reporting", type=parse_bool, nargs="?", const=True, default=True,
        help="log a one-line summary every 10 s")
    add("--max_threads", "--rpc_thread_num", dest="max_threads", type=int, default=16,
        help="worker threads for RPCs while failpoints are armed")
    add("--default_kv_lease_ttl", type=_ms, default=10.0,
        help="read lease TTL in ms (suffixes ms|s|m|h), default 10000")
    add("--default_kv_soft_pin_ttl", type=_ms, default=1800.0,
        help="soft pin TTL in ms, default 1800000 (30 min)")
    add("--allow_evict_soft_pinned_objects", type=parse_bool, nargs="?", const=True, default=True)
    add("--eviction_ratio", type=float, default=0.05)
    add("--eviction_high_watermark_ratio", type=float, default=0.90)
    add("--eviction_by", choices=EVICTION_BY, default="objects",
        help="objects: Mooncake's count-based target; bytes: free the bytes the watermark asks for")
    add("--client_ttl", type=_sec, default=10.0, help="seconds without a ping before a client expires")
    add("--allocation_strategy", default="random")
    add("--memory_allocator", choices=MEMORY_ALLOCATORS, default="offset")
    add("--enable_gc", type=parse_bool, nargs="?", const=True, default=None,
        help="Mooncake's legacy GC: every read schedules a Remove 1 s later (same as --gc_mode=legacy)")
    add("--gc_mode", choices=GC_MODES, default=None,
        help="off | legacy (Mooncake --enable_gc) | on_demand (Umbra: reclaim read objects at the "
             "watermark, never while leased)")
    add("--gc_delay_ms", dest="gc_delay", type=_ms, default=1.0)
    add("--put_start_discard_timeout_sec", dest="put_start_discard_timeout", type=_sec, default=30.0)
    add("--put_start_release_timeout_sec", dest="put_start_release_timeout", type=_sec, default=600.0)
    add("--classic_unmount", type=parse_bool, nargs="?", const=True, default=False,
        help="v0.3.5 unmount: drop the whole object when one replica's segment goes away")
    add("--classic_remove_all", type=parse_bool, nargs="?", const=True, default=False,
        help="v0.3.5 RemoveAll: also erase objects whose put is still in progress")
    add("--classic_eviction", type=parse_bool, nargs="?", const=True, default=False,
        help="v0.3.5 eviction: per-shard quotas from a random start shard instead of a global order")
    add("--max_key_bytes", type=int, default=4096)
    add("--max_frame_bytes", type=int, default=64 * 1024 * 1024)
    add("--seed", type=int, default=None, help="seed for placement and eviction start shard")
    add("--view_version", type=int, default=None)
    add("-v", "--v", dest="v", type=int, default=0, help="verbosity; 1 logs every allocation and free")
    for name in IGNORED_FLAGS:
        add(f"--{name}", dest=f"ignored_{name}", nargs="?", const="true", default=None,
            help=argparse.SUPPRESS)
    return p


_SINGLE_DASH_RE = re.compile(r"^-([A-Za-z_][A-Za-z0-9_]+)(=.*)?$")


def normalize_argv(argv: list[str]) -> list[str]:
    """gflags spellings → argparse: ``-flag`` → ``--flag``, ``--noflag`` → ``--flag=false``."""
    out = []
    for tok in argv:
        m = _SINGLE_DASH_RE.match(tok)
        if m and not tok.startswith("--"):
            tok = "-" + tok
        if tok.startswith("--no"):
            name = tok[4:].split("=", 1)[0]
            if name in _BOOL_FLAGS:
                tok = f"--{name}=false"
        out.append(tok)
    return out


def parse_args(argv: list[str]) -> tuple[MasterConfig, list[str]]:
    """Parse a command line; returns the config and the ignored Mooncake flags that were given."""
    ns = build_parser().parse_args(normalize_argv(argv))
    values = vars(ns)
    ignored = [k[len("ignored_"):] for k, v in values.items() if k.startswith("ignored_") and v is not None]
    enable_gc = values.pop("enable_gc")
    gc_mode = values.pop("gc_mode")
    if gc_mode is None:
        gc_mode = "legacy" if enable_gc else "off"
    elif enable_gc and gc_mode != "legacy":
        raise ValueError(f"--enable_gc contradicts --gc_mode={gc_mode}")
    kwargs = {k: v for k, v in values.items() if not k.startswith("ignored_")}
    return MasterConfig(gc_mode=gc_mode, **kwargs), ignored

"""``umbra bench NAME [--json]``: benchmarks that print figures and ratios measured in one run.

Each benchmark is a module ``store.bench.<name>`` with ``main(argv) -> int``.
"""

from __future__ import annotations

import importlib
import sys

BENCHMARKS: dict[str, str] = {
    "allocator": "offset/slab allocators and placement strategies: speed, utilisation, bookkeeping",
    "master": "master RPC put cycle over TCP (1 and 8 clients) and in process",
    "transfer": "TCP transport WRITE/READ between two processes vs a plain socket; million-slice soak RSS",
    "store": "client put/get over TCP loopback across processes vs plain sockets",
    "packing": "numba gather/scatter and checksum vs numpy copy",
    "rdma": "RDMA transport vs ib_write_bw on the same device (inside the Soft-RoCE guest)",
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: umbra bench NAME [--json] [options]\n\nbenchmarks:")
        for name, text in BENCHMARKS.items():
            print(f"  {name:<10} {text}")
        return 0
    name = argv[0]
    if name not in BENCHMARKS:
        print(f"umbra bench: unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"store.bench.{name}")
    return int(module.main(argv[1:]) or 0)

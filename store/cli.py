"""``umbra`` sub-commands that belong to the store: master, doctor, bench.

Each command lives in its own module exposing ``main(argv) -> int`` and is imported only when
used, so ``umbra --help`` stays fast and a missing optional dependency (pyverbs) only affects the
command that needs it. ``scenarios.cli`` adds run/report/list on top of these.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "master": ("store.master.server", "start a master service (Mooncake flag names accepted)"),
    "doctor": ("store.transfer.rdma.doctor", "check RDMA devices, GIDs, MTU and a loopback RDMA WRITE/READ"),
    "bench": ("store.bench", "run a benchmark: umbra bench NAME [--json]"),
}


def usage(commands: dict[str, tuple[str, str]]) -> str:
    lines = ["usage: umbra COMMAND [ARGS...]", "", "commands:"]
    width = max(len(n) for n in commands)
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in commands.items()]
    return "\n".join(lines)


def dispatch(argv: list[str], commands: dict[str, tuple[str, str]]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage(commands))
        return 0
    name, rest = argv[0], argv[1:]
    if name not in commands:
        print(f"umbra: unknown command {name!r}\n\n{usage(commands)}", file=sys.stderr)
        return 2
    module = importlib.import_module(commands[name][0])
    return int(module.main(rest) or 0)


def main(argv: list[str] | None = None) -> int:
    return dispatch(sys.argv[1:] if argv is None else argv, COMMANDS)


if __name__ == "__main__":
    raise SystemExit(main())

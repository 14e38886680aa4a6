"""The ``umbra`` entry point: the store's commands plus run/report/list from scenarios."""

from __future__ import annotations

import sys

from store.cli import COMMANDS as STORE_COMMANDS
from store.cli import dispatch

COMMANDS: dict[str, tuple[str, str]] = {
    **STORE_COMMANDS,
    "run": ("scenarios.run_cli", "run scenarios: umbra run [SCENARIO...] [--transport tcp|rdma] [--seed N]"),
    "report": ("scenarios.report_cli", "build or compare reports from run directories"),
    "list": ("scenarios.list_cli", "list scenarios, faults and failpoints"),
}


def main(argv: list[str] | None = None) -> int:
    return dispatch(sys.argv[1:] if argv is None else argv, COMMANDS)


if __name__ == "__main__":
    raise SystemExit(main())

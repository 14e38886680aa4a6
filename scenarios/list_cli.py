"""``umbra list [scenarios|faults|failpoints]``: what can be run and injected.

Failpoints are found by reading the store's sources (every ``failpoint("name")`` call, plus the
master's per-RPC points), so the list cannot drift from the code."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

import store
from fault.registry import catalogue
from scenarios.builtin import SCENARIOS

_FP_RE = re.compile(r"""failpoint\(\s*f?["']([\w.{}\-]+)["']""")


def store_failpoints() -> dict[str, str]:
    """Failpoint name → the module that reaches it (f-string names expanded where known)."""
    from store.master.service import FAILPOINTS as MASTER

    root = Path(store.__file__).resolve().parent
    out: dict[str, str] = {}
    for path in sorted(root.rglob("*.py")):
        if path.name == "failpoints.py" and path.parent == root:
            continue  # the registry itself: its docstring's examples are not points
        rel = str(path.relative_to(root.parent))
        for name in _FP_RE.findall(path.read_text(errors="replace")):
            if "{" not in name:
                out.setdefault(name, rel)
    for name in MASTER:
        out.setdefault(name, "store/master/service.py")
    return dict(sorted(out.items()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="umbra list", description=__doc__.splitlines()[0])
    ap.add_argument("what", nargs="?", choices=("scenarios", "faults", "failpoints", "all"), default="all")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    con = Console(width=160)
    if args.what in ("scenarios", "all"):
        t = Table(title="scenarios (umbra run NAME)")
        for col in ("name", "title", "variants", "transports"):
            t.add_column(col)
        for s in SCENARIOS.values():
            t.add_row(s.name, s.title, ", ".join(v.name for v in s.variants(True)), "/".join(s.transports))
        con.print(t)
    if args.what in ("faults", "all"):
        t = Table(title="faults (plan entries: {fault, target, when, params})")
        for col in ("fault", "targets", "triggers", "params", "what it does"):
            t.add_column(col)
        for f in catalogue():
            params = ", ".join(f"{k}{'*' if p['required'] else ''}" for k, p in f["params"].items())
            t.add_row(f["fault"], f["targets"], ",".join(f["triggers"]), params, f["summary"])
        con.print(t)
    if args.what in ("failpoints", "all"):
        t = Table(title="store failpoints (failpoint fault, UMBRA_FAILPOINTS)")
        t.add_column("failpoint")
        t.add_column("reached in")
        for name, where in store_failpoints().items():
            t.add_row(name, where)
        con.print(t)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

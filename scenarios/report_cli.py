"""``umbra report RUN_DIR [--baseline DIR] [--threshold 0.25]``: rebuild a run's report, optionally
comparing it with a baseline run; exit 1 when a metric regressed beyond the threshold."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from scenarios.report import DEFAULT_THRESHOLD, write_report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="umbra report", description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path, help="a run directory (OUT/<scenario>-<seed>)")
    ap.add_argument("--baseline", type=Path, default=None, help="a baseline run directory to compare with")
    ap.add_argument(
        "--threshold",
        type=float,
        default=DEFAULT_THRESHOLD,
        help=f"relative change that counts as a regression (default {DEFAULT_THRESHOLD})",
    )
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    err = Console(stderr=True)
    if not (args.run_dir / "results.json").exists():
        err.print(f"umbra report: {args.run_dir} is not a run directory (no results.json)")
        return 2
    if args.threshold <= 0:
        err.print("umbra report: --threshold must be > 0")
        return 2
    try:
        res = write_report(args.run_dir, args.baseline, args.threshold)
    except FileNotFoundError as exc:
        err.print(f"umbra report: {exc}")
        return 2
    out = Console()
    out.print(
        f"report: {args.run_dir / 'report.md'} and report.html ({'passed' if res['passed'] else 'FAILED'})"
    )
    comp = res["comparison"]
    if comp is None:
        return 0
    table = Table(title=f"vs baseline {args.baseline} (threshold {args.threshold:.0%})")
    for col in ("variant", "metric", "baseline", "current", "change", "status"):
        table.add_column(col)
    for _, r in comp[comp["status"] != "same"].iterrows():
        change = "" if r["change"] is None or r["change"] != r["change"] else f"{r['change']:+.1%}"
        table.add_row(
            escape(str(r["variant"])),
            escape(str(r["metric"])),
            f"{r['baseline']:.4g}" if r["baseline"] == r["baseline"] else "",
            f"{r['current']:.4g}" if r["current"] == r["current"] else "",
            change,
            str(r["status"]),
        )
    out.print(table)
    n = res["regressions"]
    out.print(f"{n} regression(s) beyond {args.threshold:.0%}" if n else "no regression beyond the threshold")
    return 1 if n else 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``umbra run [SCENARIO...] [--transport tcp|rdma] [--device DEV] [--seed N] [--out runs/] [--quick]``.

Runs the named scenarios (default: the whole built-in suite) on the embedded default — a local
``umbra master`` and holder processes over TCP — with one seed for every random choice. The seed
is printed first so a failing run can be replayed; each scenario writes ``OUT/<name>-<seed>/``
(history, results, report). Exit status: 0 when every expectation held, 1 when one did not, 2 for
a usage error.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from fault.plan import PlanError, load_plan
from fault.registry import validate_plan
from scenarios.builtin import SCENARIOS
from scenarios.runner import ScenarioRun, run_scenario


class RichProgress:
    """The runner's progress callbacks on a rich progress bar (stderr)."""

    def __init__(self, progress: Progress, task: int) -> None:
        self.progress = progress
        self.task = task
        self.label = ""

    def variant(self, scenario: str, variant: str, index: int, total: int) -> None:
        self.label = escape(f"{scenario} [{variant} {index + 1}/{total}]")
        self.progress.update(self.task, description=self.label)

    def advance(self, n: int = 1) -> None:
        self.progress.advance(self.task, n)

    def phase(self, text: str) -> None:
        self.progress.update(self.task, description=f"{self.label} {text}")


def rdma_devices() -> list[str]:
    root = Path("/sys/class/infiniband")
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="umbra run", description=__doc__.splitlines()[0])
    ap.add_argument("scenarios", nargs="*", help=f"scenarios to run (default: all: {', '.join(SCENARIOS)})")
    ap.add_argument("--transport", choices=("tcp", "rdma"), default="tcp")
    ap.add_argument("--device", default="", help="RDMA device (rdma transport), e.g. rxe0")
    ap.add_argument("--seed", type=int, default=None, help="seed for every random choice (default: random)")
    ap.add_argument("--out", type=Path, default=Path("runs"), help="directory for run directories (runs/)")
    ap.add_argument("--quick", action="store_true", help="smaller workloads (a few seconds per scenario)")
    ap.add_argument(
        "--plan",
        type=Path,
        default=None,
        help="replace the scenario's fault plan with this YAML/JSON plan (one scenario only)",
    )
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    err = Console(stderr=True)
    names = args.scenarios or list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        err.print(f"umbra run: unknown scenario(s) {', '.join(unknown)}; known: {', '.join(SCENARIOS)}")
        return 2
    plan = None
    if args.plan is not None:
        if len(names) != 1:
            err.print("umbra run: --plan replaces one scenario's plan; name exactly one scenario")
            return 2
        try:
            plan = validate_plan(load_plan(args.plan), str(args.plan))
        except PlanError as exc:
            err.print(f"umbra run: bad plan: {exc}")
            return 2
    if args.transport == "rdma" and not rdma_devices():
        err.print(
            "umbra run: --transport rdma needs an RDMA device and this host has none "
            "(/sys/class/infiniband is empty); run inside the Soft-RoCE guest: "
            "ci/softroce-run -- .venv/bin/umbra run --transport rdma --device rxe0"
        )
        return 2
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "big") % 1_000_000_000
    if plan is not None and plan.seed is not None and args.seed is None:
        seed = plan.seed
    args.out.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    fallback = logging.FileHandler(args.out / "umbra-run.log")
    fallback.setLevel(logging.WARNING)
    root.addHandler(fallback)
    print(
        f"umbra run: seed={seed} transport={args.transport}{' quick' if args.quick else ''} "
        f"scenarios={','.join(names)} (replay with --seed {seed})",
        flush=True,
    )
    runs: list[tuple[str, ScenarioRun | None, str]] = []
    started = time.monotonic()
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("ops"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=err, transient=False) as progress:
        for name in names:
            scn = SCENARIOS[name]
            if args.transport not in scn.transports:
                runs.append((name, None, f"skipped: runs on {'/'.join(scn.transports)} only"))
                continue
            task = progress.add_task(name, total=None)
            try:
                run = run_scenario(
                    scn,
                    seed=seed,
                    out=args.out,
                    quick=args.quick,
                    transport=args.transport,
                    device=args.device,
                    plan_override=plan,
                    progress=RichProgress(progress, task),
                )
                runs.append((name, run, ""))
                progress.update(
                    task, description=f"{name} {'passed' if run.passed else 'FAILED'}", total=1, completed=1
                )
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # noqa: BLE001 - reported and counted as a failure
                runs.append((name, None, f"error: {type(exc).__name__}: {exc}"))
                progress.update(task, description=f"{name} ERROR", total=1, completed=1)
    root.removeHandler(fallback)
    fallback.close()
    table = Table(title=f"umbra run seed={seed} ({time.monotonic() - started:.0f} s)")
    for col in ("scenario", "result", "expectations", "report"):
        table.add_column(col)
    failed = 0
    for name, run, note in runs:
        if run is None:
            failed += note.startswith("error")
            table.add_row(name, "ERROR" if note.startswith("error") else "skipped", escape(note), "")
            continue
        exps = run.results.get("expectations", [])
        bad = [e["name"] for e in exps if not e["ok"]]
        failed += not run.passed
        table.add_row(
            name,
            "passed" if run.passed else "FAILED",
            escape(
                f"{len(exps) - len(bad)}/{len(exps)}"
                + (f" (failed: {', '.join(bad)})" if bad else "")
                + ("; " + "; ".join(run.results.get("errors", [])) if run.results.get("errors") else "")
            ),
            str(run.run_dir / "report.md"),
        )
    Console().print(table)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

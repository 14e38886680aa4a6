"""The runner: for each variant build the cluster, run the plan and the workload, record, judge.

Per variant, in order:

1. ``phase: start`` faults change the start configuration (master flags, child environments);
2. the cluster comes up (``umbra master`` and holders as processes, proxies, clients) and a tap
   starts copying the master's events into the history;
3. ``phase: setup`` faults run (filling, fragmenting...), then the workload starts and the
   scheduler fires the timed faults; windows end on time, and whatever is still active ends with
   the workload;
4. teardown: ``remove_all(force)`` and the master's state (allocations must be back to zero),
   then the processes stop.

Then the checkers run over each variant's history, the scenario's expectations over everything,
and the run directory ``<out>/<scenario>-<seed>/`` gets the history (Parquet + CSV), the results
(JSON, with the plan and the seed), the memory samples, logs, and the report.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pandas as pd

from fault.plan import FaultPlan
from fault.registry import StartConfig, validate_plan
from fault.scheduler import FaultScheduler
from scenarios import history as hist
from scenarios.checkers import CheckResult, fault_windows, standard_checks
from scenarios.history import History
from scenarios.observe import MasterTap
from scenarios.scenario import Outcome, Scenario, Variant, VariantOutcome
from scenarios.topology import Cluster
from scenarios.workloads import WorkloadContext

log = logging.getLogger("scenarios.runner")


class Progress(Protocol):
    def variant(self, scenario: str, variant: str, index: int, total: int) -> None: ...
    def advance(self, n: int = 1) -> None: ...
    def phase(self, text: str) -> None: ...


class _NoProgress:
    def variant(self, scenario: str, variant: str, index: int, total: int) -> None:
        pass

    def advance(self, n: int = 1) -> None:
        pass

    def phase(self, text: str) -> None:
        pass


@dataclass
class ScenarioRun:
    name: str
    seed: int
    run_dir: Path
    passed: bool
    results: dict[str, Any]


def run_dir_for(out: Path, name: str, seed: int) -> Path:
    return out / f"{name}-{seed}"


def _attach_log(run_dir: Path) -> logging.Handler:
    handler = logging.FileHandler(run_dir / "umbra.log")
    handler.setFormatter(
        logging.Formatter(
            "%(asctime)s.%(msecs)03d %(levelname).1s %(threadName)s %(name)s] %(message)s", "%H:%M:%S"
        )
    )
    root = logging.getLogger()
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    return handler


def run_variant(
    scn: Scenario,
    variant: Variant,
    *,
    seed: int,
    history: History,
    run_dir: Path,
    plan: FaultPlan,
    progress: Progress,
    prefix: str,
) -> dict[str, Any]:
    """Run one variant; returns its raw results (the history is filled as a side effect)."""
    history.begin_variant(variant.name)
    sched = FaultScheduler(plan, seed, history.record_fault)
    start = StartConfig()
    sched.configure_start(start)
    out: dict[str, Any] = {
        "description": variant.description,
        "topology": variant.topology.describe(),
        "workload": variant.workload.describe(),
        "plan": plan.to_dict(),
        "allowed_codes": sorted(variant.allowed_codes) if variant.allowed_codes is not None else None,
        "start_config": {"master_flags": start.master_flags, "failpoints": start.failpoints},
    }
    cluster = Cluster(
        variant.topology, run_dir=run_dir / "logs", history=history, seed=seed, start=start, name=prefix
    )
    tap: MasterTap | None = None
    stop = threading.Event()
    try:
        progress.phase("starting cluster")
        cluster.start()
        out["processes"] = {
            "master": {
                "address": cluster.master.address if cluster.master else "",
                "seed": cluster.master.seed if cluster.master else None,
            },
            "holders": [
                {"segment_name": h.segment_name, "endpoint": h.endpoint, "client_id": h.client_id}
                for h in cluster.holders
            ],
            "proxies": {n: p.endpoint for n, p in cluster.proxies.items()},
        }
        history.t0 = time.monotonic()
        tap = MasterTap(cluster.master.address, history).start()  # type: ignore[union-attr]
        sched.bind(cluster)
        progress.phase("setup faults")
        sched.run_setup()
        tap.poll()  # the state the setup faults left, before the workload moves it
        history.on_op(sched.on_op)
        progress.phase("workload")
        out["t_workload"] = history.now()
        sched.start()
        ctx = WorkloadContext(
            cluster.clients, seed, variant.name, stop, cluster.master_admin, progress.advance
        )
        out["workload_metrics"] = variant.workload.run(ctx) or {}
        out["t_workload_end"] = history.now()
        progress.phase("teardown")
        sched.stop()
        history.clear_listeners()
        tap.stop()
        tap_samples = tap.samples
        tap = None
        out["final"] = cluster.teardown_state()
        out["stats"] = cluster.stats()
        out["memory_samples"] = tap_samples
    except Exception as exc:
        log.exception("variant %s of %s failed", variant.name, scn.name)
        out["error"] = f"{type(exc).__name__}: {exc}"
        out["traceback"] = traceback.format_exc()
        stop.set()
        sched.stop()
        history.clear_listeners()
    finally:
        if tap is not None:
            tap.stop()
            out.setdefault("memory_samples", tap.samples)
        cluster.close()
    out["scheduler_errors"] = sched.errors
    out["fired"] = sched.fired()
    return out


def run_scenario(
    scn: Scenario,
    *,
    seed: int,
    out: Path,
    quick: bool = False,
    transport: str = "tcp",
    device: str = "",
    plan_override: FaultPlan | None = None,
    progress: Progress | None = None,
) -> ScenarioRun:
    progress = progress or _NoProgress()
    run_dir = run_dir_for(out, scn.name, seed)
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    handler = _attach_log(run_dir)
    started = time.time()
    history = History()
    results: dict[str, Any] = {
        "scenario": scn.name,
        "title": scn.title,
        "description": scn.description,
        "seed": seed,
        "transport": transport,
        "device": device,
        "quick": quick,
        "started_at": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
        "replay": f"umbra run {scn.name} --seed {seed}"
        + (" --quick" if quick else "")
        + (f" --transport {transport}" if transport != "tcp" else ""),
        "variants": {},
    }
    samples: list[dict[str, Any]] = []
    try:
        variants = scn.variants(quick, transport, device)
        for i, v in enumerate(variants):
            plan = validate_plan((plan_override or v.plan).with_seed(seed))
            progress.variant(scn.name, v.name, i, len(variants))
            log.info("scenario %s variant %s seed=%d plan=%s", scn.name, v.name, seed, plan.to_dict())
            prefix = f"{v.name}-" if len(variants) > 1 else ""
            res = run_variant(
                scn,
                v,
                seed=seed,
                history=history,
                run_dir=run_dir,
                plan=plan,
                progress=progress,
                prefix=prefix,
            )
            samples += res.pop("memory_samples", [])
            results["variants"][v.name] = res
        df = history.frame()
        hist.save(df, run_dir)
        pd.DataFrame(
            samples,
            columns=[
                "variant",
                "t",
                "allocated_bytes",
                "reserved_bytes",
                "capacity_bytes",
                "key_count",
                "used_ratio",
            ],
        ).to_csv(run_dir / "memory.csv", index=False)
        outcome = judge(results, df, {v.name: v for v in variants})
        results["expectations"] = [e.evaluate(outcome) for e in scn.expectations]
        errors = [f"{n}: {r['error']}" for n, r in results["variants"].items() if r.get("error")]
        # a fault that could not act means the run did not test what its plan says
        errors += [
            f"{n}: fault {e}" for n, r in results["variants"].items() for e in r.get("scheduler_errors", [])
        ]
        results["passed"] = not errors and all(e["ok"] for e in results["expectations"])
        if errors:
            results["errors"] = errors
    except Exception as exc:
        log.exception("scenario %s failed", scn.name)
        results["passed"] = False
        results["errors"] = [f"{type(exc).__name__}: {exc}"]
        results["traceback"] = traceback.format_exc()
        if not (run_dir / "history.parquet").exists():
            hist.save(history.frame(), run_dir)
    results["duration_s"] = time.time() - started
    (run_dir / "results.json").write_text(json.dumps(results, indent=2, default=str))
    try:
        from scenarios.report import write_report

        write_report(run_dir)
    except Exception:
        log.exception("report for %s failed", run_dir)
        raise
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    return ScenarioRun(scn.name, seed, run_dir, bool(results["passed"]), results)


def judge(results: dict[str, Any], df: pd.DataFrame, variants: dict[str, Variant]) -> Outcome:
    """Run the checkers for every variant (stored into ``results``) and build the Outcome."""
    out: dict[str, VariantOutcome] = {}
    for name, res in results["variants"].items():
        vdf = df[df["variant"] == name].reset_index(drop=True)
        v = variants[name]
        checks = standard_checks(
            vdf,
            res.get("final"),
            allowed_codes=v.allowed_codes,
            recovery_ops=v.recovery_ops,
            recovery_codes=v.recovery_codes,
        )
        res["checks"] = {c.name: c.to_dict() for c in checks}
        res["fault_windows"] = fault_windows(vdf)
        out[name] = outcome_of(name, vdf, res)
    return Outcome(out)


def outcome_of(name: str, vdf: pd.DataFrame, res: dict[str, Any]) -> VariantOutcome:
    return VariantOutcome(
        name,
        vdf,
        {k: CheckResult.from_dict(c) for k, c in res.get("checks", {}).items()},
        res.get("final") or {},
        res.get("workload_metrics") or {},
        res.get("stats") or {},
        res.get("fault_windows") or [],
        res.get("error", ""),
    )

"""What a scenario is: variants (topology + workload + fault plan) and expectations over them.

A scenario runs one or more *variants* — the same workload with and without a fault, or under two
allocators — each on a fresh cluster, and then judges the whole run with its *expectations*:
plain functions over the :class:`Outcome` (histories, checker results, workload figures) that
say pass or fail and why. A run fails when any expectation fails; the report shows them first.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from fault.plan import FaultPlan
from scenarios.checkers import CheckResult
from scenarios.topology import TopologySpec
from scenarios.workloads import Workload


@dataclass
class Variant:
    name: str
    description: str
    topology: TopologySpec
    workload: Workload
    plan: FaultPlan = field(default_factory=FaultPlan)
    allowed_codes: frozenset[int] | None = None  # None: any documented code; empty: only 0
    recovery_ops: tuple[str, ...] = ("put",)
    recovery_codes: frozenset[int] | None = None  # results that count as the fault's failures


@dataclass
class VariantOutcome:
    """One variant's results as the expectations see them (also rebuilt from results.json)."""

    name: str
    history: pd.DataFrame
    checks: dict[str, CheckResult]
    final: dict[str, Any]
    workload: dict[str, Any]
    stats: dict[str, Any]
    faults: list[dict[str, Any]]
    error: str = ""

    def check(self, name: str) -> CheckResult:
        return self.checks[name]

    def ops(self, op: str | None = None, note: str | None = None) -> pd.DataFrame:
        df = self.history[self.history["kind"] == "op"]
        if op is not None:
            df = df[df["op"] == op]
        if note is not None:
            df = df[df["note"] == note]
        return df

    def events(self, kind: str | None = None) -> pd.DataFrame:
        df = self.history[self.history["kind"] == "event"]
        return df if kind is None else df[df["op"] == kind]

    def fault_rows(self, action: str = "apply") -> list[dict[str, Any]]:
        df = self.history[(self.history["kind"] == "fault") & (self.history["note"] == action)]
        return [
            {
                "label": r["client"].removeprefix("fault:"),
                "fault": r["op"],
                "target": r["key"],
                "t": float(r["time_start"]),
                "code": int(r["result_code"]),
                "detail": json.loads(r["detail"]) if r["detail"] else {},
            }
            for _, r in df.iterrows()
        ]


@dataclass
class Outcome:
    variants: dict[str, VariantOutcome]

    def __getitem__(self, name: str) -> VariantOutcome:
        return self.variants[name]


Verdict = tuple[bool | None, str]


@dataclass
class Expectation:
    name: str
    text: str
    check: Callable[[Outcome], Verdict]

    def evaluate(self, outcome: Outcome) -> dict[str, Any]:
        try:
            ok, detail = self.check(outcome)
        except KeyError as exc:
            ok, detail = False, f"missing result {exc} (did the variant run?)"
        except Exception as exc:  # noqa: BLE001 - an expectation that cannot be evaluated fails
            ok, detail = False, f"could not evaluate: {type(exc).__name__}: {exc}"
        return {"name": self.name, "text": self.text, "ok": ok, "detail": detail}


@dataclass
class Scenario:
    name: str
    title: str
    description: str
    build: Callable[[bool, str, str], list[Variant]]  # (quick, transport, device) → variants
    expectations: list[Expectation]
    transports: tuple[str, ...] = ("tcp", "rdma")

    def variants(self, quick: bool = False, transport: str = "tcp", device: str = "") -> list[Variant]:
        return self.build(quick, transport, device)


def all_pass(*names: str) -> Expectation:
    """The standard checkers named (or all four correctness ones) pass in every variant."""
    wanted = names or ("checksums", "visibility", "error_codes", "no_leak")

    def check(o: Outcome) -> Verdict:
        bad = [
            f"{v.name}: {c} {v.checks[c].status} — {v.checks[c].summary}"
            for v in o.variants.values()
            for c in wanted
            if v.checks[c].valid is not True
        ]
        return (not bad, "; ".join(bad) if bad else f"{', '.join(wanted)} pass in every variant")

    return Expectation("checkers pass", f"checkers {', '.join(wanted)} pass in every variant", check)

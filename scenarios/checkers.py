"""Checkers: judge a history (and the master's state after teardown) without trusting the store.

Each returns a :class:`CheckResult` whose ``valid`` is True, False, or None (cannot tell — e.g.
the master's event log overflowed), with a one-line summary, figures, and witnesses (the rows
that prove a failure). A cache may lose data — eviction, the legacy GC and a lost segment remove
objects on purpose — but it must never lie:

- :func:`check_checksums` — every successful read returned bytes that a put of that key wrote
  (XXH64 of the bytes read ∈ checksums of puts of that key invoked before the read ended);
- :func:`check_visibility` — Jepsen's set-full for a cache: a read that starts after a put was
  acknowledged and misses (OBJECT_NOT_FOUND) must be explained by a removal of that key — a
  client ``remove``, or a master event (``remove``, ``evict``, ``gc_remove``, ``object_lost``...)
  — that happened before the read ended, or by a master restart. Misses explained by the legacy
  GC are counted apart (``vanished_by_gc``): that is the failure the GC scenario reproduces. A
  read that returns bytes after an acknowledged removal is a resurrection (invalid);
- :func:`check_codes` — every result is 0 or a documented ErrorCode (and, when the scenario
  says which codes it expects, one of those);
- :func:`check_no_leak` — after ``remove_all(force)`` the master holds no allocation, no key,
  no put in progress, and its bookkeeping invariants hold;
- :func:`performance` — latency percentiles and throughput per operation (informational);
- :func:`check_recovery` — per fault, how long until the system served the operation again.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from scenarios.observe import REMOVAL_KINDS
from store.errors import ErrorCode, code_of

MISS = int(ErrorCode.OBJECT_NOT_FOUND)
MAX_WITNESSES = 20
MASTER_RESETS = ("process.kill", "process.restart")


@dataclass
class CheckResult:
    name: str
    valid: bool | None
    summary: str
    metrics: dict[str, Any] = field(default_factory=dict)
    witnesses: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CheckResult:
        return cls(d["name"], d["valid"], d["summary"], d.get("metrics", {}), d.get("witnesses", []))

    @property
    def status(self) -> str:
        return {True: "pass", False: "FAIL", None: "unknown"}[self.valid]


def _ops(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["kind"] == "op"]


def _witness(row: Any, **extra: Any) -> dict[str, Any]:
    out = {
        k: (row[k].item() if hasattr(row[k], "item") else row[k])
        for k in (
            "time_start",
            "time_end",
            "client",
            "op",
            "key",
            "size",
            "result_code",
            "bytes_checksum",
            "replica",
            "note",
        )
    }
    out.update(extra)
    return out


# ------------------------------------------------------------------------------------ checksums


def check_checksums(df: pd.DataFrame) -> CheckResult:
    ops = _ops(df)
    puts = ops[(ops["op"] == "put") & (ops["bytes_checksum"] != "")]
    written: dict[str, list[tuple[float, str]]] = {}
    for key, t, cs in zip(puts["key"], puts["time_start"], puts["bytes_checksum"], strict=True):
        written.setdefault(key, []).append((t, cs))
    reads = ops[(ops["op"] == "get") & (ops["result_code"] == 0) & (ops["bytes_checksum"] != "")]
    bad = []
    for _, r in reads.iterrows():
        allowed = {cs for t, cs in written.get(r["key"], ()) if t <= r["time_end"]}
        if r["bytes_checksum"] not in allowed:
            bad.append(_witness(r, expected=sorted(allowed) or "no put of this key before the read ended"))
    n = len(reads)
    if bad:
        return CheckResult(
            "checksums",
            False,
            f"{len(bad)} of {n} successful reads returned bytes no put wrote",
            {"reads_checked": n, "mismatches": len(bad)},
            bad[:MAX_WITNESSES],
        )
    return CheckResult(
        "checksums",
        True,
        f"all {n} successful reads returned the bytes written",
        {"reads_checked": n, "mismatches": 0},
    )


# ------------------------------------------------------------------------------------ codes


def check_codes(df: pd.DataFrame, allowed: Iterable[int] | None = None) -> CheckResult:
    ops = _ops(df)
    allowed_set = {int(c) for c in allowed} | {0} if allowed is not None else None
    undocumented, unexpected = [], []
    counts: dict[str, int] = {}
    for _, r in ops[ops["result_code"] != 0].iterrows():
        code = int(r["result_code"])
        known = code_of(code)
        counts[f"{known.name if known else 'UNDOCUMENTED'} ({code})"] = (
            counts.get(f"{known.name if known else 'UNDOCUMENTED'} ({code})", 0) + 1
        )
        if known is None:
            undocumented.append(_witness(r))
        elif allowed_set is not None and code not in allowed_set:
            unexpected.append(_witness(r))
    metrics = {
        "errors": int((ops["result_code"] != 0).sum()),
        "by_code": counts,
        "undocumented": len(undocumented),
        "unexpected": len(unexpected),
    }
    if undocumented:
        return CheckResult(
            "error_codes",
            False,
            f"{len(undocumented)} result(s) are not documented ErrorCodes",
            metrics,
            undocumented[:MAX_WITNESSES],
        )
    if unexpected:
        names = sorted({int(w["result_code"]) for w in unexpected})
        return CheckResult(
            "error_codes",
            False,
            f"{len(unexpected)} result(s) with codes this scenario does not expect: {names}",
            metrics,
            unexpected[:MAX_WITNESSES],
        )
    summary = "every result is 0 or a documented ErrorCode" + (
        f" ({', '.join(f'{k}: {v}' for k, v in sorted(counts.items()))})" if counts else " (no errors)"
    )
    return CheckResult("error_codes", True, summary, metrics)


# ------------------------------------------------------------------------------------ visibility


def _removals(df: pd.DataFrame) -> tuple[dict[str, list[tuple[float, str]]], list[float], bool]:
    """Per key: (time, cause) of every removal; times the master lost everything; whether the
    master's event log is complete."""
    out: dict[str, list[tuple[float, str]]] = {}
    ops = _ops(df)
    rem = ops[(ops["op"] == "remove") & (ops["result_code"] == 0)]
    for key, t in zip(rem["key"], rem["time_start"], strict=True):
        out.setdefault(key, []).append((float(t), "client remove"))
    ev = df[(df["kind"] == "event") & (df["op"].isin(sorted(REMOVAL_KINDS)))]
    for key, t, kind in zip(ev["key"], ev["time_start"], ev["op"], strict=True):
        if key:
            out.setdefault(key, []).append((float(t), str(kind)))
    faults = df[
        (df["kind"] == "fault")
        & (df["op"].isin(MASTER_RESETS))
        & (df["key"] == "master")
        & (df["note"] == "apply")
        & (df["result_code"] == 0)
    ]
    resets = [float(t) for t in faults["time_start"]]
    complete = not ((df["kind"] == "event") & (df["op"] == "events_lost")).any()
    return out, resets, complete


def check_visibility(df: pd.DataFrame, slack: float = 0.05) -> CheckResult:
    ops = _ops(df)
    puts = ops[(ops["op"] == "put") & (ops["result_code"] == 0)]
    acked: dict[str, float] = {}
    for key, t in zip(puts["key"], puts["time_end"], strict=True):
        acked[key] = min(acked.get(key, float("inf")), float(t))
    removals, resets, complete = _removals(df)
    gets = ops[ops["op"] == "get"]
    lost, resurrected = [], []
    causes: dict[str, int] = {}
    vanished_keys: list[str] = []
    checked = 0
    for _, r in gets.iterrows():
        key = r["key"]
        t_ack = acked.get(key)
        if t_ack is None or r["time_start"] < t_ack:
            continue  # never acknowledged, or the read raced the put: nothing is promised
        checked += 1
        rems = removals.get(key, [])
        if int(r["result_code"]) == MISS:
            cause = next((c for t, c in sorted(rems) if t <= r["time_end"] + slack), None)
            if cause is None and any(t_ack <= t <= r["time_end"] + slack for t in resets):
                cause = "master restarted"
            if cause is None:
                lost.append(_witness(r, acknowledged_at=t_ack))
                continue
            causes[cause] = causes.get(cause, 0) + 1
            if cause == "gc_remove":
                vanished_keys.append(key)
        elif int(r["result_code"]) == 0:
            before = [(t, c) for t, c in rems if c == "client remove" and t + slack < r["time_start"]]
            later_put = (
                puts[(puts["key"] == key) & (puts["time_start"] > min(t for t, _ in before))]
                if before
                else puts.iloc[0:0]
            )
            if before and later_put.empty:
                resurrected.append(_witness(r, removed_at=min(t for t, _ in before)))
    metrics = {
        "reads_after_ack": checked,
        "lost": len(lost),
        "resurrected": len(resurrected),
        "misses_explained": causes,
        "vanished_by_gc": len(vanished_keys),
        "vanished_keys": sorted(set(vanished_keys))[:50],
        "event_log_complete": complete,
    }
    if resurrected:
        return CheckResult(
            "visibility",
            False,
            f"{len(resurrected)} read(s) returned bytes after the key was removed",
            metrics,
            resurrected[:MAX_WITNESSES],
        )
    if lost:
        if not complete:
            return CheckResult(
                "visibility",
                None,
                f"{len(lost)} unexplained miss(es), but the master's event log overflowed: cannot tell",
                metrics,
                lost[:MAX_WITNESSES],
            )
        return CheckResult(
            "visibility",
            False,
            f"{len(lost)} acknowledged put(s) missing with no removal, "
            "eviction, GC or lost segment to explain it",
            metrics,
            lost[:MAX_WITNESSES],
        )
    explained = sum(causes.values())
    summary = f"{checked} reads after acknowledgement; no unexplained miss"
    if explained:
        summary += " (" + ", ".join(f"{v} by {k}" for k, v in sorted(causes.items())) + ")"
    return CheckResult("visibility", True, summary, metrics)


# ------------------------------------------------------------------------------------ leak


def check_no_leak(final: dict[str, Any] | None) -> CheckResult:
    if not final or not final.get("reachable"):
        why = (final or {}).get("error", "no teardown state")
        return CheckResult("no_leak", None, f"master not reachable at teardown ({why})", {})
    g = final["gauges"]
    fields = ("allocated_bytes", "reserved_bytes", "key_count", "processing_key_count", "discarded_puts")
    left = {k: g.get(k, 0) for k in fields if g.get(k, 0)}
    seg_left = [s for s in final.get("segments", []) if s.get("used") or s.get("live_allocations")]
    inv = list(final.get("invariants", []))
    metrics = {k: g.get(k, 0) for k in fields} | {
        "removed_at_teardown": final.get("removed_at_teardown", 0),
        "invariant_violations": len(inv),
    }
    if left or seg_left or inv:
        parts = [f"{k}={v}" for k, v in left.items()]
        if seg_left:
            parts.append(f"{len(seg_left)} segment allocator(s) still hold ranges")
        if inv:
            parts.append(f"{len(inv)} invariant violation(s)")
        return CheckResult(
            "no_leak",
            False,
            "after remove_all(force) the master still holds: " + ", ".join(parts),
            metrics,
            [{"segment": s} for s in seg_left[:MAX_WITNESSES]]
            + [{"invariant": v} for v in inv[:MAX_WITNESSES]],
        )
    return CheckResult(
        "no_leak",
        True,
        f"allocations back to zero after teardown "
        f"({metrics['removed_at_teardown']} objects removed), invariants hold",
        metrics,
    )


# ------------------------------------------------------------------------------------ performance


def performance(df: pd.DataFrame) -> CheckResult:
    ops = _ops(df)
    out: dict[str, Any] = {}
    if ops.empty:
        return CheckResult("performance", True, "no operations", {})
    span = max(float(ops["time_end"].max() - ops["time_start"].min()), 1e-9)
    for op, g in ops.groupby("op"):
        ok = g[g["result_code"] == 0]
        lat = ((ok["time_end"] - ok["time_start"]) * 1000.0).to_numpy()
        row: dict[str, Any] = {
            "count": len(g),
            "ok": len(ok),
            "errors": int((g["result_code"] != 0).sum()),
            "ops_per_s": len(g) / span,
            "MBps": float(ok["size"].sum()) / span / 1e6,
        }
        if len(lat):
            for q in (50, 90, 99):
                row[f"p{q}_ms"] = float(np.percentile(lat, q))
            row["max_ms"] = float(lat.max())
            row["mean_ms"] = float(lat.mean())
        out[str(op)] = row
    total = len(ops)
    errors = int((ops["result_code"] != 0).sum())
    out["all"] = {
        "count": total,
        "errors": errors,
        "error_rate": errors / total,
        "span_s": span,
        "ops_per_s": total / span,
        "MBps": float(ops[ops["result_code"] == 0]["size"].sum()) / span / 1e6,
    }
    parts = [
        f"{op}: {v['count']} ops, p50 {v.get('p50_ms', float('nan')):.2f} ms, "
        f"p99 {v.get('p99_ms', float('nan')):.2f} ms"
        for op, v in out.items()
        if op != "all"
    ]
    return CheckResult("performance", True, "; ".join(parts) + f"; {out['all']['ops_per_s']:.0f} ops/s", out)


# ------------------------------------------------------------------------------------ recovery


def fault_windows(df: pd.DataFrame) -> list[dict[str, Any]]:
    """Each applied fault: label, fault, target, start, end (revert time, or None = instant/never)."""
    faults = df[df["kind"] == "fault"]
    out = []
    for _, r in faults[faults["note"] == "apply"].iterrows():
        label = r["client"].removeprefix("fault:")
        rev = faults[
            (faults["client"] == r["client"])
            & (faults["note"] == "revert")
            & (faults["time_start"] >= r["time_start"])
        ]
        detail = json.loads(r["detail"]) if r["detail"] else {}
        out.append(
            {
                "label": label,
                "fault": r["op"],
                "target": r["key"],
                "start": float(r["time_start"]),
                "end": float(rev["time_start"].min()) if not rev.empty else None,
                "error": detail.get("error", "") if isinstance(detail, dict) else "",
            }
        )
    return out


def check_recovery(
    df: pd.DataFrame,
    ops: Iterable[str] = ("put",),
    horizon: float | None = None,
    codes: Iterable[int] | None = None,
) -> CheckResult:
    """Per fault: ``recovery_s`` = from the fault until the first success after the last failure
    of the given operations that followed it (0 when none failed; not recovered when the last
    operation failed). ``codes``: only these results count as failures caused by the fault
    (e.g. TRANSFER_FAIL, not a NO_AVAILABLE_HANDLE of a full segment); default all."""
    names = set(ops)
    if not names:
        return CheckResult("recovery", True, "not measured in this variant", {"faults": []})
    hist = _ops(df)
    hist = hist[hist["op"].isin(names)].sort_values("time_start")
    results = []
    valid: bool | None = True
    for w in fault_windows(df):
        after = hist[hist["time_start"] >= w["start"]]
        if horizon is not None:
            after = after[after["time_start"] <= w["start"] + horizon]
        failed = after[after["result_code"] != 0]
        if codes is not None:
            failed = failed[failed["result_code"].isin([int(c) for c in codes])]
        entry: dict[str, Any] = {
            "label": w["label"],
            "fault": w["fault"],
            "start": w["start"],
            "failures": len(failed),
            "ops_after": len(after),
        }
        if failed.empty:
            entry.update(recovered=True, recovery_s=0.0)
        else:
            last_fail = float(failed["time_end"].max())
            nxt = after[(after["result_code"] == 0) & (after["time_start"] >= last_fail)]
            if nxt.empty:
                entry.update(recovered=False, recovery_s=None, last_failure=last_fail)
                valid = False
            else:
                entry.update(
                    recovered=True,
                    recovery_s=float(nxt["time_end"].iloc[0]) - w["start"],
                    last_failure=last_fail,
                )
        results.append(entry)
    if not results:
        return CheckResult("recovery", True, "no fault fired while the workload ran", {"faults": []})
    txt = "; ".join(
        f"{e['label']}: "
        + (
            f"recovered in {e['recovery_s']:.2f}s ({e['failures']} failed {'/'.join(sorted(names))})"
            if e["recovered"]
            else f"NOT recovered ({e['failures']} failures, none succeeded after)"
        )
        for e in results
    )
    return CheckResult("recovery", valid, txt, {"faults": results})


# ------------------------------------------------------------------------------------ all


def standard_checks(
    df: pd.DataFrame,
    final: dict[str, Any] | None,
    *,
    allowed_codes: Iterable[int] | None = None,
    recovery_ops: Iterable[str] = ("put",),
    recovery_codes: Iterable[int] | None = None,
) -> list[CheckResult]:
    return [
        check_checksums(df),
        check_visibility(df),
        check_codes(df, allowed_codes),
        check_no_leak(final),
        check_recovery(df, recovery_ops, codes=recovery_codes),
        performance(df),
    ]

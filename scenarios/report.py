"""Reports: a run directory becomes ``report.md``, ``report.html``, ``summary.csv`` and PNG plots.

Everything is rebuilt from the files the runner wrote (``results.json``, ``history.parquet``,
``memory.csv``), so ``umbra report RUN_DIR`` can redo it later, and compare it with a baseline run:

- ``summary.csv`` — one row per (variant, metric): value, unit, which direction is better, and the
  smallest change that counts (``floor``: noise below it is never a regression);
- ``latency.png`` — every operation's latency over time (failures as red crosses), fault windows
  shaded; ``throughput.png`` — completed operations per second; ``memory.png`` — the master's
  allocated (value bytes) vs reserved (allocator) bytes vs capacity;
- :func:`compare` — against a baseline run's ``summary.csv``: a metric regresses when it moved the
  wrong way by more than ``threshold`` (relative) *and* by more than its floor; counts of
  correctness failures (wrong bytes, lost puts, leaks...) regress on any increase.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd

from scenarios import history as hist

DEFAULT_THRESHOLD = 0.25
SUMMARY_COLUMNS = ("variant", "metric", "value", "unit", "better", "floor")
OP_COLORS = {"put": "tab:blue", "get": "tab:green", "remove": "tab:gray"}
MISS = -704  # OBJECT_NOT_FOUND
FAULT_COLORS = ("tab:red", "tab:orange", "tab:purple", "tab:brown", "tab:pink", "tab:olive")


# ------------------------------------------------------------------------------------ summary


def summary_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []

    def add(
        variant: str, metric: str, value: Any, unit: str = "", better: str = "", floor: float = 0.0
    ) -> None:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return
        rows.append(
            {
                "variant": variant,
                "metric": metric,
                "value": float(value),
                "unit": unit,
                "better": better,
                "floor": floor,
            }
        )

    for name, v in results.get("variants", {}).items():
        checks = v.get("checks", {})
        perf = checks.get("performance", {}).get("metrics", {})
        allm = perf.get("all", {})
        add(name, "ops", allm.get("count"), "ops")
        add(name, "errors", allm.get("errors"), "ops", "lower", 1)
        add(name, "error_rate", allm.get("error_rate"), "", "lower", 0.01)
        add(name, "throughput", allm.get("ops_per_s"), "ops/s", "higher", 5)
        add(name, "bandwidth", allm.get("MBps"), "MB/s", "higher", 1)
        for op in ("put", "get"):
            m = perf.get(op, {})
            for q in ("p50", "p99"):
                add(name, f"{op}_{q}", m.get(f"{q}_ms"), "ms", "lower", 1.0 if q == "p50" else 5.0)
        add(
            name,
            "checksum_mismatches",
            checks.get("checksums", {}).get("metrics", {}).get("mismatches"),
            "reads",
            "lower",
            0,
        )
        vis = checks.get("visibility", {}).get("metrics", {})
        add(name, "lost_puts", vis.get("lost"), "keys", "lower", 0)
        add(name, "resurrected_reads", vis.get("resurrected"), "reads", "lower", 0)
        add(name, "vanished_by_gc", vis.get("vanished_by_gc"), "keys")
        add(
            name,
            "undocumented_codes",
            checks.get("error_codes", {}).get("metrics", {}).get("undocumented"),
            "results",
            "lower",
            0,
        )
        add(
            name,
            "unexpected_codes",
            checks.get("error_codes", {}).get("metrics", {}).get("unexpected"),
            "results",
            "lower",
            0,
        )
        leak = checks.get("no_leak", {}).get("metrics", {})
        add(name, "leaked_bytes", leak.get("allocated_bytes"), "bytes", "lower", 0)
        add(name, "invariant_violations", leak.get("invariant_violations"), "", "lower", 0)
        for f in checks.get("recovery", {}).get("metrics", {}).get("faults", []):
            add(name, f"recovery_s[{f['label']}]", f.get("recovery_s"), "s", "lower", 0.5)
        for phase, m in (v.get("workload_metrics") or {}).get("phases", {}).items():
            add(name, f"{phase}.no_handle", m.get("no_handle"), "puts")
            first = m.get("first_failure") or {}
            add(name, f"{phase}.util_at_first_failure", first.get("utilisation"), "", "higher", 0.02)
    exps = results.get("expectations", [])
    add("*", "expectations_passed", sum(1 for e in exps if e.get("ok")), f"of {len(exps)}", "higher", 0)
    return rows


def summary_frame(results: dict[str, Any]) -> pd.DataFrame:
    return pd.DataFrame(summary_rows(results), columns=list(SUMMARY_COLUMNS))


# ------------------------------------------------------------------------------------ comparison


def compare(
    current: pd.DataFrame, baseline: pd.DataFrame, threshold: float = DEFAULT_THRESHOLD
) -> pd.DataFrame:
    """Row per metric: baseline, current, relative change, status (regression / improved / same /
    new / missing)."""
    key = ["variant", "metric"]
    merged = current.merge(
        baseline[[*key, "value"]].rename(columns={"value": "baseline"}), on=key, how="outer"
    )
    out = []
    for _, r in merged.iterrows():
        cur, base = r.get("value"), r.get("baseline")
        better = r.get("better") if isinstance(r.get("better"), str) else ""
        floor = float(r.get("floor")) if pd.notna(r.get("floor")) else 0.0
        if pd.isna(cur):
            status, change = "missing", None
        elif pd.isna(base):
            status, change = "new", None
        else:
            delta = float(cur) - float(base)
            change = delta / abs(float(base)) if float(base) != 0 else (0.0 if delta == 0 else math.inf)
            worse = (delta > 0) if better == "lower" else (delta < 0) if better == "higher" else False
            big = abs(delta) > floor and (abs(change) > threshold or (floor == 0 and delta != 0))
            if not better or not big:
                status = "same"
            else:
                status = "regression" if worse else "improved"
        out.append(
            {
                "variant": r["variant"],
                "metric": r["metric"],
                "baseline": base,
                "current": cur,
                "change": change,
                "better": better,
                "status": status,
            }
        )
    return pd.DataFrame(
        out, columns=["variant", "metric", "baseline", "current", "change", "better", "status"]
    )


# ------------------------------------------------------------------------------------ plots


def _shade(ax: Any, windows: list[dict[str, Any]], t_end: float) -> None:
    colors: dict[str, str] = {}
    for w in windows:
        first = w["label"] not in colors
        color = colors.setdefault(w["label"], FAULT_COLORS[len(colors) % len(FAULT_COLORS)])
        label = w["label"] if first else None
        if w.get("end") is not None and w["end"] > w["start"]:
            ax.axvspan(w["start"], w["end"], color=color, alpha=0.15, label=label)
        elif w.get("end") is None and w["fault"].startswith(("network.", "failpoint", "process.stop")):
            ax.axvspan(w["start"], t_end, color=color, alpha=0.15, label=label)
        else:
            ax.axvline(w["start"], color=color, lw=1.5, ls="-", label=label)


def _variant_axes(n: int, title: str) -> tuple[Any, list[Any]]:
    fig, axes = plt.subplots(n, 1, figsize=(10, 3.2 * n), squeeze=False)
    fig.suptitle(title)
    return fig, [a[0] for a in axes]


def _unsuccessful(ops: pd.DataFrame) -> dict[str, tuple[pd.Series, str, str, int]]:
    """Calls that did not succeed, by kind: errors of puts/gets (red), read misses (orange: a
    removed, evicted or GC'd key — the GC scenario's failure), removes refused (grey: a live lease)."""
    code, op = ops["result_code"], ops["op"]
    miss = (op == "get") & (code == MISS)
    refused = (op == "remove") & (code != 0)
    error = (code != 0) & ~miss & ~refused
    return {
        "error": (error, "x", "red", 16),
        "read miss (-704)": (miss, "x", "tab:orange", 12),
        "remove refused": (refused, "x", "tab:gray", 6),
    }


def plot_latency(df: pd.DataFrame, results: dict[str, Any], path: Path) -> None:
    names = list(results.get("variants", {})) or sorted(df["variant"].unique())
    fig, axes = _variant_axes(max(1, len(names)), "Latency per operation (fault windows shaded)")
    for ax, name in zip(axes, names, strict=False):
        ops = df[(df["variant"] == name) & (df["kind"] == "op")]
        lat = (ops["time_end"] - ops["time_start"]) * 1000.0
        for op, color in OP_COLORS.items():
            m = (ops["op"] == op) & (ops["result_code"] == 0)
            if m.any():
                ax.scatter(
                    ops.loc[m, "time_start"], lat[m].clip(lower=0.01), s=4, color=color, label=f"{op} ok"
                )
        for label, (mask, marker, color, size) in _unsuccessful(ops).items():
            if mask.any():
                ax.scatter(
                    ops.loc[mask, "time_start"],
                    lat[mask].clip(lower=0.01),
                    s=size,
                    marker=marker,
                    color=color,
                    label=label,
                )
        v = results["variants"].get(name, {})
        t_end = float(ops["time_end"].max()) if not ops.empty else 1.0
        _shade(ax, v.get("fault_windows", []), t_end)
        if v.get("t_workload") is not None:
            ax.axvline(v["t_workload"], color="black", ls="--", lw=0.8, label="workload starts")
        ax.set_yscale("log")
        ax.set_ylabel("latency (ms)")
        ax.set_title(name, fontsize=10)
        ax.legend(fontsize=7, loc="upper right", ncol=3)
    _save(fig, axes, "time since the cluster was up (s)", path)


def _rate_step(ax: Any, times: pd.Series, bins: list[float], width: float, color: str, label: str) -> None:
    """Completions per second in fixed-width bins, drawn as a step line (nothing when empty)."""
    if not times.empty:
        counts = pd.cut(times, bins).value_counts(sort=False)
        ax.step(bins[:-1], counts.to_numpy() / width, where="post", color=color, label=label)


def _save(fig: Any, axes: Any, xlabel: str, path: Path) -> None:
    axes[-1].set_xlabel(xlabel)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_throughput(df: pd.DataFrame, results: dict[str, Any], path: Path) -> None:
    names = list(results.get("variants", {})) or sorted(df["variant"].unique())
    fig, axes = _variant_axes(max(1, len(names)), "Completed operations per second")
    for ax, name in zip(axes, names, strict=False):
        ops = df[(df["variant"] == name) & (df["kind"] == "op")]
        if ops.empty:
            continue
        t0, t1 = float(ops["time_end"].min()), float(ops["time_end"].max())
        width = max(0.1, (t1 - t0) / 60)
        bins = [t0 + i * width for i in range(int((t1 - t0) / width) + 2)]
        for op, color in OP_COLORS.items():
            ok = ops[(ops["op"] == op) & (ops["result_code"] == 0)]["time_end"]
            _rate_step(ax, ok, bins, width, color, f"{op} ok")
        for label, (mask, _, color, _) in _unsuccessful(ops).items():
            _rate_step(ax, ops.loc[mask, "time_end"], bins, width, color, label)
        _shade(ax, results["variants"].get(name, {}).get("fault_windows", []), t1)
        ax.set_ylabel("ops/s")
        ax.set_title(name, fontsize=10)
        ax.legend(fontsize=7, loc="upper right", ncol=4)
    _save(fig, axes, "time (s)", path)


def plot_memory(mem: pd.DataFrame, results: dict[str, Any], path: Path) -> None:
    names = list(results.get("variants", {})) or sorted(mem["variant"].unique())
    fig, axes = _variant_axes(
        max(1, len(names)), "Master memory: allocated (value bytes) vs reserved vs capacity"
    )
    for ax, name in zip(axes, names, strict=False):
        m = mem[mem["variant"] == name] if not mem.empty else mem
        if not m.empty:
            mib = 1024 * 1024
            ax.plot(m["t"], m["allocated_bytes"] / mib, label="allocated (values)", color="tab:blue")
            ax.plot(
                m["t"], m["reserved_bytes"] / mib, label="reserved (allocator)", color="tab:orange", ls="--"
            )
            ax.plot(m["t"], m["capacity_bytes"] / mib, label="capacity", color="black", lw=0.8)
            _shade(ax, results["variants"].get(name, {}).get("fault_windows", []), float(m["t"].max()))
        ax.set_ylim(bottom=0)
        ax.set_ylabel("MiB")
        ax.set_title(name, fontsize=10)
        ax.legend(fontsize=7, loc="upper right", ncol=4)
    _save(fig, axes, "time (s)", path)


# ------------------------------------------------------------------------------------ documents


class Doc:
    """Blocks rendered both as Markdown and as HTML."""

    def __init__(self) -> None:
        self.blocks: list[tuple[str, Any]] = []

    def h(self, level: int, text: str) -> None:
        self.blocks.append((f"h{level}", text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, df: pd.DataFrame) -> None:
        self.blocks.append(("table", df))

    def img(self, src: str, alt: str) -> None:
        self.blocks.append(("img", (src, alt)))

    def code(self, text: str) -> None:
        self.blocks.append(("code", text))

    def markdown(self) -> str:
        out = []
        for kind, x in self.blocks:
            if kind.startswith("h"):
                out.append("#" * int(kind[1]) + " " + x)
            elif kind == "p":
                out.append(x)
            elif kind == "table":
                out.append(_md_table(x))
            elif kind == "img":
                out.append(f"![{x[1]}]({x[0]})")
            else:
                out.append("```\n" + x.rstrip() + "\n```")
        return "\n\n".join(out) + "\n"

    def html(self, title: str) -> str:
        parts = [
            f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
            "table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;"
            "padding:3px 8px;text-align:left;vertical-align:top}th{background:#f3f3f3}"
            ".pass{color:#070}.FAIL{color:#b00;font-weight:bold}.unknown{color:#a60}"
            "pre{background:#f6f6f6;padding:1em;overflow-x:auto}img{max-width:100%}</style></head><body>"
        ]
        for kind, x in self.blocks:
            if kind.startswith("h"):
                parts.append(f"<{kind}>{html.escape(x)}</{kind}>")
            elif kind == "p":
                parts.append(f"<p>{_inline(x)}</p>")
            elif kind == "table":
                parts.append(_html_table(x))
            elif kind == "img":
                parts.append(f"<p><img src='{html.escape(x[0])}' alt='{html.escape(x[1])}'></p>")
            else:
                parts.append(f"<pre>{html.escape(x)}</pre>")
        parts.append("</body></html>")
        return "\n".join(parts)


def _inline(text: str) -> str:
    out = html.escape(text)
    for word in ("pass", "FAIL", "unknown"):
        out = out.replace(f"**{word}**", f"<span class='{word}'>{word}</span>")
    return out.replace("**", "")


def _cell(v: Any) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return ""
        return f"{v:.4g}" if abs(v) < 1e6 else f"{v:.4e}"
    return str(v)


def _md_table(df: pd.DataFrame) -> str:
    if df.empty:
        return "_(none)_"
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in df.iterrows():
        lines.append(
            "| " + " | ".join(_cell(r[c]).replace("|", "\\|").replace("\n", " ") for c in cols) + " |"
        )
    return "\n".join(lines)


def _html_table(df: pd.DataFrame) -> str:
    if df.empty:
        return "<p><i>(none)</i></p>"
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    body = []
    for _, r in df.iterrows():
        cells = []
        for c in df.columns:
            text = _cell(r[c])
            cls = f" class='{text}'" if text in ("pass", "FAIL", "unknown") else ""
            cells.append(f"<td{cls}>{html.escape(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _status(ok: bool | None) -> str:
    return {True: "pass", False: "FAIL", None: "unknown"}[ok]


def build_doc(
    results: dict[str, Any],
    df: pd.DataFrame,
    summary: pd.DataFrame,
    comparison: pd.DataFrame | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    baseline: str = "",
) -> Doc:
    d = Doc()
    verdict = "PASSED" if results.get("passed") else "FAILED"
    d.h(1, f"{results.get('scenario')}: {results.get('title', '')} — {verdict}")
    d.p(results.get("description", ""))
    d.table(
        pd.DataFrame(
            [
                {"field": "seed", "value": results.get("seed")},
                {"field": "replay", "value": results.get("replay", "")},
                {"field": "transport", "value": results.get("transport")},
                {"field": "quick", "value": results.get("quick")},
                {"field": "started", "value": results.get("started_at")},
                {"field": "duration", "value": f"{results.get('duration_s', 0):.1f} s"},
            ]
        )
    )
    for err in results.get("errors", []):
        d.p(f"**FAIL** run error: {err}")
    d.h(2, "Expectations")
    d.table(
        pd.DataFrame(
            [
                {
                    "expectation": e["name"],
                    "status": _status(e["ok"]),
                    "what must hold": e["text"],
                    "observed": e["detail"],
                }
                for e in results.get("expectations", [])
            ],
            columns=["expectation", "status", "what must hold", "observed"],
        )
    )
    if comparison is not None:
        d.h(2, f"Comparison with baseline {baseline} (threshold {threshold:.0%})")
        reg = comparison[comparison["status"] == "regression"]
        d.p(
            f"{len(reg)} regression(s) beyond the threshold."
            if len(reg)
            else "No regression beyond the threshold."
        )
        d.table(comparison[comparison["status"] != "same"].reset_index(drop=True))
    d.h(2, "Checkers")
    rows = []
    for name, v in results.get("variants", {}).items():
        for c in v.get("checks", {}).values():
            rows.append(
                {"variant": name, "checker": c["name"], "status": _status(c["valid"]), "result": c["summary"]}
            )
    d.table(pd.DataFrame(rows, columns=["variant", "checker", "status", "result"]))
    witnesses = [
        (name, c)
        for name, v in results.get("variants", {}).items()
        for c in v.get("checks", {}).values()
        if c.get("witnesses") and c["valid"] is not True
    ]
    for name, c in witnesses:
        d.h(3, f"Witnesses: {name} / {c['name']}")
        d.table(pd.DataFrame(c["witnesses"]))
    gc = [
        (n, v["checks"]["visibility"]["metrics"])
        for n, v in results.get("variants", {}).items()
        if v.get("checks", {}).get("visibility", {}).get("metrics", {}).get("vanished_by_gc")
    ]
    for name, m in gc:
        d.h(3, f"Objects removed by the legacy GC while still wanted ({name})")
        d.p(
            f"{m['vanished_by_gc']} reads missed because the master's GC had removed the key: "
            + ", ".join(m.get("vanished_keys", [])[:20])
            + (" …" if len(m.get("vanished_keys", [])) > 20 else "")
        )
    d.h(2, "Figures")
    d.table(summary)
    d.h(2, "Plots")
    for png, alt in (
        ("latency.png", "latency over time"),
        ("throughput.png", "throughput"),
        ("memory.png", "memory use vs allocation"),
    ):
        d.img(png, alt)
    d.h(2, "Variants, topology and fault plan")
    for name, v in results.get("variants", {}).items():
        d.h(3, name)
        d.p(v.get("description", ""))
        if v.get("error"):
            d.p(f"**FAIL** {v['error']}")
            d.code(v.get("traceback", ""))
        d.code(
            json.dumps(
                {
                    "topology": v.get("topology"),
                    "workload": v.get("workload"),
                    "start_config": v.get("start_config"),
                    "processes": v.get("processes"),
                },
                indent=2,
                default=str,
            )
        )
        d.p("Fault plan (with the run's seed; `umbra run --plan FILE` accepts it back):")
        d.code(_yaml(v.get("plan", {})))
        fw = v.get("fault_windows", [])
        if fw:
            d.table(pd.DataFrame(fw))
        faults = df[(df["variant"] == name) & (df["kind"] == "fault")]
        if not faults.empty:
            d.p("Fault actions:")
            d.table(
                faults[["time_start", "time_end", "client", "op", "key", "result_code", "note", "detail"]]
                .rename(columns={"client": "fault", "op": "injector", "key": "target", "note": "action"})
                .reset_index(drop=True)
            )
        if v.get("workload_metrics"):
            d.p("Workload figures:")
            d.code(json.dumps(v["workload_metrics"], indent=2, default=str))
        final = v.get("final") or {}
        if final:
            d.p("Master after remove_all(force):")
            d.code(
                json.dumps(
                    {k: final.get(k) for k in ("removed_at_teardown", "gauges", "invariants")},
                    indent=2,
                    default=str,
                )
            )
    d.p(
        "Files: history.parquet / history.csv (every operation, fault action and master event), "
        "results.json, summary.csv, memory.csv, logs/ (master and holder stderr), umbra.log."
    )
    return d


def _yaml(data: Any) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)


def write_report(
    run_dir: Path, baseline: Path | None = None, threshold: float = DEFAULT_THRESHOLD
) -> dict[str, Any]:
    """(Re)write summary.csv, plots, report.md and report.html; with a baseline also
    ``comparison.csv``. Returns ``{"regressions": n, "passed": bool}``."""
    results = json.loads((run_dir / "results.json").read_text())
    df = hist.load(run_dir)
    mem_path = run_dir / "memory.csv"
    mem = pd.read_csv(mem_path) if mem_path.exists() else pd.DataFrame()
    summary = summary_frame(results)
    summary.to_csv(run_dir / "summary.csv", index=False)
    plot_latency(df, results, run_dir / "latency.png")
    plot_throughput(df, results, run_dir / "throughput.png")
    plot_memory(
        mem if not mem.empty else pd.DataFrame(columns=["variant", "t"]), results, run_dir / "memory.png"
    )
    comparison = None
    if baseline is not None:
        base_summary = baseline / "summary.csv"
        if not base_summary.exists():
            raise FileNotFoundError(f"baseline {baseline} has no summary.csv (is it a run directory?)")
        comparison = compare(summary, pd.read_csv(base_summary), threshold)
        comparison.to_csv(run_dir / "comparison.csv", index=False)
    doc = build_doc(results, df, summary, comparison, threshold, str(baseline or ""))
    (run_dir / "report.md").write_text(doc.markdown())
    (run_dir / "report.html").write_text(doc.html(f"{results.get('scenario')} seed {results.get('seed')}"))
    regressions = 0 if comparison is None else int((comparison["status"] == "regression").sum())
    return {"regressions": regressions, "passed": bool(results.get("passed")), "comparison": comparison}

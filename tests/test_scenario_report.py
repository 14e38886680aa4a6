"""Reports from run files, and baseline comparison that flags regressions beyond the threshold."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from scenarios import history as hist
from scenarios import report_cli
from scenarios.checkers import standard_checks
from scenarios.history import digest_hex, normalise
from scenarios.report import compare, summary_frame, write_report

CS = digest_hex(b"v")


def _run_dir(tmp_path: Path, name: str, put_ms: float, errors: int = 0, mismatches: bool = False) -> Path:
    rows = []
    for i in range(50):
        t = i * 0.05
        rows.append(
            {
                "variant": "base",
                "kind": "op",
                "time_start": t,
                "time_end": t + put_ms / 1000,
                "client": "w0",
                "op": "put",
                "key": f"k{i}",
                "size": 4096,
                "result_code": -800 if i < errors else 0,
                "bytes_checksum": CS,
            }
        )
        rows.append(
            {
                "variant": "base",
                "kind": "op",
                "time_start": t + 0.02,
                "time_end": t + 0.021,
                "client": "w0",
                "op": "get",
                "key": f"k{i}",
                "size": 4096,
                "result_code": 0,
                "bytes_checksum": digest_hex(b"other") if mismatches and i == 7 else CS,
            }
        )
    rows.append(
        {
            "variant": "base",
            "kind": "fault",
            "time_start": 1.0,
            "time_end": 1.01,
            "client": "fault:d@p",
            "op": "network.delay",
            "key": "proxy:master",
            "note": "apply",
            "detail": "{}",
        }
    )
    rows.append(
        {
            "variant": "base",
            "kind": "fault",
            "time_start": 1.5,
            "time_end": 1.51,
            "client": "fault:d@p",
            "op": "network.delay",
            "key": "proxy:master",
            "note": "revert",
            "detail": "{}",
        }
    )
    df = normalise(pd.DataFrame(rows))
    final = {
        "reachable": True,
        "removed_at_teardown": 50,
        "invariants": [],
        "segments": [],
        "gauges": {"allocated_bytes": 0, "reserved_bytes": 0, "key_count": 0, "processing_key_count": 0},
    }
    checks = standard_checks(df, final)
    results = {
        "scenario": "synthetic",
        "title": "synthetic",
        "description": "made by a test",
        "seed": 9,
        "transport": "tcp",
        "quick": True,
        "replay": "umbra run synthetic --seed 9",
        "passed": True,
        "duration_s": 1.0,
        "expectations": [{"name": "e", "text": "t", "ok": not mismatches, "detail": "d"}],
        "variants": {
            "base": {
                "description": "d",
                "plan": {
                    "seed": 9,
                    "faults": [
                        {
                            "fault": "network.delay",
                            "target": "proxy:master",
                            "when": {"at": 1.0},
                            "params": {"latency": 0.1},
                        }
                    ],
                },
                "final": final,
                "t_workload": 0.0,
                "checks": {c.name: c.to_dict() for c in checks},
                "fault_windows": [
                    {
                        "label": "d@p",
                        "fault": "network.delay",
                        "target": "proxy:master",
                        "start": 1.0,
                        "end": 1.5,
                    }
                ],
            }
        },
    }
    run = tmp_path / name
    run.mkdir()
    hist.save(df, run)
    (run / "results.json").write_text(json.dumps(results, default=str))
    pd.DataFrame(
        [
            {
                "variant": "base",
                "t": 0.5,
                "allocated_bytes": 1 << 20,
                "reserved_bytes": 2 << 20,
                "capacity_bytes": 64 << 20,
                "key_count": 5,
                "used_ratio": 0.02,
            }
        ]
    ).to_csv(run / "memory.csv", index=False)
    return run


def test_report_files_are_written_with_plan_seed_and_plots(tmp_path):
    run = _run_dir(tmp_path, "r1", put_ms=2.0)
    res = write_report(run)
    assert res["passed"] and res["regressions"] == 0
    for f in ("report.md", "report.html", "summary.csv", "latency.png", "throughput.png", "memory.png"):
        assert (run / f).stat().st_size > 0, f
    md = (run / "report.md").read_text()
    assert "umbra run synthetic --seed 9" in md and "network.delay" in md and "latency: 0.1" in md
    assert (run / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (run / "report.html").read_text()
    assert "<table>" in html and "<img src='latency.png'" in html
    summary = pd.read_csv(run / "summary.csv")
    p50 = summary[(summary["metric"] == "put_p50")]["value"].iloc[0]
    assert p50 == pytest.approx(2.0, rel=0.01)


def test_witnesses_of_a_failed_checker_reach_the_report(tmp_path):
    run = _run_dir(tmp_path, "bad", put_ms=2.0, mismatches=True)
    write_report(run)
    md = (run / "report.md").read_text()
    assert "Witnesses: base / checksums" in md and "k7" in md


def test_baseline_comparison_flags_a_latency_regression(tmp_path):
    base = _run_dir(tmp_path, "base", put_ms=2.0)
    slow = _run_dir(tmp_path, "slow", put_ms=8.0)
    write_report(base)
    res = write_report(slow, baseline=base, threshold=0.25)
    comp = res["comparison"]
    reg = comp[comp["status"] == "regression"]
    assert "put_p50" in set(reg["metric"]) and res["regressions"] >= 1
    assert (slow / "comparison.csv").exists() and "Comparison with baseline" in (
        slow / "report.md"
    ).read_text()
    # the same run against itself: nothing moves
    same = write_report(base, baseline=base)
    assert same["regressions"] == 0


def test_correctness_counts_regress_on_any_increase(tmp_path):
    base = _run_dir(tmp_path, "base", put_ms=2.0)
    worse = _run_dir(tmp_path, "worse", put_ms=2.0, errors=2, mismatches=True)
    cur, old = (
        summary_frame(json.loads((worse / "results.json").read_text())),
        summary_frame(json.loads((base / "results.json").read_text())),
    )
    comp = compare(cur, old, threshold=10.0)  # even a huge threshold does not hide a wrong byte
    status = dict(zip(comp["metric"], comp["status"], strict=True))
    assert status["checksum_mismatches"] == "regression" and status["errors"] == "regression"


def test_small_moves_below_the_floor_are_not_regressions():
    cur = pd.DataFrame(
        [{"variant": "v", "metric": "put_p50", "value": 0.3, "unit": "ms", "better": "lower", "floor": 1.0}]
    )
    base = cur.assign(value=0.1)
    assert compare(cur, base, 0.25)["status"].iloc[0] == "same"


def test_report_cli_exit_codes(tmp_path, capsys):
    base = _run_dir(tmp_path, "base", put_ms=2.0)
    slow = _run_dir(tmp_path, "slow", put_ms=8.0)
    assert report_cli.main([str(base)]) == 0
    assert report_cli.main([str(slow), "--baseline", str(base)]) == 1
    assert "regression" in capsys.readouterr().out
    assert report_cli.main([str(slow), "--baseline", str(base), "--threshold", "100"]) == 0
    assert report_cli.main([str(tmp_path / "nowhere")]) == 2
    empty = tmp_path / "empty"
    shutil.copytree(base, empty)
    (empty / "summary.csv").unlink()
    assert report_cli.main([str(slow), "--baseline", str(empty)]) == 2

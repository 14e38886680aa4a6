"""End to end: ``umbra run`` of short scenarios writes a complete run directory and passes; the
legacy-GC scenario reproduces the vanished objects and its GC-off twin has none; ``umbra list``."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from scenarios import list_cli, run_cli
from scenarios.builtin import SCENARIOS
from scenarios.cli import main as umbra
from scenarios.history import COLUMNS

SEED = 424242


def test_umbra_run_tcp_smoke_quick(tmp_path, capsys):
    assert umbra(["run", "tcp-smoke", "--quick", "--seed", str(SEED), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"seed={SEED}" in out and "passed" in out
    run = tmp_path / f"tcp-smoke-{SEED}"
    for f in (
        "history.parquet",
        "history.csv",
        "summary.csv",
        "results.json",
        "report.md",
        "report.html",
        "latency.png",
        "throughput.png",
        "memory.png",
        "memory.csv",
        "umbra.log",
    ):
        assert (run / f).exists(), f
    assert any(p.name.endswith("master.log") for p in (run / "logs").iterdir())
    df = pd.read_parquet(run / "history.parquet")
    assert tuple(df.columns) == COLUMNS
    ops = df[df["kind"] == "op"]
    assert len(ops) > 100 and set(ops["op"]) >= {"put", "get"}
    results = json.loads((run / "results.json").read_text())
    assert results["passed"] and results["seed"] == SEED
    assert results["replay"] == f"umbra run tcp-smoke --seed {SEED} --quick"
    checks = results["variants"]["baseline"]["checks"]
    assert all(checks[c]["valid"] for c in ("checksums", "visibility", "error_codes", "no_leak"))
    assert results["variants"]["baseline"]["final"]["gauges"]["allocated_bytes"] == 0


def test_legacy_gc_reproduces_vanished_objects(tmp_path):
    assert run_cli.main(["legacy-gc-read-once", "--quick", "--seed", str(SEED), "--out", str(tmp_path)]) == 0
    run = tmp_path / f"legacy-gc-read-once-{SEED}"
    results = json.loads((run / "results.json").read_text())
    on = results["variants"]["gc_on"]
    off = results["variants"]["gc_off"]
    assert on["start_config"]["master_flags"] == ["--enable_gc", "--gc_delay_ms=1000"]
    vis_on, vis_off = on["checks"]["visibility"]["metrics"], off["checks"]["visibility"]["metrics"]
    assert vis_on["vanished_by_gc"] > 0 and vis_off["vanished_by_gc"] == 0
    df = pd.read_parquet(run / "history.parquet")
    rereads = df[(df["note"] == "reread")]
    assert (rereads[rereads["variant"] == "gc_on"]["result_code"] == -704).mean() >= 0.9
    assert (rereads[rereads["variant"] == "gc_off"]["result_code"] == 0).all()
    md = (run / "report.md").read_text()
    assert "Objects removed by the legacy GC while still wanted (gc_on)" in md and "gc.legacy" in md


def test_run_refuses_bad_input(tmp_path, capsys):
    assert run_cli.main(["no-such-scenario", "--out", str(tmp_path)]) == 2
    bad = tmp_path / "plan.yaml"
    bad.write_text("faults:\n  - {fault: process.kil, target: holder:0, when: at 1}\n")
    assert run_cli.main(["tcp-smoke", "--plan", str(bad), "--out", str(tmp_path)]) == 2
    assert "did you mean process.kill" in capsys.readouterr().err
    assert run_cli.main(["tcp-smoke", "holder-killed", "--plan", str(bad), "--out", str(tmp_path)]) == 2


def test_rdma_without_a_device_is_a_clear_usage_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(run_cli, "rdma_devices", lambda: [])
    assert run_cli.main(["tcp-smoke", "--transport", "rdma", "--out", str(tmp_path)]) == 2
    assert "Soft-RoCE guest" in capsys.readouterr().err


def test_umbra_list_shows_scenarios_faults_and_failpoints(capsys):
    assert list_cli.main([]) == 0
    out = capsys.readouterr().out
    for name in SCENARIOS:
        assert name in out
    for fault in ("memory.fragment", "network.blackhole", "process.kill", "gc.legacy", "failpoint"):
        assert fault in out
    for fp in ("master.put_start", "tcp.send", "tcp.server_apply", "client.read_replica", "master.rpc.recv"):
        assert fp in out


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_every_builtin_plan_is_valid_and_states_expectations(name):
    from fault.registry import validate_plan

    scn = SCENARIOS[name]
    assert scn.description and scn.expectations
    for v in scn.variants(quick=True):
        validate_plan(v.plan)

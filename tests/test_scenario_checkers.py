"""Checkers on synthetic histories: each must fail on the history that breaks its rule and pass on
the one that does not (wrong bytes, an undocumented code, a leak, a lost put, a resurrection...)."""

from __future__ import annotations

import json
from typing import Any

import pandas as pd
import pytest

from scenarios.checkers import (
    check_checksums,
    check_codes,
    check_no_leak,
    check_recovery,
    check_visibility,
    fault_windows,
    performance,
    standard_checks,
)
from scenarios.history import History, digest_hex, normalise

A, B = digest_hex(b"value-a"), digest_hex(b"value-b")


def op(
    t0: float,
    op: str,
    key: str,
    code: int = 0,
    cs: str = "",
    t1: float | None = None,
    client: str = "w0",
    size: int = 7,
    note: str = "",
) -> dict[str, Any]:
    return {
        "variant": "v",
        "kind": "op",
        "time_start": t0,
        "time_end": t0 + 0.01 if t1 is None else t1,
        "client": client,
        "op": op,
        "key": key,
        "size": size,
        "result_code": code,
        "bytes_checksum": cs,
        "note": note,
    }


def event(t: float, kind: str, key: str = "", **detail: Any) -> dict[str, Any]:
    return {
        "variant": "v",
        "kind": "event",
        "time_start": t,
        "time_end": t,
        "client": "master",
        "op": kind,
        "key": key,
        "detail": json.dumps(detail),
    }


def fault(t: float, name: str, target: str, action: str = "apply", code: int = 0) -> dict[str, Any]:
    return {
        "variant": "v",
        "kind": "fault",
        "time_start": t,
        "time_end": t + 0.01,
        "client": f"fault:{name}@x",
        "op": name,
        "key": target,
        "note": action,
        "result_code": code,
        "detail": "{}",
    }


def frame(*rows: dict[str, Any]) -> pd.DataFrame:
    return normalise(pd.DataFrame(list(rows)))


# ------------------------------------------------------------------------------------ checksums


def test_checksums_pass_when_reads_return_what_was_written():
    df = frame(op(0.0, "put", "k", cs=A), op(1.0, "get", "k", cs=A), op(2.0, "get", "missing", code=-704))
    r = check_checksums(df)
    assert r.valid is True and r.metrics["reads_checked"] == 1


def test_checksums_fail_on_wrong_bytes():
    df = frame(op(0.0, "put", "k", cs=A), op(0.0, "put", "j", cs=B), op(1.0, "get", "k", cs=B))
    r = check_checksums(df)
    assert r.valid is False and r.metrics["mismatches"] == 1
    assert r.witnesses[0]["key"] == "k" and r.witnesses[0]["expected"] == [A]


def test_checksums_fail_on_bytes_read_before_any_put_began():
    df = frame(op(1.0, "get", "k", cs=A, t1=1.1), op(2.0, "put", "k", cs=A))
    assert check_checksums(df).valid is False


# ------------------------------------------------------------------------------------ codes


def test_codes_fail_on_an_undocumented_code():
    df = frame(op(0.0, "put", "k", code=-800), op(1.0, "get", "k", code=-12345))
    r = check_codes(df)
    assert r.valid is False and r.metrics["undocumented"] == 1 and r.witnesses[0]["result_code"] == -12345


def test_codes_fail_on_a_documented_but_unexpected_code():
    df = frame(op(0.0, "put", "k", code=-800), op(1.0, "put", "j", code=-200))
    assert check_codes(df, allowed={-800}).valid is False
    assert check_codes(df, allowed={-800, -200}).valid is True
    assert check_codes(df).valid is True


# ------------------------------------------------------------------------------------ visibility


def test_unexplained_miss_of_an_acknowledged_put_is_lost():
    df = frame(op(0.0, "put", "k", cs=A), op(1.0, "get", "k", code=-704))
    r = check_visibility(df)
    assert r.valid is False and r.metrics["lost"] == 1 and r.witnesses[0]["key"] == "k"


@pytest.mark.parametrize(
    "explanation,cause",
    [
        (op(0.5, "remove", "k"), "client remove"),
        (event(0.5, "evict", "k"), "evict"),
        (event(0.5, "object_lost", "k"), "object_lost"),
    ],
)
def test_misses_explained_by_a_removal_are_fine(explanation, cause):
    df = frame(op(0.0, "put", "k", cs=A), explanation, op(1.0, "get", "k", code=-704))
    r = check_visibility(df)
    assert r.valid is True and r.metrics["misses_explained"] == {cause: 1}


def test_gc_removals_are_counted_as_vanished_objects():
    df = frame(
        op(0.0, "put", "k", cs=A),
        op(0.1, "get", "k", cs=A),
        event(1.1, "gc_remove", "k"),
        op(1.5, "get", "k", code=-704),
    )
    r = check_visibility(df)
    assert r.valid is True and r.metrics["vanished_by_gc"] == 1 and r.metrics["vanished_keys"] == ["k"]


def test_a_removal_after_the_read_does_not_explain_it():
    df = frame(op(0.0, "put", "k", cs=A), op(1.0, "get", "k", code=-704), event(3.0, "evict", "k"))
    assert check_visibility(df).valid is False


def test_a_refused_remove_does_not_explain_a_miss():
    df = frame(op(0.0, "put", "k", cs=A), op(0.5, "remove", "k", code=-706), op(1.0, "get", "k", code=-704))
    assert check_visibility(df).valid is False


def test_reads_racing_the_put_promise_nothing():
    df = frame(
        op(0.0, "put", "k", cs=A, t1=2.0),
        op(1.0, "get", "k", code=-704),
        op(0.0, "put", "f", code=-800),
        op(1.0, "get", "f", code=-704),
    )
    assert check_visibility(df).valid is True


def test_a_master_restart_explains_misses():
    df = frame(
        op(0.0, "put", "k", cs=A), fault(0.5, "process.restart", "master"), op(1.0, "get", "k", code=-704)
    )
    r = check_visibility(df)
    assert r.valid is True and r.metrics["misses_explained"] == {"master restarted": 1}


def test_bytes_after_an_acknowledged_remove_are_a_resurrection():
    df = frame(op(0.0, "put", "k", cs=A), op(0.5, "remove", "k", t1=0.6), op(1.0, "get", "k", cs=A))
    r = check_visibility(df)
    assert r.valid is False and r.metrics["resurrected"] == 1


def test_overflowed_event_log_makes_unexplained_misses_unknown():
    df = frame(op(0.0, "put", "k", cs=A), event(0.2, "events_lost"), op(1.0, "get", "k", code=-704))
    assert check_visibility(df).valid is None


# ------------------------------------------------------------------------------------ leak


def _final(**gauges: Any) -> dict[str, Any]:
    base = {
        "allocated_bytes": 0,
        "reserved_bytes": 0,
        "key_count": 0,
        "processing_key_count": 0,
        "discarded_puts": 0,
    }
    return {
        "reachable": True,
        "removed_at_teardown": 3,
        "gauges": {**base, **gauges},
        "segments": [{"name": "s", "used": gauges.get("reserved_bytes", 0), "live_allocations": 0}],
        "invariants": [],
    }


def test_no_leak_passes_at_zero():
    assert check_no_leak(_final()).valid is True


@pytest.mark.parametrize(
    "gauges",
    [{"allocated_bytes": 4096}, {"reserved_bytes": 8192}, {"key_count": 1}, {"processing_key_count": 1}],
)
def test_leftover_allocations_are_a_leak(gauges):
    r = check_no_leak(_final(**gauges))
    assert r.valid is False and "still holds" in r.summary


def test_invariant_violations_fail_and_unreachable_master_is_unknown():
    f = _final()
    f["invariants"] = ["segment s: allocator used=64 live=1, replicas reserve 0 in 0"]
    assert check_no_leak(f).valid is False
    assert check_no_leak({"reachable": False, "error": "RPC_FAIL"}).valid is None


# ------------------------------------------------------------------------------------ recovery, perf


def test_recovery_measures_from_the_fault_to_the_first_success_after_the_last_failure():
    df = frame(
        op(0.0, "put", "a", cs=A),
        fault(1.0, "process.kill", "holder:0"),
        op(1.1, "put", "b", code=-800, t1=1.6),
        op(1.7, "put", "c", code=-800, t1=2.2),
        op(2.3, "put", "d", cs=A, t1=2.4),
        op(2.5, "put", "e", code=-200, t1=2.6),
        op(2.7, "put", "f", cs=A),
    )
    r = check_recovery(df, codes={-800})
    f = r.metrics["faults"][0]
    assert r.valid is True and f["failures"] == 2 and f["recovery_s"] == pytest.approx(1.4)
    r_all = check_recovery(df)  # counting the -200 too: it ends later
    assert r_all.metrics["faults"][0]["recovery_s"] == pytest.approx(1.71)


def test_no_success_after_the_fault_is_not_recovered():
    df = frame(fault(1.0, "process.kill", "holder:0"), op(1.1, "put", "b", code=-800))
    r = check_recovery(df)
    assert r.valid is False and r.metrics["faults"][0]["recovered"] is False


def test_fault_windows_pair_apply_and_revert():
    df = frame(
        fault(1.0, "network.delay", "proxy:m"),
        fault(3.0, "network.delay", "proxy:m", "revert"),
        fault(2.0, "process.kill", "holder:0"),
    )
    w = sorted(fault_windows(df), key=lambda x: x["start"])
    assert w[0]["end"] == 3.0 and w[1]["end"] is None


def test_performance_percentiles_and_throughput():
    rows = [op(i * 0.1, "put", f"k{i}", cs=A, t1=i * 0.1 + 0.001 * (i + 1), size=1000) for i in range(100)]
    p = performance(frame(*rows)).metrics
    assert p["put"]["count"] == 100 and p["put"]["p50_ms"] == pytest.approx(50.5, rel=0.05)
    assert p["put"]["max_ms"] == pytest.approx(100.0) and p["all"]["errors"] == 0


def test_history_records_ops_faults_and_events():
    h = History()
    h.begin_variant("v1")
    seen = []
    h.on_op(seen.append)
    h.op("w0", "put", "k", 7, 0, h.t0 + 0.1, h.t0 + 0.2, checksum=A, replica="seg")
    h.fault(
        "kill@holder:0",
        "process.kill",
        "apply",
        h.t0 + 0.3,
        h.t0 + 0.31,
        target="holder:0",
        detail={"pid": 1},
    )
    h.event("evict", h.t0 + 0.4, key="k")
    df = h.frame()
    assert list(df["kind"]) == ["op", "fault", "event"] and seen == [1]
    assert df.loc[0, "time_start"] == pytest.approx(0.1) and df.loc[0, "replica"] == "seg"
    assert json.loads(df.loc[1, "detail"]) == {"pid": 1}
    checks = {c.name: c for c in standard_checks(df, _final())}
    assert set(checks) == {"checksums", "visibility", "error_codes", "no_leak", "recovery", "performance"}

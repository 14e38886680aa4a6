"""``umbra bench store`` runs end to end (tiny counts) and reports every figure the issue names."""

from __future__ import annotations

import json

import pytest

from store.bench import store as bench

pytestmark = pytest.mark.timeout(240)


def test_bench_store_json(capsys) -> None:
    rc = bench.main(["--json", "--sizes", "4096", "1048576", "--count", "12", "--socket-repeat", "1"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert [r["size"] for r in out["results"]] == [4096, 1 << 20]
    for r in out["results"]:
        assert r["count"] == 12 and r["put_errors"] == 0 and r["get_errors"] == 0
        for k in ("put_MBps", "get_MBps", "put_p50_us", "get_p50_us", "socket_MBps"):
            assert r[k] > 0, k
    assert "ratio_to_socket" not in out["results"][0]
    assert set(out["results"][1]["ratio_to_socket"]) == {"put", "get"}
    assert out["verdict"]["errors"] == 0
    assert out["master_invariant_violations"] == [] and out["master_allocated_bytes_after"] == 0
    assert out["writer_counters"]["put_ok"] >= 24 and out["reader_counters"]["get_ok"] >= 24
    assert len(set(out["processes"].values())) == 5  # master+socket, holder, writer, reader, peer

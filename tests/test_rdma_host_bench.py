"""The RDMA benchmark's parts that need no device: perftest parsing and the no-device message."""

from __future__ import annotations

import pytest

from store.bench import rdma as bench

PERFTEST_MB = """
---------------------------------------------------------------------------------------
 #bytes     #iterations    BW peak[MB/sec]    BW average[MB/sec]   MsgRate[Mpps]
 65536      224              0.00               6.99   		   0.000112
---------------------------------------------------------------------------------------
"""
PERFTEST_GBITS = """
 #bytes     #iterations    BW peak[Gb/sec]    BW average[Gb/sec]   MsgRate[Mpps]
 65536      2160             0.00               0.38   		   0.000719
"""


def test_perftest_mib_per_second_become_mb_per_second():
    assert bench.parse_perftest(PERFTEST_MB) == pytest.approx(6.99 * 1.048576)


def test_perftest_gbits_become_mb_per_second():
    assert bench.parse_perftest(PERFTEST_GBITS) == pytest.approx(0.38 * 125.0)


def test_perftest_without_a_report_is_none():
    assert bench.parse_perftest("Couldn't connect to 127.0.0.1:18515\n") is None


def test_no_device_says_where_to_run(monkeypatch):
    from store.transfer.rdma import device

    monkeypatch.setattr(device, "list_device_names", lambda *a, **k: [])
    with pytest.raises(SystemExit, match="inside the Soft-RoCE guest"):
        bench.main(["--json"])

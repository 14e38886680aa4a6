"""Master flags: Mooncake's names, gflags spellings, units, validation."""

import dataclasses

import pytest

from store.master.config import MasterConfig, build_parser, parse_args, parse_duration
from store.master.server import main


def test_parser_defaults_match_the_config_defaults():
    cfg, ignored = parse_args([])
    assert cfg == MasterConfig() and ignored == []
    d = MasterConfig()
    assert (d.rpc_port, d.metrics_port) == (50051, 9003)
    assert (d.default_kv_lease_ttl, d.default_kv_soft_pin_ttl) == (10.0, 1800.0)
    assert (d.eviction_high_watermark_ratio, d.eviction_ratio, d.client_ttl) == (0.90, 0.05, 10.0)
    assert (d.allocation_strategy, d.memory_allocator, d.gc_mode) == ("random", "offset", "off")
    assert d.rpc_address == "127.0.0.1" and d.metrics_host == "127.0.0.1"


@pytest.mark.parametrize("argv", [
    ["--rpc_port=1234"], ["--rpc_port", "1234"], ["-rpc_port=1234"], ["-rpc_port", "1234"], ["--port=1234"],
])
def test_rpc_port_spellings(argv):
    assert parse_args(argv)[0].rpc_port == 1234


@pytest.mark.parametrize("argv,mode", [
    (["--enable_gc"], "legacy"), (["-enable_gc"], "legacy"), (["--enable_gc=true"], "legacy"),
    (["--enable_gc=false"], "off"), (["--noenable_gc"], "off"), (["--gc_mode=on_demand"], "on_demand"),
    (["--enable_gc", "--gc_mode", "legacy"], "legacy"),
])
def test_gc_flags(argv, mode):
    assert parse_args(argv)[0].gc_mode == mode


def test_units_and_other_flags():
    cfg, _ = parse_args(["--default_kv_lease_ttl=5000", "--default_kv_soft_pin_ttl", "2m", "-client_ttl=3",
                         "--eviction_high_watermark_ratio=0.5", "--eviction_ratio", "0.2", "-v=1",
                         "--memory_allocator", "cachelib", "--allocation_strategy=free_ratio_first",
                         "--eviction_by=bytes", "--max_threads=4", "--metrics_port=0", "--seed=5",
                         "--classic_unmount", "--put_start_release_timeout_sec=60"])
    assert cfg.default_kv_lease_ttl == 5.0 and cfg.default_kv_soft_pin_ttl == 120.0 and cfg.client_ttl == 3.0
    assert cfg.eviction_high_watermark_ratio == 0.5 and cfg.eviction_ratio == 0.2 and cfg.v == 1
    assert cfg.memory_allocator == "cachelib" and cfg.allocation_strategy == "free_ratio_first"
    assert cfg.eviction_by == "bytes" and cfg.max_threads == 4 and cfg.metrics_port == 0 and cfg.seed == 5
    assert cfg.classic_unmount and cfg.put_start_release_timeout == 60.0
    assert parse_args(["-v", "2"])[0].v == 2 and parse_args(["--v=1"])[0].v == 1
    assert parse_args(["--default_kv_lease_ttl=2s"])[0].default_kv_lease_ttl == 2.0
    assert parse_args(["--client_ttl=500ms"])[0].client_ttl == 0.5


def test_ignored_mooncake_flags_are_reported():
    _, ignored = parse_args(["--enable_ha=true", "--etcd_endpoints=127.0.0.1:2379", "--rpc_port=1"])
    assert sorted(ignored) == ["enable_ha", "etcd_endpoints"]


@pytest.mark.parametrize("argv", [
    ["--eviction_ratio=1.5"], ["--eviction_high_watermark_ratio=-0.1"], ["--client_ttl=0"],
    ["--enable_gc", "--gc_mode=on_demand"], ["--rpc_port=70000"], ["--max_threads=0"],
    ["--allocation_strategy=nonsense", "--rpc_port=0", "--metrics_port=0"],
])
def test_bad_values_are_refused_by_main(argv, capsys):
    assert main(argv) == 2
    assert "umbra master:" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--memory_allocator=foo"], ["--no_such_flag=1"], ["--rpc_port=x"],
                                  ["--enable_gc=maybe"]])
def test_unparseable_flags_exit_2(argv):
    with pytest.raises(SystemExit) as ei:
        parse_args(argv)
    assert ei.value.code == 2


def test_bad_failpoint_env_is_refused(monkeypatch, capsys):
    monkeypatch.setenv("UMBRA_FAILPOINTS", "master.put_start=explode")
    assert main(["--rpc_port=0", "--metrics_port=0"]) == 2
    assert "UMBRA_FAILPOINTS" in capsys.readouterr().err


def test_durations():
    assert parse_duration("250", "ms") == 0.25 and parse_duration("1h", "ms") == 3600.0
    with pytest.raises(ValueError):
        parse_duration("soon", "s")


def test_every_config_field_but_internal_ones_has_a_flag():
    dests = {a.dest for a in build_parser()._actions}
    internal = {"eviction_interval", "gc_interval", "client_monitor_interval", "metric_report_interval",
                "gc_queue_size", "frame_timeout", "gc_mode"}
    missing = {f.name for f in dataclasses.fields(MasterConfig)} - dests - internal
    assert missing == set()

"""Injectors against a real cluster (``umbra master`` and holder processes, in-process clients):
memory really fills and fragments, failpoints really fire in the master (RPC and environment),
processes really die, freeze and come back, proxied connections really reset and stall."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from fault.plan import load_plan
from fault.registry import get
from store.errors import ErrorCode

pytest_plugins = ("scenarios.fixtures",)

MiB = 1 << 20
NO_EVICTION = ["--eviction_high_watermark_ratio=1.0", "--eviction_ratio=0"]


def wait_until(pred: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        time.sleep(0.05)


def fault_details(history: Any, fault: str) -> dict[str, Any]:
    import json

    df = history.frame()
    rows = df[(df["kind"] == "fault") & (df["op"] == fault) & (df["note"] == "apply")]
    assert len(rows) == 1, f"{fault} applied {len(rows)} times"
    assert rows.iloc[0]["result_code"] == 0, rows.iloc[0]["detail"]
    return json.loads(rows.iloc[0]["detail"])


def test_fill_and_fragment_make_large_puts_fail_despite_free_space(cluster, fault_plan, history, umbra_seed):
    plan = fault_plan(
        {
            "faults": [
                {
                    "fault": "memory.fill",
                    "target": "holder:0",
                    "when": "setup",
                    "params": {"sizes": {"choices": ["512kb", "1mb"], "weights": [1, 3]}},
                },
                {"fault": "memory.fragment", "target": "holder:0", "when": "setup"},
            ]
        }
    )
    c = cluster(plan=plan, holders=1, clients=1, segment_size="32mb", master_flags=NO_EVICTION)
    fill = fault_details(history, "memory.fill")
    frag = fault_details(history, "memory.fragment")
    assert fill["stop"] == "NO_AVAILABLE_HANDLE" and fill["utilisation"] > 0.9, (umbra_seed, fill)
    assert frag["removed"] == frag["objects"] // 2 and frag["free"] >= 12 * MiB, (umbra_seed, frag)
    assert frag["largest_free_region"] < 2 * MiB
    rc = c.clients[0].put("large", b"\x01" * (2 * MiB))
    assert rc == int(ErrorCode.NO_AVAILABLE_HANDLE), (umbra_seed, rc)
    seg = c.master_admin().inspect("segments")[0]["allocator"]
    assert seg["free"] >= 2 * MiB  # the master reports room: the failure is fragmentation
    assert c.clients[0].put("small", b"\x02" * (256 * 1024)) == 0  # a hole still takes a small value
    puts = history.frame()
    fill_puts = puts[(puts["client"] == "fault:memory.fill@holder:0") & (puts["op"] == "put")]
    assert (fill_puts["result_code"] == 0).sum() == fill["puts"]


def test_failpoints_fire_in_the_master_by_rpc_and_by_environment(cluster, fault_plan):
    plan = fault_plan(
        {
            "faults": [
                {
                    "fault": "failpoint",
                    "target": "master",
                    "when": "start",
                    "params": {
                        "point": "master.put_start",
                        "action": "error",
                        "arg": "NO_AVAILABLE_HANDLE",
                        "count": 1,
                    },
                },
                {
                    "fault": "failpoint",
                    "target": "master",
                    "when": "setup",
                    "params": {
                        "point": "master.get_replica_list",
                        "action": "error",
                        "arg": -900,
                        "count": 1,
                    },
                },
            ]
        }
    )
    c = cluster(plan=plan, holders=1, clients=1, segment_size="16mb")
    w = c.clients[0]
    assert w.put("a", b"x" * 4096) == int(ErrorCode.NO_AVAILABLE_HANDLE)  # armed via UMBRA_FAILPOINTS
    assert w.put("a", b"x" * 4096) == 0
    assert w.get("a") == b""  # armed via ArmFailpoints: this read gets RPC_FAIL
    assert w.client.last_op().code == int(ErrorCode.RPC_FAIL)
    assert w.get("a") == b"x" * 4096
    fired = {fp["name"]: fp["fired"] for fp in c.master_admin().list_failpoints()}
    assert fired == {"master.put_start": 1, "master.get_replica_list": 1}
    c.scheduler.stop()  # reverts the setup-phase point (ArmFailpoints) at the end of the run
    assert [fp["name"] for fp in c.master_admin().list_failpoints()] == ["master.put_start"]


def test_kill_freeze_thaw_and_restart(cluster, umbra_seed):
    c = cluster(holders=2, clients=1, segment_size="16mb")
    ctx_rng = __import__("random").Random(umbra_seed)

    def inj(name: str, target: str, **params: Any) -> Any:
        spec = load_plan(
            {"faults": [{"fault": name, "target": target, "when": "at 0", "params": params}]}
        ).faults[0]
        return get(name)(spec, ctx_rng)

    def state(pid: int) -> str:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0]

    stop = inj("process.stop", "holder:1", duration=5.0)
    detail = stop.apply(c)
    wait_until(lambda: state(detail["pid"]) == "T", 5, "the holder stopped by SIGSTOP")
    stop.revert(c)
    wait_until(lambda: state(detail["pid"]) != "T", 5, "the holder running again after SIGCONT")
    kill = inj("process.kill", "holder:0")
    k = kill.apply(c)
    assert not c.holders[0].alive() and k["exit_code"] == -9 and not kill.needs_revert()
    # the master restarts on its port; the surviving holder and the client remount on NEED_REMOUNT
    w = c.clients[0]
    assert w.put("before", b"b" * 4096) in (0, int(ErrorCode.TRANSFER_FAIL))
    restart = inj("process.restart", "master")
    r = restart.apply(c)
    assert r["before"]["pid"] != r["after"]["pid"]
    wait_until(
        lambda: w.put(f"after-{time.monotonic()}", b"a" * 4096) == 0, 20, "a put after the master restart"
    )
    assert w.get("before") == b""  # a restarted master has forgotten every object


def test_proxy_reset_is_retried_and_blackhole_fails_the_transfer(cluster, fault_plan, umbra_seed):
    c = cluster(
        holders=1,
        clients=1,
        segment_size="16mb",
        proxy_transfer=True,
        slice_timeout_s=1.0,
        transfer_timeout_s=3.0,
    )
    w = c.clients[0]
    value = bytes(range(256)) * 4096  # 1 MiB
    assert w.put("k1", value) == 0
    proxy = c.proxy("transfer")
    assert proxy.stats()["bytes_up"] >= len(value)  # the data really crossed the proxy

    def opened() -> int:
        return int(w.client.engine.stats()["transports"]["tcp"].get("connections_opened", 0))

    before = opened()
    assert proxy.reset_connections() >= 1
    assert w.get("k1") == value  # the reset connection is replaced; the read goes through
    assert opened() > before and proxy.counter("connections") > before
    hole = proxy.add_toxic("blackhole")
    rc = w.put("k2", value)
    assert rc == int(ErrorCode.TRANSFER_FAIL), (umbra_seed, rc)
    proxy.remove_toxic(hole)
    assert w.put("k3", value) == 0 and w.get("k3") == value
    assert c.master_admin().query_key("k2") is None  # the failed put was revoked: nothing half-written

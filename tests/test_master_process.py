"""``umbra master`` as a real process driven by two client processes; one client is killed."""

import json
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request

import pytest
from master_helpers import REPO, MasterProcess

from store.errors import ErrorCode, StoreError
from store.master.client import MasterClient

CLIENT_SCRIPT = textwrap.dedent("""
    import sys, time
    from store.master.client import MasterClient, Heartbeat
    from store.master.types import ReplicateConfig, Segment
    host, port, name, n = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    other = sys.argv[5] if len(sys.argv) > 5 else ""
    mc = MasterClient((host, port))
    seg = Segment(id=f"seg-{name}", name=f"127.0.0.1:{40000 + n}", base=(n + 1) << 34, size=64 << 20,
                  te_endpoint=f"127.0.0.1:{41000 + n}", transport={"rkey": n})
    mc.mount_segment(seg, name)
    hb = Heartbeat(mc, name, interval=0.2, on_need_remount=lambda: mc.remount_segment([seg], name)).start()
    for i in range(5):
        key = f"{name}-{i}"
        mc.put_start(name, key, 1 << 20, ReplicateConfig(preferred_segments=(seg.name,)))
        mc.put_end(name, key)
    if other:  # a put into the other client's segment that this process never finishes
        mc.put_start(name, f"{name}-zombie", 1 << 20, ReplicateConfig(preferred_segments=(other,)))
    print("ready", flush=True)
    sys.stdin.read()  # until the test closes stdin (or kills us)
    hb.stop()
""")


def start_client(master: MasterProcess, name: str, n: int, other: str = "") -> subprocess.Popen:
    args = [sys.executable, "-c", CLIENT_SCRIPT, master.rpc[0], str(master.rpc[1]), name, str(n)]
    if other:
        args.append(other)
    proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=REPO)
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.kill()
        raise AssertionError(f"client {name} failed: {line!r} {proc.stderr.read()}")
    return proc


@pytest.fixture
def master():
    m = MasterProcess("-client_ttl=2", "-v=1", "--eviction_high_watermark_ratio", "0.95",
                      "--enable_ha=false", env={"UMBRA_FAILPOINTS": "master.remove=error(-800)*1"})
    yield m
    m.cleanup()


@pytest.fixture
def clients():
    procs: list[subprocess.Popen] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(10)
        for f in (p.stdin, p.stdout, p.stderr):
            f.close()


def wait_for(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def test_killed_client_is_expired_and_its_segment_unmounted(master, clients):
    assert master.banner.startswith("umbra master listening rpc=127.0.0.1:")
    clients.append(start_client(master, "alive", 1))
    clients.append(start_client(master, "doomed", 2, other="127.0.0.1:40001"))
    with MasterClient(master.rpc) as mc:
        assert {c["client_id"] for c in mc.inspect("clients")} == {"alive", "doomed"}
        assert len(mc.inspect("keys")) == 11
        assert mc.query_key("doomed-zombie")["state"] == "PROCESSING"
        alive_seg = next(s for s in mc.inspect("segments") if s["id"] == "seg-alive")
        assert alive_seg["allocated_bytes"] == 6 << 20  # its 5 keys + the zombie

        clients[1].send_signal(signal.SIGKILL)
        clients[1].wait(10)
        killed_at = time.monotonic()
        # client_ttl = 2 s and a 1-s monitor: gone within ~3 s; allow for a loaded machine
        wait_for(lambda: all(s["id"] != "seg-doomed" for s in mc.inspect("segments")), 15,
                 "the dead client's segment to be unmounted")
        assert time.monotonic() - killed_at >= 1.5  # not before its TTL
        keys = set(mc.inspect("keys"))
        assert keys == {f"alive-{i}" for i in range(5)}  # its objects and its zombie put are gone
        alive_seg = next(s for s in mc.inspect("segments") if s["id"] == "seg-alive")
        assert alive_seg["allocated_bytes"] == 5 << 20
        gauges = mc.inspect("gauges")
        assert gauges["active_clients"] == 1 and gauges["total_capacity_bytes"] == 64 << 20
        counters = mc.inspect("counters")
        assert counters["clients_expired"] == 1 and counters["zombie_puts_reclaimed"] == 1
        assert mc.check_invariants() == []
        host, port = master.metrics
        text = urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5).read().decode()
        assert "master_active_clients 1.0" in text

        # the live client keeps working; the env-armed failpoint fires once
        mc.put_start("alive", "late", 100)
        mc.put_end("alive", "late")
        with pytest.raises(StoreError) as ei:
            mc.remove("late")
        assert ei.value.code == ErrorCode.TRANSFER_FAIL
        mc.remove("late")

    clients[0].stdin.close()
    assert clients[0].wait(10) == 0
    log = master.log()
    assert "client_id=doomed action=client_expired" in log
    assert "segment_name=127.0.0.1:40002" in log and "action=unmount_expired_segment" in log
    assert "allocation_succeeded size=1048576 segment=127.0.0.1:40001" in log  # -v=1
    assert "deallocation_succeeded" in log  # the zombie's range on the live client's segment
    assert "flag --enable_ha is accepted for compatibility" in log
    assert master.stop() == 0  # SIGTERM: clean shutdown


def test_failpoints_armed_remotely_in_the_master_process(master):
    with MasterClient(master.rpc, timeout=5) as mc:
        mc.remount_segment([], "c")
        mc.arm_failpoints("master.ping=error(-1010)*2")
        codes = []
        for _ in range(3):
            try:
                mc.ping("c")
                codes.append(0)
            except StoreError as exc:
                codes.append(int(exc.code))
        assert codes == [-1010, -1010, 0]
        listed = {f["name"]: f for f in mc.list_failpoints()}
        assert listed["master.ping"]["fired"] == 2
        mc.disarm_failpoints()
        assert mc.list_failpoints() == []
        host, port = master.metrics
        health = json.loads(urllib.request.urlopen(f"http://{host}:{port}/health", timeout=5).read())
        assert health["status"] == "ok"


def test_bench_prints_one_json_object():
    argv = ["bench", "master", "--json", "--seconds", "0.3", "--clients", "2", "--seed", "3"]
    proc = subprocess.run([sys.executable, "-m", "scenarios.cli", *argv], capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)  # exactly one object, nothing else on stdout
    cps = res["put_cycle_per_s"]
    assert set(cps) == {"rpc_1_client", "rpc_2_clients", "in_process"} and all(v > 0 for v in cps.values())
    assert set(res["p50_us"]) == {"PutStart", "PutEnd", "GetReplicaList", "Remove"}
    assert all(res["p50_us"][r] <= res["p99_us"][r] for r in res["p50_us"])
    assert res["keys_left_after_1_client_run"] == 0 and res["seed"] == 3

import os
import subprocess
import sys
import threading
import time

import pytest

from store import failpoints as fp
from store.errors import ErrorCode, StoreError


@pytest.fixture(autouse=True)
def _clean():
    fp.disarm_all()
    fp.clear_history()
    yield
    fp.disarm_all()


def test_unarmed_point_is_a_no_op():
    fp.failpoint("x.step", key="k")
    assert fp.history() == []


def test_error_fires_count_times():
    fp.arm("x.step", "error", -800, count=2)
    for _ in range(2):
        with pytest.raises(StoreError) as ei:
            fp.failpoint("x.step", key="k")
        assert ei.value.code is ErrorCode.TRANSFER_FAIL
    fp.failpoint("x.step", key="k")  # exhausted
    point = fp.armed()["x.step"]
    assert (point.hits, point.fired) == (3, 2)
    assert [h[1] for h in fp.history()] == ["x.step", "x.step"]
    assert fp.history()[0][3] == {"key": "k"}


def test_probability_is_seeded_and_replayable():
    def run(seed):
        fp.arm("p.step", "error", -1, probability=0.3, seed=seed)
        out = []
        for _ in range(200):
            try:
                fp.failpoint("p.step")
                out.append(0)
            except StoreError:
                out.append(1)
        return out

    a, b, c = run(7), run(7), run(8)
    assert a == b and a != c
    assert 30 < sum(a) < 90


def test_pause_holds_until_release():
    fp.arm("hold.step", "pause")
    passed = threading.Event()

    def worker():
        fp.failpoint("hold.step")
        passed.set()

    t = threading.Thread(target=worker)
    t.start()
    assert not passed.wait(0.2)
    fp.release("hold.step")
    assert passed.wait(5)
    t.join()


def test_sleep_and_call():
    seen = []
    fp.arm("c.step", "call", lambda **ids: seen.append(ids))
    fp.failpoint("c.step", qp=5)
    assert seen == [{"qp": 5}]
    fp.arm("s.step", "sleep", 0.05)
    t0 = time.monotonic()
    fp.failpoint("s.step")
    assert time.monotonic() - t0 >= 0.04


def test_spec_parsing_and_errors():
    points = fp.parse_spec("a.b=error(-800)*3;c=sleep(0.5)%0.25@9;d=pause")
    assert [(p.name, p.action, p.arg, p.count, p.probability, p.seed) for p in points] == [
        ("a.b", "error", -800, 3, 1.0, 0),
        ("c", "sleep", 0.5, None, 0.25, 9),
        ("d", "pause", None, None, 1.0, 0),
    ]
    with pytest.raises(ValueError):
        fp.parse_spec("nonsense")
    with pytest.raises(ValueError):
        fp.parse_spec("a=explode")
    with pytest.raises(ValueError):
        fp.arm("a", "call", 42)


def test_panic_from_env_kills_child_process_at_the_step():
    code = ("from store import failpoints as fp; fp.arm_from_env(); print('before', flush=True); "
            "fp.failpoint('proc.step'); print('after', flush=True)")
    env = dict(os.environ, UMBRA_FAILPOINTS="proc.step=panic(41)")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 41
    assert proc.stdout.split() == ["before"]

"""Retry policy, path pause, reconnect back-off and slice scheduling, without a device."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from store.transfer.rdma.errors import WcStatus
from store.transfer.rdma.policy import Action, PathHealth, RetryPolicy, plan_posts, reconnect_delay


@pytest.mark.parametrize("status", [WcStatus.REM_ACCESS_ERR, WcStatus.LOC_PROT_ERR, WcStatus.LOC_LEN_ERR,
                                    WcStatus.LOC_ACCESS_ERR])
def test_request_faults_fail_at_once(status):
    p = RetryPolicy(retry_cap=9)
    assert p.decide(status, 0) is Action.FAIL
    assert not p.is_path_failure(status)


@pytest.mark.parametrize("status", [WcStatus.WR_FLUSH_ERR, WcStatus.RETRY_EXC_ERR, WcStatus.REM_INV_REQ_ERR,
                                    WcStatus.REM_OP_ERR, WcStatus.LOC_QP_OP_ERR, WcStatus.RNR_RETRY_EXC_ERR])
def test_path_faults_retry_until_the_cap(status):
    p = RetryPolicy(retry_cap=3)
    assert [p.decide(status, r) for r in range(5)] == [Action.RETRY] * 3 + [Action.FAIL] * 2
    assert p.is_path_failure(status)


def test_success_is_not_a_failure():
    assert not RetryPolicy().is_path_failure(WcStatus.SUCCESS)


def test_cap_zero_never_retries():
    assert RetryPolicy(retry_cap=0).decide(WcStatus.WR_FLUSH_ERR, 0) is Action.FAIL


def test_path_pauses_after_threshold_failures_in_window_and_resumes():
    h = PathHealth(threshold=3, window_s=5.0, pause_s=30.0)
    assert not h.record_failure(100.0)
    assert not h.record_failure(101.0)
    assert h.record_failure(102.0)  # third within 5 s
    assert h.is_paused(102.0) and h.is_paused(131.9)
    assert h.remaining(112.0) == pytest.approx(20.0)
    assert not h.is_paused(132.0)
    assert h.pauses == 1
    # the count restarted with the pause
    assert not h.record_failure(133.0)


def test_failures_spread_beyond_the_window_do_not_pause():
    h = PathHealth(threshold=3, window_s=5.0, pause_s=30.0)
    for t in (0.0, 6.0, 12.0, 18.0):
        assert not h.record_failure(t)
    assert h.consecutive == 4
    assert not h.is_paused(18.0)


def test_a_success_clears_the_count():
    h = PathHealth(threshold=2, window_s=5.0, pause_s=1.0)
    h.record_failure(0.0)
    h.record_success()
    assert not h.record_failure(1.0)
    assert h.consecutive == 1


def test_resume_ends_a_pause():
    h = PathHealth(threshold=1, window_s=5.0, pause_s=30.0)
    assert h.record_failure(0.0)
    h.resume()
    assert not h.is_paused(1.0)


def test_reconnect_delay_doubles_and_caps():
    assert [reconnect_delay(n, 0.05, 1.0) for n in range(7)] == [0.0, 0.05, 0.1, 0.2, 0.4, 0.8, 1.0]


def test_plan_spreads_evenly_and_respects_chain_length():
    assert plan_posts(16, [256, 256], 4096, 32) == [(0, 8), (1, 8)]
    assert plan_posts(100, [256, 256], 4096, 32) == [(0, 32), (1, 32), (0, 18), (1, 18)]


def test_plan_respects_per_qp_room_and_the_cq_budget():
    assert plan_posts(10, [3, 256], 4096, 32) == [(0, 3), (1, 5), (1, 2)]
    assert plan_posts(10, [256, 256], 4, 32) == [(0, 2), (1, 2)]
    assert plan_posts(10, [0, 0], 100, 32) == []
    assert plan_posts(10, [5, 5], 0, 32) == []
    assert plan_posts(0, [5, 5], 10, 32) == []


def test_plan_rotates_the_first_qp():
    assert plan_posts(3, [10, 10], 100, 32, start=1) == [(1, 2), (0, 1)]


@given(pending=st.integers(0, 600), free=st.lists(st.integers(-2, 300), min_size=0, max_size=4),
       cq=st.integers(-5, 700), chain=st.integers(1, 64), start=st.integers(0, 7))
def test_plan_invariants(pending, free, cq, chain, start):
    plan = plan_posts(pending, free, cq, chain, start)
    total = sum(n for _, n in plan)
    assert total <= pending and total <= max(cq, 0)
    for q in range(len(free)):
        assert sum(n for i, n in plan if i == q) <= max(free[q], 0)
    assert all(1 <= n <= chain for _, n in plan)
    # nothing left undone that fitted
    room = sum(max(f, 0) for f in free)
    assert total == min(pending, max(cq, 0), room)

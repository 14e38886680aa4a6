"""Decisions of the RDMA transport that need no device: retry, path pause, reconnect back-off, and
how pending slices are spread over an endpoint's QPs within the per-QP and per-CQ bounds.

Kept apart from the verbs code so the host test suite can pin them down.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

from store.transfer.rdma.errors import WcStatus, is_request_fault


class Action(enum.Enum):
    RETRY = "retry"
    FAIL = "fail"


@dataclass(frozen=True)
class RetryPolicy:
    """What to do with a slice whose work request completed with ``status``.

    - A request fault (bad rkey, range beyond the remote MR, local protection): the peer answered,
      the path works, and the same request fails again on any QP, so the slice fails at once and
      the caller refreshes its descriptor (Mooncake retries these nine times, each on a new
      endpoint, which is the reconnect loop seen in its issues).
    - Anything else (flushed, retry exceeded, invalid request, remote operation error, lost): retry
      on a fresh QP until the slice has been retried ``retry_cap`` times.
    """

    retry_cap: int = 9

    def decide(self, status: int, retries: int) -> Action:
        if status != WcStatus.SUCCESS and is_request_fault(status):
            return Action.FAIL
        if retries >= self.retry_cap:
            return Action.FAIL
        return Action.RETRY

    @staticmethod
    def is_path_failure(status: int) -> bool:
        """Whether a fault with this status counts against the path's health (request faults do
        not: the peer answered them)."""
        return status != WcStatus.SUCCESS and not is_request_fault(status)


@dataclass
class PathHealth:
    """Counts failures of one path (local device → peer device) and pauses it when they pile up.

    ``threshold`` failures within ``window_s`` pause the path for ``pause_s`` (Mooncake HEAD: 5 in
    5 s → 30 s). A success clears the count. While paused the transport fails slices for the path
    at once instead of reconnecting in a storm; when the pause ends the next slice probes it.
    """

    threshold: int = 5
    window_s: float = 5.0
    pause_s: float = 30.0
    failures: deque[float] = field(default_factory=deque)
    paused_until: float = 0.0
    pauses: int = 0
    consecutive: int = 0  # failures since the last success, across windows (for back-off)

    def record_failure(self, now: float) -> bool:
        """Count one failure; True when this failure pauses the path."""
        self.consecutive += 1
        self.failures.append(now)
        while self.failures and now - self.failures[0] > self.window_s:
            self.failures.popleft()
        if len(self.failures) >= self.threshold and not self.is_paused(now):
            self.paused_until = now + self.pause_s
            self.pauses += 1
            self.failures.clear()
            return True
        return False

    def record_success(self) -> None:
        self.failures.clear()
        self.consecutive = 0

    def is_paused(self, now: float) -> bool:
        return now < self.paused_until

    def remaining(self, now: float) -> float:
        return max(0.0, self.paused_until - now)

    def resume(self) -> None:
        """End a pause early (the device came back, or an operator said so)."""
        self.paused_until = 0.0
        self.failures.clear()


def reconnect_delay(consecutive_failures: int, base_s: float, max_s: float) -> float:
    """Back-off before the next handshake: 0 after a clean retirement, then base·2^(n−1), capped."""
    if consecutive_failures <= 0:
        return 0.0
    return min(max_s, base_s * (2 ** (consecutive_failures - 1)))


def plan_posts(pending: int, qp_free: list[int], cq_free: int, max_chain: int,
               start: int = 0) -> list[tuple[int, int]]:
    """Split ``pending`` work requests over QPs: ``[(qp_index, count), ...]``.

    Each QP takes at most its free send-queue slots, each post at most ``max_chain`` WRs (one
    doorbell per chain), and the total never exceeds the free CQ entries, so the CQ cannot overflow
    (rxe drops completions on overflow and raises CQ_ERR). Work is shared evenly among the QPs that
    have room, starting at ``start`` so the first QP is not always favoured.
    """
    n_qps = len(qp_free)
    budget = min(pending, max(cq_free, 0))
    if budget <= 0 or n_qps == 0:
        return []
    free = [max(0, f) for f in qp_free]
    order = [(start + i) % n_qps for i in range(n_qps)]
    plan: list[tuple[int, int]] = []
    while budget > 0:
        open_qps = [q for q in order if free[q] > 0]
        if not open_qps:
            break
        share = -(-budget // len(open_qps))  # ceil
        progressed = False
        for q in open_qps:
            if budget <= 0:
                break
            take = min(share, free[q], max_chain, budget)
            if take <= 0:
                continue
            plan.append((q, take))
            free[q] -= take
            budget -= take
            progressed = True
        if not progressed:
            break
    return plan

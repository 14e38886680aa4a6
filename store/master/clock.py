"""Clocks the master reads time from.

The service never calls ``time`` itself: every deadline (lease, soft pin, client TTL, GC delay) is
computed from an injected clock, so unit tests and the fault layer can move time by hand and a run
replays exactly. Times are monotonic seconds as floats.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

Clock = Callable[[], float]
"""Anything that returns monotonic seconds when called."""

monotonic: Clock = time.monotonic


class ManualClock:
    """A clock that only moves when told to (tests, deterministic simulation, clock-jump faults)."""

    def __init__(self, start: float = 1000.0) -> None:
        # Start well above zero so "never leased" (-inf) and "leased until t" never collide.
        self._now = float(start)
        self._lock = threading.Lock()

    def __call__(self) -> float:
        return self._now

    def advance(self, seconds: float) -> float:
        if seconds < 0:
            raise ValueError(f"a monotonic clock cannot go back (advance by {seconds})")
        with self._lock:
            self._now += seconds
            return self._now

    def set(self, now: float) -> None:
        with self._lock:
            if now < self._now:
                raise ValueError(f"a monotonic clock cannot go back ({now} < {self._now})")
            self._now = float(now)

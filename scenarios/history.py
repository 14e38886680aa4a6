"""The run's history: one row per operation, fault action and master event, in time order.

Columns (Jepsen's history, flattened for pandas):

``variant``      which variant of the scenario the row belongs to
``kind``         ``op`` (a client call), ``fault`` (an injector acting), ``event`` (the master's log)
``time_start``   seconds since the variant's workload started (monotonic clock)
``time_end``     when the call returned (``fault``: when the action finished; ``event``: = start)
``client``       the worker (``w0``...), ``fault:<label>``, or ``master``
``op``           ``put`` / ``get`` / ``remove``; the fault name; the master event kind
``key``          the key ('' when none)
``size``         bytes written or read (the value's size for failed calls)
``result_code``  0, or a negative Mooncake error code
``bytes_checksum`` XXH64 (hex) of the bytes written by a put or returned by a get ('' for none)
``replica``      segment the bytes went to or came from ('' when unknown)
``retries``      transfer-engine slice retries the call took
``note``         workload phase (``verify``, ``reread``...) or the fault action (``apply`` / ``revert``)
``detail``       JSON with anything else (fault parameters and results, event ids)

The master's clock is ``CLOCK_MONOTONIC`` of the same host, so its event times map onto the
history's clock directly (the mapping is still taken from the master's ``now`` to be safe).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import xxhash

COLUMNS = (
    "variant",
    "kind",
    "time_start",
    "time_end",
    "client",
    "op",
    "key",
    "size",
    "result_code",
    "bytes_checksum",
    "replica",
    "retries",
    "note",
    "detail",
)


def digest_hex(data: bytes | bytearray | memoryview) -> str:
    """The value checksum the history stores: XXH64 (seed 0) as 16 hex digits."""
    return f"{xxhash.xxh64_intdigest(data):016x}"


class History:
    """Thread-safe append-only recorder. ``begin_variant`` starts a new clock for the next rows."""

    def __init__(self) -> None:
        self._rows: list[tuple[Any, ...]] = []
        self._lock = threading.Lock()
        self.variant = ""
        self.t0 = time.monotonic()
        self.ops = 0
        self._listeners: list[Callable[[int], None]] = []

    def begin_variant(self, name: str) -> None:
        with self._lock:
            self.variant = name
            self.t0 = time.monotonic()
            self.ops = 0

    def now(self) -> float:
        return time.monotonic() - self.t0

    def rel(self, monotonic: float) -> float:
        return monotonic - self.t0

    def on_op(self, fn: Callable[[int], None]) -> None:
        """Call ``fn(ops_completed)`` after every recorded client operation (fault triggers)."""
        self._listeners.append(fn)

    def clear_listeners(self) -> None:
        self._listeners = []

    def op(
        self,
        client: str,
        op: str,
        key: str,
        size: int,
        code: int,
        t_start: float,
        t_end: float,
        *,
        checksum: str = "",
        replica: str = "",
        retries: int = 0,
        note: str = "",
        detail: dict[str, Any] | None = None,
    ) -> None:
        """Record a client operation; times are monotonic seconds (converted here)."""
        row = (
            self.variant,
            "op",
            t_start - self.t0,
            t_end - self.t0,
            client,
            op,
            key,
            int(size),
            int(code),
            checksum,
            replica,
            int(retries),
            note,
            json.dumps(detail, default=str) if detail else "",
        )
        with self._lock:
            self._rows.append(row)
            self.ops += 1
            n = self.ops
        for fn in self._listeners:
            fn(n)

    def fault(
        self,
        label: str,
        fault: str,
        action: str,
        t_start: float,
        t_end: float,
        *,
        target: str = "",
        code: int = 0,
        detail: dict[str, Any] | None = None,
    ) -> None:
        row = (
            self.variant,
            "fault",
            t_start - self.t0,
            t_end - self.t0,
            f"fault:{label}",
            fault,
            target,
            0,
            int(code),
            "",
            "",
            0,
            action,
            json.dumps(detail or {}, default=str),
        )
        with self._lock:
            self._rows.append(row)

    def record_fault(
        self,
        label: str,
        fault: str,
        target: str,
        action: str,
        t0: float,
        t1: float,
        detail: dict[str, Any],
        err: str,
    ) -> None:
        """The fault scheduler's callback: one fault row, code −1 when the fault failed to apply."""
        self.fault(label, fault, action, t0, t1, target=target, code=-1 if err else 0,
                   detail={**detail, **({"error": err} if err else {})})

    def event(
        self, kind: str, t: float, *, key: str = "", detail: dict[str, Any] | None = None, size: int = 0
    ) -> None:
        """A master event at monotonic time ``t``."""
        row = (
            self.variant,
            "event",
            t - self.t0,
            t - self.t0,
            "master",
            kind,
            key,
            int(size),
            0,
            "",
            "",
            0,
            "",
            json.dumps(detail or {}, default=str),
        )
        with self._lock:
            self._rows.append(row)

    def frame(self) -> pd.DataFrame:
        with self._lock:
            rows = list(self._rows)
        df = pd.DataFrame(rows, columns=list(COLUMNS))
        return normalise(df)

    def __len__(self) -> int:
        return len(self._rows)


def normalise(df: pd.DataFrame) -> pd.DataFrame:
    """Column order and dtypes of a history frame (also for frames built by hand in tests)."""
    for c in COLUMNS:
        if c not in df.columns:
            df[c] = (
                ""
                if c
                in ("variant", "kind", "client", "op", "key", "bytes_checksum", "replica", "note", "detail")
                else 0
            )
    df = df[list(COLUMNS)].copy()
    for c in ("time_start", "time_end"):
        df[c] = df[c].astype("float64")
    for c in ("size", "result_code", "retries"):
        df[c] = df[c].fillna(0).astype("int64")
    for c in ("variant", "kind", "client", "op", "key", "bytes_checksum", "replica", "note", "detail"):
        df[c] = df[c].fillna("").astype(str)
    return df.sort_values(["variant", "time_start"], kind="stable").reset_index(drop=True)


def save(df: pd.DataFrame, run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    df.to_parquet(run_dir / "history.parquet", index=False)
    df.to_csv(run_dir / "history.csv", index=False)


def load(run_dir: Path) -> pd.DataFrame:
    path = run_dir / "history.parquet"
    if path.exists():
        return normalise(pd.read_parquet(path))
    return normalise(pd.read_csv(run_dir / "history.csv", keep_default_na=False))

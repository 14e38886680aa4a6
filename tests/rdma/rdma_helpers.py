"""Shared pieces of the RDMA transport tests (run inside the Soft-RoCE guest).

- :class:`Pair`: two transfer engines with protocol ``rdma`` in this process, each with a
  registered region (A posts, B owns the target segment);
- :class:`PeerProcess`: ``python -m store.transfer.peer --protocol rdma`` in a child process;
- :func:`run_slices`: hand raw slices to a transport and wait until each completed exactly once
  (for faults the engine would refuse to send, such as a bad rkey).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

# Without pyverbs these modules cannot even be imported: skip them (the plugin explains why).
verbs = pytest.importorskip("pyverbs.enums", reason="pyverbs is not importable; run ci/setup.sh")

from store.transfer.engine import TransferEngine  # noqa: E402
from store.transfer.memory import MemoryRegion  # noqa: E402
from store.transfer.rdma.transport import RdmaTransport  # noqa: E402
from store.transfer.transport import Opcode, SegmentDescriptor, Slice, TransferStatus  # noqa: E402

PROJECT = Path(__file__).resolve().parents[2]
# Generous bounds: Python runs ~20x slower under TCG.
WAIT_S = 120.0


def rdma_options(target: Any, **extra: Any) -> dict[str, Any]:
    opts: dict[str, Any] = {"device_name": target.device, "port": target.port}
    if target.gid_index is not None:
        opts["gid_index"] = target.gid_index
    opts.update(extra)
    return opts


def pattern(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


def digest(data: Any) -> str:
    return hashlib.blake2b(memoryview(data).cast("B"), digest_size=16).hexdigest()


class Side:
    """One engine and its registered region."""

    def __init__(self, target: Any, size: int, **options: Any) -> None:
        self.engine = TransferEngine("127.0.0.1", "rdma",
                                     transport_options={"rdma": rdma_options(target, **options)})
        self.region = MemoryRegion(size)
        self.desc = self.engine.register_memory(self.region.addr, self.region.length)
        self.mem: Any = self.region.numpy()

    @property
    def transport(self) -> RdmaTransport:
        t = self.engine.transport("rdma")
        assert isinstance(t, RdmaTransport)
        return t

    def close(self) -> None:
        self.engine.close()
        self.mem = None  # drop our numpy view, or the mapping cannot be closed
        self.region.close()


class Pair:
    """A (poster) and B (target segment owner), both in this process on the same device."""

    def __init__(self, target: Any, size: int = 8 << 20, a_opts: dict[str, Any] | None = None,
                 b_opts: dict[str, Any] | None = None) -> None:
        self.a = Side(target, size, **(a_opts or {}))
        try:
            self.b = Side(target, size, **(b_opts or {}))
        except BaseException:
            self.a.close()
            raise
        self.seg = self.a.engine.open_segment(self.b.engine.segment_name)

    def refresh(self) -> SegmentDescriptor:
        self.seg = self.a.engine.open_segment(self.b.engine.segment_name, refresh=True)
        return self.seg

    def write(self, local_off: int, remote_off: int, n: int) -> int:
        return self.a.engine.transfer_sync(Opcode.WRITE, self.a.region.addr + local_off, self.seg.name,
                                           self.b.region.addr + remote_off, n, timeout=WAIT_S)

    def read(self, local_off: int, remote_off: int, n: int) -> int:
        return self.a.engine.transfer_sync(Opcode.READ, self.a.region.addr + local_off, self.seg.name,
                                           self.b.region.addr + remote_off, n, timeout=WAIT_S)

    def slice(self, op: Opcode, local_off: int, remote_addr: int, n: int, rkey: int | None = None) -> Slice:
        return Slice(op, self.a.region.addr + local_off, n, self.seg, remote_addr,
                     self.seg.buffers[0].rkey if rkey is None else rkey, status=TransferStatus.PENDING)

    def close(self) -> None:
        try:
            self.a.close()
        finally:
            self.b.close()


def run_slices(transport: RdmaTransport, slices: list[Slice], timeout: float = WAIT_S,
               after_submit: Any = None) -> Counter[int]:
    """Submit ``slices`` and wait until every one completed; returns completions per slice id
    (each must be exactly 1: a second ``complete`` for the same attempt would be a double
    completion, a missing one a lost slice)."""
    calls: Counter[int] = Counter()
    lock = threading.Condition()

    def on_done(s: Slice) -> None:
        with lock:
            calls[id(s)] += 1
            lock.notify_all()

    for s in slices:
        s.on_done = on_done
    transport.submit(slices)
    if after_submit is not None:
        after_submit()
    with lock:
        ok = lock.wait_for(lambda: len(calls) == len(slices), timeout)
    assert ok, f"only {len(calls)} of {len(slices)} slices completed within {timeout}s"
    return calls


def wait_for(cond: Any, timeout: float = WAIT_S, interval: float = 0.05) -> bool:
    """Poll ``cond`` until it holds or ``timeout`` passes (a bound against hangs, not a measurement)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(interval)
    return bool(cond())


class PeerProcess:
    """``store.transfer.peer`` with protocol rdma in a child process (the remote segment owner)."""

    def __init__(self, target: Any, segment_size: str = "32mb", **options: Any) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(PROJECT) + os.pathsep + env.get("PYTHONPATH", "")
        engine_options = {"transport_options": {"rdma": rdma_options(target, **options)}}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "store.transfer.peer", "--protocol", "rdma", "--hostname", "127.0.0.1",
             "--segment-size", segment_size, "--engine-options", json.dumps(engine_options)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=PROJECT, env=env, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(30)
            raise RuntimeError(f"rdma peer process exited with {self.proc.returncode} before reporting")
        self.info = json.loads(line)
        self.endpoint: str = self.info["endpoint"]
        self.addr: int = int(self.info["addr"])
        self.length: int = int(self.info["length"])
        self.segment = SegmentDescriptor.from_dict(self.info["segment"])

    def call(self, engine: TransferEngine, name: str, body: dict[str, Any] | None = None) -> bytes:
        return engine.control_call(self.endpoint, f"peer.{name}", json.dumps(body or {}).encode(), WAIT_S)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.kill()

"""Helpers shared by the master tests: a service on a manual clock, segments, a master process."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from store.master.clock import ManualClock
from store.master.config import MasterConfig
from store.master.server import Announcement, MasterServer
from store.master.service import MasterService
from store.master.types import ReplicateConfig, Segment

MiB = 1 << 20
REPO = Path(__file__).resolve().parent.parent


def make_service(**overrides: Any) -> tuple[MasterService, ManualClock]:
    overrides.setdefault("seed", 1234)
    clock = ManualClock()
    return MasterService(MasterConfig(**overrides), clock), clock


def segment(n: int, size: int = 64 * MiB, name: str | None = None, **kw: Any) -> Segment:
    """Segment number ``n``: its own name and a 16 MiB-aligned base far from the others."""
    return Segment(id=kw.pop("id", f"seg-{n}"), name=name or f"127.0.0.1:{20000 + n}",
                   base=kw.pop("base", (n + 1) << 36), size=size, protocol=kw.pop("protocol", "tcp"),
                   te_endpoint=kw.pop("te_endpoint", f"127.0.0.1:{30000 + n}"),
                   transport=kw.pop("transport", {"rkey": 1000 + n}))


def put(svc: MasterService, client: str, key: str, length: int, **cfg: Any) -> None:
    svc.put_start(client, key, length, ReplicateConfig(**cfg) if cfg else None)
    svc.put_end(client, key)


@contextmanager
def in_process_server(**overrides: Any) -> Iterator[MasterServer]:
    overrides.setdefault("rpc_port", 0)
    overrides.setdefault("metrics_port", 0)
    overrides.setdefault("seed", 99)
    overrides.setdefault("enable_metric_reporting", False)
    server = MasterServer(MasterConfig(**overrides)).start()
    try:
        yield server
    finally:
        server.stop()


class MasterProcess:
    """``umbra master`` in a subprocess; stderr goes to a file so tests can read the log."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, timeout: float = 30.0) -> None:
        self.log_file = tempfile.NamedTemporaryFile(prefix="umbra-master-", suffix=".log", delete=False)
        full_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "scenarios.cli", "master", "--rpc_port=0", "--metrics_port=0", *args],
            stdout=subprocess.PIPE, stderr=self.log_file, text=True, env=full_env, cwd=REPO)
        lines: queue.Queue[str] = queue.Queue()

        def pump() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                lines.put(line)

        threading.Thread(target=pump, daemon=True).start()
        try:
            line = lines.get(timeout=timeout)
        except queue.Empty:
            self.stop()
            raise RuntimeError(f"master did not announce itself in {timeout}s; log:\n{self.log()}") from None
        self.banner = line.strip()
        try:
            ann = Announcement.parse(self.banner)
        except ValueError:
            self.stop()
            raise RuntimeError(f"unexpected first line {self.banner!r}; log:\n{self.log()}") from None
        self.rpc, self.metrics, self.seed = ann.rpc, ann.metrics, ann.seed

    def log(self) -> str:
        self.log_file.flush()
        return Path(self.log_file.name).read_text(errors="replace")

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def cleanup(self) -> None:
        self.stop()
        self.log_file.close()
        Path(self.log_file.name).unlink(missing_ok=True)

"""Processes the fault layer can kill, freeze, thaw and restart: the master and segment holders.

Both are the store's own entry points run for real — ``umbra master`` (``python -m scenarios.cli
master``, which prints ``umbra master listening rpc=H:P metrics=H:P seed=N``) and the segment
holder (``python -m store.client.holder``, which prints one JSON line) — with their stderr in a log
file so a report can link it. A restarted master comes back on the same RPC port, so clients
reconnect to the address they were given; a restarted holder is a new client (new id, new
endpoint), as a crashed Mooncake store node is.

Every process started here is tracked and killed at interpreter exit, so an aborted run leaves
nothing behind.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import IO, Any

from store.master.server import Announcement
from store.units import parse_size

log = logging.getLogger("fault.procs")

_LIVE: weakref.WeakSet[ManagedProcess] = weakref.WeakSet()
REPO = Path(__file__).resolve().parent.parent


class ProcessError(RuntimeError):
    """A process did not start, or a signal could not be delivered."""


def _cleanup_all() -> None:
    for p in list(_LIVE):
        try:
            p.kill()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


atexit.register(_cleanup_all)


class ManagedProcess:
    """One child process: start, SIGKILL, SIGSTOP/SIGCONT, restart; stderr to ``log_path``."""

    role = "process"

    def __init__(
        self,
        name: str,
        log_dir: str | Path | None = None,
        env: dict[str, str] | None = None,
        start_timeout: float = 60.0,
    ) -> None:
        self.name = name
        self.env = dict(env or {})
        self.start_timeout = start_timeout
        self._log_dir = Path(log_dir) if log_dir is not None else Path(tempfile.mkdtemp(prefix="umbra-proc-"))
        self._log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self._log_dir / f"{name}.log"
        self.proc: subprocess.Popen[str] | None = None
        self._log: IO[bytes] | None = None
        self.starts = 0
        self.stopped = False
        self.events: list[tuple[float, str]] = []  # (monotonic, what) for reports
        _LIVE.add(self)

    # -- subclass hooks
    def command(self) -> list[str]:
        raise NotImplementedError

    def parse_banner(self, line: str) -> None:
        raise NotImplementedError

    # -- lifecycle
    def start(self) -> ManagedProcess:
        if self.alive():
            raise ProcessError(f"{self.name} is already running (pid {self.pid})")
        self._log = open(self.log_path, "ab")
        self._log.write(f"---- start #{self.starts + 1} {time.strftime('%H:%M:%S')} ----\n".encode())
        self._log.flush()
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        self.proc = subprocess.Popen(
            self.command(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env=env,
            cwd=REPO,
        )
        lines: queue.Queue[str] = queue.Queue()

        def pump(proc: subprocess.Popen[str]) -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.put(line)
            lines.put("")

        threading.Thread(target=pump, args=(self.proc,), daemon=True, name=f"{self.name}-stdout").start()
        try:
            line = lines.get(timeout=self.start_timeout)
        except queue.Empty:
            self.kill()
            raise ProcessError(
                f"{self.name} did not announce itself within {self.start_timeout}s; "
                f"log {self.log_path}:\n{self.log_tail()}"
            ) from None
        if not line:
            self.kill()
            raise ProcessError(
                f"{self.name} exited before announcing itself (code {self.proc.poll()}); "
                f"log {self.log_path}:\n{self.log_tail()}"
            )
        try:
            self.parse_banner(line.strip())
        except (ValueError, KeyError) as exc:
            self.kill()
            raise ProcessError(
                f"{self.name}: unexpected first line {line.strip()!r}: {exc}; log:\n{self.log_tail()}"
            ) from None
        self.starts += 1
        self.stopped = False
        self.events.append((time.monotonic(), "start"))
        log.info("%s started pid=%d", self.name, self.pid)
        return self

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise ProcessError(f"{self.name} was never started")
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if not self.alive():
            raise ProcessError(
                f"{self.name} is not running (exit code "
                f"{self.proc.poll() if self.proc else None}); cannot send "
                f"{signal.Signals(sig).name}"
            )
        assert self.proc is not None
        os.kill(self.proc.pid, sig)
        self.events.append((time.monotonic(), signal.Signals(sig).name))

    def kill(self) -> None:
        """SIGKILL: a crash at whatever step the process was in."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
            self.events.append((time.monotonic(), "SIGKILL"))
        self.proc.wait()
        self._close_streams()

    def freeze(self) -> None:
        """SIGSTOP: no heartbeat, no RPC, no data service, until :meth:`thaw`."""
        self.signal(signal.SIGSTOP)
        self.stopped = True

    def thaw(self) -> None:
        self.signal(signal.SIGCONT)
        self.stopped = False

    def restart(self) -> ManagedProcess:
        """Kill (if still running) and start again."""
        self.kill()
        self.events.append((time.monotonic(), "restart"))
        return self.start()

    def close(self, timeout: float = 10.0) -> int | None:
        """Ask politely (SIGCONT + SIGTERM / stdin EOF), then SIGKILL after ``timeout``."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGCONT)
                self.terminate_gracefully()
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s did not exit within %.0fs; killing it", self.name, timeout)
                self.proc.kill()
                self.proc.wait()
            except OSError:
                pass
        self._close_streams()
        return self.proc.returncode

    def terminate_gracefully(self) -> None:
        assert self.proc is not None
        self.proc.terminate()

    def _close_streams(self) -> None:
        if self.proc is not None:
            for s in (self.proc.stdin, self.proc.stdout):
                if s is not None:
                    try:
                        s.close()
                    except OSError:
                        pass
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def __enter__(self) -> ManagedProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class MasterProc(ManagedProcess):
    """``umbra master`` with Mooncake flags; ``address`` is ``host:port`` of its RPC port."""

    role = "master"

    def __init__(
        self,
        flags: list[str] | tuple[str, ...] = (),
        *,
        name: str = "master",
        log_dir: str | Path | None = None,
        env: dict[str, str] | None = None,
        rpc_port: int = 0,
        start_timeout: float = 60.0,
    ) -> None:
        super().__init__(name, log_dir, env, start_timeout)
        self.flags = list(flags)
        self.rpc_port = rpc_port
        self.rpc: tuple[str, int] | None = None
        self.metrics: tuple[str, int] | None = None
        self.seed: int | None = None

    def command(self) -> list[str]:
        port = self.rpc[1] if self.rpc is not None else self.rpc_port  # a restart keeps the port
        return [
            sys.executable,
            "-m",
            "scenarios.cli",
            "master",
            f"--rpc_port={port}",
            "--metrics_port=0",
            "--enable_metric_reporting=false",
            *self.flags,
        ]

    def parse_banner(self, line: str) -> None:
        ann = Announcement.parse(line)
        self.rpc, self.metrics, self.seed = ann.rpc, ann.metrics, ann.seed

    @property
    def address(self) -> str:
        if self.rpc is None:
            raise ProcessError("master not started")
        return f"{self.rpc[0]}:{self.rpc[1]}"


class HolderProc(ManagedProcess):
    """A segment-holding client process (``python -m store.client.holder``): a Mooncake store node
    contributing ``segment_size`` bytes. ``info`` is its JSON line (client_id, segment_name,
    endpoint, segments)."""

    role = "holder"

    def __init__(
        self,
        master: str,
        *,
        name: str = "holder",
        segment_size: int | str = "64mb",
        local_buffer_size: int | str = "16mb",
        protocol: str = "tcp",
        device_name: str = "",
        heartbeat_interval: float = 1.0,
        log_dir: str | Path | None = None,
        env: dict[str, str] | None = None,
        start_timeout: float = 60.0,
    ) -> None:
        super().__init__(name, log_dir, env, start_timeout)
        self.master = master
        self.segment_size = parse_size(segment_size)
        self.local_buffer_size = parse_size(local_buffer_size)
        self.protocol = protocol
        self.device_name = device_name
        self.heartbeat_interval = heartbeat_interval
        self.info: dict[str, Any] = {}

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "store.client.holder",
            "--master",
            self.master,
            "--hostname",
            "127.0.0.1",
            "--segment-size",
            str(self.segment_size),
            "--local-buffer-size",
            str(self.local_buffer_size),
            "--protocol",
            self.protocol,
            "--device-name",
            self.device_name,
            "--heartbeat-interval",
            str(self.heartbeat_interval),
        ]

    def parse_banner(self, line: str) -> None:
        info = json.loads(line)
        if "error" in info:
            raise ValueError(f"holder setup failed with code {info['error']}")
        self.info = info

    @property
    def client_id(self) -> str:
        return str(self.info.get("client_id", ""))

    @property
    def segment_name(self) -> str:
        return str(self.info.get("segment_name", ""))

    @property
    def endpoint(self) -> str:
        return str(self.info.get("endpoint", ""))

    def terminate_gracefully(self) -> None:
        """Closing stdin makes the holder unmount its segments and exit 0."""
        assert self.proc is not None
        if self.proc.stdin is not None:
            try:
                self.proc.stdin.close()
            except OSError:
                self.proc.terminate()
        else:
            self.proc.terminate()

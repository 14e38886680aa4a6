"""A segment-holding client process: ``python -m store.client.holder --master HOST:PORT``.

It sets up a :class:`~store.client.Client` that contributes ``--segment-size`` bytes to the store
(a Mooncake "store service" node), prints one JSON line on stdout::

    {"client_id": ..., "segment_name": "127.0.0.1:PORT", "endpoint": ..., "pid": ..., "segments": [...]}

and serves until stdin closes, SIGTERM/SIGINT arrives, or a ``holder.exit`` control message does.
Failpoints come from ``UMBRA_FAILPOINTS`` (armed before setup, so a test can make the holder die
at an exact step, e.g. ``tcp.server_apply=panic``).

Control messages on the holder's transfer endpoint (JSON replies):

- ``holder.stats`` → :meth:`Client.stats` plus ``failpoints_fired`` (names, in firing order);
- ``holder.exit`` → close the client and exit 0.

Tests, the store benchmark and fault scenarios start it through :class:`HolderProcess`, which can
also SIGKILL or SIGSTOP it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from typing import Any

from store import failpoints
from store.childproc import read_first_line, set_when_stdin_closes
from store.failpoints import arm_from_env
from store.units import parse_size

log = logging.getLogger("store.client.holder")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m store.client.holder", description=__doc__.splitlines()[0])
    ap.add_argument("--master", required=True, help="master_server_address host:port")
    ap.add_argument("--hostname", default="127.0.0.1", help="local_hostname (no port = any free port)")
    ap.add_argument("--segment-size", default="256mb", help="global_segment_size")
    ap.add_argument("--local-buffer-size", default="16mb", help="local_buffer_size")
    ap.add_argument("--protocol", default="tcp")
    ap.add_argument("--device-name", default="")
    ap.add_argument("--heartbeat-interval", type=float, default=1.0)
    ap.add_argument("--populate", action="store_true", help="touch every segment page at start")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s holder[%(process)d] %(levelname)s %(name)s: %(message)s")
    arm_from_env()
    from store.client import Client

    client = Client(heartbeat_interval_s=args.heartbeat_interval, populate_segment=args.populate)
    rc = client.setup(args.hostname, "P2PHANDSHAKE", parse_size(args.segment_size),
                      parse_size(args.local_buffer_size), args.protocol, args.device_name, args.master)
    if rc != 0:
        print(json.dumps({"error": rc}), flush=True)
        return 1
    done = threading.Event()
    engine = client.engine
    assert engine is not None

    def on_stats(payload: bytes, peer: str) -> bytes:
        fired = [name for _, name, _, _ in failpoints.history()]
        return json.dumps({**client.stats(), "failpoints_fired": fired}).encode()

    def on_exit(payload: bytes, peer: str) -> bytes:
        done.set()
        return b"bye"

    engine.register_control_handler("holder.stats", on_stats)
    engine.register_control_handler("holder.exit", on_exit)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())

    set_when_stdin_closes(done)
    info = {"client_id": client.client_id, "segment_name": client.get_hostname(), "endpoint": engine.endpoint,
            "pid": os.getpid(), "segments": client.segments()}
    print(json.dumps(info), flush=True)
    while not done.wait(0.5):
        pass
    client.close()
    return 0


class HolderProcess:
    """Start a holder in a child process and drive it (tests, benchmark, fault scenarios).

    ``env`` adds environment variables (e.g. ``UMBRA_FAILPOINTS``). :meth:`close` asks it to exit
    (it unmounts its segments) and kills it if it does not within ``timeout``; :meth:`kill` is a
    SIGKILL (a crash: the master only learns of it at client-TTL expiry).
    """

    def __init__(self, master: str, *, segment_size: int | str = "256mb",
                 local_buffer_size: int | str = "16mb",
                 hostname: str = "127.0.0.1", protocol: str = "tcp", device_name: str = "",
                 heartbeat_interval: float = 1.0, env: dict[str, str] | None = None,
                 start_timeout: float = 60.0, verbose: bool = False, populate: bool = False) -> None:
        cmd = [sys.executable, "-m", "store.client.holder", "--master", master, "--hostname", hostname,
               "--segment-size", str(segment_size), "--local-buffer-size", str(local_buffer_size),
               "--protocol", protocol, "--device-name", device_name,
               "--heartbeat-interval", str(heartbeat_interval)]
        if verbose:
            cmd.append("-v")
        if populate:
            cmd.append("--populate")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env={**os.environ, **(env or {})})
        first = read_first_line(self.proc, start_timeout)
        if not first:
            self.kill()
            raise RuntimeError(f"holder did not report its segment within {start_timeout}s "
                               f"(exit code {self.proc.poll()})")
        self.info: dict[str, Any] = json.loads(first)
        if "error" in self.info:
            self.close()
            raise RuntimeError(f"holder setup failed with code {self.info['error']}")
        self.client_id: str = self.info["client_id"]
        self.segment_name: str = self.info["segment_name"]
        self.endpoint: str = self.info["endpoint"]
        self.pid: int = int(self.info["pid"])

    def stats(self, timeout: float = 10.0) -> dict[str, Any]:
        from store.transfer.server import control_call

        return json.loads(control_call(self.endpoint, "holder.stats", b"", timeout))

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL (a crash at whatever step the holder was in)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        """SIGSTOP: the process freezes (no heartbeat, no data service) until :meth:`cont`."""
        os.kill(self.proc.pid, signal.SIGSTOP)

    def cont(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def close(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGCONT)
                if self.proc.stdin is not None:
                    self.proc.stdin.close()
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            except OSError:
                pass
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass
        return int(self.proc.returncode) if self.proc.returncode is not None else -1

    def __enter__(self) -> HolderProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


if __name__ == "__main__":
    raise SystemExit(main())

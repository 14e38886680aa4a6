"""A standalone transfer peer: one process holding a registered segment, driven by control calls.

``python -m store.transfer.peer [--protocol tcp|rdma] [--hostname H] [--segment-size 64mb]
[--engine-options JSON] [--plain-socket]`` starts a
:class:`~store.transfer.engine.TransferEngine`, maps and registers a segment, prints one JSON line
``{"endpoint", "segment", "addr", "length", "pid", "plain_port"}`` on stdout, and serves until
stdin closes or a ``peer.exit`` control message arrives. Failpoints come from ``UMBRA_FAILPOINTS``.

Two-process tests, the transfer benchmark and fault scenarios use it as the remote side. Control
messages (JSON payloads, offsets relative to the segment start):

- ``peer.fill {offset, length, seed}`` → fills with reproducible random bytes; replies the digest;
- ``peer.digest {offset, length}`` → blake2b-128 hex digest of that range;
- ``peer.read {offset, length}`` → the raw bytes (≤ 1 MiB);
- ``peer.register {offset, length, remote}`` / ``peer.unregister {offset}`` → (un)register a
  sub-range (the segment is registered whole at start; unregister it first to split it);
- ``peer.stats`` → the engine's counters as JSON; ``peer.exit`` → shut down.

``--plain-socket`` also listens on a second port for the benchmark's baseline: a request
``<BQQ`` = (op ``b"W"``/``b"R"``, total bytes, message size) followed, for W, by the bytes (read
with ``recv_into`` into the segment, one message-size piece at a time) and answered with one
byte; for R the peer sends the bytes from the segment with ``sendall`` per message.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import socket
import struct
import subprocess
import sys
import threading
from typing import Any

import numpy as np

from store.childproc import read_first_line, set_when_stdin_closes
from store.errors import ErrorCode, StoreError
from store.failpoints import arm_from_env
from store.transfer.engine import TransferEngine
from store.transfer.memory import MemoryRegion
from store.units import parse_size

log = logging.getLogger(__name__)

PLAIN_HEADER = struct.Struct("<BQQ")


def fill_bytes(seed: int, length: int) -> np.ndarray:
    """The reproducible bytes ``peer.fill`` writes (tests compute the same on their side)."""
    return np.random.default_rng(seed).integers(0, 256, length, dtype=np.uint8)


def digest(data: Any) -> str:
    return hashlib.blake2b(memoryview(data).cast("B"), digest_size=16).hexdigest()


class Peer:
    def __init__(self, hostname: str, segment_size: int, *, plain_socket: bool = False,
                 engine_options: dict[str, Any] | None = None, protocol: str = "tcp") -> None:
        self.engine = TransferEngine(hostname, protocol, **(engine_options or {}))
        self.region = MemoryRegion(segment_size)
        self.engine.register_memory(self.region.addr, self.region.length)
        self.done = threading.Event()
        for name in ("fill", "digest", "read", "register", "unregister", "stats", "exit"):
            self.engine.register_control_handler(f"peer.{name}", getattr(self, f"_on_{name}"))
        self.plain: socket.socket | None = None
        if plain_socket:
            self.plain = socket.socket()
            self.plain.bind((self.engine.endpoint.rpartition(":")[0], 0))
            self.plain.listen(8)
            threading.Thread(target=self._plain_loop, daemon=True, name="plain-socket").start()

    def _range(self, payload: bytes) -> tuple[dict[str, Any], int, int]:
        req = json.loads(payload or b"{}")
        off = int(req.get("offset", 0))
        length = int(req.get("length", self.region.length - off))
        if off < 0 or length < 0 or off + length > self.region.length:
            raise StoreError(ErrorCode.INVALID_PARAMS,
                             f"range [{off}, {off + length}) outside the {self.region.length} B segment")
        return req, off, length

    def _on_fill(self, payload: bytes, peer: str) -> bytes:
        req, off, length = self._range(payload)
        view = self.region.numpy()[off:off + length]
        view[:] = fill_bytes(int(req.get("seed", 0)), length)
        return digest(view).encode()

    def _on_digest(self, payload: bytes, peer: str) -> bytes:
        _, off, length = self._range(payload)
        return digest(self.region.numpy()[off:off + length]).encode()

    def _on_read(self, payload: bytes, peer: str) -> bytes:
        _, off, length = self._range(payload)
        if length > 1 << 20:
            raise StoreError(ErrorCode.INVALID_PARAMS, f"peer.read of {length} B exceeds 1 MiB")
        return self.region.numpy()[off:off + length].tobytes()

    def _on_register(self, payload: bytes, peer: str) -> bytes:
        req, off, length = self._range(payload)
        self.engine.register_memory(self.region.addr + off, length, remote=bool(req.get("remote", True)))
        return self.engine.segment_descriptor().to_json().encode()

    def _on_unregister(self, payload: bytes, peer: str) -> bytes:
        req = json.loads(payload or b"{}")
        self.engine.unregister_memory(self.region.addr + int(req.get("offset", 0)), wait_s=1.0)
        return self.engine.segment_descriptor().to_json().encode()

    def _on_stats(self, payload: bytes, peer: str) -> bytes:
        return json.dumps(self.engine.stats(), default=str).encode()

    def _on_exit(self, payload: bytes, peer: str) -> bytes:
        self.done.set()
        return b"bye"

    def _plain_loop(self) -> None:
        assert self.plain is not None
        while True:
            try:
                sock, _ = self.plain.accept()
            except OSError:
                return
            threading.Thread(target=self._plain_serve, args=(sock,), daemon=True).start()

    def _plain_serve(self, sock: socket.socket) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        seg = self.region.view()
        hdr = bytearray(PLAIN_HEADER.size)
        try:
            while True:
                got = sock.recv_into(hdr)
                if got == 0:
                    return
                while got < len(hdr):
                    n = sock.recv_into(memoryview(hdr)[got:])
                    if n == 0:
                        return
                    got += n
                op, total, msg = PLAIN_HEADER.unpack(hdr)
                msg = max(1, min(msg, len(seg)))
                pos = 0
                while pos < total:
                    n = min(msg, total - pos)
                    base = pos % (len(seg) - n + 1)
                    if op == ord("W"):
                        view = seg[base:base + n]
                        done = 0
                        while done < n:
                            r = sock.recv_into(view[done:])
                            if r == 0:
                                return
                            done += r
                    else:
                        sock.sendall(seg[base:base + n])
                    pos += n
                if op == ord("W"):
                    sock.sendall(b"k")
        except OSError:
            return
        finally:
            seg.release()
            sock.close()

    def info(self) -> dict[str, Any]:
        return {"endpoint": self.engine.endpoint, "segment": self.engine.segment_descriptor().to_dict(),
                "addr": self.region.addr, "length": self.region.length, "pid": os.getpid(),
                "plain_port": self.plain.getsockname()[1] if self.plain is not None else 0}

    def close(self) -> None:
        if self.plain is not None:
            self.plain.close()
        self.engine.close()
        self.region.close()


class PeerProcess:
    """Start and drive a peer in a child process (tests, benchmark, fault scenarios).

    ``env`` adds environment variables (e.g. ``UMBRA_FAILPOINTS``); the child exits when this
    object is closed (stdin closes) and is killed if it does not within ``timeout``.
    """

    def __init__(self, *, segment_size: int = 64 << 20, hostname: str = "127.0.0.1",
                 plain_socket: bool = False, env: dict[str, str] | None = None,
                 engine_options: dict[str, Any] | None = None, protocol: str = "tcp",
                 start_timeout: float = 30.0) -> None:
        cmd = [sys.executable, "-m", "store.transfer.peer", "--protocol", protocol, "--hostname", hostname,
               "--segment-size", str(segment_size), "--engine-options", json.dumps(engine_options or {})]
        if plain_socket:
            cmd.append("--plain-socket")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env={**os.environ, **(env or {})})
        first = read_first_line(self.proc, start_timeout)
        if not first:
            self.kill()
            raise RuntimeError(f"transfer peer did not report its endpoint (exit code {self.proc.poll()})")
        self.info: dict[str, Any] = json.loads(first)
        self.endpoint: str = self.info["endpoint"]
        self.addr: int = int(self.info["addr"])
        self.length: int = int(self.info["length"])
        self.pid: int = int(self.info["pid"])

    def control(self, name: str, timeout: float = 10.0, **payload: Any) -> bytes:
        from store.transfer.server import control_call

        return control_call(self.endpoint, f"peer.{name}", json.dumps(payload).encode(), timeout)

    def digest(self, offset: int = 0, length: int | None = None) -> str:
        length = self.length - offset if length is None else length
        return self.control("digest", offset=offset, length=length).decode()

    def kill(self) -> None:
        """SIGKILL the peer (a crash at whatever step it was in)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def close(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            try:
                if self.proc.stdin is not None:
                    self.proc.stdin.close()
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return int(self.proc.returncode)

    def __enter__(self) -> PeerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m store.transfer.peer", description=__doc__.splitlines()[0])
    ap.add_argument("--hostname", default="127.0.0.1")
    ap.add_argument("--segment-size", default="64mb")
    ap.add_argument("--plain-socket", action="store_true")
    ap.add_argument("--protocol", default="tcp", help="transport protocol of the engine (tcp, rdma)")
    ap.add_argument("--engine-options", default="{}", help="JSON dict of TransferEngine keyword arguments")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s peer[%(process)d] %(levelname)s %(name)s: %(message)s")
    arm_from_env()
    peer = Peer(args.hostname, parse_size(args.segment_size), plain_socket=args.plain_socket,
                engine_options=json.loads(args.engine_options), protocol=args.protocol)
    print(json.dumps(peer.info()), flush=True)

    set_when_stdin_closes(peer.done)
    peer.done.wait()
    peer.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

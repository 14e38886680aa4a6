"""Helpers for the client tests: a master process, segment-holding client processes, pure clients.

Every process started here is registered with the :class:`Cluster` that started it and killed on
``close()`` (the fixtures call it in their finalizers), so a failing test leaves nothing behind.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
from master_helpers import MasterProcess, in_process_server

from store.client import Client
from store.client.holder import HolderProcess
from store.master.client import MasterClient
from store.master.server import MasterServer

MiB = 1 << 20
SEED = int(os.environ.get("UMBRA_TEST_SEED", "20261128"))


def random_bytes(seed: int, n: int) -> bytes:
    """Reproducible random bytes (print the seed in assertion messages so a failure replays)."""
    return np.random.default_rng(seed).bytes(n)


def wait_until(pred: Callable[[], Any], timeout: float, interval: float = 0.05,
               what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        time.sleep(interval)


def addr_of(server: MasterServer) -> str:
    assert server.rpc_address is not None
    return f"{server.rpc_address[0]}:{server.rpc_address[1]}"


def new_client(master: str, *, segment: int = 0, local_buffer: int = 16 * MiB, **kw: Any) -> Client:
    """A set-up client in this process (``segment=0``: a pure client, every byte goes over TCP)."""
    c = Client(**kw)
    rc = c.setup("127.0.0.1", "P2PHANDSHAKE", segment, local_buffer, "tcp", "", master)
    assert rc == 0, f"client setup against {master} failed with {rc}"
    return c


def no_borrowed_memory(client: Client) -> bool:
    """True when no value's memory is still registered for a zero-copy transfer (and no
    local-buffer range is quarantined): nothing of a finished operation is left pinned."""
    assert client.engine is not None
    regions = client.engine.memory.snapshot()
    return all(r["location"] != "cpu:borrowed" for r in regions) and \
        client.local_buffer_report().get("quarantined", 0) == 0


class Cluster:
    """A master process plus segment-holding client processes; tests add pure clients with
    :meth:`client`. ``master_flags`` are Mooncake-style master flags."""

    def __init__(self, *master_flags: str, holders: int = 1, segment_size: int | str = "128mb",
                 holder_env: dict[str, str] | None = None) -> None:
        self.master = MasterProcess(*master_flags)
        self.address = f"{self.master.rpc[0]}:{self.master.rpc[1]}"
        self.holders: list[HolderProcess] = []
        self.clients: list[Client] = []
        self.mc = MasterClient(self.address)
        try:
            for _ in range(holders):
                self.add_holder(segment_size=segment_size, env=holder_env)
        except BaseException:
            self.close()
            raise

    def add_holder(self, *, segment_size: int | str = "128mb", env: dict[str, str] | None = None,
                   **kw: Any) -> HolderProcess:
        h = HolderProcess(self.address, segment_size=segment_size, env=env, **kw)
        self.holders.append(h)
        return h

    def client(self, **kw: Any) -> Client:
        c = new_client(self.address, **kw)
        self.clients.append(c)
        return c

    def gauges(self) -> dict[str, Any]:
        return self.mc.inspect("gauges")

    def close(self) -> None:
        for c in self.clients:
            c.close()
        for h in self.holders:
            h.close(timeout=5)
        self.mc.close()
        self.master.cleanup()


@contextmanager
def cluster(*master_flags: str, **kw: Any) -> Iterator[Cluster]:
    c = Cluster(*master_flags, **kw)
    try:
        yield c
    finally:
        c.close()


@contextmanager
def local_store(segment: int = 32 * MiB, local_buffer: int = 8 * MiB,
                **master: Any) -> Iterator[tuple[MasterServer, Client]]:
    """An in-process master and one client holding its own segment (API-level tests)."""
    with in_process_server(**master) as server:
        c = new_client(addr_of(server), segment=segment, local_buffer=local_buffer)
        try:
            yield server, c
        finally:
            c.close()

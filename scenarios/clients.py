"""A Mooncake ``Client`` whose every call lands in the history.

The wrapper times the call itself (the value's checksum is taken before a put starts and after a
get returns, outside the timed window), reads the per-thread :meth:`Client.last_op` for the result
code, the replica and the transfer retries, and records one row. ``get`` keeps Mooncake's
convention (``b""`` on a miss or an error) and the code is in the history.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from scenarios.history import History, digest_hex
from store.client import Client
from store.errors import ErrorCode

_MISS = int(ErrorCode.OBJECT_NOT_FOUND)


class RecordingClient:
    """One client (used by one worker thread at a time) that records what it does."""

    def __init__(self, client: Client, history: History, name: str) -> None:
        self.client = client
        self.history = history
        self.name = name
        self._lock = threading.Lock()

    def _last(self, op: str, key: str) -> tuple[int | None, str, int]:
        rec = self.client.last_op()
        if rec is None or rec.op != op or rec.key != key:
            return None, "", 0
        return rec.code, rec.replica, rec.retries

    def put(self, key: str, value: bytes, config: Any = None, note: str = "") -> int:
        checksum = digest_hex(value)
        t0 = time.monotonic()
        rc = self.client.put(key, value, config)
        t1 = time.monotonic()
        _, replica, retries = self._last("put", key)
        self.history.op(
            self.name,
            "put",
            key,
            len(value),
            rc,
            t0,
            t1,
            checksum=checksum,
            replica=replica,
            retries=retries,
            note=note,
        )
        return rc

    def get(self, key: str, note: str = "") -> bytes:
        t0 = time.monotonic()
        data = self.client.get(key)
        t1 = time.monotonic()
        code, replica, retries = self._last("get", key)
        if code is None:
            code = 0 if data else int(ErrorCode.INTERNAL_ERROR)
        if data and code != 0:
            code = 0
        self.history.op(
            self.name,
            "get",
            key,
            len(data),
            code,
            t0,
            t1,
            checksum=digest_hex(data) if data else "",
            replica=replica,
            retries=retries,
            note=note,
        )
        return data

    def remove(self, key: str, force: bool = False, note: str = "") -> int:
        t0 = time.monotonic()
        rc = self.client.remove(key, force)
        t1 = time.monotonic()
        self.history.op(
            self.name, "remove", key, 0, rc, t0, t1, note=note, detail={"force": True} if force else None
        )
        return rc

    def last_op(self) -> Any:
        return self.client.last_op()

    def is_miss(self, code: int) -> bool:
        return code == _MISS

    def close(self) -> None:
        self.client.close()

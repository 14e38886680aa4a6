"""Client liveness: who pinged when, and who has gone quiet for longer than ``client_ttl``.

Mooncake's ``ClientMonitorFunc`` drains a ping queue once a second and expires a client whose
deadline (last ping + ``client_ttl``) has passed, so detection takes about ``client_ttl + 1 s``.
Umbra records the ping time directly (no queue to overflow) but expires on the same 1-s monitor
tick, so the detection time matches.

A client becomes known by MountSegment or ReMountSegment. Ping from an unknown client answers
NEED_REMOUNT (Mooncake HEAD), and the client replies with ReMountSegment (possibly with no
segments at all, for a client that contributes no memory) — so a fresh client's first Ping before
it mounted anything gets NEED_REMOUNT, and so does every client after a master restart or after
its own expiry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class ClientState:
    client_id: str
    registered_at: float
    last_ping: float
    deadline: float
    pings: int = 0


class ClientRegistry:
    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self.clients: dict[str, ClientState] = {}

    def register(self, client_id: str, now: float) -> ClientState:
        st = self.clients.get(client_id)
        if st is None:
            st = self.clients[client_id] = ClientState(client_id, now, now, now + self.ttl)
        else:
            st.last_ping = now
            st.deadline = now + self.ttl
        return st

    def ping(self, client_id: str, now: float) -> bool:
        """Refresh a known client's deadline; False for an unknown one (→ NEED_REMOUNT)."""
        st = self.clients.get(client_id)
        if st is None:
            return False
        st.last_ping = now
        st.deadline = now + self.ttl
        st.pings += 1
        return True

    def is_known(self, client_id: str) -> bool:
        return client_id in self.clients

    def expired(self, now: float) -> list[str]:
        return [cid for cid, st in self.clients.items() if st.deadline < now]

    def drop(self, client_id: str) -> ClientState | None:
        return self.clients.pop(client_id, None)

    def report(self, now: float) -> list[dict[str, Any]]:
        return [{"client_id": st.client_id, "registered_at": st.registered_at, "last_ping": st.last_ping,
                 "deadline": st.deadline, "expires_in": st.deadline - now, "pings": st.pings}
                for st in self.clients.values()]

    def __len__(self) -> int:
        return len(self.clients)

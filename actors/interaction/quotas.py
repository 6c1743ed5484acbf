"""Per-caller limits: how many sessions a tenant holds at once, and how fast a session starts tasks.

`Tenants(limit)` counts open sessions per tenant (an API key's id, see `deployments.auth`):
`admit(session_id, tenant)` raises ProtocolError "rate_limit_exceeded" (HTTP 429) when the tenant
already holds `limit`; `release(session_id)` frees its place. The router holds one for the whole
deployment, since every session of every ingress and gateway replica is placed through it.

`TokenBucket(rate_per_s, burst)` allows `burst` starts at once, refilled at `rate_per_s`; `take(now)`
says whether one more may start now. The interaction actor keeps one per session for its
background tasks.
"""

from __future__ import annotations

from protocols import ProtocolError


class Tenants:
    def __init__(self, limit: int | None = None):
        self.limit = limit
        self.of: dict[str, str] = {}  # session id -> tenant
        self.held: dict[str, int] = {}  # tenant -> sessions it holds

    def admit(self, session_id: str, tenant: str | None) -> None:
        if tenant is None or session_id in self.of:
            return
        if self.limit is not None and self.held.get(tenant, 0) >= self.limit:
            raise ProtocolError(
                f"this API key already holds {self.limit} sessions, its limit; end one or try again later",
                "rate_limit_exceeded",
            )
        self.of[session_id] = tenant
        self.held[tenant] = self.held.get(tenant, 0) + 1

    def release(self, session_id: str) -> None:
        tenant = self.of.pop(session_id, None)
        if tenant is not None:
            self.held[tenant] -= 1
            if not self.held[tenant]:
                del self.held[tenant]


class TokenBucket:
    def __init__(self, rate_per_s: float, burst: int, now: float = 0.0):
        self.rate, self.burst = rate_per_s, burst
        self.tokens, self.t = float(burst), now

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + max(0.0, now - self.t) * self.rate)
        self.t = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False

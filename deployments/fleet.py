"""The gateway's view of several actors as one port each: `Ingresses` (the ingress actors taking
WebRTC calls) and `Interactions` (the interaction actors' figures, through the router).

`Ingresses.offer` gives a call to the ingress holding the fewest calls, and to the next one if
that one is full; `close` finds the call's ingress (a hang-up may reach any gateway replica, and
the call lives in exactly one ingress). `Interactions.stats` sums the actors' figures, so health
and metrics speak for the whole deployment.
"""

from __future__ import annotations

import asyncio
from typing import Any

from protocols import ProtocolError


class Ingresses:
    def __init__(self, ports: list[Any]):
        if not ports:
            raise ValueError("at least one ingress")
        self.ports = list(ports)

    async def _loads(self) -> list[tuple[int, int]]:
        stats = await asyncio.gather(*(p.stats() for p in self.ports), return_exceptions=True)
        return sorted((s["sessions"] if isinstance(s, dict) else 1 << 30, i) for i, s in enumerate(stats))

    async def offer(self, sdp: str, config: dict | None = None, owner: str | None = None, tenant: str | None = None,
                    ceiling: dict | None = None) -> dict:
        last: Exception | None = None
        order = [i for _, i in await self._loads()] if len(self.ports) > 1 else [0]
        for i in order:
            try:
                return await self.ports[i].offer(sdp, config, owner=owner, tenant=tenant, ceiling=ceiling)
            except ProtocolError as exc:
                if exc.code != "capacity":
                    raise
                last = exc
        raise last or ProtocolError("every ingress is full; try again later", "capacity")

    async def close(self, session_id: str, owner: str | None = None) -> None:
        for port in self.ports:
            try:
                return await port.close(session_id, owner=owner)
            except ProtocolError as exc:
                if exc.code != "unknown_session" or len(self.ports) == 1:
                    raise
        raise ProtocolError(f"unknown session {session_id!r}", "unknown_session", "session_id")

    async def stats(self) -> dict:
        total: dict = {}
        for s in await asyncio.gather(*(p.stats() for p in self.ports)):
            for key, value in s.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    total[key] = total.get(key, 0) + value
        total["ingresses"] = len(self.ports)
        return total


class Interactions:
    """Every interaction actor's figures summed (through the router's handles), the step times
    as the worst actor's."""

    def __init__(self, router: Any):
        self.router = router

    async def stats(self) -> dict:
        from actors.remote import Remote

        handles = await self.router.handles()
        answers = await asyncio.gather(*(Remote(h).stats() for h in handles.values()), return_exceptions=True)
        alive = [a for a in answers if isinstance(a, dict)]
        if not alive:
            raise RuntimeError("no interaction actor answers")
        totals: dict = {}
        for a in alive:
            for key, value in a["totals"].items():
                totals[key] = totals.get(key, 0) + value
        return {
            "sessions": sum(a["sessions"] for a in alive), "tick": max(a["tick"] for a in alive),
            "step_ms_p50": max(a["step_ms_p50"] for a in alive), "step_ms_p99": max(a["step_ms_p99"] for a in alive),
            "late_chunks": sum(a["late_chunks"] for a in alive), "missing_chunks": sum(a["missing_chunks"] for a in alive),
            "totals": totals, "actors": len(handles), "actors_answering": len(alive),
        }

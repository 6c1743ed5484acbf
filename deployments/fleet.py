"""Several actors of one role as one: `Ingresses` (the ingress actors taking WebRTC calls) and
`Interactions` (the interaction actors' figures, through the router) are the gateway's ports, and
`InteractionFleet` makes the interaction actors, at startup and whenever the router asks for more.

`Ingresses.offer` gives a call to the ingress holding the fewest calls, and to the next one if
that one is full; `close` finds the call's ingress (a hang-up may reach any gateway replica, and
the call lives in exactly one ingress). `Interactions.stats` sums the actors' figures, so health
and metrics speak for the whole deployment.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Callable, Mapping

import ray

from actors.remote import Remote
from protocols import ProtocolError
from protocols.ports import Interaction
from protocols.seams import InteractionStats

from .spec import NAMESPACE, ActorSpec, Resolves, named_actors, resolve

READY_TIMEOUT_S = 60.0  # a new interaction actor loads its model in this


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

    def __init__(self, router: Any, port: Callable[[Any], Any] = partial(Remote, port=Interaction)):
        self.router = router
        self.port = port  # an actor handle as its `Interaction` port

    async def stats(self) -> dict:
        handles = await self.router.handles()
        answers = await asyncio.gather(*(self.port(h).stats() for h in handles.values()), return_exceptions=True)
        alive = [a for a in answers if isinstance(a, InteractionStats)]
        if not alive:
            raise RuntimeError("no interaction actor answers")
        totals: dict = {}
        for a in alive:
            for key, value in a.totals.items():
                totals[key] = totals.get(key, 0) + value
        return {
            "sessions": sum(a.sessions for a in alive), "tick": max(a.tick for a in alive),
            "step_ms_p50": max(a.step_ms_p50 for a in alive), "step_ms_p99": max(a.step_ms_p99 for a in alive),
            "late_chunks": sum(a.late_chunks for a in alive), "missing_chunks": sum(a.missing_chunks for a in alive),
            "totals": totals, "actors": len(handles), "actors_answering": len(alive),
        }


def units(options: dict, fixed: int | None, resources: Mapping[str, float]) -> int:
    """How many interaction actors a cluster offering `resources` holds for actors asking `options`:
    `fixed` when set, else one per GPU (when they ask for one) or per unit of the `interaction`
    resource (when they ask for it), else two, so a failover has a warm actor to go to."""
    if fixed:
        return fixed
    if options.get("num_gpus"):
        return max(1, int(resources.get("GPU", 0)))
    if "resources" in options:
        return max(1, int(resources.get("interaction", 0)))
    return 2


@dataclass
class InteractionFleet(Resolves):
    """Makes the interaction actors, named `interaction-<i>`, from one `template` spec (so all on
    one clock origin), as many as `units` says. Called with the names that exist, it makes the
    missing ones: the router calls it every few seconds, so a node joining with the resource adds
    capacity. `how`: the creation options of whoever brought the deployment up (detached or not)."""

    template: ActorSpec
    max_sessions: int
    fixed: int | None = None
    how: Any = field(default_factory=dict)

    def resolve(self, made: dict[str, Any]) -> InteractionFleet:
        return replace(self, template=self.template.resolve(made), how=resolve(self.how, made))

    def units(self, resources: Mapping[str, float]) -> int:
        return units(self.template.options, self.fixed, resources)

    def create(self, name: str) -> Any:
        # get_if_exists: a restarted router asks again for actors that are there.
        return self.template.named(name).create(**{**self.how, "get_if_exists": True})

    async def __call__(self, existing: list[str]) -> list[tuple]:
        """(name, port, capacity, handle) of each interaction actor the caller does not know yet:
        those alive that it missed (a restarted router knows only the first ones), or else one
        made for each unit of capacity not yet used. Found ones are answered at once, never held
        up behind a new actor loading: a restarted router must first learn where its sessions
        live, since that is what it is asked next."""
        known = set(existing)
        named = {a["name"] for a in named_actors() if a["namespace"] == NAMESPACE and a["name"].startswith("interaction-")}
        missed = sorted(named - known, key=_index)
        handles = [ray.get_actor(name, namespace=NAMESPACE) for name in missed]
        answers = await asyncio.gather(*(asyncio.wait_for(h.clock_info.remote(), 5.0) for h in handles), return_exceptions=True)
        # One that does not answer is not placed right now (its node left): looked at next time.
        found = [(name, Remote(h, Interaction), self.max_sessions, h) for name, h, a in zip(missed, handles, answers) if not isinstance(a, BaseException)]
        if found:
            return found
        want = self.units(ray.cluster_resources())
        i = max((_index(n) for n in known | named), default=-1) + 1
        while len(known) < want:
            name = f"interaction-{i}"
            handle = self.create(name)
            try:  # one that cannot be placed is asked for again next time
                await asyncio.wait_for(handle.ready.remote(), READY_TIMEOUT_S)
            except Exception:
                break
            found.append((name, Remote(handle, Interaction), self.max_sessions, handle))
            known.add(name)
            i += 1
        return found


def _index(name: str) -> int:
    return int(name.rsplit("-", 1)[1]) if name.rsplit("-", 1)[-1].isdigit() else -1

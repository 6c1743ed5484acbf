"""Where a session lives, as an ingress holds it: `Placed` (the actor's name, its port, what its
join or resume answered) and `Direct`, the placement over one interaction port.

A placement always hands out a port (`protocols.ports.Interaction`): an `Interaction` in process,
or a Ray actor through `actors.remote.Remote`, which crosses processes as itself. Placing over
many actors is `actors.interaction.router.Router`'s; an ingress reaches the router actor as
`Remote(handle, Placement)`.
"""

from __future__ import annotations

from dataclasses import dataclass

from protocols.ports import Interaction
from protocols.seams import Joined

from actors.interaction.quotas import Tenants


@dataclass
class Placed:
    """Where a session lives: the actor's name, its port and what its join (or resume) answered
    (None when the session was only located)."""

    actor: str
    port: Interaction
    joined: Joined | None = None


class Direct:
    """One interaction port: every session lives there; a lost one is resumed there."""

    def __init__(self, interaction: Interaction, name: str = "interaction", sessions_per_tenant: int | None = None):
        self.port, self.name = interaction, name
        self.tenants = Tenants(sessions_per_tenant)

    async def place(self, session_id: str, tenant: str | None = None) -> Placed:
        self.tenants.admit(session_id, tenant)
        try:
            return Placed(self.name, self.port, await self.port.join(session_id))
        except BaseException:
            self.tenants.release(session_id)
            raise

    async def locate(self, session_id: str, lost_on: str | None = None, gone: bool = False) -> Placed:
        if lost_on is None:
            return Placed(self.name, self.port)
        return Placed(self.name, self.port, await self.port.resume(session_id))

    async def leave(self, session_id: str) -> None:
        self.tenants.release(session_id)
        await self.port.leave(session_id)

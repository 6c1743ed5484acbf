"""Where a session lives, as an ingress holds it: `Placed` (the actor's name, its port, what its
join or resume answered) and `Direct`, the placement over one interaction port; and how a call to
a port that its caller gave up on is seen through, so it leaks no slot there
(`join_seen_through`, `drop_if_elsewhere`).

A placement always hands out a port (`protocols.ports.Interaction`): an `Interaction` in process,
or a Ray actor through `actors.remote.Remote`, which crosses processes as itself. Placing over
many actors is `actors.interaction.router.Router`'s; an ingress reaches the router actor as
`Remote(handle, Placement)`.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Callable

from protocols.ports import Interaction
from protocols.seams import Joined

from actors.interaction.quotas import Tenants

log = logging.getLogger("interplay.router")


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


async def join_seen_through(port: Interaction, name: str, session_id: str) -> Joined:
    """`join` on `port` (the actor `name`), seen through: if the caller gives up meanwhile, the
    join still finishes there and is then taken back, so a dropped request leaks no slot."""
    joining = asyncio.ensure_future(port.join(session_id))
    try:
        return await asyncio.shield(joining)
    except asyncio.CancelledError:
        asyncio.get_running_loop().create_task(_take_back(port, name, joining, session_id))
        raise


async def _take_back(port: Interaction, name: str, joining: asyncio.Future, session_id: str) -> None:
    try:
        await joining
    except Exception:
        return  # it never joined
    try:
        await port.leave(session_id)
    except Exception:
        log.warning("taking back %s from %s failed", session_id, name, exc_info=True)


async def drop_if_elsewhere(port: Interaction, name: str, attempt: asyncio.Future, session_id: str,
                            lives_on: Callable[[], str | None]) -> None:
    """A resume given up on may still land on `port` (the actor `name`): once it has run (or
    failed), and if the session lives elsewhere by then (`lives_on()` names another actor), that
    actor lets it go, so it holds no slot for nothing."""
    try:
        await attempt
    except Exception:
        pass  # failed, or unknowable (the actor restarted): dropping is harmless either way
    if lives_on() != name:
        try:
            await port.drop(session_id)
        except Exception:
            log.warning("dropping %s from %s failed", session_id, name, exc_info=True)

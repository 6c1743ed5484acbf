"""Holding a session's port: `Direct` over one interaction port, and calls a caller gave up on
seen through (a join finishes and is taken back; a resume that landed where the session no longer
lives is dropped there)."""

from __future__ import annotations

import asyncio

import pytest

from actors.interaction.placement import Direct, Placed, drop_if_elsewhere, join_seen_through
from protocols.ports import Placement
from protocols.seams import Joined, Resumed
from tests.waits import until


class Port:
    """An interaction port keeping what it was asked; `join` waits for `gate` while it is unset."""

    def __init__(self):
        self.members: set[str] = set()
        self.calls: list[tuple[str, str]] = []
        self.gate: asyncio.Event | None = None

    async def join(self, session_id, seed=None):
        self.calls.append(("join", session_id))
        if self.gate is not None:
            await self.gate.wait()
        self.members.add(session_id)
        return Joined(session_id, 0, "t", {})

    async def resume(self, session_id):
        self.calls.append(("resume", session_id))
        self.members.add(session_id)
        return Joined(session_id, 5, "t", {}, Resumed(4, 2, 0))

    async def leave(self, session_id):
        self.calls.append(("leave", session_id))
        self.members.discard(session_id)

    async def drop(self, session_id):
        self.calls.append(("drop", session_id))
        self.members.discard(session_id)


def test_direct_places_on_its_port_and_resumes_a_lost_session_there():
    async def main():
        port = Port()
        direct = Direct(port, "only")
        assert isinstance(direct, Placement)
        assert await direct.place("s") == Placed("only", port, Joined("s", 0, "t", {}))
        assert await direct.locate("s") == Placed("only", port)  # not lost: nothing asked
        assert (await direct.locate("s", lost_on="only")).joined == Joined("s", 5, "t", {}, Resumed(4, 2, 0))
        await direct.leave("s")
        assert port.calls == [("join", "s"), ("resume", "s"), ("leave", "s")] and not port.members

    asyncio.run(main())


def test_a_join_its_caller_gave_up_on_finishes_and_is_taken_back():
    async def main():
        port = Port()
        port.gate = asyncio.Event()
        caller = asyncio.create_task(join_seen_through(port, "a", "s"))
        await until(lambda: port.calls)
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        port.gate.set()
        await until(lambda: ("leave", "s") in port.calls)
        assert not port.members

    asyncio.run(main())


def test_a_resume_given_up_on_is_dropped_only_where_the_session_no_longer_lives():
    async def main():
        port = Port()
        for lives_on in ("a", "b"):
            attempt = asyncio.ensure_future(port.resume("s"))
            await drop_if_elsewhere(port, "a", attempt, "s", lambda: lives_on)
        assert port.calls == [("resume", "s"), ("resume", "s"), ("drop", "s")]

    asyncio.run(main())

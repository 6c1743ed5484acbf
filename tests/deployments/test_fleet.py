"""The gateway's view of several ingress and interaction actors as one port each."""

import asyncio

import pytest

from deployments.fleet import Ingresses, Interactions
from protocols import ProtocolError
from protocols.seams import InteractionStats


class FakeIngress:
    def __init__(self, name: str, room: int):
        self.name, self.room, self.calls = name, room, {}

    async def stats(self):
        return {"sessions": len(self.calls), "late_chunks": 1}

    async def offer(self, sdp, config=None, owner=None, tenant=None, ceiling=None):
        if len(self.calls) >= self.room:
            raise ProtocolError("full", "capacity")
        sid = f"{self.name}-{len(self.calls)}"
        self.calls[sid] = owner
        return {"session_id": sid, "sdp": "answer"}

    async def close(self, session_id, owner=None):
        if session_id not in self.calls:
            raise ProtocolError("unknown", "unknown_session")
        if owner is not None and self.calls[session_id] != owner:
            raise ProtocolError("not yours", "forbidden")
        del self.calls[session_id]


def test_calls_go_to_the_least_loaded_ingress_then_the_next_with_room_and_hang_up_where_they_live():
    async def main():
        a, b = FakeIngress("a", 1), FakeIngress("b", 2)
        pool = Ingresses([a, b])
        got = [(await pool.offer("sdp"))["session_id"] for _ in range(3)]
        assert sorted(got) == ["a-0", "b-0", "b-1"]
        with pytest.raises(ProtocolError) as info:
            await pool.offer("sdp")
        assert info.value.code == "capacity"
        await pool.close("b-1")
        assert "b-1" not in b.calls
        with pytest.raises(ProtocolError) as info:
            await pool.close("nope")
        assert info.value.code == "unknown_session"
        mine = (await pool.offer("sdp", owner="alice"))["session_id"]
        with pytest.raises(ProtocolError) as info:
            await pool.close(mine, owner="mallory")
        assert info.value.code == "forbidden"
        stats = await pool.stats()
        assert stats["sessions"] == 3 and stats["late_chunks"] == 2 and stats["ingresses"] == 2

    asyncio.run(main())


def test_interaction_figures_add_up_over_the_actors_that_answer():
    class Router:
        async def handles(self):
            return {"interaction-0": "h0", "interaction-1": "h1"}

    async def main():
        answers = {
            "h0": InteractionStats(sessions=2, tick=10, step_ms_p50=5.0, step_ms_p99=9.0, late_chunks=1, missing_chunks=0, totals={"ticks": 10}),
            "h1": InteractionStats(sessions=1, tick=11, step_ms_p50=7.0, step_ms_p99=8.0, late_chunks=0, missing_chunks=2, totals={"ticks": 11}),
        }

        class FakeRemote:
            def __init__(self, handle):
                self.handle = handle

            async def stats(self):
                return answers[self.handle]

        stats = await Interactions(Router(), port=FakeRemote).stats()
        assert stats["sessions"] == 3 and stats["tick"] == 11 and stats["step_ms_p50"] == 7.0 and stats["missing_chunks"] == 2
        assert stats["totals"] == {"ticks": 21} and stats["actors"] == 2 and stats["actors_answering"] == 2

    asyncio.run(main())

"""Admission: joining and leaving, refused beyond capacity and while steps run hot. Against
`tests.fakes.MockEngine` through the engine port.
"""

import asyncio

import pytest

from actors.interaction.interaction import Interaction
from protocols import ProtocolError
from tests.fakes import MockEngine

from .helpers import FakeTime, make


def test_join_beyond_capacity_and_unknown_leave_are_refused():
    async def scenario():
        inter = make()
        for i in range(4):
            await inter.join(f"s{i}")
        with pytest.raises(Exception, match="full"):
            await inter.join("s4")
        with pytest.raises(Exception, match="already joined"):
            await inter.join("s0")
        with pytest.raises(Exception, match="unknown session"):
            await inter.leave("nobody")

    asyncio.run(scenario())


def test_join_is_refused_while_steps_run_hot_and_accepted_again_after():
    async def scenario():
        inter = Interaction(MockEngine(tick_ms=50, max_sessions=4, step_s=0.04), t0=0.0, now=FakeTime())  # 80% of the tick
        await inter.join("a")
        for k in range(3):
            await inter.step(k)
        with pytest.raises(ProtocolError, match="overloaded"):
            await inter.join("b")
        inter.engine.step_s = 0.0
        for k in range(3, 3 + 25):
            await inter.step(k)
        assert (await inter.join("b")).first_tick == 28

    asyncio.run(scenario())

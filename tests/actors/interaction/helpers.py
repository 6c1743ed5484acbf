"""Shared by the interaction actor's tests (tests/actors/interaction/test_*.py): input chunks of
random audio, a fake clock, an `Interaction` over `tests.fakes.MockEngine` on that clock, and one
exchange stepped at once."""

import asyncio

import numpy as np

from actors.interaction.interaction import Interaction
from protocols import InputChunk
from tests.fakes import MockEngine

SAMPLES = 3_200  # MockEngine's default tick: 200 ms at 16 kHz
rng = np.random.default_rng(1)


def chunk(sid, seq, frame=None, text="", samples=SAMPLES):
    audio = rng.integers(-3000, 3000, samples, dtype=np.int16)
    return InputChunk(sid, seq, seq * 0.2, audio, frame=frame, text=text)


class FakeTime:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def make(log=None, background=None, **engine):
    return Interaction(MockEngine(max_sessions=4, **engine), log=log, background=background, t0=0.0, now=FakeTime())


async def exchange_then_step(inter, tick, chunks, sids):
    task = asyncio.create_task(inter.exchange(tick, chunks, sids))
    await asyncio.sleep(0)  # the exchange hands its chunks in before the deadline
    stepped = await inter.step(tick)
    return await task, stepped

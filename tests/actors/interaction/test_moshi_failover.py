"""A Moshi-family engine behind the interaction actor: its sessions are logged, snapshotted and
resumed from the log on a new actor exactly as the built-in model's are (the engine's own
equivalence with the `moshi` package is tests/models/moshi/)."""

import asyncio
import os

import numpy as np
import pytest

os.environ.setdefault("NO_TORCH_COMPILE", "1")
pytest.importorskip("moshi")

from actors.interaction.interaction import Interaction  # noqa: E402
from actors.log.session_log import SessionLog  # noqa: E402
from protocols import InputChunk, SessionEvent, from_table  # noqa: E402
from tests.fakes import LocalLog  # noqa: E402

SIDS = ("a", "b")
SAMPLES = 1_280  # one 80 ms Mimi frame at 16 kHz


@pytest.fixture(scope="module")
def moshi_dir(tmp_path_factory):
    from models.moshi.random_checkpoint import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("moshi") / "small", "small", seed=0)


def voice(sid: str, k: int) -> np.ndarray:
    rng = np.random.default_rng([ord(sid), k])
    t = (np.arange(SAMPLES) + k * SAMPLES) / 16_000
    x = 0.3 * np.sin(2 * np.pi * (120 + 60 * ord(sid) % 5) * t) + 0.1 * rng.standard_normal(SAMPLES)
    return (x * 32767 * (0.5 + 0.5 * ((k // 3) % 2))).astype(np.int16)


class Run:
    """An `Interaction` on a MoshiEngine (sampling on), stepped tick by tick on a fake clock."""

    def __init__(self, path, log, clock=None):
        from models.moshi.engine import MoshiEngine

        self.clock = clock or [0.0]
        self.inter = Interaction(MoshiEngine(path, max_sessions=2), log=log, t0=0.0, now=lambda: self.clock[0], snapshot_s=0.4)

    async def tick(self, k: int):
        self.clock[0] = k * 0.08 + 0.02
        got = asyncio.create_task(self.inter.exchange(k, [InputChunk(s, k, k * 0.08, voice(s, k)) for s in SIDS], list(SIDS)))
        await asyncio.sleep(0)
        await self.inter.step(k)
        return {o.session_id: o for o in await got}


def test_moshi_sessions_resume_from_the_log_on_a_new_actor_and_go_on_as_if_uninterrupted(moshi_dir, tmp_path):
    async def uninterrupted():
        run = Run(moshi_dir, None)
        for sid in SIDS:
            await run.inter.join(sid)
        return [await run.tick(k) for k in range(24)]

    async def interrupted():
        session_log = SessionLog(tmp_path / "log", tick_ms=80)
        log = LocalLog(session_log)
        first = Run(moshi_dir, log)
        tokens = {sid: (await first.inter.join(sid)).log_token for sid in SIDS}
        outs = [await first.tick(k) for k in range(15)]
        await first.inter.flush()
        clock = first.clock
        del first  # the actor is gone; a new one on the same clock resumes its sessions from the log
        second = Run(moshi_dir, log, clock)
        answers = {sid: await second.inter.resume(sid) for sid in SIDS}
        outs += [await second.tick(k) for k in range(15, 24)]
        await second.inter.flush()
        return outs, answers, session_log, tokens

    want = asyncio.run(uninterrupted())
    got, answers, session_log, tokens = asyncio.run(interrupted())
    for sid, a in answers.items():
        assert a.first_tick == 15 and a.resumed.mismatches == 0 and 0 < a.resumed.replayed <= 5, a  # from a snapshot
    for k in range(24):
        for sid in SIDS:
            g, w = got[k][sid], want[k][sid]
            assert (g.seq, g.text, g.controls) == (w.seq, w.text, w.controls), (k, sid)
            assert np.abs(g.audio.astype(np.int32) - w.audio.astype(np.int32)).max() <= 2, (k, sid)
    assert any(want[k]["a"].text for k in range(24)) and any(np.abs(want[k]["a"].audio).max() > 0 for k in range(24))
    deltas = from_table(session_log.read("a", tokens["a"]))
    assert [c.seq for c in deltas if isinstance(c, InputChunk)] == list(range(24))
    assert [e.type for e in deltas if isinstance(e, SessionEvent)] == ["session.joined", "session.resumed"]

"""Seeded per-session sampling: a draw follows the top-k softmax; with sampling on, a session's
tokens and audio are the same alone and beside sessions joining and leaving, replaying its logged
chunks from its seed gives them again, and its seed (not its row or id) decides them."""

from importlib.metadata import version

import numpy as np
import pytest
import torch

from models.moshi.engine import MoshiEngine
from models.moshi.sampling import sample

from .conftest import chunk

SEED = 7


@pytest.fixture(scope="module")
def shared(moshi_dir):
    return MoshiEngine(moshi_dir, max_sessions=3, temperature=0.8, top_k=250, temperature_text=0.7, top_k_text=25)


@pytest.fixture
def engine(shared):
    for sid in shared.sessions:
        shared.remove_session(sid)
    return shared


def test_the_package_is_the_version_sampling_was_written_against():
    assert version("moshi") == "0.2.13", "models/moshi/sampling.py relies on LMGen's internals in 0.2.13: recheck them"


def test_a_draw_follows_the_top_k_softmax():
    logits = torch.tensor([2.0, 0.5, 1.0, -1.0, 1.5, 0.0])
    n, k, t = 40_000, 4, 0.7
    gumbel = torch.from_numpy(np.random.default_rng(0).gumbel(size=(n, k))).float()
    got = sample(logits.expand(n, -1), t, gumbel)
    freq = torch.bincount(got, minlength=6).float() / n
    top = logits.topk(k).indices
    want = torch.zeros(6)
    want[top] = torch.softmax(logits[top] / t, 0)
    assert (freq - want).abs().max() < 0.01 and freq[want == 0].sum() == 0
    assert torch.equal(sample(logits[None], 0.0, None), torch.tensor([0]))


def run(engine, ticks, plan=None, other_seed=9):
    """Step ticks of session "s" (seed SEED), applying `plan` {tick: ["+id", "-id"]} for the
    others around it. -> per tick ("s"'s tokens, its output chunk)."""
    out = []
    for k in ticks:
        for op in (plan or {}).get(k, []):
            (engine.add_session(op[1:]) if op[0] == "+" else engine.remove_session(op[1:]))
        chunks = [chunk(sid, SEED if sid == "s" else other_seed, k, updates=["okay sure"] if sid == "s" and k == 3 else [])
                  for sid in engine.sessions]
        got, errors = engine.step(chunks)
        assert not errors
        out.append((engine.last_tokens["s"].copy(), next(o for o in got if o.session_id == "s")))
    return out


def same(a, b):
    for (ta, oa), (tb, ob) in zip(a, b, strict=True):
        assert np.array_equal(ta, tb) and oa.text == ob.text and oa.controls == ob.controls and oa.seq == ob.seq
        assert np.abs(oa.audio.astype(int) - ob.audio.astype(int)).max() <= 2


def alone(engine, ticks=12):
    engine.add_session("s", seed=SEED)
    whole = run(engine, range(ticks))
    engine.remove_session("s")
    return whole


def test_a_session_samples_the_same_alone_and_in_a_changing_batch(engine, moshi_dir):
    whole = alone(engine)
    engine.add_session("x")
    engine.add_session("s", seed=SEED)  # row 1 now, row 0 alone
    batched = run(engine, range(12), plan={3: ["+y"], 5: ["-x"], 7: ["+z"], 9: ["-y"]})
    same(batched, whole)
    assert sum(bool(o.text) for _, o in whole) >= 3  # text to compare
    greedy = MoshiEngine(moshi_dir, max_sessions=1, temperature=0.0, temperature_text=0.0, _spare=False)
    assert not all(np.array_equal(t, g) for (t, _), (g, _) in zip(whole, alone(greedy)))  # it does sample


def test_replaying_the_logged_chunks_from_the_seed_gives_the_uninterrupted_outputs(engine):
    whole = alone(engine)
    engine.add_session("o")
    logged = [chunk("s", SEED, k, updates=["okay sure"] if k == 3 else []) for k in range(9)]
    state, replayed = engine.replay("s", None, SEED, chunks=logged[:6])
    assert "s" not in engine.sessions and state["session"]["frames"] == 6
    rebuilt = engine.rebuild("s", state, chunks=logged[6:])
    rest = run(engine, range(9, 12))
    same([(t, o) for (t, _), o in zip(whole, replayed + rebuilt)] + rest, whole)  # replay reports no tokens


def test_the_seed_decides_the_draws(engine):
    for sid, seed in (("a", 1), ("b", 2), ("c", 1)):
        engine.add_session(sid, seed=seed)
    tokens = {sid: [] for sid in engine.sessions}
    for k in range(8):
        engine.step([chunk(sid, SEED, k) for sid in engine.sessions])  # the same input for all three
        for sid, seen in tokens.items():
            seen.append(engine.last_tokens[sid])
    a, b, c = (np.stack(tokens[s]) for s in "abc")
    assert np.array_equal(a, c) and not np.array_equal(a, b)
    assert not np.array_equal(a[:, 0], b[:, 0]) and not np.array_equal(a[1:, 1:], b[1:, 1:])  # text and audio both

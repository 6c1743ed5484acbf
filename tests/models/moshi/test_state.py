"""A Moshi session moves exactly: export/import, replay and rebuild give the outputs it would
have given uninterrupted; a session far past the LM's context keeps going with bounded state."""

import numpy as np
import pytest

from models.moshi.engine import MoshiEngine
from protocols.chunks import ProtocolError

from .conftest import chunk


@pytest.fixture(scope="module")
def shared(moshi_dir):
    return MoshiEngine(moshi_dir, max_sessions=2)  # sampling on (the defaults)


@pytest.fixture
def engine(shared):
    for sid in shared.sessions:
        shared.remove_session(sid)
    return shared


def run(engine, sid, seed, ticks, other=None):
    outs = []
    for k in ticks:
        chunks = [chunk(sid, seed, k, updates=["okay sure"] if k == 3 else [])]
        if other:
            chunks.append(chunk(other, 9, k))
        got, errors = engine.step(chunks)
        assert not errors
        outs.append((engine.last_tokens[sid].copy(), got[0]))
    return outs


def same(a, b):
    for (ta, oa), (tb, ob) in zip(a, b, strict=True):
        assert np.array_equal(ta, tb) and oa.text == ob.text and oa.controls == ob.controls and oa.seq == ob.seq
        assert np.abs(oa.audio.astype(int) - ob.audio.astype(int)).max() <= 2


def test_export_replay_rebuild_give_the_uninterrupted_outputs(engine):
    engine.add_session("s", seed=5)
    whole = run(engine, "s", 1, range(12))
    engine.remove_session("s")

    engine.add_session("s", seed=5)
    engine.add_session("o")
    first = run(engine, "s", 1, range(5), other="o")  # another session beside it changes nothing
    snap = engine.export_session("s")
    engine.remove_session("s")
    engine.import_session("t", {**snap})  # import under another id into another row
    engine.remove_session("t")
    chunks = [chunk("s", 1, k) for k in range(5, 9)]
    state, replayed = engine.replay("s", snap, chunks=chunks)  # touches no live session
    assert "s" not in engine.sessions
    rebuilt = engine.rebuild("s", state, chunks=[chunk("s", 1, k) for k in range(9, 10)])
    rest = run(engine, "s", 1, range(10, 12), other="o")
    middle = [(whole[5 + i][0], o) for i, o in enumerate(replayed + rebuilt)]  # replay reports no tokens
    same(first + middle + rest, whole)
    assert not np.array_equal(rest[-1][0], run_fresh_tokens(engine))  # the comparison can fail
    assert any(o.text for _, o in whole)  # the update entered the text stream: text to compare


def run_fresh_tokens(engine):
    engine.remove_session("s")
    engine.remove_session("o")
    engine.add_session("s", seed=5)
    return run(engine, "s", 1, range(11, 12))[0][0]


def test_a_state_that_does_not_fit_is_refused_and_changes_nothing(engine):
    engine.add_session("s")
    snap = engine.export_session("s")
    engine.remove_session("s")
    bad = {**snap, "rows": {k: v for k, v in snap["rows"].items() if not k.startswith("mimi:")}}
    with pytest.raises(ProtocolError) as e:
        engine.import_session("s", bad)
    assert e.value.code == "invalid_state" and engine.sessions == []
    with pytest.raises(ProtocolError):
        engine.import_session("s", {**snap, "identity": {"lm_config": {}}})
    hotter = {**snap["identity"], "sampling": {**engine.sampling, "temperature": 1.2}}
    with pytest.raises(ProtocolError, match="different model"):  # drawn otherwise: would not replay alike
        engine.import_session("s", {**snap, "identity": hotter})
    with pytest.raises(ProtocolError):
        engine.replay("s", snap, chunks=[chunk("other", 1, 3)])


def test_a_session_far_past_the_context_goes_on_with_bounded_state(engine):
    context = engine.models.lm.transformer.layers[0].self_attn.context
    state_bytes = engine.state_bytes()
    engine.add_session("long")
    ticks = 2 * context + 10  # the ring of `context` positions wraps twice
    texts = 0
    for k in range(ticks):
        outs, errors = engine.step([chunk("long", 1, k)])
        out = outs[0]
        assert not errors and out.seq == k and out.audio.shape == (1280,)
        texts += bool(out.text) or bool(np.any(out.audio))
    assert texts > ticks // 2  # still producing
    assert engine.state_bytes() == state_bytes
    assert engine._sessions["long"].frames == ticks
    snap = engine.export_session("long")
    kv = [v for k, v in snap["rows"].items() if k.startswith("lm:transformer.") and k.endswith("kv_cache.cache")]
    assert kv and all(v.shape[-2] == context for v in kv)  # (2, heads, context, dim): a ring of `context` positions

"""StreamingEngine's sessions and rows: joining and leaving leave others untouched, the cache is pre-sized and
memory stays flat, state export/import resumes identically, capacity and queue limits."""

from __future__ import annotations

import gc
import os
import pickle
import tracemalloc

import numpy as np
import pytest
import torch

import models
import protocols
from protocols.chunks import ProtocolError
from tests.models.helpers import FLOAT_LSB, SEEDS, assert_same, build_engine, chunks_at, fast_forward, make_chunk, step_ok


def test_a_session_is_unaffected_by_others_joining_and_leaving():
    """A alone vs A beside X, with three sessions joining at tick 5 (frames, text, background) and
    X leaving at tick 10, which moves D's state into X's row: A's and D's outputs are the same as
    when each runs alone."""
    alone_a, alone_d, crowd = build_engine(), build_engine(sessions=()), build_engine(max_sessions=5, sessions=("x", "a"))
    for k in range(16):
        if k == 5:
            alone_d.add_session("d")
            alone_d.push_update("d", "background result " * 3)
            for s in ("b", "c", "d"):
                crowd.add_session(s)
                crowd.push_update(s, "background result " * 3)
        if k == 10:
            crowd.remove_session("x")
            assert crowd.sessions[0] == "d"
        present = crowd.sessions
        outs = step_ok(crowd, [make_chunk(s, k, SEEDS[s], text="typing" if s in "bc" and k % 4 == 0 else "") for s in present])
        assert_same(step_ok(alone_a, chunks_at(["a"], k))[0], outs[present.index("a")], lsb=FLOAT_LSB)
        if k >= 5:
            assert_same(step_ok(alone_d, chunks_at(["d"], k))[0], outs[present.index("d")], lsb=FLOAT_LSB)
    assert crowd.sessions == ["d", "a", "b", "c"]
    assert torch.equal(alone_a.rows["prev_codes"][0], crowd.rows["prev_codes"][1])
    assert torch.equal(alone_d.rows["prev_codes"][0], crowd.rows["prev_codes"][0])


def test_cache_is_pre_sized_and_memory_stays_flat():
    """Storage never moves or grows: window+200 ticks with a 24-token window, then a session an
    hour in (fast-forwarded: 18,000 ticks of 20 tokens = 360,000 positions)."""
    eng = build_engine(sessions=("a", "b"))
    cfg = eng.cfg
    assert eng.rows["k"].shape == (cfg.n_layers, 4, cfg.n_kv_heads, cfg.n_sink + cfg.window + cfg.max_tokens_per_tick, cfg.head_dim)
    tensors = list(eng.rows.tensors.values())
    ptrs = [t.data_ptr() for t in tensors]
    nbytes = eng.state_bytes()

    for k in range(30):  # warm-up: lazily built Python objects settle
        step_ok(eng, chunks_at(["a", "b"], k, text="hi" if k % 7 == 0 else ""))
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    n_objects = len(gc.get_objects())
    for k in range(30, 30 + cfg.window + 200):
        step_ok(eng, chunks_at(["a", "b"], k, text="hi" if k % 7 == 0 else ""))
    gc.collect()
    # What the engine's own code allocated (models/, protocols/): threads that earlier tests left
    # running in this process (Ray's, a log's sweep) allocate meanwhile, and are not the engine.
    mine = [tracemalloc.Filter(True, f"{os.path.dirname(p)}{os.sep}*") for p in (models.__file__, protocols.__file__)]
    after = tracemalloc.take_snapshot().filter_traces(mine)
    grown = sum(s.size_diff for s in after.compare_to(before.filter_traces(mine), "filename"))
    del after  # its traces are objects too, not the engine's
    tracemalloc.stop()
    assert grown < 64 * 1024, f"Python heap grew by {grown} bytes"
    assert len(gc.get_objects()) - n_objects < 200
    assert [t.data_ptr() for t in tensors] == ptrs and eng.state_bytes() == nbytes
    live = (eng.rows["slot_pos"][:2] >= 0).sum(1)
    assert torch.all(live <= cfg.cache_len) and int(eng.rows["pos"][0]) > 10 * cfg.cache_len

    fast_forward(eng, "a", ticks=18_000, tokens_per_tick=20, generator=torch.Generator().manual_seed(0))
    for k in range(254, 264):
        outs = step_ok(eng, chunks_at(["a", "b"], k))
    assert int(eng.rows["pos"][0]) > 360_000 and int(eng.rows["tick"][0]) == 18_010
    assert all(np.isfinite(o.audio).all() for o in outs)
    assert [t.data_ptr() for t in tensors] == ptrs and eng.state_bytes() == nbytes


def test_export_import_resumes_identically():
    src = build_engine(sessions=("x", "a"))
    for k in range(20):
        step_ok(src, chunks_at(["x", "a"], k, text="note" if k == 18 else ""))
    src.push_update("a", "a long background update that takes several ticks to enter")
    state = pickle.loads(pickle.dumps(src.export_session("a")))
    assert state["session"]["last_seq"] == 19 and isinstance(state["rows"]["k"], np.ndarray)
    assert set(state["rows"]) == set(src.rows.tensors)  # every row tensor travels, none listed by hand

    dst = build_engine(max_sessions=2, sessions=())
    dst.import_session("a", state)
    for k in range(20, 30):
        o_src = step_ok(src, chunks_at(["x", "a"], k))[1]
        o_dst = step_ok(dst, chunks_at(["a"], k))[0]
        assert_same(o_src, o_dst, lsb=FLOAT_LSB)

    with pytest.raises(ProtocolError, match="different"):
        build_engine(sessions=(), window=48).import_session("a", state)
    with pytest.raises(ProtocolError, match="different.*tick_ms"):
        build_engine(sessions=(), tick_ms=100).import_session("a", state)
    broken = {**state, "rows": {**state["rows"], "prev_text": np.zeros(9, np.int64)}}
    with pytest.raises(ProtocolError, match="prev_text"):
        dst.import_session("b", broken)
    assert dst.sessions == ["a"]  # a state that does not fit changes nothing
    _, errors = dst.step(chunks_at(["a"], 5))
    assert "seq 5 out of order" in str(errors["a"])


def test_engine_limits():
    eng = build_engine(max_sessions=2, sessions=("a", "b"))
    with pytest.raises(ProtocolError, match="full"):
        eng.add_session("c")
    with pytest.raises(ProtocolError, match="already exists"):
        eng.add_session("a")
    eng.remove_session("a")
    eng.add_session("c")
    assert eng.sessions == ["b", "c"]
    with pytest.raises(ProtocolError, match="'b'.*queue is full"):
        for _ in range(eng.cfg.max_queued_tokens // 4096 + 1):
            eng.push_update("b", "x" * 4096)

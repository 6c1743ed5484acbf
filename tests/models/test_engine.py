"""StreamingEngine: batch invariance, bounded memory, state transfer, bad input, text out."""

from __future__ import annotations

import gc
import pickle
import tracemalloc

import numpy as np
import pytest
import torch

from models.engine import StreamingEngine
from protocols.chunks import CHUNK_SAMPLES, CONTROLS, InputChunk, OutputChunk, ProtocolError
from tests.models.helpers import make_chunk, micro

SEEDS = {"a": 0, "b": 1, "c": 2, "d": 3, "x": 4}
# float32 matmuls over different row counts may differ in the last bits, and an untrained flow
# head speaks loudly, where the vocoder's exp() turns that into a few LSB. Text, controls and the
# dMel codes fed back must match exactly.
FLOAT_LSB = 64


def _chunks(sids, k, **kw):
    return [make_chunk(s, k, SEEDS[s], **kw) for s in sids]


def _engine(max_sessions=4, sessions=("a",), **kw) -> StreamingEngine:
    torch.manual_seed(0)  # same weights in every engine of a test
    eng = StreamingEngine(micro(**kw), max_sessions=max_sessions)
    for s in sessions:
        eng.add_session(s)
    return eng


def _same(o1: OutputChunk, o2: OutputChunk, lsb: int = 0) -> None:
    assert (o1.session_id, o1.seq, o1.text, o1.controls) == (o2.session_id, o2.seq, o2.text, o2.controls)
    diff = np.abs(o1.audio.astype(np.int32) - o2.audio.astype(np.int32))
    assert diff.max() <= lsb and diff.mean() < max(lsb, 1) / 16


def test_step_outputs_one_chunk_per_input_in_order():
    eng = _engine(sessions=("a", "b", "c"))
    outs = eng.step(_chunks(["c", "a", "b"], 0))
    assert [o.session_id for o in outs] == ["c", "a", "b"]
    for o in outs:
        assert isinstance(o, OutputChunk) and o.seq == 0 and o.step_ms > 0
        assert o.audio.dtype == np.int16 and o.audio.shape == (CHUNK_SAMPLES,)
        assert len(o.controls) == 1 and o.controls[0] in CONTROLS


def test_a_session_is_unaffected_by_others_joining_and_leaving():
    """A alone vs A beside X, with three sessions joining at tick 5 (frames, text, background) and
    X leaving at tick 10, which moves D's state into X's row: A's and D's outputs are the same as
    when each runs alone."""
    alone_a, alone_d, crowd = _engine(), _engine(sessions=()), _engine(max_sessions=5, sessions=("x", "a"))
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
        outs = crowd.step([make_chunk(s, k, SEEDS[s], text="typing" if s in "bc" and k % 4 == 0 else "") for s in present])
        _same(alone_a.step(_chunks(["a"], k))[0], outs[present.index("a")], lsb=FLOAT_LSB)
        if k >= 5:
            _same(alone_d.step(_chunks(["d"], k))[0], outs[present.index("d")], lsb=FLOAT_LSB)
    assert crowd.sessions == ["d", "a", "b", "c"]
    assert torch.equal(alone_a.prev_codes[0], crowd.prev_codes[1])
    assert torch.equal(alone_d.prev_codes[0], crowd.prev_codes[0])


def test_cache_is_pre_sized_and_memory_stays_flat():
    """Storage never moves or grows: window+200 ticks with a 24-token window, then a session an
    hour in (fast-forwarded: 18,000 ticks of 20 tokens = 360,000 positions)."""
    eng = _engine(sessions=("a", "b"))
    cfg = eng.cfg
    assert eng.k_cache.shape == (cfg.n_layers, 4, cfg.n_kv_heads, cfg.n_sink + cfg.window + cfg.max_tokens_per_tick, cfg.head_dim)
    tensors = [eng.k_cache, eng.v_cache, *eng._row_tensors()]
    ptrs = [t.data_ptr() for t in tensors]
    nbytes = eng.state_bytes()

    for k in range(30):  # warm-up: lazily built Python objects settle
        eng.step(_chunks(["a", "b"], k, text="hi" if k % 7 == 0 else ""))
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    n_objects = len(gc.get_objects())
    for k in range(30, 30 + cfg.window + 200):
        eng.step(_chunks(["a", "b"], k, text="hi" if k % 7 == 0 else ""))
    gc.collect()
    grown = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(before, "filename"))
    tracemalloc.stop()
    assert grown < 64 * 1024, f"Python heap grew by {grown} bytes"
    assert len(gc.get_objects()) - n_objects < 200
    assert [t.data_ptr() for t in tensors] == ptrs and eng.state_bytes() == nbytes
    live = (eng.slot_pos[:2] >= 0).sum(1)
    assert torch.all(live <= cfg.cache_len) and int(eng.pos[0]) > 10 * cfg.cache_len

    eng.fast_forward("a", ticks=18_000, tokens_per_tick=20, generator=torch.Generator().manual_seed(0))
    for k in range(254, 264):
        outs = eng.step(_chunks(["a", "b"], k))
    assert int(eng.pos[0]) > 360_000 and int(eng.tick[0]) == 18_010
    assert all(np.isfinite(o.audio).all() for o in outs)
    assert [t.data_ptr() for t in tensors] == ptrs and eng.state_bytes() == nbytes


def test_rope_stays_exact_hundreds_of_thousands_of_positions_in():
    """With no sinks, attention only sees relative positions: the same session started at
    position 0 or at position 400,000 must give the same outputs (float32 RoPE angles would not)."""
    near, far = _engine(n_sink=0), _engine(n_sink=0)
    with torch.inference_mode():
        far.pos[0] = 400_000
    for k in range(12):
        o1, o2 = near.step(_chunks(["a"], k))[0], far.step(_chunks(["a"], k))[0]
        _same(o1, o2, lsb=FLOAT_LSB)
    assert torch.equal(near.prev_codes[0], far.prev_codes[0])


def test_export_import_resumes_identically():
    src = _engine(sessions=("x", "a"))
    for k in range(20):
        src.step(_chunks(["x", "a"], k, text="note" if k == 18 else ""))
    src.push_update("a", "a long background update that takes several ticks to enter")
    state = pickle.loads(pickle.dumps(src.export_session("a")))
    assert state["last_seq"] == 19 and isinstance(state["k"], np.ndarray)

    dst = _engine(max_sessions=2, sessions=())
    dst.import_session("a", state)
    for k in range(20, 30):
        o_src = src.step(_chunks(["x", "a"], k))[1]
        o_dst = dst.step(_chunks(["a"], k))[0]
        _same(o_src, o_dst, lsb=FLOAT_LSB)

    with pytest.raises(ProtocolError, match="different"):
        _engine(sessions=(), window=48).import_session("a", state)
    with pytest.raises(ProtocolError, match="seq 5 out of order"):
        dst.step(_chunks(["a"], 5))


def test_bad_input_raises_names_the_session_and_changes_nothing():
    eng, ref = _engine(sessions=("a", "b")), _engine(sessions=("a", "b"))
    for k in range(3):
        eng.step(_chunks(["a", "b"], k))
        ref.step(_chunks(["a", "b"], k))

    def bad(fix):
        chunks = _chunks(["a", "b"], 3)
        return fix(chunks) or chunks

    short = lambda c: setattr(c[1], "audio", np.zeros(3000, np.int16))  # noqa: E731
    floaty = lambda c: setattr(c[1], "audio", c[1].audio.astype(np.float32))  # noqa: E731
    big_frame = lambda c: setattr(c[1], "frame", np.zeros((120, 120, 3), np.uint8))  # noqa: E731
    unknown = lambda c: c.append(make_chunk("zzz", 3, 0))  # noqa: E731
    twice = lambda c: c.append(make_chunk("b", 3, 1))  # noqa: E731
    absent = lambda c: c.pop(1) and None  # noqa: E731
    late = lambda c: setattr(c[1], "seq", 7)  # noqa: E731
    cases = [(short, "'b'.*3200 samples"), (floaty, "'b'.*int16"), (big_frame, "'b'.*80x80"),
             (unknown, "unknown session 'zzz'"), (twice, "'b' has more than one chunk"),
             (absent, r"no chunk for session\(s\) \['b'\]"), (late, "'b'.*seq 7 out of order, expected 3")]
    for fix, msg in cases:
        with pytest.raises(ProtocolError, match=msg):
            eng.step(bad(fix))
    with pytest.raises(ProtocolError):  # the contract also holds at construction
        InputChunk("a", 0, 0.0, np.zeros(100, np.int16))
    with pytest.raises(ProtocolError, match="unknown session"):
        eng.push_update("nobody", "x")

    for k in range(3, 6):  # nothing above touched any state
        for o1, o2 in zip(eng.step(_chunks(["a", "b"], k)), ref.step(_chunks(["a", "b"], k))):
            _same(o1, o2)


def test_step_checked_keeps_the_other_sessions_running():
    eng, ref = _engine(sessions=("a", "b", "c")), _engine(sessions=("a", "b", "c"))
    for k in range(2):
        eng.step(_chunks(["a", "b", "c"], k))
        ref.step(_chunks(["a", "b", "c"], k))
    chunks = _chunks(["a", "b", "c"], 2)
    chunks[1].frame = np.zeros((40, 40, 3), np.uint8)  # wrong size for this model
    chunks.append(make_chunk("ghost", 2, 0))
    outs, errors = eng.step_checked(chunks)
    assert set(errors) == {"b", "ghost"} and errors["b"].code == "invalid_frame"
    assert [o.session_id for o in outs] == ["a", "c", "b"]  # b stepped as missing: its clock stays aligned
    expect = ref.step([chunks[0], InputChunk.silent("b", 2, chunks[1].t_start), chunks[2]])
    for o1, o2 in zip(outs, [expect[0], expect[2], expect[1]]):
        _same(o1, o2)
    outs, errors = eng.step_checked(_chunks(["a", "b", "c"], 3))  # b is fine again
    assert not errors and len(outs) == 3
    outs, errors = eng.step_checked(_chunks(["a"], 4))  # absent sessions are stepped as missing
    assert set(errors) == {"b", "c"} and [o.seq for o in outs] == [4, 4, 4]


def test_text_queue_caps_tokens_per_tick_and_text_out_streams_utf8(monkeypatch):
    eng = _engine()
    eng.trace = True
    tk = eng.tokenizer
    eng.step([make_chunk("a", 0, 0, text="abcdefghij")])  # 12 tokens with TXT/EOT, 4 a tick
    eng.push_update("a", "xy")
    for k in range(1, 4):
        eng.step(_chunks(["a"], k))
    trace = eng._sessions["a"].trace
    assert [t["inputs"].text_ids[0] for t in trace] == [[tk.txt_id, 97, 98, 99], [100, 101, 102, 103], [104, 105, 106, tk.eot_id], []]
    assert [t["inputs"].bg_ids[0] for t in trace] == [[], [tk.bg_id, 120, 121], [tk.eot_id], []]

    plan = [([0x68, 0xC3, tk.eot_id, 0x41], "speak"), ([0xA9, 0x21, tk.pad_id, tk.pad_id], "yield")]

    def fake_predict(h):
        ids, ctrl = plan.pop(0)
        text = torch.full((h.shape[0], len(ids), eng.cfg.vocab_size), -5.0, dtype=h.dtype)
        text[0, torch.arange(len(ids)), torch.tensor(ids)] = 5.0
        c = torch.zeros(h.shape[0], len(CONTROLS), dtype=h.dtype)
        c[0, CONTROLS.index(ctrl)] = 1.0
        return c, text

    monkeypatch.setattr(eng.model, "predict", fake_predict)
    o1, o2 = eng.step(_chunks(["a"], 4))[0], eng.step(_chunks(["a"], 5))[0]
    assert (o1.text, o1.controls, o2.text, o2.controls) == ("h", ["speak"], "é!", ["yield"])  # é split across ticks
    fed = eng._sessions["a"].trace[-1]["inputs"]
    assert fed.prev_text[0].tolist() == [0x68, 0xC3, tk.eot_id, tk.pad_id] and fed.prev_ctrl.item() == CONTROLS.index("speak")


def test_sampling_is_reproducible_and_batch_invariant():
    alone, crowd = _engine(), _engine(sessions=("a", "b"))
    alone.temperature = crowd.temperature = 1.5
    controls = []
    for k in range(6):
        o1 = alone.step(_chunks(["a"], k))[0]
        o2 = crowd.step(_chunks(["a", "b"], k))[0]
        _same(o1, o2, lsb=FLOAT_LSB)
        controls.append(o1.controls[0])
    assert len(set(controls)) > 1  # sampling at temperature 1.5 over random logits varies


def test_engine_limits():
    eng = _engine(max_sessions=2, sessions=("a", "b"))
    with pytest.raises(ProtocolError, match="full"):
        eng.add_session("c")
    with pytest.raises(ProtocolError, match="already exists"):
        eng.add_session("a")
    eng.remove_session("a")
    eng.add_session("c")
    assert eng.sessions == ["b", "c"]
    with pytest.raises(ProtocolError, match="no chunk"):
        eng.step([])


def test_silent_control_means_silence():
    eng = _engine()
    eng.temperature = 2.0  # an untrained model's greedy control hardly varies
    outs = [eng.step(_chunks(["a"], k))[0] for k in range(30)]
    ctrl = [o.controls[0] for o in outs]
    assert "silent" in ctrl and len(set(ctrl)) > 1
    for prev, o in zip(outs, outs[1:]):
        if o.controls == ["silent"] and prev.controls == ["silent"]:  # no overlap tail from speech
            assert not o.audio.any()
        if o.controls != ["silent"]:
            assert o.audio.any()
    loud = StreamingEngine(eng.model, max_sessions=1, mute_when_silent=False)
    loud.add_session("a")
    assert all(loud.step(_chunks(["a"], k))[0].audio.any() for k in range(5))


def test_response_create_makes_the_model_speak_until_cancelled():
    """A client's response.create holds the control at speak; response.cancel ends it."""
    engine = StreamingEngine("tiny", max_sessions=2)
    engine.add_session("a")
    quiet = np.zeros(CHUNK_SAMPLES, np.int16)

    def step(k, events=()):
        return engine.step([InputChunk("a", k, k * 0.2, quiet, events=list(events))])[0]

    before = [step(k).controls for k in range(3)]
    asked = [step(3, [{"type": "response.create"}]).controls] + [step(k).controls for k in range(4, 8)]
    cancelled = [step(8, [{"type": "response.cancel"}]).controls] + [step(k).controls for k in range(9, 11)]
    assert all(c == ["speak"] for c in asked), asked
    assert all(c != ["speak"] for c in before + cancelled[1:])  # the untrained model listens unless asked
    spoken = step(11, [{"type": "response.create"}])
    assert spoken.controls == ["speak"] and np.abs(spoken.audio).max() > 0  # speaking is audible
    state = engine.export_session("a")
    assert state["respond_ticks"] > 0  # a requested response survives a move between actors

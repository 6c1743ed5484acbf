"""StreamingEngine: batch invariance, bounded memory, state transfer, exact rebuild from a snapshot and
logged chunks, forward seq gaps, bad input, forced controls, text out."""

from __future__ import annotations

import gc
import os
import pickle
import re
import tracemalloc

import numpy as np
import pytest
import torch

import models
import protocols
from models.engine import StreamingEngine
from protocols.chunks import CONTROLS, InputChunk, OutputChunk, ProtocolError
from protocols.deltas import from_table, to_batch
from tests.models.helpers import TracingEngine, fast_forward, make_chunk, micro, step_ok

SEEDS = {"a": 0, "b": 1, "c": 2, "d": 3, "x": 4}
# float32 matmuls over different row counts may differ in the last bits, and an untrained flow
# head speaks loudly, where the vocoder's exp() turns that into a few LSB. Text, controls and the
# dMel codes fed back must match exactly.
FLOAT_LSB = 64


def _chunks(sids, k, **kw):
    return [make_chunk(s, k, SEEDS[s], **kw) for s in sids]


def _engine(max_sessions=4, sessions=("a",), cls=StreamingEngine, **kw) -> StreamingEngine:
    torch.manual_seed(0)  # same weights in every engine of a test
    eng = cls(micro(**kw), max_sessions=max_sessions)
    for s in sessions:
        eng.add_session(s)
    return eng


def _same(o1: OutputChunk, o2: OutputChunk, lsb: int = 0) -> None:
    assert (o1.session_id, o1.seq, o1.text, o1.controls) == (o2.session_id, o2.seq, o2.text, o2.controls)
    diff = np.abs(o1.audio.astype(np.int32) - o2.audio.astype(np.int32))
    assert diff.max() <= lsb and diff.mean() < max(lsb, 1) / 16


def test_step_outputs_one_chunk_per_input_in_order():
    eng = _engine(sessions=("a", "b", "c"))
    assert eng.tick_ms == 200 and eng.max_sessions == 4
    outs = step_ok(eng, _chunks(["c", "a", "b"], 0))
    assert [o.session_id for o in outs] == ["c", "a", "b"]
    for o in outs:
        assert isinstance(o, OutputChunk) and o.seq == 0 and o.step_ms > 0
        assert o.audio.dtype == np.int16 and o.audio.shape == (3200,)
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
        outs = step_ok(crowd, [make_chunk(s, k, SEEDS[s], text="typing" if s in "bc" and k % 4 == 0 else "") for s in present])
        _same(step_ok(alone_a, _chunks(["a"], k))[0], outs[present.index("a")], lsb=FLOAT_LSB)
        if k >= 5:
            _same(step_ok(alone_d, _chunks(["d"], k))[0], outs[present.index("d")], lsb=FLOAT_LSB)
    assert crowd.sessions == ["d", "a", "b", "c"]
    assert torch.equal(alone_a.rows["prev_codes"][0], crowd.rows["prev_codes"][1])
    assert torch.equal(alone_d.rows["prev_codes"][0], crowd.rows["prev_codes"][0])


def test_cache_is_pre_sized_and_memory_stays_flat():
    """Storage never moves or grows: window+200 ticks with a 24-token window, then a session an
    hour in (fast-forwarded: 18,000 ticks of 20 tokens = 360,000 positions)."""
    eng = _engine(sessions=("a", "b"))
    cfg = eng.cfg
    assert eng.rows["k"].shape == (cfg.n_layers, 4, cfg.n_kv_heads, cfg.n_sink + cfg.window + cfg.max_tokens_per_tick, cfg.head_dim)
    tensors = list(eng.rows.tensors.values())
    ptrs = [t.data_ptr() for t in tensors]
    nbytes = eng.state_bytes()

    for k in range(30):  # warm-up: lazily built Python objects settle
        step_ok(eng, _chunks(["a", "b"], k, text="hi" if k % 7 == 0 else ""))
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    n_objects = len(gc.get_objects())
    for k in range(30, 30 + cfg.window + 200):
        step_ok(eng, _chunks(["a", "b"], k, text="hi" if k % 7 == 0 else ""))
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
        outs = step_ok(eng, _chunks(["a", "b"], k))
    assert int(eng.rows["pos"][0]) > 360_000 and int(eng.rows["tick"][0]) == 18_010
    assert all(np.isfinite(o.audio).all() for o in outs)
    assert [t.data_ptr() for t in tensors] == ptrs and eng.state_bytes() == nbytes


def test_rope_stays_exact_hundreds_of_thousands_of_positions_in():
    """With no sinks, attention only sees relative positions: the same session started at
    position 0 or at position 400,000 must give the same outputs (float32 RoPE angles would not)."""
    near, far = _engine(n_sink=0), _engine(n_sink=0)
    with torch.inference_mode():
        far.rows["pos"][0] = 400_000
    for k in range(12):
        o1, o2 = step_ok(near, _chunks(["a"], k))[0], step_ok(far, _chunks(["a"], k))[0]
        _same(o1, o2, lsb=FLOAT_LSB)
    assert torch.equal(near.rows["prev_codes"][0], far.rows["prev_codes"][0])


def test_export_import_resumes_identically():
    src = _engine(sessions=("x", "a"))
    for k in range(20):
        step_ok(src, _chunks(["x", "a"], k, text="note" if k == 18 else ""))
    src.push_update("a", "a long background update that takes several ticks to enter")
    state = pickle.loads(pickle.dumps(src.export_session("a")))
    assert state["session"]["last_seq"] == 19 and isinstance(state["rows"]["k"], np.ndarray)
    assert set(state["rows"]) == set(src.rows.tensors)  # every row tensor travels, none listed by hand

    dst = _engine(max_sessions=2, sessions=())
    dst.import_session("a", state)
    for k in range(20, 30):
        o_src = step_ok(src, _chunks(["x", "a"], k))[1]
        o_dst = step_ok(dst, _chunks(["a"], k))[0]
        _same(o_src, o_dst, lsb=FLOAT_LSB)

    with pytest.raises(ProtocolError, match="different"):
        _engine(sessions=(), window=48).import_session("a", state)
    with pytest.raises(ProtocolError, match="different.*tick_ms"):
        _engine(sessions=(), tick_ms=100).import_session("a", state)
    broken = {**state, "rows": {**state["rows"], "prev_text": np.zeros(9, np.int64)}}
    with pytest.raises(ProtocolError, match="prev_text"):
        dst.import_session("b", broken)
    assert dst.sessions == ["a"]  # a state that does not fit changes nothing
    _, errors = dst.step(_chunks(["a"], 5))
    assert "seq 5 out of order" in str(errors["a"])


def test_bad_input_is_reported_under_its_session_and_stepped_as_missing():
    """Each kind of bad chunk: the error names the session, that session steps as if its chunk
    were missing (its clock stays aligned), and every other session steps as if nothing happened."""
    eng, ref = _engine(sessions=("a", "b", "c")), _engine(sessions=("a", "b", "c"))
    for k in range(3):
        step_ok(eng, _chunks(["a", "b", "c"], k))
        step_ok(ref, _chunks(["a", "b", "c"], k))

    short = lambda c: setattr(c[1], "audio", np.zeros(3000, np.int16))  # noqa: E731
    floaty = lambda c: setattr(c[1], "audio", c[1].audio.astype(np.float32))  # noqa: E731
    big_frame = lambda c: setattr(c[1], "frame", np.zeros((120, 120, 3), np.uint8))  # noqa: E731
    bad_forced = lambda c: setattr(c[1], "forced", "shout")  # noqa: E731
    late = lambda c: setattr(c[1], "seq", 1)  # noqa: E731
    absent = lambda c: c.pop(1)  # noqa: E731
    twice = lambda c: c.append(make_chunk("b", 0, 1))  # noqa: E731
    unknown = lambda c: c.append(make_chunk("zzz", 0, 0))  # noqa: E731
    not_a_chunk = lambda c: c.append({"session_id": "b"})  # noqa: E731
    cases = [(short, "b", "'b'.*3200 samples"), (floaty, "b", "'b'.*int16"), (big_frame, "b", "'b'.*80x80"),
             (bad_forced, "b", "'b'.*forced"), (late, "b", "'b'.*seq 1 out of order, expected"),
             (absent, "b", "no chunk for session 'b'"), (twice, "b", "'b' has more than one chunk"),
             (unknown, "zzz", "unknown session 'zzz'"), (not_a_chunk, "{'session_id': 'b'}", "expected an InputChunk")]
    for k, (fix, key, msg) in enumerate(cases, start=3):
        chunks = _chunks(["a", "b", "c"], k)
        good_b = chunks[1]
        fix(chunks)
        outs, errors = eng.step(chunks)
        assert list(errors) == [key] and re.search(msg, str(errors[key])), (msg, errors)
        if key == "b" and fix is not twice:  # b's own chunk was refused: b stepped as missing
            b_as = InputChunk.silent("b", k, 0.0 if fix is absent else good_b.t_start, 3200)
        else:  # b's good chunk stands
            b_as = good_b
        expect = {o.session_id: o for o in step_ok(ref, [_chunks(["a"], k)[0], b_as, _chunks(["c"], k)[0]])}
        assert sorted(o.session_id for o in outs) == ["a", "b", "c"] and all(o.seq == k for o in outs)
        for o in outs:
            _same(o, expect[o.session_id])
    with pytest.raises(ProtocolError):  # the contract also holds at construction
        InputChunk("a", 0, 0.0, np.zeros((2, 1600), np.int16))  # not mono
    with pytest.raises(ProtocolError, match="unknown session"):
        eng.push_update("nobody", "x")


def test_outputs_come_for_good_chunks_first_then_for_sessions_stepped_as_missing():
    eng = _engine(sessions=("a", "b", "c"))
    chunks = _chunks(["a", "b", "c"], 0)
    chunks[1].frame = np.zeros((40, 40, 3), np.uint8)  # wrong size for this model
    outs, errors = eng.step(chunks)
    assert set(errors) == {"b"} and errors["b"].code == "invalid_frame"
    assert [o.session_id for o in outs] == ["a", "c", "b"]
    outs, errors = eng.step(_chunks(["a", "b", "c"], 1))  # b is fine again
    assert not errors and len(outs) == 3
    outs, errors = eng.step(_chunks(["a"], 2))  # absent sessions are stepped as missing
    assert set(errors) == {"b", "c"} and [o.seq for o in outs] == [2, 2, 2]


def test_text_queue_caps_tokens_per_tick_and_text_out_streams_utf8(monkeypatch):
    eng = _engine(cls=TracingEngine)
    tk = eng.tokenizer
    step_ok(eng, [make_chunk("a", 0, 0, text="abcdefghij")])  # 12 tokens with TXT/EOT, 4 a tick
    eng.push_update("a", "xy")
    for k in range(1, 4):
        step_ok(eng, _chunks(["a"], k))
    trace = eng.trace["a"]
    assert [t["inputs"].text_ids[0] for t in trace] == [[tk.txt_id, 97, 98, 99], [100, 101, 102, 103], [104, 105, 106, tk.eot_id], []]
    assert [t["inputs"].bg_ids[0] for t in trace] == [[], [tk.bg_id, 120, 121], [tk.eot_id], []]

    plan = [([0x68, 0xC3, tk.eot_id, 0x41], "speak"), ([0xA9, 0x21, tk.pad_id, tk.pad_id], "yield")]
    monkeypatch.setattr(eng.model, "predict", _scripted(eng, plan))
    o1, o2 = step_ok(eng, _chunks(["a"], 4))[0], step_ok(eng, _chunks(["a"], 5))[0]
    assert (o1.text, o1.controls, o2.text, o2.controls) == ("h", ["speak"], "é!", ["yield"])  # é split across ticks
    fed = eng.trace["a"][-1]["inputs"]
    assert fed.prev_text[0].tolist() == [0x68, 0xC3, tk.eot_id, tk.pad_id] and fed.prev_ctrl.item() == CONTROLS.index("speak")


def _scripted(eng, plan):
    """A stand-in for the heads: row 0 predicts the next (text ids, control) of `plan`."""
    def predict(h):
        ids, ctrl = plan.pop(0)
        text = torch.full((h.shape[0], eng.cfg.text_out, eng.cfg.vocab_size), -5.0, dtype=h.dtype)
        text[0, torch.arange(len(ids)), torch.tensor(ids)] = 5.0
        c = torch.zeros(h.shape[0], len(CONTROLS), dtype=h.dtype)
        c[0, CONTROLS.index(ctrl)] = 1.0
        return c, text
    return predict


def test_sampling_is_reproducible_and_batch_invariant():
    alone, crowd = _engine(), _engine(sessions=("a", "b"))
    alone.temperature = crowd.temperature = 1.5
    controls = []
    for k in range(6):
        o1 = step_ok(alone, _chunks(["a"], k))[0]
        o2 = step_ok(crowd, _chunks(["a", "b"], k))[0]
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
    with pytest.raises(ProtocolError, match="'b'.*queue is full"):
        for _ in range(eng.cfg.max_queued_tokens // 4096 + 1):
            eng.push_update("b", "x" * 4096)


def test_silent_control_means_silence():
    eng = _engine()
    eng.temperature = 2.0  # an untrained model's greedy control hardly varies
    outs = [step_ok(eng, _chunks(["a"], k))[0] for k in range(30)]
    ctrl = [o.controls[0] for o in outs]
    assert "silent" in ctrl and len(set(ctrl)) > 1
    for prev, o in zip(outs, outs[1:]):
        if o.controls == ["silent"] and prev.controls == ["silent"]:  # no overlap tail from speech
            assert not o.audio.any()
        if o.controls != ["silent"]:
            assert o.audio.any()
    loud = StreamingEngine(eng.model, max_sessions=1, mute_when_silent=False)
    loud.add_session("a")
    assert all(step_ok(loud, _chunks(["a"], k))[0].audio.any() for k in range(5))


def test_forced_speak_holds_until_the_model_yields(monkeypatch):
    """`forced="speak"` makes a listening model speak, audibly, and it hears that it did; the
    model's own "yield" ends the turn however long the client keeps asking; `forced="silent"`
    silences it. No other state about the request lives in the engine."""
    engine = StreamingEngine("tiny", max_sessions=2)
    engine.add_session("a")
    quiet = np.zeros(engine.cfg.samples_per_tick, np.int16)

    def step(k, forced=None):
        return step_ok(engine, [InputChunk("a", k, k * 0.2, quiet, forced=forced)])[0]

    before = [step(k).controls for k in range(3)]
    assert all(c != ["speak"] for c in before)  # the untrained model listens unless asked
    asked = [step(k, "speak") for k in range(3, 6)]
    assert all(o.controls == ["speak"] and np.abs(o.audio).max() > 0 for o in asked)
    assert int(engine.rows["prev_ctrl"][0]) == CONTROLS.index("speak")
    assert step(6).controls != ["speak"]  # nothing held over: the request is the chunk's

    real = engine.model.predict

    def yields(h):
        ctrl, text = real(h)
        return torch.where(torch.arange(ctrl.shape[1]) == CONTROLS.index("yield"), 100.0, ctrl), text

    monkeypatch.setattr(engine.model, "predict", yields)
    assert step(7, "speak").controls == ["yield"]  # the model's own yield ends the turn
    monkeypatch.setattr(engine.model, "predict", real)
    assert step(8, "speak").controls == ["speak"]
    silenced = step(9, "silent")
    step(10, "silent")
    assert silenced.controls == ["silent"] and not step(11, "silent").audio.any()
    assert set(engine.export_session("a")["session"]) == {"seed", "last_seq", "text_queue", "bg_queue", "decoder"}


# --- rebuilding a session from a snapshot and its logged chunks ---------------------------------


def _scripted_inputs(sids, ticks):
    """Chunks with typed text, background updates and forced controls at fixed ticks."""
    for k in ticks:
        chunks = _chunks(sids, k, text="what about tomorrow" if k % 9 == 4 else "")
        for c in chunks:
            if k % 7 == 3:
                c.updates = [f"result {k} for {c.session_id}", "and more"]
            if k % 11 in (5, 6):
                c.forced = "speak"
        yield k, chunks


def test_a_session_rebuilt_from_a_snapshot_and_its_chunks_goes_on_exactly():
    """A, B, C stepped 30 ticks; A's state exported at tick 12; A rebuilt in a second engine
    (beside a live D, which the rebuild neither steps nor touches) from that snapshot and the
    chunks 13..29 after a trip through the log's Arrow form, and again from no snapshot (all
    its chunks): from tick 30 on, A's outputs are those of the A that never left."""
    src = _engine(max_sessions=4, sessions=("a", "b", "c"))
    logged, outs_a = [], {}
    snapshot = None
    for k, chunks in _scripted_inputs(["a", "b", "c"], range(30)):
        outs = step_ok(src, chunks)
        logged.append(chunks[0])
        outs_a[k] = outs[0]
        if k == 12:
            snapshot = pickle.loads(pickle.dumps(src.export_session("a")))
    assert any(c.updates for c in logged[13:]) and any(c.forced for c in logged[13:]) and any(c.text for c in logged[13:])
    logged = from_table(to_batch(logged))  # what the log gives back
    assert [c.updates for c in logged] == [c.updates for c in _scripted_inputs_a(30)]

    from_snapshot, from_start = _engine(sessions=("d",)), _engine(sessions=("d",))
    for eng in (from_snapshot, from_start):
        step_ok(eng, _chunks(["d"], 0))
    d_before = {name: t.clone() for name, t in from_snapshot.rows.of(0).items()}
    replayed = _rebuild(from_snapshot, "a", snapshot, chunks=logged[13:])
    assert from_snapshot.sessions == ["d", "a"]
    assert all(torch.equal(d_before[name], t) for name, t in from_snapshot.rows.of(0).items())
    assert [o.seq for o in replayed] == list(range(13, 30))
    for o in replayed:
        _same(o, outs_a[o.seq], lsb=FLOAT_LSB)
    replayed = _rebuild(from_start, "a", None, chunks=logged)
    assert [o.seq for o in replayed] == list(range(30))
    for o in replayed:
        _same(o, outs_a[o.seq], lsb=FLOAT_LSB)

    for k, chunks in _scripted_inputs(["a", "b", "c"], range(30, 46)):
        ref = step_ok(src, chunks)[0]
        for eng in (from_snapshot, from_start):
            got = {o.session_id: o for o in step_ok(eng, [chunks[0], *_chunks(["d"], k - 29)])}
            _same(got["a"], ref, lsb=FLOAT_LSB)
    assert torch.equal(src.rows["prev_codes"][0], from_snapshot.rows["prev_codes"][1])
    assert src.export_session("a")["session"] == from_start.export_session("a")["session"]


def _rebuild(engine, session_id, state, chunks=()):
    """What a resuming interaction actor does (`actors.interaction.migration`): replay the logged
    chunks from the snapshot, then import the state they reach."""
    rebuilt, outs = engine.replay(session_id, state, None, chunks)
    engine.import_session(session_id, rebuilt)
    return outs


def _scripted_inputs_a(n):
    return [chunks[0] for _, chunks in _scripted_inputs(["a"], range(n))]


def test_rebuild_refuses_what_does_not_follow_and_changes_nothing():
    eng = _engine(sessions=("a",))
    for k in range(3):
        step_ok(eng, _chunks(["a"], k))
    state = eng.export_session("a")
    dst = _engine(sessions=())
    with pytest.raises(ProtocolError, match="not after 2"):
        _rebuild(dst, "a", state, chunks=_chunks(["a"], 2))
    with pytest.raises(ProtocolError, match="its own"):
        _rebuild(dst, "a", state, chunks=_chunks(["b"], 3))
    with pytest.raises(ProtocolError, match="not after 4"):
        _rebuild(dst, "a", None, chunks=[*_chunks(["a"], 4), *_chunks(["a"], 4)])
    assert dst.sessions == []
    _rebuild(dst, "a", state, chunks=_chunks(["a"], 3))
    with pytest.raises(ProtocolError, match="already exists"):
        _rebuild(dst, "a", state)
    assert dst.export_session("a")["session"]["last_seq"] == 3


def test_a_forward_seq_gap_is_accepted_and_the_skipped_ticks_are_absent():
    """Ticks 3 and 4 skipped: the session's history holds ticks 0-2 then 5, as if chunk 5 had
    been its fourth; a seq that is not after the last is refused; a refused chunk at a forward
    seq is stepped as missing at its own seq."""
    gap, dense = _engine(), _engine()
    chunks = _chunks(["a"], 0) + _chunks(["a"], 1) + _chunks(["a"], 2) + _chunks(["a"], 5) + _chunks(["a"], 6)
    for i, c in enumerate(chunks):
        o1 = step_ok(gap, [c])[0]
        o2 = step_ok(dense, [InputChunk("a", i, c.t_start, c.audio, frame=c.frame)])[0]
        assert o1.seq == c.seq
        assert (o1.text, o1.controls) == (o2.text, o2.controls) and np.array_equal(o1.audio, o2.audio)
    _, errors = gap.step(_chunks(["a"], 6))
    assert "seq 6 out of order, expected 7 or later" in str(errors["a"])
    bad = _chunks(["a"], 9)[0]
    bad.frame = np.zeros((40, 40, 3), np.uint8)
    outs, errors = gap.step([bad])
    assert errors["a"].code == "invalid_frame" and outs[0].seq == 9


def test_updates_in_a_chunk_enter_as_push_update_before_the_step_does():
    pushed, carried = _engine(cls=TracingEngine), _engine(cls=TracingEngine)
    for k in range(6):
        c1, c2 = _chunks(["a"], k, text="hi" if k == 1 else ""), _chunks(["a"], k, text="hi" if k == 1 else "")
        if k == 1:
            pushed.push_update("a", "sunny")
            c2[0].updates = ["sunny"]
        _same(step_ok(pushed, c1)[0], step_ok(carried, c2)[0])
    assert [t["inputs"].bg_ids for t in pushed.trace["a"]] == [t["inputs"].bg_ids for t in carried.trace["a"]]
    assert carried.trace["a"][1]["inputs"].bg_ids[0][0] == carried.tokenizer.bg_id

    full = _engine(sessions=("a",))  # a chunk whose updates do not all fit is refused whole
    while len(full.export_session("a")["session"]["bg_queue"]) + 2 * 4098 <= full.cfg.max_queued_tokens:
        full.push_update("a", "x" * 4096)
    queued = len(full.export_session("a")["session"]["bg_queue"])
    big = _chunks(["a"], 0, text="lost with it")[0]
    big.updates = ["y" * 100, "x" * 4096, "x" * 4096]
    outs, errors = full.step([big])
    assert errors["a"].code == "queue_full" and outs[0].seq == 0
    state = full.export_session("a")["session"]
    assert len(state["bg_queue"]) == queued - full.cfg.bg_per_tick and state["text_queue"] == []


def test_onset_margin_holds_a_quiet_session_but_not_a_speaking_one(monkeypatch):
    """"speak" ahead of "silent" by 1 logit: without a margin a quiet session starts speaking;
    with a margin of 2 it holds; once speaking (here: asked to) the margin no longer applies."""
    quiet = np.zeros(200 * 16, np.int16)

    def engine(margin):
        eng = StreamingEngine("tiny", max_sessions=1, onset_margin=margin)
        real = eng.model.predict

        def leaning(h):
            _, text = real(h)
            ctrl = torch.full((h.shape[0], len(CONTROLS)), -5.0)
            ctrl[:, CONTROLS.index("silent")], ctrl[:, CONTROLS.index("speak")] = 0.0, 1.0
            return ctrl, text

        monkeypatch.setattr(eng.model, "predict", leaning)
        eng.add_session("a")
        return eng

    def step(eng, k, forced=None):
        return step_ok(eng, [InputChunk("a", k, k * 0.2, quiet, forced=forced)])[0].controls[0]

    eager, patient = engine(0.0), engine(2.0)
    assert [step(eager, k) for k in range(3)] == ["speak"] * 3
    assert [step(patient, k) for k in range(3)] == ["silent"] * 3
    assert step(patient, 3, forced="speak") == "speak"
    assert [step(patient, k) for k in range(4, 6)] == ["speak"] * 2  # speaking: the margin is not in the way

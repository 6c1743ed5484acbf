"""StreamingEngine.step: one output per chunk, batch invariance under sampling, bad input stepped as missing,
forward seq gaps, forced controls and the onset margin, text in and out, RoPE far in."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from models.engine import StreamingEngine
from protocols.chunks import CONTROLS, InputChunk, OutputChunk, ProtocolError
from tests.models.helpers import FLOAT_LSB, TracingEngine, assert_same, build_engine, chunks_at, make_chunk, step_ok


def test_step_outputs_one_chunk_per_input_in_order():
    eng = build_engine(sessions=("a", "b", "c"))
    assert eng.tick_ms == 200 and eng.max_sessions == 4
    outs = step_ok(eng, chunks_at(["c", "a", "b"], 0))
    assert [o.session_id for o in outs] == ["c", "a", "b"]
    for o in outs:
        assert isinstance(o, OutputChunk) and o.seq == 0 and o.step_ms > 0
        assert o.audio.dtype == np.int16 and o.audio.shape == (3200,)
        assert len(o.controls) == 1 and o.controls[0] in CONTROLS


def test_rope_stays_exact_hundreds_of_thousands_of_positions_in():
    """With no sinks, attention only sees relative positions: the same session started at
    position 0 or at position 400,000 must give the same outputs (float32 RoPE angles would not)."""
    near, far = build_engine(n_sink=0), build_engine(n_sink=0)
    with torch.inference_mode():
        far.rows["pos"][0] = 400_000
    for k in range(12):
        o1, o2 = step_ok(near, chunks_at(["a"], k))[0], step_ok(far, chunks_at(["a"], k))[0]
        assert_same(o1, o2, lsb=FLOAT_LSB)
    assert torch.equal(near.rows["prev_codes"][0], far.rows["prev_codes"][0])


def test_bad_input_is_reported_under_its_session_and_stepped_as_missing():
    """Each kind of bad chunk: the error names the session, that session steps as if its chunk
    were missing (its clock stays aligned), and every other session steps as if nothing happened."""
    eng, ref = build_engine(sessions=("a", "b", "c")), build_engine(sessions=("a", "b", "c"))
    for k in range(3):
        step_ok(eng, chunks_at(["a", "b", "c"], k))
        step_ok(ref, chunks_at(["a", "b", "c"], k))

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
        chunks = chunks_at(["a", "b", "c"], k)
        good_b = chunks[1]
        fix(chunks)
        outs, errors = eng.step(chunks)
        assert list(errors) == [key] and re.search(msg, str(errors[key])), (msg, errors)
        if key == "b" and fix is not twice:  # b's own chunk was refused: b stepped as missing
            b_as = InputChunk.silent("b", k, 0.0 if fix is absent else good_b.t_start, 3200)
        else:  # b's good chunk stands
            b_as = good_b
        expect = {o.session_id: o for o in step_ok(ref, [chunks_at(["a"], k)[0], b_as, chunks_at(["c"], k)[0]])}
        assert sorted(o.session_id for o in outs) == ["a", "b", "c"] and all(o.seq == k for o in outs)
        for o in outs:
            assert_same(o, expect[o.session_id])
    with pytest.raises(ProtocolError):  # the contract also holds at construction
        InputChunk("a", 0, 0.0, np.zeros((2, 1600), np.int16))  # not mono
    with pytest.raises(ProtocolError, match="unknown session"):
        eng.push_update("nobody", "x")


def test_outputs_come_for_good_chunks_first_then_for_sessions_stepped_as_missing():
    eng = build_engine(sessions=("a", "b", "c"))
    chunks = chunks_at(["a", "b", "c"], 0)
    chunks[1].frame = np.zeros((40, 40, 3), np.uint8)  # wrong size for this model
    outs, errors = eng.step(chunks)
    assert set(errors) == {"b"} and errors["b"].code == "invalid_frame"
    assert [o.session_id for o in outs] == ["a", "c", "b"]
    outs, errors = eng.step(chunks_at(["a", "b", "c"], 1))  # b is fine again
    assert not errors and len(outs) == 3
    outs, errors = eng.step(chunks_at(["a"], 2))  # absent sessions are stepped as missing
    assert set(errors) == {"b", "c"} and [o.seq for o in outs] == [2, 2, 2]


def test_text_queue_caps_tokens_per_tick_and_text_out_streams_utf8(monkeypatch):
    eng = build_engine(cls=TracingEngine)
    tk = eng.tokenizer
    step_ok(eng, [make_chunk("a", 0, 0, text="abcdefghij")])  # 12 tokens with TXT/EOT, 4 a tick
    eng.push_update("a", "xy")
    for k in range(1, 4):
        step_ok(eng, chunks_at(["a"], k))
    trace = eng.trace["a"]
    assert [t["inputs"].text_ids[0] for t in trace] == [[tk.txt_id, 97, 98, 99], [100, 101, 102, 103], [104, 105, 106, tk.eot_id], []]
    assert [t["inputs"].bg_ids[0] for t in trace] == [[], [tk.bg_id, 120, 121], [tk.eot_id], []]

    plan = [([0x68, 0xC3, tk.eot_id, 0x41], "speak"), ([0xA9, 0x21, tk.pad_id, tk.pad_id], "yield")]
    monkeypatch.setattr(eng.model, "predict", _scripted(eng, plan))
    o1, o2 = step_ok(eng, chunks_at(["a"], 4))[0], step_ok(eng, chunks_at(["a"], 5))[0]
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
    alone, crowd = build_engine(), build_engine(sessions=("a", "b"))
    alone.temperature = crowd.temperature = 1.5
    controls = []
    for k in range(6):
        o1 = step_ok(alone, chunks_at(["a"], k))[0]
        o2 = step_ok(crowd, chunks_at(["a", "b"], k))[0]
        assert_same(o1, o2, lsb=FLOAT_LSB)
        controls.append(o1.controls[0])
    assert len(set(controls)) > 1  # sampling at temperature 1.5 over random logits varies


def test_silent_control_means_silence():
    eng = build_engine()
    eng.temperature = 2.0  # an untrained model's greedy control hardly varies
    outs = [step_ok(eng, chunks_at(["a"], k))[0] for k in range(30)]
    ctrl = [o.controls[0] for o in outs]
    assert "silent" in ctrl and len(set(ctrl)) > 1
    for prev, o in zip(outs, outs[1:]):
        if o.controls == ["silent"] and prev.controls == ["silent"]:  # no overlap tail from speech
            assert not o.audio.any()
        if o.controls != ["silent"]:
            assert o.audio.any()
    loud = StreamingEngine(eng.model, max_sessions=1, mute_when_silent=False)
    loud.add_session("a")
    assert all(step_ok(loud, chunks_at(["a"], k))[0].audio.any() for k in range(5))


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


def test_a_forward_seq_gap_is_accepted_and_the_skipped_ticks_are_absent():
    """Ticks 3 and 4 skipped: the session's history holds ticks 0-2 then 5, as if chunk 5 had
    been its fourth; a seq that is not after the last is refused; a refused chunk at a forward
    seq is stepped as missing at its own seq."""
    gap, dense = build_engine(), build_engine()
    chunks = chunks_at(["a"], 0) + chunks_at(["a"], 1) + chunks_at(["a"], 2) + chunks_at(["a"], 5) + chunks_at(["a"], 6)
    for i, c in enumerate(chunks):
        o1 = step_ok(gap, [c])[0]
        o2 = step_ok(dense, [InputChunk("a", i, c.t_start, c.audio, frame=c.frame)])[0]
        assert o1.seq == c.seq
        assert (o1.text, o1.controls) == (o2.text, o2.controls) and np.array_equal(o1.audio, o2.audio)
    _, errors = gap.step(chunks_at(["a"], 6))
    assert "seq 6 out of order, expected 7 or later" in str(errors["a"])
    bad = chunks_at(["a"], 9)[0]
    bad.frame = np.zeros((40, 40, 3), np.uint8)
    outs, errors = gap.step([bad])
    assert errors["a"].code == "invalid_frame" and outs[0].seq == 9


def test_updates_in_a_chunk_enter_as_push_update_before_the_step_does():
    pushed, carried = build_engine(cls=TracingEngine), build_engine(cls=TracingEngine)
    for k in range(6):
        c1, c2 = chunks_at(["a"], k, text="hi" if k == 1 else ""), chunks_at(["a"], k, text="hi" if k == 1 else "")
        if k == 1:
            pushed.push_update("a", "sunny")
            c2[0].updates = ["sunny"]
        assert_same(step_ok(pushed, c1)[0], step_ok(carried, c2)[0])
    assert [t["inputs"].bg_ids for t in pushed.trace["a"]] == [t["inputs"].bg_ids for t in carried.trace["a"]]
    assert carried.trace["a"][1]["inputs"].bg_ids[0][0] == carried.tokenizer.bg_id

    full = build_engine(sessions=("a",))  # a chunk whose updates do not all fit is refused whole
    while len(full.export_session("a")["session"]["bg_queue"]) + 2 * 4098 <= full.cfg.max_queued_tokens:
        full.push_update("a", "x" * 4096)
    queued = len(full.export_session("a")["session"]["bg_queue"])
    big = chunks_at(["a"], 0, text="lost with it")[0]
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

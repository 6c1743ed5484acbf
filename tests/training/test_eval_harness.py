"""The VAD harness on a scripted dialogue: it endpoints ~0.5 s after the user stops, barges in, and
never looks ahead; a scripted turn runs through its yield."""

from __future__ import annotations

import numpy as np
import pytest

from training import data
from training.dialogues import generate
from training.eval_harness import run_harness, scripted_turn
from training.eval_metrics import first_takeover, interruption, speech_segments


@pytest.fixture(scope="module")
def interruption_session(synth, tmp_path_factory):
    d = generate(1000002, "interruption", "heldout", synth=synth)
    return data.read(data.save(d, tmp_path_factory.mktemp("dialogue")))


def test_harness_endpoints_half_a_second_after_the_user_and_barges_in(interruption_session):
    s = interruption_session
    labels = s.labels
    run = run_harness(s)
    question_end = labels["events"][0]["t"]
    onset = next(e for e in labels["events"] if e["type"] == "interruption")["t"]
    endpoints, barge_ins = run.notes["endpoints"], run.notes["barge_ins"]
    assert 0.45 <= endpoints[0] - question_end <= 0.75, (endpoints, question_end)
    assert len(barge_ins) == 1 and 0.0 <= barge_ins[0] - onset <= 0.3, (barge_ins, onset)

    segs = speech_segments(run.audio)
    # It answers the question from the tick after the endpoint, in the model's voice.
    first = first_takeover(segs, question_end, onset)
    assert first is not None and endpoints[0] <= first[0] <= endpoints[0] + s.tick_ms / 1000 + 0.25
    # It is cut off from the tick after the barge-in: that tick and the next play silence.
    k = int(barge_ins[0] // (s.tick_ms / 1000))
    n = len(s.inputs[0].audio)
    assert not run.audio[(k + 1) * n:(k + 2) * n].any()
    r = interruption(segs, onset, labels["events"][1]["user_end"], labels["duration_s"])
    assert r["speaking"] and r["stop_latency_s"] <= 0.45
    # Then it endpoints again and answers the interruption.
    assert endpoints[-1] > labels["events"][1]["user_end"] and run.transcript(endpoints[-1], labels["duration_s"])


def test_harness_is_causal(interruption_session):
    """Its output for the first k ticks does not change when the dialogue stops at tick k."""
    s = interruption_session
    full = run_harness(s)
    k = 40
    cut = data.Session(s.inputs[:k], s.outputs[:k], s.updates, s.labels, s.tick_ms)
    part = run_harness(cut)
    n = len(s.inputs[0].audio)
    assert np.array_equal(part.audio, full.audio[:(k + 1) * n]) and part.text == full.text[:k]


def test_scripted_turn_runs_through_the_yield(interruption_session):
    s = interruption_session
    turn = s.labels["model_turns"][0]
    ticks = scripted_turn(s, turn["first_tick"])
    controls = [o.controls[0] for o in s.outputs[turn["first_tick"]:turn["first_tick"] + len(ticks)]]
    assert controls[-1] == "yield" and set(controls[:-1]) == {"speak"}
    assert "".join(t for _, t in ticks).strip().startswith(turn["text"].split()[0])

"""The evaluation: each metric on hand-built segments and audio, the VAD harness on a scripted
dialogue (endpoints ~0.5 s after the user stops, barges in, never looks ahead), and a tiny eval
of two held-out dialogues end to end through `interplay eval`."""

from __future__ import annotations

import json
import zlib

import numpy as np
import pytest

from deployments.cli import main as cli_main
from protocols.chunks import SAMPLE_RATE
from training import data
from training import evaluate as ev
from training.dialogues import generate
from training.generate import generate_set
from training.voices import Synth, Voice


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return Synth(tmp_path_factory.mktemp("cache"))


# ---- segments ----

def test_merge_closes_gaps_under_half_a_second():
    assert ev.merge([(3.0, 4.0), (0.0, 1.0), (1.3, 2.0)]) == [(0.0, 2.0), (3.0, 4.0)]
    assert ev.merge([(0.0, 1.0), (1.5, 2.0)]) == [(0.0, 1.0), (1.5, 2.0)]  # exactly 0.5 s apart: two
    assert ev.merge([(0.0, 2.0), (0.5, 1.0)]) == [(0.0, 2.0)]


def test_speech_segments_find_known_spans(synth):
    """Two phrases placed at known times in 8 s of faint noise: VAD finds each within 0.1 s."""
    rng = np.random.default_rng(0)
    audio = rng.normal(0, 30, 8 * SAMPLE_RATE)
    spans = []
    for at, text in ((1.0, "This is the first sentence I say."), (5.0, "And here is another one.")):
        sp = synth.render(text, Voice("en-us", None, 160, 50, 50))
        i = int(at * SAMPLE_RATE)
        audio[i:i + len(sp.audio)] += sp.audio
        spans.append((at + sp.start, at + sp.end))
    segs = ev.speech_segments(np.clip(audio, -32768, 32767).astype(np.int16))
    assert len(segs) == 2
    for (a, b), (ta, tb) in zip(segs, spans):
        assert abs(a - ta) < 0.1 and abs(b - tb) < 0.1
    assert ev.speech_segments(np.zeros(4 * SAMPLE_RATE, np.int16)) == []


# ---- metrics on hand-built segments ----

def test_pause_takeover_needs_a_second_of_speech_starting_in_the_pause():
    assert ev.pause_takeover([(2.0, 3.5)], 1.5, 3.0)
    assert not ev.pause_takeover([(2.0, 2.6)], 1.5, 3.0)  # a blip
    assert not ev.pause_takeover([(0.5, 2.5)], 1.5, 3.0)  # already speaking before the pause
    assert not ev.pause_takeover([(3.1, 5.0)], 1.5, 3.0)  # after the user resumed
    assert not ev.pause_takeover([], 1.5, 3.0)


def test_turn_taking_rate_and_latency():
    assert ev.turn_taking([(5.3, 7.0)], 3.0, 5.0, 8.0) == (True, pytest.approx(0.3))
    assert ev.turn_taking([(4.6, 7.0)], 3.0, 5.0, 8.0) == (True, 0.0)  # early start: latency clamped to 0
    assert ev.turn_taking([(5.3, 5.9)], 3.0, 5.0, 8.0) == (False, None)  # too short
    assert ev.turn_taking([(8.2, 10.0)], 3.0, 5.0, 8.0) == (False, None)  # after the window
    assert ev.turn_taking([(3.5, 4.8), (5.3, 7.0)], 3.0, 5.0, 8.0) == (True, pytest.approx(0.3))  # talked over the user, then replied
    assert ev.turn_taking([(1.0, 2.5)], 3.0, 5.0, 8.0) == (False, None)


def test_interruption_stop_latency_and_takeover():
    r = ev.interruption([(1.0, 6.35), (7.5, 9.0)], 6.0, 7.0, 9.0)
    assert r["speaking"] and r["stop_latency_s"] == pytest.approx(0.35)
    assert r["takeover"] and r["response_latency_s"] == pytest.approx(0.5)
    r = ev.interruption([(1.0, 9.0)], 6.0, 7.0, 9.0)  # talked right through it
    assert r["stop_latency_s"] == pytest.approx(3.0) and not r["takeover"]
    r = ev.interruption([(7.2, 7.6)], 6.0, 7.0, 9.0)  # silent, then a blip
    assert not r["speaking"] and r["stop_latency_s"] is None and not r["takeover"]
    r = ev.interruption([(1.0, 5.95)], 6.0, 7.0, 9.0)  # stopped just before the onset: speaking, latency 0
    assert r["speaking"] and r["stop_latency_s"] == 0.0


def test_backchannel_takeover_unless_it_speaks_through():
    assert not ev.backchannel_takeover([(1.0, 9.0)], 4.0, 4.4)["takeover"]
    assert ev.backchannel_takeover([(1.0, 4.3), (5.0, 9.0)], 4.0, 4.4)["takeover"]  # stopped 0.7 s
    assert ev.backchannel_takeover([(1.0, 4.7)], 4.0, 4.4)["takeover"]  # ended 0.3 s after it
    r = ev.backchannel_takeover([], 4.0, 4.4)
    assert r["takeover"] and not r["speaking"]


def test_timing_within_a_second():
    assert ev.timing_hit([(0.5, 1.0), (10.5, 12.0)], 10.0)
    assert ev.timing_hit([(9.1, 9.6)], 10.0)
    assert not ev.timing_hit([(10.5, 12.0)], 12.0)  # started 1.5 s early
    assert not ev.timing_hit([(5.0, 12.0)], 10.0)  # speaking all along is no answer
    assert not ev.timing_hit([], 10.0)


def test_count_in_transcripts():
    assert ev.count_in("The ball bounced three times.") == 3
    assert ev.count_in("It spun twice.") == 2
    assert ev.count_in("It moved once.") == 1
    assert ev.count_in("it jumped 4 times") == 4
    assert ev.count_in("I see three balls") is None
    assert ev.count_in("") is None
    assert ev.count_in("The star flashed five times, not six times.") == 5


LABELS = {
    "duration_s": 30.0,
    "user_utterances": [
        {"start": 0.5, "end": 2.0, "kind": "turn"},
        {"start": 3.5, "end": 5.0, "kind": "turn"},  # after a pause [2.0, 3.5]
        {"start": 9.0, "end": 9.4, "kind": "backchannel"},
        {"start": 12.0, "end": 13.0, "kind": "interruption"},
        {"start": 16.0, "end": 17.0, "kind": "question"},
    ],
    "events": [
        {"type": "pause", "start": 2.0, "end": 3.5},
        {"type": "turn_end", "t": 5.0},
        {"type": "backchannel", "start": 9.0, "end": 9.4},
        {"type": "interruption", "t": 12.0, "user_end": 13.0},
        {"type": "turn_end", "t": 13.0},
        {"type": "count", "count": 3, "question_end": 17.0},
        {"type": "turn_end", "t": 17.0},
        {"type": "timer", "target_t": 25.0},
    ],
}


def _run(texts: dict[float, str], tick_s: float = 0.2, duration: float = 30.0) -> ev.Run:
    text = [""] * int(duration / tick_s)
    for t, s in texts.items():
        text[int(round(t / tick_s)) - 1] = s  # output k plays from (k + 1) * tick
    return ev.Run(np.zeros(1, np.int16), text, tick_s)


def test_score_and_summarize_a_hand_built_dialogue():
    # Replies 0.4 s after the turn (through the backchannel), stops 0.3 s into the interruption,
    # answers it 0.6 s after, answers the count 0.2 s after, and speaks 0.5 s after the timer's moment.
    segs = [(5.4, 12.3), (13.6, 15.0), (17.2, 19.0), (25.5, 26.6)]
    run = _run({17.2: "It ", 17.4: "flas", 17.6: "hed ", 17.8: "thre", 18.0: "e ti", 18.2: "mes."})
    res = ev.score_dialogue(LABELS, segs, run)
    assert res["counting"][0]["said"] == "It flashed three times." and res["counting"][0]["right"]
    m = ev.summarize([res])
    assert m["pause"] == {"takeover_rate": 0.0, "n": 1}
    assert m["turn_taking"]["takeover_rate"] == 1.0 and m["turn_taking"]["latency_s"] == pytest.approx((0.4 + 0.6 + 0.2) / 3)
    assert m["turn_taking"]["latency_median_s"] == pytest.approx(0.4)
    assert m["interruption"]["stop_latency_median_s"] == pytest.approx(0.3)
    assert m["interruption"]["stop_latency_s"] == pytest.approx(0.3) and m["interruption"]["takeover_rate"] == 1.0
    assert m["interruption"]["response_latency_s"] == pytest.approx(0.6) and m["interruption"]["n_speaking"] == 1
    assert m["backchannel"]["takeover_rate"] == 0.0
    assert m["timing"]["score"] == 1.0 and m["counting"]["score"] == 1.0

    # Takes over in the pause, stops at the backchannel, says the wrong count, never keeps time.
    segs = [(2.6, 4.0), (5.3, 9.2), (9.9, 11.0), (17.2, 19.0)]
    res = ev.score_dialogue(LABELS, segs, _run({17.4: "twice"}))
    m = ev.summarize([res])
    assert m["pause"]["takeover_rate"] == 1.0
    assert m["backchannel"]["takeover_rate"] == 1.0
    assert m["interruption"]["n_speaking"] == 0 and m["interruption"]["stop_latency_s"] is None
    assert m["turn_taking"]["takeover_rate"] == pytest.approx(2 / 3)  # no reply after the interruption
    assert m["timing"]["score"] == 0.0 and m["counting"]["score"] == 0.0


# ---- the harness ----

@pytest.fixture(scope="module")
def interruption_session(synth, tmp_path_factory):
    d = generate(1000002, "interruption", "heldout", synth=synth)
    return data.read(data.save(d, tmp_path_factory.mktemp("dialogue")))


def test_harness_endpoints_half_a_second_after_the_user_and_barges_in(interruption_session):
    s = interruption_session
    labels = s.labels
    run = ev.run_harness(s)
    question_end = labels["events"][0]["t"]
    onset = next(e for e in labels["events"] if e["type"] == "interruption")["t"]
    endpoints, barge_ins = run.notes["endpoints"], run.notes["barge_ins"]
    assert 0.45 <= endpoints[0] - question_end <= 0.75, (endpoints, question_end)
    assert len(barge_ins) == 1 and 0.0 <= barge_ins[0] - onset <= 0.3, (barge_ins, onset)

    segs = ev.speech_segments(run.audio)
    # It answers the question from the tick after the endpoint, in the model's voice.
    first = ev.first_takeover(segs, question_end, onset)
    assert first is not None and endpoints[0] <= first[0] <= endpoints[0] + s.tick_ms / 1000 + 0.25
    # It is cut off from the tick after the barge-in: that tick and the next play silence.
    k = int(barge_ins[0] // (s.tick_ms / 1000))
    n = len(s.inputs[0].audio)
    assert not run.audio[(k + 1) * n:(k + 2) * n].any()
    r = ev.interruption(segs, onset, labels["events"][1]["user_end"], labels["duration_s"])
    assert r["speaking"] and r["stop_latency_s"] <= 0.45
    # Then it endpoints again and answers the interruption.
    assert endpoints[-1] > labels["events"][1]["user_end"] and run.transcript(endpoints[-1], labels["duration_s"])


def test_harness_is_causal(interruption_session):
    """Its output for the first k ticks does not change when the dialogue stops at tick k."""
    s = interruption_session
    full = ev.run_harness(s)
    k = 40
    cut = data.Session(s.inputs[:k], s.outputs[:k], s.updates, s.labels, s.tick_ms)
    part = ev.run_harness(cut)
    n = len(s.inputs[0].audio)
    assert np.array_equal(part.audio, full.audio[:(k + 1) * n]) and part.text == full.text[:k]


def test_scripted_turn_runs_through_the_yield(interruption_session):
    s = interruption_session
    turn = s.labels["model_turns"][0]
    ticks = ev.scripted_turn(s, turn["first_tick"])
    controls = [o.controls[0] for o in s.outputs[turn["first_tick"]:turn["first_tick"] + len(ticks)]]
    assert controls[-1] == "yield" and set(controls[:-1]) == {"speak"}
    assert "".join(t for _, t in ticks).strip().startswith(turn["text"].split()[0])


# ---- end to end ----

def test_interplay_eval_two_heldout_dialogues(tmp_path, synth, capsys):
    generate_set(tmp_path / "synth", 0, 2, workers=0, cache_dir=synth.cache_dir.parent, progress=None)
    out, plot = tmp_path / "eval.json", tmp_path / "timeline.png"
    rc = cli_main(["eval", "--random", "--data", str(tmp_path / "synth" / "heldout"), "--out", str(out), "--plot", str(plot), "--threads", "1"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "pause handling: take-over rate" in printed and "harness" in printed
    result = json.loads(out.read_text())
    assert result["dialogues"] == 2 and result["model"] == "tiny (random weights)"
    assert set(result["metrics"]) == {"model", "harness", "script"}
    script, harness = result["metrics"]["script"], result["metrics"]["harness"]
    assert script["pause"]["n"] >= 1 and script["pause"]["takeover_rate"] == 0.0  # the data holds its pauses
    assert script["turn_taking"]["takeover_rate"] > 0.5 and script["turn_taking"]["latency_s"] < 0.6
    assert harness["turn_taking"]["takeover_rate"] > 0.5 and harness["turn_taking"]["latency_s"] > script["turn_taking"]["latency_s"]
    assert set(result["per_dialogue"]) == {"synth-h1000000-turn_end", "synth-h1000001-pause"}
    assert result["timeline"]["session_id"] == "synth-h1000001-pause"
    png = plot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and b"IEND" in png[-12:]


def test_write_png_round_trips(tmp_path):
    img = np.zeros((3, 4, 3), np.uint8)
    img[1, 2] = (10, 20, 30)
    ev.write_png(tmp_path / "x.png", img)
    b = (tmp_path / "x.png").read_bytes()
    i = b.index(b"IDAT")
    n = int.from_bytes(b[i - 4:i], "big")
    raw = np.frombuffer(zlib.decompress(b[i + 4:i + 4 + n]), np.uint8).reshape(3, 1 + 4 * 3)
    assert (raw[:, 0] == 0).all() and np.array_equal(raw[:, 1:].reshape(3, 4, 3), img)

"""The metrics: each on hand-built segments, speech segments found in known audio, and a hand-built
dialogue scored and summarized."""

from __future__ import annotations

import numpy as np
import pytest

from protocols.chunks import SAMPLE_RATE
from training.eval_metrics import (
    Run, backchannel_takeover, count_in, interruption, merge, pause_takeover, score_dialogue, speech_segments, summarize,
    timing_hit, turn_taking,
)
from training.voices import Voice


# ---- segments ----

def test_merge_closes_gaps_under_half_a_second():
    assert merge([(3.0, 4.0), (0.0, 1.0), (1.3, 2.0)]) == [(0.0, 2.0), (3.0, 4.0)]
    assert merge([(0.0, 1.0), (1.5, 2.0)]) == [(0.0, 1.0), (1.5, 2.0)]  # exactly 0.5 s apart: two
    assert merge([(0.0, 2.0), (0.5, 1.0)]) == [(0.0, 2.0)]


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
    segs = speech_segments(np.clip(audio, -32768, 32767).astype(np.int16))
    assert len(segs) == 2
    for (a, b), (ta, tb) in zip(segs, spans):
        assert abs(a - ta) < 0.1 and abs(b - tb) < 0.1
    assert speech_segments(np.zeros(4 * SAMPLE_RATE, np.int16)) == []


# ---- metrics on hand-built segments ----

def test_pause_takeover_needs_a_second_of_speech_starting_in_the_pause():
    assert pause_takeover([(2.0, 3.5)], 1.5, 3.0)
    assert not pause_takeover([(2.0, 2.6)], 1.5, 3.0)  # a blip
    assert not pause_takeover([(0.5, 2.5)], 1.5, 3.0)  # already speaking before the pause
    assert not pause_takeover([(3.1, 5.0)], 1.5, 3.0)  # after the user resumed
    assert not pause_takeover([], 1.5, 3.0)


def test_turn_taking_rate_and_latency():
    assert turn_taking([(5.3, 7.0)], 3.0, 5.0, 8.0) == (True, pytest.approx(0.3))
    assert turn_taking([(4.6, 7.0)], 3.0, 5.0, 8.0) == (True, 0.0)  # early start: latency clamped to 0
    assert turn_taking([(5.3, 5.9)], 3.0, 5.0, 8.0) == (False, None)  # too short
    assert turn_taking([(8.2, 10.0)], 3.0, 5.0, 8.0) == (False, None)  # after the window
    assert turn_taking([(3.5, 4.8), (5.3, 7.0)], 3.0, 5.0, 8.0) == (True, pytest.approx(0.3))  # talked over the user, then replied
    assert turn_taking([(1.0, 2.5)], 3.0, 5.0, 8.0) == (False, None)


def test_interruption_stop_latency_and_takeover():
    r = interruption([(1.0, 6.35), (7.5, 9.0)], 6.0, 7.0, 9.0)
    assert r["speaking"] and r["stop_latency_s"] == pytest.approx(0.35)
    assert r["takeover"] and r["response_latency_s"] == pytest.approx(0.5)
    r = interruption([(1.0, 9.0)], 6.0, 7.0, 9.0)  # talked right through it
    assert r["stop_latency_s"] == pytest.approx(3.0) and not r["takeover"]
    r = interruption([(7.2, 7.6)], 6.0, 7.0, 9.0)  # silent, then a blip
    assert not r["speaking"] and r["stop_latency_s"] is None and not r["takeover"]
    r = interruption([(1.0, 5.95)], 6.0, 7.0, 9.0)  # stopped just before the onset: speaking, latency 0
    assert r["speaking"] and r["stop_latency_s"] == 0.0


def test_backchannel_takeover_unless_it_speaks_through():
    assert not backchannel_takeover([(1.0, 9.0)], 4.0, 4.4)["takeover"]
    assert backchannel_takeover([(1.0, 4.3), (5.0, 9.0)], 4.0, 4.4)["takeover"]  # stopped 0.7 s
    assert backchannel_takeover([(1.0, 4.7)], 4.0, 4.4)["takeover"]  # ended 0.3 s after it
    r = backchannel_takeover([], 4.0, 4.4)
    assert r["takeover"] and not r["speaking"]


def test_timing_within_a_second():
    assert timing_hit([(0.5, 1.0), (10.5, 12.0)], 10.0)
    assert timing_hit([(9.1, 9.6)], 10.0)
    assert not timing_hit([(10.5, 12.0)], 12.0)  # started 1.5 s early
    assert not timing_hit([(5.0, 12.0)], 10.0)  # speaking all along is no answer
    assert not timing_hit([], 10.0)


def test_count_in_transcripts():
    assert count_in("The ball bounced three times.") == 3
    assert count_in("It spun twice.") == 2
    assert count_in("It moved once.") == 1
    assert count_in("it jumped 4 times") == 4
    assert count_in("I see three balls") is None
    assert count_in("") is None
    assert count_in("The star flashed five times, not six times.") == 5


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


def _run(texts: dict[float, str], tick_s: float = 0.2, duration: float = 30.0) -> Run:
    text = [""] * int(duration / tick_s)
    for t, s in texts.items():
        text[int(round(t / tick_s)) - 1] = s  # output k plays from (k + 1) * tick
    return Run(np.zeros(1, np.int16), text, tick_s)


def test_score_and_summarize_a_hand_built_dialogue():
    # Replies 0.4 s after the turn (through the backchannel), stops 0.3 s into the interruption,
    # answers it 0.6 s after, answers the count 0.2 s after, and speaks 0.5 s after the timer's moment.
    segs = [(5.4, 12.3), (13.6, 15.0), (17.2, 19.0), (25.5, 26.6)]
    run = _run({17.2: "It ", 17.4: "flas", 17.6: "hed ", 17.8: "thre", 18.0: "e ti", 18.2: "mes."})
    res = score_dialogue(LABELS, segs, run)
    assert res["counting"][0]["said"] == "It flashed three times." and res["counting"][0]["right"]
    m = summarize([res])
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
    res = score_dialogue(LABELS, segs, _run({17.4: "twice"}))
    m = summarize([res])
    assert m["pause"]["takeover_rate"] == 1.0
    assert m["backchannel"]["takeover_rate"] == 1.0
    assert m["interruption"]["n_speaking"] == 0 and m["interruption"]["stop_latency_s"] is None
    assert m["turn_taking"]["takeover_rate"] == pytest.approx(2 / 3)  # no reply after the interruption
    assert m["timing"]["score"] == 0.0 and m["counting"]["score"] == 0.0

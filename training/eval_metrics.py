"""The interaction metrics, Full-Duplex-Bench style, scored from a system's output audio alone.

All three are scored by the same code from their output audio: Silero VAD (the model shipped in the
`silero-vad` package) with its default segment settings, segments then merged across gaps under
`MERGE_GAP_S`. Times are on the dialogue's timeline; events come from the labels. Rules (FDB =
Full-Duplex-Bench v1; it judges a take-over from ASR word timings: no words, or under 1 s from the
first word's start to the last word's end with at most 3 words, is no take-over; here a
take-over is one merged speech segment of at least `TAKEOVER_S` instead, and the 3-word escape
is dropped, as no words are timed):
- pause handling (FDB): a take-over if a segment of >= 1 s starts inside the user's mid-turn
  pause; rate over pauses, lower is better.
- smooth turn-taking (FDB): a take-over if a segment of >= 1 s starts between the start of the
  user's last phrase and the user's next phrase (at most `REPLY_WINDOW_S` after the turn's end)
  and is still going at the end of the turn;
  latency = its start - the end of the user's speech, negative clamped to 0 (as FDB), averaged
  over take-overs.
- user interruption: stop latency = end of the segment playing at the user's onset - the onset,
  over interruptions the system was speaking at; take-over (FDB) if a segment of >= 1 s starts
  after the onset and before the user's next phrase (at most `REPLY_WINDOW_S` after the
  interruption; the system stopped, then answered); response
  latency = its start - the end of the interruption, clamped at 0.
- backchannel: the system held the floor if one segment covers the backchannel and goes on at
  least `HOLD_AFTER_S` past its end; otherwise a take-over (including not speaking at all when it
  came); lower is better. (FDB's backchannel task, where the user holds the floor, does not fit.)
- timing: a hit if a segment starts within +-`TIMING_TOL_S` of the requested moment.
- counting: right if the first count in the transcript of what played between the question's end
  and the user's next phrase ("once", "twice", "<n> times", digits or number words) is the count.
  The model's transcript is its streamed text; the harness's is the scripted text it replayed,

`score_dialogue` gives one system's per-event results in one dialogue (`Run`: its output audio
and text); `summarize` pools them over dialogues into the table's figures.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from protocols.chunks import SAMPLE_RATE

MERGE_GAP_S = 0.5  # speech segments closer than this are one
TAKEOVER_S = 1.0  # a take-over is at least this much speech
HOLD_AFTER_S = 0.5  # holding the floor through a backchannel: still speaking this long after it
TIMING_TOL_S = 1.0
REPLY_WINDOW_S = 4.0  # a reply must start this soon after the user's turn to count as taking it
SPEAKING_SLACK_S = 0.1  # speech ending this little before an onset still counts as speaking at it
VAD_WINDOW = 512  # Silero's window at 16 kHz (32 ms)
SYSTEMS = ("model", "harness", "script")  # script: the behaviour the data asks for, scored alike

Segments = list[tuple[float, float]]


# ---- speech segments ----

_VAD = None


def load_vad():
    """Silero VAD from the `silero-vad` package (the model file ships inside it)."""
    global _VAD
    if _VAD is None:
        from silero_vad import load_silero_vad

        _VAD = load_silero_vad()
    return _VAD


def merge(segments: Segments, gap: float = MERGE_GAP_S) -> Segments:
    """Sorted segments with gaps under `gap` closed."""
    out: list[list[float]] = []
    for a, b in sorted(segments):
        if out and a - out[-1][1] < gap:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def speech_segments(audio: np.ndarray, gap: float = MERGE_GAP_S) -> Segments:
    """Merged speech segments (s) of 16 kHz audio (int16 or float in [-1, 1]), Silero defaults."""
    import torch
    from silero_vad import get_speech_timestamps

    x = audio.astype(np.float32) / 32768.0 if audio.dtype == np.int16 else audio.astype(np.float32)
    if len(x) < VAD_WINDOW:
        return []
    ts = get_speech_timestamps(torch.from_numpy(np.ascontiguousarray(x)), load_vad(), sampling_rate=SAMPLE_RATE)
    return merge([(t["start"] / SAMPLE_RATE, t["end"] / SAMPLE_RATE) for t in ts], gap)


# ---- the metrics, on merged segments ----

def first_takeover(segments: Segments, lo: float, hi: float, min_s: float = TAKEOVER_S, ends_after: float | None = None):
    """The first segment of at least `min_s` starting in [lo, hi) (and ending after `ends_after`), or None."""
    for a, b in segments:
        if lo <= a < hi and b - a >= min_s and (ends_after is None or b > ends_after):
            return a, b
    return None


def speaking_at(segments: Segments, t: float, slack: float = SPEAKING_SLACK_S):
    """The segment playing at time t (or ending less than `slack` before it), or None."""
    return next(((a, b) for a, b in segments if a <= t < b + slack), None)


def pause_takeover(segments: Segments, start: float, end: float) -> bool:
    return first_takeover(segments, start, end) is not None


def turn_taking(segments: Segments, turn_start: float, turn_end: float, hi: float) -> tuple[bool, float | None]:
    """(took the turn, latency s) for a user turn ending at `turn_end` whose last phrase began at
    `turn_start`, with the user's next phrase at `hi`."""
    seg = first_takeover(segments, turn_start, hi, ends_after=turn_end)
    return (False, None) if seg is None else (True, max(0.0, seg[0] - turn_end))


def interruption(segments: Segments, onset: float, user_end: float, hi: float) -> dict:
    """Stop latency (None when not speaking at the onset), take-over and response latency."""
    playing = speaking_at(segments, onset)
    seg = first_takeover(segments, onset + 1e-6, hi)
    return {"speaking": playing is not None, "stop_latency_s": None if playing is None else max(0.0, playing[1] - onset),
            "takeover": seg is not None, "response_latency_s": None if seg is None else max(0.0, seg[0] - user_end)}


def backchannel_takeover(segments: Segments, start: float, end: float) -> dict:
    held = any(a <= start and b >= end + HOLD_AFTER_S for a, b in segments)
    return {"speaking": speaking_at(segments, start) is not None, "takeover": not held}


def timing_hit(segments: Segments, target: float, tol: float = TIMING_TOL_S) -> bool:
    return any(abs(a - target) <= tol for a, _ in segments)


_NUMBERS = {w: i for i, w in enumerate("zero one two three four five six seven eight nine ten eleven twelve thirteen "
                                       "fourteen fifteen sixteen seventeen eighteen nineteen twenty".split())}


def count_in(text: str) -> int | None:
    """The first count said: "once", "twice", "<n> time(s)" with n a digit string or a number word."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    for i, w in enumerate(words):
        if w in ("once", "twice"):
            return 1 if w == "once" else 2
        if w in ("thrice",):
            return 3
        n = int(w) if w.isdigit() else _NUMBERS.get(w)
        if n is not None and i + 1 < len(words) and words[i + 1] in ("time", "times"):
            return n
    return None


# ---- one dialogue's outputs, and its score ----

@dataclass
class Run:
    """What a system did in one dialogue: its channel in real time (a tick of silence, then its
    output for every tick) and the text of each output tick."""

    audio: np.ndarray
    text: list[str]
    tick_s: float
    notes: dict = field(default_factory=dict)

    def transcript(self, lo: float, hi: float) -> str:
        """Text of the output ticks that started playing in [lo, hi)."""
        return "".join(t for k, t in enumerate(self.text) if lo <= (k + 1) * self.tick_s < hi)


def next_user_start(labels: dict, t: float) -> float:
    return min((u["start"] for u in labels["user_utterances"] if u["start"] > t + 1e-6), default=labels["duration_s"])


def reply_window(labels: dict, t: float) -> float:
    """Where a reply to a user turn ending at t must have started: the user's next phrase, at most REPLY_WINDOW_S on."""
    return min(next_user_start(labels, t), t + REPLY_WINDOW_S)


def score_dialogue(labels: dict, segments: Segments, run: Run) -> dict[str, list[dict]]:
    """Per-event results, by metric, for one system's merged segments in one dialogue."""
    out: dict[str, list[dict]] = {k: [] for k in ("pause", "turn_taking", "interruption", "backchannel", "timing", "counting")}
    utts = labels["user_utterances"]
    for e in labels["events"]:
        kind = e["type"]
        if kind == "pause":
            out["pause"].append({"start": e["start"], "end": e["end"], "takeover": pause_takeover(segments, e["start"], e["end"])})
        elif kind == "turn_end":
            t = e["t"]
            last = min(utts, key=lambda u: abs(u["end"] - t))
            took, lat = turn_taking(segments, last["start"], t, reply_window(labels, t))
            out["turn_taking"].append({"t": t, "takeover": took, "latency_s": lat})
        elif kind == "interruption":
            r = interruption(segments, e["t"], e["user_end"], reply_window(labels, e["user_end"]))
            out["interruption"].append({"t": e["t"], **r})
        elif kind == "backchannel":
            out["backchannel"].append({"start": e["start"], **backchannel_takeover(segments, e["start"], e["end"])})
        elif kind == "timer":
            out["timing"].append({"target_t": e["target_t"], "hit": timing_hit(segments, e["target_t"])})
        elif kind == "count":
            said = run.transcript(e["question_end"], next_user_start(labels, e["question_end"]))
            n = count_in(said)
            out["counting"].append({"count": e["count"], "said": said, "heard": n, "right": n == e["count"]})
    return out


def _mean(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


def _median(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return float(np.median(xs)) if xs else None


def summarize(results: list[dict[str, list[dict]]]) -> dict:
    """Pool per-event results over dialogues into the table's figures."""
    ev = {k: [r for res in results for r in res.get(k, [])] for k in ("pause", "turn_taking", "interruption", "backchannel", "timing", "counting")}
    tt, it, bc = ev["turn_taking"], ev["interruption"], ev["backchannel"]
    return {
        "pause": {"takeover_rate": _mean([r["takeover"] for r in ev["pause"]]), "n": len(ev["pause"])},
        "turn_taking": {"takeover_rate": _mean([r["takeover"] for r in tt]), "latency_s": _mean([r["latency_s"] for r in tt]),
                        "latency_median_s": _median([r["latency_s"] for r in tt]), "n": len(tt)},
        "interruption": {"takeover_rate": _mean([r["takeover"] for r in it]), "stop_latency_s": _mean([r["stop_latency_s"] for r in it]),
                         "stop_latency_median_s": _median([r["stop_latency_s"] for r in it]),
                         "response_latency_s": _mean([r["response_latency_s"] for r in it]), "n": len(it),
                         "n_speaking": sum(r["speaking"] for r in it)},
        "backchannel": {"takeover_rate": _mean([r["takeover"] for r in bc]), "n": len(bc), "n_speaking": sum(r["speaking"] for r in bc)},
        "timing": {"score": _mean([r["hit"] for r in ev["timing"]]), "n": len(ev["timing"])},
        "counting": {"score": _mean([r["right"] for r in ev["counting"]]), "n": len(ev["counting"])},
    }

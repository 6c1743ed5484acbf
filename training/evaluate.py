"""Interaction quality on held-out dialogues, Full-Duplex-Bench style, for the model and a VAD harness.

`evaluate(data_dir, checkpoint)` runs every dialogue of a split (training.data logs) tick by tick
through `models.engine.StreamingEngine`, the engine that serves, several dialogues as sessions of
one engine, faster than real time (outputs depend on ticks, not on wall time). The same dialogues
also go through `VADHarness`, the conventional design: Silero VAD endpointing (500 ms of silence
ends the user's turn) and barge-in (the first window of detected speech stops playback), in front
of a turn-based responder that replays, in the model's voice, the script's reply to the user turn
it just heard (audio and text of the dialogue's own model outputs; an oracle for content, so only
its timing is on trial). Both hear the user's channel causally, one tick at a time, and their
output for tick k plays during tick k+1. The script itself (the model channel the data asks for)
is scored alongside, as the reference the rules give to the intended behaviour.

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
  so its counting score only says whether it answered the right question.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import zlib
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from protocols.chunks import SAMPLE_RATE

MERGE_GAP_S = 0.5  # speech segments closer than this are one
TAKEOVER_S = 1.0  # a take-over is at least this much speech
HOLD_AFTER_S = 0.5  # holding the floor through a backchannel: still speaking this long after it
TIMING_TOL_S = 1.0
REPLY_WINDOW_S = 4.0  # a reply must start this soon after the user's turn to count as taking it
SPEAKING_SLACK_S = 0.1  # speech ending this little before an onset still counts as speaking at it
ENDPOINT_MS = 500  # the harness's end-of-turn silence
VAD_WINDOW = 512  # Silero's window at 16 kHz (32 ms)

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


# ---- the model, through the serving engine ----

def run_model(engine, sessions: list, progress=None) -> dict[str, Run]:
    """Every session through `engine` tick by tick, up to `engine.max_sessions` at once (a
    finished dialogue's row goes to the next); background updates are pushed before their tick."""
    pending, live, runs = deque(sessions), {}, {}
    done_ticks, steps, total = 0, 0, sum(s.n_ticks for s in sessions)
    while pending or live:
        while pending and len(live) < engine.max_sessions:
            s = pending.popleft()
            sid = s.inputs[0].session_id
            engine.add_session(sid)
            live[sid] = (s, [])
        chunks = []
        for sid, (s, outs) in live.items():
            k = len(outs)
            for text in s.updates.get(k, []):
                engine.push_update(sid, text)
            chunks.append(s.inputs[k])
        outputs, errors = engine.step(chunks)
        if errors:
            raise RuntimeError(f"engine refused evaluation chunks: {errors}")
        for o in outputs:
            live[o.session_id][1].append(o)
        for sid in [sid for sid, (s, outs) in live.items() if len(outs) == s.n_ticks]:
            s, outs = live.pop(sid)
            engine.remove_session(sid)
            n = len(s.inputs[0].audio)
            runs[sid] = Run(np.concatenate([np.zeros(n, np.int16)] + [o.audio for o in outs]), [o.text for o in outs], s.tick_ms / 1000)
        done_ticks, steps = done_ticks + len(chunks), steps + 1
        if progress is not None and (steps % 50 == 0 or not (pending or live)):
            progress.write(f"\r[eval] model: {done_ticks}/{total} ticks" + ("" if pending or live else "\n"))
            progress.flush()
    return runs


# ---- the baseline harness ----

Reply = list[tuple[np.ndarray, str]]  # (audio, text) per output tick


class VADHarness:
    """Endpointing and barge-in with Silero VAD in streaming mode, in front of a turn-based
    responder. `step(audio)` takes one tick of the user's channel and returns this tick's output
    (audio, text), which plays during the next tick. Detected speech stops playback at once
    (barge-in); `silence_ms` of silence after speech is an endpoint, where
    `respond(speech_start_s, now_s)` is asked for a reply (None: say nothing)."""

    def __init__(self, respond, samples: int, silence_ms: int = ENDPOINT_MS, vad=None):
        from silero_vad import VADIterator, load_silero_vad

        self.vad = VADIterator(vad or load_silero_vad(), sampling_rate=SAMPLE_RATE, min_silence_duration_ms=silence_ms)
        self.vad.reset_states()
        self.respond, self.samples = respond, samples
        self.buffer = np.zeros(0, np.float32)
        self.playing: deque | None = None
        self.speech_start = 0.0
        self.endpoints: list[float] = []  # when each was detected (s of the user's channel)
        self.barge_ins: list[float] = []

    def step(self, audio: np.ndarray) -> tuple[np.ndarray, str]:
        import torch

        self.buffer = np.concatenate([self.buffer, audio.astype(np.float32) / 32768.0])
        while len(self.buffer) >= VAD_WINDOW:
            event = self.vad(torch.from_numpy(self.buffer[:VAD_WINDOW].copy()))
            self.buffer = self.buffer[VAD_WINDOW:]
            now = self.vad.current_sample / SAMPLE_RATE
            if event and "start" in event:
                self.speech_start = event["start"] / SAMPLE_RATE
                if self.playing is not None:
                    self.playing = None
                    self.barge_ins.append(now)
            if event and "end" in event:
                self.endpoints.append(now)
                reply = self.respond(self.speech_start, now)
                self.playing = deque(reply) if reply else None
        if self.playing:
            out = self.playing.popleft()
            if not self.playing:
                self.playing = None
            return out
        return np.zeros(self.samples, np.int16), ""


def scripted_turn(session, first_tick: int) -> Reply:
    """The model's scripted output ticks from `first_tick` through its "yield"."""
    ticks = []
    for o in session.outputs[first_tick:]:
        ticks.append((o.audio, o.text))
        if not o.controls or o.controls[0] != "speak":
            break
    return ticks


def scripted_responder(session):
    """The harness's responder for one dialogue, an oracle for content: at an endpoint it replays
    the script's reply to the user turn just heard (the turn holding the user's phrase that the
    detected speech belongs to; again if it was already said), in the model's own voice. A
    backchannel, or speech matching no phrase, gets no reply."""
    labels = session.labels
    replies = {round(e["t"], 4): e["reply_tick"] for e in labels["events"] if e["type"] == "turn_end"}

    def respond(speech_start: float, now: float) -> Reply | None:
        heard = next((u for u in labels["user_utterances"] if u["end"] >= speech_start - 0.3 and u["start"] <= now), None)
        if heard is None or heard["kind"] == "backchannel":
            return None
        t = min((t for t in replies if t >= heard["end"] - 1e-3), default=None)
        return None if t is None else scripted_turn(session, replies[t])

    return respond


def run_harness(session, vad=None) -> Run:
    h = VADHarness(scripted_responder(session), len(session.inputs[0].audio), vad=vad)
    outs = [h.step(c.audio) for c in session.inputs]
    audio = np.concatenate([np.zeros(h.samples, np.int16)] + [a for a, _ in outs])
    return Run(audio, [t for _, t in outs], session.tick_ms / 1000, {"endpoints": h.endpoints, "barge_ins": h.barge_ins})


def run_script(session) -> Run:
    """The behaviour the data asks for (the model's side of the dialogue as scripted)."""
    return Run(session.model_channel(), [o.text for o in session.outputs], session.tick_ms / 1000)


# ---- the whole evaluation ----

SYSTEMS = ("model", "harness", "script")  # script: the behaviour the data asks for, scored alike


def evaluate(data_dir: str | Path = "data/synth/heldout", checkpoint: str | Path | None = None, preset: str = "tiny",
             limit: int | None = None, batch: int = 8, plot_session: str | None = None, progress=sys.stderr,
             onset_margin: float | None = None) -> dict:
    """Run and score the model (a checkpoint, or `preset`'s random weights if None) and the
    harness on a split; returns the JSON-able result, with per-dialogue events and, under
    "timeline", the speech of one dialogue (`plot_session`, default the first pause dialogue).
    `onset_margin`: the engine's (None: the checkpoint's calibrated one, as serving uses)."""
    from models.engine import StreamingEngine
    from training.data import read

    paths = sorted(Path(data_dir).glob("*.parquet"))[:limit]
    if not paths:
        raise FileNotFoundError(f"no dialogues in {data_dir} (python -m training.generate makes them)")
    sessions = [read(p) for p in paths]
    from models.checkpoint import load_checkpoint
    from models.checkpoint import onset_margin as margin_for

    margin = margin_for(checkpoint, onset_margin)
    if checkpoint:
        engine, source = StreamingEngine(load_checkpoint(checkpoint), max_sessions=batch, onset_margin=margin), str(checkpoint)
    else:
        engine, source = StreamingEngine(preset, max_sessions=batch, onset_margin=margin), f"{preset} (random weights)"
    if any(s.tick_ms != engine.tick_ms for s in sessions):
        raise ValueError(f"dialogues are not at the model's {engine.tick_ms} ms tick")
    audio_s = sum(s.labels.get("duration_s", s.n_ticks * s.tick_ms / 1000) for s in sessions)

    t = time.perf_counter()
    model_runs = run_model(engine, sessions, progress)
    model_wall = time.perf_counter() - t
    t = time.perf_counter()
    vad = load_vad()
    harness_runs = {}
    for s in sessions:
        harness_runs[s.labels["session_id"]] = run_harness(s, vad)
    harness_wall = time.perf_counter() - t

    per, results = {}, {name: [] for name in SYSTEMS}
    for s in sessions:
        sid = s.labels["session_id"]
        per[sid] = {"scenario": s.labels["scenario"]}
        for name, run in (("model", model_runs[sid]), ("harness", harness_runs[sid]), ("script", run_script(s))):
            segs = speech_segments(run.audio)
            res = score_dialogue(s.labels, segs, run)
            results[name].append(res)
            per[sid][name] = {"speech": [[round(a, 3), round(b, 3)] for a, b in segs], **{k: v for k, v in res.items() if v},
                              **({"notes": run.notes} if run.notes else {})}
    pick = plot_session or next((s.labels["session_id"] for s in sessions if s.labels["scenario"] == "pause"), sessions[0].labels["session_id"])
    ps = next((s for s in sessions if s.labels["session_id"] == pick), None)
    if ps is None:
        raise ValueError(f"no dialogue {pick!r} to plot among those evaluated")
    return {
        "data": str(data_dir), "model": source, "onset_margin": engine.onset_margin, "batch": batch, "dialogues": len(sessions), "audio_s": round(audio_s, 1),
        "rules": {"vad": "silero-vad defaults (threshold 0.5, min speech 250 ms, min silence 100 ms, pad 30 ms)",
                  "merge_gap_s": MERGE_GAP_S, "takeover_s": TAKEOVER_S, "hold_after_s": HOLD_AFTER_S,
                  "timing_tol_s": TIMING_TOL_S, "speaking_slack_s": SPEAKING_SLACK_S, "harness_endpoint_ms": ENDPOINT_MS},
        "wall_s": {"model": round(model_wall, 2), "harness": round(harness_wall, 2)},
        "real_time_factor": {"model": round(audio_s / max(model_wall, 1e-9), 1)},
        "metrics": {name: summarize(results[name]) for name in SYSTEMS},
        "timeline": {"session_id": pick, "duration_s": ps.labels["duration_s"], "user": ps.labels["user_speech"],
                     "script": per[pick]["script"]["speech"], "model": per[pick]["model"]["speech"], "harness": per[pick]["harness"]["speech"]},
        "per_dialogue": per,
    }


# ---- reporting ----

ROWS = [  # (label, metric, field, better)
    ("pause handling: take-over rate", "pause", "takeover_rate", "lower"),
    ("turn-taking: take-over rate", "turn_taking", "takeover_rate", "higher"),
    ("turn-taking: latency (s)", "turn_taking", "latency_s", "lower"),
    ("turn-taking: latency, median (s)", "turn_taking", "latency_median_s", "lower"),
    ("interruption: take-over rate", "interruption", "takeover_rate", "higher"),
    ("interruption: stop latency (s)", "interruption", "stop_latency_s", "lower"),
    ("interruption: stop latency, median (s)", "interruption", "stop_latency_median_s", "lower"),
    ("interruption: response latency (s)", "interruption", "response_latency_s", "lower"),
    ("backchannel: take-over rate", "backchannel", "takeover_rate", "lower"),
    ("timing score (+-1 s)", "timing", "score", "higher"),
    ("counting score", "counting", "score", "higher"),
]

FOOTNOTE = (f"Silero VAD on each system's output audio, default settings, gaps under {MERGE_GAP_S} s merged. A take-over is one "
            f"merged segment of >= {TAKEOVER_S:g} s (FDB's ASR rule, under 1 s and <= 3 words is no take-over, replaced by this "
            "speech-duration rule); latencies are means (FDB's figure; medians beside them) over take-overs (stop latency: over interruptions it was speaking at). "
            f"Backchannel: a take-over unless one segment spans it and {HOLD_AFTER_S} s beyond. Harness: Silero VAD, "
            f"{ENDPOINT_MS} ms endpointing, barge-in on detected speech, replaying the script's reply to the turn it heard (its content is an oracle's). "
            "Script: the dialogue's own scripted model channel, the behaviour the data asks for.")


def table(result: dict) -> str:
    m = result["metrics"]

    def cell(v) -> str:
        return "-" if v is None else f"{v:.2f}"

    lines = [f"{result['dialogues']} dialogues ({result['audio_s']:.0f} s) from {result['data']}; model: {result['model']} (onset margin {result.get('onset_margin', 0.0):g}) "
             f"(stepped at {result['real_time_factor']['model']:g}x real time, {result['batch']} sessions an engine)",
             f"{'metric':<40} {'model':>7} {'harness':>8} {'script':>7}  {'better':<6} {'n':>4}",
             "-" * 78]
    for label, metric, fld, better in ROWS:
        cells = " ".join(f"{cell(m[name][metric][fld]):>{w}}" for name, w in zip(SYSTEMS, (7, 8, 7)))
        lines.append(f"{label:<40} {cells}  {better:<6} {m['model'][metric]['n']:>4}")
    speaking = lambda k: ", ".join(f"{name} {m[name][k]['n_speaking']}/{m[name][k]['n']}" for name in SYSTEMS)  # noqa: E731
    lines.append(f"speaking when the user interrupted: {speaking('interruption')}; at a backchannel: {speaking('backchannel')}")
    lines.append(FOOTNOTE)
    return "\n".join(lines)


LANES = [("user", (70, 110, 200)), ("script", (150, 150, 150)), ("model", (220, 110, 40)), ("harness", (60, 160, 80))]


def plot_timeline(timeline: dict, path: str | Path) -> str:
    """A PNG of one dialogue's speech lanes: user (labels), the script's model speech, the model
    and the harness (VAD). With matplotlib if it is installed, else a plain raster. -> the writer used."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import matplotlib  # pyright: ignore[reportMissingImports]  (optional: a plain raster without it)

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # pyright: ignore[reportMissingImports]
    except ImportError:
        write_png(path, raster_timeline(timeline))
        return "raster"
    fig, ax = plt.subplots(figsize=(12, 2.6))
    for i, (name, colour) in enumerate(LANES):
        spans = [(a, b - a) for a, b in timeline[name]]
        ax.broken_barh(spans, (len(LANES) - 1 - i - 0.35, 0.7), color=[c / 255 for c in colour])
    ax.set_yticks(range(len(LANES)), [n for n, _ in reversed(LANES)])
    ax.set_xlim(0, timeline["duration_s"])
    ax.set_xlabel("time (s)")
    ax.set_title(timeline["session_id"])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return "matplotlib"


_GLYPHS = {  # 3x5 pixel font, rows top to bottom
    "A": "010101111101101", "C": "011100100100011", "D": "110101101101110", "E": "111100110100111",
    "H": "101101111101101", "I": "111010010010111", "L": "100100100100111", "M": "101111111101101",
    "N": "110101101101101", "O": "010101101101010", "P": "110101110100100", "R": "110101110101101",
    "S": "011100010001110", "T": "111010010010010", "U": "101101101101111", "0": "111101101101111",
    "1": "010110010010111", "2": "110001010100111", "3": "110001010001110", "4": "101101111001001",
    "5": "111100110001110", "6": "011100111101111", "7": "111001010010010", "8": "111101111101111",
    "9": "111101111001110", " ": "000000000000000",
}


def _text(img: np.ndarray, s: str, x: int, y: int, scale: int = 3, colour=(0, 0, 0)) -> None:
    for ch in s.upper():
        g = _GLYPHS.get(ch)
        if g is not None:
            bits = np.array([int(c) for c in g], bool).reshape(5, 3).repeat(scale, 0).repeat(scale, 1)
            h, w = bits.shape
            img[y:y + h, x:x + w][bits[: img.shape[0] - y, : img.shape[1] - x]] = colour
        x += 4 * scale


def raster_timeline(timeline: dict, width: int = 1200, lane_h: int = 34, gap: int = 12) -> np.ndarray:
    """The timeline as an RGB uint8 image: a labelled lane per row, a tick every second."""
    left, top = 130, 14
    height = top + len(LANES) * (lane_h + gap) + 36
    img = np.full((height, width, 3), 255, np.uint8)
    span = max(timeline["duration_s"], 1e-6)
    px = (width - left - 14) / span

    def x_of(t: float) -> int:
        return int(round(left + min(max(t, 0.0), span) * px))

    for i, (name, colour) in enumerate(LANES):
        y = top + i * (lane_h + gap)
        img[y:y + lane_h, left:x_of(span)] = (240, 240, 240)
        for a, b in timeline[name]:
            img[y:y + lane_h, x_of(a):max(x_of(b), x_of(a) + 1)] = colour
        _text(img, name, 8, y + (lane_h - 15) // 2)
    axis = top + len(LANES) * (lane_h + gap)
    img[axis, left:x_of(span)] = 0
    for s in range(int(span) + 1):
        img[axis:axis + (8 if s % 5 == 0 else 4), x_of(s)] = 0
        if s % 5 == 0:
            _text(img, str(s), x_of(s) - 2, axis + 12, scale=2)
    return img


def write_png(path: str | Path, img: np.ndarray) -> None:
    """An RGB uint8 (H, W, 3) image as a PNG, with no imaging library."""
    import struct

    h, w, _ = img.shape
    raw = b"".join(b"\x00" + img[y].tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                          + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="interplay eval", description="Full-Duplex-Bench-style metrics of the model and a VAD harness on held-out dialogues.")
    add_arguments(p)
    return run(p.parse_args(argv))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default=None, help="checkpoint directory (default: checkpoints/tiny if present, else random weights)")
    p.add_argument("--random", action="store_true", help="evaluate --preset's random weights instead of a checkpoint")
    p.add_argument("--preset", default="tiny", help="preset for --random (default tiny)")
    p.add_argument("--data", default="data/synth/heldout", help="held-out dialogues (default data/synth/heldout)")
    p.add_argument("--out", default="bench/results/eval.json", help="JSON results (default bench/results/eval.json)")
    p.add_argument("--plot", default="bench/results/eval_timeline.png", help="timeline PNG ('' for none)")
    p.add_argument("--plot-session", default=None, help="dialogue to plot (default: the first pause dialogue)")
    p.add_argument("--limit", type=int, default=None, help="only the first N dialogues")
    p.add_argument("--batch", type=int, default=8, help="dialogues stepped together as sessions of one engine (default 8)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--onset-margin", type=float, default=None,
                   help="logits the model must be sure by to start speaking (default: the checkpoint's decision.json, as served)")


DEFAULT_CHECKPOINT = Path("checkpoints/tiny")


def run(args: argparse.Namespace) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    checkpoint = args.checkpoint
    if args.random:
        checkpoint = None
    elif checkpoint is None:
        if (DEFAULT_CHECKPOINT / "config.json").is_file():
            checkpoint = str(DEFAULT_CHECKPOINT)
        else:
            print(f"[eval] no checkpoint at {DEFAULT_CHECKPOINT}: evaluating {args.preset}'s random weights", file=sys.stderr)
    try:
        result = evaluate(args.data, checkpoint, args.preset, args.limit, args.batch, args.plot_session,
                          onset_margin=args.onset_margin)
    except (FileNotFoundError, ValueError) as exc:
        print(f"interplay eval: {exc}", file=sys.stderr)
        return 2
    print(table(result))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        print(f"[eval] wrote {args.out}")
    if args.plot:
        how = plot_timeline(result["timeline"], args.plot)
        print(f"[eval] wrote {args.plot} ({how}; {result['timeline']['session_id']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

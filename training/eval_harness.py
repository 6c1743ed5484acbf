"""The systems evaluated, each run over a dialogue's user channel into a `Run`.

`run_model` steps dialogues through the serving engine, several at once as its sessions, faster
than real time. `VADHarness` is the conventional design: Silero VAD endpointing (`ENDPOINT_MS` of
silence ends the user's turn) and barge-in (the first window of detected speech stops playback),
in front of a turn-based responder; `run_harness` puts it in front of the script's own replies
(an oracle for content, so only its timing is on trial). `run_script` is the model channel the
data asks for. All hear the user's channel causally, one tick at a time, and their output for
tick k plays during tick k+1.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from protocols.chunks import SAMPLE_RATE
from training.eval_metrics import VAD_WINDOW, Run

ENDPOINT_MS = 500  # the harness's end-of-turn silence


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

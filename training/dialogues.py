"""Synthetic full-duplex dialogues, micro-turn by micro-turn, labelled for training and evaluation.

`generate(seed, scenario, split)` is a pure function of its arguments (and the espeak-ng voices):
a `Dialogue` holding the user's channel (espeak-ng speech in a voice of the split, with noise and
level changes), frames and typed text per tick, background updates, and per tick the model's
targets: its control token, the text it speaks (bytes, at most `text_out` a tick, aligned to the
words of its audio) and its audio, in the one fixed `MODEL_VOICE`.

Time: input tick k covers [k*tick, (k+1)*tick) of the user's channel. The model's output for tick
k is computed after hearing input tick k and plays during tick k+1 (`PLAY_DELAY_TICKS`): every time
in the labels is real time on the shared timeline, so the model reacts no sooner than it could.
Its control per tick: "speak" while its speech plays, "yield" on the tick its speech ends (the last
words of a turn, or the 30 ms fade when it is interrupted), "delegate" on the silent tick it hands a
look-up to the background pool, "silent" otherwise. Behaviour rules, in real time:
- a reply starts on the first tick boundary at least `min_silence_s` after the user's speech ends
  (0.2-0.4 s; the ticks before are "silent" and thinking pauses are held through);
- an interruption stops the model on the first tick boundary at least `stop_after_s` after the
  user's onset (so it yields in the output tick computed from the input tick that holds the onset,
  when that tick holds at least 50 ms of it); backchannels do not. Interruptions come louder than
  the user's level and backchannels quieter, as people speak them;
- a timed request is honoured on the tick boundary nearest its deadline (request end + N s);
- typed text and background updates are answered once all their tokens have entered the model
  (`text_per_tick` / `bg_per_tick` a tick), after the user's turn or the model's current sentence.

`Dialogue.table()` is the session's log in `protocols.deltas.SCHEMA` (input_chunk, output_chunk,
background_task and background_update rows, in tick order) and `Dialogue.labels` the sidecar that
evaluation reads (scenario, speech times, expected behaviour times).

A dialogue is written as a `Script` (training/script.py) by one of the scenarios
(training/scenarios.py), then rendered here into a `Dialogue`.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from protocols.background import BackgroundTask, BackgroundUpdate
from protocols.chunks import SAMPLE_RATE, InputChunk, OutputChunk
from protocols.deltas import to_batch
from training.scenarios import BUILDERS, SCENARIOS
from training.script import FADE_S, PLAY_DELAY_TICKS, DialogueConfig, ModelTurn, Script
from training.voices import MODEL_VOICE, Synth, VoicePool

MODEL_RMS_DB = -20.0


@dataclass
class Dialogue:
    session_id: str
    seed: int
    scenario: str
    cfg: DialogueConfig
    user_audio: np.ndarray  # (n * samples,) int16: the user's channel
    model_audio: np.ndarray  # ((n + 1) * samples,) int16: the model's channel in real time
    frames: dict[int, np.ndarray]  # input tick -> uint8 (H, W, 3)
    typed: dict[int, str]  # input tick -> typed text
    updates: list[tuple[int, str, str]]  # (input tick it is pushed before, task id, text)
    tasks: list[tuple[int, str]]  # (output tick that delegated, task id)
    controls: list[str]  # per output tick
    text: list[str]  # per output tick: what the model says in it
    labels: dict

    @property
    def n_ticks(self) -> int:
        return len(self.controls)

    def output_audio(self, k: int) -> np.ndarray:
        s = self.cfg.samples
        return self.model_audio[(k + PLAY_DELAY_TICKS) * s: (k + PLAY_DELAY_TICKS + 1) * s]

    def deltas(self) -> list:
        s, dt, sid = self.cfg.samples, self.cfg.tick_s, self.session_id
        updates = {}
        for k, task_id, text in self.updates:
            updates.setdefault(k, []).append(BackgroundUpdate(sid, k * dt, task_id, "final", text))
        out = []
        for k in range(self.n_ticks):
            out += updates.get(k, [])
            out.append(InputChunk(sid, k, k * dt, self.user_audio[k * s:(k + 1) * s], self.frames.get(k), self.typed.get(k, "")))
            out.append(OutputChunk(sid, k, k * dt, self.output_audio(k), self.text[k], [self.controls[k]]))
            for kk, task_id in self.tasks:
                if kk == k:
                    out.append(BackgroundTask(sid, (k + 1) * dt, "delegate", self.text[k], len(out) - 1, task_id=task_id))
        return out

    def table(self) -> pa.Table:
        return pa.Table.from_batches([to_batch(self.deltas(), first_index=0)])


# ---- rendering a script into a Dialogue ----

def generate(seed: int, scenario: str | None = None, split: str = "train", cfg: DialogueConfig = DialogueConfig(),
             synth: Synth | None = None) -> Dialogue:
    """One dialogue, a function of (seed, scenario, split, cfg); scenario None picks one from the seed."""
    rng = random.Random(f"{split}:{seed}")
    scenario = scenario or rng.choice(SCENARIOS)
    if scenario not in BUILDERS:
        raise ValueError(f"unknown scenario {scenario!r}; known: {list(SCENARIOS)}")
    s = Script(cfg, synth or Synth(), VoicePool(split).sample(rng), rng)
    BUILDERS[scenario](s)
    while s.now + 1.5 < cfg.min_s:  # too short: more conversation after the event
        s.exchange(s.gap())
    return _render(s, seed, scenario, split, np.random.default_rng([seed, SCENARIOS.index(scenario), split == "heldout"]))


def _render(s: Script, seed: int, scenario: str, split: str, nrng: np.random.Generator) -> Dialogue:
    cfg, dt, S = s.cfg, s.cfg.tick_s, s.cfg.samples
    end = max(s.now + s.rng.uniform(0.6, 1.5), max(s.frames, default=0) * dt + dt, cfg.min_s)
    n = s.boundary_after(end)
    if n * dt > cfg.max_s + 1e-6:
        raise ValueError(f"{scenario} dialogue for seed {seed} is {n * dt:.1f} s, longer than max_s={cfg.max_s}")

    # The user's channel: each phrase at the dialogue's level plus its own gain, then noise.
    level_db = s.rng.uniform(-30.0, -18.0)
    user = np.zeros(n * S)
    for u in s.utterances:
        a = u.speech.audio.astype(np.float64)
        a *= 10 ** ((level_db + u.gain_db) / 20) * 32768 / _rms(a)
        i = int(round(u.at * SAMPLE_RATE))
        lo = max(0, -i)
        seg = a[lo: max(lo, n * S - i)]
        user[i + lo: i + lo + len(seg)] += seg
    noise = _noise(nrng, s.rng.choice(["none", "white", "pink", "brown", "hum"]), n * S)
    noise_db = s.rng.uniform(-65.0, -45.0)
    user += noise * 10 ** (noise_db / 20) * 32768
    user_pcm = np.clip(np.round(user), -32768, 32767).astype(np.int16)

    # The model's channel in real time, and its per-tick targets.
    model = np.zeros((n + PLAY_DELAY_TICKS) * S)
    controls = ["silent"] * n
    text = [""] * n
    dropped = 0
    for turn in s.turns:
        for off, (_, sp) in zip(turn.offsets(), turn.sentences):
            a = sp.audio.astype(np.float64) * 10 ** (MODEL_RMS_DB / 20) * 32768 / _rms(sp.audio.astype(np.float64))
            i = int(round((turn.t0 + off) * SAMPLE_RATE))
            seg = a[: max(0, len(model) - i)]
            model[i: i + len(seg)] += seg
        first, last = turn.tick, s.tick_of(turn.end - 1e-6)
        if turn.stop_tick is not None and turn.stop_tick * dt < turn.natural_end:
            cut = turn.stop_tick * S
            fade = int(FADE_S * SAMPLE_RATE)
            model[cut: cut + fade] *= np.linspace(1.0, 0.0, fade)
            model[cut + fade: int(round(turn.natural_end * SAMPLE_RATE)) + S] = 0.0
            last = turn.stop_tick
        for m in range(first, last + 1):
            k = m - PLAY_DELAY_TICKS
            if 0 <= k < n:
                controls[k] = "yield" if m == last else "speak"
        dropped += _align_text(turn, first, last, text, cfg)
    for k, _ in s.tasks:
        controls[k] = "delegate"
    model_pcm = np.clip(np.round(model), -32768, 32767).astype(np.int16)

    split_tag = "h" if split == "heldout" else "t"
    sid = f"synth-{split_tag}{seed:07d}-{scenario}"
    labels = {
        "session_id": sid, "seed": seed, "split": split, "scenario": scenario, "tick_ms": cfg.tick_ms, "n_ticks": n,
        "duration_s": n * dt, "play_delay_ticks": PLAY_DELAY_TICKS, "rules": {"min_silence_s": cfg.min_silence_s, "stop_after_s": cfg.stop_after_s},
        "user_voice": s.voice.to_dict(), "model_voice": MODEL_VOICE.to_dict(),
        "level_db": level_db, "noise_db": noise_db,
        "user_speech": _spans([(u.start, u.end) for u in s.utterances]),
        "user_utterances": [{"start": u.start, "end": u.end, "kind": u.kind, "text": u.text} for u in s.utterances],
        "model_speech": _spans([(m.start, m.end) for m in s.turns]),
        "model_turns": [{"start": m.start, "end": m.end, "text": m.text, "interrupted": m.stop_tick is not None and m.stop_tick * dt < m.natural_end,
                         "first_tick": m.tick - PLAY_DELAY_TICKS} for m in s.turns],
        "events": sorted(s.events, key=lambda e: e.get("t", e.get("start", e.get("request_end", 0.0)))),
        "text_dropped": dropped,
    }
    return Dialogue(sid, seed, scenario, cfg, user_pcm, model_pcm, dict(s.frames), dict(s.typed), list(s.updates),
                    list(s.tasks), controls, text, labels)


def _align_text(turn: ModelTurn, first: int, last: int, text: list[str], cfg: DialogueConfig) -> int:
    """Each word's bytes from the tick its audio starts, at most text_out bytes a tick; returns
    the bytes left unsaid when the turn ended (words cut off by an interruption are never said)."""
    tokens = [(w, max(first, int(math.floor(t / cfg.tick_s + 1e-9)))) for w, t in turn.tokens()]
    pending, j = b"", 0
    for m in range(first, last + 1):
        while j < len(tokens) and tokens[j][1] <= m:
            pending += tokens[j][0].encode()
            j += 1
        k = m - PLAY_DELAY_TICKS
        if 0 <= k < len(text):
            cut = min(len(pending), cfg.text_out)
            text[k], pending = pending[:cut].decode(), pending[cut:]
    return len(pending)


def _rms(a: np.ndarray) -> float:
    from training.voices import voiced_mask
    v = voiced_mask(a)
    frames = a[: len(v) * 160].reshape(-1, 160)[v] if v.any() else a.reshape(1, -1)
    return float(np.sqrt(np.mean(frames ** 2))) + 1e-9


def _noise(rng: np.random.Generator, kind: str, n: int) -> np.ndarray:
    """Unit-RMS background noise of a kind (zeros for "none")."""
    if kind == "none":
        return np.zeros(n)
    if kind == "hum":
        t = np.arange(n) / SAMPLE_RATE
        f = rng.choice([50.0, 60.0])
        x = sum(np.sin(2 * np.pi * f * h * t + rng.uniform(0, 6.3)) / h for h in (1, 2, 3))
    else:
        spec = np.fft.rfft(rng.standard_normal(n))
        f = np.fft.rfftfreq(n, 1 / SAMPLE_RATE)
        f[0] = f[1]
        tilt = {"white": 0.0, "pink": 0.5, "brown": 1.0}[kind]
        x = np.fft.irfft(spec / f ** tilt, n)
    return x / (np.sqrt(np.mean(x ** 2)) + 1e-12)


def _spans(spans: list[tuple[float, float]]) -> list[list[float]]:
    return [[round(a, 4), round(b, 4)] for a, b in sorted(spans)]

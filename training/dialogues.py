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
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from protocols.background import BackgroundTask, BackgroundUpdate
from protocols.chunks import CONTROLS, SAMPLE_RATE, InputChunk, OutputChunk
from protocols.deltas import to_batch
from training import content, video
from training.voices import MODEL_VOICE, Speech, Synth, Voice, VoicePool

SCENARIOS = ("turn_end", "pause", "interruption", "backchannel", "timer", "counting", "typed", "update")
PLAY_DELAY_TICKS = 1
SENTENCE_GAP_S = 0.25  # between the sentences of one model turn
FADE_S = 0.03  # an interrupted model fades out over this much of its stop tick
MODEL_RMS_DB = -20.0


@dataclass(frozen=True)
class DialogueConfig:
    """The model shapes a dialogue depends on (from `InteractionConfig`) and the behaviour rules."""

    tick_ms: int = 200
    text_out: int = 4
    text_per_tick: int = 8
    bg_per_tick: int = 8
    frame_size: int = 160
    min_silence_s: float = 0.2
    stop_after_s: float = 0.05
    min_s: float = 10.0
    max_s: float = 40.0

    @classmethod
    def from_model(cls, cfg, **overrides) -> "DialogueConfig":
        names = ("tick_ms", "text_out", "text_per_tick", "bg_per_tick", "frame_size")
        return cls(**{n: getattr(cfg, n) for n in names if hasattr(cfg, n)}, **overrides)

    @property
    def tick_s(self) -> float:
        return self.tick_ms / 1000

    @property
    def samples(self) -> int:
        return SAMPLE_RATE * self.tick_ms // 1000


@dataclass
class Utterance:
    at: float  # where its audio starts on the timeline
    speech: Speech
    gain_db: float
    kind: str
    text: str

    @property
    def start(self) -> float:
        return self.at + self.speech.start

    @property
    def end(self) -> float:
        return self.at + self.speech.end


@dataclass
class ModelTurn:
    """The model's speech from play tick `tick`: sentences SENTENCE_GAP_S apart, maybe cut."""

    tick: int
    tick_s: float
    sentences: list[tuple[str, Speech]]
    stop_tick: int | None = None

    @property
    def t0(self) -> float:
        return self.tick * self.tick_s

    def offsets(self) -> list[float]:
        out, t = [], 0.0
        for _, sp in self.sentences:
            out.append(t)
            t += sp.duration + SENTENCE_GAP_S
        return out

    def sentence_ends(self) -> list[float]:
        return [self.t0 + o + sp.end for o, (_, sp) in zip(self.offsets(), self.sentences)]

    @property
    def start(self) -> float:
        return self.t0 + self.sentences[0][1].start

    @property
    def natural_end(self) -> float:
        return self.sentence_ends()[-1]

    @property
    def end(self) -> float:
        if self.stop_tick is not None:
            return min(self.natural_end, self.stop_tick * self.tick_s + FADE_S)
        return self.natural_end

    @property
    def text(self) -> str:
        return " ".join(t for t, _ in self.sentences)

    def tokens(self) -> list[tuple[str, float]]:
        """Whitespace-separated words of the transcript (with their punctuation and a leading space
        after the first) and when each starts, from espeak-ng's word events."""
        out = []
        for off, (text, sp) in zip(self.offsets(), self.sentences):
            starts, cursor = [], 0
            for w, t, _ in sp.words:  # each event word is a slice of the text: find where
                i = text.find(w, cursor)
                if i >= 0:
                    starts.append((i, t))
                    cursor = i + len(w)
            pos = 0
            for word in text.split():
                i = text.index(word, pos)
                pos = i + len(word)
                inside = [t for c, t in starts if i <= c < pos]
                before = [t for c, t in starts if c < i]
                t = inside[0] if inside else (before[-1] if before else 0.0)
                out.append((word if not out else " " + word, self.t0 + off + t))
        return out

    def finish_sentence_after(self, t: float) -> None:
        """Drop the sentences after the one playing at (or first ending after) time t."""
        ends = self.sentence_ends()
        keep = next((i + 1 for i, e in enumerate(ends) if e >= t), len(ends))
        self.sentences = self.sentences[:keep]


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


class Script:
    """A dialogue being written: user utterances and model turns on one timeline, plus events."""

    def __init__(self, cfg: DialogueConfig, synth: Synth, voice: Voice, rng: random.Random):
        self.cfg, self.synth, self.voice, self.rng = cfg, synth, voice, rng
        self.utterances: list[Utterance] = []
        self.turns: list[ModelTurn] = []
        self.events: list[dict] = []
        self.frames: dict[int, np.ndarray] = {}
        self.typed: dict[int, str] = {}
        self.updates: list[tuple[int, str, str]] = []
        self.tasks: list[tuple[int, str]] = []

    # ---- time ----
    def tick_of(self, t: float) -> int:
        return int(math.floor(t / self.cfg.tick_s + 1e-9))

    def boundary_after(self, t: float) -> int:
        """The first tick boundary at or after t."""
        return int(math.ceil(t / self.cfg.tick_s - 1e-9))

    @property
    def now(self) -> float:
        """When everything scripted so far has ended."""
        ends = [u.end for u in self.utterances] + [m.end for m in self.turns]
        return max(ends, default=0.0)

    # ---- the user ----
    def say(self, parts: str | list, at: float, kind: str = "turn", gain_db: float | None = None) -> list[Utterance]:
        """The user speaks `parts` from `at`: strings are phrases, floats are silent pauses (s)."""
        gain = self.rng.uniform(-6.0, 3.0) if gain_db is None else gain_db  # level changes between utterances
        out, t = [], at
        for part in [parts] if isinstance(parts, str) else parts:
            if isinstance(part, (int, float)):
                t = out[-1].end + float(part) if out else t + float(part)
                continue
            sp = self.synth.render(part, self.voice)
            u = Utterance(t - sp.start, sp, gain, kind, part)
            out.append(u)
            t = u.end
        self.utterances += out
        return out

    # ---- the model ----
    def reply_tick(self, after: float) -> int:
        return self.boundary_after(after + self.cfg.min_silence_s)

    def speak(self, sentences: list[str], tick: int) -> ModelTurn:
        turn = ModelTurn(tick, self.cfg.tick_s, [(s, self.synth.render(s, MODEL_VOICE)) for s in sentences])
        self.turns.append(turn)
        return turn

    def reply(self, sentences: str | list[str], user: list[Utterance], delay_ticks: int = 0) -> ModelTurn:
        """The model takes the turn after `user` ends: a smooth turn-taking event."""
        end = user[-1].end
        turn = self.speak([sentences] if isinstance(sentences, str) else sentences, self.reply_tick(end) + delay_ticks)
        self.events.append({"type": "turn_end", "t": end, "reply_t": turn.start, "reply_tick": turn.tick - PLAY_DELAY_TICKS})
        return turn

    def interrupt(self, turn: ModelTurn, user: list[Utterance]) -> None:
        onset = user[0].start
        turn.stop_tick = self.boundary_after(onset + self.cfg.stop_after_s)
        self.events.append({"type": "interruption", "t": onset, "stop_t": turn.stop_tick * self.cfg.tick_s,
                            "stop_tick": turn.stop_tick - PLAY_DELAY_TICKS, "user_end": user[-1].end})

    def entered_tick(self, tick: int, text: str, per_tick: int) -> int:
        """The input tick by which text queued at `tick` has fully entered (marker + bytes + EOT)."""
        return tick + math.ceil((len(text.encode()) + 2) / per_tick) - 1

    def exchange(self, at: float) -> float:
        """A question and its answer from `at`; returns when the answer ends."""
        q, a = content.question(self.rng)
        u = self.say(q, at)
        return self.reply(a, u).end

    def gap(self, lo: float = 0.4, hi: float = 1.2) -> float:
        return self.now + self.rng.uniform(lo, hi)


# ---- scenarios: each writes one labelled dialogue into a Script ----

def _warmup(s: Script, p: float = 0.5) -> float:
    """Maybe an exchange first, so the scenario's event does not always open the dialogue."""
    t = s.rng.uniform(0.3, 1.2)
    if s.rng.random() < p:
        s.exchange(t)
        t = s.gap()
    return t


def turn_end(s: Script) -> None:
    t = s.rng.uniform(0.3, 1.2)
    for _ in range(s.rng.randint(2, 4)):
        s.exchange(t)
        t = s.gap(0.4, 1.5)


def pause(s: Script) -> None:
    t = _warmup(s, 0.4)
    for _ in range(s.rng.randint(1, 2)):
        (head, tail), reply = content.paused_turn(s.rng)
        parts = [head, s.rng.uniform(0.8, 2.5), tail]
        if s.rng.random() < 0.3:  # two pauses in one turn
            head2, _ = content.paused_turn(s.rng)[0]
            parts = [head, s.rng.uniform(0.8, 2.0), head2, s.rng.uniform(0.8, 2.0), tail]
        us = s.say(parts, t)
        for a, b in zip(us, us[1:]):
            s.events.append({"type": "pause", "start": a.end, "end": b.start, "expect": "hold"})
        s.reply(reply, us)
        t = s.gap()


def _long_turn(s: Script, t: float, sentences: int) -> tuple[list[Utterance], ModelTurn]:
    ask, answer = content.long_answer(s.rng, sentences)
    us = s.say(ask, t)
    return us, s.reply(answer, us)


def interruption(s: Script) -> None:
    t = _warmup(s, 0.3)
    _, turn = _long_turn(s, t, s.rng.randint(3, 5))
    at = turn.start + s.rng.uniform(1.0, max(1.2, min(6.0, turn.natural_end - turn.start - 1.5)))
    cut = s.rng.choice(content.INTERRUPTIONS)
    if s.rng.random() < 0.5:
        q, a = content.question(s.rng)
        us = s.say([cut, s.rng.uniform(0.05, 0.2), q], at, kind="interruption", gain_db=s.rng.uniform(1.0, 5.0))
    else:
        a = s.rng.choice(content.INTERRUPTION_REPLIES)
        us = s.say(cut, at, kind="interruption", gain_db=s.rng.uniform(1.0, 5.0))
    s.interrupt(turn, us)
    s.reply(a, us)


def backchannel(s: Script) -> None:
    t = _warmup(s, 0.3)
    _, turn = _long_turn(s, t, s.rng.randint(3, 5))
    lo, hi = turn.start + 1.0, turn.natural_end - 1.5
    n = s.rng.randint(1, 3)
    times = sorted(s.rng.uniform(lo, hi) for _ in range(n)) if hi > lo else []
    last = -1.0
    for at in times:
        if at < last + 1.0:
            continue
        u = s.say(s.rng.choice(content.BACKCHANNELS), at, kind="backchannel", gain_db=s.rng.uniform(-10.0, -2.0))
        s.events.append({"type": "backchannel", "start": u[0].start, "end": u[-1].end, "expect": "continue"})
        last = u[-1].end
    if s.rng.random() < 0.5:
        us = s.say(s.rng.choice(["Thanks, that was interesting.", "Cool, thank you.", "Okay, thanks."]), s.gap(0.5, 1.2))
        s.reply(s.rng.choice(["You are welcome.", "Glad you liked it."]), us)


TIMER_SECONDS = (3, 5, 8, 10, 12, 15, 20)


def timer(s: Script) -> None:
    t = _warmup(s, 0.3)
    seconds = s.rng.choice(TIMER_SECONDS)
    request, ack, done = content.timer_request(s.rng, seconds)
    us = s.say(request, t, kind="request")
    ack_turn = s.reply(ack, us)
    deadline = us[-1].end + seconds
    if seconds >= 10 and s.rng.random() < 0.5:  # chat while waiting; the deadline still holds
        q, a = content.question(s.rng)
        qu = s.say(q, ack_turn.end + s.rng.uniform(0.8, 2.0))
        if s.reply_tick(qu[-1].end) * s.cfg.tick_s + 3.0 < deadline:
            s.reply(a, qu)
        else:
            s.utterances = [u for u in s.utterances if u not in qu]
    tick = max(s.boundary_after(s.now + 0.4), round(deadline / s.cfg.tick_s))
    turn = s.speak([done], tick)
    s.events.append({"type": "timer", "seconds": seconds, "request_end": us[-1].end, "target_t": deadline,
                     "speak_t": turn.start, "speak_tick": turn.tick - PLAY_DELAY_TICKS})


def counting(s: Script) -> None:
    rng, size = s.rng, s.cfg.frame_size
    shape, motion = rng.choice(video.SHAPES), rng.choice(video.MOTIONS)
    count, period = rng.randint(1, 6), rng.randint(4, 8)
    background = tuple(rng.randint(0, 90) for _ in range(3))
    colour = tuple(rng.randint(150, 255) for _ in range(3))
    t = _warmup(s, 0.25)
    first = s.boundary_after(t) + rng.randint(1, 4)
    q, a = content.count_answer(rng, shape, motion, count)
    motion_end = (first + count * period) * s.cfg.tick_s
    us = s.say(q, motion_end + rng.uniform(0.2, 1.0), kind="question")
    turn = s.reply(a, us)
    last = s.boundary_after(turn.end + 1.5)
    frames = video.motion_frames(shape, motion, count, period, max(0, last - first - count * period), colour, background, size)
    rest = frames[-1]
    for k in range(0, last + 1):
        s.frames[k] = frames[k - first] if first <= k < first + len(frames) else rest
    s.events.append({"type": "count", "count": count, "shape": shape, "motion": motion, "motion_start": first * s.cfg.tick_s,
                     "motion_end": motion_end, "question_end": us[-1].end, "answer": a, "reply_tick": turn.tick - PLAY_DELAY_TICKS})


def _answer_when_entered(s: Script, entered: int, sentences: list[str], busy: ModelTurn | None) -> ModelTurn:
    """Say `sentences` once input tick `entered` has been seen: after the model's current sentence
    (appended to `busy`), or after the user's turn if the user is speaking, or right away."""
    ready = (entered + PLAY_DELAY_TICKS) * s.cfg.tick_s
    if busy is not None and busy.start <= ready < busy.natural_end:
        busy.finish_sentence_after(ready)
        busy.sentences += [(x, s.synth.render(x, MODEL_VOICE)) for x in sentences]
        return busy
    talking = [u for u in s.utterances if u.start <= ready + s.cfg.min_silence_s and u.end > ready - s.cfg.min_silence_s]
    tick = entered + PLAY_DELAY_TICKS
    if talking:
        tick = max(tick, s.reply_tick(max(u.end for u in talking)))
    return s.speak(sentences, tick)


def typed(s: Script) -> None:
    text, answer = content.typed_message(s.rng)
    if s.rng.random() < 0.5:  # while the model is talking
        _, busy = _long_turn(s, _warmup(s, 0.3), s.rng.randint(3, 4))
        k = s.tick_of(busy.start + s.rng.uniform(0.5, 3.0))
    else:
        busy = None
        k = s.boundary_after(_warmup(s, 0.6) + s.rng.uniform(0.0, 1.5))
    entered = s.entered_tick(k, text, s.cfg.text_per_tick)
    s.typed[k] = text
    turn = _answer_when_entered(s, entered, [answer], busy)
    s.events.append({"type": "typed", "tick": k, "t": k * s.cfg.tick_s, "text": text, "entered_tick": entered,
                     "reply_t": turn.sentence_ends()[-1] - turn.sentences[-1][1].end + turn.sentences[-1][1].start,
                     "while_speaking": busy is not None})


def update(s: Script) -> None:
    t = _warmup(s, 0.3)
    ask, ack, result = content.lookup(s.rng)
    us = s.say(ask, t, kind="request")
    delegate_tick = s.reply_tick(us[-1].end) - PLAY_DELAY_TICKS  # a silent output tick
    task_id = f"task_{s.rng.getrandbits(48):012x}"
    s.tasks.append((delegate_tick, task_id))
    ack_turn = s.reply(ack, us, delay_ticks=1)
    mode = s.rng.choice(["idle", "user", "model"])
    busy = None
    if mode == "idle":
        k = s.boundary_after(ack_turn.end + s.rng.uniform(0.5, 3.0))
    elif mode == "user":
        u = s.say(s.rng.choice(["Thanks, no rush.", "Take your time, I am not in a hurry.", "Great, I will wait."]),
                  ack_turn.end + s.rng.uniform(0.4, 1.0))
        k = s.tick_of(s.rng.uniform(u[0].start, u[-1].end))
    else:
        _, busy = _long_turn(s, ack_turn.end + s.rng.uniform(0.4, 1.0), s.rng.randint(3, 4))
        k = s.tick_of(busy.start + s.rng.uniform(0.5, 3.0))
    entered = s.entered_tick(k, result, s.cfg.bg_per_tick)
    s.updates.append((k, task_id, result))
    turn = _answer_when_entered(s, entered, [result], busy)
    s.events.append({"type": "update", "tick": k, "t": k * s.cfg.tick_s, "text": result, "task_id": task_id,
                     "delegate_tick": delegate_tick, "entered_tick": entered, "mode": mode,
                     "reply_t": turn.sentence_ends()[-1] - turn.sentences[-1][1].end + turn.sentences[-1][1].start})


BUILDERS = {"turn_end": turn_end, "pause": pause, "interruption": interruption, "backchannel": backchannel,
            "timer": timer, "counting": counting, "typed": typed, "update": update}
assert tuple(BUILDERS) == SCENARIOS


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

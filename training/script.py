"""The dialogue script: a dialogue being written, user utterances and model turns on one timeline.

`Script` is what a scenario (training/scenarios.py) writes into: the user `say`s phrases (espeak-ng
speech in the dialogue's voice, with pauses and level changes), the model `speak`s, `reply`s and is
`interrupt`ed (its turns in the one fixed `MODEL_VOICE`), and each behaviour the data asks for is
recorded as an event in real time on the shared timeline. The rules it applies are
`DialogueConfig`'s: a reply starts on the first tick boundary at least `min_silence_s` after the
user's speech ends, an interruption stops the model on the first tick boundary at least
`stop_after_s` after the user's onset. The model's output for input tick k plays during tick k+1
(`PLAY_DELAY_TICKS`). Rendering a script into a `Dialogue` is training/dialogues.py's.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np

from protocols.chunks import SAMPLE_RATE
from training import content
from training.voices import MODEL_VOICE, Speech, Synth, Voice

PLAY_DELAY_TICKS = 1
SENTENCE_GAP_S = 0.25  # between the sentences of one model turn
FADE_S = 0.03  # an interrupted model fades out over this much of its stop tick


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

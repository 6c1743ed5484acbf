"""Fakes for driving a `RealtimeSession` alone: a sink that records what the session sends, an
audio queue that plays only when a test says so, and small helpers to build sessions and outputs.
No transport, no network, no clock: times are passed in."""

import json

import numpy as np
from openai.types.realtime import RealtimeServerEvent
from pydantic import TypeAdapter

from actors.ingress.realtime_session import RealtimeSession
from protocols import OutputChunk

OUT_RATE = 48_000
OUT_FRAME = 960  # samples in a 20 ms frame of the outgoing stream
TONE = (8000 * np.sin(np.arange(3200) / 5)).astype(np.int16)
SILENCE = np.zeros(3200, np.int16)
openai_server_event = TypeAdapter(RealtimeServerEvent)


class FakeAudio:
    """An audio queue in 48 kHz samples that plays only when `play(ms)` is called."""

    def __init__(self):
        self.written = 0
        self.position = 0

    @property
    def queued_ms(self) -> float:
        return (self.written - self.position) * 1000 / OUT_RATE

    @property
    def next_play_sample(self) -> int:
        return self.written

    def write(self, samples):
        self.written += len(samples) * 3

    def clear(self) -> float:
        dropped, self.position = self.queued_ms, self.written
        return dropped

    def play(self, ms: float) -> None:
        self.position = min(self.written, self.position + int(ms * OUT_RATE / 1000))

    def time_of(self, sample):
        return None


class RecordingSink:
    """Records what the session sends; `playout` records the transport-specific calls."""

    max_event_bytes = 4096

    def __init__(self):
        self.events: list[dict] = []
        self.playout: list[tuple[str, str | None]] = []
        self.appended: list[tuple[str, int]] = []
        self.audio_out = FakeAudio()

    def send(self, event):
        self.events.append(json.loads(json.dumps(event)))  # what a client would parse

    def append_audio(self, audio_b64, fmt, t_arrival):
        self.appended.append((audio_b64, fmt))

    def clear_input(self):
        self.appended.clear()

    def audio_written(self, response_id, item_id):
        self.playout.append(("written", response_id))

    def playout_started(self, response_id):
        self.playout.append(("started", response_id))

    def playout_done(self, response_id):
        self.playout.append(("done", response_id))

    def playout_cleared(self, response_id):
        self.playout.append(("cleared", response_id))

    def types(self) -> list[str]:
        return [e["type"] for e in self.events]

    def of_type(self, kind):
        return [e for e in self.events if e["type"] == kind]

    def errors(self) -> list[str]:
        return [e["error"]["code"] for e in self.of_type("error")]


def session(config=None, **kw) -> tuple[RealtimeSession, RecordingSink]:
    sink = RecordingSink()
    return RealtimeSession(sink, config or {"type": "realtime"}, **kw), sink


def out(s, seq, controls, text="", audio=TONE):
    return OutputChunk(s.id, seq, seq * 0.2, audio, text=text, controls=controls)


def send(s, event, now=0.0):
    s.receive(json.dumps(event), now)
